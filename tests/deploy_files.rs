//! The container files, checked statically (CI has no Docker daemon): the Dockerfile is a
//! multi-stage build whose runtime stage is small, runs as a non-root user and keeps the
//! state directory in a volume; compose.yaml parses and runs that image read-only, as that
//! user, with the state volume, the passphrase as a secret file and the sandbox's options.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

use std::path::PathBuf;

use yaml_rust2::{Yaml, YamlLoader};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Dockerfile instructions: (KEYWORD, arguments), continuation lines joined, comments dropped.
fn instructions(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for line in text.lines() {
        let t = line.trim();
        if cur.is_empty() && (t.is_empty() || t.starts_with('#')) {
            continue;
        }
        if t.starts_with('#') {
            continue;
        }
        if let Some(rest) = t.strip_suffix('\\') {
            cur.push_str(rest);
            cur.push(' ');
            continue;
        }
        cur.push_str(t);
        let (k, v) = cur.split_once(char::is_whitespace).unwrap_or((&cur, ""));
        out.push((k.to_ascii_uppercase(), v.trim().to_string()));
        cur.clear();
    }
    assert!(cur.is_empty(), "a continuation line ends the Dockerfile");
    out
}

fn rust_version() -> (u32, u32) {
    let cargo = std::fs::read_to_string(root().join("Cargo.toml")).unwrap();
    let v: toml::Value = toml::from_str(&cargo).unwrap();
    let rv = v["workspace"]["package"]["rust-version"].as_str().unwrap();
    let mut it = rv.split('.').map(|x| x.parse::<u32>().unwrap());
    (it.next().unwrap(), it.next().unwrap())
}

#[test]
fn the_dockerfile_is_multi_stage_small_and_runs_as_a_non_root_user_with_the_state_in_a_volume() {
    let text = std::fs::read_to_string(root().join("Dockerfile")).unwrap();
    let ins = instructions(&text);
    let args: std::collections::BTreeMap<String, String> = ins
        .iter()
        .filter(|(k, _)| k == "ARG")
        .filter_map(|(_, v)| v.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let subst = |s: &str| {
        let mut s = s.to_string();
        for (k, v) in &args {
            s = s.replace(&format!("${{{k}}}"), v);
        }
        s
    };
    let froms: Vec<usize> = ins
        .iter()
        .enumerate()
        .filter(|(_, (k, _))| k == "FROM")
        .map(|(i, _)| i)
        .collect();
    assert!(froms.len() >= 2, "a multi-stage build: {froms:?}");
    // The build stage: a Rust toolchain at least the workspace's rust-version, --locked.
    let build_from = subst(&ins[froms[0]].1);
    let (image, stage) = build_from.split_once(" AS ").unwrap();
    let stage = stage.trim();
    let tag = image
        .strip_prefix("rust:")
        .expect("the build stage uses the rust image");
    let mut ver = tag
        .split('-')
        .next()
        .unwrap()
        .split('.')
        .map(|x| x.parse::<u32>().unwrap());
    let have = (ver.next().unwrap(), ver.next().unwrap());
    assert!(
        have >= rust_version(),
        "rust:{tag} is older than rust-version {:?}",
        rust_version()
    );
    let runs: Vec<&String> = ins
        .iter()
        .filter(|(k, _)| k == "RUN")
        .map(|(_, v)| v)
        .collect();
    assert!(
        runs.iter()
            .any(|r| r.contains("cargo build --release --locked")),
        "{runs:?}"
    );
    // Every binary the workspace defines that the image ships is built.
    assert!(runs.iter().any(|r| r.contains("target/release/chitin ")));
    assert!(
        runs.iter()
            .any(|r| r.contains("target/release/chitin-audit-verify"))
    );
    // The tool path's small sandbox launcher, next to `chitin` (without it every tool call
    // falls back to exec'ing the whole gateway binary as the launcher).
    assert!(
        runs.iter()
            .any(|r| r.contains("target/release/chitin-sandbox-launch /out/chitin-sandbox-launch"))
    );
    assert!(
        runs.iter()
            .any(|r| r.contains("target/release/chitin-fs-helper /out/chitin-fs-helper"))
    );

    // The runtime stage.
    let last = *froms.last().unwrap();
    let runtime: Vec<&(String, String)> = ins[last..].iter().collect();
    let base = subst(&runtime[0].1);
    assert!(
        base.contains("-slim") || base.contains("distroless"),
        "the runtime image is small: {base}"
    );
    assert!(
        !base.starts_with("rust:"),
        "no toolchain in the runtime image"
    );
    let get = |k: &str| -> Vec<&str> {
        runtime
            .iter()
            .filter(|(kk, _)| kk == k)
            .map(|(_, v)| v.as_str())
            .collect()
    };
    assert!(
        get("COPY")
            .iter()
            .any(|c| c.contains(&format!("--from={stage}"))),
        "the binaries come from the build stage"
    );
    let user = get("USER");
    let user = user.last().expect("a USER in the runtime stage");
    let name = user.split(':').next().unwrap();
    assert!(name != "root" && name != "0", "USER {user}");
    if let Ok(uid) = name.parse::<u32>() {
        assert!(uid >= 1000, "a non-system uid: {uid}");
        assert!(
            runs.iter().any(|r| r.contains(&format!("--uid {uid}"))),
            "the user exists in the image"
        );
    }
    let env = get("ENV").join(" ");
    let home = env
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix("CHITIN_HOME="))
        .expect("ENV CHITIN_HOME");
    let volumes = get("VOLUME").join(" ");
    assert!(
        volumes.contains(&format!("\"{home}\"")),
        "VOLUME has {home}: {volumes}"
    );
    let entry = get("ENTRYPOINT").join(" ");
    assert!(entry.contains("chitin"), "{entry}");
    assert_eq!(get("CMD"), vec!["[\"gateway\"]"]);
    // No secrets or remote downloads in the image.
    for (k, v) in &ins {
        assert!(k != "ADD", "ADD {v}: use COPY");
        assert!(!v.contains("PASSPHRASE"), "{k} {v}");
    }
    let ignore = std::fs::read_to_string(root().join(".dockerignore")).unwrap();
    assert!(
        ignore.lines().any(|l| l.trim() == "target/"),
        ".dockerignore keeps target/ out"
    );
}

