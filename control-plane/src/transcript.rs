//! Human-readable rendering of session events, one line each, for the CLI
//! and the demo:
//!
//! ```text
//! #7  tool_call_requested  write_file {"content":"hi","path":"notes/hello.txt"}  [call_1_0]
//! #9  tool_finished  write_file ok {"bytes_written":12}  [call_1_0]
//! ```

use harness_proto::control::v1 as control;
use harness_proto::control::v1::session_event::Kind;

use crate::event;
pub use crate::event::{session_status_label, stop_reason_label, tool_error_kind_label};

/// Longest rendering of JSON, text or output before it is cut with "…".
const MAX_FIELD_CHARS: usize = 160;

/// Renders one event as a single line: `#<seq>  <kind>  <details>`.
pub fn render_event(event: &control::SessionEvent) -> String {
    let Some(kind) = &event.kind else {
        return format!("#{}  (empty event)", event.seq);
    };
    let details = render_details(kind);
    if details.is_empty() {
        format!("#{}  {}", event.seq, event::kind_name(kind))
    } else {
        format!("#{}  {}  {details}", event.seq, event::kind_name(kind))
    }
}

fn render_details(kind: &Kind) -> String {
    match kind {
        Kind::Started(started) => format!(
            "agent={} provider={} model={} input={}",
            started.agent,
            started.provider,
            started.model,
            quoted(&started.input)
        ),
        Kind::UserMessage(message) if message.idempotency_key.is_empty() => quoted(&message.text),
        Kind::UserMessage(message) => {
            format!(
                "{}  [key {}]",
                quoted(&message.text),
                message.idempotency_key
            )
        }
        Kind::TextDelta(delta) => quoted(&delta.text),
        Kind::ToolCallRequested(call) => format!(
            "{} {}  [{}]",
            call.tool,
            shortened(&call.arguments_json),
            call.call_id
        ),
        Kind::PolicyDecision(decision) => render_policy(decision),
        Kind::ApprovalRequested(request) => format!(
            "{} {}: {}  [{}]",
            request.tool,
            shortened(&request.arguments_json),
            request.reason,
            request.call_id
        ),
        Kind::ApprovalResolved(resolved) => format!(
            "{} by {}{}  [{}]",
            event::enum_label(resolved.decision().as_str_name(), "APPROVAL_DECISION_"),
            resolved.resolved_by,
            reason_suffix(&resolved.reason),
            resolved.call_id
        ),
        Kind::ToolStarted(started) => format!(
            "{} invocation={} sandbox={}",
            started.tool, started.invocation_id, started.sandbox_session_id
        ),
        Kind::ToolOutput(output) => format!(
            "{} {}  [{}]",
            output.stream,
            quoted(&String::from_utf8_lossy(&output.data)),
            output.call_id
        ),
        Kind::ToolFinished(finished) => render_tool_finished(finished),
        Kind::BudgetWarning(warning) => {
            format!("{} {}/{}", warning.budget, warning.used, warning.limit)
        }
        Kind::Compaction(compaction) => match compaction.step() {
            control::CompactionStep::ClearToolResults => format!(
                "cleared {} old tool results, tokens {} -> {}",
                compaction.cleared_call_ids.len(),
                compaction.tokens_before,
                compaction.tokens_after
            ),
            _ => format!(
                "summarised turns {}-{} ({} kept) with {}, tokens {} -> {}: {}",
                compaction.first_turn,
                compaction.last_turn,
                compaction.turns_kept,
                compaction.model,
                compaction.tokens_before,
                compaction.tokens_after,
                quoted(&compaction.summary)
            ),
        },
        Kind::SubagentStarted(started) => format!(
            "{} session={} lineage={} task={}",
            started.agent,
            started.child_session_id,
            started.lineage.join(">"),
            quoted(&started.task)
        ),
        Kind::SubagentFinished(finished) => format!(
            "session={} {} {} {}",
            finished.child_session_id,
            crate::event::enum_label(finished.status().as_str_name(), "RECEIPT_STATUS_"),
            stop_reason_label(finished.stop_reason()),
            quoted(&finished.output)
        ),
        Kind::OutputRejected(rejected) => {
            format!("attempt {}: {}", rejected.attempt, rejected.errors)
        }
        Kind::SkillLoaded(loaded) => {
            let narrowed = match &loaded.allowed_tools {
                Some(allowed) if allowed.tools.is_empty() => " allowed-tools=none".to_owned(),
                Some(allowed) => format!(" allowed-tools={}", allowed.tools.join(",")),
                None => String::new(),
            };
            format!(
                "{} sha256={} resources={}{narrowed}  [{}]",
                loaded.name,
                loaded.body_sha256.chars().take(12).collect::<String>(),
                loaded.resources.len(),
                loaded.call_id
            )
        }
        Kind::Handoff(handoff) => format!(
            "{} -> {} history={} reason={}",
            handoff.from_agent,
            handoff.to_agent,
            crate::event::enum_label(handoff.history().as_str_name(), "HANDOFF_HISTORY_"),
            quoted(&handoff.reason)
        ),
        Kind::TurnCompleted(turn) => render_turn_completed(turn),
        Kind::WaitingForInput(waiting) => quoted(&waiting.assistant_text),
        Kind::InputClosed(closed) => closed.reason.clone(),
        Kind::Finished(finished) => render_finished(finished),
    }
}

