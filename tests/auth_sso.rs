//! Single sign-on, browser sessions, device pairing and the trusted identity proxy, checked
//! from outside: the real `chitin gateway` against a fake OpenID Connect issuer on loopback
//! (`support/oidc.rs`: real discovery, JWKS, authorization and token endpoints with PKCE).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

use std::path::Path;

use serde_json::{Value, json};

#[path = "support/gateway.rs"]
mod harness;
use harness::*;
#[path = "support/oidc.rs"]
mod oidc;
use oidc::{CLIENT_ID, FakeIssuer};
#[path = "support/chat.rs"]
mod chat;

const ENTITIES: &str = r#"[
  {"uid": {"type": "Chitin::Group", "id": "owners"}, "attrs": {}, "parents": []},
  {"uid": {"type": "Chitin::User", "id": "owner"}, "attrs": {}, "parents": [{"type": "Chitin::Group", "id": "owners"}]},
  {"uid": {"type": "Chitin::User", "id": "mallory"}, "attrs": {}, "parents": []}
]
"#;

fn prepare(home: &Path) {
    std::fs::write(home.join("entities.json"), ENTITIES).unwrap();
}

fn oidc_config(idp: &FakeIssuer, scheme: &str, port: u16) -> String {
    format!(
        "\n[auth.oidc]\nissuer = \"{}\"\nclient_id = \"{CLIENT_ID}\"\nredirect_uri = \"{scheme}://127.0.0.1:{port}/auth/callback\"\n",
        idp.issuer()
    )
}

fn start(idp: &FakeIssuer, gateway_extra: &str, tls: bool) -> Gw {
    let port = free_port();
    let (scheme, tls_lines) = if tls {
        (
            "https",
            format!(
                "tls_cert = {:?}\ntls_key = {:?}\n",
                fixture("gateway-test.crt"),
                fixture("gateway-test.key")
            ),
        )
    } else {
        ("http", String::new())
    };
    let cfg = format!(
        "{tls_lines}{gateway_extra}\n{}",
        oidc_config(idp, scheme, port)
    );
    Gw::start_custom(port, &cfg, tls, prepare)
}

/// Every `Set-Cookie` of a response.
fn set_cookies(r: &Resp) -> Vec<String> {
    r.headers
        .iter()
        .filter(|(k, _)| k.eq_ignore_ascii_case("set-cookie"))
        .map(|(_, v)| v.clone())
        .collect()
}

/// `name=value` of the cookie `name` a response sets (non-empty), if any.
fn cookie_pair(r: &Resp, name: &str) -> Option<String> {
    set_cookies(r)
        .into_iter()
        .filter_map(|c| c.split(';').next().map(str::to_string))
        .find(|p| p.starts_with(&format!("{name}=")) && p.len() > name.len() + 1)
}

fn path_and_query(url: &str) -> String {
    let u = reqwest::Url::parse(url).unwrap();
    match u.query() {
        Some(q) => format!("{}?{q}", u.path()),
        None => u.path().to_string(),
    }
}

/// What one browser login produced.
struct Login {
    /// The callback response.
    resp: Resp,
    /// The callback target, for replaying it.
    callback: String,
    /// The login-binding cookie.
    binding: String,
}

/// A browser login: `/auth/login` (302 to the issuer), the issuer's authorization endpoint
/// (302 back with a code), `/auth/callback` with the login cookie. `extra` headers go with
/// every gateway request (a device cookie, `X-Forwarded-For`).
fn login(gw: &Gw, idp: &FakeIssuer, extra: &[(&str, &str)]) -> Login {
    let start = gw.try_req("GET", "/auth/login", extra, b"").unwrap();
    assert_eq!(start.status, 302, "{}", start.body);
    let to_idp = start.header("location").unwrap().to_string();
    assert!(
        to_idp.starts_with(&format!("{}/authorize?", idp.issuer())),
        "{to_idp}"
    );
    assert!(to_idp.contains("code_challenge_method=S256"), "{to_idp}");
    assert!(!to_idp.contains("code_verifier"), "{to_idp}");
    let binding = cookie_pair(&start, "chitin_login").expect("a login-binding cookie");
    let login_cookie = set_cookies(&start)
        .into_iter()
        .find(|c| c.starts_with("chitin_login="))
        .unwrap();
    assert!(login_cookie.contains("HttpOnly") && login_cookie.contains("SameSite=Lax"));
    let at_idp = http(idp.port, "GET", &path_and_query(&to_idp), &[], b"");
    assert_eq!(at_idp.status, 302, "{}", at_idp.body);
    let back = at_idp.header("location").unwrap().to_string();
    let callback = path_and_query(&back);
    assert!(callback.starts_with("/auth/callback?"), "{callback}");
    let mut headers: Vec<(&str, &str)> = extra.to_vec();
    let cookie_header = match extra.iter().find(|(k, _)| *k == "Cookie") {
        Some((_, c)) => format!("{c}; {binding}"),
        None => binding.clone(),
    };
    headers.retain(|(k, _)| *k != "Cookie");
    headers.push(("Cookie", &cookie_header));
    let resp = gw.try_req("GET", &callback, &headers, b"").unwrap();
    Login {
        resp,
        callback,
        binding,
    }
}

