//! [`EventStore`] on an embedded SQLite database (WAL).
//!
//! Writes go to one writer thread that owns the write connection and commits
//! whatever writes are waiting together, in one transaction (group commit):
//! one session's steps cost one commit each, and many sessions' steps share
//! commits, so throughput grows with concurrency instead of queueing behind
//! one commit per event. A write's future resolves only after its group has
//! committed. A write that is refused (say, an append to a finished session)
//! checks everything before it writes anything, so the rest of its group
//! commits without it; a write that fails while writing fails its group.
//!
//! The schema keeps a commit's pages few, which is what a commit costs: each
//! append is one row (`event_batches`, in insertion order, so a commit group
//! fills pages at the end of the table) carrying the batch's events, its step
//! records and the session's usage after it. Nothing ordered by session is
//! written per append — such an index puts every append of a group on a page
//! of its own. A batch points back at its session's previous one; the
//! batches that cross a multiple of `ANCHOR_EVERY` (256) events are indexed
//! (`batch_anchors`), so a read walks back at most that many batches from an
//! anchor or the session's newest batch. That head is kept in a narrow table
//! (`session_heads`) saved in bulk every second; in between,
//! new heads live in memory (`FreshHeads`, which moves with each commit),
//! and opening the store after a crash rebuilds the lost ones from the
//! batches written since the last save.
//!
//! Besides the writer, a checkpoint thread (at the lowest CPU priority)
//! copies the WAL back into the database every 500 ms and, in
//! between, starts the WAL's writeback early, so no checkpoint has tens of
//! megabytes to flush at once while the writer waits on the same file.
//!
//! Reads run on tokio's blocking pool on a small pool of read connections;
//! WAL lets them proceed while the writer writes. Async workers never wait
//! on disk.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, mpsc};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::future::BoxFuture;
use harness_proto::control::v1::{
    BudgetLimits, BudgetUsage, SessionEvent, SessionStatus, StopReason,
};
use prost::Message as _;
use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::oneshot;

use super::projection::{self, Projection, Refusal, RequestedApproval};
use super::{
    CreatedSession, EventStore, NewEvent, NewSession, PendingApproval, SessionPage, SessionQuery,
    SessionRecord, SharedBackendError, StepRecord, StoreError,
};

/// Most writes committed in one transaction.
const MAX_GROUP: usize = 1024;
/// While writes arrive from more than one session at a time, a commit
/// starts at least this long after the one before (the idea of PostgreSQL's
/// `commit_delay` with `commit_siblings`): the writes that arrive meanwhile
/// share the next commit. Committing as soon as anything waits made groups
/// of a few writes under load, and the writer spent its core on per-commit
/// work (WAL frames, locks, wake-ups) that the sessions needed: with 1,000
/// sessions the p99 step overhead fell from 9–10 ms to 6–7 ms (median of
/// runs) at +0.6 ms p50. A lone session never waits.
const COMMIT_PACING: Duration = Duration::from_micros(500);
/// Prepared statements kept per connection.
const STATEMENT_CACHE: usize = 64;
/// Read connections kept open between reads.
const MAX_IDLE_READERS: usize = 8;

/// Schema migrations; `PRAGMA user_version` is the number applied.
const MIGRATIONS: &[&str] = &[
    r"
    CREATE TABLE sessions (
        session_id         TEXT PRIMARY KEY,
        tenant             TEXT NOT NULL,
        agent              TEXT NOT NULL,
        input              TEXT NOT NULL,
        status             TEXT NOT NULL,
        stop_reason        TEXT NOT NULL,
        metadata_json      TEXT NOT NULL,
        budget             BLOB NOT NULL,
        usage              BLOB NOT NULL,
        idempotency_key    TEXT,
        created_at         INTEGER NOT NULL,
        updated_at         INTEGER NOT NULL,
        last_seq           INTEGER NOT NULL,
        final_output       TEXT NOT NULL,
        sandbox_session_id TEXT,
        UNIQUE (tenant, idempotency_key)
    );
    CREATE INDEX sessions_newest_first ON sessions (tenant, created_at DESC, session_id DESC);
    CREATE INDEX sessions_by_status ON sessions (status);
    CREATE TABLE events (
        session_id TEXT NOT NULL REFERENCES sessions (session_id),
        seq        INTEGER NOT NULL,
        kind       TEXT NOT NULL,
        payload    BLOB NOT NULL,
        created_at INTEGER NOT NULL,
        PRIMARY KEY (session_id, seq)
    ) WITHOUT ROWID;
",
    // Version 2: integer session keys; events stored a batch per row (the
    // events of one append, in insertion order), each carrying the session's
    // usage after it and the batch's step records (a session's last seq,
    // usage and update time are those of its last batch); pending
    // approvals; durable cancellation. Event payloads no longer repeat the
    // session id and time (columns hold them); version-1 payloads still
    // decode, their copies are simply overwritten on read.
    r"
    CREATE TABLE sessions_v2 (
        session_key        INTEGER PRIMARY KEY,
        session_id         TEXT NOT NULL UNIQUE,
        tenant             TEXT NOT NULL,
        agent              TEXT NOT NULL,
        input              TEXT NOT NULL,
        status             TEXT NOT NULL,
        stop_reason        TEXT NOT NULL,
        metadata_json      TEXT NOT NULL,
        budget             BLOB NOT NULL,
        idempotency_key    TEXT,
        created_at         INTEGER NOT NULL,
        final_output       TEXT NOT NULL,
        sandbox_session_id TEXT,
        cancel_reason      TEXT,
        UNIQUE (tenant, idempotency_key)
    );
    INSERT INTO sessions_v2 (session_id, tenant, agent, input, status, stop_reason,
        metadata_json, budget, idempotency_key, created_at, final_output, sandbox_session_id)
        SELECT session_id, tenant, agent, input, status, stop_reason, metadata_json, budget,
            idempotency_key, created_at, final_output, sandbox_session_id
        FROM sessions ORDER BY created_at, session_id;
    CREATE TABLE event_batches (
        batch_id    INTEGER PRIMARY KEY,
        session_key INTEGER NOT NULL,
        first_seq   INTEGER NOT NULL,
        last_seq    INTEGER NOT NULL,
        created_at  INTEGER NOT NULL,
        events      BLOB NOT NULL,
        steps       BLOB,
        usage       BLOB NOT NULL
    );
    -- A version-1 event becomes a batch of one, kept in its old encoding (a
    -- single SessionEvent) and marked by a negative first_seq.
    INSERT INTO event_batches (session_key, first_seq, last_seq, created_at, events, usage)
        SELECT v2.session_key, -e.seq, e.seq, e.created_at, e.payload, X''
        FROM events e JOIN sessions_v2 v2 ON v2.session_id = e.session_id
        ORDER BY e.created_at, v2.session_key, e.seq;
    UPDATE event_batches SET usage = (
            SELECT s.usage FROM sessions s JOIN sessions_v2 v2 ON v2.session_id = s.session_id
            WHERE v2.session_key = event_batches.session_key)
        WHERE last_seq = (SELECT MAX(x.last_seq) FROM event_batches x
                          WHERE x.session_key = event_batches.session_key);
    DROP TABLE events;
    DROP TABLE sessions;
    ALTER TABLE sessions_v2 RENAME TO sessions;
    CREATE INDEX sessions_newest_first ON sessions (tenant, created_at DESC, session_id DESC);
    CREATE INDEX sessions_by_status ON sessions (status);
    CREATE UNIQUE INDEX event_batches_by_session ON event_batches (session_key, last_seq);
    CREATE TABLE pending_approvals (
        session_key INTEGER NOT NULL,
        call_id     TEXT NOT NULL,
        turn        INTEGER NOT NULL,
        seq         INTEGER NOT NULL,
        PRIMARY KEY (session_key, call_id)
    ) WITHOUT ROWID;
",
    // Version 3: no index entry per batch. An index ordered by session puts
    // every append of a commit group on a page of its own (one WAL frame per
    // append); instead each batch points back at the session's previous one
    // (`prev_batch`), a narrow table holds each session's newest batch, and
    // only batches that cross a multiple of `ANCHOR_EVERY` events are
    // indexed (`batch_anchors`), so a read walks at most that many batches
    // back from an anchor. Every batch from before becomes an anchor.
    r"
    ALTER TABLE event_batches ADD COLUMN prev_batch INTEGER;
    UPDATE event_batches SET prev_batch = (
        SELECT x.batch_id FROM event_batches x
        WHERE x.session_key = event_batches.session_key AND x.last_seq < event_batches.last_seq
        ORDER BY x.last_seq DESC LIMIT 1);
    CREATE TABLE session_heads (
        session_key INTEGER PRIMARY KEY,
        batch_id    INTEGER NOT NULL
    );
    INSERT INTO session_heads (session_key, batch_id)
        SELECT b.session_key, b.batch_id FROM event_batches b
        WHERE b.last_seq = (SELECT MAX(x.last_seq) FROM event_batches x
                            WHERE x.session_key = b.session_key);
    CREATE TABLE batch_anchors (
        session_key INTEGER NOT NULL,
        last_seq    INTEGER NOT NULL,
        batch_id    INTEGER NOT NULL,
        PRIMARY KEY (session_key, last_seq)
    ) WITHOUT ROWID;
    INSERT INTO batch_anchors (session_key, last_seq, batch_id)
        SELECT session_key, last_seq, batch_id FROM event_batches;
    DROP INDEX event_batches_by_session;
",
    // Version 4: `session_heads` is saved in bulk now and then instead of
    // per append (see `FreshHeads`); `heads_through` says up to which batch
    // it is complete, and opening the store brings it up to date from the
    // batches after that.
    r"
    CREATE TABLE store_meta (heads_through INTEGER NOT NULL);
    INSERT INTO store_meta (heads_through) SELECT COALESCE(MAX(batch_id), 0) FROM event_batches;
",
];

