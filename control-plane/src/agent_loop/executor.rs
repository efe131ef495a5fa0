//! Tool executors: who runs a tool call.
//!
//! - [`SandboxExecutor`]: sandboxd, as a WASI component or `exec` (every
//!   tool an agent lists that the harness does not run itself).
//! - [`HarnessExecutor`]: tools the control plane runs itself
//!   (delegation, handoff, skills, memory), from a [`HarnessRegistry`].
//!
//! Each tool of a session is bound to one executor when the session starts
//! (its [`control::ToolExecutor`] in the resolved record). The loop asks
//! [`Executors`] for a call's request — recorded as its step, tagged with the
//! executor — and later hands that recorded request back to be run: a call
//! in flight at a restart runs again from its step, with its invocation id,
//! exactly like a sandboxd call. A harness tool with side effects therefore
//! makes a repeat of an invocation id harmless (a delegation keys its child
//! session by it).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use harness_proto::control::v1 as control;
use harness_proto::sandbox::v1 as sandbox;
use tokio::sync::Semaphore;

use super::state::ToolRequest;
use super::tools::{self, CallResult, DispatchRetry};
use crate::provider::ToolCall;
use crate::sandbox::SandboxDispatch;

/// What a call is run with, besides the call itself.
#[derive(Debug, Clone, Copy)]
pub struct CallTarget<'a> {
    /// `"<session>:<call_id>"`.
    pub invocation_id: &'a str,
    /// The sandbox session sandboxd runs it in.
    pub sandbox_session_id: &'a str,
    /// Its deadline, as sent to sandboxd.
    pub timeout: Duration,
    /// For a delegation: what the loop decided about the child.
    pub delegation: Option<&'a control::Delegation>,
}

/// How recorded requests are run.
#[derive(Debug, Clone)]
pub struct DispatchSettings {
    /// Bounds the calls of a turn running at once.
    pub slots: Arc<Semaphore>,
    /// Bounds the long-running harness calls (delegations) of a turn
    /// running at once; they hold no slot of `slots`.
    pub long_running_slots: Arc<Semaphore>,
    /// Longest wait for a result (not for long-running harness calls,
    /// which their own budget bounds).
    pub deadline: Duration,
    /// Retries while sandboxd is unreachable.
    pub retry: DispatchRetry,
}

/// One way of running tools.
pub trait ToolExecutor {
    /// The request it records for a call.
    type Request;

    /// The exact request for `call`, recorded before it runs.
    fn request(&self, call: &ToolCall, target: CallTarget<'_>) -> Self::Request;

    /// Runs a recorded request (again, after a restart).
    fn dispatch(
        &self,
        request: Self::Request,
        settings: DispatchSettings,
    ) -> BoxFuture<'static, CallResult>;
}

/// sandboxd runs the call.
#[derive(Debug, Clone)]
pub struct SandboxExecutor {
    sandbox: Arc<dyn SandboxDispatch>,
}

impl ToolExecutor for SandboxExecutor {
    type Request = sandbox::InvokeRequest;

    fn request(&self, call: &ToolCall, target: CallTarget<'_>) -> sandbox::InvokeRequest {
        sandbox::InvokeRequest {
            session_id: target.sandbox_session_id.to_owned(),
            invocation_id: target.invocation_id.to_owned(),
            target: Some(sandbox::invoke_request::Target::Wasi(sandbox::WasiCall {
                tool: call.tool.clone(),
                input_json: call.arguments_json.clone(),
            })),
            timeout: Some(harness_proto::duration_to_proto(target.timeout)),
        }
    }

    fn dispatch(
        &self,
        request: sandbox::InvokeRequest,
        settings: DispatchSettings,
    ) -> BoxFuture<'static, CallResult> {
        Box::pin(tools::dispatch(
            Arc::clone(&self.sandbox),
            settings.slots,
            request,
            settings.deadline,
            settings.retry,
        ))
    }
}

/// Why a harness tool call failed; the model sees it as the call's error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HarnessToolError {
    /// The error's kind.
    pub kind: control::ToolErrorKind,
    /// What happened, written for the model.
    pub message: String,
}

