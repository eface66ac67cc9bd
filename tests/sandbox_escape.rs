//! Escape probes run through the real `chitin sandbox exec` (security-tests.md §3, §11.A).
//! We run as root, so every filesystem target is world-readable/-writable: DAC is never what
//! stops a probe. Each test pins the errno, signal or reason and the layer that produced it.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

struct Env {
    home: tempfile::TempDir,
    ws: tempfile::TempDir,
}

fn env() -> Env {
    // Workspaces outside /tmp too, so the sandbox's private /tmp is not the parent.
    let base = Path::new(env!("CARGO_TARGET_TMPDIR"));
    Env {
        home: tempfile::tempdir_in(base).unwrap(),
        ws: tempfile::tempdir_in(base).unwrap(),
    }
}

impl Env {
    fn ws(&self) -> &Path {
        self.ws.path()
    }
    fn cmd(&self, flags: &[&str], argv: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_chitin"));
        c.env("CHITIN_HOME", self.home.path());
        c.args(["sandbox", "exec", "--workspace"]).arg(self.ws());
        c.args(flags).arg("--").args(argv);
        c
    }
    fn run(&self, flags: &[&str], argv: &[&str]) -> Run {
        let out = self.cmd(flags, argv).output().unwrap();
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
    fn py(&self, code: &str) -> Run {
        let full = format!("{PRELUDE}\n{code}");
        self.run(&[], &["python3", "-c", &full])
    }
}

/// Probe helpers inside the sandbox: `sc(nr, ...)` returns 0 or the errno of a raw syscall;
/// `P(b"path")` is a C string's address for `sc`; `t(name, f)` prints `name OK` or
/// `name ERRNAME`.
const PRELUDE: &str = r#"
import os, ctypes, errno, socket, sys
libc = ctypes.CDLL(None, use_errno=True)
def sc(nr, *a):
    r = libc.syscall(ctypes.c_long(nr), *[ctypes.c_long(x) for x in a])
    return 0 if r >= 0 else ctypes.get_errno()
KEEP = []
def P(s):
    b = ctypes.create_string_buffer(s); KEEP.append(b); return ctypes.addressof(b)
def t(name, f):
    try:
        f(); print(name, "OK")
    except OSError as e:
        print(name, errno.errorcode[e.errno])
"#;

fn lines(r: &Run) -> Vec<String> {
    r.stdout.lines().map(str::to_string).collect()
}

fn expect_lines(r: &Run, want: &[&str]) {
    assert_eq!(r.code, 0, "stdout: {}\nstderr: {}", r.stdout, r.stderr);
    let got = lines(r);
    for w in want {
        assert!(
            got.iter().any(|l| l == w),
            "missing `{w}` in:\n{}",
            r.stdout
        );
    }
}

/// A world-readable/-writable fixture outside any workspace.
fn fixture(content: &str) -> (tempfile::TempDir, PathBuf) {
    let d = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let f = d.path().join("secret");
    std::fs::write(&f, content).unwrap();
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o666)).unwrap();
    (d, f)
}

