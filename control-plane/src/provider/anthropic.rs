//! Anthropic Messages, streaming (`POST {base}/v1/messages`).
//!
//! Text arrives as `text_delta`s, tool calls as `tool_use` content blocks
//! whose input streams as `input_json_delta` pieces. Stop reasons include
//! `max_tokens` and `pause_turn`. `cache_control` breakpoints go where the
//! prompt assembly put them (tools, system, stable history, newest input),
//! so the prefix is served from the prompt cache; cache reads are reported
//! as cached input tokens and cache writes as cache-write tokens.

use std::collections::BTreeMap;

use reqwest::header::HeaderName;
use serde_json::{Value, json};

use super::http::{Parsed, StreamProblem, TurnParser, WireFormat, parse_json};
use super::sse::SseEvent;
use super::{CompletedTurn, FINAL_ANSWER_TOOL, Message, ModelRequest, TokenUsage, ToolCall};
use crate::prompt::Breakpoint;

/// Default base URL.
pub const DEFAULT_BASE_URL: &str = "https://api.anthropic.com";
/// The API version sent in `anthropic-version`.
pub const API_VERSION: &str = "2023-06-01";
/// `max_tokens` when the agent sets none (the API requires one).
pub const DEFAULT_MAX_TOKENS: u32 = 4096;

/// The Messages wire format.
#[derive(Debug, Clone, Copy, Default)]
pub struct AnthropicFormat;

impl WireFormat for AnthropicFormat {
    fn name(&self) -> &'static str {
        "anthropic"
    }

    fn url(&self, base_url: &str) -> String {
        format!("{}/v1/messages", base_url.trim_end_matches('/'))
    }

    fn headers(&self, api_key: Option<&str>) -> Vec<(HeaderName, String)> {
        let mut headers = vec![(
            HeaderName::from_static("anthropic-version"),
            API_VERSION.to_owned(),
        )];
        if let Some(key) = api_key {
            headers.push((HeaderName::from_static("x-api-key"), key.to_owned()));
        }
        headers
    }

    fn body(&self, request: &ModelRequest) -> Result<Vec<u8>, serde_json::Error> {
        serde_json::to_vec(&request_body(request))
    }

    fn parser(&self) -> Box<dyn TurnParser> {
        Box::new(AnthropicParser::default())
    }

    fn complete(&self, request: &ModelRequest, turn: CompletedTurn) -> CompletedTurn {
        answer_from_final_tool(request, turn)
    }
}

/// With structured output, the final answer arrives as a call of
/// [`FINAL_ANSWER_TOOL`]: its input becomes the turn's text, and the turn
/// ends as a plain answer would (the call is not the loop's to run).
fn answer_from_final_tool(request: &ModelRequest, mut turn: CompletedTurn) -> CompletedTurn {
    if request.output_schema.is_none() {
        return turn;
    }
    let Some(index) = turn
        .tool_calls
        .iter()
        .position(|call| call.tool == FINAL_ANSWER_TOOL)
    else {
        return turn;
    };
    let answer = turn.tool_calls.remove(index);
    if turn.tool_calls.is_empty() {
        turn.text = answer.arguments_json;
        turn.stop_reason = super::STOP_END_TURN.to_owned();
    }
    turn
}

fn ephemeral() -> Value {
    json!({"type": "ephemeral"})
}

