//! Text helpers shared by adapters (placeholder: `split` lands with the Telegram adapter).
