//! The `[secrets]` section of `chitin.toml`.

use serde::Deserialize;

/// Documentation and defaults for the `[secrets]` section, written by `chitin init`.
pub const TEMPLATE: &str = r#"
[secrets]
"#;

/// The `[secrets]` section.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SecretsConfig {}
