//! The one host parser of Chitin: `web_fetch` URLs and `exec` network destinations
//! (`HOST:PORT`) both go through [`parse_host`], so a host is an IP literal in exactly the
//! cases where the C library (`inet_aton`, which `getaddrinfo` tries first) or a browser would
//! connect to an address without asking DNS.
//!
//! Invariants:
//! - Every IPv4 spelling `inet_aton` accepts is an IP literal: dotted decimal, integer
//!   (`2130706433`), hexadecimal (`0x7f000001`), octal (`0177.0.0.1`) and abbreviated
//!   (`127.1`, `127.0.1`) forms, in any mix, with one trailing dot allowed.
//! - A host whose last label looks numeric (digits, or `0x` and hex digits) but is not a valid
//!   IPv4 address is refused, never handed to a resolver (which might read it as an address).
//! - IPv6 literals are accepted bare (`::1`) or bracketed (`[::1]`).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// A parsed host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Host {
    /// An IP literal, in canonical form.
    Ip(IpAddr),
    /// A DNS name (lower case, without a trailing dot).
    Name(String),
}

impl Host {
    /// The IP address, when the host is an IP literal.
    pub fn ip(&self) -> Option<IpAddr> {
        match self {
            Self::Ip(ip) => Some(*ip),
            Self::Name(_) => None,
        }
    }
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Ip(ip) => write!(f, "{ip}"),
            Self::Name(n) => f.write_str(n),
        }
    }
}

/// Why a host was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostError {
    #[error("the host is empty")]
    Empty,
    #[error(
        "`{0}` looks like an IPv4 address but is not a valid one; write it as a.b.c.d or use a host name"
    )]
    BadIpv4(String),
    #[error("`{0}` is not a valid IPv6 address")]
    BadIpv6(String),
    #[error(
        "`{0}` is not a valid host name (letters, digits, '-', '_' and '.', at most 253 characters)"
    )]
    BadName(String),
}

/// Parses a host as it appears in a URL authority or a `HOST:PORT` destination.
pub fn parse_host(raw: &str) -> Result<Host, HostError> {
    if raw.is_empty() {
        return Err(HostError::Empty);
    }
    let shown = || raw.escape_default().to_string();
    if let Some(inner) = raw.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
        return inner
            .parse::<Ipv6Addr>()
            .map(|ip| Host::Ip(IpAddr::V6(ip)))
            .map_err(|_| HostError::BadIpv6(shown()));
    }
    if raw.contains(':') {
        return raw
            .parse::<Ipv6Addr>()
            .map(|ip| Host::Ip(IpAddr::V6(ip)))
            .map_err(|_| HostError::BadIpv6(shown()));
    }
    let lower = raw.to_ascii_lowercase();
    let name = lower.strip_suffix('.').unwrap_or(&lower);
    let last = name.rsplit('.').next().unwrap_or("");
    if looks_numeric(last) {
        return parse_ipv4_any(name)
            .map(|ip| Host::Ip(IpAddr::V4(ip)))
            .ok_or_else(|| HostError::BadIpv4(shown()));
    }
    let valid = !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b'_')
        && !name.starts_with(['-', '.'])
        && !name.contains("..");
    if !valid {
        return Err(HostError::BadName(shown()));
    }
    Ok(Host::Name(name.to_string()))
}

/// Whether a label would be read as a number by `inet_aton` or the WHATWG URL parser.
fn looks_numeric(label: &str) -> bool {
    if label.is_empty() {
        return false;
    }
    if let Some(hex) = label.strip_prefix("0x") {
        return hex.bytes().all(|b| b.is_ascii_hexdigit());
    }
    label.bytes().all(|b| b.is_ascii_digit())
}

/// One part of an `inet_aton` address: `0x` hexadecimal, leading-zero octal or decimal.
fn parse_part(p: &str) -> Option<u64> {
    if p.is_empty() {
        return None;
    }
    let (digits, radix) = if let Some(h) = p.strip_prefix("0x") {
        (h, 16)
    } else if p.len() > 1 && p.starts_with('0') {
        (&p[1..], 8)
    } else {
        (p, 10)
    };
    if digits.is_empty() {
        return (radix == 16).then_some(0);
    }
    if digits.len() > 12 {
        return None;
    }
    u64::from_str_radix(digits, radix).ok()
}

