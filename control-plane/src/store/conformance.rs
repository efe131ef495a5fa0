//! The conformance suite every [`EventStore`] backend passes: the
//! invariants of [`crate::store`] checked through the trait alone, so a
//! second backend (PostgreSQL) is held to exactly what SQLite is.
//!
//! A backend's tests implement [`StoreHarness`] (open a fresh store; open
//! the same one again after a clean shutdown or after a crash) and call each
//! check from a test of its own, or [`run_all`]. The checks panic on the
//! first difference, comparing whole records and events where they can.
//!
//! Compiled for this crate's tests and with the `conformance` feature.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::SystemTime;

use futures::StreamExt;
use futures::future::join_all;
use harness_proto::control::v1::session_event::Kind;
use harness_proto::control::v1::{
    ApprovalRequested, ApprovalResolved, BudgetLimits, BudgetUsage, ModelTextDelta, SessionEvent,
    SessionFinished, SessionStarted, SessionStatus, StopReason, ToolStarted, TurnCompleted,
    TurnUsage,
};
use tokio::sync::watch;

use super::{
    EventStore, NewEvent, NewSession, PendingApproval, SessionQuery, SessionRecord, StepRecord,
    StoreError,
};
use crate::event_log::{EventLog, FollowMode};
use crate::ids::{SessionId, TenantId};

/// Opens the stores a check runs against.
pub trait StoreHarness: Sync {
    /// The backend under test.
    type Store: EventStore + Clone + 'static;

    /// A new, empty store of its own.
    fn open_fresh(&self) -> impl Future<Output = Self::Store> + Send;

    /// The same store opened again after `store` shut down cleanly (was
    /// dropped).
    fn reopen(&self, store: Self::Store) -> impl Future<Output = Self::Store> + Send;

    /// The same store opened again as a new process would find it had the
    /// one holding `store` been killed now, without a clean shutdown.
    fn reopen_after_crash(&self, store: Self::Store) -> impl Future<Output = Self::Store> + Send;
}

/// Runs every check, one after the other.
pub async fn run_all<H: StoreHarness>(harness: &H) {
    create_is_idempotent_by_tenant_and_key(harness).await;
    appends_are_numbered_without_gaps_and_read_back_by_seq(harness).await;
    followers_see_every_event_once_in_order(harness).await;
    approvals_are_pending_until_resolved_once(harness).await;
    concurrent_appends_to_many_sessions_lose_nothing(harness).await;
    a_refused_write_does_not_fail_the_writes_beside_it(harness).await;
    sessions_list_cancel_and_record_their_sandbox(harness).await;
    everything_committed_survives_a_clean_reopen(harness).await;
    everything_committed_survives_a_crash(harness).await;
}

/// A session of the default tenant.
pub fn new_session(session_id: &str, key: Option<&str>) -> NewSession {
    NewSession {
        session_id: SessionId::new(session_id),
        tenant: TenantId::new("default"),
        agent: "demo".to_owned(),
        input: "hello".to_owned(),
        metadata: HashMap::from([("team".to_owned(), "core".to_owned())]),
        budget: BudgetLimits {
            max_turns: Some(5),
            ..Default::default()
        },
        idempotency_key: key.map(str::to_owned),
        parent: None,
    }
}

/// Test history builder shared by the backends' own tests.
pub fn delta(text: &str) -> Kind {
    Kind::TextDelta(ModelTextDelta {
        text: text.to_owned(),
    })
}

fn turn_completed(input_tokens: u64) -> Kind {
    Kind::TurnCompleted(TurnCompleted {
        usage: Some(TurnUsage {
            input_tokens,
            output_tokens: 1,
            ..Default::default()
        }),
        ..Default::default()
    })
}

/// Test history builder shared by the backends' own tests.
pub fn requested(call: &str) -> Kind {
    Kind::ApprovalRequested(ApprovalRequested {
        call_id: call.to_owned(),
        ..Default::default()
    })
}

/// Test history builder shared by the backends' own tests.
pub fn resolved(call: &str) -> Kind {
    Kind::ApprovalResolved(ApprovalResolved {
        call_id: call.to_owned(),
        ..Default::default()
    })
}

