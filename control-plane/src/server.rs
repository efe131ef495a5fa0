//! Assembling and serving the control plane: `ControlService` with the
//! standard health and reflection services ([`harness_daemon::serve`]), on
//! every configured listener (Unix sockets and TCP alike).
//!
//! In-process use (tests, embedding):
//!
//! ```no_run
//! # async fn example(config: harness_control_plane::config::ControlPlaneConfig) -> Result<(), Box<dyn std::error::Error>> {
//! use harness_control_plane::server::{ControlPlane, Listener};
//! let plane = ControlPlane::open(&config).await?;
//! let listener = Listener::bind(&"127.0.0.1:0".parse()?).await?;
//! let address = listener.local_address().clone(); // e.g. 127.0.0.1:41234
//! let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
//! let server = tokio::spawn(plane.serve(listener, async { let _ = stopped.await; }));
//! // ... talk gRPC to `address` ...
//! let _ = stop.send(());
//! server.await??;
//! # Ok(()) }
//! ```

use std::future::Future;
use std::sync::Arc;

use harness_daemon::{DaemonServer, ListenAddress, ListenError, Listeners};
use harness_proto::control::v1::control_service_server::ControlServiceServer;
use tokio::sync::watch;

use crate::agent::{AgentCatalog, AgentError};
use crate::agent_loop::executor::HarnessTool;
use crate::agent_loop::{AgentLoop, LoopSettings};
use crate::config::ControlPlaneConfig;
use crate::event_log::EventLog;
use crate::harness_tools;
use crate::provider::factory::ProviderFactory;
use crate::sandbox::{GrpcSandbox, SandboxDispatch, SandboxError};
use crate::service::ControlPlaneService;
use crate::skill::{LoadSkillTool, SkillCatalog, SkillError};
use crate::store::{EventStore, SqliteStore, StoreError};
use crate::subagent::Delegator;
use crate::supervisor::SessionSupervisor;

pub use harness_daemon::Listener;

/// Fully-qualified name of the control-plane gRPC service.
pub const CONTROL_SERVICE_NAME: &str = "harness.control.v1.ControlService";