/// What a harness tool call returned.
#[derive(Debug, Clone, PartialEq)]
pub struct HarnessOutput {
    /// The output the model sees, as JSON text.
    pub output_json: String,
    /// For a delegation: the child's receipt, recorded as the parent's
    /// `subagent_finished` right before the call's `tool_finished`.
    pub subagent: Option<control::SubagentFinished>,
    /// For `load_skill`: the load, recorded as `skill_loaded` right before
    /// the call's `tool_finished`.
    pub skill: Option<control::SkillLoaded>,
}

impl HarnessOutput {
    /// Output without a subagent.
    pub fn json(output_json: String) -> Self {
        Self {
            output_json,
            subagent: None,
            skill: None,
        }
    }
}

/// Why a harness tool call returned no output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HarnessCallError {
    /// It failed; the model sees the error as the call's result.
    Failed(HarnessToolError),
    /// The control plane is shutting down: nothing is recorded, and the
    /// call runs again (with the same invocation id) at the next start.
    ShuttingDown,
}

impl From<HarnessToolError> for HarnessCallError {
    fn from(error: HarnessToolError) -> Self {
        Self::Failed(error)
    }
}

/// A tool the control plane runs itself.
pub trait HarnessTool: Send + Sync + std::fmt::Debug {
    /// Its name, as agents list it (unique in a registry).
    fn name(&self) -> &str;

    /// What it does, written for a model.
    fn description(&self) -> &str;

    /// JSON Schema of its input, as text (recorded with every session that
    /// uses it; the loop validates arguments against it).
    fn input_schema_json(&self) -> &str;

    /// Runs one call. A call may arrive again with the same invocation id
    /// after a restart.
    fn call(
        &self,
        call: control::HarnessToolCall,
    ) -> BoxFuture<'static, Result<HarnessOutput, HarnessCallError>>;

    /// A call runs as long as the work it stands for (a delegation runs a
    /// whole child session): no tool deadline, and a slot of its own kind.
    fn long_running(&self) -> bool {
        false
    }

    /// The subagent it delegates to, as a session records it.
    fn subagent(&self) -> Option<control::ResolvedSubagent> {
        None
    }

    /// The agent it hands sessions over to.
    fn handoff_target(&self) -> Option<&Arc<crate::agent::Agent>> {
        None
    }

    /// The session ended while `call` ran (cancelled, out of time): stop
    /// whatever it started. Called once per call left in flight.
    fn abandon(&self, _call: &control::HarnessToolCall, _reason: &str) -> BoxFuture<'static, ()> {
        Box::pin(std::future::ready(()))
    }
}

/// Registering a harness tool failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// Two tools share a name.
    #[error("harness tool \"{0}\" is registered twice")]
    Duplicate(String),
}

/// The harness tools of a control plane, by name.
#[derive(Debug, Clone, Default)]
pub struct HarnessRegistry {
    tools: BTreeMap<String, Arc<dyn HarnessTool>>,
}

impl HarnessRegistry {
    /// Adds `tool`; its name must be new.
    pub fn register(&mut self, tool: Arc<dyn HarnessTool>) -> Result<(), RegistryError> {
        let name = tool.name().to_owned();
        if self.tools.contains_key(&name) {
            return Err(RegistryError::Duplicate(name));
        }
        self.tools.insert(name, tool);
        Ok(())
    }

    /// The tool called `name`.
    pub fn get(&self, name: &str) -> Option<&Arc<dyn HarnessTool>> {
        self.tools.get(name)
    }

    /// The tool called `name` as a session records it.
    pub fn describe(&self, name: &str) -> Option<control::ResolvedTool> {
        let tool = self.get(name)?;
        Some(control::ResolvedTool {
            name: tool.name().to_owned(),
            description: tool.description().to_owned(),
            input_schema_json: tool.input_schema_json().to_owned(),
            digest: String::new(),
            executor: control::ToolExecutor::Harness.into(),
        })
    }

