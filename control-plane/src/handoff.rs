//! Handoffs: control of a session moves to another agent.
//!
//! An agent lists `handoffs = ["billing"]`; its model sees one harness tool
//! per target, `transfer_to_<name> {reason}` (plus `summary` when the
//! target takes `handoff-history = "summary"`). The tool only validates and
//! acknowledges; what a handoff does is the loop's: once the turn with a
//! successful transfer closes, it records a `handoff` event carrying the
//! target agent resolved as `started` records the first one, and every
//! later request is the target's — its system prompt, tools, policy and
//! model. [`history_after_handoff`] is the one rule for what the target
//! sees of the conversation so far. A session hands over at most
//! `max-handoffs` times (the current agent's limit), one handoff per turn.

use std::sync::Arc;

use futures::future::BoxFuture;
use harness_proto::control::v1 as control;

use crate::agent::{Agent, AgentCatalog, HandoffHistory, TRANSFER_PREFIX, transfer_tool_name};
use crate::agent_loop::executor::{HarnessCallError, HarnessOutput, HarnessTool, HarnessToolError};
use crate::provider::Message;

/// A successful transfer call of a closed turn, not yet carried out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transfer {
    /// The call.
    pub call_id: String,
    /// The target agent.
    pub to: String,
    /// Why.
    pub reason: String,
    /// The summary the model wrote (may be empty).
    pub summary: String,
}

impl Transfer {
    /// The transfer a call of `tool` with `arguments_json` asks for, if it
    /// is a transfer tool.
    pub fn of_call(call_id: &str, tool: &str, arguments_json: &str) -> Option<Self> {
        let to = tool.strip_prefix(TRANSFER_PREFIX)?;
        let arguments: serde_json::Value = serde_json::from_str(arguments_json).ok()?;
        let text = |field: &str| {
            arguments[field]
                .as_str()
                .unwrap_or_default()
                .trim()
                .to_owned()
        };
        Some(Self {
            call_id: call_id.to_owned(),
            to: to.to_owned(),
            reason: text("reason"),
            summary: text("summary"),
        })
    }
}

/// The conversation the target of a handoff starts from: `messages` (the
/// conversation so far, system prompt first if any) under the target's
/// `system_prompt`, cut down as `history` says.
pub fn history_after_handoff(
    messages: &[Message],
    history: control::HandoffHistory,
    system_prompt: &str,
    from_agent: &str,
    summary: &str,
) -> Vec<Message> {
    let system = (!system_prompt.is_empty()).then(|| Message::System {
        text: system_prompt.to_owned(),
    });
    let rest: Vec<Message> = match history {
        control::HandoffHistory::Full => messages
            .iter()
            .filter(|message| !matches!(message, Message::System { .. }))
            .cloned()
            .collect(),
        control::HandoffHistory::LastUser => messages
            .iter()
            .rev()
            .find(|message| {
                matches!(message, Message::User { text } if !text.starts_with("[harness]"))
            })
            .cloned()
            .into_iter()
            .collect(),
        control::HandoffHistory::Summary => vec![Message::User {
            text: format!(
                "[harness] The conversation so far, as summarised by the {from_agent} agent that \
                 handed it to you:\n{summary}"
            ),
        }],
    };
    system.into_iter().chain(rest).collect()
}

/// `transfer_to_<name>`: hands the session to agent `<name>`.
#[derive(Debug)]
pub struct TransferTool {
    name: String,
    description: String,
    schema: String,
    target: Arc<Agent>,
}

impl TransferTool {
    /// The tool handing sessions to `target`.
    pub fn new(target: Arc<Agent>) -> Self {
        let definition = &target.definition;
        let needs_summary = definition.delegation.handoff_history == HandoffHistory::Summary;
        let what = if definition.description.is_empty() {
            String::new()
        } else {
            format!(" ({})", definition.description.trim_end_matches('.'))
        };
        let summary_note = if needs_summary {
            " It sees only the summary you write, not this conversation."
        } else {
            ""
        };
        let schema = if needs_summary {
            r#"{"type":"object","properties":{"reason":{"type":"string","minLength":1,"description":"Why this agent should take over."},"summary":{"type":"string","minLength":1,"description":"Everything the next agent needs to know: it sees nothing else of the conversation."}},"required":["reason","summary"],"additionalProperties":false}"#
        } else {
            r#"{"type":"object","properties":{"reason":{"type":"string","minLength":1,"description":"Why this agent should take over."}},"required":["reason"],"additionalProperties":false}"#
        };
        Self {
            name: transfer_tool_name(&definition.name),
            description: format!(
                "Hand this conversation over to the \"{}\" agent{what}: it answers from the next \
                 turn on, with its own instructions and tools, and you stop.{summary_note}",
                definition.name
            ),
            schema: schema.to_owned(),
            target,
        }
    }
}

