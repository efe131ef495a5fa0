//! Assembling and serving the control plane: the gRPC server with
//! `ControlService`, health and reflection, on a Unix socket or TCP.
//!
//! In-process use (tests, embedding):
//!
//! ```no_run
//! # async fn example(config: harness_control_plane::config::ControlPlaneConfig) -> Result<(), Box<dyn std::error::Error>> {
//! use harness_control_plane::server::{ControlPlane, Listener};
//! let plane = ControlPlane::open(&config).await?;
//! let listener = Listener::bind(&"127.0.0.1:0".parse()?).await?;
//! let address = listener.local_address()?; // e.g. 127.0.0.1:41234
//! let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
//! let server = tokio::spawn(plane.serve(listener, async { let _ = stopped.await; }));
//! // ... talk gRPC to `address` ...
//! let _ = stop.send(());
//! server.await??;
//! # Ok(()) }
//! ```

use std::future::Future;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use harness_proto::control::v1::control_service_server::ControlServiceServer;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::Server;
use tonic::transport::server::{Router, TcpIncoming};
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::agent::{AgentCatalog, AgentError};
use crate::agent_loop::{AgentLoop, LoopSettings};
use crate::config::ControlPlaneConfig;
use crate::event_log::EventLog;
use crate::provider::factory::ProviderFactory;
use crate::sandbox::{GrpcSandbox, SandboxDispatch, SandboxError};
use crate::service::ControlPlaneService;
use crate::store::{EventStore, SqliteStore, StoreError};
use crate::supervisor::SessionSupervisor;
use crate::transport::{AddressError, ListenAddress};

/// Fully-qualified name of the control-plane gRPC service.
pub const CONTROL_SERVICE_NAME: &str = "harness.control.v1.ControlService";

