//! Tests of the SQLite backend: its own mechanics (checkpoints, heads,
//! migrations, anchors) and the store conformance suite.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use harness_proto::control::v1::session_event::Kind;
use harness_proto::control::v1::{
    BudgetLimits, BudgetUsage, SessionEvent, SessionFinished, SessionStarted, SessionStatus,
    StopReason, ToolStarted,
};
use prost::Message as _;

use super::checkpoint::{Checkpoint, checkpoint_once};
use super::codec::{StoredBatch, StoredStep, StoredSteps, seq_to_sql};
use super::schema::MIGRATIONS;
use super::*;
use crate::store::conformance::{self, StoreHarness, delta, new_session};

/// A WAL-mode database that never checkpoints by itself, holding
/// `rows` rows of 16 KiB, and the path of its WAL.
fn big_wal(dir: &Path, rows: usize) -> (Connection, PathBuf) {
    let path = dir.join("w.db");
    let connection = Connection::open(&path).unwrap();
    connection
        .pragma_update(None, "journal_mode", "WAL")
        .unwrap();
    connection
        .pragma_update(None, "wal_autocheckpoint", 0)
        .unwrap();
    connection.execute_batch("CREATE TABLE t(x BLOB)").unwrap();
    for _ in 0..rows {
        connection
            .execute("INSERT INTO t VALUES (zeroblob(16384))", [])
            .unwrap();
    }
    (connection, PathBuf::from(format!("{}-wal", path.display())))
}

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().len()
}

#[test]
fn a_wal_over_its_limit_starts_over_and_one_under_it_is_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let (writer, wal) = big_wal(dir.path(), 64);
    let before = file_len(&wal);
    assert!(before > 1 << 20, "{before}");
    let checkpoints = Connection::open(dir.path().join("w.db")).unwrap();
    assert_eq!(
        checkpoint_once(&checkpoints, Some(&wal), before).unwrap(),
        Checkpoint::Passive
    );
    // PASSIVE copies the frames back but never shrinks the file.
    assert_eq!(file_len(&wal), before);
    assert_eq!(
        checkpoint_once(&checkpoints, Some(&wal), 64 << 10).unwrap(),
        Checkpoint::Restarted { wal_bytes: before }
    );
    writer
        .execute("INSERT INTO t VALUES (zeroblob(16))", [])
        .unwrap();
    let rows: i64 = checkpoints
        .query_row("SELECT count(*) FROM t", [], |row| row.get(0))
        .unwrap();
    assert_eq!(rows, 65);
}

#[test]
fn a_reader_on_an_old_snapshot_postpones_the_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (writer, wal) = big_wal(dir.path(), 64);
    let reader = Connection::open(dir.path().join("w.db")).unwrap();
    reader.execute_batch("BEGIN").unwrap();
    let _: i64 = reader
        .query_row("SELECT count(*) FROM t", [], |row| row.get(0))
        .unwrap();
    writer
        .execute("INSERT INTO t VALUES (zeroblob(16384))", [])
        .unwrap();
    let checkpoints = Connection::open(dir.path().join("w.db")).unwrap();
    checkpoints.busy_timeout(Duration::from_millis(10)).unwrap();
    let wal_bytes = file_len(&wal);
    assert_eq!(
        checkpoint_once(&checkpoints, Some(&wal), 64 << 10).unwrap(),
        Checkpoint::RestartBusy { wal_bytes }
    );
    reader.execute_batch("COMMIT").unwrap();
    assert_eq!(
        checkpoint_once(&checkpoints, Some(&wal), 64 << 10).unwrap(),
        Checkpoint::Restarted { wal_bytes }
    );
}

/// SQLite stores in one temporary directory, for the conformance suite.
struct Harness {
    dir: tempfile::TempDir,
    opened: std::sync::atomic::AtomicUsize,
}

impl Harness {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
            opened: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    fn new_path(&self) -> PathBuf {
        let number = self
            .opened
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.dir.path().join(format!("store-{number}.db"))
    }
}

