//! Thin wrappers over the raw syscalls the jailer needs. All `unsafe` of the crate except the
//! final `execve` lives here; each wrapper checks the return value and turns it into
//! `io::Result`.

use std::ffi::CStr;
use std::io;
use std::os::fd::RawFd;

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn check_long(ret: libc::c_long) -> io::Result<libc::c_long> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// The errno of an io::Error (EIO when it carries none).
pub fn errno_of(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

/// `fork()`. Returns 0 in the child.
///
/// Callers must only fork from a single-threaded process (checked by the launcher), so the
/// child may allocate freely.
pub fn fork() -> io::Result<libc::pid_t> {
    // SAFETY: fork has no memory-safety preconditions; the launcher is single-threaded, so no
    // lock can be held by another thread in the child.
    check(unsafe { libc::fork() })
}

/// `clone(flags | SIGCHLD)` without a new stack: a `fork` that also creates namespaces, so the
/// child is PID 1 of a new PID namespace. Returns 0 in the child.
///
/// Like [`fork`], only from a single-threaded process. The child does not run glibc's fork
/// handlers and its thread descriptor keeps the parent's cached TID; the child therefore never
/// calls `raise`/`abort` or pthread functions that rely on it (it only makes syscalls, allocates,
/// does file I/O, and `fork`s, which refreshes the TID for its own child).
pub fn clone_fork(flags: libc::c_int) -> io::Result<libc::pid_t> {
    let flags = libc::c_ulong::try_from(flags | libc::SIGCHLD)
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: with a null stack the child continues on a copy of the parent's stack, exactly
    // like fork; the caller is single-threaded so no lock is held by another thread; the
    // remaining pointer arguments (parent_tid, child_tid, tls) are null/0 and unused without
    // the corresponding CLONE_* flags.
    let r = check_long(unsafe {
        libc::syscall(
            libc::SYS_clone,
            flags,
            std::ptr::null_mut::<libc::c_void>(),
            std::ptr::null_mut::<libc::c_int>(),
            std::ptr::null_mut::<libc::c_int>(),
            0 as libc::c_ulong,
        )
    })?;
    libc::pid_t::try_from(r).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// `_exit(code)`: leaves without running destructors or atexit handlers (a forked child must
/// not flush the parent's buffers).
pub fn exit_now(code: i32) -> ! {
    // SAFETY: _exit never returns and has no preconditions.
    unsafe { libc::_exit(code) }
}

pub fn getpid() -> libc::pid_t {
    // SAFETY: no preconditions.
    unsafe { libc::getpid() }
}

pub fn geteuid() -> u32 {
    // SAFETY: no preconditions.
    unsafe { libc::geteuid() }
}

pub fn getegid() -> u32 {
    // SAFETY: no preconditions.
    unsafe { libc::getegid() }
}

/// Writes all of `buf` to `fd`.
pub fn write_all(fd: RawFd, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        // SAFETY: buf is a valid readable slice of buf.len() bytes.
        let n = unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        let n = usize::try_from(n).unwrap_or(0);
        buf = buf.get(n..).unwrap_or_default();
    }
    Ok(())
}

/// One `read`.
pub fn read(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        // SAFETY: buf is a valid writable slice of buf.len() bytes.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        return Ok(usize::try_from(n).unwrap_or(0));
    }
}

pub fn close(fd: RawFd) {
    // SAFETY: closing an fd we own; errors are irrelevant here.
    unsafe {
        libc::close(fd);
    }
}

/// `pipe2(O_CLOEXEC)` → (read, write).
pub fn pipe() -> io::Result<(RawFd, RawFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: fds points to two writable ints.
    check(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
    Ok((fds[0], fds[1]))
}

/// `socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC)`.
pub fn seqpacket_pair() -> io::Result<(RawFd, RawFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: fds points to two writable ints.
    check(unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    })?;
    Ok((fds[0], fds[1]))
}

pub fn dup2(from: RawFd, to: RawFd) -> io::Result<()> {
    // SAFETY: dup2 on fds; no memory involved.
    check(unsafe { libc::dup2(from, to) }).map(|_| ())
}

