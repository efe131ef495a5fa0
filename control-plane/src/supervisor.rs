//! Running sessions in the background: launching the [`AgentLoop`] for new
//! sessions, resuming the sessions a previous process left unfinished, and
//! cancelling them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use harness_proto::control::v1 as control;
use harness_proto::control::v1::session_event::Kind;
use tokio::sync::watch;

use crate::agent::{Agent, AgentCatalog};
use crate::agent_loop::AgentLoop;
use crate::store::{SessionRecord, StoreError};

type Running = Arc<Mutex<HashMap<String, watch::Sender<Option<String>>>>>;

/// Starts sessions as background tasks and cancels them on request.
#[derive(Debug)]
pub struct SessionSupervisor {
    agent_loop: Arc<AgentLoop>,
    running: Running,
}

impl SessionSupervisor {
    /// A supervisor running sessions on `agent_loop`.
    pub fn new(agent_loop: Arc<AgentLoop>) -> Self {
        Self {
            agent_loop,
            running: Arc::default(),
        }
    }

    /// Runs `session` in the background (from where its log ends). A session
    /// already running here is left alone.
    pub fn launch(&self, session: SessionRecord, agent: Arc<Agent>) {
        let (cancel_sender, cancel) = watch::channel(None);
        let session_id = session.session_id.clone();
        {
            let mut running = self.running.lock().unwrap_or_else(PoisonError::into_inner);
            if running.contains_key(&session_id) {
                return;
            }
            running.insert(session_id.clone(), cancel_sender);
        }
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

    /// Asks a session running here to stop; false if it is not running here.
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

    /// True if the session's loop runs in this process.
    pub fn is_running(&self, session_id: &str) -> bool {
        self.running
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains_key(session_id)
    }

    /// Resumes every session a previous process left unfinished. A session
    /// whose agent is no longer defined is closed with an error. Returns how
    /// many were resumed.
    pub async fn resume_unfinished(&self, agents: &AgentCatalog) -> Result<usize, StoreError> {
        let log = self.agent_loop.log();
        let sessions = log.store().list_unfinished_sessions().await?;
        let mut resumed = 0;
        for session in sessions {
            match agents.get(&session.agent) {
                Some(agent) => {
                    tracing::info!(
                        session_id = session.session_id,
                        agent = session.agent,
                        last_seq = session.last_seq,
                        "resuming a session interrupted by a restart"
                    );
                    self.launch(session, agent);
                    resumed += 1;
                }
                None => {
                    tracing::warn!(
                        session_id = session.session_id,
                        agent = session.agent,
                        "closing a session whose agent is no longer defined"
                    );
                    let finished = control::SessionFinished {
                        stop_reason: control::StopReason::Error.into(),
                        final_output: String::new(),
                        message: format!(
                            "agent \"{}\" is no longer defined in this control plane, so the \
                             session cannot resume",
                            session.agent
                        ),
                        usage: Some(session.usage),
                    };
                    let last = log
                        .store()
                        .read_events(
                            session.session_id.clone(),
                            session.last_seq.saturating_sub(1),
                            1,
                        )
                        .await?;
                    let turn = last.first().map_or(0, |event| event.turn);
                    log.append(&session.session_id, turn, Kind::Finished(finished))
                        .await?;
                }
            }
        }
        Ok(resumed)
    }
}
