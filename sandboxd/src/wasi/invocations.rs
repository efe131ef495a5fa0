//! The WASI backend behind the invocation lifecycle ([`crate::backend`]):
//! a call names a loaded tool and its JSON input, and runs in a fresh
//! `Store` scoped to the session's workspace.

use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use harness_proto::sandbox::v1 as pb;
use tokio::sync::mpsc;

use super::backend::{Completed, WasiBackend};
use crate::backend::{Backend, OutputMode, Ran, capped_timeout, error_result};
use crate::error::ServiceError;
use crate::session::Session;
use crate::workspace::{CapReached, Workspace};

impl Backend for WasiBackend {
    type Call = pb::WasiCall;

    const KIND: pb::Backend = pb::Backend::Wasi;
    const OUTPUT: OutputMode = OutputMode::Captured;

    fn admit(&self, _session: &Session) -> Result<(), ServiceError> {
        // Every session runs WASI tools.
        Ok(())
    }

    fn timeout(
        &self,
        _call: &pb::WasiCall,
        requested: Option<&prost_types::Duration>,
        session: &Session,
    ) -> Duration {
        capped_timeout(requested, session.policy.invocation_timeout)
    }

    fn fingerprint(&self, call: &pb::WasiCall, timeout: Duration) -> u64 {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        call.tool.hash(&mut hasher);
        call.input_json.hash(&mut hasher);
        timeout.hash(&mut hasher);
        hasher.finish()
    }

    fn digest(&self, call: &pb::WasiCall) -> String {
        self.tool(&call.tool)
            .map(|tool| tool.digest.clone())
            .unwrap_or_default()
    }

    async fn run(
        &self,
        session: &Arc<Session>,
        call: pb::WasiCall,
        timeout: Duration,
        _output: Option<mpsc::Sender<pb::OutputChunk>>,
    ) -> Ran {
        let _running = session.start_running();
        let invoked = self.invoke(
            session.workspace_root(),
            &session.policy,
            session.egress.as_ref(),
            &call,
            timeout,
        );
        let completed = tokio::select! {
            completed = invoked => attribute_to_full_workspace(completed, || {
                session.with_workspace(Workspace::cap_reached).ok().flatten()
            }),
            _ = session.cancelled() => return error_result(
                pb::ErrorKind::Internal,
                "the sandbox session was destroyed while the invocation ran; it was stopped",
            ).into(),
        };
        Ran {
            result: completed.result,
            captured: completed.chunks,
        }
    }
}

/// A tool that failed while its workspace is at a cap failed because of it
/// (a WASI guest sees `ENOSPC` only as a generic I/O error): the failure
/// becomes `resource_exhausted`, naming the cap.
fn attribute_to_full_workspace(
    mut completed: Completed,
    cap_reached: impl FnOnce() -> Option<CapReached>,
) -> Completed {
    if let Some(pb::invoke_result::Outcome::Error(error)) = completed.result.outcome.as_mut()
        && error.kind == pb::ErrorKind::Failed as i32
        && let Some(cap) = cap_reached()
    {
        error.kind = pb::ErrorKind::ResourceExhausted as i32;
        error.message = format!("{} (the workspace is full: {cap})", error.message);
    }
    completed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_in_a_full_workspace_become_resource_exhausted() {
        let failed = |kind: pb::ErrorKind, message: &str| Completed {
            chunks: vec![],
            digest: "d".to_owned(),
            result: pb::InvokeResult {
                outcome: Some(pb::invoke_result::Outcome::Error(pb::ToolError {
                    kind: kind as i32,
                    message: message.to_owned(),
                    violations: vec![],
                })),
                usage: None,
                replayed: false,
            },
        };
        let full = Some(CapReached::Bytes(4096));
        assert_eq!(
            attribute_to_full_workspace(failed(pb::ErrorKind::Failed, "`a`: I/O error"), || full)
                .result,
            failed(
                pb::ErrorKind::ResourceExhausted,
                "`a`: I/O error (the workspace is full: its size cap of 4096 bytes is reached)"
            )
            .result
        );
        // Not full, or not a tool failure: left as it is.
        for (kind, cap) in [
            (pb::ErrorKind::Failed, None),
            (pb::ErrorKind::InvalidInput, full),
            (pb::ErrorKind::Timeout, full),
        ] {
            assert_eq!(
                attribute_to_full_workspace(failed(kind, "m"), || cap).result,
                failed(kind, "m").result
            );
        }
    }
}