impl StoreHarness for Harness {
    type Store = SqliteStore;

    fn open_fresh(&self) -> impl Future<Output = SqliteStore> + Send {
        let path = self.new_path();
        async move { SqliteStore::open(&path).await.unwrap() }
    }

    async fn reopen(&self, store: SqliteStore) -> SqliteStore {
        let path = store.path().to_owned();
        drop(store);
        SqliteStore::open(&path).await.unwrap()
    }

    /// Opens a copy of the files as a crash leaves them (the WAL first,
    /// so a checkpoint between the copies loses nothing), while the
    /// store still runs; only then is it dropped.
    fn reopen_after_crash(&self, store: SqliteStore) -> impl Future<Output = SqliteStore> + Send {
        let image = self.new_path();
        async move {
            let wal = |path: &Path| PathBuf::from(format!("{}-wal", path.display()));
            std::fs::copy(wal(store.path()), wal(&image)).unwrap();
            std::fs::copy(store.path(), &image).unwrap();
            let reopened = SqliteStore::open(&image).await.unwrap();
            drop(store);
            reopened
        }
    }
}

#[tokio::test]
async fn conformance_create_is_idempotent_by_tenant_and_key() {
    conformance::create_is_idempotent_by_tenant_and_key(&Harness::new()).await;
}

#[tokio::test]
async fn conformance_appends_are_numbered_without_gaps_and_read_back_by_seq() {
    conformance::appends_are_numbered_without_gaps_and_read_back_by_seq(&Harness::new()).await;
}

#[tokio::test]
async fn conformance_followers_see_every_event_once_in_order() {
    conformance::followers_see_every_event_once_in_order(&Harness::new()).await;
}

