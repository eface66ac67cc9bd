//! The Control UI (`/control`) in a real browser: headless Chromium against the real gateway
//! binary with its agent on a fake model. A person signs in with the token, opens a session
//! and its run, approves a call on the Approvals page with its full arguments on screen (at
//! phone width), explains a policy decision and reads the usage. A person outside `owners`
//! signs in with single sign-on (the fake issuer of `support/oidc.rs`), sees only their own
//! sessions and is refused another user's approval in words. A failing step leaves a
//! screenshot in `target/browser-artifacts/`.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use futures_util::FutureExt;
use serde_json::{Value, json};

#[path = "support/cdp.rs"]
mod cdp;
#[path = "support/gateway.rs"]
mod harness;
#[path = "support/oidc.rs"]
mod oidc;

use cdp::{Cdp, js};
use harness::Gw;

/// The browser client, shared with the failure report.
type Shared = Arc<tokio::sync::Mutex<Cdp>>;

/// Runs `steps`; on a failure saves a screenshot named `name` and fails with the step's
/// message. (The steps hold the client's lock; a panic releases it.)
async fn with_screenshot(cdp: &Shared, name: &str, steps: impl std::future::Future<Output = ()>) {
    if let Err(panic) = AssertUnwindSafe(steps).catch_unwind().await {
        let shot = cdp.lock().await.screenshot(name).await;
        eprintln!("screenshot of the failure: {shot:?}");
        std::panic::resume_unwind(panic);
    }
}

/// Installed in the control page: the page's first plain audit load (`/api/v1/audit?`
/// without `action=` or `kind=`) is answered only after `chitinTest.release()`; `asked` says it was
/// made, `delivered` that its answer has been handed to the page and the page's own handling
/// of it (microtasks, which run before the timer) is over.
const HOLD_UNFILTERED_AUDIT: &str = r#"(() => {
  const real = window.fetch.bind(window);
  let release;
  const gate = new Promise((r) => { release = r; });
  window.chitinTest = { asked: false, delivered: false, release: () => { release(); return true; } };
  window.fetch = async (url, init) => {
    const u = String(url);
    if (!u.startsWith('/api/v1/audit?') || u.includes('action=') || u.includes('kind=') || window.chitinTest.asked) return real(url, init);
    window.chitinTest.asked = true;
    const resp = await real(url, init);
    const data = await resp.json();
    await gate;
    return {
      ok: resp.ok,
      status: resp.status,
      json: async () => {
        setTimeout(() => { window.chitinTest.delivered = true; }, 0);
        return data;
      },
    };
  };
  return true;
})()"#;

