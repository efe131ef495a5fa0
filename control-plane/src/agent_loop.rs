//! The agent loop: one session from `started` to `finished`.
//!
//! ```text
//! started → sandbox session + tool definitions
//!   turn N: model call (text_delta…) → for each tool call: tool_call_requested,
//!           policy_decision, tool_started → dispatch (parallel, bounded) →
//!           tool_output…, tool_finished (in call order) → turn_completed
//!   until: no tool calls (COMPLETED) | max turns (MAX_TURNS) |
//!          provider or sandbox failure (ERROR) | CancelSession (CANCELLED)
//! → sandbox session destroyed → finished
//! ```
//!
//! Every event is in the store before the loop takes its next step. The loop
//! holds the conversation in memory for now; resuming a session after a
//! restart (replaying the log instead of re-executing) comes later, and until
//! then [`recover_interrupted_sessions`] closes what a previous process left
//! running.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use harness_proto::control::v1 as control;
use harness_proto::control::v1::session_event::Kind;
use harness_proto::sandbox::v1 as sandbox;
use tokio::sync::watch;

use crate::agent::Agent;
use crate::event;
use crate::event_log::EventLog;
use crate::provider::{
    CompletedTurn, Message, ModelRequest, ModelStreamEvent, ProviderError, ToolCall,
    ToolDefinition,
};
use crate::sandbox::{InvocationOutcome, SandboxDispatch, SandboxError};
use crate::store::{SessionRecord, StoreError};

/// Grace period on top of the tool timeout before the control plane gives up
/// on sandboxd, which enforces the timeout itself and should answer first.
const SANDBOX_ANSWER_GRACE: Duration = Duration::from_secs(5);

/// Label put on sandbox sessions to find their control-plane session.
pub const SESSION_LABEL: &str = "control-plane-session";

/// Policy rule name of the (only, for now) allow rule.
pub const DEFAULT_RULE: &str = "default";
/// Policy rule name that denies tools missing from the agent's `tools` list.
pub const AGENT_TOOLS_RULE: &str = "agent.tools";

/// Loop-wide settings from the control-plane configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoopSettings {
    /// Deadline of one tool call.
    pub tool_timeout: Duration,
    /// Tool calls of one turn that run at once (at least 1).
    pub max_parallel_tool_calls: usize,
}