/// Test history builder shared by the backends' own tests.
pub fn finished(output: &str) -> Kind {
    Kind::Finished(SessionFinished {
        stop_reason: StopReason::Completed.into(),
        final_output: output.to_owned(),
        ..Default::default()
    })
}

fn step(name: &str) -> StepRecord {
    StepRecord {
        step: name.to_owned(),
        payload: name.as_bytes().to_vec(),
    }
}

fn time_of(event: &SessionEvent) -> SystemTime {
    SystemTime::try_from(event.time.expect("stored events have a time")).unwrap()
}

async fn session<S: EventStore>(store: &S, session_id: &str) -> SessionRecord {
    store
        .get_session(TenantId::new("default"), SessionId::new(session_id))
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("session {session_id} is missing"))
}

async fn all_events<S: EventStore>(store: &S, session_id: &str) -> Vec<SessionEvent> {
    store
        .read_events(SessionId::new(session_id), 0, usize::MAX)
        .await
        .unwrap()
}

/// `record` after `events` were appended, as the store must show it.
fn advanced(record: &SessionRecord, events: &[SessionEvent], usage: BudgetUsage) -> SessionRecord {
    let last = events.last().expect("at least one event");
    SessionRecord {
        last_seq: last.seq,
        updated_at: time_of(last),
        usage,
        ..record.clone()
    }
}

/// A new session reads back whole, and creating it again with its tenant's
/// idempotency key returns it instead of a second one.
pub async fn create_is_idempotent_by_tenant_and_key<H: StoreHarness>(harness: &H) {
    let store = harness.open_fresh().await;
    let first = store
        .create_session(new_session("s1", Some("k")))
        .await
        .unwrap();
    assert!(first.created);
    assert_eq!(
        first.session,
        SessionRecord {
            session_id: SessionId::new("s1"),
            tenant: TenantId::new("default"),
            agent: "demo".to_owned(),
            input: "hello".to_owned(),
            status: SessionStatus::Pending,
            stop_reason: StopReason::Unspecified,
            metadata: new_session("s1", None).metadata,
            budget: new_session("s1", None).budget,
            usage: BudgetUsage::default(),
            idempotency_key: Some("k".to_owned()),
            created_at: first.session.created_at,
            updated_at: first.session.created_at,
            last_seq: 0,
            final_output: String::new(),
            sandbox_session_id: None,
            cancel_reason: None,
            lineage: Vec::new(),
            sandbox_borrowed: false,
        }
    );
    let again = store
        .create_session(new_session("s2", Some("k")))
        .await
        .unwrap();
    assert!(!again.created);
    assert_eq!(again.session, first.session);
    assert_eq!(session(&store, "s1").await, first.session);
    assert_eq!(
        store
            .get_session(TenantId::new("default"), SessionId::new("s2"))
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        store
            .find_by_idempotency_key(TenantId::new("default"), "k".to_owned())
            .await
            .unwrap(),
        Some(first.session.clone())
    );
    // The key is the tenant's: another tenant's same key is a new session,
    // and neither tenant sees the other's.
    let other = NewSession {
        tenant: TenantId::new("other"),
        ..new_session("s3", Some("k"))
    };
    let other = store.create_session(other).await.unwrap();
    assert!(other.created);
    assert_eq!(
        store
            .get_session(TenantId::new("other"), SessionId::new("s1"))
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        store
            .get_session(TenantId::new("default"), SessionId::new("s3"))
            .await
            .unwrap(),
        None
    );
    // Without a key, every create is a new session.
    for id in ["s4", "s5"] {
        assert!(
            store
                .create_session(new_session(id, None))
                .await
                .unwrap()
                .created
        );
    }
}

