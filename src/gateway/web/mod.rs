//! The web chat page at `GET /`: one HTML page, its script and its stylesheet, compiled into
//! the binary (no CDN, no external fonts), served with a strict Content-Security-Policy:
//! scripts and styles only from the gateway itself (no inline script or style), network
//! connections only to the gateway's own origin and its WebSocket, no framing, no forms, no
//! plugins. The page keeps the token in `sessionStorage` only and renders everything the
//! server sends with `textContent` (never as markup).

use std::sync::Arc;

use axum::Router;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use super::ws::Ws;

pub const INDEX_HTML: &str = include_str!("index.html");
pub const APP_JS: &str = include_str!("app.js");
pub const APP_CSS: &str = include_str!("app.css");

/// `GET /`, `/app.js`, `/app.css` (no authentication: the page asks for the token).
pub(super) fn routes() -> Router<Arc<Ws>> {
    Router::new()
        .route("/", get(index))
        .route(
            "/app.js",
            get(|| async { asset(APP_JS, "text/javascript; charset=utf-8") }),
        )
        .route(
            "/app.css",
            get(|| async { asset(APP_CSS, "text/css; charset=utf-8") }),
        )
}

/// The `Host` header when it is a plain `host[:port]` (letters, digits, `.-:[]`), so it can be
/// put in the CSP's `connect-src` without changing the policy's meaning.
fn sane_host(headers: &HeaderMap) -> Option<&str> {
    let h = headers.get(header::HOST)?.to_str().ok()?;
    let ok = !h.is_empty()
        && h.len() <= 255
        && h.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b));
    ok.then_some(h)
}

/// The page's Content-Security-Policy. `connect-src` names the WebSocket origin explicitly
/// (`'self'` does not cover `ws:`/`wss:` in every browser).
pub fn csp(host: Option<&str>) -> String {
    let connect = match host {
        Some(h) => format!("'self' ws://{h} wss://{h}"),
        None => "'self'".into(),
    };
    format!(
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; \
         connect-src {connect}; object-src 'none'; base-uri 'none'; form-action 'none'; \
         frame-ancestors 'none'"
    )
}

/// The headers every page and asset gets: no sniffing, no framing, no referrer, no caching,
/// same-origin opener and resource policies.
fn hardening(resp: &mut Response) {
    let h = resp.headers_mut();
    for (k, v) in [
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::CACHE_CONTROL, "no-store"),
    ] {
        h.insert(k, HeaderValue::from_static(v));
    }
    h.insert(
        "cross-origin-opener-policy",
        HeaderValue::from_static("same-origin"),
    );
    h.insert(
        "cross-origin-resource-policy",
        HeaderValue::from_static("same-origin"),
    );
}

/// An HTML page compiled into the binary, with the hardening headers and the
/// Content-Security-Policy `csp` (the chat page and the Control page share this).
pub(in crate::gateway) fn html_page(html: &'static str, csp: &str) -> Response {
    let mut resp = ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], html).into_response();
    hardening(&mut resp);
    if let Ok(v) = HeaderValue::from_str(csp) {
        resp.headers_mut()
            .insert(header::CONTENT_SECURITY_POLICY, v);
    }
    resp
}

async fn index(headers: HeaderMap) -> Response {
    html_page(INDEX_HTML, &csp(sane_host(&headers)))
}

/// A script or stylesheet compiled into the binary, with the hardening headers.
pub(in crate::gateway) fn asset(body: &'static str, content_type: &'static str) -> Response {
    let mut resp = ([(header::CONTENT_TYPE, content_type)], body).into_response();
    hardening(&mut resp);
    resp
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

    #[test]
    fn the_page_has_no_inline_script_or_style_and_no_external_resource() {
        let lower = INDEX_HTML.to_ascii_lowercase();
        assert!(!lower.contains("<script>"), "inline script");
        assert!(!lower.contains("<style"), "inline style");
        assert!(!lower.contains(" style="), "inline style attribute");
        // No `on...=` event handler attribute anywhere.
        for (i, _) in lower.match_indices(" on") {
            let rest = &lower[i + 3..];
            let name_len = rest.bytes().take_while(u8::is_ascii_lowercase).count();
            assert!(
                !(name_len > 0 && rest[name_len..].starts_with('=')),
                "inline event handler at byte {i}"
            );
        }
        for page in [INDEX_HTML, APP_JS, APP_CSS] {
            assert!(
                !page.contains("http://") && !page.contains("https://"),
                "external URL"
            );
            assert!(!page.contains("//cdn"), "CDN");
        }
        assert!(lower.contains(r#"<script src="/app.js""#));
    }

    #[test]
    fn the_script_never_writes_markup() {
        for sink in [
            "innerHTML",
            "outerHTML",
            "insertAdjacentHTML",
            "document.write",
            "eval(",
            "new Function",
        ] {
            assert!(!APP_JS.contains(sink), "{sink}");
        }
        assert!(APP_JS.contains("sessionStorage"));
        assert!(!APP_JS.contains("localStorage"));
    }

    #[test]
    fn a_host_header_that_could_change_the_policy_is_left_out() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("127.0.0.1:18789"));
        assert_eq!(sane_host(&h), Some("127.0.0.1:18789"));
        assert!(
            csp(sane_host(&h))
                .contains("connect-src 'self' ws://127.0.0.1:18789 wss://127.0.0.1:18789;")
        );
        h.insert(header::HOST, HeaderValue::from_static("a; script-src *"));
        assert_eq!(sane_host(&h), None);
        assert!(csp(None).contains("connect-src 'self';"));
    }
}
