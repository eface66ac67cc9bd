//! `chitin workflow graph`: a workflow as a Mermaid flowchart, a Graphviz digraph or text.
//!
//! Nodes are the steps; parallel branches and for_each bodies are nested (Mermaid subgraphs,
//! Graphviz clusters, indented lines). Approval gates (pure gates and steps that ask after
//! running) are diamonds, input gates hexagons. Edges, as in Lobster's `graph`: `next` between
//! consecutive steps, `stdin` / `for_each` from the step whose result is read, and a conditional
//! edge labelled `when: <condition>` from every step a condition reads; plus `branch` edges
//! into parallel branches and `each item` / `next` / `next item` edges around a loop body.
//! Output depends only on the file (no arguments, no time), so it can be diffed.

use super::condition::Condition;
use super::format::{Action, Stdin, StepKind, Workflow};
use super::template::Template;

/// The output syntax.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GraphFormat {
    Mermaid,
    Dot,
    Ascii,
}

impl std::str::FromStr for GraphFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "mermaid" => Ok(Self::Mermaid),
            "dot" => Ok(Self::Dot),
            "ascii" => Ok(Self::Ascii),
            other => Err(format!(
                "unknown graph format `{other}`; use mermaid, dot or ascii"
            )),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    Box,
    Approval,
    Input,
}

