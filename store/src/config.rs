//! How to reach PostgreSQL: the URL (a password in it, or given apart), TLS through rustls.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::pem::PemObject;

use crate::error::{Error, Result};

/// TLS to the database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    /// Plain TCP (a database on the loopback interface or a private socket).
    Disable,
    /// Encrypted, the server's certificate not checked (like libpq's `require`): protects
    /// against eavesdropping only, not against an active attacker.
    Require,
    /// Encrypted, the certificate checked against the CA file (or the system's roots) and the
    /// host name.
    VerifyFull,
}

impl TlsMode {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "disable" => Some(Self::Disable),
            "require" => Some(Self::Require),
            "verify-full" => Some(Self::VerifyFull),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Disable => "disable",
            Self::Require => "require",
            Self::VerifyFull => "verify-full",
        }
    }
}

/// The connection settings. Holds the password (in `url` or `password`): no `Debug`, and
/// both are wiped on drop.
pub struct PgConfig {
    /// `postgres://user@host:port/dbname` (a password in it is accepted, e.g. from a secret).
    pub url: zeroize::Zeroizing<String>,
    pub password: Option<zeroize::Zeroizing<String>>,
    /// `None`: `disable` for a loopback host or a Unix socket, `verify-full` otherwise.
    pub tls: Option<TlsMode>,
    /// PEM file of the CA(s) `verify-full` trusts instead of the system's roots.
    pub ca_file: Option<PathBuf>,
    /// At most this many connections.
    pub pool_size: usize,
}

impl PgConfig {
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: zeroize::Zeroizing::new(url.into()),
            password: None,
            tls: None,
            ca_file: None,
            pool_size: 8,
        }
    }

    fn parsed(&self) -> Result<tokio_postgres::Config> {
        let lower = self.url.to_ascii_lowercase();
        if lower.contains("sslmode=") || lower.contains("sslrootcert=") {
            return Err(Error::Config(
                "put TLS in `[store] tls` and `ca_file`, not `sslmode`/`sslrootcert` in the URL"
                    .into(),
            ));
        }
        if !(lower.starts_with("postgres://") || lower.starts_with("postgresql://")) {
            return Err(Error::Config(
                "the store URL must start with postgres:// (postgres://USER@HOST:PORT/DBNAME)"
                    .into(),
            ));
        }
        // The parser's message could quote the URL (and a password in it): say only what to fix.
        let mut c: tokio_postgres::Config = self.url.parse().map_err(|_| {
            Error::Config(
                "the store URL is not a valid PostgreSQL URL (postgres://USER@HOST:PORT/DBNAME)"
                    .into(),
            )
        })?;
        if let Some(p) = &self.password {
            if c.get_password().is_some() {
                return Err(Error::Config(
                    "the store URL has a password and `password` is set too: keep one".into(),
                ));
            }
            c.password(p.as_bytes());
        }
        if c.get_dbname().is_none() {
            return Err(Error::Config(
                "the store URL names no database (postgres://USER@HOST:PORT/DBNAME)".into(),
            ));
        }
        c.application_name("chitin");
        c.connect_timeout(std::time::Duration::from_secs(10));
        Ok(c)
    }

    /// Where it points, for messages: `host:port/dbname`, never a password.
    pub fn location(&self) -> Result<String> {
        Ok(location_of(&self.parsed()?))
    }

    fn loopback(c: &tokio_postgres::Config) -> bool {
        c.get_hosts().iter().all(|h| match h {
            tokio_postgres::config::Host::Tcp(name) => {
                name == "localhost"
                    || name
                        .parse::<std::net::IpAddr>()
                        .is_ok_and(|ip| ip.is_loopback())
            }
            tokio_postgres::config::Host::Unix(_) => true,
        })
    }

    /// The TLS mode in effect (the default depends on the host).
    pub fn tls_mode(&self) -> Result<TlsMode> {
        Ok(match self.tls {
            Some(m) => m,
            None if Self::loopback(&self.parsed()?) => TlsMode::Disable,
            None => TlsMode::VerifyFull,
        })
    }

    pub(crate) fn tokio_config(&self) -> Result<(tokio_postgres::Config, String)> {
        let mut c = self.parsed()?;
        c.ssl_mode(match self.tls_mode()? {
            TlsMode::Disable => tokio_postgres::config::SslMode::Disable,
            _ => tokio_postgres::config::SslMode::Require,
        });
        let loc = location_of(&c);
        Ok((c, loc))
    }
}

fn location_of(c: &tokio_postgres::Config) -> String {
    let host = c
        .get_hosts()
        .iter()
        .map(|h| match h {
            tokio_postgres::config::Host::Tcp(n) => n.clone(),
            tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
        })
        .collect::<Vec<_>>()
        .join(",");
    let port = c
        .get_ports()
        .first()
        .map_or_else(|| "5432".to_string(), u16::to_string);
    format!(
        "postgres://{host}:{port}/{}",
        c.get_dbname().unwrap_or_default()
    )
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Accepts any certificate but still checks the handshake signatures (`require`).
#[derive(Debug)]
struct Unverified(Arc<CryptoProvider>);

impl ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

pub(crate) fn rustls_config(mode: TlsMode, ca_file: Option<&Path>) -> Result<rustls::ClientConfig> {
    let p = provider();
    let builder = rustls::ClientConfig::builder_with_provider(p.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Config(format!("TLS: {e}")))?;
    match mode {
        TlsMode::Require => Ok(builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Unverified(p)))
            .with_no_client_auth()),
        TlsMode::Disable | TlsMode::VerifyFull => {
            let mut roots = rustls::RootCertStore::empty();
            match ca_file {
                Some(path) => {
                    let certs = CertificateDer::pem_file_iter(path)
                        .map_err(|e| {
                            Error::Config(format!(
                                "store CA file {}: {e}; give a PEM file of CA certificates",
                                path.display()
                            ))
                        })?
                        .collect::<std::result::Result<Vec<_>, _>>()
                        .map_err(|e| {
                            Error::Config(format!("store CA file {}: {e}", path.display()))
                        })?;
                    let (added, _) = roots.add_parsable_certificates(certs);
                    if added == 0 {
                        return Err(Error::Config(format!(
                            "store CA file {} holds no usable certificate",
                            path.display()
                        )));
                    }
                }
                None => {
                    let found = rustls_native_certs::load_native_certs();
                    roots.add_parsable_certificates(found.certs);
                    if roots.is_empty() {
                        return Err(Error::Config(
                            "no system CA certificates for `tls = \"verify-full\"`: set `[store] ca_file`"
                                .into(),
                        ));
                    }
                }
            }
            Ok(builder.with_root_certificates(roots).with_no_client_auth())
        }
    }
}
