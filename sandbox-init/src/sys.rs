//! The only place in `sandbox-init` with `unsafe` (besides its tests): raw
//! system calls that `nix` does not wrap, and the few that sandboxd's host
//! probe shares (landlock's ABI version, whether seccomp filters load). Each
//! block states the invariant it relies on.

use std::io;

/// Turns a raw `-1`-on-error return code into an [`io::Result`]; every raw
/// call goes through here (sandboxd's `sys` module uses it too).
pub fn check(ret: libc::c_long) -> io::Result<libc::c_long> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// [`check`] for calls that return a C `int` (a pid, a descriptor, a flag).
pub fn check_int(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// `LANDLOCK_CREATE_RULESET_VERSION` from `<linux/landlock.h>`.
const LANDLOCK_CREATE_RULESET_VERSION: libc::c_ulong = 1;

/// Asks the kernel for its landlock ABI version; `Ok(0)` when the kernel has
/// no landlock or it is disabled at boot.
pub fn landlock_abi_version() -> io::Result<u32> {
    // SAFETY: with a null attribute pointer, size 0 and the VERSION flag,
    // landlock_create_ruleset only returns an integer; no memory is accessed.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<libc::c_void>(),
            0_usize,
            LANDLOCK_CREATE_RULESET_VERSION,
        )
    };
    match check(ret) {
        Ok(version) => Ok(u32::try_from(version).unwrap_or(0)),
        Err(err) if matches!(err.raw_os_error(), Some(libc::ENOSYS | libc::EOPNOTSUPP)) => Ok(0),
        Err(err) => Err(err),
    }
}

/// Whether seccomp filter mode can be installed: `seccomp(SECCOMP_GET_ACTION_AVAIL)`
/// succeeds for `SECCOMP_RET_KILL_PROCESS` only on kernels with filter support.
pub fn seccomp_filter_available() -> bool {
    const SECCOMP_GET_ACTION_AVAIL: libc::c_ulong = 2;
    let action: u32 = libc::SECCOMP_RET_KILL_PROCESS;
    // SAFETY: the kernel reads one u32 through the pointer, which points to a
    // live local for the duration of the call.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            SECCOMP_GET_ACTION_AVAIL,
            0_usize,
            &action as *const u32,
        )
    };
    check(ret).is_ok()
}

/// The descriptor number the control socket has inside `sandbox-init`.
pub const INIT_CONTROL_FD: std::os::fd::RawFd = 3;

/// Forks the calling process; the child may do anything the parent could.
///
/// # Safety
///
/// The calling process must be single-threaded (as `sandbox-init` is):
/// otherwise another thread may hold a lock (the allocator's, stdio's) that
/// the child inherits locked forever, and the child may only make
/// async-signal-safe calls.
pub unsafe fn fork_single_threaded() -> io::Result<nix::unistd::ForkResult> {
    // SAFETY: our caller promised the process is single-threaded, so no lock
    // or allocator state can be held by another thread at the fork.
    unsafe { nix::unistd::fork() }.map_err(io::Error::from)
}

/// Drops every capability from the calling thread's bounding set and clears
/// its ambient set, so no later exec can regain one.
pub fn drop_bounding_and_ambient_capabilities() -> io::Result<()> {
    let last_cap = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse::<libc::c_ulong>().ok())
        .unwrap_or(63);
    for cap in 0..=last_cap {
        // SAFETY: PR_CAPBSET_DROP takes an integer and touches no memory.
        let ret = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) };
        if let Err(err) = check_int(ret) {
            // Capabilities above what this kernel knows are EINVAL: done.
            if err.raw_os_error() == Some(libc::EINVAL) {
                break;
            }
            return Err(err);
        }
    }
    // SAFETY: PR_CAP_AMBIENT_CLEAR_ALL takes integers and touches no memory.
    let ret = unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    };
    check_int(ret).map(drop)
}

