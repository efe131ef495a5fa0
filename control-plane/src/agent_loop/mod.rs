//! The agent loop: one session from `started` to `finished`, durable at
//! every step.
//!
//! ```text
//! started → sandbox session + tool schemas
//!   turn N: budgets checked → model call (text_delta…) → tool_call_requested…
//!           → per call: arguments validated against the tool's schema
//!             (invalid: an invalid_input result, never dispatched), policy
//!             decision (allow | ask → approval_requested … approval_resolved | deny)
//!           → tool_started… (budget permitting) → dispatch (parallel, bounded)
//!           → tool_output…, tool_finished… (in call order) → turn_completed
//!           → budget_warning at 80% (the model is told to wrap up)
//!   until: no tool calls (COMPLETED) | turn limit (MAX_TURNS) | another budget
//!          (BUDGET_EXHAUSTED) | provider or sandbox failure (ERROR) |
//!          CancelSession (CANCELLED)
//! → sandbox session destroyed → finished (final or partial answer)
//! ```
//!
//! **Durability.** Events (and step records) are staged as they happen and
//! written in one transaction before anything leaves the process: before a
//! model call, before a tool call is sent to sandboxd, before waiting for a
//! human. Every staged event is also applied to [`state::SessionState`] —
//! the same code that rebuilds a session from its log. So when a control
//! plane restarts, [`AgentLoop::run`] on an unfinished session replays its
//! log and goes on exactly where it stopped:
//! - a model turn with a step record is not asked again; one without is
//!   asked again, and text already recorded is not recorded twice;
//! - a call with `tool_started` but no `tool_finished` is re-sent to sandboxd
//!   with the same request and `invocation_id`, and sandboxd answers with the
//!   result it recorded (or waits for the run in progress) instead of running
//!   it again; if the sandbox session is gone, the model gets an explicit
//!   "interrupted, verify side effects" result;
//! - a pending approval waits again, with its original deadline.
//!
//! Nothing the loop stages before a crash has escaped the process, so
//! re-deciding it after the restart is the same as deciding it once.

pub mod executor;
pub mod resolved;
pub mod state;
pub mod tools;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::FutureExt;
use futures::StreamExt;
use futures::stream::FuturesOrdered;
use harness_proto::control::v1 as control;
use harness_proto::control::v1::session_event::Kind;
use harness_proto::sandbox::v1 as sandbox;
use prost::Message as _;
use tokio::sync::{Semaphore, watch};

use self::executor::{CallTarget, DispatchSettings, Executors, HarnessRegistry};
use self::resolved::{ResolveError, SessionAgent};
use self::state::{SessionState, model_step};
use self::tools::{CallResult, DispatchRetry};
use crate::agent::Agent;
use crate::budget::{self, BudgetKind};
use crate::crash_hook;
use crate::error_report::error_chain;
use crate::event_log::{EventLog, FollowError, FollowMode};
use crate::policy::Verdict;
use crate::provider::{
    DeltaFilter, ModelRequest, ModelStreamEvent, ProviderError, STOP_MAX_TOKENS, STOP_PAUSE_TURN,
    ToolCall,
};
use crate::sandbox::{SandboxDispatch, SandboxError};
use crate::store::{NewEvent, SessionRecord, StepRecord, StoreError};

pub use self::state::ReplayError;

/// Grace period on top of the tool timeout before the control plane gives up
/// on sandboxd, which enforces the timeout itself and should answer first.
const SANDBOX_ANSWER_GRACE: Duration = Duration::from_secs(5);

/// Label put on sandbox sessions to find their control-plane session.
pub const SESSION_LABEL: &str = "control-plane-session";

/// Longest call id kept as the model gave it (longer ones are renamed).
const MAX_CALL_ID_LEN: usize = 128;

/// Loop-wide settings from the control-plane configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoopSettings {
    /// Deadline of one tool call.
    pub tool_timeout: Duration,
    /// Tool calls of one turn that run at once (at least 1).
    pub max_parallel_tool_calls: usize,
    /// Retries of an invocation while sandboxd is unreachable.
    pub dispatch_retry: DispatchRetry,
}

impl LoopSettings {
    /// Settings with the default dispatch retries.
    pub fn new(tool_timeout: Duration, max_parallel_tool_calls: usize) -> Self {
        Self {
            tool_timeout,
            max_parallel_tool_calls,
            dispatch_retry: DispatchRetry::default(),
        }
    }
}

