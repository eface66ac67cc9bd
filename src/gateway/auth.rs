//! Who is asking: the client address (trusted proxies decide when `X-Forwarded-For` counts),
//! the authenticated user ([`AuthedUser`]: gateway token, per-user API token, browser session
//! or trusted proxy), cookies and CSRF, the bearer token check and the failed-authentication
//! limiter.
//!
//! The limiter only ever looks at *failed* attempts: a request with the valid token passes
//! whatever other requests from the same address did (gateway tokens are 256-bit, so refusing
//! the right token protects nothing against guessing and lets any web page lock the owner out).
//! A client over its allowance gets 429 instead of 401 for its failed attempts, and its
//! failures are audited in bounded form: one record for the first failure of a window, one
//! summary record with the count of the others when the window ends.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

/// Limits for failed authentications per client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitConfig {
    /// Failed attempts allowed per client within `window`; the one that reaches it makes the
    /// client's further failed attempts get 429 for `lockout`.
    pub max_failures: u32,
    /// The counting window, also the audit aggregation window.
    pub window: Duration,
    /// How long failed attempts of a client over its allowance are answered 429.
    pub lockout: Duration,
}

/// Whom failures are counted for: an IPv4 address, or the /64 prefix of an IPv6 address (a
/// single host usually holds a whole /64, so per-address counting would count nothing).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClientKey(IpAddr);

impl ClientKey {
    pub fn of(ip: IpAddr) -> Self {
        match ip.to_canonical() {
            IpAddr::V6(v6) => {
                let s = v6.segments();
                Self(IpAddr::V6(Ipv6Addr::new(
                    s[0], s[1], s[2], s[3], 0, 0, 0, 0,
                )))
            }
            v4 @ IpAddr::V4(_) => Self(v4),
        }
    }
}

impl fmt::Display for ClientKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            IpAddr::V4(v4) => write!(f, "{v4}"),
            IpAddr::V6(v6) => write!(f, "{v6}/64"),
        }
    }
}

#[derive(Debug)]
struct Slot {
    window_start: Instant,
    failures: u32,
    throttled_until: Option<Instant>,
    /// Start of the audit window (its first failure was audited on its own).
    audit_start: Option<Instant>,
    /// Failures of the audit window after the first one, by reason.
    unaudited: BTreeMap<&'static str, u32>,
}

/// What one failed attempt means for its client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub client: ClientKey,
    /// `Some(remaining)`: the client is over its allowance; answer 429 with `Retry-After`.
    pub throttled: Option<Duration>,
    /// This failure brought the client to its allowance.
    pub throttled_now: bool,
    /// The first failure of the client's audit window: write its audit record now (the
    /// window's other failures go into one [`Summary`]).
    pub audit_now: bool,
    /// The previous audit window of this client ended with failures not yet audited.
    pub ended: Option<Summary>,
}

/// The failures of one client in one audit window that were not audited one by one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    pub client: ClientKey,
    pub count: u32,
    pub reasons: BTreeMap<&'static str, u32>,
    pub window: Duration,
}

/// Failed authentications per client. Nothing here ever refuses a valid credential.
#[derive(Debug, Default)]
pub struct Limiter {
    slots: HashMap<ClientKey, Slot>,
}

/// Most clients remembered; beyond that, entries with nothing to remember are dropped, and
/// failures of new clients are counted together under the unspecified address.
const MAX_SLOTS: usize = 65_536;

