//! `sandbox-init`: the first process of a session's process sandbox (pid 1
//! of its pid namespace). It builds the sandbox around itself, then starts
//! the session's commands on request.
//!
//! It is executed by sandboxd's launcher (`harness_sandboxd::process::sandbox`) in fresh
//! user, mount, pid, net, ipc and uts namespaces, as root of the new user
//! namespace (an unprivileged host uid range), with its control socket as
//! descriptor 3 and nothing else. The set-up steps, in this order (the names
//! are what a `SetupFailed` reply reports; THREAT_MODEL.md lists them too):
//!
//! 1. `receive-spec`: read the [`InitSpec`] and the bind-source descriptors.
//! 2. `cgroup-namespace`: unshare the cgroup namespace (sandboxd already
//!    moved this process into the session cgroup, which becomes its root).
//! 3. `private-mounts`: make every mount private, so nothing propagates to
//!    the host.
//! 4. `staging-root`: mount a tmpfs on `/tmp` (of this namespace) and build
//!    the root there, executing the [`MountPlan`] steps in order.
//! 5. `pivot-root`: pivot into it and detach the old root entirely.
//! 6. `read-only-root`: remount the root tmpfs read-only.
//! 7. `hostname`, `loopback`: name the uts namespace, bring `lo` up.
//! 8. `rlimits`: nofile, nproc, fsize, core = 0.
//! 9. `capabilities`: empty the bounding and ambient sets.
//! 10. `drop-user`: setgroups([]), then switch to the sandbox user, which
//!     clears the permitted and effective sets.
//! 11. `no-new-privs`.
//! 12. `landlock`: restrict the file system to the plan's paths.
//! 13. `not-dumpable`: commands (same uid) cannot ptrace or read this
//!     process's memory.
//! 14. `seccomp`: install the filter, inherited by every command.
//! 15. Reply `Ready`; serve requests until the control socket closes, then
//!     exit, which kills every process left in the pid namespace.

use std::collections::HashMap;
use std::ffi::CString;
use std::io::Read;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{SigSet, SigmaskHow, Signal, kill, sigprocmask};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::unistd::{ForkResult, Gid, Pid, Uid};

use crate::mount_plan::{BindSource, MountPlan, MountStep};
use crate::protocol::{self, InitSpec, ProtocolError, Reply, Request, Rlimit, RlimitResource};
use crate::sys;

/// Where the root is assembled before the pivot.
const STAGING: &str = "/tmp";

/// A failed set-up step.
#[derive(Debug, thiserror::Error)]
#[error("{step}: {detail}")]
pub struct SetupError {
    /// The step (see the module docs).
    pub step: &'static str,
    /// What failed, with the OS error.
    pub detail: String,
}

fn failed<E: std::fmt::Display>(step: &'static str) -> impl FnOnce(E) -> SetupError {
    move |error| SetupError {
        step,
        detail: error.to_string(),
    }
}

/// Whether sandboxd started this process: its control socket is open.
pub fn started_by_sandboxd() -> bool {
    sys::init_control_fd_is_open()
}

/// The program's entry point; returns the exit code.
pub fn main() -> i32 {
    let Ok(control) = sys::take_init_control_fd() else {
        return 1;
    };
    // Descriptors 0–2 were inherited from sandboxd (its terminal or log);
    // the init has nothing to say there and must not hold them.
    if detach_stdio().is_err() {
        return 1;
    }
    let mut buffer = Vec::new();
    let (spec, sources): (InitSpec, Vec<OwnedFd>) =
        match protocol::receive(control.as_fd(), &mut buffer) {
            Ok(received) => received,
            Err(error) => {
                let _ = protocol::send(
                    control.as_fd(),
                    &Reply::SetupFailed {
                        step: "receive-spec".to_owned(),
                        error: error.to_string(),
                    },
                    &[],
                );
                return 1;
            }
        };
    match build_sandbox(&spec, &sources) {
        Ok(landlock) => {
            drop(sources);
            if protocol::send(control.as_fd(), &Reply::Ready { landlock }, &[]).is_err() {
                return 1;
            }
            serve(&control, &mut buffer)
        }
        Err(error) => {
            let _ = protocol::send(
                control.as_fd(),
                &Reply::SetupFailed {
                    step: error.step.to_owned(),
                    error: error.detail,
                },
                &[],
            );
            1
        }
    }
}

