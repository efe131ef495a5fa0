//! Running sessions in the background: launching the [`AgentLoop`] for new
//! sessions, resuming the sessions a previous process left unfinished, and
//! cancelling them.
//!
//! A session is in the running map exactly as long as its task lives: a
//! guard owned by the task removes it, so a loop that panics (or a task
//! that is aborted) never leaves a session "running" that nothing runs. A
//! panic is caught and the session closed with stop reason error, saying
//! the loop panicked and why.

use std::any::Any;
use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex, PoisonError};

use futures::FutureExt as _;
use futures::future::BoxFuture;

use harness_proto::control::v1 as control;
use harness_proto::control::v1::session_event::Kind;
use tokio::sync::watch;

use crate::agent::{Agent, AgentCatalog};
use crate::agent_loop::AgentLoop;
use crate::ids::SessionId;
use crate::store::{SessionRecord, StoreError};
use crate::subagent::receipt::ReceiptBuilder;

/// A session whose loop runs here.
#[derive(Debug)]
struct RunningSession {
    /// Set to the reason to ask the loop to stop.
    cancel: watch::Sender<Option<String>>,
    /// Tells when the loop's task has ended, and how.
    ended: watch::Receiver<LoopEnd>,
}

/// Where a session's loop task is.
#[derive(Debug, Clone, Default, PartialEq)]
pub enum LoopEnd {
    /// Still running.
    #[default]
    Running,
    /// Ended. With what the session's receipt is built from, when its
    /// `finished` was committed by this loop; `None` when it ended
    /// otherwise (shutting down, a panic, a store failure), and its log
    /// tells the rest.
    Ended(Option<Arc<ReceiptBuilder>>),
}

type Running = Arc<Mutex<HashMap<SessionId, RunningSession>>>;

/// Removes a session from the running map when its task ends, however it
/// ends: returning, panicking, or aborted, and tells whoever waits for it.
struct RunningGuard {
    running: Running,
    session_id: SessionId,
    ended: watch::Sender<LoopEnd>,
    /// Set by the task when its loop recorded the session's end.
    receipt: Option<ReceiptBuilder>,
}

impl Drop for RunningGuard {
    fn drop(&mut self) {
        self.running
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.session_id);
        let receipt = self.receipt.take().map(Arc::new);
        self.ended.send_replace(LoopEnd::Ended(receipt));
    }
}

