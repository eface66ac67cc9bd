//! The `[sandbox]` section of `chitin.toml`.

use serde::Deserialize;

/// Documentation and defaults for the `[sandbox]` section, written by `chitin init`.
pub const TEMPLATE: &str = r#"
[sandbox]
"#;

/// The `[sandbox]` section.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SandboxConfig {}
