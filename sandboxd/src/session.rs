//! Sandbox sessions: a workspace, a resolved policy, and the record of the
//! session's invocations (for idempotency by `invocation_id`).
//!
//! The manager enforces TTL and idle timeout itself, and at start-up deletes
//! whatever a crashed instance left in the sessions directory.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use harness_proto::sandbox::v1 as pb;
use tokio::sync::{Notify, watch};

use crate::config::SandboxdConfig;
use crate::ids::{InvocationId, SandboxSessionId};
use crate::network::allowlist::Allowlist;
use crate::network::http_egress::{EgressLog, EgressPolicy};
use crate::network::resolver::Resolver;
use crate::probe::HostProbe;
use crate::process::sandbox::{ProcessSandbox, SandboxTeardown};
use crate::process::{ProcessBackend, ProcessPolicy};
use crate::workspace::{Workspace, WorkspaceError};

/// Errors of session management.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// No session with this id.
    #[error("no sandbox session {0:?}")]
    NotFound(String),
    /// The daemon holds its maximum number of sessions.
    #[error("sandboxd already holds its maximum of {0} sessions")]
    TooManySessions(u32),
    /// The policy is malformed or asks for more than the daemon allows.
    #[error("invalid session policy: {0}")]
    InvalidPolicy(String),
    /// The policy needs a feature this build of sandboxd does not have yet.
    #[error("{0}")]
    NotBuilt(String),
    /// The policy needs a host feature this host lacks.
    #[error("{0}")]
    HostLacks(String),
    /// The workspace could not be prepared.
    #[error("cannot prepare the session workspace")]
    Workspace(#[source] WorkspaceError),
    /// The session is being destroyed.
    #[error("sandbox session {0:?} is being destroyed")]
    Destroyed(String),
    /// The process sandbox could not be started.
    #[error(transparent)]
    Process(#[from] crate::process::ProcessError),
    /// The session has no process sandbox.
    #[error(
        "session {0:?} has no process sandbox: create it with BACKEND_PROCESS in policy.backends"
    )]
    NoProcessBackend(String),
}

/// A session policy with defaults applied and limits checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedPolicy {
    /// Environment for every invocation (policy environment plus secrets).
    pub environment: Vec<(String, String)>,
    /// Workspace mounted read-only for tools.
    pub workspace_read_only: bool,
    /// Workspace size cap in bytes.
    pub workspace_bytes: u64,
    /// Default and maximum invocation deadline.
    pub invocation_timeout: Duration,
    /// Linear memory per invocation.
    pub memory_bytes: u64,
    /// Captured output cap per stream.
    pub max_output_bytes: u64,
    /// Lifetime.
    pub ttl: Duration,
    /// Idle timeout.
    pub idle_timeout: Duration,
    /// Network rules; empty denies everything.
    pub network: Arc<Allowlist>,
    /// Fuel (instruction budget) per WASI invocation, if metered.
    pub fuel: Option<u64>,
    /// The process sandbox to build, if the policy asks for one.
    pub process: Option<ProcessPolicy>,
}

