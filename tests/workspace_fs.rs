//! The gateway's own access to workspace files (`src/wsfs.rs`), attacked the way a sandboxed
//! program can: bootstrap files (`AGENTS.md`, ...) swapped for a symlink to a 0600 host file, a
//! FIFO, a sparse 250 MB file or a hard link; skill staging with `.skills` swapped for a symlink
//! out of the workspace. The swapped state is set up before the call (the descriptor
//! discipline makes the timing irrelevant), and where the old check-then-use code lost only a
//! race, the race is run for real (`RENAME_EXCHANGE` in a loop while the gateway works).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use chitin::agent::context::{self, BOOTSTRAP_MAX_BYTES, Bootstrap};
use chitin::agent::skills;
use chitin::wsfs::{WsDir, WsFsError};

const HOST_SECRET: &str = "HOST-SECRET-0600-CANARY-7f3a";

struct Dirs {
    ws: PathBuf,
    outside: PathBuf,
    _t: Vec<tempfile::TempDir>,
}

fn dirs() -> Dirs {
    let base = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let (w, o) = (
        tempfile::tempdir_in(base).unwrap(),
        tempfile::tempdir_in(base).unwrap(),
    );
    Dirs {
        ws: w.path().canonicalize().unwrap(),
        outside: o.path().canonicalize().unwrap(),
        _t: vec![w, o],
    }
}

/// A 0600 host file outside the workspace with detectable content.
fn host_secret(outside: &Path) -> PathBuf {
    let p = outside.join("host-secret");
    std::fs::write(&p, HOST_SECRET).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p
}

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().mode() & 0o7777
}

fn exchange(dir: &Path, a: &str, b: &str) {
    rustix::fs::renameat_with(
        rustix::fs::CWD,
        dir.join(a),
        rustix::fs::CWD,
        dir.join(b),
        rustix::fs::RenameFlags::EXCHANGE,
    )
    .unwrap();
}

/// Runs `swap` in a loop on another thread while `work` runs `n` times on this one.
fn racing(n: usize, swap: impl Fn() + Send + 'static, mut work: impl FnMut()) {
    let stop = Arc::new(AtomicBool::new(false));
    let s = Arc::clone(&stop);
    let swapper = std::thread::spawn(move || {
        while !s.load(Ordering::Relaxed) {
            swap();
        }
    });
    for _ in 0..n {
        work();
    }
    stop.store(true, Ordering::Relaxed);
    swapper.join().unwrap();
}

const SKIPPED_NOTE: &str =
    "not included: it is not a regular file with a single link directly in the workspace]";

// ---- bootstrap files -------------------------------------------------------------------------

#[test]
fn a_bootstrap_file_symlinked_to_a_0600_host_file_is_skipped_and_never_read() {
    let d = dirs();
    let secret = host_secret(&d.outside);
    std::os::unix::fs::symlink(&secret, d.ws.join("AGENTS.md")).unwrap();
    // A relative link that stays inside the workspace is refused too: no link is followed.
    std::fs::write(d.ws.join("soul.txt"), "soul text").unwrap();
    std::os::unix::fs::symlink("soul.txt", d.ws.join("SOUL.md")).unwrap();
    std::fs::write(d.ws.join("USER.md"), "the user's notes").unwrap();
    assert_eq!(
        context::bootstrap(&d.ws),
        vec![
            Bootstrap::Skipped {
                name: "AGENTS.md",
                reason: "`AGENTS.md` is a symbolic link or leads through one; the gateway opens only real files and directories in the workspace (replace the link with the file itself)".into(),
            },
            Bootstrap::Skipped {
                name: "SOUL.md",
                reason: "`SOUL.md` is a symbolic link or leads through one; the gateway opens only real files and directories in the workspace (replace the link with the file itself)".into(),
            },
            Bootstrap::Included {
                name: "USER.md",
                text: "the user's notes".into(),
                size: 16,
            },
        ]
    );
    let prompt = context::system_prompt("", &d.ws, &|_, _| false).text;
    assert!(!prompt.contains(HOST_SECRET));
    assert!(prompt.contains(&format!("[workspace file AGENTS.md {SKIPPED_NOTE}")));
    assert!(
        prompt.contains("<workspace-file name=\"USER.md\">\nthe user's notes\n</workspace-file>")
    );
    assert_eq!(mode(&secret), 0o600);
}

