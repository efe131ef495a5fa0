//! Small facts about session events shared by the store, the loop and the
//! transcript: each kind's name, the labels of its enums, and how an event changes a session's usage.
//! How events move a session's status is the store's projection
//! ([`crate::store::projection`]).

use harness_proto::control::v1 as control;
use harness_proto::control::v1::session_event::Kind;
use harness_proto::control::v1::{BudgetUsage, TurnCompleted};

/// The snake_case name of an event kind, as in the proto's `oneof kind`.
pub fn kind_name(kind: &Kind) -> &'static str {
    match kind {
        Kind::Started(_) => "started",
        Kind::UserMessage(_) => "user_message",
        Kind::TextDelta(_) => "text_delta",
        Kind::ToolCallRequested(_) => "tool_call_requested",
        Kind::PolicyDecision(_) => "policy_decision",
        Kind::ApprovalRequested(_) => "approval_requested",
        Kind::ApprovalResolved(_) => "approval_resolved",
        Kind::ToolStarted(_) => "tool_started",
        Kind::ToolOutput(_) => "tool_output",
        Kind::ToolFinished(_) => "tool_finished",
        Kind::BudgetWarning(_) => "budget_warning",
        Kind::Compaction(_) => "compaction",
        Kind::SubagentStarted(_) => "subagent_started",
        Kind::SubagentFinished(_) => "subagent_finished",
        Kind::TurnCompleted(_) => "turn_completed",
        Kind::WaitingForInput(_) => "waiting_for_input",
        Kind::InputClosed(_) => "input_closed",
        Kind::Handoff(_) => "handoff",
        Kind::OutputRejected(_) => "output_rejected",
        Kind::SkillLoaded(_) => "skill_loaded",
        Kind::Finished(_) => "finished",
    }
}

/// `STOP_REASON_MAX_TURNS` → `max_turns`.
pub fn stop_reason_label(reason: control::StopReason) -> String {
    enum_label(reason.as_str_name(), "STOP_REASON_")
}

/// `SESSION_STATUS_RUNNING` → `running`.
pub fn session_status_label(status: control::SessionStatus) -> String {
    enum_label(status.as_str_name(), "SESSION_STATUS_")
}

/// `TOOL_ERROR_KIND_INVALID_INPUT` → `invalid_input`.
pub fn tool_error_kind_label(kind: control::ToolErrorKind) -> String {
    enum_label(kind.as_str_name(), "TOOL_ERROR_KIND_")
}

/// An enum value's proto name without its `prefix`, lowercase.
pub fn enum_label(enum_name: &str, prefix: &str) -> String {
    enum_name
        .strip_prefix(prefix)
        .unwrap_or(enum_name)
        .to_ascii_lowercase()
}

/// Adds what `kind` used to `usage`. The store keeps the session row's usage
/// with this and the loop reports its totals with it, so both always agree.
pub fn apply_to_usage(usage: &mut BudgetUsage, kind: &Kind) {
    match kind {
        Kind::TurnCompleted(turn) => apply_turn_to_usage(usage, turn),
        // A summarisation request costs like any other (it takes no turn).
        Kind::Compaction(compaction) => {
            if let Some(summary_usage) = &compaction.usage {
                add_model_usage(usage, summary_usage);
            }
        }
        // A call counts once it is dispatched: denied and invalid calls cost nothing.
        Kind::ToolStarted(_) => usage.tool_calls = usage.tool_calls.saturating_add(1),
        // A finished subagent's model and tool use count against its
        // parent's budget (its turns and wall clock are its own).
        Kind::SubagentFinished(finished) => {
            if let Some(child) = &finished.usage {
                usage.tool_calls = usage.tool_calls.saturating_add(child.tool_calls);
                usage.input_tokens = usage.input_tokens.saturating_add(child.input_tokens);
                usage.output_tokens = usage.output_tokens.saturating_add(child.output_tokens);
                usage.cached_input_tokens = usage
                    .cached_input_tokens
                    .saturating_add(child.cached_input_tokens);
                usage.cost_micros = usage.cost_micros.saturating_add(child.cost_micros);
            }
        }
        Kind::Finished(finished) => {
            if let Some(wall_clock) = finished.usage.as_ref().and_then(|u| u.wall_clock) {
                usage.wall_clock = Some(wall_clock);
            }
        }
        _ => {}
    }
}

/// What a completed turn adds to a session's usage (one turn, its tokens
/// and cost).
pub fn apply_turn_to_usage(usage: &mut BudgetUsage, turn: &TurnCompleted) {
    usage.turns = usage.turns.saturating_add(1);
    if let Some(turn_usage) = &turn.usage {
        add_model_usage(usage, turn_usage);
    }
}

/// Adds one model request's tokens and cost (a turn's, or a summary's).
fn add_model_usage(usage: &mut BudgetUsage, turn_usage: &control::TurnUsage) {
    {
        usage.input_tokens = usage.input_tokens.saturating_add(turn_usage.input_tokens);
        usage.output_tokens = usage.output_tokens.saturating_add(turn_usage.output_tokens);
        usage.cached_input_tokens = usage
            .cached_input_tokens
            .saturating_add(turn_usage.cached_input_tokens);
        usage.cost_micros = usage.cost_micros.saturating_add(turn_usage.cost_micros);
    }
}

#[cfg(test)]
mod tests {
    use harness_proto::control::v1::{
        SessionFinished, SubagentFinished, ToolCallRequested, ToolStarted, TurnCompleted, TurnUsage,
    };

    use super::*;

    #[test]
    fn usage_counts_turns_tokens_and_tool_calls() {
        let mut usage = BudgetUsage::default();
        let turn = Kind::TurnCompleted(TurnCompleted {
            usage: Some(TurnUsage {
                input_tokens: 10,
                output_tokens: 3,
                cached_input_tokens: 2,
                cost_micros: 7,
                cache_write_tokens: 0,
            }),
            ..Default::default()
        });
        apply_to_usage(&mut usage, &turn);
        apply_to_usage(&mut usage, &turn);
        apply_to_usage(
            &mut usage,
            &Kind::ToolCallRequested(ToolCallRequested::default()),
        );
        apply_to_usage(&mut usage, &Kind::ToolStarted(ToolStarted::default()));
        apply_to_usage(
            &mut usage,
            &Kind::SubagentFinished(SubagentFinished {
                usage: Some(BudgetUsage {
                    turns: 4,
                    tool_calls: 2,
                    input_tokens: 100,
                    output_tokens: 10,
                    cached_input_tokens: 1,
                    cost_micros: 5,
                    wall_clock: Some(prost_types::Duration {
                        seconds: 60,
                        nanos: 0,
                    }),
                }),
                ..Default::default()
            }),
        );
        let wall_clock = prost_types::Duration {
            seconds: 3,
            nanos: 0,
        };
        apply_to_usage(
            &mut usage,
            &Kind::Finished(SessionFinished {
                usage: Some(BudgetUsage {
                    wall_clock: Some(wall_clock),
                    ..Default::default()
                }),
                ..Default::default()
            }),
        );
        assert_eq!(
            usage,
            BudgetUsage {
                turns: 2,
                tool_calls: 3,
                input_tokens: 120,
                output_tokens: 16,
                cached_input_tokens: 5,
                cost_micros: 19,
                wall_clock: Some(wall_clock),
            }
        );
    }
}