/// A batch that holds an event whose seq is a multiple of this is indexed
/// in `batch_anchors`; a read walks back at most this many batches.
const ANCHOR_EVERY: u64 = 256;

const SESSION_COLUMNS: &str = "s.session_id, s.tenant, s.agent, s.input, s.status, \
     s.stop_reason, s.metadata_json, s.budget, b.usage, s.idempotency_key, s.created_at, \
     COALESCE(b.created_at, s.created_at), COALESCE(b.last_seq, 0), s.final_output, \
     s.sandbox_session_id, s.cancel_reason, s.session_key";

/// A session with its last saved batch of events (none before the first);
/// [`with_fresh_head`] brings it up to date.
const SESSION_FROM: &str = "sessions s LEFT JOIN session_heads h ON h.session_key = s.session_key \
     LEFT JOIN event_batches b ON b.batch_id = h.batch_id";

/// [`EventStore`] on an embedded SQLite database; see the module docs.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    path: PathBuf,
    writes: mpsc::Sender<Box<dyn WriteJob>>,
    readers: Mutex<Vec<Connection>>,
    fresh_heads: Arc<FreshHeads>,
    /// Dropped with the store: ends the checkpoint thread.
    _stop_checkpoints: Mutex<mpsc::Sender<()>>,
}

/// How often the writer saves the heads that moved into `session_heads`.
const SAVE_HEADS_EVERY: Duration = Duration::from_secs(1);

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
struct FreshHeads {
    heads: Mutex<HashMap<i64, i64>>,
}