/// Why a session could not go on. All but [`LoopError::Store`] end the
/// session with a `finished` event saying what happened.
#[derive(Debug, thiserror::Error)]
pub enum LoopError {
    /// The event log could not be read or written; the session is left
    /// as it is, to be resumed by the next start of the control plane.
    #[error("the event log could not be read or written")]
    Store(#[from] StoreError),
    /// The stored log could not be replayed.
    #[error("the session's log cannot be replayed")]
    Replay(#[from] ReplayError),
    /// Creating the sandbox session failed.
    #[error("could not create a sandbox session")]
    CreateSandbox(#[source] SandboxError),
    /// Listing sandboxd's tools failed.
    #[error("could not list sandboxd's tools")]
    ListTools(#[source] SandboxError),
    /// The session's agent could not be resolved, or its record no longer
    /// fits sandboxd or the agent's provider.
    #[error(transparent)]
    Agent(#[from] ResolveError),
    /// The model provider failed.
    #[error("model provider failed")]
    Provider(#[source] ProviderError),
    /// A tool call could not be delivered to sandboxd.
    #[error("tool call {call_id} could not be dispatched")]
    Dispatch {
        /// The call.
        call_id: String,
        /// What went wrong.
        #[source]
        source: SandboxError,
    },
    /// Waiting for an approval failed.
    #[error("waiting for an approval failed")]
    Approval(#[source] FollowError),
    /// CancelSession was called.
    #[error("cancelled: {0}")]
    Cancelled(String),
    /// The wall-clock budget ran out mid-turn.
    #[error("the wall-clock budget ran out")]
    WallClock,
    /// The control plane is shutting down; the session resumes at the next
    /// start.
    #[error("the control plane is shutting down")]
    ShuttingDown,
}

/// How a session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Ending {
    Completed(String),
    MaxTurns,
    BudgetExhausted(String),
    Cancelled(String),
    Error(String),
}

/// Runs sessions; shared by all of them.
#[derive(Debug)]
pub struct AgentLoop {
    log: EventLog,
    sandbox: Arc<dyn SandboxDispatch>,
    executors: Executors,
    settings: LoopSettings,
}

/// Receives the reason once a session is cancelled.
pub type CancelSignal = watch::Receiver<Option<String>>;

/// Why a call is not dispatched; its result is recorded without sandboxd.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Plan {
    Invalid(String),
    Denied(String),
}

impl AgentLoop {
    /// A loop writing to `log` and running tools on `sandbox` (and no
    /// harness tools).
    pub fn new(log: EventLog, sandbox: Arc<dyn SandboxDispatch>, settings: LoopSettings) -> Self {
        Self::with_harness_tools(log, sandbox, settings, HarnessRegistry::default())
    }

    /// A loop that also runs the tools of `harness_tools` itself.
    pub fn with_harness_tools(
        log: EventLog,
        sandbox: Arc<dyn SandboxDispatch>,
        settings: LoopSettings,
        harness_tools: HarnessRegistry,
    ) -> Self {
        Self {
            log,
            executors: Executors::new(Arc::clone(&sandbox), harness_tools),
            sandbox,
            settings,
        }
    }

    /// The event log.
    pub fn log(&self) -> &EventLog {
        &self.log
    }

    /// Runs `session` of `agent` to its `finished` event: from the start if
    /// it is new, from where its log ends if it was interrupted.
    pub async fn run(&self, session: SessionRecord, agent: Arc<Agent>, cancel: CancelSignal) {
        let session_id = session.session_id.clone();
        let state = match load_state(&self.log, &session, &agent).await {
            // Its end is recorded (the record handed in was older than the log).
            Ok(state) if state.finished => return,
            Ok(state) => state,
            Err(error) => {
                tracing::error!(session_id, error = %error_chain(&error), "cannot load the session's log; leaving it for the next start");
                return;
            }
        };
        if session.last_seq > 0 {
            tracing::info!(
                session_id,
                last_seq = session.last_seq,
                "resuming an interrupted session"
            );
        }
        let mut run = self.session_run(session, agent, cancel, state);
        let ending = match run.execute().await {
            Ok(ending) => ending,
            Err(LoopError::Store(error)) => {
                tracing::error!(session_id, error = %error_chain(&error), "event log write failed; leaving the session for the next start");
                return;
            }
            Err(LoopError::ShuttingDown) => {
                tracing::info!(
                    session_id,
                    "shutting down; the session resumes at the next start"
                );
                return;
            }
            Err(LoopError::Cancelled(reason)) => Ending::Cancelled(reason),
            Err(LoopError::WallClock) => {
                Ending::BudgetExhausted(run.exhausted_message(BudgetKind::WallClock))
            }
            Err(error) => {
                tracing::warn!(session_id, error = %error_chain(&error), "session failed");
                Ending::Error(error_chain(&error))
            }
        };
        if let Err(error) = run.finish(ending).await {
            tracing::error!(session_id, error = %error_chain(&error), "could not record the end of a session");
        }
    }

    /// Closes a session whose loop panicked, with stop reason error and
    /// `message`: from its log as it is now, like any other ending
    /// (interrupted calls, sandbox teardown, `finished`). A session already
    /// finished, or a log that cannot be read, is left as it is.
    pub async fn close_after_panic(
        &self,
        tenant: &str,
        session_id: &str,
        agent: Arc<Agent>,
        message: String,
    ) {
        let session = match self
            .log
            .store()
            .get_session(tenant.to_owned(), session_id.to_owned())
            .await
        {
            Ok(Some(session)) => session,
            Ok(None) => return,
            Err(error) => {
                tracing::error!(session_id, error = %error_chain(&error), "cannot read a panicked session; it resumes at the next start");
                return;
            }
        };
        let state = match load_state(&self.log, &session, &agent).await {
            Ok(state) if state.finished => return,
            Ok(state) => state,
            Err(error) => {
                tracing::error!(session_id, error = %error_chain(&error), "cannot load a panicked session's log; it resumes at the next start");
                return;
            }
        };
        let (_cancel, cancel) = watch::channel(None);
        let mut run = self.session_run(session, agent, cancel, state);
        if let Err(error) = run.finish(Ending::Error(message)).await {
            tracing::error!(session_id, error = %error_chain(&error), "could not record the end of a panicked session");
        }
    }

    /// A run of `session` from `state` (its log replayed).
    fn session_run(
        &self,
        session: SessionRecord,
        agent: Arc<Agent>,
        cancel: CancelSignal,
        state: SessionState,
    ) -> SessionRun<'_> {
        let wall_deadline = session
            .budget
            .max_wall_clock
            .map(|limit| session.created_at + harness_proto::duration_from_proto(&limit));
        let resumed_calls = state
            .open
            .iter()
            .flat_map(|open| &open.calls)
            .filter(|call| call.in_flight())
            .map(|call| call.call.call_id.clone())
            .collect();
        SessionRun {
            agent_loop: self,
            sandbox_session_id: session.sandbox_session_id.clone(),
            last_seq: session.last_seq,
            session,
            agent,
            cancel,
            state,
            staged: Vec::new(),
            staged_steps: Vec::new(),
            sandbox_lost: false,
            plans: HashMap::new(),
            resumed_calls,
            wall_deadline,
        }
    }
}

/// The session's state from its stored log (nothing for a new session).
async fn load_state(
    log: &EventLog,
    session: &SessionRecord,
    agent: &Agent,
) -> Result<SessionState, LoopError> {
    let mut state = SessionState::new(&agent.definition.system_prompt, &session.input);
    if session.last_seq == 0 {
        return Ok(state);
    }
    let store = log.store();
    let mut after = 0;
    loop {
        let batch = store
            .read_events(session.session_id.clone(), after, 1024)
            .await?;
        let Some(last) = batch.last() else {
            break;
        };
        after = last.seq;
        for event in &batch {
            if let Some(kind) = &event.kind {
                state.apply(event.turn, kind);
            }
        }
    }
    for step in store.read_steps(session.session_id.clone()).await? {
        state.apply_step(&step)?;
    }
    Ok(state)
}

/// State of one running session.
struct SessionRun<'a> {
    agent_loop: &'a AgentLoop,
    session: SessionRecord,
    /// The agent as loaded now: resolves a new session's record (and runs a
    /// session whose log predates records); the loop itself runs as the
    /// recorded [`SessionAgent`].
    agent: Arc<Agent>,
    cancel: CancelSignal,
    /// Everything recorded (or staged), applied in order.
    state: SessionState,
    /// Events applied to `state` but not yet written.
    staged: Vec<NewEvent>,
    staged_steps: Vec<StepRecord>,
    last_seq: u64,
    sandbox_session_id: Option<String>,
    /// sandboxd lost the sandbox session; make a new one before dispatching.
    sandbox_lost: bool,
    /// Calls of the open turn whose result does not come from sandboxd.
    plans: HashMap<String, Plan>,
    /// Calls that were in flight when this process took the session over.
    resumed_calls: HashSet<String>,
    wall_deadline: Option<SystemTime>,
}

impl SessionRun<'_> {
    fn session_id(&self) -> &str {
        &self.session.session_id
    }

    /// Applies an event to the state and stages it for the next write.
    fn stage(&mut self, turn: u32, kind: Kind) {
        self.state.apply(turn, &kind);
        self.staged.push(NewEvent::new(turn, kind));
    }

    /// Writes what is staged, in one transaction.
    async fn flush(&mut self) -> Result<(), LoopError> {
        if self.staged.is_empty() && self.staged_steps.is_empty() {
            return Ok(());
        }
        let events = std::mem::take(&mut self.staged);
        let steps = std::mem::take(&mut self.staged_steps);
        let stored = self
            .agent_loop
            .log
            .append_batch(&self.session.session_id, events, steps)
            .await?;
        if let Some(last) = stored.last() {
            self.last_seq = last.seq;
        }
        Ok(())
    }

    fn elapsed(&self) -> Duration {
        SystemTime::now()
            .duration_since(self.session.created_at)
            .unwrap_or_default()
    }

    fn exhausted_message(&self, kind: BudgetKind) -> String {
        budget::exhausted_message(
            kind,
            &self.session.budget,
            &self.state.usage_with_open_turn(),
            self.elapsed(),
        )
    }

    async fn execute(&mut self) -> Result<Ending, LoopError> {
        let offered = if self.state.started {
            None
        } else {
            Some(self.record_start().await?)
        };
        if let Some(reason) = self.session.cancel_reason.clone() {
            return Ok(Ending::Cancelled(reason));
        }
        let agent = Arc::new(self.session_agent(offered).await?);
        if self.sandbox_session_id.is_none() {
            self.create_sandbox(&agent).await?;
        }
        loop {
            let turn = match &self.state.open {
                Some(open) => open.turn,
                None => {
                    if let Some(ending) = self.budget_stop() {
                        return Ok(ending);
                    }
                    let turn = self.state.closed_turns + 1;
                    self.state.open_turn(turn);
                    turn
                }
            };
            self.run_turn(turn, &agent).await?;
            if let Some(ending) = self.ending_after_turn() {
                return Ok(ending);
            }
        }
    }

    /// Records `started` with the agent resolved from its file and
    /// sandboxd's tools; returns the tools sandboxd offered. A session whose
    /// agent cannot be resolved still records `started` (without the
    /// record), then fails.
    async fn record_start(&mut self) -> Result<Vec<sandbox::Tool>, LoopError> {
        let offered = self.list_tools().await;
        let resolved = offered.as_ref().ok().map(|offered| {
            resolved::record(
                &self.agent,
                offered,
                self.agent_loop.executors.harness_tools(),
            )
        });
        let definition = &self.agent.definition;
        let started = control::SessionStarted {
            agent: definition.name.clone(),
            provider: definition.provider.as_str().to_owned(),
            model: definition.model.clone(),
            input: self.session.input.clone(),
            budget: Some(self.session.budget),
            resolved: resolved
                .as_ref()
                .and_then(|resolved| resolved.as_ref().ok())
                .cloned(),
        };
        self.stage(0, Kind::Started(started));
        self.flush().await?;
        let offered = offered?;
        resolved.transpose()?;
        Ok(offered)
    }

    /// What the session runs as: rebuilt from the record in its `started`
    /// event, after checking sandboxd still has the recorded tools (`offered`
    /// if they were just listed). A log without a record (written before
    /// records were) runs as the agent file is now.
    async fn session_agent(
        &mut self,
        offered: Option<Vec<sandbox::Tool>>,
    ) -> Result<SessionAgent, LoopError> {
        let offered = match offered {
            Some(offered) => offered,
            None => self.list_tools().await?,
        };
        let record = match &self.state.resolved {
            Some(record) => {
                resolved::check_tools(record, &offered, self.agent_loop.executors.harness_tools())?;
                record.clone()
            }
            None => {
                tracing::warn!(
                    session_id = self.session.session_id,
                    "the session's log has no resolved agent; it resumes as its agent file is now"
                );
                resolved::record(
                    &self.agent,
                    &offered,
                    self.agent_loop.executors.harness_tools(),
                )?
            }
        };
        Ok(SessionAgent::from_record(
            &self.session.agent,
            &record,
            &self.agent,
        )?)
    }

    /// The ending if a budget is used up before the next model turn.
    fn budget_stop(&self) -> Option<Ending> {
        let kind = budget::exhausted(&self.session.budget, &self.state.usage, self.elapsed())?;
        Some(match kind {
            BudgetKind::Turns => Ending::MaxTurns,
            kind => Ending::BudgetExhausted(self.exhausted_message(kind)),
        })
    }

    /// The ending after a closed turn, if the model is done.
    fn ending_after_turn(&self) -> Option<Ending> {
        if !self.state.last_turn_without_calls {
            return None;
        }
        match self.state.last_stop_reason.as_str() {
            // A paused turn goes on with another call.
            STOP_PAUSE_TURN => None,
            STOP_MAX_TOKENS => Some(Ending::Completed(
                "the last reply was cut off at the model's output-token limit".to_owned(),
            )),
            _ => Some(Ending::Completed(String::new())),
        }
    }

    async fn run_turn(&mut self, turn: u32, agent: &SessionAgent) -> Result<(), LoopError> {
        let has_model = self
            .state
            .open
            .as_ref()
            .is_some_and(|open| open.model.is_some());
        if !has_model {
            self.model_call(turn, agent).await?;
        }
        self.admit_calls(turn, agent);
        self.await_approvals(turn, agent).await?;
        self.start_calls(turn, agent).await?;
        self.collect_results(turn).await?;
        self.close_turn(turn);
        Ok(())
    }

    async fn create_sandbox(&mut self, agent: &SessionAgent) -> Result<(), LoopError> {
        let request = sandbox::CreateSessionRequest {
            policy: Some(agent.sandbox_policy.clone()),
            labels: HashMap::from([(SESSION_LABEL.to_owned(), self.session_id().to_owned())]),
        };
        let sandbox = Arc::clone(&self.agent_loop.sandbox);
        let sandbox_session_id = self
            .retry_unreachable(|| sandbox.create_session(request.clone()))
            .await?
            .map_err(LoopError::CreateSandbox)?;
        self.sandbox_session_id = Some(sandbox_session_id.clone());
        self.agent_loop
            .log
            .store()
            .set_sandbox_session(self.session_id().to_owned(), sandbox_session_id)
            .await?;
        Ok(())
    }

    /// The tools sandboxd offers.
    async fn list_tools(&mut self) -> Result<Vec<sandbox::Tool>, LoopError> {
        let sandbox = Arc::clone(&self.agent_loop.sandbox);
        self.retry_unreachable(|| sandbox.list_tools())
            .await?
            .map_err(LoopError::ListTools)
    }

    /// Asks the model for turn `turn`; records its text as it streams and,
    /// once complete, its tool calls and the model step.
    async fn model_call(&mut self, turn: u32, agent: &SessionAgent) -> Result<(), LoopError> {
        self.flush().await?;
        let recorded = self
            .state
            .open
            .as_ref()
            .map(|open| open.recorded_text.clone())
            .unwrap_or_default();
        let request = ModelRequest {
            model: agent.model.clone(),
            messages: Arc::clone(&self.state.messages),
            tools: Arc::clone(&agent.tools),
            max_output_tokens: agent.max_output_tokens,
        };
        let mut filter = DeltaFilter::new(recorded);
        let mut stream = agent.provider.stream_turn(request);
        let mut first = true;
        let completed = loop {
            let item = self.until_stopped(stream.next()).await?;
            if first {
                crash_hook::model_response_started();
                first = false;
            }
            // Take whatever else is ready, to write it in one go.
            let mut items = vec![item];
            while matches!(items.last(), Some(Some(Ok(ModelStreamEvent::TextDelta(_))))) {
                match stream.next().now_or_never() {
                    Some(next) => items.push(next),
                    None => break,
                }
            }
            let mut done = None;
            for item in items {
                match item {
                    Some(Ok(ModelStreamEvent::TextDelta(text))) => {
                        if let Some(new) = filter.feed(&text) {
                            self.stage(
                                turn,
                                Kind::TextDelta(control::ModelTextDelta { text: new }),
                            );
                        }
                    }
                    Some(Ok(ModelStreamEvent::Completed(completed))) => done = Some(completed),
                    Some(Err(error)) => {
                        self.flush().await?;
                        return Err(LoopError::Provider(error));
                    }
                    None => {
                        self.flush().await?;
                        return Err(LoopError::Provider(ProviderError::Incomplete));
                    }
                }
            }
            if let Some(completed) = done {
                break completed;
            }
            self.flush().await?;
        };
        let calls = self.unique_call_ids(turn, completed.tool_calls);
        let cost_micros = agent.price.map_or(0, |price| {
            price.cost_micros(
                completed.usage.input_tokens,
                completed.usage.cached_input_tokens,
                completed.usage.output_tokens,
            )
        });
        let record = control::TurnCompleted {
            turn,
            assistant_text: completed.text,
            tool_calls: u32::try_from(calls.len()).unwrap_or(u32::MAX),
            usage: Some(control::TurnUsage {
                input_tokens: completed.usage.input_tokens,
                output_tokens: completed.usage.output_tokens,
                cached_input_tokens: completed.usage.cached_input_tokens,
                cost_micros,
            }),
            model_stop_reason: completed.stop_reason,
        };
        // A turn with tool calls is replayed from this record after a crash;
        // a final answer is recorded by its `turn_completed`, written with the
        // next batch.
        if !calls.is_empty() {
            self.staged_steps.push(StepRecord {
                step: model_step(turn),
                payload: record.encode_to_vec(),
            });
        }
        self.state.open_turn(turn).model = Some(state::ModelStep { record });
        for call in calls {
            self.stage(
                turn,
                Kind::ToolCallRequested(control::ToolCallRequested {
                    call_id: call.call_id,
                    tool: call.tool,
                    arguments_json: call.arguments_json,
                }),
            );
        }
        Ok(())
    }

    /// Call ids the model gave, made unique in the session (they key the
    /// invocation ids sandboxd de-duplicates by, and the model's own
    /// references): a missing, odd or repeated id becomes `call_<turn>_<n>`.
    fn unique_call_ids(&self, turn: u32, calls: Vec<ToolCall>) -> Vec<ToolCall> {
        // A turn has few calls: a list beats hashing.
        let mut this_turn: Vec<String> = Vec::with_capacity(calls.len());
        calls
            .into_iter()
            .enumerate()
            .map(|(index, mut call)| {
                let used = |id: &str| {
                    self.state.call_ids.contains(id) || this_turn.iter().any(|used| used == id)
                };
                let usable = !call.call_id.is_empty()
                    && call.call_id.len() <= MAX_CALL_ID_LEN
                    && !call.call_id.chars().any(char::is_control);
                if !usable || used(&call.call_id) {
                    let mut id = format!("call_{turn}_{index}");
                    let mut n = 1;
                    while used(&id) {
                        id = format!("call_{turn}_{index}_{n}");
                        n += 1;
                    }
                    call.call_id = id;
                }
                this_turn.push(call.call_id.clone());
                call
            })
            .collect()
    }

    /// Validates each undecided call and records policy's decision (and an
    /// approval request when policy asks).
    fn admit_calls(&mut self, turn: u32, agent: &SessionAgent) {
        let Some(open) = &self.state.open else {
            return;
        };
        let undecided: Vec<ToolCall> = open
            .calls
            .iter()
            .filter(|call| call.decision.is_none() && call.finished.is_none())
            .map(|call| call.call.clone())
            .collect();
        for call in undecided {
            let known = agent.tool_names.contains(&call.tool);
            let arguments = if known {
                match tools::validate_arguments(&call, agent.schemas.get(&call.tool)) {
                    Ok(arguments) => arguments,
                    Err(problem) => {
                        self.plans
                            .insert(call.call_id.clone(), Plan::Invalid(problem));
                        continue;
                    }
                }
            } else {
                serde_json::Value::Null
            };
            let decision =
                agent
                    .policy
                    .decide(&agent.name, &agent.tool_names, &call.tool, &arguments);
            let verdict = decision.verdict;
            let reason = decision.reason.clone();
            self.stage(
                turn,
                Kind::PolicyDecision(control::PolicyDecision {
                    call_id: call.call_id.clone(),
                    verdict: verdict.to_proto().into(),
                    rule: decision.rule,
                    reason: decision.reason,
                }),
            );
            if verdict == Verdict::Ask {
                let deadline = agent
                    .policy
                    .approval_timeout
                    .map(|timeout| harness_proto::timestamp_to_proto(SystemTime::now() + timeout));
                self.stage(
                    turn,
                    Kind::ApprovalRequested(control::ApprovalRequested {
                        call_id: call.call_id,
                        tool: call.tool,
                        arguments_json: call.arguments_json,
                        reason,
                        deadline,
                    }),
                );
            }
        }
    }

    /// Waits until every approval of the turn is resolved, by a human
    /// (`ResolveApproval` records it in the log) or by its deadline.
    async fn await_approvals(&mut self, turn: u32, agent: &SessionAgent) -> Result<(), LoopError> {
        if !self.waiting_for_approval() {
            return Ok(());
        }
        self.flush().await?;
        let mut resolutions = self.agent_loop.log.follow(
            &self.session.tenant,
            &self.session.session_id,
            self.last_seq,
            FollowMode::UntilFinished,
        );
        while self.waiting_for_approval() {
            let deadline = self.next_approval_deadline();
            let timer = async move {
                match deadline {
                    Some(deadline) => {
                        let wait = deadline
                            .duration_since(SystemTime::now())
                            .unwrap_or_default();
                        tokio::time::sleep(wait).await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            let next = self
                .until_stopped(async {
                    tokio::select! {
                        event = resolutions.next() => Some(event),
                        () = timer => None,
                    }
                })
                .await?;
            match next {
                Some(Some(Ok(event))) => {
                    self.last_seq = self.last_seq.max(event.seq);
                    if let Some(Kind::ApprovalResolved(resolved)) = &event.kind
                        && self.is_awaiting(&resolved.call_id)
                    {
                        self.state
                            .apply(event.turn, &Kind::ApprovalResolved(resolved.clone()));
                    }
                }
                Some(Some(Err(FollowError::ShuttingDown))) => return Err(LoopError::ShuttingDown),
                Some(Some(Err(error))) => return Err(LoopError::Approval(error)),
                Some(None) => {
                    return Err(LoopError::Approval(FollowError::SessionGone(
                        self.session.session_id.clone(),
                    )));
                }
                None => self.deny_overdue_approvals(turn, agent).await?,
            }
        }
        Ok(())
    }

    fn waiting_for_approval(&self) -> bool {
        self.state
            .open
            .as_ref()
            .is_some_and(|open| open.calls.iter().any(state::CallState::awaiting_approval))
    }

    fn is_awaiting(&self, call_id: &str) -> bool {
        self.state.open.as_ref().is_some_and(|open| {
            open.calls
                .iter()
                .any(|call| call.call.call_id == call_id && call.awaiting_approval())
        })
    }

    fn approval_deadlines(&self) -> Vec<(String, SystemTime)> {
        self.state
            .open
            .iter()
            .flat_map(|open| &open.calls)
            .filter(|call| call.awaiting_approval())
            .filter_map(|call| {
                let deadline = call.approval_requested.as_ref()?.deadline?;
                let deadline = SystemTime::try_from(deadline).ok()?;
                Some((call.call.call_id.clone(), deadline))
            })
            .collect()
    }

    fn next_approval_deadline(&self) -> Option<SystemTime> {
        self.approval_deadlines()
            .into_iter()
            .map(|(_, deadline)| deadline)
            .min()
    }

    /// Denies every approval whose deadline has passed, unless someone
    /// resolved it in the meantime (the store refuses a second resolution).
    async fn deny_overdue_approvals(
        &mut self,
        turn: u32,
        agent: &SessionAgent,
    ) -> Result<(), LoopError> {
        let now = SystemTime::now();
        let timeout = agent.policy.approval_timeout.unwrap_or_default();
        for (call_id, deadline) in self.approval_deadlines() {
            if deadline > now {
                continue;
            }
            let resolved = control::ApprovalResolved {
                call_id: call_id.clone(),
                decision: control::ApprovalDecision::Deny.into(),
                reason: format!("no decision within {}", humantime::format_duration(timeout)),
                resolved_by: "timeout".to_owned(),
            };
            let kind = Kind::ApprovalResolved(resolved);
            match self
                .agent_loop
                .log
                .append(&self.session.session_id, turn, kind.clone())
                .await
            {
                Ok(event) => {
                    self.last_seq = self.last_seq.max(event.seq);
                    self.state.apply(turn, &kind);
                }
                // A human was quicker; their resolution arrives through the log.
                Err(StoreError::ApprovalNotPending { .. }) => {}
                Err(error) => return Err(error.into()),
            }
        }
        Ok(())
    }

    /// Records `tool_started` (and the request, as a step) for every allowed
    /// call the budget still permits, then writes everything before dispatch.
    async fn start_calls(&mut self, turn: u32, agent: &SessionAgent) -> Result<(), LoopError> {
        let Some(open) = &self.state.open else {
            return Ok(());
        };
        let pending: Vec<(ToolCall, Option<String>)> = open
            .calls
            .iter()
            .filter(|call| call.started.is_none() && call.finished.is_none())
            .filter(|call| !self.plans.contains_key(&call.call.call_id))
            .map(|call| (call.call.clone(), refusal(call)))
            .collect();
        for (call, refused) in pending {
            let call_id = call.call_id.clone();
            if let Some(denial) = refused {
                self.plans.insert(call_id, Plan::Denied(denial));
                continue;
            }
            if let Some(kind) = self.dispatch_budget_stop() {
                let message = format!("not run: {}", self.exhausted_message(kind));
                self.plans.insert(call_id, Plan::Denied(message));
                continue;
            }
            if self.sandbox_lost {
                self.create_sandbox(agent).await?;
                self.sandbox_lost = false;
            }
            let invocation_id = format!("{}:{}", self.session_id(), call_id);
            let request = self.agent_loop.executors.request(
                agent.executor_of(&call.tool),
                &call,
                CallTarget {
                    invocation_id: &invocation_id,
                    sandbox_session_id: self.sandbox_session_id.as_deref().unwrap_or_default(),
                    timeout: self.agent_loop.settings.tool_timeout,
                },
            );
            self.staged_steps.push(request.step_record(&call_id));
            self.stage(
                turn,
                Kind::ToolStarted(control::ToolStarted {
                    call_id: call_id.clone(),
                    sandbox_session_id: request.sandbox_session_id().to_owned(),
                    invocation_id,
                    tool: call.tool,
                }),
            );
            if let Some(call) = self
                .state
                .open
                .as_mut()
                .and_then(|open| open.call_mut(&call_id))
            {
                call.request = Some(request);
            }
        }
        self.flush().await
    }

    /// A budget (other than turns, which limit model calls) used up, counting
    /// the open turn's model call.
    fn dispatch_budget_stop(&self) -> Option<BudgetKind> {
        let usage = self.state.usage_with_open_turn();
        let elapsed = self.elapsed();
        budget::ALL_KINDS
            .into_iter()
            .filter(|kind| *kind != BudgetKind::Turns)
            .find(|kind| {
                kind.limit(&self.session.budget)
                    .is_some_and(|limit| kind.used(&usage, elapsed) >= limit)
            })
    }

    /// Dispatches the calls in flight (bounded), and records every call's
    /// result in call order.
    async fn collect_results(&mut self, turn: u32) -> Result<(), LoopError> {
        let Some(open) = &self.state.open else {
            return Ok(());
        };
        let calls: Vec<(ToolCall, bool)> = open
            .calls
            .iter()
            .filter(|call| call.finished.is_none())
            .map(|call| (call.call.clone(), call.in_flight()))
            .collect();
        let settings = self.agent_loop.settings;
        let slots = Arc::new(Semaphore::new(settings.max_parallel_tool_calls.max(1)));
        let deadline = settings.tool_timeout + SANDBOX_ANSWER_GRACE;
        // All calls are polled; the semaphore bounds how many run at once (in
        // call order: it is fair), and `FuturesOrdered` yields results in
        // call order, which is the order they are recorded in.
        let mut dispatches: FuturesOrdered<_> = open
            .calls
            .iter()
            .filter(|call| call.finished.is_none() && call.in_flight())
            .map(|call| match call.request.clone() {
                Some(request) => self.agent_loop.executors.dispatch(
                    request,
                    DispatchSettings {
                        slots: Arc::clone(&slots),
                        deadline,
                        retry: settings.dispatch_retry,
                    },
                ),
                None => Box::pin(std::future::ready(CallResult::MissingRequest)),
            })
            .collect();
        for (call, in_flight) in calls {
            let call_id = call.call_id.clone();
            let finished = if in_flight {
                let result = match dispatches.next().now_or_never() {
                    Some(result) => result,
                    None => {
                        // Write what is recorded before waiting.
                        self.flush().await?;
                        self.until_stopped(dispatches.next()).await?
                    }
                };
                let result = result.unwrap_or(CallResult::Failed(SandboxError::MissingResult));
                if let CallResult::Outcome(outcome) = &result {
                    for chunk in &outcome.output {
                        self.stage(turn, Kind::ToolOutput(tools::tool_output(&call_id, chunk)));
                    }
                }
                if matches!(result, CallResult::SandboxLost(_)) {
                    self.sandbox_lost = true;
                }
                let resumed = self.resumed_calls.contains(&call_id);
                let finished = tools::finished_from_failure(&call, &result, resumed);
                if let CallResult::Failed(source) = result {
                    self.stage(turn, Kind::ToolFinished(finished));
                    return Err(LoopError::Dispatch { call_id, source });
                }
                finished
            } else {
                let (kind, message) = match self.plans.get(&call_id) {
                    Some(Plan::Invalid(message)) => {
                        (control::ToolErrorKind::InvalidInput, message.clone())
                    }
                    Some(Plan::Denied(message)) => {
                        (control::ToolErrorKind::Denied, message.clone())
                    }
                    None => (
                        control::ToolErrorKind::Internal,
                        "the call was neither dispatched nor refused".to_owned(),
                    ),
                };
                tools::finished_with_error(&call, kind, message)
            };
            self.stage(turn, Kind::ToolFinished(finished));
        }
        Ok(())
    }

    /// Records `turn_completed` and any budget warnings; written with the
    /// next batch (before the next model call, or at the end).
    fn close_turn(&mut self, turn: u32) {
        let record = self
            .state
            .open
            .as_ref()
            .and_then(|open| open.model.as_ref())
            .map(|model| model.record.clone())
            .unwrap_or_else(|| control::TurnCompleted {
                turn,
                ..Default::default()
            });
        self.stage(turn, Kind::TurnCompleted(record));
        self.plans.clear();
        let warnings = budget::new_warnings(
            &self.session.budget,
            &self.state.usage,
            self.elapsed(),
            &self.state.warned,
        );
        for warning in warnings {
            self.stage(turn, Kind::BudgetWarning(warning));
        }
    }

    /// Calls sandboxd, trying again while it is unreachable (it may be
    /// starting, e.g. when both daemons restart together).
    async fn retry_unreachable<T, F, Fut>(
        &mut self,
        mut call: F,
    ) -> Result<Result<T, SandboxError>, LoopError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, SandboxError>>,
    {
        let retry = self.agent_loop.settings.dispatch_retry;
        let mut wait = retry.backoff;
        let mut attempt = 1;
        loop {
            let result = self.until_stopped(call()).await?;
            match &result {
                Err(error) if error.is_unreachable() && attempt < retry.attempts => {
                    tracing::warn!(session_id = self.session.session_id, attempt, error = %error_chain(error), "sandboxd unreachable; trying again");
                    self.until_stopped(tokio::time::sleep(wait)).await?;
                    wait = wait.saturating_mul(2);
                    attempt += 1;
                }
                _ => return Ok(result),
            }
        }
    }

    /// Awaits `future` unless the session is cancelled or its wall clock
    /// runs out first.
    async fn until_stopped<F: std::future::Future>(
        &mut self,
        future: F,
    ) -> Result<F::Output, LoopError> {
        let wall_deadline = self.wall_deadline;
        let wall_clock = async move {
            match wall_deadline {
                Some(deadline) => {
                    let wait = deadline
                        .duration_since(SystemTime::now())
                        .unwrap_or_default();
                    tokio::time::sleep(wait).await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            biased;
            reason = cancelled(&mut self.cancel) => Err(LoopError::Cancelled(reason)),
            () = wall_clock => Err(LoopError::WallClock),
            output = future => Ok(output),
        }
    }

    /// Closes the log: interrupted calls, sandbox teardown, `finished`.
    async fn finish(&mut self, ending: Ending) -> Result<(), LoopError> {
        let interrupted: Vec<ToolCall> = self
            .state
            .open
            .iter()
            .flat_map(|open| &open.calls)
            .filter(|call| call.in_flight())
            .map(|call| call.call.clone())
            .collect();
        let turn = self
            .state
            .open
            .as_ref()
            .map_or(self.state.closed_turns, |open| open.turn);
        for call in interrupted {
            let message = "the session ended before this call finished; \
                           its side effects may or may not have happened"
                .to_owned();
            let finished =
                tools::finished_with_error(&call, control::ToolErrorKind::Interrupted, message);
            self.stage(turn, Kind::ToolFinished(finished));
        }
        self.destroy_sandbox().await;
        let finished = self.finished_event(ending);
        self.stage(turn, Kind::Finished(finished));
        self.flush().await
    }

    fn finished_event(&self, ending: Ending) -> control::SessionFinished {
        let (stop_reason, message) = match ending {
            Ending::Completed(note) => (control::StopReason::Completed, note),
            Ending::MaxTurns => (
                control::StopReason::MaxTurns,
                format!("stopped after {} turns", self.state.closed_turns),
            ),
            Ending::BudgetExhausted(message) => (control::StopReason::BudgetExhausted, message),
            Ending::Cancelled(reason) => (control::StopReason::Cancelled, reason),
            Ending::Error(message) => (control::StopReason::Error, message),
        };
        // The partial answer: the turn in progress if the model spoke in it.
        let final_output = self
            .state
            .open
            .as_ref()
            .and_then(|open| open.model.as_ref())
            .map(|model| model.record.assistant_text.clone())
            .filter(|text| !text.is_empty())
            .unwrap_or_else(|| self.state.last_assistant_text.clone());
        control::SessionFinished {
            stop_reason: stop_reason.into(),
            final_output,
            message,
            usage: Some(control::BudgetUsage {
                wall_clock: Some(harness_proto::duration_to_proto(self.elapsed())),
                ..self.state.usage
            }),
        }
    }

    /// Best effort: a failure is logged, and sandboxd's TTL cleans up.
    async fn destroy_sandbox(&mut self) {
        let Some(sandbox_session_id) = self.sandbox_session_id.take() else {
            return;
        };
        let reason = format!("control-plane session {} ended", self.session.session_id);
        if let Err(error) = self
            .agent_loop
            .sandbox
            .destroy_session(sandbox_session_id.clone(), reason)
            .await
        {
            tracing::warn!(
                session_id = self.session.session_id,
                sandbox_session_id,
                error = %error_chain(&error),
                "could not destroy the sandbox session"
            );
        }
    }
}

/// Why an undispatched call may not run (policy or a human said no).
fn refusal(call: &state::CallState) -> Option<String> {
    let Some(decision) = &call.decision else {
        return Some("no policy decision was recorded for this call".to_owned());
    };
    match decision.verdict() {
        control::Verdict::Allow => None,
        control::Verdict::Ask => match &call.approval {
            Some(approval) if approval.decision() == control::ApprovalDecision::Allow => None,
            Some(approval) if approval.reason.is_empty() => {
                Some(format!("denied by {}", approval.resolved_by))
            }
            Some(approval) => Some(format!(
                "denied by {}: {}",
                approval.resolved_by, approval.reason
            )),
            None => Some("approval was never given".to_owned()),
        },
        control::Verdict::Deny | control::Verdict::Unspecified => Some(decision.reason.clone()),
    }
}

async fn cancelled(cancel: &mut CancelSignal) -> String {
    loop {
        if let Some(reason) = cancel.borrow_and_update().clone() {
            return reason;
        }
        if cancel.changed().await.is_err() {
            // Nobody can cancel any more: never resolve.
            std::future::pending::<()>().await;
        }
    }
}

#[cfg(test)]
mod tests;
