//! Addresses and gRPC channels: where the control plane listens and how it
//! (and its CLI) reach a gRPC server over a Unix socket or TCP.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint};

/// Prefix of Unix socket addresses, e.g. `unix:/run/harness/control-plane.sock`.
pub const UNIX_PREFIX: &str = "unix:";

/// Where a server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddress {
    /// A Unix socket path.
    Unix(PathBuf),
    /// A TCP address, e.g. `127.0.0.1:7070` (port 0 picks a free port).
    Tcp(SocketAddr),
}

/// An address or endpoint string that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum AddressError {
    /// A `unix:` address without a path.
    #[error("\"{0}\": a unix: address needs a path, e.g. unix:/run/harness/control-plane.sock")]
    EmptyUnixPath(String),
    /// Neither `unix:<path>` nor `host:port`.
    #[error("\"{0}\" is not a listen address: use unix:<path> or <ip>:<port>")]
    BadListenAddress(String),
    /// Neither `unix:<path>` nor an `http(s)://` URI.
    #[error("\"{endpoint}\" is not an endpoint: use unix:<path> or http://<host>:<port>")]
    BadEndpoint {
        /// The endpoint as given.
        endpoint: String,
        /// Why tonic rejected it.
        #[source]
        source: tonic::transport::Error,
    },
}

impl FromStr for ListenAddress {
    type Err = AddressError;

    fn from_str(address: &str) -> Result<Self, Self::Err> {
        if let Some(path) = address.strip_prefix(UNIX_PREFIX) {
            if path.is_empty() {
                return Err(AddressError::EmptyUnixPath(address.to_owned()));
            }
            return Ok(Self::Unix(PathBuf::from(path)));
        }
        address
            .parse()
            .map(Self::Tcp)
            .map_err(|_| AddressError::BadListenAddress(address.to_owned()))
    }
}

impl std::fmt::Display for ListenAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unix(path) => write!(f, "{UNIX_PREFIX}{}", path.display()),
            Self::Tcp(address) => write!(f, "{address}"),
        }
    }
}

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

    #[test]
    fn listen_addresses_parse_and_print_back() {
        for text in ["unix:/run/x.sock", "127.0.0.1:7070", "[::1]:0"] {
            let address: ListenAddress = text.parse().unwrap();
            assert_eq!(address.to_string(), text);
        }
        assert_eq!(
            "unix:/run/x.sock".parse::<ListenAddress>().unwrap(),
            ListenAddress::Unix(PathBuf::from("/run/x.sock"))
        );
    }

    #[test]
    fn bad_listen_addresses_name_the_accepted_forms() {
        assert_eq!(
            "localhost"
                .parse::<ListenAddress>()
                .unwrap_err()
                .to_string(),
            "\"localhost\" is not a listen address: use unix:<path> or <ip>:<port>"
        );
        assert!(matches!(
            "unix:".parse::<ListenAddress>(),
            Err(AddressError::EmptyUnixPath(_))
        ));
    }

    #[tokio::test]
    async fn endpoints_are_accepted_without_a_running_server() {
        connect_lazy("unix:/nonexistent/socket").unwrap();
        connect_lazy("http://127.0.0.1:1").unwrap();
        assert!(matches!(
            connect_lazy("not a uri"),
            Err(AddressError::BadEndpoint { .. })
        ));
    }
}