fn json_get(gw: &Gw, path: &str) -> Value {
    let r = gw.get(path);
    assert_eq!(r.status, 200, "{path}: {}", r.body);
    r.json()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_person_signs_in_sees_a_session_approves_with_full_arguments_explains_and_reads_usage() {
    use chitin::providers::testing::{FakeOpenAi, Reply, Step};
    let fake = FakeOpenAi::start(vec![
        Step::Reply(
            Reply::text(["Looking."])
                .tool_call("c1", "list_dir", r#"{"path": "."}"#, 1)
                .usage(1000, 100),
        ),
        Step::Reply(Reply::text(["Nothing there."]).usage(2000, 50)),
    ])
    .await
    .unwrap();
    let cfg = format!(
        "\n[agent]\nmodel = \"fake/m1\"\n\n[[providers]]\nname = \"fake\"\nkind = \"openai\"\nbase_url = \"{}\"\n\n[pricing]\n\"fake/m1\" = {{ input_per_mtok = 3.0, output_per_mtok = 15.0 }}\n",
        fake.base_url()
    );
    let gw = tokio::task::spawn_blocking(move || {
        let gw = Gw::start(&cfg);
        let r = gw
            .try_req(
                "POST",
                "/v1/chat/completions",
                &[("Authorization", &gw.bearer()), ("Content-Type", "application/json")],
                json!({"model": "chitin", "user": "t1", "messages": [{"role": "user", "content": "what is here?"}]})
                    .to_string()
                    .as_bytes(),
            )
            .unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
        gw
    })
    .await
    .unwrap();
    // An approval whose stdin is too large for a summary, with a bidi override in it.
    let stdin = format!(
        "BEGIN\u{202e}{}MIDDLE-MARKER{}END",
        "y".repeat(2000),
        "z".repeat(2000)
    );
    let call = json!({"tool": "exec", "args": {"argv": ["touch", "browser-approved"], "network": ["127.0.0.1:9"], "stdin": stdin}, "session": "ops"});
    let r = gw.invoke(&call);
    assert_eq!(r.status, 202, "{}", r.body);
    let approval_id = r.json()["approval"]["id"].as_str().unwrap().to_string();

    let browser = tokio::task::spawn_blocking(cdp::launch).await.unwrap();
    let client: Shared = Arc::new(tokio::sync::Mutex::new(
        Cdp::connect(&browser.endpoint).await,
    ));
    let port = gw.port;
    let token = gw.token.clone();
    let stdin2 = stdin.clone();
    let c2 = Arc::clone(&client);
    with_screenshot(&client, "control-ui", async move {
        let mut guard = c2.lock().await;
        let cdp = &mut *guard;
        cdp.open(&format!("http://127.0.0.1:{port}/control#sessions"))
            .await;
        // Not signed in: the sign-in form, nothing else.
        cdp.wait_for("!document.getElementById('login').hidden", "the sign-in form")
            .await;
        cdp.eval(&format!(
            "document.getElementById('token').value = {}; document.getElementById('signin').click(); true",
            js(&token)
        ))
        .await;

        // Sessions: the turn's session, then its run with the tool call and decision.
        cdp.wait_for(
            "!!document.querySelector('#sessions-table tr[data-key=\"api:t1\"]')",
            "the session in the list",
        )
        .await;
        let row = cdp
            .eval("Array.from(document.querySelectorAll('#sessions-table tr[data-key=\"api:t1\"] td')).map(t => t.textContent)")
            .await;
        assert_eq!(row[0], "api:t1");
        assert_eq!(row[1], "owner");
        assert_eq!(row[2], "api");
        assert_eq!(row[4], "0.0112");
        let storage = cdp
            .eval("[sessionStorage.getItem('chitin.token') !== null, localStorage.length, document.getElementById('token').value]")
            .await;
        assert_eq!(storage, json!([true, 0, ""]));
        cdp.eval("document.querySelector('#sessions-table tr[data-key=\"api:t1\"] button').click(); true")
            .await;
        cdp.wait_for(
            "!document.getElementById('session-detail').hidden && document.querySelectorAll('#session-runs .tool').length > 0",
            "the session's run",
        )
        .await;
        let tool = cdp
            .eval("(() => { const t = document.querySelector('#session-runs .tool'); return [t.querySelector('.tool-name').textContent, t.dataset.decision, t.querySelector('.tool-args').textContent]; })()")
            .await;
        assert_eq!(tool, json!(["list_dir", "allow", "{\"path\": \".\"}"]));
        let transcript = cdp
            .eval("document.getElementById('session-messages').textContent")
            .await;
        assert!(transcript.as_str().unwrap().contains("what is here?"), "{transcript}");
        assert!(transcript.as_str().unwrap().contains("Nothing there."), "{transcript}");

        // Approvals at phone width: the whole request on the page, then approve.
        cdp.call(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": 390, "height": 844, "deviceScaleFactor": 1, "mobile": true}),
        )
        .await;
        cdp.eval("location.hash = '#approvals'; true").await;
        cdp.wait_for(
            "!!document.querySelector('.approval[data-status=\"pending\"] button.approve')",
            "the pending approval",
        )
        .await;
        let fields = cdp
            .eval("Array.from(document.querySelectorAll('.approval[data-status=\"pending\"] .fields dt')).map(d => d.textContent)")
            .await;
        assert_eq!(
            fields,
            json!(["argv[0]", "argv[1]", "cwd", "network[0]", "stdin", "timeout_secs", "resolved.cwd", "resolved.command_path"])
        );
        let shown = cdp
            .eval("(() => { const v = document.querySelectorAll('.approval[data-status=\"pending\"] .field-value'); return [v[4].textContent, v[4].dataset.complete, v[1].textContent]; })()")
            .await;
        assert_eq!(shown[0], json!(chitin::approvals::exact(&stdin2)));
        assert!(shown[0].as_str().unwrap().contains("MIDDLE-MARKER"));
        assert!(!shown[0].as_str().unwrap().contains('\u{202e}'));
        assert_eq!(shown[1], "true");
        assert_eq!(shown[2], "browser-approved");
        let overflow = cdp
            .eval("document.documentElement.scrollWidth <= window.innerWidth + 1")
            .await;
        assert_eq!(overflow, true, "the approvals page fits a phone's width");
        // Keyboard: the approve button takes focus and Enter is a click on a button.
        cdp.eval("(() => { const b = document.querySelector('.approval[data-status=\"pending\"] button.approve'); b.focus(); return document.activeElement === b; })()")
            .await;
        cdp.eval("document.activeElement.click(); true").await;
        cdp.wait_for(
            "(document.querySelector('#approvals-list .note') || {}).textContent",
            "the approval's confirmation",
        )
        .await;
        let note = cdp
            .eval("document.querySelector('#approvals-list .note').textContent")
            .await;
        assert!(note.as_str().unwrap().ends_with(" approved."), "{note}");
        cdp.call("Emulation.clearDeviceMetricsOverride", json!({})).await;

        // Policy: explain a request; the decision and the determining policy with its reason.
        cdp.eval("location.hash = '#policy'; true").await;
        cdp.wait_for(
            "document.querySelectorAll('#policy-list .policy').length > 0",
            "the policy list",
        )
        .await;
        cdp.eval("document.getElementById('explain-action').value = 'Chitin::Action::\"usage.read\"'; document.getElementById('explain-resource').value = 'Chitin::Gateway::\"gateway\"'; document.getElementById('explain-run').click(); true")
            .await;
        cdp.wait_for(
            "document.getElementById('explain-decision').textContent",
            "the explanation",
        )
        .await;
        let explained = cdp
            .eval("[document.getElementById('explain-decision').textContent, document.querySelector('#explain-policies li').textContent]")
            .await;
        assert_eq!(explained[0], "allow");
        assert!(
            explained[1].as_str().unwrap().starts_with("control.owners (permit): Owners may see usage"),
            "{explained}"
        );
        // Start from a recent decision: the exec call that asked for approval, explained
        // again against the active policies.
        cdp.eval("document.getElementById('explain-recent-load').click(); true")
            .await;
        let picked = cdp
            .wait_for(
                "(() => { const o = Array.from(document.querySelectorAll('#explain-recent option')).find(o => o.textContent.includes('approval_required: Chitin::User::\"owner\" exec')); if (!o) return ''; const s = document.getElementById('explain-recent'); s.value = o.value; s.dispatchEvent(new Event('change')); return o.value; })()",
                "a recent exec decision",
            )
            .await;
        assert!(picked.as_str().unwrap().parse::<i64>().is_ok(), "{picked}");
        cdp.eval("document.getElementById('explain-decision').textContent = ''; document.getElementById('explain-run').click(); true")
            .await;
        cdp.wait_for(
            "document.getElementById('explain-decision').textContent",
            "the explanation of the recorded decision",
        )
        .await;
        let again = cdp
            .eval("[document.getElementById('explain-decision').textContent, document.getElementById('explain-action').value, document.getElementById('explain-policies').textContent]")
            .await;
        assert_eq!(again[0], "approval_required", "{again}");
        assert_eq!(again[1], "Chitin::Action::\"exec\"");
        assert!(again[2].as_str().unwrap().contains("tools.owner-exec-network-approved"), "{again}");
        // A malformed request is explained in words, not a crash.
        cdp.eval("document.getElementById('explain-context').value = '{not json'; document.getElementById('explain-run').click(); true")
            .await;
        cdp.wait_for(
            "!document.getElementById('error').hidden",
            "the error message",
        )
        .await;
        let err = cdp.eval("document.getElementById('error').textContent").await;
        assert!(err.as_str().unwrap().starts_with("The context is not valid JSON"), "{err}");

        // Usage by model.
        cdp.eval("location.hash = '#usage'; true").await;
        cdp.wait_for(
            "document.querySelectorAll('#usage-table tbody tr').length > 0",
            "the usage table",
        )
        .await;
        cdp.eval("document.getElementById('usage-by').value = 'model'; document.getElementById('usage-load').click(); true")
            .await;
        cdp.wait_for(
            "document.getElementById('usage-key').textContent === 'model'",
            "usage by model",
        )
        .await;
        let usage = cdp
            .eval("Array.from(document.querySelectorAll('#usage-table tbody tr td')).map(t => t.textContent)")
            .await;
        assert_eq!(usage[0], "fake/m1");
        assert_eq!(usage[1], "0.0112");
        assert_eq!(usage[2], "2");

        // Audit: the approval's steps are in the log; one record's detail; the chain verifies.
        // Opening the page loads it unfiltered; a search right after must win even when that
        // first answer comes last (on a loaded machine it sometimes did, and replaced the
        // search's rows). The page's fetch holds the unfiltered answer until the search has
        // rendered, then lets it through: the search's rows stay.
        cdp.eval(HOLD_UNFILTERED_AUDIT).await;
        cdp.eval("location.hash = '#audit'; true").await;
        cdp.wait_for("window.chitinTest.asked", "the page's own unfiltered load")
            .await;
        cdp.eval("document.getElementById('audit-action').value = 'exec'; document.getElementById('audit-decision').value = 'approval_required'; document.getElementById('audit-search').click(); true")
            .await;
        let only_exec_approvals = "document.querySelectorAll('#audit-table tbody tr[data-decision=\"approval_required\"]').length > 0 && Array.from(document.querySelectorAll('#audit-table tbody tr')).every(t => t.dataset.decision === 'approval_required')";
        cdp.wait_for(only_exec_approvals, "the exec decisions").await;
        cdp.eval("window.chitinTest.release()").await;
        cdp.wait_for("window.chitinTest.delivered", "the late unfiltered answer")
            .await;
        assert_eq!(
            cdp.eval(only_exec_approvals).await,
            true,
            "the late unfiltered answer replaced the search's rows"
        );
        cdp.eval("document.querySelector('#audit-table tbody tr button').click(); true")
            .await;
        cdp.wait_for("!document.getElementById('audit-detail').hidden", "the record")
            .await;
        let rec: Value = serde_json::from_str(
            cdp.eval("document.getElementById('audit-detail').textContent")
                .await
                .as_str()
                .unwrap(),
        )
        .unwrap();
        assert_eq!(rec["action"], "exec");
        assert_eq!(rec["prev_hash"].as_str().unwrap().len(), 64);
        cdp.eval("document.getElementById('audit-verify').click(); true")
            .await;
        cdp.wait_for(
            "document.getElementById('audit-verify-status').dataset.ok",
            "the verification",
        )
        .await;
        let verified = cdp
            .eval("document.getElementById('audit-verify-status').textContent")
            .await;
        assert!(
            verified.as_str().unwrap().starts_with("Chain verified: ok: "),
            "{verified}"
        );

        // Health.
        cdp.eval("location.hash = '#health'; true").await;
        cdp.wait_for(
            "document.getElementById('health-summary').textContent.includes('Chitin ')",
            "the health summary",
        )
        .await;
    })
    .await;

    // The approval made in the page is the one the API and the CLI see, bound to the call.
    let a = json_get(&gw, &format!("/api/v1/approvals/{approval_id}"));
    assert_eq!(a["approval"]["status"], "granted");
    assert_eq!(a["approval"]["resolved_by"], "owner");
    assert!(!gw.workspace().join("browser-approved").exists());
    let ran = gw.invoke(&call);
    assert_eq!(ran.status, 200, "{}", ran.body);
    assert!(gw.workspace().join("browser-approved").exists());
    drop(browser);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_token_on_the_control_page_is_refused_in_plain_words() {
    let gw = tokio::task::spawn_blocking(|| Gw::start("")).await.unwrap();
    let browser = tokio::task::spawn_blocking(cdp::launch).await.unwrap();
    let client: Shared = Arc::new(tokio::sync::Mutex::new(
        Cdp::connect(&browser.endpoint).await,
    ));
    let port = gw.port;
    let c2 = Arc::clone(&client);
    with_screenshot(&client, "control-ui-wrong-token", async move {
        let mut guard = c2.lock().await;
        let cdp = &mut *guard;
        cdp.open(&format!("http://127.0.0.1:{port}/control#health"))
            .await;
        cdp.wait_for("!document.getElementById('login').hidden", "the sign-in form")
            .await;
        cdp.eval("document.getElementById('token').value = 'wrong'; document.getElementById('signin').click(); true")
            .await;
        cdp.wait_for("!document.getElementById('error').hidden", "the refusal")
            .await;
        let r = cdp
            .eval("[document.getElementById('error').textContent, sessionStorage.getItem('chitin.token'), document.getElementById('login').hidden]")
            .await;
        assert_eq!(
            r,
            json!(["Not signed in: the token is not the gateway token", null, false])
        );
    })
    .await;
    drop(browser);
}

/// The test's policies: the defaults, plus a `team` whose members may use the model, may open
/// one session of someone else in the Control UI (not list them), and may never decide an
/// approval.
const TEAM_POLICIES: &str = r#"
@id("test.team-model-calls")
@reason("The team may use the assistant.")
permit (principal in Chitin::Group::"team", action == Chitin::Action::"model.call", resource);

@id("test.team-opens-one-session")
@reason("The team may open a session someone shows them in the Control UI, but not list other people's sessions.")
permit (principal in Chitin::Group::"team", action == Chitin::Action::"session.read", resource is Chitin::Session)
when { context.origin == "control" && context.op == "read" };

@id("test.only-owners-approve")
@reason("Only owners decide approvals.")
forbid (principal, action == Chitin::Action::"approval.grant", resource)
unless { principal in Chitin::Group::"owners" };
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_owner_signs_in_with_sso_sees_only_their_sessions_and_is_refused_another_users_approval_in_words()
 {
    use chitin::providers::testing::{FakeOpenAi, Reply, Step};
    let fake = FakeOpenAi::start(vec![]).await.unwrap();
    fake.set_fallback(Step::Reply(Reply::text(["Hello."]).usage(10, 1)));
    let idp = tokio::task::spawn_blocking(oidc::FakeIssuer::start)
        .await
        .unwrap();
    idp.set(|b| {
        b.email = "carol@example.com".into();
        b.groups = vec!["team".into()];
    });
    let keep = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let dir = keep.path().join("policies");
    std::fs::create_dir(&dir).unwrap();
    for e in
        std::fs::read_dir(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/default"))
            .unwrap()
    {
        let e = e.unwrap();
        std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
    }
    std::fs::write(dir.join("zz-team.cedar"), TEAM_POLICIES).unwrap();
    let port = harness::free_port();
    let cfg = format!(
        "\n[agent]\nmodel = \"fake/m1\"\n\n[[providers]]\nname = \"fake\"\nkind = \"openai\"\nbase_url = \"{}\"\n\n[policy]\ndir = {:?}\n\n[auth.oidc]\nissuer = \"{}\"\nclient_id = \"{}\"\nredirect_uri = \"http://127.0.0.1:{port}/auth/callback\"\n",
        fake.base_url(),
        dir.display().to_string(),
        idp.issuer(),
        oidc::CLIENT_ID,
    );
    let gw = tokio::task::spawn_blocking(move || {
        let gw = harness::Gw::start_custom(port, &cfg, false, |_| {});
        // The owner's session and an approval the owner asked for.
        let r = gw
            .try_req(
                "POST",
                "/v1/chat/completions",
                &[("Authorization", &gw.bearer()), ("Content-Type", "application/json")],
                json!({"model": "chitin", "user": "o1", "messages": [{"role": "user", "content": "hello"}]})
                    .to_string()
                    .as_bytes(),
            )
            .unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
        gw
    })
    .await
    .unwrap();
    let r = gw.invoke(&json!({"tool": "exec", "args": {"argv": ["touch", "never"], "network": ["127.0.0.1:9"]}, "session": "ops"}));
    assert_eq!(r.status, 202, "{}", r.body);
    let approval_id = r.json()["approval"]["id"].as_str().unwrap().to_string();
    let gw = Arc::new(gw);

    let browser = tokio::task::spawn_blocking(cdp::launch).await.unwrap();
    let client: Shared = Arc::new(tokio::sync::Mutex::new(
        Cdp::connect(&browser.endpoint).await,
    ));
    let c2 = Arc::clone(&client);
    let gw2 = Arc::clone(&gw);
    let id2 = approval_id.clone();
    with_screenshot(&client, "control-ui-non-owner", async move {
        let gw = gw2;
        let mut guard = c2.lock().await;
        let cdp = &mut *guard;
        cdp.open(&format!("http://127.0.0.1:{port}/control#sessions"))
            .await;
        // Single sign-on is configured: the SSO link next to the owner's token form.
        cdp.wait_for(
            "!document.getElementById('login').hidden && !document.getElementById('sso').hidden",
            "the sign-in form with the SSO link",
        )
        .await;
        let offered = cdp
            .eval("(() => { const a = document.getElementById('sso-link'); const t = document.getElementById('token'); return [a.textContent, a.getAttribute('href'), t.offsetParent !== null]; })()")
            .await;
        assert_eq!(offered, json!(["Sign in with SSO", "/auth/login", true]));
        // Follow it: the issuer signs carol in and sends the browser back.
        cdp.eval("document.getElementById('sso-link').click(); true").await;
        let g = Arc::clone(&gw);
        tokio::task::spawn_blocking(move || {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(90);
            loop {
                let out = g.chitin(&["users", "list", "--json"]);
                let users: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
                let signed_in = users.as_array().is_some_and(|l| {
                    l.iter()
                        .any(|u| u["user"] == "carol@example.com" && u["sessions"] == 1)
                });
                if signed_in {
                    break;
                }
                assert!(std::time::Instant::now() < deadline, "carol never signed in: {users}");
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            // Her own session, through an API token of hers.
            let out = g.chitin(&["tokens", "issue", "--user", "carol@example.com"]);
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            let token = String::from_utf8_lossy(&out.stdout).lines().last().unwrap().trim().to_string();
            let r = g
                .try_req(
                    "POST",
                    "/v1/chat/completions",
                    &[("Authorization", &format!("Bearer {token}")), ("Content-Type", "application/json")],
                    json!({"model": "chitin", "user": "c1", "messages": [{"role": "user", "content": "hi"}]})
                        .to_string()
                        .as_bytes(),
                )
                .unwrap();
            assert_eq!(r.status, 200, "{}", r.body);
        })
        .await
        .unwrap();

        // The chat page connects as her without a token (the session cookie goes with the
        // WebSocket upgrade).
        cdp.open(&format!("http://127.0.0.1:{port}/")).await;
        cdp.wait_for(
            "document.getElementById('status').dataset.state === 'connected'",
            "the chat page connected",
        )
        .await;
        let status = cdp.eval("document.getElementById('status').textContent").await;
        assert_eq!(status, "connected as carol@example.com");

        // The Control page takes up the browser's session: no token asked for.
        cdp.open(&format!("http://127.0.0.1:{port}/control#sessions"))
            .await;
        cdp.wait_for(
            "!document.getElementById('whoami').hidden && document.getElementById('login').hidden",
            "the signed-in page",
        )
        .await;
        let who = cdp.eval("document.getElementById('whoami-user').textContent").await;
        assert_eq!(who, "Signed in as carol@example.com");
        cdp.wait_for(
            "document.querySelectorAll('#sessions-table tbody tr').length > 0",
            "carol's session",
        )
        .await;
        let users = cdp
            .eval("Array.from(document.querySelectorAll('#sessions-table tbody tr')).map(t => t.children[1].textContent)")
            .await;
        assert_eq!(users, json!(["carol@example.com"]), "only her own session");
        let stored = cdp
            .eval("[sessionStorage.getItem('chitin.token'), document.cookie]")
            .await;
        assert_eq!(stored, json!([null, ""]), "no token stored; the session cookie is HttpOnly");

        // The owner's approval is not in her list; opened by its id, deciding it is refused.
        cdp.eval("location.hash = '#approvals'; true").await;
        cdp.wait_for(
            "!document.getElementById('approvals-empty').hidden",
            "her (empty) approvals list",
        )
        .await;
        cdp.eval(&format!(
            "document.getElementById('approval-id').value = {}; document.getElementById('approval-open').click(); true",
            js(&id2)
        ))
        .await;
        cdp.wait_for(
            "!!document.querySelector('#approval-opened .approval[data-status=\"pending\"] button.approve')",
            "the opened approval",
        )
        .await;
        cdp.eval("document.querySelector('#approval-opened button.approve').click(); true")
            .await;
        cdp.wait_for("!document.getElementById('error').hidden", "the refusal")
            .await;
        let err = cdp.eval("document.getElementById('error').textContent").await;
        assert_eq!(
            err,
            "Refused by policy: policy denied `approval.grant` for Chitin::User::\"carol@example.com\"; ask an owner to change the policies (policies: test.only-owners-approve)"
        );

        // Signing out ends the session: the sign-in form again.
        cdp.eval("location.hash = '#sessions'; true").await;
        cdp.eval("document.getElementById('signout').click(); true").await;
        cdp.wait_for(
            "!document.getElementById('login').hidden && document.getElementById('whoami').hidden",
            "the sign-in form after signing out",
        )
        .await;
    })
    .await;

    // Nothing was decided, and the refusal is in the audit log with the policy.
    let a = json_get(&gw, &format!("/api/v1/approvals/{approval_id}"));
    assert_eq!(a["approval"]["status"], "pending");
    let recs = json_get(
        &gw,
        "/api/v1/audit?action=approval.grant&actor=Chitin::User::%22carol@example.com%22",
    );
    assert_eq!(recs["records"][0]["decision"], "deny", "{recs}");
    assert_eq!(
        recs["records"][0]["policies"],
        json!(["test.only-owners-approve"])
    );
    let users: Value =
        serde_json::from_slice(&gw.chitin(&["users", "list", "--json"]).stdout).unwrap();
    let carol = users
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["user"] == "carol@example.com")
        .unwrap()
        .clone();
    assert_eq!(carol["sessions"], 0, "signed out: {carol}");
    drop(browser);
}
