//! Who a request is ([`authenticate`]) and the browser's sign-in routes:
//! `GET /auth/methods`, `GET /auth/login`, `GET /auth/callback`, `GET /auth/session`,
//! `POST /auth/logout`.
//!
//! Credentials, in this order:
//! 1. `Authorization: Bearer <token>`: the gateway token (the owner) or a per-user API token
//!    (`cht_...`, its user). Never needs CSRF: a page of another site cannot set the header.
//! 2. The session cookie (`chitin_session`, `HttpOnly; SameSite=Strict`, `Secure` over TLS):
//!    a server-side session with idle and absolute expiry. A state-changing request (any
//!    method but GET/HEAD/OPTIONS) must carry the session's CSRF token in `X-CSRF-Token`
//!    (`GET /auth/session` returns it). A session bound to a device that is still pending
//!    gets 403 `device_pending`; a revoked one is gone.
//! 3. `[auth.proxy] header`: a trusted identity proxy's signed JWT (issuer, audience,
//!    signature against the proxy's JWKS). Only for reading; to change anything the browser
//!    takes a session (`GET /auth/session`) and sends its CSRF token.
//!
//! A new browser signing in from an address that is not loopback is registered as a pending
//! device (`[auth] device_pairing`) and its session works once an owner approves the device
//! (`chitin devices approve ID`, Cedar `pairing.approve`).

use std::net::IpAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use chitin_audit::RecordInput;
use serde::Deserialize;
use serde_json::json;
use tracing::{info, warn};

use super::auth::{
    self, AuthFailure, AuthMethod, AuthedUser, CSRF_HEADER, DEVICE_COOKIE, LOGIN_COOKIE,
    SESSION_COOKIE,
};
use super::{App, auth_failed, error_body, read};
use crate::accounts::jwt::LoginError;

/// A device cookie lives a year; the device row decides whether it still counts.
const DEVICE_MAX_AGE_S: i64 = 365 * 86_400;

/// The routes of this module (no authentication middleware: each checks what it needs).
pub(super) fn routes() -> Router<Arc<App>> {
    Router::new()
        .route("/auth/methods", get(methods))
        .route("/auth/login", get(login))
        .route("/auth/callback", get(callback))
        .route("/auth/session", get(session))
        .route("/auth/logout", post(logout))
}

