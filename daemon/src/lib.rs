//! The plumbing both harness daemons (`sandboxd` and `control-plane`) share,
//! and nothing of either's domain.
//!
//! - [`address`]: listen addresses (`unix:/path` or `ip:port`) and the
//!   client endpoints that reach them.
//! - [`paths`]: the default socket, state and cache paths, all derived from
//!   one base, `$HARNESS_HOME`.
//! - [`listener`]: binding a listener, with the socket-file policy (stale
//!   sockets replaced, anything else refused, mode 0660) and the exposure
//!   policy (TCP off loopback refused unless explicitly allowed).
//! - [`serve`]: [`serve::DaemonServer`] serves a daemon's own services on
//!   every listener at once, with the standard gRPC health service and
//!   server reflection (v1 and v1alpha) of exactly those services, and a
//!   [`tower::Layer`] hook for auth, tracing and metrics.
//! - [`client`]: a lazy gRPC channel to a `unix:` or `http://` endpoint.
//! - [`shutdown`]: SIGTERM/SIGINT as a future.
//! - [`logging`]: the stderr subscriber (`pretty` or `json`, `RUST_LOG`).
//! - [`config`]: reading a TOML config file, with errors that name the file
//!   and the line and column.
//! - [`error_report`]: an error and its sources on one line.

pub mod address;
pub mod client;
pub mod config;
pub mod error_report;
pub mod listener;
pub mod logging;
pub mod paths;
pub mod serve;
pub mod shutdown;

pub use address::{AddressError, ListenAddress};
pub use error_report::error_chain;
pub use listener::{Exposure, ListenError, Listener, Listeners};
pub use paths::DefaultPaths;
pub use serve::{DaemonServer, ServeError};