/// Applies defaults and refuses what cannot be enforced (fail closed).
pub fn resolve_policy(
    policy: &pb::SessionPolicy,
    config: &SandboxdConfig,
    host: &HostProbe,
) -> Result<ResolvedPolicy, SessionError> {
    let mut wants_process = false;
    for backend in &policy.backends {
        match pb::Backend::try_from(*backend) {
            Ok(pb::Backend::Wasi) => {}
            Ok(pb::Backend::Process) => wants_process = true,
            _ => {
                return Err(SessionError::InvalidPolicy(format!(
                    "unknown backend {backend}"
                )));
            }
        }
    }
    if policy.require_landlock && host.landlock_abi == 0 {
        return Err(SessionError::HostLacks(
            "policy requires landlock, but this host's kernel has no landlock: boot a kernel ≥ 5.13 \
             with `lsm=landlock,...`, or drop require_landlock"
                .to_owned(),
        ));
    }
    let network = Allowlist::from_policy(&policy.network.clone().unwrap_or_default())
        .map_err(|e| SessionError::InvalidPolicy(e.to_string()))?;
    let binds = policy
        .filesystem
        .as_ref()
        .map(|fs| fs.binds.clone())
        .unwrap_or_default();
    let limits = policy.limits.unwrap_or_default();
    if !wants_process && (!binds.is_empty() || limits.pids != 0 || limits.cpu_millis != 0) {
        return Err(SessionError::InvalidPolicy(
            "filesystem.binds, limits.pids and limits.cpu_millis apply to the process backend: \
             add BACKEND_PROCESS to policy.backends or leave them unset"
                .to_owned(),
        ));
    }
    let invocation_timeout = positive_or(
        limits
            .invocation_timeout
            .as_ref()
            .map(harness_proto::duration_from_proto),
        config.default_invocation_timeout,
    );
    if invocation_timeout > config.max_invocation_timeout {
        return Err(SessionError::InvalidPolicy(format!(
            "limits.invocation_timeout {invocation_timeout:?} exceeds the daemon maximum {:?}",
            config.max_invocation_timeout
        )));
    }
    let memory_bytes = nonzero_or(limits.memory_bytes, config.default_memory_bytes);
    if memory_bytes > config.max_memory_bytes {
        return Err(SessionError::InvalidPolicy(format!(
            "limits.memory_bytes {memory_bytes} exceeds the daemon maximum {}",
            config.max_memory_bytes
        )));
    }
    let workspace = policy.workspace.clone().unwrap_or_default();
    let workspace_bytes = [workspace.size_limit_bytes, limits.disk_bytes]
        .into_iter()
        .filter(|v| *v != 0)
        .min()
        .unwrap_or(config.default_workspace_bytes);
    if workspace_bytes > config.max_workspace_bytes {
        return Err(SessionError::InvalidPolicy(format!(
            "workspace size {workspace_bytes} (workspace.size_limit_bytes or limits.disk_bytes) \
             exceeds the daemon maximum {}",
            config.max_workspace_bytes
        )));
    }
    let process = wants_process.then_some(ProcessPolicy {
        memory_bytes,
        pids: if limits.pids == 0 {
            config.process.default_pids
        } else {
            limits.pids
        },
        cpu_millis: limits.cpu_millis,
        max_file_bytes: workspace_bytes,
        binds,
        require_landlock: policy.require_landlock,
        workspace_read_only: workspace.read_only,
    });
    Ok(ResolvedPolicy {
        process,
        fuel: (limits.fuel != 0).then_some(limits.fuel),
        network: Arc::new(network),
        environment: resolve_environment(policy)?,
        workspace_read_only: workspace.read_only,
        workspace_bytes,
        invocation_timeout,
        memory_bytes,
        max_output_bytes: nonzero_or(limits.max_output_bytes, config.default_max_output_bytes),
        ttl: positive_or(
            policy.ttl.as_ref().map(harness_proto::duration_from_proto),
            config.default_ttl,
        ),
        idle_timeout: positive_or(
            policy
                .idle_timeout
                .as_ref()
                .map(harness_proto::duration_from_proto),
            config.default_idle_timeout,
        ),
    })
}

fn resolve_environment(policy: &pb::SessionPolicy) -> Result<Vec<(String, String)>, SessionError> {
    let mut environment: Vec<(String, String)> = policy
        .environment
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    environment.extend(
        policy
            .secrets
            .iter()
            .map(|s| (s.env_var.clone(), s.value.clone())),
    );
    for (name, value) in &environment {
        let valid_name = !name.is_empty() && !name.contains('=') && !name.contains('\0');
        if !valid_name || value.contains('\0') {
            return Err(SessionError::InvalidPolicy(format!(
                "invalid environment variable {name:?}"
            )));
        }
    }
    environment.sort();
    Ok(environment)
}

