//! Hosts, addresses and name resolution for the gate's network decisions (`web_fetch`).
//!
//! Invariants:
//! - Parsing a URL never touches the network: [`WebUrl::parse`] says whether the host is an
//!   IP literal (every `inet_aton` form counts, through the one host parser
//!   [`chitin_sandbox::host::parse_host`], shared with `exec` network destinations).
//! - Names are resolved only through a [`Resolver`], and only by the gate after a first
//!   allow (see `gate`); tests observe every resolution at that seam.
//! - [`is_public`] is false for every address that is not plainly public unicast, and for
//!   every IPv6 transition form that embeds or tunnels to IPv4 (IPv4-mapped, IPv4-compatible,
//!   NAT64, 6to4, Teredo), whatever address it embeds.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs};

use chitin_sandbox::host::{Host, parse_host};
use reqwest::Url;

/// A `web_fetch` URL, parsed without any network access.
#[derive(Debug, Clone)]
pub struct WebUrl {
    pub url: Url,
    /// `http` or `https`.
    pub scheme: String,
    /// The host as written (lower case; an IP literal in canonical form).
    pub host: String,
    /// The address, when the host is an IP literal.
    pub ip: Option<IpAddr>,
    pub port: u16,
}

impl WebUrl {
    /// Parses and checks a URL: http(s) only, no credentials, a valid host.
    pub fn parse(url: &str) -> Result<Self, String> {
        let u = Url::parse(url).map_err(|e| format!("invalid url: {e}"))?;
        if u.scheme() != "http" && u.scheme() != "https" {
            return Err(format!(
                "scheme `{}` is not allowed; use http or https",
                u.scheme()
            ));
        }
        if !u.username().is_empty() || u.password().is_some() {
            return Err("credentials in the url are not allowed".into());
        }
        let raw = u
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or("the url has no host")?;
        let host = parse_host(raw).map_err(|e| format!("invalid host: {e}"))?;
        let port = u
            .port_or_known_default()
            .ok_or("the url has no port and its scheme has no default")?;
        Ok(Self {
            scheme: u.scheme().to_string(),
            host: host.to_string(),
            ip: host.ip(),
            port,
            url: u,
        })
    }

    /// The host as reqwest looks it up (IPv6 literals in brackets are never looked up).
    pub fn host_name(&self) -> Option<&str> {
        match self.ip {
            Some(_) => None,
            None => Some(&self.host),
        }
    }
}

/// Turns a host name into addresses. The gate's only way to ask DNS.
pub trait Resolver: Send + Sync {
    /// Every address `host` resolves to (an error or an empty list means: do not connect).
    fn resolve(&self, host: &str, port: u16) -> Result<Vec<IpAddr>, String>;
}

/// The system resolver (`getaddrinfo`: `/etc/hosts`, then DNS).
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemResolver;

impl Resolver for SystemResolver {
    fn resolve(&self, host: &str, port: u16) -> Result<Vec<IpAddr>, String> {
        // A name that parses as an address is never sent to getaddrinfo (which would read
        // numeric forms itself); `WebUrl` never produces one, but the seam refuses it anyway.
        if !matches!(parse_host(host), Ok(Host::Name(_))) {
            return Err(format!("`{host}` is not a host name"));
        }
        let addrs: Vec<IpAddr> = (host, port)
            .to_socket_addrs()
            .map_err(|e| format!("cannot resolve `{host}`: {e}"))?
            .map(|a: SocketAddr| a.ip())
            .collect();
        if addrs.is_empty() {
            return Err(format!("`{host}` resolves to no address"));
        }
        Ok(addrs)
    }
}

/// Whether `ip` is a public unicast address: not loopback, private, link-local, CGNAT,
/// multicast, broadcast, unspecified, documentation, benchmarking or otherwise reserved, and
/// not an IPv6 form that embeds or tunnels to IPv4 (mapped, compatible, NAT64, 6to4, Teredo).
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => is_public_v6(v6),
    }
}

fn is_public_v4(v4: Ipv4Addr) -> bool {
    let o = v4.octets();
    !(v4.is_loopback()
        || v4.is_private()
        || v4.is_link_local()
        || v4.is_unspecified()
        || v4.is_broadcast()
        || v4.is_multicast()
        || v4.is_documentation()
        || o[0] == 0 // "this network"
        || (o[0] == 100 && (64..128).contains(&o[1])) // CGNAT 100.64/10
        || (o[0] == 192 && o[1] == 0 && o[2] == 0) // IETF protocol assignments
        || (o[0] == 192 && o[1] == 88 && o[2] == 99) // 6to4 relay anycast
        || (o[0] == 198 && (o[1] == 18 || o[1] == 19)) // benchmarking 198.18/15
        || o[0] >= 240) // reserved, broadcast
}

