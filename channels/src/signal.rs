//! Signal, through a signal-cli daemon (follows in the next commit).