#[test]
fn reading_world_readable_secrets_outside_the_workspace_fails() {
    let e = env();
    let (_d, secret) = fixture("canary-secret-1");
    // A host dotfile-style key, a fixture, the host's /etc/hostname and the state dir.
    let home_key = e.home.path().join("age-identity.txt");
    std::fs::write(&home_key, "AGE-SECRET-KEY-canary").unwrap();
    std::fs::set_permissions(&home_key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let r = e.py(&format!(
        "t('fixture', lambda: open({:?}).read())\nt('state', lambda: open({:?}).read())\nt('root', lambda: print('root lists', sorted(os.listdir('/root'))))\nt('home', lambda: print('home lists', sorted(os.listdir('/home'))))\nprint('hostname', open('/etc/hostname').read().strip())",
        secret.to_str().unwrap(),
        home_key.to_str().unwrap()
    ));
    // Not in the mount view at all (and landlock would refuse it too). The workspace is
    // mounted at its host path, so when it lies under /root or /home (a checkout in root's
    // home), that directory exists in the view as an empty skeleton holding only the next
    // component of the workspace's path, never the host's files.
    let skeleton = |top: &str| -> String {
        match e.ws().strip_prefix(top) {
            Ok(rest) => {
                let first = rest
                    .components()
                    .next()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
                    .unwrap_or_default();
                format!("{} lists ['{first}']", top.trim_start_matches('/'))
            }
            Err(_) => format!("{} ENOENT", top.trim_start_matches('/')),
        }
    };
    let (root, home) = (skeleton("/root"), skeleton("/home"));
    expect_lines(
        &r,
        &[
            "fixture ENOENT",
            "state ENOENT",
            root.as_str(),
            home.as_str(),
            "hostname sandbox",
        ],
    );
    assert!(!r.stdout.contains("canary"));
}

#[test]
fn writing_outside_the_workspace_fails_and_host_files_stay_unchanged() {
    let e = env();
    let (d, outside) = fixture("unchanged");
    let r = e.py(&format!(
        "t('fixture', lambda: open({:?}, 'a').write('x'))\nt('etc', lambda: open('/etc/cron.d-x', 'w'))\nt('usr', lambda: open('/usr/x', 'w'))\nt('root', lambda: open('/escape', 'w'))\nt('parent', lambda: open('../escape', 'w'))\nt('bashrc', lambda: open('/root/.bashrc', 'a'))",
        outside.to_str().unwrap()
    ));
    // Every command gets a private, writable /tmp. When the workspace itself lies under /tmp
    // (a checkout in /tmp), its parent is inside that private tmpfs: the write succeeds there
    // and never reaches the host (asserted below). Anywhere else the parent is read-only.
    let parent = if e.ws().parent().is_some_and(|p| p.starts_with("/tmp")) {
        "parent OK"
    } else {
        "parent EROFS"
    };
    // /root is absent from the view, unless the workspace lies under it (a checkout in root's
    // home): then /root is a read-only skeleton of the workspace's path, without .bashrc.
    let bashrc = if e.ws().starts_with("/root") {
        "bashrc EROFS"
    } else {
        "bashrc ENOENT"
    };
    let host_bashrc = std::fs::read("/root/.bashrc").ok();
    expect_lines(
        &r,
        &[
            "fixture ENOENT",
            "etc EROFS",
            "usr EROFS",
            "root EROFS",
            parent,
            bashrc,
        ],
    );
    assert_eq!(std::fs::read("/root/.bashrc").ok(), host_bashrc);
    assert_eq!(std::fs::read_to_string(&outside).unwrap(), "unchanged");
    assert!(!e.ws().parent().unwrap().join("escape").exists());
    drop(d);
}

#[test]
fn symlinks_out_of_the_workspace_lead_nowhere() {
    let e = env();
    let (_d, secret) = fixture("canary-symlink");
    std::os::unix::fs::symlink(&secret, e.ws().join("to-fixture")).unwrap();
    std::os::unix::fs::symlink("/proc/1/environ", e.ws().join("to-init-env")).unwrap();
    let r = e.py(
        "t('fixture', lambda: open('to-fixture').read())\nt('init_env', lambda: open('to-init-env').read())\nos.symlink('/etc/hostname', 'h')\nprint('etc_hostname', open('h').read().strip())",
    );
    // The fixture does not exist in the view; /proc/1 (the sandbox init) is closed by landlock's
    // ptrace restriction; /etc/hostname resolves to the sandbox's own file, not the host's.
    expect_lines(
        &r,
        &["fixture ENOENT", "init_env EACCES", "etc_hostname sandbox"],
    );
    assert!(!r.stdout.contains("canary"));
}

#[test]
fn hardlinks_and_renames_out_of_the_workspace_fail_with_exdev() {
    let e = env();
    std::fs::write(e.ws().join("f"), "x").unwrap();
    std::fs::create_dir(e.ws().join("sub")).unwrap();
    let r = e.py(
        "t('link_passwd', lambda: os.link('/etc/passwd', 'h'))\nt('link_python', lambda: os.link('/usr/bin/python3', 'p'))\nt('rename_tmp', lambda: os.rename('f', '/tmp/f'))\nt('rename_up', lambda: os.rename('sub', '../x'))",
    );
    expect_lines(
        &r,
        &[
            "link_passwd EXDEV",
            "link_python EXDEV",
            "rename_tmp EXDEV",
            "rename_up EXDEV",
        ],
    );
    assert!(e.ws().join("f").exists() && e.ws().join("sub").is_dir());
    assert!(!e.ws().join("h").exists() && !e.ws().join("p").exists());
}

#[test]
fn proc_tricks_are_refused() {
    let e = env();
    let r = e.py(
        r#"
fd = os.open('/etc/passwd', os.O_RDONLY)
t('reopen_rw', lambda: os.open('/proc/self/fd/%d' % fd, os.O_RDWR))
t('init_environ', lambda: open('/proc/1/environ').read())
t('init_mem', lambda: open('/proc/1/mem', 'rb').read(1))
t('init_root', lambda: os.listdir('/proc/1/root'))
t('init_cwd', lambda: os.readlink('/proc/1/cwd'))
t('sysctl', lambda: open('/proc/sys/kernel/printk_ratelimit', 'w').write(open('/proc/sys/kernel/printk_ratelimit').read()))
t('self_mem_write', lambda: open('/proc/self/mem', 'wb'))
print('keys', repr(open('/proc/keys').read()))
print('pids', sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))
"#,
    );
    expect_lines(
        &r,
        &[
            "reopen_rw EROFS",
            "init_environ EACCES",
            "init_mem EACCES",
            "init_root EACCES",
            "init_cwd EACCES",
            "sysctl EROFS",
            "self_mem_write EROFS",
            "keys ''",
            "pids [1, 2]",
        ],
    );
}

