//! The gRPC face of the control plane: `harness.control.v1.ControlService`.
//!
//! Handlers validate, call the store, the event log or the supervisor, and
//! convert. Every failure is a [`ServiceError`]; `impl From<ServiceError> for
//! Status` is the one place that picks gRPC codes.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use futures::stream::BoxStream;
use harness_proto::control::v1 as control;
use harness_proto::control::v1::control_service_server::ControlService;
use tonic::{Request, Response, Status};

use harness_proto::control::v1::session_event::Kind;

use crate::agent::{Agent, AgentCatalog};
use crate::budget;
use crate::error_report::error_chain;
use crate::event_log::{EventLog, FollowError, FollowMode};
use crate::ids::{SessionId, TenantId};
use crate::store::{NewSession, SessionQuery, SessionRecord, StoreError};
use crate::supervisor::SessionSupervisor;
use crate::truncate;

/// The tenant of every caller until authentication exists.
pub const DEFAULT_TENANT: &str = "default";
/// Sessions per `ListSessions` page when the request says 0.
pub const DEFAULT_PAGE_SIZE: usize = 100;
/// Largest `ListSessions` page.
pub const MAX_PAGE_SIZE: usize = 1000;
/// Events read at a time when looking for a message's idempotency key.
const MESSAGE_SCAN_BATCH: usize = 1024;
/// How long `CancelSession` waits for the session to record its end.
const CANCEL_WAIT: Duration = Duration::from_secs(10);

/// The calling tenant: [`DEFAULT_TENANT`], until authentication exists.
fn caller_tenant() -> TenantId {
    TenantId::new(DEFAULT_TENANT)
}

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// A required request field is empty.
    #[error("request field `{0}` must be set")]
    MissingField(&'static str),
    /// No agent with this name.
    #[error("agent \"{0}\" not found; ListAgents shows the available agents")]
    UnknownAgent(String),
    /// No session with this id (for this tenant).
    #[error("session {0} not found")]
    UnknownSession(SessionId),
    /// A budget override above the agent's limit.
    #[error(
        "budget.{field} = {requested} is above agent \"{agent}\"'s limit of {limit}; budgets can only be lowered"
    )]
    BudgetAboveLimit {
        /// The budget field.
        field: &'static str,
        /// The value asked for.
        requested: u64,
        /// The agent.
        agent: String,
        /// The agent's limit.
        limit: u64,
    },
    /// A cost budget for a model without a price.
    #[error(
        "budget.max_cost_micros needs a price for model \"{model}\" (agent \"{agent}\"); add it to the control plane's [prices] table"
    )]
    CostWithoutPrice {
        /// The agent.
        agent: String,
        /// Its model.
        model: String,
    },
    /// ResolveApproval without a decision.
    #[error("decision must be APPROVAL_DECISION_ALLOW or APPROVAL_DECISION_DENY")]
    MissingDecision,
    /// ResolveApproval for a call that is not waiting (never asked, or
    /// already resolved by someone else or by its timeout).
    #[error("tool call {call_id} of session {session_id} is not awaiting approval")]
    NotAwaitingApproval {
        /// The session.
        session_id: SessionId,
        /// The call.
        call_id: String,
    },
    /// SendMessage for a session that is not waiting for input.
    #[error(
        "session {session_id} is {status}, not waiting for input; SendMessage is accepted only \
         while a conversation session (an agent with conversation = true) waits between answers"
    )]
    NotWaitingForInput {
        /// The session.
        session_id: SessionId,
        /// Its status.
        status: String,
    },
    /// A page token that was not issued by ListSessions.
    #[error("invalid page_token {0:?}")]
    BadPageToken(String),
    /// `subagent_session_id` is not a descendant of `session_id`.
    #[error("session {subagent} is not a subagent of session {ancestor}")]
    NotADescendant {
        /// The session the request named.
        ancestor: SessionId,
        /// The session it asked to resolve.
        subagent: SessionId,
    },
    /// The store failed.
    #[error("storage failed")]
    Store(#[source] StoreError),
    /// Following the event log failed.
    #[error("event stream failed")]
    Follow(#[source] FollowError),
}

impl From<StoreError> for ServiceError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::BadPageToken(token) => Self::BadPageToken(token),
            StoreError::ApprovalNotPending {
                session_id,
                call_id,
            } => Self::NotAwaitingApproval {
                session_id,
                call_id,
            },
            other => Self::Store(other),
        }
    }
}

