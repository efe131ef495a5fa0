//! Listen addresses: where a daemon listens, as given on the command line
//! or in a config file, and the endpoint a client dials to reach it.
//!
//! Two forms: `unix:/path/to.sock` for a Unix socket (its file permissions
//! decide who may call), and `ip:port` for TCP (`127.0.0.1:7071`,
//! `[::1]:7071`; port 0 picks a free port).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;

/// Prefix of Unix socket addresses and endpoints, e.g.
/// `unix:/run/harness/sandboxd.sock`.
pub const UNIX_PREFIX: &str = "unix:";

/// Where a server listens.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ListenAddress {
    /// A Unix socket path.
    Unix(PathBuf),
    /// A TCP address, e.g. `127.0.0.1:7071` (port 0 picks a free port).
    Tcp(SocketAddr),
}

/// An address or endpoint string that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum AddressError {
    /// A `unix:` address without a path.
    #[error("\"{0}\": a unix: address needs a path, e.g. unix:/run/harness/sandboxd.sock")]
    EmptyUnixPath(String),
    /// Neither `unix:<path>` nor `ip:port`.
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

impl ListenAddress {
    /// The endpoint a client of this crate ([`crate::client::connect_lazy`])
    /// dials: `unix:<path>` or `http://<ip>:<port>`.
    pub fn endpoint(&self) -> String {
        match self {
            Self::Unix(path) => format!("{UNIX_PREFIX}{}", path.display()),
            Self::Tcp(address) => format!("http://{address}"),
        }
    }

    /// True for a TCP address other hosts may reach: anything but a
    /// loopback address. A Unix socket is never remote.
    pub fn is_remote_tcp(&self) -> bool {
        matches!(self, Self::Tcp(address) if !address.ip().is_loopback())
    }
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

impl<'de> serde::Deserialize<'de> for ListenAddress {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn listen_addresses_parse_and_print_back() {
        for text in ["unix:/run/x.sock", "127.0.0.1:7070", "[::1]:0", "0.0.0.0:1"] {
            let address: ListenAddress = text.parse().unwrap();
            assert_eq!(address.to_string(), text);
        }
        assert_eq!(
            "unix:/run/x.sock".parse::<ListenAddress>().unwrap(),
            ListenAddress::Unix(PathBuf::from("/run/x.sock"))
        );
        assert_eq!(
            "127.0.0.1:7070".parse::<ListenAddress>().unwrap(),
            ListenAddress::Tcp(SocketAddr::from(([127, 0, 0, 1], 7070)))
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

    #[test]
    fn endpoints_are_what_clients_dial() {
        let endpoints: Vec<String> = ["unix:/run/x.sock", "127.0.0.1:7070", "[::1]:9"]
            .iter()
            .map(|text| text.parse::<ListenAddress>().unwrap().endpoint())
            .collect();
        assert_eq!(
            endpoints,
            [
                "unix:/run/x.sock",
                "http://127.0.0.1:7070",
                "http://[::1]:9"
            ]
        );
    }

    #[test]
    fn only_tcp_off_loopback_is_remote() {
        let remote: Vec<bool> = [
            "unix:/run/x.sock",
            "127.0.0.1:1",
            "127.1.2.3:1",
            "[::1]:1",
            "0.0.0.0:1",
            "10.0.0.5:1",
            "[::]:1",
        ]
        .iter()
        .map(|text| text.parse::<ListenAddress>().unwrap().is_remote_tcp())
        .collect();
        assert_eq!(remote, [false, false, false, false, true, true, true]);
    }
}
