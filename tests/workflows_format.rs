//! Loading Lobster workflow files: exact errors with file:line:col for malformed files, the
//! typed values of a good one, argument resolution, and graph snapshots.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed assertion is the report"
)]

use chitin::workflows::graph::{self, GraphFormat};
use chitin::workflows::{
    Action, Args, Backoff, CostAction, OnError, Stdin, StepKind, Wait, Workflow,
};
use serde_json::json;

fn err(file: &str, text: &str) -> String {
    match Workflow::parse(text, file) {
        Ok(_) => panic!("{file} loaded, but an error was expected"),
        Err(e) => e.to_string(),
    }
}

const STEP_FIELDS: &str = "id, run, command, pipeline, workflow, workflow_args, parallel, for_each, item_var, index_var, batch_size, pause_ms, steps, approval, input, env, cwd, stdin, when, condition, timeout_ms, on_error, retry";

#[test]
fn an_unknown_step_field_is_an_error_at_its_key() {
    let text = "name: t\nsteps:\n  - id: build\n    run: make\n    retries: 3\n";
    assert_eq!(
        err("t.lobster", text),
        format!("t.lobster:5:5: unknown field `retries` in step `build`; allowed: {STEP_FIELDS}")
    );
}

#[test]
fn an_unknown_top_level_field_is_an_error_at_its_key() {
    let text = "name: t\nversion: 2\nsteps:\n  - id: a\n    run: x\n";
    assert_eq!(
        err("t.yaml", text),
        "t.yaml:2:1: unknown field `version` in the workflow; allowed: name, description, args, env, cwd, steps, cost_limit"
    );
}

#[test]
fn a_duplicate_id_is_an_error_naming_the_first_one() {
    let text = "steps:\n  - id: a\n    run: x\n  - id: a\n    run: y\n";
    assert_eq!(
        err("t.lobster", text),
        "t.lobster:4:9: duplicate step id `a` (first used at line 2); ids must be unique across the file, including parallel branches and for_each sub-steps"
    );
    let text = "steps:\n  - id: p\n    parallel:\n      branches:\n        - id: b\n          run: x\n  - id: b\n    run: y\n";
    assert_eq!(
        err("t.lobster", text),
        "t.lobster:7:9: duplicate step id `b` (first used at line 5); ids must be unique across the file, including parallel branches and for_each sub-steps"
    );
}

#[test]
fn a_step_with_two_kinds_is_an_error_at_the_second() {
    let text = "steps:\n  - id: a\n    run: x\n    pipeline: y\n";
    assert_eq!(
        err("t.lobster", text),
        "t.lobster:4:5: step `a` has both `run` (line 3) and `pipeline`; a step does exactly one of run (or command), pipeline, workflow, parallel, for_each, or a gate (approval or input)"
    );
    let text = "steps:\n  - id: a\n    command: x\n    run: y\n";
    assert_eq!(
        err("t.lobster", text),
        "t.lobster:4:5: step `a` has both `run` and `command`; they mean the same, keep one"
    );
    let text = "steps:\n  - id: a\n    run: x\n    input:\n      prompt: p\n      responseSchema: {type: object}\n";
    assert_eq!(
        err("t.lobster", text),
        "t.lobster:4:5: step `a` has both `run` and `input`; an input step is a pure gate and runs nothing"
    );
    let text = "steps:\n  - id: a\n    when: true\n";
    assert_eq!(
        err("t.lobster", text),
        "t.lobster:2:5: step `a` does nothing; give it one of run (or command), pipeline, workflow, parallel, for_each, or a gate (approval or input)"
    );
}