impl From<ServiceError> for Status {
    fn from(error: ServiceError) -> Self {
        let message = error_chain(&error);
        match &error {
            ServiceError::MissingField(_)
            | ServiceError::BudgetAboveLimit { .. }
            | ServiceError::CostWithoutPrice { .. }
            | ServiceError::MissingDecision
            | ServiceError::BadPageToken(_) => Status::invalid_argument(message),
            ServiceError::UnknownAgent(_)
            | ServiceError::UnknownSession(_)
            | ServiceError::NotADescendant { .. } => Status::not_found(message),
            ServiceError::NotAwaitingApproval { .. } | ServiceError::NotWaitingForInput { .. } => {
                Status::failed_precondition(message)
            }
            ServiceError::Store(_) => Status::internal(message),
            ServiceError::Follow(FollowError::ShuttingDown) => Status::unavailable(message),
            ServiceError::Follow(FollowError::SessionGone(_)) => Status::not_found(message),
            ServiceError::Follow(FollowError::Store(_)) => Status::internal(message),
        }
    }
}

/// [`ControlService`] backed by the agent catalog, the event log and the
/// session supervisor.
#[derive(Debug, Clone)]
pub struct ControlPlaneService {
    agents: Arc<AgentCatalog>,
    log: EventLog,
    supervisor: Arc<SessionSupervisor>,
}

impl ControlPlaneService {
    /// A service over these parts.
    pub fn new(
        agents: Arc<AgentCatalog>,
        log: EventLog,
        supervisor: Arc<SessionSupervisor>,
    ) -> Self {
        Self {
            agents,
            log,
            supervisor,
        }
    }

    /// The caller's session `session_id`.
    async fn session(&self, session_id: &SessionId) -> Result<SessionRecord, ServiceError> {
        self.log
            .store()
            .get_session(caller_tenant(), session_id.clone())
            .await?
            .ok_or_else(|| ServiceError::UnknownSession(session_id.clone()))
    }

    async fn start(
        &self,
        request: control::StartSessionRequest,
    ) -> Result<control::StartSessionResponse, ServiceError> {
        if request.agent.is_empty() {
            return Err(ServiceError::MissingField("agent"));
        }
        let agent = self
            .agents
            .get(&request.agent)
            .ok_or_else(|| ServiceError::UnknownAgent(request.agent.clone()))?;
        let budget = effective_budget(&agent, request.budget)?;
        let new = NewSession {
            session_id: SessionId::generate(),
            tenant: caller_tenant(),
            agent: request.agent,
            input: request.input,
            metadata: request.metadata,
            budget,
            idempotency_key: Some(request.idempotency_key).filter(|key| !key.is_empty()),
            parent: None,
        };
        let outcome = self.log.store().create_session(new).await?;
        if outcome.created {
            tracing::info!(
                session_id = outcome.session.session_id.as_str(),
                agent = outcome.session.agent,
                "session started"
            );
            self.supervisor.launch(outcome.session.clone(), agent);
        }
        Ok(control::StartSessionResponse {
            session: Some(outcome.session.to_proto(SystemTime::now())),
            created: outcome.created,
        })
    }

    async fn list(
        &self,
        request: control::ListSessionsRequest,
    ) -> Result<control::ListSessionsResponse, ServiceError> {
        let page_size = match usize::try_from(request.page_size).unwrap_or(MAX_PAGE_SIZE) {
            0 => DEFAULT_PAGE_SIZE,
            size => size.min(MAX_PAGE_SIZE),
        };
        let status = match request.status() {
            control::SessionStatus::Unspecified => None,
            status => Some(status),
        };
        let query = SessionQuery {
            tenant: caller_tenant(),
            agent: Some(request.agent).filter(|agent| !agent.is_empty()),
            status,
            page_size,
            page_token: Some(request.page_token).filter(|token| !token.is_empty()),
            parent: Some(request.parent_session_id)
                .filter(|parent| !parent.is_empty())
                .map(SessionId::from),
        };
        let page = self.log.store().list_sessions(query).await?;
        let now = SystemTime::now();
        Ok(control::ListSessionsResponse {
            sessions: page.sessions.iter().map(|s| s.to_proto(now)).collect(),
            next_page_token: page.next_page_token.unwrap_or_default(),
        })
    }

    async fn cancel(
        &self,
        request: control::CancelSessionRequest,
    ) -> Result<control::CancelSessionResponse, ServiceError> {
        let session_id = SessionId::from(request.session_id);
        let session = self.session(&session_id).await?;
        if session.status != control::SessionStatus::Finished {
            let reason = if request.reason.is_empty() {
                "cancelled by the caller".to_owned()
            } else {
                request.reason
            };
            // Recorded first, so a restart before the loop stops still cancels.
            match self
                .log
                .store()
                .request_cancel(session.session_id.clone(), reason.clone())
                .await
            {
                Ok(()) | Err(StoreError::SessionFinished(_)) => {}
                Err(error) => return Err(error.into()),
            }
            if self.supervisor.cancel(&session.session_id, &reason) {
                self.wait_for_finish(&session).await;
            }
        }
        let session = self.session(&session_id).await?;
        Ok(control::CancelSessionResponse {
            session: Some(session.to_proto(SystemTime::now())),
        })
    }

