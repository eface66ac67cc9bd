//! Who is asking: the client address (trusted proxies decide when `X-Forwarded-For` counts),
//! the bearer token check and the failed-authentication limiter.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

/// Limits for failed authentications per client address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitConfig {
    pub max_failures: u32,
    pub window: Duration,
    pub lockout: Duration,
}

#[derive(Debug)]
struct Slot {
    window_start: Instant,
    failures: u32,
    locked_until: Option<Instant>,
}

/// Failed authentications per client address. A locked-out address gets 429 for every
/// protected request until the lockout ends, whatever token it sends.
#[derive(Debug, Default)]
pub struct Limiter {
    slots: HashMap<IpAddr, Slot>,
}

/// Most addresses remembered; beyond that, entries with nothing to remember are dropped.
const MAX_SLOTS: usize = 65_536;

impl Limiter {
    /// The remaining lockout of `ip`, if it is locked out.
    pub fn locked(&mut self, ip: IpAddr, now: Instant) -> Option<Duration> {
        let slot = self.slots.get_mut(&ip)?;
        match slot.locked_until {
            Some(until) if until > now => Some(until - now),
            Some(_) => {
                self.slots.remove(&ip);
                None
            }
            None => None,
        }
    }

    /// Records one failure; true when this failure locks the address out.
    pub fn fail(&mut self, ip: IpAddr, now: Instant, cfg: LimitConfig) -> bool {
        if self.slots.len() >= MAX_SLOTS {
            self.slots.retain(|_, s| {
                s.locked_until.is_some_and(|u| u > now)
                    || now.duration_since(s.window_start) < cfg.window
            });
        }
        let slot = self.slots.entry(ip).or_insert(Slot {
            window_start: now,
            failures: 0,
            locked_until: None,
        });
        if now.duration_since(slot.window_start) >= cfg.window {
            slot.window_start = now;
            slot.failures = 0;
        }
        slot.failures = slot.failures.saturating_add(1);
        if slot.failures >= cfg.max_failures && slot.locked_until.is_none() {
            slot.locked_until = Some(now + cfg.lockout);
            return true;
        }
        false
    }
}

/// The client address: the TCP peer, or — only when the peer is a trusted proxy — the
/// right-most `X-Forwarded-For` entry that is not itself a trusted proxy.
pub fn client_addr(peer: SocketAddr, forwarded_for: Option<&str>, trusted: &[IpAddr]) -> IpAddr {
    let peer_ip = peer.ip().to_canonical();
    if !trusted.contains(&peer_ip) {
        return peer_ip;
    }
    let Some(xff) = forwarded_for else {
        return peer_ip;
    };
    let mut client = peer_ip;
    for part in xff.rsplit(',') {
        match part.trim().parse::<IpAddr>() {
            Ok(ip) => {
                let ip = ip.to_canonical();
                client = ip;
                if !trusted.contains(&ip) {
                    break;
                }
            }
            // An entry we cannot read: stop believing the chain at the last good hop.
            Err(_) => break,
        }
    }
    client
}

/// Why a request is not authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    Missing,
    Malformed,
    Wrong,
    QueryToken,
}

impl AuthFailure {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Missing => "missing",
            Self::Malformed => "malformed",
            Self::Wrong => "wrong",
            Self::QueryToken => "query_token",
        }
    }
    pub fn message(self) -> &'static str {
        match self {
            Self::Missing => {
                "send the gateway token as `Authorization: Bearer <token>` (`chitin token show` prints it)"
            }
            Self::Malformed => "the Authorization header must be `Bearer <token>`",
            Self::Wrong => "the token is not the gateway token",
            Self::QueryToken => {
                "tokens are never accepted in the URL; send `Authorization: Bearer <token>` and rotate a token that was put in a URL (`chitin token rotate`)"
            }
        }
    }
}

/// Whether the query string carries a credential (`token=`, `access_token=` and friends).
pub fn query_has_token(query: Option<&str>) -> bool {
    let Some(q) = query else { return false };
    q.split('&').any(|pair| {
        let key = pair.split('=').next().unwrap_or("");
        let key = percent_decode_lower(key);
        matches!(
            key.as_str(),
            "token" | "access_token" | "auth" | "auth_token" | "bearer" | "api_key" | "apikey"
        )
    })
}

fn percent_decode_lower(s: &str) -> String {
    percent_encoding::percent_decode_str(&s.replace('+', " "))
        .decode_utf8_lossy()
        .trim()
        .to_ascii_lowercase()
}

