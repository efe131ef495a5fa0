//! The tools the control plane runs itself and offers to every agent that
//! lists them (bound to the harness executor when a session starts).
//!
//! - `escalate {reason}`: the agent hands the problem back to whoever
//!   started it. The loop ends the session with stop reason ESCALATED and
//!   the reason (a conversation waits for input instead). What an escalation
//!   does is the loop's rule ([`crate::agent_loop`]); this tool only
//!   validates and acknowledges it, so replaying it is harmless.

use std::sync::Arc;

use futures::future::BoxFuture;
use harness_proto::control::v1 as control;

use crate::agent_loop::executor::{
    HarnessCallError, HarnessOutput, HarnessRegistry, HarnessTool, HarnessToolError, RegistryError,
};

/// Name of the escalation tool.
pub const ESCALATE: &str = "escalate";

/// `escalate {reason}`.
#[derive(Debug, Default)]
pub struct EscalateTool;

impl HarnessTool for EscalateTool {
    fn name(&self) -> &str {
        ESCALATE
    }

    fn description(&self) -> &str {
        "Stop and hand the task back to whoever gave it to you (a supervisor agent or a \
         person), with the reason: use it when you cannot or must not go on (missing \
         access, an unclear or risky request, repeated failures). Nothing else runs after it."
    }

    fn input_schema_json(&self) -> &str {
        r#"{"type":"object","properties":{"reason":{"type":"string","minLength":1,"description":"Why you stop, and what you need to go on."}},"required":["reason"],"additionalProperties":false}"#
    }

    fn call(
        &self,
        call: control::HarnessToolCall,
    ) -> BoxFuture<'static, Result<HarnessOutput, HarnessCallError>> {
        Box::pin(async move {
            let reason = escalation_reason(&call.input_json).ok_or_else(|| HarnessToolError {
                kind: control::ToolErrorKind::InvalidInput,
                message: "escalate needs a non-empty \"reason\"".to_owned(),
            })?;
            let output = serde_json::json!({ "escalated": true, "reason": reason });
            Ok(HarnessOutput::json(output.to_string()))
        })
    }
}

/// The reason of an `escalate` call's arguments; `None` when it has none.
pub fn escalation_reason(arguments_json: &str) -> Option<String> {
    let input: serde_json::Value = serde_json::from_str(arguments_json).ok()?;
    input["reason"]
        .as_str()
        .map(str::trim)
        .filter(|reason| !reason.is_empty())
        .map(str::to_owned)
}

/// Every harness tool of a control plane.
pub fn standard() -> Result<HarnessRegistry, RegistryError> {
    let mut registry = HarnessRegistry::default();
    registry.register(Arc::new(EscalateTool))?;
    registry.register(crate::plan::tool())?;
    Ok(registry)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn the_reason_is_read_trimmed_and_must_not_be_empty() {
        assert_eq!(
            escalation_reason(r#"{"reason":"  no access to billing "}"#),
            Some("no access to billing".to_owned())
        );
        assert_eq!(escalation_reason(r#"{"reason":"  "}"#), None);
        assert_eq!(escalation_reason(r#"{"why":"x"}"#), None);
        assert_eq!(escalation_reason("not json"), None);
    }

    #[test]
    fn the_standard_registry_offers_escalate_with_a_schema_that_compiles() {
        let registry = standard().unwrap();
        let tool = registry.describe(ESCALATE).unwrap();
        let schema: serde_json::Value = serde_json::from_str(&tool.input_schema_json).unwrap();
        assert!(jsonschema::validator_for(&schema).is_ok());
        assert_eq!(tool.executor(), control::ToolExecutor::Harness);
    }

    #[tokio::test]
    async fn a_call_is_acknowledged_with_its_reason() {
        let output = EscalateTool
            .call(control::HarnessToolCall {
                invocation_id: "s:c".to_owned(),
                tool: ESCALATE.to_owned(),
                input_json: r#"{"reason":"needs a human"}"#.to_owned(),
                delegation: None,
            })
            .await
            .unwrap();
        assert_eq!(
            output,
            HarnessOutput::json(r#"{"escalated":true,"reason":"needs a human"}"#.to_owned())
        );
    }
}