/// The raw outcome of one reaped child.
#[derive(Debug, Clone, Copy)]
pub struct Reaped {
    /// Its pid.
    pub pid: i32,
    /// The raw wait status.
    pub status: i32,
    /// User CPU time in microseconds.
    pub user_micros: u64,
    /// System CPU time in microseconds.
    pub system_micros: u64,
    /// Peak resident set in bytes.
    pub max_rss_bytes: u64,
}

/// Reaps one exited child without blocking, with its resource usage.
/// `Ok(None)` when no child has exited (or there are no children).
pub fn reap_any_child() -> io::Result<Option<Reaped>> {
    let mut status: libc::c_int = 0;
    // SAFETY: all-zero is a valid `rusage`.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: the kernel writes one int and one rusage through pointers to
    // live locals.
    let pid = unsafe { libc::wait4(-1, &mut status, libc::WNOHANG, &mut usage) };
    match check_int(pid) {
        Ok(0) => Ok(None),
        Ok(pid) => Ok(Some(Reaped {
            pid,
            status,
            user_micros: timeval_micros(usage.ru_utime),
            system_micros: timeval_micros(usage.ru_stime),
            max_rss_bytes: u64::try_from(usage.ru_maxrss)
                .unwrap_or(0)
                .saturating_mul(1024),
        })),
        Err(err) if err.raw_os_error() == Some(libc::ECHILD) => Ok(None),
        Err(err) => Err(err),
    }
}

fn timeval_micros(tv: libc::timeval) -> u64 {
    u64::try_from(tv.tv_sec)
        .unwrap_or(0)
        .saturating_mul(1_000_000)
        .saturating_add(u64::try_from(tv.tv_usec).unwrap_or(0))
}

/// Marks every descriptor from `first` up close-on-exec, so an exec leaves
/// exactly the ones below `first` open (while a descriptor that reports exec
/// failure stays usable until the exec).
pub fn close_on_exec_from(first: u32) -> io::Result<()> {
    const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;
    // SAFETY: close_range takes integers and only changes descriptor flags.
    let ret = unsafe { libc::syscall(libc::SYS_close_range, first, u32::MAX, CLOSE_RANGE_CLOEXEC) };
    check(ret).map(drop)
}

/// Takes ownership of the control socket `sandbox-init` inherits as
/// descriptor [`INIT_CONTROL_FD`]. Fails if that descriptor is not open.
pub fn take_init_control_fd() -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    nix::fcntl::fcntl(
        // SAFETY: only borrowed for the F_GETFD probe below.
        unsafe { std::os::fd::BorrowedFd::borrow_raw(INIT_CONTROL_FD) },
        nix::fcntl::FcntlArg::F_GETFD,
    )
    .map_err(io::Error::from)?;
    // SAFETY: the launcher placed the control socket at this number in a
    // freshly executed process, and nothing else in it owns the descriptor.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(INIT_CONTROL_FD) })
}

/// Whether descriptor [`INIT_CONTROL_FD`] is open, as it is when sandboxd
/// started this process.
pub fn init_control_fd_is_open() -> bool {
    // SAFETY: F_GETFD takes an integer and only reads the descriptor's flags;
    // on a number that is not open it fails with EBADF.
    unsafe { libc::fcntl(INIT_CONTROL_FD, libc::F_GETFD) != -1 }
}

/// Brings the loopback interface of the current network namespace up.
pub fn bring_loopback_up() -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let socket = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Inet,
        nix::sys::socket::SockType::Datagram,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(io::Error::from)?;
    // SAFETY: all-zero is a valid `ifreq`.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (slot, byte) in request.ifr_name.iter_mut().zip(b"lo\0") {
        *slot = *byte as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS reads the name from and writes the flags into the
    // `ifreq`, a live local of the right type.
    let ret = unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFFLAGS, &mut request) };
    check_int(ret)?;
    // SAFETY: `ifru_flags` is the union member SIOCGIFFLAGS just filled.
    unsafe {
        request.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    }
    // SAFETY: SIOCSIFFLAGS reads the `ifreq`, a live local of the right type.
    let ret = unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCSIFFLAGS, &request) };
    check_int(ret).map(drop)
}

