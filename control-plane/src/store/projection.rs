//! The session projection: what a session's row says (status, stop reason,
//! final output, usage, last seq, pending approvals) as a pure function of
//! its event log.
//!
//! Every backend appends through [`Projection::apply_batch`], so every
//! backend enforces the same rules: events are numbered `last_seq + 1, …`;
//! nothing follows `finished`; an `approval_resolved` needs a pending
//! `approval_requested` for its call; and the status moves as
//! [`Projection::apply`] says. The backend writes what the batch changed
//! ([`AppliedBatch`]) in the transaction that appends the events, so the row
//! never disagrees with the log.
//!
//! A backend that keeps pending approvals apart (SQLite reads them only when
//! a batch needs them) loads them into the projection whenever
//! [`touches_approvals`] says a batch needs them; no other event reads them.

use harness_proto::control::v1::session_event::Kind;
use harness_proto::control::v1::{BudgetUsage, SessionEvent, SessionStatus, StopReason};

use super::{NewEvent, PendingApproval, StoreError};
use crate::event;
use crate::ids::SessionId;

/// What the log says about a session so far.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Projection {
    /// Sequence number of the latest event; 0 before the first.
    pub last_seq: u64,
    /// Lifecycle status.
    pub status: SessionStatus,
    /// Why it stopped, once finished.
    pub stop_reason: StopReason,
    /// Final (or partial) answer, once finished.
    pub final_output: String,
    /// What the events so far used.
    pub usage: BudgetUsage,
    /// Tool calls awaiting approval, oldest request first (a call asked
    /// again moves to the end, as if asked only then).
    pub pending_approvals: Vec<PendingApproval>,
}

/// Why an event cannot be appended; nothing of its batch is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The session already has its `finished` event.
    Finished,
    /// An `approval_resolved` for a call that is not awaiting approval.
    ApprovalNotPending {
        /// The call.
        call_id: String,
    },
    /// A `user_message` or `input_closed` while the session is not waiting
    /// for input, or a `user_message` answering an earlier wait than the
    /// latest event.
    NotWaitingForInput,
}

impl Refusal {
    /// The store error every backend reports for this refusal.
    pub fn into_error(self, session_id: &SessionId) -> StoreError {
        match self {
            Self::Finished => StoreError::SessionFinished(session_id.clone()),
            Self::ApprovalNotPending { call_id } => StoreError::ApprovalNotPending {
                session_id: session_id.clone(),
                call_id,
            },
            Self::NotWaitingForInput => StoreError::NotWaitingForInput(session_id.clone()),
        }
    }
}

/// An approval requested by an appended event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestedApproval {
    /// The call.
    pub call_id: String,
    /// The turn it belongs to.
    pub turn: u32,
    /// The seq of its `approval_requested`.
    pub seq: u64,
}

/// What an accepted batch changed, for the backend to write.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AppliedBatch {
    /// The events, numbered; session id and time are left for the backend.
    pub events: Vec<SessionEvent>,
    /// Approvals the batch requested, in order.
    pub approvals_requested: Vec<RequestedApproval>,
    /// Calls whose approval the batch resolved, in order.
    pub approvals_resolved: Vec<String>,
    /// True if the batch finished the session, which drops every pending
    /// approval.
    pub finished: bool,
}

/// True if appending `events` reads or changes the pending approvals; only
/// then must a backend that stores them apart load them into the
/// projection first.
pub fn touches_approvals(events: &[NewEvent]) -> bool {
    events.iter().any(|event| {
        matches!(
            event.kind,
            Kind::ApprovalRequested(_) | Kind::ApprovalResolved(_) | Kind::Finished(_)
        )
    })
}

impl Projection {
    /// The projection after `events`, and what they changed; or why the
    /// batch is refused (then nothing changes).
    pub fn apply_batch(
        &self,
        events: Vec<NewEvent>,
    ) -> Result<(Projection, AppliedBatch), Refusal> {
        let mut next = self.clone();
        let mut applied = AppliedBatch {
            events: Vec::with_capacity(events.len()),
            ..AppliedBatch::default()
        };
        for NewEvent { turn, kind } in events {
            next.apply(turn, &kind, &mut applied)?;
            applied.events.push(SessionEvent {
                session_id: String::new(),
                seq: next.last_seq,
                time: None,
                turn,
                kind: Some(kind),
            });
        }
        Ok((next, applied))
    }

