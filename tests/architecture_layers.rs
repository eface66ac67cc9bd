//! `ARCHITECTURE.md`'s "may import" table is the law: every `crate::<module>` reference in the
//! code of a module of `src/` must be allowed by that module's row, and the modules form no
//! import cycle. The references are read from the source with comments and string literals
//! removed, including grouped imports (`use crate::{a, b::c}`) and inline paths
//! (`crate::a::f()`).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed assertion is the report"
)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The modules of `src/`: every `src/<name>.rs` and `src/<name>/` but `lib` and `main`.
fn modules() -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for e in std::fs::read_dir(root().join("src")).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().to_string_lossy().to_string();
        if e.file_type().unwrap().is_dir() {
            out.insert(name);
        } else if let Some(stem) = name.strip_suffix(".rs")
            && stem != "lib"
            && stem != "main"
        {
            out.insert(stem.to_string());
        }
    }
    out
}

/// The source text with comments, string and character literals replaced by spaces.
fn code_only(src: &str) -> String {
    let b: Vec<char> = src.chars().collect();
    let mut out = String::with_capacity(src.len());
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        let next = b.get(i + 1).copied();
        if c == '/' && next == Some('/') {
            while i < b.len() && b[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            let mut depth = 0;
            while i < b.len() {
                if b[i] == '/' && b.get(i + 1) == Some(&'*') {
                    depth += 1;
                    i += 2;
                } else if b[i] == '*' && b.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
            out.push(' ');
        } else if c == 'r' && (next == Some('"') || next == Some('#')) && !ident_before(&b, i) {
            // raw string r"..." / r#"..."#
            let mut j = i + 1;
            let mut hashes = 0;
            while b.get(j) == Some(&'#') {
                hashes += 1;
                j += 1;
            }
            if b.get(j) != Some(&'"') {
                out.push(c);
                i += 1;
                continue;
            }
            j += 1;
            loop {
                if j >= b.len() {
                    break;
                }
                if b[j] == '"' && (0..hashes).all(|k| b.get(j + 1 + k) == Some(&'#')) {
                    j += 1 + hashes;
                    break;
                }
                j += 1;
            }
            i = j;
            out.push(' ');
        } else if c == '"' {
            i += 1;
            while i < b.len() && b[i] != '"' {
                if b[i] == '\\' {
                    i += 1;
                }
                i += 1;
            }
            i += 1;
            out.push(' ');
        } else if c == '\'' {
            // a char literal ('a', '\n', '\u{..}') or a lifetime ('a)
            if next == Some('\\') {
                i += 2;
                while i < b.len() && b[i] != '\'' {
                    i += 1;
                }
                i += 1;
                out.push(' ');
            } else if b.get(i + 2) == Some(&'\'') {
                i += 3;
                out.push(' ');
            } else {
                out.push(c);
                i += 1;
            }
        } else {
            out.push(c);
            i += 1;
        }
    }
    out
}

fn ident_before(b: &[char], i: usize) -> bool {
    i > 0 && (b[i - 1].is_alphanumeric() || b[i - 1] == '_')
}

fn ident_at(b: &[char], mut i: usize) -> (String, usize) {
    while i < b.len() && b[i].is_whitespace() {
        i += 1;
    }
    let start = i;
    while i < b.len() && (b[i].is_alphanumeric() || b[i] == '_') {
        i += 1;
    }
    (b[start..i].iter().collect(), i)
}

/// The first path segment after every `crate::` in `code` (grouped imports expanded).
fn crate_refs(code: &str) -> BTreeSet<String> {
    let b: Vec<char> = code.chars().collect();
    let mut out = BTreeSet::new();
    let pat: Vec<char> = "crate::".chars().collect();
    let mut i = 0;
    while i + pat.len() <= b.len() {
        if b[i..i + pat.len()] == pat[..] && !ident_before(&b, i) {
            let mut j = i + pat.len();
            while j < b.len() && b[j].is_whitespace() {
                j += 1;
            }
            if b.get(j) == Some(&'{') {
                // `crate::{a, b::{c, d}, e}`: the first segment of each top-level item
                let mut depth = 0;
                let mut at_item_start = true;
                j += 1;
                while j < b.len() {
                    match b[j] {
                        '{' => depth += 1,
                        '}' if depth == 0 => break,
                        '}' => depth -= 1,
                        ',' if depth == 0 => at_item_start = true,
                        c if at_item_start && (c.is_alphanumeric() || c == '_') => {
                            let (id, end) = ident_at(&b, j);
                            out.insert(id);
                            at_item_start = false;
                            j = end;
                            continue;
                        }
                        _ => {}
                    }
                    j += 1;
                }
            } else {
                let (id, end) = ident_at(&b, j);
                if !id.is_empty() {
                    out.insert(id);
                }
                j = end;
            }
            i = j;
        } else {
            i += 1;
        }
    }
    out
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

/// module -> the modules its code refers to through `crate::`.
fn actual_edges(mods: &BTreeSet<String>) -> BTreeMap<String, BTreeSet<String>> {
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for m in mods {
        let mut files = Vec::new();
        let file = root().join("src").join(format!("{m}.rs"));
        if file.is_file() {
            files.push(file);
        }
        let dir = root().join("src").join(m);
        if dir.is_dir() {
            rs_files(&dir, &mut files);
        }
        let set = edges.entry(m.clone()).or_default();
        for f in files {
            let code = code_only(&std::fs::read_to_string(&f).unwrap());
            for r in crate_refs(&code) {
                if r != *m && mods.contains(&r) {
                    set.insert(r);
                }
            }
        }
    }
    edges
}

/// module -> the modules its row of the table allows (`None`: "every module").
fn table(mods: &BTreeSet<String>) -> BTreeMap<String, Option<BTreeSet<String>>> {
    let text = std::fs::read_to_string(root().join("ARCHITECTURE.md")).unwrap();
    let section = text
        .split("## Modules of `src/`")
        .nth(1)
        .expect("ARCHITECTURE.md has a \"## Modules of `src/`\" section");
    let mut rows = BTreeMap::new();
    for line in section.lines() {
        if line.starts_with("## ") {
            break;
        }
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        // ["", module, owns, may import, invariants, ""]
        if cells.len() < 5 {
            continue;
        }
        let Some(name) = cells[1].strip_prefix('`').and_then(|s| s.strip_suffix('`')) else {
            continue;
        };
        if !mods.contains(name) {
            continue;
        }
        let may = cells[3];
        if may.contains("every module") {
            rows.insert(name.to_string(), None);
            continue;
        }
        let allowed: BTreeSet<String> = may
            .split('`')
            .skip(1)
            .step_by(2)
            .map(|tok| tok.split("::").next().unwrap_or("").to_string())
            .filter(|t| mods.contains(t))
            .collect();
        rows.insert(name.to_string(), Some(allowed));
    }
    rows
}

#[test]
fn every_module_imports_only_what_the_architecture_table_allows() {
    let mods = modules();
    let rows = table(&mods);
    let missing: Vec<&String> = mods.iter().filter(|m| !rows.contains_key(*m)).collect();
    assert!(
        missing.is_empty(),
        "modules of src/ without a row in ARCHITECTURE.md's table: {missing:?}"
    );
    let mut violations = Vec::new();
    for (m, uses) in actual_edges(&mods) {
        if let Some(Some(allowed)) = rows.get(&m) {
            for u in uses {
                if !allowed.contains(&u) {
                    violations.push(format!("{m} -> {u}"));
                }
            }
        }
    }
    assert!(
        violations.is_empty(),
        "imports the ARCHITECTURE.md table does not allow (fix the code or the table): {violations:?}"
    );
}

#[test]
fn the_modules_form_no_import_cycle() {
    let mods = modules();
    let edges = actual_edges(&mods);
    // depth-first search with colours; report the first cycle found
    fn visit(
        m: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(m.to_string(), 1);
        stack.push(m.to_string());
        for n in edges.get(m).into_iter().flatten() {
            match state.get(n).copied().unwrap_or(0) {
                1 => {
                    let start = stack.iter().position(|s| s == n).unwrap_or(0);
                    let mut cycle = stack[start..].to_vec();
                    cycle.push(n.clone());
                    return Some(cycle);
                }
                0 => {
                    if let Some(c) = visit(n, edges, state, stack) {
                        return Some(c);
                    }
                }
                _ => {}
            }
        }
        stack.pop();
        state.insert(m.to_string(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for m in &mods {
        if state.get(m).copied().unwrap_or(0) == 0 {
            let mut stack = Vec::new();
            if let Some(cycle) = visit(m, &edges, &mut state, &mut stack) {
                panic!("import cycle among modules of src/: {}", cycle.join(" -> "));
            }
        }
    }
}

#[test]
fn the_reference_reader_sees_grouped_inline_and_ignores_comments_and_strings() {
    let code = code_only(
        "use crate::{gate::{A, B}, clock};\n// crate::cli\n/* crate::store */\nlet s = \"crate::vault\";\nlet r = r#\"crate::agent\"#;\nfn f<'a>() { crate::policy::x(); let c = '\"'; }\n",
    );
    let refs = crate_refs(&code);
    let want: BTreeSet<String> = ["gate", "clock", "policy"].map(String::from).into();
    assert_eq!(refs, want);
}

#[test]
fn only_approvals_makes_the_gates_proof_of_a_redeemed_approval() {
    let mut files = Vec::new();
    rs_files(&root().join("src"), &mut files);
    let mut makers = Vec::new();
    for f in files {
        let code = code_only(&std::fs::read_to_string(&f).unwrap());
        if code.contains("after_redemption(") {
            let rel = f.strip_prefix(root()).unwrap().display().to_string();
            makers.push(rel);
        }
    }
    makers.sort();
    // gate.rs defines it; approvals.rs is the one caller.
    assert_eq!(makers, ["src/approvals.rs", "src/gate.rs"]);
}

/// `release/text-order.txt` (build.rs, `release_layout`) is read by the linker, which skips
/// names it does not find without a word: a list mangled by an edit or written from the wrong
/// binary would silently undo the layout. Each line must be one symbol as the linker spells it.
#[test]
fn the_release_text_order_names_each_function_once_as_the_linker_spells_it() {
    let text = std::fs::read_to_string(root().join("release/text-order.txt")).unwrap();
    let names: Vec<&str> = text.lines().collect();
    assert!(
        names.len() > 1000,
        "only {} names: regenerate it with scripts/text-order.py",
        names.len()
    );
    let mut seen = BTreeSet::new();
    for (n, name) in names.iter().enumerate() {
        let line = n + 1;
        assert!(!name.is_empty(), "line {line} is empty");
        assert!(
            name.bytes().all(|b| b.is_ascii_graphic() && b != b'\''),
            "line {line} is not a symbol name (callgrind's recursion marker or a space?): {name:?}"
        );
        assert!(
            !name.starts_with("0x"),
            "line {line} is an address, not a name: {name}"
        );
        assert!(seen.insert(*name), "line {line} repeats {name}");
    }
    // Written from a chitin binary: the gateway's own functions, mangled.
    for own in [
        "_ZN6chitin7gateway",
        "_ZN6chitin5agent",
        "_ZN12chitin_audit",
    ] {
        assert!(
            names.iter().any(|n| n.starts_with(own)),
            "no function of {own}*: is this list from a chitin binary?"
        );
    }
    assert!(
        names.contains(&"main"),
        "the list misses main: was the binary run from its start?"
    );
}
