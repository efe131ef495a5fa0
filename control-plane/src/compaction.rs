//! Compaction: keeping a long session's requests under the model's context
//! window, cheapest step first.
//!
//! When the estimated next request reaches `compaction-threshold` of the
//! context window:
//!
//! 1. **Clear old tool results**: every tool result but the last
//!    `keep-tool-results` becomes a one-line stub naming the tool and the
//!    size. If that brings the estimate under the threshold, it is enough.
//! 2. **Summarise**: the turns before the last `keep-turns` are replaced by
//!    a summary the model writes (a `compaction-model` may be a cheaper
//!    one). Every user message is kept (the task and its instructions stay
//!    pinned), earlier summaries are folded into the new one, and the kept
//!    turns start at an assistant message, so no tool call is ever separated
//!    from its result.
//!
//! The decision ([`decide`]) and its effect on the history ([`apply`]) are
//! pure; the loop records each compaction as a `compaction` event holding
//! everything [`apply`] needs (the cleared call ids, the summary text and
//! how many assistant turns it replaced), so replay after a crash rebuilds
//! the same history without asking the model again.

use std::collections::HashSet;

use harness_proto::control::v1 as control;

use crate::context::ContextSettings;
use crate::prompt::{self, message_chars};
use crate::provider::Message;

/// Starts every stub that replaced a tool result.
pub const CLEARED_PREFIX: &str = "[harness] Tool result cleared to save context";

/// Starts every summary message.
pub const SUMMARY_PREFIX: &str = "[harness] Summary of earlier turns";

/// The instructions of a summarisation request.
pub const SUMMARY_INSTRUCTIONS: &str = "You compress an agent's working history. Summarise \
    the turns below for the agent that will continue the task: what was asked, what was \
    done (tools called and what they showed), decisions made, files written, open problems \
    and the next steps. Keep exact names, paths, numbers and error messages. Write plain \
    text, at most a few hundred words; do not address the user.";

/// Tool results this short are not worth a stub.
const MIN_CLEARED_CHARS: usize = 256;

/// Characters of one message kept in a summarisation request.
const RENDERED_MESSAGE_CHARS: usize = 4_000;

/// What compaction should do before the next request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Replace these tool results with stubs.
    Clear {
        /// Their call ids.
        call_ids: Vec<String>,
        /// The estimate after.
        tokens_after: u64,
    },
    /// Summarise the turns before the kept ones.
    Summarise {
        /// Assistant turns the summary replaces.
        assistant_messages: usize,
        /// The estimate without them (before the summary is added).
        tokens_after: u64,
    },
}

/// What to do when the next request is estimated at `estimated` tokens
/// against a `window`; `None` below the threshold (unless `force`d, after a
/// provider said the context is too long) or when nothing can be compacted.
pub fn decide(
    messages: &[Message],
    estimated: u64,
    window: u64,
    settings: &ContextSettings,
    force: bool,
) -> Option<Decision> {
    let limit = (window as f64 * settings.compaction_threshold) as u64;
    if estimated < limit && !force {
        return None;
    }
    let total_chars: u64 = messages.iter().map(message_chars).sum::<u64>().max(1);
    let scaled = |chars: u64| {
        u64::try_from(u128::from(estimated) * u128::from(chars) / u128::from(total_chars))
            .unwrap_or(u64::MAX)
    };
    let call_ids = clearable(messages, settings.keep_tool_results);
    let clearing = (!call_ids.is_empty()).then(|| {
        let cleared = apply_clear(messages, &call_ids.iter().map(String::as_str).collect());
        Decision::Clear {
            tokens_after: scaled(cleared.iter().map(message_chars).sum()),
            call_ids,
        }
    });
    if let Some(Decision::Clear { tokens_after, .. }) = &clearing
        && *tokens_after < limit
    {
        return clearing;
    }
    let assistants = messages
        .iter()
        .filter(|message| matches!(message, Message::Assistant { .. }))
        .count();
    let assistant_messages = assistants.saturating_sub(settings.keep_turns);
    if assistant_messages == 0 {
        // Nothing to summarise: clearing, if anything, is the most there is.
        return clearing;
    }
    let kept = apply_summary(messages, assistant_messages, None);
    Some(Decision::Summarise {
        assistant_messages,
        tokens_after: scaled(kept.iter().map(message_chars).sum()),
    })
}