impl Limiter {
    /// Records one failed attempt of `ip` for `why`.
    pub fn fail(
        &mut self,
        ip: IpAddr,
        why: AuthFailure,
        now: Instant,
        cfg: LimitConfig,
    ) -> Failure {
        let mut key = ClientKey::of(ip);
        if self.slots.len() >= MAX_SLOTS && !self.slots.contains_key(&key) {
            self.slots.retain(|_, s| {
                s.throttled_until.is_some_and(|u| u > now)
                    || now.duration_since(s.window_start) < cfg.window
                    || !s.unaudited.is_empty()
            });
            if self.slots.len() >= MAX_SLOTS {
                key = ClientKey(IpAddr::V6(Ipv6Addr::UNSPECIFIED));
            }
        }
        let slot = self.slots.entry(key).or_insert(Slot {
            window_start: now,
            failures: 0,
            throttled_until: None,
            audit_start: None,
            unaudited: BTreeMap::new(),
        });
        // Auditing: the first failure of a window on its own, the rest summarized.
        let (audit_now, ended) = match slot.audit_start {
            Some(t) if now.duration_since(t) < cfg.window => {
                *slot.unaudited.entry(why.as_str()).or_default() += 1;
                (false, None)
            }
            _ => {
                slot.audit_start = Some(now);
                (true, take_summary(key, slot, cfg.window))
            }
        };
        // Throttling of failed attempts only.
        if let Some(until) = slot.throttled_until {
            if until > now {
                return Failure {
                    client: key,
                    throttled: Some(until - now),
                    throttled_now: false,
                    audit_now,
                    ended,
                };
            }
            slot.throttled_until = None;
            slot.window_start = now;
            slot.failures = 0;
        }
        if now.duration_since(slot.window_start) >= cfg.window {
            slot.window_start = now;
            slot.failures = 0;
        }
        slot.failures = slot.failures.saturating_add(1);
        let throttled_now = slot.failures >= cfg.max_failures;
        if throttled_now {
            slot.throttled_until = Some(now + cfg.lockout);
        }
        Failure {
            client: key,
            throttled: None,
            throttled_now,
            audit_now,
            ended,
        }
    }

    /// The summaries of audit windows that have ended (all pending ones with `all`, at
    /// shutdown), each taken once.
    pub fn summaries(&mut self, now: Instant, cfg: LimitConfig, all: bool) -> Vec<Summary> {
        let mut out = Vec::new();
        for (key, slot) in &mut self.slots {
            let ended = slot
                .audit_start
                .is_none_or(|t| now.duration_since(t) >= cfg.window);
            if (all || ended)
                && let Some(s) = take_summary(*key, slot, cfg.window)
            {
                out.push(s);
            }
        }
        out.sort_by_key(|s| s.client);
        out
    }
}

/// What the deployment-wide count says about one failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SharedVerdict {
    /// `Some(remaining)`: the client is locked out (by any gateway of the deployment).
    pub throttled: Option<Duration>,
    /// This failure brought the client to its allowance (the lockout starts now).
    pub throttled_now: bool,
}

