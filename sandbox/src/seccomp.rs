//! Seccomp profiles: reviewed data (`sandbox/seccomp/*.policy`) compiled to classic BPF.
//!
//! We compile the filter ourselves (a few dozen instructions) instead of using seccompiler
//! because the "kill" class must be `SECCOMP_RET_USER_NOTIF`: the sandbox's supervisor (PID 1
//! of the sandbox) receives the notification, so it can *name* the syscall in the kill reason
//! (`seccomp:<syscall>`), which a plain `SECCOMP_RET_KILL_PROCESS` cannot do across `exec`.
//! A foreign ABI (i386 `int 0x80`, x32) is killed outright with `SECCOMP_RET_KILL_PROCESS`.

use std::collections::BTreeMap;

/// The default profile, as reviewed text.
pub const DEFAULT_PROFILE: &str = include_str!("../seccomp/default.policy");

/// The default profile compiled by [`program`], kept as data so that a launch does not parse
/// and compile the profile text on every run. Generated from [`DEFAULT_PROFILE`]; the test
/// `the_shipped_filters_are_exactly_the_compiled_reviewed_profile` pins both programs to what
/// [`program`] compiles from the text (and regenerates the file when asked to).
mod compiled {
    /// One instruction (`const` constructor for the generated tables).
    const fn i(code: u16, jt: u8, jf: u8, k: u32) -> libc::sock_filter {
        libc::sock_filter { code, jt, jf, k }
    }
    include!("../seccomp/default.bpf.rs");
}

/// The filter a run installs: [`program`]`(unix_sockets)`, compiled at build time.
pub fn filter(unix_sockets: bool) -> &'static [libc::sock_filter] {
    if unix_sockets {
        compiled::UNIX_SOCKETS
    } else {
        compiled::DEFAULT
    }
}

/// `AUDIT_ARCH_X86_64`.
pub const AUDIT_ARCH_X86_64: u32 = 0xC000_003E;
/// `__X32_SYSCALL_BIT`.
const X32_SYSCALL_BIT: u32 = 0x4000_0000;

/// What a matching rule does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Fail the syscall with this errno.
    Errno(u16),
    /// Let the supervisor name the syscall and kill the whole sandbox.
    Kill,
}

/// A condition on the low 32 bits of one argument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cond {
    /// `arg == value`
    Eq { arg: u8, value: u32 },
    /// `arg & mask == value`
    MaskedEq { arg: u8, mask: u32, value: u32 },
    /// `arg & mask != 0`
    AnySet { arg: u8, mask: u32 },
    /// `arg` is none of the values.
    NotIn { arg: u8, values: Vec<u32> },
}

/// One reviewed rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub syscall: &'static str,
    pub nr: u32,
    pub action: Action,
    pub cond: Option<Cond>,
    /// Why the rule exists (mandatory in the profile).
    pub reason: String,
}

/// A parsed profile.
#[derive(Debug, Clone)]
pub struct Profile {
    pub rules: Vec<Rule>,
}

/// A profile that cannot be compiled.
#[derive(Debug, thiserror::Error)]
#[error("seccomp profile line {line}: {message}")]
pub struct ProfileError {
    pub line: usize,
    pub message: String,
}

macro_rules! syscalls {
    ($($name:ident),* $(,)?) => {
        /// Syscalls the profiles may name (x86_64 numbers).
        pub const SYSCALLS: &[(&str, i64)] = &[$((stringify!($name), libc::$name)),*];
    };
}

