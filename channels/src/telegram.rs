//! Telegram Bot API adapter (placeholder: the real adapter is built in another worktree).