fn render_request(request: &control::ModelRequest) -> String {
    let miss = if request.cache_miss_reason.is_empty() {
        String::new()
    } else {
        format!(" cache-miss={}", request.cache_miss_reason)
    };
    format!(" estimated={}{miss}", request.estimated_input_tokens)
}

fn render_policy(decision: &control::PolicyDecision) -> String {
    format!(
        "{} (rule {}){}  [{}]",
        event::enum_label(decision.verdict().as_str_name(), "VERDICT_"),
        decision.rule,
        reason_suffix(&decision.reason),
        decision.call_id
    )
}

fn render_tool_finished(finished: &control::ToolFinished) -> String {
    let outcome = match &finished.outcome {
        Some(control::tool_finished::Outcome::OutputJson(json)) => {
            format!("ok {}", shortened(json))
        }
        Some(control::tool_finished::Outcome::Error(error)) => format!(
            "error {}: {}",
            tool_error_kind_label(error.kind()),
            shortened(&error.message)
        ),
        None => "no outcome".to_owned(),
    };
    format!("{} {outcome}  [{}]", finished.tool, finished.call_id)
}

fn render_turn_completed(turn: &control::TurnCompleted) -> String {
    let usage = turn.usage.unwrap_or_default();
    let calls = match turn.tool_calls {
        1 => "1 tool call".to_owned(),
        n => format!("{n} tool calls"),
    };
    let request = turn
        .request
        .as_ref()
        .map(render_request)
        .unwrap_or_default();
    let cache = match (usage.cached_input_tokens, usage.cache_write_tokens) {
        (0, 0) => String::new(),
        (read, write) => format!(" cache-read={read} cache-write={write}"),
    };
    format!(
        "turn {} {}, {calls}, tokens in={} out={}{cache}{request}",
        turn.turn, turn.model_stop_reason, usage.input_tokens, usage.output_tokens
    )
}

fn render_finished(finished: &control::SessionFinished) -> String {
    let mut line = stop_reason_label(finished.stop_reason());
    if !finished.message.is_empty() {
        line.push_str(": ");
        line.push_str(&shortened(&finished.message));
    }
    if !finished.final_output.is_empty() {
        line.push(' ');
        line.push_str(&quoted(&finished.final_output));
    }
    line
}

fn reason_suffix(reason: &str) -> String {
    if reason.is_empty() {
        String::new()
    } else {
        format!(": {reason}")
    }
}

/// Quoted and escaped so the event stays on one line.
fn quoted(text: &str) -> String {
    format!("{:?}", shortened(text))
}