#[test]
fn a_bad_condition_is_an_error_at_the_character_inside_it() {
    let text =
        "steps:\n  - id: a\n    run: x\n  - id: b\n    when: $a.json.n == 1 == 2\n    run: y\n";
    assert_eq!(
        err("t.lobster", text),
        "t.lobster:5:26: step `b`: invalid condition: unexpected `==` after a complete condition; comparisons cannot be chained, add parentheses and `&&` (at character 16 of the condition)"
    );
    // Quoted: the column counts the quote.
    let text =
        "steps:\n  - id: a\n    run: x\n  - id: b\n    when: \"$a.approved &&\"\n    run: y\n";
    assert_eq!(
        err("t.lobster", text),
        "t.lobster:5:26: step `b`: invalid condition: expected a value, found the end of the condition (at character 15 of the condition)"
    );
    let text = "steps:\n  - id: a\n    run: x\n  - id: b\n    when: 3\n    run: y\n";
    assert_eq!(
        err("t.lobster", text),
        "t.lobster:5:11: step `b`: a condition must be a string or true/false, found a number"
    );
}

#[test]
fn a_reference_to_an_unknown_or_later_step_is_an_error_at_the_reference() {
    let text = "steps:\n  - id: a\n    run: x\n  - id: b\n    when: $a.approved && $nope.json\n    run: y\n";
    assert_eq!(
        err("t.lobster", text),
        "t.lobster:5:26: step `b`: `$nope.json` refers to `nope`, but there is no step with that id"
    );
    let text = "steps:\n  - id: a\n    run: echo $b.stdout\n  - id: b\n    run: y\n";
    assert_eq!(
        err("t.lobster", text),
        "t.lobster:3:15: step `a` `run`: `$b.stdout`: step `b` does not run before this one (it is defined at line 4)"
    );
    let text = "steps:\n  - id: a\n    run: x\n    when: $a.skipped\n";
    assert_eq!(
        err("t.lobster", text),
        "t.lobster:4:11: step `a`: `$a.skipped`: a step cannot use its own result"
    );
    let text = "steps:\n  - id: a\n    run: x\n  - id: b\n    stdin: $a.stdot\n    run: y\n";
    assert_eq!(
        err("t.lobster", text),
        "t.lobster:5:12: step `b` `stdin`: `$a.stdot`: a step result has no field `stdot`; use one of id, stdout, json, approved, approvedBy, initiatedBy, response, subject, skipped, error, errorMessage"
    );
}

#[test]
fn results_inside_parallel_and_for_each_are_scoped() {
    let text = "steps:\n  - id: p\n    parallel:\n      branches:\n        - id: x\n          run: a\n        - id: y\n          run: echo $x.stdout\n";
    assert_eq!(
        err("t.lobster", text),
        "t.lobster:8:21: branch `y` of step `p` `run`: `$x.stdout`: the branches of `p` run at the same time, so one cannot use another's result"
    );
    let text = "steps:\n  - id: src\n    run: echo '[1]'\n  - id: loop\n    for_each: $src.json\n    steps:\n      - id: one\n        run: echo $item.json\n  - id: after\n    run: echo $one.stdout\n";
    assert_eq!(
        err("t.lobster", text),
        "t.lobster:10:15: step `after` `run`: `$one.stdout`: `one` is a sub-step of the for_each step `loop` and its result exists only inside that loop; after the loop use `$loop.json`"
    );
    let text = "steps:\n  - id: src\n    run: x\n  - id: loop\n    for_each: $src.json\n    steps:\n      - id: one\n        input: {prompt: p, responseSchema: {type: object}}\n";
    assert_eq!(
        err("t.lobster", text),
        "t.lobster:8:9: sub-step `one` of step `loop`: a for_each body runs only commands, pipelines and approval gates, not `input`; put it in a step before or after the loop"
    );
    let text = "steps:\n  - id: src\n    run: x\n  - id: loop\n    for_each: $src.json\n    steps:\n      - id: one\n        env: {A: b}\n";
    assert_eq!(
        err("t.lobster", text),
        "t.lobster:7:9: sub-step `one` of step `loop` needs `run` (or `command`), `pipeline` or `approval`"
    );
}