/// Appends get `last_seq + 1, …` with no gaps, batches with their steps
/// are read back exactly, from any cursor and with any limit, and the
/// session's progress follows.
pub async fn appends_are_numbered_without_gaps_and_read_back_by_seq<H: StoreHarness>(harness: &H) {
    let store = harness.open_fresh().await;
    let created = store
        .create_session(new_session("s1", None))
        .await
        .unwrap()
        .session;
    let mut appended = Vec::new();
    let mut steps = Vec::new();
    for round in 0..40_u32 {
        let size = 1 + round % 4;
        let events = (0..size)
            .map(|i| NewEvent::new(round, delta(&format!("{round}.{i}"))))
            .chain((round % 5 == 0).then(|| NewEvent::new(round, turn_completed(10))))
            .collect::<Vec<_>>();
        let batch_steps: Vec<StepRecord> = (round % 3 == 0)
            .then(|| step(&format!("model:{round}")))
            .into_iter()
            .collect();
        steps.extend(batch_steps.clone());
        let count = events.len();
        let stored = store
            .append_events(SessionId::new("s1"), events, batch_steps)
            .await
            .unwrap();
        assert_eq!(stored.len(), count);
        appended.extend(stored);
    }
    let seqs: Vec<u64> = appended.iter().map(|event| event.seq).collect();
    assert_eq!(seqs, (1..=appended.len() as u64).collect::<Vec<_>>());
    assert!(appended.iter().all(|event| event.session_id == "s1"));
    assert_eq!(all_events(&store, "s1").await, appended);
    for after in [0, 1, 2, 50, 99, appended.len() as u64 - 1] {
        for limit in [1, 3, 64] {
            let start = usize::try_from(after).unwrap();
            let expected = &appended[start..(start + limit).min(appended.len())];
            assert_eq!(
                store
                    .read_events(SessionId::new("s1"), after, limit)
                    .await
                    .unwrap(),
                expected,
                "after {after}, limit {limit}"
            );
        }
    }
    assert_eq!(
        store
            .read_events(SessionId::new("s1"), appended.len() as u64, 10)
            .await
            .unwrap(),
        []
    );
    assert_eq!(store.read_steps(SessionId::new("s1")).await.unwrap(), steps);
    let usage = BudgetUsage {
        turns: 8,
        input_tokens: 80,
        output_tokens: 8,
        ..Default::default()
    };
    assert_eq!(
        session(&store, "s1").await,
        SessionRecord {
            status: SessionStatus::Pending,
            ..advanced(&created, &appended, usage)
        }
    );
    let unknown = store
        .append_event(SessionId::new("nope"), 0, delta("x"))
        .await;
    assert!(
        matches!(&unknown, Err(StoreError::UnknownSession(id)) if id == "nope"),
        "{unknown:?}"
    );
    assert_eq!(
        store
            .read_events(SessionId::new("nope"), 0, 10)
            .await
            .unwrap(),
        []
    );
}

/// A follower of the log (through [`EventLog`]) sees every event after its
/// cursor exactly once, in order, while appends race with it.
pub async fn followers_see_every_event_once_in_order<H: StoreHarness>(harness: &H) {
    let store = harness.open_fresh().await;
    store.create_session(new_session("s1", None)).await.unwrap();
    let (_shutdown, shutdown_signal) = watch::channel(false);
    let log = EventLog::new(Arc::new(store.clone()), shutdown_signal);
    log.append(
        &SessionId::new("s1"),
        0,
        Kind::Started(SessionStarted::default()),
    )
    .await
    .unwrap();
    let from_start = log.follow(
        &TenantId::new("default"),
        &SessionId::new("s1"),
        0,
        FollowMode::UntilFinished,
    );
    let from_ten = log.follow(
        &TenantId::new("default"),
        &SessionId::new("s1"),
        10,
        FollowMode::UntilFinished,
    );
    let writer = {
        let log = log.clone();
        tokio::spawn(async move {
            for i in 0..60 {
                let events = vec![NewEvent::new(1, delta(&i.to_string())); 1 + i % 3];
                log.append_batch(&SessionId::new("s1"), events, Vec::new())
                    .await
                    .unwrap();
                if i % 10 == 0 {
                    tokio::task::yield_now().await;
                }
            }
            log.append(&SessionId::new("s1"), 1, finished("done"))
                .await
                .unwrap();
        })
    };
    let from_start: Vec<SessionEvent> = from_start.map(Result::unwrap).collect().await;
    let from_ten: Vec<SessionEvent> = from_ten.map(Result::unwrap).collect().await;
    writer.await.unwrap();
    let stored = all_events(&store, "s1").await;
    assert_eq!(from_start, stored);
    assert_eq!(from_ten, stored[10..]);
    // A follower of a finished log from its end gets nothing and ends.
    let end = stored.last().unwrap().seq;
    let late: Vec<_> = log
        .follow(
            &TenantId::new("default"),
            &SessionId::new("s1"),
            end,
            FollowMode::UntilFinished,
        )
        .collect()
        .await;
    assert!(late.is_empty(), "{late:?}");
}

