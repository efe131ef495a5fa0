//! One session's process sandbox, seen from sandboxd: launching its
//! `sandbox-init`, talking to it, running commands in it, tearing it down.
//!
//! Launch order (the init's own steps are in [`harness_sandbox_init::init`]). Steps 1–3
//! make a [`WarmInit`] and do not depend on the session, so the backend keeps
//! a few ready ahead of `CreateSession` (`[process] warm-pool`):
//! 1. a `SOCK_SEQPACKET` pair; `clone` into new user, mount, pid, net, ipc
//!    and uts namespaces, on the launcher thread (the child's parent-death
//!    signal follows it), sharing memory until the child executes;
//! 2. write the child's uid and gid maps (sandbox ids 0–65535 onto its host
//!    id range);
//! 3. release it (one byte): it takes root of its namespace and executes
//!    `sandbox-init`, which waits for its spec.
//!
//! Then, for a session:
//! 4. detached mount trees (`open_tree`) of the workspace and of each policy
//!    bind, made here so the init never resolves host paths that its
//!    unprivileged ids could not reach (or should not);
//! 5. move the init into the session cgroup; send the spec and the trees;
//!    the init builds the sandbox (it unshares its cgroup namespace only now,
//!    so the session cgroup is its root);
//! 6. wait for `Ready`, within the start timeout;
//! 7. with a network allowlist, open 127.0.0.1:3128 *inside* the sandbox's
//!    network namespace and serve the egress proxy on it from here.

use std::collections::HashMap;
use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, mpsc as std_mpsc};
use std::time::{Duration, Instant};

use harness_proto::sandbox::v1 as pb;
use nix::sched::CloneFlags;
use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};
use nix::unistd::Pid;
use tokio::io::AsyncWriteExt;
use tokio::io::unix::AsyncFd;
use tokio::sync::{Notify, mpsc};

use super::cgroup::{CgroupHierarchy, CgroupLimits, SessionCgroup};
use super::init_program::InitProgram;
use super::mount_plan::{MountPlan, MountStep};
use super::protocol::{self, InitSpec, ProtocolError, Reply, Request, Rlimit, RlimitResource};
use crate::network::http_egress::EgressPolicy;
use crate::network::proxy::{EgressProxy, proxy_environment};
use crate::sys;

/// The sandbox user inside the namespace.
pub const SANDBOX_UID: u32 = 1000;

/// Ids mapped per session.
pub const IDS_PER_SESSION: u32 = 65536;

/// Where the egress proxy listens inside the sandbox.
pub const PROXY_PORT: u16 = 3128;

