//! Anthropic Messages streaming (`message_start` … `message_stop`).

use serde_json::json;

use crate::{FakeStop, FakeTurn, StreamShape, Usage, frame, pieces};

fn event(name: &str, data: &serde_json::Value) -> String {
    frame(Some(name), &data.to_string())
}

/// The SSE events of one turn, `message_start` to `message_stop`.
pub(crate) fn events(
    turn_number: usize,
    turn: &FakeTurn,
    model: &str,
    usage: Usage,
    shape: &StreamShape,
) -> Vec<String> {
    // Anthropic counts cache reads separately from (uncached) input tokens.
    let uncached = usage
        .input_tokens
        .saturating_sub(usage.cached_input_tokens)
        .saturating_sub(usage.cache_write_tokens);
    let mut events = vec![event(
        "message_start",
        &json!({"type": "message_start", "message": {
            "id": format!("msg_fake_{turn_number}"),
            "type": "message",
            "role": "assistant",
            "content": [],
            "model": model,
            "stop_reason": null,
            "stop_sequence": null,
            "usage": {
                "input_tokens": uncached,
                "cache_creation_input_tokens": usage.cache_write_tokens,
                "cache_read_input_tokens": usage.cached_input_tokens,
                "output_tokens": 1,
            },
        }}),
    )];
    let mut index = 0;
    if !turn.text.is_empty() {
        events.push(event(
            "content_block_start",
            &json!({"type": "content_block_start", "index": index, "content_block": {"type": "text", "text": ""}}),
        ));
        events.push(event("ping", &json!({"type": "ping"})));
        for piece in pieces(&turn.text, shape.text_chunk_chars) {
            events.push(event(
                "content_block_delta",
                &json!({"type": "content_block_delta", "index": index, "delta": {"type": "text_delta", "text": piece}}),
            ));
        }
        events.push(event(
            "content_block_stop",
            &json!({"type": "content_block_stop", "index": index}),
        ));
        index += 1;
    }
    for (call_index, call) in turn.tool_calls.iter().enumerate() {
        events.push(event(
            "content_block_start",
            &json!({"type": "content_block_start", "index": index, "content_block": {
                "type": "tool_use",
                "id": format!("toolu_{turn_number}_{call_index}"),
                "name": call.name,
                "input": {},
            }}),
        ));
        // The API opens every tool_use block with an empty partial_json.
        let mut parts = vec![String::new()];
        parts.extend(pieces(&call.arguments, shape.argument_chunk_chars));
        for piece in parts {
            events.push(event(
                "content_block_delta",
                &json!({"type": "content_block_delta", "index": index, "delta": {"type": "input_json_delta", "partial_json": piece}}),
            ));
        }
        events.push(event(
            "content_block_stop",
            &json!({"type": "content_block_stop", "index": index}),
        ));
        index += 1;
    }
    let stop_reason = match turn.stop {
        FakeStop::MaxTokens => "max_tokens",
        FakeStop::PauseTurn => "pause_turn",
        FakeStop::Natural if !turn.tool_calls.is_empty() => "tool_use",
        FakeStop::Natural => "end_turn",
    };
    events.push(event(
        "message_delta",
        &json!({"type": "message_delta", "delta": {"stop_reason": stop_reason, "stop_sequence": null}, "usage": {"output_tokens": usage.output_tokens}}),
    ));
    events.push(event("message_stop", &json!({"type": "message_stop"})));
    events
}
