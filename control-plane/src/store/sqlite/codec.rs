//! How values are stored: times and sequence numbers as integers, the
//! session row's encoded columns, and the protobuf blobs of a batch's
//! events and step records.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use harness_proto::control::v1::{
    BudgetLimits, BudgetUsage, SessionEvent, SessionStatus, StopReason,
};
use prost::Message as _;
use rusqlite::types::{FromSql, FromSqlResult, ToSql, ToSqlOutput, ValueRef};

use crate::ids::{SessionId, TenantId};
use crate::store::{SessionRecord, StepRecord, StoreError};

/// Session ids are stored as their text.
impl ToSql for SessionId {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::from(self.as_str()))
    }
}

impl FromSql for SessionId {
    fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
        String::column_result(value).map(SessionId::new)
    }
}

/// Tenant ids are stored as their text.
impl ToSql for TenantId {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::from(self.as_str()))
    }
}

impl FromSql for TenantId {
    fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
        String::column_result(value).map(TenantId::new)
    }
}

pub(super) fn to_micros(time: SystemTime) -> i64 {
    let micros = time
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_micros();
    i64::try_from(micros).unwrap_or(i64::MAX)
}

pub(super) fn from_micros(micros: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_micros(u64::try_from(micros).unwrap_or(0))
}

pub(super) fn seq_to_sql(seq: u64) -> i64 {
    i64::try_from(seq).unwrap_or(i64::MAX)
}

/// A session row with its columns still encoded.
pub(super) struct SessionRow {
    pub(super) session_id: SessionId,
    pub(super) tenant: TenantId,
    pub(super) agent: String,
    pub(super) input: String,
    pub(super) status: String,
    pub(super) stop_reason: String,
    pub(super) metadata_json: String,
    pub(super) budget: Vec<u8>,
    pub(super) usage: Option<Vec<u8>>,
    pub(super) idempotency_key: Option<String>,
    pub(super) created_at: i64,
    pub(super) updated_at: i64,
    pub(super) last_seq: i64,
    pub(super) final_output: String,
    pub(super) sandbox_session_id: Option<String>,
    pub(super) cancel_reason: Option<String>,
    pub(super) key: i64,
    pub(super) lineage_json: String,
    pub(super) sandbox_borrowed: bool,
}

impl SessionRow {
    pub(super) fn read(row: &rusqlite::Row<'_>) -> rusqlite::Result<Self> {
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
            lineage_json: row.get(17)?,
            sandbox_borrowed: row.get(18)?,
        })
    }

    pub(super) fn decode(self) -> Result<SessionRecord, StoreError> {
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
        let lineage: Vec<String> = serde_json::from_str(&self.lineage_json)
            .map_err(|error| corrupt(&format!("lineage: {error}")))?;
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
            lineage: lineage.into_iter().map(SessionId::new).collect(),
            sandbox_borrowed: self.sandbox_borrowed,
        })
    }
}

/// The events of one append, as stored.
#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct StoredBatch {
    /// Each without session id and time (columns hold them).
    #[prost(message, repeated, tag = "1")]
    pub(super) events: Vec<SessionEvent>,
}

/// Step records as stored in a batch row.
#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct StoredSteps {
    #[prost(message, repeated, tag = "1")]
    pub(super) steps: Vec<StoredStep>,
}

/// One step record.
#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct StoredStep {
    #[prost(string, tag = "1")]
    pub(super) step: String,
    #[prost(bytes = "vec", tag = "2")]
    pub(super) payload: Vec<u8>,
}

pub(super) fn encode_steps(steps: Vec<StepRecord>) -> Option<Vec<u8>> {
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

/// A stored batch as reads see it.
pub(super) struct BatchRow {
    pub(super) first_seq: i64,
    pub(super) last_seq: i64,
    pub(super) created_at: i64,
    pub(super) events: Vec<u8>,
    pub(super) steps: Option<Vec<u8>>,
}