    async fn resolve(
        &self,
        request: control::ResolveApprovalRequest,
    ) -> Result<control::ResolveApprovalResponse, ServiceError> {
        if request.session_id.is_empty() {
            return Err(ServiceError::MissingField("session_id"));
        }
        if request.call_id.is_empty() {
            return Err(ServiceError::MissingField("call_id"));
        }
        let decision = request.decision();
        if decision == control::ApprovalDecision::Unspecified {
            return Err(ServiceError::MissingDecision);
        }
        let named = self.session(&SessionId::from(request.session_id)).await?;
        let session = if request.subagent_session_id.is_empty() {
            named
        } else {
            let subagent = self
                .session(&SessionId::from(request.subagent_session_id))
                .await?;
            if !subagent.lineage.contains(&named.session_id) {
                return Err(ServiceError::NotADescendant {
                    ancestor: named.session_id,
                    subagent: subagent.session_id,
                });
            }
            subagent
        };
        let pending = self
            .log
            .store()
            .pending_approvals(session.session_id.clone())
            .await?;
        let not_pending = || ServiceError::NotAwaitingApproval {
            session_id: session.session_id.clone(),
            call_id: request.call_id.clone(),
        };
        let approval = pending
            .iter()
            .find(|approval| approval.call_id == request.call_id)
            .ok_or_else(not_pending)?;
        // The store accepts one resolution per request; a racing second one
        // (another human, or the timeout) fails with NotAwaitingApproval.
        let resolved = control::ApprovalResolved {
            call_id: request.call_id.clone(),
            decision: decision.into(),
            reason: request.reason,
            resolved_by: session.tenant.as_str().to_owned(),
        };
        let event = self
            .log
            .append(
                &session.session_id,
                approval.turn,
                Kind::ApprovalResolved(resolved),
            )
            .await?;
        tracing::info!(
            session_id = session.session_id.as_str(),
            call_id = request.call_id,
            decision = decision.as_str_name(),
            "approval resolved"
        );
        Ok(control::ResolveApprovalResponse { seq: event.seq })
    }

    async fn send(
        &self,
        request: control::SendMessageRequest,
    ) -> Result<control::SendMessageResponse, ServiceError> {
        if request.session_id.is_empty() {
            return Err(ServiceError::MissingField("session_id"));
        }
        if request.message.is_empty() {
            return Err(ServiceError::MissingField("message"));
        }
        let session = self.session(&SessionId::from(request.session_id)).await?;
        let key = request.idempotency_key;
        if let Some(seq) = self.message_with_key(&session, &key).await? {
            return Ok(control::SendMessageResponse { seq });
        }
        let not_waiting = |status: control::SessionStatus| ServiceError::NotWaitingForInput {
            session_id: session.session_id.clone(),
            status: crate::event::session_status_label(status),
        };
        if session.status != control::SessionStatus::WaitingForInput {
            return Err(not_waiting(session.status));
        }
        let turn = self.turn_of_last_event(&session).await?;
        let max_input_tokens = self
            .supervisor
            .agent_loop()
            .settings()
            .context
            .max_input_tokens;
        let (text, truncated) = match truncate::truncate_input(&request.message, max_input_tokens) {
            Some((cut, record)) => (cut, Some(record)),
            None => (request.message, None),
        };
        let message = control::UserMessage {
            truncated,
            text,
            idempotency_key: key.clone(),
            reply_to_seq: session.last_seq,
        };
        match self
            .log
            .append(&session.session_id, turn, Kind::UserMessage(message))
            .await
        {
            Ok(event) => {
                tracing::info!(
                    session_id = session.session_id.as_str(),
                    seq = event.seq,
                    "user message recorded"
                );
                Ok(control::SendMessageResponse { seq: event.seq })
            }
            // Another message answered this wait first: the same one retried
            // (its key is in the log now), or another.
            Err(StoreError::NotWaitingForInput(_)) => {
                match self.message_with_key(&session, &key).await? {
                    Some(seq) => Ok(control::SendMessageResponse { seq }),
                    None => {
                        let now = self.session(&session.session_id).await?;
                        Err(not_waiting(now.status))
                    }
                }
            }
            Err(error) => Err(error.into()),
        }
    }

