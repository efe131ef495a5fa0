//! The durable record: sessions, their append-only event logs, and step
//! records.
//!
//! [`EventStore`] is what the rest of the crate sees; [`sqlite::SqliteStore`]
//! is the embedded implementation. A PostgreSQL implementation for several
//! replicas can follow behind the same trait without touching the loop.
//!
//! Invariants every implementation keeps:
//! - Each session's events are numbered 1, 2, 3, … with no gaps and no
//!   duplicates, also across restarts: appending assigns `last_seq + 1` and
//!   updates the session row in the same transaction.
//! - A batch of events (and the step records that go with them) is appended
//!   atomically: all or nothing.
//! - `finished` is the last event: appending after it fails.
//! - The session row (status, stop reason, final output, usage, pending
//!   approvals) is derived from the events by [`projection`], the one set of
//!   rules every backend applies, in the same transaction that appends them,
//!   so the row never disagrees with the log.
//! - An `approval_resolved` event is accepted only for a call whose
//!   `approval_requested` is still pending, so a human and a timeout (or two
//!   humans) cannot both resolve one call.

pub mod change_feed;
#[cfg(any(test, feature = "conformance"))]
pub mod conformance;
pub mod projection;
pub mod sqlite;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::SystemTime;

use futures::future::BoxFuture;
use harness_proto::control::v1::session_event::Kind;
use harness_proto::control::v1::{
    BudgetLimits, BudgetUsage, Session, SessionEvent, SessionStatus, StopReason,
};

use crate::ids::{SessionId, TenantId};

pub use change_feed::{ChangeFeed, ChangeSubscription, FeedClosed, InProcessChangeFeed};
pub use sqlite::{SqliteOptions, SqliteStore, SqliteSynchronous};

/// A session to create.
#[derive(Debug, Clone, PartialEq)]
pub struct NewSession {
    /// Id chosen by the caller (a UUID).
    pub session_id: SessionId,
    /// Owning tenant.
    pub tenant: TenantId,
    /// Agent name.
    pub agent: String,
    /// The first user message.
    pub input: String,
    /// Caller metadata.
    pub metadata: HashMap<String, String>,
    /// Effective budget.
    pub budget: BudgetLimits,
    /// Idempotency key; `None` never matches another session.
    pub idempotency_key: Option<String>,
    /// For a subagent: the session that delegated to it.
    pub parent: Option<Parentage>,
}

/// Where a subagent's session sits in its tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parentage {
    /// Its ancestors, the top-level session first and its parent last.
    pub lineage: Vec<SessionId>,
    /// The parent's sandbox session, which the child works in (shared
    /// workspace) and must never destroy; `None`: it gets its own.
    pub borrowed_sandbox: Option<String>,
}

impl Parentage {
    /// The session that delegated.
    pub fn parent(&self) -> Option<&SessionId> {
        self.lineage.last()
    }
}

/// A stored session.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionRecord {
    /// Session id.
    pub session_id: SessionId,
    /// Owning tenant.
    pub tenant: TenantId,
    /// Agent name.
    pub agent: String,
    /// The first user message.
    pub input: String,
    /// Lifecycle status.
    pub status: SessionStatus,
    /// Why it stopped, once finished.
    pub stop_reason: StopReason,
    /// Caller metadata.
    pub metadata: HashMap<String, String>,
    /// Effective budget.
    pub budget: BudgetLimits,
    /// Usage derived from the events so far.
    pub usage: BudgetUsage,
    /// Idempotency key it was created with.
    pub idempotency_key: Option<String>,
    /// Creation time.
    pub created_at: SystemTime,
    /// Time of the latest event (or creation).
    pub updated_at: SystemTime,
    /// Sequence number of the latest event; 0 before the first.
    pub last_seq: u64,
    /// Final (or partial) answer, once finished.
    pub final_output: String,
    /// The sandboxd session running its tools, once created.
    pub sandbox_session_id: Option<String>,
    /// Set once CancelSession was called: the reason. A session resumed
    /// after a restart with this set stops as cancelled.
    pub cancel_reason: Option<String>,
    /// Its ancestors (top-level session first); empty for a top-level
    /// session.
    pub lineage: Vec<SessionId>,
    /// Its sandbox session belongs to its parent: it never destroys it.
    pub sandbox_borrowed: bool,
}

impl SessionRecord {
    /// The session as the API shows it. `now` fills in the wall clock of a
    /// session that has not finished.
    pub fn to_proto(&self, now: SystemTime) -> Session {
        let mut usage = self.usage;
        if usage.wall_clock.is_none() {
            let end = if self.status == SessionStatus::Finished {
                self.updated_at
            } else {
                now
            };
            let elapsed = end.duration_since(self.created_at).unwrap_or_default();
            usage.wall_clock = Some(harness_proto::duration_to_proto(elapsed));
        }
        Session {
            session_id: self.session_id.as_str().to_owned(),
            agent: self.agent.clone(),
            status: self.status.into(),
            stop_reason: self.stop_reason.into(),
            tenant: self.tenant.as_str().to_owned(),
            metadata: self.metadata.clone(),
            created_at: Some(harness_proto::timestamp_to_proto(self.created_at)),
            updated_at: Some(harness_proto::timestamp_to_proto(self.updated_at)),
            last_seq: self.last_seq,
            budget: Some(self.budget),
            usage: Some(usage),
            final_output: self.final_output.clone(),
            parent_session_id: self
                .parent_session_id()
                .map(|parent| parent.as_str().to_owned())
                .unwrap_or_default(),
            lineage: self
                .lineage
                .iter()
                .map(|id| id.as_str().to_owned())
                .collect(),
        }
    }