fn nonzero_or(value: u64, default: u64) -> u64 {
    if value == 0 { default } else { value }
}

fn positive_or(value: Option<Duration>, default: Duration) -> Duration {
    value.filter(|d| !d.is_zero()).unwrap_or(default)
}

/// Where an invocation stands, for idempotency.
#[derive(Debug, Clone)]
pub enum InvocationRecord {
    /// Running; the receiver yields the result when it finishes.
    Running(watch::Receiver<Option<pb::InvokeResult>>, u64),
    /// Finished with this result.
    Finished(pb::InvokeResult, u64),
}

/// How many finished invocation results a session remembers for replay.
const REMEMBERED_RESULTS: usize = 10_000;

/// A live sandbox session.
#[derive(Debug)]
pub struct Session {
    /// Server-assigned id.
    pub id: SandboxSessionId,
    /// Resolved policy.
    pub policy: ResolvedPolicy,
    /// The policy as requested, secrets redacted, for GetSession.
    pub policy_view: pb::SessionPolicy,
    /// Network egress of the session's invocations; `None` when the
    /// allowlist is empty.
    pub egress: Option<EgressPolicy>,
    /// Caller labels.
    pub labels: HashMap<String, String>,
    /// Creation time.
    pub created_at: SystemTime,
    created_instant: Instant,
    last_activity: Mutex<(Instant, SystemTime)>,
    workspace: Mutex<Option<Workspace>>,
    workspace_root: PathBuf,
    running: AtomicU32,
    finished: AtomicU64,
    cancelled: Notify,
    invocations: Mutex<Invocations>,
    process: std::sync::OnceLock<ProcessSandbox>,
    id_slot: Mutex<Option<u32>>,
}

#[derive(Debug, Default)]
struct Invocations {
    records: HashMap<InvocationId, InvocationRecord>,
    finished_order: VecDeque<InvocationId>,
}

/// Marks an invocation as running for as long as it lives.
#[derive(Debug)]
pub struct RunningGuard {
    session: Arc<Session>,
}

impl Drop for RunningGuard {
    fn drop(&mut self) {
        self.session.running.fetch_sub(1, Ordering::SeqCst);
        self.session.finished.fetch_add(1, Ordering::SeqCst);
        self.session.touch();
    }
}

/// Whether an invocation id is new, running or done.
#[derive(Debug)]
pub enum Claim {
    /// New: run it and complete the sender.
    New(watch::Sender<Option<pb::InvokeResult>>),
    /// Already known.
    Existing(InvocationRecord),
}

impl Session {
    /// The workspace's host path.
    pub fn workspace_root(&self) -> &std::path::Path {
        &self.workspace_root
    }

    /// Records activity for the idle timeout.
    pub fn touch(&self) {
        *lock(&self.last_activity) = (Instant::now(), SystemTime::now());
    }

    /// Runs `f` with the workspace, unless the session is being destroyed.
    pub fn with_workspace<R>(&self, f: impl FnOnce(&Workspace) -> R) -> Result<R, SessionError> {
        self.touch();
        let guard = lock(&self.workspace);
        let workspace = guard
            .as_ref()
            .ok_or_else(|| SessionError::Destroyed(self.id.to_string()))?;
        Ok(f(workspace))
    }

    /// Counts an invocation as running until the guard drops.
    pub fn start_running(self: &Arc<Self>) -> RunningGuard {
        self.running.fetch_add(1, Ordering::SeqCst);
        self.touch();
        RunningGuard {
            session: Arc::clone(self),
        }
    }

    /// The session's process sandbox.
    pub fn process(&self) -> Result<&ProcessSandbox, SessionError> {
        self.process
            .get()
            .ok_or_else(|| SessionError::NoProcessBackend(self.id.to_string()))
    }

    /// Resolves when the session is destroyed.
    pub async fn cancelled(&self) {
        self.cancelled.notified().await;
    }

