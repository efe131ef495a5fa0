//! Running sessions in the background: launching the [`AgentLoop`] for new
//! sessions, cancelling them, and closing sessions a previous process left
//! unfinished.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use harness_proto::control::v1 as control;
use harness_proto::control::v1::session_event::Kind;
use tokio::sync::watch;

use crate::agent::Agent;
use crate::agent_loop::{AgentLoop, finished_with_error};
use crate::error_report::error_chain;
use crate::event;
use crate::event_log::EventLog;
use crate::provider::ToolCall;
use crate::sandbox::SandboxDispatch;
use crate::store::{SessionRecord, StoreError};

/// How long start-up recovery waits for sandboxd to destroy a leftover session.
const RECOVERY_DESTROY_TIMEOUT: Duration = Duration::from_secs(5);

/// Starts sessions as background tasks and cancels them on request.
#[derive(Debug)]
pub struct SessionSupervisor {
    agent_loop: Arc<AgentLoop>,
    running: Arc<Mutex<HashMap<String, watch::Sender<Option<String>>>>>,
}

impl SessionSupervisor {
    /// A supervisor running sessions on `agent_loop`.
    pub fn new(agent_loop: Arc<AgentLoop>) -> Self {
        Self {
            agent_loop,
            running: Arc::default(),
        }
    }

    /// Runs `session` in the background.
    pub fn launch(&self, session: SessionRecord, agent: Arc<Agent>) {
        let (cancel_sender, cancel) = watch::channel(None);
        let session_id = session.session_id.clone();
        self.running
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(session_id.clone(), cancel_sender);
        let agent_loop = Arc::clone(&self.agent_loop);
        let running = Arc::clone(&self.running);
        tokio::spawn(async move {
            agent_loop.run(session, agent, cancel).await;
            running
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&session_id);
        });
    }

    /// Asks a running session to stop; false if it is not running here.
    pub fn cancel(&self, session_id: &str, reason: &str) -> bool {
        let running = self.running.lock().unwrap_or_else(PoisonError::into_inner);
        match running.get(session_id) {
            Some(sender) => {
                sender.send_replace(Some(reason.to_owned()));
                true
            }
            None => false,
        }
    }
}

/// Closes sessions that a previous control-plane process left unfinished:
/// their loops are gone and resuming them is not implemented yet. Each gets
/// `tool_finished` (interrupted) for calls that never finished, its sandbox
/// session destroyed, and `finished` with ERROR. Returns how many were closed.
pub async fn recover_interrupted_sessions(
    log: &EventLog,
    sandbox: &dyn SandboxDispatch,
) -> Result<usize, StoreError> {
    let sessions = log.store().list_unfinished_sessions().await?;
    for session in &sessions {
        tracing::warn!(
            session_id = session.session_id,
            "closing a session interrupted by a restart"
        );
        let events = log
            .store()
            .read_events(session.session_id.clone(), 0, usize::MAX)
            .await?;
        let turn = events.last().map_or(0, |event| event.turn);
        for call in unfinished_calls(&events) {
            let message = "the control plane restarted before this call finished; \
                           its side effects may or may not have happened"
                .to_owned();
            let finished = finished_with_error(&call, control::ToolErrorKind::Interrupted, message);
            log.append(&session.session_id, turn, Kind::ToolFinished(finished))
                .await?;
        }
        if let Some(sandbox_session_id) = &session.sandbox_session_id {
            let reason = "control plane restarted".to_owned();
            let destroy = sandbox.destroy_session(sandbox_session_id.clone(), reason);
            // sandboxd may be down at start-up; its own TTL is the backstop.
            match tokio::time::timeout(RECOVERY_DESTROY_TIMEOUT, destroy).await {
                Ok(Ok(_)) => {}
                Ok(Err(error)) => {
                    tracing::warn!(sandbox_session_id, error = %error_chain(&error), "could not destroy a leftover sandbox session");
                }
                Err(_) => {
                    tracing::warn!(
                        sandbox_session_id,
                        "sandboxd did not answer; leaving the leftover sandbox session to its TTL"
                    );
                }
            }
        }
        let mut usage = control::BudgetUsage::default();
        for kind in events.iter().filter_map(|event| event.kind.as_ref()) {
            event::apply_to_usage(&mut usage, kind);
        }
        let last_text = events.iter().rev().find_map(|event| match &event.kind {
            Some(Kind::TurnCompleted(turn)) => Some(turn.assistant_text.clone()),
            _ => None,
        });
        let finished = control::SessionFinished {
            stop_reason: control::StopReason::Error.into(),
            final_output: last_text.unwrap_or_default(),
            message: "interrupted by a control-plane restart; resuming sessions is not \
                      implemented yet"
                .to_owned(),
            usage: Some(usage),
        };
        log.append(&session.session_id, turn, Kind::Finished(finished))
            .await?;
    }
    Ok(sessions.len())
}

/// Calls with `tool_started` and no `tool_finished`, in start order.
fn unfinished_calls(events: &[control::SessionEvent]) -> Vec<ToolCall> {
    let mut open: Vec<ToolCall> = Vec::new();
    for event in events {
        match &event.kind {
            Some(Kind::ToolStarted(started)) => open.push(ToolCall {
                call_id: started.call_id.clone(),
                tool: started.tool.clone(),
                arguments_json: String::new(),
            }),
            Some(Kind::ToolFinished(finished)) => {
                open.retain(|call| call.call_id != finished.call_id);
            }
            _ => {}
        }
    }
    open
}
