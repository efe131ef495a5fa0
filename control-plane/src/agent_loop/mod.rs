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
//!          CancelSession (CANCELLED) | an `escalate` call (ESCALATED) | the
//!          same call max-repeated-calls times in a row (LOOP_DETECTED);
//!          a conversation waits for SendMessage after COMPLETED or
//!          ESCALATED instead (conversation.rs)
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
//! re-deciding it after the restart is the same as deciding it once. What
//! the requests depend on besides the log — system prompt, model, tools and
//! their schemas, policy, sandbox policy, price — is fixed when the session
//! starts and recorded in its `started` event ([`resolved`]), so editing an
//! agent file never changes a running session.
//!
//! **Files.** This one holds the loop's skeleton (start, turns, ending);
//! each phase of a turn is an `impl SessionRun` of its own:
//! `model_turn.rs` (the model call), `approvals.rs` (validation, policy,
//! approval waits), `dispatch.rs` (recording and running calls through the
//! [`executor`]s, results in call order), `sandbox_session.rs` (the sandbox
//! session on sandboxd). [`state`] replays the log; [`tools`] maps results.

mod approvals;
mod conversation;
mod delegation;
mod dispatch;
pub mod executor;
mod handoff;
mod model_turn;
mod plan;
pub mod resolved;
mod sandbox_session;
pub mod state;
pub mod structured;
pub mod tools;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use harness_proto::control::v1 as control;
use harness_proto::control::v1::session_event::Kind;
use harness_proto::sandbox::v1 as sandbox;
use tokio::sync::watch;

use self::executor::{Executors, HarnessRegistry};
use self::resolved::{ResolveError, SessionAgent};
use self::state::SessionState;
use self::tools::DispatchRetry;
use crate::agent::Agent;
use crate::budget::{self, BudgetKind};
use crate::context::ContextSettings;
use crate::error_report::error_chain;
use crate::event_log::{EventLog, FollowError};
use crate::ids::{SessionId, TenantId};
use crate::provider::{ProviderError, STOP_MAX_TOKENS, STOP_PAUSE_TURN, ToolCall};
use crate::sandbox::{SandboxDispatch, SandboxError};
use crate::store::{NewEvent, SessionRecord, StepRecord, StoreError};
use crate::subagent::receipt::ReceiptBuilder;
use crate::{prompt, truncate};

pub use self::state::ReplayError;

/// Grace period on top of the tool timeout before the control plane gives up
/// on sandboxd, which enforces the timeout itself and should answer first.
const SANDBOX_ANSWER_GRACE: Duration = Duration::from_secs(5);

/// Label put on sandbox sessions to find their control-plane session.
pub const SESSION_LABEL: &str = "control-plane-session";

/// Longest call id kept as the model gave it (longer ones are renamed).
const MAX_CALL_ID_LEN: usize = 128;

/// Loop-wide settings from the control-plane configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct LoopSettings {
    /// Deadline of one tool call.
    pub tool_timeout: Duration,
    /// Tool calls of one turn that run at once (at least 1).
    pub max_parallel_tool_calls: usize,
    /// Retries of an invocation while sandboxd is unreachable.
    pub dispatch_retry: DispatchRetry,
    /// How deep a tree of subagents may grow (a top-level session is at
    /// depth 0; its subagents at 1).
    pub max_subagent_depth: u32,
    /// What reaches the model.
    pub context: ContextSettings,
}

/// Subagent depth unless the control-plane configuration sets it.
pub const DEFAULT_MAX_SUBAGENT_DEPTH: u32 = 2;

