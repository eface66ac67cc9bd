//! Arguments, the commands a step will run (text, environment, directory), and the dry-run
//! plan: what the executor builds on, without running anything.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use super::format::{
    Action, ArgValue, Backoff, Branch, CostAction, EnvVar, OnError, Stdin, Step, StepKind, SubStep,
    Wait, Workflow,
};
use super::results::Results;
use super::template::{RenderError, Template, Vars, args_env, js_json, render_value};

/// Arguments that cannot be resolved.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ArgsError {
    #[error("--args-json is not JSON: {0}")]
    NotJson(String),
    #[error("--args-json must be a JSON object such as '{{\"name\": \"value\"}}', not {0}")]
    NotObject(&'static str),
    #[error("unknown argument `{name}`; this workflow takes {known}")]
    Unknown { name: String, known: String },
    #[error("argument `{name}` has no default; pass it with --args-json '{{\"{name}\": ...}}'")]
    Missing { name: String },
}

/// The arguments of a run: the given values, the defaults for the rest.
#[derive(Debug, Clone, PartialEq)]
pub struct Args {
    values: BTreeMap<String, Value>,
    /// Declared order (for `LOBSTER_ARGS_JSON`).
    order: Vec<String>,
}

impl Args {
    /// Checks `given` (a JSON object, or `None`) against the workflow's declared arguments:
    /// an undeclared name is an error, a declared one without default must be given.
    pub fn resolve(wf: &Workflow, given: Option<&Value>) -> Result<Self, ArgsError> {
        let empty = serde_json::Map::new();
        let given = match given {
            None | Some(Value::Null) => &empty,
            Some(Value::Object(m)) => m,
            Some(other) => {
                return Err(ArgsError::NotObject(match other {
                    Value::Array(_) => "a list",
                    Value::String(_) => "a string",
                    Value::Number(_) => "a number",
                    _ => "a boolean",
                }));
            }
        };
        for name in given.keys() {
            if !wf.args.iter().any(|a| &a.name == name) {
                let known = if wf.args.is_empty() {
                    "no arguments".to_string()
                } else {
                    wf.args
                        .iter()
                        .map(|a| format!("`{}`", a.name))
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                return Err(ArgsError::Unknown {
                    name: name.clone(),
                    known,
                });
            }
        }
        let mut values = BTreeMap::new();
        for spec in &wf.args {
            match given.get(&spec.name).or(spec.default.as_ref()) {
                Some(v) => {
                    values.insert(spec.name.clone(), v.clone());
                }
                None => {
                    return Err(ArgsError::Missing {
                        name: spec.name.clone(),
                    });
                }
            }
        }
        Ok(Self {
            values,
            order: wf.arg_names(),
        })
    }

    /// Parses `--args-json` text and resolves it.
    pub fn from_json_text(wf: &Workflow, text: Option<&str>) -> Result<Self, ArgsError> {
        let given = text
            .map(|t| {
                serde_json::from_str::<Value>(t).map_err(|e| ArgsError::NotJson(e.to_string()))
            })
            .transpose()?;
        Self::resolve(wf, given.as_ref())
    }

    pub fn values(&self) -> &BTreeMap<String, Value> {
        &self.values
    }

    /// `LOBSTER_ARGS_JSON` and `LOBSTER_ARG_<NAME>`.
    pub fn env(&self) -> BTreeMap<String, String> {
        args_env(&self.values, &self.order)
    }

    /// The values templates render with; `results: None` leaves step references as written.
    pub fn vars<'a>(&'a self, results: Option<&'a Results>) -> Vars<'a> {
        Vars {
            args: &self.values,
            results,
        }
    }
}

/// A command ready for the executor: shell text (or a pipeline), the environment the workflow
/// adds (not the host's: the executor starts from the sandbox's minimal environment), and the
/// working directory if one is set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    /// `true`: [`Command::text`] is POSIX shell text for `sh -c`; `false`: a Lobster pipeline.
    pub shell: bool,
    pub text: String,
    pub env: BTreeMap<String, String>,
    pub cwd: Option<String>,
}