/// Approvals are pending from their request until one resolution (a
/// second is refused); the status follows [`super::projection`].
pub async fn approvals_are_pending_until_resolved_once<H: StoreHarness>(harness: &H) {
    let store = harness.open_fresh().await;
    store.create_session(new_session("s1", None)).await.unwrap();
    let status = |store: H::Store| async move { session(&store, "s1").await.status };
    let pending = |calls: &[(&str, u32)]| -> Vec<PendingApproval> {
        calls
            .iter()
            .map(|(call_id, turn)| PendingApproval {
                call_id: (*call_id).to_owned(),
                turn: *turn,
            })
            .collect()
    };
    store
        .append_events(
            SessionId::new("s1"),
            vec![
                NewEvent::new(0, Kind::Started(SessionStarted::default())),
                NewEvent::new(2, requested("c1")),
                NewEvent::new(2, requested("c2")),
            ],
            Vec::new(),
        )
        .await
        .unwrap();
    assert_eq!(status(store.clone()).await, SessionStatus::AwaitingApproval);
    assert_eq!(
        store.pending_approvals(SessionId::new("s1")).await.unwrap(),
        pending(&[("c1", 2), ("c2", 2)])
    );
    store
        .append_event(SessionId::new("s1"), 2, resolved("c1"))
        .await
        .unwrap();
    assert_eq!(status(store.clone()).await, SessionStatus::AwaitingApproval);
    assert_eq!(
        store.pending_approvals(SessionId::new("s1")).await.unwrap(),
        pending(&[("c2", 2)])
    );
    let before = session(&store, "s1").await;
    let twice = store
        .append_event(SessionId::new("s1"), 2, resolved("c1"))
        .await;
    assert!(
        matches!(&twice, Err(StoreError::ApprovalNotPending { session_id, call_id })
            if session_id == "s1" && call_id == "c1"),
        "{twice:?}"
    );
    assert_eq!(session(&store, "s1").await, before);
    store
        .append_event(SessionId::new("s1"), 2, resolved("c2"))
        .await
        .unwrap();
    assert_eq!(status(store.clone()).await, SessionStatus::Running);
    assert_eq!(
        store.pending_approvals(SessionId::new("s1")).await.unwrap(),
        []
    );
    // Finishing drops what is still pending.
    store
        .append_events(
            SessionId::new("s1"),
            vec![
                NewEvent::new(3, requested("c3")),
                NewEvent::new(3, finished("bye")),
            ],
            Vec::new(),
        )
        .await
        .unwrap();
    assert_eq!(
        store.pending_approvals(SessionId::new("s1")).await.unwrap(),
        []
    );
    let done = session(&store, "s1").await;
    assert_eq!(
        (done.status, done.stop_reason, done.final_output.as_str()),
        (SessionStatus::Finished, StopReason::Completed, "bye")
    );
}