#[test]
fn ptrace_and_cross_process_memory_calls_are_denied_by_seccomp() {
    let e = env();
    let r = e.py(
        "print('ptrace_attach', sc(101, 16, 1, 0, 0))\nprint('ptrace_traceme', sc(101, 0, 0, 0, 0))\nprint('vm_readv', sc(310, 1, 0, 0, 0, 0, 0))\nprint('vm_writev', sc(311, 1, 0, 0, 0, 0, 0))\nprint('pidfd_getfd', sc(438, 0, 0, 0))",
    );
    expect_lines(
        &r,
        &[
            "ptrace_attach 1",
            "ptrace_traceme 1",
            "vm_readv 1",
            "vm_writev 1",
            "pidfd_getfd 1",
        ],
    );
}

#[test]
fn signals_cannot_reach_the_init_or_anything_outside() {
    let e = env();
    let r = e.py(
        "import signal\nt('kill_init', lambda: os.kill(1, signal.SIGKILL))\nt('kill_all', lambda: os.kill(-1, signal.SIGTERM))\nprint('ppid', os.getppid())",
    );
    // Landlock's signal scope (EPERM); nothing else is in our domain (ESRCH); the parent is the
    // sandbox init, the gateway is not even addressable.
    expect_lines(&r, &["kill_init EPERM", "kill_all ESRCH", "ppid 1"]);
}