/// Tool results before the last `keep`, not cleared yet and longer than a
/// stub.
fn clearable(messages: &[Message], keep: usize) -> Vec<String> {
    let results = messages
        .iter()
        .filter(|message| matches!(message, Message::ToolResult { .. }))
        .count();
    // The last `keep` results overall stay, cleared or not.
    let old = results.saturating_sub(keep);
    messages
        .iter()
        .filter_map(|message| match message {
            Message::ToolResult {
                call_id, content, ..
            } => Some((call_id, content)),
            _ => None,
        })
        .take(old)
        .filter(|(_, content)| {
            !content.starts_with(CLEARED_PREFIX) && content.len() > MIN_CLEARED_CHARS
        })
        .map(|(call_id, _)| call_id.clone())
        .collect()
}

/// The history after a recorded compaction.
pub fn apply(messages: &[Message], compaction: &control::Compaction) -> Vec<Message> {
    match compaction.step() {
        control::CompactionStep::ClearToolResults => apply_clear(
            messages,
            &compaction
                .cleared_call_ids
                .iter()
                .map(String::as_str)
                .collect(),
        ),
        control::CompactionStep::Summarise => apply_summary(
            messages,
            usize::try_from(compaction.summarised_assistant_messages).unwrap_or(usize::MAX),
            Some(&summary_message(compaction)),
        ),
        control::CompactionStep::Unspecified => messages.to_vec(),
    }
}

fn apply_clear<S: std::borrow::Borrow<str> + Eq + std::hash::Hash>(
    messages: &[Message],
    call_ids: &HashSet<S>,
) -> Vec<Message> {
    messages
        .iter()
        .map(|message| match message {
            Message::ToolResult {
                call_id,
                tool,
                content,
                is_error,
            } if call_ids.contains(call_id.as_str()) && !content.starts_with(CLEARED_PREFIX) => {
                Message::ToolResult {
                    call_id: call_id.clone(),
                    tool: tool.clone(),
                    content: format!(
                        "{CLEARED_PREFIX}: {tool} returned {} characters here; call it again \
                         if you need them.",
                        content.chars().count()
                    ),
                    is_error: *is_error,
                }
            }
            other => other.clone(),
        })
        .collect()
}

/// Index of the first kept message: the `assistants`-th assistant message
/// (0-based), or the end.
fn tail_start(messages: &[Message], assistants: usize) -> usize {
    messages
        .iter()
        .enumerate()
        .filter(|(_, message)| matches!(message, Message::Assistant { .. }))
        .nth(assistants)
        .map_or(messages.len(), |(index, _)| index)
}

fn is_summary(message: &Message) -> bool {
    matches!(message, Message::User { text } if text.starts_with(SUMMARY_PREFIX))
}

/// The system prompt, every user message before the kept turns (earlier
/// summaries excepted), the summary, then the kept turns.
fn apply_summary(
    messages: &[Message],
    assistants: usize,
    summary: Option<&Message>,
) -> Vec<Message> {
    let tail = tail_start(messages, assistants);
    let mut kept: Vec<Message> = messages[..tail]
        .iter()
        .filter(|message| {
            matches!(message, Message::System { .. } | Message::User { .. }) && !is_summary(message)
        })
        .cloned()
        .collect();
    kept.extend(summary.cloned());
    kept.extend(messages[tail..].iter().cloned());
    kept
}

/// The message a recorded summary becomes.
pub fn summary_message(compaction: &control::Compaction) -> Message {
    Message::User {
        text: format!(
            "{SUMMARY_PREFIX} (turns {} to {}, removed to save context):\n\n{}",
            compaction.first_turn, compaction.last_turn, compaction.summary
        ),
    }
}