/// The request body, with `cache_control` at the breakpoints the prompt
/// assembly chose (see [`crate::prompt`]).
pub fn request_body(request: &ModelRequest) -> Value {
    let breaks = |point: Breakpoint| request.cache.breakpoints.contains(&point);
    let mut system: Vec<Value> = request
        .messages
        .iter()
        .filter_map(|message| match message {
            Message::System { text } => Some(json!({"type": "text", "text": text})),
            _ => None,
        })
        .collect();
    if breaks(Breakpoint::System) {
        mark_last(&mut system);
    }
    let mut messages: Vec<Value> = Vec::new();
    for (index, message) in request.messages.iter().enumerate() {
        let (role, blocks) = match message {
            Message::System { .. } => continue,
            Message::User { text } => ("user", vec![json!({"type": "text", "text": text})]),
            Message::Assistant { text, tool_calls } => {
                let mut blocks = Vec::new();
                if !text.is_empty() {
                    blocks.push(json!({"type": "text", "text": text}));
                }
                for call in tool_calls {
                    blocks.push(json!({
                        "type": "tool_use",
                        "id": call.call_id,
                        "name": call.tool,
                        "input": tool_input(&call.arguments_json),
                    }));
                }
                ("assistant", blocks)
            }
            Message::ToolResult {
                call_id,
                content,
                is_error,
                ..
            } => (
                "user",
                vec![json!({
                    "type": "tool_result",
                    "tool_use_id": call_id,
                    "content": content,
                    "is_error": is_error,
                })],
            ),
        };
        if !blocks.is_empty() {
            // Consecutive messages of one role (tool results, then a notice)
            // become one message with several blocks.
            match messages.last_mut() {
                Some(last) if last["role"] == role => {
                    if let Some(content) = last["content"].as_array_mut() {
                        content.extend(blocks);
                    }
                }
                _ => messages.push(json!({"role": role, "content": blocks})),
            }
        }
        if breaks(Breakpoint::Message(index))
            && let Some(content) = messages
                .last_mut()
                .and_then(|message| message["content"].as_array_mut())
        {
            mark_last(content);
        }
    }
    let mut body = json!({
        "model": request.model,
        "max_tokens": request.max_output_tokens.unwrap_or(DEFAULT_MAX_TOKENS),
        "stream": true,
    });
    let mut tools: Vec<Value> = request
        .tools
        .iter()
        .map(|tool| {
            json!({
                "name": tool.name,
                "description": tool.description,
                "input_schema": tool.input_schema,
            })
        })
        .collect();
    if let Some(schema) = &request.output_schema {
        // The answer is forced through a tool: the one tool when there are
        // no others, else any tool (the model works, then answers with it).
        body["tool_choice"] = if tools.is_empty() {
            json!({"type": "tool", "name": FINAL_ANSWER_TOOL})
        } else {
            json!({"type": "any"})
        };
        tools.push(json!({
            "name": FINAL_ANSWER_TOOL,
            "description": "Give your final answer: call this once you are done, with the \
                            answer as its input. Nothing else runs after it.",
            "input_schema": **schema,
        }));
    }
    if breaks(Breakpoint::Tools) {
        mark_last(&mut tools);
    }
    if !tools.is_empty() {
        body["tools"] = Value::Array(tools);
    }
    if !system.is_empty() {
        body["system"] = Value::Array(system);
    }
    body["messages"] = Value::Array(messages);
    body
}

/// Ends a cached prefix at the last of `blocks`.
fn mark_last(blocks: &mut [Value]) {
    if let Some(block) = blocks.last_mut() {
        block["cache_control"] = ephemeral();
    }
}

/// A tool_use block's input must be an object: arguments that are not a
/// JSON object (the model produced malformed JSON) are sent as `{}`; the
/// tool result tells the model what was wrong.
fn tool_input(arguments_json: &str) -> Value {
    match serde_json::from_str::<Value>(arguments_json) {
        Ok(value @ Value::Object(_)) => value,
        _ => json!({}),
    }
}

#[derive(Debug)]
enum Block {
    Text,
    ToolUse {
        id: String,
        name: String,
        /// The input from `content_block_start` (used if no deltas follow).
        initial: Value,
        partial_json: String,
    },
    /// Thinking, server tools, …: not passed to the loop.
    Other,
}

/// Assembles a streamed Messages turn.
#[derive(Debug, Default)]
struct AnthropicParser {
    text: String,
    blocks: BTreeMap<u64, Block>,
    input_tokens: u64,
    cache_read_tokens: u64,
    cache_creation_tokens: u64,
    output_tokens: u64,
    stop_reason: Option<String>,
    started: bool,
}

fn index_of(event: &Value) -> Result<u64, StreamProblem> {
    event["index"].as_u64().ok_or_else(|| {
        StreamProblem::Malformed(format!("content block event without index: {event}"))
    })
}

impl AnthropicParser {
    fn usage(&mut self, usage: &Value) {
        if let Some(tokens) = usage["input_tokens"].as_u64() {
            self.input_tokens = tokens;
        }
        if let Some(tokens) = usage["cache_read_input_tokens"].as_u64() {
            self.cache_read_tokens = tokens;
        }
        if let Some(tokens) = usage["cache_creation_input_tokens"].as_u64() {
            self.cache_creation_tokens = tokens;
        }
        if let Some(tokens) = usage["output_tokens"].as_u64() {
            self.output_tokens = tokens;
        }
    }
}