fn session_of(gw: &Gw, cookie: &str, extra: &[(&str, &str)]) -> Resp {
    let mut h = extra.to_vec();
    h.push(("Cookie", cookie));
    gw.try_req("GET", "/auth/session", &h, b"").unwrap()
}

#[test]
fn a_login_at_the_issuer_gives_a_strict_http_only_session_that_acts_as_the_signed_in_user() {
    let idp = FakeIssuer::start();
    let gw = start(&idp, "", false);
    let l = login(&gw, &idp, &[]);
    assert_eq!(l.resp.status, 200, "{}", l.resp.body);
    assert!(
        l.resp.body.contains("signed in as alice@example.com"),
        "{}",
        l.resp.body
    );
    let raw = set_cookies(&l.resp)
        .into_iter()
        .find(|c| c.starts_with("chitin_session=") && !c.starts_with("chitin_session=;"))
        .expect("a session cookie");
    assert!(raw.contains("; HttpOnly"), "{raw}");
    assert!(raw.contains("; SameSite=Strict"), "{raw}");
    assert!(raw.contains("; Path=/"), "{raw}");
    assert!(!raw.contains("Secure"), "plain http on loopback: {raw}");
    // No token or session in a URL: the page goes on to `/` by itself.
    assert!(l.resp.body.contains("url=/\""), "{}", l.resp.body);
    let cookie = cookie_pair(&l.resp, "chitin_session").unwrap();

    let s = session_of(&gw, &cookie, &[]);
    assert_eq!(s.status, 200, "{}", s.body);
    let v = s.json();
    assert_eq!(v["user"], "alice@example.com");
    assert_eq!(v["groups"], json!(["owners"]));
    assert_eq!(v["method"], "session");
    let csrf = v["csrf"].as_str().unwrap().to_string();
    assert!(csrf.len() >= 32);

    // The user was provisioned with the issuer's groups.
    let out = gw.chitin(&["users", "list", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let users: Value = serde_json::from_slice(&out.stdout).unwrap();
    let alice = users
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["user"] == "alice@example.com")
        .unwrap();
    assert_eq!(alice["source"], "oidc");
    assert_eq!(alice["groups"], json!(["owners"]));
    assert_eq!(alice["sessions"], 1);

    // A state-changing request with the cookie alone is refused (CSRF), with the token it runs
    // as alice (an owner: listing the workspace is allowed).
    std::fs::create_dir_all(gw.workspace()).unwrap();
    let body = json!({"tool": "list_dir", "args": {"path": "."}}).to_string();
    let no_csrf = gw
        .try_req(
            "POST",
            "/tools/invoke",
            &[("Cookie", &cookie), ("Content-Type", "application/json")],
            body.as_bytes(),
        )
        .unwrap();
    assert_eq!(no_csrf.status, 403, "{}", no_csrf.body);
    assert_eq!(no_csrf.json()["error"]["code"], "csrf_refused");
    let wrong_csrf = gw
        .try_req(
            "POST",
            "/tools/invoke",
            &[
                ("Cookie", &cookie),
                ("X-CSRF-Token", "not-the-token"),
                ("Content-Type", "application/json"),
            ],
            body.as_bytes(),
        )
        .unwrap();
    assert_eq!(wrong_csrf.status, 403, "{}", wrong_csrf.body);
    assert_eq!(wrong_csrf.json()["error"]["code"], "csrf_refused");
    let ok = gw
        .try_req(
            "POST",
            "/tools/invoke",
            &[
                ("Cookie", &cookie),
                ("X-CSRF-Token", &csrf),
                ("Content-Type", "application/json"),
            ],
            body.as_bytes(),
        )
        .unwrap();
    assert_eq!(ok.status, 200, "{}", ok.body);
    assert_eq!(
        ok.json()["decision"]["policies"],
        json!(["tools.owner-files-in-workspace"])
    );
    let audit = gw.chitin(&[
        "audit",
        "query",
        "--actor",
        "Chitin::User::\"alice@example.com\"",
        "--json",
    ]);
    let text = String::from_utf8_lossy(&audit.stdout);
    assert!(
        text.contains("list_dir"),
        "the decision is recorded for alice: {text}"
    );

    // The WebSocket takes the session cookie of the upgrade: `connect` needs no token.
    let c = ws_connect_with_cookie(gw.port, &cookie);
    assert_eq!(c["ok"], true, "{c}");
    assert_eq!(c["payload"]["user"], "alice@example.com");

    // Logout needs the CSRF token too, ends the session and clears the cookie.
    let refused = gw
        .try_req("POST", "/auth/logout", &[("Cookie", &cookie)], b"")
        .unwrap();
    assert_eq!(refused.status, 403);
    assert_eq!(refused.json()["error"]["code"], "csrf_refused");
    let out = gw
        .try_req(
            "POST",
            "/auth/logout",
            &[("Cookie", &cookie), ("X-CSRF-Token", &csrf)],
            b"",
        )
        .unwrap();
    assert_eq!(out.status, 200, "{}", out.body);
    assert!(
        set_cookies(&out)
            .iter()
            .any(|c| c.starts_with("chitin_session=;") && c.contains("Max-Age=0")),
        "{:?}",
        out.headers
    );
    let after = session_of(&gw, &cookie, &[]);
    assert_eq!(after.status, 401, "{}", after.body);
}

/// The `connect` answer of a WebSocket opened with `cookie` and a `connect` without a token.
fn ws_connect_with_cookie(port: u16, cookie: &str) -> Value {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut req = format!("ws://127.0.0.1:{port}/ws")
            .into_client_request()
            .unwrap();
        req.headers_mut().insert("cookie", cookie.parse().unwrap());
        let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
        let frame = json!({"type": "req", "id": 1, "method": "connect", "params": {}});
        ws.send(Message::Text(frame.to_string().into()))
            .await
            .unwrap();
        loop {
            if let Message::Text(t) = ws.next().await.unwrap().unwrap() {
                return serde_json::from_str(t.as_str()).unwrap();
            }
        }
    })
}