syscalls!(
    SYS_ptrace,
    SYS_process_vm_readv,
    SYS_process_vm_writev,
    SYS_process_madvise,
    SYS_pidfd_getfd,
    SYS_kcmp,
    SYS_mount,
    SYS_umount2,
    SYS_pivot_root,
    SYS_chroot,
    SYS_open_tree,
    SYS_move_mount,
    SYS_fsopen,
    SYS_fsconfig,
    SYS_fsmount,
    SYS_fspick,
    SYS_mount_setattr,
    SYS_unshare,
    SYS_setns,
    SYS_clone,
    SYS_clone3,
    SYS_io_uring_setup,
    SYS_io_uring_enter,
    SYS_io_uring_register,
    SYS_bpf,
    SYS_perf_event_open,
    SYS_userfaultfd,
    SYS_keyctl,
    SYS_add_key,
    SYS_request_key,
    SYS_name_to_handle_at,
    SYS_open_by_handle_at,
    SYS_acct,
    SYS_swapon,
    SYS_swapoff,
    SYS_reboot,
    SYS_syslog,
    SYS_settimeofday,
    SYS_clock_settime,
    SYS_clock_adjtime,
    SYS_adjtimex,
    SYS_quotactl,
    SYS_quotactl_fd,
    SYS_iopl,
    SYS_ioperm,
    SYS_vhangup,
    SYS_uselib,
    SYS_lookup_dcookie,
    SYS_mbind,
    SYS_migrate_pages,
    SYS_move_pages,
    SYS_fanotify_init,
    SYS_personality,
    SYS_ioctl,
    SYS_socket,
    SYS_socketpair,
    SYS_chmod,
    SYS_fchmod,
    SYS_fchmodat,
    SYS_fchmodat2,
    SYS_open,
    SYS_openat,
    SYS_creat,
    SYS_mknod,
    SYS_mknodat,
    SYS_kexec_load,
    SYS_kexec_file_load,
    SYS_init_module,
    SYS_finit_module,
    SYS_delete_module,
);

/// The syscall's name for a number, if the profiles know it.
pub fn syscall_name(nr: i64) -> Option<&'static str> {
    SYSCALLS
        .iter()
        .find(|(_, n)| *n == nr)
        .map(|(name, _)| name.trim_start_matches("SYS_"))
}

fn syscall_nr(name: &str) -> Option<(&'static str, u32)> {
    SYSCALLS.iter().find_map(|(n, nr)| {
        let short = n.trim_start_matches("SYS_");
        (short == name)
            .then(|| u32::try_from(*nr).ok().map(|nr| (short, nr)))
            .flatten()
    })
}

const ERRNOS: &[(&str, i32)] = &[
    ("EPERM", libc::EPERM),
    ("EACCES", libc::EACCES),
    ("ENOSYS", libc::ENOSYS),
    ("EAFNOSUPPORT", libc::EAFNOSUPPORT),
    ("EINVAL", libc::EINVAL),
];

fn parse_u32(s: &str) -> Option<u32> {
    if let Some(hex) = s.strip_prefix("0x") {
        u32::from_str_radix(hex, 16).ok()
    } else {
        s.parse().ok()
    }
}

fn parse_arg(s: &str) -> Option<u8> {
    let n: u8 = s.strip_prefix("arg")?.parse().ok()?;
    (n < 6).then_some(n)
}

fn parse_cond(words: &[&str]) -> Result<Cond, String> {
    let bad = || format!("cannot parse condition `{}`", words.join(" "));
    match words {
        [a, "==", v] => Ok(Cond::Eq {
            arg: parse_arg(a).ok_or_else(bad)?,
            value: parse_u32(v).ok_or_else(bad)?,
        }),
        [a, "&", m, "==", v] => Ok(Cond::MaskedEq {
            arg: parse_arg(a).ok_or_else(bad)?,
            mask: parse_u32(m).ok_or_else(bad)?,
            value: parse_u32(v).ok_or_else(bad)?,
        }),
        [a, "&", m] => Ok(Cond::AnySet {
            arg: parse_arg(a).ok_or_else(bad)?,
            mask: parse_u32(m).ok_or_else(bad)?,
        }),
        [a, "!in", list] => Ok(Cond::NotIn {
            arg: parse_arg(a).ok_or_else(bad)?,
            values: list
                .split(',')
                .map(|v| parse_u32(v).ok_or_else(bad))
                .collect::<Result<_, _>>()?,
        }),
        _ => Err(bad()),
    }
}