/// Failed authentications per client counted in the state database (`auth_failures`,
/// `auth_lockouts`), so the limit holds across every gateway on one PostgreSQL: a client
/// cannot spread its guesses over the replicas. The same rules as [`Limiter`] (failures in
/// a sliding window, a lockout when the allowance is reached, counting anew after it);
/// rows older than the window or lockout are pruned as failures come in. The audit
/// aggregation stays per gateway ([`Limiter`]).
#[derive(Debug, Clone)]
pub struct SharedFailures {
    db: crate::store::Db,
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl SharedFailures {
    pub fn new(db: crate::store::Db) -> Self {
        Self { db }
    }

    /// Records one failed attempt of `client` at `now_ms` (unix ms), in one transaction.
    pub fn fail(
        &self,
        client: ClientKey,
        now_ms: i64,
        cfg: LimitConfig,
    ) -> Result<SharedVerdict, crate::store::StoreError> {
        use crate::store::params;
        let key = client.to_string();
        let since = now_ms.saturating_sub(ms(cfg.window));
        let until = now_ms.saturating_add(ms(cfg.lockout));
        self.db.tx(|c| {
            if c.dialect() == crate::store::Dialect::Postgres {
                // One client's failures are counted by one gateway at a time.
                c.query_row(
                    "SELECT 1 FROM (SELECT pg_advisory_xact_lock(hashtext(?1))) AS l",
                    params![key],
                )?;
            }
            c.execute(
                "DELETE FROM auth_lockouts WHERE until_ms <= ?1",
                params![now_ms],
            )?;
            c.execute(
                "DELETE FROM auth_failures WHERE at_ms <= ?1",
                params![since],
            )?;
            if let Some(row) = c.query_opt(
                "SELECT until_ms FROM auth_lockouts WHERE client = ?1",
                params![key],
            )? {
                let locked_until: i64 = row.get(0)?;
                let left = u64::try_from(locked_until.saturating_sub(now_ms)).unwrap_or(0);
                return Ok(SharedVerdict {
                    throttled: Some(Duration::from_millis(left)),
                    throttled_now: false,
                });
            }
            c.execute(
                "INSERT INTO auth_failures (client, at_ms) VALUES (?1, ?2)",
                params![key, now_ms],
            )?;
            let n: i64 = c
                .query_row(
                    "SELECT count(*) FROM auth_failures WHERE client = ?1 AND at_ms > ?2",
                    params![key, since],
                )?
                .get(0)?;
            let throttled_now = n >= i64::from(cfg.max_failures);
            if throttled_now {
                c.execute(
                    "INSERT INTO auth_lockouts (client, until_ms) VALUES (?1, ?2)
                     ON CONFLICT (client) DO UPDATE SET until_ms = excluded.until_ms",
                    params![key, until],
                )?;
                c.execute("DELETE FROM auth_failures WHERE client = ?1", params![key])?;
            }
            Ok(SharedVerdict {
                throttled: None,
                throttled_now,
            })
        })
    }
}

fn take_summary(client: ClientKey, slot: &mut Slot, window: Duration) -> Option<Summary> {
    if slot.unaudited.is_empty() {
        return None;
    }
    let reasons = std::mem::take(&mut slot.unaudited);
    Some(Summary {
        client,
        count: reasons.values().sum(),
        reasons,
        window,
    })
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

/// How a request authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthMethod {
    /// The gateway token (`chitin token show`): always the configured owner.
    GatewayToken,
    /// A per-user API token (`chitin tokens issue`), by its id.
    ApiToken { id: String },
    /// A browser session cookie (after a single sign-on login), by its id.
    Session { id: String },
    /// A trusted identity proxy's signed JWT header.
    Proxy,
}

impl AuthMethod {
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::GatewayToken => "gateway_token",
            Self::ApiToken { .. } => "api_token",
            Self::Session { .. } => "session",
            Self::Proxy => "proxy",
        }
    }
}

/// The authenticated person behind a request, WebSocket connection or CLI call: the Cedar
/// principal `Chitin::User::"<id>"` every decision for it is made for, the groups the
/// entity store puts it in (as Cedar sees them when it authenticated) and how it proved
/// who it is. Only the gateway's authentication (`gateway::authenticate`) makes one; handlers
/// behind the authentication middleware take it as `Extension<AuthedUser>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthedUser {
    user: String,
    groups: Vec<String>,
    method: AuthMethod,
}

impl AuthedUser {
    pub(in crate::gateway) fn new(user: String, groups: Vec<String>, method: AuthMethod) -> Self {
        Self {
            user,
            groups,
            method,
        }
    }

    /// The Cedar user id (`alice@example.com` in `Chitin::User::"alice@example.com"`).
    pub fn id(&self) -> &str {
        &self.user
    }

    /// The groups the user is in (transitively), sorted.
    pub fn groups(&self) -> &[String] {
        &self.groups
    }

    /// Whether the user is in `group`.
    pub fn in_group(&self, group: &str) -> bool {
        self.groups.iter().any(|g| g == group)
    }

    pub fn method(&self) -> &AuthMethod {
        &self.method
    }

    /// `Chitin::User::"<id>"`, as decisions and audit records name it.
    pub fn principal(&self) -> String {
        crate::accounts::principal(&self.user)
    }

    /// Whether the request came with an ambient browser credential (a session cookie or a
    /// proxy header) rather than an explicit bearer token: such requests need the CSRF
    /// header to change anything.
    pub fn ambient(&self) -> bool {
        matches!(self.method, AuthMethod::Session { .. } | AuthMethod::Proxy)
    }
}

/// The browser session cookie.
pub const SESSION_COOKIE: &str = "chitin_session";
/// The long-lived cookie that identifies a browser as a (pending or approved) device.
pub const DEVICE_COOKIE: &str = "chitin_device";
/// The short-lived cookie that binds a started single sign-on login to its browser.
pub const LOGIN_COOKIE: &str = "chitin_login";
/// The header a cookie-authenticated state-changing request carries its CSRF token in.
pub const CSRF_HEADER: &str = "x-csrf-token";

