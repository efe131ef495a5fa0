//! The process backend: a namespaced Linux sandbox built once per session,
//! in which each invocation is a fork+exec.
//!
//! Reading order:
//! - [`ProcessBackend`] (here) checks the host (failing closed), assigns
//!   each sandbox its own host id range, and launches sandboxes.
//! - [`mount_plan`] describes the sandbox root as data; [`seccomp`] and
//!   [`landlock`] hold the reviewed filter and ruleset; all three are pure
//!   and unit-tested, and applied inside the sandbox by the `sandbox-init`
//!   program ([`harness_sandbox_init::init`], its own small crate; its module
//!   docs list the set-up steps in order). [`init_program`] finds and opens it.
//! - [`sandbox`] launches one sandbox and runs commands in it, talking to
//!   the init over [`protocol`].
//! - [`cgroup`] creates, limits, kills and removes the session cgroups (v2
//!   where the host has controllers there, otherwise v1).
//! - [`crate::network::proxy`] is the egress proxy, the sandbox's only way
//!   out.
//! - [`exec_tool`] is how models see this backend: the `exec` tool;
//!   [`invocations`] is how the invocation lifecycle runs its calls.

pub mod cgroup;
pub mod exec_tool;
pub mod init_program;
pub mod invocations;
pub mod sandbox;

pub use harness_sandbox_init::{landlock, mount_plan, protocol, seccomp};

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use harness_proto::sandbox::v1 as pb;

use crate::config::{ProcessConfig, SandboxdConfig};
use crate::network::http_egress::EgressPolicy;
use crate::probe::HostProbe;
use cgroup::{CgroupHierarchy, CgroupLimits};
use init_program::{InitProgram, InitProgramError};
use mount_plan::{ETC_PATHS, MountPlan, PolicyBind, RootSpec, SYSTEM_PATHS, probe_host_entries};
use sandbox::{
    IDS_PER_SESSION, LaunchSpec, ProcessSandbox, SANDBOX_UID, WarmInit, standard_rlimits,
};

/// The landlock ABI whose filesystem rights the sandbox's ruleset handles
/// ([`landlock::TARGET_ABI`]); `require_landlock` needs at least this.
pub const REQUIRED_LANDLOCK_ABI: u32 = landlock::TARGET_ABI as u32;

/// Errors of the process backend.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// The host lacks an isolation feature the sandbox needs.
    #[error("{0}")]
    HostLacks(String),
    /// A policy bind is unusable.
    #[error("invalid filesystem bind: {0}")]
    Bind(String),
    /// The bind targets do not make a valid root.
    #[error("invalid filesystem binds")]
    Plan(#[source] mount_plan::MountPlanError),
    /// Every host id range is in use.
    #[error("all {0} sandbox id ranges are in use")]
    NoIdRange(u32),
    /// Launching the sandbox failed.
    #[error("cannot start the process sandbox")]
    Launch(#[source] sandbox::SandboxError),
}

/// What a policy asks of a process sandbox, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessPolicy {
    /// Memory limit of the whole sandbox.
    pub memory_bytes: u64,
    /// pids limit.
    pub pids: u32,
    /// CPU limit in millicores; 0 = none.
    pub cpu_millis: u32,
    /// Largest file a command may write (RLIMIT_FSIZE).
    pub max_file_bytes: u64,
    /// Host binds.
    pub binds: Vec<pb::BindMount>,
    /// Landlock must be fully enforced.
    pub require_landlock: bool,
    /// Workspace mounted read-only.
    pub workspace_read_only: bool,
}

/// The backend: host facts, id ranges and the cgroup hierarchy.
#[derive(Debug)]
pub struct ProcessBackend {
    config: ProcessConfig,
    host: Arc<HostProbe>,
    cgroups: Result<CgroupHierarchy, String>,
    init_program: Result<InitProgram, String>,
    seccomp_filter: Result<Arc<Vec<seccomp::Instruction>>, String>,
    ids: Arc<IdRanges>,
    pool: Arc<WarmPool>,
}

/// Host id ranges, one per live sandbox (and per warm init).
#[derive(Debug)]
struct IdRanges {
    uid_base: u32,
    slots: u32,
    used: Mutex<BTreeSet<u32>>,
}

impl IdRanges {
    fn reserve(&self) -> Result<u32, ProcessError> {
        let mut used = self.used.lock().unwrap_or_else(|p| p.into_inner());
        let slot = (0..self.slots)
            .find(|s| !used.contains(s))
            .ok_or(ProcessError::NoIdRange(self.slots))?;
        used.insert(slot);
        Ok(slot)
    }

    fn release(&self, slot: u32) {
        self.used
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&slot);
    }

    fn base(&self, slot: u32) -> u32 {
        self.uid_base
            .saturating_add(slot.saturating_mul(IDS_PER_SESSION))
    }

    /// Reserves a range and starts a warm init on it (blocking).
    fn start_warm(&self, init_program: &InitProgram) -> Result<WarmInit, ProcessError> {
        let slot = self.reserve()?;
        WarmInit::start(init_program, self.base(slot), slot).map_err(|error| {
            self.release(slot);
            ProcessError::Launch(error)
        })
    }
}

