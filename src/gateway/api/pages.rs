//! The Control UI page at `GET /control`: one HTML document with a view per part (sessions,
//! approvals, audit, policy, usage, channels and pairing, health), its script and stylesheet,
//! compiled into the binary and served (by the chat page's helpers, `gateway::web`) with the
//! chat page's strict Content-Security-Policy (no inline script or style, no external
//! resource, connections only to the gateway). The page signs in with the gateway token (kept
//! in `sessionStorage`, shared with the chat page) or a browser session from single sign-on
//! (the SSO link is offered when `[auth.oidc]` is configured), calls the JSON API, and
//! renders every server text with `textContent`.

use std::sync::Arc;

use axum::Router;
use axum::response::Response;
use axum::routing::get;

use super::App;
use crate::gateway::web::{asset, html_page};

pub const CONTROL_HTML: &str = include_str!("../web/control.html");
pub const CONTROL_JS: &str = include_str!("../web/control.js");
pub const CONTROL_CSS: &str = include_str!("../web/control.css");

pub(super) fn routes() -> Router<Arc<App>> {
    Router::new()
        .route("/control", get(index))
        .route(
            "/control.js",
            get(|| async { asset(CONTROL_JS, "text/javascript; charset=utf-8") }),
        )
        .route(
            "/control.css",
            get(|| async { asset(CONTROL_CSS, "text/css; charset=utf-8") }),
        )
}

async fn index() -> Response {
    // The page talks to the API over fetch only (no WebSocket): `connect-src 'self'`.
    html_page(CONTROL_HTML, &crate::gateway::web::csp(None))
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
    fn the_control_page_has_no_inline_script_or_style_and_no_external_resource() {
        let lower = CONTROL_HTML.to_ascii_lowercase();
        assert!(!lower.contains("<script>"), "inline script");
        assert!(!lower.contains("<style"), "inline style");
        assert!(!lower.contains(" style="), "inline style attribute");
        for (i, _) in lower.match_indices(" on") {
            let rest = &lower[i + 3..];
            let name_len = rest.bytes().take_while(u8::is_ascii_lowercase).count();
            assert!(
                !(name_len > 0 && rest[name_len..].starts_with('=')),
                "inline event handler at byte {i}"
            );
        }
        for page in [CONTROL_HTML, CONTROL_JS, CONTROL_CSS] {
            assert!(
                !page.contains("http://") && !page.contains("https://"),
                "external URL"
            );
        }
        assert!(lower.contains(r#"<script src="/control.js""#));
    }

    #[test]
    fn the_control_script_never_writes_markup_and_keeps_the_token_per_tab() {
        for sink in [
            "innerHTML",
            "outerHTML",
            "insertAdjacentHTML",
            "document.write",
            "eval(",
            "new Function",
        ] {
            assert!(!CONTROL_JS.contains(sink), "{sink}");
        }
        assert!(CONTROL_JS.contains("sessionStorage"));
        assert!(!CONTROL_JS.contains("localStorage"));
    }

    #[test]
    fn the_control_page_is_served_with_a_strict_policy() {
        let csp = crate::gateway::web::csp(None);
        assert!(csp.contains("script-src 'self'"));
        assert!(csp.contains("connect-src 'self';"));
        assert!(csp.contains("frame-ancestors 'none'"));
    }
}