fn is_public_v6(v6: Ipv6Addr) -> bool {
    let s = v6.segments();
    let embeds_v4 = (s[..5].iter().all(|x| *x == 0) && (s[5] == 0 || s[5] == 0xffff)) // compatible, mapped
        || (s[0] == 0x64 && s[1] == 0xff9b) // NAT64 64:ff9b::/96 and 64:ff9b:1::/48
        || s[0] == 0x2002 // 6to4
        || (s[0] == 0x2001 && s[1] == 0); // Teredo 2001::/32
    !(embeds_v4
        || v6.is_loopback()
        || v6.is_unspecified()
        || v6.is_multicast()
        || (s[0] & 0xfe00) == 0xfc00 // unique local
        || (s[0] & 0xffc0) == 0xfe80 // link-local
        || (s[0] & 0xffc0) == 0xfec0 // site-local
        || (s[0] == 0x2001 && s[1] == 0x0db8) // documentation
        || (s[0] & 0xfff0) == 0x3ff0 // documentation 3fff::/20
        || (s[0] == 0x2001 && s[1] == 0x0002 && s[2] == 0) // benchmarking 2001:2::/48
        || (s[0] == 0x2001 && (s[1] & 0xfff0) == 0x0010) // ORCHID 2001:10::/28
        || (s[0] == 0x2001 && (s[1] & 0xfff0) == 0x0020) // ORCHIDv2 2001:20::/28
        || (s[0] == 0x0100 && s[1..4].iter().all(|x| *x == 0)) // discard 100::/64
        || s[0] < 0x2000 // everything outside global unicast 2000::/3
        || s[0] >= 0x4000)
}

/// True when any of `addrs` is not public.
pub fn any_private(addrs: &[IpAddr]) -> bool {
    addrs.iter().any(|a| !is_public(*a))
}

/// TLS for the gateway's own HTTPS clients (model providers): the platform's root store and
/// WebPKI, exactly what reqwest uses by default (`rustls-platform-verifier`), but one verifier
/// per process, built on the first TLS handshake instead of for every client (issue #21:
/// reqwest loads and parses the system's ~145 roots each time a client is built, ~3 ms, and a
/// gateway start built two provider clients). The roots are read once per process: a change
/// of the system's trust store is seen after a restart.
///
/// ALPN offers HTTP/1.1 only, as reqwest does without its `http2` feature.
pub fn client_tls() -> Result<rustls::ClientConfig, String> {
    static BASE: std::sync::OnceLock<Result<rustls::ClientConfig, String>> =
        std::sync::OnceLock::new();
    BASE.get_or_init(|| {
        let provider = rustls::crypto::CryptoProvider::get_default()
            .cloned()
            .unwrap_or_else(|| std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider()));
        let mut config =
            rustls::ClientConfig::builder_with_provider(std::sync::Arc::clone(&provider))
                .with_protocol_versions(rustls::ALL_VERSIONS)
                .map_err(|e| format!("TLS client configuration: {e}"))?
                .dangerous()
                .with_custom_certificate_verifier(std::sync::Arc::new(LazyPlatformVerifier {
                    provider,
                    inner: std::sync::OnceLock::new(),
                }))
                .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(config)
    })
    .clone()
}

/// `rustls_platform_verifier::Verifier`, created on first use (reading the system's roots).
/// A failure to create it fails every handshake (never an unverified connection).
#[derive(Debug)]
struct LazyPlatformVerifier {
    provider: std::sync::Arc<rustls::crypto::CryptoProvider>,
    inner: std::sync::OnceLock<Result<rustls_platform_verifier::Verifier, String>>,
}

impl LazyPlatformVerifier {
    fn get(&self) -> Result<&rustls_platform_verifier::Verifier, rustls::Error> {
        self.inner
            .get_or_init(|| {
                rustls_platform_verifier::Verifier::new(std::sync::Arc::clone(&self.provider))
                    .map_err(|e| e.to_string())
            })
            .as_ref()
            .map_err(|e| rustls::Error::General(format!("the system's trust roots: {e}")))
    }
}

