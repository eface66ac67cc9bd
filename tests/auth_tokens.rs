//! Operator accounts and per-user API tokens through the real binary: `chitin users`,
//! `chitin tokens`, and a running gateway that decides each token's requests for its user.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

use std::path::Path;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

#[path = "support/gateway.rs"]
mod harness;
use harness::*;

const ENTITIES: &str = r#"[
  {"uid": {"type": "Chitin::Group", "id": "owners"}, "attrs": {}, "parents": []},
  {"uid": {"type": "Chitin::User", "id": "owner"}, "attrs": {}, "parents": [{"type": "Chitin::Group", "id": "owners"}]},
  {"uid": {"type": "Chitin::User", "id": "mallory"}, "attrs": {}, "parents": []}
]
"#;

fn prepare(home: &Path) {
    std::fs::write(home.join("entities.json"), ENTITIES).unwrap();
}

fn ok(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}: {}{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn issue(gw: &Gw, args: &[&str]) -> (String, String) {
    let mut a = vec!["tokens", "issue"];
    a.extend_from_slice(args);
    let text = ok(&gw.chitin(&a));
    let lines: Vec<&str> = text.lines().collect();
    let token = lines.last().unwrap().to_string();
    assert!(
        token.starts_with("cht_"),
        "the token alone on the last line: {text}"
    );
    assert!(!token.contains(' '));
    let id = token[4..20].to_string();
    (id, token)
}

fn invoke_as(gw: &Gw, token: &str) -> Resp {
    gw.try_req(
        "POST",
        "/tools/invoke",
        &[
            ("Authorization", &format!("Bearer {token}")),
            ("Content-Type", "application/json"),
        ],
        json!({"tool": "list_dir", "args": {"path": "."}})
            .to_string()
            .as_bytes(),
    )
    .unwrap()
}

/// The `connect` answer of a WebSocket connection that presents `token`.
fn ws_connect(port: u16, token: &str) -> Value {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{port}/ws"))
            .await
            .unwrap();
        let req = json!({"type": "req", "id": 1, "method": "connect", "params": {"token": token}});
        ws.send(Message::Text(req.to_string().into()))
            .await
            .unwrap();
        loop {
            let m = ws.next().await.unwrap().unwrap();
            if let Message::Text(t) = m {
                return serde_json::from_str(t.as_str()).unwrap();
            }
        }
    })
}

