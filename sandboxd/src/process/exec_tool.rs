//! The `exec` tool: how models reach the process backend. It is listed by
//! `ListTools` next to the WASI tools; a call carries JSON input that maps
//! onto a [`pb::ProcessCall`].

use std::collections::HashMap;
use std::sync::LazyLock;

use harness_proto::sandbox::v1 as pb;
use serde::Deserialize;

/// The tool's name.
pub const EXEC_TOOL: &str = "exec";

/// The input schema.
pub const INPUT_SCHEMA: &str = r#"{
  "type": "object",
  "description": "Run a program in the session's Linux sandbox. Set exactly one of command and argv.",
  "properties": {
    "command": {"type": "string", "description": "A shell command line, run with /bin/sh -c."},
    "argv": {"type": "array", "items": {"type": "string"}, "minItems": 1, "description": "Program and arguments, run without a shell; the program is looked up in PATH."},
    "cwd": {"type": "string", "description": "Working directory; default /workspace."},
    "env": {"type": "object", "additionalProperties": {"type": "string"}, "description": "Extra environment variables."},
    "stdin": {"type": "string", "description": "Text written to the program's standard input."},
    "timeout_ms": {"type": "integer", "minimum": 1, "description": "Deadline in milliseconds, capped by the session policy."}
  },
  "oneOf": [{"required": ["command"]}, {"required": ["argv"]}],
  "additionalProperties": false
}"#;

/// The output schema.
pub const OUTPUT_SCHEMA: &str = r#"{
  "type": "object",
  "properties": {
    "exit_code": {"type": ["integer", "null"]},
    "signal": {"type": ["integer", "null"]},
    "stdout": {"type": "string"},
    "stderr": {"type": "string"}
  },
  "required": ["exit_code", "signal", "stdout", "stderr"]
}"#;

static VALIDATOR: LazyLock<Option<jsonschema::Validator>> = LazyLock::new(|| {
    serde_json::from_str::<serde_json::Value>(INPUT_SCHEMA)
        .ok()
        .and_then(|schema| jsonschema::validator_for(&schema).ok())
});

/// The `ListTools` entry.
pub fn tool() -> pb::Tool {
    pb::Tool {
        name: EXEC_TOOL.to_owned(),
        description: "Runs a command (a shell line or an argv) in the session's namespaced Linux \
                      sandbox: the workspace at /workspace, read-only system directories, no \
                      network unless the session's allowlist grants it (then through the HTTP(S) \
                      proxy in the environment). Returns exit code, stdout and stderr."
            .to_owned(),
        input_schema_json: INPUT_SCHEMA.to_owned(),
        output_schema_json: OUTPUT_SCHEMA.to_owned(),
        backend: pb::Backend::Process as i32,
        digest: String::new(),
    }
}

#[derive(Debug, Deserialize)]
struct ExecInput {
    command: Option<String>,
    argv: Option<Vec<String>>,
    cwd: Option<String>,
    #[serde(default)]
    env: HashMap<String, String>,
    stdin: Option<String>,
    timeout_ms: Option<u64>,
}

/// An `exec` call as a process call plus its requested timeout.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedExec {
    /// The call.
    pub call: pb::ProcessCall,
    /// Requested deadline.
    pub timeout: Option<std::time::Duration>,
}

/// Validates `input_json` against the schema and maps it; every violation
/// is listed.
pub fn parse(input_json: &str) -> Result<ParsedExec, pb::ToolError> {
    let invalid = |message: String, violations: Vec<pb::SchemaViolation>| pb::ToolError {
        kind: pb::ErrorKind::InvalidInput as i32,
        message,
        violations,
    };
    let value: serde_json::Value = serde_json::from_str(input_json)
        .map_err(|e| invalid(format!("input is not JSON: {e}"), Vec::new()))?;
    let Some(validator) = VALIDATOR.as_ref() else {
        return Err(pb::ToolError {
            kind: pb::ErrorKind::Internal as i32,
            message: "the exec tool's schema does not compile".to_owned(),
            violations: Vec::new(),
        });
    };
    let violations: Vec<pb::SchemaViolation> = validator
        .iter_errors(&value)
        .map(|e| pb::SchemaViolation {
            instance_path: e.instance_path().to_string(),
            message: e.to_string(),
        })
        .collect();
    if !violations.is_empty() {
        let summary = violations
            .iter()
            .map(|v| format!("{}: {}", v.instance_path, v.message))
            .collect::<Vec<_>>()
            .join("; ");
        return Err(invalid(summary, violations));
    }
    let input: ExecInput = serde_json::from_value(value)
        .map_err(|e| invalid(format!("input does not match the schema: {e}"), Vec::new()))?;
    Ok(ParsedExec {
        call: pb::ProcessCall {
            argv: input.argv.unwrap_or_default(),
            shell: input.command.unwrap_or_default(),
            cwd: input.cwd.unwrap_or_default(),
            environment: input.env,
            stdin: input.stdin.unwrap_or_default().into_bytes(),
        },
        timeout: input.timeout_ms.map(std::time::Duration::from_millis),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn a_shell_command_maps_onto_a_process_call() {
        let parsed = parse(
            r#"{"command":"ls -l","cwd":"/tmp","env":{"A":"1"},"stdin":"x","timeout_ms":1500}"#,
        )
        .unwrap();
        assert_eq!(
            parsed,
            ParsedExec {
                call: pb::ProcessCall {
                    argv: vec![],
                    shell: "ls -l".into(),
                    cwd: "/tmp".into(),
                    environment: [("A".to_owned(), "1".to_owned())].into(),
                    stdin: b"x".to_vec(),
                },
                timeout: Some(std::time::Duration::from_millis(1500)),
            }
        );
    }

    #[test]
    fn invalid_input_lists_every_violation() {
        let error = parse(r#"{"argv":[],"bogus":1}"#).unwrap_err();
        assert_eq!(error.kind, pb::ErrorKind::InvalidInput as i32);
        assert!(error.violations.len() >= 2, "{error:?}");
        let both = parse(r#"{"argv":["true"],"command":"true"}"#).unwrap_err();
        assert_eq!(both.kind, pb::ErrorKind::InvalidInput as i32);
    }
}