impl TurnParser for AnthropicParser {
    fn event(&mut self, event: &SseEvent) -> Result<Parsed, StreamProblem> {
        let value = parse_json(&event.data)?;
        let kind = value["type"]
            .as_str()
            .or(event.event.as_deref())
            .unwrap_or_default()
            .to_owned();
        match kind.as_str() {
            "message_start" => {
                self.started = true;
                self.usage(&value["message"]["usage"]);
            }
            "content_block_start" => {
                let index = index_of(&value)?;
                let block = &value["content_block"];
                let parsed = match block["type"].as_str() {
                    Some("text") => {
                        let text = block["text"].as_str().unwrap_or_default();
                        self.blocks.insert(index, Block::Text);
                        if !text.is_empty() {
                            self.text.push_str(text);
                            return Ok(Parsed::Text(text.to_owned()));
                        }
                        return Ok(Parsed::Nothing);
                    }
                    Some("tool_use") => Block::ToolUse {
                        id: block["id"].as_str().unwrap_or_default().to_owned(),
                        name: block["name"].as_str().unwrap_or_default().to_owned(),
                        initial: block["input"].clone(),
                        partial_json: String::new(),
                    },
                    _ => Block::Other,
                };
                self.blocks.insert(index, parsed);
            }
            "content_block_delta" => {
                let index = index_of(&value)?;
                let delta = &value["delta"];
                match (delta["type"].as_str(), self.blocks.get_mut(&index)) {
                    (Some("text_delta"), Some(Block::Text)) => {
                        let text = delta["text"].as_str().unwrap_or_default();
                        self.text.push_str(text);
                        if !text.is_empty() {
                            return Ok(Parsed::Text(text.to_owned()));
                        }
                    }
                    (Some("input_json_delta"), Some(Block::ToolUse { partial_json, .. })) => {
                        partial_json.push_str(delta["partial_json"].as_str().unwrap_or_default());
                    }
                    (_, None) => {
                        return Err(StreamProblem::Malformed(format!(
                            "delta for content block {index}, which was never started"
                        )));
                    }
                    _ => {}
                }
            }
            "message_delta" => {
                if let Some(reason) = value["delta"]["stop_reason"].as_str() {
                    self.stop_reason = Some(reason.to_owned());
                }
                self.usage(&value["usage"]);
            }
            "message_stop" => return Ok(Parsed::Done),
            "error" => {
                return Err(StreamProblem::ProviderError {
                    kind: value["error"]["type"]
                        .as_str()
                        .unwrap_or("error")
                        .to_owned(),
                    message: value["error"]["message"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned(),
                });
            }
            // ping, content_block_stop, and event types added later.
            _ => {}
        }
        Ok(Parsed::Nothing)
    }

    fn finish(self: Box<Self>) -> Result<CompletedTurn, StreamProblem> {
        let (Some(stop_reason), true) = (self.stop_reason, self.started) else {
            return Err(StreamProblem::Incomplete);
        };
        let tool_calls = self
            .blocks
            .into_values()
            .filter_map(|block| match block {
                Block::ToolUse {
                    id,
                    name,
                    initial,
                    partial_json,
                } => Some(ToolCall {
                    call_id: id,
                    tool: name,
                    arguments_json: if partial_json.is_empty() {
                        match initial {
                            Value::Null => "{}".to_owned(),
                            value => value.to_string(),
                        }
                    } else {
                        partial_json
                    },
                }),
                Block::Text | Block::Other => None,
            })
            .collect();
        Ok(CompletedTurn {
            text: self.text,
            tool_calls,
            usage: TokenUsage {
                // The API counts cache reads and writes apart from the rest
                // of the prompt; the loop counts all prompt tokens as input.
                input_tokens: self.input_tokens
                    + self.cache_read_tokens
                    + self.cache_creation_tokens,
                output_tokens: self.output_tokens,
                cached_input_tokens: self.cache_read_tokens,
                cache_write_tokens: self.cache_creation_tokens,
            },
            stop_reason,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::provider::ToolDefinition;

    fn event(name: &str, data: Value) -> SseEvent {
        SseEvent {
            event: Some(name.to_owned()),
            data: data.to_string(),
        }
    }

    #[test]
    fn tool_use_input_assembles_from_json_deltas_and_usage_adds_cache_reads() {
        let mut parser: Box<dyn TurnParser> = Box::new(AnthropicParser::default());
        let events = [
            event(
                "message_start",
                json!({"type": "message_start", "message": {"usage": {"input_tokens": 10, "cache_read_input_tokens": 90, "cache_creation_input_tokens": 0, "output_tokens": 1}}}),
            ),
            event(
                "content_block_start",
                json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
            ),
            event(
                "content_block_delta",
                json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Reading."}}),
            ),
            event(
                "content_block_start",
                json!({"type": "content_block_start", "index": 1, "content_block": {"type": "tool_use", "id": "toolu_1", "name": "read", "input": {}}}),
            ),
            event(
                "content_block_delta",
                json!({"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": "{\"path\": "}}),
            ),
            event(
                "content_block_delta",
                json!({"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": "\"a\"}"}}),
            ),
            event("ping", json!({"type": "ping"})),
            event(
                "message_delta",
                json!({"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 12}}),
            ),
        ];
        let parsed: Vec<Parsed> = events.iter().map(|e| parser.event(e).unwrap()).collect();
        assert_eq!(parsed[2], Parsed::Text("Reading.".to_owned()));
        assert_eq!(
            parser
                .event(&event("message_stop", json!({"type": "message_stop"})))
                .unwrap(),
            Parsed::Done
        );
        assert_eq!(
            parser.finish().unwrap(),
            CompletedTurn {
                text: "Reading.".to_owned(),
                tool_calls: vec![ToolCall {
                    call_id: "toolu_1".to_owned(),
                    tool: "read".to_owned(),
                    arguments_json: "{\"path\": \"a\"}".to_owned(),
                }],
                usage: TokenUsage {
                    input_tokens: 100,
                    output_tokens: 12,
                    cached_input_tokens: 90,
                    cache_write_tokens: 0,
                },
                stop_reason: "tool_use".to_owned(),
            }
        );
    }

    #[test]
    fn error_events_are_reported_and_a_cut_stream_is_incomplete() {
        let mut parser = AnthropicParser::default();
        assert_eq!(
            parser.event(&event(
                "error",
                json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
            )),
            Err(StreamProblem::ProviderError {
                kind: "overloaded_error".to_owned(),
                message: "Overloaded".to_owned()
            })
        );
        let parser: Box<dyn TurnParser> = Box::new(AnthropicParser::default());
        assert_eq!(parser.finish().unwrap_err(), StreamProblem::Incomplete);
    }

    #[test]
    fn request_body_merges_tool_results_and_marks_cache_breakpoints() {
        let request = ModelRequest {
            model: "claude-test".to_owned(),
            messages: std::sync::Arc::new(vec![
                Message::System {
                    text: "Be brief.".to_owned(),
                },
                Message::User {
                    text: "go".to_owned(),
                },
                Message::Assistant {
                    text: "Two reads.".to_owned(),
                    tool_calls: vec![
                        ToolCall {
                            call_id: "t1".to_owned(),
                            tool: "read".to_owned(),
                            arguments_json: "{\"path\":\"a\"}".to_owned(),
                        },
                        ToolCall {
                            call_id: "t2".to_owned(),
                            tool: "read".to_owned(),
                            arguments_json: "{\"path\":".to_owned(),
                        },
                    ],
                },
                Message::ToolResult {
                    call_id: "t1".to_owned(),
                    tool: "read".to_owned(),
                    content: "{}".to_owned(),
                    is_error: false,
                },
                Message::ToolResult {
                    call_id: "t2".to_owned(),
                    tool: "read".to_owned(),
                    content: "invalid_input: not JSON".to_owned(),
                    is_error: true,
                },
            ]),
            tools: std::sync::Arc::new(vec![ToolDefinition {
                name: "read".to_owned(),
                description: "Reads".to_owned(),
                input_schema: json!({"type": "object"}),
            }]),
            max_output_tokens: None,
            output_schema: None,
            cache: Default::default(),
            summarised_turns: 0,
        };
        let stable = crate::prompt::stable_messages(&request.messages);
        let mut request = request;
        request.cache.breakpoints = crate::prompt::breakpoints(true, &request.messages, stable);
        let body = request_body(&request);
        assert_eq!(
            body["system"],
            json!([{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}])
        );
        assert_eq!(body["max_tokens"], json!(DEFAULT_MAX_TOKENS));
        assert_eq!(
            body["messages"],
            json!([
                {"role": "user", "content": [{"type": "text", "text": "go"}]},
                {"role": "assistant", "content": [
                    {"type": "text", "text": "Two reads."},
                    {"type": "tool_use", "id": "t1", "name": "read", "input": {"path": "a"}},
                    {"type": "tool_use", "id": "t2", "name": "read", "input": {}, "cache_control": {"type": "ephemeral"}},
                ]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "t1", "content": "{}", "is_error": false},
                    {"type": "tool_result", "tool_use_id": "t2", "content": "invalid_input: not JSON", "is_error": true, "cache_control": {"type": "ephemeral"}},
                ]},
            ])
        );
        assert_eq!(
            body["tools"],
            json!([{"name": "read", "description": "Reads", "input_schema": {"type": "object"}, "cache_control": {"type": "ephemeral"}}])
        );
    }
}