    /// The seq of the session's user message sent with idempotency key
    /// `key`; `None` for an empty key or one not used yet.
    async fn message_with_key(
        &self,
        session: &SessionRecord,
        key: &str,
    ) -> Result<Option<u64>, ServiceError> {
        if key.is_empty() {
            return Ok(None);
        }
        let store = self.log.store();
        let mut after = 0;
        loop {
            let batch = store
                .read_events(session.session_id.clone(), after, MESSAGE_SCAN_BATCH)
                .await?;
            let Some(last) = batch.last() else {
                return Ok(None);
            };
            after = last.seq;
            let found = batch.iter().find(|event| {
                matches!(&event.kind, Some(Kind::UserMessage(message)) if message.idempotency_key == key)
            });
            if let Some(event) = found {
                return Ok(Some(event.seq));
            }
        }
    }

    /// The turn of the session's latest event (0 for none).
    async fn turn_of_last_event(&self, session: &SessionRecord) -> Result<u32, ServiceError> {
        let last = self
            .log
            .store()
            .read_events(
                session.session_id.clone(),
                session.last_seq.saturating_sub(1),
                1,
            )
            .await?;
        Ok(last.first().map_or(0, |event| event.turn))
    }

    /// Waits (bounded) until the session records `finished`.
    async fn wait_for_finish(&self, session: &SessionRecord) {
        let events = self.log.follow(
            &session.tenant,
            &session.session_id,
            session.last_seq,
            FollowMode::UntilFinished,
        );
        let drained = events.for_each(|_| async {});
        if tokio::time::timeout(CANCEL_WAIT, drained).await.is_err() {
            tracing::warn!(
                session_id = session.session_id.as_str(),
                "cancelled session has not finished yet"
            );
        }
    }
}

/// The agent's budget lowered by the request's overrides.
fn effective_budget(
    agent: &Agent,
    requested: Option<control::BudgetLimits>,
) -> Result<control::BudgetLimits, ServiceError> {
    let definition = &agent.definition;
    let budget = budget::lowered(&definition.budget, requested.as_ref()).map_err(|raised| {
        ServiceError::BudgetAboveLimit {
            field: raised.field,
            requested: raised.requested,
            agent: definition.name.clone(),
            limit: raised.limit,
        }
    })?;
    if budget.max_cost_micros.is_some() && agent.price.is_none() {
        return Err(ServiceError::CostWithoutPrice {
            agent: definition.name.clone(),
            model: definition.model.clone(),
        });
    }
    Ok(budget)
}

#[tonic::async_trait]
impl ControlService for ControlPlaneService {
    async fn start_session(
        &self,
        request: Request<control::StartSessionRequest>,
    ) -> Result<Response<control::StartSessionResponse>, Status> {
        Ok(Response::new(self.start(request.into_inner()).await?))
    }

    async fn send_message(
        &self,
        request: Request<control::SendMessageRequest>,
    ) -> Result<Response<control::SendMessageResponse>, Status> {
        Ok(Response::new(self.send(request.into_inner()).await?))
    }

    type StreamEventsStream = BoxStream<'static, Result<control::SessionEvent, Status>>;

    async fn stream_events(
        &self,
        request: Request<control::StreamEventsRequest>,
    ) -> Result<Response<Self::StreamEventsStream>, Status> {
        let request = request.into_inner();
        let session = self.session(&SessionId::from(request.session_id)).await?;
        let mode = if request.follow {
            FollowMode::UntilFinished
        } else {
            FollowMode::UntilIdle
        };
        let events = self
            .log
            .follow(
                &session.tenant,
                &session.session_id,
                request.after_seq,
                mode,
            )
            .map(|event| event.map_err(|error| Status::from(ServiceError::Follow(error))));
        Ok(Response::new(Box::pin(events)))
    }

    async fn resolve_approval(
        &self,
        request: Request<control::ResolveApprovalRequest>,
    ) -> Result<Response<control::ResolveApprovalResponse>, Status> {
        Ok(Response::new(self.resolve(request.into_inner()).await?))
    }

    async fn cancel_session(
        &self,
        request: Request<control::CancelSessionRequest>,
    ) -> Result<Response<control::CancelSessionResponse>, Status> {
        Ok(Response::new(self.cancel(request.into_inner()).await?))
    }

    async fn get_session(
        &self,
        request: Request<control::GetSessionRequest>,
    ) -> Result<Response<control::GetSessionResponse>, Status> {
        let session_id = SessionId::from(request.into_inner().session_id);
        let session = self.session(&session_id).await?;
        Ok(Response::new(control::GetSessionResponse {
            session: Some(session.to_proto(SystemTime::now())),
        }))
    }

