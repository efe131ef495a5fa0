//! The scripted provider: deterministic replies read from a TOML file.
//!
//! Used by tests and the offline demo. A script is a list of turns; the Nth
//! model call of a session gets the Nth turn, where N is derived from the
//! conversation itself (the number of assistant messages already in it), so
//! the provider keeps no state and a replayed conversation gets the same
//! replies.
//!
//! ```toml
//! [[turn]]
//! text = "I'll write the file."
//! [[turn.tool-calls]]
//! tool = "write_file"
//! arguments = { path = "notes/hello.txt", content = "hello" }
//!
//! [[turn]]
//! text = "Done."
//! ```

use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::stream;
use serde::Deserialize;

use super::{
    CompletedTurn, Message, ModelProvider, ModelRequest, ModelStream, ModelStreamEvent,
    ProviderError, TokenUsage, ToolCall, estimate_tokens,
};

/// Text is streamed in at most this many deltas, split at word boundaries.
const MAX_DELTAS_PER_TURN: usize = 3;

/// A parsed script file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Script {
    /// The turns, in the order they are replayed.
    #[serde(rename = "turn", default)]
    pub turns: Vec<ScriptedTurn>,
}

/// One scripted assistant turn.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ScriptedTurn {
    /// The assistant text of the turn.
    #[serde(default)]
    pub text: String,
    /// Tool calls the turn requests; none ends the session.
    #[serde(default)]
    pub tool_calls: Vec<ScriptedToolCall>,
}

/// One scripted tool call.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScriptedToolCall {
    /// Tool name.
    pub tool: String,
    /// Arguments; any TOML table, sent to the tool as JSON.
    #[serde(default)]
    pub arguments: toml::Table,
}

/// Why a script file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ScriptError {
    /// The file could not be read.
    #[error("cannot read script {path}")]
    Read {
        /// The script file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a valid script.
    #[error("invalid script {path}")]
    Parse {
        /// The script file.
        path: PathBuf,
        /// What is wrong, with line and column.
        #[source]
        source: Box<toml::de::Error>,
    },
    /// The file has no `[[turn]]`.
    #[error("script {path} has no [[turn]] entries")]
    Empty {
        /// The script file.
        path: PathBuf,
    },
}

/// Replies with the turns of a [`Script`].
#[derive(Debug, Clone)]
pub struct ScriptedProvider {
    script: Arc<Script>,
    source: String,
}

impl ScriptedProvider {
    /// Loads a script file.
    pub fn from_file(path: &Path) -> Result<Self, ScriptError> {
        let text = std::fs::read_to_string(path).map_err(|source| ScriptError::Read {
            path: path.to_owned(),
            source,
        })?;
        let script: Script = toml::from_str(&text).map_err(|source| ScriptError::Parse {
            path: path.to_owned(),
            source: Box::new(source),
        })?;
        if script.turns.is_empty() {
            return Err(ScriptError::Empty {
                path: path.to_owned(),
            });
        }
        Ok(Self::new(script, path.display().to_string()))
    }

    /// Wraps an in-memory script; `source` names it in errors.
    pub fn new(script: Script, source: impl Into<String>) -> Self {
        Self {
            script: Arc::new(script),
            source: source.into(),
        }
    }

    /// The script being replayed.
    pub fn script(&self) -> &Script {
        &self.script
    }
}

impl ModelProvider for ScriptedProvider {
    fn endpoint(&self) -> String {
        format!("scripted {}", self.source)
    }

    fn stream_turn(&self, request: ModelRequest) -> ModelStream {
        if is_summary_request(&request) {
            return Box::pin(stream::iter([Ok(ModelStreamEvent::Completed(
                summary_turn(&request),
            ))]));
        }
        let turns_taken = request
            .messages
            .iter()
            .filter(|message| matches!(message, Message::Assistant { .. }))
            .count()
            + usize::try_from(request.summarised_turns).unwrap_or(usize::MAX);
        let Some(turn) = self.script.turns.get(turns_taken) else {
            return Box::pin(stream::iter([Err(ProviderError::ScriptExhausted {
                turns: self.script.turns.len(),
                script: self.source.clone(),
            })]));
        };
        let completed = complete_turn(turn, turns_taken + 1, &request);
        let mut events: Vec<_> = split_into_deltas(&completed.text, MAX_DELTAS_PER_TURN)
            .into_iter()
            .map(|delta| Ok(ModelStreamEvent::TextDelta(delta.to_owned())))
            .collect();
        events.push(Ok(ModelStreamEvent::Completed(completed)));
        Box::pin(stream::iter(events))
    }
}

