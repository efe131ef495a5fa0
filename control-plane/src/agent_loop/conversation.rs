//! Conversations: between answers, a session waits for `SendMessage`.
//!
//! After a final answer a conversation session records `waiting_for_input`
//! (with the wait's deadline) and waits. `SendMessage` appends the next
//! `user_message`; the store accepts it only while the session waits and
//! only as the answer to its latest event, so two racing messages cannot
//! both land in one wait. When the deadline passes, the loop records
//! `input_closed`, which the store refuses once a message has landed: a
//! message is either answered or refused, never accepted and dropped. A
//! restarted control plane replays the log and waits again, with the
//! recorded deadline.

use std::time::SystemTime;

use futures::StreamExt;
use harness_proto::control::v1 as control;
use harness_proto::control::v1::session_event::Kind;

use super::resolved::SessionAgent;
use super::{Ending, LoopError, SessionRun, sleep_until_deadline};
use crate::event_log::{FollowError, FollowMode};
use crate::store::StoreError;

impl SessionRun<'_> {
    /// After a final answer (or an escalation: the person decides what
    /// next): stages `waiting_for_input` for a conversation with budget
    /// left, and returns `None`; otherwise the ending as it is.
    pub(super) fn wait_or_end(&mut self, ending: Ending, agent: &SessionAgent) -> Option<Ending> {
        let answered = matches!(ending, Ending::Completed(_) | Ending::Escalated(_));
        // A subagent answers its parent, which waits for it to finish.
        let is_subagent = self.session.parent_session_id().is_some();
        if !agent.conversation.enabled || !answered || is_subagent {
            return Some(ending);
        }
        // A message the session could not answer must not be invited.
        if let Some(stop) = self.budget_stop() {
            return Some(stop);
        }
        let input_deadline = agent
            .conversation
            .input_timeout
            .map(|timeout| harness_proto::timestamp_to_proto(SystemTime::now() + timeout));
        let waiting = control::WaitingForInput {
            assistant_text: self.state.last_assistant_text.clone(),
            input_deadline,
        };
        self.stage(self.state.closed_turns, Kind::WaitingForInput(waiting));
        None
    }

    /// Waits until the next user message is recorded, or the wait's
    /// deadline passes (then `input_closed` is recorded). Cancellation and
    /// the wall-clock budget end the wait too, as errors.
    pub(super) async fn await_input(&mut self, agent: &SessionAgent) -> Result<(), LoopError> {
        self.flush().await?;
        let mut events = self.agent_loop.log.follow(
            &self.session.tenant,
            &self.session.session_id,
            self.last_seq,
            FollowMode::UntilFinished,
        );
        // Once closing was refused, a message has landed: it arrives below.
        let mut closing_refused = false;
        while self.state.waiting.is_some() {
            let deadline = self
                .state
                .waiting
                .as_ref()
                .and_then(|waiting| waiting.input_deadline)
                .and_then(|deadline| SystemTime::try_from(deadline).ok())
                .filter(|_| !closing_refused);
            let timer = sleep_until_deadline(deadline);
            let next = self
                .until_stopped(async {
                    tokio::select! {
                        biased;
                        event = events.next() => Some(event),
                        () = timer => None,
                    }
                })
                .await?;
            match next {
                Some(Some(Ok(event))) => {
                    self.last_seq = self.last_seq.max(event.seq);
                    if let Some(kind @ (Kind::UserMessage(_) | Kind::InputClosed(_))) = &event.kind
                    {
                        self.state.apply(event.turn, kind);
                    }
                }
                Some(Some(Err(FollowError::ShuttingDown))) => return Err(LoopError::ShuttingDown),
                Some(Some(Err(error))) => return Err(LoopError::Input(error)),
                Some(None) => {
                    return Err(LoopError::Input(FollowError::SessionGone(
                        self.session.session_id.clone(),
                    )));
                }
                None => closing_refused = !self.close_input(agent).await?,
            }
        }
        Ok(())
    }

    /// Records that the wait timed out; false if a message landed first.
    async fn close_input(&mut self, agent: &SessionAgent) -> Result<bool, LoopError> {
        let timeout = agent.conversation.input_timeout.unwrap_or_default();
        let kind = Kind::InputClosed(control::InputClosed {
            reason: format!(
                "no message arrived within the input timeout of {}",
                humantime::format_duration(timeout)
            ),
        });
        let turn = self.state.closed_turns;
        match self
            .agent_loop
            .log
            .append(&self.session.session_id, turn, kind.clone())
            .await
        {
            Ok(event) => {
                self.last_seq = self.last_seq.max(event.seq);
                self.state.apply(turn, &kind);
                Ok(true)
            }
            Err(StoreError::NotWaitingForInput(_)) => Ok(false),
            Err(error) => Err(error.into()),
        }
    }
}