fn shortened(text: &str) -> String {
    match text.char_indices().nth(MAX_FIELD_CHARS) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(seq: u64, kind: Kind) -> control::SessionEvent {
        control::SessionEvent {
            session_id: "s".to_owned(),
            seq,
            time: None,
            turn: 1,
            kind: Some(kind),
        }
    }

    #[test]
    fn tool_call_lifecycle_renders_one_line_per_event() {
        let lines: Vec<String> = [
            event(
                7,
                Kind::ToolCallRequested(control::ToolCallRequested {
                    call_id: "call_1_0".to_owned(),
                    tool: "write_file".to_owned(),
                    arguments_json: r#"{"path":"notes/hello.txt","content":"hi\n"}"#.to_owned(),
                }),
            ),
            event(
                8,
                Kind::PolicyDecision(control::PolicyDecision {
                    call_id: "call_1_0".to_owned(),
                    verdict: control::Verdict::Allow.into(),
                    rule: "default".to_owned(),
                    reason: String::new(),
                }),
            ),
            event(
                9,
                Kind::ToolStarted(control::ToolStarted {
                    call_id: "call_1_0".to_owned(),
                    invocation_id: "s:call_1_0".to_owned(),
                    tool: "write_file".to_owned(),
                    sandbox_session_id: "sb-1".to_owned(),
                }),
            ),
            event(
                10,
                Kind::ToolOutput(control::ToolOutput {
                    call_id: "call_1_0".to_owned(),
                    stream: "stderr".to_owned(),
                    data: b"warn\n".to_vec(),
                }),
            ),
            event(
                11,
                Kind::ToolFinished(control::ToolFinished {
                    call_id: "call_1_0".to_owned(),
                    tool: "write_file".to_owned(),
                    outcome: Some(control::tool_finished::Outcome::OutputJson(
                        r#"{"bytes_written":3}"#.to_owned(),
                    )),
                    wall_time: None,
                    peak_memory_bytes: 0,
                }),
            ),
        ]
        .iter()
        .map(render_event)
        .collect();
        assert_eq!(
            lines,
            [
                r#"#7  tool_call_requested  write_file {"path":"notes/hello.txt","content":"hi\n"}  [call_1_0]"#,
                "#8  policy_decision  allow (rule default)  [call_1_0]",
                "#9  tool_started  write_file invocation=s:call_1_0 sandbox=sb-1",
                r#"#10  tool_output  stderr "warn\n"  [call_1_0]"#,
                r#"#11  tool_finished  write_file ok {"bytes_written":3}  [call_1_0]"#,
            ]
        );
    }

    #[test]
    fn errors_denials_and_the_end_render_with_their_reasons() {
        let denied = event(
            3,
            Kind::PolicyDecision(control::PolicyDecision {
                call_id: "call_2_0".to_owned(),
                verdict: control::Verdict::Deny.into(),
                rule: "agent.tools".to_owned(),
                reason: "tool \"exec\" is not available".to_owned(),
            }),
        );
        let invalid = event(
            4,
            Kind::ToolFinished(control::ToolFinished {
                call_id: "call_2_1".to_owned(),
                tool: "read_file".to_owned(),
                outcome: Some(control::tool_finished::Outcome::Error(
                    control::ToolCallError {
                        kind: control::ToolErrorKind::InvalidInput.into(),
                        message: "\"path\" is a required property".to_owned(),
                    },
                )),
                wall_time: None,
                peak_memory_bytes: 0,
            }),
        );
        let finished = event(
            5,
            Kind::Finished(control::SessionFinished {
                stop_reason: control::StopReason::Completed.into(),
                final_output: "All done.\nBye".to_owned(),
                message: String::new(),
                usage: None,
                files_written: Vec::new(),
            }),
        );
        let failed = event(
            6,
            Kind::Finished(control::SessionFinished {
                stop_reason: control::StopReason::Error.into(),
                final_output: String::new(),
                message: "model provider failed: script exhausted after 2 turns".to_owned(),
                usage: None,
                files_written: Vec::new(),
            }),
        );
        assert_eq!(
            [&denied, &invalid, &finished, &failed].map(render_event),
            [
                r#"#3  policy_decision  deny (rule agent.tools): tool "exec" is not available  [call_2_0]"#
                    .to_owned(),
                r#"#4  tool_finished  read_file error invalid_input: "path" is a required property  [call_2_1]"#
                    .to_owned(),
                r#"#5  finished  completed "All done.\nBye""#.to_owned(),
                "#6  finished  error: model provider failed: script exhausted after 2 turns"
                    .to_owned(),
            ]
        );
    }

    #[test]
    fn session_start_deltas_and_turns_render_compactly() {
        let started = event(
            1,
            Kind::Started(control::SessionStarted {
                agent: "demo".to_owned(),
                provider: "scripted".to_owned(),
                model: "scripted-demo".to_owned(),
                input: "Leave a note.".to_owned(),
                budget: None,
                resolved: None,
                input_truncated: None,
            }),
        );
        let delta = event(
            2,
            Kind::TextDelta(control::ModelTextDelta {
                text: "I'll start ".to_owned(),
            }),
        );
        let turn = event(
            3,
            Kind::TurnCompleted(control::TurnCompleted {
                turn: 1,
                assistant_text: "I'll start".to_owned(),
                tool_calls: 1,
                usage: Some(control::TurnUsage {
                    input_tokens: 120,
                    output_tokens: 30,
                    ..Default::default()
                }),
                model_stop_reason: "tool_use".to_owned(),
                request: None,
            }),
        );
        assert_eq!(
            [&started, &delta, &turn].map(render_event),
            [
                r#"#1  started  agent=demo provider=scripted model=scripted-demo input="Leave a note.""#
                    .to_owned(),
                r#"#2  text_delta  "I'll start ""#.to_owned(),
                "#3  turn_completed  turn 1 tool_use, 1 tool call, tokens in=120 out=30".to_owned(),
            ]
        );
    }

    #[test]
    fn long_fields_are_cut() {
        let long = "x".repeat(MAX_FIELD_CHARS + 10);
        assert_eq!(
            shortened(&long),
            format!("{}…", "x".repeat(MAX_FIELD_CHARS))
        );
        assert_eq!(shortened("short"), "short");
    }
}