#[derive(Debug, Clone)]
struct GNode {
    id: String,
    kind: String,
    details: Vec<String>,
    shape: Shape,
    /// The step whose branches / loop body this node belongs to.
    parent: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct GEdge {
    from: String,
    to: String,
    label: String,
}

struct Graph {
    title: Option<String>,
    nodes: Vec<GNode>,
    /// `(parent step id, caption)` of each group, in order.
    groups: Vec<(String, String)>,
    edges: Vec<GEdge>,
}

impl Graph {
    fn edge(&mut self, from: &str, to: &str, label: &str) {
        let e = GEdge {
            from: from.to_string(),
            to: to.to_string(),
            label: label.to_string(),
        };
        if !self.edges.contains(&e) && self.nodes.iter().any(|n| n.id == from) {
            self.edges.push(e);
        }
    }
}

/// One line of label text: whitespace collapsed, at most 80 characters.
fn clip(s: &str) -> String {
    let flat = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if flat.chars().count() <= 80 {
        flat
    } else {
        let mut t: String = flat.chars().take(79).collect();
        t.push('…');
        t
    }
}

fn action_detail(a: &Action) -> String {
    clip(&format!("{}: {}", a.name(), a.template().source))
}

fn when_label(c: &Condition) -> String {
    let l = format!("when: {}", c.source.trim());
    if l.chars().count() <= 70 {
        l
    } else {
        let mut t: String = l.chars().take(69).collect();
        t.push('…');
        t
    }
}

fn build(wf: &Workflow) -> Graph {
    let mut g = Graph {
        title: wf.name.clone(),
        nodes: Vec::new(),
        groups: Vec::new(),
        edges: Vec::new(),
    };
    // Nodes first, so data edges can point back to any earlier node.
    for step in &wf.steps {
        let (kind, mut details) = match &step.kind {
            StepKind::Shell(t) => ("run", vec![clip(&format!("run: {}", t.source))]),
            StepKind::Pipeline(t) => ("pipeline", vec![clip(&format!("pipeline: {}", t.source))]),
            StepKind::Workflow(w) => (
                "workflow",
                vec![clip(&format!("workflow: {}", w.path.source))],
            ),
            StepKind::Parallel(p) => (
                "parallel",
                vec![format!(
                    "parallel ({})",
                    match p.wait {
                        super::format::Wait::All => "all",
                        super::format::Wait::Any => "any",
                    }
                )],
            ),
            StepKind::ForEach(f) => ("for_each", vec![clip(&format!("for_each: {}", f.items))]),
            StepKind::Approval(a) => (
                "approval",
                vec![clip(&format!("approval gate: {}", a.prompt_for(&step.id)))],
            ),
            StepKind::Input(i) => ("input", vec![clip(&format!("input request: {}", i.prompt))]),
        };
        if let Some(a) = &step.approval {
            details.push(clip(&format!("then approval: {}", a.prompt_for(&step.id))));
        }
        if let Some(c) = &step.when {
            details.push(clip(&format!("when: {}", c.source)));
        }
        let shape = match (&step.kind, &step.approval) {
            (StepKind::Input(_), _) => Shape::Input,
            (StepKind::Approval(_), _) | (_, Some(_)) => Shape::Approval,
            _ => Shape::Box,
        };
        g.nodes.push(GNode {
            id: step.id.clone(),
            kind: kind.to_string(),
            details,
            shape,
            parent: None,
        });
        match &step.kind {
            StepKind::Parallel(p) => {
                g.groups
                    .push((step.id.clone(), format!("{}: branches", step.id)));
                for b in &p.branches {
                    let mut details: Vec<String> = b.action.iter().map(action_detail).collect();
                    if let Some(a) = &b.approval {
                        details.push(clip(&format!("approval: {}", a.prompt_for(&b.id))));
                    }
                    g.nodes.push(GNode {
                        id: b.id.clone(),
                        kind: format!(
                            "branch {}",
                            b.action.as_ref().map_or("approval", Action::name)
                        ),
                        details,
                        shape: Shape::Box,
                        parent: Some(step.id.clone()),
                    });
                }
            }
            StepKind::ForEach(f) => {
                g.groups.push((
                    step.id.clone(),
                    format!("{}: for each ${}", step.id, f.item_var),
                ));
                for s in &f.steps {
                    let mut details: Vec<String> = s.action.iter().map(action_detail).collect();
                    if let Some(a) = &s.approval {
                        details.push(clip(&format!("approval: {}", a.prompt_for(&s.id))));
                    }
                    if let Some(c) = &s.when {
                        details.push(clip(&format!("when: {}", c.source)));
                    }
                    g.nodes.push(GNode {
                        id: s.id.clone(),
                        kind: format!(
                            "loop {}",
                            s.action.as_ref().map_or("approval", Action::name)
                        ),
                        details,
                        shape: Shape::Box,
                        parent: Some(step.id.clone()),
                    });
                }
            }
            _ => {}
        }
    }
    let stdin_refs = |s: Option<&Stdin>| -> Vec<String> {
        match s {
            Some(Stdin::Ref(r)) => vec![r.step.clone()],
            Some(Stdin::Text(t)) => refs_of(t),
            _ => Vec::new(),
        }
    };
    let mut prev: Option<&str> = None;
    for step in &wf.steps {
        if let Some(p) = prev {
            g.edge(p, &step.id, "next");
        }
        prev = Some(&step.id);
        for r in stdin_refs(step.stdin.as_ref()) {
            g.edge(&r, &step.id, "stdin");
        }
        if let Some(c) = &step.when {
            let label = when_label(c);
            for r in c.refs() {
                g.edge(&r.step, &step.id, &label);
            }
        }
        match &step.kind {
            StepKind::Parallel(p) => {
                for b in &p.branches {
                    g.edge(&step.id, &b.id, "branch");
                    for r in stdin_refs(b.stdin.as_ref()) {
                        g.edge(&r, &b.id, "stdin");
                    }
                }
            }
            StepKind::ForEach(f) => {
                g.edge(&f.items.step, &step.id, "for_each");
                let mut last: Option<&str> = None;
                for s in &f.steps {
                    match last {
                        None => g.edge(&step.id, &s.id, "each item"),
                        Some(l) => g.edge(l, &s.id, "next"),
                    }
                    last = Some(&s.id);
                    for r in stdin_refs(s.stdin.as_ref()) {
                        g.edge(&r, &s.id, "stdin");
                    }
                    if let Some(c) = &s.when {
                        let label = when_label(c);
                        for r in c.refs() {
                            g.edge(&r.step, &s.id, &label);
                        }
                    }
                }
                if let Some(l) = last {
                    g.edge(l, &step.id, "next item");
                }
            }
            _ => {}
        }
    }
    g
}

fn refs_of(t: &Template) -> Vec<String> {
    t.refs().map(|r| r.step.clone()).collect()
}

/// Renders the workflow's graph.
pub fn render(wf: &Workflow, format: GraphFormat) -> String {
    let g = build(wf);
    match format {
        GraphFormat::Mermaid => mermaid(&g),
        GraphFormat::Dot => dot(&g),
        GraphFormat::Ascii => ascii(&g),
    }
}

fn mermaid_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '|' => out.push_str("&#124;"),
            '#' => out.push_str("&#35;"),
            c => out.push(c),
        }
    }
    out
}

/// Mermaid node keys: `[A-Za-z0-9_]`, not starting with a digit, never a keyword, unique.
fn mermaid_keys(g: &Graph) -> std::collections::HashMap<String, String> {
    let mut used = std::collections::HashSet::new();
    let mut map = std::collections::HashMap::new();
    for n in &g.nodes {
        let mut base: String =
            n.id.chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || c == '_' {
                        c
                    } else {
                        '_'
                    }
                })
                .collect();
        if base.starts_with(|c: char| c.is_ascii_digit()) {
            base = format!("s_{base}");
        }
        if matches!(
            base.to_ascii_lowercase().as_str(),
            "end" | "subgraph" | "graph" | "flowchart" | "style" | "class" | "click"
        ) {
            base.push('_');
        }
        let mut key = base.clone();
        let mut i = 2;
        while !used.insert(key.clone()) {
            key = format!("{base}_{i}");
            i += 1;
        }
        map.insert(n.id.clone(), key);
    }
    map
}