/// The value of cookie `name` (the first one), from every `Cookie` header.
pub fn cookie<'a>(headers: &'a axum::http::HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(axum::http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim())
        .filter(|v| !v.is_empty())
}

/// A `Set-Cookie` value: `HttpOnly`, `Path=/`, the given `SameSite`, `Secure` when the
/// browser reaches the gateway over TLS; `max_age` 0 deletes the cookie.
pub fn set_cookie(
    name: &str,
    value: &str,
    max_age_s: i64,
    secure: bool,
    same_site: &str,
) -> String {
    let mut c = format!(
        "{name}={value}; Path=/; HttpOnly; SameSite={same_site}; Max-Age={}",
        max_age_s.max(0)
    );
    if secure {
        c.push_str("; Secure");
    }
    c
}

/// Whether a method changes nothing (and so needs no CSRF token).
pub fn safe_method(m: &axum::http::Method) -> bool {
    matches!(
        *m,
        axum::http::Method::GET | axum::http::Method::HEAD | axum::http::Method::OPTIONS
    )
}

/// Compares a presented CSRF token with the session's, in constant time.
pub fn csrf_matches(presented: Option<&str>, expected: &str) -> bool {
    use subtle::ConstantTimeEq;
    presented.is_some_and(|p| {
        p.len() == expected.len() && bool::from(p.as_bytes().ct_eq(expected.as_bytes()))
    })
}

/// Why a request is not authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    Missing,
    Malformed,
    Wrong,
    QueryToken,
    /// A session cookie that names no live session (expired, logged out, user removed).
    Session,
    /// A trusted proxy's token that does not verify.
    ProxyToken,
    /// A single sign-on callback with an unknown, used or foreign login state.
    LoginState,
}