#[test]
fn racing_a_symlink_swap_never_puts_a_host_file_into_the_prompt() {
    const ROUNDS: usize = 30_000;
    let d = dirs();
    let secret = host_secret(&d.outside);
    std::fs::write(d.ws.join("AGENTS.md"), "benign agents file").unwrap();
    std::os::unix::fs::symlink(&secret, d.ws.join("AGENTS.alt")).unwrap();
    let ws = d.ws.clone();
    let (mut included, mut skipped) = (0, 0);
    // 30,000 rounds: the old check-then-read code leaked the host file into about 200 of them.
    racing(
        ROUNDS,
        move || exchange(&ws, "AGENTS.md", "AGENTS.alt"),
        || {
            let prompt = context::system_prompt("", &d.ws, &|_, _| false).text;
            assert!(!prompt.contains(HOST_SECRET), "{prompt}");
            if prompt.contains("benign agents file") {
                included += 1;
            } else {
                assert!(prompt.contains(SKIPPED_NOTE), "{prompt}");
                skipped += 1;
            }
        },
    );
    assert_eq!(included + skipped, ROUNDS);
}

#[test]
fn a_fifo_as_a_bootstrap_file_is_skipped_without_blocking() {
    let d = dirs();
    let fifo = d.ws.join("AGENTS.md");
    rustix::fs::mknodat(
        rustix::fs::CWD,
        &fifo,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o600),
        0,
    )
    .unwrap();
    // Bounded by construction: this test holds the FIFO open for writing with more than the
    // size limit already in it, so neither opening it nor reading up to the limit could wait.
    // Its content must still never be read: it is not a regular file.
    let mut writer = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&fifo)
        .unwrap();
    let payload = "FIFO-CANARY ".repeat(BOOTSTRAP_MAX_BYTES / 12 + 100);
    writer.write_all(payload.as_bytes()).unwrap();
    std::fs::write(d.ws.join("MEMORY.md"), "remember this").unwrap();
    let got = context::bootstrap(&d.ws);
    assert_eq!(
        got,
        vec![
            Bootstrap::Skipped {
                name: "AGENTS.md",
                reason: "`AGENTS.md` is a FIFO, not a regular file; only regular files are read"
                    .into(),
            },
            Bootstrap::Included {
                name: "MEMORY.md",
                text: "remember this".into(),
                size: 13,
            },
        ]
    );
    let prompt = context::system_prompt("", &d.ws, &|_, _| false).text;
    assert!(!prompt.contains("FIFO-CANARY"));
    drop(writer);
    // Without any writer (the case that blocked gateway threads for good) the same holds.
    assert_eq!(context::bootstrap(&d.ws), got);
}

/// The peak resident size of this process (`VmHWM`), in KiB.
fn peak_rss_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[test]
fn a_sparse_250_mb_bootstrap_file_is_read_only_up_to_the_limit() {
    let d = dirs();
    let huge = 250 * 1024 * 1024;
    let f = std::fs::File::create(d.ws.join("USER.md")).unwrap();
    (&f).write_all(b"HEAD-OF-HUGE-FILE").unwrap();
    f.set_len(huge).unwrap();
    drop(f);
    let before = peak_rss_kib();
    let got = context::bootstrap(&d.ws);
    let prompt = context::system_prompt("", &d.ws, &|_, _| false).text;
    let grown_mib = (peak_rss_kib() - before) / 1024;
    // The old code read the whole file (250 MB) before cutting it.
    assert!(grown_mib < 64, "peak RSS grew by {grown_mib} MiB");
    let [Bootstrap::Included { name, text, size }] = got.as_slice() else {
        panic!("{got:?}")
    };
    assert_eq!((*name, *size), ("USER.md", huge));
    assert_eq!(text.len(), BOOTSTRAP_MAX_BYTES);
    assert!(text.starts_with("HEAD-OF-HUGE-FILE\0"));
    assert!(prompt.contains(&format!(
        "\n[... cut: {BOOTSTRAP_MAX_BYTES} of {huge} bytes shown]\n</workspace-file>"
    )));
}