impl HarnessTool for TransferTool {
    fn name(&self) -> &str {
        &self.name
    }

    fn description(&self) -> &str {
        &self.description
    }

    fn input_schema_json(&self) -> &str {
        &self.schema
    }

    fn call(
        &self,
        call: control::HarnessToolCall,
    ) -> BoxFuture<'static, Result<HarnessOutput, HarnessCallError>> {
        let to = self.target.definition.name.clone();
        Box::pin(async move {
            let transfer = Transfer::of_call("", &call.tool, &call.input_json)
                .filter(|transfer| !transfer.reason.is_empty())
                .ok_or_else(|| HarnessToolError {
                    kind: control::ToolErrorKind::InvalidInput,
                    message: format!("{} needs a non-empty \"reason\"", call.tool),
                })?;
            let output = serde_json::json!({"transferred_to": to, "reason": transfer.reason});
            Ok(HarnessOutput::json(output.to_string()))
        })
    }

    fn handoff_target(&self) -> Option<&Arc<Agent>> {
        Some(&self.target)
    }
}

/// One `transfer_to_<name>` tool per agent some agent hands sessions to.
pub fn tools(agents: &AgentCatalog) -> Vec<Arc<dyn HarnessTool>> {
    agents
        .handoff_names()
        .into_iter()
        .filter_map(|name| agents.get(name))
        .map(|agent| Arc::new(TransferTool::new(agent)) as Arc<dyn HarnessTool>)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conversation() -> Vec<Message> {
        vec![
            Message::System {
                text: "You are triage.".to_owned(),
            },
            Message::User {
                text: "My invoice is wrong.".to_owned(),
            },
            Message::Assistant {
                text: "Which one?".to_owned(),
                tool_calls: Vec::new(),
            },
            Message::User {
                text: "March.".to_owned(),
            },
            Message::User {
                text: "[harness] Budget notice: wrap up.".to_owned(),
            },
        ]
    }

    #[test]
    fn full_history_keeps_everything_under_the_new_prompt() {
        let mut expected = conversation();
        expected[0] = Message::System {
            text: "You are billing.".to_owned(),
        };
        assert_eq!(
            history_after_handoff(
                &conversation(),
                control::HandoffHistory::Full,
                "You are billing.",
                "triage",
                ""
            ),
            expected
        );
    }

    #[test]
    fn last_user_keeps_only_the_users_latest_message() {
        assert_eq!(
            history_after_handoff(
                &conversation(),
                control::HandoffHistory::LastUser,
                "You are billing.",
                "triage",
                ""
            ),
            [
                Message::System {
                    text: "You are billing.".to_owned()
                },
                Message::User {
                    text: "March.".to_owned()
                }
            ]
        );
    }

    #[test]
    fn a_summary_replaces_the_history() {
        assert_eq!(
            history_after_handoff(
                &conversation(),
                control::HandoffHistory::Summary,
                "",
                "triage",
                "March invoice double-charged."
            ),
            [Message::User {
                text: "[harness] The conversation so far, as summarised by the triage agent that \
                       handed it to you:\nMarch invoice double-charged."
                    .to_owned()
            }]
        );
    }

    #[test]
    fn transfers_are_read_from_their_calls() {
        assert_eq!(
            Transfer::of_call("c1", "transfer_to_billing", r#"{"reason":" invoice "}"#),
            Some(Transfer {
                call_id: "c1".to_owned(),
                to: "billing".to_owned(),
                reason: "invoice".to_owned(),
                summary: String::new(),
            })
        );
        assert_eq!(Transfer::of_call("c1", "read_file", "{}"), None);
    }
}