/// The text a panic was raised with (`panic!` gives a `&str` or a `String`).
fn panic_message(payload: &(dyn Any + Send)) -> &str {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

/// Starts sessions as background tasks and cancels them on request.
#[derive(Debug)]
pub struct SessionSupervisor {
    agent_loop: Arc<AgentLoop>,
    running: Running,
}

impl SessionSupervisor {
    /// The loop sessions run on.
    pub fn agent_loop(&self) -> &AgentLoop {
        &self.agent_loop
    }

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
        let (ended_sender, ended) = watch::channel(LoopEnd::Running);
        let session_id = session.session_id.clone();
        {
            let mut running = self.running.lock().unwrap_or_else(PoisonError::into_inner);
            if running.contains_key(&session_id) {
                return;
            }
            let entry = RunningSession {
                cancel: cancel_sender,
                ended,
            };
            running.insert(session_id.clone(), entry);
        }
        let guard = RunningGuard {
            running: Arc::clone(&self.running),
            session_id,
            ended: ended_sender,
            receipt: None,
        };
        let agent_loop = Arc::clone(&self.agent_loop);
        tokio::spawn(async move {
            // Moved in, so it drops when the task ends, however it ends.
            let mut guard = guard;
            let tenant = session.tenant.clone();
            let run = AssertUnwindSafe(agent_loop.run(session, Arc::clone(&agent), cancel));
            let payload = match run.catch_unwind().await {
                Ok(receipt) => {
                    guard.receipt = receipt;
                    return;
                }
                Err(payload) => payload,
            };
            let message = format!("session loop panicked: {}", panic_message(&*payload));
            tracing::error!(
                session_id = guard.session_id.as_str(),
                message,
                "closing the session"
            );
            let close = agent_loop.close_after_panic(&tenant, &guard.session_id, agent, message);
            if AssertUnwindSafe(close).catch_unwind().await.is_err() {
                tracing::error!(
                    session_id = guard.session_id.as_str(),
                    "closing a panicked session panicked too; it resumes at the next start"
                );
            }
        });
    }

    /// Asks a session running here to stop; false if it is not running here.
    pub fn cancel(&self, session_id: &SessionId, reason: &str) -> bool {
        let running = self.running.lock().unwrap_or_else(PoisonError::into_inner);
        match running.get(session_id) {
            Some(session) => {
                session.cancel.send_replace(Some(reason.to_owned()));
                true
            }
            None => false,
        }
    }

    /// Resolves once the session's loop, running here, has ended (at once
    /// if it does not run here). Its log is then as complete as this
    /// process will make it: a finished session's `finished` is committed.
    /// With what its receipt is built from when that loop recorded its end
    /// (the same as its log gives: the loop applied every event it wrote).
    pub fn loop_ended(
        &self,
        session_id: &SessionId,
    ) -> BoxFuture<'static, Option<Arc<ReceiptBuilder>>> {
        let ended = self
            .running
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(session_id)
            .map(|session| session.ended.clone());
        Box::pin(async move {
            let mut ended = ended?;
            // An error means the guard is gone: the loop has ended too.
            match ended
                .wait_for(|ended| matches!(ended, LoopEnd::Ended(_)))
                .await
            {
                Ok(end) => match &*end {
                    LoopEnd::Ended(receipt) => receipt.clone(),
                    LoopEnd::Running => None,
                },
                Err(_) => None,
            }
        })
    }

    /// True if the session's loop runs in this process.
    pub fn is_running(&self, session_id: &SessionId) -> bool {
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
                        session_id = session.session_id.as_str(),
                        agent = session.agent,
                        last_seq = session.last_seq,
                        "resuming a session interrupted by a restart"
                    );
                    self.launch(session, agent);
                    resumed += 1;
                }
                None => {
                    tracing::warn!(
                        session_id = session.session_id.as_str(),
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
                        files_written: Vec::new(),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_aborted_task_leaves_the_running_map_and_wakes_its_waiters() {
        let running: Running = Arc::default();
        let (cancel, _receiver) = watch::channel(None);
        let (ended_sender, ended) = watch::channel(LoopEnd::Running);
        running
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(
                SessionId::new("s1"),
                RunningSession {
                    cancel,
                    ended: ended.clone(),
                },
            );
        let guard = RunningGuard {
            running: Arc::clone(&running),
            session_id: SessionId::new("s1"),
            ended: ended_sender,
            receipt: None,
        };
        let task = tokio::spawn(async move {
            let _guard = guard;
            std::future::pending::<()>().await;
        });
        tokio::task::yield_now().await;
        assert!(
            running
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .contains_key(&SessionId::new("s1"))
        );
        assert_eq!(*ended.borrow(), LoopEnd::Running);
        task.abort();
        assert!(task.await.is_err_and(|error| error.is_cancelled()));
        assert!(
            running
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .is_empty()
        );
        assert_eq!(*ended.borrow(), LoopEnd::Ended(None));
    }

    #[test]
    fn panic_messages_are_read_from_str_and_string_payloads() {
        let from_str: Box<dyn Any + Send> = Box::new("static");
        let from_string: Box<dyn Any + Send> = Box::new(String::from("formatted 1"));
        let other: Box<dyn Any + Send> = Box::new(7_u8);
        assert_eq!(
            [&from_str, &from_string, &other].map(|payload| panic_message(&**payload)),
            ["static", "formatted 1", "(no message)"]
        );
    }
}
