//! The `[policy]` section of `chitin.toml`.

use serde::Deserialize;

/// Documentation and defaults for the `[policy]` section, written by `chitin init`.
pub const TEMPLATE: &str = r#"
[policy]
# Directory holding the Cedar policy files (*.cedar, read recursively), relative to the state
# directory unless absolute. A `schema.cedarschema` in it replaces the built-in schema.
# When the directory does not exist, the default policies built into Chitin are used.
dir = "policies"
# Users, groups and paired identities as Cedar entity JSON, relative to the state directory
# unless absolute. Generate it from your directory service; a missing file means "no entities".
entities = "entities.json"
"#;

/// The `[policy]` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PolicyConfig {
    pub dir: String,
    pub entities: String,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            dir: "policies".into(),
            entities: "entities.json".into(),
        }
    }
}