/// `GET /auth/methods` (no authentication, nothing about any user): how a browser can sign
/// in here, so the sign-in pages offer "Sign in with SSO" only where it works, and whether
/// this request carries a session cookie (unchecked), so a page asks `GET /auth/session` only
/// when it may have a session (a request without credentials counts as a failed
/// authentication).
async fn methods(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    let mut resp = axum::Json(json!({
        "token": true,
        "oidc": app.oidc.is_some(),
        "proxy": app.proxy_auth.is_some(),
        "session_cookie": auth::cookie(&headers, SESSION_COOKIE).is_some(),
    }))
    .into_response();
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

fn refused(status: StatusCode, code: &str, message: &str) -> Box<Response> {
    Box::new(error_body(status, code, message))
}

/// Whether the gateway's cookies get `Secure`: it serves TLS itself, or single sign-on
/// returns to an https:// address (a TLS-terminating proxy in front).
fn secure(app: &App) -> bool {
    app.tls_on
        || read(&app.config)
            .auth
            .oidc
            .redirect_uri
            .starts_with("https://")
}

fn device_pending(id: &str) -> Box<Response> {
    let mut resp = error_body(
        StatusCode::FORBIDDEN,
        "device_pending",
        &format!(
            "this browser is a new device waiting for an owner's approval (device {id}): an owner approves it on the Control page (Channels and pairing), in chat with `/device approve {id}`, or with `chitin devices approve {id}`"
        ),
    );
    if let Ok(v) = HeaderValue::from_str(id) {
        resp.headers_mut().insert("x-chitin-device", v);
    }
    Box::new(resp)
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, crate::accounts::AccountsError> + Send + 'static,
) -> Result<T, Box<Response>> {
    match tokio::task::spawn_blocking(f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => {
            warn!(error = %e, "accounts store failed during authentication");
            Err(refused(
                StatusCode::SERVICE_UNAVAILABLE,
                "accounts_unavailable",
                "the accounts store could not be read; see the gateway log",
            ))
        }
        Err(_) => Err(refused(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "authentication failed to run",
        )),
    }
}

/// The authenticated user of a request, or the refusal to answer with (401, 403, 429).
/// Valid credentials always pass whatever failed before; failures are counted per client.
pub(in crate::gateway) async fn authenticate(
    app: &Arc<App>,
    client: IpAddr,
    method: &Method,
    headers: &HeaderMap,
) -> Result<AuthedUser, Box<Response>> {
    {
        let acc = app.accounts.clone();
        blocking(move || acc.refresh()).await?;
    }
    if headers.contains_key(header::AUTHORIZATION) {
        let presented = match auth::bearer(
            headers
                .get(header::AUTHORIZATION)
                .map(HeaderValue::as_bytes),
        ) {
            Ok(t) => zeroize::Zeroizing::new(t.to_vec()),
            Err(f) => return Err(Box::new(auth_failed(app, client, f))),
        };
        if read(&app.token).matches(&presented) {
            let owner = app.owner.clone();
            let groups = app.accounts.groups_of(&owner);
            return Ok(AuthedUser::new(owner, groups, AuthMethod::GatewayToken));
        }
        let acc = app.accounts.clone();
        let found = blocking(move || acc.verify_token(&presented)).await?;
        return match found {
            Some((id, user)) => {
                let groups = app.accounts.groups_of(&user);
                Ok(AuthedUser::new(user, groups, AuthMethod::ApiToken { id }))
            }
            None => Err(Box::new(auth_failed(app, client, AuthFailure::Wrong))),
        };
    }
    if let Some(c) = auth::cookie(headers, SESSION_COOKIE) {
        let c = zeroize::Zeroizing::new(c.to_string());
        let idle_ms = session_idle_ms(app);
        let acc = app.accounts.clone();
        let found = blocking(move || {
            let s = acc.session(&c, idle_ms)?;
            let dev = match s.as_ref().and_then(|s| s.device.clone()) {
                Some(d) => acc.device_by_id(&d)?,
                None => None,
            };
            Ok((s, dev))
        })
        .await?;
        let Some(s) = found.0 else {
            return Err(Box::new(auth_failed(app, client, AuthFailure::Session)));
        };
        if let Some(d) = &s.device {
            match found.1.as_ref().map(|d| d.status.as_str()) {
                Some("approved") => {}
                Some("pending") => return Err(device_pending(d)),
                _ => return Err(Box::new(auth_failed(app, client, AuthFailure::Session))),
            }
        }
        if !auth::safe_method(method)
            && !auth::csrf_matches(
                headers.get(CSRF_HEADER).and_then(|v| v.to_str().ok()),
                &s.csrf,
            )
        {
            return Err(refused(
                StatusCode::FORBIDDEN,
                "csrf_refused",
                "a request that changes something must carry the session's CSRF token in X-CSRF-Token (GET /auth/session returns it)",
            ));
        }
        let groups = app.accounts.groups_of(&s.user);
        return Ok(AuthedUser::new(
            s.user,
            groups,
            AuthMethod::Session { id: s.id },
        ));
    }
    if let Some(proxy) = app.proxy_auth.clone()
        && let Some(v) = headers.get(proxy.header()).and_then(|v| v.to_str().ok())
    {
        let token = zeroize::Zeroizing::new(v.to_string());
        let (user, groups) = match proxy.verify(&token, app.clock.now_ms()).await {
            Ok(ug) => ug,
            Err(e) => {
                warn!(code = e.code(), error = %e, "identity proxy token refused");
                audit_login(app, "proxy", None, client, Err(&e));
                return Err(Box::new(auth_failed(app, client, AuthFailure::ProxyToken)));
            }
        };
        if !auth::safe_method(method) {
            return Err(refused(
                StatusCode::FORBIDDEN,
                "csrf_refused",
                "a request that changes something needs the session cookie and its CSRF token in X-CSRF-Token: take a session with GET /auth/session first",
            ));
        }
        if needs_device(app, client) {
            let cookie = auth::cookie(headers, DEVICE_COOKIE).map(str::to_string);
            let acc = app.accounts.clone();
            let dev = blocking(move || match cookie {
                Some(c) => acc.device(&c),
                None => Ok(None),
            })
            .await?;
            match dev {
                Some(d) if d.user == user && d.status == "approved" => {}
                Some(d) if d.user == user && d.status == "pending" => {
                    return Err(device_pending(&d.id));
                }
                _ => {
                    return Err(refused(
                        StatusCode::FORBIDDEN,
                        "device_unknown",
                        "this browser is not a paired device yet: open /auth/login to register it, then ask an owner to approve it",
                    ));
                }
            }
        }
        provision_proxy(app, client, &user, groups).await?;
        let groups = app.accounts.groups_of(&user);
        return Ok(AuthedUser::new(user, groups, AuthMethod::Proxy));
    }
    Err(Box::new(auth_failed(app, client, AuthFailure::Missing)))
}

/// Provisions the user of a verified proxy token. A user an operator removed is refused
/// (403 `user_removed`, audited as a refused login), never created again.
async fn provision_proxy(
    app: &Arc<App>,
    client: IpAddr,
    user: &str,
    groups: Vec<String>,
) -> Result<(), Box<Response>> {
    let (acc, u2) = (app.accounts.clone(), user.to_string());
    let removed =
        blocking(
            move || match acc.provision(&u2, &groups, crate::accounts::Source::Proxy) {
                Ok(_) => Ok(None),
                Err(crate::accounts::AccountsError::Removed(u)) => Ok(Some(u)),
                Err(e) => Err(e),
            },
        )
        .await?;
    match removed {
        None => Ok(()),
        Some(u) => {
            let e = LoginError::Removed(u);
            warn!(
                code = e.code(),
                "identity proxy user refused: removed by an operator"
            );
            audit_login(app, "proxy", None, client, Err(&e));
            Err(refused(StatusCode::FORBIDDEN, e.code(), &e.to_string()))
        }
    }
}

fn session_idle_ms(app: &App) -> i64 {
    let s = read(&app.config).auth.session_idle_secs;
    i64::try_from(s.saturating_mul(1000)).unwrap_or(i64::MAX)
}

fn session_max_ms(app: &App) -> i64 {
    let s = read(&app.config).auth.session_max_secs;
    i64::try_from(s.saturating_mul(1000)).unwrap_or(i64::MAX)
}

/// Whether a browser from `client` must be an approved device.
fn needs_device(app: &App, client: IpAddr) -> bool {
    read(&app.config).auth.device_pairing && !client.to_canonical().is_loopback()
}

fn client_of(req: &Request) -> IpAddr {
    super::client_of(req)
}

fn audit_login(
    app: &Arc<App>,
    method: &str,
    user: Option<&str>,
    client: IpAddr,
    result: Result<(), &LoginError>,
) {
    let actor = user.map_or_else(|| format!("client:{client}"), crate::accounts::principal);
    let mut r = RecordInput::new(chitin_audit::Kind::System, actor, "auth.login", "gateway")
        .with_payload(json!({"method": method, "client": client.to_string()}));
    r = match result {
        Ok(()) => r.with_outcome("ok"),
        Err(e) => r.with_outcome(format!("refused: {}: {e}", e.code())),
    };
    super::append_detached(app, r, "login");
}

/// A small HTML page (no script: strict CSP) that sends the browser on to `/` by a
/// same-site navigation, so the `SameSite=Strict` cookie just set is sent with it.
fn page(status: StatusCode, title: &str, text: &str, next: bool) -> Response {
    let esc = |s: &str| {
        s.replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
            .replace('"', "&quot;")
    };
    let refresh = if next {
        "<meta http-equiv=\"refresh\" content=\"0;url=/\">"
    } else {
        ""
    };
    let html = format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" content=\"width=device-width\">{refresh}<title>{}</title></head><body><h1>{}</h1><p>{}</p><p><a href=\"/\">Continue to Chitin</a> · <a href=\"/control\">Open the control page</a></p></body></html>",
        esc(title),
        esc(title),
        esc(text)
    );
    let mut resp = (status, html).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        ),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    resp
}