impl LoopSettings {
    /// Settings with the default dispatch retries and subagent depth.
    pub fn new(tool_timeout: Duration, max_parallel_tool_calls: usize) -> Self {
        Self {
            tool_timeout,
            max_parallel_tool_calls,
            dispatch_retry: DispatchRetry::default(),
            max_subagent_depth: DEFAULT_MAX_SUBAGENT_DEPTH,
            context: ContextSettings::default(),
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
    /// Waiting for a user message failed.
    #[error("waiting for a user message failed")]
    Input(#[source] FollowError),
    /// CancelSession was called.
    #[error("cancelled: {0}")]
    Cancelled(String),
    /// The model asked for the same call too many times in a row.
    #[error("{0}")]
    LoopDetected(String),
    /// The wall-clock budget ran out mid-turn.
    #[error("the wall-clock budget ran out")]
    WallClock,
    /// A subagent's borrowed sandbox session (its parent's workspace) is
    /// gone; a new one would not be the parent's, so the child stops.
    #[error("the parent's sandbox session this subagent worked in is gone")]
    BorrowedSandboxLost,
    /// The agent the session was handed to is no longer defined.
    #[error("agent \"{0}\" the session was handed to is no longer defined in this control plane")]
    HandoffTargetGone(String),
    /// Summarising the history failed again and again.
    #[error("compaction failed: {attempts} attempts at a summary failed (last: {error})")]
    CompactionFailed {
        /// Attempts made.
        attempts: u32,
        /// The last failure.
        error: String,
    },
    /// The next model request's estimate would overrun a budget; it was not
    /// sent.
    #[error("{0}")]
    RequestOverBudget(String),
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
    LoopDetected(String),
    Escalated(String),
    /// The plan was denied at approval.
    PlanRejected(String),
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
    /// A harness limit (subagent depth, count or budget) refused it.
    Limit(String),
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

    /// The loop's settings.
    pub fn settings(&self) -> &LoopSettings {
        &self.settings
    }

    /// The event log.
    pub fn log(&self) -> &EventLog {
        &self.log
    }

    /// Runs `session` of `agent` to its `finished` event: from the start if
    /// it is new, from where its log ends if it was interrupted.
    ///
    /// Returns what the session's receipt is built from once its `finished`
    /// is committed (`None`: the log is not complete, or could not be read).
    pub async fn run(
        &self,
        session: SessionRecord,
        agent: Arc<Agent>,
        cancel: CancelSignal,
    ) -> Option<ReceiptBuilder> {
        // For the log lines after `session` moved into the run.
        let session_id = session.session_id.to_string();
        let state = match load_state(&self.log, &session, &agent).await {
            // Its end is recorded (the record handed in was older than the log).
            Ok(state) if state.finished => return Some(state.receipt),
            Ok(state) => state,
            Err(error) => {
                tracing::error!(session_id, error = %error_chain(&error), "cannot load the session's log; leaving it for the next start");
                return None;
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
                return None;
            }
            Err(LoopError::ShuttingDown) => {
                tracing::info!(
                    session_id,
                    "shutting down; the session resumes at the next start"
                );
                return None;
            }
            Err(LoopError::Cancelled(reason)) => Ending::Cancelled(reason),
            Err(LoopError::LoopDetected(message)) => Ending::LoopDetected(message),
            Err(LoopError::RequestOverBudget(message)) => Ending::BudgetExhausted(message),
            Err(LoopError::WallClock) => {
                Ending::BudgetExhausted(run.exhausted_message(BudgetKind::WallClock))
            }
            Err(error) => {
                tracing::warn!(session_id, error = %error_chain(&error), "session failed");
                Ending::Error(error_chain(&error))
            }
        };
        match run.finish(ending).await {
            Ok(()) => Some(run.state.receipt),
            Err(error) => {
                tracing::error!(session_id, error = %error_chain(&error), "could not record the end of a session");
                None
            }
        }
    }

    /// Closes a session whose loop panicked, with stop reason error and
    /// `message`: from its log as it is now, like any other ending
    /// (interrupted calls, sandbox teardown, `finished`). A session already
    /// finished, or a log that cannot be read, is left as it is.
    pub async fn close_after_panic(
        &self,
        tenant: &TenantId,
        session_id: &SessionId,
        agent: Arc<Agent>,
        message: String,
    ) {
        let session = match self
            .log
            .store()
            .get_session(tenant.clone(), session_id.clone())
            .await
        {
            Ok(Some(session)) => session,
            Ok(None) => return,
            Err(error) => {
                tracing::error!(session_id = session_id.as_str(), error = %error_chain(&error), "cannot read a panicked session; it resumes at the next start");
                return;
            }
        };
        let state = match load_state(&self.log, &session, &agent).await {
            Ok(state) if state.finished => return,
            Ok(state) => state,
            Err(error) => {
                tracing::error!(session_id = session_id.as_str(), error = %error_chain(&error), "cannot load a panicked session's log; it resumes at the next start");
                return;
            }
        };
        let (_cancel, cancel) = watch::channel(None);
        let mut run = self.session_run(session, agent, cancel, state);
        if let Err(error) = run.finish(Ending::Error(message)).await {
            tracing::error!(session_id = session_id.as_str(), error = %error_chain(&error), "could not record the end of a panicked session");
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
            prompt_history: prompt::HistoryIndex::default(),
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
    /// Digests and sizes of the conversation's messages, for prompt
    /// assembly.
    prompt_history: prompt::HistoryIndex,
}

impl SessionRun<'_> {
    fn session_id(&self) -> &SessionId {
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

    /// Writes what is staged while `future` runs, and returns its output
    /// once both are done. The write is never abandoned half way (a
    /// cancellation or the wall clock ends only the wait), so `last_seq`
    /// stays true; the write's error comes first.
    async fn flush_while<F: std::future::Future>(
        &mut self,
        future: F,
    ) -> Result<F::Output, LoopError> {
        let events = std::mem::take(&mut self.staged);
        let steps = std::mem::take(&mut self.staged_steps);
        let agent_loop = self.agent_loop;
        let session_id = self.session.session_id.clone();
        let write = async move {
            if events.is_empty() && steps.is_empty() {
                return Ok(Vec::new());
            }
            agent_loop
                .log
                .append_batch(&session_id, events, steps)
                .await
        };
        let (stored, output) = futures::future::join(write, self.until_stopped(future)).await;
        if let Some(last) = stored?.last() {
            self.last_seq = last.seq;
        }
        output
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
        let mut agent = Arc::new(self.session_agent(offered).await?);
        if self.sandbox_session_id.is_none() {
            self.create_sandbox(&agent).await?;
        }
        loop {
            if let Some(transfer) = self.state.pending_handoff.clone() {
                agent = Arc::new(self.hand_off(transfer, &agent).await?);
                continue;
            }
            if let Some(reason) = self.state.input_closed.clone() {
                return Ok(Ending::Completed(reason));
            }
            if self.state.waiting.is_some() {
                self.await_input(&agent).await?;
                continue;
            }
            let turn = match &self.state.open {
                Some(open) => open.turn,
                None => {
                    if let Some(ending) = self.budget_stop() {
                        return Ok(ending);
                    }
                    let turn = self.state.closed_turns + 1;
                    self.state.open_turn(turn);
                    // A plan being run: the harness asks for its next wave.
                    self.open_plan_wave(turn);
                    turn
                }
            };
            self.run_turn(turn, &agent).await?;
            if let Some(ending) = self.ending_after_turn(&agent) {
                let Some(ending) = self.check_structured_answer(ending, &agent) else {
                    continue;
                };
                match self.wait_or_end(ending, &agent) {
                    Some(ending) => return Ok(ending),
                    None => continue,
                }
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
        let (input, input_truncated) = match truncate::truncate_input(
            &self.session.input,
            self.agent_loop.settings.context.max_input_tokens,
        ) {
            Some((cut, record)) => (cut, Some(record)),
            None => (self.session.input.clone(), None),
        };
        let started = control::SessionStarted {
            input_truncated,
            agent: definition.name.clone(),
            provider: definition.provider.as_str().to_owned(),
            model: definition.model.clone(),
            input,
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
        let (name, current) = self.current_agent()?;
        let record = match &self.state.resolved {
            Some(record) => {
                resolved::check_tools(record, &offered, self.agent_loop.executors.harness_tools())?;
                record.clone()
            }
            None => {
                tracing::warn!(
                    session_id = self.session.session_id.as_str(),
                    "the session's log has no resolved agent; it resumes as its agent file is now"
                );
                resolved::record(
                    &current,
                    &offered,
                    self.agent_loop.executors.harness_tools(),
                )?
            }
        };
        Ok(SessionAgent::from_record(&name, &record, &current)?)
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
    fn ending_after_turn(&self, agent: &SessionAgent) -> Option<Ending> {
        if let Some(reason) = &self.state.escalation {
            return Some(Ending::Escalated(reason.clone()));
        }
        if let Some(reason) = &self.state.plan_rejected {
            return Some(Ending::PlanRejected(reason.clone()));
        }
        if self.state.plan.is_none() && self.state.invalid_plans > agent.output_retries {
            return Some(Ending::Error(format!(
                "no valid plan after {} attempts",
                self.state.invalid_plans
            )));
        }
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
        self.stop_a_repeating_model(turn, agent)?;
        self.admit_calls(turn, agent);
        self.await_approvals(turn, agent).await?;
        self.start_calls(turn, agent).await?;
        self.collect_results(turn, agent).await?;
        self.close_turn(turn);
        Ok(())
    }

    /// Ends the session (LOOP_DETECTED) if the model asked for the same call
    /// `max-repeated-calls` times in a row: the turn's calls are not run,
    /// each gets a denied result, and the turn closes.
    fn stop_a_repeating_model(&mut self, turn: u32, agent: &SessionAgent) -> Result<(), LoopError> {
        let limit = agent.max_repeated_calls;
        let Some((call, count)) = self.state.repeated_call.clone() else {
            return Ok(());
        };
        let in_this_turn = self
            .state
            .open
            .as_ref()
            .is_some_and(|open| !open.calls.is_empty());
        if limit == 0 || count < limit || !in_this_turn {
            return Ok(());
        }
        let message = format!(
            "the model asked for the same call {count} times in a row ({} with arguments {}); \
             stopped before running it again",
            call.tool, call.arguments_json
        );
        let unfinished: Vec<ToolCall> = self
            .state
            .open
            .iter()
            .flat_map(|open| &open.calls)
            .filter(|state| state.finished.is_none())
            .map(|state| state.call.clone())
            .collect();
        for call in unfinished {
            let finished = tools::finished_with_error(
                &call,
                control::ToolErrorKind::Denied,
                format!("not run: {message}"),
            );
            self.stage(turn, Kind::ToolFinished(finished));
        }
        self.close_turn(turn);
        Err(LoopError::LoopDetected(message))
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

    /// Awaits `future` unless the session is cancelled or its wall clock
    /// runs out first.
    async fn until_stopped<F: std::future::Future>(
        &mut self,
        future: F,
    ) -> Result<F::Output, LoopError> {
        let wall_clock = sleep_until_deadline(self.wall_deadline);
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
        let reason = ending.summary();
        for call in interrupted {
            self.abandon(&call.call_id, &reason).await;
            let message = "the session ended before this call finished; \
                           its side effects may or may not have happened"
                .to_owned();
            let finished =
                tools::finished_with_error(&call, control::ToolErrorKind::Interrupted, message);
            self.stage(turn, Kind::ToolFinished(finished));
        }
        let files_written = self.files_written().await;
        self.destroy_sandbox().await;
        let mut finished = self.finished_event(ending);
        finished.files_written = files_written;
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
            Ending::LoopDetected(message) => (control::StopReason::LoopDetected, message),
            Ending::Escalated(reason) => (control::StopReason::Escalated, reason),
            Ending::PlanRejected(reason) => (
                control::StopReason::PolicyViolation,
                format!("the plan was not approved: {reason}"),
            ),
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
            files_written: Vec::new(),
        }
    }

    /// Stops what an unfinished call started (a delegation's child).
    async fn abandon(&self, call_id: &str, reason: &str) {
        let request = self
            .state
            .open
            .iter()
            .flat_map(|open| &open.calls)
            .find(|call| call.call.call_id == call_id)
            .and_then(|call| call.request.as_ref());
        if let Some(request) = request {
            self.agent_loop.executors.abandon(request, reason).await;
        }
    }
}

impl Ending {
    /// One line on why the session ended (told to the children it stops).
    fn summary(&self) -> String {
        match self {
            Self::Completed(_) => "it completed".to_owned(),
            Self::MaxTurns => "it reached its turn limit".to_owned(),
            Self::BudgetExhausted(message)
            | Self::Cancelled(message)
            | Self::LoopDetected(message)
            | Self::Escalated(message)
            | Self::PlanRejected(message)
            | Self::Error(message) => message.clone(),
        }
    }
}

/// Sleeps until `deadline` (at once if it passed); never wakes without one.
async fn sleep_until_deadline(deadline: Option<SystemTime>) {
    match deadline {
        Some(deadline) => {
            let wait = deadline
                .duration_since(SystemTime::now())
                .unwrap_or_default();
            tokio::time::sleep(wait).await;
        }
        None => std::future::pending::<()>().await,
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