fn complete_turn(turn: &ScriptedTurn, turn_number: usize, request: &ModelRequest) -> CompletedTurn {
    let tool_calls: Vec<ToolCall> = turn
        .tool_calls
        .iter()
        .enumerate()
        .map(|(index, call)| ToolCall {
            call_id: format!("call_{turn_number}_{index}"),
            tool: call.tool.clone(),
            arguments_json: toml_to_json(&toml::Value::Table(call.arguments.clone())).to_string(),
        })
        .collect();
    let output_chars = turn.text.chars().count()
        + tool_calls
            .iter()
            .map(|call| call.tool.len() + call.arguments_json.chars().count())
            .sum::<usize>();
    let stop_reason = if tool_calls.is_empty() {
        "end_turn"
    } else {
        "tool_use"
    };
    CompletedTurn {
        text: turn.text.clone(),
        tool_calls,
        usage: TokenUsage {
            input_tokens: estimate_tokens(request_chars(request)),
            output_tokens: estimate_tokens(output_chars),
            cached_input_tokens: 0,
            cache_write_tokens: 0,
        },
        stop_reason: stop_reason.to_owned(),
    }
}

/// A compaction's summarisation request (its instructions are the system
/// prompt), answered apart from the script.
fn is_summary_request(request: &ModelRequest) -> bool {
    matches!(
        request.messages.first(),
        Some(Message::System { text }) if text == crate::compaction::SUMMARY_INSTRUCTIONS
    )
}

/// A deterministic summary: how much it covers and its last line.
fn summary_turn(request: &ModelRequest) -> CompletedTurn {
    let transcript = match request.messages.last() {
        Some(Message::User { text }) => text.as_str(),
        _ => "",
    };
    let lines = transcript.lines().count();
    let last = transcript.lines().last().unwrap_or_default();
    let text = format!(
        "Scripted summary of {lines} lines; the last: {}",
        last.chars().take(120).collect::<String>()
    );
    CompletedTurn {
        usage: TokenUsage {
            input_tokens: estimate_tokens(request_chars(request)),
            output_tokens: estimate_tokens(text.chars().count()),
            ..TokenUsage::default()
        },
        text,
        tool_calls: Vec::new(),
        stop_reason: "end_turn".to_owned(),
    }
}

/// Characters of everything the model is sent: tool definitions and messages.
fn request_chars(request: &ModelRequest) -> usize {
    let tools: usize = request
        .tools
        .iter()
        .map(|tool| {
            tool.name.chars().count()
                + tool.description.chars().count()
                + tool.input_schema.to_string().chars().count()
        })
        .sum();
    let messages: usize = request
        .messages
        .iter()
        .map(|message| match message {
            Message::System { text } | Message::User { text } => text.chars().count(),
            Message::Assistant { text, tool_calls } => {
                text.chars().count()
                    + tool_calls
                        .iter()
                        .map(|call| call.tool.len() + call.arguments_json.chars().count())
                        .sum::<usize>()
            }
            Message::ToolResult { content, .. } => content.chars().count(),
        })
        .sum();
    tools + messages
}

/// Splits `text` at word boundaries into at most `max_deltas` pieces whose
/// concatenation is `text`.
fn split_into_deltas(text: &str, max_deltas: usize) -> Vec<&str> {
    let words: Vec<&str> = text.split_inclusive(' ').collect();
    if words.is_empty() {
        return Vec::new();
    }
    let words_per_delta = words.len().div_ceil(max_deltas.max(1));
    let mut deltas = Vec::new();
    let mut start = 0;
    for chunk in words.chunks(words_per_delta) {
        let len: usize = chunk.iter().map(|word| word.len()).sum();
        deltas.push(&text[start..start + len]);
        start += len;
    }
    deltas
}

