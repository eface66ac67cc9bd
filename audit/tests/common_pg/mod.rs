//! PostgreSQL helpers for the audit tests: every test gets its own fresh database
//! (`chitin_audit_<random>`), dropped afterwards. PostgreSQL must answer on 127.0.0.1:5432
//! (trust auth, user `postgres`; `CHITIN_TEST_PG` overrides `postgres://postgres@127.0.0.1:5432`).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    dead_code,
    reason = "tests"
)]

use chitin_audit::PgConfig;
use postgres::{Client, NoTls};

pub fn server() -> String {
    std::env::var("CHITIN_TEST_PG").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

/// A fresh database, dropped (with its connections) when this is dropped.
pub struct TestDb {
    pub name: String,
}

impl TestDb {
    pub fn new() -> Self {
        let mut rnd = [0u8; 8];
        getrandom::fill(&mut rnd).unwrap();
        let name = format!("chitin_audit_{}", chitin_audit::to_hex(&rnd));
        let mut admin = Client::connect(&format!("{}/test?sslmode=disable", server()), NoTls)
            .unwrap_or_else(|e| {
                panic!(
                    "PostgreSQL is not answering at {} ({e}); `scripts/test.sh` starts one",
                    server()
                )
            });
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .unwrap();
        Self { name }
    }

    /// The database's URL (no TLS: the server is on this host).
    pub fn url(&self) -> String {
        format!("{}/{}?sslmode=disable", server(), self.name)
    }

    pub fn config(&self) -> PgConfig {
        PgConfig::from_url(&self.url()).unwrap()
    }

    /// A raw connection, as a database administrator (or an attacker with their rights) has.
    pub fn client(&self) -> Client {
        Client::connect(&self.url(), NoTls).unwrap()
    }

    /// A raw connection with the append-only triggers out of the way (superuser).
    pub fn attacker(&self) -> Client {
        let mut c = self.client();
        c.batch_execute("SET session_replication_role = replica")
            .unwrap();
        c
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Ok(mut admin) = Client::connect(&format!("{}/test?sslmode=disable", server()), NoTls)
        {
            let _ = admin.batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ));
        }
    }
}
