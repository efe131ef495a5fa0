//! Serving: the sandbox service plus the standard gRPC health and reflection
//! services, on a Unix socket or TCP, until a shutdown signal.

use std::path::PathBuf;
use std::sync::Arc;

use harness_proto::sandbox::v1::sandbox_service_server::SandboxServiceServer;
use tokio::net::{TcpListener, UnixListener};
use tonic::transport::Server;

use crate::service::{SandboxApi, Sandboxd};

/// Errors binding or serving.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The listen address is neither `unix:/path` nor `host:port`.
    #[error("listen address {0:?} is neither unix:/path nor host:port")]
    BadAddress(String),
    /// Binding failed.
    #[error("cannot listen on {address}")]
    Bind {
        /// The address.
        address: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Reflection could not be built from the descriptors.
    #[error("cannot build the reflection service")]
    Reflection(#[source] tonic_reflection::server::Error),
    /// The server failed.
    #[error("gRPC server failed")]
    Transport(#[source] tonic::transport::Error),
}

/// A bound listener.
#[derive(Debug)]
pub enum Listener {
    /// A Unix socket (the file is removed on drop of the server).
    Unix(UnixListener, PathBuf),
    /// A TCP listener.
    Tcp(TcpListener),
}

impl Listener {
    /// Binds `unix:/path` (replacing a stale socket file, mode 0660) or
    /// `host:port`.
    pub async fn bind(address: &str) -> Result<Self, ServeError> {
        let bind_error = |source| ServeError::Bind {
            address: address.to_owned(),
            source,
        };
        if let Some(path) = address.strip_prefix("unix:") {
            let path = PathBuf::from(path);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(bind_error)?;
            }
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(bind_error(e)),
            }
            let listener = UnixListener::bind(&path).map_err(bind_error)?;
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o660))
                .map_err(bind_error)?;
            return Ok(Self::Unix(listener, path));
        }
        if !address.contains(':') {
            return Err(ServeError::BadAddress(address.to_owned()));
        }
        Ok(Self::Tcp(
            TcpListener::bind(address).await.map_err(bind_error)?,
        ))
    }

    /// What to tell clients: `unix:/path` or `http://ip:port`.
    pub fn endpoint(&self) -> String {
        match self {
            Self::Unix(_, path) => format!("unix:{}", path.display()),
            Self::Tcp(listener) => listener
                .local_addr()
                .map(|a| format!("http://{a}"))
                .unwrap_or_else(|_| "http://unknown".to_owned()),
        }
    }
}

/// Serves `daemon` on `listener` until `shutdown` resolves, then destroys
/// every session.
pub async fn serve(
    daemon: Arc<Sandboxd>,
    listener: Listener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<SandboxServiceServer<SandboxApi>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(harness_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(ServeError::Reflection)?;
    let reflection_alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(harness_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .map_err(ServeError::Reflection)?;

    let (stop_housekeeping, housekeeping_stopped) = tokio::sync::oneshot::channel::<()>();
    let housekeeping = tokio::spawn(Arc::clone(&daemon).run_housekeeping(async {
        let _ = housekeeping_stopped.await;
    }));

    let router = Server::builder()
        .tcp_nodelay(true)
        .add_service(health_service)
        .add_service(reflection)
        .add_service(reflection_alpha)
        .add_service(SandboxServiceServer::new(SandboxApi::new(Arc::clone(
            &daemon,
        ))));
    let result = match listener {
        Listener::Unix(listener, path) => {
            let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
            let result = router
                .serve_with_incoming_shutdown(incoming, shutdown)
                .await;
            let _ = std::fs::remove_file(path);
            result
        }
        Listener::Tcp(listener) => {
            let incoming =
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
            router
                .serve_with_incoming_shutdown(incoming, shutdown)
                .await
        }
    };
    let _ = stop_housekeeping.send(());
    let _ = housekeeping.await;
    let reports = daemon.sessions.destroy_all("shutdown").await;
    tracing::info!(
        sessions = reports.len(),
        "destroyed remaining sessions at shutdown"
    );
    result.map_err(ServeError::Transport)
}
