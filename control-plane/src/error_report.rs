//! Error reports for logs, events and gRPC statuses: an error and its
//! sources on one line. Shared with sandboxd, so it lives in
//! [`harness_daemon::error_report`].

pub use harness_daemon::error_chain;
