//! The receipt: what a parent learns of a finished child, built by the
//! harness from the child's event log, never from its prose.
//!
//! It holds the child's final text, stop reason, the tool calls it made
//! (name, ok or not), the files it wrote (size and SHA-256 as found in its
//! workspace when it finished) and its usage. It is the one tool result the
//! parent's model gets for a delegation: none of the child's intermediate
//! results reach the parent.
//!
//! **Claims are checked.** A line of the final text that says the child
//! wrote, created or saved a file names paths; each must be one of the
//! files its `write_file` / `edit_file` calls wrote, or the receipt's
//! status is `completed_with_errors` with a problem naming it. Files
//! written through `exec` are not seen (a claim of one is reported), which
//! errs on the side of a person checking.

use harness_proto::control::v1 as control;
use harness_proto::control::v1::session_event::Kind;

use crate::event;

/// Tools whose successful calls write the file named by their `path`.
pub const WRITE_TOOLS: [&str; 2] = ["write_file", "edit_file"];

/// Words that make a line a claim of having written files.
const CLAIM_WORDS: [&str; 8] = [
    "wrote", "written", "write", "writes", "created", "create", "saved", "save",
];

/// Words that end the part of a line a claim's paths are taken from
/// ("wrote a.md after reading b.md" claims only a.md).
const CLAIM_ENDS: [&str; 8] = [
    "after", "from", "reading", "read", "using", "based", "because", "than",
];

/// One tool call of the child.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CallSummary {
    /// The tool.
    pub tool: String,
    /// It returned output (not an error).
    pub ok: bool,
}

/// What a parent gets back from one delegation.
#[derive(Debug, Clone, PartialEq)]
pub struct Receipt {
    /// The child's session.
    pub child_session_id: String,
    /// The subagent.
    pub agent: String,
    /// The verdict.
    pub status: control::ReceiptStatus,
    /// Why the child stopped.
    pub stop_reason: control::StopReason,
    /// Its final (or partial) answer.
    pub final_text: String,
    /// What its `finished` event said (errors, budget, escalation reason).
    pub message: String,
    /// Its tool calls, in order.
    pub tool_calls: Vec<CallSummary>,
    /// The files it wrote.
    pub files: Vec<control::WrittenFile>,
    /// What the checks found wrong.
    pub problems: Vec<String>,
    /// What it used.
    pub usage: control::BudgetUsage,
}

/// Folds a child's events into its receipt, one at a time (a log can be
/// long; only what the receipt needs is kept). A session's loop keeps one
/// as it applies its events, so the receipt of a child that ended here is
/// built without reading its log again.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct ReceiptBuilder {
    /// Write calls requested and not finished yet: (call id, arguments).
    requested: Vec<(String, String)>,
    calls: Vec<CallSummary>,
    written: Vec<String>,
    finished: Option<control::SessionFinished>,
}

impl ReceiptBuilder {
    /// Takes in one event of the child's log.
    pub fn apply(&mut self, kind: &Kind) {
        match kind {
            Kind::ToolCallRequested(requested)
                if WRITE_TOOLS.contains(&requested.tool.as_str()) =>
            {
                self.requested
                    .push((requested.call_id.clone(), requested.arguments_json.clone()));
            }
            Kind::ToolFinished(finished) => {
                let output = match &finished.outcome {
                    Some(control::tool_finished::Outcome::OutputJson(json)) => Some(json),
                    _ => None,
                };
                self.calls.push(CallSummary {
                    tool: finished.tool.clone(),
                    ok: output.is_some(),
                });
                let arguments = self
                    .requested
                    .iter()
                    .position(|(id, _)| *id == finished.call_id)
                    .map(|at| self.requested.swap_remove(at).1);
                if let Some(output) = output
                    && let Some(path) = written_path(&finished.tool, output, arguments.as_deref())
                    && !self.written.contains(&path)
                {
                    self.written.push(path);
                }
            }
            Kind::Finished(finished) => self.finished = Some(finished.clone()),
            _ => {}
        }
    }

