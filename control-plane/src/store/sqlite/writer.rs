//! The writer thread and its group commit: it takes every write waiting,
//! runs them in one transaction and commits once, under the
//! [`FreshHeads`] lock, then answers them all. A write refused before
//! writing leaves the rest of its group alone; one that fails while
//! writing rolls the group back. Also the session heads kept in memory
//! between their bulk saves, and their recovery at open.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError, mpsc};
use std::time::{Duration, Instant};

use rusqlite::{Connection, params};
use tokio::sync::oneshot;

use super::query_error;
use super::writes::AppendState;
use crate::ids::SessionId;
use crate::store::{SharedBackendError, StoreError};

/// Most writes committed in one transaction.
pub(super) const MAX_GROUP: usize = 1024;

/// While writes arrive from more than one session at a time, a commit
/// starts at least this long after the one before (the idea of PostgreSQL's
/// `commit_delay` with `commit_siblings`): the writes that arrive meanwhile
/// share the next commit. Committing as soon as anything waits made groups
/// of a few writes under load, and the writer spent its core on per-commit
/// work (WAL frames, locks, wake-ups) that the sessions needed: with 1,000
/// sessions the p99 step overhead fell from 9–10 ms to 6–7 ms (median of
/// runs) at +0.6 ms p50. A lone session never waits.
pub(super) const COMMIT_PACING: Duration = Duration::from_micros(500);

/// How often the writer saves the heads that moved into `session_heads`.
pub(super) const SAVE_HEADS_EVERY: Duration = Duration::from_secs(1);

/// Sessions whose newest batch is committed but not yet saved in
/// `session_heads` (session key → batch id).
///
/// Writing a session's head with every append put the pages of
/// `session_heads` into every commit — a third of the WAL and of the
/// writer's time under load. Instead the writer publishes new heads here,
/// saves them all every [`SAVE_HEADS_EVERY`] with `store_meta.heads_through`
/// and drops what it saved. After a crash, opening the store brings
/// `session_heads` up to date from the batches after `heads_through` (each
/// names its session), so nothing depends on this map surviving.
///
/// The map and the database move together: the writer holds the lock
/// across every `COMMIT` and the change to the map that goes with it, and a
/// read takes its snapshot of the database under the same lock and copies
/// the map then (see [`SqliteStore::read`]). A read therefore sees a fresh
/// head exactly when it sees the batch, and a head dropped from the map
/// only once it sees it saved.
#[derive(Debug, Default)]
pub(super) struct FreshHeads {
    pub(super) heads: Mutex<HashMap<i64, i64>>,
}

