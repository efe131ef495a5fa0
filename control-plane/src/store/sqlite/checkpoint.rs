//! The checkpoint thread: copies the WAL back into the database without
//! blocking the writer, starts the WAL's writeback early between
//! checkpoints, and restarts the WAL once it passes its size limit.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use rusqlite::Connection;

use super::{SqliteOptions, SqliteSynchronous};

/// How often the checkpoint thread copies the WAL back into the database.
pub(super) const CHECKPOINT_EVERY: Duration = Duration::from_millis(500);

/// How often, between checkpoints, the checkpoint thread starts writing the
/// WAL's new frames back to disk (`synchronous = NORMAL` only).
pub(super) const WRITEBACK_EVERY: Duration = Duration::from_millis(25);

/// How long a restarting checkpoint may wait for the writer and readers.
pub(super) const RESTART_PATIENCE: Duration = Duration::from_millis(200);

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
pub(super) fn checkpoint_loop(
    connection: &Connection,
    options: SqliteOptions,
    stop: &mpsc::Receiver<()>,
) {
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

/// What one checkpoint did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Checkpoint {
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
pub(super) fn checkpoint_once(
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
pub(super) struct WalWriteback {
    pub(super) path: PathBuf,
    pub(super) file: std::fs::File,
}

impl WalWriteback {
    /// None with `synchronous = FULL` (every commit syncs the WAL already)
    /// or when the WAL at `path` cannot be opened (then the checkpoints
    /// alone write it back, as without this).
    pub(super) fn new(path: &Path, synchronous: SqliteSynchronous) -> Option<Self> {
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

    pub(super) fn start(&self) {
        if let Err(error) = crate::sys::start_writeback(&self.file) {
            tracing::debug!(path = %self.path.display(), %error, "starting WAL writeback failed");
        }
    }
}
