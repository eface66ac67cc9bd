//! The `[store]` section of `chitin.toml`: where the gateway keeps its state (SQLite
//! `state.db`, or PostgreSQL shared by several gateways).

use serde::Deserialize;

use crate::config::secret_ref::SecretRef;

/// Documentation and defaults for the `[store]` section, written by `chitin init`.
pub const TEMPLATE: &str = r#"
[store]
# "sqlite": state.db in the state directory (one gateway). "postgres": a PostgreSQL database
# (several gateways on one database; docs/storage.md). Move an existing state.db with
# `chitin store copy --from sqlite --to postgres`.
backend = "sqlite"
# postgres only. The database URL, postgres://USER@HOST:PORT/DBNAME, either as a secret
# reference holding the whole URL ("secret:pg_url", stored with
# `chitin secrets set pg_url --audience HOST`) or written here without a password, with the
# password in `password`.
url = ""
# postgres only: "secret:NAME" (audience: the database host) or "env:VAR"; "" = none (trust or
# certificate authentication, or a password in the URL secret).
password = ""
# postgres only: TLS to the database through rustls. "disable", "require" (encrypted, the
# certificate not checked: eavesdroppers only), "verify-full" (the certificate checked against
# ca_file, or the system's roots, and the host name). "" = "disable" for a loopback host or a
# Unix socket, "verify-full" otherwise.
tls = ""
# PEM file of the CA certificates verify-full trusts ("" = the system's roots).
ca_file = ""
# postgres only: at most this many connections from this gateway.
pool_size = 8
# How long a replica's leases (its runs, sessions and polling channels) last without renewal,
# in milliseconds: when a gateway dies, another takes its work over this long after its last
# renewal. Renewed every third of it. Longer than the replicas' clock skew; 3000 to 600000.
lease_ms = 30000
"#;

/// Which database.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    #[default]
    Sqlite,
    Postgres,
}

impl Backend {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sqlite => "sqlite",
            Self::Postgres => "postgres",
        }
    }
}

/// The `[store]` section.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    pub backend: Backend,
    pub url: String,
    pub password: String,
    pub tls: String,
    pub ca_file: String,
    pub pool_size: usize,
    pub lease_ms: i64,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            backend: Backend::Sqlite,
            url: String::new(),
            password: String::new(),
            tls: String::new(),
            ca_file: String::new(),
            pool_size: 8,
            lease_ms: 30_000,
        }
    }
}

/// Where the URL comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UrlSource {
    /// Written in the config (no password in it).
    Plain(String),
    /// A secret or environment variable holding the whole URL.
    Ref(SecretRef),
}

impl StoreConfig {
    /// Checks the section; messages never quote the URL (it could hold a password).
    pub fn validate(&self) -> Result<(), String> {
        if !self.tls.is_empty() && chitin_store::TlsMode::parse(&self.tls).is_none() {
            return Err(
                "[store] tls must be \"disable\", \"require\" or \"verify-full\" (or \"\" for the default)"
                    .into(),
            );
        }
        if self.pool_size == 0 {
            return Err("[store] pool_size must be at least 1".into());
        }
        if !(3_000..=600_000).contains(&self.lease_ms) {
            return Err("[store] lease_ms must be between 3000 and 600000 (milliseconds)".into());
        }
        if self.backend == Backend::Sqlite {
            return Ok(());
        }
        if self.url.is_empty() {
            return Err(
                "[store] backend = \"postgres\" needs `url`: \"secret:NAME\" holding postgres://USER:PASSWORD@HOST:PORT/DBNAME, or postgres://USER@HOST:PORT/DBNAME with `password`"
                    .into(),
            );
        }
        if let UrlSource::Plain(url) = self.url_source()? {
            let cfg = chitin_store::PgConfig::new(url);
            cfg.location().map_err(|e| format!("[store] url: {e}"))?;
            if let Some(rest) = cfg.url.split_once("://").map(|(_, r)| r)
                && rest
                    .split(['/', '?'])
                    .next()
                    .is_some_and(|auth| auth.rsplit_once('@').is_some_and(|(u, _)| u.contains(':')))
            {
                return Err(
                    "[store] url holds a password: keep the URL in a secret (url = \"secret:NAME\") or put the password in `password = \"secret:NAME\"`"
                        .into(),
                );
            }
        }
        if !self.password.is_empty() {
            SecretRef::parse_credential("[store] password", &self.password)?;
        }
        Ok(())
    }

    /// The URL as configured.
    pub fn url_source(&self) -> Result<UrlSource, String> {
        if self.url.starts_with("secret:") || self.url.starts_with("env:") {
            SecretRef::parse_credential("[store] url", &self.url).map(UrlSource::Ref)
        } else {
            Ok(UrlSource::Plain(self.url.clone()))
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    fn parse(text: &str) -> Result<StoreConfig, String> {
        let c: StoreConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        c.validate().map(|()| c)
    }

    #[test]
    fn the_default_is_sqlite_and_needs_nothing_else() {
        assert_eq!(parse("").unwrap().backend, Backend::Sqlite);
    }

    #[test]
    fn postgres_takes_a_secret_url_or_a_plain_url_with_a_password_reference() {
        let c = parse("backend = \"postgres\"\nurl = \"secret:pg_url\"").unwrap();
        assert!(matches!(c.url_source().unwrap(), UrlSource::Ref(_)));
        let c = parse(
            "backend = \"postgres\"\nurl = \"postgres://chitin@db.internal:5432/chitin\"\npassword = \"secret:pg_pass\"\ntls = \"verify-full\"\nca_file = \"/etc/chitin/db-ca.pem\"",
        )
        .unwrap();
        assert_eq!(
            c.url_source().unwrap(),
            UrlSource::Plain("postgres://chitin@db.internal:5432/chitin".into())
        );
    }

    #[test]
    fn a_password_written_in_the_url_is_refused_without_being_repeated() {
        let e = parse("backend = \"postgres\"\nurl = \"postgres://chitin:hunter2@db/chitin\"")
            .unwrap_err();
        assert!(e.contains("holds a password"), "{e}");
        assert!(!e.contains("hunter2"), "{e}");
    }

    #[test]
    fn a_literal_password_an_unknown_tls_mode_and_a_missing_url_are_refused() {
        let e = parse("backend = \"postgres\"\nurl = \"postgres://c@h/d\"\npassword = \"hunter2\"")
            .unwrap_err();
        assert!(
            e.contains("[store] password") && !e.contains("hunter2"),
            "{e}"
        );
        let e = parse("tls = \"prefer\"").unwrap_err();
        assert!(e.contains("verify-full"), "{e}");
        let e = parse("backend = \"postgres\"").unwrap_err();
        assert!(e.contains("needs `url`"), "{e}");
        let e = parse("lease_ms = 100").unwrap_err();
        assert!(e.contains("lease_ms must be between"), "{e}");
        let e = parse("backend = \"mysql\"").unwrap_err();
        assert!(e.contains("unknown variant"), "{e}");
    }
}