#[tokio::test]
async fn conformance_approvals_are_pending_until_resolved_once() {
    conformance::approvals_are_pending_until_resolved_once(&Harness::new()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conformance_concurrent_appends_to_many_sessions_lose_nothing() {
    conformance::concurrent_appends_to_many_sessions_lose_nothing(&Harness::new()).await;
}

#[tokio::test]
async fn conformance_a_refused_write_does_not_fail_the_writes_beside_it() {
    conformance::a_refused_write_does_not_fail_the_writes_beside_it(&Harness::new()).await;
}

#[tokio::test]
async fn conformance_sessions_list_cancel_and_record_their_sandbox() {
    conformance::sessions_list_cancel_and_record_their_sandbox(&Harness::new()).await;
}

#[tokio::test]
async fn conformance_everything_committed_survives_a_clean_reopen() {
    conformance::everything_committed_survives_a_clean_reopen(&Harness::new()).await;
}

#[tokio::test]
async fn conformance_everything_committed_survives_a_crash() {
    conformance::everything_committed_survives_a_crash(&Harness::new()).await;
}

async fn open_temp() -> (tempfile::TempDir, SqliteStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("nested/cp.db"))
        .await
        .unwrap();
    (dir, store)
}

#[tokio::test]
async fn events_drive_status_usage_and_close_the_log_at_finished() {
    let (_dir, store) = open_temp().await;
    store.create_session(new_session("s1", None)).await.unwrap();
    store
        .append_event(
            SessionId::new("s1"),
            0,
            Kind::Started(SessionStarted::default()),
        )
        .await
        .unwrap();
    let running = store
        .get_session(TenantId::new("default"), SessionId::new("s1"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(running.status, SessionStatus::Running);
    store
        .append_event(
            SessionId::new("s1"),
            1,
            Kind::ToolStarted(ToolStarted::default()),
        )
        .await
        .unwrap();
    let finished = Kind::Finished(SessionFinished {
        stop_reason: StopReason::Completed.into(),
        final_output: "done".to_owned(),
        ..Default::default()
    });
    store
        .append_event(SessionId::new("s1"), 1, finished)
        .await
        .unwrap();
    let record = store
        .get_session(TenantId::new("default"), SessionId::new("s1"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (
            record.status,
            record.stop_reason,
            record.final_output.as_str(),
            record.last_seq
        ),
        (SessionStatus::Finished, StopReason::Completed, "done", 3)
    );
    assert_eq!(record.usage.tool_calls, 1);
    let late = store
        .append_event(SessionId::new("s1"), 1, delta("late"))
        .await;
    assert!(matches!(late, Err(StoreError::SessionFinished(id)) if id == "s1"));
    assert_eq!(store.list_unfinished_sessions().await.unwrap(), []);
}

/// The heads of a running session live in `FreshHeads` until saved;
/// a crash image (the database and its WAL, as a crash leaves them) has
/// stale rows in `session_heads`, and opening it recovers them from the
/// batches.
#[tokio::test]
async fn heads_not_saved_before_a_crash_are_recovered_from_the_batches() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cp.db");
    let store = SqliteStore::open(&path).await.unwrap();
    store.create_session(new_session("s1", None)).await.unwrap();
    store.create_session(new_session("s2", None)).await.unwrap();
    let turn = |turn: u32| {
        Kind::TurnCompleted(harness_proto::control::v1::TurnCompleted {
            turn,
            usage: Some(harness_proto::control::v1::TurnUsage {
                input_tokens: 10,
                output_tokens: 1,
                ..Default::default()
            }),
            ..Default::default()
        })
    };
    for round in 1..=3 {
        for session in ["s1", "s2"] {
            store
                .append_events(
                    SessionId::new(session),
                    vec![
                        NewEvent::new(round, delta("x")),
                        NewEvent::new(round, turn(round)),
                    ],
                    vec![StepRecord {
                        step: format!("step {round}"),
                        payload: vec![],
                    }],
                )
                .await
                .unwrap();
        }
    }
    let live = store
        .get_session(TenantId::new("default"), SessionId::new("s1"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!((live.last_seq, live.usage.turns), (6, 3));

    // The crash image: copies of the files while the store is open.
    let image = dir.path().join("image.db");
    std::fs::copy(&path, &image).unwrap();
    std::fs::copy(
        dir.path().join("cp.db-wal"),
        dir.path().join("image.db-wal"),
    )
    .unwrap();
    let stale: Vec<(i64, i64)> = {
        let connection = Connection::open(&image).unwrap();
        let mut statement = connection
            .prepare(
                "SELECT (SELECT batch_id FROM session_heads h WHERE h.session_key = b.session_key), \
                 MAX(b.batch_id) FROM event_batches b GROUP BY b.session_key",
            )
            .unwrap();
        statement
            .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    };
    assert!(
        stale.iter().all(|(saved, newest)| saved < newest),
        "the image's saved heads are behind: {stale:?}"
    );

    let recovered = SqliteStore::open(&image).await.unwrap();
    let session = recovered
        .get_session(TenantId::new("default"), SessionId::new("s1"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (
            session.last_seq,
            session.usage.turns,
            session.usage.input_tokens
        ),
        (6, 3, 30)
    );
    let events = recovered
        .read_events(SessionId::new("s2"), 0, 100)
        .await
        .unwrap();
    assert_eq!(
        events.iter().map(|event| event.seq).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5, 6]
    );
    let steps: Vec<String> = recovered
        .read_steps(SessionId::new("s2"))
        .await
        .unwrap()
        .into_iter()
        .map(|step| step.step)
        .collect();
    assert_eq!(steps, ["step 1", "step 2", "step 3"]);
    let next = recovered
        .append_event(SessionId::new("s1"), 4, delta("y"))
        .await
        .unwrap();
    assert_eq!(next.seq, 7);
}

/// A read sees a session's status and its progress from the same
/// moment: once it sees `finished` it sees every event up to it, even
/// while the writer keeps committing (the fresh heads move with each
/// commit, not after it).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reads_never_see_a_finished_session_without_its_last_events() {
    const SESSIONS: usize = 32;
    const APPENDS: u64 = 60;
    let (_dir, store) = open_temp().await;
    for index in 0..SESSIONS {
        store
            .create_session(new_session(&format!("s{index}"), None))
            .await
            .unwrap();
    }
    let writers: Vec<_> = (0..SESSIONS)
        .map(|index| {
            let store = store.clone();
            tokio::spawn(async move {
                let id = SessionId::new(format!("s{index}"));
                for _ in 1..APPENDS {
                    store.append_event(id.clone(), 1, delta("x")).await.unwrap();
                }
                let finished = Kind::Finished(SessionFinished::default());
                store.append_event(id, 1, finished).await.unwrap();
            })
        })
        .collect();
    let readers: Vec<_> = (0..4)
        .map(|reader| {
            let store = store.clone();
            tokio::spawn(async move {
                let mut last_seen = [0_u64; SESSIONS];
                let mut done = [false; SESSIONS];
                let mut round = reader;
                while done.contains(&false) {
                    round += 1;
                    let index = round % SESSIONS;
                    if done[index] {
                        continue;
                    }
                    let id = SessionId::new(format!("s{index}"));
                    let session = store
                        .get_session(TenantId::new("default"), id.clone())
                        .await
                        .unwrap()
                        .unwrap();
                    assert!(session.last_seq >= last_seen[index], "progress went back");
                    last_seen[index] = session.last_seq;
                    let events = store.read_events(id, 0, 1000).await.unwrap();
                    assert!(events.len() as u64 >= session.last_seq, "events missing");
                    if session.status == SessionStatus::Finished {
                        assert_eq!(session.last_seq, APPENDS, "finished, but behind");
                        done[index] = true;
                    }
                }
            })
        })
        .collect();
    for writer in writers {
        writer.await.unwrap();
    }
    for reader in readers {
        reader.await.unwrap();
    }
}

#[tokio::test]
async fn a_version_1_database_is_migrated_with_its_sessions_and_events() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cp.db");
    {
        let connection = Connection::open(&path).unwrap();
        connection.execute_batch(MIGRATIONS[0]).unwrap();
        connection.pragma_update(None, "user_version", 1).unwrap();
        let usage = BudgetUsage {
            turns: 1,
            ..Default::default()
        };
        connection
            .execute(
                "INSERT INTO sessions VALUES ('s1', 'default', 'demo', 'hi', \
                 'SESSION_STATUS_RUNNING', 'STOP_REASON_UNSPECIFIED', '{}', ?1, ?2, 'k1', \
                 1000, 2000, 2, '', 'sb-1')",
                params![
                    BudgetLimits::default().encode_to_vec(),
                    usage.encode_to_vec()
                ],
            )
            .unwrap();
        for (seq, text) in [(1, "a"), (2, "b")] {
            let event = SessionEvent {
                session_id: "s1".to_owned(),
                seq,
                time: None,
                turn: 1,
                kind: Some(delta(text)),
            };
            connection
                .execute(
                    "INSERT INTO events VALUES ('s1', ?1, 'text_delta', ?2, 1500)",
                    params![seq_to_sql(seq), event.encode_to_vec()],
                )
                .unwrap();
        }
    }
    let store = SqliteStore::open(&path).await.unwrap();
    let session = store
        .get_session(TenantId::new("default"), SessionId::new("s1"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (
            session.last_seq,
            session.usage.turns,
            session.status,
            session.sandbox_session_id.as_deref(),
            session.idempotency_key.as_deref()
        ),
        (2, 1, SessionStatus::Running, Some("sb-1"), Some("k1"))
    );
    let texts = |events: Vec<SessionEvent>| -> Vec<(u64, Option<Kind>)> {
        events.into_iter().map(|e| (e.seq, e.kind)).collect()
    };
    assert_eq!(
        texts(
            store
                .read_events(SessionId::new("s1"), 0, 10)
                .await
                .unwrap()
        ),
        [(1, Some(delta("a"))), (2, Some(delta("b")))]
    );
    let next = store
        .append_event(SessionId::new("s1"), 1, delta("c"))
        .await
        .unwrap();
    assert_eq!(next.seq, 3);
    assert_eq!(
        texts(
            store
                .read_events(SessionId::new("s1"), 1, 10)
                .await
                .unwrap()
        ),
        [(2, Some(delta("b"))), (3, Some(delta("c")))]
    );
}

#[tokio::test]
async fn batches_append_atomically_and_read_back_event_by_event() {
    let (_dir, store) = open_temp().await;
    store.create_session(new_session("s1", None)).await.unwrap();
    let batch = ["a", "b", "c"]
        .map(|text| NewEvent::new(1, delta(text)))
        .to_vec();
    let step = StepRecord {
        step: "model:1".to_owned(),
        payload: vec![1, 2, 3],
    };
    let stored = store
        .append_events(SessionId::new("s1"), batch, vec![step.clone()])
        .await
        .unwrap();
    assert_eq!(stored.iter().map(|e| e.seq).collect::<Vec<_>>(), [1, 2, 3]);
    // A cursor and a limit inside a batch.
    let middle = store.read_events(SessionId::new("s1"), 1, 1).await.unwrap();
    assert_eq!(middle, stored[1..2]);
    assert_eq!(
        store
            .read_events(SessionId::new("s1"), 0, 10)
            .await
            .unwrap(),
        stored
    );
    assert_eq!(
        store.read_steps(SessionId::new("s1")).await.unwrap(),
        [step]
    );
    // Steps need an event to ride on; a refused write changes nothing.
    let lonely = store
        .append_events(
            SessionId::new("s1"),
            Vec::new(),
            vec![StepRecord {
                step: "x".to_owned(),
                payload: Vec::new(),
            }],
        )
        .await;
    assert!(matches!(lonely, Err(StoreError::StepsWithoutEvents(_))));
    let session = store
        .get_session(TenantId::new("default"), SessionId::new("s1"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(session.last_seq, 3);
}

#[tokio::test]
async fn long_logs_read_back_from_any_cursor_across_anchors() {
    let (_dir, store) = open_temp().await;
    store.create_session(new_session("s1", None)).await.unwrap();
    store.create_session(new_session("s2", None)).await.unwrap();
    // Batches of 1 to 5 events, interleaved with another session, so
    // anchors fall at irregular batches; some carry steps.
    let mut texts = Vec::new();
    let mut steps = Vec::new();
    for round in 0..120_usize {
        let size = 1 + round % 5;
        let batch: Vec<NewEvent> = (0..size)
            .map(|i| {
                let text = format!("{round}.{i}");
                texts.push(text.clone());
                NewEvent::new(1, delta(&text))
            })
            .collect();
        let step = (round % 3 == 0).then(|| StepRecord {
            step: format!("step {round}"),
            payload: vec![u8::try_from(round).unwrap()],
        });
        steps.extend(step.clone());
        store
            .append_events(SessionId::new("s1"), batch, step.into_iter().collect())
            .await
            .unwrap();
        store
            .append_event(SessionId::new("s2"), 1, delta("other"))
            .await
            .unwrap();
    }
    let all: Vec<Option<Kind>> = texts.iter().map(|text| Some(delta(text))).collect();
    for after in [0, 1, 2, 63, 64, 65, 127, 128, 200, 359, 360, 361] {
        for limit in [1, 7, 64, 1000] {
            let events = store
                .read_events(SessionId::new("s1"), after, limit)
                .await
                .unwrap();
            let start = usize::try_from(after).unwrap().min(all.len());
            let expected = &all[start..(start + limit).min(all.len())];
            assert_eq!(
                events.iter().map(|e| e.kind.clone()).collect::<Vec<_>>(),
                expected,
                "after {after}, limit {limit}"
            );
            assert!(
                events
                    .iter()
                    .zip(after + 1..)
                    .all(|(event, seq)| event.seq == seq)
            );
        }
    }
    assert_eq!(store.read_steps(SessionId::new("s1")).await.unwrap(), steps);
    let session = store
        .get_session(TenantId::new("default"), SessionId::new("s1"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(session.last_seq, 360);
}

#[tokio::test]
async fn a_version_2_database_is_migrated_with_its_batches() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cp.db");
    {
        let mut connection = Connection::open(&path).unwrap();
        for sql in &MIGRATIONS[..2] {
            connection.execute_batch(sql).unwrap();
        }
        connection.pragma_update(None, "user_version", 2).unwrap();
        let transaction = connection.transaction().unwrap();
        transaction
            .execute(
                "INSERT INTO sessions (session_id, tenant, agent, input, status, \
                 stop_reason, metadata_json, budget, created_at, final_output) \
                 VALUES ('s1', 'default', 'demo', 'hi', 'SESSION_STATUS_RUNNING', \
                 'STOP_REASON_UNSPECIFIED', '{}', X'', 1000, '')",
                [],
            )
            .unwrap();
        let key = transaction.last_insert_rowid();
        for (round, texts) in [["a", "b"], ["c", "d"]].iter().enumerate() {
            let events = texts
                .iter()
                .zip(1_u64..)
                .map(|(text, i)| SessionEvent {
                    seq: u64::try_from(round).unwrap() * 2 + i,
                    turn: 1,
                    kind: Some(delta(text)),
                    ..Default::default()
                })
                .collect();
            let usage = BudgetUsage {
                turns: u32::try_from(round).unwrap() + 1,
                ..Default::default()
            };
            let step = StoredSteps {
                steps: vec![StoredStep {
                    step: format!("step {round}"),
                    payload: Vec::new(),
                }],
            };
            transaction
                .execute(
                    "INSERT INTO event_batches (session_key, first_seq, last_seq, \
                     created_at, events, steps, usage) VALUES (?1, ?2, ?3, 2000, ?4, ?5, ?6)",
                    params![
                        key,
                        i64::try_from(round).unwrap() * 2 + 1,
                        i64::try_from(round).unwrap() * 2 + 2,
                        StoredBatch { events }.encode_to_vec(),
                        step.encode_to_vec(),
                        usage.encode_to_vec()
                    ],
                )
                .unwrap();
        }
        transaction.commit().unwrap();
    }
    let store = SqliteStore::open(&path).await.unwrap();
    let session = store
        .get_session(TenantId::new("default"), SessionId::new("s1"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!((session.last_seq, session.usage.turns), (4, 2));
    let next = store
        .append_event(SessionId::new("s1"), 1, delta("e"))
        .await
        .unwrap();
    assert_eq!(next.seq, 5);
    let texts: Vec<(u64, Option<Kind>)> = store
        .read_events(SessionId::new("s1"), 1, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|e| (e.seq, e.kind))
        .collect();
    assert_eq!(
        texts,
        [
            (2, Some(delta("b"))),
            (3, Some(delta("c"))),
            (4, Some(delta("d"))),
            (5, Some(delta("e")))
        ]
    );
    let steps: Vec<String> = store
        .read_steps(SessionId::new("s1"))
        .await
        .unwrap()
        .into_iter()
        .map(|step| step.step)
        .collect();
    assert_eq!(steps, ["step 0", "step 1"]);
}

#[tokio::test]
async fn newer_schema_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cp.db");
    let connection = Connection::open(&path).unwrap();
    connection.pragma_update(None, "user_version", 99).unwrap();
    drop(connection);
    let error = SqliteStore::open(&path).await.unwrap_err();
    assert!(
        matches!(
            error,
            StoreError::SchemaTooNew {
                found: 99,
                supported: 5
            }
        ),
        "{error:?}"
    );
}