/// Why the control plane could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The agent definitions could not be loaded.
    #[error("cannot load agents")]
    Agents(#[source] AgentError),
    /// The database could not be opened.
    #[error("cannot open the session store")]
    Store(#[source] StoreError),
    /// The sandboxd endpoint is unusable.
    #[error("cannot set up the sandboxd client")]
    Sandbox(#[source] SandboxError),
    /// Resuming sessions left running by a previous process failed.
    #[error("cannot resume sessions interrupted by a restart")]
    Recover(#[source] StoreError),
    /// The listen address is unusable.
    #[error("bad listen address")]
    Address(#[source] AddressError),
    /// A non-socket file is in the way of the Unix socket.
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    /// The old socket file or the socket's directory could not be prepared.
    #[error("cannot prepare socket path {path}")]
    PrepareSocket {
        /// The socket path.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Binding the listener failed.
    #[error("cannot listen on {address}")]
    Bind {
        /// The address.
        address: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The reflection service could not be built from the descriptors.
    #[error("cannot build the reflection service")]
    Reflection(#[source] tonic_reflection::server::Error),
    /// The server failed while running.
    #[error("the gRPC server failed")]
    Serve(#[source] tonic::transport::Error),
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
        let mut providers = ProviderFactory::new(config.providers.clone(), config.prices.clone());
        let agents = AgentCatalog::load_dir(&config.agents_dir, &mut providers)
            .map_err(ServerError::Agents)?;
        tracing::info!(
            agents = agents.len(),
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
            settings: LoopSettings::new(config.tool_timeout, config.max_parallel_tool_calls),
        })
        .await
    }

    /// Assembles a control plane from parts (e.g. a fake sandbox in tests)
    /// and resumes the store's unfinished sessions.
    pub async fn from_parts(parts: ControlPlaneParts) -> Result<Self, ServerError> {
        let (shutdown, shutdown_signal) = watch::channel(false);
        let log = EventLog::new(parts.store, shutdown_signal);
        let agent_loop = Arc::new(AgentLoop::new(log.clone(), parts.sandbox, parts.settings));
        let supervisor = Arc::new(SessionSupervisor::new(agent_loop));
        let resumed = supervisor
            .resume_unfinished(&parts.agents)
            .await
            .map_err(ServerError::Recover)?;
        if resumed > 0 {
            tracing::info!(
                sessions = resumed,
                "resumed sessions interrupted by a restart"
            );
        }
        let service = ControlPlaneService::new(Arc::new(parts.agents), log, supervisor);
        Ok(Self { service, shutdown })
    }

    /// The `ControlService` implementation, to mount on another server.
    pub fn service(&self) -> ControlPlaneService {
        self.service.clone()
    }

    /// Serves until `shutdown` resolves. Then health turns NOT_SERVING, open
    /// `StreamEvents` streams end with UNAVAILABLE (clients resume with
    /// `after_seq`), and in-flight calls drain.
    pub async fn serve<F>(self, listener: Listener, shutdown: F) -> Result<(), ServerError>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let (health, health_service) = tonic_health::server::health_reporter();
        health
            .set_service_status(CONTROL_SERVICE_NAME, ServingStatus::Serving)
            .await;
        let router = self.router(health_service)?;
        let stop_followers = self.shutdown;
        let signal = announce_shutdown(shutdown, health, stop_followers);
        match listener {
            Listener::Tcp(listener) => {
                tracing::info!(address = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), "control plane listening on TCP");
                let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
                router
                    .serve_with_incoming_shutdown(incoming, signal)
                    .await
                    .map_err(ServerError::Serve)
            }
            Listener::Unix { listener, path } => {
                tracing::info!(path = %path.display(), "control plane listening on a Unix socket");
                let incoming = UnixListenerStream::new(listener);
                let served = router
                    .serve_with_incoming_shutdown(incoming, signal)
                    .await
                    .map_err(ServerError::Serve);
                if let Err(error) = std::fs::remove_file(&path) {
                    tracing::warn!(path = %path.display(), %error, "could not remove the socket file");
                }
                served
            }
        }
    }

    fn router(
        &self,
        health_service: tonic_health::pb::health_server::HealthServer<
            impl tonic_health::pb::health_server::Health,
        >,
    ) -> Result<Router, ServerError> {
        let reflection_v1 = reflection_builder()
            .with_service_name("grpc.reflection.v1.ServerReflection")
            .build_v1()
            .map_err(ServerError::Reflection)?;
        let reflection_v1alpha = reflection_builder()
            .with_service_name("grpc.reflection.v1alpha.ServerReflection")
            .build_v1alpha()
            .map_err(ServerError::Reflection)?;
        Ok(Server::builder()
            .add_service(ControlServiceServer::new(self.service.clone()))
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha))
    }
}

/// Reflection over our contracts and health; only the services this server
/// actually serves are advertised (the descriptor set also holds sandboxd's).
fn reflection_builder() -> tonic_reflection::server::Builder<'static> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(harness_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .with_service_name(CONTROL_SERVICE_NAME)
        .with_service_name("grpc.health.v1.Health")
}

async fn announce_shutdown<F>(shutdown: F, health: HealthReporter, followers: watch::Sender<bool>)
where
    F: Future<Output = ()>,
{
    shutdown.await;
    tracing::info!("shutting down");
    health
        .set_service_status("", ServingStatus::NotServing)
        .await;
    health
        .set_service_status(CONTROL_SERVICE_NAME, ServingStatus::NotServing)
        .await;
    followers.send_replace(true);
}

/// A bound listening socket.
#[derive(Debug)]
pub enum Listener {
    /// TCP.
    Tcp(TcpListener),
    /// A Unix socket and its path (removed when serving stops).
    Unix {
        /// The listener.
        listener: UnixListener,
        /// The socket file.
        path: PathBuf,
    },
}

impl Listener {
    /// Binds `address`. For a Unix socket, a stale socket file left by an
    /// earlier process is removed first and the directory is created.
    pub async fn bind(address: &ListenAddress) -> Result<Self, ServerError> {
        let bind_error = |source| ServerError::Bind {
            address: address.to_string(),
            source,
        };
        match address {
            ListenAddress::Tcp(socket_address) => TcpListener::bind(socket_address)
                .await
                .map(Self::Tcp)
                .map_err(bind_error),
            ListenAddress::Unix(path) => {
                prepare_socket_path(path)?;
                let listener = UnixListener::bind(path).map_err(bind_error)?;
                Ok(Self::Unix {
                    listener,
                    path: path.clone(),
                })
            }
        }
    }

    /// The address actually bound (with the real port when asked for port 0).
    pub fn local_address(&self) -> Result<ListenAddress, ServerError> {
        match self {
            Self::Tcp(listener) => {
                listener
                    .local_addr()
                    .map(ListenAddress::Tcp)
                    .map_err(|source| ServerError::Bind {
                        address: "tcp listener".to_owned(),
                        source,
                    })
            }
            Self::Unix { path, .. } => Ok(ListenAddress::Unix(path.clone())),
        }
    }
}

fn prepare_socket_path(path: &Path) -> Result<(), ServerError> {
    let prepare_error = |source| ServerError::PrepareSocket {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(prepare_error)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(metadata) if metadata.file_type().is_socket() => {
            std::fs::remove_file(path).map_err(prepare_error)
        }
        Ok(_) => Err(ServerError::NotASocket(path.to_owned())),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(error) => Err(prepare_error(error)),
    }
}

/// Opens the control plane described by `config`, binds its listen address
/// and serves until `shutdown` resolves. What the `serve` subcommand runs.
pub async fn run<F>(config: &ControlPlaneConfig, shutdown: F) -> Result<(), ServerError>
where
    F: Future<Output = ()> + Send + 'static,
{
    disable_transparent_huge_pages();
    let address: ListenAddress = config.listen.parse().map_err(ServerError::Address)?;
    let plane = ControlPlane::open(config).await?;
    let listener = Listener::bind(&address).await?;
    plane.serve(listener, shutdown).await
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

    #[tokio::test]
    async fn a_stale_socket_is_replaced_but_a_regular_file_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("run/cp.sock");
        let address = ListenAddress::Unix(socket.clone());
        drop(Listener::bind(&address).await.unwrap());
        assert!(
            socket.exists(),
            "dropping a listener leaves the file behind"
        );
        Listener::bind(&address)
            .await
            .expect("stale socket replaced");

        let file = dir.path().join("not-a-socket");
        std::fs::write(&file, "data").unwrap();
        let error = Listener::bind(&ListenAddress::Unix(file.clone()))
            .await
            .unwrap_err();
        assert!(matches!(error, ServerError::NotASocket(path) if path == file));
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "data");
    }
}