#[test]
fn every_denied_syscall_class_fails_with_its_reviewed_errno() {
    let e = env();
    // (label, python expression, expected)
    let cases: &[(&str, &str, &str)] = &[
        ("mount", "sc(165, 0, 0, 0, 0, 0)", "1"),
        ("umount2", "sc(166, 0, 0)", "1"),
        ("pivot_root", "sc(155, 0, 0)", "1"),
        ("chroot", "sc(161, 0)", "1"),
        ("fsopen", "sc(430, 0, 0)", "1"),
        ("open_tree", "sc(428, 0, 0, 0)", "1"),
        ("unshare_user", "sc(272, 0x10000000)", "1"),
        ("unshare_net", "sc(272, 0x40000000)", "1"),
        (
            "setns",
            "sc(308, os.open('/proc/self/ns/net', os.O_RDONLY), 0)",
            "1",
        ),
        ("clone_newuser", "sc(56, 0x10000000 | 17, 0, 0, 0, 0)", "1"),
        ("clone_newpid", "sc(56, 0x20000000 | 17, 0, 0, 0, 0)", "1"),
        ("clone3", "sc(435, 0, 0)", "38"),
        ("io_uring_setup", "sc(425, 1, 0)", "38"),
        ("io_uring_enter", "sc(426, 0, 0, 0, 0, 0, 0)", "38"),
        ("io_uring_register", "sc(427, 0, 0, 0, 0)", "38"),
        ("bpf", "sc(321, 0, 0, 0)", "1"),
        ("perf_event_open", "sc(298, 0, 0, -1, -1, 0)", "1"),
        ("userfaultfd", "sc(323, 0)", "1"),
        ("keyctl", "sc(250, 0, 0, 0, 0, 0)", "1"),
        ("add_key", "sc(248, 0, 0, 0, 0, 0)", "1"),
        ("request_key", "sc(249, 0, 0, 0, 0)", "1"),
        ("name_to_handle_at", "sc(303, 0, 0, 0, 0, 0)", "1"),
        ("acct", "sc(163, 0)", "1"),
        ("swapon", "sc(167, 0, 0)", "1"),
        ("reboot", "sc(169, 0, 0, 0, 0)", "1"),
        ("syslog", "sc(103, 3, 0, 0)", "1"),
        ("settimeofday", "sc(164, 0, 0)", "1"),
        ("iopl", "sc(172, 3)", "1"),
        ("personality_bad", "sc(135, 0x0400000)", "1"),
        ("personality_query", "sc(135, 0xffffffff)", "0"),
        ("kcmp", "sc(312, 1, 1, 0, 0, 0)", "1"),
        ("socket_netlink", "sc(41, 16, 3, 0)", "97"),
        ("socket_packet", "sc(41, 17, 3, 0)", "97"),
        ("socket_vsock", "sc(41, 40, 1, 0)", "97"),
        ("socket_bluetooth", "sc(41, 31, 1, 0)", "97"),
        ("socket_raw", "sc(41, 2, 3, 1)", "1"),
        ("socket_raw6_cloexec", "sc(41, 10, 3 | 0x80000, 58)", "1"),
        ("socket_inet_packet", "sc(41, 2, 10, 0)", "1"),
        ("socket_udp", "sc(41, 2, 2, 0)", "0"),
        ("socket_tcp6", "sc(41, 10, 1, 0)", "0"),
        ("socket_unix", "sc(41, 1, 1, 0)", "97"),
        (
            "socketpair_unix",
            "sc(53, 1, 1, 0, ctypes.addressof(ctypes.create_string_buffer(8)))",
            "0",
        ),
        ("socketpair_inet", "sc(53, 2, 1, 0, 0)", "97"),
        (
            "socketpair_unix_dgram",
            "sc(53, 1, 2, 0, ctypes.addressof(ctypes.create_string_buffer(8)))",
            "1",
        ),
        (
            "socketpair_unix_seqpacket",
            "sc(53, 1, 5, 0, ctypes.addressof(ctypes.create_string_buffer(8)))",
            "0",
        ),
        // setuid/setgid bits are refused however they are asked for; plain modes work.
        ("mkfile", "(open('suid', 'w').close(), 0)[1]", "0"),
        ("chmod_setuid", "sc(90, P(b'suid'), 0o4755)", "1"),
        ("chmod_setgid", "sc(90, P(b'suid'), 0o2755)", "1"),
        ("chmod_plain", "sc(90, P(b'suid'), 0o755)", "0"),
        (
            "fchmodat_setuid",
            "sc(268, -100, P(b'suid'), 0o4755, 0)",
            "1",
        ),
        (
            "fchmod_setuid",
            "sc(91, os.open('suid', os.O_RDONLY), 0o4755)",
            "1",
        ),
        (
            "openat_create_setuid",
            "sc(257, -100, P(b'suid2'), 0o101, 0o4755)",
            "1",
        ),
        ("creat_setuid", "sc(85, P(b'suid3'), 0o6755)", "1"),
        (
            "openat_create_plain",
            "sc(257, -100, P(b'plain'), 0o101, 0o644)",
            "0",
        ),
        (
            "mode_after",
            "oct(os.stat('suid').st_mode & 0o7777)",
            "0o755",
        ),
    ];
    let code: String = cases
        .iter()
        .map(|(l, expr, _)| format!("print('{l}', {expr})\n"))
        .collect();
    let r = e.py(&code);
    let want: Vec<String> = cases.iter().map(|(l, _, w)| format!("{l} {w}")).collect();
    let want: Vec<&str> = want.iter().map(String::as_str).collect();
    expect_lines(&r, &want);
}

