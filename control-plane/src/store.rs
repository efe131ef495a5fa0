//! The durable record: sessions and their append-only event logs.
//!
//! [`EventStore`] is what the rest of the crate sees; [`SqliteStore`] is the
//! embedded implementation (PostgreSQL comes later behind the same trait).
//!
//! Invariants every implementation keeps:
//! - Each session's events are numbered 1, 2, 3, … with no gaps and no
//!   duplicates, also across restarts: appending assigns `last_seq + 1` and
//!   updates the session row in the same transaction.
//! - `finished` is the last event: appending after it fails.
//! - The session row (status, stop reason, final output, usage) is derived from
//!   the events in the same transaction that appends them, so the row never
//!   disagrees with the log.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::future::BoxFuture;
use harness_proto::control::v1::session_event::Kind;
use harness_proto::control::v1::{
    BudgetLimits, BudgetUsage, Session, SessionEvent, SessionStatus, StopReason,
};
use prost::Message as _;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

use crate::event;

/// A session to create.
#[derive(Debug, Clone, PartialEq)]
pub struct NewSession {
    /// Id chosen by the caller (a UUID).
    pub session_id: String,
    /// Owning tenant.
    pub tenant: String,
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
}

/// A stored session.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionRecord {
    /// Session id.
    pub session_id: String,
    /// Owning tenant.
    pub tenant: String,
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
            session_id: self.session_id.clone(),
            agent: self.agent.clone(),
            status: self.status.into(),
            stop_reason: self.stop_reason.into(),
            tenant: self.tenant.clone(),
            metadata: self.metadata.clone(),
            created_at: Some(harness_proto::timestamp_to_proto(self.created_at)),
            updated_at: Some(harness_proto::timestamp_to_proto(self.updated_at)),
            last_seq: self.last_seq,
            budget: Some(self.budget),
            usage: Some(usage),
            final_output: self.final_output.clone(),
        }
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
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionQuery {
    /// Only this tenant's sessions.
    pub tenant: String,
    /// Only sessions of this agent.
    pub agent: Option<String>,
    /// Only sessions in this status.
    pub status: Option<SessionStatus>,
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

/// A failed store operation.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database's directory could not be created.
    #[error("cannot create database directory {path}")]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The database could not be opened or configured.
    #[error("cannot open database {path}")]
    Open {
        /// The database file.
        path: PathBuf,
        /// The SQLite error.
        #[source]
        source: rusqlite::Error,
    },
    /// A schema migration failed.
    #[error("database migration to schema version {version} failed")]
    Migrate {
        /// The version being migrated to.
        version: usize,
        /// The SQLite error.
        #[source]
        source: rusqlite::Error,
    },
    /// The database was written by a newer control plane.
    #[error(
        "database schema version {found} is newer than this control plane supports ({supported}); upgrade the control plane"
    )]
    SchemaTooNew {
        /// Version found in the database.
        found: usize,
        /// Newest version this binary knows.
        supported: usize,
    },
    /// A query failed.
    #[error("database error while trying to {operation}")]
    Query {
        /// What was being done.
        operation: &'static str,
        /// The SQLite error.
        #[source]
        source: rusqlite::Error,
    },
    /// No session with this id.
    #[error("no session {0}")]
    UnknownSession(String),
    /// The session already has its `finished` event.
    #[error("session {0} has finished; its event log is closed")]
    SessionFinished(String),
    /// A stored value could not be decoded.
    #[error("corrupt stored data: {0}")]
    Corrupt(String),
    /// A page token that this store did not issue.
    #[error("invalid page token {0:?}")]
    BadPageToken(String),
    /// A previous operation panicked while holding the connection.
    #[error("the database connection is unusable after an earlier failure")]
    Poisoned,
    /// The blocking task running the query failed.
    #[error("database task failed")]
    Task(#[source] tokio::task::JoinError),
}

/// Durable storage of sessions and events.
pub trait EventStore: Send + Sync + std::fmt::Debug {
    /// Creates a session in status PENDING, or returns the tenant's existing
    /// session with the same idempotency key.
    fn create_session(&self, new: NewSession) -> BoxFuture<'_, Result<CreatedSession, StoreError>>;