/// The bearer credential of an `Authorization` header value.
pub fn bearer(header: Option<&[u8]>) -> Result<&[u8], AuthFailure> {
    let Some(h) = header else {
        return Err(AuthFailure::Missing);
    };
    let (scheme, rest) = match h.iter().position(|b| *b == b' ') {
        Some(i) => (&h[..i], &h[i + 1..]),
        None => return Err(AuthFailure::Malformed),
    };
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        return Err(AuthFailure::Malformed);
    }
    let start = rest.iter().position(|b| *b != b' ').unwrap_or(rest.len());
    let end = rest
        .iter()
        .rposition(|b| *b != b' ')
        .map_or(start, |i| i + 1);
    let token = rest.get(start..end).unwrap_or(&[]);
    if token.is_empty() {
        return Err(AuthFailure::Malformed);
    }
    Ok(token)
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        reason = "tests"
    )]
    use super::*;

    fn cfg() -> LimitConfig {
        LimitConfig {
            max_failures: 3,
            window: Duration::from_secs(60),
            lockout: Duration::from_secs(300),
        }
    }

    #[test]
    fn the_third_failure_in_a_window_locks_the_address_out_until_the_lockout_ends() {
        let mut l = Limiter::default();
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let t = Instant::now();
        assert!(!l.fail(ip, t, cfg()));
        assert!(!l.fail(ip, t, cfg()));
        assert!(l.locked(ip, t).is_none());
        assert!(l.fail(ip, t, cfg()));
        assert!(l.locked(ip, t + Duration::from_secs(299)).is_some());
        assert!(l.locked(ip, t + Duration::from_secs(301)).is_none());
        let other: IpAddr = "127.0.0.2".parse().unwrap();
        assert!(l.locked(other, t).is_none());
    }

    #[test]
    fn failures_older_than_the_window_do_not_count() {
        let mut l = Limiter::default();
        let ip: IpAddr = "::1".parse().unwrap();
        let t = Instant::now();
        l.fail(ip, t, cfg());
        l.fail(ip, t, cfg());
        assert!(!l.fail(ip, t + Duration::from_secs(61), cfg()));
        assert!(l.locked(ip, t + Duration::from_secs(61)).is_none());
    }

    #[test]
    fn forwarded_for_is_believed_only_from_a_trusted_proxy() {
        let proxy: IpAddr = "10.0.0.1".parse().unwrap();
        let peer: SocketAddr = "10.0.0.1:5000".parse().unwrap();
        let stranger: SocketAddr = "10.0.0.9:5000".parse().unwrap();
        let xff = Some("1.2.3.4, 5.6.7.8");
        assert_eq!(client_addr(stranger, xff, &[proxy]), stranger.ip());
        assert_eq!(
            client_addr(peer, xff, &[proxy]),
            "5.6.7.8".parse::<IpAddr>().unwrap()
        );
        assert_eq!(client_addr(peer, None, &[proxy]), proxy);
        // A client cannot hide behind a forged left-most entry.
        assert_eq!(
            client_addr(peer, Some("9.9.9.9, garbage, 5.6.7.8"), &[proxy]),
            "5.6.7.8".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn a_token_in_the_query_string_is_detected_in_any_spelling() {
        assert!(query_has_token(Some("token=abc")));
        assert!(query_has_token(Some("a=1&access_token=abc")));
        assert!(query_has_token(Some("a=1&%74oken=abc")));
        assert!(query_has_token(Some("TOKEN=abc")));
        assert!(!query_has_token(Some("tokens_used=3")));
        assert!(!query_has_token(None));
    }

    #[test]
    fn only_a_bearer_header_carries_a_token() {
        assert_eq!(bearer(Some(b"Bearer abc")).unwrap(), b"abc");
        assert_eq!(bearer(Some(b"bearer  abc ")).unwrap(), b"abc");
        assert_eq!(bearer(None).unwrap_err(), AuthFailure::Missing);
        assert_eq!(
            bearer(Some(b"Basic abc")).unwrap_err(),
            AuthFailure::Malformed
        );
        assert_eq!(
            bearer(Some(b"Bearer ")).unwrap_err(),
            AuthFailure::Malformed
        );
        assert_eq!(
            bearer(Some(b"Bearerabc")).unwrap_err(),
            AuthFailure::Malformed
        );
    }
}