/// Runs a login that must be refused: 401 (or the given status) with `code`, and no session.
fn refused_login(gw: &Gw, idp: &FakeIssuer, code: &str, message: &str) {
    let l = login(gw, idp, &[]);
    assert_eq!(l.resp.status, 401, "{code}: {}", l.resp.body);
    let v = l.resp.json();
    assert_eq!(v["error"]["code"], code, "{}", l.resp.body);
    assert_eq!(v["error"]["message"], message, "{}", l.resp.body);
    assert!(
        cookie_pair(&l.resp, "chitin_session").is_none(),
        "no session for a refused login"
    );
    idp.reset();
}

#[test]
fn id_tokens_with_a_wrong_audience_an_expiry_in_the_past_a_bad_signature_an_unknown_key_or_a_used_nonce_are_refused()
 {
    let idp = FakeIssuer::start();
    let gw = start(&idp, "", false);

    idp.set(|b| b.aud = Some("some-other-client".into()));
    refused_login(
        &gw,
        &idp,
        "wrong_audience",
        "the token's audience (aud) is not this gateway",
    );
    idp.set(|b| b.exp_in_s = -3600);
    refused_login(&gw, &idp, "expired", "the token has expired (exp)");
    idp.set(|b| b.rogue_signature = true);
    refused_login(
        &gw,
        &idp,
        "bad_signature",
        "the token's signature does not verify against the issuer's keys",
    );
    // The issuer rotates its keys: the new kid makes the gateway fetch the JWKS again, once.
    let before = idp.jwks_fetches();
    idp.rotate();
    let rotated = login(&gw, &idp, &[]);
    assert_eq!(rotated.resp.status, 200, "{}", rotated.resp.body);
    assert_eq!(idp.jwks_fetches(), before + 1);
    // A made-up kid right after: refused without hammering the issuer.
    let fetches = idp.jwks_fetches();
    idp.set(|b| b.kid = Some("rotated-away".into()));
    refused_login(
        &gw,
        &idp,
        "unknown_kid",
        "the token is signed with key id `rotated-away`, which the issuer's key set (JWKS) does not list",
    );
    idp.set(|b| b.kid = Some("rotated-away".into()));
    refused_login(
        &gw,
        &idp,
        "unknown_kid",
        "the token is signed with key id `rotated-away`, which the issuer's key set (JWKS) does not list",
    );
    assert_eq!(
        idp.jwks_fetches(),
        fetches,
        "an unknown kid re-fetches the key set at most once per interval"
    );

    // A good login, then its nonce again in a new login: replayed.
    let good = login(&gw, &idp, &[]);
    assert_eq!(good.resp.status, 200, "{}", good.resp.body);
    let used = idp.issued_nonces().last().unwrap().clone();
    idp.set(|b| b.nonce = Some(used.clone()));
    refused_login(
        &gw,
        &idp,
        "nonce_replayed",
        "the ID token's nonce was already used: a replayed login is refused",
    );
    idp.set(|b| b.nonce = Some("a-nonce-this-login-never-sent".into()));
    refused_login(
        &gw,
        &idp,
        "nonce_mismatch",
        "the ID token's nonce does not match this login",
    );

    // The same callback twice: the state is used once.
    let again = gw
        .try_req("GET", &good.callback, &[("Cookie", &good.binding)], b"")
        .unwrap();
    assert_eq!(again.status, 401, "{}", again.body);
    assert_eq!(again.json()["error"]["code"], "state_unknown");

    // A callback without the browser's login cookie (login CSRF): refused.
    let l = login(&gw, &idp, &[]);
    assert_eq!(l.resp.status, 200);
    let start = gw.try_req("GET", "/auth/login", &[], b"").unwrap();
    let to_idp = start.header("location").unwrap().to_string();
    let at_idp = http(idp.port, "GET", &path_and_query(&to_idp), &[], b"");
    let cb = path_and_query(at_idp.header("location").unwrap());
    let foreign = gw.try_req("GET", &cb, &[], b"").unwrap();
    assert_eq!(foreign.status, 401, "{}", foreign.body);
    assert_eq!(foreign.json()["error"]["code"], "other_browser");

    // Every refusal is in the audit log with its reason.
    let audit = gw.chitin(&["audit", "query", "--json"]);
    let text = String::from_utf8_lossy(&audit.stdout);
    for code in [
        "wrong_audience",
        "expired",
        "bad_signature",
        "unknown_kid",
        "nonce_replayed",
        "state_unknown",
    ] {
        assert!(text.contains(&format!("refused: {code}")), "{code} audited");
    }
}

