//! OpenAI-compatible Chat Completions, streaming (`POST {base}/chat/completions`).
//!
//! Works with OpenAI and the servers that copy its API (vLLM, Ollama,
//! llama.cpp, LiteLLM). Tool calls arrive as `tool_calls` deltas keyed by
//! `index`, possibly interleaved; they are assembled per index. Usage comes
//! in a final chunk (`stream_options.include_usage`), including
//! `prompt_tokens_details.cached_tokens`.

use std::collections::BTreeMap;

use reqwest::header::{AUTHORIZATION, HeaderName};
use serde_json::{Value, json};

use super::http::{Parsed, StreamProblem, TurnParser, WireFormat, parse_json};
use super::sse::SseEvent;
use super::{
    CompletedTurn, FINAL_ANSWER_TOOL, Message, ModelRequest, STOP_END_TURN, STOP_MAX_TOKENS,
    STOP_TOOL_USE, TokenUsage, ToolCall,
};

/// Default base URL.
pub const DEFAULT_BASE_URL: &str = "https://api.openai.com/v1";

/// The Chat Completions wire format.
#[derive(Debug, Clone, Copy, Default)]
pub struct OpenAiFormat;

impl WireFormat for OpenAiFormat {
    fn name(&self) -> &'static str {
        "openai"
    }

    fn url(&self, base_url: &str) -> String {
        format!("{}/chat/completions", base_url.trim_end_matches('/'))
    }

    fn headers(&self, api_key: Option<&str>) -> Vec<(HeaderName, String)> {
        api_key
            .map(|key| (AUTHORIZATION, format!("Bearer {key}")))
            .into_iter()
            .collect()
    }

    fn body(&self, request: &ModelRequest) -> Result<Vec<u8>, serde_json::Error> {
        serde_json::to_vec(&request_body(request))
    }

    fn parser(&self) -> Box<dyn TurnParser> {
        Box::new(OpenAiParser::default())
    }
}