pub fn unshare(flags: libc::c_int) -> io::Result<()> {
    // SAFETY: no memory involved.
    check(unsafe { libc::unshare(flags) }).map(|_| ())
}

pub fn prctl(option: libc::c_int, arg2: libc::c_ulong) -> io::Result<libc::c_int> {
    // SAFETY: the options we use take integer arguments only.
    check(unsafe {
        libc::prctl(
            option,
            arg2,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        )
    })
}

pub fn setsid() -> io::Result<()> {
    // SAFETY: no memory involved.
    check(unsafe { libc::setsid() }).map(|_| ())
}

pub fn chdir(path: &CStr) -> io::Result<()> {
    // SAFETY: path is a valid NUL-terminated string.
    check(unsafe { libc::chdir(path.as_ptr()) }).map(|_| ())
}

pub fn sethostname(name: &[u8]) -> io::Result<()> {
    // SAFETY: name is a valid slice; the length is passed.
    check(unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) }).map(|_| ())
}

pub fn mount(
    src: Option<&CStr>,
    target: &CStr,
    fstype: Option<&CStr>,
    flags: libc::c_ulong,
    data: Option<&CStr>,
) -> io::Result<()> {
    let p = |s: Option<&CStr>| s.map_or(std::ptr::null(), CStr::as_ptr);
    // SAFETY: every pointer is null or a valid NUL-terminated string that outlives the call.
    check(unsafe { libc::mount(p(src), target.as_ptr(), p(fstype), flags, p(data).cast()) })
        .map(|_| ())
}

pub fn umount_detach(target: &CStr) -> io::Result<()> {
    // SAFETY: target is a valid NUL-terminated string.
    check(unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) }).map(|_| ())
}

pub fn pivot_root(new_root: &CStr, put_old: &CStr) -> io::Result<()> {
    // SAFETY: both are valid NUL-terminated strings.
    check_long(unsafe { libc::syscall(libc::SYS_pivot_root, new_root.as_ptr(), put_old.as_ptr()) })
        .map(|_| ())
}

/// `statvfs(path).f_flag`.
pub fn mount_flags(path: &CStr) -> io::Result<libc::c_ulong> {
    // SAFETY: an all-zero statvfs is a valid value of this plain C struct.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: path is valid; st is a writable statvfs.
    check(unsafe { libc::statvfs(path.as_ptr(), &mut st) })?;
    Ok(st.f_flag)
}

/// `sysconf(_SC_ARG_MAX)`: -1 when the system gives no value.
pub fn arg_max() -> libc::c_long {
    // SAFETY: sysconf takes a plain integer name and touches no memory of ours.
    unsafe { libc::sysconf(libc::_SC_ARG_MAX) }
}

/// Sets a limit, never above the current hard limit (which an unprivileged process cannot
/// raise anyway): the result is always at most what was asked.
pub fn setrlimit(res: libc::__rlimit_resource_t, soft: u64, hard: u64) -> io::Result<()> {
    let mut cur = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: cur is a valid, writable rlimit.
    check(unsafe { libc::getrlimit(res, &mut cur) })?;
    let lim = libc::rlimit {
        rlim_cur: soft.min(cur.rlim_max),
        rlim_max: hard.min(cur.rlim_max),
    };
    // SAFETY: lim is a valid rlimit.
    check(unsafe { libc::setrlimit(res, &lim) }).map(|_| ())
}

/// Clears the effective, permitted and inheritable capability sets.
pub fn capset_zero() -> io::Result<()> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    let mut hdr = Header {
        version: 0x2008_0522, // _LINUX_CAPABILITY_VERSION_3
        pid: 0,
    };
    let data = [Data {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    }; 2];
    // SAFETY: hdr and data match the kernel's v3 layout (one header, two data words).
    check_long(unsafe { libc::syscall(libc::SYS_capset, &mut hdr, data.as_ptr()) }).map(|_| ())
}

/// Marks every fd >= `first` close-on-exec.
pub fn cloexec_from(first: u32) -> io::Result<()> {
    // SAFETY: no memory involved.
    check(unsafe { libc::close_range(first, u32::MAX, libc::CLOSE_RANGE_CLOEXEC as libc::c_int) })
        .map(|_| ())
}

