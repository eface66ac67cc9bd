//! A root gateway's tools (issue 13, item 12), through the real `chitin sandbox exec`. The
//! tests run as root, like a gateway in a container or on many VPS installs: the sandboxed
//! command must not be host root, must not see host secrets in `/etc`, must not reach host
//! services over UNIX sockets in the workspace, and the workspace has a quota.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Stdio};

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

struct Env {
    home: tempfile::TempDir,
    /// Created by the test (root) with tempfile's 0700: only root may enter it on the host.
    ws: tempfile::TempDir,
}

fn env_with(config: &str) -> Env {
    let base = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let e = Env {
        home: tempfile::tempdir_in(base).unwrap(),
        ws: tempfile::tempdir_in(base).unwrap(),
    };
    std::fs::write(e.home.path().join("chitin.toml"), config).unwrap();
    e
}

fn env() -> Env {
    env_with("")
}

impl Env {
    fn ws(&self) -> &Path {
        self.ws.path()
    }
    fn cmd(&self, argv: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_chitin"));
        c.env("CHITIN_HOME", self.home.path());
        c.args(["sandbox", "exec", "--workspace"]).arg(self.ws());
        c.arg("--").args(argv);
        c
    }
    fn run(&self, argv: &[&str]) -> Run {
        let out = self.cmd(argv).output().unwrap();
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
    fn sh(&self, script: &str) -> Run {
        self.run(&["sh", "-c", script])
    }
}

fn assert_root() {
    assert_eq!(
        chitin_sandbox::ids::current("chitin").launcher_euid,
        0,
        "these tests reproduce a root gateway and must run as root"
    );
}

/// The host uid/gid a root launcher gives the sandbox on this machine.
fn expected_host_ids() -> (u32, u32) {
    let ids = chitin_sandbox::ids::current("chitin");
    assert_ne!(ids.uid, 0);
    assert_ne!(ids.gid, 0);
    (ids.uid, ids.gid)
}

#[test]
fn a_root_gateways_tool_cannot_read_host_secrets_in_etc() {
    assert_root();
    let e = env();
    // The attack of the report: `exec head /etc/ssl/private/*.key` printed the host TLS key.
    // This host has /etc/ssl/private (the snakeoil key), /etc/shadow and /etc/gshadow.
    assert!(Path::new("/etc/ssl/private").is_dir());
    assert!(Path::new("/etc/shadow").is_file());
    let r = e.sh(
        "head -c 100 /etc/shadow; ls /etc/ssl/private; cat /etc/ssl/private/*; \
         head -c 100 /etc/gshadow; ls /etc/sudoers /etc/ssh; echo done",
    );
    assert_eq!(r.stdout, "done\n", "stderr: {}", r.stderr);
    let lines: Vec<&str> = r.stderr.lines().collect();
    assert_eq!(
        lines,
        [
            "head: cannot open '/etc/shadow' for reading: No such file or directory",
            "ls: cannot access '/etc/ssl/private': No such file or directory",
            "cat: '/etc/ssl/private/*': No such file or directory",
            "head: cannot open '/etc/gshadow' for reading: No such file or directory",
            "ls: cannot access '/etc/sudoers': No such file or directory",
            "ls: cannot access '/etc/ssh': No such file or directory",
        ],
        "{}",
        r.stderr
    );
}

#[test]
fn common_programs_still_work_with_the_narrowed_etc() {
    let e = env();
    // awk is /usr/bin/awk -> /etc/alternatives/awk -> /usr/bin/gawk on Debian.
    let r = e.sh(
        "ls / > /dev/null && head -n1 /etc/passwd && cat /etc/os-release | grep -c ID= > /dev/null \
         && grep -q '^tcp' /etc/protocols && python3 -c 'import ssl, json; print(json.dumps(42))' \
         && git --version > /dev/null && awk 'BEGIN { print 7 }' && ls /etc/ssl/certs | grep -q pem \
         && echo ok",
    );
    assert_eq!(r.code, 0, "stdout: {}\nstderr: {}", r.stdout, r.stderr);
    assert_eq!(
        r.stdout,
        "root:x:0:0:root:/nonexistent:/usr/sbin/nologin\n42\n7\nok\n"
    );
}

#[test]
fn a_root_gateways_tool_runs_as_an_unprivileged_host_uid() {
    assert_root();
    let (uid, gid) = expected_host_ids();
    let e = env();
    let mut child = e
        .cmd(&["sh", "-c", "echo ready; read x; id -u"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line, "ready\n");
    // The command is running (it printed) and waits on stdin: find it from the host among
    // the launcher's descendants and read its host credentials.
    let mut todo = vec![child.id()];
    let mut status = None;
    while let Some(pid) = todo.pop() {
        let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap();
        todo.extend(
            children
                .split_whitespace()
                .map(|c| c.parse::<u32>().unwrap()),
        );
        if std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap() == "sh\n" {
            status = Some(std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap());
        }
    }
    let status = status.expect("the sandboxed sh is not among the launcher's descendants");
    for want in [
        format!("Uid:\t{uid}\t{uid}\t{uid}\t{uid}"),
        format!("Gid:\t{gid}\t{gid}\t{gid}\t{gid}"),
        "CapEff:\t0000000000000000".to_string(),
    ] {
        assert!(status.contains(&want), "missing {want:?} in\n{status}");
    }
    // root's supplementary groups are gone too
    let groups = status.lines().find(|l| l.starts_with("Groups:")).unwrap();
    assert_eq!(groups.trim(), "Groups:", "{status}");
    child.stdin.take().unwrap().write_all(b"\n").unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
    assert!(child.wait().unwrap().success());
    assert_eq!(rest, "1000\n");
}

#[test]
fn a_root_owned_0700_workspace_stays_usable_and_owned_by_root_on_disk() {
    assert_root();
    let e = env();
    std::fs::set_permissions(e.ws(), PermissionsExt::from_mode(0o700)).unwrap();
    std::fs::write(e.ws().join("notes"), "workspace-notes").unwrap();
    std::fs::set_permissions(e.ws().join("notes"), PermissionsExt::from_mode(0o600)).unwrap();
    let r = e.sh(
        "cat notes && echo && stat -c '%u %g %a' . notes && echo more >> notes && mkdir d \
         && echo new > d/f && chmod 600 d/f && rm notes && stat -c '%u %g' d/f",
    );
    assert_eq!(r.code, 0, "stdout: {}\nstderr: {}", r.stdout, r.stderr);
    // Inside, the workspace is the sandbox user's (ID-mapped)...
    assert_eq!(
        r.stdout,
        "workspace-notes\n1000 1000 700\n1000 1000 600\n1000 1000\n"
    );
    // ...on disk everything stays root's, as the gateway's own files are.
    for p in ["d", "d/f"] {
        let m = std::fs::symlink_metadata(e.ws().join(p)).unwrap();
        assert_eq!((m.uid(), m.gid()), (0, 0), "{p}");
    }
    assert_eq!(
        std::fs::read_to_string(e.ws().join("d/f")).unwrap(),
        "new\n"
    );
    assert!(!e.ws().join("notes").exists());
}

#[test]
fn a_host_unix_socket_in_the_workspace_is_unreachable() {
    let e = env();
    // A host service's socket placed in the workspace (or bind-mounted into it).
    let listener = std::os::unix::net::UnixListener::bind(e.ws().join("sock")).unwrap();
    std::fs::set_permissions(e.ws().join("sock"), PermissionsExt::from_mode(0o777)).unwrap();
    listener.set_nonblocking(true).unwrap();
    let r = e.run(&[
        "python3",
        "-c",
        "import socket; s=socket.socket(socket.AF_UNIX); s.connect('sock')",
    ]);
    assert_eq!(r.code, 1, "stdout: {}\nstderr: {}", r.stdout, r.stderr);
    assert_eq!(
        r.stderr.lines().last(),
        Some("OSError: [Errno 97] Address family not supported by protocol"),
        "{}",
        r.stderr
    );
    // The service never saw a connection.
    let err = listener.accept().unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::WouldBlock);
}

#[test]
fn anonymous_unix_socket_pairs_still_work() {
    let e = env();
    let r = e.run(&[
        "python3",
        "-c",
        "import socket; a, b = socket.socketpair(); a.send(b'pair'); print(b.recv(4).decode())",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.stdout, "pair\n");
}

#[test]
fn a_workspace_over_its_byte_quota_can_only_shrink() {
    let e = env_with("[sandbox]\nworkspace_quota_mb = 1\n");
    std::fs::write(e.ws().join("big"), vec![7u8; 2 << 20]).unwrap();
    let r = e.sh("/bin/echo more >> big; /bin/echo x > new; wc -c < big; rm big && echo removed");
    assert_eq!(
        r.stdout, "2097152\nremoved\n",
        "stdout: {}\nstderr: {}",
        r.stdout, r.stderr
    );
    let lines: Vec<&str> = r.stderr.lines().collect();
    assert_eq!(lines.len(), 3, "{}", r.stderr);
    assert!(
        lines[0].starts_with("chitin: the workspace is over its quota (")
            && lines[0].contains(
                "of at most 1048576 bytes and 100000 inodes): no file can grow in this run"
            ),
        "{}",
        lines[0]
    );
    assert_eq!(lines[1], "/bin/echo: write error: File too large");
    assert_eq!(lines[2], "/bin/echo: write error: File too large");
    assert_eq!(std::fs::metadata(e.ws().join("new")).unwrap().len(), 0);
    // Deleting brought it under the quota: the next run writes again, without the notice.
    let r = e.sh("echo x > new && cat new");
    assert_eq!(
        (r.code, r.stdout.as_str(), r.stderr.as_str()),
        (0, "x\n", "")
    );
}

#[test]
fn a_workspace_over_its_inode_quota_can_only_shrink() {
    let e = env_with("[sandbox]\nworkspace_quota_inodes = 10\n");
    for i in 0..12 {
        std::fs::write(e.ws().join(format!("f{i}")), "").unwrap();
    }
    let r = e.sh("/bin/echo x > f0");
    assert_ne!(r.code, 0);
    assert!(
        r.stderr
            .starts_with("chitin: the workspace is over its quota (")
            && r.stderr
                .ends_with("/bin/echo: write error: File too large\n"),
        "{}",
        r.stderr
    );
    assert_eq!(std::fs::metadata(e.ws().join("f0")).unwrap().len(), 0);
}

#[test]
fn one_file_cannot_grow_past_what_the_quota_has_left() {
    let e = env_with("[sandbox]\nworkspace_quota_mb = 1\n");
    let r = e.sh("exec head -c 2000000 /dev/zero > f");
    assert_eq!(r.code, 128 + libc_sigxfsz(), "{}", r.stderr);
    assert!(
        r.stderr.contains("chitin: sandbox: killed: file-size"),
        "{}",
        r.stderr
    );
    let len = std::fs::metadata(e.ws().join("f")).unwrap().len();
    assert!(len < 1 << 20, "{len}");
}

fn libc_sigxfsz() -> i32 {
    25
}