/// Every IPv4 form `inet_aton` accepts: `a`, `a.b`, `a.b.c`, `a.b.c.d`, each part decimal,
/// octal or hexadecimal, the last part filling the remaining bytes.
pub fn parse_ipv4_any(s: &str) -> Option<Ipv4Addr> {
    let parts: Vec<&str> = s.split('.').collect();
    if parts.is_empty() || parts.len() > 4 {
        return None;
    }
    let nums = parts
        .iter()
        .map(|p| parse_part(p))
        .collect::<Option<Vec<u64>>>()?;
    let (last, head) = nums.split_last()?;
    if head.iter().any(|n| *n > 255) {
        return None;
    }
    let rest_bits = 8 * (4 - head.len() as u32);
    if *last >= (1u64 << rest_bits) {
        return None;
    }
    let mut v: u64 = 0;
    for (i, n) in head.iter().enumerate() {
        v |= n << (24 - 8 * i as u32);
    }
    v |= last;
    u32::try_from(v).ok().map(Ipv4Addr::from)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    fn v4(s: &str) -> Host {
        Host::Ip(IpAddr::V4(s.parse().unwrap()))
    }

    #[test]
    fn integer_hex_octal_and_abbreviated_ipv4_forms_are_ip_literals() {
        for (raw, ip) in [
            ("127.0.0.1", "127.0.0.1"),
            ("2130706433", "127.0.0.1"),
            ("0x7f000001", "127.0.0.1"),
            ("0X7F000001", "127.0.0.1"),
            ("0177.0.0.1", "127.0.0.1"),
            ("127.1", "127.0.0.1"),
            ("127.0.1", "127.0.0.1"),
            ("0x7f.1", "127.0.0.1"),
            ("10.1", "10.0.0.1"),
            ("167772161", "10.0.0.1"),
            ("0xa9.254.169.254", "169.254.169.254"),
            ("127.0.0.1.", "127.0.0.1"),
            ("0", "0.0.0.0"),
        ] {
            assert_eq!(parse_host(raw), Ok(v4(ip)), "{raw}");
        }
    }

    #[test]
    fn numeric_looking_hosts_that_are_not_addresses_are_refused() {
        for raw in [
            "256.0.0.1",
            "1.2.3.4.5",
            "4294967296",
            "0x1ffffffff",
            "09.0.0.1",
            "1..1",
            "a.0x",
        ] {
            assert_eq!(
                parse_host(raw),
                Err(HostError::BadIpv4(raw.into())),
                "{raw}"
            );
        }
    }

    #[test]
    fn names_and_ipv6_literals_are_told_apart() {
        assert_eq!(
            parse_host("Example.COM."),
            Ok(Host::Name("example.com".into()))
        );
        assert_eq!(
            parse_host("127.0.0.1.nip.io"),
            Ok(Host::Name("127.0.0.1.nip.io".into()))
        );
        assert_eq!(
            parse_host("0x7f.example"),
            Ok(Host::Name("0x7f.example".into()))
        );
        assert_eq!(parse_host("[::1]"), Ok(Host::Ip("::1".parse().unwrap())));
        assert_eq!(
            parse_host("::ffff:7f00:1"),
            Ok(Host::Ip("::ffff:7f00:1".parse().unwrap()))
        );
        assert!(matches!(parse_host("[::1"), Err(HostError::BadIpv6(_))));
        assert!(matches!(parse_host("a b"), Err(HostError::BadName(_))));
        assert!(matches!(parse_host("-a"), Err(HostError::BadName(_))));
        assert_eq!(parse_host(""), Err(HostError::Empty));
    }

    #[test]
    fn exec_network_destinations_use_the_same_parser() {
        let d: crate::NetDest = "2130706433:80".parse().unwrap();
        assert_eq!((d.host.as_str(), d.port), ("127.0.0.1", 80));
        let d: crate::NetDest = "127.1:8080".parse().unwrap();
        assert_eq!(d.host, "127.0.0.1");
        let d: crate::NetDest = "Api.Example.com:443".parse().unwrap();
        assert_eq!(d.host, "api.example.com");
        for bad in [
            "0x0a000001:80",
            "10.1:80",
            "0251.0376.0251.0376:80",
            "167772161:80",
        ] {
            let e = bad.parse::<crate::NetDest>().unwrap_err().to_string();
            assert!(
                e.contains("IP-literal destinations must be loopback"),
                "{bad}: {e}"
            );
        }
        let e = "1.2.3.4.5:80"
            .parse::<crate::NetDest>()
            .unwrap_err()
            .to_string();
        assert!(e.contains("looks like an IPv4 address"), "{e}");
    }
}