    async fn list_sessions(
        &self,
        request: Request<control::ListSessionsRequest>,
    ) -> Result<Response<control::ListSessionsResponse>, Status> {
        Ok(Response::new(self.list(request.into_inner()).await?))
    }

    async fn list_agents(
        &self,
        _request: Request<control::ListAgentsRequest>,
    ) -> Result<Response<control::ListAgentsResponse>, Status> {
        let agents = self
            .agents
            .agents()
            .map(|agent| agent.definition.to_proto())
            .collect();
        Ok(Response::new(control::ListAgentsResponse { agents }))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::path::PathBuf;

    use super::*;
    use crate::agent::{
        AgentDefinition, ConversationSettings, DEFAULT_MAX_REPEATED_CALLS, ProviderKind,
        SandboxSettings,
    };
    use crate::budget::ModelPrice;
    use crate::provider::scripted::{Script, ScriptedProvider};

    fn agent(max_turns: u32, max_cost_micros: Option<u64>) -> Agent {
        let definition = AgentDefinition {
            name: "a".to_owned(),
            description: String::new(),
            provider: ProviderKind::Scripted,
            model: "m".to_owned(),
            script: None,
            base_url: None,
            api_key_env: None,
            max_tokens_per_turn: None,
            system_prompt: String::new(),
            skills: Vec::new(),
            tools: Vec::new(),
            budget: control::BudgetLimits {
                max_turns: Some(max_turns),
                max_cost_micros,
                ..Default::default()
            },
            policy: Default::default(),
            sandbox: SandboxSettings::default(),
            conversation: ConversationSettings::default(),
            max_repeated_calls: DEFAULT_MAX_REPEATED_CALLS,
            delegation: crate::agent::DelegationSettings::default(),
            output: crate::agent::StructuredOutput::default(),
            source: PathBuf::from("a.toml"),
        };
        let provider = ScriptedProvider::new(Script { turns: Vec::new() }, "none");
        Agent::new(definition, Arc::new(provider)).unwrap()
    }

    #[test]
    fn budget_overrides_can_only_lower_limits() {
        let lowered = effective_budget(
            &agent(10, None),
            Some(control::BudgetLimits {
                max_turns: Some(3),
                max_tool_calls: Some(4),
                ..Default::default()
            }),
        )
        .unwrap();
        assert_eq!(
            lowered,
            control::BudgetLimits {
                max_turns: Some(3),
                max_tool_calls: Some(4),
                ..Default::default()
            }
        );
        assert_eq!(
            effective_budget(&agent(10, None), None).unwrap().max_turns,
            Some(10)
        );
        let raised = effective_budget(
            &agent(10, None),
            Some(control::BudgetLimits {
                max_turns: Some(11),
                ..Default::default()
            }),
        )
        .unwrap_err();
        let status = Status::from(raised);
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert_eq!(
            status.message(),
            "budget.max_turns = 11 is above agent \"a\"'s limit of 10; budgets can only be lowered"
        );
    }

    #[test]
    fn a_cost_budget_needs_a_price() {
        let error = effective_budget(
            &agent(10, None),
            Some(control::BudgetLimits {
                max_cost_micros: Some(5),
                ..Default::default()
            }),
        )
        .unwrap_err();
        let status = Status::from(error);
        assert_eq!(
            (status.code(), status.message()),
            (
                tonic::Code::InvalidArgument,
                "budget.max_cost_micros needs a price for model \"m\" (agent \"a\"); add it to the control plane's [prices] table"
            )
        );
        let mut priced = agent(10, Some(100));
        priced.price = Some(ModelPrice {
            input_usd_per_mtok: 1.0,
            cached_input_usd_per_mtok: None,
            output_usd_per_mtok: 1.0,
        });
        let lowered = effective_budget(
            &priced,
            Some(control::BudgetLimits {
                max_cost_micros: Some(50),
                ..Default::default()
            }),
        )
        .unwrap();
        assert_eq!(lowered.max_cost_micros, Some(50));
    }

    #[test]
    fn store_errors_map_to_their_codes() {
        let status = Status::from(ServiceError::from(StoreError::BadPageToken("x".to_owned())));
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        let status = Status::from(ServiceError::from(StoreError::ApprovalNotPending {
            session_id: SessionId::new("s"),
            call_id: "c".to_owned(),
        }));
        assert_eq!(
            (status.code(), status.message()),
            (
                tonic::Code::FailedPrecondition,
                "tool call c of session s is not awaiting approval"
            )
        );
    }
}