impl AuthFailure {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Missing => "missing",
            Self::Malformed => "malformed",
            Self::Wrong => "wrong",
            Self::QueryToken => "query_token",
            Self::Session => "session",
            Self::ProxyToken => "proxy_token",
            Self::LoginState => "login_state",
        }
    }
    pub fn message(self) -> &'static str {
        match self {
            Self::Missing => {
                "send the gateway token as `Authorization: Bearer <token>` (`chitin token show` prints it)"
            }
            Self::Malformed => "the Authorization header must be `Bearer <token>`",
            // Kept word for word (the web page and clients match it); it also covers an
            // API token that is unknown, revoked or expired.
            Self::Wrong => "the token is not the gateway token",
            Self::Session => "the session has expired or was ended; sign in again at /auth/login",
            Self::ProxyToken => {
                "the identity proxy's token does not verify; sign in through the proxy again"
            }
            Self::LoginState => {
                "the login state is unknown, expired or already used; start again at /auth/login"
            }
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
    fn the_third_failure_in_a_window_throttles_only_the_failed_attempts_of_that_client() {
        let mut l = Limiter::default();
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let t = Instant::now();
        let w = AuthFailure::Wrong;
        assert_eq!(l.fail(ip, w, t, cfg()).throttled, None);
        assert_eq!(l.fail(ip, w, t, cfg()).throttled, None);
        let third = l.fail(ip, w, t, cfg());
        assert!(third.throttled_now);
        assert_eq!(third.throttled, None);
        let later = l.fail(ip, w, t + Duration::from_secs(299), cfg());
        assert_eq!(later.throttled, Some(Duration::from_secs(1)));
        // Failures while throttled do not extend it.
        assert_eq!(
            l.fail(ip, w, t + Duration::from_secs(301), cfg()).throttled,
            None
        );
        let other: IpAddr = "127.0.0.2".parse().unwrap();
        assert_eq!(l.fail(other, w, t, cfg()).throttled, None);
    }

    #[test]
    fn failures_older_than_the_window_do_not_count() {
        let mut l = Limiter::default();
        let ip: IpAddr = "::1".parse().unwrap();
        let t = Instant::now();
        l.fail(ip, AuthFailure::Missing, t, cfg());
        l.fail(ip, AuthFailure::Missing, t, cfg());
        let f = l.fail(ip, AuthFailure::Missing, t + Duration::from_secs(61), cfg());
        assert!(!f.throttled_now);
        assert_eq!(f.throttled, None);
    }

    #[test]
    fn ipv6_clients_are_counted_per_64_and_ipv4_mapped_ones_as_ipv4() {
        let mut l = Limiter::default();
        let t = Instant::now();
        for host in ["2001:db8:1:2::1", "2001:db8:1:2::2", "2001:db8:1:2:ffff::9"] {
            l.fail(host.parse().unwrap(), AuthFailure::Wrong, t, cfg());
        }
        let f = l.fail(
            "2001:db8:1:2::77".parse().unwrap(),
            AuthFailure::Wrong,
            t,
            cfg(),
        );
        assert_eq!(f.client.to_string(), "2001:db8:1:2::/64");
        assert!(f.throttled.is_some(), "the /64 is one client");
        let next_net = l.fail(
            "2001:db8:1:3::1".parse().unwrap(),
            AuthFailure::Wrong,
            t,
            cfg(),
        );
        assert_eq!(next_net.throttled, None);
        let mapped = l.fail(
            "::ffff:10.0.0.1".parse().unwrap(),
            AuthFailure::Wrong,
            t,
            cfg(),
        );
        assert_eq!(mapped.client.to_string(), "10.0.0.1");
    }

    #[test]
    fn failures_are_audited_once_per_window_and_summarized_with_their_count() {
        let mut l = Limiter::default();
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let t = Instant::now();
        let first = l.fail(ip, AuthFailure::Wrong, t, cfg());
        assert!(first.audit_now);
        for i in 0..19 {
            let why = if i % 2 == 0 {
                AuthFailure::Missing
            } else {
                AuthFailure::QueryToken
            };
            let f = l.fail(ip, why, t + Duration::from_secs(1), cfg());
            assert!(!f.audit_now && f.ended.is_none());
        }
        // Nothing to summarize while the window runs...
        assert!(
            l.summaries(t + Duration::from_secs(59), cfg(), false)
                .is_empty()
        );
        // ...one summary when it has ended, taken once.
        let s = l.summaries(t + Duration::from_secs(60), cfg(), false);
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].count, 19);
        assert_eq!(s[0].reasons["missing"], 10);
        assert_eq!(s[0].reasons["query_token"], 9);
        assert!(
            l.summaries(t + Duration::from_secs(61), cfg(), true)
                .is_empty()
        );
        // A failure after the window starts a new one, audited on its own; the pending rest of
        // the previous window comes with it.
        l.fail(ip, AuthFailure::Wrong, t + Duration::from_secs(100), cfg());
        l.fail(ip, AuthFailure::Wrong, t + Duration::from_secs(101), cfg());
        let f = l.fail(ip, AuthFailure::Wrong, t + Duration::from_secs(200), cfg());
        assert!(f.audit_now);
        assert_eq!(f.ended.unwrap().count, 1);
        l.fail(
            ip,
            AuthFailure::Malformed,
            t + Duration::from_secs(201),
            cfg(),
        );
        let all = l.summaries(t + Duration::from_secs(202), cfg(), true);
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].reasons["malformed"], 1);
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
    fn cookies_are_found_by_exact_name_and_csrf_compares_whole_values() {
        let mut h = axum::http::HeaderMap::new();
        h.append(
            axum::http::header::COOKIE,
            "a=1; chitin_session_x=evil; chitin_session=abc.def"
                .parse()
                .unwrap(),
        );
        h.append(
            axum::http::header::COOKIE,
            "chitin_device=dev".parse().unwrap(),
        );
        assert_eq!(cookie(&h, SESSION_COOKIE), Some("abc.def"));
        assert_eq!(cookie(&h, DEVICE_COOKIE), Some("dev"));
        assert_eq!(cookie(&h, "missing"), None);
        assert!(csrf_matches(Some("tok"), "tok"));
        assert!(!csrf_matches(Some("to"), "tok"));
        assert!(!csrf_matches(None, "tok"));
        let c = set_cookie(SESSION_COOKIE, "v", 60, true, "Strict");
        assert_eq!(
            c,
            "chitin_session=v; Path=/; HttpOnly; SameSite=Strict; Max-Age=60; Secure"
        );
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
