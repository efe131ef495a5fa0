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

use crate::agent::{AgentCatalog, AgentDefinition};
use crate::error_report::error_chain;
use crate::event_log::{EventLog, FollowError, FollowMode};
use crate::store::{NewSession, SessionQuery, SessionRecord, StoreError};
use crate::supervisor::SessionSupervisor;

/// The tenant of every caller until authentication exists.
pub const DEFAULT_TENANT: &str = "default";
/// Sessions per `ListSessions` page when the request says 0.
pub const DEFAULT_PAGE_SIZE: usize = 100;
/// Largest `ListSessions` page.
pub const MAX_PAGE_SIZE: usize = 1000;
/// How long `CancelSession` waits for the session to record its end.
const CANCEL_WAIT: Duration = Duration::from_secs(10);

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
    UnknownSession(String),
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
    /// A budget override this control plane does not enforce yet.
    #[error("budget.{0} is not enforced yet; leave it unset")]
    BudgetNotEnforced(&'static str),
    /// A page token that was not issued by ListSessions.
    #[error("invalid page_token {0:?}")]
    BadPageToken(String),
    /// The session exists but its loop does not run in this process.
    #[error("session {0} is not running in this control plane and cannot be cancelled")]
    NotRunning(String),
    /// The rpc is part of the contract but not built yet.
    #[error("{rpc} is not implemented yet: {missing}")]
    Unimplemented {
        /// The rpc.
        rpc: &'static str,
        /// What is missing.
        missing: &'static str,
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
            | ServiceError::BadPageToken(_) => Status::invalid_argument(message),
            ServiceError::UnknownAgent(_) | ServiceError::UnknownSession(_) => {
                Status::not_found(message)
            }
            ServiceError::BudgetNotEnforced(_) | ServiceError::Unimplemented { .. } => {
                Status::unimplemented(message)
            }
            ServiceError::NotRunning(_) => Status::failed_precondition(message),
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

    async fn session(&self, session_id: &str) -> Result<SessionRecord, ServiceError> {
        self.log
            .store()
            .get_session(DEFAULT_TENANT.to_owned(), session_id.to_owned())
            .await?
            .ok_or_else(|| ServiceError::UnknownSession(session_id.to_owned()))
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
        let budget = effective_budget(&agent.definition, request.budget)?;
        let new = NewSession {
            session_id: uuid::Uuid::new_v4().to_string(),
            tenant: DEFAULT_TENANT.to_owned(),
            agent: request.agent,
            input: request.input,
            metadata: request.metadata,
            budget,
            idempotency_key: Some(request.idempotency_key).filter(|key| !key.is_empty()),
        };
        let outcome = self.log.store().create_session(new).await?;
        if outcome.created {
            tracing::info!(
                session_id = outcome.session.session_id,
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
            tenant: DEFAULT_TENANT.to_owned(),
            agent: Some(request.agent).filter(|agent| !agent.is_empty()),
            status,
            page_size,
            page_token: Some(request.page_token).filter(|token| !token.is_empty()),
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
        let session = self.session(&request.session_id).await?;
        if session.status != control::SessionStatus::Finished {
            let reason = if request.reason.is_empty() {
                "cancelled by the caller".to_owned()
            } else {
                request.reason
            };
            if !self.supervisor.cancel(&session.session_id, &reason) {
                return Err(ServiceError::NotRunning(session.session_id));
            }
            self.wait_for_finish(&session).await;
        }
        let session = self.session(&request.session_id).await?;
        Ok(control::CancelSessionResponse {
            session: Some(session.to_proto(SystemTime::now())),
        })
    }

    /// Waits (bounded) until the session records `finished`.
    async fn wait_for_finish(&self, session: &SessionRecord) {
        let events = self.log.follow(
            DEFAULT_TENANT,
            &session.session_id,
            session.last_seq,
            FollowMode::UntilFinished,
        );
        let drained = events.for_each(|_| async {});
        if tokio::time::timeout(CANCEL_WAIT, drained).await.is_err() {
            tracing::warn!(
                session_id = session.session_id,
                "cancelled session has not finished yet"
            );
        }
    }
}

/// The agent's budget lowered by the request's overrides.
fn effective_budget(
    agent: &AgentDefinition,
    requested: Option<control::BudgetLimits>,
) -> Result<control::BudgetLimits, ServiceError> {
    let mut budget = agent.budget();
    let Some(requested) = requested else {
        return Ok(budget);
    };
    let not_enforced = [
        ("max_tool_calls", requested.max_tool_calls.is_some()),
        ("max_input_tokens", requested.max_input_tokens.is_some()),
        ("max_output_tokens", requested.max_output_tokens.is_some()),
        ("max_cost_micros", requested.max_cost_micros.is_some()),
        ("max_wall_clock", requested.max_wall_clock.is_some()),
    ];
    if let Some((field, _)) = not_enforced.iter().find(|(_, set)| *set) {
        return Err(ServiceError::BudgetNotEnforced(field));
    }
    if let Some(max_turns) = requested.max_turns {
        if max_turns > agent.max_turns {
            return Err(ServiceError::BudgetAboveLimit {
                field: "max_turns",
                requested: u64::from(max_turns),
                agent: agent.name.clone(),
                limit: u64::from(agent.max_turns),
            });
        }
        budget.max_turns = Some(max_turns);
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
        _request: Request<control::SendMessageRequest>,
    ) -> Result<Response<control::SendMessageResponse>, Status> {
        Err(ServiceError::Unimplemented {
            rpc: "SendMessage",
            missing: "sessions never wait for input yet (agents finish after their final answer)",
        }
        .into())
    }

    type StreamEventsStream = BoxStream<'static, Result<control::SessionEvent, Status>>;

    async fn stream_events(
        &self,
        request: Request<control::StreamEventsRequest>,
    ) -> Result<Response<Self::StreamEventsStream>, Status> {
        let request = request.into_inner();
        let session = self.session(&request.session_id).await?;
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
        _request: Request<control::ResolveApprovalRequest>,
    ) -> Result<Response<control::ResolveApprovalResponse>, Status> {
        Err(ServiceError::Unimplemented {
            rpc: "ResolveApproval",
            missing: "the policy never asks for approval yet (it allows or denies)",
        }
        .into())
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
        let session = self.session(&request.into_inner().session_id).await?;
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
    use crate::agent::{ProviderKind, SandboxSettings};

    fn agent(max_turns: u32) -> AgentDefinition {
        AgentDefinition {
            name: "a".to_owned(),
            description: String::new(),
            provider: ProviderKind::Scripted,
            model: "m".to_owned(),
            script: None,
            system_prompt: String::new(),
            tools: Vec::new(),
            max_turns,
            sandbox: SandboxSettings::default(),
            source: PathBuf::from("a.toml"),
        }
    }

    #[test]
    fn budget_overrides_can_only_lower_the_turn_limit() {
        let lowered = effective_budget(
            &agent(10),
            Some(control::BudgetLimits {
                max_turns: Some(3),
                ..Default::default()
            }),
        )
        .unwrap();
        assert_eq!(lowered.max_turns, Some(3));
        assert_eq!(
            effective_budget(&agent(10), None).unwrap().max_turns,
            Some(10)
        );
        let raised = effective_budget(
            &agent(10),
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
    fn unenforced_budget_fields_are_refused_not_ignored() {
        let error = effective_budget(
            &agent(10),
            Some(control::BudgetLimits {
                max_output_tokens: Some(5),
                ..Default::default()
            }),
        )
        .unwrap_err();
        let status = Status::from(error);
        assert_eq!(
            (status.code(), status.message()),
            (
                tonic::Code::Unimplemented,
                "budget.max_output_tokens is not enforced yet; leave it unset"
            )
        );
    }

    #[test]
    fn store_page_token_errors_become_invalid_argument() {
        let status = Status::from(ServiceError::from(StoreError::BadPageToken("x".to_owned())));
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
    }
}
