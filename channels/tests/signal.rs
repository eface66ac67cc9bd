//! The Signal adapter against its fake (follows in the next commit).
