//! The client side of [`crate::address`]: a gRPC channel to `unix:<path>` or
//! `http://host:port`, shared so every client (the control plane's sandboxd
//! client, the CLI, tests) connects the same way.

use std::path::PathBuf;

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint};

use crate::address::{AddressError, UNIX_PREFIX};

/// A channel to `endpoint` (`unix:<path>` or `http://host:port`) that
/// connects on first use and reconnects after failures, so the peer may start
/// later than we do. TCP channels set `TCP_NODELAY`.
pub fn connect_lazy(endpoint: &str) -> Result<Channel, AddressError> {
    if let Some(path) = endpoint.strip_prefix(UNIX_PREFIX) {
        if path.is_empty() {
            return Err(AddressError::EmptyUnixPath(endpoint.to_owned()));
        }
        let path = PathBuf::from(path);
        // The URI is required by tonic but unused: the connector decides where to go.
        let channel = Endpoint::from_static("http://[::]:50051").connect_with_connector_lazy(
            tower::service_fn(move |_| {
                let path = path.clone();
                async move {
                    let stream = tokio::net::UnixStream::connect(path).await?;
                    Ok::<_, std::io::Error>(TokioIo::new(stream))
                }
            }),
        );
        return Ok(channel);
    }
    let tcp =
        Endpoint::from_shared(endpoint.to_owned()).map_err(|source| AddressError::BadEndpoint {
            endpoint: endpoint.to_owned(),
            source,
        })?;
    Ok(tcp.tcp_nodelay(true).connect_lazy())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[tokio::test]
    async fn endpoints_are_accepted_without_a_running_server() {
        connect_lazy("unix:/nonexistent/socket").unwrap();
        connect_lazy("http://127.0.0.1:1").unwrap();
        assert!(matches!(
            connect_lazy("not a uri"),
            Err(AddressError::BadEndpoint { .. })
        ));
        assert!(matches!(
            connect_lazy("unix:"),
            Err(AddressError::EmptyUnixPath(_))
        ));
    }
}
