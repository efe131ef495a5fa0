//! Addresses and gRPC channels: where the control plane listens and how it
//! (and its CLI) reach a gRPC server over a Unix socket or TCP. Both daemons
//! share these, so they live in [`harness_daemon`]; this module names them
//! for the control plane's own code.

pub use harness_daemon::address::{AddressError, ListenAddress, UNIX_PREFIX};
pub use harness_daemon::client::connect_lazy;
