//! What each write does inside its commit group: create a session, append
//! a batch through the projection, record a sandbox session or a
//! cancellation. Everything is checked before anything is written, so a
//! refused write leaves its group untouched.

use std::time::SystemTime;

use harness_proto::control::v1::{BudgetUsage, SessionEvent, SessionStatus, StopReason};
use prost::Message as _;
use rusqlite::{Connection, OptionalExtension, params};

use super::codec::{StoredBatch, encode_steps, from_micros, seq_to_sql, to_micros};
use super::queries::{pending_approvals_of, read_batch_progress, select_session};
use super::query_error;
use super::schema::ANCHOR_EVERY;
use super::writer::{WriteError, WriteResult, WriterMemory, check, refused, write_step};
use crate::ids::SessionId;
use crate::store::projection::{self, Projection, RequestedApproval};
use crate::store::{CreatedSession, NewEvent, NewSession, StepRecord, StoreError};

pub(super) fn create_session(
    connection: &Connection,
    memory: &WriterMemory,
    new: &NewSession,
) -> WriteResult<CreatedSession> {
    let now = to_micros(SystemTime::now());
    let metadata_json = check(
        serde_json::to_string(&new.metadata)
            .map_err(|error| StoreError::Corrupt(format!("metadata: {error}"))),
    )?;
    let lineage: Vec<&str> = new
        .parent
        .iter()
        .flat_map(|parent| &parent.lineage)
        .map(SessionId::as_str)
        .collect();
    let lineage_json = check(
        serde_json::to_string(&lineage)
            .map_err(|error| StoreError::Corrupt(format!("lineage: {error}"))),
    )?;
    let parent = new.parent.as_ref().and_then(|parent| parent.parent());
    let borrowed = new
        .parent
        .as_ref()
        .and_then(|parent| parent.borrowed_sandbox.as_deref());
    let inserted = write_step(
        connection
            .execute(
                "INSERT INTO sessions (session_id, tenant, agent, input, status, stop_reason, \
                 metadata_json, budget, idempotency_key, created_at, final_output, \
                 parent_session_id, lineage_json, sandbox_session_id, sandbox_borrowed) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, '', ?11, ?12, ?13, ?14) \
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
                    parent,
                    lineage_json,
                    borrowed,
                    borrowed.is_some(),
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
pub(super) struct AppendState {
    pub(super) key: i64,
    /// The session's newest batch (none before the first).
    pub(super) head: Option<i64>,
    /// Its pending approvals are loaded only for a batch that
    /// [`projection::touches_approvals`]; no other batch reads them.
    pub(super) projection: Projection,
}

pub(super) fn read_append_state(
    connection: &Connection,
    memory: &WriterMemory,
    session_id: &SessionId,
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
        .ok_or_else(|| StoreError::UnknownSession(session_id.clone()))?;
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

pub(super) fn append_events(
    connection: &Connection,
    memory: &mut WriterMemory,
    session_id: &SessionId,
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
        return refused(StoreError::StepsWithoutEvents(session_id.clone()));
    }
    // Time as stored (microseconds), so an event reads back exactly as returned.
    let now_micros = to_micros(SystemTime::now());
    let now = from_micros(now_micros);
    let (projection, applied) = match state.projection.apply_batch(events) {
        Ok(applied) => applied,
        Err(refusal) => return refused(refusal.into_error(session_id)),
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
        event.session_id = session_id.as_str().to_owned();
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
        memory.sessions.insert(session_id.clone(), state);
    }
    Ok(stored)
}

/// One batch row to insert.
pub(super) struct BatchInsert<'a> {
    pub(super) key: i64,
    pub(super) prev: Option<i64>,
    pub(super) first_seq: u64,
    pub(super) last_seq: u64,
    pub(super) created_at: i64,
    pub(super) events: &'a [u8],
    pub(super) steps: Option<&'a [u8]>,
    pub(super) usage: &'a [u8],
}

/// Inserts a batch (an anchor too if it holds a multiple of
/// [`ANCHOR_EVERY`]) and saves it as its session's head if it is the first;
/// returns its id.
pub(super) fn insert_batch(
    connection: &Connection,
    batch: &BatchInsert<'_>,
) -> Result<i64, StoreError> {
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

pub(super) fn write_approvals(
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

/// Records the sandboxd session running a session's tools.
pub(super) fn set_sandbox_session(
    connection: &Connection,
    session_id: &SessionId,
    sandbox_session_id: &str,
) -> WriteResult<()> {
    let updated = write_step(
        connection
            .execute(
                "UPDATE sessions SET sandbox_session_id = ?2 WHERE session_id = ?1",
                params![session_id, sandbox_session_id],
            )
            .map_err(query_error("record the sandbox session"))
            .map_err(|error| error.for_session(session_id)),
    )?;
    if updated == 0 {
        // Nothing was written.
        return refused(StoreError::UnknownSession(session_id.clone()));
    }
    Ok(())
}

/// Records the first cancellation request of a session that has not
/// finished.
pub(super) fn request_cancel(
    connection: &Connection,
    session_id: &SessionId,
    reason: &str,
) -> WriteResult<()> {
    let status: Option<String> = check(
        connection
            .query_row(
                "SELECT status FROM sessions WHERE session_id = ?1",
                [session_id],
                |row| row.get(0),
            )
            .optional()
            .map_err(query_error("read a session to cancel"))
            .map_err(|error| error.for_session(session_id)),
    )?;
    match status.as_deref() {
        None => return refused(StoreError::UnknownSession(session_id.clone())),
        Some(status) if status == SessionStatus::Finished.as_str_name() => {
            return refused(StoreError::SessionFinished(session_id.clone()));
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
            .map_err(|error| error.for_session(session_id)),
    )?;
    Ok(())
}
