//! Tool calls between the loop and its executors (sandboxd mostly): argument validation before
//! dispatch, the dispatch itself (bounded, retried while sandboxd is
//! unreachable — safe, because the invocation id makes a repeat harmless),
//! and turning results into `tool_finished` events.

use std::sync::Arc;
use std::time::Duration;

use harness_proto::control::v1 as control;
use harness_proto::sandbox::v1 as sandbox;
use tokio::sync::Semaphore;

use super::executor::{HarnessOutput, HarnessToolError};
use crate::error_report::error_chain;
use crate::provider::ToolCall;
use crate::sandbox::{InvocationOutcome, SandboxDispatch, SandboxError};

/// Longest rendering of malformed arguments in an error message.
const MAX_SHOWN_ARGUMENTS: usize = 300;

/// A tool as the loop knows it: its input schema compiled for validation.
#[derive(Debug)]
pub struct ToolSchema {
    /// Tool name.
    pub name: String,
    /// The validator of its input.
    pub validator: jsonschema::Validator,
}

/// Parses and validates a call's arguments; on failure, the message for the
/// model (the call is not dispatched).
pub fn validate_arguments(
    call: &ToolCall,
    schema: Option<&ToolSchema>,
) -> Result<serde_json::Value, String> {
    let arguments: serde_json::Value =
        serde_json::from_str(&call.arguments_json).map_err(|error| {
            let shown: String = call
                .arguments_json
                .chars()
                .take(MAX_SHOWN_ARGUMENTS)
                .collect();
            format!("the arguments are not valid JSON ({error}): {shown}")
        })?;
    let Some(schema) = schema else {
        return Ok(arguments);
    };
    let violations: Vec<String> = schema
        .validator
        .iter_errors(&arguments)
        .map(|error| {
            let path = error.instance_path().to_string();
            let at = if path.is_empty() {
                "(root)".to_owned()
            } else {
                path
            };
            format!("at {at}: {error}")
        })
        .collect();
    if violations.is_empty() {
        Ok(arguments)
    } else {
        Err(format!(
            "the arguments do not match the input schema of \"{}\": {}",
            schema.name,
            violations.join("; ")
        ))
    }
}

/// Retries of an `Invoke` that could not reach sandboxd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DispatchRetry {
    /// Attempts in total (at least 1).
    pub attempts: u32,
    /// Wait before the first retry; doubles per retry.
    pub backoff: Duration,
}

impl Default for DispatchRetry {
    fn default() -> Self {
        Self {
            attempts: 5,
            backoff: Duration::from_millis(200),
        }
    }
}

/// What a dispatched call came back with.
#[derive(Debug)]
pub enum CallResult {
    /// sandboxd ran it (or replayed its recorded result).
    Outcome(InvocationOutcome),
    /// No answer within the deadline.
    TimedOut(Duration),
    /// The sandbox session is gone (sandboxd restarted, or it expired).
    SandboxLost(tonic::Status),
    /// sandboxd refused the invocation id as used for another request.
    Conflict(tonic::Status),
    /// sandboxd could not be reached.
    Failed(SandboxError),
    /// A harness tool's output, or its error.
    Harness(Result<HarnessOutput, HarnessToolError>),
    /// The control plane is shutting down before the call could finish;
    /// nothing is recorded and it runs again at the next start.
    ShuttingDown,
    /// The call was started without a recorded request, so nothing ran.
    MissingRequest,
}

/// Sends one invocation and waits for its result, retrying while sandboxd
/// is unreachable.
pub async fn dispatch(
    sandbox: Arc<dyn SandboxDispatch>,
    slots: Arc<Semaphore>,
    request: sandbox::InvokeRequest,
    deadline: Duration,
    retry: DispatchRetry,
) -> CallResult {
    // The semaphore is never closed, so acquiring cannot fail.
    let _slot = slots.acquire().await.ok();
    let mut wait = retry.backoff;
    let mut attempt = 1;
    loop {
        let result = tokio::time::timeout(deadline, sandbox.invoke(request.clone())).await;
        match result {
            Ok(Ok(outcome)) => return CallResult::Outcome(outcome),
            Err(_) => return CallResult::TimedOut(deadline),
            Ok(Err(SandboxError::Invoke(status))) => match status.code() {
                tonic::Code::NotFound => return CallResult::SandboxLost(status),
                tonic::Code::AlreadyExists => return CallResult::Conflict(status),
                tonic::Code::Unavailable if attempt < retry.attempts => {
                    tracing::warn!(
                        invocation_id = request.invocation_id,
                        attempt,
                        status = %status.message(),
                        "sandboxd unreachable; retrying the invocation"
                    );
                }
                _ => return CallResult::Failed(SandboxError::Invoke(status)),
            },
            Ok(Err(error)) => return CallResult::Failed(error),
        }
        tokio::time::sleep(wait).await;
        wait = wait.saturating_mul(2);
        attempt += 1;
    }
}

