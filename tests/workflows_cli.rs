//! `chitin workflow run --dry-run|graph`: every example under `examples/workflows/` loads,
//! graphs in all three formats (the same output twice) and dry-runs, as text and as Lobster's
//! envelope; bad files and arguments fail with the envelope's error types and exit codes. Real
//! runs: `tests/workflows_e2e.rs`.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed assertion is the report"
)]

use std::path::{Path, PathBuf};
use std::process::Output;

use serde_json::Value;

fn chitin(args: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_chitin"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("CHITIN_HOME", "/nonexistent/chitin-home-not-needed")
        .output()
        .unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8(o.stdout.clone()).unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8(o.stderr.clone()).unwrap()
}

/// The example files and the arguments each needs.
fn examples() -> Vec<(PathBuf, &'static str)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/workflows");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|f| {
            let args = match f.file_name().and_then(|n| n.to_str()) {
                Some("ci-triage.yaml") => r#"{"repo": "octo/app", "run_id": "123"}"#,
                Some("release-checks.json") => r#"{"version": "1.4.0"}"#,
                _ => "{}",
            };
            (f, args)
        })
        .collect()
}

#[test]
fn there_are_examples_in_every_syntax() {
    let names: Vec<String> = examples()
        .iter()
        .map(|(f, _)| f.extension().unwrap().to_string_lossy().to_string())
        .collect();
    assert!(names.len() >= 5, "{names:?}");
    for ext in ["lobster", "yaml", "json"] {
        assert!(
            names.iter().any(|n| n == ext),
            "no .{ext} example: {names:?}"
        );
    }
}

#[test]
fn every_example_graphs_in_every_format_the_same_way_twice() {
    for (file, _) in examples() {
        let f = file.to_str().unwrap();
        for (format, first_line) in [
            ("mermaid", "flowchart TD"),
            ("dot", "digraph workflow {"),
            ("ascii", "Workflow Graph"),
        ] {
            let a = chitin(&["workflow", "graph", f, "--format", format]);
            assert!(a.status.success(), "{f} {format}: {}", stderr(&a));
            let text = stdout(&a);
            assert!(text.contains(first_line), "{f} {format}:\n{text}");
            let b = chitin(&["workflow", "graph", f, "--format", format]);
            assert_eq!(text, stdout(&b), "{f} {format} is not deterministic");
        }
        let default = chitin(&["workflow", "graph", f]);
        assert!(stdout(&default).contains("flowchart TD"));
    }
}

#[test]
fn every_example_dry_runs_as_text_and_as_an_envelope() {
    for (file, args) in examples() {
        let f = file.to_str().unwrap();
        let text = chitin(&["workflow", "run", f, "--dry-run", "--args-json", args]);
        assert!(text.status.success(), "{f}: {}", stderr(&text));
        assert!(
            stdout(&text).starts_with("[DRY RUN] "),
            "{f}:\n{}",
            stdout(&text)
        );
        let json = chitin(&[
            "workflow",
            "run",
            f,
            "--dry-run",
            "--args-json",
            args,
            "--json",
        ]);
        assert!(json.status.success(), "{f}: {}", stderr(&json));
        let env: Value = serde_json::from_str(&stdout(&json)).unwrap();
        assert_eq!(env["protocolVersion"], 1);
        assert_eq!(env["ok"], true);
        assert_eq!(env["status"], "ok");
        assert_eq!(env["requiresApproval"], Value::Null);
        assert_eq!(env["requiresInput"], Value::Null);
        let output = env["output"].as_array().unwrap();
        assert!(!output.is_empty(), "{f}");
        assert!(
            output
                .iter()
                .all(|s| s["id"].is_string() && s["kind"].is_string())
        );
    }
}

#[test]
fn the_plan_quotes_arguments_and_shows_gates() {
    let o = chitin(&[
        "workflow",
        "run",
        "examples/workflows/ci-triage.yaml",
        "--dry-run",
        "--json",
        "--args-json",
        r#"{"repo": "octo/app", "run_id": "1; touch /tmp/pwned #"}"#,
    ]);
    let env: Value = serde_json::from_str(&stdout(&o)).unwrap();
    let steps = env["output"].as_array().unwrap();
    assert_eq!(
        steps[0]["run"],
        "gh run view '1; touch /tmp/pwned #' --repo 'octo/app' --json conclusion,name,headBranch,url"
    );
    assert_eq!(steps[1]["when"], "$run.json.conclusion == \"failure\"");
    assert_eq!(steps[3]["kind"], "input");
    assert_eq!(
        steps[3]["input"]["prompt"],
        "Which label should the issue get?"
    );
    assert_eq!(
        steps[4]["approval"]["prompt"],
        "File this CI failure as an issue?"
    );
}

#[test]
fn a_malformed_file_is_a_parse_error_with_its_position() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.lobster");
    std::fs::write(&file, "steps:\n  - id: a\n    run: x\n    retries: 2\n").unwrap();
    let f = file.to_str().unwrap();
    let o = chitin(&["workflow", "run", f, "--dry-run", "--json"]);
    assert_eq!(o.status.code(), Some(2));
    let env: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(env["ok"], false);
    assert_eq!(env["error"]["type"], "parse_error");
    let msg = env["error"]["message"].as_str().unwrap();
    assert!(
        msg.starts_with(&format!("{f}:4:5: unknown field `retries` in step `a`")),
        "{msg}"
    );
    let o = chitin(&["workflow", "graph", f]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).starts_with(&format!("chitin: {f}:4:5: unknown field `retries`")));
}

#[test]
fn bad_arguments_are_parse_errors() {
    let f = "examples/workflows/release-checks.json";
    let cases = [
        (
            "not json",
            "--args-json is not JSON: expected ident at line 1 column 2",
        ),
        (
            r#"{"version": "1", "extra": 2}"#,
            "unknown argument `extra`; this workflow takes `version`",
        ),
        (
            "{}",
            "argument `version` has no default; pass it with --args-json '{\"version\": ...}'",
        ),
    ];
    for (args, want) in cases {
        let o = chitin(&[
            "workflow",
            "run",
            f,
            "--dry-run",
            "--json",
            "--args-json",
            args,
        ]);
        assert_eq!(o.status.code(), Some(2), "{args}");
        let env: Value = serde_json::from_str(&stdout(&o)).unwrap();
        assert_eq!(env["error"]["type"], "parse_error");
        assert_eq!(env["error"]["message"], want);
    }
}

#[test]
fn a_missing_file_is_a_runtime_error_and_an_unknown_format_is_refused() {
    let o = chitin(&["workflow", "run", "no/such.lobster", "--dry-run", "--json"]);
    assert_eq!(o.status.code(), Some(1));
    let env: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(env["error"]["type"], "runtime_error");
    assert!(
        env["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("cannot read workflow no/such.lobster: ")
    );
    let o = chitin(&[
        "workflow",
        "graph",
        "examples/workflows/repo-report.yaml",
        "--format",
        "svg",
    ]);
    assert_eq!(o.status.code(), Some(2));
}
