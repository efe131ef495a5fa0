//! Binding listeners, with two policies applied in one place.
//!
//! - The socket-file policy, for `unix:` addresses: the socket's directory
//!   is created; a socket file left by a process that is gone is replaced;
//!   a socket someone still listens on, or any file that is not a socket,
//!   is refused with an error naming it. The socket is made mode 0660 (its
//!   owner and group may call the daemon), and removed when serving stops if
//!   it is still ours.
//! - The exposure policy, for TCP: neither daemon authenticates its callers
//!   yet, so a TCP listener other hosts can reach is refused unless the
//!   operator says [`Exposure::AllowRemote`] (`--insecure-listen`). Loopback
//!   TCP is first-class: it is how stock gRPC clients whose Unix-socket
//!   support is broken (grpcio sends the path as `:authority`) reach a daemon.

use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tokio::net::{TcpListener, UnixListener};

use crate::address::ListenAddress;

/// Mode of a daemon's Unix socket: read-write for its owner and group.
pub const SOCKET_MODE: u32 = 0o660;

/// Whether a TCP listener may bind an address other hosts can reach.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Exposure {
    /// Only loopback TCP (and Unix sockets): the default.
    #[default]
    LoopbackOnly,
    /// Any address. Anyone who can reach the port can call the daemon.
    AllowRemote,
}

/// Why a listener could not be bound.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    /// A TCP address off loopback without [`Exposure::AllowRemote`].
    #[error(
        "refusing to listen on {0}: callers are not authenticated, so anyone who can reach this \
         address could call the daemon; listen on a loopback address (127.0.0.1 or [::1]) or a \
         unix: socket, or pass --insecure-listen (config: insecure-listen = true) if a network \
         boundary you control guards the port"
    )]
    RemoteTcpRefused(SocketAddr),
    /// A file that is not a socket is where the socket should be.
    #[error(
        "{0} exists and is not a socket; refusing to replace it (remove it or listen elsewhere)"
    )]
    NotASocket(PathBuf),
    /// Another process still listens on the socket.
    #[error("{0}: another server is listening on this socket; stop it or listen elsewhere")]
    SocketInUse(PathBuf),
    /// The socket's directory or the stale socket could not be handled.
    #[error("cannot prepare socket path {path}")]
    PrepareSocket {
        /// The socket path.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Binding (or reading back the bound address) failed.
    #[error("cannot listen on {address}")]
    Bind {
        /// The address.
        address: ListenAddress,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// Applies the exposure policy: `Ok` if `address` may be bound under
/// `exposure`. Pure.
pub fn check_exposure(address: &ListenAddress, exposure: Exposure) -> Result<(), ListenError> {
    match address {
        ListenAddress::Tcp(socket)
            if address.is_remote_tcp() && exposure == Exposure::LoopbackOnly =>
        {
            Err(ListenError::RemoteTcpRefused(*socket))
        }
        _ => Ok(()),
    }
}

/// Applies the exposure policy to every address, so a daemon can refuse a
/// bad listen list before it does anything else.
pub fn check_exposures(addresses: &[ListenAddress], exposure: Exposure) -> Result<(), ListenError> {
    addresses
        .iter()
        .try_for_each(|address| check_exposure(address, exposure))
}

/// A bound listening socket.
#[derive(Debug)]
pub struct Listener {
    socket: Socket,
    /// The address actually bound (the real port when asked for port 0).
    address: ListenAddress,
}

#[derive(Debug)]
pub(crate) enum Socket {
    Tcp(TcpListener),
    Unix(UnixListener, SocketFile),
}

impl Listener {
    /// Binds `address` under [`Exposure::LoopbackOnly`].
    pub async fn bind(address: &ListenAddress) -> Result<Self, ListenError> {
        Self::bind_with(address, Exposure::LoopbackOnly).await
    }

    /// Binds `address`, applying the socket-file and exposure policies.
    pub async fn bind_with(
        address: &ListenAddress,
        exposure: Exposure,
    ) -> Result<Self, ListenError> {
        check_exposure(address, exposure)?;
        let bind_error = |source| ListenError::Bind {
            address: address.clone(),
            source,
        };
        match address {
            ListenAddress::Tcp(socket_address) => {
                let listener = TcpListener::bind(socket_address)
                    .await
                    .map_err(bind_error)?;
                let bound = listener.local_addr().map_err(bind_error)?;
                if address.is_remote_tcp() {
                    tracing::warn!(address = %bound, "listening on TCP off loopback without authentication (insecure-listen): anyone who can reach this address can call the daemon");
                }
                Ok(Self {
                    socket: Socket::Tcp(listener),
                    address: ListenAddress::Tcp(bound),
                })
            }
            ListenAddress::Unix(path) => {
                prepare_socket_path(path)?;
                let listener = UnixListener::bind(path).map_err(bind_error)?;
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(SOCKET_MODE))
                    .map_err(bind_error)?;
                let file = SocketFile::of(path).map_err(bind_error)?;
                Ok(Self {
                    socket: Socket::Unix(listener, file),
                    address: address.clone(),
                })
            }
        }
    }

    /// The address bound: with the real port when asked for port 0.
    pub fn local_address(&self) -> &ListenAddress {
        &self.address
    }

    /// What a client dials to reach this listener: `unix:<path>` or
    /// `http://<ip>:<port>`.
    pub fn endpoint(&self) -> String {
        self.address.endpoint()
    }

    pub(crate) fn into_socket(self) -> Socket {
        self.socket
    }
}

/// The listeners one server serves, all with the same services.
#[derive(Debug, Default)]
pub struct Listeners(Vec<Listener>);

impl Listeners {
    /// Binds every address (see [`Listener::bind_with`]); the first failure
    /// stops it, and what was bound so far is closed.
    pub async fn bind_all(
        addresses: &[ListenAddress],
        exposure: Exposure,
    ) -> Result<Self, ListenError> {
        // Refuse a bad exposure before binding anything.
        check_exposures(addresses, exposure)?;
        let mut listeners = Vec::with_capacity(addresses.len());
        for address in addresses {
            listeners.push(Listener::bind_with(address, exposure).await?);
        }
        Ok(Self(listeners))
    }

    /// The addresses bound, in order.
    pub fn addresses(&self) -> Vec<ListenAddress> {
        self.0.iter().map(|l| l.local_address().clone()).collect()
    }

    /// True when there is nothing to serve on.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub(crate) fn into_vec(self) -> Vec<Listener> {
        self.0
    }
}