fn assert_seccomp_kill(r: &Run, syscall: &str) {
    assert_eq!(r.code, 159, "stdout: {}\nstderr: {}", r.stdout, r.stderr);
    assert!(
        r.stderr
            .contains(&format!("chitin: sandbox: killed: seccomp:{syscall}")),
        "stderr: {}",
        r.stderr
    );
    assert!(!r.stdout.contains("survived"), "{}", r.stdout);
}

#[test]
fn kill_class_syscalls_kill_the_sandbox_and_name_the_syscall() {
    let e = env();
    for (name, expr) in [
        ("kexec_load", "sc(246, 0, 0, 0, 0)"),
        ("kexec_file_load", "sc(320, -1, -1, 0, 0, 0)"),
        ("init_module", "sc(175, 0, 0, 0)"),
        ("finit_module", "sc(313, -1, 0, 0)"),
        ("delete_module", "sc(176, 0, 0)"),
        ("open_by_handle_at", "sc(304, -100, 0, 0)"),
    ] {
        let r = e.py(&format!("{expr}\nprint('survived')"));
        assert_seccomp_kill(&r, name);
    }
}

#[test]
fn tiocsti_and_tioclinux_kill_the_sandbox_even_with_high_bits_set() {
    let e = env();
    for expr in [
        "import fcntl, termios\nfcntl.ioctl(0, termios.TIOCSTI, b'x')",
        // CVE-2019-10063: junk in the high 32 bits of the request.
        "b = ctypes.create_string_buffer(b'x')\nlibc.syscall(ctypes.c_long(16), ctypes.c_long(0), ctypes.c_ulong(0x100005412), b)",
        "b = ctypes.create_string_buffer(b'\\x02')\nlibc.syscall(ctypes.c_long(16), ctypes.c_long(0), ctypes.c_ulong(0x541C), b)",
    ] {
        let r = e.py(&format!("{expr}\nprint('survived')"));
        assert_seccomp_kill(&r, "ioctl");
    }
    // No controlling terminal either (setsid, no /dev/tty).
    let r = e.py("t('tty', lambda: open('/dev/tty'))\nprint('sid', os.getsid(0) == os.getpid())");
    expect_lines(&r, &["tty ENOENT", "sid True"]);
}

#[test]
fn foreign_abi_syscalls_are_killed() {
    let e = env();
    // x32 syscall number from a 64-bit process.
    let r = e.py("sc(0x40000000 | 39)\nprint('survived')");
    assert_seccomp_kill(&r, "abi");
    // 32-bit `int 0x80`, from a probe compiled now.
    let src = e.ws().join("int80.c");
    std::fs::write(
        &src,
        "int main(void){ long r; __asm__ volatile(\"int $0x80\" : \"=a\"(r) : \"a\"(20L)); return 0; }\n",
    )
    .unwrap();
    let bin = e.ws().join("int80");
    let cc = Command::new("cc")
        .arg("-o")
        .arg(&bin)
        .arg(&src)
        .status()
        .unwrap();
    assert!(cc.success());
    let r = e.run(&[], &[bin.to_str().unwrap()]);
    assert_seccomp_kill(&r, "abi");
}

#[test]
fn the_network_namespace_has_only_loopback_and_no_route() {
    let e = env();
    let r = e.py(
        "print('ifaces', sorted(l.split(':')[0].strip() for l in open('/proc/net/dev').read().splitlines()[2:]))\nprint('routes', len(open('/proc/net/route').read().splitlines()) - 1)\nprint('routes6', len([l for l in open('/proc/net/ipv6_route').read().splitlines() if not l.endswith('lo')]))",
    );
    expect_lines(&r, &["ifaces ['lo']", "routes 0", "routes6 0"]);
}

