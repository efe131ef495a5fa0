//! The WASI backend as the service sees it: find the tool, check the input,
//! run it in the session's scope, and turn the outcome into an
//! `InvokeResult` plus output chunks.

use std::sync::Arc;
use std::time::Duration;

use harness_proto::sandbox::v1 as pb;
use wasmtime::Engine;
use wasmtime::component::Linker;

use super::engine::{CompileCache, EngineLimits, EpochTicker, build_engine};
use super::invoke::{
    CallOutcome, HostState, Invocation, InvocationLimits, InvocationScope, run_invoke,
};
use super::output::CapturedOutput;
use super::registry::{LoadedTool, ToolDefaults, ToolRegistry};
use super::{GuestErrorKind, WasiError};
use crate::config::SandboxdConfig;
use crate::network::http_egress::EgressPolicy;
use crate::session::ResolvedPolicy;

/// Size of the output chunks streamed back to the caller.
const CHUNK_BYTES: usize = 64 << 10;

/// The engine, its ticker and the tool registry.
pub struct WasiBackend {
    engine: Engine,
    registry: ToolRegistry,
    max_input_bytes: u64,
    _ticker: EpochTicker,
}

impl std::fmt::Debug for WasiBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WasiBackend")
            .field("registry", &self.registry)
            .finish_non_exhaustive()
    }
}

/// A finished invocation ready for the wire.
#[derive(Debug, Clone)]
pub struct Completed {
    /// Output chunks, stdout first.
    pub chunks: Vec<pb::OutputChunk>,
    /// The result.
    pub result: pb::InvokeResult,
    /// Digest of the tool that ran, if one was found.
    pub digest: String,
}

impl WasiBackend {
    /// Builds the engine and an empty registry; call [`WasiBackend::rescan`].
    pub fn new(config: &SandboxdConfig, max_concurrent_instances: u32) -> Result<Self, WasiError> {
        let engine = build_engine(EngineLimits {
            max_memory_bytes: config.max_memory_bytes,
            max_concurrent_instances,
        })?;
        let mut linker: Linker<HostState> = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)
            .map_err(|source| WasiError::Link { source })?;
        wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker)
            .map_err(|source| WasiError::Link { source })?;
        let cache = CompileCache::new(config.effective_cache_dir(), &engine)?;
        let ticker = EpochTicker::start(engine.clone(), config.epoch_tick)?;
        let registry = ToolRegistry::new(
            config.tools_dir.clone(),
            engine.clone(),
            Arc::new(linker),
            cache,
        );
        Ok(Self {
            engine,
            registry,
            max_input_bytes: config.max_input_bytes,
            _ticker: ticker,
        })
    }

    /// Reloads the tools directory.
    pub async fn rescan(&self) {
        self.registry.rescan().await;
    }

    /// The tools, as the wire message.
    pub fn list_tools(&self) -> pb::ListToolsResponse {
        pb::ListToolsResponse {
            tools: self
                .registry
                .tools()
                .iter()
                .map(|tool| tool_to_proto(tool))
                .collect(),
            load_errors: self
                .registry
                .load_errors()
                .into_iter()
                .map(|(path, message)| pb::ToolLoadError {
                    path: path.display().to_string(),
                    message,
                })
                .collect(),
        }
    }

    /// Looks a tool up (for its digest).
    pub fn tool(&self, name: &str) -> Option<Arc<LoadedTool>> {
        self.registry.get(name)
    }

    /// Runs one call of `tool` with `input_json` in a session's scope.
    pub async fn invoke(
        &self,
        workspace: &std::path::Path,
        policy: &ResolvedPolicy,
        egress: Option<&EgressPolicy>,
        call: &pb::WasiCall,
        timeout: Duration,
    ) -> Completed {
        let Some(tool) = self.registry.get(&call.tool) else {
            return rejected(
                pb::ErrorKind::NotFound,
                format!("no tool named {:?} on this sandboxd", call.tool),
                vec![],
            );
        };
        if let Err(rejection) = self.check_input(&tool, &call.input_json) {
            return Completed {
                digest: tool.digest.clone(),
                ..*rejection
            };
        }
        let scope = InvocationScope {
            workspace,
            read_only: policy.workspace_read_only,
            environment: &policy.environment,
            egress,
        };
        let limits = effective_limits(policy, timeout, self.registry.defaults(&tool.name));
        let invocation =
            run_invoke(&self.engine, &tool.pre, &scope, &limits, &call.input_json).await;
        completed(&tool, invocation, &limits)
    }

    fn check_input(&self, tool: &LoadedTool, input_json: &str) -> Result<(), Box<Completed>> {
        if input_json.len() as u64 > self.max_input_bytes {
            return Err(Box::new(rejected(
                pb::ErrorKind::InvalidInput,
                format!(
                    "input is {} bytes, over the limit of {} bytes",
                    input_json.len(),
                    self.max_input_bytes
                ),
                vec![],
            )));
        }
        let value: serde_json::Value = serde_json::from_str(input_json).map_err(|e| {
            Box::new(rejected(
                pb::ErrorKind::InvalidInput,
                format!("input is not valid JSON: {e}"),
                vec![],
            ))
        })?;
        let violations = tool.validate(&value);
        if violations.is_empty() {
            return Ok(());
        }
        let listed: Vec<String> = violations
            .iter()
            .map(|v| {
                let at = if v.instance_path.is_empty() {
                    "input"
                } else {
                    v.instance_path.as_str()
                };
                format!("{at}: {}", v.message)
            })
            .collect();
        Err(Box::new(rejected(
            pb::ErrorKind::InvalidInput,
            format!(
                "input does not match the {} tool's schema: {}",
                tool.name,
                listed.join("; ")
            ),
            violations
                .into_iter()
                .map(|v| pb::SchemaViolation {
                    instance_path: v.instance_path,
                    message: v.message,
                })
                .collect(),
        )))
    }
}