fn key<'a>(y: &'a Yaml, k: &str) -> &'a Yaml {
    &y[k]
}

fn strings(y: &Yaml) -> Vec<String> {
    y.as_vec()
        .map(|v| {
            v.iter()
                .map(|x| {
                    x.as_str()
                        .map(str::to_string)
                        .unwrap_or_else(|| format!("{x:?}"))
                })
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn the_compose_file_parses_and_runs_the_image_read_only_as_its_user_with_the_sandbox_options() {
    let text = std::fs::read_to_string(root().join("compose.yaml")).unwrap();
    let docs = YamlLoader::load_from_str(&text).unwrap();
    assert_eq!(docs.len(), 1);
    let doc = &docs[0];
    let svc = key(key(doc, "services"), "chitin");
    assert!(!svc.is_badvalue(), "services.chitin");
    let dockerfile = std::fs::read_to_string(root().join("Dockerfile")).unwrap();
    let ins = instructions(&dockerfile);
    let image_user = ins
        .iter()
        .rev()
        .find(|(k, _)| k == "USER")
        .unwrap()
        .1
        .clone();
    assert_eq!(key(svc, "user").as_str(), Some(image_user.as_str()));
    assert_eq!(
        key(key(svc, "build"), "dockerfile").as_str(),
        Some("Dockerfile")
    );
    assert_eq!(key(svc, "read_only").as_bool(), Some(true));
    assert!(
        strings(key(svc, "tmpfs"))
            .iter()
            .any(|t| t.starts_with("/tmp"))
    );
    assert_eq!(strings(key(svc, "cap_drop")), vec!["ALL"]);
    let env = key(svc, "environment");
    assert_eq!(key(env, "CHITIN_HOME").as_str(), Some("/var/lib/chitin"));
    assert_eq!(
        key(env, "CREDENTIALS_DIRECTORY").as_str(),
        Some("/run/secrets")
    );
    assert!(
        key(env, "CHITIN_PASSPHRASE").is_badvalue(),
        "no passphrase in the environment"
    );
    // The named volumes are mounted at the image's volumes and declared.
    let vols = strings(key(svc, "volumes"));
    assert!(
        vols.contains(&"chitin-state:/var/lib/chitin".to_string()),
        "{vols:?}"
    );
    let declared = key(doc, "volumes").as_hash().unwrap();
    for v in &vols {
        let name = v.split(':').next().unwrap();
        assert!(
            declared.contains_key(&Yaml::String(name.into())),
            "volume {name} is declared"
        );
    }
    // Secrets referenced are declared, and the passphrase is the credential Chitin reads.
    let secrets = strings(key(svc, "secrets"));
    assert!(secrets.contains(&"chitin-passphrase".to_string()));
    let top = key(doc, "secrets");
    for s in &secrets {
        assert!(
            !key(key(top, s), "file").is_badvalue(),
            "secret {s} has a file"
        );
    }
    // Published on loopback only.
    for p in strings(key(svc, "ports")) {
        assert!(p.starts_with("127.0.0.1:"), "{p}");
    }
    let opts = strings(key(svc, "security_opt"));
    for o in [
        "no-new-privileges:true",
        "seccomp=unconfined",
        "apparmor=unconfined",
        "systempaths=unconfined",
    ] {
        assert!(opts.contains(&o.to_string()), "security_opt {o}: {opts:?}");
    }
    assert!(
        !key(svc, "privileged").as_bool().unwrap_or(false),
        "never privileged"
    );
    assert_eq!(strings(key(svc, "command"))[0], "gateway");
}

#[test]
fn the_compose_files_postgres_service_is_private_healthy_first_and_its_store_snippet_is_valid() {
    let text = std::fs::read_to_string(root().join("compose.yaml")).unwrap();
    let doc = &YamlLoader::load_from_str(&text).unwrap()[0];
    let pg = key(key(doc, "services"), "postgres");
    assert!(!pg.is_badvalue(), "services.postgres");
    // Reached only on compose's network; its password from a secret file, never inline.
    assert!(
        key(pg, "ports").is_badvalue(),
        "the database is not published"
    );
    let env = key(pg, "environment");
    assert!(key(env, "POSTGRES_PASSWORD").is_badvalue());
    assert_eq!(
        key(env, "POSTGRES_PASSWORD_FILE").as_str(),
        Some("/run/secrets/pg-password")
    );
    assert!(strings(key(pg, "secrets")).contains(&"pg-password".to_string()));
    assert!(!key(key(key(doc, "secrets"), "pg-password"), "file").is_badvalue());
    assert!(!key(key(pg, "healthcheck"), "test").is_badvalue());
    let declared = key(doc, "volumes").as_hash().unwrap();
    for v in strings(key(pg, "volumes")) {
        let name = v.split(':').next().unwrap();
        assert!(declared.contains_key(&Yaml::String(name.into())), "{name}");
    }
    // The gateway waits for a healthy database.
    let chitin = key(key(doc, "services"), "chitin");
    assert_eq!(
        key(key(key(chitin, "depends_on"), "postgres"), "condition").as_str(),
        Some("service_healthy")
    );
    // The [store] lines the file tells the operator to write are a valid section that keeps
    // the password in the secret store.
    let snippet: String = text
        .lines()
        .map(|l| l.trim_start_matches('#').trim())
        .skip_while(|l| *l != "[store]")
        .take_while(|l| !l.is_empty() && !l.starts_with('('))
        .map(|l| format!("{}\n", l.split("   #").next().unwrap_or(l)))
        .collect();
    assert!(snippet.contains("backend = \"postgres\""), "{snippet}");
    #[derive(serde::Deserialize)]
    struct Wrap {
        store: chitin::config::store::StoreConfig,
    }
    let w: Wrap = toml::from_str(&snippet).unwrap();
    w.store.validate().unwrap();
    assert_eq!(w.store.password, "secret:pg_password");
    assert!(
        w.store.url.contains("@postgres:5432/chitin"),
        "{}",
        w.store.url
    );
}
