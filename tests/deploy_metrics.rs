//! docs/metrics.md lists exactly the metrics the code exports (name and type), and the
//! Grafana dashboard and the Prometheus alert rules under deploy/ use only those metrics.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use yaml_rust2::YamlLoader;

#[path = "support/gateway.rs"]
mod harness;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn rs_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rs_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

fn ident_at(s: &str) -> &str {
    let end = s
        .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
        .unwrap_or(s.len());
    &s[..end]
}

/// Every metric the gateway exports, with its type: each family writes a `# TYPE` line, either
/// literally (`# TYPE chitin_x counter`) or through `Metrics::render`'s `family("chitin_x", ...)`
/// (counters).
fn code_metrics() -> BTreeMap<String, String> {
    let mut files = Vec::new();
    rs_files(&root().join("src"), &mut files);
    let mut out = BTreeMap::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        for (i, _) in text.match_indices("# TYPE chitin_") {
            let rest = &text[i + "# TYPE ".len()..];
            let name = ident_at(rest);
            let ty = ident_at(rest[name.len()..].trim_start());
            assert!(
                !ty.is_empty(),
                "{}: # TYPE {name} without a type",
                f.display()
            );
            out.insert(name.to_string(), ty.to_string());
        }
        for (i, _) in text.match_indices("family(") {
            let rest = text[i + "family(".len()..].trim_start();
            if let Some(r) = rest.strip_prefix("\"chitin_") {
                let name = format!("chitin_{}", ident_at(r));
                out.insert(name, "counter".to_string());
            }
        }
    }
    assert!(out.len() > 20, "the scan found too few metrics: {out:?}");
    out
}

/// The table of docs/metrics.md: name -> type.
fn documented() -> BTreeMap<String, String> {
    let text = std::fs::read_to_string(root().join("docs/metrics.md")).unwrap();
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        if cells.len() < 6 {
            continue;
        }
        let Some(name) = cells[1]
            .strip_prefix("`chitin_")
            .and_then(|n| n.strip_suffix('`'))
        else {
            continue;
        };
        let name = format!("chitin_{name}");
        assert!(!cells[4].is_empty(), "{name} has no meaning");
        assert!(
            out.insert(name.clone(), cells[2].to_string()).is_none(),
            "{name} is listed twice"
        );
    }
    out
}

#[test]
fn every_exported_metric_is_documented_with_its_type_and_nothing_else_is() {
    let code = code_metrics();
    let docs = documented();
    let missing: Vec<_> = code.keys().filter(|k| !docs.contains_key(*k)).collect();
    assert!(
        missing.is_empty(),
        "exported but not in docs/metrics.md: {missing:?}"
    );
    let stale: Vec<_> = docs.keys().filter(|k| !code.contains_key(*k)).collect();
    assert!(
        stale.is_empty(),
        "in docs/metrics.md but not exported: {stale:?}"
    );
    for (name, ty) in &code {
        assert_eq!(&docs[name], ty, "type of {name}");
    }
}

/// The metric names an expression uses (summary series map to their family).
fn used(expr: &str, known: &BTreeMap<String, String>) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (i, _) in expr.match_indices("chitin_") {
        if i > 0 {
            let before = expr.as_bytes()[i - 1];
            if before.is_ascii_alphanumeric() || before == b'_' {
                continue;
            }
        }
        let name = ident_at(&expr[i..]).to_string();
        let base = ["_sum", "_count", "_bucket"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .filter(|b| {
                known
                    .get(*b)
                    .is_some_and(|t| t == "summary" || t == "histogram")
            })
            .map_or(name.clone(), str::to_string);
        out.insert(base);
    }
    out
}