#[test]
fn loopback_services_of_the_host_are_unreachable() {
    let e = env();
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let tport = tcp.local_addr().unwrap().port();
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    // A host abstract UNIX socket of the same name the probe tries: abstract names are per
    // network namespace, so the sandbox cannot reach it.
    use std::os::linux::net::SocketAddrExt;
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(b"chitin-gw-test").unwrap();
    let _abstract = std::os::unix::net::UnixListener::bind_addr(&addr).unwrap();
    let uport = udp.local_addr().unwrap().port();
    udp.set_read_timeout(Some(std::time::Duration::from_millis(1500)))
        .unwrap();
    let r = e.py(&format!(
        "t('tcp', lambda: socket.create_connection(('127.0.0.1', {tport}), timeout=3))\nt('tcp6', lambda: socket.create_connection(('::1', {tport}), timeout=3))\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\ns.sendto(b'leak', ('127.0.0.1', {uport}))\nprint('udp sent')\nt('abstract', lambda: socket.socket(socket.AF_UNIX).connect('\\0chitin-gw-test'))"
    ));
    // TCP: landlock refuses the connect (no port granted). UDP is not landlock's business: the
    // datagram goes to the sandbox's own loopback, and the host never sees it.
    expect_lines(
        &r,
        &[
            "tcp EACCES",
            "tcp6 EACCES",
            "udp sent",
            "abstract EAFNOSUPPORT",
        ],
    );
    let mut buf = [0u8; 16];
    assert!(
        udp.recv_from(&mut buf).is_err(),
        "the host received a datagram"
    );
}