/// Chitin's extension: approval gates in a for_each body (asked per item) and in parallel
/// branches, pure or after the action; a later sub-step may read the gate's `approved`.
#[test]
fn approval_gates_load_in_loop_bodies_and_branches() {
    use chitin::workflows::StepKind;
    let text = "steps:\n  - id: src\n    run: x\n  - id: loop\n    for_each: $src.json\n    steps:\n      - id: ok\n        approval: Delete it?\n      - id: rm\n        when: $ok.approved\n        run: y\n        approval: {prompt: Sure?, require_different_approver: true}\n  - id: p\n    parallel:\n      branches:\n        - id: gate\n          approval: true\n        - id: build\n          pipeline: exec make\n          approval: Ship?\n";
    let wf = chitin::workflows::Workflow::parse(text, "t.lobster").unwrap();
    let StepKind::ForEach(f) = &wf.steps[1].kind else {
        panic!()
    };
    assert!(f.steps[0].action.is_none());
    assert_eq!(
        f.steps[0].approval.as_ref().unwrap().prompt.as_deref(),
        Some("Delete it?")
    );
    assert!(f.steps[1].action.is_some());
    assert!(
        f.steps[1]
            .approval
            .as_ref()
            .unwrap()
            .require_different_approver
    );
    let StepKind::Parallel(p) = &wf.steps[2].kind else {
        panic!()
    };
    assert!(p.branches[0].action.is_none() && p.branches[0].approval.is_some());
    assert_eq!(
        p.branches[1].approval.as_ref().unwrap().prompt.as_deref(),
        Some("Ship?")
    );
    // The graph and the plan show them.
    let g = graph::render(&wf, GraphFormat::Ascii);
    assert!(g.contains("approval: Delete it?"), "{g}");
}

#[test]
fn a_placeholder_in_a_here_document_is_refused_at_its_line() {
    let text = "args:\n  x: {default: v}\nsteps:\n  - id: a\n    run: |\n      echo ok\n      cat <<EOF\n      ${x}\n      EOF\n";
    assert_eq!(
        err("t.lobster", text),
        "t.lobster:8:7: step `a` `run`: cannot substitute `${x}` inside a here-document: its quoting there cannot be guaranteed; use \"$LOBSTER_ARG_X\" there instead"
    );
}

#[test]
fn wrong_types_name_the_field_and_what_was_found() {
    let cases = [
        (
            "steps:\n  - id: a\n    run: x\n    timeout_ms: 5s\n",
            "t.lobster:4:17: step `a` `timeout_ms` must be a whole number from 1 to 2147483647, found a string",
        ),
        (
            "steps:\n  - id: a\n    run: x\n    on_error: ignore\n",
            "t.lobster:4:15: step `a` `on_error` must be `stop`, `continue` or `skip_rest`, not `ignore`",
        ),
        (
            "steps:\n  - id: a\n    run: x\n    env:\n      PORT: 8080\n",
            "t.lobster:5:13: step `a` `env`: the value of `PORT` must be a string, found a number; quote it",
        ),
        (
            "steps:\n  - id: a\n    run: 42\n",
            "t.lobster:3:10: step `a` `run` must be a string, found a number",
        ),
        (
            "steps:\n  - id: a b\n    run: x\n",
            "t.lobster:2:9: step id `a b` may only contain letters, digits, `_` and `-` (it is referenced as `$a b.stdout`)",
        ),
        (
            "steps: []\n",
            "t.lobster:1:8: `steps` is empty; add at least one step",
        ),
        (
            "cost_limit: {max_usd: -1}\nsteps:\n  - id: a\n    run: x\n",
            "t.lobster:1:23: `cost_limit.max_usd` must be a number of US dollars, 0 or more, found a number",
        ),
        (
            "steps:\n  - id: a\n    approval: true\n    retry: {max: 2}\n",
            "t.lobster:4:5: step `a`: `retry` has no meaning on an approval gate",
        ),
        (
            "steps:\n  - id: a\n    run: x\n    retry: {max: 2, backoff: linear}\n",
            "t.lobster:4:30: step `a` `retry` `backoff` must be `fixed` or `exponential`, not `linear`",
        ),
    ];
    for (text, want) in cases {
        assert_eq!(err("t.lobster", text), want, "{text}");
    }
}

