//! The `[audit]` section of `chitin.toml`.

use serde::Deserialize;

/// Documentation and defaults for the `[audit]` section, written by `chitin init`.
pub const TEMPLATE: &str = r#"
[audit]
"#;

/// The `[audit]` section.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuditConfig {}