/// Inits cloned ahead of `CreateSession` (see [`WarmInit`]).
#[derive(Debug, Default)]
struct WarmPool {
    ready: Mutex<Vec<WarmInit>>,
    refilling: std::sync::atomic::AtomicBool,
}

/// A launched sandbox and the id range it holds.
#[derive(Debug)]
pub struct LaunchedSandbox {
    /// The sandbox.
    pub sandbox: ProcessSandbox,
    /// Its id-range slot; give it back with [`ProcessBackend::release`].
    pub slot: u32,
}

impl ProcessBackend {
    /// Finds the cgroup hierarchy and opens the init program. A host that
    /// lacks a feature, or an init program not installed at its default
    /// place, leaves the backend unavailable so the daemon still serves WASI
    /// (`Capabilities` and `CreateSession` say what is missing); an init
    /// program that is there but unusable, or a configured one that is not
    /// there, is a broken setting and fails.
    pub fn new(config: &SandboxdConfig, host: Arc<HostProbe>) -> Result<Self, InitProgramError> {
        let configured = config.process.init_program.as_deref();
        let init_program = match InitProgram::find(configured) {
            Ok(program) => Ok(program),
            Err(error) if error.is_absent_default(configured.is_some()) => Err(error.to_string()),
            Err(error) => return Err(error),
        };
        let cgroups = CgroupHierarchy::from_host(config.process.cgroup_parent.as_deref())
            .map_err(|e| harness_daemon::error_chain(&e));
        let seccomp_filter = seccomp::sandbox_filter()
            .map(|program| Arc::new(seccomp::to_instructions(&program)))
            .map_err(|e| {
                format!(
                    "the seccomp filter does not compile: {}",
                    harness_daemon::error_chain(&e)
                )
            });
        Ok(Self {
            seccomp_filter,
            init_program,
            ids: Arc::new(IdRanges {
                uid_base: config.process.uid_base,
                slots: config
                    .max_sessions
                    .saturating_add(u32::try_from(config.process.warm_pool).unwrap_or(u32::MAX)),
                used: Mutex::new(BTreeSet::new()),
            }),
            pool: Arc::new(WarmPool::default()),
            config: config.process.clone(),
            host,
            cgroups,
        })
    }

    /// Whether sandboxes can be made here, and if not, why and how to fix it.
    pub fn availability(&self) -> Result<(), String> {
        self.check_host(false)
    }