#[test]
fn yaml_and_json_syntax_errors_have_positions() {
    assert_eq!(
        err("t.yaml", "steps:\n  - id: a\n   run: x\n"),
        "t.yaml:3:7: invalid YAML: while parsing a block collection, did not find expected '-' indicator"
    );
    assert_eq!(
        err(
            "t.json",
            "{\"steps\": [\n  {\"id\": \"a\", \"run\": \"x\",}\n]}"
        ),
        "t.json:2:26: invalid JSON: expected a string key"
    );
    assert_eq!(
        err(
            "t.json",
            "{\"steps\": [{\"id\": \"a\", \"run\": \"x\", \"when\": \"$a.json ==\"}]}"
        ),
        "t.json:1:55: step `a`: invalid condition: expected a value, found the end of the condition (at character 11 of the condition)"
    );
    assert_eq!(
        err(
            "t.json",
            "{\"steps\": [{\"id\": \"a\", \"run\": \"x\", \"when\": \"$a.json\"}]}"
        ),
        "t.json:1:45: step `a`: `$a.json`: a step cannot use its own result"
    );
    assert_eq!(
        err(
            "t.json",
            "{\"steps\": [{\"id\": \"a\", \"run\": \"x\", \"bogus\": 1}]}"
        ),
        format!("t.json:1:36: unknown field `bogus` in step `a`; allowed: {STEP_FIELDS}")
    );
    assert_eq!(
        err("t.txt", "steps: []"),
        "t.txt: not a workflow file; name it *.lobster, *.yaml, *.yml or *.json"
    );
}

const FULL: &str = r#"
name: full
description: every kind of step
args:
  who: {default: world, description: who to greet}
  n: {default: 2}
env:
  GREETING: hello ${who}
cost_limit: {max_usd: 1.5, action: stop}
steps:
  - id: hello
    command: echo "${GREETING:-hi} ${who}"
    timeout_ms: 1000
    retry: {max: 3, backoff: exponential, delay_ms: 10, jitter: true}
    on_error: skip_rest
  - id: list
    pipeline: exec --json --shell "echo [1,2]"
    approval:
      prompt: Go on?
      requiredApprover: alice
      require_different_approver: true
  - id: checks
    condition: $list.approved
    parallel:
      wait: any
      timeout_ms: 500
      branches:
        - {id: b1, run: "true"}
        - {id: b2, pipeline: "json", stdin: $list.json}
  - id: each
    for_each: $list.json
    item_var: it
    index_var: i
    batch_size: 2
    pause_ms: 5
    env: {ITEM: $it.stdout}
    steps:
      - id: show
        run: echo $it.json $i.json ${n}
      - id: again
        when: $show.stdout != ""
        command: cat
        stdin: $show.stdout
  - id: ask
    input:
      prompt: Name?
      responseSchema: {type: object}
      defaults: {name: x}
    stdin: {some: json}
  - id: gate
    approval: Really?
  - id: sub
    workflow: other.lobster
    workflow_args: {x: $ask.response.name, y: 3}
"#;