    /// Claims `invocation_id` for a request with fingerprint `request_hash`.
    pub fn claim(&self, invocation_id: &InvocationId, request_hash: u64) -> Claim {
        let mut invocations = lock(&self.invocations);
        if let Some(record) = invocations.records.get(invocation_id) {
            return Claim::Existing(record.clone());
        }
        let (sender, receiver) = watch::channel(None);
        invocations.records.insert(
            invocation_id.to_owned(),
            InvocationRecord::Running(receiver, request_hash),
        );
        Claim::New(sender)
    }

    /// Records the result of a claimed invocation.
    pub fn complete(
        &self,
        invocation_id: &InvocationId,
        request_hash: u64,
        result: pb::InvokeResult,
    ) {
        let mut invocations = lock(&self.invocations);
        invocations.records.insert(
            invocation_id.to_owned(),
            InvocationRecord::Finished(result, request_hash),
        );
        invocations
            .finished_order
            .push_back(invocation_id.to_owned());
        while invocations.finished_order.len() > REMEMBERED_RESULTS {
            if let Some(oldest) = invocations.finished_order.pop_front() {
                invocations.records.remove(&oldest);
            }
        }
    }

    /// Forgets a claim whose invocation never produced a result (for
    /// example, the caller went away before it ran), so it can be retried.
    pub fn abandon(&self, invocation_id: &InvocationId) {
        let mut invocations = lock(&self.invocations);
        if matches!(
            invocations.records.get(invocation_id),
            Some(InvocationRecord::Running(..))
        ) {
            invocations.records.remove(invocation_id);
        }
    }

    /// The session as the wire message.
    pub fn to_proto(&self) -> pb::Session {
        let (_, last_activity) = *lock(&self.last_activity);
        pb::Session {
            session_id: self.id.to_string(),
            state: if lock(&self.workspace).is_some() {
                pb::SessionState::Ready
            } else {
                pb::SessionState::Destroying
            } as i32,
            policy: Some(self.policy_view.clone()),
            labels: self.labels.clone(),
            created_at: Some(harness_proto::timestamp_to_proto(self.created_at)),
            last_activity_at: Some(harness_proto::timestamp_to_proto(last_activity)),
            expires_at: Some(harness_proto::timestamp_to_proto(
                self.created_at + self.policy.ttl,
            )),
            running_invocations: self.running.load(Ordering::SeqCst),
            finished_invocations: self.finished.load(Ordering::SeqCst),
        }
    }

    fn expiry_cause(&self, now: Instant) -> Option<&'static str> {
        if now.duration_since(self.created_instant) >= self.policy.ttl {
            return Some("ttl");
        }
        let (last, _) = *lock(&self.last_activity);
        let idle = self.running.load(Ordering::SeqCst) == 0
            && now.duration_since(last) >= self.policy.idle_timeout;
        idle.then_some("idle")
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // State behind these locks stays consistent across a panicking holder
    // (every update is a single assignment), so poisoning is not fatal.
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// Holds every session of the daemon.
#[derive(Debug)]
pub struct SessionManager {
    config: Arc<SandboxdConfig>,
    host: Arc<HostProbe>,
    resolver: Resolver,
    sessions: RwLock<HashMap<SandboxSessionId, Arc<Session>>>,
    process: ProcessBackend,
}

impl SessionManager {
    /// A manager; sessions live under `config.sessions_dir()`. Fails when
    /// the process backend's init program is broken (see
    /// [`ProcessBackend::new`]).
    pub fn new(
        config: Arc<SandboxdConfig>,
        host: Arc<HostProbe>,
    ) -> Result<Self, crate::process::init_program::InitProgramError> {
        let resolver = Resolver::new(config.static_hosts.clone());
        Ok(Self {
            process: ProcessBackend::new(&config, Arc::clone(&host))?,
            config,
            host,
            resolver,
            sessions: RwLock::new(HashMap::new()),
        })
    }