/// Many tasks appending to many sessions at once (so that writes share
/// commits): every append gets its own seqs, each session's seqs are
/// gap-free, and the log holds exactly the events returned.
pub async fn concurrent_appends_to_many_sessions_lose_nothing<H: StoreHarness>(harness: &H) {
    const SESSIONS: usize = 24;
    const TASKS_PER_SESSION: usize = 4;
    const APPENDS_PER_TASK: usize = 15;
    let store = harness.open_fresh().await;
    for index in 0..SESSIONS {
        store
            .create_session(new_session(&format!("s{index}"), None))
            .await
            .unwrap();
    }
    let tasks = (0..SESSIONS * TASKS_PER_SESSION).map(|task| {
        let store = store.clone();
        tokio::spawn(async move {
            let session_id = SessionId::new(format!("s{}", task % SESSIONS));
            let mut stored = Vec::new();
            for append in 0..APPENDS_PER_TASK {
                let events = vec![
                    NewEvent::new(1, delta(&format!("{task}.{append}"))),
                    NewEvent::new(1, Kind::ToolStarted(ToolStarted::default())),
                ];
                let batch = store
                    .append_events(
                        session_id.clone(),
                        events,
                        vec![step(&format!("{task}.{append}"))],
                    )
                    .await
                    .unwrap();
                stored.extend(batch);
            }
            (session_id, stored)
        })
    });
    let mut returned: HashMap<SessionId, Vec<SessionEvent>> = HashMap::new();
    for task in join_all(tasks).await {
        let (session_id, stored) = task.unwrap();
        returned.entry(session_id).or_default().extend(stored);
    }
    let per_session = (TASKS_PER_SESSION * APPENDS_PER_TASK * 2) as u64;
    for (session_id, mut events) in returned {
        events.sort_by_key(|event| event.seq);
        assert_eq!(
            events.iter().map(|event| event.seq).collect::<Vec<_>>(),
            (1..=per_session).collect::<Vec<_>>(),
            "session {session_id}"
        );
        assert_eq!(all_events(&store, session_id.as_str()).await, events);
        let record = session(&store, session_id.as_str()).await;
        assert_eq!(
            (record.last_seq, record.usage.tool_calls),
            (per_session, u32::try_from(per_session / 2).unwrap())
        );
        assert_eq!(
            store.read_steps(session_id).await.unwrap().len() as u64,
            per_session / 2
        );
    }
}

/// Writes that are refused (to a finished session, an approval not pending,
/// steps without events, an unknown session) fail alone: the writes issued
/// at the same moment, which may share their commit, all take effect, and
/// the refused ones leave no trace.
pub async fn a_refused_write_does_not_fail_the_writes_beside_it<H: StoreHarness>(harness: &H) {
    const LIVE: usize = 8;
    let store = harness.open_fresh().await;
    for index in 0..LIVE {
        store
            .create_session(new_session(&format!("live{index}"), None))
            .await
            .unwrap();
    }
    store
        .create_session(new_session("done", None))
        .await
        .unwrap();
    store
        .append_event(SessionId::new("done"), 1, finished("over"))
        .await
        .unwrap();
    store
        .create_session(new_session("calm", None))
        .await
        .unwrap();
    let done_before = session(&store, "done").await;
    let calm_before = session(&store, "calm").await;
    for round in 0..5 {
        // Every write is issued before any is awaited.
        let good: Vec<_> = (0..LIVE)
            .map(|index| {
                store.append_event(
                    SessionId::new(format!("live{index}")),
                    round,
                    delta(&round.to_string()),
                )
            })
            .collect();
        let after_finish = store.append_event(SessionId::new("done"), round, delta("late"));
        let not_pending = store.append_event(SessionId::new("calm"), round, resolved("c1"));
        let lonely_steps = store.append_events(SessionId::new("calm"), Vec::new(), vec![step("x")]);
        let unknown = store.append_event(SessionId::new("ghost"), round, delta("boo"));
        let cancel_finished = store.request_cancel(SessionId::new("done"), "late".to_owned());
        let (good, after_finish, not_pending, lonely_steps, unknown, cancel_finished) = tokio::join!(
            join_all(good),
            after_finish,
            not_pending,
            lonely_steps,
            unknown,
            cancel_finished
        );
        for (index, event) in good.into_iter().enumerate() {
            let event = event.unwrap_or_else(|error| panic!("live{index}: {error:?}"));
            assert_eq!(event.seq, u64::from(round) + 1);
        }
        assert!(
            matches!(&after_finish, Err(StoreError::SessionFinished(id)) if id == "done"),
            "{after_finish:?}"
        );
        assert!(
            matches!(&not_pending, Err(StoreError::ApprovalNotPending { call_id, .. }) if call_id == "c1"),
            "{not_pending:?}"
        );
        assert!(
            matches!(&lonely_steps, Err(StoreError::StepsWithoutEvents(id)) if id == "calm"),
            "{lonely_steps:?}"
        );
        assert!(
            matches!(&unknown, Err(StoreError::UnknownSession(id)) if id == "ghost"),
            "{unknown:?}"
        );
        assert!(
            matches!(&cancel_finished, Err(StoreError::SessionFinished(id)) if id == "done"),
            "{cancel_finished:?}"
        );
    }
    for index in 0..LIVE {
        let events = all_events(&store, &format!("live{index}")).await;
        assert_eq!(
            events
                .iter()
                .map(|event| (event.seq, event.kind.clone()))
                .collect::<Vec<_>>(),
            (0..5_u32)
                .map(|round| (u64::from(round) + 1, Some(delta(&round.to_string()))))
                .collect::<Vec<_>>()
        );
    }
    assert_eq!(session(&store, "done").await, done_before);
    assert_eq!(session(&store, "calm").await, calm_before);
    assert_eq!(all_events(&store, "calm").await, []);
    assert_eq!(store.read_steps(SessionId::new("calm")).await.unwrap(), []);
}

