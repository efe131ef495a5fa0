//! The process backend behind the invocation lifecycle ([`crate::backend`]):
//! a call is a command (argv or a shell line, from a `ProcessCall` or the
//! `exec` tool's input) run in the session's process sandbox, its output
//! streamed as it comes.

use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use harness_proto::sandbox::v1 as pb;
use tokio::sync::mpsc;

use super::exec_tool::ParsedExec;
use super::sandbox::Command;
use crate::backend::{Backend, OutputMode, Ran, capped_timeout, error_result};
use crate::error::ServiceError;
use crate::session::Session;

/// Runs commands in sessions' process sandboxes. The sandbox is the
/// session's, so this holds nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessInvocations;

impl Backend for ProcessInvocations {
    /// The parsed call, or why it is not one (recorded as the result).
    type Call = Result<ParsedExec, pb::ToolError>;

    const KIND: pb::Backend = pb::Backend::Process;
    const OUTPUT: OutputMode = OutputMode::Streamed;

    fn admit(&self, session: &Session) -> Result<(), ServiceError> {
        session.process().map(drop).map_err(ServiceError::from)
    }

    fn timeout(
        &self,
        call: &Self::Call,
        requested: Option<&prost_types::Duration>,
        session: &Session,
    ) -> Duration {
        let from_call = call
            .as_ref()
            .ok()
            .and_then(|parsed| parsed.timeout.map(harness_proto::duration_to_proto));
        capped_timeout(
            requested.or(from_call.as_ref()),
            session.policy.invocation_timeout,
        )
    }

    fn fingerprint(&self, call: &Self::Call, timeout: Duration) -> u64 {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        format!("{call:?}").hash(&mut hasher);
        timeout.hash(&mut hasher);
        hasher.finish()
    }

    fn digest(&self, _call: &Self::Call) -> String {
        String::new()
    }

    async fn run(
        &self,
        session: &Arc<Session>,
        call: Self::Call,
        timeout: Duration,
        output: Option<mpsc::Sender<pb::OutputChunk>>,
    ) -> Ran {
        let Some(output) = output else {
            return error_result(
                pb::ErrorKind::Internal,
                "the process backend streams its output but was given no channel",
            )
            .into();
        };
        let command =
            match call.and_then(|p| command_of(p.call, timeout, session.policy.max_output_bytes)) {
                Ok(command) => command,
                Err(error) => {
                    return pb::InvokeResult {
                        outcome: Some(pb::invoke_result::Outcome::Error(error)),
                        usage: Some(pb::Usage::default()),
                        replayed: false,
                    }
                    .into();
                }
            };
        let _running = session.start_running();
        match session.process() {
            Ok(sandbox) => sandbox
                .run(command, output, session.cancelled())
                .await
                .into(),
            Err(error) => error_result(pb::ErrorKind::Internal, error.to_string()).into(),
        }
    }
}

/// Checks a process call and turns it into a command.
fn command_of(
    call: pb::ProcessCall,
    timeout: Duration,
    max_output_bytes: u64,
) -> Result<Command, pb::ToolError> {
    let invalid = |message: &str| pb::ToolError {
        kind: pb::ErrorKind::InvalidInput as i32,
        message: message.to_owned(),
        violations: Vec::new(),
    };
    let via_shell = !call.shell.is_empty();
    let argv = match (call.argv.is_empty(), call.shell.is_empty()) {
        (false, true) => call.argv,
        (true, false) => vec!["/bin/sh".to_owned(), "-c".to_owned(), call.shell],
        _ => return Err(invalid("set exactly one of argv and shell")),
    };
    let mut environment: Vec<(String, String)> = call.environment.into_iter().collect();
    environment.sort();
    for (name, value) in &environment {
        if name.is_empty() || name.contains('=') || name.contains('\0') || value.contains('\0') {
            return Err(invalid(&format!("invalid environment variable {name:?}")));
        }
    }
    Ok(Command {
        argv,
        cwd: if call.cwd.is_empty() {
            super::mount_plan::WORKSPACE.to_owned()
        } else {
            call.cwd
        },
        environment,
        stdin: call.stdin,
        timeout,
        max_output_bytes,
        via_shell,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn a_call_sets_exactly_one_of_argv_and_shell() {
        let both = pb::ProcessCall {
            argv: vec!["true".to_owned()],
            shell: "true".to_owned(),
            ..Default::default()
        };
        let neither = pb::ProcessCall::default();
        for call in [both, neither] {
            let error = command_of(call, Duration::from_secs(1), 1024).unwrap_err();
            assert_eq!(
                error,
                pb::ToolError {
                    kind: pb::ErrorKind::InvalidInput as i32,
                    message: "set exactly one of argv and shell".to_owned(),
                    violations: vec![],
                }
            );
        }
        let shell = command_of(
            pb::ProcessCall {
                shell: "echo hi".to_owned(),
                ..Default::default()
            },
            Duration::from_secs(1),
            1024,
        )
        .unwrap();
        assert_eq!(shell.argv, ["/bin/sh", "-c", "echo hi"]);
        assert!(shell.via_shell);
        assert_eq!(shell.cwd, super::super::mount_plan::WORKSPACE);
    }

    #[test]
    fn environment_names_and_values_are_checked() {
        for (name, value) in [("", "v"), ("A=B", "v"), ("A", "v\0")] {
            let call = pb::ProcessCall {
                argv: vec!["true".to_owned()],
                environment: [(name.to_owned(), value.to_owned())].into(),
                ..Default::default()
            };
            let error = command_of(call, Duration::from_secs(1), 1024).unwrap_err();
            assert_eq!(error.kind, pb::ErrorKind::InvalidInput as i32, "{name:?}");
        }
    }
}