#[test]
fn a_bootstrap_file_hard_linked_to_a_host_file_is_refused() {
    let d = dirs();
    let secret = host_secret(&d.outside);
    std::fs::hard_link(&secret, d.ws.join("MEMORY.md")).unwrap();
    assert_eq!(
        context::bootstrap(&d.ws),
        vec![Bootstrap::Skipped {
            name: "MEMORY.md",
            reason: "`MEMORY.md` has 2 hard links, so other names for it may be outside the workspace; copy it instead of linking it".into(),
        }]
    );
    let prompt = context::system_prompt("", &d.ws, &|_, _| false).text;
    assert!(!prompt.contains(HOST_SECRET));
    assert!(prompt.contains(&format!("[workspace file MEMORY.md {SKIPPED_NOTE}")));
}

#[test]
fn a_directory_or_a_link_to_a_device_named_like_a_bootstrap_file_is_not_read() {
    // A directory named like a bootstrap file, and a device: neither is read.
    let d = dirs();
    std::fs::create_dir(d.ws.join("AGENTS.md")).unwrap();
    std::os::unix::fs::symlink("/dev/zero", d.ws.join("SOUL.md")).unwrap();
    let got = context::bootstrap(&d.ws);
    assert_eq!(
        got[0],
        Bootstrap::Skipped {
            name: "AGENTS.md",
            reason: "`AGENTS.md` is a directory, not a regular file; only regular files are read"
                .into(),
        }
    );
    assert!(matches!(
        &got[1],
        Bootstrap::Skipped {
            name: "SOUL.md",
            ..
        }
    ));
    assert_eq!(got.len(), 2);
}

// ---- the wsfs primitives ---------------------------------------------------------------------

#[test]
fn wsfs_refuses_links_and_escapes_and_reads_plain_files() {
    let d = dirs();
    host_secret(&d.outside);
    std::fs::create_dir(d.ws.join("sub")).unwrap();
    std::fs::write(d.ws.join("sub/f"), "inside").unwrap();
    std::os::unix::fs::symlink(&d.outside, d.ws.join("out")).unwrap();
    let root = WsDir::root(&d.ws).unwrap();
    let c = root.read_capped(Path::new("sub/f"), 4).unwrap();
    assert_eq!(
        (c.bytes.as_slice(), c.size, c.truncated()),
        (&b"insi"[..], 6, true)
    );
    let e = root
        .read_capped(Path::new("out/host-secret"), 100)
        .unwrap_err();
    assert!(matches!(e, WsFsError::Symlink { .. }), "{e}");
    let e = root
        .read_capped(Path::new("../host-secret"), 100)
        .unwrap_err();
    assert!(matches!(e, WsFsError::Escapes { .. }), "{e}");
    let e = root
        .read_capped(Path::new(&d.outside.join("host-secret")), 100)
        .unwrap_err();
    assert!(matches!(e, WsFsError::Escapes { .. }), "{e}");
    let e = root.ensure_dir("out".as_ref(), 0o755).unwrap_err();
    assert_eq!(
        e.to_string(),
        "`out` is a symbolic link or leads through one; the gateway opens only real files and directories in the workspace (replace the link with the file itself)"
    );
    assert!(matches!(
        root.create_file("a/b".as_ref(), b"", 0o644),
        Err(WsFsError::BadName { .. })
    ));
}

// ---- skill staging ---------------------------------------------------------------------------

fn skill_files() -> Vec<(PathBuf, Vec<u8>)> {
    vec![
        (
            PathBuf::from("SKILL.md"),
            b"---\nname: weather\n---\n".to_vec(),
        ),
        (PathBuf::from("scripts/run.sh"), b"echo sunny\n".to_vec()),
    ]
}