/// Installs a seccomp filter with a user-notification listener and returns the listener fd.
pub fn seccomp_with_listener(prog: &[libc::sock_filter]) -> io::Result<RawFd> {
    let fprog = libc::sock_fprog {
        len: u16::try_from(prog.len()).map_err(|_| io::Error::from_raw_os_error(libc::E2BIG))?,
        filter: prog.as_ptr().cast_mut(),
    };
    // SAFETY: fprog points to `len` valid instructions that outlive the call; the kernel copies.
    let fd = check_long(unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            libc::SECCOMP_FILTER_FLAG_NEW_LISTENER,
            &fprog,
        )
    })?;
    RawFd::try_from(fd).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))
}

/// Receives one seccomp notification.
pub fn seccomp_notif_recv(listener: RawFd) -> io::Result<libc::seccomp_notif> {
    // SAFETY: an all-zero seccomp_notif is valid (plain integers), and the kernel requires it.
    let mut n: libc::seccomp_notif = unsafe { std::mem::zeroed() };
    // SAFETY: n is a writable seccomp_notif as the ioctl expects.
    check(unsafe { libc::ioctl(listener, libc::SECCOMP_IOCTL_NOTIF_RECV, &mut n) })?;
    Ok(n)
}

/// Answers a seccomp notification with an errno.
pub fn seccomp_notif_deny(listener: RawFd, id: u64, errno: i32) {
    let mut resp = libc::seccomp_notif_resp {
        id,
        val: 0,
        error: -errno,
        flags: 0,
    };
    // SAFETY: resp is a valid seccomp_notif_resp; a failure (target gone) is fine.
    unsafe {
        libc::ioctl(listener, libc::SECCOMP_IOCTL_NOTIF_SEND, &mut resp);
    }
}

/// Sends fds over a UNIX socket with one data word ([`send_tagged`]: a peer gone is `EPIPE`,
/// never SIGPIPE).
pub fn send_fds(sock: RawFd, tag: u32, fds: &[RawFd]) -> io::Result<()> {
    send_tagged(sock, tag, fds)
}

/// Receives one message with up to one fd; `Ok(None)` on EOF ([`recv_tagged`] with one fd,
/// handed over as a raw fd the caller owns).
pub fn recv_fd(sock: RawFd) -> io::Result<Option<(u32, Option<RawFd>)>> {
    use std::os::fd::IntoRawFd;
    Ok(recv_tagged(sock, 1)?.map(|(tag, mut fds)| (tag, fds.pop().map(IntoRawFd::into_raw_fd))))
}

pub fn pidfd_open(pid: libc::pid_t) -> io::Result<RawFd> {
    // SAFETY: no memory involved.
    let fd = check_long(unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) })?;
    RawFd::try_from(fd).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))
}

/// `poll` on fds for POLLIN; returns the revents per fd.
pub fn poll_in(fds: &[RawFd], timeout_ms: i32) -> io::Result<Vec<libc::c_short>> {
    let mut p: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    // SAFETY: p is a valid array of p.len() pollfds.
    let r = unsafe { libc::poll(p.as_mut_ptr(), p.len() as libc::nfds_t, timeout_ms) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(vec![0; fds.len()]);
        }
        return Err(e);
    }
    Ok(p.iter().map(|x| x.revents).collect())
}

/// `wait4(pid, flags)` → (pid, status, rusage); pid 0 when WNOHANG and nothing changed.
pub fn wait4(pid: libc::pid_t, flags: libc::c_int) -> io::Result<(libc::pid_t, i32, libc::rusage)> {
    let mut status = 0;
    // SAFETY: an all-zero rusage is valid.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: status and ru are writable.
        let r = unsafe { libc::wait4(pid, &mut status, flags, &mut ru) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        return Ok((r, status, ru));
    }
}

pub fn kill(pid: libc::pid_t, sig: libc::c_int) {
    // SAFETY: no memory involved; failure (already dead) is fine.
    unsafe {
        libc::kill(pid, sig);
    }
}