/// Makes descriptor `target` a copy of `fd` (clearing close-on-exec on it).
///
/// # Safety
///
/// Whatever owned `target` before (an `OwnedFd`, a `File`, the process's
/// stdio) silently refers to the new file afterwards. The caller must make
/// sure nothing that owns `target` relies on what it was, e.g. a child
/// setting up its stdio right before exec, or redirecting stdio to
/// `/dev/null`.
pub unsafe fn duplicate_onto(
    fd: std::os::fd::BorrowedFd<'_>,
    target: std::os::fd::RawFd,
) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: dup2 takes integers and `fd` is borrowed, so open; that
    // replacing `target` harms no owner is our caller's promise.
    let ret = unsafe { libc::dup2(fd.as_raw_fd(), target) };
    check_int(ret).map(drop)
}

/// Restores the default disposition of `signal`.
pub fn default_signal_disposition(signal: libc::c_int) -> io::Result<()> {
    // SAFETY: installing SIG_DFL runs no handler code, so it cannot violate
    // any signal-safety invariant.
    let previous = unsafe { libc::signal(signal, libc::SIG_DFL) };
    if previous == libc::SIG_ERR {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Attaches a detached mount tree on `target` (sandboxd clones it with
/// `open_tree` and sends it with the spec).
pub fn attach_mount_tree(
    tree: std::os::fd::BorrowedFd<'_>,
    target: &std::path::Path,
) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x0000_0004;
    let target = std::ffi::CString::new(target.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let empty = c"";
    // SAFETY: both strings are live and NUL-terminated for the duration of
    // the call; move_mount only reads them.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_FDCWD,
            target.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        )
    };
    check(ret).map(drop)
}

/// Takes ownership of a descriptor this process just received through
/// `SCM_RIGHTS`.
///
/// # Safety
///
/// `fd` must be a descriptor the kernel installed in this process's table
/// while receiving a message, taken exactly once: nothing else may own or
/// close it.
pub unsafe fn own_received_fd(fd: std::os::fd::RawFd) -> std::os::fd::OwnedFd {
    use std::os::fd::FromRawFd;
    // SAFETY: our caller promised the kernel just installed this open
    // descriptor and nothing else in the process owns it.
    unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) }
}

/// Test support: runs `checks` in a forked child and returns the failures it
/// reported through a pipe. A panic in the child is reported, never unwound
/// into the test harness's copy of the process.
#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub fn in_forked_child(checks: impl FnOnce() -> Vec<String>) -> Vec<String> {
    use std::io::Read;
    let (reader, writer) = nix::unistd::pipe().unwrap();
    // SAFETY: the test binary is multi-threaded; the child only runs
    // `checks` (allocation, plain syscalls and posix_spawn, which glibc
    // supports after fork), then `_exit`s without returning to the harness.
    match unsafe { nix::unistd::fork() }.unwrap() {
        nix::unistd::ForkResult::Child => {
            drop(reader);
            let report = std::panic::catch_unwind(std::panic::AssertUnwindSafe(checks))
                .unwrap_or_else(|_| vec!["the child panicked".to_owned()]);
            let _ = nix::unistd::write(&writer, report.join("\n").as_bytes());
            // SAFETY: `_exit` ends the child at once, without running the
            // harness's atexit handlers or destructors that belong to the
            // parent's copy of the process (temporary directories).
            unsafe { libc::_exit(i32::from(!report.is_empty())) }
        }
        nix::unistd::ForkResult::Parent { child } => {
            drop(writer);
            let mut report = String::new();
            std::fs::File::from(reader)
                .read_to_string(&mut report)
                .unwrap();
            let status = nix::sys::wait::waitpid(child, None).unwrap();
            assert!(
                matches!(status, nix::sys::wait::WaitStatus::Exited(_, 0 | 1)),
                "child ended with {status:?}; report: {report}"
            );
            report.lines().map(str::to_owned).collect()
        }
    }
}