/// Victims outside the workspace shaped like a staged skill: `<dir>/weather/{SKILL.md, keep}`.
fn victims(outside: &Path) -> Vec<(PathBuf, u32, Vec<u8>)> {
    let dir = outside.join("stage-target");
    std::fs::create_dir_all(dir.join("weather/scripts")).unwrap();
    let files = [
        ("weather/SKILL.md", 0o600),
        ("weather/keep", 0o600),
        ("weather/scripts/run.sh", 0o700),
    ];
    let mut out = Vec::new();
    for (rel, m) in files {
        let p = dir.join(rel);
        std::fs::write(&p, format!("victim {rel}")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(m)).unwrap();
        out.push((p, m, format!("victim {rel}").into_bytes()));
    }
    for (rel, m) in [("weather", 0o700), ("weather/scripts", 0o750)] {
        let p = dir.join(rel);
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(m)).unwrap();
        out.push((p, m, Vec::new()));
    }
    out
}

fn assert_intact(v: &[(PathBuf, u32, Vec<u8>)]) {
    for (p, m, content) in v {
        assert_eq!(mode(p), *m, "mode of {}", p.display());
        if !content.is_empty() {
            assert_eq!(&std::fs::read(p).unwrap(), content, "{}", p.display());
        }
    }
}

#[test]
fn staging_a_skill_into_a_dot_skills_symlinked_outside_touches_nothing_there() {
    let d = dirs();
    let v = victims(&d.outside);
    std::os::unix::fs::symlink(d.outside.join("stage-target"), d.ws.join(".skills")).unwrap();
    let e = skills::stage(&d.ws, "weather", &skill_files()).unwrap_err();
    assert_eq!(
        e,
        "`.skills` is a symbolic link or leads through one; the gateway opens only real files and directories in the workspace (replace the link with the file itself)"
    );
    assert_intact(&v);
    // `.skills/weather` itself a symlink out: the link is replaced, its target untouched.
    std::fs::remove_file(d.ws.join(".skills")).unwrap();
    std::fs::create_dir(d.ws.join(".skills")).unwrap();
    std::os::unix::fs::symlink(
        d.outside.join("stage-target/weather"),
        d.ws.join(".skills/weather"),
    )
    .unwrap();
    let staged = skills::stage(&d.ws, "weather", &skill_files()).unwrap();
    assert_eq!(staged, vec!["SKILL.md", "scripts/run.sh"]);
    assert_intact(&v);
    assert!(
        std::fs::symlink_metadata(d.ws.join(".skills/weather"))
            .unwrap()
            .is_dir()
    );
}

#[test]
fn racing_a_dot_skills_swap_never_deletes_or_chmods_outside_the_workspace() {
    let d = dirs();
    let v = victims(&d.outside);
    std::fs::create_dir(d.ws.join(".skills")).unwrap();
    std::os::unix::fs::symlink(d.outside.join("stage-target"), d.ws.join(".skills-alt")).unwrap();
    let ws = d.ws.clone();
    let (mut ok, mut refused) = (0, 0);
    // 3,000 rounds: enough for the old by-path code to delete the victims outside.
    racing(
        3000,
        move || exchange(&ws, ".skills", ".skills-alt"),
        || match skills::stage(&d.ws, "weather", &skill_files()) {
            Ok(_) => ok += 1,
            Err(_) => refused += 1,
        },
    );
    assert_eq!(ok + refused, 3000);
    assert_intact(&v);
}

#[test]
fn a_skill_is_staged_read_only_and_restaged_over_its_old_copy() {
    let d = dirs();
    let staged = skills::stage(&d.ws, "weather", &skill_files()).unwrap();
    assert_eq!(staged, vec!["SKILL.md", "scripts/run.sh"]);
    let root = d.ws.join(".skills/weather");
    assert_eq!(mode(&root), 0o555);
    assert_eq!(mode(&root.join("scripts")), 0o555);
    assert_eq!(mode(&root.join("scripts/run.sh")), 0o444);
    assert_eq!(
        std::fs::read_to_string(root.join("scripts/run.sh")).unwrap(),
        "echo sunny\n"
    );
    // A file the model planted in the old copy goes with it.
    std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(root.join("planted"), "x").unwrap();
    std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o555)).unwrap();
    skills::stage(&d.ws, "weather", &skill_files()[..1]).unwrap();
    let mut names: Vec<_> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, vec!["SKILL.md"]);
}

