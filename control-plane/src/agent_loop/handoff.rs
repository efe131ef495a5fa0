//! Carrying out a handoff (see [`crate::handoff`]): the target agent
//! resolved and recorded in a `handoff` event, after which the session runs
//! as it. A session resumed after a restart runs as the agent of its latest
//! handoff.

use std::sync::Arc;

use harness_proto::control::v1 as control;
use harness_proto::control::v1::session_event::Kind;

use super::resolved::{self, SessionAgent};
use super::{LoopError, SessionRun};
use crate::agent::{Agent, transfer_tool_name};
use crate::handoff::Transfer;

impl SessionRun<'_> {
    /// Records the handoff `transfer` asks for, from the session running as
    /// `from`, and returns what the session runs as next.
    pub(super) async fn hand_off(
        &mut self,
        transfer: Transfer,
        from: &SessionAgent,
    ) -> Result<SessionAgent, LoopError> {
        let target = self.agent_named(&transfer.to)?;
        let offered = self.list_tools().await?;
        let record =
            resolved::record(&target, &offered, self.agent_loop.executors.harness_tools())?;
        let handoff = control::Handoff {
            from_agent: from.name.clone(),
            to_agent: transfer.to.clone(),
            reason: transfer.reason,
            history: target
                .definition
                .delegation
                .handoff_history
                .to_proto()
                .into(),
            summary: transfer.summary,
            resolved: Some(record.clone()),
            call_id: transfer.call_id,
        };
        tracing::info!(
            session_id = self.session_id().as_str(),
            from = from.name,
            to = transfer.to,
            "session handed over"
        );
        self.stage(self.state.closed_turns, Kind::Handoff(handoff));
        self.flush().await?;
        Ok(SessionAgent::from_record(&transfer.to, &record, &target)?)
    }

    /// The agent the session runs as now: the one it started with, or the
    /// target of its latest handoff.
    pub(super) fn current_agent(&self) -> Result<(String, Arc<Agent>), LoopError> {
        match &self.state.current_agent {
            Some(name) if *name != self.session.agent => {
                Ok((name.clone(), self.agent_named(name)?))
            }
            _ => Ok((self.session.agent.clone(), Arc::clone(&self.agent))),
        }
    }

    /// A handoff target, as its transfer tool holds it.
    fn agent_named(&self, name: &str) -> Result<Arc<Agent>, LoopError> {
        self.agent_loop
            .executors
            .harness_tools()
            .get(&transfer_tool_name(name))
            .and_then(|tool| tool.handoff_target())
            .cloned()
            .ok_or_else(|| LoopError::HandoffTargetGone(name.to_owned()))
    }
}