/// Errors launching or driving a sandbox.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// A socket pair, pipe or descriptor could not be made.
    #[error("cannot create {what}")]
    Descriptor {
        /// Which.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A bind source could not be opened.
    #[error("cannot open bind source {path}")]
    BindSource {
        /// The host path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// `clone` into the namespaces failed.
    #[error("cannot create the sandbox namespaces (clone)")]
    Clone(#[source] std::io::Error),
    /// Writing the id maps failed.
    #[error("cannot write {file} of the sandbox init")]
    IdMap {
        /// The file.
        file: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The session cgroup could not be set up.
    #[error("cannot set up the session cgroup")]
    Cgroup(#[source] super::cgroup::CgroupError),
    /// Talking to the init failed.
    #[error("sandbox init protocol failure")]
    Protocol(#[source] ProtocolError),
    /// The init reported a failed set-up step.
    #[error("building the sandbox failed at step {step}: {error}")]
    Setup {
        /// The step.
        step: String,
        /// Its error.
        error: String,
    },
    /// The init did not report ready in time.
    #[error("the sandbox did not start within {0:?}")]
    StartTimeout(Duration),
    /// The init answered something unexpected.
    #[error("the sandbox init answered {0}")]
    Unexpected(String),
    /// The proxy listener inside the namespace could not be made.
    #[error("cannot open the egress proxy port inside the sandbox")]
    ProxyListener(#[source] std::io::Error),
    /// The proxy could not start.
    #[error("cannot start the egress proxy")]
    Proxy(#[source] crate::network::proxy::ProxyError),
    /// The init exited before it built the sandbox; its exit status says
    /// which step of [`sys::clone_sandbox_init`] failed.
    #[error("the sandbox init exited with status {code} before building the sandbox: {}", init_exit_meaning(*code))]
    InitExited {
        /// Its exit status.
        code: i32,
        /// What sandboxd saw first (a closed control socket).
        #[source]
        seen: Box<SandboxError>,
    },
}

/// What an early exit status of a cloned init means (see
/// [`sys::clone_sandbox_init`]).
fn init_exit_meaning(code: i32) -> &'static str {
    match code {
        1 => "sandboxd's launcher went away while it waited",
        2 => "it could not become root of its user namespace (setresuid/setresgid)",
        127 => {
            "executing sandbox-init failed: is it a binary for this machine, executable by \
             other users?"
        }
        _ => "sandbox-init itself failed before reporting",
    }
}

/// Everything needed to launch one sandbox.
#[derive(Debug, Clone)]
pub struct LaunchSpec {
    /// Session id (names the cgroup).
    pub session_id: String,
    /// Workspace host path.
    pub workspace: PathBuf,
    /// Policy binds' host paths, in plan order.
    pub bind_sources: Vec<PathBuf>,
    /// The root to build.
    pub plan: MountPlan,
    /// rlimits.
    pub rlimits: Vec<Rlimit>,
    /// Refuse unless landlock is fully enforced.
    pub require_landlock: bool,
    /// The compiled seccomp filter.
    pub seccomp_filter: Arc<Vec<super::seccomp::Instruction>>,
    /// cgroup limits.
    pub limits: CgroupLimits,
    /// Base environment of every command (`NAME=value`), proxy variables
    /// excluded.
    pub environment: Vec<(String, String)>,
    /// Network egress, if the allowlist is not empty.
    pub egress: Option<EgressPolicy>,
    /// Start deadline.
    pub start_timeout: Duration,
    /// Output grace after a command's exit.
    pub output_grace: Duration,
}

/// A launched sandbox.
#[derive(Debug)]
pub struct ProcessSandbox {
    init_pid: Pid,
    control: Arc<Control>,
    cgroup: SessionCgroup,
    proxy: Mutex<Option<EgressProxy>>,
    environment: Vec<(String, String)>,
    next_id: AtomicU64,
    mount_count: u32,
    landlock: String,
    output_grace: Duration,
    destroyed: AtomicBool,
}

/// The init's control socket, shared by the reader task and callers.
#[derive(Debug)]
struct Control {
    socket: AsyncFd<OwnedFd>,
    send_lock: tokio::sync::Mutex<()>,
    waiters: Mutex<HashMap<u64, mpsc::UnboundedSender<Reply>>>,
    closed: AtomicBool,
    closed_notify: Notify,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

impl Control {
    async fn send(&self, request: &Request, fds: &[i32]) -> Result<(), SandboxError> {
        let _turn = self.send_lock.lock().await;
        loop {
            let mut guard = self
                .socket
                .writable()
                .await
                .map_err(|e| SandboxError::Protocol(ProtocolError::Send(e)))?;
            match guard.try_io(|fd| {
                protocol::send(fd.get_ref().as_fd(), request, fds).map_err(|e| match e {
                    ProtocolError::Send(io) => io,
                    other => std::io::Error::other(other.to_string()),
                })
            }) {
                Ok(result) => {
                    return result.map_err(|e| SandboxError::Protocol(ProtocolError::Send(e)));
                }
                Err(_would_block) => continue,
            }
        }
    }

    fn register(&self, id: u64) -> mpsc::UnboundedReceiver<Reply> {
        let (sender, receiver) = mpsc::unbounded_channel();
        if !self.closed.load(Ordering::SeqCst) {
            lock(&self.waiters).insert(id, sender);
        }
        receiver
    }

    fn forget(&self, id: u64) {
        lock(&self.waiters).remove(&id);
    }

    /// Routes the init's replies to their waiters until the socket closes.
    async fn read_replies(self: Arc<Self>) {
        let mut buffer = Vec::new();
        loop {
            let Ok(mut guard) = self.socket.readable().await else {
                break;
            };
            let received = guard.try_io(|fd| {
                protocol::receive::<Reply>(fd.get_ref().as_fd(), &mut buffer).map_err(|e| match e {
                    ProtocolError::Receive(io) => io,
                    other => std::io::Error::other(other.to_string()),
                })
            });
            let reply = match received {
                Err(_would_block) => continue,
                Ok(Ok((reply, _fds))) => reply,
                Ok(Err(_)) => break,
            };
            let id = match &reply {
                Reply::Spawned { id, .. }
                | Reply::SpawnFailed { id, .. }
                | Reply::Exited { id, .. } => *id,
                Reply::Ready { .. } | Reply::SetupFailed { .. } => continue,
            };
            let waiter = lock(&self.waiters).get(&id).cloned();
            if let Some(waiter) = waiter {
                let _ = waiter.send(reply);
            }
        }
        self.closed.store(true, Ordering::SeqCst);
        lock(&self.waiters).clear();
        self.closed_notify.notify_waiters();
    }
}

/// Clones on one long-lived thread: a child's parent-death signal fires
/// when the thread that cloned it exits, so that thread must live as long
/// as the daemon.
fn launcher() -> &'static Mutex<std_mpsc::Sender<LaunchJob>> {
    static LAUNCHER: OnceLock<Mutex<std_mpsc::Sender<LaunchJob>>> = OnceLock::new();
    LAUNCHER.get_or_init(|| {
        let (sender, receiver) = std_mpsc::channel::<LaunchJob>();
        let spawned = std::thread::Builder::new()
            .name("sandbox-launcher".to_owned())
            .spawn(move || {
                for job in receiver {
                    // SAFETY: the `InitChildMemory` goes back to
                    // `WarmInit::start`, which keeps it in the `WarmInit`
                    // until the init reported ready (it executed) or was
                    // killed and reaped (see `Drop for WarmInit`).
                    let result = unsafe { sys::clone_sandbox_init(job.exec, job.flags) };
                    let _ = job.reply.send(result);
                }
            });
        if let Err(error) = spawned {
            tracing::error!(%error, "cannot start the sandbox launcher thread");
        }
        Mutex::new(sender)
    })
}

type Launched = std::io::Result<(Pid, sys::InitChildMemory)>;

struct LaunchJob {
    exec: sys::InitExec,
    flags: CloneFlags,
    reply: std_mpsc::Sender<Launched>,
}

fn clone_on_launcher(exec: sys::InitExec, flags: CloneFlags) -> Launched {
    let (reply, result) = std_mpsc::channel();
    lock(launcher())
        .send(LaunchJob { exec, flags, reply })
        .map_err(|_| std::io::Error::other("the sandbox launcher thread is gone"))?;
    result
        .recv()
        .map_err(|_| std::io::Error::other("the sandbox launcher thread is gone"))?
}

fn descriptor(what: &'static str) -> impl FnOnce(nix::Error) -> SandboxError {
    move |e| SandboxError::Descriptor {
        what,
        source: e.into(),
    }
}

fn open_path(path: &Path) -> Result<OwnedFd, SandboxError> {
    sys::clone_mount_tree(path).map_err(|source| SandboxError::BindSource {
        path: path.to_owned(),
        source,
    })
}

impl ProcessSandbox {
    /// Launches a sandbox (see the module docs for the order). Blocking
    /// parts run on the blocking pool; must be called within tokio.
    pub async fn launch(
        spec: LaunchSpec,
        cgroups: &CgroupHierarchy,
        warm: WarmInit,
    ) -> Result<Self, SandboxError> {
        let cgroup = cgroups
            .create(&spec.session_id, &spec.limits)
            .map_err(SandboxError::Cgroup)?;
        let launched = tokio::task::spawn_blocking({
            let spec = spec.clone();
            let cgroup = cgroup.clone();
            move || activate_init(&spec, &cgroup, warm)
        })
        .await
        .map_err(|e| SandboxError::Unexpected(e.to_string()));
        let (init_pid, control, landlock) = match launched.and_then(|r| r) {
            Ok(started) => started,
            Err(error) => {
                let _ = cgroup.kill_and_remove();
                return Err(error);
            }
        };
        let control = Arc::new(Control {
            socket: sys::async_fd(control).map_err(|source| SandboxError::Descriptor {
                what: "async control socket",
                source,
            })?,
            send_lock: tokio::sync::Mutex::new(()),
            waiters: Mutex::new(HashMap::new()),
            closed: AtomicBool::new(false),
            closed_notify: Notify::new(),
        });
        tokio::spawn(Arc::clone(&control).read_replies());
        let mut sandbox = Self {
            init_pid,
            control,
            cgroup,
            proxy: Mutex::new(None),
            environment: spec.environment.clone(),
            next_id: AtomicU64::new(1),
            mount_count: mount_count(&spec.plan),
            landlock,
            output_grace: spec.output_grace,
            destroyed: AtomicBool::new(false),
        };
        if let Some(egress) = spec.egress.clone() {
            match sandbox.start_proxy(egress).await {
                Ok(()) => {}
                Err(error) => {
                    let _ = sandbox.destroy().await;
                    return Err(error);
                }
            }
        }
        Ok(sandbox)
    }

    async fn start_proxy(&mut self, egress: EgressPolicy) -> Result<(), SandboxError> {
        let netns = PathBuf::from(format!("/proc/{}/ns/net", self.init_pid));
        let listener = tokio::task::spawn_blocking(move || listen_in_namespace(&netns))
            .await
            .map_err(|e| SandboxError::ProxyListener(std::io::Error::other(e.to_string())))?
            .map_err(SandboxError::ProxyListener)?;
        let proxy = EgressProxy::start(listener, egress).map_err(SandboxError::Proxy)?;
        *lock(&self.proxy) = Some(proxy);
        self.environment
            .extend(proxy_environment(std::net::SocketAddr::from((
                [127, 0, 0, 1],
                PROXY_PORT,
            ))));
        Ok(())
    }

    /// What landlock enforced in this sandbox.
    pub fn landlock(&self) -> &str {
        &self.landlock
    }

    /// The init's host pid.
    pub fn init_pid(&self) -> i32 {
        self.init_pid.as_raw()
    }

    /// The session cgroup.
    pub fn cgroup(&self) -> &SessionCgroup {
        &self.cgroup
    }

    /// Runs one command (see [`Command`]); output chunks go to `output` as
    /// they arrive; `cancelled` stops it like a timeout would.
    pub async fn run(
        &self,
        command: Command,
        output: mpsc::Sender<pb::OutputChunk>,
        cancelled: impl std::future::Future<Output = ()>,
    ) -> pb::InvokeResult {
        let started = Instant::now();
        let oom_before = self.cgroup.oom_kills().unwrap_or(0);
        let via_shell = command.via_shell;
        let mut outcome = self.run_inner(command, output, cancelled).await;
        outcome.via_shell = via_shell;
        let wall = started.elapsed();
        // The kernel's OOM killer may pick any process of the session, and
        // a shell reports its child's death as an exit code; so any OOM
        // kill in the session while the command ran counts against it.
        if outcome.exit.is_ok()
            && !outcome.timed_out
            && !outcome.cancelled
            && self.cgroup.oom_kills().unwrap_or(0) > oom_before
        {
            outcome.oom = true;
        }
        outcome.into_result(wall)
    }

    async fn run_inner(
        &self,
        command: Command,
        output: mpsc::Sender<pb::OutputChunk>,
        cancelled: impl std::future::Future<Output = ()>,
    ) -> RunOutcome {
        let id = self.next_id.fetch_add(1, Ordering::SeqCst);
        let mut outcome = RunOutcome::default();
        let pipes = match StdioPipes::new() {
            Ok(p) => p,
            Err(error) => {
                outcome.exit = Err(internal(error.to_string()));
                return outcome;
            }
        };
        // Later entries win: defaults, then grants and proxy, then the call.
        let merged: std::collections::BTreeMap<&str, &str> = self
            .environment
            .iter()
            .chain(command.environment.iter())
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let env: Vec<String> = merged.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let request = Request::Spawn {
            id,
            argv: command.argv,
            env,
            cwd: command.cwd,
        };
        let mut replies = self.control.register(id);
        let StdioPipes {
            stdin_read,
            stdin_write,
            stdout_read,
            stdout_write,
            stderr_read,
            stderr_write,
        } = pipes;
        let sent = self
            .control
            .send(
                &request,
                &[
                    stdin_read.as_raw_fd(),
                    stdout_write.as_raw_fd(),
                    stderr_write.as_raw_fd(),
                ],
            )
            .await;
        drop((stdin_read, stdout_write, stderr_write));
        if let Err(error) = sent {
            self.control.forget(id);
            outcome.exit = Err(internal(harness_daemon::error_chain(&error)));
            return outcome;
        }
        match replies.recv().await {
            Some(Reply::Spawned { .. }) => {}
            Some(Reply::SpawnFailed { errno, message, .. }) => {
                self.control.forget(id);
                let kind = if errno == libc::ENOENT || errno == libc::EACCES {
                    pb::ErrorKind::NotFound
                } else {
                    pb::ErrorKind::Failed
                };
                outcome.exit = Err(tool_error(kind, message));
                return outcome;
            }
            _ => {
                self.control.forget(id);
                outcome.exit = Err(internal("the sandbox's init went away".to_owned()));
                return outcome;
            }
        }
        let stdin_task = tokio::spawn(feed_stdin(stdin_write, command.stdin));
        let cap = command.max_output_bytes;
        let (stop_pumps, pumps_stopped) = tokio::sync::watch::channel(false);
        let stdout_task = tokio::spawn(pump(
            stdout_read,
            pb::OutputStream::Stdout,
            cap,
            output.clone(),
            pumps_stopped.clone(),
        ));
        let stderr_task = tokio::spawn(pump(
            stderr_read,
            pb::OutputStream::Stderr,
            cap,
            output,
            pumps_stopped,
        ));
        let deadline = tokio::time::sleep(command.timeout);
        tokio::pin!(deadline);
        tokio::pin!(cancelled);
        let mut exited = tokio::select! {
            reply = replies.recv() => reply,
            () = &mut deadline => { outcome.timed_out = true; None }
            () = &mut cancelled => { outcome.cancelled = true; None }
        };
        if exited.is_none() && (outcome.timed_out || outcome.cancelled) {
            let _ = self.control.send(&Request::Kill { id }, &[]).await;
            exited = tokio::time::timeout(Duration::from_secs(5), replies.recv())
                .await
                .ok()
                .flatten();
        }
        self.control.forget(id);
        stdin_task.abort();
        let (stdout, stderr) =
            finish_pumps(stdout_task, stderr_task, stop_pumps, self.output_grace).await;
        outcome.stdout_bytes = stdout.total;
        outcome.stderr_bytes = stderr.total;
        outcome.stdout = stdout.captured;
        outcome.stderr = stderr.captured;
        outcome.exit = match exited {
            Some(Reply::Exited {
                code,
                signal,
                user_micros,
                system_micros,
                max_rss_bytes,
                ..
            }) => Ok(Exited {
                code,
                signal,
                cpu: Duration::from_micros(user_micros.saturating_add(system_micros)),
                max_rss_bytes,
            }),
            _ => Err(internal(
                "the command's exit was never reported (the sandbox's init went away)".to_owned(),
            )),
        };
        outcome
    }

    /// Kills everything in the sandbox and removes its cgroup; the mount and
    /// network namespaces die with their last process. Idempotent.
    pub async fn destroy(&self) -> SandboxTeardown {
        let mut teardown = SandboxTeardown::default();
        if self.destroyed.swap(true, Ordering::SeqCst) {
            return teardown;
        }
        if let Some(proxy) = lock(&self.proxy).take() {
            proxy.shutdown();
            teardown.network.push(format!(
                "egress proxy on 127.0.0.1:{PROXY_PORT} in the sandbox"
            ));
        }
        teardown.processes_killed = self.cgroup.process_count().unwrap_or(0);
        let pid = self.init_pid;
        let reaped = tokio::task::spawn_blocking(move || {
            // pid 1 of the namespace: killing it kills every process in it.
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            nix::sys::wait::waitpid(pid, None)
        })
        .await;
        if let Err(error) | Ok(Err(error)) = reaped
            .map_err(|e| e.to_string())
            .map(|r| r.map_err(|e| e.to_string()))
        {
            teardown
                .errors
                .push(format!("reaping the sandbox init: {error}"));
        }
        teardown
            .network
            .push(format!("network namespace of sandbox init {pid}"));
        teardown.mounts_removed = self.mount_count;
        let cgroup = self.cgroup.clone();
        let removed = tokio::task::spawn_blocking(move || cgroup.kill_and_remove()).await;
        match removed {
            Ok(Ok(removed)) => {
                teardown.processes_killed = teardown.processes_killed.max(removed.processes_killed);
                teardown.cgroups_removed = removed
                    .removed
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect();
            }
            Ok(Err(error)) => teardown.errors.push(harness_daemon::error_chain(&error)),
            Err(error) => teardown
                .errors
                .push(format!("cgroup teardown task: {error}")),
        }
        teardown
    }
}

/// What destroying a sandbox removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SandboxTeardown {
    /// Processes that were alive.
    pub processes_killed: u32,
    /// Mounts that went away with the mount namespace.
    pub mounts_removed: u32,
    /// cgroup directories removed.
    pub cgroups_removed: Vec<String>,
    /// Network pieces removed.
    pub network: Vec<String>,
    /// Failures.
    pub errors: Vec<String>,
}

fn mount_count(plan: &MountPlan) -> u32 {
    let mounts = plan
        .steps
        .iter()
        .filter(|s| {
            matches!(
                s,
                MountStep::Bind { .. } | MountStep::Tmpfs { .. } | MountStep::Proc { .. }
            )
        })
        .count();
    u32::try_from(mounts + 1).unwrap_or(u32::MAX)
}

/// A command to run.
#[derive(Debug, Clone)]
pub struct Command {
    /// Program and arguments.
    pub argv: Vec<String>,
    /// Working directory in the sandbox.
    pub cwd: String,
    /// Extra environment.
    pub environment: Vec<(String, String)>,
    /// Bytes for stdin.
    pub stdin: Vec<u8>,
    /// Deadline.
    pub timeout: Duration,
    /// Cap per output stream.
    pub max_output_bytes: u64,
    /// The command is `/bin/sh -c …`, which reports a child killed by
    /// signal n as exit code 128 + n.
    pub via_shell: bool,
}

#[derive(Debug)]
struct Exited {
    code: Option<i32>,
    signal: Option<i32>,
    cpu: Duration,
    max_rss_bytes: u64,
}

#[derive(Debug)]
struct RunOutcome {
    exit: Result<Exited, pb::ToolError>,
    timed_out: bool,
    cancelled: bool,
    oom: bool,
    via_shell: bool,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    stdout_bytes: u64,
    stderr_bytes: u64,
}

impl Default for RunOutcome {
    fn default() -> Self {
        Self {
            exit: Err(internal("not run".to_owned())),
            timed_out: false,
            cancelled: false,
            oom: false,
            via_shell: false,
            stdout: Vec::new(),
            stderr: Vec::new(),
            stdout_bytes: 0,
            stderr_bytes: 0,
        }
    }
}

fn tool_error(kind: pb::ErrorKind, message: String) -> pb::ToolError {
    pb::ToolError {
        kind: kind as i32,
        message,
        violations: Vec::new(),
    }
}

fn internal(message: String) -> pb::ToolError {
    tool_error(pb::ErrorKind::Internal, message)
}

impl RunOutcome {
    fn into_result(self, wall: Duration) -> pb::InvokeResult {
        let mut usage = pb::Usage {
            wall_time: Some(harness_proto::duration_to_proto(wall)),
            stdout_bytes: self.stdout_bytes,
            stderr_bytes: self.stderr_bytes,
            ..Default::default()
        };
        if let Ok(exited) = &self.exit {
            usage.cpu_time = Some(harness_proto::duration_to_proto(exited.cpu));
            usage.peak_memory_bytes = exited.max_rss_bytes;
        }
        let outcome = match self.exit {
            _ if self.timed_out => pb::invoke_result::Outcome::Error(tool_error(
                pb::ErrorKind::Timeout,
                format!(
                    "the command ran past its deadline of {wall:.1?} and its process group was killed"
                ),
            )),
            _ if self.cancelled => pb::invoke_result::Outcome::Error(tool_error(
                pb::ErrorKind::Internal,
                "the session was destroyed while the command ran".to_owned(),
            )),
            _ if self.oom => pb::invoke_result::Outcome::Error(tool_error(
                pb::ErrorKind::ResourceExhausted,
                "the command was killed by the session's memory limit (cgroup OOM)".to_owned(),
            )),
            Ok(exited)
                if exited.signal == Some(libc::SIGXFSZ)
                    || self.via_shell && exited.code == Some(128 + libc::SIGXFSZ) =>
            {
                pb::invoke_result::Outcome::Error(tool_error(
                    pb::ErrorKind::ResourceExhausted,
                    "the command exceeded the file size limit (SIGXFSZ)".to_owned(),
                ))
            }
            Ok(exited) => pb::invoke_result::Outcome::Ok(pb::InvokeSuccess {
                output_json: exec_output_json(&exited, &self.stdout, &self.stderr),
                exit_status: Some(pb::ExitStatus {
                    code: exited.code,
                    signal: exited.signal,
                }),
            }),
            Err(error) => pb::invoke_result::Outcome::Error(error),
        };
        pb::InvokeResult {
            outcome: Some(outcome),
            usage: Some(usage),
            replayed: false,
        }
    }
}

/// The `exec` tool's output document.
fn exec_output_json(exited: &Exited, stdout: &[u8], stderr: &[u8]) -> String {
    serde_json::json!({
        "exit_code": exited.code,
        "signal": exited.signal,
        "stdout": String::from_utf8_lossy(stdout),
        "stderr": String::from_utf8_lossy(stderr),
    })
    .to_string()
}

struct StdioPipes {
    stdin_read: OwnedFd,
    stdin_write: OwnedFd,
    stdout_read: OwnedFd,
    stdout_write: OwnedFd,
    stderr_read: OwnedFd,
    stderr_write: OwnedFd,
}

impl StdioPipes {
    fn new() -> Result<Self, SandboxError> {
        let pipe =
            || nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(descriptor("a pipe"));
        let (stdin_read, stdin_write) = pipe()?;
        let (stdout_read, stdout_write) = pipe()?;
        let (stderr_read, stderr_write) = pipe()?;
        Ok(Self {
            stdin_read,
            stdin_write,
            stdout_read,
            stdout_write,
            stderr_read,
            stderr_write,
        })
    }
}

async fn feed_stdin(fd: OwnedFd, bytes: Vec<u8>) {
    let Ok(mut sender) = tokio::net::unix::pipe::Sender::from_owned_fd(fd) else {
        return;
    };
    if !bytes.is_empty() {
        let _ = sender.write_all(&bytes).await;
    }
}

#[derive(Debug, Default)]
struct Pumped {
    total: u64,
    captured: Vec<u8>,
}

/// Forwards one output stream, up to `cap` bytes, counting all of it,
/// until end of file, or until `stop` fires: then whatever the pipe already
/// holds is still read (a background process may keep the pipe open, but
/// nothing the command wrote before it exited is lost).
async fn pump(
    fd: OwnedFd,
    stream: pb::OutputStream,
    cap: u64,
    output: mpsc::Sender<pb::OutputChunk>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Pumped {
    let mut pumped = Pumped::default();
    let Ok(receiver) = tokio::net::unix::pipe::Receiver::from_owned_fd(fd) else {
        return pumped;
    };
    let mut forwarder = Forwarder {
        stream,
        cap,
        output,
        truncated_sent: false,
    };
    let mut buffer = vec![0_u8; 64 * 1024];
    loop {
        tokio::select! {
            biased;
            readable = receiver.readable() => {
                if readable.is_err() {
                    break;
                }
                match receiver.try_read(&mut buffer) {
                    Ok(0) => break,
                    Ok(n) => forwarder.forward(&buffer[..n], &mut pumped).await,
                    Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(_) => break,
                }
            }
            _ = stop.changed() => {
                while let Ok(n) = receiver.try_read(&mut buffer) {
                    if n == 0 {
                        break;
                    }
                    forwarder.forward(&buffer[..n], &mut pumped).await;
                }
                break;
            }
        }
    }
    pumped
}

/// Sends one stream's chunks, honouring its cap.
struct Forwarder {
    stream: pb::OutputStream,
    cap: u64,
    output: mpsc::Sender<pb::OutputChunk>,
    truncated_sent: bool,
}

impl Forwarder {
    async fn forward(&mut self, data: &[u8], pumped: &mut Pumped) {
        let before = pumped.total;
        pumped.total = pumped.total.saturating_add(data.len() as u64);
        if before >= self.cap {
            if !self.truncated_sent {
                self.truncated_sent = true;
                let _ = self
                    .output
                    .send(pb::OutputChunk {
                        stream: self.stream as i32,
                        data: Vec::new(),
                        truncated: true,
                    })
                    .await;
            }
            return;
        }
        let keep = usize::try_from(self.cap - before)
            .unwrap_or(usize::MAX)
            .min(data.len());
        let truncated = keep < data.len();
        self.truncated_sent |= truncated;
        pumped.captured.extend_from_slice(&data[..keep]);
        let _ = self
            .output
            .send(pb::OutputChunk {
                stream: self.stream as i32,
                data: data[..keep].to_vec(),
                truncated,
            })
            .await;
    }
}

/// Waits for both pumps to reach end of file; once `grace` has passed after
/// the command's exit, tells them to drain what is buffered and stop.
async fn finish_pumps(
    stdout: tokio::task::JoinHandle<Pumped>,
    stderr: tokio::task::JoinHandle<Pumped>,
    stop: tokio::sync::watch::Sender<bool>,
    grace: Duration,
) -> (Pumped, Pumped) {
    let both = async {
        (
            stdout.await.unwrap_or_default(),
            stderr.await.unwrap_or_default(),
        )
    };
    tokio::pin!(both);
    tokio::select! {
        pumped = &mut both => pumped,
        () = tokio::time::sleep(grace) => {
            let _ = stop.send(true);
            both.await
        }
    }
}

/// A sandbox init that is cloned into its namespaces, mapped onto a host
/// id range and executing, but waiting for its spec: everything of a launch
/// that does not depend on the session (steps 2–5 of the module docs minus
/// the cgroup and the spec). Kept in a small pool so `CreateSession` only
/// pays for the rest. Dropping an unused one kills and reaps it.
#[derive(Debug)]
pub struct WarmInit {
    pid: Pid,
    control: Option<OwnedFd>,
    memory: Option<sys::InitChildMemory>,
    /// The host id range's slot it was mapped onto.
    pub slot: u32,
    /// The sandbox user's host uid (= gid) in that range.
    pub host_uid: u32,
}

impl Drop for WarmInit {
    fn drop(&mut self) {
        if self.control.is_some() {
            let _ = nix::sys::signal::kill(self.pid, nix::sys::signal::Signal::SIGKILL);
            let _ = nix::sys::wait::waitpid(self.pid, None);
        }
    }
}

impl WarmInit {
    /// Clones and maps a new init onto id range `slot` (blocking).
    pub fn start(
        init_program: &InitProgram,
        host_id_base: u32,
        slot: u32,
    ) -> Result<Self, SandboxError> {
        let (parent, child) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(descriptor("the control socket pair"))?;
        let argv0 = CString::new(init_program.path().as_os_str().as_encoded_bytes())
            .map_err(|_| SandboxError::Unexpected("NUL in the init program path".to_owned()))?;
        let exec = sys::InitExec {
            argv: vec![argv0],
            program: init_program.descriptor(),
            control_fd: child.as_raw_fd(),
        };
        let flags = CloneFlags::CLONE_NEWUSER
            | CloneFlags::CLONE_NEWNS
            | CloneFlags::CLONE_NEWPID
            | CloneFlags::CLONE_NEWNET
            | CloneFlags::CLONE_NEWIPC
            | CloneFlags::CLONE_NEWUTS;
        let (pid, memory) = clone_on_launcher(exec, flags).map_err(SandboxError::Clone)?;
        drop(child);
        // From here on, dropping `warm` kills and reaps the child, and only
        // then releases the memory it may still read.
        let warm = Self {
            pid,
            control: Some(parent),
            memory: Some(memory),
            slot,
            host_uid: host_id_base + SANDBOX_UID,
        };
        let map = format!("0 {host_id_base} {IDS_PER_SESSION}\n");
        for file in ["uid_map", "gid_map"] {
            let path = PathBuf::from(format!("/proc/{pid}/{file}"));
            std::fs::write(&path, &map)
                .map_err(|source| SandboxError::IdMap { file: path, source })?;
        }
        if let Some(control) = &warm.control {
            nix::unistd::write(control, &[1_u8])
                .map_err(|e| SandboxError::Protocol(ProtocolError::Send(e.into())))?;
        }
        Ok(warm)
    }

    /// Hands over the pid and control socket; the caller now owns the
    /// child (and must kill and reap it on failure).
    fn take(mut self) -> Result<(Pid, OwnedFd, Option<sys::InitChildMemory>), SandboxError> {
        let control = self
            .control
            .take()
            .ok_or_else(|| SandboxError::Unexpected("a warm init handed over twice".to_owned()))?;
        Ok((self.pid, control, self.memory.take()))
    }
}

/// Activates a warm init for a session (blocking): joins the session cgroup,
/// receives the spec and mount trees, builds the sandbox, reports ready.
fn activate_init(
    spec: &LaunchSpec,
    cgroup: &SessionCgroup,
    warm: WarmInit,
) -> Result<(Pid, OwnedFd, String), SandboxError> {
    let mut sources = vec![open_path(&spec.workspace)?];
    for path in &spec.bind_sources {
        sources.push(open_path(path)?);
    }
    let (pid, control, memory) = warm.take()?;
    let activated = send_spec(pid, spec, cgroup, &control, &sources);
    let result = match activated {
        Ok(landlock) => nix::fcntl::fcntl(
            &control,
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
        )
        .map(|_| landlock)
        .map_err(descriptor("a non-blocking control socket")),
        Err(error) => Err(error),
    };
    let result = match result {
        Ok(ready) => Ok(ready),
        Err(seen) => {
            // Killing an init that already exited changes nothing, so the
            // wait reports why it exited on its own, if it did.
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            let waited = nix::sys::wait::waitpid(pid, None);
            match (waited, seen) {
                // It could not take its spec: it never ran sandbox-init.
                (
                    Ok(nix::sys::wait::WaitStatus::Exited(_, code)),
                    seen @ SandboxError::Protocol(ProtocolError::Send(_)),
                ) => Err(SandboxError::InitExited {
                    code,
                    seen: Box::new(seen),
                }),
                (_, seen) => Err(seen),
            }
        }
    };
    // Ready (it executed) or reaped: either way the child no longer reads
    // this memory.
    drop(memory);
    result.map(|landlock| (pid, control, landlock))
}

fn send_spec(
    pid: Pid,
    spec: &LaunchSpec,
    cgroup: &SessionCgroup,
    control: &OwnedFd,
    sources: &[OwnedFd],
) -> Result<String, SandboxError> {
    cgroup
        .add_process(pid.as_raw())
        .map_err(SandboxError::Cgroup)?;
    let fds: Vec<i32> = sources.iter().map(|fd| fd.as_raw_fd()).collect();
    let init_spec = InitSpec {
        plan: spec.plan.clone(),
        hostname: "sandbox".to_owned(),
        sandbox_uid: SANDBOX_UID,
        sandbox_gid: SANDBOX_UID,
        rlimits: spec.rlimits.clone(),
        require_landlock: spec.require_landlock,
        seccomp_filter: spec.seccomp_filter.as_ref().clone(),
    };
    protocol::send(control.as_fd(), &init_spec, &fds).map_err(SandboxError::Protocol)?;
    let timeout = nix::sys::time::TimeVal::new(
        i64::try_from(spec.start_timeout.as_secs()).unwrap_or(i64::MAX),
        i64::from(spec.start_timeout.subsec_micros()),
    );
    nix::sys::socket::setsockopt(control, nix::sys::socket::sockopt::ReceiveTimeout, &timeout)
        .map_err(descriptor("the control socket timeout"))?;
    let mut buffer = Vec::new();
    let reply = protocol::receive::<Reply>(control.as_fd(), &mut buffer).map_err(|e| match e {
        ProtocolError::Receive(io) if io.kind() == std::io::ErrorKind::WouldBlock => {
            SandboxError::StartTimeout(spec.start_timeout)
        }
        ProtocolError::Closed => SandboxError::Setup {
            step: "start".to_owned(),
            error: "the init exited before reporting (is sandbox-init executable by an unprivileged user?)".to_owned(),
        },
        other => SandboxError::Protocol(other),
    })?;
    let zero = nix::sys::time::TimeVal::new(0, 0);
    let _ = nix::sys::socket::setsockopt(control, nix::sys::socket::sockopt::ReceiveTimeout, &zero);
    match reply.0 {
        Reply::Ready { landlock } => Ok(landlock),
        Reply::SetupFailed { step, error } => Err(SandboxError::Setup { step, error }),
        other => Err(SandboxError::Unexpected(format!("{other:?}"))),
    }
}

/// Opens the proxy's listening socket inside the sandbox's network
/// namespace, from a short-lived thread (a thread's network namespace is its
/// own; the daemon's other threads are never moved).
fn listen_in_namespace(netns: &Path) -> std::io::Result<std::net::TcpListener> {
    let netns = std::fs::File::open(netns)?;
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                nix::sched::setns(&netns, CloneFlags::CLONE_NEWNET)
                    .map_err(std::io::Error::from)?;
                std::net::TcpListener::bind(("127.0.0.1", PROXY_PORT))
            })
            .join()
            .map_err(|_| std::io::Error::other("the namespace thread panicked"))?
    })
}

/// The standard rlimits of a sandbox.
pub fn standard_rlimits(max_open_files: u64, nproc: u64, max_file_bytes: u64) -> Vec<Rlimit> {
    vec![
        Rlimit {
            resource: RlimitResource::Nofile,
            value: max_open_files,
        },
        Rlimit {
            resource: RlimitResource::Nproc,
            value: nproc,
        },
        Rlimit {
            resource: RlimitResource::Fsize,
            value: max_file_bytes,
        },
        Rlimit {
            resource: RlimitResource::Core,
            value: 0,
        },
    ]
}