// ---- gate-side canonicalization (tools::Workspace::resolve on wsfs) --------------------------

#[test]
fn a_path_to_create_through_a_symlinked_directory_is_shown_to_the_policy_canonically() {
    let d = dirs();
    std::fs::create_dir(d.ws.join("protected")).unwrap();
    std::os::unix::fs::symlink("protected", d.ws.join("link")).unwrap();
    let w = chitin::tools::Workspace::new(&d.ws).unwrap();
    // Directories still to be created below a link: the policy sees where they will be.
    assert_eq!(
        w.resolve("link/new/deeper/x.txt").unwrap().abs,
        d.ws.join("protected/new/deeper/x.txt")
    );
    assert_eq!(
        w.resolve("link/x.txt").unwrap().abs,
        d.ws.join("protected/x.txt")
    );
    assert_eq!(
        w.resolve("fresh/x.txt").unwrap().abs,
        d.ws.join("fresh/x.txt")
    );
    // A link out of the workspace is refused whether its target exists or not.
    std::os::unix::fs::symlink(&d.outside, d.ws.join("out")).unwrap();
    std::os::unix::fs::symlink(d.outside.join("nope"), d.ws.join("out2")).unwrap();
    for p in ["out/new/x", "out2/new/x", "out", "out2"] {
        assert_eq!(
            w.resolve(p).unwrap_err().to_string(),
            format!("path `{p}` refused: a symlink on it leaves the workspace")
        );
    }
}

#[test]
fn the_gate_locates_paths_without_looking_outside_the_workspace() {
    use chitin::wsfs::{Located, Resolved, locate};
    let d = dirs();
    std::fs::create_dir(d.ws.join("src")).unwrap();
    std::fs::write(d.ws.join("src/a.txt"), "x").unwrap();
    std::os::unix::fs::symlink("src", d.ws.join("in-link")).unwrap();
    std::os::unix::fs::symlink("../src/../../x/./y", d.ws.join("src/out-rel")).unwrap();
    std::os::unix::fs::symlink("/etc/shadow-nope", d.ws.join("out-abs")).unwrap();
    std::os::unix::fs::symlink("loop", d.ws.join("loop")).unwrap();
    let parent = d.ws.parent().unwrap();
    let l = |p: &str| locate(&d.ws, Path::new(p));
    let inside = |abs: PathBuf, exists| Located::Inside(Resolved { abs, exists });
    assert_eq!(
        l("in-link/a.txt").unwrap(),
        inside(d.ws.join("src/a.txt"), true)
    );
    assert_eq!(
        l(&d.ws.join("src/./a.txt").display().to_string()).unwrap(),
        inside(d.ws.join("src/a.txt"), true)
    );
    assert_eq!(l(".").unwrap(), inside(d.ws.clone(), true));
    assert_eq!(
        l("in-link/new/b").unwrap(),
        inside(d.ws.join("src/new/b"), false)
    );
    assert_eq!(
        l("src/out-rel/z").unwrap(),
        Located::Outside(parent.join("x/y/z"))
    );
    assert_eq!(
        l("out-abs/z").unwrap(),
        Located::Outside(PathBuf::from("/etc/shadow-nope/z"))
    );
    assert_eq!(
        l("../../etc/./passwd").unwrap(),
        Located::Outside(parent.parent().unwrap().join("etc/passwd"))
    );
    assert_eq!(
        l("/etc/../root/x").unwrap(),
        Located::Outside(PathBuf::from("/root/x"))
    );
    assert!(matches!(l("new/../../x"), Err(WsFsError::BadName { .. })));
    assert!(matches!(l("loop/x"), Err(WsFsError::Symlink { .. })));
    assert!(matches!(
        l("src/a.txt/x"),
        Err(WsFsError::NotADirectory { .. })
    ));
}