    /// Forgets the measured wall clock, for comparing the builders of two
    /// runs that should agree on everything else.
    #[cfg(test)]
    pub fn clear_wall_clock(&mut self) {
        if let Some(usage) = self.finished.as_mut().and_then(|f| f.usage.as_mut()) {
            usage.wall_clock = None;
        }
    }

    /// The paths the child's successful write calls wrote, in order.
    pub fn written_paths(&self) -> &[String] {
        &self.written
    }

    /// The receipt; `None` until the child's `finished` is in.
    pub fn build(&self, child_session_id: &str, agent: &str) -> Option<Receipt> {
        let finished = self.finished.clone()?;
        let stop_reason = finished.stop_reason();
        let files = finished.files_written.clone();
        let mut problems = Vec::new();
        for claimed in claimed_paths(&finished.final_output) {
            if !files.iter().any(|file| file.path == claimed) {
                problems.push(format!(
                    "the final text claims {claimed} was written, but no write_file or edit_file \
                     call of the subagent wrote it"
                ));
            }
        }
        for path in &self.written {
            if !files.iter().any(|file| &file.path == path) {
                problems.push(format!(
                    "{path} was written but is no longer in the workspace"
                ));
            }
        }
        let status = if stop_reason != control::StopReason::Completed {
            control::ReceiptStatus::Failed
        } else if problems.is_empty() {
            control::ReceiptStatus::Completed
        } else {
            control::ReceiptStatus::CompletedWithErrors
        };
        Some(Receipt {
            child_session_id: child_session_id.to_owned(),
            agent: agent.to_owned(),
            status,
            stop_reason,
            final_text: finished.final_output,
            message: finished.message,
            tool_calls: self.calls.clone(),
            files,
            problems,
            usage: finished.usage.unwrap_or_default(),
        })
    }
}

impl Receipt {
    /// The tool result the parent's model gets, as JSON text.
    pub fn to_json(&self) -> String {
        let files: Vec<serde_json::Value> = self
            .files
            .iter()
            .map(|file| {
                serde_json::json!({"path": file.path, "size": file.size, "sha256": file.sha256})
            })
            .collect();
        let mut receipt = serde_json::json!({
            "subagent": self.agent,
            "session_id": self.child_session_id,
            "status": event::enum_label(self.status.as_str_name(), "RECEIPT_STATUS_"),
            "stop_reason": event::stop_reason_label(self.stop_reason),
            "final_text": self.final_text,
            "tool_calls": self.tool_calls,
            "files": files,
            "usage": {
                "turns": self.usage.turns,
                "tool_calls": self.usage.tool_calls,
                "input_tokens": self.usage.input_tokens,
                "output_tokens": self.usage.output_tokens,
                "cost_micros": self.usage.cost_micros,
            },
        });
        if !self.message.is_empty() {
            receipt["message"] = self.message.clone().into();
        }
        if !self.problems.is_empty() {
            receipt["problems"] = self.problems.clone().into();
        }
        receipt.to_string()
    }

    /// The parent's `subagent_finished` event for call `call_id`.
    pub fn to_event(&self, call_id: &str) -> control::SubagentFinished {
        control::SubagentFinished {
            child_session_id: self.child_session_id.clone(),
            stop_reason: self.stop_reason.into(),
            output: self.final_text.clone(),
            call_id: call_id.to_owned(),
            usage: Some(self.usage),
            status: self.status.into(),
            files: self.files.clone(),
            problems: self.problems.clone(),
        }
    }
}

/// A workspace path as tools and receipts compare it: relative, without
/// `./` or the `/workspace/` mount point.
pub fn normalise(path: &str) -> String {
    let path = path.trim();
    let path = path.strip_prefix("/workspace/").unwrap_or(path);
    let mut path = path;
    while let Some(rest) = path.strip_prefix("./") {
        path = rest;
    }
    path.trim_start_matches('/').to_owned()
}