fn add_cookie(resp: &mut Response, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        resp.headers_mut().append(header::SET_COOKIE, v);
    }
}

/// Starts a session for a signed-in `user` (registering the browser as a device when it
/// needs one): the response cookies and, for a pending device, its id.
async fn start_session(
    app: &Arc<App>,
    user: &str,
    method: &'static str,
    client: IpAddr,
    headers: &HeaderMap,
) -> Result<(crate::accounts::NewSession, Vec<String>, Option<String>), Box<Response>> {
    let device_cookie = auth::cookie(headers, DEVICE_COOKIE).map(str::to_string);
    let ua = headers
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let need = needs_device(app, client);
    let (acc, user2, max_ms) = (app.accounts.clone(), user.to_string(), session_max_ms(app));
    let (session, new_device, pending) = blocking(move || {
        let mut new_device = None;
        let mut pending = None;
        let device = if need {
            let known = match &device_cookie {
                Some(c) => acc.device(c)?,
                None => None,
            };
            match known {
                Some(d) if d.user == user2 && d.status != "revoked" => {
                    if d.status == "pending" {
                        pending = Some(d.id.clone());
                    }
                    Some(d.id)
                }
                _ => {
                    let d = acc.new_device(&user2, &client.to_string(), &ua)?;
                    pending = Some(d.info.id.clone());
                    let id = d.info.id.clone();
                    new_device = Some(d);
                    Some(id)
                }
            }
        } else {
            None
        };
        let s = acc.create_session(
            &user2,
            method,
            device.as_deref(),
            &client.to_string(),
            max_ms,
        )?;
        Ok((s, new_device, pending))
    })
    .await?;
    let secure = secure(app);
    let mut cookies = vec![auth::set_cookie(
        SESSION_COOKIE,
        session.cookie(),
        max_ms / 1000,
        secure,
        "Strict",
    )];
    if let Some(d) = new_device {
        cookies.push(auth::set_cookie(
            DEVICE_COOKIE,
            d.cookie(),
            DEVICE_MAX_AGE_S,
            secure,
            "Strict",
        ));
    }
    Ok((session, cookies, pending))
}

