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
//! restart (replaying the log instead of re-executing) comes later; until
//! then [`crate::supervisor::recover_interrupted_sessions`] closes what a
//! previous process left running.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use futures::stream::FuturesOrdered;
use harness_proto::control::v1 as control;
use harness_proto::control::v1::session_event::Kind;
use harness_proto::sandbox::v1 as sandbox;
use tokio::sync::{Semaphore, watch};

use crate::agent::Agent;
use crate::error_report::error_chain;
use crate::event;
use crate::event_log::EventLog;
use crate::provider::{
    CompletedTurn, Message, ModelRequest, ModelStreamEvent, ProviderError, ToolCall, ToolDefinition,
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
                let tool = offered
                    .iter()
                    .find(|tool| &tool.name == name)
                    .ok_or_else(|| LoopError::ToolUnavailable {
                        tool: name.clone(),
                        available: offered
                            .iter()
                            .map(|tool| tool.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", "),
                    })?;
                let input_schema =
                    serde_json::from_str(&tool.input_schema_json).map_err(|source| {
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
        let slots = Arc::new(Semaphore::new(
            self.agent_loop.settings.max_parallel_tool_calls.max(1),
        ));
        // All calls are polled, the semaphore bounds how many run at once (in
        // call order, it is fair), and `FuturesOrdered` yields results in call
        // order, which is the order they are recorded in. A finished call
        // waiting for its turn to be recorded does not hold a slot.
        let mut results: FuturesOrdered<_> = planned
            .into_iter()
            .map(|plan| dispatch(Arc::clone(&sandbox), Arc::clone(&slots), plan, deadline))
            .collect();
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
        self.in_flight
            .push((call.call_id.clone(), call.tool.clone()));
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
                    format!("no result from sandboxd within {}s", after.as_secs_f64()),
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
        self.in_flight
            .retain(|(call_id, _)| call_id != &call.call_id);
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
    slots: Arc<Semaphore>,
    plan: PlannedCall,
    deadline: Duration,
) -> CallResult {
    let request = match plan {
        PlannedCall::Deny(reason) => return CallResult::Denied(reason),
        PlannedCall::Dispatch(request) => request,
    };
    // The semaphore is never closed, so acquiring cannot fail.
    let _slot = slots.acquire().await.ok();
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

pub(crate) fn finished_with_error(
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::path::PathBuf;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use futures::future::BoxFuture;

    use super::*;
    use crate::agent::{AgentDefinition, ProviderKind, SandboxSettings};
    use crate::provider::scripted::ScriptedProvider;
    use crate::provider::{ModelProvider, ModelStream};
    use crate::store::{EventStore, NewSession, SqliteStore};

    /// How the fake sandbox answers one tool.
    #[derive(Debug, Clone)]
    enum Behaviour {
        Ok {
            output_json: &'static str,
            delay: Duration,
        },
        ToolError(sandbox::ToolError),
        Unreachable,
        Hang,
    }

    #[derive(Debug, Default)]
    struct FakeSandbox {
        tools: Vec<&'static str>,
        behaviours: HashMap<&'static str, Behaviour>,
        log: Mutex<Vec<String>>,
        running: AtomicUsize,
        max_running: AtomicUsize,
    }

    impl FakeSandbox {
        fn new(tools: &[&'static str]) -> Self {
            Self {
                tools: tools.to_vec(),
                ..Default::default()
            }
        }

        fn with(mut self, tool: &'static str, behaviour: Behaviour) -> Self {
            self.behaviours.insert(tool, behaviour);
            self
        }

        fn calls(&self) -> Vec<String> {
            self.log.lock().unwrap().clone()
        }

        fn note(&self, entry: String) {
            self.log.lock().unwrap().push(entry);
        }
    }

    fn ok_result(output_json: &str) -> InvocationOutcome {
        InvocationOutcome {
            output: vec![sandbox::OutputChunk {
                stream: sandbox::OutputStream::Stderr.into(),
                data: b"log line\n".to_vec(),
                truncated: false,
            }],
            result: sandbox::InvokeResult {
                outcome: Some(sandbox::invoke_result::Outcome::Ok(
                    sandbox::InvokeSuccess {
                        output_json: output_json.to_owned(),
                        exit_status: None,
                    },
                )),
                usage: Some(sandbox::Usage {
                    peak_memory_bytes: 4096,
                    ..Default::default()
                }),
                replayed: false,
            },
        }
    }

    impl SandboxDispatch for FakeSandbox {
        fn create_session(
            &self,
            request: sandbox::CreateSessionRequest,
        ) -> BoxFuture<'_, Result<String, SandboxError>> {
            let label = request
                .labels
                .get(SESSION_LABEL)
                .cloned()
                .unwrap_or_default();
            self.note(format!("create label={label}"));
            Box::pin(async { Ok("sb-1".to_owned()) })
        }

        fn list_tools(&self) -> BoxFuture<'_, Result<Vec<sandbox::Tool>, SandboxError>> {
            let tools = self
                .tools
                .iter()
                .map(|name| sandbox::Tool {
                    name: (*name).to_owned(),
                    description: format!("the {name} tool"),
                    input_schema_json: r#"{"type":"object"}"#.to_owned(),
                    ..Default::default()
                })
                .collect();
            Box::pin(async { Ok(tools) })
        }

        fn invoke(
            &self,
            request: sandbox::InvokeRequest,
        ) -> BoxFuture<'_, Result<InvocationOutcome, SandboxError>> {
            Box::pin(async move {
                let Some(sandbox::invoke_request::Target::Wasi(call)) = request.target else {
                    return Err(SandboxError::MissingResult);
                };
                self.note(format!("invoke {} {}", request.invocation_id, call.tool));
                let running = self.running.fetch_add(1, Ordering::SeqCst) + 1;
                self.max_running.fetch_max(running, Ordering::SeqCst);
                let behaviour = self.behaviours.get(call.tool.as_str()).cloned();
                let result = match behaviour {
                    Some(Behaviour::Ok { output_json, delay }) => {
                        tokio::time::sleep(delay).await;
                        Ok(ok_result(output_json))
                    }
                    Some(Behaviour::ToolError(error)) => Ok(InvocationOutcome {
                        output: Vec::new(),
                        result: sandbox::InvokeResult {
                            outcome: Some(sandbox::invoke_result::Outcome::Error(error)),
                            usage: None,
                            replayed: false,
                        },
                    }),
                    Some(Behaviour::Unreachable) => Err(SandboxError::Invoke(
                        tonic::Status::unavailable("connection refused"),
                    )),
                    Some(Behaviour::Hang) => std::future::pending().await,
                    None => Ok(ok_result("{}")),
                };
                self.running.fetch_sub(1, Ordering::SeqCst);
                result
            })
        }

        fn destroy_session(
            &self,
            session_id: String,
            _reason: String,
        ) -> BoxFuture<'_, Result<sandbox::TeardownReport, SandboxError>> {
            self.note(format!("destroy {session_id}"));
            Box::pin(async { Ok(sandbox::TeardownReport::default()) })
        }
    }

    /// A scripted provider that also keeps every request it gets.
    #[derive(Debug)]
    struct RecordingProvider {
        inner: ScriptedProvider,
        requests: Mutex<Vec<ModelRequest>>,
    }

    impl ModelProvider for RecordingProvider {
        fn stream_turn(&self, request: ModelRequest) -> ModelStream {
            self.requests.lock().unwrap().push(request.clone());
            self.inner.stream_turn(request)
        }
    }

    struct Harness {
        _dir: tempfile::TempDir,
        store: Arc<SqliteStore>,
        log: EventLog,
        sandbox: Arc<FakeSandbox>,
        provider: Arc<RecordingProvider>,
        agent: Arc<Agent>,
        _shutdown: watch::Sender<bool>,
    }

    impl Harness {
        async fn new(script: &str, tools: &[&str], sandbox: FakeSandbox) -> Self {
            let dir = tempfile::tempdir().unwrap();
            let store = Arc::new(SqliteStore::open(&dir.path().join("cp.db")).await.unwrap());
            let (shutdown, shutdown_signal) = watch::channel(false);
            let log = EventLog::new(store.clone(), shutdown_signal);
            let provider = Arc::new(RecordingProvider {
                inner: ScriptedProvider::new(toml::from_str(script).unwrap(), "test.script.toml"),
                requests: Mutex::new(Vec::new()),
            });
            let agent = Arc::new(Agent {
                definition: AgentDefinition {
                    name: "tester".to_owned(),
                    description: String::new(),
                    provider: ProviderKind::Scripted,
                    model: "scripted".to_owned(),
                    script: None,
                    system_prompt: "Be brief.".to_owned(),
                    tools: tools.iter().map(|tool| (*tool).to_owned()).collect(),
                    max_turns: 5,
                    sandbox: SandboxSettings::default(),
                    source: PathBuf::from("tester.toml"),
                },
                provider: provider.clone(),
            });
            Self {
                _dir: dir,
                store,
                log,
                sandbox: Arc::new(sandbox),
                provider,
                agent,
                _shutdown: shutdown,
            }
        }

        async fn create_session(&self, max_turns: u32) -> SessionRecord {
            self.store
                .create_session(NewSession {
                    session_id: "s1".to_owned(),
                    tenant: "default".to_owned(),
                    agent: "tester".to_owned(),
                    input: "go".to_owned(),
                    metadata: HashMap::new(),
                    budget: control::BudgetLimits {
                        max_turns: Some(max_turns),
                        ..Default::default()
                    },
                    idempotency_key: None,
                })
                .await
                .unwrap()
                .session
        }

        fn agent_loop(&self, max_parallel_tool_calls: usize) -> AgentLoop {
            AgentLoop::new(
                self.log.clone(),
                self.sandbox.clone(),
                LoopSettings {
                    tool_timeout: Duration::from_secs(30),
                    max_parallel_tool_calls,
                },
            )
        }

        async fn run(&self, max_turns: u32, max_parallel_tool_calls: usize) {
            let session = self.create_session(max_turns).await;
            let (_cancel, cancel_signal) = watch::channel(None);
            self.agent_loop(max_parallel_tool_calls)
                .run(session, self.agent.clone(), cancel_signal)
                .await;
        }

        async fn events(&self) -> Vec<control::SessionEvent> {
            self.store
                .read_events("s1".to_owned(), 0, 1000)
                .await
                .unwrap()
        }

        async fn summary(&self) -> Vec<String> {
            self.events().await.iter().map(describe).collect()
        }
    }

    /// The kind and the fields the tests care about, one string per event.
    fn describe(event: &control::SessionEvent) -> String {
        let what = match event.kind.as_ref().unwrap() {
            Kind::Started(_) => "started".to_owned(),
            Kind::TextDelta(delta) => format!("text {:?}", delta.text),
            Kind::ToolCallRequested(call) => format!("requested {} {}", call.call_id, call.tool),
            Kind::PolicyDecision(decision) => format!(
                "policy {} {} {}",
                decision.call_id,
                decision.verdict().as_str_name(),
                decision.rule
            ),
            Kind::ToolStarted(started) => format!("started {}", started.invocation_id),
            Kind::ToolOutput(output) => format!("output {} {}", output.call_id, output.stream),
            Kind::ToolFinished(finished) => match finished.outcome.as_ref().unwrap() {
                control::tool_finished::Outcome::OutputJson(json) => {
                    format!("finished {} ok {json}", finished.call_id)
                }
                control::tool_finished::Outcome::Error(error) => format!(
                    "finished {} {} {}",
                    finished.call_id,
                    error.kind().as_str_name(),
                    error.message
                ),
            },
            Kind::TurnCompleted(turn) => format!("turn {} {}", turn.turn, turn.model_stop_reason),
            Kind::Finished(finished) => format!(
                "end {} {:?} {:?}",
                finished.stop_reason().as_str_name(),
                finished.final_output,
                finished.message
            ),
            other => event::kind_name(other).to_owned(),
        };
        format!("{} t{} {what}", event.seq, event.turn)
    }

    const PARALLEL_SCRIPT: &str = r#"
        [[turn]]
        text = "Three things."
        [[turn.tool-calls]]
        tool = "slow"
        [[turn.tool-calls]]
        tool = "exec"
        [[turn.tool-calls]]
        tool = "fast"
        [[turn.tool-calls]]
        tool = "fast"

        [[turn]]
        text = "Done."
    "#;

    #[tokio::test]
    async fn parallel_tool_calls_are_bounded_and_recorded_in_call_order() {
        let sandbox = FakeSandbox::new(&["slow", "fast", "exec"]).with(
            "slow",
            Behaviour::Ok {
                output_json: r#"{"slow":true}"#,
                delay: Duration::from_millis(100),
            },
        );
        let harness = Harness::new(PARALLEL_SCRIPT, &["slow", "fast"], sandbox).await;
        harness.run(5, 2).await;
        let denial =
            "tool \"exec\" is not available to agent \"tester\"; its tools are: slow, fast";
        assert_eq!(
            harness.summary().await,
            [
                "1 t0 started".to_owned(),
                "2 t1 text \"Three \"".to_owned(),
                "3 t1 text \"things.\"".to_owned(),
                "4 t1 requested call_1_0 slow".to_owned(),
                "5 t1 policy call_1_0 VERDICT_ALLOW default".to_owned(),
                "6 t1 started s1:call_1_0".to_owned(),
                "7 t1 requested call_1_1 exec".to_owned(),
                "8 t1 policy call_1_1 VERDICT_DENY agent.tools".to_owned(),
                "9 t1 requested call_1_2 fast".to_owned(),
                "10 t1 policy call_1_2 VERDICT_ALLOW default".to_owned(),
                "11 t1 started s1:call_1_2".to_owned(),
                "12 t1 requested call_1_3 fast".to_owned(),
                "13 t1 policy call_1_3 VERDICT_ALLOW default".to_owned(),
                "14 t1 started s1:call_1_3".to_owned(),
                "15 t1 output call_1_0 stderr".to_owned(),
                "16 t1 finished call_1_0 ok {\"slow\":true}".to_owned(),
                format!("17 t1 finished call_1_1 TOOL_ERROR_KIND_DENIED {denial}"),
                "18 t1 output call_1_2 stderr".to_owned(),
                "19 t1 finished call_1_2 ok {}".to_owned(),
                "20 t1 output call_1_3 stderr".to_owned(),
                "21 t1 finished call_1_3 ok {}".to_owned(),
                "22 t1 turn 1 tool_use".to_owned(),
                "23 t2 text \"Done.\"".to_owned(),
                "24 t2 turn 2 end_turn".to_owned(),
                "25 t2 end STOP_REASON_COMPLETED \"Done.\" \"\"".to_owned(),
            ]
        );
        assert_eq!(harness.sandbox.max_running.load(Ordering::SeqCst), 2);
        let calls = harness.sandbox.calls();
        assert_eq!(calls.first().unwrap(), "create label=s1");
        assert_eq!(calls.last().unwrap(), "destroy sb-1");
        assert_eq!(
            calls
                .iter()
                .filter(|call| call.starts_with("invoke"))
                .count(),
            3
        );
    }

    #[tokio::test]
    async fn tool_results_and_errors_reach_the_model_in_call_order() {
        let invalid = sandbox::ToolError {
            kind: sandbox::ErrorKind::InvalidInput.into(),
            message: "input does not match the schema".to_owned(),
            violations: vec![sandbox::SchemaViolation {
                instance_path: "/path".to_owned(),
                message: "123 is not of type \"string\"".to_owned(),
            }],
        };
        let sandbox =
            FakeSandbox::new(&["slow", "fast", "exec"]).with("slow", Behaviour::ToolError(invalid));
        let harness = Harness::new(PARALLEL_SCRIPT, &["slow", "fast"], sandbox).await;
        harness.run(5, 4).await;
        let requests = harness.provider.requests.lock().unwrap().clone();
        assert_eq!(requests.len(), 2);
        let tool_names: Vec<&str> = requests[0].tools.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(tool_names, ["slow", "fast"]);
        let second = &requests[1].messages;
        assert_eq!(
            second[0],
            Message::System {
                text: "Be brief.".to_owned()
            }
        );
        assert_eq!(
            second[1],
            Message::User {
                text: "go".to_owned()
            }
        );
        let results: Vec<(&str, &str, bool)> = second[3..]
            .iter()
            .map(|message| match message {
                Message::ToolResult {
                    call_id,
                    content,
                    is_error,
                    ..
                } => (call_id.as_str(), content.as_str(), *is_error),
                other => ("unexpected", "", matches!(other, Message::User { .. })),
            })
            .collect();
        assert_eq!(
            results,
            [
                (
                    "call_1_0",
                    "invalid_input: input does not match the schema; at /path: 123 is not of type \"string\"",
                    true
                ),
                (
                    "call_1_1",
                    "denied: tool \"exec\" is not available to agent \"tester\"; its tools are: slow, fast",
                    true
                ),
                ("call_1_2", "{}", false),
                ("call_1_3", "{}", false),
            ]
        );
    }

    #[tokio::test]
    async fn exhausted_script_ends_the_session_with_an_error_and_destroys_the_sandbox() {
        let script = "[[turn]]\ntext = \"Once.\"\n[[turn.tool-calls]]\ntool = \"fast\"\n";
        let harness = Harness::new(script, &["fast"], FakeSandbox::new(&["fast"])).await;
        harness.run(5, 1).await;
        let summary = harness.summary().await;
        assert_eq!(
            summary.last().unwrap(),
            "9 t2 end STOP_REASON_ERROR \"Once.\" \"model provider failed: script exhausted after 1 turns (test.script.toml)\""
        );
        assert_eq!(harness.sandbox.calls().last().unwrap(), "destroy sb-1");
    }

    #[tokio::test]
    async fn turn_limit_stops_with_max_turns_and_the_partial_answer() {
        let script = "[[turn]]\ntext = \"One.\"\n[[turn.tool-calls]]\ntool = \"fast\"\n\
                      [[turn]]\ntext = \"Two.\"\n[[turn.tool-calls]]\ntool = \"fast\"\n\
                      [[turn]]\ntext = \"Three.\"\n";
        let harness = Harness::new(script, &["fast"], FakeSandbox::new(&["fast"])).await;
        harness.run(2, 1).await;
        let summary = harness.summary().await;
        assert_eq!(
            summary.last().unwrap(),
            "16 t2 end STOP_REASON_MAX_TURNS \"Two.\" \"stopped after 2 turns\""
        );
        let record = harness
            .store
            .get_session("default".to_owned(), "s1".to_owned())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (
                record.status,
                record.stop_reason,
                record.usage.turns,
                record.usage.tool_calls
            ),
            (
                control::SessionStatus::Finished,
                control::StopReason::MaxTurns,
                2,
                2
            )
        );
    }

    #[tokio::test]
    async fn a_tool_sandboxd_lacks_fails_the_session_before_the_first_turn() {
        let harness = Harness::new(
            "[[turn]]\ntext = \"x\"\n",
            &["fast", "exec"],
            FakeSandbox::new(&["fast"]),
        )
        .await;
        harness.run(5, 1).await;
        assert_eq!(
            harness.summary().await,
            [
                "1 t0 started",
                "2 t0 end STOP_REASON_ERROR \"\" \"agent tool \\\"exec\\\" is not offered by sandboxd (it has: fast)\"",
            ]
        );
        assert_eq!(harness.sandbox.calls(), ["create label=s1", "destroy sb-1"]);
        assert!(harness.provider.requests.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn unreachable_sandboxd_fails_the_call_and_the_session() {
        let script = "[[turn]]\ntext = \"Try.\"\n[[turn.tool-calls]]\ntool = \"fast\"\n\
                      [[turn.tool-calls]]\ntool = \"fast\"\n";
        let sandbox = FakeSandbox::new(&["fast"]).with("fast", Behaviour::Unreachable);
        let harness = Harness::new(script, &["fast"], sandbox).await;
        harness.run(5, 1).await;
        let summary = harness.summary().await;
        assert_eq!(
            summary[8..],
            [
                "9 t1 finished call_1_0 TOOL_ERROR_KIND_INTERNAL could not reach sandboxd: sandboxd Invoke failed (Unavailable): connection refused",
                "10 t1 finished call_1_1 TOOL_ERROR_KIND_INTERRUPTED the session ended before this call finished; its side effects may or may not have happened",
                "11 t1 end STOP_REASON_ERROR \"Try.\" \"tool call call_1_0 could not be dispatched: sandboxd Invoke failed (Unavailable): connection refused\"",
            ]
        );
    }

    #[tokio::test]
    async fn cancelling_interrupts_running_calls_and_records_why() {
        let script = "[[turn]]\ntext = \"Wait.\"\n[[turn.tool-calls]]\ntool = \"stuck\"\n";
        let sandbox = FakeSandbox::new(&["stuck"]).with("stuck", Behaviour::Hang);
        let harness = Harness::new(script, &["stuck"], sandbox).await;
        let session = harness.create_session(5).await;
        let (cancel, cancel_signal) = watch::channel(None);
        let agent_loop = harness.agent_loop(1);
        let run = agent_loop.run(session, harness.agent.clone(), cancel_signal);
        let canceller = async {
            while !harness
                .sandbox
                .calls()
                .iter()
                .any(|c| c.starts_with("invoke"))
            {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            cancel.send_replace(Some("user pressed stop".to_owned()));
        };
        tokio::time::timeout(
            Duration::from_secs(10),
            futures::future::join(run, canceller),
        )
        .await
        .unwrap();
        let summary = harness.summary().await;
        assert_eq!(
            summary[summary.len() - 2..],
            [
                "6 t1 finished call_1_0 TOOL_ERROR_KIND_INTERRUPTED the session ended before this call finished; its side effects may or may not have happened",
                "7 t1 end STOP_REASON_CANCELLED \"Wait.\" \"user pressed stop\"",
            ]
        );
        assert_eq!(harness.sandbox.calls().last().unwrap(), "destroy sb-1");
    }

    #[tokio::test]
    async fn restart_recovery_closes_interrupted_sessions() {
        let harness = Harness::new("[[turn]]\ntext = \"x\"\n", &[], FakeSandbox::new(&[])).await;
        harness.create_session(5).await;
        harness
            .store
            .set_sandbox_session("s1".to_owned(), "sb-old".to_owned())
            .await
            .unwrap();
        harness
            .log
            .append("s1", 0, Kind::Started(control::SessionStarted::default()))
            .await
            .unwrap();
        let started = control::ToolStarted {
            call_id: "call_1_0".to_owned(),
            tool: "fast".to_owned(),
            ..Default::default()
        };
        harness
            .log
            .append("s1", 1, Kind::ToolStarted(started))
            .await
            .unwrap();
        let closed =
            crate::supervisor::recover_interrupted_sessions(&harness.log, harness.sandbox.as_ref())
                .await
                .unwrap();
        assert_eq!(closed, 1);
        let summary = harness.summary().await;
        assert_eq!(
            summary[2..],
            [
                "3 t1 finished call_1_0 TOOL_ERROR_KIND_INTERRUPTED the control plane restarted before this call finished; its side effects may or may not have happened",
                "4 t1 end STOP_REASON_ERROR \"\" \"interrupted by a control-plane restart; resuming sessions is not implemented yet\"",
            ]
        );
        assert_eq!(harness.sandbox.calls(), ["destroy sb-old"]);
    }

    #[test]
    fn violations_already_in_the_message_are_not_repeated() {
        let error = sandbox::ToolError {
            kind: sandbox::ErrorKind::InvalidInput.into(),
            message: "invalid input: \"path\" is a required property".to_owned(),
            violations: vec![
                sandbox::SchemaViolation {
                    instance_path: String::new(),
                    message: "\"path\" is a required property".to_owned(),
                },
                sandbox::SchemaViolation {
                    instance_path: String::new(),
                    message: "\"extra\" is not allowed".to_owned(),
                },
            ],
        };
        assert_eq!(
            tool_error_message(&error),
            "invalid input: \"path\" is a required property; at (root): \"extra\" is not allowed"
        );
    }
}
