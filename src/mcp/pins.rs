//! The trust pins of MCP servers (`state.db` tables `mcp_trust`, `mcp_pins`): which servers
//! an owner trusted, under which identity (command line or URL), and the digest of every tool
//! definition they listed then.

use std::collections::BTreeMap;
use std::sync::Arc;

use rusqlite::{OptionalExtension, params};

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
        let conn = self.store.conn().map_err(db)?;
        let head = conn
            .query_row(
                "SELECT identity, list_digest, trusted_ms, trusted_by FROM mcp_trust WHERE server = ?1",
                params![server],
                |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, i64>(2)?,
                        r.get::<_, String>(3)?,
                    ))
                },
            )
            .optional()
            .map_err(db)?;
        let Some((identity, list_digest, trusted_ms, trusted_by)) = head else {
            return Ok(None);
        };
        let mut stmt = conn
            .prepare("SELECT tool, digest, definition FROM mcp_pins WHERE server = ?1")
            .map_err(db)?;
        let rows = stmt
            .query_map(params![server], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                ))
            })
            .map_err(db)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(db)?;
        let mut pins = BTreeMap::new();
        let mut definitions = BTreeMap::new();
        for (tool, digest, definition) in rows {
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
        let mut conn = self.store.conn().map_err(db)?;
        let tx = conn.transaction().map_err(db)?;
        tx.execute("DELETE FROM mcp_pins WHERE server = ?1", params![server])
            .map_err(db)?;
        tx.execute(
            "INSERT INTO mcp_trust (server, identity, list_digest, trusted_ms, trusted_by)
             VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT(server) DO UPDATE SET identity = ?2, list_digest = ?3,
               trusted_ms = ?4, trusted_by = ?5",
            params![server, identity, list_digest, now_ms, by],
        )
        .map_err(db)?;
        for t in tools {
            tx.execute(
                "INSERT INTO mcp_pins (server, tool, digest, definition) VALUES (?1, ?2, ?3, ?4)",
                params![server, t.name, t.digest, t.raw.to_string()],
            )
            .map_err(db)?;
        }
        tx.commit().map_err(db)
    }

    /// Drops `server`'s trust and pins; whether there were any.
    pub fn untrust(&self, server: &str) -> Result<bool, McpError> {
        let mut conn = self.store.conn().map_err(db)?;
        let tx = conn.transaction().map_err(db)?;
        tx.execute("DELETE FROM mcp_pins WHERE server = ?1", params![server])
            .map_err(db)?;
        let n = tx
            .execute("DELETE FROM mcp_trust WHERE server = ?1", params![server])
            .map_err(db)?;
        tx.commit().map_err(db)?;
        Ok(n > 0)
    }
}
