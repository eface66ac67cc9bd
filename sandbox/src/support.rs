//! What the running kernel can enforce (`chitin sandbox check`).

use crate::sys;

/// The lowest landlock ABI we accept: v3 (filesystem rights including REFER and TRUNCATE).
/// TCP rules (v4) and scoping (v6) are added when the ABI has them; the network namespace and
/// the PID namespace cover those needs on older kernels.
pub const MIN_LANDLOCK_ABI: i32 = 3;

/// Kernel support for each layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Support {
    pub landlock_abi: i32,
    pub seccomp: bool,
    pub user_ns: bool,
    pub pid_ns: bool,
    pub net_ns: bool,
    /// Other namespaces the sandbox needs (mount, IPC, UTS).
    pub other_ns: bool,
    /// Human-readable names of the missing layers.
    pub missing: Vec<String>,
}

impl Support {
    /// Full enforcement is available.
    pub fn enforced(&self) -> bool {
        self.missing.is_empty()
    }

    /// Computes `missing` from the flags.
    pub fn from_parts(
        landlock_abi: i32,
        seccomp: bool,
        user_ns: bool,
        pid_ns: bool,
        net_ns: bool,
        other_ns: bool,
    ) -> Self {
        let mut missing = Vec::new();
        if landlock_abi < MIN_LANDLOCK_ABI {
            missing.push(format!(
                "landlock (ABI {landlock_abi}, need >= {MIN_LANDLOCK_ABI})"
            ));
        }
        if !seccomp {
            missing.push("seccomp (filter with user notification, x86_64)".into());
        }
        if !user_ns {
            missing.push("user namespaces".into());
        }
        if !pid_ns {
            missing.push("pid namespaces".into());
        }
        if !net_ns {
            missing.push("network namespaces".into());
        }
        if !other_ns {
            missing.push("mount/ipc/uts namespaces".into());
        }
        Self {
            landlock_abi,
            seccomp,
            user_ns,
            pid_ns,
            net_ns,
            other_ns,
            missing,
        }
    }
}

const BIT_USER: i32 = 1;
const BIT_PID: i32 = 2;
const BIT_NET: i32 = 4;
const BIT_OTHER: i32 = 8;
const BIT_SECCOMP: i32 = 16;

/// Probes the kernel in a throwaway child (so the caller's namespaces and filters are
/// untouched). Safe to call from a multithreaded process: the child only makes raw syscalls
/// on memory prepared before the fork.
pub fn check() -> Support {
    let abi = sys::landlock_abi();
    // An allow-all filter, built before the fork.
    let allow = [libc::sock_filter {
        code: 0x06,
        jt: 0,
        jf: 0,
        k: 0x7fff_0000,
    }];
    let bits = match sys::fork() {
        Ok(0) => {
            let mut bits = 0;
            if sys::unshare(libc::CLONE_NEWUSER).is_ok() {
                bits |= BIT_USER;
                if sys::unshare(libc::CLONE_NEWPID).is_ok() {
                    bits |= BIT_PID;
                }
                if sys::unshare(libc::CLONE_NEWNET).is_ok() {
                    bits |= BIT_NET;
                }
                if sys::unshare(libc::CLONE_NEWNS | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS).is_ok()
                {
                    bits |= BIT_OTHER;
                }
            }
            if cfg!(target_arch = "x86_64")
                && sys::prctl(libc::PR_SET_NO_NEW_PRIVS, 1).is_ok()
                && sys::seccomp_with_listener(&allow).is_ok()
            {
                bits |= BIT_SECCOMP;
            }
            sys::exit_now(bits)
        }
        Ok(pid) => match sys::wait4(pid, 0) {
            Ok((_, status, _)) if libc::WIFEXITED(status) => libc::WEXITSTATUS(status),
            _ => 0,
        },
        Err(_) => 0,
    };
    Support::from_parts(
        abi,
        bits & BIT_SECCOMP != 0,
        bits & BIT_USER != 0,
        bits & BIT_PID != 0,
        bits & BIT_NET != 0,
        bits & BIT_OTHER != 0,
    )
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

    #[test]
    fn a_low_landlock_abi_is_reported_missing() {
        let s = Support::from_parts(2, true, true, true, true, true);
        assert!(!s.enforced());
        assert_eq!(s.missing, vec!["landlock (ABI 2, need >= 3)".to_string()]);
    }

    #[test]
    fn each_missing_layer_is_named() {
        let s = Support::from_parts(7, false, false, false, false, false);
        assert_eq!(s.missing.len(), 5);
        assert!(s.missing[0].starts_with("seccomp"));
        assert_eq!(s.missing[1], "user namespaces");
        let full = Support::from_parts(7, true, true, true, true, true);
        assert!(full.enforced());
    }
}