#[test]
fn users_and_tokens_are_managed_from_the_cli_and_each_token_is_decided_as_its_own_user() {
    let gw = Gw::start_custom(free_port(), "", false, prepare);
    std::fs::create_dir_all(gw.workspace()).unwrap();

    let added = ok(&gw.chitin(&["users", "add", "alice", "--group", "owners"]));
    assert_eq!(added.trim(), "added user alice (groups: owners)");
    let added = ok(&gw.chitin(&["users", "add", "bob"]));
    assert_eq!(added.trim(), "added user bob (groups: none)");
    // A user of entities.json is the file's.
    let file_user = gw.chitin(&["users", "add", "owner", "--group", "staff"]);
    assert_eq!(file_user.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&file_user.stderr).contains("defined in the entity files"),
        "{}",
        String::from_utf8_lossy(&file_user.stderr)
    );
    let list: Value = serde_json::from_str(&ok(&gw.chitin(&["users", "list", "--json"]))).unwrap();
    let by = |u: &str| {
        list.as_array()
            .unwrap()
            .iter()
            .find(|x| x["user"] == u)
            .cloned()
            .unwrap()
    };
    assert_eq!(by("alice")["groups"], json!(["owners"]));
    assert_eq!(by("alice")["source"], "cli");
    assert_eq!(by("bob")["groups"], json!([]));
    assert_eq!(by("owner")["source"], "entities.json");
    assert_eq!(by("owner")["groups"], json!(["owners"]));

    let (alice_id, alice) = issue(&gw, &["--user", "alice", "--name", "laptop"]);
    let (bob_id, bob) = issue(&gw, &["--user", "bob", "--expires", "30d"]);
    let unknown = gw.chitin(&["tokens", "issue", "--user", "nobody"]);
    assert_eq!(unknown.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("no user `nobody`"));

    // Stored hashed: the secret part is nowhere in state.db.
    let secret = &bob[21..];
    for f in ["state.db", "state.db-wal"] {
        if let Ok(bytes) = std::fs::read(gw.home.join(f)) {
            assert!(
                !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
                "{f} holds the token"
            );
        }
    }
    let tokens: Value =
        serde_json::from_str(&ok(&gw.chitin(&["tokens", "list", "--json"]))).unwrap();
    let arr = tokens.as_array().unwrap();
    assert_eq!(arr.len(), 2);
    let t = arr.iter().find(|t| t["id"] == bob_id.as_str()).unwrap();
    assert_eq!(t["user"], "bob");
    assert!(t["expires_ms"].as_i64().unwrap() > 0);
    assert_eq!(t["expired"], false);
    let laptop = arr.iter().find(|t| t["id"] == alice_id.as_str()).unwrap();
    assert_eq!(laptop["name"], "laptop");
    assert!(!tokens.to_string().contains(secret));

    // alice (owners) may list the workspace; bob is decided as bob: denied.
    let r = invoke_as(&gw, &alice);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.json()["decision"]["policies"],
        json!(["tools.owner-files-in-workspace"])
    );
    let r = invoke_as(&gw, &bob);
    assert_eq!(r.status, 403, "{}", r.body);
    assert_eq!(r.json()["error"]["code"], "policy_denied");
    assert_eq!(r.json()["error"]["policies"], json!([]));
    let audit = ok(&gw.chitin(&[
        "audit",
        "query",
        "--actor",
        "Chitin::User::\"bob\"",
        "--json",
    ]));
    assert!(
        audit.contains("list_dir") && audit.contains("deny"),
        "{audit}"
    );

    // The WebSocket connects as the token's user.
    let c = ws_connect(gw.port, &bob);
    assert_eq!(c["ok"], true, "{c}");
    assert_eq!(c["payload"]["user"], "bob");
    let c = ws_connect(gw.port, &gw.token);
    assert_eq!(c["payload"]["user"], "owner");

    // Revoked: refused at once.
    let out = ok(&gw.chitin(&["tokens", "revoke", &bob_id]));
    assert_eq!(out.trim(), format!("revoked API token {bob_id} (user bob)"));
    let r = invoke_as(&gw, &bob);
    assert_eq!(r.status, 401, "{}", r.body);
    let c = ws_connect(gw.port, &bob);
    assert_eq!(c["ok"], false);
    assert_eq!(c["error"]["code"], "unauthorized");

    // Someone outside `owners` may not issue tokens or add users.
    let other = gw.root.join("mallory.toml");
    let text = std::fs::read_to_string(gw.home.join("chitin.toml")).unwrap();
    std::fs::write(&other, format!("{text}\n[cli]\noperator = \"mallory\"\n")).unwrap();
    let cfg = other.to_str().unwrap();
    let denied = gw.chitin(&["--config", cfg, "tokens", "issue", "--user", "mallory"]);
    assert_eq!(denied.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&denied.stdout).trim(),
        "refused: policy denied `token.manage` for Chitin::User::\"mallory\" (determining policies: [])"
    );
    let denied = gw.chitin(&["--config", cfg, "users", "add", "eve", "--group", "owners"]);
    assert_eq!(denied.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&denied.stdout).starts_with("refused: policy denied `user.manage`")
    );

    // Removing a user revokes its tokens.
    let out = ok(&gw.chitin(&["users", "remove", "alice"]));
    assert_eq!(
        out.trim(),
        "removed user alice (1 API tokens revoked, 0 sessions ended, 0 devices removed)"
    );
    assert_eq!(invoke_as(&gw, &alice).status, 401);
    let list = ok(&gw.chitin(&["users", "list", "--json"]));
    assert!(!list.contains("\"alice\""), "{list}");

    // Every step is in the audit log.
    let audit = ok(&gw.chitin(&["audit", "query", "--json"]));
    for action in ["user.add", "token.issue", "token.revoke", "user.remove"] {
        assert!(audit.contains(action), "{action} audited");
    }
}

#[test]
fn an_expired_token_is_refused_and_listed_as_expired() {
    let gw = Gw::start_custom(free_port(), "", false, prepare);
    ok(&gw.chitin(&["users", "add", "carol", "--group", "owners"]));
    let (id, token) = issue(&gw, &["--user", "carol", "--expires", "2s"]);
    let r = gw
        .try_req(
            "GET",
            "/metrics",
            &[("Authorization", &format!("Bearer {token}"))],
            b"",
        )
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    // Wait for the expiry to pass (a condition, polled with a generous deadline).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = gw
            .try_req(
                "GET",
                "/metrics",
                &[("Authorization", &format!("Bearer {token}"))],
                b"",
            )
            .unwrap();
        if r.status == 401 {
            break;
        }
        assert!(Instant::now() < deadline, "the token never expired");
        std::thread::sleep(Duration::from_millis(200));
    }
    let tokens: Value =
        serde_json::from_str(&ok(&gw.chitin(&["tokens", "list", "--json"]))).unwrap();
    let t = tokens
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["id"] == id.as_str())
        .unwrap()
        .clone();
    assert_eq!(t["expired"], true);
}