fn detach_stdio() -> std::io::Result<()> {
    let null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")?;
    for target in 0..3 {
        // SAFETY: pid 1 of a sandbox has no terminal; its stdio handles are
        // meant to write into /dev/null from here on (it reports through
        // the control socket, never through stdio).
        unsafe { sys::duplicate_onto(null.as_fd(), target) }?;
    }
    Ok(())
}

/// Steps 2–14 of the module docs. Returns what landlock enforced.
fn build_sandbox(spec: &InitSpec, sources: &[OwnedFd]) -> Result<String, SetupError> {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWCGROUP)
        .map_err(failed("cgroup-namespace"))?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(failed("private-mounts"))?;
    mount(
        Some("tmpfs"),
        STAGING,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("size=4m,mode=0755"),
    )
    .map_err(failed("staging-root"))?;
    for step in &spec.plan.steps {
        execute(step, sources).map_err(|detail| SetupError {
            step: "mount-plan",
            detail: format!("{step:?}: {detail}"),
        })?;
    }
    pivot_into_staging()?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        None::<&str>,
    )
    .map_err(failed("read-only-root"))?;
    nix::unistd::sethostname(&spec.hostname).map_err(failed("hostname"))?;
    sys::bring_loopback_up().map_err(failed("loopback"))?;
    apply_rlimits(&spec.rlimits)?;
    sys::drop_bounding_and_ambient_capabilities().map_err(failed("capabilities"))?;
    drop_to_sandbox_user(spec.sandbox_uid, spec.sandbox_gid)?;
    nix::sys::prctl::set_no_new_privs().map_err(failed("no-new-privs"))?;
    let landlock = apply_landlock(&spec.plan, spec.require_landlock)?;
    nix::sys::prctl::set_dumpable(false).map_err(failed("not-dumpable"))?;
    if spec.seccomp_filter.is_empty() {
        return Err(SetupError {
            step: "seccomp",
            detail: "the spec carries no seccomp filter".to_owned(),
        });
    }
    let filter = crate::seccomp::from_instructions(&spec.seccomp_filter);
    crate::seccomp::install(&filter).map_err(failed("seccomp"))?;
    Ok(landlock)
}

fn staged(path: &str) -> PathBuf {
    Path::new(STAGING).join(path.trim_start_matches('/'))
}

fn execute(step: &MountStep, sources: &[OwnedFd]) -> Result<(), String> {
    match step {
        MountStep::Dir { path, mode } => {
            let target = staged(path);
            match std::fs::create_dir(&target) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e.to_string()),
            }
            set_mode(&target, *mode)
        }
        MountStep::File {
            path,
            content,
            mode,
        } => {
            let target = staged(path);
            std::fs::write(&target, content).map_err(|e| e.to_string())?;
            set_mode(&target, *mode)
        }
        MountStep::Symlink { path, target } => {
            std::os::unix::fs::symlink(target, staged(path)).map_err(|e| e.to_string())
        }
        MountStep::Bind {
            source,
            target,
            writable,
            devices,
        } => bind(source, &staged(target), *writable, *devices, sources),
        MountStep::Tmpfs {
            target,
            size_bytes,
            mode,
        } => mount(
            Some("tmpfs"),
            &staged(target),
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some(format!("size={size_bytes},mode={mode:o}").as_str()),
        )
        .map_err(|e| e.to_string()),
        MountStep::Proc { target } => mount(
            Some("proc"),
            &staged(target),
            Some("proc"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            None::<&str>,
        )
        .map_err(|e| e.to_string()),
        MountStep::ReadOnly { target } => mount(
            None::<&str>,
            &staged(target),
            None::<&str>,
            MsFlags::MS_REMOUNT
                | MsFlags::MS_RDONLY
                | MsFlags::MS_NOSUID
                | MsFlags::MS_NOEXEC
                | MsFlags::MS_NODEV,
            None::<&str>,
        )
        .map_err(|e| e.to_string()),
    }
}