    /// Applies one event of `turn`, noting its effects in `applied`.
    /// Refuses it, changing nothing, if it cannot follow the log.
    pub fn apply(
        &mut self,
        turn: u32,
        kind: &Kind,
        applied: &mut AppliedBatch,
    ) -> Result<(), Refusal> {
        if self.status == SessionStatus::Finished {
            return Err(Refusal::Finished);
        }
        match kind {
            Kind::ApprovalRequested(requested) => {
                self.forget_pending(&requested.call_id);
                self.pending_approvals.push(PendingApproval {
                    call_id: requested.call_id.clone(),
                    turn,
                });
                applied.approvals_requested.push(RequestedApproval {
                    call_id: requested.call_id.clone(),
                    turn,
                    seq: self.last_seq + 1,
                });
            }
            Kind::ApprovalResolved(resolved) => {
                if !self.forget_pending(&resolved.call_id) {
                    return Err(Refusal::ApprovalNotPending {
                        call_id: resolved.call_id.clone(),
                    });
                }
                applied.approvals_resolved.push(resolved.call_id.clone());
            }
            Kind::UserMessage(message) if !self.accepts_reply_to(message.reply_to_seq) => {
                return Err(Refusal::NotWaitingForInput);
            }
            Kind::InputClosed(_) if self.status != SessionStatus::WaitingForInput => {
                return Err(Refusal::NotWaitingForInput);
            }
            Kind::Finished(finished) => {
                self.pending_approvals.clear();
                self.stop_reason = finished.stop_reason();
                self.final_output.clone_from(&finished.final_output);
                applied.finished = true;
            }
            _ => {}
        }
        self.last_seq += 1;
        if let Some(status) = status_after(kind, &self.pending_approvals) {
            self.status = status;
        }
        event::apply_to_usage(&mut self.usage, kind);
        Ok(())
    }

    /// True if a user message answering the event `reply_to_seq` may be
    /// appended: the session waits for input and that event is its latest.
    fn accepts_reply_to(&self, reply_to_seq: u64) -> bool {
        self.status == SessionStatus::WaitingForInput && reply_to_seq == self.last_seq
    }

    /// Drops `call_id` from the pending approvals; false if it was not there.
    fn forget_pending(&mut self, call_id: &str) -> bool {
        let before = self.pending_approvals.len();
        self.pending_approvals
            .retain(|pending| pending.call_id != call_id);
        self.pending_approvals.len() != before
    }
}