/// Converts TOML to JSON; datetimes (which JSON lacks) become strings.
fn toml_to_json(value: &toml::Value) -> serde_json::Value {
    match value {
        toml::Value::String(text) => serde_json::Value::String(text.clone()),
        toml::Value::Integer(number) => serde_json::Value::from(*number),
        toml::Value::Float(number) => serde_json::Value::from(*number),
        toml::Value::Boolean(flag) => serde_json::Value::Bool(*flag),
        toml::Value::Datetime(datetime) => serde_json::Value::String(datetime.to_string()),
        toml::Value::Array(items) => items.iter().map(toml_to_json).collect(),
        toml::Value::Table(table) => serde_json::Value::Object(
            table
                .iter()
                .map(|(key, value)| (key.clone(), toml_to_json(value)))
                .collect(),
        ),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use futures::StreamExt;
    use serde_json::json;

    use super::*;

    const SCRIPT: &str = r#"
        [[turn]]
        text = "Writing the note now."
        [[turn.tool-calls]]
        tool = "write_file"
        arguments = { path = "notes/hello.txt", content = "hi", mode = 420, when = 1979-05-27 }
        [[turn.tool-calls]]
        tool = "list_dir"

        [[turn]]
        text = "All done."
    "#;

    fn provider() -> ScriptedProvider {
        ScriptedProvider::new(toml::from_str(SCRIPT).unwrap(), "test.script.toml")
    }

    fn request(messages: Vec<Message>) -> ModelRequest {
        ModelRequest {
            model: "scripted".to_owned(),
            messages: Arc::new(messages),
            tools: Arc::default(),
            max_output_tokens: None,
            output_schema: None,
            cache: Default::default(),
            summarised_turns: 0,
        }
    }

    async fn collect(provider: &ScriptedProvider, messages: Vec<Message>) -> Vec<ModelStreamEvent> {
        provider
            .stream_turn(request(messages))
            .map(|event| event.expect("scripted turn"))
            .collect()
            .await
    }

    #[tokio::test]
    async fn first_call_replays_the_first_turn_with_deterministic_call_ids() {
        let user = Message::User {
            text: "write a note".to_owned(), // 12 chars → 3 tokens
        };
        let events = collect(&provider(), vec![user]).await;
        let (deltas, completed) = events.split_at(events.len() - 1);
        assert_eq!(
            deltas,
            [
                ModelStreamEvent::TextDelta("Writing the ".to_owned()),
                ModelStreamEvent::TextDelta("note now.".to_owned()),
            ]
        );
        let ModelStreamEvent::Completed(turn) = &completed[0] else {
            panic!("last event is the completed turn: {completed:?}");
        };
        let arguments: Vec<serde_json::Value> = turn
            .tool_calls
            .iter()
            .map(|call| serde_json::from_str(&call.arguments_json).unwrap())
            .collect();
        assert_eq!(
            arguments,
            [
                json!({"path": "notes/hello.txt", "content": "hi", "mode": 420, "when": "1979-05-27"}),
                json!({}),
            ]
        );
        let ids_and_tools: Vec<(&str, &str)> = turn
            .tool_calls
            .iter()
            .map(|call| (call.call_id.as_str(), call.tool.as_str()))
            .collect();
        assert_eq!(
            ids_and_tools,
            [("call_1_0", "write_file"), ("call_1_1", "list_dir")]
        );
        assert_eq!(turn.text, "Writing the note now.");
        assert_eq!(turn.stop_reason, "tool_use");
        assert_eq!(turn.usage.input_tokens, 3);
        let output_chars = "Writing the note now.".len()
            + turn
                .tool_calls
                .iter()
                .map(|call| call.tool.len() + call.arguments_json.len())
                .sum::<usize>();
        assert_eq!(turn.usage.output_tokens, estimate_tokens(output_chars));
    }

    #[tokio::test]
    async fn turn_number_comes_from_the_assistant_messages_in_the_conversation() {
        let assistant = Message::Assistant {
            text: "earlier".to_owned(),
            tool_calls: Vec::new(),
        };
        let events = collect(&provider(), vec![assistant]).await;
        assert_eq!(
            events,
            [
                ModelStreamEvent::TextDelta("All ".to_owned()),
                ModelStreamEvent::TextDelta("done.".to_owned()),
                ModelStreamEvent::Completed(CompletedTurn {
                    text: "All done.".to_owned(),
                    tool_calls: Vec::new(),
                    usage: TokenUsage {
                        input_tokens: 2,
                        output_tokens: 3,
                        cached_input_tokens: 0,
                        cache_write_tokens: 0,
                    },
                    stop_reason: "end_turn".to_owned(),
                }),
            ]
        );
    }

    #[tokio::test]
    async fn running_past_the_script_is_a_typed_error() {
        let assistant = Message::Assistant {
            text: String::new(),
            tool_calls: Vec::new(),
        };
        let mut stream = provider().stream_turn(request(vec![assistant.clone(), assistant]));
        let error = stream
            .next()
            .await
            .unwrap()
            .expect_err("script is exhausted");
        assert_eq!(
            error.to_string(),
            "script exhausted after 2 turns (test.script.toml)"
        );
        assert!(stream.next().await.is_none());
    }

    #[test]
    fn deltas_concatenate_to_the_text() {
        let text = "one two three four five six seven";
        let deltas = split_into_deltas(text, 3);
        assert_eq!(deltas, ["one two three ", "four five six ", "seven"]);
        assert_eq!(split_into_deltas("", 3), Vec::<&str>::new());
    }

    #[test]
    fn unknown_keys_in_a_turn_are_rejected() {
        let error = toml::from_str::<Script>("[[turn]]\ntxt = \"typo\"").unwrap_err();
        assert!(error.to_string().contains("txt"), "{error}");
    }

    #[test]
    fn empty_script_file_is_rejected_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("empty.script.toml");
        std::fs::write(&path, "").unwrap();
        let error = ScriptedProvider::from_file(&path).unwrap_err();
        assert_eq!(
            error.to_string(),
            format!("script {} has no [[turn]] entries", path.display())
        );
    }
}