    /// The session that delegated to this one, if it is a subagent.
    pub fn parent_session_id(&self) -> Option<&SessionId> {
        self.lineage.last()
    }
}

/// The result of [`EventStore::create_session`].
#[derive(Debug, Clone, PartialEq)]
pub struct CreatedSession {
    /// The new session, or the one created earlier with the same idempotency key.
    pub session: SessionRecord,
    /// False if the idempotency key matched an existing session.
    pub created: bool,
}

/// Which sessions to list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionQuery {
    /// Only this tenant's sessions.
    pub tenant: TenantId,
    /// Only sessions of this agent.
    pub agent: Option<String>,
    /// Only sessions in this status.
    pub status: Option<SessionStatus>,
    /// Only the subagents of this session.
    pub parent: Option<SessionId>,
    /// Maximum sessions to return (at least 1).
    pub page_size: usize,
    /// Continue after this token from a previous page.
    pub page_token: Option<String>,
}

/// A page of sessions, newest first.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionPage {
    /// The sessions.
    pub sessions: Vec<SessionRecord>,
    /// Token for the next page; `None` on the last page.
    pub next_page_token: Option<String>,
}

/// An event to append.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    /// The model turn it belongs to (0 before the first turn).
    pub turn: u32,
    /// What happened.
    pub kind: Kind,
}

impl NewEvent {
    /// An event of `turn`.
    pub fn new(turn: u32, kind: Kind) -> Self {
        Self { turn, kind }
    }
}

/// A step record: what the loop needs to replay a step instead of running
/// it again, beyond what the events say (the completed model turn with its
/// usage; the exact request sent to sandboxd). Named per session, e.g.
/// `model:3` or `invoke:call_3_0`; read back in the order written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepRecord {
    /// Unique name within the session.
    pub step: String,
    /// Encoded content (a protobuf message).
    pub payload: Vec<u8>,
}

/// A tool call waiting for `ResolveApproval`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingApproval {
    /// The call.
    pub call_id: String,
    /// The turn it belongs to.
    pub turn: u32,
}

/// The error of a storage backend (SQLite's, PostgreSQL's, ...), boxed so
/// that [`StoreError`] names none of them.
pub type BackendError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A backend error shared by every write of a commit group.
pub type SharedBackendError = Arc<dyn std::error::Error + Send + Sync + 'static>;

