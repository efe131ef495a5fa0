//! The schema: its migrations, applied in order at open (`PRAGMA
//! user_version` counts them), and the constants the layout depends on.

use rusqlite::Connection;

use crate::store::StoreError;

/// Schema migrations; `PRAGMA user_version` is the number applied.
pub(super) const MIGRATIONS: &[&str] = &[
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
    // Version 5: subagent sessions. `lineage_json` lists a session's
    // ancestors (top-level first; ids are arbitrary text, so JSON rather
    // than a separator), `parent_session_id` is its last entry, indexed to
    // list a session's children, and `sandbox_borrowed` marks a sandbox
    // session that belongs to the parent.
    r"
    ALTER TABLE sessions ADD COLUMN parent_session_id TEXT;
    ALTER TABLE sessions ADD COLUMN lineage_json TEXT NOT NULL DEFAULT '[]';
    ALTER TABLE sessions ADD COLUMN sandbox_borrowed INTEGER NOT NULL DEFAULT 0;
    CREATE INDEX sessions_by_parent ON sessions (parent_session_id, created_at DESC, session_id DESC)
        WHERE parent_session_id IS NOT NULL;
",
];

/// A batch that holds an event whose seq is a multiple of this is indexed
/// in `batch_anchors`; a read walks back at most this many batches.
pub(super) const ANCHOR_EVERY: u64 = 256;

pub(super) fn migrate(connection: &mut Connection) -> Result<(), StoreError> {
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