/// Blocks SIGCHLD and returns a signalfd for it.
pub fn sigchld_fd() -> io::Result<RawFd> {
    // SAFETY: an all-zero sigset_t is valid; sigemptyset/sigaddset initialise it.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: set is a valid sigset_t.
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGCHLD);
    }
    // SAFETY: set is valid; old set not requested.
    check(unsafe { libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) })?;
    // SAFETY: set is valid.
    check(unsafe { libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK) })
}

/// Blocks SIGTERM and SIGINT (in this thread and the threads it starts later) and returns a
/// signalfd for them (signals already pending are reported too).
pub fn stop_signal_fd() -> io::Result<RawFd> {
    // SAFETY: an all-zero sigset_t is valid; sigemptyset/sigaddset initialise it.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: set is a valid sigset_t.
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
    }
    // SAFETY: set is valid; old set not requested.
    check(unsafe { libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) })?;
    // SAFETY: set is valid.
    check(unsafe { libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK) })
}

/// `pidfd_send_signal(fd, sig)`: signals exactly the process the pidfd was opened for, never a
/// later process that reused its pid.
pub fn pidfd_send_signal(fd: RawFd, sig: libc::c_int) -> io::Result<()> {
    // SAFETY: no memory involved (siginfo NULL, flags 0).
    check_long(unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            fd,
            sig,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    })
    .map(|_| ())
}

/// Unblocks every signal and resets the handlers we may have changed to default.
pub fn reset_signals() {
    // SAFETY: an all-zero sigset_t is valid after sigemptyset.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: set is valid; resetting dispositions to SIG_DFL is always allowed (except for
    // KILL/STOP, which fail harmlessly).
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
        for sig in 1..32 {
            libc::signal(sig, libc::SIG_DFL);
        }
    }
}

/// Brings up the loopback interface of the current network namespace.
pub fn loopback_up() -> io::Result<()> {
    // SAFETY: plain socket creation.
    let s =
        check(unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: an all-zero ifreq is valid.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in ifr.ifr_name.iter_mut().zip(b"lo\0") {
        *d = *s as libc::c_char;
    }
    // SAFETY: ifr is a valid ifreq naming "lo".
    let r = check(unsafe { libc::ioctl(s, libc::SIOCGIFFLAGS, &mut ifr) }).and_then(|_| {
        // SAFETY: reading/writing the flags member of the union that SIOCGIFFLAGS filled.
        unsafe {
            ifr.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
        }
        // SAFETY: ifr is a valid ifreq.
        check(unsafe { libc::ioctl(s, libc::SIOCSIFFLAGS, &ifr) })
    });
    close(s);
    r.map(|_| ())
}

/// A listening TCP socket on `addr:port` (IPv4).
pub fn tcp_listen(addr: [u8; 4], port: u16) -> io::Result<RawFd> {
    // SAFETY: plain socket creation.
    let s =
        check(unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) })?;
    let sa = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(addr),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sa is a valid sockaddr_in of the given length.
    let r = check(unsafe {
        libc::bind(
            s,
            (&sa as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    })
    // SAFETY: s is a bound socket.
    .and_then(|_| check(unsafe { libc::listen(s, 128) }));
    match r {
        Ok(_) => Ok(s),
        Err(e) => {
            close(s);
            Err(e)
        }
    }
}

/// `landlock_create_ruleset(NULL, 0, LANDLOCK_CREATE_RULESET_VERSION)`: the ABI, or 0.
pub fn landlock_abi() -> i32 {
    // SAFETY: the version query takes no memory.
    let r = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<u8>(),
            0usize,
            1u32,
        )
    };
    i32::try_from(r).unwrap_or(0).max(0)
}

/// `execve`. Returns only on failure.
pub fn execve(
    path: &CStr,
    argv: &[*const libc::c_char],
    envp: &[*const libc::c_char],
) -> io::Error {
    // SAFETY: path is valid; argv and envp are NULL-terminated arrays of valid C strings owned
    // by the caller for the duration of the call.
    unsafe {
        libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr());
    }
    io::Error::last_os_error()
}

/// `access(path, X_OK)`.
pub fn executable(path: &CStr) -> bool {
    // SAFETY: path is valid.
    unsafe { libc::access(path.as_ptr(), libc::X_OK) == 0 }
}