/// The status after `kind`, if it changes it; `pending` are the approvals
/// still pending after it.
///
/// The one rule for approvals: a request makes the session await approval;
/// a resolution leaves it awaiting approval while others are still pending
/// and makes it run once none is.
pub fn status_after(kind: &Kind, pending: &[PendingApproval]) -> Option<SessionStatus> {
    match kind {
        Kind::Started(_) | Kind::UserMessage(_) | Kind::InputClosed(_) => {
            Some(SessionStatus::Running)
        }
        Kind::ApprovalRequested(_) => Some(SessionStatus::AwaitingApproval),
        Kind::ApprovalResolved(_) if pending.is_empty() => Some(SessionStatus::Running),
        Kind::ApprovalResolved(_) => Some(SessionStatus::AwaitingApproval),
        Kind::WaitingForInput(_) => Some(SessionStatus::WaitingForInput),
        Kind::Finished(_) => Some(SessionStatus::Finished),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use harness_proto::control::v1::{
        InputClosed, ModelTextDelta, SessionStarted, ToolStarted, TurnCompleted, TurnUsage,
        UserMessage, WaitingForInput,
    };
    use proptest::prelude::*;

    use super::*;
    use crate::store::conformance::{finished, requested, resolved};

    fn batch(turn: u32, kinds: &[Kind]) -> Vec<NewEvent> {
        kinds
            .iter()
            .map(|kind| NewEvent::new(turn, kind.clone()))
            .collect()
    }

    fn pending(calls: &[(&str, u32)]) -> Vec<PendingApproval> {
        calls
            .iter()
            .map(|(call_id, turn)| PendingApproval {
                call_id: (*call_id).to_owned(),
                turn: *turn,
            })
            .collect()
    }

    fn applied(projection: &Projection, turn: u32, kinds: &[Kind]) -> Projection {
        projection
            .apply_batch(batch(turn, kinds))
            .map(|(next, _)| next)
            .unwrap_or_else(|refusal| panic!("refused: {refusal:?}"))
    }

    #[test]
    fn resolving_one_of_several_approvals_keeps_the_session_awaiting_approval() {
        let start = applied(
            &Projection::default(),
            1,
            &[
                Kind::Started(SessionStarted::default()),
                requested("c1"),
                requested("c2"),
            ],
        );
        assert_eq!(start.status, SessionStatus::AwaitingApproval);
        let one_left = applied(&start, 1, &[resolved("c1")]);
        assert_eq!(
            one_left,
            Projection {
                last_seq: 4,
                status: SessionStatus::AwaitingApproval,
                pending_approvals: pending(&[("c2", 1)]),
                ..Projection::default()
            }
        );
        let none_left = applied(&one_left, 1, &[resolved("c2")]);
        assert_eq!(
            none_left,
            Projection {
                last_seq: 5,
                status: SessionStatus::Running,
                ..Projection::default()
            }
        );
    }

    #[test]
    fn a_batch_reports_what_it_changed_for_the_backend_to_write() {
        let (next, changes) = Projection::default()
            .apply_batch(batch(
                2,
                &[
                    Kind::Started(SessionStarted::default()),
                    requested("c1"),
                    resolved("c1"),
                    requested("c2"),
                ],
            ))
            .unwrap();
        assert_eq!(
            changes.approvals_requested,
            [
                RequestedApproval {
                    call_id: "c1".to_owned(),
                    turn: 2,
                    seq: 2
                },
                RequestedApproval {
                    call_id: "c2".to_owned(),
                    turn: 2,
                    seq: 4
                }
            ]
        );
        assert_eq!(changes.approvals_resolved, ["c1"]);
        assert!(!changes.finished);
        assert_eq!(
            changes.events.iter().map(|e| e.seq).collect::<Vec<_>>(),
            [1, 2, 3, 4]
        );
        assert_eq!(next.pending_approvals, pending(&[("c2", 2)]));
    }

    #[test]
    fn finished_records_the_outcome_drops_approvals_and_closes_the_log() {
        let waiting = applied(&Projection::default(), 3, &[requested("c1")]);
        let (done, changes) = waiting.apply_batch(batch(3, &[finished("bye")])).unwrap();
        assert!(changes.finished);
        assert_eq!(
            done,
            Projection {
                last_seq: 2,
                status: SessionStatus::Finished,
                stop_reason: StopReason::Completed,
                final_output: "bye".to_owned(),
                ..Projection::default()
            }
        );
        assert_eq!(
            done.apply_batch(batch(3, &[Kind::TextDelta(ModelTextDelta::default())])),
            Err(Refusal::Finished)
        );
    }

    #[test]
    fn a_refused_event_refuses_its_whole_batch() {
        let start = applied(&Projection::default(), 1, &[requested("c1")]);
        assert_eq!(
            start.apply_batch(batch(1, &[resolved("c1"), resolved("c1")])),
            Err(Refusal::ApprovalNotPending {
                call_id: "c1".to_owned()
            })
        );
        assert_eq!(
            start.apply_batch(batch(1, &[finished(""), finished("")])),
            Err(Refusal::Finished)
        );
    }

    #[test]
    fn a_user_message_lands_only_in_answer_to_the_latest_wait() {
        let message = |reply_to_seq| {
            Kind::UserMessage(UserMessage {
                text: "next".to_owned(),
                idempotency_key: "k".to_owned(),
                reply_to_seq,
                truncated: None,
            })
        };
        let running = applied(
            &Projection::default(),
            1,
            &[Kind::Started(SessionStarted::default())],
        );
        assert_eq!(
            running.apply_batch(batch(1, &[message(1)])),
            Err(Refusal::NotWaitingForInput)
        );
        let waiting = applied(
            &running,
            1,
            &[Kind::WaitingForInput(WaitingForInput::default())],
        );
        assert_eq!(waiting.status, SessionStatus::WaitingForInput);
        // Answering an earlier event: something was appended since.
        assert_eq!(
            waiting.apply_batch(batch(1, &[message(1)])),
            Err(Refusal::NotWaitingForInput)
        );
        let answered = applied(&waiting, 1, &[message(2)]);
        assert_eq!(
            (answered.status, answered.last_seq),
            (SessionStatus::Running, 3)
        );
        // A second message for the same wait (a racing SendMessage).
        assert_eq!(
            answered.apply_batch(batch(1, &[message(2)])),
            Err(Refusal::NotWaitingForInput)
        );
        // Once a message landed, the wait can no longer be closed by its timeout.
        assert_eq!(
            answered.apply_batch(batch(1, &[Kind::InputClosed(InputClosed::default())])),
            Err(Refusal::NotWaitingForInput)
        );
        let closed = applied(&waiting, 1, &[Kind::InputClosed(InputClosed::default())]);
        assert_eq!(closed.status, SessionStatus::Running);
        assert_eq!(
            closed.apply_batch(batch(1, &[message(3)])),
            Err(Refusal::NotWaitingForInput)
        );
    }

    #[test]
    fn a_call_asked_again_is_pending_once_at_its_new_place() {
        let projection = applied(
            &Projection::default(),
            1,
            &[requested("c1"), requested("c2")],
        );
        let again = applied(&projection, 2, &[requested("c1")]);
        assert_eq!(again.pending_approvals, pending(&[("c2", 1), ("c1", 2)]));
    }

    #[test]
    fn only_approval_and_finished_events_touch_approvals() {
        assert!(!touches_approvals(&batch(
            1,
            &[
                Kind::Started(SessionStarted::default()),
                Kind::ToolStarted(ToolStarted::default())
            ]
        )));
        for kind in [requested("c"), resolved("c"), finished("")] {
            assert!(touches_approvals(&batch(1, &[kind])));
        }
    }

    /// Events from a small vocabulary, with few call ids so that
    /// resolutions often match (and sometimes do not).
    fn any_kind() -> impl Strategy<Value = Kind> {
        let call = prop::sample::select(vec!["c1", "c2", "c3"]);
        prop_oneof![
            Just(Kind::Started(SessionStarted::default())),
            Just(Kind::TextDelta(ModelTextDelta::default())),
            (0_u64..40).prop_map(|reply_to_seq| Kind::UserMessage(UserMessage {
                reply_to_seq,
                ..Default::default()
            })),
            Just(Kind::InputClosed(InputClosed::default())),
            Just(Kind::ToolStarted(ToolStarted::default())),
            Just(Kind::WaitingForInput(WaitingForInput::default())),
            (1_u64..100).prop_map(|tokens| Kind::TurnCompleted(TurnCompleted {
                usage: Some(TurnUsage {
                    input_tokens: tokens,
                    output_tokens: tokens / 2,
                    ..Default::default()
                }),
                ..Default::default()
            })),
            call.clone().prop_map(requested),
            call.clone().prop_map(resolved),
            call.prop_map(resolved),
            Just(finished("done")),
        ]
    }

    proptest! {
        /// Appending a history event by event (dropping what is refused)
        /// and appending the accepted events in batches, split anywhere,
        /// end in the same projection; FINISHED exactly when a finished
        /// event was accepted; awaiting approval only with one pending.
        #[test]
        fn batches_in_any_split_project_like_single_events(
            history in prop::collection::vec((0_u32..4, any_kind()), 0..40),
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..8),
        ) {
            let mut one_by_one = Projection::default();
            let mut accepted = Vec::new();
            for (turn, kind) in history {
                if let Ok((next, _)) = one_by_one.apply_batch(vec![NewEvent::new(turn, kind.clone())]) {
                    one_by_one = next;
                    accepted.push(NewEvent::new(turn, kind));
                }
                prop_assert!(
                    one_by_one.status != SessionStatus::AwaitingApproval
                        || !one_by_one.pending_approvals.is_empty()
                );
            }
            let mut bounds: Vec<usize> = cuts.iter().map(|cut| cut.index(accepted.len() + 1)).collect();
            bounds.push(0);
            bounds.push(accepted.len());
            bounds.sort_unstable();
            let mut batched = Projection::default();
            for window in bounds.windows(2) {
                let (next, changes) = batched
                    .apply_batch(accepted[window[0]..window[1]].to_vec())
                    .map_err(|refusal| TestCaseError::fail(format!("{refusal:?}")))?;
                prop_assert_eq!(changes.events.len(), window[1] - window[0]);
                batched = next;
            }
            prop_assert_eq!(&batched, &one_by_one);
            prop_assert_eq!(batched.last_seq, accepted.len() as u64);
            let finished_applied = accepted.iter().any(|event| matches!(event.kind, Kind::Finished(_)));
            prop_assert_eq!(batched.status == SessionStatus::Finished, finished_applied);
        }
    }
}