#[test]
fn a_file_with_every_kind_of_step_loads_into_typed_values() {
    let wf = Workflow::parse(FULL, "full.lobster").unwrap();
    assert_eq!(wf.name.as_deref(), Some("full"));
    assert_eq!(wf.arg_names(), ["who", "n"]);
    assert_eq!(wf.args[0].default, Some(json!("world")));
    let cl = wf.cost_limit.unwrap();
    assert_eq!((cl.max_usd, cl.action), (1.5, CostAction::Stop));
    let ids: Vec<&str> = wf.all_ids().iter().map(|(id, _)| *id).collect();
    assert_eq!(
        ids,
        [
            "hello", "list", "checks", "b1", "b2", "each", "show", "again", "ask", "gate", "sub"
        ]
    );
    let s = &wf.steps;
    assert!(matches!(s[0].kind, StepKind::Shell(_)));
    assert_eq!(s[0].timeout_ms, Some(1000));
    assert_eq!(s[0].on_error, OnError::SkipRest);
    let r = s[0].retry.unwrap();
    assert_eq!(
        (r.max, r.backoff, r.delay_ms, r.max_delay_ms, r.jitter),
        (3, Backoff::Exponential, 10, 30_000, true)
    );
    assert!(matches!(s[1].kind, StepKind::Pipeline(_)));
    let a = s[1].approval.as_ref().unwrap();
    assert_eq!(a.prompt_for("list"), "Go on?");
    assert_eq!(a.required_approver.as_deref(), Some("alice"));
    assert!(a.require_different_approver);
    let StepKind::Parallel(p) = &s[2].kind else {
        panic!()
    };
    assert_eq!(
        (p.wait, p.timeout_ms, p.branches.len()),
        (Wait::Any, Some(500), 2)
    );
    assert!(matches!(p.branches[1].action, Some(Action::Pipeline(_))));
    assert!(matches!(p.branches[1].stdin, Some(Stdin::Ref(_))));
    assert_eq!(s[2].when.as_ref().unwrap().source, "$list.approved");
    let StepKind::ForEach(f) = &s[3].kind else {
        panic!()
    };
    assert_eq!((f.item_var.as_str(), f.index_var.as_str()), ("it", "i"));
    assert_eq!((f.batch_size, f.pause_ms), (Some(2), Some(5)));
    assert_eq!(f.items.to_string(), "$list.json");
    assert_eq!(
        f.steps[1].when.as_ref().unwrap().source,
        "$show.stdout != \"\""
    );
    let StepKind::Input(i) = &s[4].kind else {
        panic!()
    };
    assert_eq!(i.prompt, "Name?");
    assert_eq!(i.defaults, Some(json!({"name": "x"})));
    assert_eq!(s[4].stdin, Some(Stdin::Json(json!({"some": "json"}))));
    let StepKind::Approval(g) = &s[5].kind else {
        panic!()
    };
    assert_eq!(g.prompt_for("gate"), "Really?");
    assert!(s[5].approval.is_none());
    let StepKind::Workflow(w) = &s[6].kind else {
        panic!()
    };
    assert_eq!(w.path.source, "other.lobster");
    assert_eq!(w.args.len(), 2);
}

#[test]
fn the_same_workflow_as_json_loads_the_same_values() {
    let yaml = Workflow::parse(FULL, "full.yaml").unwrap();
    let node = chitin::workflows::source::parse_yaml(FULL)
        .unwrap()
        .to_json();
    let json_text = serde_json::to_string_pretty(&node).unwrap();
    let json = Workflow::parse(&json_text, "full.json").unwrap();
    assert_eq!(
        graph::render(&yaml, GraphFormat::Ascii),
        graph::render(&json, GraphFormat::Ascii)
    );
    assert_eq!(yaml.steps.len(), json.steps.len());
}