fn set_mode(path: &Path, mode: u32) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(|e| e.to_string())
}

/// Binds non-recursively, then remounts with `nosuid` (and `nodev` unless it
/// is a device node), read-only unless writable, keeping the flags the
/// kernel locked on the source mount (a user namespace may not clear them).
fn bind(
    source: &BindSource,
    target: &Path,
    writable: bool,
    devices: bool,
    sources: &[OwnedFd],
) -> Result<(), String> {
    match source {
        BindSource::Host(path) => mount(
            Some(path.as_str()),
            target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|e| format!("bind {path}: {e}"))?,
        BindSource::Passed(index) => {
            let tree = sources
                .get(*index)
                .ok_or_else(|| format!("bind source tree {index} was not passed"))?;
            sys::attach_mount_tree(tree.as_fd(), target)
                .map_err(|e| format!("attach passed tree {index}: {e}"))?;
        }
    }
    let locked = nix::sys::statvfs::statvfs(target).map_err(|e| format!("statvfs: {e}"))?;
    let mut flags = MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_NOSUID;
    if !devices {
        flags |= MsFlags::MS_NODEV;
    }
    if !writable {
        flags |= MsFlags::MS_RDONLY;
    }
    use nix::sys::statvfs::FsFlags;
    for (have, keep) in [
        (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
        (FsFlags::ST_NOATIME, MsFlags::MS_NOATIME),
        (FsFlags::ST_NODIRATIME, MsFlags::MS_NODIRATIME),
        (FsFlags::ST_RELATIME, MsFlags::MS_RELATIME),
        (FsFlags::ST_NODEV, MsFlags::MS_NODEV),
        (FsFlags::ST_RDONLY, MsFlags::MS_RDONLY),
    ] {
        if locked.flags().contains(have) {
            flags |= keep;
        }
    }
    mount(None::<&str>, target, None::<&str>, flags, None::<&str>)
        .map_err(|e| format!("remount {}: {e}", target.display()))
}

fn pivot_into_staging() -> Result<(), SetupError> {
    let old = Path::new(STAGING).join(".old-root");
    std::fs::create_dir(&old).map_err(failed("pivot-root"))?;
    nix::unistd::pivot_root(STAGING, &old).map_err(failed("pivot-root"))?;
    nix::unistd::chdir("/").map_err(failed("pivot-root"))?;
    umount2("/.old-root", MntFlags::MNT_DETACH).map_err(failed("pivot-root"))?;
    std::fs::remove_dir("/.old-root").map_err(failed("pivot-root"))
}

fn apply_rlimits(rlimits: &[Rlimit]) -> Result<(), SetupError> {
    use nix::sys::resource::{Resource, setrlimit};
    for limit in rlimits {
        let resource = match limit.resource {
            RlimitResource::Nofile => Resource::RLIMIT_NOFILE,
            RlimitResource::Nproc => Resource::RLIMIT_NPROC,
            RlimitResource::Fsize => Resource::RLIMIT_FSIZE,
            RlimitResource::Core => Resource::RLIMIT_CORE,
        };
        setrlimit(resource, limit.value, limit.value).map_err(failed("rlimits"))?;
    }
    Ok(())
}

fn drop_to_sandbox_user(uid: u32, gid: u32) -> Result<(), SetupError> {
    nix::unistd::setgroups(&[]).map_err(failed("drop-user"))?;
    let gid = Gid::from_raw(gid);
    let uid = Uid::from_raw(uid);
    nix::unistd::setresgid(gid, gid, gid).map_err(failed("drop-user"))?;
    nix::unistd::setresuid(uid, uid, uid).map_err(failed("drop-user"))?;
    // Changing credentials cleared the parent-death signal.
    nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(failed("drop-user"))
}

fn apply_landlock(plan: &MountPlan, required: bool) -> Result<String, SetupError> {
    let paths = |list: &[String]| list.iter().map(PathBuf::from).collect::<Vec<_>>();
    let ruleset = crate::landlock::LandlockPlan::new(
        paths(&plan.landlock.read_only),
        paths(&plan.landlock.read_write),
        paths(&plan.landlock.devices),
    );
    let outcome = crate::landlock::apply(&ruleset, required).map_err(failed("landlock"))?;
    Ok(format!("{outcome:?}"))
}

/// One command the init started.
struct Running {
    id: u64,
}

/// Serves requests until the control socket closes; returns the exit code.
fn serve(control: &OwnedFd, buffer: &mut Vec<u8>) -> i32 {
    let mut mask = SigSet::empty();
    mask.add(Signal::SIGCHLD);
    if sigprocmask(SigmaskHow::SIG_BLOCK, Some(&mask), None).is_err() {
        return 1;
    }
    let Ok(children) = SignalFd::with_flags(&mask, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)
    else {
        return 1;
    };
    let mut running: HashMap<i32, Running> = HashMap::new();
    let mut pids: HashMap<u64, i32> = HashMap::new();
    loop {
        let (control_ready, child_ready) = {
            let mut fds = [
                PollFd::new(control.as_fd(), PollFlags::POLLIN),
                PollFd::new(children.as_fd(), PollFlags::POLLIN),
            ];
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(_) => return 1,
            }
            let ready = |fd: &PollFd<'_>| fd.revents().is_some_and(|r| !r.is_empty());
            (ready(&fds[0]), ready(&fds[1]))
        };
        if child_ready {
            while let Ok(Some(_)) = children.read_signal() {}
            if reap(control, &mut running, &mut pids).is_err() {
                return 1;
            }
        }
        if control_ready {
            match protocol::receive::<Request>(control.as_fd(), buffer) {
                Ok((request, fds)) => {
                    let reply = handle(request, fds, &mut running, &mut pids);
                    if let Some(reply) = reply
                        && protocol::send(control.as_fd(), &reply, &[]).is_err()
                    {
                        return 1;
                    }
                }
                // sandboxd is gone or tearing the session down: exiting
                // kills everything in the pid namespace.
                Err(ProtocolError::Closed | ProtocolError::Receive(_)) => return 0,
                Err(_) => continue,
            }
        }
    }
}