/// The request body. Tools keep the agent's order and the conversation only
/// grows at its end, so providers' prompt caches see the same prefix every
/// turn.
pub fn request_body(request: &ModelRequest) -> Value {
    let messages: Vec<Value> = request.messages.iter().map(message).collect();
    let mut body = json!({
        "model": request.model,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    if !request.tools.is_empty() {
        let tools: Vec<Value> = request
            .tools
            .iter()
            .map(|tool| {
                json!({
                    "type": "function",
                    "function": {
                        "name": tool.name,
                        "description": tool.description,
                        "parameters": tool.input_schema,
                    },
                })
            })
            .collect();
        body["tools"] = Value::Array(tools);
    }
    body["messages"] = Value::Array(messages);
    if let Some(max_tokens) = request.max_output_tokens {
        body["max_tokens"] = json!(max_tokens);
    }
    if !request.cache.key.is_empty() {
        body["prompt_cache_key"] = json!(request.cache.key);
    }
    if let Some(schema) = &request.output_schema {
        body["response_format"] = json!({
            "type": "json_schema",
            "json_schema": {"name": FINAL_ANSWER_TOOL, "schema": **schema},
        });
    }
    body
}

fn message(message: &Message) -> Value {
    match message {
        Message::System { text } => json!({"role": "system", "content": text}),
        Message::User { text } => json!({"role": "user", "content": text}),
        Message::Assistant { text, tool_calls } => {
            let mut value = json!({
                "role": "assistant",
                "content": if text.is_empty() { Value::Null } else { json!(text) },
            });
            if !tool_calls.is_empty() {
                let calls: Vec<Value> = tool_calls
                    .iter()
                    .map(|call| {
                        json!({
                            "id": call.call_id,
                            "type": "function",
                            "function": {"name": call.tool, "arguments": call.arguments_json},
                        })
                    })
                    .collect();
                value["tool_calls"] = Value::Array(calls);
            }
            value
        }
        Message::ToolResult {
            call_id, content, ..
        } => json!({"role": "tool", "tool_call_id": call_id, "content": content}),
    }
}

#[derive(Debug, Default)]
struct PartialCall {
    id: String,
    name: String,
    arguments: String,
}

/// Assembles a streamed Chat Completions turn.
#[derive(Debug, Default)]
struct OpenAiParser {
    text: String,
    calls: BTreeMap<u64, PartialCall>,
    finish_reason: Option<String>,
    usage: Option<TokenUsage>,
    done: bool,
}

impl TurnParser for OpenAiParser {
    fn event(&mut self, event: &SseEvent) -> Result<Parsed, StreamProblem> {
        let data = event.data.trim();
        if data == "[DONE]" {
            self.done = true;
            return Ok(Parsed::Done);
        }
        let chunk = parse_json(data)?;
        if let Some(error) = chunk.get("error").filter(|error| !error.is_null()) {
            return Err(StreamProblem::ProviderError {
                kind: error["type"]
                    .as_str()
                    .or_else(|| error["code"].as_str())
                    .unwrap_or("error")
                    .to_owned(),
                message: error["message"].as_str().unwrap_or_default().to_owned(),
            });
        }
        if let Some(usage) = chunk.get("usage").filter(|usage| usage.is_object()) {
            self.usage = Some(TokenUsage {
                input_tokens: usage["prompt_tokens"].as_u64().unwrap_or(0),
                output_tokens: usage["completion_tokens"].as_u64().unwrap_or(0),
                cached_input_tokens: usage["prompt_tokens_details"]["cached_tokens"]
                    .as_u64()
                    .unwrap_or(0),
                cache_write_tokens: 0,
            });
        }
        let Some(choice) = chunk["choices"]
            .as_array()
            .and_then(|choices| choices.first())
        else {
            return Ok(Parsed::Nothing);
        };
        if let Some(reason) = choice["finish_reason"].as_str() {
            self.finish_reason = Some(reason.to_owned());
        }
        let delta = &choice["delta"];
        if let Some(calls) = delta["tool_calls"].as_array() {
            for call in calls {
                let index = call["index"].as_u64().ok_or_else(|| {
                    StreamProblem::Malformed(format!("tool_calls delta without index: {call}"))
                })?;
                let partial = self.calls.entry(index).or_default();
                if let Some(id) = call["id"].as_str() {
                    partial.id = id.to_owned();
                }
                if let Some(name) = call["function"]["name"].as_str() {
                    partial.name.push_str(name);
                }
                if let Some(arguments) = call["function"]["arguments"].as_str() {
                    partial.arguments.push_str(arguments);
                }
            }
        }
        match delta["content"].as_str() {
            Some(text) if !text.is_empty() => {
                self.text.push_str(text);
                Ok(Parsed::Text(text.to_owned()))
            }
            _ => Ok(Parsed::Nothing),
        }
    }

    fn finish(self: Box<Self>) -> Result<CompletedTurn, StreamProblem> {
        let Some(finish_reason) = self.finish_reason else {
            return Err(StreamProblem::Incomplete);
        };
        let tool_calls: Vec<ToolCall> = self
            .calls
            .into_iter()
            .map(|(index, call)| ToolCall {
                call_id: if call.id.is_empty() {
                    format!("call_{index}")
                } else {
                    call.id
                },
                tool: call.name,
                arguments_json: call.arguments,
            })
            .collect();
        let stop_reason = match finish_reason.as_str() {
            "stop" if tool_calls.is_empty() => STOP_END_TURN,
            "tool_calls" | "function_call" | "stop" => STOP_TOOL_USE,
            "length" => STOP_MAX_TOKENS,
            other => other,
        };
        Ok(CompletedTurn {
            text: self.text,
            tool_calls,
            usage: self.usage.unwrap_or_default(),
            stop_reason: stop_reason.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::provider::ToolDefinition;

    fn data(json: &str) -> SseEvent {
        SseEvent {
            event: None,
            data: json.to_owned(),
        }
    }

    #[test]
    fn interleaved_tool_call_deltas_are_assembled_by_index() {
        let mut parser: Box<dyn TurnParser> = Box::new(OpenAiParser::default());
        let events = [
            r#"{"choices":[{"index":0,"delta":{"role":"assistant","content":"Hi"},"finish_reason":null}]}"#,
            r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":1,"id":"b","type":"function","function":{"name":"list","arguments":""}}]}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"a","type":"function","function":{"name":"read","arguments":"{\"pa"}}]}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":1,"function":{"arguments":"{}"}}]}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"th\":1}"}}]}}]}"#,
            r#"{"choices":[{"index":0,"delta":{},"finish_reason":"tool_calls"}]}"#,
            r#"{"choices":[],"usage":{"prompt_tokens":20,"completion_tokens":5,"prompt_tokens_details":{"cached_tokens":8}}}"#,
        ];
        let parsed: Vec<Parsed> = events
            .iter()
            .map(|json| parser.event(&data(json)).unwrap())
            .collect();
        assert_eq!(parsed[0], Parsed::Text("Hi".to_owned()));
        assert_eq!(parser.event(&data("[DONE]")).unwrap(), Parsed::Done);
        assert_eq!(
            parser.finish().unwrap(),
            CompletedTurn {
                text: "Hi".to_owned(),
                tool_calls: vec![
                    ToolCall {
                        call_id: "a".to_owned(),
                        tool: "read".to_owned(),
                        arguments_json: r#"{"path":1}"#.to_owned(),
                    },
                    ToolCall {
                        call_id: "b".to_owned(),
                        tool: "list".to_owned(),
                        arguments_json: "{}".to_owned(),
                    },
                ],
                usage: TokenUsage {
                    input_tokens: 20,
                    output_tokens: 5,
                    cached_input_tokens: 8,
                    cache_write_tokens: 0,
                },
                stop_reason: "tool_use".to_owned(),
            }
        );
    }

    #[test]
    fn a_stream_without_finish_reason_is_incomplete() {
        let mut parser: Box<dyn TurnParser> = Box::new(OpenAiParser::default());
        parser
            .event(&data(
                r#"{"choices":[{"index":0,"delta":{"content":"cut"}}]}"#,
            ))
            .unwrap();
        assert_eq!(parser.finish().unwrap_err(), StreamProblem::Incomplete);
    }

    #[test]
    fn error_chunks_and_garbage_are_reported() {
        let mut parser = OpenAiParser::default();
        assert_eq!(
            parser.event(&data(
                r#"{"error":{"message":"boom","type":"server_error"}}"#
            )),
            Err(StreamProblem::ProviderError {
                kind: "server_error".to_owned(),
                message: "boom".to_owned()
            })
        );
        assert!(matches!(
            parser.event(&data("{not json")),
            Err(StreamProblem::Malformed(_))
        ));
    }

    #[test]
    fn request_body_maps_every_role_and_the_tools() {
        let request = ModelRequest {
            model: "gpt-test".to_owned(),
            messages: std::sync::Arc::new(vec![
                Message::System {
                    text: "Be brief.".to_owned(),
                },
                Message::User {
                    text: "go".to_owned(),
                },
                Message::Assistant {
                    text: String::new(),
                    tool_calls: vec![ToolCall {
                        call_id: "c1".to_owned(),
                        tool: "read".to_owned(),
                        arguments_json: "{\"path\":\"a\"}".to_owned(),
                    }],
                },
                Message::ToolResult {
                    call_id: "c1".to_owned(),
                    tool: "read".to_owned(),
                    content: "{}".to_owned(),
                    is_error: false,
                },
            ]),
            tools: std::sync::Arc::new(vec![ToolDefinition {
                name: "read".to_owned(),
                description: "Reads".to_owned(),
                input_schema: json!({"type": "object"}),
            }]),
            max_output_tokens: Some(100),
            output_schema: None,
            cache: Default::default(),
            summarised_turns: 0,
        };
        let body = request_body(&request);
        assert_eq!(
            (&body["model"], &body["stream"], &body["max_tokens"]),
            (&json!("gpt-test"), &json!(true), &json!(100))
        );
        assert_eq!(body["stream_options"], json!({"include_usage": true}));
        assert_eq!(
            body["messages"],
            json!([
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "go"},
                {"role": "assistant", "content": null, "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "read", "arguments": "{\"path\":\"a\"}"}}
                ]},
                {"role": "tool", "tool_call_id": "c1", "content": "{}"},
            ])
        );
        assert_eq!(
            body["tools"][0]["function"],
            json!({"name": "read", "description": "Reads", "parameters": {"type": "object"}})
        );
    }
}