/// The path a successful call of `tool` wrote, if it is a write tool: its
/// output's `path` (the tool's normalised form), else the one it was asked
/// for (`arguments_json`).
pub fn written_path(tool: &str, output_json: &str, arguments_json: Option<&str>) -> Option<String> {
    if !WRITE_TOOLS.contains(&tool) {
        return None;
    }
    let from_output = serde_json::from_str::<serde_json::Value>(output_json)
        .ok()
        .and_then(|output| output["path"].as_str().map(str::to_owned));
    let from_arguments = || {
        let arguments: serde_json::Value = serde_json::from_str(arguments_json?).ok()?;
        arguments["path"].as_str().map(str::to_owned)
    };
    from_output
        .or_else(from_arguments)
        .map(|path| normalise(&path))
}

/// The paths a text claims were written (see the module docs).
pub fn claimed_paths(text: &str) -> Vec<String> {
    let mut claimed = Vec::new();
    for line in text.lines() {
        let mut claiming = false;
        for word in line.split_whitespace() {
            let quotes = |c: char| "`'\"()[]{}<>,;:!?*".contains(c);
            let bare = word
                .trim_matches(quotes)
                .trim_end_matches('.')
                .trim_matches(quotes);
            let lower = bare.to_ascii_lowercase();
            if CLAIM_WORDS.contains(&lower.as_str()) {
                claiming = true;
                continue;
            }
            if CLAIM_ENDS.contains(&lower.as_str()) {
                claiming = false;
                continue;
            }
            if claiming && looks_like_path(bare) {
                let path = normalise(bare);
                if !claimed.contains(&path) {
                    claimed.push(path);
                }
            }
            if word.ends_with([',', ';']) {
                claiming = false;
            }
        }
    }
    claimed
}