impl FreshHeads {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<i64, i64>> {
        self.heads.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// How often the checkpoint thread copies the WAL back into the database.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(500);
/// How often, between checkpoints, the checkpoint thread starts writing the
/// WAL's new frames back to disk (`synchronous = NORMAL` only).
const WRITEBACK_EVERY: Duration = Duration::from_millis(25);
/// How long a restarting checkpoint may wait for the writer and readers.
const RESTART_PATIENCE: Duration = Duration::from_millis(200);
/// How long the writer sleeps between tries while a checkpoint holds the
/// WAL (SQLite's default handler sleeps 1, 2, 5, 10, 15 ms..., turning a
/// 2 ms hold into a 20 ms stall).
const WRITER_RETRY: Duration = Duration::from_micros(250);
/// How many tries the writer makes before a write fails as busy (5 s).
const WRITER_TRIES: i32 = 20_000;

/// How a write went wrong.
#[derive(Debug)]
enum WriteError {
    /// Refused before writing anything; the rest of the group goes on.
    Refused(StoreError),
    /// Failed while writing: the group's transaction is rolled back.
    Failed(StoreError),
}

impl WriteError {
    /// The error with `session_id` as its session (see
    /// [`StoreError::for_session`]).
    fn for_session(self, session_id: &str) -> Self {
        match self {
            Self::Refused(error) => Self::Refused(error.for_session(session_id)),
            Self::Failed(error) => Self::Failed(error.for_session(session_id)),
        }
    }
}

type WriteResult<T> = Result<T, WriteError>;

fn refused<T>(error: StoreError) -> WriteResult<T> {
    Err(WriteError::Refused(error))
}

/// Refusal for checks that run before any write.
fn check<T>(result: Result<T, StoreError>) -> WriteResult<T> {
    result.map_err(WriteError::Refused)
}

/// Failure for statements that write.
fn write_step<T>(result: Result<T, StoreError>) -> WriteResult<T> {
    result.map_err(WriteError::Failed)
}

/// A write waiting for the writer thread.
trait WriteJob: Send {
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
trait WriteOutcome: Send {
    /// True if it failed while writing (the group must roll back).
    fn broke_the_group(&self) -> bool;
    /// Answers the caller; `group_error` is set if the group did not commit.
    fn complete(self: Box<Self>, group_error: Option<StoreError>);
}

struct Pending<T, F> {
    work: F,
    reply: oneshot::Sender<Result<T, StoreError>>,
}

struct Ran<T> {
    result: WriteResult<T>,
    reply: oneshot::Sender<Result<T, StoreError>>,
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

/// `sqlite-synchronous`: how hard each commit works to reach the disk (see
/// `ControlPlaneConfig::sqlite_synchronous` for what each survives).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum SqliteSynchronous {
    /// WAL commits without a disk flush: survives process crashes.
    #[default]
    Normal,
    /// A disk flush per commit: also survives power loss.
    Full,
}

/// How the store uses SQLite. `Default`: `synchronous = NORMAL`, the WAL
/// truncated once it passes 256 MiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SqliteOptions {
    /// How hard each commit works to reach the disk.
    pub synchronous: SqliteSynchronous,
    /// Size past which the checkpoint thread truncates the WAL (see
    /// [`checkpoint_once`]).
    pub max_wal_bytes: u64,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        Self {
            synchronous: SqliteSynchronous::Normal,
            max_wal_bytes: 256 << 20,
        }
    }
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path` with the default
    /// options and migrates it.
    pub async fn open(path: &Path) -> Result<Self, StoreError> {
        Self::open_with(path, SqliteOptions::default()).await
    }

    /// Opens the database with the given options.
    pub async fn open_with(path: &Path, options: SqliteOptions) -> Result<Self, StoreError> {
        let path = path.to_owned();
        tokio::task::spawn_blocking(move || Self::open_blocking(&path, options))
            .await
            .map_err(StoreError::Task)?
    }

    fn open_blocking(path: &Path, options: SqliteOptions) -> Result<Self, StoreError> {
        let synchronous = options.synchronous;
        if let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(open_error(path, "creating its directory"))?;
        }
        let mut connection = open_connection(path)?;
        let configure_error = open_error(path, "configuring the write connection");
        connection
            .busy_handler(Some(writer_busy))
            .map_err(configure_error)?;
        // WAL lets readers proceed during writes. NORMAL: a commit is in the
        // OS before it returns (safe from any process crash); FULL: also on
        // disk (safe from power loss), at one disk flush per commit group.
        connection
            .pragma_update(None, "journal_mode", "WAL")
            .map_err(configure_error)?;
        let level = match synchronous {
            SqliteSynchronous::Normal => "NORMAL",
            SqliteSynchronous::Full => "FULL",
        };
        connection
            .pragma_update(None, "synchronous", level)
            .map_err(configure_error)?;
        // The writer touches the recent pages of every active session; keep
        // them in memory (64 MiB) instead of re-reading them from the OS.
        // Checkpoints run on a thread of their own (below), never inside a
        // commit, so copying the WAL back (and, with FULL, syncing it) does
        // not stall every session waiting on that commit.
        connection
            .pragma_update(None, "cache_size", -65536)
            .map_err(configure_error)?;
        connection
            .pragma_update(None, "wal_autocheckpoint", 0)
            .map_err(configure_error)?;
        // Statement journals in memory, not in temp files.
        connection
            .pragma_update(None, "temp_store", "MEMORY")
            .map_err(configure_error)?;
        migrate(&mut connection)?;
        let newest_batch = recover_heads(&connection)?;
        let fresh_heads = Arc::new(FreshHeads::default());
        let memory = WriterMemory::new(Arc::clone(&fresh_heads), newest_batch);
        let checkpoints = open_connection(path)?;
        // A restarting checkpoint holds new writers back while it waits for
        // readers; never for longer than this (it is retried next time).
        checkpoints
            .busy_timeout(RESTART_PATIENCE)
            .map_err(configure_error)?;
        let thread_error = open_error(path, "starting a database thread");
        let (writes, jobs) = mpsc::channel::<Box<dyn WriteJob>>();
        std::thread::Builder::new()
            .name("sqlite-writer".to_owned())
            .spawn(move || writer_loop(connection, memory, &jobs))
            .map_err(thread_error)?;
        let (stop_checkpoints, stopped) = mpsc::channel::<()>();
        std::thread::Builder::new()
            .name("sqlite-checkpoint".to_owned())
            .spawn(move || checkpoint_loop(&checkpoints, options, &stopped))
            .map_err(thread_error)?;
        Ok(Self {
            inner: Arc::new(Inner {
                path: path.to_owned(),
                writes,
                readers: Mutex::new(Vec::new()),
                fresh_heads,
                _stop_checkpoints: Mutex::new(stop_checkpoints),
            }),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Runs `work` on the writer thread inside the next commit group.
    fn write<T, F>(&self, work: F) -> BoxFuture<'static, Result<T, StoreError>>
    where
        T: Send + 'static,
        F: FnOnce(&Connection, &mut WriterMemory) -> WriteResult<T> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let job: Box<dyn WriteJob> = Box::new(Pending { work, reply });
        let sent = self.inner.writes.send(job);
        Box::pin(async move {
            if sent.is_err() {
                return Err(StoreError::WriterGone);
            }
            answer.await.map_err(|_| StoreError::WriterGone)?
        })
    }

    /// Runs `read` with a read connection on the blocking pool.
    fn read<T, F>(&self, read: F) -> BoxFuture<'static, Result<T, StoreError>>
    where
        T: Send + 'static,
        F: FnOnce(&Connection, &HashMap<i64, i64>) -> Result<T, StoreError> + Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                let idle = inner
                    .readers
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .pop();
                let connection = match idle {
                    Some(connection) => connection,
                    None => open_connection(&inner.path)?,
                };
                let result = consistent_read(&connection, &inner.fresh_heads, read);
                let mut readers = inner.readers.lock().unwrap_or_else(PoisonError::into_inner);
                if readers.len() < MAX_IDLE_READERS {
                    readers.push(connection);
                }
                result
            })
            .await
            .map_err(StoreError::Task)?
        })
    }
}

/// Runs `read` in one read transaction whose snapshot was taken together
/// with a copy of the fresh heads (see [`FreshHeads`]).
fn consistent_read<T>(
    connection: &Connection,
    fresh: &FreshHeads,
    read: impl FnOnce(&Connection, &HashMap<i64, i64>) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    let transaction = connection
        .unchecked_transaction()
        .map_err(query_error("start a read"))?;
    let view = {
        let heads = fresh.lock();
        // A deferred transaction takes its snapshot at its first read.
        transaction
            .prepare_cached("SELECT heads_through FROM store_meta")
            .and_then(|mut statement| statement.query_row([], |_| Ok(())))
            .map_err(query_error("start a read"))?;
        heads.clone()
    };
    read(&transaction, &view)
}

fn open_connection(path: &Path) -> Result<Connection, StoreError> {
    let connection = Connection::open(path).map_err(open_error(path, "opening a connection"))?;
    connection
        .busy_timeout(Duration::from_secs(5))
        .map_err(open_error(path, "configuring a connection"))?;
    // Room for every statement the store prepares (rusqlite keeps 16).
    connection.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    Ok(connection)
}

/// The writer thread: takes every write waiting, runs them in one
/// transaction, commits, then answers all of them. Ends when the store
/// (every clone of it) is dropped.
fn writer_loop(
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
fn save_heads(connection: &Connection, memory: &mut WriterMemory) {
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

fn write_heads(
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
fn recover_heads(connection: &Connection) -> Result<i64, StoreError> {
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

/// Copies committed WAL frames back into the database every
/// [`CHECKPOINT_EVERY`] without blocking the writer (PASSIVE), until the
/// store is dropped; then one last checkpoint.
///
/// With `synchronous = NORMAL` the WAL is not synced per commit, so its new
/// frames pile up in the page cache until the checkpoint's `fsync` writes
/// them all at once — on ext4 that `fsync` allocates the blocks of tens of
/// megabytes under the inode's allocation lock, and the writer's next frame
/// write waits 5–10 ms for it, stalling every session. Starting writeback
/// every [`WRITEBACK_EVERY`] spreads that work into small pieces.
fn checkpoint_loop(connection: &Connection, options: SqliteOptions, stop: &mpsc::Receiver<()>) {
    // Copying pages back takes a core for ~10 ms under load; it can wait
    // for a free one rather than take it from the sessions.
    if let Err(error) = crate::sys::lower_this_threads_priority() {
        tracing::debug!(%error, "could not lower the checkpoint thread's priority");
    }
    // None for an in-memory database: no file, nothing to bound.
    let wal_path = connection
        .path()
        .filter(|path| !path.is_empty())
        .map(|path| PathBuf::from(format!("{path}-wal")));
    let wal = wal_path
        .as_deref()
        .and_then(|path| WalWriteback::new(path, options.synchronous));
    let mut next_checkpoint = Instant::now() + CHECKPOINT_EVERY;
    loop {
        let until_checkpoint = next_checkpoint.saturating_duration_since(Instant::now());
        let wait = match &wal {
            Some(_) => until_checkpoint.min(WRITEBACK_EVERY),
            None => until_checkpoint,
        };
        let stopping = !matches!(
            stop.recv_timeout(wait),
            Err(mpsc::RecvTimeoutError::Timeout)
        );
        if !stopping && Instant::now() < next_checkpoint {
            if let Some(wal) = &wal {
                wal.start();
            }
            continue;
        }
        match checkpoint_once(connection, wal_path.as_deref(), options.max_wal_bytes) {
            Ok(Checkpoint::Restarted { wal_bytes }) => {
                tracing::debug!(wal_bytes, "the WAL reached its size limit; it starts over");
            }
            Ok(Checkpoint::RestartBusy { wal_bytes }) => {
                tracing::debug!(
                    wal_bytes,
                    "the WAL is over its size limit; readers kept it, retrying"
                );
            }
            Ok(Checkpoint::Passive) => {}
            Err(error) => tracing::warn!(%error, "WAL checkpoint failed; retrying later"),
        }
        if stopping {
            return;
        }
        next_checkpoint = Instant::now() + CHECKPOINT_EVERY;
    }
}

/// The writer's busy handler: short, even sleeps, so the writer resumes
/// within [`WRITER_RETRY`] of a checkpoint letting go; gives up after
/// [`WRITER_TRIES`].
fn writer_busy(tries: i32) -> bool {
    if tries >= WRITER_TRIES {
        return false;
    }
    std::thread::sleep(WRITER_RETRY);
    true
}

/// What one checkpoint did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Checkpoint {
    /// Copied what it could back without blocking anyone.
    Passive,
    /// The WAL was over its limit: everything was copied back, and the
    /// next write starts over at the beginning of the file.
    Restarted {
        /// Its size.
        wal_bytes: u64,
    },
    /// Over the limit, but a reader or the writer outlasted
    /// [`RESTART_PATIENCE`]; the next checkpoint tries again.
    RestartBusy {
        /// Its size.
        wal_bytes: u64,
    },
}

/// One checkpoint: PASSIVE (never blocks the writer), then, if the WAL at
/// `wal_path` is over `max_wal_bytes`, RESTART.
///
/// SQLite only starts the WAL over from its beginning when a write begins
/// after a checkpoint copied *every* frame back; under continuous load that
/// moment never comes and the file grows without bound (about 55 MiB per
/// 30,000 steps in the benchmark). RESTART holds new writers back until the
/// last frames are copied and the readers have moved on — a stall of a few
/// milliseconds, paid once per `max_wal_bytes` written — and the next write
/// starts at the beginning of the file, so it stays about `max_wal_bytes`
/// long. It is not truncated: rewriting blocks already allocated is cheaper
/// for ext4 than allocating them again.
fn checkpoint_once(
    connection: &Connection,
    wal_path: Option<&Path>,
    max_wal_bytes: u64,
) -> rusqlite::Result<Checkpoint> {
    connection.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))?;
    let wal_bytes = wal_path
        .and_then(|path| std::fs::metadata(path).ok())
        .map_or(0, |meta| meta.len());
    if wal_bytes <= max_wal_bytes {
        return Ok(Checkpoint::Passive);
    }
    let busy: i64 = connection.query_row("PRAGMA wal_checkpoint(RESTART)", [], |row| row.get(0))?;
    Ok(if busy == 0 {
        Checkpoint::Restarted { wal_bytes }
    } else {
        Checkpoint::RestartBusy { wal_bytes }
    })
}

/// The WAL file, opened read-only to start its writeback.
struct WalWriteback {
    path: PathBuf,
    file: std::fs::File,
}

impl WalWriteback {
    /// None with `synchronous = FULL` (every commit syncs the WAL already)
    /// or when the WAL at `path` cannot be opened (then the checkpoints
    /// alone write it back, as without this).
    fn new(path: &Path, synchronous: SqliteSynchronous) -> Option<Self> {
        if synchronous != SqliteSynchronous::Normal {
            return None;
        }
        match std::fs::File::open(path) {
            Ok(file) => Some(Self {
                path: path.to_owned(),
                file,
            }),
            Err(error) => {
                tracing::warn!(path = %path.display(), %error, "cannot open the WAL to write it back early; checkpoints will");
                None
            }
        }
    }

    fn start(&self) {
        if let Err(error) = crate::sys::start_writeback(&self.file) {
            tracing::debug!(path = %self.path.display(), %error, "starting WAL writeback failed");
        }
    }
}

/// What the writer remembers between writes: being the only writer, it
/// knows each running session's append state after its last write and need
/// not read it back every time. Forgotten when a group rolls back.
struct WriterMemory {
    sessions: HashMap<String, AppendState>,
    fresh: Arc<FreshHeads>,
    /// Heads moved by the group being written; published once it commits.
    group_heads: Vec<(i64, i64)>,
    /// The newest batch committed.
    newest_batch: i64,
    last_save: Instant,
}

impl WriterMemory {
    fn new(fresh: Arc<FreshHeads>, newest_batch: i64) -> Self {
        Self {
            sessions: HashMap::new(),
            fresh,
            group_heads: Vec::new(),
            newest_batch,
            last_save: Instant::now(),
        }
    }

    /// Every fresh head, the group's included.
    fn fresh_view(&self) -> HashMap<i64, i64> {
        let mut view = self.fresh.lock().clone();
        view.extend(self.group_heads.iter().copied());
        view
    }

    /// The session's newest batch as the writer knows it: fresh, or else
    /// saved.
    fn fresh_head(&self, key: i64) -> Option<i64> {
        self.group_heads
            .iter()
            .rev()
            .find(|(session, _)| *session == key)
            .map(|(_, batch)| *batch)
            .or_else(|| self.fresh.lock().get(&key).copied())
    }
}

fn commit_group(
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
fn commit_with_heads(
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
fn run_cached(connection: &Connection, sql: &str) -> rusqlite::Result<()> {
    connection
        .prepare_cached(sql)
        .and_then(|mut statement| statement.execute([]))
        .map(|_| ())
}

fn migrate(connection: &mut Connection) -> Result<(), StoreError> {
    let read_version = |connection: &Connection| {
        connection
            .pragma_query_value(None, "user_version", |row| row.get::<_, i64>(0))
            .map_err(|source| StoreError::Migrate {
                version: 0,
                source: Box::new(source),
            })
    };
    let found = usize::try_from(read_version(connection)?).unwrap_or(usize::MAX);
    if found > MIGRATIONS.len() {
        return Err(StoreError::SchemaTooNew {
            found,
            supported: MIGRATIONS.len(),
        });
    }
    for (index, sql) in MIGRATIONS.iter().enumerate().skip(found) {
        let version = index + 1;
        let migrate_error = |source| StoreError::Migrate {
            version,
            source: Box::new(source),
        };
        let transaction = connection.transaction().map_err(migrate_error)?;
        transaction.execute_batch(sql).map_err(migrate_error)?;
        transaction
            .pragma_update(None, "user_version", version)
            .map_err(migrate_error)?;
        transaction.commit().map_err(migrate_error)?;
    }
    Ok(())
}

/// A failed query while trying to `step`.
fn query_error(step: &'static str) -> impl FnOnce(rusqlite::Error) -> StoreError {
    move |source| StoreError::Backend {
        step,
        session: None,
        source: Box::new(source),
    }
}

/// A failure to open the database at `path` while `step`.
fn open_error<'a, E>(path: &'a Path, step: &'static str) -> impl Fn(E) -> StoreError + Copy + 'a
where
    E: std::error::Error + Send + Sync + 'static,
{
    move |source| StoreError::Open {
        location: path.display().to_string(),
        step,
        source: Box::new(source),
    }
}

fn to_micros(time: SystemTime) -> i64 {
    let micros = time
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_micros();
    i64::try_from(micros).unwrap_or(i64::MAX)
}

fn from_micros(micros: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_micros(u64::try_from(micros).unwrap_or(0))
}

fn seq_to_sql(seq: u64) -> i64 {
    i64::try_from(seq).unwrap_or(i64::MAX)
}

/// A session row with its columns still encoded.
struct SessionRow {
    session_id: String,
    tenant: String,
    agent: String,
    input: String,
    status: String,
    stop_reason: String,
    metadata_json: String,
    budget: Vec<u8>,
    usage: Option<Vec<u8>>,
    idempotency_key: Option<String>,
    created_at: i64,
    updated_at: i64,
    last_seq: i64,
    final_output: String,
    sandbox_session_id: Option<String>,
    cancel_reason: Option<String>,
    key: i64,
}

impl SessionRow {
    fn read(row: &rusqlite::Row<'_>) -> rusqlite::Result<Self> {
        Ok(Self {
            session_id: row.get(0)?,
            tenant: row.get(1)?,
            agent: row.get(2)?,
            input: row.get(3)?,
            status: row.get(4)?,
            stop_reason: row.get(5)?,
            metadata_json: row.get(6)?,
            budget: row.get(7)?,
            usage: row.get(8)?,
            idempotency_key: row.get(9)?,
            created_at: row.get(10)?,
            updated_at: row.get(11)?,
            last_seq: row.get(12)?,
            final_output: row.get(13)?,
            sandbox_session_id: row.get(14)?,
            cancel_reason: row.get(15)?,
            key: row.get(16)?,
        })
    }

    fn decode(self) -> Result<SessionRecord, StoreError> {
        let corrupt =
            |what: &str| StoreError::Corrupt(format!("session {}: {what}", self.session_id));
        let status = SessionStatus::from_str_name(&self.status)
            .ok_or_else(|| corrupt(&format!("unknown status {:?}", self.status)))?;
        let stop_reason = StopReason::from_str_name(&self.stop_reason)
            .ok_or_else(|| corrupt(&format!("unknown stop reason {:?}", self.stop_reason)))?;
        let metadata = serde_json::from_str(&self.metadata_json)
            .map_err(|error| corrupt(&format!("metadata: {error}")))?;
        let budget = BudgetLimits::decode(self.budget.as_slice())
            .map_err(|error| corrupt(&format!("budget: {error}")))?;
        let usage = BudgetUsage::decode(self.usage.as_deref().unwrap_or_default())
            .map_err(|error| corrupt(&format!("usage: {error}")))?;
        Ok(SessionRecord {
            status,
            stop_reason,
            metadata,
            budget,
            usage,
            created_at: from_micros(self.created_at),
            updated_at: from_micros(self.updated_at),
            last_seq: u64::try_from(self.last_seq).unwrap_or(0),
            session_id: self.session_id,
            tenant: self.tenant,
            agent: self.agent,
            input: self.input,
            idempotency_key: self.idempotency_key,
            final_output: self.final_output,
            sandbox_session_id: self.sandbox_session_id,
            cancel_reason: self.cancel_reason,
        })
    }
}

/// The session matching `condition` (written against `s`, the sessions
/// table, and `p`, its progress).
///
/// `fresh` is [`FreshHeads`] as seen before the query.
fn select_session(
    connection: &Connection,
    fresh: &HashMap<i64, i64>,
    condition: &str,
    params: impl rusqlite::Params,
) -> Result<Option<SessionRecord>, StoreError> {
    let sql = format!("SELECT {SESSION_COLUMNS} FROM {SESSION_FROM} WHERE {condition}");
    let row = connection
        .prepare_cached(&sql)
        .and_then(|mut statement| statement.query_row(params, SessionRow::read).optional())
        .map_err(query_error("read a session"))?;
    row.map(|row| with_fresh_head(connection, fresh, row)?.decode())
        .transpose()
}

/// What a batch says about its session's progress.
struct BatchProgress {
    last_seq: i64,
    created_at: i64,
    usage: Vec<u8>,
}

fn read_batch_progress(
    connection: &Connection,
    batch_id: i64,
) -> Result<BatchProgress, StoreError> {
    connection
        .prepare_cached("SELECT last_seq, created_at, usage FROM event_batches WHERE batch_id = ?1")
        .and_then(|mut statement| {
            statement
                .query_row([batch_id], |row| {
                    Ok(BatchProgress {
                        last_seq: row.get(0)?,
                        created_at: row.get(1)?,
                        usage: row.get(2)?,
                    })
                })
                .optional()
        })
        .map_err(query_error("read a session's newest batch"))?
        .ok_or_else(|| StoreError::Corrupt(format!("event batch {batch_id} is missing")))
}

/// The row with its progress (usage, last seq, last update) taken from its
/// fresh head, if it has one.
fn with_fresh_head(
    connection: &Connection,
    fresh: &HashMap<i64, i64>,
    mut row: SessionRow,
) -> Result<SessionRow, StoreError> {
    if let Some(&batch) = fresh.get(&row.key) {
        let progress = read_batch_progress(connection, batch)?;
        row.last_seq = progress.last_seq;
        row.updated_at = progress.created_at;
        row.usage = Some(progress.usage);
    }
    Ok(row)
}

fn session_key(connection: &Connection, session_id: &str) -> Result<Option<i64>, StoreError> {
    connection
        .prepare_cached("SELECT session_key FROM sessions WHERE session_id = ?1")
        .and_then(|mut statement| {
            statement
                .query_row([session_id], |row| row.get(0))
                .optional()
        })
        .map_err(query_error("find a session"))
}

fn create_session(
    connection: &Connection,
    memory: &WriterMemory,
    new: &NewSession,
) -> WriteResult<CreatedSession> {
    let now = to_micros(SystemTime::now());
    let metadata_json = check(
        serde_json::to_string(&new.metadata)
            .map_err(|error| StoreError::Corrupt(format!("metadata: {error}"))),
    )?;
    let inserted = write_step(
        connection
            .execute(
                "INSERT INTO sessions (session_id, tenant, agent, input, status, stop_reason, \
                 metadata_json, budget, idempotency_key, created_at, final_output) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, '') \
                 ON CONFLICT (tenant, idempotency_key) DO NOTHING",
                params![
                    new.session_id,
                    new.tenant,
                    new.agent,
                    new.input,
                    SessionStatus::Pending.as_str_name(),
                    StopReason::Unspecified.as_str_name(),
                    metadata_json,
                    new.budget.encode_to_vec(),
                    new.idempotency_key,
                    now,
                ],
            )
            .map_err(query_error("create a session")),
    )?;
    let created = inserted == 1;
    let fresh = memory.fresh_view();
    let session = if created {
        select_session(connection, &fresh, "s.session_id = ?1", [&new.session_id])
    } else {
        select_session(
            connection,
            &fresh,
            "s.tenant = ?1 AND s.idempotency_key = ?2",
            params![new.tenant, new.idempotency_key],
        )
    };
    let session = write_step(session)?
        .ok_or_else(|| WriteError::Failed(StoreError::UnknownSession(new.session_id.clone())))?;
    Ok(CreatedSession { session, created })
}

/// A session as an append sees it.
#[derive(Clone)]
struct AppendState {
    key: i64,
    /// The session's newest batch (none before the first).
    head: Option<i64>,
    /// Its pending approvals are loaded only for a batch that
    /// [`projection::touches_approvals`]; no other batch reads them.
    projection: Projection,
}

fn read_append_state(
    connection: &Connection,
    memory: &WriterMemory,
    session_id: &str,
) -> Result<AppendState, StoreError> {
    let row = connection
        .prepare_cached(
            "SELECT s.session_key, COALESCE(b.last_seq, 0), s.status, s.stop_reason, \
             s.final_output, b.usage, b.batch_id FROM sessions s \
             LEFT JOIN session_heads h ON h.session_key = s.session_key \
             LEFT JOIN event_batches b ON b.batch_id = h.batch_id \
             WHERE s.session_id = ?1",
        )
        .and_then(|mut statement| {
            statement
                .query_row([session_id], |row| {
                    Ok((
                        row.get::<_, i64>(0)?,
                        row.get::<_, i64>(1)?,
                        row.get::<_, String>(2)?,
                        row.get::<_, String>(3)?,
                        row.get::<_, String>(4)?,
                        row.get::<_, Option<Vec<u8>>>(5)?,
                        row.get::<_, Option<i64>>(6)?,
                    ))
                })
                .optional()
        })
        .map_err(query_error("read a session for appending"))?
        .ok_or_else(|| StoreError::UnknownSession(session_id.to_owned()))?;
    let mut row = row;
    if let Some(fresh) = memory
        .fresh_head(row.0)
        .filter(|fresh| Some(*fresh) != row.6)
    {
        let progress = read_batch_progress(connection, fresh)?;
        row.1 = progress.last_seq;
        row.5 = Some(progress.usage);
        row.6 = Some(fresh);
    }
    let corrupt = |what: String| StoreError::Corrupt(format!("session {session_id}: {what}"));
    Ok(AppendState {
        key: row.0,
        head: row.6,
        projection: Projection {
            last_seq: u64::try_from(row.1).unwrap_or(0),
            status: SessionStatus::from_str_name(&row.2)
                .ok_or_else(|| corrupt(format!("unknown status {:?}", row.2)))?,
            stop_reason: StopReason::from_str_name(&row.3)
                .ok_or_else(|| corrupt(format!("unknown stop reason {:?}", row.3)))?,
            final_output: row.4,
            usage: BudgetUsage::decode(row.5.as_deref().unwrap_or_default())
                .map_err(|error| corrupt(format!("usage: {error}")))?,
            pending_approvals: Vec::new(),
        },
    })
}

/// The pending approvals of the session with `key`, oldest first.
fn pending_approvals_of(
    connection: &Connection,
    key: i64,
) -> Result<Vec<PendingApproval>, StoreError> {
    let mut statement = connection
        .prepare_cached(
            "SELECT call_id, turn FROM pending_approvals WHERE session_key = ?1 ORDER BY seq",
        )
        .map_err(query_error("read pending approvals"))?;
    let rows = statement
        .query_map([key], |row| {
            Ok(PendingApproval {
                call_id: row.get(0)?,
                turn: row.get(1)?,
            })
        })
        .map_err(query_error("read pending approvals"))?;
    rows.collect::<Result<_, _>>()
        .map_err(query_error("read pending approvals"))
}

/// The events of one append, as stored.
#[derive(Clone, PartialEq, prost::Message)]
struct StoredBatch {
    /// Each without session id and time (columns hold them).
    #[prost(message, repeated, tag = "1")]
    events: Vec<SessionEvent>,
}

/// Step records as stored in a batch row.
#[derive(Clone, PartialEq, prost::Message)]
struct StoredSteps {
    #[prost(message, repeated, tag = "1")]
    steps: Vec<StoredStep>,
}

/// One step record.
#[derive(Clone, PartialEq, prost::Message)]
struct StoredStep {
    #[prost(string, tag = "1")]
    step: String,
    #[prost(bytes = "vec", tag = "2")]
    payload: Vec<u8>,
}

fn encode_steps(steps: Vec<StepRecord>) -> Option<Vec<u8>> {
    (!steps.is_empty()).then(|| {
        StoredSteps {
            steps: steps
                .into_iter()
                .map(|step| StoredStep {
                    step: step.step,
                    payload: step.payload,
                })
                .collect(),
        }
        .encode_to_vec()
    })
}

fn append_events(
    connection: &Connection,
    memory: &mut WriterMemory,
    session_id: &str,
    events: Vec<NewEvent>,
    steps: Vec<StepRecord>,
) -> WriteResult<Vec<SessionEvent>> {
    // Check everything first: a refused append writes nothing.
    let remembered = memory.sessions.get(session_id).cloned();
    let mut state = match remembered {
        Some(state) => state,
        None => check(read_append_state(connection, memory, session_id))?,
    };
    let key = state.key;
    let touches_approvals = projection::touches_approvals(&events);
    if touches_approvals {
        state.projection.pending_approvals = check(pending_approvals_of(connection, key))?;
    }
    if events.is_empty() && !steps.is_empty() {
        return refused(StoreError::StepsWithoutEvents(session_id.to_owned()));
    }
    // Time as stored (microseconds), so an event reads back exactly as returned.
    let now_micros = to_micros(SystemTime::now());
    let now = from_micros(now_micros);
    let (projection, applied) = match state.projection.apply_batch(events) {
        Ok(applied) => applied,
        Err(refusal) => return refused(refusal_error(session_id, refusal)),
    };
    let row_changed = (projection.status, projection.stop_reason)
        != (state.projection.status, state.projection.stop_reason)
        || applied.finished;
    state.projection = projection;
    // Now write: the batch as one row.
    let first_seq = applied
        .events
        .first()
        .map_or(state.projection.last_seq, |event| event.seq);
    let batch = StoredBatch {
        events: applied.events,
    };
    if !batch.events.is_empty() {
        let batch_id = write_step(insert_batch(
            connection,
            &BatchInsert {
                key,
                prev: state.head,
                first_seq,
                last_seq: state.projection.last_seq,
                created_at: now_micros,
                events: &batch.encode_to_vec(),
                steps: encode_steps(steps).as_deref(),
                usage: &state.projection.usage.encode_to_vec(),
            },
        ))?;
        state.head = Some(batch_id);
        memory.group_heads.push((key, batch_id));
    }
    let mut stored = batch.events;
    let time = harness_proto::timestamp_to_proto(now);
    for event in &mut stored {
        event.session_id = session_id.to_owned();
        event.time = Some(time);
    }
    if touches_approvals {
        write_step(write_approvals(
            connection,
            key,
            &applied.approvals_requested,
            &applied.approvals_resolved,
            applied.finished,
        ))?;
    }
    if row_changed {
        let projection = &state.projection;
        write_step(
            connection
                .prepare_cached(
                    "UPDATE sessions SET status = ?2, stop_reason = ?3, final_output = ?4 \
                     WHERE session_key = ?1",
                )
                .and_then(|mut statement| {
                    statement.execute(params![
                        key,
                        projection.status.as_str_name(),
                        projection.stop_reason.as_str_name(),
                        projection.final_output
                    ])
                })
                .map_err(query_error("update a session's status")),
        )?;
    }
    if applied.finished {
        memory.sessions.remove(session_id);
    } else if let Some(remembered) = memory.sessions.get_mut(session_id) {
        *remembered = state;
    } else {
        memory.sessions.insert(session_id.to_owned(), state);
    }
    Ok(stored)
}

/// The error a refused append reports.
fn refusal_error(session_id: &str, refusal: Refusal) -> StoreError {
    match refusal {
        Refusal::Finished => StoreError::SessionFinished(session_id.to_owned()),
        Refusal::ApprovalNotPending { call_id } => StoreError::ApprovalNotPending {
            session_id: session_id.to_owned(),
            call_id,
        },
    }
}

/// One batch row to insert.
struct BatchInsert<'a> {
    key: i64,
    prev: Option<i64>,
    first_seq: u64,
    last_seq: u64,
    created_at: i64,
    events: &'a [u8],
    steps: Option<&'a [u8]>,
    usage: &'a [u8],
}

/// Inserts a batch (an anchor too if it holds a multiple of
/// [`ANCHOR_EVERY`]) and saves it as its session's head if it is the first;
/// returns its id.
fn insert_batch(connection: &Connection, batch: &BatchInsert<'_>) -> Result<i64, StoreError> {
    let error = query_error("append events");
    connection
        .prepare_cached(
            "INSERT INTO event_batches (session_key, prev_batch, first_seq, last_seq, \
             created_at, events, steps, usage) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        )
        .and_then(|mut statement| {
            statement.execute(params![
                batch.key,
                batch.prev,
                seq_to_sql(batch.first_seq),
                seq_to_sql(batch.last_seq),
                batch.created_at,
                batch.events,
                batch.steps,
                batch.usage,
            ])
        })
        .map_err(error)?;
    let batch_id = connection.last_insert_rowid();
    // A session's first batch is saved as its head at once (so every session
    // with events has a head row); later heads are fresh until saved.
    if batch.prev.is_none() {
        connection
            .prepare_cached(
                "INSERT INTO session_heads (session_key, batch_id) VALUES (?1, ?2) \
                 ON CONFLICT (session_key) DO UPDATE SET batch_id = excluded.batch_id",
            )
            .and_then(|mut statement| statement.execute(params![batch.key, batch_id]))
            .map_err(query_error("append events"))?;
    }
    if (batch.first_seq - 1) / ANCHOR_EVERY != batch.last_seq / ANCHOR_EVERY {
        connection
            .prepare_cached(
                "INSERT INTO batch_anchors (session_key, last_seq, batch_id) VALUES (?1, ?2, ?3)",
            )
            .and_then(|mut statement| {
                statement.execute(params![batch.key, seq_to_sql(batch.last_seq), batch_id])
            })
            .map_err(query_error("append events"))?;
    }
    Ok(batch_id)
}

fn write_approvals(
    connection: &Connection,
    key: i64,
    requested: &[RequestedApproval],
    resolved: &[String],
    finished: bool,
) -> Result<(), StoreError> {
    for RequestedApproval { call_id, turn, seq } in requested {
        connection
            .prepare_cached(
                "INSERT OR REPLACE INTO pending_approvals (session_key, call_id, turn, seq) \
                 VALUES (?1, ?2, ?3, ?4)",
            )
            .and_then(|mut statement| {
                statement.execute(params![key, call_id, turn, seq_to_sql(*seq)])
            })
            .map_err(query_error("record a pending approval"))?;
    }
    for call_id in resolved {
        connection
            .prepare_cached("DELETE FROM pending_approvals WHERE session_key = ?1 AND call_id = ?2")
            .and_then(|mut statement| statement.execute(params![key, call_id]))
            .map_err(query_error("resolve a pending approval"))?;
    }
    if finished {
        connection
            .prepare_cached("DELETE FROM pending_approvals WHERE session_key = ?1")
            .and_then(|mut statement| statement.execute([key]))
            .map_err(query_error("drop pending approvals"))?;
    }
    Ok(())
}

/// A stored batch as reads see it.
struct BatchRow {
    first_seq: i64,
    last_seq: i64,
    created_at: i64,
    events: Vec<u8>,
    steps: Option<Vec<u8>>,
}

/// The batch `batch_id` and the one before it in its session.
fn read_batch(
    connection: &Connection,
    batch_id: i64,
) -> Result<Option<(BatchRow, Option<i64>)>, StoreError> {
    connection
        .prepare_cached(
            "SELECT first_seq, last_seq, created_at, events, steps, prev_batch \
             FROM event_batches WHERE batch_id = ?1",
        )
        .and_then(|mut statement| {
            statement
                .query_row([batch_id], |row| {
                    Ok((
                        BatchRow {
                            first_seq: row.get(0)?,
                            last_seq: row.get(1)?,
                            created_at: row.get(2)?,
                            events: row.get(3)?,
                            steps: row.get(4)?,
                        },
                        row.get(5)?,
                    ))
                })
                .optional()
        })
        .map_err(query_error("read events"))
}

/// The batches from `batch_id` back to (not including) the first with
/// `last_seq <= lower`, oldest first.
fn batches_back_to(
    connection: &Connection,
    batch_id: i64,
    lower: i64,
) -> Result<Vec<BatchRow>, StoreError> {
    let mut batches = Vec::new();
    let mut next = Some(batch_id);
    while let Some(id) = next {
        let Some((batch, prev)) = read_batch(connection, id)? else {
            return Err(StoreError::Corrupt(format!("event batch {id} is missing")));
        };
        if batch.last_seq <= lower {
            break;
        }
        batches.push(batch);
        next = prev;
    }
    batches.reverse();
    Ok(batches)
}

/// Visits the session's batches holding events after `after_seq`, in
/// order, until `visit` returns false; within the caller's read transaction
/// (see [`consistent_read`]). The anchors lead to the batches between them
/// (a walk back of at most [`ANCHOR_EVERY`] batches each), the head to those
/// after the last anchor. `fresh_head` is the session's entry in the copy of
/// [`FreshHeads`] taken with the transaction's snapshot.
fn visit_batches(
    connection: &Connection,
    key: i64,
    fresh_head: Option<i64>,
    after_seq: u64,
    mut visit: impl FnMut(BatchRow) -> Result<bool, StoreError>,
) -> Result<(), StoreError> {
    let mut lower = seq_to_sql(after_seq);
    let mut anchors = connection
        .prepare_cached(
            "SELECT last_seq, batch_id FROM batch_anchors \
             WHERE session_key = ?1 AND last_seq > ?2 ORDER BY last_seq",
        )
        .map_err(query_error("read events"))?;
    let mut rows = anchors
        .query(params![key, lower])
        .map_err(query_error("read events"))?;
    while let Some(row) = rows.next().map_err(query_error("read events"))? {
        let last_seq: i64 = row.get(0).map_err(query_error("read events"))?;
        let batch_id: i64 = row.get(1).map_err(query_error("read events"))?;
        for batch in batches_back_to(connection, batch_id, lower)? {
            if !visit(batch)? {
                return Ok(());
            }
        }
        lower = last_seq;
    }
    let head: Option<i64> = match fresh_head {
        Some(head) => Some(head),
        None => connection
            .prepare_cached("SELECT batch_id FROM session_heads WHERE session_key = ?1")
            .and_then(|mut statement| statement.query_row([key], |row| row.get(0)).optional())
            .map_err(query_error("read events"))?,
    };
    if let Some(head) = head {
        for batch in batches_back_to(connection, head, lower)? {
            if !visit(batch)? {
                return Ok(());
            }
        }
    }
    Ok(())
}

fn read_events(
    connection: &Connection,
    fresh: &HashMap<i64, i64>,
    session_id: &str,
    after_seq: u64,
    limit: usize,
) -> Result<Vec<SessionEvent>, StoreError> {
    let Some(key) = session_key(connection, session_id)? else {
        return Ok(Vec::new());
    };
    let mut events = Vec::new();
    visit_batches(
        connection,
        key,
        fresh.get(&key).copied(),
        after_seq,
        |row| {
            let BatchRow {
                first_seq,
                last_seq,
                created_at,
                events: encoded,
                ..
            } = row;
            let corrupt = |error: prost::DecodeError| {
                StoreError::Corrupt(format!(
                    "events up to {last_seq} of session {session_id}: {error}"
                ))
            };
            // A negative first seq marks a single event migrated from schema 1.
            let batch = if first_seq < 0 {
                vec![SessionEvent::decode(encoded.as_slice()).map_err(corrupt)?]
            } else {
                StoredBatch::decode(encoded.as_slice())
                    .map_err(corrupt)?
                    .events
            };
            let time = harness_proto::timestamp_to_proto(from_micros(created_at));
            for mut event in batch {
                if event.seq <= after_seq || events.len() >= limit {
                    continue;
                }
                event.session_id = session_id.to_owned();
                event.time = Some(time);
                events.push(event);
            }
            Ok(events.len() < limit)
        },
    )?;
    Ok(events)
}

fn read_steps(
    connection: &Connection,
    fresh: &HashMap<i64, i64>,
    session_id: &str,
) -> Result<Vec<StepRecord>, StoreError> {
    let Some(key) = session_key(connection, session_id)? else {
        return Ok(Vec::new());
    };
    let mut steps = Vec::new();
    visit_batches(connection, key, fresh.get(&key).copied(), 0, |row| {
        let Some(encoded) = row.steps else {
            return Ok(true);
        };
        let stored = StoredSteps::decode(encoded.as_slice()).map_err(|error| {
            StoreError::Corrupt(format!(
                "steps of event {} of session {session_id}: {error}",
                row.last_seq
            ))
        })?;
        steps.extend(stored.steps.into_iter().map(|step| StepRecord {
            step: step.step,
            payload: step.payload,
        }));
        Ok(true)
    })?;
    Ok(steps)
}

/// The session's tool calls awaiting approval, oldest first.
fn pending_approvals(
    connection: &Connection,
    session_id: &str,
) -> Result<Vec<PendingApproval>, StoreError> {
    match session_key(connection, session_id)? {
        Some(key) => pending_approvals_of(connection, key),
        None => Ok(Vec::new()),
    }
}

fn list_sessions(
    connection: &Connection,
    fresh: &HashMap<i64, i64>,
    query: &SessionQuery,
) -> Result<SessionPage, StoreError> {
    let after = query
        .page_token
        .as_deref()
        .map(parse_page_token)
        .transpose()?;
    let page_size = query.page_size.max(1);
    let mut sql = format!("SELECT {SESSION_COLUMNS} FROM {SESSION_FROM} WHERE s.tenant = ?1");
    let mut values: Vec<rusqlite::types::Value> = vec![query.tenant.clone().into()];
    if let Some(agent) = &query.agent {
        values.push(agent.clone().into());
        sql.push_str(&format!(" AND s.agent = ?{}", values.len()));
    }
    if let Some(status) = query.status {
        values.push(status.as_str_name().to_owned().into());
        sql.push_str(&format!(" AND s.status = ?{}", values.len()));
    }
    if let Some((created_at, session_id)) = after {
        values.push(created_at.into());
        values.push(session_id.into());
        sql.push_str(&format!(
            " AND (s.created_at, s.session_id) < (?{}, ?{})",
            values.len() - 1,
            values.len()
        ));
    }
    // One extra row tells whether another page exists.
    values.push(i64::try_from(page_size + 1).unwrap_or(i64::MAX).into());
    sql.push_str(&format!(
        " ORDER BY s.created_at DESC, s.session_id DESC LIMIT ?{}",
        values.len()
    ));
    let mut statement = connection
        .prepare(&sql)
        .map_err(query_error("list sessions"))?;
    let rows = statement
        .query_map(rusqlite::params_from_iter(values), SessionRow::read)
        .map_err(query_error("list sessions"))?;
    let mut sessions = Vec::new();
    for row in rows {
        let row = row.map_err(query_error("list sessions"))?;
        sessions.push(with_fresh_head(connection, fresh, row)?.decode()?);
    }
    let next_page_token = if sessions.len() > page_size {
        sessions.truncate(page_size);
        sessions.last().map(page_token_after)
    } else {
        None
    };
    Ok(SessionPage {
        sessions,
        next_page_token,
    })
}

fn page_token_after(session: &SessionRecord) -> String {
    format!("{}.{}", to_micros(session.created_at), session.session_id)
}

fn parse_page_token(token: &str) -> Result<(i64, String), StoreError> {
    let bad = || StoreError::BadPageToken(token.to_owned());
    let (micros, session_id) = token.split_once('.').ok_or_else(bad)?;
    let micros = micros.parse().map_err(|_| bad())?;
    Ok((micros, session_id.to_owned()))
}

impl EventStore for SqliteStore {
    fn create_session(&self, new: NewSession) -> BoxFuture<'_, Result<CreatedSession, StoreError>> {
        self.write(move |connection, memory| create_session(connection, memory, &new))
    }

    fn find_by_idempotency_key(
        &self,
        tenant: String,
        key: String,
    ) -> BoxFuture<'_, Result<Option<SessionRecord>, StoreError>> {
        self.read(move |connection, fresh| {
            select_session(
                connection,
                fresh,
                "s.tenant = ?1 AND s.idempotency_key = ?2",
                params![tenant, key],
            )
        })
    }

    fn get_session(
        &self,
        tenant: String,
        session_id: String,
    ) -> BoxFuture<'_, Result<Option<SessionRecord>, StoreError>> {
        self.read(move |connection, fresh| {
            select_session(
                connection,
                fresh,
                "s.tenant = ?1 AND s.session_id = ?2",
                params![tenant, session_id],
            )
            .map_err(|error| error.for_session(&session_id))
        })
    }

    fn list_sessions(&self, query: SessionQuery) -> BoxFuture<'_, Result<SessionPage, StoreError>> {
        self.read(move |connection, fresh| list_sessions(connection, fresh, &query))
    }

    fn list_unfinished_sessions(&self) -> BoxFuture<'_, Result<Vec<SessionRecord>, StoreError>> {
        self.read(|connection, fresh| {
            let sql = format!(
                "SELECT {SESSION_COLUMNS} FROM {SESSION_FROM} WHERE s.status != ?1 \
                 ORDER BY s.created_at"
            );
            let mut statement = connection
                .prepare(&sql)
                .map_err(query_error("list unfinished sessions"))?;
            let rows = statement
                .query_map([SessionStatus::Finished.as_str_name()], SessionRow::read)
                .map_err(query_error("list unfinished sessions"))?;
            let mut sessions = Vec::new();
            for row in rows {
                let row = row.map_err(query_error("list unfinished sessions"))?;
                sessions.push(with_fresh_head(connection, fresh, row)?.decode()?);
            }
            Ok(sessions)
        })
    }

    fn set_sandbox_session(
        &self,
        session_id: String,
        sandbox_session_id: String,
    ) -> BoxFuture<'_, Result<(), StoreError>> {
        self.write(move |connection, _| {
            let updated = write_step(
                connection
                    .execute(
                        "UPDATE sessions SET sandbox_session_id = ?2 WHERE session_id = ?1",
                        params![session_id, sandbox_session_id],
                    )
                    .map_err(query_error("record the sandbox session"))
                    .map_err(|error| error.for_session(&session_id)),
            )?;
            if updated == 0 {
                // Nothing was written.
                return refused(StoreError::UnknownSession(session_id));
            }
            Ok(())
        })
    }

    fn append_events(
        &self,
        session_id: String,
        events: Vec<NewEvent>,
        steps: Vec<StepRecord>,
    ) -> BoxFuture<'_, Result<Vec<SessionEvent>, StoreError>> {
        self.write(move |connection, memory| {
            append_events(connection, memory, &session_id, events, steps)
                .map_err(|error| error.for_session(&session_id))
        })
    }

    fn read_steps(&self, session_id: String) -> BoxFuture<'_, Result<Vec<StepRecord>, StoreError>> {
        self.read(move |connection, fresh| {
            read_steps(connection, fresh, &session_id)
                .map_err(|error| error.for_session(&session_id))
        })
    }

    fn pending_approvals(
        &self,
        session_id: String,
    ) -> BoxFuture<'_, Result<Vec<PendingApproval>, StoreError>> {
        self.read(move |connection, _| {
            pending_approvals(connection, &session_id)
                .map_err(|error| error.for_session(&session_id))
        })
    }

    fn request_cancel(
        &self,
        session_id: String,
        reason: String,
    ) -> BoxFuture<'_, Result<(), StoreError>> {
        self.write(move |connection, _| {
            let status: Option<String> = check(
                connection
                    .query_row(
                        "SELECT status FROM sessions WHERE session_id = ?1",
                        [&session_id],
                        |row| row.get(0),
                    )
                    .optional()
                    .map_err(query_error("read a session to cancel"))
                    .map_err(|error| error.for_session(&session_id)),
            )?;
            match status.as_deref() {
                None => return refused(StoreError::UnknownSession(session_id)),
                Some(status) if status == SessionStatus::Finished.as_str_name() => {
                    return refused(StoreError::SessionFinished(session_id));
                }
                Some(_) => {}
            }
            write_step(
                connection
                    .execute(
                        "UPDATE sessions SET cancel_reason = ?2 WHERE session_id = ?1 \
                         AND cancel_reason IS NULL",
                        params![session_id, reason],
                    )
                    .map_err(query_error("record a cancellation"))
                    .map_err(|error| error.for_session(&session_id)),
            )?;
            Ok(())
        })
    }

    fn read_events(
        &self,
        session_id: String,
        after_seq: u64,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<SessionEvent>, StoreError>> {
        self.read(move |connection, fresh| {
            read_events(connection, fresh, &session_id, after_seq, limit)
                .map_err(|error| error.for_session(&session_id))
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use harness_proto::control::v1::session_event::Kind;
    use harness_proto::control::v1::{
        ModelTextDelta, SessionFinished, SessionStarted, ToolStarted,
    };

    use super::*;
    use crate::store::conformance::{self, StoreHarness};

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
        fn reopen_after_crash(
            &self,
            store: SqliteStore,
        ) -> impl Future<Output = SqliteStore> + Send {
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

    fn new_session(id: &str, key: Option<&str>) -> NewSession {
        NewSession {
            session_id: id.to_owned(),
            tenant: "default".to_owned(),
            agent: "demo".to_owned(),
            input: "hello".to_owned(),
            metadata: HashMap::from([("team".to_owned(), "core".to_owned())]),
            budget: BudgetLimits {
                max_turns: Some(5),
                ..Default::default()
            },
            idempotency_key: key.map(str::to_owned),
        }
    }

    fn delta(text: &str) -> Kind {
        Kind::TextDelta(ModelTextDelta {
            text: text.to_owned(),
        })
    }

    #[tokio::test]
    async fn events_drive_status_usage_and_close_the_log_at_finished() {
        let (_dir, store) = open_temp().await;
        store.create_session(new_session("s1", None)).await.unwrap();
        store
            .append_event("s1".to_owned(), 0, Kind::Started(SessionStarted::default()))
            .await
            .unwrap();
        let running = store
            .get_session("default".to_owned(), "s1".to_owned())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(running.status, SessionStatus::Running);
        store
            .append_event(
                "s1".to_owned(),
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
            .append_event("s1".to_owned(), 1, finished)
            .await
            .unwrap();
        let record = store
            .get_session("default".to_owned(), "s1".to_owned())
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
        let late = store.append_event("s1".to_owned(), 1, delta("late")).await;
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
                        session.to_owned(),
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
            .get_session("default".to_owned(), "s1".to_owned())
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
            .get_session("default".to_owned(), "s1".to_owned())
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
            .read_events("s2".to_owned(), 0, 100)
            .await
            .unwrap();
        assert_eq!(
            events.iter().map(|event| event.seq).collect::<Vec<_>>(),
            [1, 2, 3, 4, 5, 6]
        );
        let steps: Vec<String> = recovered
            .read_steps("s2".to_owned())
            .await
            .unwrap()
            .into_iter()
            .map(|step| step.step)
            .collect();
        assert_eq!(steps, ["step 1", "step 2", "step 3"]);
        let next = recovered
            .append_event("s1".to_owned(), 4, delta("y"))
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
                    let id = format!("s{index}");
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
                        let id = format!("s{index}");
                        let session = store
                            .get_session("default".to_owned(), id.clone())
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
            .get_session("default".to_owned(), "s1".to_owned())
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
            texts(store.read_events("s1".to_owned(), 0, 10).await.unwrap()),
            [(1, Some(delta("a"))), (2, Some(delta("b")))]
        );
        let next = store
            .append_event("s1".to_owned(), 1, delta("c"))
            .await
            .unwrap();
        assert_eq!(next.seq, 3);
        assert_eq!(
            texts(store.read_events("s1".to_owned(), 1, 10).await.unwrap()),
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
            .append_events("s1".to_owned(), batch, vec![step.clone()])
            .await
            .unwrap();
        assert_eq!(stored.iter().map(|e| e.seq).collect::<Vec<_>>(), [1, 2, 3]);
        // A cursor and a limit inside a batch.
        let middle = store.read_events("s1".to_owned(), 1, 1).await.unwrap();
        assert_eq!(middle, stored[1..2]);
        assert_eq!(
            store.read_events("s1".to_owned(), 0, 10).await.unwrap(),
            stored
        );
        assert_eq!(store.read_steps("s1".to_owned()).await.unwrap(), [step]);
        // Steps need an event to ride on; a refused write changes nothing.
        let lonely = store
            .append_events(
                "s1".to_owned(),
                Vec::new(),
                vec![StepRecord {
                    step: "x".to_owned(),
                    payload: Vec::new(),
                }],
            )
            .await;
        assert!(matches!(lonely, Err(StoreError::StepsWithoutEvents(_))));
        let session = store
            .get_session("default".to_owned(), "s1".to_owned())
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
                .append_events("s1".to_owned(), batch, step.into_iter().collect())
                .await
                .unwrap();
            store
                .append_event("s2".to_owned(), 1, delta("other"))
                .await
                .unwrap();
        }
        let all: Vec<Option<Kind>> = texts.iter().map(|text| Some(delta(text))).collect();
        for after in [0, 1, 2, 63, 64, 65, 127, 128, 200, 359, 360, 361] {
            for limit in [1, 7, 64, 1000] {
                let events = store
                    .read_events("s1".to_owned(), after, limit)
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
        assert_eq!(store.read_steps("s1".to_owned()).await.unwrap(), steps);
        let session = store
            .get_session("default".to_owned(), "s1".to_owned())
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
            .get_session("default".to_owned(), "s1".to_owned())
            .await
            .unwrap()
            .unwrap();
        assert_eq!((session.last_seq, session.usage.turns), (4, 2));
        let next = store
            .append_event("s1".to_owned(), 1, delta("e"))
            .await
            .unwrap();
        assert_eq!(next.seq, 5);
        let texts: Vec<(u64, Option<Kind>)> = store
            .read_events("s1".to_owned(), 1, 10)
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
            .read_steps("s1".to_owned())
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
                    supported: 4
                }
            ),
            "{error:?}"
        );
    }
}