fn mermaid(g: &Graph) -> String {
    let keys = mermaid_keys(g);
    let key = |id: &str| keys.get(id).cloned().unwrap_or_default();
    let mut lines = vec!["flowchart TD".to_string()];
    if let Some(t) = &g.title {
        lines.insert(0, format!("%% workflow: {}", t.replace('\n', " ")));
    }
    let node_line = |n: &GNode, indent: &str| {
        let mut label = vec![mermaid_escape(&n.id)];
        label.extend(n.details.iter().map(|d| mermaid_escape(d)));
        let label = label.join("<br/>");
        match n.shape {
            Shape::Box => format!("{indent}{}[\"{label}\"]", key(&n.id)),
            Shape::Approval => format!("{indent}{}{{\"{label}\"}}", key(&n.id)),
            Shape::Input => format!("{indent}{}{{{{\"{label}\"}}}}", key(&n.id)),
        }
    };
    for n in g.nodes.iter().filter(|n| n.parent.is_none()) {
        lines.push(node_line(n, "  "));
        if let Some((parent, caption)) = g.groups.iter().find(|(p, _)| *p == n.id) {
            lines.push(format!(
                "  subgraph {}_group[\"{}\"]",
                key(parent),
                mermaid_escape(caption)
            ));
            for c in g
                .nodes
                .iter()
                .filter(|c| c.parent.as_deref() == Some(parent))
            {
                lines.push(node_line(c, "    "));
            }
            lines.push("  end".to_string());
        }
    }
    lines.push(String::new());
    for e in &g.edges {
        lines.push(format!(
            "  {} -->|{}| {}",
            key(&e.from),
            mermaid_escape(&e.label),
            key(&e.to)
        ));
    }
    lines.join("\n") + "\n"
}

fn dot_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

fn dot(g: &Graph) -> String {
    let mut lines = vec!["digraph workflow {".to_string()];
    if let Some(t) = &g.title {
        lines.push(format!("  label=\"{}\";", dot_escape(t)));
    }
    lines.push("  rankdir=TB;".to_string());
    let node_line = |n: &GNode, indent: &str| {
        let shape = match n.shape {
            Shape::Box => "box",
            Shape::Approval => "diamond",
            Shape::Input => "hexagon",
        };
        let mut label = vec![dot_escape(&n.id)];
        label.extend(n.details.iter().map(|d| dot_escape(d)));
        format!(
            "{indent}\"{}\" [shape={shape},label=\"{}\"];",
            dot_escape(&n.id),
            label.join("\\n")
        )
    };
    for n in g.nodes.iter().filter(|n| n.parent.is_none()) {
        lines.push(node_line(n, "  "));
        if let Some((parent, caption)) = g.groups.iter().find(|(p, _)| *p == n.id) {
            lines.push(format!("  subgraph \"cluster_{}\" {{", dot_escape(parent)));
            lines.push(format!("    label=\"{}\";", dot_escape(caption)));
            for c in g
                .nodes
                .iter()
                .filter(|c| c.parent.as_deref() == Some(parent))
            {
                lines.push(node_line(c, "    "));
            }
            lines.push("  }".to_string());
        }
    }
    lines.push(String::new());
    for e in &g.edges {
        let style = if e.label.starts_with("when:") {
            ",style=dashed"
        } else {
            ""
        };
        lines.push(format!(
            "  \"{}\" -> \"{}\" [label=\"{}\"{style}];",
            dot_escape(&e.from),
            dot_escape(&e.to),
            dot_escape(&e.label)
        ));
    }
    lines.push("}".to_string());
    lines.join("\n") + "\n"
}

fn ascii(g: &Graph) -> String {
    let mut lines = vec![match &g.title {
        Some(t) => format!("Workflow Graph: {}", clip(t)),
        None => "Workflow Graph".to_string(),
    }];
    lines.push(String::new());
    lines.push("Nodes:".to_string());
    let node_line = |n: &GNode, indent: &str| {
        let gate = match n.shape {
            Shape::Box => "",
            Shape::Approval => " <approval>",
            Shape::Input => " <input>",
        };
        format!(
            "{indent}- {} [{}]{gate} {}",
            n.id,
            n.kind,
            n.details.join(" | ")
        )
    };
    for n in g.nodes.iter().filter(|n| n.parent.is_none()) {
        lines.push(node_line(n, ""));
        for c in g
            .nodes
            .iter()
            .filter(|c| c.parent.as_deref() == Some(n.id.as_str()))
        {
            lines.push(node_line(c, "  "));
        }
    }
    lines.push(String::new());
    lines.push("Edges:".to_string());
    if g.edges.is_empty() {
        lines.push("- (none)".to_string());
    }
    for e in &g.edges {
        lines.push(format!("- {} -> {} ({})", e.from, e.to, e.label));
    }
    lines.join("\n") + "\n"
}