/// Parses a profile. Every rule must carry a `# reason`; unknown syscalls, actions and errnos
/// are errors (a typo must not silently drop a rule).
pub fn parse(text: &str) -> Result<Profile, ProfileError> {
    let mut rules = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let err = |message: String| ProfileError { line, message };
        let trimmed = raw.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let Some((body, reason)) = trimmed.split_once('#') else {
            return Err(err(
                "rule has no `# reason` comment; every rule must say why it exists".into(),
            ));
        };
        let reason = reason.trim();
        if reason.is_empty() {
            return Err(err("rule has an empty `# reason` comment".into()));
        }
        let words: Vec<&str> = body.split_whitespace().collect();
        let [name, action, rest @ ..] = words.as_slice() else {
            return Err(err("expected `<syscall> <action> [if <condition>]`".into()));
        };
        let (syscall, nr) =
            syscall_nr(name).ok_or_else(|| err(format!("unknown syscall `{name}`")))?;
        let action = if *action == "kill" {
            Action::Kill
        } else if let Some(e) = action.strip_prefix("errno:") {
            let (_, n) = ERRNOS
                .iter()
                .find(|(n, _)| *n == e)
                .ok_or_else(|| err(format!("unknown errno `{e}`")))?;
            Action::Errno(u16::try_from(*n).map_err(|_| err("errno out of range".into()))?)
        } else {
            return Err(err(format!(
                "unknown action `{action}` (use errno:<NAME> or kill)"
            )));
        };
        let cond = match rest {
            [] => None,
            ["if", c @ ..] => Some(parse_cond(c).map_err(err)?),
            _ => return Err(err("expected `if <condition>` after the action".into())),
        };
        rules.push(Rule {
            syscall,
            nr,
            action,
            cond,
            reason: reason.to_string(),
        });
    }
    if rules.is_empty() {
        return Err(ProfileError {
            line: 0,
            message: "profile has no rules".into(),
        });
    }
    Ok(Profile { rules })
}

// Classic BPF opcodes.
const BPF_LD_W_ABS: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS
const BPF_JMP_JEQ_K: u16 = 0x15;
const BPF_JMP_JGE_K: u16 = 0x35;
const BPF_JMP_JSET_K: u16 = 0x45;
const BPF_JMP_JA: u16 = 0x05;
const BPF_ALU_AND_K: u16 = 0x54;
const BPF_RET_K: u16 = 0x06;

const SECCOMP_RET_ALLOW: u32 = 0x7fff_0000;
const SECCOMP_RET_ERRNO: u32 = 0x0005_0000;
const SECCOMP_RET_KILL_PROCESS: u32 = 0x8000_0000;
const SECCOMP_RET_USER_NOTIF: u32 = 0x7fc0_0000;

// offsets in struct seccomp_data
const OFF_NR: u32 = 0;
const OFF_ARCH: u32 = 4;
fn off_arg_low(arg: u8) -> u32 {
    16 + 8 * u32::from(arg) // little endian: the low word comes first
}

fn stmt(code: u16, k: u32) -> libc::sock_filter {
    libc::sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}
fn jump(code: u16, k: u32, jt: u8, jf: u8) -> libc::sock_filter {
    libc::sock_filter { code, jt, jf, k }
}

fn ret_for(action: Action) -> u32 {
    match action {
        Action::Errno(e) => SECCOMP_RET_ERRNO | u32::from(e),
        Action::Kill => SECCOMP_RET_USER_NOTIF,
    }
}