/// Why a session could not go on. All but [`LoopError::Store`] end the
/// session with a `finished` event saying what happened.
#[derive(Debug, thiserror::Error)]
pub enum LoopError {
    /// The event log could not be written; nothing more can be recorded.
    #[error("the event log could not be written")]
    Store(#[from] StoreError),
    /// Creating the sandbox session failed.
    #[error("could not create a sandbox session")]
    CreateSandbox(#[source] SandboxError),
    /// Listing sandboxd's tools failed.
    #[error("could not list sandboxd's tools")]
    ListTools(#[source] SandboxError),
    /// The agent names a tool sandboxd does not have.
    #[error("agent tool \"{tool}\" is not offered by sandboxd (it has: {available})")]
    ToolUnavailable {
        /// The missing tool.
        tool: String,
        /// What sandboxd offers, comma-separated.
        available: String,
    },
    /// sandboxd described a tool with a schema that is not JSON.
    #[error("sandboxd's input schema of tool \"{tool}\" is not valid JSON")]
    BadToolSchema {
        /// The tool.
        tool: String,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
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
    /// CancelSession was called.
    #[error("cancelled: {0}")]
    Cancelled(String),
}

/// How a session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Ending {
    Completed,
    MaxTurns,
    Cancelled(String),
    Error(String),
}

/// Runs sessions; shared by all of them.
#[derive(Debug)]
pub struct AgentLoop {
    log: EventLog,
    sandbox: Arc<dyn SandboxDispatch>,
    settings: LoopSettings,
}

/// Receives the reason once a session is cancelled.
pub type CancelSignal = watch::Receiver<Option<String>>;

impl AgentLoop {
    /// A loop writing to `log` and running tools on `sandbox`.
    pub fn new(log: EventLog, sandbox: Arc<dyn SandboxDispatch>, settings: LoopSettings) -> Self {
        Self {
            log,
            sandbox,
            settings,
        }
    }

    /// Runs `session` of `agent` to its `finished` event.
    pub async fn run(&self, session: SessionRecord, agent: Arc<Agent>, cancel: CancelSignal) {
        let session_id = session.session_id.clone();
        let mut run = SessionRun {
            agent_loop: self,
            session,
            agent,
            cancel,
            usage: control::BudgetUsage::default(),
            turn: 0,
            last_assistant_text: String::new(),
            sandbox_session_id: None,
            in_flight: Vec::new(),
        };
        let ending = match run.execute().await {
            Ok(ending) => ending,
            Err(LoopError::Store(error)) => {
                tracing::error!(session_id, error = %error_chain(&error), "event log write failed; abandoning session");
                run.destroy_sandbox().await;
                return;
            }
            Err(LoopError::Cancelled(reason)) => Ending::Cancelled(reason),
            Err(error) => {
                tracing::warn!(session_id, error = %error_chain(&error), "session failed");
                Ending::Error(error_chain(&error))
            }
        };
        if let Err(error) = run.finish(ending).await {
            tracing::error!(session_id, error = %error_chain(&error), "could not record the end of a session");
        }
    }
}

/// State of one running session.
struct SessionRun<'a> {
    agent_loop: &'a AgentLoop,
    session: SessionRecord,
    agent: Arc<Agent>,
    cancel: CancelSignal,
    usage: control::BudgetUsage,
    turn: u32,
    last_assistant_text: String,
    sandbox_session_id: Option<String>,
    /// Calls with `tool_started` but no `tool_finished` yet, in call order.
    in_flight: Vec<(String, String)>,
}

/// A tool call after the policy decision.
enum PlannedCall {
    Dispatch(sandbox::InvokeRequest),
    Deny(String),
}

/// What a dispatched call came back with.
enum CallResult {
    Outcome(InvocationOutcome),
    Denied(String),
    TimedOut(Duration),
    Failed(SandboxError),
}

impl SessionRun<'_> {
    fn session_id(&self) -> &str {
        &self.session.session_id
    }

    async fn record(&mut self, kind: Kind) -> Result<control::SessionEvent, LoopError> {
        let event = self
            .agent_loop
            .log
            .append(&self.session.session_id, self.turn, kind)
            .await?;
        if let Some(kind) = &event.kind {
            event::apply_to_usage(&mut self.usage, kind);
        }
        Ok(event)
    }

    async fn execute(&mut self) -> Result<Ending, LoopError> {
        let definition = &self.agent.definition;
        let started = control::SessionStarted {
            agent: definition.name.clone(),
            provider: definition.provider.as_str().to_owned(),
            model: definition.model.clone(),
            input: self.session.input.clone(),
            budget: Some(self.session.budget),
        };
        self.record(Kind::Started(started)).await?;
        self.create_sandbox().await?;
        let tools = self.tool_definitions().await?;
        let mut messages = self.initial_messages();
        let max_turns = self
            .session
            .budget
            .max_turns
            .unwrap_or(self.agent.definition.max_turns);
        for turn in 1..=max_turns {
            self.turn = turn;
            let completed = self.model_turn(&messages, &tools).await?;
            self.last_assistant_text = completed.text.clone();
            messages.push(Message::Assistant {
                text: completed.text.clone(),
                tool_calls: completed.tool_calls.clone(),
            });
            let results = self.run_tool_calls(&completed.tool_calls).await?;
            messages.extend(results);
            self.record(Kind::TurnCompleted(turn_completed(turn, &completed)))
                .await?;
            if completed.tool_calls.is_empty() {
                return Ok(Ending::Completed);
            }
        }
        Ok(Ending::MaxTurns)
    }

    fn initial_messages(&self) -> Vec<Message> {
        let system_prompt = &self.agent.definition.system_prompt;
        let system = (!system_prompt.is_empty()).then(|| Message::System {
            text: system_prompt.clone(),
        });
        let user = Message::User {
            text: self.session.input.clone(),
        };
        system.into_iter().chain([user]).collect()
    }

    async fn create_sandbox(&mut self) -> Result<(), LoopError> {
        let request = sandbox::CreateSessionRequest {
            policy: Some(self.agent.definition.sandbox.session_policy()),
            labels: HashMap::from([(SESSION_LABEL.to_owned(), self.session_id().to_owned())]),
        };
        let sandbox = Arc::clone(&self.agent_loop.sandbox);
        let sandbox_session_id = self
            .until_cancelled(sandbox.create_session(request))
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

    /// The agent's tools as sandboxd describes them, in the agent's order.
    async fn tool_definitions(&mut self) -> Result<Vec<ToolDefinition>, LoopError> {
        let sandbox = Arc::clone(&self.agent_loop.sandbox);
        let offered = self
            .until_cancelled(sandbox.list_tools())
            .await?
            .map_err(LoopError::ListTools)?;
        self.agent
            .definition
            .tools
            .iter()
            .map(|name| {
                let tool = offered.iter().find(|tool| &tool.name == name).ok_or_else(|| {
                    LoopError::ToolUnavailable {
                        tool: name.clone(),
                        available: offered
                            .iter()
                            .map(|tool| tool.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", "),
                    }
                })?;
                let input_schema = serde_json::from_str(&tool.input_schema_json).map_err(|source| {
                    LoopError::BadToolSchema {
                        tool: name.clone(),
                        source,
                    }
                })?;
                Ok(ToolDefinition {
                    name: tool.name.clone(),
                    description: tool.description.clone(),
                    input_schema,
                })
            })
            .collect()
    }

    /// One model call; records its text deltas.
    async fn model_turn(
        &mut self,
        messages: &[Message],
        tools: &[ToolDefinition],
    ) -> Result<CompletedTurn, LoopError> {
        let request = ModelRequest {
            model: self.agent.definition.model.clone(),
            messages: messages.to_vec(),
            tools: tools.to_vec(),
        };
        let mut stream = self.agent.provider.stream_turn(request);
        loop {
            let next = self.until_cancelled(stream.next()).await?;
            match next {
                Some(Ok(ModelStreamEvent::TextDelta(text))) => {
                    self.record(Kind::TextDelta(control::ModelTextDelta { text }))
                        .await?;
                }
                Some(Ok(ModelStreamEvent::Completed(completed))) => return Ok(completed),
                Some(Err(error)) => return Err(LoopError::Provider(error)),
                None => return Err(LoopError::Provider(ProviderError::Incomplete)),
            }
        }
    }

    /// Records, dispatches and records the results of one turn's tool calls;
    /// returns the tool results for the conversation, in call order.
    async fn run_tool_calls(&mut self, calls: &[ToolCall]) -> Result<Vec<Message>, LoopError> {
        let mut planned = Vec::with_capacity(calls.len());
        for call in calls {
            planned.push(self.admit_call(call).await?);
        }
        let sandbox = Arc::clone(&self.agent_loop.sandbox);
        let deadline = self.agent_loop.settings.tool_timeout + SANDBOX_ANSWER_GRACE;
        // `buffered` runs up to N calls at once but yields results in call
        // order, which is the order they are recorded in.
        let mut results = futures::stream::iter(planned)
            .map(|plan| dispatch(Arc::clone(&sandbox), plan, deadline))
            .buffered(self.agent_loop.settings.max_parallel_tool_calls.max(1));
        let mut messages = Vec::with_capacity(calls.len());
        for call in calls {
            let result = self.until_cancelled(results.next()).await?;
            let result = result.unwrap_or(CallResult::Failed(SandboxError::MissingResult));
            let (message, failure) = self.record_result(call, result).await?;
            messages.push(message);
            if let Some(source) = failure {
                return Err(LoopError::Dispatch {
                    call_id: call.call_id.clone(),
                    source,
                });
            }
        }
        Ok(messages)
    }

    /// Records the request and the policy decision, and `tool_started` if allowed.
    async fn admit_call(&mut self, call: &ToolCall) -> Result<PlannedCall, LoopError> {
        self.record(Kind::ToolCallRequested(control::ToolCallRequested {
            call_id: call.call_id.clone(),
            tool: call.tool.clone(),
            arguments_json: call.arguments_json.clone(),
        }))
        .await?;
        let decision = self.decide(call);
        let verdict = decision.verdict();
        let denial = decision.reason.clone();
        self.record(Kind::PolicyDecision(decision)).await?;
        if verdict != control::Verdict::Allow {
            return Ok(PlannedCall::Deny(denial));
        }
        let sandbox_session_id = self.sandbox_session_id.clone().unwrap_or_default();
        let invocation_id = format!("{}:{}", self.session_id(), call.call_id);
        self.record(Kind::ToolStarted(control::ToolStarted {
            call_id: call.call_id.clone(),
            invocation_id: invocation_id.clone(),
            tool: call.tool.clone(),
            sandbox_session_id: sandbox_session_id.clone(),
        }))
        .await?;
        self.in_flight.push((call.call_id.clone(), call.tool.clone()));
        Ok(PlannedCall::Dispatch(sandbox::InvokeRequest {
            session_id: sandbox_session_id,
            invocation_id,
            target: Some(sandbox::invoke_request::Target::Wasi(sandbox::WasiCall {
                tool: call.tool.clone(),
                input_json: call.arguments_json.clone(),
            })),
            timeout: Some(harness_proto::duration_to_proto(
                self.agent_loop.settings.tool_timeout,
            )),
        }))
    }

    /// The policy for now: an agent may call exactly the tools it lists.
    fn decide(&self, call: &ToolCall) -> control::PolicyDecision {
        let tools = &self.agent.definition.tools;
        if tools.contains(&call.tool) {
            return control::PolicyDecision {
                call_id: call.call_id.clone(),
                verdict: control::Verdict::Allow.into(),
                rule: DEFAULT_RULE.to_owned(),
                reason: String::new(),
            };
        }
        control::PolicyDecision {
            call_id: call.call_id.clone(),
            verdict: control::Verdict::Deny.into(),
            rule: AGENT_TOOLS_RULE.to_owned(),
            reason: format!(
                "tool \"{}\" is not available to agent \"{}\"; its tools are: {}",
                call.tool,
                self.agent.definition.name,
                tools.join(", ")
            ),
        }
    }

    /// Records a call's output and `tool_finished`; returns the message for
    /// the model and, if sandboxd could not be reached, why.
    async fn record_result(
        &mut self,
        call: &ToolCall,
        result: CallResult,
    ) -> Result<(Message, Option<SandboxError>), LoopError> {
        let (finished, failure) = match result {
            CallResult::Outcome(outcome) => {
                for chunk in &outcome.output {
                    self.record(Kind::ToolOutput(tool_output(&call.call_id, chunk)))
                        .await?;
                }
                (finished_from_result(call, &outcome.result), None)
            }
            CallResult::Denied(reason) => (
                finished_with_error(call, control::ToolErrorKind::Denied, reason),
                None,
            ),
            CallResult::TimedOut(after) => (
                finished_with_error(
                    call,
                    control::ToolErrorKind::Timeout,
                    format!(
                        "no result from sandboxd within {}s",
                        after.as_secs_f64()
                    ),
                ),
                None,
            ),
            CallResult::Failed(error) => (
                finished_with_error(
                    call,
                    control::ToolErrorKind::Internal,
                    format!("could not reach sandboxd: {}", error_chain(&error)),
                ),
                Some(error),
            ),
        };
        let message = tool_result_message(&finished);
        self.record(Kind::ToolFinished(finished)).await?;
        self.in_flight.retain(|(call_id, _)| call_id != &call.call_id);
        Ok((message, failure))
    }

    /// Awaits `future` unless the session is cancelled first.
    async fn until_cancelled<F: std::future::Future>(
        &mut self,
        future: F,
    ) -> Result<F::Output, LoopError> {
        tokio::select! {
            biased;
            reason = cancelled(&mut self.cancel) => Err(LoopError::Cancelled(reason)),
            output = future => Ok(output),
        }
    }

    /// Closes the log: interrupted calls, sandbox teardown, `finished`.
    async fn finish(&mut self, ending: Ending) -> Result<(), LoopError> {
        let interrupted = std::mem::take(&mut self.in_flight);
        for (call_id, tool) in interrupted {
            let call = ToolCall {
                call_id,
                tool,
                arguments_json: String::new(),
            };
            let message = "the session ended before this call finished; \
                           its side effects may or may not have happened"
                .to_owned();
            let finished = finished_with_error(&call, control::ToolErrorKind::Interrupted, message);
            self.record(Kind::ToolFinished(finished)).await?;
        }
        self.destroy_sandbox().await;
        let finished = self.finished_event(ending);
        self.record(Kind::Finished(finished)).await?;
        Ok(())
    }

    fn finished_event(&self, ending: Ending) -> control::SessionFinished {
        let (stop_reason, message) = match ending {
            Ending::Completed => (control::StopReason::Completed, String::new()),
            Ending::MaxTurns => (
                control::StopReason::MaxTurns,
                format!("stopped after {} turns", self.turn),
            ),
            Ending::Cancelled(reason) => (control::StopReason::Cancelled, reason),
            Ending::Error(message) => (control::StopReason::Error, message),
        };
        let elapsed = SystemTime::now()
            .duration_since(self.session.created_at)
            .unwrap_or_default();
        control::SessionFinished {
            stop_reason: stop_reason.into(),
            final_output: self.last_assistant_text.clone(),
            message,
            usage: Some(control::BudgetUsage {
                wall_clock: Some(harness_proto::duration_to_proto(elapsed)),
                ..self.usage
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

async fn dispatch(
    sandbox: Arc<dyn SandboxDispatch>,
    plan: PlannedCall,
    deadline: Duration,
) -> CallResult {
    let request = match plan {
        PlannedCall::Deny(reason) => return CallResult::Denied(reason),
        PlannedCall::Dispatch(request) => request,
    };
    match tokio::time::timeout(deadline, sandbox.invoke(request)).await {
        Ok(Ok(outcome)) => CallResult::Outcome(outcome),
        Ok(Err(error)) => CallResult::Failed(error),
        Err(_) => CallResult::TimedOut(deadline),
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

fn turn_completed(turn: u32, completed: &CompletedTurn) -> control::TurnCompleted {
    control::TurnCompleted {
        turn,
        assistant_text: completed.text.clone(),
        tool_calls: u32::try_from(completed.tool_calls.len()).unwrap_or(u32::MAX),
        usage: Some(control::TurnUsage {
            input_tokens: completed.usage.input_tokens,
            output_tokens: completed.usage.output_tokens,
            cached_input_tokens: completed.usage.cached_input_tokens,
            cost_micros: 0,
        }),
        model_stop_reason: completed.stop_reason.clone(),
    }
}

fn tool_output(call_id: &str, chunk: &sandbox::OutputChunk) -> control::ToolOutput {
    let stream = match chunk.stream() {
        sandbox::OutputStream::Stderr => "stderr",
        sandbox::OutputStream::Stdout | sandbox::OutputStream::Unspecified => "stdout",
    };
    control::ToolOutput {
        call_id: call_id.to_owned(),
        stream: stream.to_owned(),
        data: chunk.data.clone(),
    }
}

fn finished_from_result(call: &ToolCall, result: &sandbox::InvokeResult) -> control::ToolFinished {
    let usage = result.usage.unwrap_or_default();
    let outcome = match &result.outcome {
        Some(sandbox::invoke_result::Outcome::Ok(success)) => {
            control::tool_finished::Outcome::OutputJson(success.output_json.clone())
        }
        Some(sandbox::invoke_result::Outcome::Error(error)) => {
            control::tool_finished::Outcome::Error(control::ToolCallError {
                kind: tool_error_kind(error.kind()).into(),
                message: tool_error_message(error),
            })
        }
        None => control::tool_finished::Outcome::Error(control::ToolCallError {
            kind: control::ToolErrorKind::Internal.into(),
            message: "sandboxd returned a result without an outcome".to_owned(),
        }),
    };
    control::ToolFinished {
        call_id: call.call_id.clone(),
        tool: call.tool.clone(),
        outcome: Some(outcome),
        wall_time: usage.wall_time,
        peak_memory_bytes: usage.peak_memory_bytes,
    }
}

fn finished_with_error(
    call: &ToolCall,
    kind: control::ToolErrorKind,
    message: String,
) -> control::ToolFinished {
    control::ToolFinished {
        call_id: call.call_id.clone(),
        tool: call.tool.clone(),
        outcome: Some(control::tool_finished::Outcome::Error(
            control::ToolCallError {
                kind: kind.into(),
                message,
            },
        )),
        wall_time: None,
        peak_memory_bytes: 0,
    }
}

/// sandboxd's error kinds mapped onto the control plane's.
pub fn tool_error_kind(kind: sandbox::ErrorKind) -> control::ToolErrorKind {
    match kind {
        sandbox::ErrorKind::InvalidInput => control::ToolErrorKind::InvalidInput,
        sandbox::ErrorKind::Denied => control::ToolErrorKind::Denied,
        sandbox::ErrorKind::Timeout => control::ToolErrorKind::Timeout,
        sandbox::ErrorKind::ResourceExhausted => control::ToolErrorKind::ResourceExhausted,
        sandbox::ErrorKind::Failed => control::ToolErrorKind::Failed,
        sandbox::ErrorKind::NotFound => control::ToolErrorKind::NotFound,
        sandbox::ErrorKind::Internal | sandbox::ErrorKind::Unspecified => {
            control::ToolErrorKind::Internal
        }
    }
}

/// sandboxd's message plus every schema violation it does not already
/// mention, so the model sees exactly what to fix.
pub fn tool_error_message(error: &sandbox::ToolError) -> String {
    let mut message = error.message.clone();
    for violation in &error.violations {
        if message.contains(&violation.message) {
            continue;
        }
        let at = if violation.instance_path.is_empty() {
            "(root)"
        } else {
            violation.instance_path.as_str()
        };
        message.push_str(&format!("; at {at}: {}", violation.message));
    }
    message
}

/// The conversation entry the model sees for a finished call.
fn tool_result_message(finished: &control::ToolFinished) -> Message {
    let (content, is_error) = match &finished.outcome {
        Some(control::tool_finished::Outcome::OutputJson(json)) => (json.clone(), false),
        Some(control::tool_finished::Outcome::Error(error)) => (
            format!(
                "{}: {}",
                crate::transcript::tool_error_kind_label(error.kind()),
                error.message
            ),
            true,
        ),
        None => ("no result".to_owned(), true),
    };
    Message::ToolResult {
        call_id: finished.call_id.clone(),
        tool: finished.tool.clone(),
        content,
        is_error,
    }
}

/// `error` and its sources, joined with ": ".
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        // Some errors repeat their source's text; do not print it twice.
        if !text.ends_with(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// Starts sessions as background tasks and cancels them on request.
#[derive(Debug)]
pub struct SessionSupervisor {
    agent_loop: Arc<AgentLoop>,
    running: Arc<Mutex<HashMap<String, watch::Sender<Option<String>>>>>,
}

impl SessionSupervisor {
    /// A supervisor running sessions on `agent_loop`.
    pub fn new(agent_loop: Arc<AgentLoop>) -> Self {
        Self {
            agent_loop,
            running: Arc::default(),
        }
    }

    /// Runs `session` in the background.
    pub fn launch(&self, session: SessionRecord, agent: Arc<Agent>) {
        let (cancel_sender, cancel) = watch::channel(None);
        let session_id = session.session_id.clone();
        self.running
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(session_id.clone(), cancel_sender);
        let agent_loop = Arc::clone(&self.agent_loop);
        let running = Arc::clone(&self.running);
        tokio::spawn(async move {
            agent_loop.run(session, agent, cancel).await;
            running
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&session_id);
        });
    }

    /// Asks a running session to stop; false if it is not running here.
    pub fn cancel(&self, session_id: &str, reason: &str) -> bool {
        let running = self.running.lock().unwrap_or_else(PoisonError::into_inner);
        match running.get(session_id) {
            Some(sender) => {
                sender.send_replace(Some(reason.to_owned()));
                true
            }
            None => false,
        }
    }
}

/// Closes sessions that a previous control-plane process left unfinished:
/// their loops are gone and resuming them is not implemented yet. Each gets
/// `tool_finished` (interrupted) for calls that never finished, its sandbox
/// session destroyed, and `finished` with ERROR. Returns how many were closed.
pub async fn recover_interrupted_sessions(
    log: &EventLog,
    sandbox: &dyn SandboxDispatch,
) -> Result<usize, StoreError> {
    let sessions = log.store().list_unfinished_sessions().await?;
    for session in &sessions {
        tracing::warn!(session_id = session.session_id, "closing a session interrupted by a restart");
        let events = log
            .store()
            .read_events(session.session_id.clone(), 0, usize::MAX)
            .await?;
        let turn = events.last().map_or(0, |event| event.turn);
        for call in unfinished_calls(&events) {
            let message = "the control plane restarted before this call finished; \
                           its side effects may or may not have happened"
                .to_owned();
            let finished = finished_with_error(&call, control::ToolErrorKind::Interrupted, message);
            log.append(&session.session_id, turn, Kind::ToolFinished(finished))
                .await?;
        }
        if let Some(sandbox_session_id) = &session.sandbox_session_id {
            let reason = "control plane restarted".to_owned();
            if let Err(error) = sandbox
                .destroy_session(sandbox_session_id.clone(), reason)
                .await
            {
                tracing::warn!(sandbox_session_id, error = %error_chain(&error), "could not destroy a leftover sandbox session");
            }
        }
        let mut usage = control::BudgetUsage::default();
        for kind in events.iter().filter_map(|event| event.kind.as_ref()) {
            event::apply_to_usage(&mut usage, kind);
        }
        let last_text = events.iter().rev().find_map(|event| match &event.kind {
            Some(Kind::TurnCompleted(turn)) => Some(turn.assistant_text.clone()),
            _ => None,
        });
        let finished = control::SessionFinished {
            stop_reason: control::StopReason::Error.into(),
            final_output: last_text.unwrap_or_default(),
            message: "interrupted by a control-plane restart; resuming sessions is not \
                      implemented yet"
                .to_owned(),
            usage: Some(usage),
        };
        log.append(&session.session_id, turn, Kind::Finished(finished))
            .await?;
    }
    Ok(sessions.len())
}

/// Calls with `tool_started` and no `tool_finished`, in start order.
fn unfinished_calls(events: &[control::SessionEvent]) -> Vec<ToolCall> {
    let mut open: Vec<ToolCall> = Vec::new();
    for event in events {
        match &event.kind {
            Some(Kind::ToolStarted(started)) => open.push(ToolCall {
                call_id: started.call_id.clone(),
                tool: started.tool.clone(),
                arguments_json: String::new(),
            }),
            Some(Kind::ToolFinished(finished)) => {
                open.retain(|call| call.call_id != finished.call_id);
            }
            _ => {}
        }
    }
    open
}
