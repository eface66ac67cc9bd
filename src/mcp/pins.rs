//! The trust pins of MCP servers (`state.db` tables `mcp_trust`, `mcp_pins`): which servers
//! an owner trusted, under which identity (command line or URL), and the digest of every tool
//! definition they listed then.

use std::collections::BTreeMap;
use std::sync::Arc;

use chitin_store::Row;

use crate::store::params;

use super::McpError;
use super::wire::ToolDef;
use crate::store::Store;

/// A server's trust record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trust {
    /// `sha256:<hex>` of the server's identity when it was trusted.
    pub identity: String,
    /// The digest of the whole listing then.
    pub list_digest: String,
    pub trusted_ms: i64,
    pub trusted_by: String,
    /// Tool name -> definition digest.
    pub pins: BTreeMap<String, String>,
    /// Tool name -> the definition as it was listed then.
    pub definitions: BTreeMap<String, serde_json::Value>,
}

/// The pins in `state.db`.
#[derive(Debug, Clone)]
pub struct Pins {
    store: Arc<Store>,
}

fn db(e: impl std::fmt::Display) -> McpError {
    McpError::Store(e.to_string())
}

impl Pins {
    pub fn new(store: Arc<Store>) -> Self {
        Self { store }
    }

    /// The trust record of `server`, if an owner trusted it.
    pub fn get(&self, server: &str) -> Result<Option<Trust>, McpError> {
        type Head = (String, String, i64, String);
        let read = self
            .store
            .db()
            .tx(|c| -> Result<Option<(Head, Vec<Row>)>, chitin_store::Error> {
                let Some(h) = c.query_opt(
                    "SELECT identity, list_digest, trusted_ms, trusted_by FROM mcp_trust WHERE server = ?1",
                    params![server],
                )?
                else {
                    return Ok(None);
                };
                let head = (h.get(0)?, h.get(1)?, h.get(2)?, h.get(3)?);
                let rows = c.query_all(
                    "SELECT tool, digest, definition FROM mcp_pins WHERE server = ?1 ORDER BY tool",
                    params![server],
                )?;
                Ok(Some((head, rows)))
            })
            .map_err(db)?;
        let Some(((identity, list_digest, trusted_ms, trusted_by), rows)) = read else {
            return Ok(None);
        };
        let mut pins = BTreeMap::new();
        let mut definitions = BTreeMap::new();
        for r in rows {
            let tool: String = r.get(0).map_err(db)?;
            let digest: String = r.get(1).map_err(db)?;
            let definition: String = r.get(2).map_err(db)?;
            let def: serde_json::Value = serde_json::from_str(&definition).map_err(db)?;
            // A definition that no longer hashes to its pin (the row was edited) pins nothing.
            if super::wire::digest(&def) != digest {
                continue;
            }
            definitions.insert(tool.clone(), def);
            pins.insert(tool, digest);
        }
        Ok(Some(Trust {
            identity,
            list_digest,
            trusted_ms,
            trusted_by,
            pins,
            definitions,
        }))
    }

    /// Replaces `server`'s pins with `tools` (one transaction).
    pub fn trust(
        &self,
        server: &str,
        identity: &str,
        list_digest: &str,
        tools: &[ToolDef],
        now_ms: i64,
        by: &str,
    ) -> Result<(), McpError> {
        self.store
            .db()
            .tx(|t| -> Result<(), chitin_store::Error> {
                t.execute("DELETE FROM mcp_pins WHERE server = ?1", params![server])?;
                t.execute(
                    "INSERT INTO mcp_trust (server, identity, list_digest, trusted_ms, trusted_by)
                     VALUES (?1, ?2, ?3, ?4, ?5)
                     ON CONFLICT(server) DO UPDATE SET identity = ?2, list_digest = ?3,
                       trusted_ms = ?4, trusted_by = ?5",
                    params![server, identity, list_digest, now_ms, by],
                )?;
                for tool in tools {
                    t.execute(
                        "INSERT INTO mcp_pins (server, tool, digest, definition) VALUES (?1, ?2, ?3, ?4)",
                        params![server, tool.name, tool.digest, tool.raw.to_string()],
                    )?;
                }
                Ok(())
            })
            .map_err(db)
    }

    /// Drops `server`'s trust and pins; whether there were any.
    pub fn untrust(&self, server: &str) -> Result<bool, McpError> {
        self.store
            .db()
            .tx(|t| -> Result<bool, chitin_store::Error> {
                t.execute("DELETE FROM mcp_pins WHERE server = ?1", params![server])?;
                let n = t.execute("DELETE FROM mcp_trust WHERE server = ?1", params![server])?;
                Ok(n > 0)
            })
            .map_err(db)
    }
}