/// Threads of the current process.
pub fn thread_count() -> usize {
    std::fs::read_dir("/proc/self/task").map_or(usize::MAX, |d| d.count())
}

/// `shutdown(fd, SHUT_RDWR)`: wakes threads blocked in `accept` on it.
pub fn shutdown(fd: RawFd) {
    // SAFETY: no memory involved; failure is harmless.
    unsafe {
        libc::shutdown(fd, libc::SHUT_RDWR);
    }
}

/// Overwrites `buf` with zeros in a way the compiler may not elide (secret values).
pub fn wipe(buf: &mut [u8]) {
    for b in buf.iter_mut() {
        // SAFETY: `b` is a valid, aligned, exclusive reference to one byte of `buf`.
        unsafe { std::ptr::write_volatile(b, 0) };
    }
    std::sync::atomic::compiler_fence(std::sync::atomic::Ordering::SeqCst);
}

/// `fcntl(fd, F_GETFD)`: fails with EBADF when `fd` is not open.
pub fn fd_flags(fd: RawFd) -> io::Result<libc::c_int> {
    // SAFETY: F_GETFD takes no pointer argument.
    check(unsafe { libc::fcntl(fd, libc::F_GETFD) })
}

/// Sets `FD_CLOEXEC` on `fd`.
pub fn set_cloexec(fd: RawFd) -> io::Result<()> {
    let flags = fd_flags(fd)?;
    // SAFETY: F_SETFD takes an int argument; no memory involved.
    check(unsafe { libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) }).map(|_| ())
}

/// The file type bits (`st_mode & S_IFMT`) of an open fd.
pub fn fd_file_type(fd: RawFd) -> io::Result<libc::mode_t> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::zeroed();
    // SAFETY: st points to writable memory of the size of `struct stat`.
    check(unsafe { libc::fstat(fd, st.as_mut_ptr()) })?;
    // SAFETY: fstat succeeded, so it initialized the struct (and zeroed() covers the rest).
    Ok(unsafe { st.assume_init() }.st_mode & libc::S_IFMT)
}

/// Takes ownership of an fd inherited from the parent process (`chitin sandbox exec
/// --env-fd N`). Checks that it is open first.
///
/// The launcher calls this once per inherited fd number, before anything else could have
/// wrapped that number; nothing else in the process owns it.
pub fn adopt_inherited_fd(fd: RawFd) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    fd_flags(fd)?;
    // SAFETY: the fd is open (F_GETFD succeeded) and was inherited across execve, so no Rust
    // object of this process owns it; the caller adopts each inherited fd number once.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

/// `fcntl(fd, F_DUPFD_CLOEXEC, min)`: a close-on-exec duplicate numbered `min` or higher.
pub fn dup_cloexec_at_least(fd: RawFd, min: RawFd) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: F_DUPFD_CLOEXEC takes an int argument; no memory involved.
    let new = check(unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, min) })?;
    // SAFETY: the kernel just returned this new fd to us; nothing else owns it.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(new) })
}

/// Makes `fd` (open in this process, close-on-exec) survive `execve` in the child that `cmd`
/// spawns, under the same number, by clearing `FD_CLOEXEC` in the child only. The parent's
/// fd keeps its flag, so concurrent spawns by other threads do not inherit it, and no other
/// fd of the child is touched (unlike a `dup2` onto a fixed number).
///
/// `fd` must be 3 or higher (std sets up the child's stdio on 0-2 first) and must stay open
/// in the parent until `cmd.spawn()` has returned.
pub fn inherit_fd(cmd: &mut std::process::Command, fd: RawFd) {
    use std::os::unix::process::CommandExt;
    let hook = move || -> io::Result<()> {
        // SAFETY: fcntl with int arguments is async-signal-safe and touches no memory.
        let flags = check(unsafe { libc::fcntl(fd, libc::F_GETFD) })?;
        // SAFETY: as above.
        check(unsafe { libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) })?;
        Ok(())
    };
    // SAFETY: the hook runs in the forked child before execve; it only calls fcntl
    // (async-signal-safe), does not allocate, and builds errors from errno only.
    unsafe {
        cmd.pre_exec(hook);
    }
}

