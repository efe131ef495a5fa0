//! Serving: the sandbox service, with the standard gRPC health and
//! reflection services ([`harness_daemon::serve`]), on every configured
//! listener until a shutdown signal; then every session is destroyed.

use std::sync::Arc;

use harness_daemon::{DaemonServer, ListenError, Listeners};
use harness_proto::sandbox::v1::sandbox_service_server::SandboxServiceServer;

use crate::config::SandboxdConfig;
use crate::service::{SandboxApi, Sandboxd};

pub use harness_daemon::Listener;

/// Errors binding or serving.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A listen address could not be bound (or is refused by policy).
    #[error("cannot listen")]
    Listen(#[source] ListenError),
    /// The server failed.
    #[error("cannot serve gRPC")]
    Serve(#[source] harness_daemon::ServeError),
}

/// Binds every address of `config.listen`, under `config.insecure-listen`.
pub async fn bind(config: &SandboxdConfig) -> Result<Listeners, ServeError> {
    Listeners::bind_all(&config.listen, config.exposure())
        .await
        .map_err(ServeError::Listen)
}

/// Serves `daemon` on `listeners` until `shutdown` resolves, then destroys
/// every session.
pub async fn serve(
    daemon: Arc<Sandboxd>,
    listeners: impl Into<Listeners>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let (stop_housekeeping, housekeeping_stopped) = tokio::sync::oneshot::channel::<()>();
    let housekeeping = tokio::spawn(Arc::clone(&daemon).run_housekeeping(async {
        let _ = housekeeping_stopped.await;
    }));

    let result = DaemonServer::new()
        .describe(harness_proto::FILE_DESCRIPTOR_SET)
        .add_service(SandboxServiceServer::new(SandboxApi::new(Arc::clone(
            &daemon,
        ))))
        .serve(listeners, shutdown)
        .await;
    let _ = stop_housekeeping.send(());
    let _ = housekeeping.await;
    let reports = daemon.sessions.destroy_all("shutdown").await;
    tracing::info!(
        sessions = reports.len(),
        "destroyed remaining sessions at shutdown"
    );
    result.map_err(ServeError::Serve)
}