/// `GET /auth/login`: single sign-on starts here (302 to the identity provider); behind a
/// trusted identity proxy, the proxy's token signs the browser in directly.
async fn login(State(app): State<Arc<App>>, req: Request) -> Response {
    let client = client_of(&req);
    if let Some(oidc) = app.oidc.clone() {
        let binding = match crate::accounts::random::<32>() {
            Ok(b) => crate::accounts::b64url(&b),
            Err(e) => {
                return error_body(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    &e.to_string(),
                );
            }
        };
        return match oidc.begin(&binding).await {
            Ok(url) => {
                let mut resp = StatusCode::FOUND.into_response();
                if let Ok(v) = HeaderValue::from_str(&url) {
                    resp.headers_mut().insert(header::LOCATION, v);
                }
                resp.headers_mut()
                    .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
                // Lax: the identity provider's redirect back is a cross-site navigation.
                add_cookie(
                    &mut resp,
                    &auth::set_cookie(LOGIN_COOKIE, &binding, 600, secure(&app), "Lax"),
                );
                resp
            }
            Err(e) => {
                warn!(error = %e, "single sign-on could not start");
                let status = match e {
                    LoginError::Busy | LoginError::Accounts(_) => StatusCode::SERVICE_UNAVAILABLE,
                    _ => StatusCode::BAD_GATEWAY,
                };
                error_body(status, e.code(), &e.to_string())
            }
        };
    }
    if app.proxy_auth.is_some() {
        let user = match authenticate_proxy_for_login(&app, client, req.headers()).await {
            Ok(u) => u,
            Err(resp) => return *resp,
        };
        return finish_page(&app, &user, "proxy", client, req.headers()).await;
    }
    error_body(
        StatusCode::NOT_FOUND,
        "not_configured",
        "single sign-on is not configured: set [auth.oidc] (or [auth.proxy]) in chitin.toml; the owner can use the gateway token",
    )
}

