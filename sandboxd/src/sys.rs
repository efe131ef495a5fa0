//! The only place in sandboxd with `unsafe`: raw system calls that `nix` does
//! not wrap. Each block states the invariant it relies on.

use std::io;

/// Turns a raw `-1`-on-error return code into an [`io::Result`]; every raw
/// call in this module goes through here.
fn check(ret: libc::c_long) -> io::Result<libc::c_long> {
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

/// Tries to create a user namespace in a short-lived child process, so the
/// daemon's own namespaces are never changed. Returns the child's errno on
/// failure.
pub fn probe_user_namespace() -> io::Result<()> {
    // SAFETY: between fork and _exit the child only calls unshare and _exit,
    // both async-signal-safe, so forking a multi-threaded process is sound.
    let pid = unsafe { libc::fork() };
    let pid = check(libc::c_long::from(pid))?;
    if pid == 0 {
        // SAFETY: see above; this is the child and never returns.
        unsafe {
            let code = if libc::unshare(libc::CLONE_NEWUSER) == 0 {
                0
            } else {
                *libc::__errno_location()
            };
            libc::_exit(code);
        }
    }
    let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap_or(-1));
    match nix::sys::wait::waitpid(pid, None).map_err(io::Error::from)? {
        nix::sys::wait::WaitStatus::Exited(_, 0) => Ok(()),
        nix::sys::wait::WaitStatus::Exited(_, errno) => Err(io::Error::from_raw_os_error(errno)),
        other => Err(io::Error::other(format!(
            "user namespace probe ended unexpectedly: {other:?}"
        ))),
    }
}

/// Loads a compiled component from sandboxd's own cache directory.
pub fn deserialize_component(
    engine: &wasmtime::Engine,
    path: &std::path::Path,
) -> wasmtime::Result<wasmtime::component::Component> {
    // SAFETY: wasmtime requires that the file was produced by
    // `Engine::precompile_component` of a compatible engine and is not
    // modified while mapped. Files in the cache directory are written only by
    // `CompileCache::store` (write-then-rename, never rewritten in place), the
    // name carries the engine's compatibility hash, and the directory belongs
    // to sandboxd (see THREAT_MODEL.md: the state dir is trusted).
    unsafe { wasmtime::component::Component::deserialize_file(engine, path) }
}
