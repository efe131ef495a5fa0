//! The seam between the invocation lifecycle and what runs a call.
//!
//! `service.rs` holds the lifecycle once for every backend: it checks the
//! invocation id, claims it (a repeat with the same id and request gets the
//! recorded result, marked replayed, and nothing runs again), streams
//! `started`, the output and the result, and records the result even when the
//! caller went away. A [`Backend`] says only what differs: whether the
//! session can run its calls, the call's deadline and fingerprint, the digest
//! of what runs, and how to run it. The WASI backend
//! ([`crate::wasi::backend::WasiBackend`]) and the process backend
//! ([`crate::process::invocations::ProcessInvocations`]) implement it; a
//! third (a remote host, a microVM) plugs in here.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use harness_proto::sandbox::v1 as pb;
use tokio::sync::mpsc;

use crate::error::ServiceError;
use crate::session::Session;

/// What runs the calls of one kind.
pub trait Backend: Send + Sync + 'static {
    /// A call for this backend, as the request gave it (checking it is part
    /// of running it, so a bad call gets a recorded `invalid_input` result).
    type Call: std::fmt::Debug + Send + 'static;

    /// Which backend `InvokeStarted` names.
    const KIND: pb::Backend;

    /// Fails when `session` cannot run this backend's calls at all (its
    /// policy did not ask for the backend): the rpc fails, nothing is
    /// recorded.
    fn admit(&self, session: &Session) -> Result<(), ServiceError>;

    /// The call's deadline: what the call or the request asks for, capped
    /// by the session's policy ([`capped_timeout`]).
    fn timeout(
        &self,
        call: &Self::Call,
        requested: Option<&prost_types::Duration>,
        session: &Session,
    ) -> Duration;

    /// What a repeat with the same invocation id must match exactly.
    fn fingerprint(&self, call: &Self::Call, timeout: Duration) -> u64;

    /// The content digest of what runs (`sha256:<hex>`); empty for
    /// built-ins.
    fn digest(&self, call: &Self::Call) -> String;

    /// How its output reaches the caller.
    const OUTPUT: OutputMode;

    /// Runs `call` in `session` to its result; stops early, with an error
    /// result, when the session is destroyed. A [`OutputMode::Streamed`]
    /// backend gets `output` and sends chunks on it as they come (dropping
    /// it, and every clone, before returning); a [`OutputMode::Captured`]
    /// one gets `None` and returns its output with the result.
    fn run(
        &self,
        session: &Arc<Session>,
        call: Self::Call,
        timeout: Duration,
        output: Option<mpsc::Sender<pb::OutputChunk>>,
    ) -> impl Future<Output = Ran> + Send;
}

/// How a backend's output reaches the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputMode {
    /// Sent while the call runs (a process writing to its pipes).
    Streamed,
    /// Known only once the call ran (a component's captured stdio): no
    /// channel, no second hop per chunk.
    Captured,
}

/// What a run produced.
#[derive(Debug, Clone, PartialEq)]
pub struct Ran {
    /// The result.
    pub result: pb::InvokeResult,
    /// The output of a [`OutputMode::Captured`] backend, in order (empty
    /// for a streamed one: its output was sent already).
    pub captured: Vec<pb::OutputChunk>,
}

impl From<pb::InvokeResult> for Ran {
    fn from(result: pb::InvokeResult) -> Self {
        Self {
            result,
            captured: Vec::new(),
        }
    }
}

/// The requested deadline (zero or none: none requested), capped by the
/// policy's.
pub fn capped_timeout(requested: Option<&prost_types::Duration>, policy: Duration) -> Duration {
    requested
        .map(harness_proto::duration_from_proto)
        .filter(|d| !d.is_zero())
        .map_or(policy, |d| d.min(policy))
}

/// The result of a call that did not get to run.
pub fn error_result(kind: pb::ErrorKind, message: impl Into<String>) -> pb::InvokeResult {
    pb::InvokeResult {
        outcome: Some(pb::invoke_result::Outcome::Error(pb::ToolError {
            kind: kind as i32,
            message: message.into(),
            violations: Vec::new(),
        })),
        usage: Some(pb::Usage::default()),
        replayed: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requested_timeouts_are_capped_by_the_policy() {
        let policy = Duration::from_secs(10);
        assert_eq!(capped_timeout(None, policy), policy);
        let zero = harness_proto::duration_to_proto(Duration::ZERO);
        assert_eq!(capped_timeout(Some(&zero), policy), policy);
        let short = harness_proto::duration_to_proto(Duration::from_secs(1));
        assert_eq!(capped_timeout(Some(&short), policy), Duration::from_secs(1));
        let long = harness_proto::duration_to_proto(Duration::from_secs(100));
        assert_eq!(capped_timeout(Some(&long), policy), policy);
    }
}
