//! `${arg}` and `$step.path` values never become shell syntax: the command a workflow step
//! builds is run with `sh -c` here (outside any sandbox: these tests only check the text), and
//! each value arrives as exactly one argv word, byte for byte.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed assertion is the report"
)]

use std::collections::BTreeMap;
use std::path::Path;

use chitin::workflows::plan::{self, Command};
use chitin::workflows::{Args, Results, StepResult, Workflow};
use serde_json::{Value, json};

/// The workflow under test: its one argument and a step result land in argv in every quoting
/// context a workflow author may put them in.
const WORKFLOW: &str = r#"
args:
  msg: {default: ""}
steps:
  - id: src
    run: cat input.json
  - id: show
    run: |
      ./argv.sh ${msg} "${msg}" "[${msg}]" '<${msg}>' x${msg}y $src.json.value "$(printf %s ${msg})"
    env:
      FROM_STEP: $src.json.value
"#;

/// A script printing each argument followed by a NUL byte.
const ARGV_SH: &str = "#!/bin/sh\nfor a in \"$@\"; do printf '%s\\0' \"$a\"; done\n";

fn build(dir: &Path, msg: &str, step_value: &Value) -> Command {
    let wf = Workflow::parse(WORKFLOW, "inject.lobster").unwrap();
    let args = Args::resolve(&wf, Some(&json!({ "msg": msg }))).unwrap();
    let mut results = Results::new();
    results.insert(
        "src",
        StepResult::from_stdout(json!({ "value": step_value }).to_string()),
    );
    let cmd = plan::step_command(&wf, &wf.steps[1], &args, Some(&results))
        .unwrap()
        .unwrap();
    std::fs::write(dir.join("argv.sh"), ARGV_SH).unwrap();
    let mut perm = std::fs::metadata(dir.join("argv.sh"))
        .unwrap()
        .permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o755);
    std::fs::set_permissions(dir.join("argv.sh"), perm).unwrap();
    cmd
}

/// Runs the command's text with `sh -c` in `dir` with only the command's environment (and a
/// PATH), and returns the argv `argv.sh` saw plus the environment entries it was given.
fn run(dir: &Path, cmd: &Command) -> Vec<String> {
    assert!(cmd.shell);
    let out = std::process::Command::new("/bin/sh")
        .arg("-c")
        .arg(&cmd.text)
        .current_dir(dir)
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .envs(&cmd.env)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}\nstderr: {}",
        cmd.text,
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let mut words: Vec<String> = text.split('\0').map(str::to_string).collect();
    assert_eq!(words.pop().as_deref(), Some(""), "output ends with a NUL");
    words
}

fn expected(msg: &str, step_value: &str) -> Vec<String> {
    vec![
        msg.to_string(),
        msg.to_string(),
        format!("[{msg}]"),
        format!("<{msg}>"),
        format!("x{msg}y"),
        step_value.to_string(),
        // `$(...)` drops trailing newlines, as the shell always does.
        msg.trim_end_matches('\n').to_string(),
    ]
}

#[test]
fn the_pwned_argument_stays_one_argv_word_and_touches_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("pwned");
    let msg = format!("; touch {} #", target.display());
    let cmd = build(dir.path(), &msg, &json!(msg));
    let argv = run(dir.path(), &cmd);
    assert_eq!(argv, expected(&msg, &msg), "{}", cmd.text);
    assert!(
        !target.exists(),
        "the argument ran as a command: {}",
        cmd.text
    );

    // The literal value from the issue, as the argument and as a step result.
    let literal = "; touch /tmp/pwned #";
    let existed = Path::new("/tmp/pwned").exists();
    let cmd = build(dir.path(), literal, &json!(literal));
    assert_eq!(
        run(dir.path(), &cmd),
        expected(literal, literal),
        "{}",
        cmd.text
    );
    if !existed {
        assert!(!Path::new("/tmp/pwned").exists(), "{}", cmd.text);
    }
    assert_eq!(cmd.env["LOBSTER_ARG_MSG"], literal);
    assert_eq!(cmd.env["FROM_STEP"], literal);
    assert_eq!(
        cmd.env["LOBSTER_ARGS_JSON"],
        json!({ "msg": literal }).to_string()
    );
}

#[test]
fn shell_metacharacters_in_values_stay_literal() {
    let dir = tempfile::tempdir().unwrap();
    let canary = dir.path().join("ran");
    let c = canary.display();
    let values = [
        format!("$(touch {c})"),
        format!("`touch {c}`"),
        format!("'; touch {c}; '"),
        format!("\"; touch {c}; \""),
        format!("\n touch {c}\n"),
        format!("x && touch {c} || touch {c}"),
        format!("a | touch {c}"),
        format!("${{IFS}}touch${{IFS}}{c}"),
        "*".to_string(),
        "?".to_string(),
        "[a-z]*".to_string(),
        "~root".to_string(),
        "-e".to_string(),
        String::new(),
        " leading and trailing ".to_string(),
        "tab\there".to_string(),
        "back\\slash \\' \\\" \\n".to_string(),
        "'''".to_string(),
        "\"\"\"".to_string(),
        "{a,b}".to_string(),
        "!event".to_string(),
        "é ünïcödé 🦞".to_string(),
        "#not a comment".to_string(),
    ];
    // Files for the globs to match, should they be expanded.
    std::fs::write(dir.path().join("a"), "").unwrap();
    std::fs::write(dir.path().join("b"), "").unwrap();
    for v in &values {
        let cmd = build(dir.path(), v, &json!(v));
        assert_eq!(
            run(dir.path(), &cmd),
            expected(v, v),
            "value {v:?} gave {}",
            cmd.text
        );
        assert!(!canary.exists(), "value {v:?} ran a command: {}", cmd.text);
    }
}