#[test]
fn the_alert_rules_cover_the_required_signals_and_use_only_exported_metrics() {
    let code = code_metrics();
    let text = std::fs::read_to_string(root().join("deploy/prometheus-alerts.yml")).unwrap();
    let docs = YamlLoader::load_from_str(&text).unwrap();
    let groups = docs[0]["groups"].as_vec().expect("groups");
    let mut all = BTreeSet::new();
    let mut names = BTreeSet::new();
    for g in groups {
        assert!(g["name"].as_str().is_some());
        for r in g["rules"].as_vec().expect("rules") {
            let alert = r["alert"].as_str().expect("alert name");
            assert!(names.insert(alert.to_string()), "{alert} twice");
            let expr = r["expr"]
                .as_str()
                .unwrap_or_else(|| panic!("{alert}: expr"));
            assert!(
                ["critical", "warning", "info"]
                    .contains(&r["labels"]["severity"].as_str().unwrap_or("")),
                "{alert}: labels.severity"
            );
            assert!(
                r["annotations"]["summary"].as_str().is_some(),
                "{alert}: summary"
            );
            let u = used(expr, &code);
            assert!(!u.is_empty(), "{alert} uses no chitin metric: {expr}");
            for m in &u {
                assert!(
                    code.contains_key(m),
                    "{alert} uses {m}, which the gateway does not export"
                );
            }
            all.extend(u);
        }
    }
    // The signals issue #19 asks for: audit append failures, dead letters, approval backlog,
    // sandbox refusals, budget exhaustion, failed-auth bursts.
    for m in [
        "chitin_audit_sink_up",
        "chitin_channel_dead_letters_total",
        "chitin_approvals_pending",
        "chitin_sandbox_refusals_total",
        "chitin_budget_exhausted_total",
        "chitin_auth_failures_total",
    ] {
        assert!(all.contains(m), "no alert on {m}");
    }
}

#[test]
fn the_grafana_dashboard_is_valid_json_and_uses_only_exported_metrics() {
    let code = code_metrics();
    let text = std::fs::read_to_string(root().join("deploy/grafana-dashboard.json")).unwrap();
    let d: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert!(d["title"].as_str().is_some() && d["uid"].as_str().is_some());
    let panels = d["panels"].as_array().unwrap();
    assert!(panels.len() >= 10);
    let mut ids = BTreeSet::new();
    let mut all = BTreeSet::new();
    for p in panels {
        assert!(
            ids.insert(p["id"].as_u64().unwrap()),
            "panel ids are unique"
        );
        let g = &p["gridPos"];
        assert!(
            g["x"].as_u64().unwrap() + g["w"].as_u64().unwrap() <= 24,
            "{p}"
        );
        for t in p["targets"].as_array().unwrap() {
            let expr = t["expr"].as_str().unwrap();
            assert!(t["refId"].as_str().is_some());
            let u = used(expr, &code);
            for m in &u {
                assert!(
                    code.contains_key(m),
                    "panel {} uses {m}, which the gateway does not export",
                    p["title"]
                );
            }
            all.extend(u);
        }
    }
    // Every exported family is on the dashboard.
    let missing: Vec<_> = code.keys().filter(|k| !all.contains(*k)).collect();
    assert!(missing.is_empty(), "not on the dashboard: {missing:?}");
}

fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[test]
fn a_running_gateway_exports_the_audit_sink_and_the_approval_backlog() {
    let gw = harness::Gw::start("");
    let m = gw.get("/metrics").body;
    assert_eq!(value(&m, "chitin_audit_sink_up"), Some(1.0), "{m}");
    assert_eq!(value(&m, "chitin_approvals_pending"), Some(0.0), "{m}");
    assert!(
        m.contains("# TYPE chitin_sandbox_refusals_total counter"),
        "{m}"
    );
    // A call that needs a person opens an approval: the backlog is 1 until it is answered.
    let call = serde_json::json!({"tool": "exec", "args": {"argv": ["/bin/echo", "x"], "network": ["127.0.0.1:9"]}, "session": "s-metrics"});
    let r = gw.invoke(&call);
    assert_eq!(r.status, 202, "{}", r.body);
    let code = r.json()["approval"]["code"].as_str().unwrap().to_string();
    assert_eq!(
        value(&gw.get("/metrics").body, "chitin_approvals_pending"),
        Some(1.0)
    );
    let out = gw.chitin(&["approvals", "deny", &code]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        value(&gw.get("/metrics").body, "chitin_approvals_pending"),
        Some(0.0)
    );
    // Every family the scrape shows is documented.
    let docs = documented();
    for l in m.lines().filter(|l| l.starts_with("# TYPE ")) {
        let name = l.split(' ').nth(2).unwrap();
        assert!(
            docs.contains_key(name),
            "{name} is exported but not documented"
        );
    }
}