#[test]
fn inherited_file_descriptors_are_closed() {
    let e = env();
    let chitin = env!("CARGO_BIN_EXE_chitin");
    let out = Command::new("sh")
        .arg("-c")
        .arg(r#"exec 7</etc/hostname 9>>"$1/host-fd"; exec "$0" sandbox exec --workspace "$1" -- python3 -c 'import os; print(sorted(int(x) for x in os.listdir("/proc/self/fd")))'"#)
        .arg(chitin)
        .arg(e.ws())
        .env("CHITIN_HOME", e.home.path())
        .output()
        .unwrap();
    let s = String::from_utf8_lossy(&out.stdout);
    // 0-2 and the fd listdir itself opens.
    assert_eq!(
        s.trim(),
        "[0, 1, 2, 3]",
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_environment_is_exactly_the_allowlist() {
    let e = env();
    let out = e
        .cmd(&["--env", "EXTRA=1"], &["python3", "-c", "import os; print(sorted(os.environ)); print(open('/proc/self/environ','rb').read())"])
        .env("CHITIN_TEST_SECRET_TOKEN", "canary-env-42")
        .env("AWS_SECRET_ACCESS_KEY", "canary-env-43")
        .output()
        .unwrap();
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(
        s.starts_with(
            "['EXTRA', 'HOME', 'LANG', 'LOGNAME', 'PATH', 'PWD', 'TERM', 'TMPDIR', 'USER']\n"
        ),
        "{s}"
    );
    assert!(!s.contains("canary"), "{s}");
    assert!(
        !s.to_ascii_uppercase().contains("TOKEN") && !s.contains("SECRET"),
        "{s}"
    );
}

#[test]
fn setuid_binaries_gain_no_privilege() {
    let e = env();
    let suid = e.ws().join("suidcat");
    std::fs::copy("/usr/bin/cat", &suid).unwrap();
    std::fs::set_permissions(&suid, std::fs::Permissions::from_mode(0o4755)).unwrap();
    let r = e.run(&[], &["./suidcat", "/proc/self/status"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    for want in [
        "Uid:\t1000\t1000\t1000\t1000",
        "CapEff:\t0000000000000000",
        "CapPrm:\t0000000000000000",
        "NoNewPrivs:\t1",
    ] {
        assert!(r.stdout.contains(want), "missing {want:?} in {}", r.stdout);
    }
    let r = e.run(&[], &["su", "-c", "id"]);
    assert_ne!(r.code, 0);
    let r = e.run(&[], &["mount", "-t", "tmpfs", "x", "/tmp"]);
    assert_ne!(r.code, 0);
}

#[test]
fn every_thread_runs_under_seccomp_no_new_privs_and_no_capabilities() {
    let e = env();
    let r = e.py(
        r#"
import threading, time
ts = [threading.Thread(target=time.sleep, args=(0.5,)) for _ in range(8)]
[x.start() for x in ts]
tids = os.listdir('/proc/self/task')
ok = 0
for tid in tids:
    st = open('/proc/self/task/%s/status' % tid).read()
    if 'Seccomp:\t2' in st and 'NoNewPrivs:\t1' in st and all(('%s:\t0000000000000000' % c) in st for c in ('CapInh','CapPrm','CapEff','CapBnd','CapAmb')):
        ok += 1
print('threads', len(tids), 'confined', ok)
[x.join() for x in ts]
"#,
    );
    expect_lines(&r, &["threads 9 confined 9"]);
}

#[test]
fn new_namespaces_and_mount_changes_are_impossible() {
    let e = env();
    let r = e.run(&[], &["unshare", "-r", "true"]);
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("Operation not permitted"), "{}", r.stderr);
    let r = e.run(&[], &["sh", "-c", "hostname; ulimit -c"]);
    assert_eq!(r.stdout, "sandbox\n0\n");
}

#[test]
fn another_sessions_workspace_is_invisible() {
    let a = env();
    let b = env();
    std::fs::write(b.ws().join("notes.txt"), "session-b-canary").unwrap();
    std::fs::set_permissions(b.ws(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let r = a.py(&format!(
        "t('other', lambda: open({:?}).read())\nt('list', lambda: os.listdir({:?}))",
        b.ws().join("notes.txt").to_str().unwrap(),
        b.ws().to_str().unwrap()
    ));
    expect_lines(&r, &["other ENOENT", "list ENOENT"]);
}

#[test]
fn the_state_directory_can_never_be_bound() {
    let e = env();
    let inside = e.home.path().join("data");
    std::fs::create_dir(&inside).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_chitin"))
        .env("CHITIN_HOME", e.home.path())
        .args(["sandbox", "exec", "--workspace"])
        .arg(&inside)
        .args(["--", "true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&out.stderr).contains("sandboxes may never see"));
    let r = e.run(&["--ro", e.home.path().to_str().unwrap()], &["true"]);
    assert_eq!(r.code, 125);
    assert!(
        r.stderr.contains("--ro path") && r.stderr.contains("never see"),
        "{}",
        r.stderr
    );
}

#[test]
fn host_unix_sockets_are_unreachable() {
    let e = env();
    let d = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let sock = d.path().join("docker.sock");
    let _l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o777)).unwrap();
    let r = e.py(&format!(
        "def c(p):\n    s = socket.socket(socket.AF_UNIX)\n    s.connect(p)\nt('fixture', lambda: c({:?}))\nt('dbus', lambda: c('/run/dbus/system_bus_socket'))\nt('docker', lambda: c('/var/run/docker.sock'))",
        sock.to_str().unwrap()
    ));
    // No AF_UNIX socket can be created at all (seccomp), so no path is ever tried.
    expect_lines(
        &r,
        &[
            "fixture EAFNOSUPPORT",
            "dbus EAFNOSUPPORT",
            "docker EAFNOSUPPORT",
        ],
    );
}

#[test]
fn landlock_itself_refuses_what_the_mounts_allow() {
    // Paths that are mounted, DAC-permitted and writable in the view, where only landlock
    // answers: device ioctls on /dev/null (no IOCTL_DEV right: EACCES, not ENOTTY), TCP bind
    // and connect inside the sandbox's own network namespace, and /proc/1 of the init.
    let e = env();
    let r = e.py(
        "import fcntl, termios\nt('ioctl_devnull', lambda: fcntl.ioctl(open('/dev/null'), termios.TCGETS, bytes(64)))\nt('bind', lambda: socket.socket().bind(('127.0.0.1', 8080)))\nt('bind_any', lambda: socket.socket().bind(('0.0.0.0', 0)))\nt('connect_self', lambda: socket.create_connection(('127.0.0.1', 8080), timeout=2))\nt('init_fd_open', lambda: open('/proc/1/fd/0'))\nt('init_fd_link', lambda: os.readlink('/proc/1/fd/0'))",
    );
    expect_lines(
        &r,
        &[
            "ioctl_devnull EACCES",
            "bind EACCES",
            "bind_any EACCES",
            "connect_self EACCES",
            "init_fd_open EACCES",
            "init_fd_link EACCES",
        ],
    );
}