    /// The tenant's session created with `key`, if any.
    fn find_by_idempotency_key(
        &self,
        tenant: String,
        key: String,
    ) -> BoxFuture<'_, Result<Option<SessionRecord>, StoreError>>;

    /// One of the tenant's sessions.
    fn get_session(
        &self,
        tenant: String,
        session_id: String,
    ) -> BoxFuture<'_, Result<Option<SessionRecord>, StoreError>>;

    /// A page of the tenant's sessions, newest first.
    fn list_sessions(&self, query: SessionQuery) -> BoxFuture<'_, Result<SessionPage, StoreError>>;

    /// Every tenant's sessions that have not finished (for start-up recovery).
    fn list_unfinished_sessions(&self) -> BoxFuture<'_, Result<Vec<SessionRecord>, StoreError>>;

    /// Records the sandboxd session running a session's tools.
    fn set_sandbox_session(
        &self,
        session_id: String,
        sandbox_session_id: String,
    ) -> BoxFuture<'_, Result<(), StoreError>>;

    /// Appends an event with the next sequence number and returns it as stored.
    fn append_event(
        &self,
        session_id: String,
        turn: u32,
        kind: Kind,
    ) -> BoxFuture<'_, Result<SessionEvent, StoreError>>;

    /// Up to `limit` events with `seq > after_seq`, in order.
    fn read_events(
        &self,
        session_id: String,
        after_seq: u64,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<SessionEvent>, StoreError>>;
}

/// Schema migrations; `PRAGMA user_version` is the number applied.
const MIGRATIONS: &[&str] = &[r"
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
"];

const SESSION_COLUMNS: &str = "session_id, tenant, agent, input, status, stop_reason, \
     metadata_json, budget, usage, idempotency_key, created_at, updated_at, last_seq, \
     final_output, sandbox_session_id";

/// [`EventStore`] on an embedded SQLite database (WAL, synchronous=FULL).
///
/// One connection serves all calls; each runs on tokio's blocking pool so
/// async workers never wait on disk.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    connection: Arc<Mutex<Connection>>,
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path` and migrates it.
    pub async fn open(path: &Path) -> Result<Self, StoreError> {
        let path = path.to_owned();
        tokio::task::spawn_blocking(move || Self::open_blocking(&path))
            .await
            .map_err(StoreError::Task)?
    }

    fn open_blocking(path: &Path) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| StoreError::CreateDir {
                path: dir.to_owned(),
                source,
            })?;
        }
        let open_error = |source| StoreError::Open {
            path: path.to_owned(),
            source,
        };
        let mut connection = Connection::open(path).map_err(open_error)?;
        configure(&connection).map_err(open_error)?;
        migrate(&mut connection)?;
        Ok(Self {
            connection: Arc::new(Mutex::new(connection)),
        })
    }

    /// Runs `job` with the connection on the blocking pool.
    fn run<T, F>(&self, job: F) -> BoxFuture<'static, Result<T, StoreError>>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let connection = Arc::clone(&self.connection);
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                let mut connection = connection.lock().map_err(|_| StoreError::Poisoned)?;
                job(&mut connection)
            })
            .await
            .map_err(StoreError::Task)?
        })
    }
}

fn configure(connection: &Connection) -> Result<(), rusqlite::Error> {
    // WAL lets readers proceed during writes; FULL syncs every commit so an
    // acknowledged event survives power loss, not just a process crash.
    connection.pragma_update(None, "journal_mode", "WAL")?;
    connection.pragma_update(None, "synchronous", "FULL")?;
    connection.pragma_update(None, "foreign_keys", "ON")?;
    connection.busy_timeout(Duration::from_secs(5))?;
    Ok(())
}

fn migrate(connection: &mut Connection) -> Result<(), StoreError> {
    let read_version = |connection: &Connection| {
        connection
            .pragma_query_value(None, "user_version", |row| row.get::<_, i64>(0))
            .map_err(|source| StoreError::Migrate { version: 0, source })
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
        let migrate_error = |source| StoreError::Migrate { version, source };
        let transaction = connection.transaction().map_err(migrate_error)?;
        transaction.execute_batch(sql).map_err(migrate_error)?;
        transaction
            .pragma_update(None, "user_version", version)
            .map_err(migrate_error)?;
        transaction.commit().map_err(migrate_error)?;
    }
    Ok(())
}

fn query_error(operation: &'static str) -> impl FnOnce(rusqlite::Error) -> StoreError {
    move |source| StoreError::Query { operation, source }
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
    usage: Vec<u8>,
    idempotency_key: Option<String>,
    created_at: i64,
    updated_at: i64,
    last_seq: i64,
    final_output: String,
    sandbox_session_id: Option<String>,
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
        let usage = BudgetUsage::decode(self.usage.as_slice())
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
        })
    }
}

fn select_session(
    connection: &Connection,
    condition: &str,
    params: impl rusqlite::Params,
) -> Result<Option<SessionRecord>, StoreError> {
    let sql = format!("SELECT {SESSION_COLUMNS} FROM sessions WHERE {condition}");
    let row = connection
        .query_row(&sql, params, SessionRow::read)
        .optional()
        .map_err(query_error("read a session"))?;
    row.map(SessionRow::decode).transpose()
}

fn insert_session(connection: &Connection, new: &NewSession) -> Result<bool, StoreError> {
    let now = to_micros(SystemTime::now());
    let metadata_json = serde_json::to_string(&new.metadata)
        .map_err(|error| StoreError::Corrupt(format!("metadata: {error}")))?;
    let inserted = connection
        .execute(
            "INSERT INTO sessions (session_id, tenant, agent, input, status, stop_reason, \
             metadata_json, budget, usage, idempotency_key, created_at, updated_at, last_seq, \
             final_output) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?11, 0, '') \
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
                BudgetUsage::default().encode_to_vec(),
                new.idempotency_key,
                now,
            ],
        )
        .map_err(query_error("create a session"))?;
    Ok(inserted == 1)
}

fn create_session(
    connection: &mut Connection,
    new: &NewSession,
) -> Result<CreatedSession, StoreError> {
    let transaction = connection
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(query_error("begin creating a session"))?;
    let created = insert_session(&transaction, new)?;
    let session = if created {
        select_session(&transaction, "session_id = ?1", [&new.session_id])?
    } else {
        select_session(
            &transaction,
            "tenant = ?1 AND idempotency_key = ?2",
            params![new.tenant, new.idempotency_key],
        )?
    }
    .ok_or_else(|| StoreError::UnknownSession(new.session_id.clone()))?;
    transaction
        .commit()
        .map_err(query_error("commit a new session"))?;
    Ok(CreatedSession { session, created })
}

fn append_event(
    connection: &mut Connection,
    session_id: &str,
    turn: u32,
    kind: Kind,
) -> Result<SessionEvent, StoreError> {
    // IMMEDIATE takes the write lock up front, so two appenders cannot both
    // read the same last_seq.
    let transaction = connection
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(query_error("begin appending an event"))?;
    let session = select_session(&transaction, "session_id = ?1", [session_id])?
        .ok_or_else(|| StoreError::UnknownSession(session_id.to_owned()))?;
    if session.status == SessionStatus::Finished {
        return Err(StoreError::SessionFinished(session_id.to_owned()));
    }
    let now = SystemTime::now();
    let seq = session.last_seq + 1;
    let kind_name = event::kind_name(&kind);
    let (status, stop_reason, final_output) = next_session_state(&session, &kind);
    let mut usage = session.usage;
    event::apply_to_usage(&mut usage, &kind);
    let event = SessionEvent {
        session_id: session_id.to_owned(),
        seq,
        time: Some(harness_proto::timestamp_to_proto(now)),
        turn,
        kind: Some(kind),
    };
    transaction
        .execute(
            "INSERT INTO events (session_id, seq, kind, payload, created_at) \
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                session_id,
                seq_to_sql(seq),
                kind_name,
                event.encode_to_vec(),
                to_micros(now)
            ],
        )
        .map_err(query_error("append an event"))?;
    transaction
        .execute(
            "UPDATE sessions SET last_seq = ?2, updated_at = ?3, status = ?4, stop_reason = ?5, \
             final_output = ?6, usage = ?7 WHERE session_id = ?1",
            params![
                session_id,
                seq_to_sql(seq),
                to_micros(now),
                status.as_str_name(),
                stop_reason.as_str_name(),
                final_output,
                usage.encode_to_vec(),
            ],
        )
        .map_err(query_error("update a session after an event"))?;
    transaction
        .commit()
        .map_err(query_error("commit an event"))?;
    Ok(event)
}

fn next_session_state(session: &SessionRecord, kind: &Kind) -> (SessionStatus, StopReason, String) {
    let status = event::status_after(kind).unwrap_or(session.status);
    match event::outcome_of(kind) {
        Some((stop_reason, final_output)) => (status, stop_reason, final_output.to_owned()),
        None => (status, session.stop_reason, session.final_output.clone()),
    }
}

fn read_events(
    connection: &Connection,
    session_id: &str,
    after_seq: u64,
    limit: usize,
) -> Result<Vec<SessionEvent>, StoreError> {
    let mut statement = connection
        .prepare_cached(
            "SELECT seq, payload FROM events WHERE session_id = ?1 AND seq > ?2 \
             ORDER BY seq LIMIT ?3",
        )
        .map_err(query_error("read events"))?;
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let rows = statement
        .query_map(params![session_id, seq_to_sql(after_seq), limit], |row| {
            Ok((row.get::<_, i64>(0)?, row.get::<_, Vec<u8>>(1)?))
        })
        .map_err(query_error("read events"))?;
    let mut events = Vec::new();
    for row in rows {
        let (seq, payload) = row.map_err(query_error("read events"))?;
        let event = SessionEvent::decode(payload.as_slice()).map_err(|error| {
            StoreError::Corrupt(format!("event {seq} of session {session_id}: {error}"))
        })?;
        events.push(event);
    }
    Ok(events)
}

fn list_sessions(connection: &Connection, query: &SessionQuery) -> Result<SessionPage, StoreError> {
    let after = query
        .page_token
        .as_deref()
        .map(parse_page_token)
        .transpose()?;
    let page_size = query.page_size.max(1);
    let mut sql = format!("SELECT {SESSION_COLUMNS} FROM sessions WHERE tenant = ?1");
    let mut values: Vec<rusqlite::types::Value> = vec![query.tenant.clone().into()];
    if let Some(agent) = &query.agent {
        values.push(agent.clone().into());
        sql.push_str(&format!(" AND agent = ?{}", values.len()));
    }
    if let Some(status) = query.status {
        values.push(status.as_str_name().to_owned().into());
        sql.push_str(&format!(" AND status = ?{}", values.len()));
    }
    if let Some((created_at, session_id)) = after {
        values.push(created_at.into());
        values.push(session_id.into());
        sql.push_str(&format!(
            " AND (created_at, session_id) < (?{}, ?{})",
            values.len() - 1,
            values.len()
        ));
    }
    // One extra row tells whether another page exists.
    values.push(i64::try_from(page_size + 1).unwrap_or(i64::MAX).into());
    sql.push_str(&format!(
        " ORDER BY created_at DESC, session_id DESC LIMIT ?{}",
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
        sessions.push(row.map_err(query_error("list sessions"))?.decode()?);
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
        self.run(move |connection| create_session(connection, &new))
    }

    fn find_by_idempotency_key(
        &self,
        tenant: String,
        key: String,
    ) -> BoxFuture<'_, Result<Option<SessionRecord>, StoreError>> {
        self.run(move |connection| {
            select_session(
                connection,
                "tenant = ?1 AND idempotency_key = ?2",
                params![tenant, key],
            )
        })
    }

    fn get_session(
        &self,
        tenant: String,
        session_id: String,
    ) -> BoxFuture<'_, Result<Option<SessionRecord>, StoreError>> {
        self.run(move |connection| {
            select_session(
                connection,
                "tenant = ?1 AND session_id = ?2",
                params![tenant, session_id],
            )
        })
    }

    fn list_sessions(&self, query: SessionQuery) -> BoxFuture<'_, Result<SessionPage, StoreError>> {
        self.run(move |connection| list_sessions(connection, &query))
    }

    fn list_unfinished_sessions(&self) -> BoxFuture<'_, Result<Vec<SessionRecord>, StoreError>> {
        self.run(|connection| {
            let sql = format!(
                "SELECT {SESSION_COLUMNS} FROM sessions WHERE status != ?1 ORDER BY created_at"
            );
            let mut statement = connection
                .prepare(&sql)
                .map_err(query_error("list unfinished sessions"))?;
            let rows = statement
                .query_map([SessionStatus::Finished.as_str_name()], SessionRow::read)
                .map_err(query_error("list unfinished sessions"))?;
            let mut sessions = Vec::new();
            for row in rows {
                sessions.push(
                    row.map_err(query_error("list unfinished sessions"))?
                        .decode()?,
                );
            }
            Ok(sessions)
        })
    }

    fn set_sandbox_session(
        &self,
        session_id: String,
        sandbox_session_id: String,
    ) -> BoxFuture<'_, Result<(), StoreError>> {
        self.run(move |connection| {
            let updated = connection
                .execute(
                    "UPDATE sessions SET sandbox_session_id = ?2 WHERE session_id = ?1",
                    params![session_id, sandbox_session_id],
                )
                .map_err(query_error("record the sandbox session"))?;
            if updated == 0 {
                return Err(StoreError::UnknownSession(session_id));
            }
            Ok(())
        })
    }

    fn append_event(
        &self,
        session_id: String,
        turn: u32,
        kind: Kind,
    ) -> BoxFuture<'_, Result<SessionEvent, StoreError>> {
        self.run(move |connection| append_event(connection, &session_id, turn, kind))
    }

    fn read_events(
        &self,
        session_id: String,
        after_seq: u64,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<SessionEvent>, StoreError>> {
        self.run(move |connection| read_events(connection, &session_id, after_seq, limit))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use harness_proto::control::v1::{
        ModelTextDelta, SessionFinished, SessionStarted, ToolCallRequested,
    };

    use super::*;

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
    async fn created_session_reads_back_as_pending() {
        let (_dir, store) = open_temp().await;
        let created = store.create_session(new_session("s1", None)).await.unwrap();
        assert!(created.created);
        let record = store
            .get_session("default".to_owned(), "s1".to_owned())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(record, created.session);
        assert_eq!(
            (
                record.status,
                record.stop_reason,
                record.last_seq,
                record.input.as_str()
            ),
            (SessionStatus::Pending, StopReason::Unspecified, 0, "hello")
        );
        assert_eq!(record.metadata, new_session("s1", None).metadata);
        assert_eq!(record.budget.max_turns, Some(5));
    }

    #[tokio::test]
    async fn repeated_idempotency_key_returns_the_first_session() {
        let (_dir, store) = open_temp().await;
        let first = store
            .create_session(new_session("s1", Some("k")))
            .await
            .unwrap();
        let again = store
            .create_session(new_session("s2", Some("k")))
            .await
            .unwrap();
        assert!(first.created);
        assert!(!again.created);
        assert_eq!(again.session, first.session);
        let other_tenant = NewSession {
            tenant: "other".to_owned(),
            ..new_session("s3", Some("k"))
        };
        assert!(store.create_session(other_tenant).await.unwrap().created);
        let found = store
            .find_by_idempotency_key("default".to_owned(), "k".to_owned())
            .await
            .unwrap();
        assert_eq!(found.map(|s| s.session_id), Some("s1".to_owned()));
    }

    #[tokio::test]
    async fn other_tenants_cannot_see_a_session() {
        let (_dir, store) = open_temp().await;
        store.create_session(new_session("s1", None)).await.unwrap();
        let seen = store
            .get_session("intruder".to_owned(), "s1".to_owned())
            .await
            .unwrap();
        assert_eq!(seen, None);
    }

    #[tokio::test]
    async fn concurrent_appends_get_gap_free_unique_sequence_numbers() {
        let (_dir, store) = open_temp().await;
        store.create_session(new_session("s1", None)).await.unwrap();
        let appends =
            (0..40).map(|i| store.append_event("s1".to_owned(), 1, delta(&i.to_string())));
        let mut seqs: Vec<u64> = futures::future::try_join_all(appends)
            .await
            .unwrap()
            .iter()
            .map(|event| event.seq)
            .collect();
        seqs.sort_unstable();
        assert_eq!(seqs, (1..=40).collect::<Vec<u64>>());
        let stored: Vec<u64> = store
            .read_events("s1".to_owned(), 0, 100)
            .await
            .unwrap()
            .iter()
            .map(|event| event.seq)
            .collect();
        assert_eq!(stored, seqs);
    }

    #[tokio::test]
    async fn read_events_returns_exactly_those_after_the_cursor() {
        let (_dir, store) = open_temp().await;
        store.create_session(new_session("s1", None)).await.unwrap();
        for text in ["a", "b", "c", "d"] {
            store
                .append_event("s1".to_owned(), 1, delta(text))
                .await
                .unwrap();
        }
        let events = store.read_events("s1".to_owned(), 2, 1).await.unwrap();
        assert_eq!(
            events
                .iter()
                .map(|e| (e.seq, e.kind.clone()))
                .collect::<Vec<_>>(),
            [(3, Some(delta("c")))]
        );
        assert_eq!(store.read_events("s1".to_owned(), 4, 10).await.unwrap(), []);
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
                Kind::ToolCallRequested(ToolCallRequested::default()),
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

    #[tokio::test]
    async fn appending_to_an_unknown_session_fails() {
        let (_dir, store) = open_temp().await;
        let result = store.append_event("nope".to_owned(), 0, delta("x")).await;
        assert!(matches!(result, Err(StoreError::UnknownSession(id)) if id == "nope"));
    }

    #[tokio::test]
    async fn sequence_numbers_continue_after_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cp.db");
        {
            let store = SqliteStore::open(&path).await.unwrap();
            store.create_session(new_session("s1", None)).await.unwrap();
            store
                .append_event("s1".to_owned(), 1, delta("a"))
                .await
                .unwrap();
        }
        let reopened = SqliteStore::open(&path).await.unwrap();
        let event = reopened
            .append_event("s1".to_owned(), 1, delta("b"))
            .await
            .unwrap();
        assert_eq!(event.seq, 2);
    }

    #[tokio::test]
    async fn sessions_list_newest_first_in_pages_with_filters() {
        let (_dir, store) = open_temp().await;
        for id in ["s1", "s2", "s3"] {
            store.create_session(new_session(id, None)).await.unwrap();
            // Distinct creation times make the expected order unambiguous.
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let query = SessionQuery {
            tenant: "default".to_owned(),
            page_size: 2,
            ..Default::default()
        };
        let first = store.list_sessions(query.clone()).await.unwrap();
        let second = store
            .list_sessions(SessionQuery {
                page_token: first.next_page_token.clone(),
                ..query.clone()
            })
            .await
            .unwrap();
        let ids = |page: &SessionPage| -> Vec<String> {
            page.sessions.iter().map(|s| s.session_id.clone()).collect()
        };
        assert_eq!(ids(&first), ["s3", "s2"]);
        assert_eq!(ids(&second), ["s1"]);
        assert_eq!(second.next_page_token, None);
        let other_agent = store
            .list_sessions(SessionQuery {
                agent: Some("other".to_owned()),
                ..query.clone()
            })
            .await
            .unwrap();
        assert_eq!(ids(&other_agent), Vec::<String>::new());
        let pending = store
            .list_sessions(SessionQuery {
                status: Some(SessionStatus::Pending),
                page_size: 10,
                ..query.clone()
            })
            .await
            .unwrap();
        assert_eq!(ids(&pending), ["s3", "s2", "s1"]);
        let bad = store
            .list_sessions(SessionQuery {
                page_token: Some("garbage".to_owned()),
                ..query
            })
            .await;
        assert!(matches!(bad, Err(StoreError::BadPageToken(_))));
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
                    supported: 1
                }
            ),
            "{error:?}"
        );
    }
}