/// Listing pages newest first with filters; cancellation is recorded once;
/// the sandbox session is recorded; unfinished sessions are listed for
/// recovery.
pub async fn sessions_list_cancel_and_record_their_sandbox<H: StoreHarness>(harness: &H) {
    let store = harness.open_fresh().await;
    let mut created = Vec::new();
    for id in ["s1", "s2", "s3"] {
        created.push(
            store
                .create_session(new_session(id, None))
                .await
                .unwrap()
                .session,
        );
        // Distinct creation times make the order unambiguous.
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
    let query = SessionQuery {
        tenant: TenantId::new("default"),
        agent: None,
        status: None,
        page_size: 2,
        page_token: None,
        parent: None,
    };
    let first = store.list_sessions(query.clone()).await.unwrap();
    assert_eq!(first.sessions, [created[2].clone(), created[1].clone()]);
    let second = store
        .list_sessions(SessionQuery {
            page_token: first.next_page_token.clone(),
            ..query.clone()
        })
        .await
        .unwrap();
    assert_eq!(second.sessions, [created[0].clone()]);
    assert_eq!(second.next_page_token, None);
    let other_agent = store
        .list_sessions(SessionQuery {
            agent: Some("other".to_owned()),
            ..query.clone()
        })
        .await
        .unwrap();
    assert_eq!(other_agent.sessions, []);
    let bad = store
        .list_sessions(SessionQuery {
            page_token: Some("garbage".to_owned()),
            ..query.clone()
        })
        .await;
    assert!(matches!(bad, Err(StoreError::BadPageToken(_))), "{bad:?}");

    store
        .set_sandbox_session(SessionId::new("s1"), "sb-1".to_owned())
        .await
        .unwrap();
    store
        .request_cancel(SessionId::new("s1"), "first".to_owned())
        .await
        .unwrap();
    store
        .request_cancel(SessionId::new("s1"), "second".to_owned())
        .await
        .unwrap();
    assert_eq!(
        session(&store, "s1").await,
        SessionRecord {
            sandbox_session_id: Some("sb-1".to_owned()),
            cancel_reason: Some("first".to_owned()),
            ..created[0].clone()
        }
    );
    let unknown = store
        .set_sandbox_session(SessionId::new("ghost"), "sb".to_owned())
        .await;
    assert!(
        matches!(unknown, Err(StoreError::UnknownSession(_))),
        "{unknown:?}"
    );
    let unknown = store
        .request_cancel(SessionId::new("ghost"), String::new())
        .await;
    assert!(
        matches!(unknown, Err(StoreError::UnknownSession(_))),
        "{unknown:?}"
    );

    store
        .append_event(SessionId::new("s2"), 1, finished(""))
        .await
        .unwrap();
    let unfinished: Vec<SessionId> = store
        .list_unfinished_sessions()
        .await
        .unwrap()
        .into_iter()
        .map(|session| session.session_id)
        .collect();
    assert_eq!(unfinished, ["s1", "s3"]);
}

/// Everything a check can read about some sessions.
#[derive(Debug, PartialEq)]
struct Snapshot {
    sessions: Vec<SessionRecord>,
    events: Vec<Vec<SessionEvent>>,
    steps: Vec<Vec<StepRecord>>,
    pending: Vec<Vec<PendingApproval>>,
}

async fn snapshot<S: EventStore>(store: &S, ids: &[&str]) -> Snapshot {
    let mut snapshot = Snapshot {
        sessions: Vec::new(),
        events: Vec::new(),
        steps: Vec::new(),
        pending: Vec::new(),
    };
    for id in ids {
        snapshot.sessions.push(session(store, id).await);
        snapshot.events.push(all_events(store, id).await);
        snapshot
            .steps
            .push(store.read_steps(SessionId::new(*id)).await.unwrap());
        snapshot
            .pending
            .push(store.pending_approvals(SessionId::new(*id)).await.unwrap());
    }
    snapshot
}

const DURABLE_SESSIONS: [&str; 3] = ["s1", "s2", "s3"];

/// Sessions in every state: several batches each (so their newest batch
/// moved since the first), steps, a pending approval, a cancellation, a
/// sandbox session, one finished.
async fn write_durable_history<S: EventStore>(store: &S) {
    for id in DURABLE_SESSIONS {
        store.create_session(new_session(id, None)).await.unwrap();
    }
    for round in 1..=6_u32 {
        for id in DURABLE_SESSIONS {
            store
                .append_events(
                    SessionId::new(id),
                    vec![
                        NewEvent::new(round, delta("x")),
                        NewEvent::new(round, turn_completed(u64::from(round))),
                    ],
                    vec![step(&format!("model:{round}"))],
                )
                .await
                .unwrap();
        }
    }
    store
        .append_event(SessionId::new("s1"), 7, requested("c1"))
        .await
        .unwrap();
    store
        .set_sandbox_session(SessionId::new("s2"), "sb-2".to_owned())
        .await
        .unwrap();
    store
        .request_cancel(SessionId::new("s2"), "stop".to_owned())
        .await
        .unwrap();
    store
        .append_event(SessionId::new("s3"), 7, finished("done"))
        .await
        .unwrap();
}

/// After the store's last writes, what `reopened` shows equals what the
/// store showed, and appending continues the numbering.
async fn assert_recovered<S: EventStore>(before: &Snapshot, reopened: &S) {
    assert_eq!(&snapshot(reopened, &DURABLE_SESSIONS).await, before);
    let unfinished: Vec<SessionRecord> = reopened.list_unfinished_sessions().await.unwrap();
    assert_eq!(unfinished, before.sessions[..2]);
    let next = reopened
        .append_event(SessionId::new("s1"), 7, resolved("c1"))
        .await
        .unwrap();
    assert_eq!(next.seq, before.sessions[0].last_seq + 1);
    assert_eq!(
        reopened
            .read_events(SessionId::new("s1"), next.seq - 1, 10)
            .await
            .unwrap(),
        [next]
    );
}

/// A store shut down cleanly and opened again shows everything it had.
pub async fn everything_committed_survives_a_clean_reopen<H: StoreHarness>(harness: &H) {
    let store = harness.open_fresh().await;
    write_durable_history(&store).await;
    let before = snapshot(&store, &DURABLE_SESSIONS).await;
    let reopened = harness.reopen(store).await;
    assert_recovered(&before, &reopened).await;
}

/// A store whose process died without shutting it down, opened again,
/// shows everything that was committed: no event, step, session change or
/// head of a session's log is lost.
pub async fn everything_committed_survives_a_crash<H: StoreHarness>(harness: &H) {
    let store = harness.open_fresh().await;
    write_durable_history(&store).await;
    let before = snapshot(&store, &DURABLE_SESSIONS).await;
    let reopened = harness.reopen_after_crash(store).await;
    assert_recovered(&before, &reopened).await;
}