// ---- identity and ID-mapped mounts (root launcher) -------------------------------------------

/// `struct mount_attr` of `mount_setattr(2)`.
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

pub const MOUNT_ATTR_RDONLY: u64 = 0x1;
pub const MOUNT_ATTR_NOSUID: u64 = 0x2;
pub const MOUNT_ATTR_NODEV: u64 = 0x4;
pub const MOUNT_ATTR_IDMAP: u64 = 0x0010_0000;
const OPEN_TREE_CLONE: libc::c_uint = 1;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 4;

/// `open_tree(AT_FDCWD, path, OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | AT_RECURSIVE |
/// AT_SYMLINK_NOFOLLOW)`: a detached copy of the mount tree at `path` (a recursive bind that
/// is not attached anywhere yet). Needs `CAP_SYS_ADMIN` over the caller's mount namespace.
pub fn open_tree_clone(path: &CStr) -> io::Result<RawFd> {
    let flags = OPEN_TREE_CLONE
        | libc::c_uint::try_from(libc::O_CLOEXEC | libc::AT_RECURSIVE | libc::AT_SYMLINK_NOFOLLOW)
            .unwrap_or(0);
    // SAFETY: path is a valid NUL-terminated string; the other arguments are integers.
    let fd = check_long(unsafe {
        libc::syscall(libc::SYS_open_tree, libc::AT_FDCWD, path.as_ptr(), flags)
    })?;
    RawFd::try_from(fd).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))
}

/// `mount_setattr(fd, "", AT_EMPTY_PATH | AT_RECURSIVE, ...)` on a detached tree: sets the
/// `MOUNT_ATTR_*` bits in `set` on every mount of the tree, makes them private, and, with
/// `MOUNT_ATTR_IDMAP`, ID-maps them through the user namespace `userns_fd`.
pub fn mount_setattr_tree(fd: RawFd, set: u64, userns_fd: Option<RawFd>) -> io::Result<()> {
    let attr = MountAttr {
        attr_set: set,
        attr_clr: 0,
        propagation: libc::MS_PRIVATE,
        userns_fd: userns_fd.map_or(0, |u| u64::try_from(u).unwrap_or(0)),
    };
    let empty = c"";
    let flags = libc::c_uint::try_from(libc::AT_EMPTY_PATH | libc::AT_RECURSIVE).unwrap_or(0);
    // SAFETY: `empty` is a valid NUL-terminated string; `attr` is a valid mount_attr whose
    // size is passed; the kernel only reads it.
    check_long(unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            fd,
            empty.as_ptr(),
            flags,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    })
    .map(|_| ())
}

/// `move_mount(fd, "", AT_FDCWD, target, MOVE_MOUNT_F_EMPTY_PATH)`: attaches a detached tree.
pub fn move_mount_to(fd: RawFd, target: &CStr) -> io::Result<()> {
    let empty = c"";
    // SAFETY: both strings are valid and NUL-terminated; the rest are integers.
    check_long(unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            fd,
            empty.as_ptr(),
            libc::AT_FDCWD,
            target.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        )
    })
    .map(|_| ())
}

/// Drops every supplementary group (needs `CAP_SETGID` in the user namespace and
/// `/proc/self/setgroups` = allow).
pub fn setgroups_none() -> io::Result<()> {
    // SAFETY: a zero-length list; the pointer is not read.
    check(unsafe { libc::setgroups(0, std::ptr::null()) }).map(|_| ())
}

/// `setresgid(gid, gid, gid)` then `setresuid(uid, uid, uid)`.
pub fn become_ids(uid: u32, gid: u32) -> io::Result<()> {
    // SAFETY: integer arguments only.
    check(unsafe { libc::setresgid(gid, gid, gid) })?;
    // SAFETY: integer arguments only.
    check(unsafe { libc::setresuid(uid, uid, uid) }).map(|_| ())
}

/// Ignores SIGXFSZ so that a write past `RLIMIT_FSIZE` fails with `EFBIG` instead of killing
/// (the ignored disposition survives `execve`).
pub fn ignore_sigxfsz() {
    // SAFETY: setting a disposition to SIG_IGN has no memory preconditions.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
}