fn handle(
    request: Request,
    fds: Vec<OwnedFd>,
    running: &mut HashMap<i32, Running>,
    pids: &mut HashMap<u64, i32>,
) -> Option<Reply> {
    match request {
        Request::Spawn { id, argv, env, cwd } => Some(match spawn(&argv, &env, &cwd, fds) {
            Ok(pid) => {
                running.insert(pid, Running { id });
                pids.insert(id, pid);
                Reply::Spawned { id, pid }
            }
            Err((errno, message)) => Reply::SpawnFailed { id, errno, message },
        }),
        Request::Kill { id } => {
            if let Some(pid) = pids.get(&id) {
                // The command leads its own session and process group.
                let _ = kill(Pid::from_raw(-pid), Signal::SIGKILL);
            }
            None
        }
    }
}

/// Reaps every exited child; reports the ones sandboxd started.
fn reap(
    control: &OwnedFd,
    running: &mut HashMap<i32, Running>,
    pids: &mut HashMap<u64, i32>,
) -> Result<(), ProtocolError> {
    while let Ok(Some(reaped)) = sys::reap_any_child() {
        let Some(Running { id }) = running.remove(&reaped.pid) else {
            continue; // an orphan re-parented to us
        };
        pids.remove(&id);
        let status = reaped.status;
        let (code, signal) = if libc::WIFEXITED(status) {
            (Some(libc::WEXITSTATUS(status)), None)
        } else if libc::WIFSIGNALED(status) {
            (None, Some(libc::WTERMSIG(status)))
        } else {
            continue;
        };
        protocol::send(
            control.as_fd(),
            &Reply::Exited {
                id,
                code,
                signal,
                user_micros: reaped.user_micros,
                system_micros: reaped.system_micros,
                max_rss_bytes: reaped.max_rss_bytes,
            },
            &[],
        )?;
    }
    Ok(())
}