    /// Fails closed: every missing feature, with its fix.
    pub fn check_host(&self, require_landlock: bool) -> Result<(), String> {
        let mut missing = Vec::new();
        if !self.host.user_namespaces {
            missing.push(
                "user namespaces are unavailable: set sysctl user.max_user_namespaces > 0 \
                 (and kernel.unprivileged_userns_clone=1 where it exists)"
                    .to_owned(),
            );
        }
        if !self.host.seccomp_filter {
            missing.push(
                "seccomp filters are unavailable: use a kernel built with CONFIG_SECCOMP_FILTER"
                    .to_owned(),
            );
        }
        if require_landlock && self.host.landlock_abi < REQUIRED_LANDLOCK_ABI {
            missing.push(format!(
                "the policy requires landlock ABI {REQUIRED_LANDLOCK_ABI} and this kernel offers {}: \
                 boot Linux {} or later with landlock in `lsm=`, or drop require_landlock",
                self.host.landlock_abi,
                landlock::LINUX_FOR_TARGET_ABI
            ));
        }
        if let Err(error) = &self.cgroups {
            missing.push(format!("no usable cgroups: {error}"));
        }
        if let Err(error) = &self.init_program {
            missing.push(error.clone());
        }
        if let Err(error) = &self.seccomp_filter {
            missing.push(error.clone());
        }
        if missing.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "the process backend cannot run on this host: {}",
                missing.join("; ")
            ))
        }
    }

    /// Kills and removes session cgroups a crashed instance left behind.
    pub fn sweep_leftovers(&self) -> Vec<PathBuf> {
        match &self.cgroups {
            Ok(cgroups) => cgroups.sweep_leftovers().unwrap_or_else(|error| {
                tracing::warn!(error = %harness_daemon::error_chain(&error), "cannot sweep leftover cgroups");
                Vec::new()
            }),
            Err(_) => Vec::new(),
        }
    }

    /// An init ready for a session's spec: one from the warm pool, or a
    /// new one. Either way the pool is topped up in the background. Give its
    /// slot back with [`Self::release`] when the sandbox is destroyed.
    pub async fn acquire(&self) -> Result<WarmInit, ProcessError> {
        self.check_host(false).map_err(ProcessError::HostLacks)?;
        let Ok(init_program) = self.init_program.clone() else {
            return Err(ProcessError::HostLacks(
                "sandbox-init is missing".to_owned(),
            ));
        };
        let pooled = self
            .pool
            .ready
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop();
        let warm = match pooled {
            Some(warm) => warm,
            None => {
                let ids = Arc::clone(&self.ids);
                let program = init_program.clone();
                tokio::task::spawn_blocking(move || ids.start_warm(&program))
                    .await
                    .map_err(|e| ProcessError::HostLacks(format!("launcher task failed: {e}")))??
            }
        };
        self.refill(init_program);
        Ok(warm)
    }

    /// Tops the warm pool up to `[process] warm-pool` inits, off the
    /// caller's path.
    fn refill(&self, init_program: InitProgram) {
        use std::sync::atomic::Ordering;
        let target = self.config.warm_pool;
        if target == 0 || self.pool.refilling.swap(true, Ordering::SeqCst) {
            return;
        }
        let (pool, ids) = (Arc::clone(&self.pool), Arc::clone(&self.ids));
        tokio::task::spawn_blocking(move || {
            loop {
                let len = pool.ready.lock().unwrap_or_else(|p| p.into_inner()).len();
                if len >= target {
                    break;
                }
                match ids.start_warm(&init_program) {
                    Ok(warm) => pool
                        .ready
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(warm),
                    Err(error) => {
                        tracing::warn!(error = %harness_daemon::error_chain(&error), "cannot warm a sandbox init");
                        break;
                    }
                }
            }
            pool.refilling.store(false, Ordering::SeqCst);
        });
    }

    /// Gives an id range back.
    pub fn release(&self, slot: u32) {
        self.ids.release(slot);
    }

    /// Launches a sandbox for `session_id` from `warm` (see
    /// [`Self::acquire`]) over `workspace`.
    pub async fn launch(
        &self,
        session_id: &str,
        warm: WarmInit,
        policy: &ProcessPolicy,
        workspace: &Path,
        environment: Vec<(String, String)>,
        egress: Option<EgressPolicy>,
    ) -> Result<ProcessSandbox, ProcessError> {
        self.check_host(policy.require_landlock)
            .map_err(ProcessError::HostLacks)?;
        let (Ok(cgroups), Ok(seccomp_filter)) = (&self.cgroups, &self.seccomp_filter) else {
            return Err(ProcessError::HostLacks(
                "process backend unavailable".to_owned(),
            ));
        };
        let (binds, bind_sources) = policy_binds(&policy.binds)?;
        let plan = MountPlan::build(&RootSpec {
            system: probe_host_entries(SYSTEM_PATHS),
            etc: probe_host_entries(ETC_PATHS),
            workspace_read_only: policy.workspace_read_only,
            tmp_bytes: self.config.tmp_bytes,
            binds,
            uid: SANDBOX_UID,
        })
        .map_err(ProcessError::Plan)?;
        let spec = LaunchSpec {
            session_id: session_id.to_owned(),
            workspace: workspace.to_owned(),
            bind_sources,
            plan,
            rlimits: standard_rlimits(
                self.config.max_open_files,
                u64::from(policy.pids),
                policy.max_file_bytes,
            ),
            require_landlock: policy.require_landlock,
            seccomp_filter: Arc::clone(seccomp_filter),
            limits: CgroupLimits {
                memory_bytes: Some(policy.memory_bytes),
                pids: Some(policy.pids),
                cpu_millis: (policy.cpu_millis != 0).then_some(policy.cpu_millis),
            },
            environment: base_environment(environment),
            egress,
            start_timeout: self.config.start_timeout,
            output_grace: self.config.output_grace,
        };
        ProcessSandbox::launch(spec, cgroups, warm)
            .await
            .map_err(ProcessError::Launch)
    }
}

/// The environment every command starts with; the policy's grants come
/// after (and win over) these defaults.
fn base_environment(granted: Vec<(String, String)>) -> Vec<(String, String)> {
    let mut environment: Vec<(String, String)> = [
        (
            "PATH",
            "/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin",
        ),
        ("HOME", "/workspace"),
        ("USER", "sandbox"),
        ("LOGNAME", "sandbox"),
        ("SHELL", "/bin/sh"),
        ("LANG", "C.UTF-8"),
        ("TERM", "dumb"),
        ("TMPDIR", "/tmp"),
    ]
    .into_iter()
    .filter(|(name, _)| !granted.iter().any(|(g, _)| g == name))
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    environment.extend(granted);
    environment
}

fn policy_binds(binds: &[pb::BindMount]) -> Result<(Vec<PolicyBind>, Vec<PathBuf>), ProcessError> {
    let mut plan = Vec::new();
    let mut sources = Vec::new();
    for bind in binds {
        let host = PathBuf::from(&bind.host_path);
        if !host.is_absolute() {
            return Err(ProcessError::Bind(format!(
                "host_path {:?} must be absolute",
                bind.host_path
            )));
        }
        let meta = std::fs::symlink_metadata(&host)
            .map_err(|e| ProcessError::Bind(format!("host_path {:?}: {e}", bind.host_path)))?;
        if meta.file_type().is_symlink() {
            return Err(ProcessError::Bind(format!(
                "host_path {:?} is a symbolic link; name its target",
                bind.host_path
            )));
        }
        plan.push(PolicyBind {
            target: bind.sandbox_path.clone(),
            writable: bind.writable,
            is_dir: meta.is_dir(),
        });
        sources.push(host);
    }
    Ok((plan, sources))
}