impl rustls::client::danger::ServerCertVerifier for LazyPlatformVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        intermediates: &[rustls::pki_types::CertificateDer<'_>],
        server_name: &rustls::pki_types::ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        self.get()?
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.get()?.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.get()?.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        // What the platform verifier answers, without loading the roots for it.
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]
    use super::*;

    #[test]
    fn every_non_public_range_and_ipv4_transition_form_is_private() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "100.127.255.254",
            "0.0.0.0",
            "0.1.2.3",
            "224.0.0.1",
            "255.255.255.255",
            "240.0.0.1",
            "192.0.2.1",
            "198.51.100.1",
            "203.0.113.1",
            "198.18.0.1",
            "198.19.255.1",
            "192.0.0.8",
            "::1",
            "::",
            "fe80::1",
            "fec0::1",
            "fd00::1",
            "ff02::1",
            "2001:db8::1",
            "3fff::1",
            "2001:2::1",
            "100::1",
            "::ffff:127.0.0.1",
            "::ffff:93.184.216.34",
            "::127.0.0.1",
            "64:ff9b::a00:1",
            "64:ff9b::5db8:d822",
            "2002:7f00:1::1",
            "2002:5db8:d822::1",
            "2001:0:4136:e378:8000:63bf:3fff:fdd2",
        ] {
            assert!(!is_public(ip.parse().unwrap()), "{ip} must not be public");
        }
        for ip in [
            "93.184.216.34",
            "1.1.1.1",
            "100.128.0.1",
            "2606:4700::1111",
            "2a00:1450::1",
        ] {
            assert!(is_public(ip.parse().unwrap()), "{ip} is public");
        }
    }

    #[test]
    fn integer_and_short_ipv4_urls_are_ip_literals_without_any_lookup() {
        for url in [
            "http://2130706433/",
            "http://0x7f000001/",
            "http://0177.0.0.1/",
            "http://127.1/",
        ] {
            let u = WebUrl::parse(url).unwrap();
            assert_eq!(u.ip, Some("127.0.0.1".parse().unwrap()), "{url}");
            assert_eq!(u.host, "127.0.0.1");
        }
        let u = WebUrl::parse("http://[::ffff:7f00:1]:8080/x").unwrap();
        assert_eq!(u.ip, Some("::ffff:127.0.0.1".parse().unwrap()));
        assert_eq!(u.port, 8080);
        let u = WebUrl::parse("https://Example.com/a").unwrap();
        assert_eq!(
            (u.ip, u.host.as_str(), u.scheme.as_str()),
            (None, "example.com", "https")
        );
    }

    #[test]
    fn urls_with_other_schemes_or_credentials_are_refused() {
        assert!(WebUrl::parse("file:///etc/passwd").is_err());
        assert!(WebUrl::parse("http://user:pw@example.com/").is_err());
        assert!(WebUrl::parse("http://a b/").is_err());
    }

    /// The shared client configuration still verifies: a server whose certificate no system
    /// root signs (the test fixture is self-signed) is refused at the handshake, and nothing
    /// reaches it over HTTP.
    #[tokio::test]
    async fn an_https_server_no_system_root_vouches_for_is_refused() {
        use rustls::pki_types::pem::PemObject;
        let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        let certs: Vec<rustls::pki_types::CertificateDer<'static>> =
            rustls::pki_types::CertificateDer::pem_file_iter(fixtures.join("gateway-test.crt"))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
        let key =
            rustls::pki_types::PrivateKeyDer::from_pem_file(fixtures.join("gateway-test.key"))
                .unwrap();
        let server = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(server));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let served = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            // The handshake fails on the client's side; the server sees it end.
            acceptor.accept(tcp).await.is_ok()
        });
        let client = reqwest::Client::builder()
            .tls_backend_preconfigured(client_tls().unwrap())
            .no_proxy()
            .build()
            .unwrap();
        let err = client
            .get(format!("https://127.0.0.1:{port}/"))
            .send()
            .await
            .expect_err("an unverified server must be refused");
        let chain = {
            let mut s = err.to_string();
            let mut src = std::error::Error::source(&err);
            while let Some(e) = src {
                s.push_str(" / ");
                s.push_str(&e.to_string());
                src = e.source();
            }
            s
        };
        // rustls's refusal of the server's certificate (the fixture also carries a signature
        // WebPKI does not accept; either way it is the verifier that says no).
        assert!(chain.contains("invalid peer certificate"), "{chain}");
        assert!(!served.await.unwrap(), "the handshake must not complete");
    }
}
