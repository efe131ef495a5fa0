//! The only place in sandboxd with `unsafe`: raw system calls that `nix` does
//! not wrap. Each block states the invariant it relies on. What runs inside
//! the sandbox has its own in the `sandbox-init` crate
//! ([`harness_sandbox_init::sys`]).

pub use harness_sandbox_init::sys::{
    INIT_CONTROL_FD, landlock_abi_version, seccomp_filter_available,
};

// One copy of the `-1`-on-error checks, the init's.
use harness_sandbox_init::sys::{check, check_int};

use std::io;

/// [`check`] for a raw `syscall` that returns a new descriptor: the `long`
/// the kernel hands back must fit a descriptor number, or the call failed in
/// a way we cannot own (never reinterpreted as some other descriptor).
fn check_descriptor(ret: libc::c_long) -> io::Result<std::os::fd::RawFd> {
    let ret = check(ret)?;
    std::os::fd::RawFd::try_from(ret).map_err(|_| {
        io::Error::other(format!(
            "the kernel returned {ret}, which is not a descriptor number"
        ))
    })
}

/// Tries to create a user namespace in a short-lived child process, so the
/// daemon's own namespaces are never changed. Returns the child's errno on
/// failure.
pub fn probe_user_namespace() -> io::Result<()> {
    // SAFETY: between fork and _exit the child only calls unshare and _exit,
    // both async-signal-safe, so forking a multi-threaded process is sound.
    let pid = check_int(unsafe { libc::fork() })?;
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
    let pid = nix::unistd::Pid::from_raw(pid);
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

/// What the first process of a process sandbox executes once its user
/// namespace is mapped: the `sandbox-init` program with no environment and
/// the control socket as descriptor 3.
///
/// The program is executed through a descriptor sandboxd opened as itself
/// (`execveat(fd, "", AT_EMPTY_PATH)`), never by path: by then the child
/// runs as the session's unprivileged host uid, which may not be allowed to
/// walk the directories sandboxd is installed under (a `0700` home or
/// `mktemp -d`). Only the program file's own execute bit still applies.
#[derive(Debug)]
pub struct InitExec {
    /// The `sandbox-init` program, opened `O_PATH`.
    pub program: std::sync::Arc<std::os::fd::OwnedFd>,
    /// Its argument vector (`argv[0]` included).
    pub argv: Vec<std::ffi::CString>,
    /// The child's end of the control socket; it becomes descriptor 3.
    pub control_fd: std::os::fd::RawFd,
}

/// What a cloned, not yet executed `sandbox-init` child still reads from
/// the parent's memory (it shares it, see [`clone_sandbox_init`]): keep it
/// alive until the child has executed (it reported ready) or was reaped.
#[derive(Debug)]
pub struct InitChildMemory {
    _stack: Vec<u8>,
    _args: Box<InitChildArgs>,
    _argv: Vec<*const libc::c_char>,
    _envp: Box<[*const libc::c_char; 1]>,
    _exec: InitExec,
}

// SAFETY: the raw pointers in here point into the other fields of the same
// struct (heap allocations that move with it); nothing dereferences them but
// the cloned child, so handing the struct to another thread is sound.
unsafe impl Send for InitChildMemory {}

#[derive(Debug)]
struct InitChildArgs {
    program: libc::c_int,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
    control_fd: libc::c_int,
}

/// The cloned child: waits for the parent, takes root of its user
/// namespace, executes `sandbox-init`.
extern "C" fn init_child(data: *mut libc::c_void) -> libc::c_int {
    // SAFETY: this runs in a child that shares the parent's memory
    // (CLONE_VM) until it executes; it only reads `InitChildArgs`, which
    // the parent keeps alive in `InitChildMemory` until the child has
    // executed or been reaped, and makes raw, async-signal-safe system calls
    // (no allocation, no locks, no glibc wrappers that touch shared state
    // beyond errno).
    unsafe {
        let args = &*(data as *const InitChildArgs);
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
        let mut go = [0_u8; 1];
        if libc::read(args.control_fd, go.as_mut_ptr().cast(), 1) != 1 {
            libc::_exit(1);
        }
        // Raw calls: glibc's wrappers would try to broadcast the change to
        // threads that exist only in the parent.
        if libc::syscall(libc::SYS_setresgid, 0, 0, 0) != 0
            || libc::syscall(libc::SYS_setresuid, 0, 0, 0) != 0
        {
            libc::_exit(2);
        }
        // Changing credentials cleared the parent-death signal: set it
        // again, then make sure the parent did not die in between.
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
        let mut hangup = libc::pollfd {
            fd: args.control_fd,
            events: 0,
            revents: 0,
        };
        if libc::poll(&mut hangup, 1, 0) != 0 && hangup.revents & libc::POLLHUP != 0 {
            libc::_exit(1);
        }
        // The program descriptor may itself be number INIT_CONTROL_FD (any
        // descriptor sandboxd opened can be): move it out of the way before
        // the control socket takes that number, or the exec would run
        // whatever the socket is.
        let program = if args.program == INIT_CONTROL_FD {
            libc::fcntl(args.program, libc::F_DUPFD_CLOEXEC, INIT_CONTROL_FD + 1)
        } else {
            args.program
        };
        if program == -1 {
            libc::_exit(2);
        }
        let moved = if args.control_fd == INIT_CONTROL_FD {
            libc::fcntl(args.control_fd, libc::F_SETFD, 0)
        } else {
            libc::dup2(args.control_fd, INIT_CONTROL_FD)
        };
        if moved == -1 {
            libc::_exit(2);
        }
        libc::syscall(
            libc::SYS_execveat,
            program,
            c"".as_ptr(),
            args.argv,
            args.envp,
            libc::AT_EMPTY_PATH,
        );
        libc::_exit(127)
    }
}

/// Clones a child into new namespaces (`flags`) that waits for one byte on
/// its control socket (the parent writes it after mapping the child's user
/// namespace), becomes root of that namespace, and executes
/// `sandbox-init`. Exits 1 if the parent went away first, 2 if it could not
/// take the mapped ids, 127 if the exec failed.
///
/// The child shares the daemon's memory until it executes (`CLONE_VM`, as
/// `posix_spawn` does): copying the page tables of a large daemon would
/// cost milliseconds per sandbox. The returned [`InitChildMemory`] must
/// outlive that window.
///
/// Run this on a thread that outlives the child, because the child's
/// parent-death signal follows the cloning *thread*.
///
/// # Safety
///
/// The child reads the returned [`InitChildMemory`] (its stack, argument
/// vector and the program descriptor) until it executes `sandbox-init`.
/// The caller must keep that value alive, unmoved out of its heap
/// allocations (moving the struct itself is fine), until the child has
/// reported that it executed or has been killed and reaped.
pub unsafe fn clone_sandbox_init(
    init: InitExec,
    flags: nix::sched::CloneFlags,
) -> io::Result<(nix::unistd::Pid, InitChildMemory)> {
    let mut argv: Vec<*const libc::c_char> = init.argv.iter().map(|a| a.as_ptr()).collect();
    argv.push(std::ptr::null());
    let envp: Box<[*const libc::c_char; 1]> = Box::new([std::ptr::null()]);
    let args = Box::new(InitChildArgs {
        program: std::os::fd::AsRawFd::as_raw_fd(&*init.program),
        argv: argv.as_ptr(),
        envp: envp.as_ptr(),
        control_fd: init.control_fd,
    });
    let mut stack = vec![0_u8; 64 * 1024];
    // The stack grows down from its 16-byte aligned top.
    let top = {
        let end = stack.as_mut_ptr().wrapping_add(stack.len());
        end.wrapping_sub(end as usize % 16)
    };
    let data = (&*args as *const InitChildArgs)
        .cast_mut()
        .cast::<libc::c_void>();
    // SAFETY: `init_child` only reads `args` and makes async-signal-safe
    // raw system calls (see its comment); `stack`, `args`, `argv`, `envp`
    // and the strings they point to move into the returned
    // `InitChildMemory`, whose heap allocations do not move, and our caller
    // promised to keep it until the child has executed or been reaped.
    let ret = unsafe {
        libc::clone(
            init_child,
            top.cast(),
            flags.bits() | libc::CLONE_VM | libc::SIGCHLD,
            data,
        )
    };
    let pid = check_int(ret)?;
    Ok((
        nix::unistd::Pid::from_raw(pid),
        InitChildMemory {
            _stack: stack,
            _args: args,
            _argv: argv,
            _envp: envp,
            _exec: init,
        },
    ))
}

/// Registers an owned descriptor with tokio's reactor.
pub fn async_fd(
    fd: std::os::fd::OwnedFd,
) -> io::Result<tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>> {
    // SAFETY: an `OwnedFd` owns its descriptor, which therefore stays open
    // and refers to the same file description until the `AsyncFd` (which
    // takes ownership of it) is dropped, and its `as_raw_fd` never changes.
    unsafe { tokio::io::unix::AsyncFd::register(fd) }.map_err(io::Error::from)
}

/// Clones the mount at `path` (not its submounts) into a detached tree,
/// returned as a descriptor that another mount namespace can attach with
/// [`harness_sandbox_init::sys::attach_mount_tree`]. Unlike an `O_PATH` descriptor, a detached tree
/// may be mounted from a mount namespace other than the one it came from.
pub fn clone_mount_tree(path: &std::path::Path) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    const OPEN_TREE_CLONE: libc::c_uint = 1;
    let path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let flags = OPEN_TREE_CLONE
        | libc::O_CLOEXEC as libc::c_uint
        | libc::AT_SYMLINK_NOFOLLOW as libc::c_uint;
    // SAFETY: `path` is a live NUL-terminated string for the duration of the
    // call; open_tree returns a new descriptor or -1.
    let ret = unsafe { libc::syscall(libc::SYS_open_tree, libc::AT_FDCWD, path.as_ptr(), flags) };
    let fd = check_descriptor(ret)?;
    // SAFETY: open_tree just returned this open descriptor; nothing else
    // owns it.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}