impl FreshHeads {
    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<i64, i64>> {
        self.heads.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// How long the writer sleeps between tries while a checkpoint holds the
/// WAL (SQLite's default handler sleeps 1, 2, 5, 10, 15 ms..., turning a
/// 2 ms hold into a 20 ms stall).
pub(super) const WRITER_RETRY: Duration = Duration::from_micros(250);

/// How many tries the writer makes before a write fails as busy (5 s).
pub(super) const WRITER_TRIES: i32 = 20_000;

/// How a write went wrong.
#[derive(Debug)]
pub(super) enum WriteError {
    /// Refused before writing anything; the rest of the group goes on.
    Refused(StoreError),
    /// Failed while writing: the group's transaction is rolled back.
    Failed(StoreError),
}

impl WriteError {
    /// The error with `session_id` as its session (see
    /// [`StoreError::for_session`]).
    pub(super) fn for_session(self, session_id: &SessionId) -> Self {
        match self {
            Self::Refused(error) => Self::Refused(error.for_session(session_id)),
            Self::Failed(error) => Self::Failed(error.for_session(session_id)),
        }
    }
}

pub(super) type WriteResult<T> = Result<T, WriteError>;

pub(super) fn refused<T>(error: StoreError) -> WriteResult<T> {
    Err(WriteError::Refused(error))
}

/// Refusal for checks that run before any write.
pub(super) fn check<T>(result: Result<T, StoreError>) -> WriteResult<T> {
    result.map_err(WriteError::Refused)
}

/// Failure for statements that write.
pub(super) fn write_step<T>(result: Result<T, StoreError>) -> WriteResult<T> {
    result.map_err(WriteError::Failed)
}

/// A write waiting for the writer thread.
pub(super) trait WriteJob: Send {
    /// Runs the write inside the group's transaction.
    fn run(
        self: Box<Self>,
        connection: &Connection,
        memory: &mut WriterMemory,
    ) -> Box<dyn WriteOutcome>;
    /// The write cannot be attempted.
    fn fail(self: Box<Self>, error: StoreError);
}

/// A write that ran; its caller hears about it once the group committed.
pub(super) trait WriteOutcome: Send {
    /// True if it failed while writing (the group must roll back).
    fn broke_the_group(&self) -> bool;
    /// Answers the caller; `group_error` is set if the group did not commit.
    fn complete(self: Box<Self>, group_error: Option<StoreError>);
}

pub(super) struct Pending<T, F> {
    pub(super) work: F,
    pub(super) reply: oneshot::Sender<Result<T, StoreError>>,
}

pub(super) struct Ran<T> {
    pub(super) result: WriteResult<T>,
    pub(super) reply: oneshot::Sender<Result<T, StoreError>>,
}

impl<T, F> WriteJob for Pending<T, F>
where
    T: Send + 'static,
    F: FnOnce(&Connection, &mut WriterMemory) -> WriteResult<T> + Send + 'static,
{
    fn run(
        self: Box<Self>,
        connection: &Connection,
        memory: &mut WriterMemory,
    ) -> Box<dyn WriteOutcome> {
        let this = *self;
        Box::new(Ran {
            result: (this.work)(connection, memory),
            reply: this.reply,
        })
    }

    fn fail(self: Box<Self>, error: StoreError) {
        let _ = self.reply.send(Err(error));
    }
}

impl<T: Send> WriteOutcome for Ran<T> {
    fn broke_the_group(&self) -> bool {
        matches!(self.result, Err(WriteError::Failed(_)))
    }

    fn complete(self: Box<Self>, group_error: Option<StoreError>) {
        let this = *self;
        let result = match (this.result, group_error) {
            (Err(WriteError::Refused(error) | WriteError::Failed(error)), _) => Err(error),
            (Ok(_), Some(error)) => Err(error),
            (Ok(value), None) => Ok(value),
        };
        // The caller may have gone away (its session was cancelled).
        let _ = this.reply.send(result);
    }
}

/// The writer thread: takes every write waiting, runs them in one
/// transaction, commits, then answers all of them. Ends when the store
/// (every clone of it) is dropped.
pub(super) fn writer_loop(
    mut connection: Connection,
    mut memory: WriterMemory,
    jobs: &mpsc::Receiver<Box<dyn WriteJob>>,
) {
    let mut last_commit = Instant::now();
    let mut last_group = 0;
    while let Ok(first) = jobs.recv() {
        if last_group > 1 {
            let since = last_commit.elapsed();
            if since < COMMIT_PACING {
                std::thread::sleep(COMMIT_PACING - since);
            }
        }
        last_commit = Instant::now();
        if memory.last_save.elapsed() >= SAVE_HEADS_EVERY {
            save_heads(&connection, &mut memory);
        }
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match jobs.try_recv() {
                Ok(job) => group.push(job),
                Err(_) => break,
            }
        }
        last_group = group.len();
        commit_group(&mut connection, &mut memory, group);
    }
    save_heads(&connection, &mut memory);
}

/// Saves every fresh head in `session_heads` (one transaction), then drops
/// them from [`FreshHeads`]. A failure is logged and retried at the next
/// save; until then the heads stay fresh, and recovery covers a crash.
pub(super) fn save_heads(connection: &Connection, memory: &mut WriterMemory) {
    memory.last_save = Instant::now();
    let heads = memory.fresh.lock().clone();
    if heads.is_empty() {
        return;
    }
    let saved = run_cached(connection, "BEGIN IMMEDIATE")
        .and_then(|()| {
            write_heads(connection, &heads, memory.newest_batch).inspect_err(|_| {
                let _ = run_cached(connection, "ROLLBACK");
            })
        })
        .and_then(|()| {
            // The writer is the only one to add heads: none moved since.
            commit_with_heads(connection, &memory.fresh, |fresh| {
                fresh.retain(|key, batch| heads.get(key) != Some(batch));
            })
        });
    if let Err(error) = saved {
        tracing::warn!(%error, "saving session heads failed; retrying later");
    }
}

pub(super) fn write_heads(
    connection: &Connection,
    heads: &HashMap<i64, i64>,
    through: i64,
) -> rusqlite::Result<()> {
    let mut update = connection.prepare_cached(
        "INSERT INTO session_heads (session_key, batch_id) VALUES (?1, ?2) \
         ON CONFLICT (session_key) DO UPDATE SET batch_id = excluded.batch_id",
    )?;
    for (key, batch) in heads {
        update.execute(params![key, batch])?;
    }
    connection
        .prepare_cached("UPDATE store_meta SET heads_through = ?1")?
        .execute([through])?;
    Ok(())
}

/// Brings `session_heads` up to date with the batches written after its
/// last save (a crash loses the fresh heads); returns the newest batch.
pub(super) fn recover_heads(connection: &Connection) -> Result<i64, StoreError> {
    let through: i64 = connection
        .query_row("SELECT heads_through FROM store_meta", [], |row| row.get(0))
        .map_err(query_error("recover session heads"))?;
    connection
        .execute(
            "INSERT INTO session_heads (session_key, batch_id) \
             SELECT session_key, MAX(batch_id) FROM event_batches WHERE batch_id > ?1 \
             GROUP BY session_key \
             ON CONFLICT (session_key) DO UPDATE SET batch_id = excluded.batch_id",
            [through],
        )
        .map_err(query_error("recover session heads"))?;
    let newest: i64 = connection
        .query_row(
            "SELECT COALESCE(MAX(batch_id), 0) FROM event_batches",
            [],
            |row| row.get(0),
        )
        .map_err(query_error("recover session heads"))?;
    connection
        .execute("UPDATE store_meta SET heads_through = ?1", [newest])
        .map_err(query_error("recover session heads"))?;
    Ok(newest)
}

/// The writer's busy handler: short, even sleeps, so the writer resumes
/// within [`WRITER_RETRY`] of a checkpoint letting go; gives up after
/// [`WRITER_TRIES`].
pub(super) fn writer_busy(tries: i32) -> bool {
    if tries >= WRITER_TRIES {
        return false;
    }
    std::thread::sleep(WRITER_RETRY);
    true
}

/// What the writer remembers between writes: being the only writer, it
/// knows each running session's append state after its last write and need
/// not read it back every time. Forgotten when a group rolls back.
pub(super) struct WriterMemory {
    pub(super) sessions: HashMap<SessionId, AppendState>,
    pub(super) fresh: Arc<FreshHeads>,
    /// Heads moved by the group being written; published once it commits.
    pub(super) group_heads: Vec<(i64, i64)>,
    /// The newest batch committed.
    pub(super) newest_batch: i64,
    pub(super) last_save: Instant,
}

impl WriterMemory {
    pub(super) fn new(fresh: Arc<FreshHeads>, newest_batch: i64) -> Self {
        Self {
            sessions: HashMap::new(),
            fresh,
            group_heads: Vec::new(),
            newest_batch,
            last_save: Instant::now(),
        }
    }