#[test]
fn over_tls_the_session_cookie_is_also_secure() {
    let idp = FakeIssuer::start();
    let gw = start(&idp, "", true);
    let l = login(&gw, &idp, &[]);
    assert_eq!(l.resp.status, 200, "{}", l.resp.body);
    let raw = set_cookies(&l.resp)
        .into_iter()
        .find(|c| c.starts_with("chitin_session="))
        .unwrap();
    assert!(raw.contains("; Secure"), "{raw}");
    assert!(
        raw.contains("; HttpOnly") && raw.contains("; SameSite=Strict"),
        "{raw}"
    );
}

#[test]
fn a_browser_signing_in_from_a_remote_address_waits_as_a_pending_device_until_an_owner_approves_it()
{
    let idp = FakeIssuer::start();
    let gw = start(&idp, "trusted_proxies = [\"127.0.0.1\"]", false);
    let remote = [("X-Forwarded-For", "203.0.113.7")];
    let l = login(&gw, &idp, &remote);
    assert_eq!(l.resp.status, 200, "{}", l.resp.body);
    assert!(
        l.resp.body.contains("Waiting for approval"),
        "{}",
        l.resp.body
    );
    let session = cookie_pair(&l.resp, "chitin_session").unwrap();
    let device = cookie_pair(&l.resp, "chitin_device").expect("a device cookie");
    let both = format!("{session}; {device}");

    let held = session_of(&gw, &both, &remote);
    assert_eq!(held.status, 403, "{}", held.body);
    assert_eq!(held.json()["error"]["code"], "device_pending");
    let id = held.header("x-chitin-device").unwrap().to_string();

    let out = gw.chitin(&["devices", "list", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let list: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list[0]["id"], id.as_str());
    assert_eq!(list[0]["status"], "pending");
    assert_eq!(list[0]["user"], "alice@example.com");
    assert_eq!(list[0]["client"], "203.0.113.7");

    // Someone outside `owners` may not approve it (Cedar pairing.approve).
    let other = gw.root.join("mallory.toml");
    let text = std::fs::read_to_string(gw.home.join("chitin.toml")).unwrap();
    std::fs::write(&other, format!("{text}\n[cli]\noperator = \"mallory\"\n")).unwrap();
    let denied = gw.chitin(&[
        "--config",
        other.to_str().unwrap(),
        "devices",
        "approve",
        &id,
    ]);
    assert_eq!(
        denied.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&denied.stderr)
    );
    let said = String::from_utf8_lossy(&denied.stdout);
    assert!(
        said.starts_with("refused: policy denied `pairing.approve` for Chitin::User::\"mallory\""),
        "{said}"
    );
    assert_eq!(session_of(&gw, &both, &remote).status, 403);

    let ok = gw.chitin(&["devices", "approve", &id]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(String::from_utf8_lossy(&ok.stdout).contains(&format!("approved device {id}")));
    let s = session_of(&gw, &both, &remote);
    assert_eq!(s.status, 200, "{}", s.body);
    assert_eq!(s.json()["user"], "alice@example.com");

    // The approved browser signs in again without a new device.
    let again = login(
        &gw,
        &idp,
        &[("X-Forwarded-For", "203.0.113.7"), ("Cookie", &device)],
    );
    assert_eq!(again.resp.status, 200, "{}", again.resp.body);
    assert!(again.resp.body.contains("Signed in"), "{}", again.resp.body);
    assert!(cookie_pair(&again.resp, "chitin_device").is_none());

    // Revoking the device ends its sessions.
    let rv = gw.chitin(&["devices", "revoke", &id]);
    assert!(
        rv.status.success(),
        "{}",
        String::from_utf8_lossy(&rv.stderr)
    );
    let gone = session_of(&gw, &both, &remote);
    assert_eq!(gone.status, 401, "{}", gone.body);

    // From loopback no device is needed.
    let local = login(&gw, &idp, &[]);
    assert_eq!(local.resp.status, 200);
    assert!(cookie_pair(&local.resp, "chitin_device").is_none());
    let c = cookie_pair(&local.resp, "chitin_session").unwrap();
    assert_eq!(session_of(&gw, &c, &[]).status, 200);
}

fn proxy_claims(aud: &str, exp_in: i64, email: &str) -> Value {
    let now = FakeIssuer::now_s();
    json!({
        "iss": "https://team.cloudflareaccess.example",
        "aud": [aud],
        "exp": now + exp_in,
        "iat": now,
        "email": email,
        "groups": ["staff"],
    })
}

#[test]
fn behind_a_trusted_identity_proxy_only_its_signed_token_with_the_right_issuer_and_audience_signs_in()
 {
    let idp = FakeIssuer::start();
    let cfg = format!(
        "auth_max_failures = 50\n\n[auth.proxy]\nheader = \"Cf-Access-Jwt-Assertion\"\njwks_url = \"{}/jwks\"\nissuer = \"https://team.cloudflareaccess.example\"\naudience = \"chitin-aud\"\n",
        idp.issuer()
    );
    let gw = Gw::start_custom(free_port(), &cfg, false, prepare);
    let good = idp.sign(&proxy_claims("chitin-aud", 300, "carol@example.com"));

    // Reading works with the header alone, as carol (groups from the token).
    let s = gw
        .try_req(
            "GET",
            "/auth/session",
            &[("Cf-Access-Jwt-Assertion", &good)],
            b"",
        )
        .unwrap();
    assert_eq!(s.status, 200, "{}", s.body);
    let v = s.json();
    assert_eq!(v["user"], "carol@example.com");
    assert_eq!(v["groups"], json!(["staff"]));
    let csrf = v["csrf"].as_str().unwrap().to_string();
    let cookie = cookie_pair(&s, "chitin_session").unwrap();
    let m = gw
        .try_req(
            "GET",
            "/metrics",
            &[("Cf-Access-Jwt-Assertion", &good)],
            b"",
        )
        .unwrap();
    assert_eq!(m.status, 200, "{}", m.body);

    // Changing something needs the session and its CSRF token, not the ambient header.
    let body = json!({"tool": "list_dir", "args": {"path": "."}}).to_string();
    let post = gw
        .try_req(
            "POST",
            "/tools/invoke",
            &[
                ("Cf-Access-Jwt-Assertion", &good),
                ("Content-Type", "application/json"),
            ],
            body.as_bytes(),
        )
        .unwrap();
    assert_eq!(post.status, 403, "{}", post.body);
    assert_eq!(post.json()["error"]["code"], "csrf_refused");
    // With them, carol (staff, not an owner) is decided as herself: denied.
    let as_carol = gw
        .try_req(
            "POST",
            "/tools/invoke",
            &[
                ("Cookie", &cookie),
                ("X-CSRF-Token", &csrf),
                ("Content-Type", "application/json"),
            ],
            body.as_bytes(),
        )
        .unwrap();
    assert_eq!(as_carol.status, 403, "{}", as_carol.body);
    assert_eq!(as_carol.json()["error"]["code"], "policy_denied");

    let refused = |headers: &[(&str, &str)]| {
        let r = gw.try_req("GET", "/metrics", headers, b"").unwrap();
        assert_eq!(r.status, 401, "{headers:?}: {}", r.body);
        r
    };
    let wrong_aud = idp.sign(&proxy_claims("another-app", 300, "carol@example.com"));
    refused(&[("Cf-Access-Jwt-Assertion", &wrong_aud)]);
    let expired = idp.sign(&proxy_claims("chitin-aud", -3600, "carol@example.com"));
    refused(&[("Cf-Access-Jwt-Assertion", &expired)]);
    let forged = idp.sign_rogue(&proxy_claims("chitin-aud", 300, "owner"));
    refused(&[("Cf-Access-Jwt-Assertion", &forged)]);
    // An unsigned token (alg none) and a bare user header are nothing.
    use base64::Engine;
    let enc = |v: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    let unsigned = format!(
        "{}.{}.",
        enc(&json!({"alg": "none", "typ": "JWT"})),
        enc(&proxy_claims("chitin-aud", 300, "owner"))
    );
    refused(&[("Cf-Access-Jwt-Assertion", &unsigned)]);
    refused(&[("X-User", "owner"), ("X-Forwarded-User", "owner")]);

    let audit = gw.chitin(&["audit", "query", "--json"]);
    let text = String::from_utf8_lossy(&audit.stdout);
    for code in ["wrong_audience", "expired", "bad_signature", "malformed"] {
        assert!(
            text.contains(&format!("refused: {code}")),
            "{code} audited: {text}"
        );
    }
}

#[test]
fn a_confidential_client_sends_its_secret_released_through_cedar_only_to_the_token_endpoint_host() {
    let idp = FakeIssuer::start();
    idp.set(|b| b.client_secret = Some("s3cret-CANARY".into()));
    let port = free_port();
    let cfg = format!(
        "\n[auth.oidc]\nissuer = \"{}\"\nclient_id = \"{CLIENT_ID}\"\nclient_secret = \"secret:oidc_client\"\nredirect_uri = \"http://127.0.0.1:{port}/auth/callback\"\n",
        idp.issuer()
    );
    let gw = Gw::start_custom(port, &cfg, false, prepare);
    // Without the secret in the store the login cannot finish (and says why).
    let l = login(&gw, &idp, &[]);
    assert_eq!(l.resp.status, 503, "{}", l.resp.body);
    assert_eq!(l.resp.json()["error"]["code"], "secret_unavailable");

    let set = |audience: &str| {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_chitin"))
            .args(["secrets", "set", "oidc_client", "--audience", audience])
            .env("CHITIN_HOME", &gw.home)
            .env("CHITIN_PASSPHRASE", PASS)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(b"s3cret-CANARY")
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    // Stored for another host: Cedar refuses to release it to the issuer.
    set("idp.example.com");
    gw.signal("-HUP");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let l = login(&gw, &idp, &[]);
        let v = l.resp.json();
        if l.resp.status == 503
            && v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("policy denied secret.use by Chitin::Provider::\"oidc\"")
        {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{}", l.resp.body);
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    set("127.0.0.1");
    gw.signal("-HUP");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let l = login(&gw, &idp, &[]);
        if l.resp.status == 200 {
            assert!(cookie_pair(&l.resp, "chitin_session").is_some());
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{}", l.resp.body);
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let log = std::fs::read_to_string(gw.root.join("gateway.log")).unwrap();
    assert!(!log.contains("s3cret-CANARY"), "the secret is never logged");
}

/// A policy directory: the default policies and `extra`.
fn policy_dir(root: &Path, extra: &str) -> std::path::PathBuf {
    let dir = root.join("policies");
    std::fs::create_dir(&dir).unwrap();
    let defaults = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/default");
    for e in std::fs::read_dir(defaults).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
    }
    std::fs::write(dir.join("zz-test.cedar"), extra).unwrap();
    dir
}

const MALLORY_MAY_TALK: &str = r#"
@id("test.mallory-may-talk")
@reason("Mallory's paired chat identity is admitted, but she is not an owner.")
permit (principal in Chitin::User::"mallory", action == Chitin::Action::"message.receive", resource)
when { context.paired };
"#;

/// A remote browser's login: the session and device cookies (`Cookie` form) and the id of
/// the device it waits as.
fn remote_login(gw: &Gw, idp: &FakeIssuer) -> (String, String) {
    let remote = [("X-Forwarded-For", "203.0.113.9")];
    let l = login(gw, idp, &remote);
    assert_eq!(l.resp.status, 200, "{}", l.resp.body);
    assert!(
        l.resp.body.contains("Waiting for approval"),
        "{}",
        l.resp.body
    );
    let both = format!(
        "{}; {}",
        cookie_pair(&l.resp, "chitin_session").unwrap(),
        cookie_pair(&l.resp, "chitin_device").unwrap()
    );
    let held = session_of(gw, &both, &remote);
    assert_eq!(held.status, 403, "{}", held.body);
    assert_eq!(held.json()["error"]["code"], "device_pending");
    assert!(
        held.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("/device approve"),
        "{}",
        held.body
    );
    let id = held.header("x-chitin-device").unwrap().to_string();
    (both, id)
}

fn api_as(gw: &Gw, bearer: &str, method: &str, path: &str, body: Option<&Value>) -> Resp {
    let text = body.map(Value::to_string).unwrap_or_default();
    gw.try_req(
        method,
        path,
        &[
            ("Authorization", bearer),
            ("Content-Type", "application/json"),
        ],
        text.as_bytes(),
    )
    .unwrap()
}

#[test]
fn a_pending_device_is_decided_on_the_control_api_and_by_an_owners_chat_command_and_refused_to_others()
 {
    use chitin_channels::telegram::fake::{
        FakeChat, FakeTelegram, FakeUser, MessageBuilder, TOKEN,
    };
    let idp = FakeIssuer::start();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let tg = rt.block_on(FakeTelegram::start()).unwrap();
    let keep = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let dir = policy_dir(keep.path(), MALLORY_MAY_TALK);
    let port = free_port();
    let cfg = format!(
        "trusted_proxies = [\"127.0.0.1\"]\nauth_max_failures = 1000\n\n[policy]\ndir = {:?}\n\n\
         [[channels]]\nname = \"tg\"\nkind = \"telegram\"\ntoken = \"secret:tg_token\"\napi_base = \"http://{}\"\nmode = \"polling\"\n{}",
        dir.display().to_string(),
        tg.addr(),
        oidc_config(&idp, "http", port)
    );
    let mut gw = Gw::start_custom(port, &cfg, false, prepare);
    gw.signal("-TERM");
    assert!(gw.wait_exit().success());
    chat::set_secret(&gw, "tg_token", "127.0.0.1", TOKEN);
    gw.spawn();
    let owner = gw.bearer();

    // The owner's and mallory's Telegram identities, paired from the API.
    let pair = |tg_user: &FakeUser, user: &str| {
        let dm = FakeChat::private(tg_user);
        tg.push_message(MessageBuilder::text(&dm, tg_user, "hello"));
        let code = chat::until("the pairing request", &gw, || {
            let v = api_as(&gw, &owner, "GET", "/api/v1/pairing", None).json();
            v["requests"][0]["code"].as_str().map(str::to_string)
        });
        let r = api_as(
            &gw,
            &owner,
            "POST",
            &format!("/api/v1/pairing/{code}/resolve"),
            Some(&json!({"decision": "approve", "user": user})),
        );
        assert_eq!(r.status, 200, "{}", r.body);
        dm
    };
    let owner_tg = FakeUser::new(4242, "Owner");
    let owner_dm = pair(&owner_tg, "owner");
    let mallory_tg = FakeUser::new(777, "Mallory");
    let mallory_dm = pair(&mallory_tg, "mallory");
    // Says `text` in `dm` as `who` and waits for the reply to it.
    let say = |dm: &FakeChat, who: &FakeUser, text: &str| -> String {
        let asked = tg.push_message(MessageBuilder::text(dm, who, text));
        chat::until("the reply in the chat", &gw, || {
            tg.sent()
                .into_iter()
                .find(|m| m.reply_to == Some(asked.message_id))
                .map(|m| m.text)
        })
    };

    // A browser signs in from another address: a pending device.
    let (browser, id) = remote_login(&gw, &idp);
    let remote = [("X-Forwarded-For", "203.0.113.9")];

    // Mallory is admitted in chat but may not approve devices: refused in words, nothing
    // changes.
    let refused = say(&mallory_dm, &mallory_tg, &format!("/device approve {id}"));
    assert_eq!(
        refused,
        "Refused: you are not allowed to approve devices (pairing.approve; no policy permits it)."
    );
    assert_eq!(session_of(&gw, &browser, &remote).status, 403);
    // Nor over the API with her own token.
    let issued = gw.chitin(&["tokens", "issue", "--user", "mallory"]);
    assert!(
        issued.status.success(),
        "{}",
        String::from_utf8_lossy(&issued.stderr)
    );
    let mallory = format!(
        "Bearer {}",
        String::from_utf8_lossy(&issued.stdout)
            .lines()
            .last()
            .unwrap()
            .trim()
    );
    for (method, path, body) in [
        ("GET", "/api/v1/devices".to_string(), None),
        ("GET", "/api/v1/pairing".to_string(), None),
        (
            "POST",
            format!("/api/v1/devices/{id}/resolve"),
            Some(json!({"decision": "approve"})),
        ),
    ] {
        let r = api_as(&gw, &mallory, method, &path, body.as_ref());
        assert_eq!(r.status, 403, "{method} {path}: {}", r.body);
        assert_eq!(r.json()["error"]["code"], "policy_denied");
        assert_eq!(r.json()["error"]["action"], "pairing.approve");
        assert_eq!(r.json()["error"]["policies"], json!([]));
    }
    assert_eq!(session_of(&gw, &browser, &remote).status, 403);

    // The owner lists the waiting browsers in chat and approves this one.
    let listed = say(&owner_dm, &owner_tg, "/devices");
    assert!(
        listed.starts_with("Browsers waiting for approval:\n"),
        "{listed}"
    );
    assert!(
        listed.contains(&format!("{id} for alice@example.com from 203.0.113.9")),
        "{listed}"
    );
    let approved = say(&owner_dm, &owner_tg, &format!("/device approve {id}"));
    assert_eq!(
        approved,
        format!("Device {id} of alice@example.com from 203.0.113.9 is approved.")
    );
    let s = session_of(&gw, &browser, &remote);
    assert_eq!(s.status, 200, "{}", s.body);
    assert_eq!(s.json()["user"], "alice@example.com");
    let again = say(&owner_dm, &owner_tg, &format!("/device approve {id}"));
    assert!(
        again.starts_with(&format!("Refused: device `{id}` is approved")),
        "{again}"
    );
    let none = say(&owner_dm, &owner_tg, "/devices");
    assert_eq!(none, "No browser is waiting for approval.");

    // A second browser: listed on the Channels and pairing API, denied there.
    let (second, id2) = remote_login(&gw, &idp);
    let listed = api_as(&gw, &owner, "GET", "/api/v1/pairing", None).json();
    let devices = listed["devices"].as_array().unwrap();
    assert_eq!(devices.len(), 2, "{listed}");
    assert_eq!(devices[0]["id"], id2.as_str(), "pending devices come first");
    assert_eq!(devices[0]["status"], "pending");
    assert_eq!(devices[0]["user"], "alice@example.com");
    assert_eq!(devices[0]["client"], "203.0.113.9");
    assert_eq!(devices[1]["id"], id.as_str());
    assert_eq!(devices[1]["status"], "approved");
    assert_eq!(devices[1]["decided_by"], "Chitin::User::\"owner\"");
    let bad = api_as(
        &gw,
        &owner,
        "POST",
        &format!("/api/v1/devices/{id2}/resolve"),
        Some(&json!({"decision": "revoke"})),
    );
    assert_eq!(bad.status, 400, "{}", bad.body);
    let denied = api_as(
        &gw,
        &owner,
        "POST",
        &format!("/api/v1/devices/{id2}/resolve"),
        Some(&json!({"decision": "deny"})),
    );
    assert_eq!(denied.status, 200, "{}", denied.body);
    assert_eq!(denied.json()["device"]["status"], "revoked");
    assert_eq!(session_of(&gw, &second, &remote).status, 401);
    let twice = api_as(
        &gw,
        &owner,
        "POST",
        &format!("/api/v1/devices/{id2}/resolve"),
        Some(&json!({"decision": "approve"})),
    );
    assert_eq!(twice.status, 409, "{}", twice.body);
    // Denying the approved browser revokes it and ends its session.
    let revoked = api_as(
        &gw,
        &owner,
        "POST",
        &format!("/api/v1/devices/{id}/resolve"),
        Some(&json!({"decision": "deny"})),
    );
    assert_eq!(revoked.status, 200, "{}", revoked.body);
    assert_eq!(session_of(&gw, &browser, &remote).status, 401);

    // Every decision is in the audit log with who made it.
    let out = gw.chitin(&["audit", "query", "--kind", "admin", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let records: Vec<Value> = serde_json::from_str(&text).unwrap();
    let of = |action: &str| {
        records
            .iter()
            .filter(|r| r["action"] == action)
            .map(|r| r["resource"].as_str().unwrap_or("").to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(of("device.approve"), vec![format!("device:{id}")], "{text}");
    let mut revokes = of("device.revoke");
    revokes.sort();
    let mut want = vec![format!("device:{id}"), format!("device:{id2}")];
    want.sort();
    assert_eq!(revokes, want, "{text}");
    assert!(
        records
            .iter()
            .filter(|r| r["action"] == "device.approve" || r["action"] == "device.revoke")
            .all(|r| r["actor"] == "Chitin::User::\"owner\""),
        "{text}"
    );
}

#[test]
fn a_removed_user_loses_their_sessions_and_tokens_and_is_not_created_again_by_the_next_login() {
    let idp = FakeIssuer::start();
    let gw = start(&idp, "", false);
    let user = "alice@example.com";
    let l = login(&gw, &idp, &[]);
    assert_eq!(l.resp.status, 200, "{}", l.resp.body);
    let cookie = cookie_pair(&l.resp, "chitin_session").unwrap();
    assert_eq!(session_of(&gw, &cookie, &[]).status, 200);
    let issued = gw.chitin(&["tokens", "issue", "--user", user]);
    assert!(
        issued.status.success(),
        "{}",
        String::from_utf8_lossy(&issued.stderr)
    );
    let bearer = format!(
        "Bearer {}",
        String::from_utf8_lossy(&issued.stdout)
            .lines()
            .last()
            .unwrap()
            .trim()
    );
    let with_token = |gw: &Gw| {
        gw.try_req("GET", "/auth/session", &[("Authorization", &bearer)], b"")
            .unwrap()
    };
    assert_eq!(with_token(&gw).status, 200);

    let out = gw.chitin(&["users", "remove", user]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Everything the user held ends at once.
    assert_eq!(session_of(&gw, &cookie, &[]).status, 401);
    assert_eq!(with_token(&gw).status, 401);

    // Signing in again at the issuer does not bring the user back.
    let again = login(&gw, &idp, &[]);
    assert_eq!(again.resp.status, 403, "{}", again.resp.body);
    let e = again.resp.json()["error"].clone();
    assert_eq!(e["code"], "user_removed");
    assert_eq!(
        e["message"],
        "the user `alice@example.com` was removed by an operator and is not created again by signing in; ask an owner to add them back (`chitin users add`)"
    );
    assert!(cookie_pair(&again.resp, "chitin_session").is_none());
    let users: Value =
        serde_json::from_slice(&gw.chitin(&["users", "list", "--json"]).stdout).unwrap();
    assert!(
        users.as_array().unwrap().iter().all(|u| u["user"] != user),
        "{users}"
    );
    // The refused login is audited (written in the background: polled).
    chat::until("the refused login in the audit log", &gw, || {
        let audit = gw.chitin(&["audit", "query", "--kind", "system", "--json"]);
        String::from_utf8_lossy(&audit.stdout)
            .contains("refused: user_removed")
            .then_some(())
    });
    // The tombstone keeps no user id in clear.
    let db = rusqlite::Connection::open(gw.home.join("state.db")).unwrap();
    let (n, hash): (i64, Vec<u8>) = db
        .query_row(
            "SELECT count(*), max(user_hash) FROM account_removed",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!(n, 1);
    assert_eq!(hash.len(), 32);
    assert!(!String::from_utf8_lossy(&hash).contains("alice"));

    // An owner adding the user lets them in again, with the operator's groups.
    let out = gw.chitin(&["users", "add", user, "--group", "owners"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let back = login(&gw, &idp, &[]);
    assert_eq!(back.resp.status, 200, "{}", back.resp.body);
    let c = cookie_pair(&back.resp, "chitin_session").unwrap();
    let s = session_of(&gw, &c, &[]);
    assert_eq!(s.status, 200, "{}", s.body);
    assert_eq!(s.json()["user"], user);
    let n: i64 = db
        .query_row("SELECT count(*) FROM account_removed", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 0);
}