/// `fstatat(dir, name, AT_SYMLINK_NOFOLLOW)`.
pub fn lstat_at(dir: RawFd, name: &CStr) -> io::Result<libc::stat> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::zeroed();
    // SAFETY: name is valid; st points to writable memory of the size of `struct stat`.
    check(unsafe {
        libc::fstatat(
            dir,
            name.as_ptr(),
            st.as_mut_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })?;
    // SAFETY: fstatat succeeded and initialized the struct.
    Ok(unsafe { st.assume_init() })
}

/// `openat(dir, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)`: a subdirectory, never
/// through a symlink.
pub fn open_subdir(dir: RawFd, name: &CStr) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: name is a valid NUL-terminated string.
    let fd = check(unsafe {
        libc::openat(
            dir,
            name.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    })?;
    // SAFETY: the kernel just returned this fd to us; nothing else owns it.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

// ---- the persistent launcher (`zygote`) ----------------------------------------------------

/// Closes every fd >= `first`.
pub fn close_from(first: u32) -> io::Result<()> {
    // SAFETY: no memory involved; the caller owns every fd in the range (a forked child that
    // keeps only its stdio).
    check(unsafe { libc::close_range(first, u32::MAX, 0) }).map(|_| ())
}

/// Takes ownership of an fd a call of this module just returned (`pipe`, `seqpacket_pair`,
/// `pidfd_open`): nothing else owns it.
pub fn own(fd: RawFd) -> std::os::fd::OwnedFd {
    use std::os::fd::FromRawFd;
    // SAFETY: the caller passes a freshly created fd that no other object owns.
    unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) }
}

/// `getppid()`.
pub fn getppid() -> libc::pid_t {
    // SAFETY: no preconditions.
    unsafe { libc::getppid() }
}

/// `memfd_create(name, MFD_CLOEXEC)`: an anonymous file.
pub fn memfd(name: &CStr) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: name is a valid NUL-terminated string for the duration of the call.
    let fd = check(unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) })?;
    // SAFETY: the kernel just returned this new fd to us; nothing else owns it.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

/// Sends one message of four data bytes (`tag`) with the fds (may be none) over a UNIX
/// socket, without raising SIGPIPE when the peer is gone (`EPIPE` instead).
pub fn send_tagged(sock: RawFd, tag: u32, fds: &[RawFd]) -> io::Result<()> {
    let data = tag.to_le_bytes();
    let mut iov = libc::iovec {
        iov_base: data.as_ptr().cast_mut().cast(),
        iov_len: data.len(),
    };
    let fd_bytes = std::mem::size_of_val(fds);
    // SAFETY: an all-zero msghdr is valid; we fill the fields below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    let mut cbuf = Vec::new();
    if !fds.is_empty() {
        // SAFETY: CMSG_SPACE is a pure computation.
        let space = unsafe { libc::CMSG_SPACE(u32::try_from(fd_bytes).unwrap_or(0)) } as usize;
        cbuf = vec![0u8; space];
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = space;
        // SAFETY: msg has a control buffer of CMSG_SPACE(fd_bytes) bytes, so the first header
        // and its data area are in bounds.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            if cmsg.is_null() {
                return Err(io::Error::from_raw_os_error(libc::EINVAL));
            }
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(u32::try_from(fd_bytes).unwrap_or(0)) as usize;
            std::ptr::copy_nonoverlapping(
                fds.as_ptr().cast::<u8>(),
                libc::CMSG_DATA(cmsg),
                fd_bytes,
            );
        }
    }
    loop {
        // SAFETY: msg and the buffers it points to (data, cbuf) are valid for the call.
        let r = unsafe { libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        drop(cbuf);
        return Ok(());
    }
}