    /// The process backend.
    pub fn process_backend(&self) -> &ProcessBackend {
        &self.process
    }

    /// Deletes leftovers of a crashed instance: every entry in the sessions
    /// directory (this instance has created none yet) and every session
    /// cgroup, killing what runs in it. Returns how many.
    pub fn clean_up_after_crash(&self) -> std::io::Result<usize> {
        let cgroups = self.process.sweep_leftovers();
        for cgroup in &cgroups {
            tracing::warn!(cgroup = %cgroup.display(), "removed a cgroup left by a previous sandboxd instance");
        }
        let dir = self.config.sessions_dir();
        std::fs::create_dir_all(&dir)?;
        let mut removed = 0;
        for entry in std::fs::read_dir(&dir)? {
            Workspace::remove_leftover(&entry?.path()).map_err(std::io::Error::other)?;
            removed += 1;
        }
        Ok(removed)
    }

    /// Creates a session.
    pub fn create(
        &self,
        policy: &pb::SessionPolicy,
        labels: HashMap<String, String>,
    ) -> Result<Arc<Session>, SessionError> {
        let resolved = resolve_policy(policy, &self.config, &self.host)?;
        if self.len() >= self.config.max_sessions as usize {
            return Err(SessionError::TooManySessions(self.config.max_sessions));
        }
        let id = SandboxSessionId::generate();
        let root = self.config.sessions_dir().join(id.as_str());
        let workspace = Workspace::create(
            root.clone(),
            resolved.workspace_bytes,
            self.config.workspace_storage(),
        )
        .map_err(SessionError::Workspace)?;
        let initial = policy
            .workspace
            .as_ref()
            .map(|w| w.initial_files.as_slice())
            .unwrap_or_default();
        for file in initial {
            if let Err(error) = workspace.write_file(&file.path, &file.content, file.mode) {
                let _ = workspace.remove();
                return Err(SessionError::Workspace(error));
            }
        }
        let now = (Instant::now(), SystemTime::now());
        let egress = (!resolved.network.denies_everything()).then(|| EgressPolicy {
            allowlist: Arc::clone(&resolved.network),
            resolver: self.resolver.clone(),
            log: Arc::new(EgressLog::default()),
        });
        let session = Arc::new(Session {
            egress,
            id: id.clone(),
            policy: resolved,
            policy_view: redacted(policy),
            labels,
            created_at: now.1,
            created_instant: now.0,
            last_activity: Mutex::new(now),
            workspace: Mutex::new(Some(workspace)),
            workspace_root: root,
            running: AtomicU32::new(0),
            finished: AtomicU64::new(0),
            cancelled: Notify::new(),
            invocations: Mutex::new(Invocations::default()),
            process: std::sync::OnceLock::new(),
            id_slot: Mutex::new(None),
        });
        self.write().insert(id, Arc::clone(&session));
        Ok(session)
    }

    /// Builds the process sandbox of a session whose policy asks for one
    /// (no-op otherwise). On failure the caller destroys the session.
    pub async fn start_process_sandbox(&self, session: &Arc<Session>) -> Result<(), SessionError> {
        let Some(policy) = &session.policy.process else {
            return Ok(());
        };
        let warm = self.process.acquire().await?;
        let host_uid = warm.host_uid;
        *lock(&session.id_slot) = Some(warm.slot);
        {
            let mut workspace = lock(&session.workspace);
            let workspace = workspace
                .as_mut()
                .ok_or_else(|| SessionError::Destroyed(session.id.to_string()))?;
            workspace
                .set_owner(host_uid, host_uid)
                .map_err(SessionError::Workspace)?;
        }
        let sandbox = self
            .process
            .launch(
                session.id.as_str(),
                warm,
                policy,
                &session.workspace_root,
                session.policy.environment.clone(),
                session.egress.clone(),
            )
            .await?;
        tracing::info!(
            session = %session.id,
            init = sandbox.init_pid(),
            landlock = sandbox.landlock(),
            "process sandbox ready"
        );
        if let Err(sandbox) = session.process.set(sandbox) {
            sandbox.destroy().await;
        }
        Ok(())
    }