/// A file path: has a `/` or an extension, and is not a URL or a number.
fn looks_like_path(word: &str) -> bool {
    if word.is_empty() || word.contains("://") || word.starts_with('-') {
        return false;
    }
    let valid = word
        .chars()
        .all(|c| c.is_alphanumeric() || "._-/".contains(c));
    let file_name = word.rsplit('/').next().unwrap_or(word);
    let has_extension = file_name.rsplit_once('.').is_some_and(|(stem, extension)| {
        !stem.is_empty()
            && (1..=8).contains(&extension.len())
            && extension.chars().any(|c| c.is_ascii_alphabetic())
    });
    valid && (has_extension || (word.contains('/') && !file_name.is_empty()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn requested(call_id: &str, tool: &str, arguments: &str) -> Kind {
        Kind::ToolCallRequested(control::ToolCallRequested {
            call_id: call_id.to_owned(),
            tool: tool.to_owned(),
            arguments_json: arguments.to_owned(),
        })
    }

    fn finished_ok(call_id: &str, tool: &str, output: &str) -> Kind {
        Kind::ToolFinished(control::ToolFinished {
            call_id: call_id.to_owned(),
            tool: tool.to_owned(),
            outcome: Some(control::tool_finished::Outcome::OutputJson(
                output.to_owned(),
            )),
            ..Default::default()
        })
    }

    fn file(path: &str, size: u64) -> control::WrittenFile {
        control::WrittenFile {
            path: path.to_owned(),
            size,
            sha256: format!("sha-of-{path}"),
        }
    }

    fn end(reason: control::StopReason, text: &str, files: Vec<control::WrittenFile>) -> Kind {
        Kind::Finished(control::SessionFinished {
            stop_reason: reason.into(),
            final_output: text.to_owned(),
            message: String::new(),
            usage: Some(control::BudgetUsage {
                turns: 2,
                tool_calls: 2,
                input_tokens: 50,
                output_tokens: 7,
                ..Default::default()
            }),
            files_written: files,
        })
    }

    fn build(events: &[Kind]) -> Receipt {
        let mut builder = ReceiptBuilder::default();
        for kind in events {
            builder.apply(kind);
        }
        builder.build("child-1", "researcher").unwrap()
    }

    #[test]
    fn the_receipt_lists_calls_files_usage_and_stop_reason() {
        let events = [
            requested(
                "c1",
                "write_file",
                r#"{"path":"./notes/a.md","content":"x"}"#,
            ),
            finished_ok("c1", "write_file", r#"{"bytes_written":1}"#),
            requested("c2", "read_file", r#"{"path":"missing.md"}"#),
            Kind::ToolFinished(control::ToolFinished {
                call_id: "c2".to_owned(),
                tool: "read_file".to_owned(),
                outcome: Some(control::tool_finished::Outcome::Error(
                    control::ToolCallError {
                        kind: control::ToolErrorKind::NotFound.into(),
                        message: "no such file".to_owned(),
                    },
                )),
                ..Default::default()
            }),
            end(
                control::StopReason::Completed,
                "I wrote notes/a.md after reading brief.md.",
                vec![file("notes/a.md", 1)],
            ),
        ];
        let receipt = build(&events);
        assert_eq!(
            receipt,
            Receipt {
                child_session_id: "child-1".to_owned(),
                agent: "researcher".to_owned(),
                status: control::ReceiptStatus::Completed,
                stop_reason: control::StopReason::Completed,
                final_text: "I wrote notes/a.md after reading brief.md.".to_owned(),
                message: String::new(),
                tool_calls: vec![
                    CallSummary {
                        tool: "write_file".to_owned(),
                        ok: true
                    },
                    CallSummary {
                        tool: "read_file".to_owned(),
                        ok: false
                    },
                ],
                files: vec![file("notes/a.md", 1)],
                problems: Vec::new(),
                usage: control::BudgetUsage {
                    turns: 2,
                    tool_calls: 2,
                    input_tokens: 50,
                    output_tokens: 7,
                    ..Default::default()
                },
            }
        );
        let json: serde_json::Value = serde_json::from_str(&receipt.to_json()).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "subagent": "researcher",
                "session_id": "child-1",
                "status": "completed",
                "stop_reason": "completed",
                "final_text": "I wrote notes/a.md after reading brief.md.",
                "tool_calls": [{"tool": "write_file", "ok": true}, {"tool": "read_file", "ok": false}],
                "files": [{"path": "notes/a.md", "size": 1, "sha256": "sha-of-notes/a.md"}],
                "usage": {"turns": 2, "tool_calls": 2, "input_tokens": 50, "output_tokens": 7, "cost_micros": 0},
            })
        );
    }

    #[test]
    fn a_claimed_unwritten_file_is_completed_with_errors() {
        let receipt = build(&[end(
            control::StopReason::Completed,
            "Review done. I saved the findings to `review.md`.",
            Vec::new(),
        )]);
        assert_eq!(receipt.status, control::ReceiptStatus::CompletedWithErrors);
        assert_eq!(
            receipt.problems,
            [
                "the final text claims review.md was written, but no write_file or edit_file call \
              of the subagent wrote it"
            ]
        );
    }

    #[test]
    fn a_child_that_did_not_complete_fails() {
        let receipt = build(&[end(
            control::StopReason::BudgetExhausted,
            "Partial.",
            Vec::new(),
        )]);
        assert_eq!(receipt.status, control::ReceiptStatus::Failed);
        assert_eq!(receipt.stop_reason, control::StopReason::BudgetExhausted);
    }

    #[test]
    fn written_paths_come_from_successful_writes_only() {
        let mut builder = ReceiptBuilder::default();
        for kind in [
            requested("a", "write_file", r#"{"path":"/workspace/out/x.txt"}"#),
            finished_ok("a", "write_file", r#"{"bytes_written":3}"#),
            requested("b", "edit_file", r#"{"path":"y.rs"}"#),
            finished_ok("b", "edit_file", r#"{"path":"src/y.rs","replacements":1}"#),
            requested("c", "read_file", r#"{"path":"z.md"}"#),
            finished_ok("c", "read_file", r#"{"content":""}"#),
            requested("d", "write_file", r#"{"path":"out/x.txt"}"#),
            finished_ok("d", "write_file", r#"{"bytes_written":4}"#),
        ] {
            builder.apply(&kind);
        }
        assert_eq!(builder.written_paths(), ["out/x.txt", "src/y.rs"]);
    }

    #[test]
    fn claims_name_paths_after_a_write_word_in_the_same_clause() {
        assert_eq!(
            claimed_paths(
                "Created notes/a.md and report.txt, then checked main.rs.\n\
                 Nothing else: see https://example.com/x.md or version 1.2.\n\
                 The summary was written to ./out/summary.md"
            ),
            ["notes/a.md", "report.txt", "out/summary.md"]
        );
    }
}