/// Receives one message of four data bytes with up to `max` fds (each close-on-exec, owned by
/// the caller); `Ok(None)` on EOF. A message with more fds than `max` or a truncated one is
/// an error (its fds are closed).
pub fn recv_tagged(
    sock: RawFd,
    max: usize,
) -> io::Result<Option<(u32, Vec<std::os::fd::OwnedFd>)>> {
    use std::os::fd::FromRawFd;
    let mut data = [0u8; 4];
    let mut iov = libc::iovec {
        iov_base: data.as_mut_ptr().cast(),
        iov_len: data.len(),
    };
    let cap = u32::try_from(max.saturating_mul(std::mem::size_of::<RawFd>())).unwrap_or(0);
    // SAFETY: pure computation.
    let space = unsafe { libc::CMSG_SPACE(cap) } as usize;
    let mut cbuf = vec![0u8; space];
    // SAFETY: an all-zero msghdr is valid.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = space;
    let n = loop {
        // SAFETY: msg and its buffers are valid and writable.
        let n = unsafe { libc::recvmsg(sock, &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        break n;
    };
    let mut fds = Vec::new();
    // SAFETY: msg was filled by recvmsg; CMSG_FIRSTHDR/CMSG_NXTHDR check bounds against
    // msg_controllen, and each SCM_RIGHTS header's data holds (cmsg_len - CMSG_LEN(0)) / 4
    // fds that the kernel installed for us (so we own them).
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let len = ((*cmsg).cmsg_len as usize).saturating_sub(libc::CMSG_LEN(0) as usize);
                let count = len / std::mem::size_of::<RawFd>();
                let base = libc::CMSG_DATA(cmsg);
                for i in 0..count {
                    let mut fd: RawFd = -1;
                    std::ptr::copy_nonoverlapping(
                        base.add(i * std::mem::size_of::<RawFd>()),
                        (&mut fd as *mut RawFd).cast::<u8>(),
                        std::mem::size_of::<RawFd>(),
                    );
                    fds.push(std::os::fd::OwnedFd::from_raw_fd(fd));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    if msg.msg_flags & (libc::MSG_CTRUNC | libc::MSG_TRUNC) != 0 {
        return Err(io::Error::from_raw_os_error(libc::EMSGSIZE));
    }
    if n == 0 && fds.is_empty() {
        return Ok(None);
    }
    Ok(Some((u32::from_le_bytes(data), fds)))
}

/// `mallopt(M_ARENA_MAX, n)`: glibc's allocator keeps at most `n` arenas (threads beyond
/// share them). glibc fixes the limit the first time a thread needs an arena of its own, so
/// this is for a process that has not started threads yet. False when glibc refused it.
#[cfg(target_env = "gnu")]
pub fn malloc_arena_max(n: libc::c_int) -> bool {
    // SAFETY: mallopt sets one of the allocator's parameters under the main arena's lock; it
    // takes no pointers. A thread choosing an arena reads the limit without that lock, which
    // is why callers set it before they start threads (a racing read sees the old or the new
    // value, both valid).
    unsafe { libc::mallopt(libc::M_ARENA_MAX, n) == 1 }
}

/// glibc's `malloc_info` report (XML: one `<heap nr=...>` per arena), written to a memfd and
/// read back.
#[cfg(target_env = "gnu")]
pub fn malloc_info() -> io::Result<String> {
    use std::io::{Read, Seek};
    use std::os::fd::AsRawFd;
    let file = memfd(c"malloc-info")?;
    // SAFETY: a close-on-exec duplicate of an fd this function owns; the copy is handed to
    // `fdopen` below, which owns it from then on (closed by `fclose`).
    let copy = check(unsafe { libc::fcntl(file.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) })?;
    // SAFETY: `copy` is a valid, open fd owned by nobody else; the mode is a NUL-terminated
    // literal.
    let stream = unsafe { libc::fdopen(copy, c"w".as_ptr()) };
    if stream.is_null() {
        let e = io::Error::last_os_error();
        close(copy);
        return Err(e);
    }
    // SAFETY: `stream` is the valid FILE* opened above and used by this thread only.
    let wrote = unsafe { libc::malloc_info(0, stream) };
    // SAFETY: `stream` is valid and closed exactly once (flushing it and closing `copy`).
    let closed = unsafe { libc::fclose(stream) };
    if wrote != 0 || closed != 0 {
        return Err(io::Error::other(
            "glibc's malloc_info could not write its report to a memfd",
        ));
    }
    let mut f = std::fs::File::from(file);
    f.rewind()?;
    let mut out = String::new();
    f.read_to_string(&mut out)?;
    Ok(out)
}