/// A stream of output as a `tool_output` event.
pub fn tool_output(call_id: &str, chunk: &sandbox::OutputChunk) -> control::ToolOutput {
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

/// sandboxd's result as a `tool_finished` event.
pub fn finished_from_result(
    call: &ToolCall,
    result: &sandbox::InvokeResult,
) -> control::ToolFinished {
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

/// A `tool_finished` event carrying an error.
pub fn finished_with_error(
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

/// The `tool_finished` for a result that is not sandboxd's outcome.
pub fn finished_from_failure(
    call: &ToolCall,
    result: &CallResult,
    resumed: bool,
) -> control::ToolFinished {
    let (kind, message) = match result {
        CallResult::Outcome(outcome) => return finished_from_result(call, &outcome.result),
        CallResult::Harness(Ok(output)) => {
            return control::ToolFinished {
                call_id: call.call_id.clone(),
                tool: call.tool.clone(),
                outcome: Some(control::tool_finished::Outcome::OutputJson(
                    output.output_json.clone(),
                )),
                wall_time: None,
                peak_memory_bytes: 0,
            };
        }
        CallResult::Harness(Err(error)) => (error.kind, error.message.clone()),
        CallResult::ShuttingDown => (
            control::ToolErrorKind::Interrupted,
            "the control plane shut down while this call ran".to_owned(),
        ),
        CallResult::MissingRequest => (
            control::ToolErrorKind::Internal,
            "the call was started without a recorded request, so it did not run".to_owned(),
        ),
        CallResult::TimedOut(after) => (
            control::ToolErrorKind::Timeout,
            format!("no result from sandboxd within {}s", after.as_secs_f64()),
        ),
        CallResult::SandboxLost(status) if resumed => (
            control::ToolErrorKind::Interrupted,
            format!(
                "the control plane restarted while this call ran, and its sandbox session is gone \
                 ({}), so its outcome is unknown: its side effects may or may not have happened; \
                 verify before relying on them or retrying. Later calls run in a new, empty sandbox \
                 session.",
                status.message()
            ),
        ),
        CallResult::SandboxLost(status) => (
            control::ToolErrorKind::Internal,
            format!(
                "the sandbox session is gone ({}); this call did not run. Later calls run in a \
                 new, empty sandbox session.",
                status.message()
            ),
        ),
        CallResult::Conflict(status) => (
            control::ToolErrorKind::Interrupted,
            format!(
                "sandboxd refused to run this call again ({}); its outcome is unknown: its side \
                 effects may or may not have happened",
                status.message()
            ),
        ),
        CallResult::Failed(error) => (
            control::ToolErrorKind::Internal,
            format!("could not reach sandboxd: {}", error_chain(error)),
        ),
    };
    finished_with_error(call, kind, message)
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn call(arguments: &str) -> ToolCall {
        ToolCall {
            call_id: "c".to_owned(),
            tool: "read_file".to_owned(),
            arguments_json: arguments.to_owned(),
        }
    }

    fn schema() -> ToolSchema {
        let schema = serde_json::json!({
            "type": "object",
            "required": ["path"],
            "properties": {"path": {"type": "string"}},
            "additionalProperties": false,
        });
        ToolSchema {
            name: "read_file".to_owned(),
            validator: jsonschema::validator_for(&schema).unwrap(),
        }
    }

    #[test]
    fn arguments_are_parsed_and_checked_against_the_schema() {
        assert_eq!(
            validate_arguments(&call(r#"{"path":"a"}"#), Some(&schema())),
            Ok(serde_json::json!({"path": "a"}))
        );
        assert_eq!(
            validate_arguments(&call(r#"{"path":42}"#), Some(&schema())),
            Err("the arguments do not match the input schema of \"read_file\": at /path: 42 is not of type \"string\"".to_owned())
        );
        let malformed = validate_arguments(&call(r#"{"path": "a"#), Some(&schema())).unwrap_err();
        assert!(
            malformed.starts_with("the arguments are not valid JSON (EOF while parsing a string"),
            "{malformed}"
        );
        assert!(malformed.ends_with(r#": {"path": "a"#), "{malformed}");
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