/// Why the control plane could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The agent definitions could not be loaded.
    #[error("cannot load agents")]
    Agents(#[source] AgentError),
    /// The skills directory holds an invalid skill.
    #[error("cannot load skills")]
    Skills(#[source] SkillError),
    /// The harness tools could not be registered.
    #[error("cannot register the harness tools")]
    HarnessTools(#[source] crate::agent_loop::executor::RegistryError),
    /// The database could not be opened.
    #[error("cannot open the session store")]
    Store(#[source] StoreError),
    /// The sandboxd endpoint is unusable.
    #[error("cannot set up the sandboxd client")]
    Sandbox(#[source] SandboxError),
    /// Resuming sessions left running by a previous process failed.
    #[error("cannot resume sessions interrupted by a restart")]
    Recover(#[source] StoreError),
    /// A listen address could not be bound (or is refused by policy).
    #[error("cannot listen")]
    Listen(#[source] ListenError),
    /// The server failed.
    #[error("the gRPC server failed")]
    Serve(#[source] harness_daemon::ServeError),
}

/// The parts a control plane is assembled from.
#[derive(Debug)]
pub struct ControlPlaneParts {
    /// Session and event storage.
    pub store: Arc<dyn EventStore>,
    /// Where tool calls run.
    pub sandbox: Arc<dyn SandboxDispatch>,
    /// The agents it can run.
    pub agents: AgentCatalog,
    /// Tool timeout and parallelism.
    pub settings: LoopSettings,
}

/// A ready-to-serve control plane.
#[derive(Debug)]
pub struct ControlPlane {
    service: ControlPlaneService,
    shutdown: watch::Sender<bool>,
}

impl ControlPlane {
    /// Loads agents (and their model providers), opens the database, sets up
    /// a lazy sandboxd client and resumes sessions a previous process left
    /// unfinished.
    pub async fn open(config: &ControlPlaneConfig) -> Result<Self, ServerError> {
        let mut providers = ProviderFactory::new(config.providers.clone(), config.prices.clone())
            .with_models(config.models.clone());
        let skills_dir = config.skills_dir();
        let skills = SkillCatalog::load_dir(&skills_dir).map_err(ServerError::Skills)?;
        let agents = AgentCatalog::load_dir_with_skills(
            &config.agents_dir,
            Arc::new(skills),
            &mut providers,
        )
        .map_err(ServerError::Agents)?;
        tracing::info!(
            agents = agents.len(),
            skills = agents.skills().len(),
            skills_dir = %skills_dir.display(),
            dir = %config.agents_dir.display(),
            endpoints = ?providers.endpoints(),
            "agents loaded"
        );
        let options = crate::store::SqliteOptions {
            synchronous: config.sqlite_synchronous,
            max_wal_bytes: config.sqlite_max_wal_bytes,
        };
        let store = SqliteStore::open_with(&config.database, options)
            .await
            .map_err(ServerError::Store)?;
        let sandbox = GrpcSandbox::connect_lazy(&config.sandboxd).map_err(ServerError::Sandbox)?;
        Self::from_parts(ControlPlaneParts {
            store: Arc::new(store),
            sandbox: Arc::new(sandbox),
            agents,
            settings: LoopSettings {
                max_subagent_depth: config.max_subagent_depth,
                context: config.context.clone(),
                ..LoopSettings::new(config.tool_timeout, config.max_parallel_tool_calls)
            },
        })
        .await
    }

    /// Assembles a control plane from parts (e.g. a fake sandbox in tests)
    /// and resumes the store's unfinished sessions.
    pub async fn from_parts(parts: ControlPlaneParts) -> Result<Self, ServerError> {
        let (shutdown, shutdown_signal) = watch::channel(false);
        let log = EventLog::new(parts.store, shutdown_signal);
        let agents = Arc::new(parts.agents);
        let delegator =
            Delegator::new(log.clone(), Arc::clone(&parts.sandbox), Arc::clone(&agents));
        let mut harness_tools = harness_tools::standard().map_err(ServerError::HarnessTools)?;
        let load_skill = agents.uses_skills().then(|| {
            Arc::new(LoadSkillTool::new(Arc::clone(agents.skills()))) as Arc<dyn HarnessTool>
        });
        for tool in delegator
            .tools()
            .into_iter()
            .chain(crate::handoff::tools(&agents))
            .chain(load_skill)
        {
            harness_tools
                .register(tool)
                .map_err(ServerError::HarnessTools)?;
        }
        let agent_loop = Arc::new(AgentLoop::with_harness_tools(
            log.clone(),
            parts.sandbox,
            parts.settings,
            harness_tools,
        ));
        let supervisor = Arc::new(SessionSupervisor::new(agent_loop));
        delegator.set_launcher(&supervisor);
        let resumed = supervisor
            .resume_unfinished(&agents)
            .await
            .map_err(ServerError::Recover)?;
        if resumed > 0 {
            tracing::info!(
                sessions = resumed,
                "resumed sessions interrupted by a restart"
            );
        }
        let service = ControlPlaneService::new(agents, log, supervisor);
        Ok(Self { service, shutdown })
    }

    /// The `ControlService` implementation, to mount on another server.
    pub fn service(&self) -> ControlPlaneService {
        self.service.clone()
    }

    /// Serves on `listeners` until `shutdown` resolves. Then health turns
    /// NOT_SERVING, open `StreamEvents` streams end with UNAVAILABLE (clients
    /// resume with `after_seq`), and in-flight calls drain.
    pub async fn serve<F>(
        self,
        listeners: impl Into<Listeners>,
        shutdown: F,
    ) -> Result<(), ServerError>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let stop_followers = self.shutdown;
        DaemonServer::new()
            .describe(harness_proto::FILE_DESCRIPTOR_SET)
            .add_service(ControlServiceServer::new(self.service))
            .on_shutdown(move || {
                stop_followers.send_replace(true);
            })
            .serve(listeners, shutdown)
            .await
            .map_err(ServerError::Serve)
    }
}

/// Binds every address of `config.listen`, under `config.insecure-listen`.
pub async fn bind(config: &ControlPlaneConfig) -> Result<Listeners, ServerError> {
    Listeners::bind_all(&config.listen, config.exposure())
        .await
        .map_err(ServerError::Listen)
}

/// Opens the control plane described by `config`, binds its listen
/// addresses, hands them to `listening` (the binary announces them) and
/// serves until `shutdown` resolves. What the `serve` subcommand runs.
pub async fn run<F>(
    config: &ControlPlaneConfig,
    shutdown: F,
    listening: impl FnOnce(&[ListenAddress]),
) -> Result<(), ServerError>
where
    F: Future<Output = ()> + Send + 'static,
{
    // Refuse a listener the policy forbids before opening anything.
    harness_daemon::listener::check_exposures(&config.listen, config.exposure())
        .map_err(ServerError::Listen)?;
    disable_transparent_huge_pages();
    let plane = ControlPlane::open(config).await?;
    let listeners = bind(config).await?;
    let addresses = listeners.addresses();
    for address in &addresses {
        tracing::info!(%address, "control plane listening");
    }
    listening(&addresses);
    plane.serve(listeners, shutdown).await
}

/// Turns transparent huge pages off for this process (and what it starts).
///
/// A fault on a huge page zeroes 2 MiB and may first compact memory; under
/// load that stalled every thread of the control plane for 5–20 ms now and
/// then, and each stall shows up in the step latency of every session it
/// catches (docs/BENCHMARKS.md, control-plane (b): median p99 of 14 runs
/// 10.4 ms with huge pages, 5.8 ms without). Latency-sensitive servers
/// commonly do the same. A failure is logged; the control plane runs either
/// way.
pub fn disable_transparent_huge_pages() {
    match nix::sys::prctl::set_thp_disable(true) {
        Ok(()) => tracing::debug!("transparent huge pages disabled for this process"),
        Err(error) => {
            tracing::warn!(%error, "could not disable transparent huge pages; expect latency spikes under memory growth");
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn huge_pages_are_turned_off_for_the_process() {
        // Process-wide, and harmless for the other tests of this binary.
        disable_transparent_huge_pages();
        assert!(nix::sys::prctl::get_thp_disable().unwrap());
    }
}