impl From<Listener> for Listeners {
    fn from(listener: Listener) -> Self {
        Self(vec![listener])
    }
}

impl From<Vec<Listener>> for Listeners {
    fn from(listeners: Vec<Listener>) -> Self {
        Self(listeners)
    }
}

/// A socket file we created, identified by device, inode and change time
/// so that we never remove a socket another process put at the same path
/// later (even one that reuses our freed inode number).
#[derive(Debug)]
pub(crate) struct SocketFile {
    path: PathBuf,
    identity: FileIdentity,
}

#[derive(Debug, PartialEq, Eq)]
struct FileIdentity {
    device: u64,
    inode: u64,
    changed: (i64, i64),
}

impl FileIdentity {
    fn of(metadata: &std::fs::Metadata) -> Self {
        Self {
            device: metadata.dev(),
            inode: metadata.ino(),
            changed: (metadata.ctime(), metadata.ctime_nsec()),
        }
    }
}

impl SocketFile {
    fn of(path: &Path) -> std::io::Result<Self> {
        let metadata = std::fs::symlink_metadata(path)?;
        Ok(Self {
            path: path.to_owned(),
            identity: FileIdentity::of(&metadata),
        })
    }

    /// Removes the socket file if it is still the one we bound.
    pub(crate) fn remove(&self) {
        match std::fs::symlink_metadata(&self.path) {
            Ok(metadata) if FileIdentity::of(&metadata) == self.identity => {
                if let Err(error) = std::fs::remove_file(&self.path) {
                    tracing::warn!(path = %self.path.display(), %error, "cannot remove the socket file");
                }
            }
            Ok(_) => {
                tracing::warn!(path = %self.path.display(), "the socket file was replaced by someone else; leaving it");
            }
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => {
                tracing::warn!(path = %self.path.display(), %error, "cannot inspect the socket file");
            }
        }
    }
}