/// Instructions of one rule: conditions fall through when true; a false condition jumps to
/// the end of the rule (the next rule). Ends with the rule's `ret`.
fn compile_rule(rule: &Rule) -> Result<Vec<libc::sock_filter>, ProfileError> {
    // Placeholder jump offsets are patched once the rule length is known: we record, for each
    // jump, which field means "condition false".
    enum Fix {
        None,
        Jf,
        Jt,
    }
    let mut code: Vec<(libc::sock_filter, Fix)> = Vec::new();
    if let Some(cond) = &rule.cond {
        match cond {
            Cond::Eq { arg, value } => {
                code.push((stmt(BPF_LD_W_ABS, off_arg_low(*arg)), Fix::None));
                code.push((jump(BPF_JMP_JEQ_K, *value, 0, 0), Fix::Jf));
            }
            Cond::MaskedEq { arg, mask, value } => {
                code.push((stmt(BPF_LD_W_ABS, off_arg_low(*arg)), Fix::None));
                code.push((stmt(BPF_ALU_AND_K, *mask), Fix::None));
                code.push((jump(BPF_JMP_JEQ_K, *value, 0, 0), Fix::Jf));
            }
            Cond::AnySet { arg, mask } => {
                code.push((stmt(BPF_LD_W_ABS, off_arg_low(*arg)), Fix::None));
                code.push((jump(BPF_JMP_JSET_K, *mask, 0, 0), Fix::Jf));
            }
            Cond::NotIn { arg, values } => {
                code.push((stmt(BPF_LD_W_ABS, off_arg_low(*arg)), Fix::None));
                for v in values {
                    code.push((jump(BPF_JMP_JEQ_K, *v, 0, 0), Fix::Jt));
                }
            }
        }
    }
    code.push((stmt(BPF_RET_K, ret_for(rule.action)), Fix::None));
    let len = code.len();
    let mut out = Vec::with_capacity(len);
    for (i, (mut ins, fix)) in code.into_iter().enumerate() {
        // Jump target "next rule" = index `len`; offsets are relative to the next instruction.
        let off = u8::try_from(len - i - 1).map_err(|_| ProfileError {
            line: 0,
            message: format!("rule for {} is too long", rule.syscall),
        })?;
        match fix {
            Fix::None => {}
            Fix::Jf => ins.jf = off,
            Fix::Jt => ins.jt = off,
        }
        out.push(ins);
    }
    Ok(out)
}

/// Compiles a profile to a BPF program for x86_64.
pub fn compile(profile: &Profile) -> Result<Vec<libc::sock_filter>, ProfileError> {
    let mut prog = vec![
        stmt(BPF_LD_W_ABS, OFF_ARCH),
        jump(BPF_JMP_JEQ_K, AUDIT_ARCH_X86_64, 1, 0),
        stmt(BPF_RET_K, SECCOMP_RET_KILL_PROCESS),
        stmt(BPF_LD_W_ABS, OFF_NR),
        jump(BPF_JMP_JGE_K, X32_SYSCALL_BIT, 0, 1),
        stmt(BPF_RET_K, SECCOMP_RET_KILL_PROCESS),
    ];
    // Group rules by syscall, keeping their order.
    let mut groups: BTreeMap<u32, Vec<&Rule>> = BTreeMap::new();
    for r in &profile.rules {
        groups.entry(r.nr).or_default().push(r);
    }
    for (nr, rules) in groups {
        let mut block = Vec::new();
        for r in rules {
            block.extend(compile_rule(r)?);
        }
        // No rule matched: allow. Every block ends in a `ret`, so blocks never fall through.
        block.push(stmt(BPF_RET_K, SECCOMP_RET_ALLOW));
        // The accumulator must hold the syscall number again at each block: rules load args.
        prog.push(stmt(BPF_LD_W_ABS, OFF_NR));
        prog.push(jump(BPF_JMP_JEQ_K, nr, 1, 0));
        let skip = u32::try_from(block.len()).map_err(|_| ProfileError {
            line: 0,
            message: "profile too large".into(),
        })?;
        prog.push(stmt(BPF_JMP_JA, skip));
        prog.extend(block);
    }
    prog.push(stmt(BPF_RET_K, SECCOMP_RET_ALLOW));
    if prog.len() > 4096 {
        return Err(ProfileError {
            line: 0,
            message: "compiled filter exceeds 4096 instructions".into(),
        });
    }
    Ok(prog)
}

/// Parses and compiles the default profile.
pub fn default_program() -> Result<Vec<libc::sock_filter>, ProfileError> {
    compile(&parse(DEFAULT_PROFILE)?)
}