#[test]
fn non_string_values_render_as_lobster_does_and_stay_one_word() {
    let dir = tempfile::tempdir().unwrap();
    let cases: [(Value, &str); 6] = [
        (json!(42), "42"),
        (json!(1.0), "1"),
        (json!(true), "true"),
        (json!(null), ""),
        (json!([1, "a b", {"k": "; x"}]), r#"[1,"a b",{"k":"; x"}]"#),
        (json!({"cmd": "$(id)"}), r#"{"cmd":"$(id)"}"#),
    ];
    for (value, text) in cases {
        let cmd = build(dir.path(), "m", &value);
        let argv = run(dir.path(), &cmd);
        assert_eq!(argv[5], text, "{value} gave {}", cmd.text);
        assert_eq!(argv.len(), 7, "{value} gave {}", cmd.text);
    }
}

#[test]
fn a_value_with_a_nul_character_is_refused_before_anything_runs() {
    let wf = Workflow::parse(WORKFLOW, "inject.lobster").unwrap();
    let args = Args::resolve(&wf, Some(&json!({ "msg": "a\u{0}b" }))).unwrap();
    let mut results = Results::new();
    results.insert("src", StepResult::from_stdout("{\"value\": 1}".into()));
    let e = plan::step_command(&wf, &wf.steps[1], &args, Some(&results)).unwrap_err();
    assert_eq!(
        e.to_string(),
        "the value of `${msg}` contains a NUL character, which no command line or environment can hold"
    );
}

#[test]
fn the_plan_shows_arguments_quoted_and_step_results_as_written() {
    let wf = Workflow::parse(WORKFLOW, "inject.lobster").unwrap();
    let args = Args::resolve(&wf, Some(&json!({ "msg": "; rm -rf ~ #" }))).unwrap();
    let p = plan::plan(&wf, &args).unwrap();
    let run = p.items[1]["run"].as_str().unwrap();
    assert_eq!(
        run,
        "./argv.sh '; rm -rf ~ #' \"\"'; rm -rf ~ #'\"\" \"[\"'; rm -rf ~ #'\"]\" '<''; rm -rf ~ #''>' x'; rm -rf ~ #'y $src.json.value \"$(printf %s '; rm -rf ~ #')\"\n"
    );
    let env: BTreeMap<String, String> = serde_json::from_value(p.items[1]["env"].clone()).unwrap();
    assert_eq!(env["FROM_STEP"], "$src.json.value");
}

/// Differential check of the quoting lexer against the real `sh`: random templates built from
/// shell fragments (quotes, substitutions, comments, here-documents, `case`, `$((`, ...) are
/// compiled; every one the loader accepts is rendered with values that try to break out of any
/// context and run with `sh -c`. The canary must never be created. (The fragments contain no
/// command that could create it on their own.)
#[test]
fn random_templates_never_let_a_value_out_of_its_quotes() {
    use chitin::workflows::template::{Dialect, Names, RefTarget, Template, Vars};

    struct OneArg;
    impl Names for OneArg {
        fn is_arg(&self, name: &str) -> bool {
            name == "x"
        }
        fn step(&self, _: &str) -> RefTarget {
            RefTarget::NotAStep
        }
    }

    const FRAGMENTS: &[&str] = &[
        "echo", "echo", " ", " ", " ", "'", "\"", "$(", ")", "(", "#", "\\", "\n", "a", ";",
        "${x}", "${x}", "${x}", "${x}", "`", "<<E\n", "\nE\n", "<<-'E'\n", "|", "$((1+", "))",
        "${HOME:-", "}", "$", "{", "&&", "$'", "case ", " in ", "esac", "=", "x${x}y", "\"${x}\"",
        "'${x}'", "$\"", "\t", "<<<", "$#",
    ];

    let dir = tempfile::tempdir().unwrap();
    let canary = dir.path().join("canary");
    let c = canary.display().to_string();
    let values = [
        format!("V';touch {c};'\"$(touch {c})\"`touch {c}`\n touch {c} #"),
        format!("a\nE\ntouch {c}\nE\n"),
        format!("\\'\\\"; touch {c}; ${{IFS}}$(touch {c})"),
    ];

    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let (mut accepted, mut tried) = (0, 0);
    for _ in 0..2000 {
        let len = 3 + (next() % 10) as usize;
        let text: String = (0..len)
            .map(|_| FRAGMENTS[(next() % FRAGMENTS.len() as u64) as usize])
            .collect();
        tried += 1;
        let Ok(t) = Template::compile(&text, Dialect::Shell, &OneArg) else {
            continue;
        };
        if t.vars().next().is_none() {
            continue;
        }
        accepted += 1;
        for v in &values {
            let args: BTreeMap<String, Value> = [("x".to_string(), json!(v))].into();
            let rendered = t
                .render(Vars {
                    args: &args,
                    results: None,
                })
                .unwrap();
            let out = std::process::Command::new("timeout")
                .args(["5", "/bin/sh", "-c", &rendered])
                .current_dir(dir.path())
                .env_clear()
                .env("PATH", "/usr/bin:/bin")
                .stdin(std::process::Stdio::null())
                .output()
                .unwrap();
            assert_ne!(out.status.code(), Some(124), "timed out: {rendered:?}");
            assert!(
                !canary.exists(),
                "template {text:?} let the value out: {rendered:?}"
            );
        }
    }
    // The generator must exercise the lexer, not only produce refused templates.
    assert!(accepted > tried / 10, "{accepted} of {tried} accepted");
}