/// The summarisation request's messages for the turns a summary of
/// `assistants` assistant messages replaces (earlier summaries included).
pub fn summary_request(messages: &[Message], assistants: usize) -> Vec<Message> {
    let tail = tail_start(messages, assistants);
    let mut transcript = String::new();
    for message in &messages[..tail] {
        let line = match message {
            Message::System { .. } => continue,
            Message::User { text } => format!("user: {}", clip(text)),
            Message::Assistant { text, tool_calls } => {
                let calls: Vec<String> = tool_calls
                    .iter()
                    .map(|call| format!("{}({})", call.tool, clip(&call.arguments_json)))
                    .collect();
                format!("assistant: {} [calls: {}]", clip(text), calls.join(", "))
            }
            Message::ToolResult {
                tool,
                content,
                is_error,
                ..
            } => format!(
                "tool {tool} {}: {}",
                if *is_error { "failed" } else { "returned" },
                clip(content)
            ),
        };
        transcript.push_str(&line);
        transcript.push('\n');
    }
    vec![
        Message::System {
            text: SUMMARY_INSTRUCTIONS.to_owned(),
        },
        Message::User { text: transcript },
    ]
}

fn clip(text: &str) -> String {
    match text.char_indices().nth(RENDERED_MESSAGE_CHARS) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None => text.to_owned(),
    }
}