/// Where a child failed before its program ran.
#[derive(Clone, Copy)]
#[repr(u8)]
enum ChildStage {
    Stdio = 1,
    Chdir = 2,
    Exec = 3,
}

/// Forks and executes one command with `stdio` as descriptors 0–2, in a new
/// session (no controlling terminal) and process group, with the signal
/// mask and dispositions reset, and every other descriptor closed.
fn spawn(
    argv: &[String],
    env: &[String],
    cwd: &str,
    stdio: Vec<OwnedFd>,
) -> Result<i32, (i32, String)> {
    let invalid = |what: &str| (libc::EINVAL, what.to_owned());
    if stdio.len() != 3 {
        return Err(invalid("spawn needs exactly three stdio descriptors"));
    }
    let to_c = |s: &String| {
        CString::new(s.as_bytes()).map_err(|_| invalid("NUL byte in argv, env or cwd"))
    };
    let argv: Vec<CString> = argv.iter().map(to_c).collect::<Result<_, _>>()?;
    let env: Vec<CString> = env.iter().map(to_c).collect::<Result<_, _>>()?;
    let cwd = CString::new(cwd).map_err(|_| invalid("NUL byte in cwd"))?;
    let Some(program) = argv.first().cloned() else {
        return Err(invalid("argv is empty"));
    };
    let (report_read, report_write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| (e as i32, "pipe".to_owned()))?;
    // SAFETY: sandbox-init is single-threaded: it starts no thread and no
    // async runtime (it links neither), it multiplexes with poll instead.
    match unsafe { sys::fork_single_threaded() }
        .map_err(|e| (e.raw_os_error().unwrap_or(0), "fork".to_owned()))?
    {
        ForkResult::Child => {
            drop(report_read);
            let fail = |stage: ChildStage, errno: nix::errno::Errno| -> ! {
                let mut bytes = [0_u8; 5];
                bytes[0] = stage as u8;
                bytes[1..].copy_from_slice(&(errno as i32).to_ne_bytes());
                let _ = nix::unistd::write(&report_write, &bytes);
                std::process::exit(127)
            };
            let _ = sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None);
            // The init ignores nothing, but be explicit: commands start with
            // default dispositions for the signals shells rely on.
            let _ = sys::default_signal_disposition(libc::SIGPIPE);
            let _ = nix::unistd::setsid();
            for (target, fd) in stdio.iter().enumerate() {
                // SAFETY: the forked child is about to exec; its stdio must
                // become the command's pipes, and nothing else in it uses
                // descriptors 0-2.
                if let Err(error) = unsafe { sys::duplicate_onto(fd.as_fd(), target as i32) } {
                    fail(
                        ChildStage::Stdio,
                        nix::errno::Errno::from_raw(error.raw_os_error().unwrap_or(libc::EBADF)),
                    );
                }
            }
            if let Err(error) = sys::close_on_exec_from(3) {
                fail(
                    ChildStage::Stdio,
                    nix::errno::Errno::from_raw(error.raw_os_error().unwrap_or(libc::EBADF)),
                );
            }
            if let Err(errno) = nix::unistd::chdir(cwd.as_c_str()) {
                fail(ChildStage::Chdir, errno);
            }
            let errno = match nix::unistd::execvpe(&program, &argv, &env) {
                Err(errno) => errno,
                Ok(never) => match never {},
            };
            fail(ChildStage::Exec, errno)
        }
        ForkResult::Parent { child } => {
            drop(report_write);
            drop(stdio);
            let mut report = Vec::new();
            let _ = std::fs::File::from(report_read).read_to_end(&mut report);
            if report.len() == 5 {
                let errno = i32::from_ne_bytes([report[1], report[2], report[3], report[4]]);
                let stage = match report[0] {
                    1 => "setting up stdio",
                    2 => "changing to the working directory",
                    _ => "executing the program",
                };
                // The child exits 127 and is reaped as an unknown pid.
                return Err((
                    errno,
                    format!(
                        "{stage} failed: {}",
                        nix::errno::Errno::from_raw(errno).desc()
                    ),
                ));
            }
            Ok(child.as_raw())
        }
    }
}