/// Builds the command of an action: `text` rendered, then the environment in Lobster's order
/// (`LOBSTER_ARGS_JSON` and `LOBSTER_ARG_*`, the workflow's `env`, then each of `layers`, later
/// ones overriding), and the first `cwd` of `cwds` that is set (innermost first).
pub fn command(
    wf: &Workflow,
    action: &Action,
    layers: &[&[EnvVar]],
    cwds: &[Option<&Template>],
    args: &Args,
    results: Option<&Results>,
) -> Result<Command, RenderError> {
    let vars = args.vars(results);
    let text = action.template().render(vars)?;
    let mut env = args.env();
    for layer in std::iter::once(wf.env.as_slice()).chain(layers.iter().copied()) {
        for e in layer {
            env.insert(e.name.clone(), e.value.render(vars)?);
        }
    }
    let cwd = cwds
        .iter()
        .copied()
        .chain(std::iter::once(wf.cwd.as_ref()))
        .flatten()
        .next()
        .map(|t| t.render(vars))
        .transpose()?;
    Ok(Command {
        shell: matches!(action, Action::Shell(_)),
        text,
        env,
        cwd,
    })
}

/// The command of a top-level `run`/`pipeline` step (`None` for other kinds).
pub fn step_command(
    wf: &Workflow,
    step: &Step,
    args: &Args,
    results: Option<&Results>,
) -> Result<Option<Command>, RenderError> {
    let action = match &step.kind {
        StepKind::Shell(t) => Action::Shell(t.clone()),
        StepKind::Pipeline(t) => Action::Pipeline(t.clone()),
        _ => return Ok(None),
    };
    command(
        wf,
        &action,
        &[&step.env],
        &[step.cwd.as_ref()],
        args,
        results,
    )
    .map(Some)
}

/// The command of a parallel branch: the parallel step's `env`/`cwd` apply under the branch's
/// own (Lobster: `branch.cwd ?? step.cwd ?? workflow.cwd`, step env then branch env).
pub fn branch_command(
    wf: &Workflow,
    step: &Step,
    branch: &Branch,
    args: &Args,
    results: Option<&Results>,
) -> Result<Option<Command>, RenderError> {
    let Some(action) = &branch.action else {
        return Ok(None);
    };
    command(
        wf,
        action,
        &[&step.env, &branch.env],
        &[branch.cwd.as_ref(), step.cwd.as_ref()],
        args,
        results,
    )
    .map(Some)
}

/// The command of a for_each sub-step for one item: `results` must be the iteration's
/// (see [`Results::for_iteration`]); the loop's `env`/`cwd` apply under the sub-step's own.
pub fn sub_step_command(
    wf: &Workflow,
    step: &Step,
    sub: &SubStep,
    args: &Args,
    results: Option<&Results>,
) -> Result<Option<Command>, RenderError> {
    let Some(action) = &sub.action else {
        return Ok(None);
    };
    command(
        wf,
        action,
        &[&step.env, &sub.env],
        &[sub.cwd.as_ref(), step.cwd.as_ref()],
        args,
        results,
    )
    .map(Some)
}

/// A step's stdin value: a referenced value itself, rendered text, or JSON (`None`: no stdin).
/// At plan time a reference is `None` too.
pub fn stdin_value(
    stdin: Option<&Stdin>,
    args: &Args,
    results: Option<&Results>,
) -> Result<Option<Value>, RenderError> {
    Ok(match stdin {
        None => None,
        Some(Stdin::Json(v)) => Some(v.clone()),
        Some(Stdin::Text(t)) => Some(Value::String(t.render(args.vars(results))?)),
        Some(Stdin::Ref(r)) => match results {
            None => None,
            Some(rs) => rs.lookup(r)?,
        },
    })
}