/// A failed store operation.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store could not be opened or configured.
    #[error("cannot open the store at {location}: {step} failed")]
    Open {
        /// Where the store lives (a file, a database URL without secrets).
        location: String,
        /// What was being done, e.g. "creating its directory".
        step: &'static str,
        /// The backend's error.
        #[source]
        source: BackendError,
    },
    /// A schema migration failed.
    #[error("store migration to schema version {version} failed")]
    Migrate {
        /// The version being migrated to.
        version: usize,
        /// The backend's error.
        #[source]
        source: BackendError,
    },
    /// The store was written by a newer control plane.
    #[error(
        "store schema version {found} is newer than this control plane supports ({supported}); upgrade the control plane"
    )]
    SchemaTooNew {
        /// Version found in the store.
        found: usize,
        /// Newest version this binary knows.
        supported: usize,
    },
    /// A read or write failed in the backend.
    #[error("store error while trying to {step}{}", of_session(session.as_ref()))]
    Backend {
        /// What was being done, e.g. "append events".
        step: &'static str,
        /// The session it was done for, when there is one.
        session: Option<SessionId>,
        /// The backend's error.
        #[source]
        source: BackendError,
    },
    /// No session with this id.
    #[error("no session {0}")]
    UnknownSession(SessionId),
    /// The session already has its `finished` event.
    #[error("session {0} has finished; its event log is closed")]
    SessionFinished(SessionId),
    /// A stored value could not be decoded.
    #[error("corrupt stored data: {0}")]
    Corrupt(String),
    /// An `approval_resolved` for a call that has no pending approval.
    #[error("tool call {call_id} of session {session_id} is not awaiting approval")]
    ApprovalNotPending {
        /// The session.
        session_id: SessionId,
        /// The call.
        call_id: String,
    },
    /// A `user_message` (or `input_closed`) for a session that is not
    /// waiting for input, or that was answered already.
    #[error("session {0} is not waiting for input")]
    NotWaitingForInput(SessionId),
    /// Step records must come with at least one event to ride on.
    #[error("step records for session {0} came without an event")]
    StepsWithoutEvents(SessionId),
    /// Committing a group of writes failed; none of them took effect.
    #[error("store commit failed")]
    Commit(#[source] SharedBackendError),
    /// Another write of the same commit group failed while writing, so the
    /// group was rolled back; nothing of this write took effect.
    #[error("the store write was rolled back with the rest of its commit group")]
    GroupRolledBack,
    /// The writer is gone (the store is shutting down or crashed).
    #[error("the store's writer has stopped")]
    WriterGone,
    /// A page token that this store did not issue.
    #[error("invalid page token {0:?}")]
    BadPageToken(String),
    /// The blocking task running the query failed.
    #[error("store task failed")]
    Task(#[source] tokio::task::JoinError),
}

impl StoreError {
    /// The error with `session_id` as its session, if it is a
    /// [`StoreError::Backend`] error without one.
    #[must_use]
    pub fn for_session(self, session_id: &SessionId) -> Self {
        match self {
            Self::Backend {
                step,
                session: None,
                source,
            } => Self::Backend {
                step,
                session: Some(session_id.clone()),
                source,
            },
            other => other,
        }
    }
}

/// " of session X" for a [`StoreError::Backend`] message, if there is one.
fn of_session(session: Option<&SessionId>) -> String {
    session.map_or_else(String::new, |session| format!(" of session {session}"))
}

/// Durable storage of sessions and events.
pub trait EventStore: Send + Sync + std::fmt::Debug {
    /// Creates a session in status PENDING, or returns the tenant's existing
    /// session with the same idempotency key.
    fn create_session(&self, new: NewSession) -> BoxFuture<'_, Result<CreatedSession, StoreError>>;

    /// The tenant's session created with `key`, if any.
    fn find_by_idempotency_key(
        &self,
        tenant: TenantId,
        key: String,
    ) -> BoxFuture<'_, Result<Option<SessionRecord>, StoreError>>;

    /// One of the tenant's sessions.
    fn get_session(
        &self,
        tenant: TenantId,
        session_id: SessionId,
    ) -> BoxFuture<'_, Result<Option<SessionRecord>, StoreError>>;

    /// A page of the tenant's sessions, newest first.
    fn list_sessions(&self, query: SessionQuery) -> BoxFuture<'_, Result<SessionPage, StoreError>>;

    /// Every tenant's sessions that have not finished (for start-up recovery).
    fn list_unfinished_sessions(&self) -> BoxFuture<'_, Result<Vec<SessionRecord>, StoreError>>;

    /// Records the sandboxd session running a session's tools.
    fn set_sandbox_session(
        &self,
        session_id: SessionId,
        sandbox_session_id: String,
    ) -> BoxFuture<'_, Result<(), StoreError>>;

    /// Appends `events` with the next sequence numbers and stores `steps`
    /// with them (a batch with steps has at least one event), atomically;
    /// returns the events as stored.
    fn append_events(
        &self,
        session_id: SessionId,
        events: Vec<NewEvent>,
        steps: Vec<StepRecord>,
    ) -> BoxFuture<'_, Result<Vec<SessionEvent>, StoreError>>;

    /// Appends one event with the next sequence number and returns it as stored.
    fn append_event(
        &self,
        session_id: SessionId,
        turn: u32,
        kind: Kind,
    ) -> BoxFuture<'_, Result<SessionEvent, StoreError>> {
        let appended = self.append_events(
            session_id.clone(),
            vec![NewEvent::new(turn, kind)],
            Vec::new(),
        );
        Box::pin(async move {
            appended
                .await?
                .pop()
                .ok_or(StoreError::UnknownSession(session_id))
        })
    }

    /// The session's step records, in the order they were written.
    fn read_steps(
        &self,
        session_id: SessionId,
    ) -> BoxFuture<'_, Result<Vec<StepRecord>, StoreError>>;

    /// The session's tool calls awaiting approval, oldest first.
    fn pending_approvals(
        &self,
        session_id: SessionId,
    ) -> BoxFuture<'_, Result<Vec<PendingApproval>, StoreError>>;

    /// Records that the session is to be cancelled, with why (kept until it
    /// finishes, so a restart does not forget it). Fails for a finished session.
    fn request_cancel(
        &self,
        session_id: SessionId,
        reason: String,
    ) -> BoxFuture<'_, Result<(), StoreError>>;

    /// Up to `limit` events with `seq > after_seq`, in order.
    fn read_events(
        &self,
        session_id: SessionId,
        after_seq: u64,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<SessionEvent>, StoreError>>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_backend_error_names_its_step_and_session_and_keeps_its_source() {
        let error = StoreError::Backend {
            step: "append events",
            session: None,
            source: "disk full".into(),
        }
        .for_session(&SessionId::new("s1"));
        assert_eq!(
            crate::error_report::error_chain(&error),
            "store error while trying to append events of session s1: disk full"
        );
        // A session already named is kept.
        assert_eq!(
            error.for_session(&SessionId::new("s2")).to_string(),
            "store error while trying to append events of session s1"
        );
    }
}