/// The session's limits, tightened by the tool's manifest defaults.
fn effective_limits(
    policy: &ResolvedPolicy,
    timeout: Duration,
    defaults: ToolDefaults,
) -> InvocationLimits {
    let tighter = |limit: u64, default: Option<u64>| default.map_or(limit, |d| d.min(limit));
    InvocationLimits {
        timeout: defaults.timeout.map_or(timeout, |d| d.min(timeout)),
        memory_bytes: tighter(policy.memory_bytes, defaults.memory_bytes),
        max_output_bytes: tighter(policy.max_output_bytes, defaults.max_output_bytes),
        fuel: match (policy.fuel, defaults.fuel) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        },
    }
}

fn tool_to_proto(tool: &LoadedTool) -> pb::Tool {
    pb::Tool {
        name: tool.name.clone(),
        description: tool.description.clone(),
        input_schema_json: tool.input_schema.to_string(),
        output_schema_json: if tool.output_schema.is_null() {
            String::new()
        } else {
            tool.output_schema.to_string()
        },
        backend: pb::Backend::Wasi as i32,
        digest: tool.digest.clone(),
    }
}

fn rejected(
    kind: pb::ErrorKind,
    message: String,
    violations: Vec<pb::SchemaViolation>,
) -> Completed {
    Completed {
        chunks: vec![],
        result: pb::InvokeResult {
            outcome: Some(pb::invoke_result::Outcome::Error(pb::ToolError {
                kind: kind as i32,
                message,
                violations,
            })),
            usage: Some(pb::Usage::default()),
            replayed: false,
        },
        digest: String::new(),
    }
}