    /// Looks a session up (by its typed id or, without building one per
    /// request, by the id as the request gave it).
    pub fn get<Id>(&self, id: &Id) -> Result<Arc<Session>, SessionError>
    where
        SandboxSessionId: std::borrow::Borrow<Id>,
        Id: std::hash::Hash + Eq + std::fmt::Display + ?Sized,
    {
        self.read()
            .get(id)
            .cloned()
            .ok_or_else(|| SessionError::NotFound(id.to_string()))
    }

    /// All sessions, oldest first.
    pub fn list(&self) -> Vec<Arc<Session>> {
        let mut sessions: Vec<_> = self.read().values().cloned().collect();
        sessions.sort_by_key(|s| s.created_instant);
        sessions
    }

    /// Number of sessions held.
    pub fn len(&self) -> usize {
        self.read().len()
    }

    /// True when no sessions are held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Invocations running across all sessions.
    pub fn running_invocations(&self) -> u32 {
        self.read()
            .values()
            .map(|s| s.running.load(Ordering::SeqCst))
            .sum()
    }

    /// Destroys a session completely. Idempotent.
    pub async fn destroy(&self, id: &SandboxSessionId, cause: &str) -> pb::TeardownReport {
        let started = Instant::now();
        let Some(session) = self.write().remove(id) else {
            return pb::TeardownReport {
                session_id: id.to_string(),
                already_destroyed: true,
                cause: cause.to_owned(),
                ..Default::default()
            };
        };
        let running = session.running.load(Ordering::SeqCst);
        // Running invocations select on this and drop their stores.
        session.cancelled.notify_waiters();
        let mut report = pb::TeardownReport {
            session_id: id.to_string(),
            cause: cause.to_owned(),
            invocations_cancelled: running,
            wasi_stores_dropped: if session.process.get().is_some() {
                0
            } else {
                running
            },
            ..Default::default()
        };
        if let Some(sandbox) = session.process.get() {
            add_sandbox_teardown(&mut report, sandbox.destroy().await);
        }
        if let Some(slot) = lock(&session.id_slot).take() {
            self.process.release(slot);
        }
        let workspace = lock(&session.workspace).take();
        let removed = tokio::task::spawn_blocking(move || workspace.map(Workspace::remove))
            .await
            .unwrap_or(None);
        match removed {
            Some(Ok(stats)) => {
                report.workspace_removed = true;
                report.workspace_files_removed = stats.files;
                report.workspace_bytes_removed = stats.bytes;
            }
            Some(Err(error)) => report.errors.push(harness_daemon::error_chain(&error)),
            None => report
                .errors
                .push("workspace was already detached".to_owned()),
        }
        report.duration = Some(harness_proto::duration_to_proto(started.elapsed()));
        tracing::info!(
            session = %id,
            cause,
            files = report.workspace_files_removed,
            "session destroyed"
        );
        report
    }