    /// Every fresh head, the group's included.
    pub(super) fn fresh_view(&self) -> HashMap<i64, i64> {
        let mut view = self.fresh.lock().clone();
        view.extend(self.group_heads.iter().copied());
        view
    }

    /// The session's newest batch as the writer knows it: fresh, or else
    /// saved.
    pub(super) fn fresh_head(&self, key: i64) -> Option<i64> {
        self.group_heads
            .iter()
            .rev()
            .find(|(session, _)| *session == key)
            .map(|(_, batch)| *batch)
            .or_else(|| self.fresh.lock().get(&key).copied())
    }
}

pub(super) fn commit_group(
    connection: &mut Connection,
    memory: &mut WriterMemory,
    group: Vec<Box<dyn WriteJob>>,
) {
    // The transaction statements are prepared once, not parsed per group.
    if let Err(error) = run_cached(connection, "BEGIN IMMEDIATE") {
        let error: SharedBackendError = Arc::new(error);
        for job in group {
            job.fail(StoreError::Commit(Arc::clone(&error)));
        }
        return;
    }
    let mut outcomes: Vec<Box<dyn WriteOutcome>> = Vec::with_capacity(group.len());
    let mut jobs = group.into_iter();
    let mut broken = false;
    for job in jobs.by_ref() {
        let outcome = job.run(connection, memory);
        broken = outcome.broke_the_group();
        outcomes.push(outcome);
        if broken {
            break;
        }
    }
    let group_error = if broken {
        let _ = run_cached(connection, "ROLLBACK");
        Some(StoreError::GroupRolledBack)
    } else {
        let group_heads = &memory.group_heads;
        commit_with_heads(connection, &memory.fresh, |heads| {
            heads.extend(group_heads.iter().copied());
        })
        .err()
        .map(|error| StoreError::Commit(Arc::new(error)))
    };
    if group_error.is_some() {
        memory.sessions.clear();
    } else if let Some(newest) = memory.group_heads.iter().map(|(_, batch)| *batch).max() {
        memory.newest_batch = memory.newest_batch.max(newest);
    }
    memory.group_heads.clear();
    let rerun_error = || StoreError::GroupRolledBack;
    for outcome in outcomes {
        outcome.complete(group_error.as_ref().map(|_| rerun_error()));
    }
    for job in jobs {
        job.fail(rerun_error());
    }
    if let Some(StoreError::Commit(error)) = &group_error {
        tracing::error!(%error, "committing a group of writes failed");
    }
}

/// Commits the open transaction while holding the [`FreshHeads`] lock and,
/// if it committed, applies `update` to them under the same lock (so reads
/// see the two together). A failed `COMMIT` is rolled back.
pub(super) fn commit_with_heads(
    connection: &Connection,
    fresh: &FreshHeads,
    update: impl FnOnce(&mut HashMap<i64, i64>),
) -> rusqlite::Result<()> {
    let mut heads = fresh.lock();
    let committed = run_cached(connection, "COMMIT");
    match &committed {
        Ok(()) => update(&mut heads),
        // A failed COMMIT can leave the transaction open.
        Err(_) if !connection.is_autocommit() => {
            let _ = run_cached(connection, "ROLLBACK");
        }
        Err(_) => {}
    }
    committed
}

/// Runs a parameterless statement from the statement cache.
pub(super) fn run_cached(connection: &Connection, sql: &str) -> rusqlite::Result<()> {
    connection
        .prepare_cached(sql)
        .and_then(|mut statement| statement.execute([]))
        .map(|_| ())
}