/// Estimated tokens of `messages` (characters / 4, framing included).
pub fn raw_estimate(messages: &[Message]) -> u64 {
    prompt::estimate_tokens(messages.iter().map(message_chars).sum())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]

    use proptest::prelude::*;

    use super::*;
    use crate::provider::ToolCall;

    /// A turn: the assistant's calls (each with a result of that size),
    /// and whether a user message follows it.
    #[derive(Debug, Clone)]
    struct Turn {
        results: Vec<usize>,
        user_after: bool,
    }

    fn history(turns: &[Turn]) -> Vec<Message> {
        let mut messages = vec![
            Message::System {
                text: "sys".to_owned(),
            },
            Message::User {
                text: "task".to_owned(),
            },
        ];
        for (turn, spec) in turns.iter().enumerate() {
            let calls: Vec<ToolCall> = (0..spec.results.len())
                .map(|n| ToolCall {
                    call_id: format!("c{turn}_{n}"),
                    tool: "read_file".to_owned(),
                    arguments_json: "{}".to_owned(),
                })
                .collect();
            messages.push(Message::Assistant {
                text: format!("turn {turn}"),
                tool_calls: calls.clone(),
            });
            for (call, size) in calls.iter().zip(&spec.results) {
                messages.push(Message::ToolResult {
                    call_id: call.call_id.clone(),
                    tool: call.tool.clone(),
                    content: "x".repeat(*size),
                    is_error: false,
                });
            }
            if spec.user_after {
                messages.push(Message::User {
                    text: format!("more after {turn}"),
                });
            }
        }
        messages
    }

    /// Every tool call is answered right after its assistant message, and
    /// every result answers a call of the assistant message before it.
    fn paired(messages: &[Message]) -> Result<(), String> {
        let mut open: Vec<String> = Vec::new();
        for (index, message) in messages.iter().enumerate() {
            match message {
                Message::Assistant { tool_calls, .. } => {
                    if !open.is_empty() {
                        return Err(format!("calls {open:?} unanswered before {index}"));
                    }
                    open = tool_calls.iter().map(|call| call.call_id.clone()).collect();
                }
                Message::ToolResult { call_id, .. } => {
                    let Some(position) = open.iter().position(|id| id == call_id) else {
                        return Err(format!("result {call_id} at {index} answers no open call"));
                    };
                    open.remove(position);
                }
                Message::User { .. } | Message::System { .. } => {
                    if !open.is_empty() {
                        return Err(format!("calls {open:?} unanswered at {index}"));
                    }
                }
            }
        }
        if open.is_empty() {
            Ok(())
        } else {
            Err(format!("calls {open:?} unanswered at the end"))
        }
    }

    fn recorded(messages: &[Message], decision: &Decision) -> control::Compaction {
        match decision {
            Decision::Clear { call_ids, .. } => control::Compaction {
                step: control::CompactionStep::ClearToolResults.into(),
                cleared_call_ids: call_ids.clone(),
                ..Default::default()
            },
            Decision::Summarise {
                assistant_messages, ..
            } => {
                assert_eq!(summary_request(messages, *assistant_messages).len(), 2);
                control::Compaction {
                    step: control::CompactionStep::Summarise.into(),
                    summary: "what happened".to_owned(),
                    summarised_assistant_messages: u32::try_from(*assistant_messages).unwrap(),
                    first_turn: 1,
                    last_turn: 2,
                    ..Default::default()
                }
            }
        }
    }

    fn turn() -> impl Strategy<Value = Turn> {
        (prop::collection::vec(0_usize..400, 0..4), any::<bool>()).prop_map(
            |(results, user_after)| Turn {
                results,
                user_after,
            },
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(10_000))]

        /// Over random histories, windows and settings, repeated compactions
        /// never separate a tool call from its result, keep every user
        /// message, and never grow the history.
        #[test]
        fn compaction_never_separates_a_call_from_its_result(
            turns in prop::collection::vec(turn(), 0..30),
            window in 50_u64..5_000,
            keep_tool_results in 0_usize..6,
            keep_turns in 0_usize..6,
            force in any::<bool>(),
            rounds in 1_usize..4,
        ) {
            let settings = ContextSettings {
                keep_tool_results,
                keep_turns,
                ..ContextSettings::default()
            };
            let mut messages = history(&turns);
            let users_before: Vec<Message> = messages
                .iter()
                .filter(|message| matches!(message, Message::User { .. }))
                .cloned()
                .collect();
            for _ in 0..rounds {
                let estimate = raw_estimate(&messages);
                let Some(decision) = decide(&messages, estimate, window, &settings, force) else {
                    break;
                };
                let compaction = recorded(&messages, &decision);
                let after = apply(&messages, &compaction);
                prop_assert!(paired(&after).is_ok(), "{:?}", paired(&after));
                prop_assert!(after.len() <= messages.len() + 1);
                prop_assert!(raw_estimate(&after) <= estimate + 64);
                // The task and every later instruction stay.
                for user in &users_before {
                    prop_assert!(after.contains(user), "{user:?} dropped");
                }
                // Replay of the record gives the same history.
                prop_assert_eq!(apply(&messages, &compaction), after.clone());
                messages = after;
            }
        }
    }

    #[test]
    fn below_the_threshold_nothing_happens_and_clearing_comes_first() {
        let turns: Vec<Turn> = (0..6)
            .map(|_| Turn {
                results: vec![2_000],
                user_after: false,
            })
            .collect();
        let messages = history(&turns);
        let estimate = raw_estimate(&messages);
        let settings = ContextSettings::default();
        assert_eq!(
            decide(&messages, estimate, estimate * 2, &settings, false),
            None
        );
        match decide(&messages, estimate, estimate, &settings, false).unwrap() {
            Decision::Clear {
                call_ids,
                tokens_after,
            } => {
                assert_eq!(call_ids, ["c0_0", "c1_0", "c2_0"]);
                assert!(tokens_after < estimate * 8 / 10);
            }
            other => panic!("expected clearing first, got {other:?}"),
        }
    }

    #[test]
    fn when_clearing_is_not_enough_older_turns_are_summarised() {
        let turns: Vec<Turn> = (0..8)
            .map(|_| Turn {
                results: vec![10],
                user_after: true,
            })
            .collect();
        let messages = history(&turns);
        let estimate = raw_estimate(&messages);
        let settings = ContextSettings::default();
        let decision = decide(&messages, estimate, estimate, &settings, false).unwrap();
        assert!(matches!(
            decision,
            Decision::Summarise {
                assistant_messages: 4,
                ..
            }
        ));
        let compaction = recorded(&messages, &decision);
        let after = apply(&messages, &compaction);
        let assistants = after
            .iter()
            .filter(|message| matches!(message, Message::Assistant { .. }))
            .count();
        assert_eq!(assistants, 4);
        assert!(after.iter().any(is_summary));
        // A second summary folds the first into itself.
        let again = apply(
            &after,
            &control::Compaction {
                summarised_assistant_messages: 2,
                ..compaction
            },
        );
        assert_eq!(
            again.iter().filter(|message| is_summary(message)).count(),
            1
        );
    }
}