    /// Destroys every session past its TTL or idle timeout.
    pub async fn reap_expired(&self) -> Vec<pb::TeardownReport> {
        let now = Instant::now();
        let expired: Vec<(SandboxSessionId, &'static str)> = self
            .read()
            .values()
            .filter_map(|s| s.expiry_cause(now).map(|cause| (s.id.clone(), cause)))
            .collect();
        let mut reports = Vec::with_capacity(expired.len());
        for (id, cause) in expired {
            reports.push(self.destroy(&id, cause).await);
        }
        reports
    }

    /// Destroys every session (daemon shutdown).
    pub async fn destroy_all(&self, cause: &str) -> Vec<pb::TeardownReport> {
        let ids: Vec<SandboxSessionId> = self.read().keys().cloned().collect();
        let mut reports = Vec::with_capacity(ids.len());
        for id in ids {
            reports.push(self.destroy(&id, cause).await);
        }
        reports
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<SandboxSessionId, Arc<Session>>> {
        self.sessions.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<SandboxSessionId, Arc<Session>>> {
        self.sessions.write().unwrap_or_else(|p| p.into_inner())
    }
}

fn add_sandbox_teardown(report: &mut pb::TeardownReport, teardown: SandboxTeardown) {
    report.processes_killed = teardown.processes_killed;
    report.mounts_removed = teardown.mounts_removed;
    report.cgroups_removed = teardown.cgroups_removed;
    report.network_removed = teardown.network;
    report.errors.extend(teardown.errors);
}

/// The policy with secret values and initial file contents removed.
fn redacted(policy: &pb::SessionPolicy) -> pb::SessionPolicy {
    let mut view = policy.clone();
    for secret in &mut view.secrets {
        secret.value = "<redacted>".to_owned();
    }
    if let Some(workspace) = &mut view.workspace {
        for file in &mut workspace.initial_files {
            file.content.clear();
        }
    }
    view
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn manager(tmp: &tempfile::TempDir) -> SessionManager {
        let config = SandboxdConfig {
            state_dir: tmp.path().to_owned(),
            ..SandboxdConfig::default()
        };
        SessionManager::new(Arc::new(config), Arc::new(HostProbe::default())).unwrap()
    }

    #[test]
    fn defaults_are_applied_and_secrets_join_the_environment() {
        let policy = pb::SessionPolicy {
            environment: [("LANG".to_owned(), "C".to_owned())].into(),
            secrets: vec![pb::Secret {
                env_var: "TOKEN".to_owned(),
                value: "s3cret".to_owned(),
            }],
            ..Default::default()
        };
        let config = SandboxdConfig::default();
        let resolved = resolve_policy(&policy, &config, &HostProbe::default()).unwrap();
        assert_eq!(
            resolved,
            ResolvedPolicy {
                environment: vec![
                    ("LANG".to_owned(), "C".to_owned()),
                    ("TOKEN".to_owned(), "s3cret".to_owned())
                ],
                workspace_read_only: false,
                workspace_bytes: config.default_workspace_bytes,
                invocation_timeout: config.default_invocation_timeout,
                memory_bytes: config.default_memory_bytes,
                max_output_bytes: config.default_max_output_bytes,
                ttl: config.default_ttl,
                idle_timeout: config.default_idle_timeout,
                network: Arc::new(Allowlist::default()),
                fuel: None,
                process: None,
            }
        );
    }

    #[test]
    fn unenforceable_policies_are_refused() {
        let config = SandboxdConfig::default();
        let host = HostProbe::default();
        let bad_rule = pb::SessionPolicy {
            network: Some(pb::NetworkPolicy {
                allow: vec!["*.".to_owned()],
                ..Default::default()
            }),
            ..Default::default()
        };
        assert!(matches!(
            resolve_policy(&bad_rule, &config, &host),
            Err(SessionError::InvalidPolicy(_))
        ));
        let pids_without_process = pb::SessionPolicy {
            limits: Some(pb::ResourceLimits {
                pids: 10,
                ..Default::default()
            }),
            ..Default::default()
        };
        assert!(matches!(
            resolve_policy(&pids_without_process, &config, &host),
            Err(SessionError::InvalidPolicy(_))
        ));
        let landlock = pb::SessionPolicy {
            require_landlock: true,
            ..Default::default()
        };
        let err = resolve_policy(&landlock, &config, &host).unwrap_err();
        assert!(err.to_string().contains("landlock"), "{err}");
        let too_much_memory = pb::SessionPolicy {
            limits: Some(pb::ResourceLimits {
                memory_bytes: config.max_memory_bytes + 1,
                ..Default::default()
            }),
            ..Default::default()
        };
        assert!(matches!(
            resolve_policy(&too_much_memory, &config, &host),
            Err(SessionError::InvalidPolicy(_))
        ));
        let too_big_a_workspace = pb::SessionPolicy {
            limits: Some(pb::ResourceLimits {
                disk_bytes: config.max_workspace_bytes + 1,
                ..Default::default()
            }),
            ..Default::default()
        };
        let err = resolve_policy(&too_big_a_workspace, &config, &host).unwrap_err();
        assert!(err.to_string().contains("workspace size"), "{err}");
    }

    #[tokio::test]
    async fn create_then_destroy_removes_the_workspace_and_is_idempotent() {
        let tmp = tempfile::tempdir().unwrap();
        let manager = manager(&tmp);
        let policy = pb::SessionPolicy {
            workspace: Some(pb::WorkspacePolicy {
                initial_files: vec![pb::FileWrite {
                    path: "a/b.txt".to_owned(),
                    content: b"hi".to_vec(),
                    mode: 0,
                }],
                ..Default::default()
            }),
            ..Default::default()
        };
        let session = manager.create(&policy, HashMap::new()).unwrap();
        let root = session.workspace_root().to_owned();
        assert_eq!(std::fs::read(root.join("a/b.txt")).unwrap(), b"hi");
        let report = manager.destroy(&session.id, "requested").await;
        assert!(
            report.workspace_removed && report.errors.is_empty(),
            "{report:?}"
        );
        assert_eq!(
            (
                report.workspace_files_removed,
                report.workspace_bytes_removed
            ),
            (1, 2)
        );
        assert!(!root.exists());
        assert!(
            manager
                .destroy(&session.id, "requested")
                .await
                .already_destroyed
        );
        assert!(matches!(
            manager.get(&session.id),
            Err(SessionError::NotFound(_))
        ));
    }

    #[tokio::test]
    async fn idle_sessions_are_reaped() {
        let tmp = tempfile::tempdir().unwrap();
        let manager = manager(&tmp);
        let policy = pb::SessionPolicy {
            idle_timeout: Some(harness_proto::duration_to_proto(Duration::from_millis(1))),
            ..Default::default()
        };
        let session = manager.create(&policy, HashMap::new()).unwrap();
        std::thread::sleep(Duration::from_millis(5));
        let reports = manager.reap_expired().await;
        assert_eq!(reports.len(), 1);
        assert_eq!(reports[0].cause, "idle");
        assert!(!session.workspace_root().exists());
    }

    #[test]
    fn crash_leftovers_are_removed_at_start_up() {
        let tmp = tempfile::tempdir().unwrap();
        let manager = manager(&tmp);
        std::fs::create_dir_all(tmp.path().join("sessions/sbx-old/sub")).unwrap();
        std::fs::write(tmp.path().join("sessions/sbx-old/sub/f"), b"x").unwrap();
        // A crashed instance's live session: its tmpfs is still mounted.
        let crashed = manager
            .create(&pb::SessionPolicy::default(), HashMap::new())
            .unwrap();
        let mounted = crashed.workspace_root().to_owned();
        std::fs::write(mounted.join("g"), b"y").unwrap();
        let restarted = self::manager(&tmp);
        assert_eq!(restarted.clean_up_after_crash().unwrap(), 2);
        assert_eq!(
            std::fs::read_dir(tmp.path().join("sessions"))
                .unwrap()
                .count(),
            0
        );
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert!(
            !mountinfo.contains(mounted.to_str().unwrap()),
            "{mountinfo}"
        );
    }

    #[test]
    fn secrets_are_redacted_in_the_view() {
        let tmp = tempfile::tempdir().unwrap();
        let manager = manager(&tmp);
        let policy = pb::SessionPolicy {
            secrets: vec![pb::Secret {
                env_var: "TOKEN".to_owned(),
                value: "s3cret".to_owned(),
            }],
            ..Default::default()
        };
        let session = manager.create(&policy, HashMap::new()).unwrap();
        let view = session.to_proto();
        assert_eq!(view.policy.unwrap().secrets[0].value, "<redacted>");
    }
}
