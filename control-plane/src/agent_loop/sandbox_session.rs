//! The session's sandbox on sandboxd: created with the recorded sandbox
//! policy (again after sandboxd lost it), the tools it offers, and its
//! teardown; calls to sandboxd are retried while it is unreachable.

use std::collections::HashMap;
use std::sync::Arc;

use harness_proto::sandbox::v1 as sandbox;

use super::resolved::SessionAgent;
use super::{LoopError, SESSION_LABEL, SessionRun};
use crate::error_report::error_chain;
use crate::sandbox::SandboxError;

impl SessionRun<'_> {
    pub(super) async fn create_sandbox(&mut self, agent: &SessionAgent) -> Result<(), LoopError> {
        let request = sandbox::CreateSessionRequest {
            policy: Some(agent.sandbox_policy.clone()),
            labels: HashMap::from([(SESSION_LABEL.to_owned(), self.session_id().to_string())]),
        };
        let sandbox = Arc::clone(&self.agent_loop.sandbox);
        let sandbox_session_id = self
            .retry_unreachable(|| sandbox.create_session(request.clone()))
            .await?
            .map_err(LoopError::CreateSandbox)?;
        self.sandbox_session_id = Some(sandbox_session_id.clone());
        self.agent_loop
            .log
            .store()
            .set_sandbox_session(self.session_id().clone(), sandbox_session_id)
            .await?;
        Ok(())
    }

    /// The tools sandboxd offers.
    pub(super) async fn list_tools(&mut self) -> Result<Vec<sandbox::Tool>, LoopError> {
        let sandbox = Arc::clone(&self.agent_loop.sandbox);
        self.retry_unreachable(|| sandbox.list_tools())
            .await?
            .map_err(LoopError::ListTools)
    }

    /// Calls sandboxd, trying again while it is unreachable (it may be
    /// starting, e.g. when both daemons restart together).
    pub(super) async fn retry_unreachable<T, F, Fut>(
        &mut self,
        mut call: F,
    ) -> Result<Result<T, SandboxError>, LoopError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, SandboxError>>,
    {
        let retry = self.agent_loop.settings.dispatch_retry;
        let mut wait = retry.backoff;
        let mut attempt = 1;
        loop {
            let result = self.until_stopped(call()).await?;
            match &result {
                Err(error) if error.is_unreachable() && attempt < retry.attempts => {
                    tracing::warn!(session_id = self.session.session_id.as_str(), attempt, error = %error_chain(error), "sandboxd unreachable; trying again");
                    self.until_stopped(tokio::time::sleep(wait)).await?;
                    wait = wait.saturating_mul(2);
                    attempt += 1;
                }
                _ => return Ok(result),
            }
        }
    }

    /// Best effort: a failure is logged, and sandboxd's TTL cleans up. A
    /// borrowed sandbox session (a subagent's, in its parent's workspace)
    /// is its owner's to destroy.
    pub(super) async fn destroy_sandbox(&mut self) {
        let Some(sandbox_session_id) = self.sandbox_session_id.take() else {
            return;
        };
        if self.session.sandbox_borrowed {
            return;
        }
        let reason = format!("control-plane session {} ended", self.session.session_id);
        if let Err(error) = self
            .agent_loop
            .sandbox
            .destroy_session(sandbox_session_id.clone(), reason)
            .await
        {
            tracing::warn!(
                session_id = self.session.session_id.as_str(),
                sandbox_session_id,
                error = %error_chain(&error),
                "could not destroy the sandbox session"
            );
        }
    }
}
