//! Reads: sessions with their progress, the event log walked through
//! batches and anchors, step records, pending approvals, listing pages.
//! Every read runs inside the snapshot [`super::consistent_read`] takes,
//! with the copy of the fresh heads taken with it.

use std::collections::HashMap;

use harness_proto::control::v1::{SessionEvent, SessionStatus};
use prost::Message as _;
use rusqlite::{Connection, OptionalExtension, params};

use super::codec::{
    BatchRow, SessionRow, StoredBatch, StoredSteps, from_micros, seq_to_sql, to_micros,
};
use super::query_error;
use crate::ids::SessionId;
use crate::store::{
    PendingApproval, SessionPage, SessionQuery, SessionRecord, StepRecord, StoreError,
};

pub(super) const SESSION_COLUMNS: &str = "s.session_id, s.tenant, s.agent, s.input, s.status, \
     s.stop_reason, s.metadata_json, s.budget, b.usage, s.idempotency_key, s.created_at, \
     COALESCE(b.created_at, s.created_at), COALESCE(b.last_seq, 0), s.final_output, \
     s.sandbox_session_id, s.cancel_reason, s.session_key, s.lineage_json, s.sandbox_borrowed";

/// A session with its last saved batch of events (none before the first);
/// [`with_fresh_head`] brings it up to date.
pub(super) const SESSION_FROM: &str = "sessions s LEFT JOIN session_heads h ON h.session_key = s.session_key \
     LEFT JOIN event_batches b ON b.batch_id = h.batch_id";

/// The session matching `condition` (written against `s`, the sessions
/// table, and `p`, its progress).
///
/// `fresh` is [`FreshHeads`] as seen before the query.
pub(super) fn select_session(
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
pub(super) struct BatchProgress {
    pub(super) last_seq: i64,
    pub(super) created_at: i64,
    pub(super) usage: Vec<u8>,
}

pub(super) fn read_batch_progress(
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
pub(super) fn with_fresh_head(
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

pub(super) fn session_key(
    connection: &Connection,
    session_id: &SessionId,
) -> Result<Option<i64>, StoreError> {
    connection
        .prepare_cached("SELECT session_key FROM sessions WHERE session_id = ?1")
        .and_then(|mut statement| {
            statement
                .query_row([session_id], |row| row.get(0))
                .optional()
        })
        .map_err(query_error("find a session"))
}

/// The pending approvals of the session with `key`, oldest first.
pub(super) fn pending_approvals_of(
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

/// The batch `batch_id` and the one before it in its session.
pub(super) fn read_batch(
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
pub(super) fn batches_back_to(
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
pub(super) fn visit_batches(
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

pub(super) fn read_events(
    connection: &Connection,
    fresh: &HashMap<i64, i64>,
    session_id: &SessionId,
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
                event.session_id = session_id.as_str().to_owned();
                event.time = Some(time);
                events.push(event);
            }
            Ok(events.len() < limit)
        },
    )?;
    Ok(events)
}

pub(super) fn read_steps(
    connection: &Connection,
    fresh: &HashMap<i64, i64>,
    session_id: &SessionId,
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
pub(super) fn pending_approvals(
    connection: &Connection,
    session_id: &SessionId,
) -> Result<Vec<PendingApproval>, StoreError> {
    match session_key(connection, session_id)? {
        Some(key) => pending_approvals_of(connection, key),
        None => Ok(Vec::new()),
    }
}

pub(super) fn list_sessions(
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
    let mut values: Vec<rusqlite::types::Value> = vec![query.tenant.as_str().to_owned().into()];
    if let Some(agent) = &query.agent {
        values.push(agent.clone().into());
        sql.push_str(&format!(" AND s.agent = ?{}", values.len()));
    }
    if let Some(status) = query.status {
        values.push(status.as_str_name().to_owned().into());
        sql.push_str(&format!(" AND s.status = ?{}", values.len()));
    }
    if let Some(parent) = &query.parent {
        values.push(parent.as_str().to_owned().into());
        sql.push_str(&format!(" AND s.parent_session_id = ?{}", values.len()));
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

pub(super) fn page_token_after(session: &SessionRecord) -> String {
    format!("{}.{}", to_micros(session.created_at), session.session_id)
}

pub(super) fn parse_page_token(token: &str) -> Result<(i64, String), StoreError> {
    let bad = || StoreError::BadPageToken(token.to_owned());
    let (micros, session_id) = token.split_once('.').ok_or_else(bad)?;
    let micros = micros.parse().map_err(|_| bad())?;
    Ok((micros, session_id.to_owned()))
}

/// Every tenant's sessions that have not finished, oldest first.
pub(super) fn list_unfinished_sessions(
    connection: &Connection,
    fresh: &HashMap<i64, i64>,
) -> Result<Vec<SessionRecord>, StoreError> {
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
}