/// The socket-file policy: create the directory; replace a socket nobody
/// listens on; refuse a live socket or a file that is not a socket.
fn prepare_socket_path(path: &Path) -> Result<(), ListenError> {
    let prepare_error = |source| ListenError::PrepareSocket {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(prepare_error)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(metadata) if metadata.file_type().is_socket() => {
            match std::os::unix::net::UnixStream::connect(path) {
                Ok(_) => Err(ListenError::SocketInUse(path.to_owned())),
                Err(error) if error.kind() == std::io::ErrorKind::ConnectionRefused => {
                    std::fs::remove_file(path).map_err(prepare_error)
                }
                Err(error) => Err(prepare_error(error)),
            }
        }
        Ok(_) => Err(ListenError::NotASocket(path.to_owned())),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(error) => Err(prepare_error(error)),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    fn unix(path: &Path) -> ListenAddress {
        ListenAddress::Unix(path.to_owned())
    }

    #[test]
    fn remote_tcp_is_refused_unless_allowed() {
        let outcomes: Vec<(String, bool, bool)> = [
            "127.0.0.1:0",
            "[::1]:0",
            "0.0.0.0:7071",
            "[::]:7071",
            "unix:/x.sock",
        ]
        .iter()
        .map(|text| {
            let address: ListenAddress = text.parse().unwrap();
            (
                (*text).to_owned(),
                check_exposure(&address, Exposure::LoopbackOnly).is_ok(),
                check_exposure(&address, Exposure::AllowRemote).is_ok(),
            )
        })
        .collect();
        let expected: Vec<(String, bool, bool)> = [
            ("127.0.0.1:0", true, true),
            ("[::1]:0", true, true),
            ("0.0.0.0:7071", false, true),
            ("[::]:7071", false, true),
            ("unix:/x.sock", true, true),
        ]
        .into_iter()
        .map(|(text, loopback, remote)| (text.to_owned(), loopback, remote))
        .collect();
        assert_eq!(outcomes, expected);
    }

    #[test]
    fn the_refusal_says_why_and_how() {
        let error =
            check_exposure(&"0.0.0.0:7071".parse().unwrap(), Exposure::LoopbackOnly).unwrap_err();
        let text = error.to_string();
        assert!(
            text.starts_with("refusing to listen on 0.0.0.0:7071: callers are not authenticated"),
            "{text}"
        );
        assert!(text.contains("--insecure-listen"), "{text}");
    }

    #[tokio::test]
    async fn remote_tcp_is_refused_before_anything_binds() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("a.sock");
        let error = Listeners::bind_all(
            &[unix(&socket), "0.0.0.0:0".parse().unwrap()],
            Exposure::LoopbackOnly,
        )
        .await
        .unwrap_err();
        assert!(matches!(error, ListenError::RemoteTcpRefused(_)), "{error}");
        assert!(!socket.exists(), "nothing was bound");
    }

    #[tokio::test]
    async fn tcp_port_zero_reports_the_real_port() {
        let listener = Listener::bind(&"127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let ListenAddress::Tcp(address) = listener.local_address().clone() else {
            panic!("not TCP");
        };
        assert_ne!(address.port(), 0);
        assert_eq!(listener.endpoint(), format!("http://{address}"));
    }

    #[tokio::test]
    async fn a_unix_socket_gets_its_directory_and_mode_0660() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("run/deeper/d.sock");
        let listener = Listener::bind(&unix(&socket)).await.unwrap();
        let metadata = std::fs::symlink_metadata(&socket).unwrap();
        assert!(metadata.file_type().is_socket());
        assert_eq!(metadata.permissions().mode() & 0o777, SOCKET_MODE);
        assert_eq!(listener.endpoint(), format!("unix:{}", socket.display()));
    }

    #[tokio::test]
    async fn a_stale_socket_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("d.sock");
        drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
        assert!(socket.exists(), "a closed listener leaves its file behind");
        Listener::bind(&unix(&socket))
            .await
            .expect("stale socket replaced");
    }

    #[tokio::test]
    async fn a_live_socket_is_not_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("d.sock");
        let _live = Listener::bind(&unix(&socket)).await.unwrap();
        let error = Listener::bind(&unix(&socket)).await.unwrap_err();
        assert!(
            matches!(&error, ListenError::SocketInUse(path) if *path == socket),
            "{error}"
        );
    }

    #[tokio::test]
    async fn a_regular_file_is_never_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("not-a-socket");
        std::fs::write(&file, "data").unwrap();
        let error = Listener::bind(&unix(&file)).await.unwrap_err();
        assert_eq!(
            error.to_string(),
            format!(
                "{} exists and is not a socket; refusing to replace it (remove it or listen elsewhere)",
                file.display()
            )
        );
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "data");
    }

    #[tokio::test]
    async fn only_our_own_socket_file_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("d.sock");
        let listener = Listener::bind(&unix(&socket)).await.unwrap();
        let Socket::Unix(unix_listener, file) = listener.into_socket() else {
            panic!("not a unix socket");
        };
        drop(unix_listener);
        // Another server took the path over.
        let elsewhere = dir.path().join("other.sock");
        let _other = std::os::unix::net::UnixListener::bind(&elsewhere).unwrap();
        std::fs::rename(&elsewhere, &socket).unwrap();
        file.remove();
        assert!(socket.exists(), "someone else's socket was removed");
    }

    #[tokio::test]
    async fn our_socket_file_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("d.sock");
        let listener = Listener::bind(&unix(&socket)).await.unwrap();
        let Socket::Unix(_listener, file) = listener.into_socket() else {
            panic!("not a unix socket");
        };
        file.remove();
        assert!(!socket.exists());
    }
}