/// The dry-run plan: every step in order with its rendered command; nothing runs. Step
/// results are not known, so references to them stay as written (`$fetch.json`) and conditions
/// are shown, not decided.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// One JSON object per step (the `output` of the tool envelope).
    pub items: Vec<Value>,
    /// The same, for people.
    pub text: String,
}

/// Builds the plan.
pub fn plan(wf: &Workflow, args: &Args) -> Result<Plan, RenderError> {
    let mut items = Vec::new();
    let n = wf.steps.len();
    let mut lines = vec![format!(
        "[DRY RUN] {} step{}{}; nothing is executed:",
        n,
        if n == 1 { "" } else { "s" },
        wf.name
            .as_ref()
            .map_or(String::new(), |name| format!(" of `{name}`")),
    )];
    if !args.values.is_empty() {
        lines.push(format!(
            "  args: {}",
            args.order
                .iter()
                .filter_map(|k| args.values.get(k).map(|v| format!("{k}={}", js_json(v))))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    if let Some(cl) = wf.cost_limit {
        lines.push(format!(
            "  cost_limit: ${} ({})",
            cl.max_usd,
            match cl.action {
                CostAction::Warn => "warn",
                CostAction::Stop => "stop",
            }
        ));
    }
    for (i, step) in wf.steps.iter().enumerate() {
        let (item, text) = plan_step(wf, step, args)?;
        items.push(item);
        // Multi-line commands stay readable: continuation lines are indented under their entry.
        let body: Vec<String> = text
            .iter()
            .map(|l| l.trim_end().replace('\n', "\n       "))
            .collect();
        lines.push(format!("  {}. {}", i + 1, body.join("\n     ")));
    }
    lines.push(String::new());
    Ok(Plan {
        items,
        text: lines.join("\n"),
    })
}

fn deferred_note(t: &Template) -> &'static str {
    if t.has_step_refs() {
        "  [step results filled in at run time]"
    } else {
        ""
    }
}

fn env_json(env: &BTreeMap<String, String>) -> Value {
    Value::Object(
        env.iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect(),
    )
}

/// The declared `env` of layers, rendered (the `LOBSTER_*` entries left out for brevity).
fn declared_env(
    layers: &[&[EnvVar]],
    args: &Args,
) -> Result<BTreeMap<String, String>, RenderError> {
    let mut env = BTreeMap::new();
    for layer in layers {
        for e in *layer {
            env.insert(e.name.clone(), e.value.render(args.vars(None))?);
        }
    }
    Ok(env)
}

fn plan_step(wf: &Workflow, step: &Step, args: &Args) -> Result<(Value, Vec<String>), RenderError> {
    let mut item = serde_json::Map::new();
    item.insert("id".into(), json!(step.id));
    item.insert("kind".into(), json!(step.kind.name()));
    let mut head = format!("{}  [{}]", step.id, step.kind.name());
    let mut lines = Vec::new();
    if let Some(c) = &step.when {
        item.insert("when".into(), json!(c.source));
        head.push_str(&format!("  when: {}  [decided at run time]", c.source));
    }
    let vars = args.vars(None);
    match &step.kind {
        StepKind::Shell(t) | StepKind::Pipeline(t) => {
            let key = if matches!(step.kind, StepKind::Shell(_)) {
                "run"
            } else {
                "pipeline"
            };
            let text = t.render(vars)?;
            lines.push(format!("{key}: {text}{}", deferred_note(t)));
            item.insert(key.into(), json!(text));
        }
        StepKind::Workflow(sw) => {
            let path = sw.path.render(vars)?;
            lines.push(format!("workflow: {path}{}", deferred_note(&sw.path)));
            item.insert("workflow".into(), json!(path));
            let mut wargs = serde_json::Map::new();
            for (k, v) in &sw.args {
                wargs.insert(
                    k.clone(),
                    match v {
                        ArgValue::Text(t) => json!(t.render(vars)?),
                        ArgValue::Json(j) => j.clone(),
                    },
                );
            }
            if !wargs.is_empty() {
                lines.push(format!("workflow_args: {}", Value::Object(wargs.clone())));
                item.insert("workflowArgs".into(), Value::Object(wargs));
            }
        }
        StepKind::Parallel(p) => {
            let wait = match p.wait {
                Wait::All => "all",
                Wait::Any => "any",
            };
            lines.push(format!(
                "wait: {wait}{}",
                p.timeout_ms
                    .map_or(String::new(), |t| format!(", timeout {t}ms"))
            ));
            item.insert("wait".into(), json!(wait));
            if let Some(t) = p.timeout_ms {
                item.insert("timeoutMs".into(), json!(t));
            }
            let mut branches = Vec::new();
            for b in &p.branches {
                let mut bj = serde_json::Map::new();
                bj.insert("id".into(), json!(b.id));
                match &b.action {
                    Some(action) => {
                        let text = action.template().render(vars)?;
                        lines.push(format!(
                            "branch {} [{}]: {text}{}",
                            b.id,
                            action.name(),
                            deferred_note(action.template())
                        ));
                        bj.insert("kind".into(), json!(action.name()));
                        bj.insert(action.name().into(), json!(text));
                    }
                    None => {
                        bj.insert("kind".into(), json!("approval"));
                    }
                }
                if let Some(a) = &b.approval {
                    lines.push(format!(
                        "branch {} [approval required] {}",
                        b.id,
                        a.prompt_for(&b.id)
                    ));
                    bj.insert("approval".into(), gate_json(a, &b.id));
                }
                let env = declared_env(&[&step.env, &b.env], args)?;
                if !env.is_empty() {
                    bj.insert("env".into(), env_json(&env));
                }
                branches.push(Value::Object(bj));
            }
            item.insert("branches".into(), Value::Array(branches));
        }
        StepKind::ForEach(fe) => {
            lines.push(format!(
                "for_each: {}  (item: ${}, index: ${}{}{})",
                fe.items,
                fe.item_var,
                fe.index_var,
                fe.batch_size
                    .map_or(String::new(), |b| format!(", batch_size {b}")),
                fe.pause_ms
                    .map_or(String::new(), |p| format!(", pause {p}ms")),
            ));
            item.insert("forEach".into(), json!(fe.items.to_string()));
            item.insert("itemVar".into(), json!(fe.item_var));
            item.insert("indexVar".into(), json!(fe.index_var));
            if let Some(b) = fe.batch_size {
                item.insert("batchSize".into(), json!(b));
            }
            if let Some(p) = fe.pause_ms {
                item.insert("pauseMs".into(), json!(p));
            }
            let mut subs = Vec::new();
            for (k, s) in fe.steps.iter().enumerate() {
                let when = s
                    .when
                    .as_ref()
                    .map_or(String::new(), |c| format!("  when: {}", c.source));
                let mut sj = serde_json::Map::new();
                sj.insert("id".into(), json!(s.id));
                match &s.action {
                    Some(action) => {
                        let text = action.template().render(vars)?;
                        lines.push(format!(
                            "  {}. {} [{}]{when}: {text}{}",
                            k + 1,
                            s.id,
                            action.name(),
                            deferred_note(action.template())
                        ));
                        sj.insert("kind".into(), json!(action.name()));
                        sj.insert(action.name().into(), json!(text));
                    }
                    None => {
                        lines.push(format!("  {}. {} [approval]{when}", k + 1, s.id));
                        sj.insert("kind".into(), json!("approval"));
                    }
                }
                if let Some(a) = &s.approval {
                    lines.push(format!(
                        "     [approval required for each item] {}",
                        a.prompt_for(&s.id)
                    ));
                    sj.insert("approval".into(), gate_json(a, &s.id));
                }
                if let Some(c) = &s.when {
                    sj.insert("when".into(), json!(c.source));
                }
                let env = declared_env(&[&step.env, &s.env], args)?;
                if !env.is_empty() {
                    sj.insert("env".into(), env_json(&env));
                }
                subs.push(Value::Object(sj));
            }
            item.insert("steps".into(), Value::Array(subs));
        }
        StepKind::Approval(_) | StepKind::Input(_) => {}
    }
    let gate = match &step.kind {
        StepKind::Approval(a) => Some(a),
        _ => step.approval.as_ref(),
    };
    if let Some(a) = gate {
        let prompt = a.prompt_for(&step.id);
        item.insert("approval".into(), gate_json(a, &step.id));
        lines.push(format!(
            "[approval required] {prompt}{}{}",
            a.required_approver
                .as_ref()
                .map_or(String::new(), |r| format!(" (approver: {r})")),
            if a.require_different_approver {
                " (a different person must approve)"
            } else {
                ""
            }
        ));
    }
    if let StepKind::Input(req) = &step.kind {
        item.insert(
            "input".into(),
            json!({"prompt": req.prompt, "responseSchema": req.response_schema}),
        );
        lines.push(format!("[input required] {}", req.prompt));
    }
    if !matches!(step.kind, StepKind::Parallel(_)) {
        let env = declared_env(&[&step.env], args)?;
        if !env.is_empty() {
            lines.push(format!(
                "env: {}",
                env.iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            ));
            item.insert("env".into(), env_json(&env));
        }
    }
    if let Some(cwd) = step.cwd.as_ref().or(wf.cwd.as_ref()) {
        let cwd = cwd.render(vars)?;
        lines.push(format!("cwd: {cwd}"));
        item.insert("cwd".into(), json!(cwd));
    }
    match &step.stdin {
        None => {}
        Some(Stdin::Ref(r)) => {
            lines.push(format!("stdin: {r}  [step result at run time]"));
            item.insert("stdin".into(), json!(r.to_string()));
        }
        Some(s) => {
            let v = stdin_value(Some(s), args, None)?.unwrap_or(Value::Null);
            lines.push(format!("stdin: {}", render_value(Some(&v))));
            item.insert("stdin".into(), v);
        }
    }
    if let Some(t) = step.timeout_ms {
        lines.push(format!("timeout: {t}ms"));
        item.insert("timeoutMs".into(), json!(t));
    }
    if step.on_error != OnError::Stop {
        let v = match step.on_error {
            OnError::Continue => "continue",
            _ => "skip_rest",
        };
        lines.push(format!("on_error: {v}"));
        item.insert("onError".into(), json!(v));
    }
    if let Some(r) = step.retry {
        let backoff = match r.backoff {
            Backoff::Fixed => "fixed",
            Backoff::Exponential => "exponential",
        };
        lines.push(format!(
            "retry: up to {} attempts, {backoff} backoff (base {}ms, max {}ms{})",
            r.max,
            r.delay_ms,
            r.max_delay_ms,
            if r.jitter { ", jitter" } else { "" }
        ));
        item.insert(
            "retry".into(),
            json!({"max": r.max, "backoff": backoff, "delayMs": r.delay_ms, "maxDelayMs": r.max_delay_ms, "jitter": r.jitter}),
        );
    }
    let mut all = vec![head];
    all.extend(lines);
    Ok((Value::Object(item), all))
}

/// An approval gate as the plan shows it.
fn gate_json(a: &crate::workflows::format::Approval, id: &str) -> Value {
    let mut aj = serde_json::Map::new();
    aj.insert("prompt".into(), json!(a.prompt_for(id)));
    if let Some(r) = &a.required_approver {
        aj.insert("requiredApprover".into(), json!(r));
    }
    if a.require_different_approver {
        aj.insert("requireDifferentApprover".into(), json!(true));
    }
    Value::Object(aj)
}
