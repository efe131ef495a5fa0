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
//!
//! This module opens the database and implements the trait; the work is in
//! `schema` (migrations), `writer` (the writer thread, group commit and
//! the fresh heads), `writes` (what each write does), `queries`
//! (reads), `codec` (how values are stored) and `checkpoint` (the
//! checkpoint thread). Every rule about what an append may do and how it
//! changes the session is [`crate::store::projection`]'s.

mod checkpoint;
mod codec;
mod queries;
mod schema;
#[cfg(test)]
mod tests;
mod writer;
mod writes;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, mpsc};
use std::time::Duration;

use futures::future::BoxFuture;
use harness_proto::control::v1::SessionEvent;
use rusqlite::{Connection, params};
use tokio::sync::oneshot;

use self::checkpoint::{RESTART_PATIENCE, checkpoint_loop};
use self::queries::{
    list_sessions, list_unfinished_sessions, pending_approvals, read_events, read_steps,
    select_session,
};
use self::schema::migrate;
use self::writer::{
    FreshHeads, Pending, WriteJob, WriteResult, WriterMemory, recover_heads, writer_busy,
    writer_loop,
};
use self::writes::{append_events, create_session, request_cancel, set_sandbox_session};
use crate::ids::{SessionId, TenantId};
use crate::store::{
    CreatedSession, EventStore, NewEvent, NewSession, PendingApproval, SessionPage, SessionQuery,
    SessionRecord, StepRecord, StoreError,
};

/// Prepared statements kept per connection.
const STATEMENT_CACHE: usize = 64;

/// Read connections, kept open between reads; also how many reads run at
/// once. More would each open (and close) a connection of their own and
/// prepare every statement again: under hundreds of concurrent followers
/// that cost more CPU than the reads themselves (docs/BENCHMARKS.md,
/// delegation (d)).
const MAX_IDLE_READERS: usize = 8;

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
    /// One permit per read connection: a read waits for one.
    read_slots: Arc<tokio::sync::Semaphore>,
    fresh_heads: Arc<FreshHeads>,
    /// Dropped with the store: ends the checkpoint thread.
    _stop_checkpoints: Mutex<mpsc::Sender<()>>,
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
    /// `checkpoint::checkpoint_once`).
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
                read_slots: Arc::new(tokio::sync::Semaphore::new(MAX_IDLE_READERS)),
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
            // The semaphore is never closed, so acquiring cannot fail.
            let slot = Arc::clone(&inner.read_slots).acquire_owned().await.ok();
            tokio::task::spawn_blocking(move || {
                let _slot = slot;
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

impl EventStore for SqliteStore {
    fn create_session(&self, new: NewSession) -> BoxFuture<'_, Result<CreatedSession, StoreError>> {
        self.write(move |connection, memory| create_session(connection, memory, &new))
    }

    fn find_by_idempotency_key(
        &self,
        tenant: TenantId,
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
        tenant: TenantId,
        session_id: SessionId,
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
        self.read(list_unfinished_sessions)
    }

    fn set_sandbox_session(
        &self,
        session_id: SessionId,
        sandbox_session_id: String,
    ) -> BoxFuture<'_, Result<(), StoreError>> {
        self.write(move |connection, _| {
            set_sandbox_session(connection, &session_id, &sandbox_session_id)
        })
    }

    fn append_events(
        &self,
        session_id: SessionId,
        events: Vec<NewEvent>,
        steps: Vec<StepRecord>,
    ) -> BoxFuture<'_, Result<Vec<SessionEvent>, StoreError>> {
        self.write(move |connection, memory| {
            append_events(connection, memory, &session_id, events, steps)
                .map_err(|error| error.for_session(&session_id))
        })
    }

    fn read_steps(
        &self,
        session_id: SessionId,
    ) -> BoxFuture<'_, Result<Vec<StepRecord>, StoreError>> {
        self.read(move |connection, fresh| {
            read_steps(connection, fresh, &session_id)
                .map_err(|error| error.for_session(&session_id))
        })
    }

    fn pending_approvals(
        &self,
        session_id: SessionId,
    ) -> BoxFuture<'_, Result<Vec<PendingApproval>, StoreError>> {
        self.read(move |connection, _| {
            pending_approvals(connection, &session_id)
                .map_err(|error| error.for_session(&session_id))
        })
    }

    fn request_cancel(
        &self,
        session_id: SessionId,
        reason: String,
    ) -> BoxFuture<'_, Result<(), StoreError>> {
        self.write(move |connection, _| request_cancel(connection, &session_id, &reason))
    }

    fn read_events(
        &self,
        session_id: SessionId,
        after_seq: u64,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<SessionEvent>, StoreError>> {
        self.read(move |connection, fresh| {
            read_events(connection, fresh, &session_id, after_seq, limit)
                .map_err(|error| error.for_session(&session_id))
        })
    }
}