/// The proxy's token alone (no device check): a login registers the device.
async fn authenticate_proxy_for_login(
    app: &Arc<App>,
    client: IpAddr,
    headers: &HeaderMap,
) -> Result<String, Box<Response>> {
    let Some(proxy) = app.proxy_auth.clone() else {
        return Err(refused(
            StatusCode::NOT_FOUND,
            "not_configured",
            "no identity proxy is configured",
        ));
    };
    let Some(v) = headers.get(proxy.header()).and_then(|v| v.to_str().ok()) else {
        return Err(Box::new(auth_failed(app, client, AuthFailure::Missing)));
    };
    let token = zeroize::Zeroizing::new(v.to_string());
    match proxy.verify(&token, app.clock.now_ms()).await {
        Ok((user, groups)) => {
            provision_proxy(app, client, &user, groups).await?;
            Ok(user)
        }
        Err(e) => {
            audit_login(app, "proxy", None, client, Err(&e));
            Err(Box::new(auth_failed(app, client, AuthFailure::ProxyToken)))
        }
    }
}

async fn finish_page(
    app: &Arc<App>,
    user: &str,
    method: &'static str,
    client: IpAddr,
    headers: &HeaderMap,
) -> Response {
    let (_session, cookies, pending) = match start_session(app, user, method, client, headers).await
    {
        Ok(s) => s,
        Err(resp) => return *resp,
    };
    audit_login(app, method, Some(user), client, Ok(()));
    info!(user = %user, method, pending = pending.is_some(), "signed in");
    let mut resp = match &pending {
        Some(id) => page(
            StatusCode::OK,
            "Waiting for approval",
            &format!(
                "You are signed in as {user}, but this browser is a new device (device {id}). An owner must approve it first: on the Control page (Channels and pairing), in chat with /device approve {id}, or with chitin devices approve {id}. Then continue."
            ),
            false,
        ),
        None => page(
            StatusCode::OK,
            "Signed in",
            &format!("You are signed in as {user}."),
            true,
        ),
    };
    for c in cookies {
        add_cookie(&mut resp, &c);
    }
    add_cookie(
        &mut resp,
        &auth::set_cookie(LOGIN_COOKIE, "", 0, secure(app), "Lax"),
    );
    resp
}

#[derive(Deserialize)]
struct CallbackQuery {
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    state: Option<String>,
    #[serde(default)]
    error: Option<String>,
}

/// `GET /auth/callback`: the identity provider sends the browser back here with a code.
async fn callback(
    State(app): State<Arc<App>>,
    Query(q): Query<CallbackQuery>,
    req: Request,
) -> Response {
    let client = client_of(&req);
    let Some(oidc) = app.oidc.clone() else {
        return error_body(
            StatusCode::NOT_FOUND,
            "not_configured",
            &LoginError::NotConfigured.to_string(),
        );
    };
    let fail = |e: LoginError| {
        warn!(code = e.code(), error = %e, "single sign-on refused");
        match e {
            // Anyone can send these without having started a login: counted and audited in
            // bounded form, like other failed authentications.
            LoginError::StateUnknown | LoginError::OtherBrowser | LoginError::Malformed(_) => {
                let f = super::record_failure(&app, client, AuthFailure::LoginState);
                if let Some(remaining) = f.throttled {
                    return super::rate_limited(remaining);
                }
                if f.audit_now {
                    audit_login(&app, "oidc", None, client, Err(&e));
                }
            }
            _ => audit_login(&app, "oidc", None, client, Err(&e)),
        }
        let status = match e {
            LoginError::Discovery(_) | LoginError::Jwks(_) | LoginError::Exchange(_) => {
                StatusCode::BAD_GATEWAY
            }
            LoginError::Accounts(_) | LoginError::Secret(_) => StatusCode::SERVICE_UNAVAILABLE,
            LoginError::Removed(_) => StatusCode::FORBIDDEN,
            _ => StatusCode::UNAUTHORIZED,
        };
        let mut resp = error_body(status, e.code(), &e.to_string());
        add_cookie(
            &mut resp,
            &auth::set_cookie(LOGIN_COOKIE, "", 0, secure(&app), "Lax"),
        );
        resp
    };
    if let Some(err) = q.error {
        let text: String = err
            .chars()
            .filter(char::is_ascii_graphic)
            .take(64)
            .collect();
        return fail(LoginError::Provider(text));
    }
    let (Some(code), Some(state)) = (q.code, q.state) else {
        return fail(LoginError::Malformed(
            "the callback needs `code` and `state`".into(),
        ));
    };
    let binding = auth::cookie(req.headers(), LOGIN_COOKIE)
        .unwrap_or("")
        .to_string();
    match oidc.finish(&state, &code, &binding).await {
        Ok(who) => finish_page(&app, &who.user, "oidc", client, req.headers()).await,
        Err(e) => fail(e),
    }
}