#[test]
fn arguments_take_defaults_and_refuse_unknown_or_missing_names() {
    let wf = Workflow::parse(
        "args:\n  a: {default: 1}\n  b: {description: needed}\nsteps:\n  - id: s\n    run: echo ${a} ${b}\n",
        "t.lobster",
    )
    .unwrap();
    let args = Args::from_json_text(&wf, Some(r#"{"b": "x y"}"#)).unwrap();
    assert_eq!(args.values()["a"], json!(1));
    assert_eq!(
        Args::from_json_text(&wf, Some(r#"{"b": 1, "c": 2}"#))
            .unwrap_err()
            .to_string(),
        "unknown argument `c`; this workflow takes `a`, `b`"
    );
    assert_eq!(
        Args::from_json_text(&wf, None).unwrap_err().to_string(),
        "argument `b` has no default; pass it with --args-json '{\"b\": ...}'"
    );
    assert_eq!(
        Args::from_json_text(&wf, Some("[1]"))
            .unwrap_err()
            .to_string(),
        "--args-json must be a JSON object such as '{\"name\": \"value\"}', not a list"
    );
    let cmd = chitin::workflows::plan::step_command(&wf, &wf.steps[0], &args, None)
        .unwrap()
        .unwrap();
    assert_eq!(cmd.text, "echo '1' 'x y'");
    assert_eq!(cmd.env["LOBSTER_ARG_B"], "x y");
    assert_eq!(cmd.env["LOBSTER_ARGS_JSON"], r#"{"a":1,"b":"x y"}"#);
}

const GRAPH: &str = r#"
name: g
steps:
  - id: fetch
    run: curl -s https://example.com/items.json
  - id: checks
    parallel:
      branches:
        - {id: lint, run: make lint}
        - {id: test, run: make test}
  - id: each
    for_each: $fetch.json
    steps:
      - id: show
        run: echo $item.json
  - id: ok
    approval: Ship "it"?
  - id: why
    when: "!$ok.approved"
    input: {prompt: Why not?, responseSchema: {type: object}}
  - id: ship
    when: $ok.approved && $lint.stdout == ""
    stdin: $fetch.stdout
    run: ./ship.sh | tee log
"#;

#[test]
fn graphs_are_stable_snapshots_in_every_format() {
    let wf = Workflow::parse(GRAPH, "g.lobster").unwrap();
    assert_eq!(
        graph::render(&wf, GraphFormat::Mermaid),
        r#"%% workflow: g
flowchart TD
  fetch["fetch<br/>run: curl -s https://example.com/items.json"]
  checks["checks<br/>parallel (all)"]
  subgraph checks_group["checks: branches"]
    lint["lint<br/>run: make lint"]
    test["test<br/>run: make test"]
  end
  each["each<br/>for_each: $fetch.json"]
  subgraph each_group["each: for each $item"]
    show["show<br/>run: echo $item.json"]
  end
  ok{"ok<br/>approval gate: Ship &quot;it&quot;?"}
  why{{"why<br/>input request: Why not?<br/>when: !$ok.approved"}}
  ship["ship<br/>run: ./ship.sh &#124; tee log<br/>when: $ok.approved &amp;&amp; $lint.stdout == &quot;&quot;"]

  fetch -->|next| checks
  checks -->|branch| lint
  checks -->|branch| test
  checks -->|next| each
  fetch -->|for_each| each
  each -->|each item| show
  show -->|next item| each
  each -->|next| ok
  ok -->|next| why
  ok -->|when: !$ok.approved| why
  why -->|next| ship
  fetch -->|stdin| ship
  ok -->|when: $ok.approved &amp;&amp; $lint.stdout == &quot;&quot;| ship
  lint -->|when: $ok.approved &amp;&amp; $lint.stdout == &quot;&quot;| ship
"#
    );
    assert_eq!(
        graph::render(&wf, GraphFormat::Dot),
        r#"digraph workflow {
  label="g";
  rankdir=TB;
  "fetch" [shape=box,label="fetch\nrun: curl -s https://example.com/items.json"];
  "checks" [shape=box,label="checks\nparallel (all)"];
  subgraph "cluster_checks" {
    label="checks: branches";
    "lint" [shape=box,label="lint\nrun: make lint"];
    "test" [shape=box,label="test\nrun: make test"];
  }
  "each" [shape=box,label="each\nfor_each: $fetch.json"];
  subgraph "cluster_each" {
    label="each: for each $item";
    "show" [shape=box,label="show\nrun: echo $item.json"];
  }
  "ok" [shape=diamond,label="ok\napproval gate: Ship \"it\"?"];
  "why" [shape=hexagon,label="why\ninput request: Why not?\nwhen: !$ok.approved"];
  "ship" [shape=box,label="ship\nrun: ./ship.sh | tee log\nwhen: $ok.approved && $lint.stdout == \"\""];

  "fetch" -> "checks" [label="next"];
  "checks" -> "lint" [label="branch"];
  "checks" -> "test" [label="branch"];
  "checks" -> "each" [label="next"];
  "fetch" -> "each" [label="for_each"];
  "each" -> "show" [label="each item"];
  "show" -> "each" [label="next item"];
  "each" -> "ok" [label="next"];
  "ok" -> "why" [label="next"];
  "ok" -> "why" [label="when: !$ok.approved",style=dashed];
  "why" -> "ship" [label="next"];
  "fetch" -> "ship" [label="stdin"];
  "ok" -> "ship" [label="when: $ok.approved && $lint.stdout == \"\"",style=dashed];
  "lint" -> "ship" [label="when: $ok.approved && $lint.stdout == \"\"",style=dashed];
}
"#
    );
    assert_eq!(
        graph::render(&wf, GraphFormat::Ascii),
        r#"Workflow Graph: g

Nodes:
- fetch [run] run: curl -s https://example.com/items.json
- checks [parallel] parallel (all)
  - lint [branch run] run: make lint
  - test [branch run] run: make test
- each [for_each] for_each: $fetch.json
  - show [loop run] run: echo $item.json
- ok [approval] <approval> approval gate: Ship "it"?
- why [input] <input> input request: Why not? | when: !$ok.approved
- ship [run] run: ./ship.sh | tee log | when: $ok.approved && $lint.stdout == ""

Edges:
- fetch -> checks (next)
- checks -> lint (branch)
- checks -> test (branch)
- checks -> each (next)
- fetch -> each (for_each)
- each -> show (each item)
- show -> each (next item)
- each -> ok (next)
- ok -> why (next)
- ok -> why (when: !$ok.approved)
- why -> ship (next)
- fetch -> ship (stdin)
- ok -> ship (when: $ok.approved && $lint.stdout == "")
- lint -> ship (when: $ok.approved && $lint.stdout == "")
"#
    );
}

#[test]
fn branch_and_loop_commands_layer_env_and_cwd_like_lobster() {
    use chitin::workflows::plan::{branch_command, sub_step_command};
    use chitin::workflows::{Results, StepResult};
    let text = r#"
args: {who: {default: "a b"}}
env: {LEVEL: workflow, W: w}
cwd: /w
steps:
  - id: src
    run: echo '["x y"]'
  - id: p
    env: {LEVEL: step, S: s}
    cwd: /s
    parallel:
      branches:
        - {id: b, run: "echo ${who}", env: {LEVEL: branch}}
        - {id: c, run: "echo $src.stdout", cwd: /c}
  - id: loop
    for_each: $src.json
    env: {ITEM: $item.stdout}
    steps:
      - {id: one, run: "echo $item.json $index.json", env: {LEVEL: sub}}
"#;
    let wf = Workflow::parse(text, "t.lobster").unwrap();
    let args = Args::resolve(&wf, None).unwrap();
    let mut rs = Results::new();
    rs.insert("src", StepResult::from_stdout("[\"x y\"]\n".into()));
    let StepKind::Parallel(p) = &wf.steps[1].kind else {
        panic!()
    };
    let b = branch_command(&wf, &wf.steps[1], &p.branches[0], &args, Some(&rs))
        .unwrap()
        .unwrap();
    assert_eq!(b.text, "echo 'a b'");
    assert_eq!(
        (
            b.env["LEVEL"].as_str(),
            b.env["S"].as_str(),
            b.env["W"].as_str()
        ),
        ("branch", "s", "w")
    );
    assert_eq!(b.cwd.as_deref(), Some("/s"));
    let c = branch_command(&wf, &wf.steps[1], &p.branches[1], &args, Some(&rs))
        .unwrap()
        .unwrap();
    assert_eq!(c.text, "echo '[\"x y\"]\n'");
    assert_eq!(
        (c.env["LEVEL"].as_str(), c.cwd.as_deref()),
        ("step", Some("/c"))
    );
    let StepKind::ForEach(f) = &wf.steps[2].kind else {
        panic!()
    };
    let it = rs.for_iteration(&f.item_var, &json!("x y"), &f.index_var, 0);
    let one = sub_step_command(&wf, &wf.steps[2], &f.steps[0], &args, Some(&it))
        .unwrap()
        .unwrap();
    assert_eq!(one.text, "echo 'x y' '0'");
    assert_eq!(
        (one.env["LEVEL"].as_str(), one.env["ITEM"].as_str()),
        ("sub", "x y")
    );
    assert_eq!(one.cwd.as_deref(), Some("/w"));
}