/// The default profile, except that `socket(AF_UNIX)` is allowed (`unix_sockets`): for a
/// program that needs Unix sockets of its own (Chromium's process singleton). Abstract
/// sockets are scoped to the sandbox's network namespace, and the mount view holds no host
/// socket, so such a socket reaches only what the sandbox itself created.
pub fn program(unix_sockets: bool) -> Result<Vec<libc::sock_filter>, ProfileError> {
    let mut p = parse(DEFAULT_PROFILE)?;
    if unix_sockets {
        for r in &mut p.rules {
            if let ("socket", Some(Cond::NotIn { arg: 0, values })) = (r.syscall, r.cond.as_mut())
                && !values.contains(&1)
            {
                values.push(1);
            }
        }
    }
    compile(&p)
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        reason = "tests"
    )]
    use super::*;

    /// A tiny classic-BPF interpreter for the subset we emit, to test the compiled program
    /// without installing it.
    fn run(prog: &[libc::sock_filter], arch: u32, nr: u32, args: [u64; 6]) -> u32 {
        let mut data = Vec::new();
        data.extend_from_slice(&nr.to_le_bytes());
        data.extend_from_slice(&arch.to_le_bytes());
        data.extend_from_slice(&0u64.to_le_bytes());
        for a in args {
            data.extend_from_slice(&a.to_le_bytes());
        }
        let (mut pc, mut acc) = (0usize, 0u32);
        loop {
            let ins = prog[pc];
            pc += 1;
            match ins.code {
                BPF_LD_W_ABS => {
                    let o = ins.k as usize;
                    acc = u32::from_le_bytes(data[o..o + 4].try_into().unwrap());
                }
                BPF_ALU_AND_K => acc &= ins.k,
                BPF_JMP_JA => pc += ins.k as usize,
                BPF_JMP_JEQ_K | BPF_JMP_JGE_K | BPF_JMP_JSET_K => {
                    let t = match ins.code {
                        BPF_JMP_JEQ_K => acc == ins.k,
                        BPF_JMP_JGE_K => acc >= ins.k,
                        _ => acc & ins.k != 0,
                    };
                    pc += usize::from(if t { ins.jt } else { ins.jf });
                }
                BPF_RET_K => return ins.k,
                c => panic!("unexpected opcode {c:#x}"),
            }
        }
    }

    fn nr(name: &str) -> u32 {
        syscall_nr(name).unwrap().1
    }

    #[test]
    fn the_default_profile_parses_and_every_rule_has_a_reason() {
        let p = parse(DEFAULT_PROFILE).unwrap();
        assert!(p.rules.len() > 50);
        assert!(p.rules.iter().all(|r| r.reason.len() > 5));
    }

    #[test]
    fn a_rule_without_a_reason_is_rejected() {
        let e = parse("ptrace errno:EPERM\n").unwrap_err();
        assert_eq!(e.line, 1);
        assert!(e.message.contains("reason"), "{e}");
    }

    #[test]
    fn unknown_syscalls_actions_and_errnos_are_rejected() {
        assert!(
            parse("ptrac errno:EPERM # typo\n")
                .unwrap_err()
                .message
                .contains("unknown syscall")
        );
        assert!(
            parse("ptrace allow # no\n")
                .unwrap_err()
                .message
                .contains("unknown action")
        );
        assert!(
            parse("ptrace errno:EWHAT # no\n")
                .unwrap_err()
                .message
                .contains("unknown errno")
        );
        assert!(
            parse("ptrace errno:EPERM if arg9 == 1 # no\n")
                .unwrap_err()
                .message
                .contains("condition")
        );
    }

    #[test]
    fn the_compiled_default_filter_decides_as_reviewed() {
        let prog = default_program().unwrap();
        let a = AUDIT_ARCH_X86_64;
        let errno = |e: i32| SECCOMP_RET_ERRNO | e as u32;
        // Foreign ABIs die.
        assert_eq!(run(&prog, 0x4000_0003, 0, [0; 6]), SECCOMP_RET_KILL_PROCESS);
        assert_eq!(
            run(&prog, a, X32_SYSCALL_BIT | 1, [0; 6]),
            SECCOMP_RET_KILL_PROCESS
        );
        // Plain calls pass.
        assert_eq!(run(&prog, a, 0, [0; 6]), SECCOMP_RET_ALLOW); // read
        assert_eq!(run(&prog, a, nr("ptrace"), [0; 6]), errno(libc::EPERM));
        assert_eq!(run(&prog, a, nr("clone3"), [0; 6]), errno(libc::ENOSYS));
        // clone: plain fork flags pass, namespace flags do not.
        assert_eq!(
            run(&prog, a, nr("clone"), [0x0120_0011, 0, 0, 0, 0, 0]),
            SECCOMP_RET_ALLOW
        );
        assert_eq!(
            run(&prog, a, nr("clone"), [0x1000_0011, 0, 0, 0, 0, 0]),
            errno(libc::EPERM)
        );
        // TIOCSTI with junk in the high 32 bits is still caught.
        assert_eq!(
            run(&prog, a, nr("ioctl"), [0, 0x1_0000_5412, 0, 0, 0, 0]),
            SECCOMP_RET_USER_NOTIF
        );
        assert_eq!(
            run(&prog, a, nr("ioctl"), [0, 0x5401, 0, 0, 0, 0]),
            SECCOMP_RET_ALLOW
        );
        // Socket families and types: no AF_UNIX socket (pathname connect), but UNIX pairs.
        for fam in [2u64, 10] {
            assert_eq!(
                run(&prog, a, nr("socket"), [fam, 1, 0, 0, 0, 0]),
                SECCOMP_RET_ALLOW
            );
        }
        assert_eq!(
            run(&prog, a, nr("socket"), [1, 1, 0, 0, 0, 0]),
            errno(libc::EAFNOSUPPORT)
        );
        assert_eq!(
            run(&prog, a, nr("socketpair"), [1, 1, 0, 0, 0, 0]),
            SECCOMP_RET_ALLOW
        );
        assert_eq!(
            run(&prog, a, nr("socket"), [16, 3, 0, 0, 0, 0]),
            errno(libc::EAFNOSUPPORT)
        );
        assert_eq!(
            run(&prog, a, nr("socket"), [2, 0x80003, 0, 0, 0, 0]),
            errno(libc::EPERM)
        );
        assert_eq!(
            run(&prog, a, nr("personality"), [0xffff_ffff, 0, 0, 0, 0, 0]),
            SECCOMP_RET_ALLOW
        );
        assert_eq!(
            run(&prog, a, nr("personality"), [0x0040_0000, 0, 0, 0, 0, 0]),
            errno(libc::EPERM)
        );
        assert_eq!(
            run(&prog, a, nr("kexec_load"), [0; 6]),
            SECCOMP_RET_USER_NOTIF
        );
    }

    /// The generated `default.bpf.rs` for the current profile text.
    fn generated() -> String {
        let mut out = String::from(
            "// @generated from default.policy by `seccomp::program`: do not edit. After a change\n\
             // of the profile, regenerate with\n\
             // CHITIN_SECCOMP_BLESS=1 cargo test --workspace --lib the_shipped_filters_are\n",
        );
        for (name, unix) in [("DEFAULT", false), ("UNIX_SOCKETS", true)] {
            out.push_str(&format!("pub const {name}: &[libc::sock_filter] = &[\n"));
            for f in program(unix).unwrap() {
                out.push_str(&format!(
                    "    i({:#06x}, {}, {}, {:#x}),\n",
                    f.code, f.jt, f.jf, f.k
                ));
            }
            out.push_str("];\n");
        }
        out
    }

    fn words(p: &[libc::sock_filter]) -> Vec<(u16, u8, u8, u32)> {
        p.iter().map(|f| (f.code, f.jt, f.jf, f.k)).collect()
    }

    #[test]
    fn the_shipped_filters_are_exactly_the_compiled_reviewed_profile() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/seccomp/default.bpf.rs");
        if std::env::var_os("CHITIN_SECCOMP_BLESS").is_some() {
            std::fs::write(path, generated()).unwrap();
        }
        for unix in [false, true] {
            assert_eq!(
                words(filter(unix)),
                words(&program(unix).unwrap()),
                "{path} is not the compiled profile (unix_sockets = {unix}); regenerate it with \
                 CHITIN_SECCOMP_BLESS=1 cargo test --workspace --lib the_shipped_filters_are"
            );
        }
        assert_ne!(words(filter(false)), words(filter(true)));
        // The file itself is exactly what the generator writes (no hand edits beside it).
        assert_eq!(std::fs::read_to_string(path).unwrap(), generated());
    }

    #[test]
    fn syscall_names_round_trip() {
        assert_eq!(
            syscall_name(libc::SYS_open_by_handle_at),
            Some("open_by_handle_at")
        );
        assert_eq!(syscall_name(libc::SYS_read), None);
    }
}