/// `GET /auth/session`: who the browser is signed in as, and the CSRF token its
/// state-changing requests must send. Behind a trusted identity proxy it starts a session.
async fn session(State(app): State<Arc<App>>, req: Request) -> Response {
    let client = client_of(&req);
    let headers = req.headers();
    let has_session = auth::cookie(headers, SESSION_COOKIE).is_some();
    if !has_session && !headers.contains_key(header::AUTHORIZATION) && app.proxy_auth.is_some() {
        let user = match authenticate_proxy_for_login(&app, client, headers).await {
            Ok(u) => u,
            Err(resp) => return *resp,
        };
        let (s, cookies, pending) = match start_session(&app, &user, "proxy", client, headers).await
        {
            Ok(s) => s,
            Err(resp) => return *resp,
        };
        audit_login(&app, "proxy", Some(&user), client, Ok(()));
        let mut resp = match pending {
            Some(id) => *device_pending(&id),
            None => axum::Json(json!({
                "user": user,
                "groups": app.accounts.groups_of(&user),
                "method": "session",
                "csrf": s.csrf,
                "expires_ms": s.expires_ms,
            }))
            .into_response(),
        };
        for c in cookies {
            add_cookie(&mut resp, &c);
        }
        return resp;
    }
    let user = match authenticate(&app, client, req.method(), headers).await {
        Ok(u) => u,
        Err(resp) => return *resp,
    };
    let mut body = json!({
        "user": user.id(),
        "groups": user.groups(),
        "method": user.method().as_str(),
    });
    if let AuthMethod::Session { id } = user.method() {
        let (acc, c, idle) = (
            app.accounts.clone(),
            auth::cookie(headers, SESSION_COOKIE)
                .unwrap_or("")
                .to_string(),
            session_idle_ms(&app),
        );
        if let Ok(Some(s)) = blocking(move || acc.session(&c, idle)).await {
            body["csrf"] = json!(s.csrf);
            body["expires_ms"] = json!(s.expires_ms);
            body["session"] = json!(id);
        }
    }
    let mut resp = axum::Json(body).into_response();
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// `POST /auth/logout`: ends the browser's session (needs its CSRF token) and clears the
/// cookie.
async fn logout(State(app): State<Arc<App>>, req: Request) -> Response {
    let client = client_of(&req);
    let user = match authenticate(&app, client, req.method(), req.headers()).await {
        Ok(u) => u,
        Err(resp) => return *resp,
    };
    let AuthMethod::Session { id } = user.method().clone() else {
        return error_body(
            StatusCode::BAD_REQUEST,
            "no_session",
            "only a browser session can log out; revoke an API token with `chitin tokens revoke ID`",
        );
    };
    let (acc, u) = (app.accounts.clone(), user.id().to_string());
    if let Err(resp) = blocking(move || acc.end_session(&id, &u)).await {
        return *resp;
    }
    let mut resp = axum::Json(json!({"ok": true})).into_response();
    add_cookie(
        &mut resp,
        &auth::set_cookie(SESSION_COOKIE, "", 0, secure(&app), "Strict"),
    );
    resp
}
