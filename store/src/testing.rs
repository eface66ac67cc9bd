//! Tests against a real PostgreSQL: each [`TestPg`] is a fresh database
//! `chitin_test_<random>` (C collation, like the documented production setting), dropped when
//! the value is. The server is `CHITIN_TEST_PG_URL` (default
//! `postgres://postgres@127.0.0.1:5432/test`); `scripts/test.sh` starts one when none answers.

use crate::{Db, PgConfig, Result, params};

/// The server tests use.
pub fn admin_url() -> String {
    std::env::var("CHITIN_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// A fresh, empty database; dropped (connections terminated) on drop.
pub struct TestPg {
    name: String,
    url: String,
}

impl std::fmt::Debug for TestPg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestPg").field("name", &self.name).finish()
    }
}

fn admin() -> Result<Db> {
    Db::postgres_unmigrated(&PgConfig::new(admin_url())).map_err(|e| {
        crate::Error::Config(format!(
            "tests need PostgreSQL at {} ({e}); `scripts/test.sh` installs and starts one, or set CHITIN_TEST_PG_URL",
            admin_url()
        ))
    })
}

impl TestPg {
    /// Creates the database (not migrated).
    pub fn new() -> Result<Self> {
        let mut r = [0u8; 8];
        getrandom::fill(&mut r).map_err(|e| crate::Error::Internal(e.to_string()))?;
        let name = format!(
            "chitin_test_{}",
            r.iter().map(|b| format!("{b:02x}")).collect::<String>()
        );
        admin()?.with(|c| {
            c.execute_batch(&format!(
                "CREATE DATABASE {name} TEMPLATE template0 ENCODING 'UTF8' LC_COLLATE 'C' LC_CTYPE 'C'"
            ))
        })?;
        let base = admin_url();
        let cut = base.rfind('/').unwrap_or(base.len());
        let url = format!("{}/{name}", &base[..cut]);
        Ok(Self { name, url })
    }

    /// Its URL (no password).
    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn config(&self) -> PgConfig {
        PgConfig::new(self.url.clone())
    }

    /// Connects and migrates.
    pub fn db(&self) -> Result<Db> {
        Db::postgres(&self.config())
    }
}

impl Drop for TestPg {
    fn drop(&mut self) {
        if let Ok(a) = admin() {
            let _ = a.with(|c| {
                c.execute(
                    &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
                    params![],
                )
            });
        }
    }
}