fn completed(tool: &LoadedTool, invocation: Invocation, limits: &InvocationLimits) -> Completed {
    let stderr_tail = tail_text(&invocation.stderr);
    let error = |kind: pb::ErrorKind, message: String| {
        pb::invoke_result::Outcome::Error(pb::ToolError {
            kind: kind as i32,
            message,
            violations: vec![],
        })
    };
    let outcome = match invocation.outcome {
        CallOutcome::Ok(output_json) => pb::invoke_result::Outcome::Ok(pb::InvokeSuccess {
            output_json,
            exit_status: None,
        }),
        CallOutcome::ToolError { kind, message } => error(guest_kind(kind), message),
        CallOutcome::Timeout => error(
            pb::ErrorKind::Timeout,
            format!(
                "{} did not finish within its deadline of {} ms and was stopped",
                tool.name,
                limits.timeout.as_millis()
            ),
        ),
        CallOutcome::MemoryExhausted(detail) => error(
            pb::ErrorKind::ResourceExhausted,
            format!(
                "{} hit its memory limit of {} bytes: {detail}",
                tool.name, limits.memory_bytes
            ),
        ),
        CallOutcome::FuelExhausted => error(
            pb::ErrorKind::ResourceExhausted,
            format!(
                "{} used up its fuel budget of {} instructions",
                tool.name,
                limits.fuel.unwrap_or(0)
            ),
        ),
        CallOutcome::Trapped(trap) => error(
            pb::ErrorKind::Failed,
            with_stderr(format!("{} crashed: {trap}", tool.name), &stderr_tail),
        ),
        CallOutcome::Setup(detail) => error(
            pb::ErrorKind::Internal,
            format!("sandboxd could not set up the invocation: {detail}"),
        ),
    };
    let usage = pb::Usage {
        wall_time: Some(harness_proto::duration_to_proto(invocation.wall_time)),
        cpu_time: None,
        peak_memory_bytes: invocation.peak_memory_bytes,
        stdout_bytes: invocation.stdout.total,
        stderr_bytes: invocation.stderr.total,
        fuel_consumed: invocation.fuel_consumed,
    };
    let mut chunks = output_chunks(pb::OutputStream::Stdout, &invocation.stdout);
    chunks.extend(output_chunks(pb::OutputStream::Stderr, &invocation.stderr));
    Completed {
        chunks,
        result: pb::InvokeResult {
            outcome: Some(outcome),
            usage: Some(usage),
            replayed: false,
        },
        digest: tool.digest.clone(),
    }
}

fn guest_kind(kind: GuestErrorKind) -> pb::ErrorKind {
    match kind {
        GuestErrorKind::InvalidInput => pb::ErrorKind::InvalidInput,
        GuestErrorKind::Denied => pb::ErrorKind::Denied,
        GuestErrorKind::NotFound => pb::ErrorKind::NotFound,
        GuestErrorKind::Failed => pb::ErrorKind::Failed,
    }
}

/// The last lines of stderr: where a Rust guest's panic message is.
fn tail_text(stderr: &CapturedOutput) -> String {
    let text = String::from_utf8_lossy(&stderr.bytes);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let start = lines.len().saturating_sub(5);
    lines[start..].join("\n")
}

fn with_stderr(message: String, stderr_tail: &str) -> String {
    if stderr_tail.is_empty() {
        message
    } else {
        format!("{message}\nstderr:\n{stderr_tail}")
    }
}

fn output_chunks(stream: pb::OutputStream, captured: &CapturedOutput) -> Vec<pb::OutputChunk> {
    let mut chunks: Vec<pb::OutputChunk> = captured
        .bytes
        .chunks(CHUNK_BYTES)
        .map(|data| pb::OutputChunk {
            stream: stream as i32,
            data: data.to_vec(),
            truncated: false,
        })
        .collect();
    if captured.truncated() {
        match chunks.last_mut() {
            Some(last) => last.truncated = true,
            None => chunks.push(pb::OutputChunk {
                stream: stream as i32,
                data: vec![],
                truncated: true,
            }),
        }
    }
    chunks
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::network::allowlist::Allowlist;

    fn policy() -> ResolvedPolicy {
        ResolvedPolicy {
            environment: vec![],
            workspace_read_only: false,
            workspace_bytes: 1 << 20,
            invocation_timeout: Duration::from_secs(30),
            memory_bytes: 256 << 20,
            max_output_bytes: 1 << 20,
            ttl: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(60),
            network: Arc::new(Allowlist::default()),
            fuel: Some(1_000),
            process: None,
        }
    }

    #[test]
    fn tool_defaults_only_tighten_the_session_limits() {
        let defaults = ToolDefaults {
            timeout: Some(Duration::from_secs(5)),
            memory_bytes: Some(512 << 20),
            max_output_bytes: Some(4096),
            fuel: Some(10_000),
        };
        let limits = effective_limits(&policy(), Duration::from_secs(30), defaults);
        assert_eq!(
            (
                limits.timeout,
                limits.memory_bytes,
                limits.max_output_bytes,
                limits.fuel
            ),
            (Duration::from_secs(5), 256 << 20, 4096, Some(1_000))
        );
        let none = effective_limits(&policy(), Duration::from_secs(2), ToolDefaults::default());
        assert_eq!(
            (
                none.timeout,
                none.memory_bytes,
                none.max_output_bytes,
                none.fuel
            ),
            (Duration::from_secs(2), 256 << 20, 1 << 20, Some(1_000))
        );
    }
}