    /// The subagent behind the tool called `name`, if it delegates.
    pub fn subagent(&self, name: &str) -> Option<control::ResolvedSubagent> {
        self.get(name)?.subagent()
    }

    /// Names of every tool, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tools.keys().map(String::as_str)
    }
}

/// The control plane runs the call.
#[derive(Debug, Clone, Default)]
pub struct HarnessExecutor {
    registry: Arc<HarnessRegistry>,
}

impl ToolExecutor for HarnessExecutor {
    type Request = control::HarnessToolCall;

    fn request(&self, call: &ToolCall, target: CallTarget<'_>) -> control::HarnessToolCall {
        control::HarnessToolCall {
            invocation_id: target.invocation_id.to_owned(),
            tool: call.tool.clone(),
            input_json: call.arguments_json.clone(),
            delegation: target.delegation.cloned(),
        }
    }

    fn dispatch(
        &self,
        request: control::HarnessToolCall,
        settings: DispatchSettings,
    ) -> BoxFuture<'static, CallResult> {
        let tool = self.registry.get(&request.tool).cloned();
        Box::pin(async move {
            let Some(tool) = tool else {
                return CallResult::Harness(Err(HarnessToolError {
                    kind: control::ToolErrorKind::NotFound,
                    message: format!("harness tool \"{}\" is not registered", request.tool),
                }));
            };
            let result = if tool.long_running() {
                // The semaphore is never closed, so acquiring cannot fail.
                let _slot = settings.long_running_slots.acquire().await.ok();
                tool.call(request).await
            } else {
                let _slot = settings.slots.acquire().await.ok();
                match tokio::time::timeout(settings.deadline, tool.call(request)).await {
                    Ok(result) => result,
                    Err(_) => return CallResult::TimedOut(settings.deadline),
                }
            };
            match result {
                Ok(output) => CallResult::Harness(Ok(output)),
                Err(HarnessCallError::Failed(error)) => CallResult::Harness(Err(error)),
                Err(HarnessCallError::ShuttingDown) => CallResult::ShuttingDown,
            }
        })
    }
}

/// Every executor; picks one per call by the executor its tool is bound to.
#[derive(Debug, Clone)]
pub struct Executors {
    sandbox: SandboxExecutor,
    harness: HarnessExecutor,
}

impl Executors {
    /// sandboxd at `sandbox`, and the harness tools of `registry`.
    pub fn new(sandbox: Arc<dyn SandboxDispatch>, registry: HarnessRegistry) -> Self {
        Self {
            sandbox: SandboxExecutor { sandbox },
            harness: HarnessExecutor {
                registry: Arc::new(registry),
            },
        }
    }

    /// The harness tools.
    pub fn harness_tools(&self) -> &HarnessRegistry {
        &self.harness.registry
    }

    /// The request for `call` on the executor `executor`.
    pub fn request(
        &self,
        executor: control::ToolExecutor,
        call: &ToolCall,
        target: CallTarget<'_>,
    ) -> ToolRequest {
        match executor {
            control::ToolExecutor::Sandbox => {
                ToolRequest::Sandbox(self.sandbox.request(call, target))
            }
            control::ToolExecutor::Harness => {
                ToolRequest::Harness(self.harness.request(call, target))
            }
        }
    }

    /// Stops what a request left in flight at the session's end started.
    pub fn abandon(&self, request: &ToolRequest, reason: &str) -> BoxFuture<'static, ()> {
        match request {
            ToolRequest::Sandbox(_) => Box::pin(std::future::ready(())),
            ToolRequest::Harness(call) => match self.harness.registry.get(&call.tool) {
                Some(tool) => tool.abandon(call, reason),
                None => Box::pin(std::future::ready(())),
            },
        }
    }

    /// Runs a recorded request on the executor it is tagged with.
    pub fn dispatch(
        &self,
        request: ToolRequest,
        settings: DispatchSettings,
    ) -> BoxFuture<'static, CallResult> {
        match request {
            ToolRequest::Sandbox(request) => self.sandbox.dispatch(request, settings),
            ToolRequest::Harness(call) => self.harness.dispatch(call, settings),
        }
    }
}
