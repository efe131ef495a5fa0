//! OpenAI Chat Completions streaming (`chat.completion.chunk` events).

use serde_json::{Value, json};

use crate::{FakeStop, FakeTurn, StreamShape, Usage, frame, pieces};

fn chunk(turn_number: usize, model: &str, delta: Value, finish_reason: Value) -> String {
    let chunk = json!({
        "id": format!("chatcmpl-fake-{turn_number}"),
        "object": "chat.completion.chunk",
        "created": 1_700_000_000,
        "model": model,
        "system_fingerprint": "fp_fake",
        "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish_reason}],
    });
    frame(None, &chunk.to_string())
}

/// The SSE events of one turn, ending with the usage chunk and `[DONE]`.
pub(crate) fn events(
    turn_number: usize,
    turn: &FakeTurn,
    model: &str,
    usage: Usage,
    shape: &StreamShape,
) -> Vec<String> {
    let mut events = vec![chunk(
        turn_number,
        model,
        json!({"role": "assistant", "content": ""}),
        Value::Null,
    )];
    for piece in pieces(&turn.text, shape.text_chunk_chars) {
        events.push(chunk(
            turn_number,
            model,
            json!({"content": piece}),
            Value::Null,
        ));
    }
    let call_pieces: Vec<Vec<String>> = turn
        .tool_calls
        .iter()
        .map(|call| pieces(&call.arguments, shape.argument_chunk_chars))
        .collect();
    let argument_chunk = |index: usize, piece: &str| {
        chunk(
            turn_number,
            model,
            json!({"tool_calls": [{"index": index, "function": {"arguments": piece}}]}),
            Value::Null,
        )
    };
    let opening_chunk = |index: usize, name: &str| {
        chunk(
            turn_number,
            model,
            json!({"tool_calls": [{
                "index": index,
                "id": format!("call_{turn_number}_{index}"),
                "type": "function",
                "function": {"name": name, "arguments": ""},
            }]}),
            Value::Null,
        )
    };
    if shape.interleave_tool_calls {
        for (index, call) in turn.tool_calls.iter().enumerate() {
            events.push(opening_chunk(index, &call.name));
        }
        let longest = call_pieces.iter().map(Vec::len).max().unwrap_or(0);
        for round in 0..longest {
            for (index, pieces) in call_pieces.iter().enumerate() {
                if let Some(piece) = pieces.get(round) {
                    events.push(argument_chunk(index, piece));
                }
            }
        }
    } else {
        for (index, call) in turn.tool_calls.iter().enumerate() {
            events.push(opening_chunk(index, &call.name));
            for piece in &call_pieces[index] {
                events.push(argument_chunk(index, piece));
            }
        }
    }
    let finish_reason = match turn.stop {
        FakeStop::MaxTokens => "length",
        _ if !turn.tool_calls.is_empty() => "tool_calls",
        _ => "stop",
    };
    events.push(chunk(turn_number, model, json!({}), json!(finish_reason)));
    let usage = json!({
        "id": format!("chatcmpl-fake-{turn_number}"),
        "object": "chat.completion.chunk",
        "created": 1_700_000_000,
        "model": model,
        "choices": [],
        "usage": {
            "prompt_tokens": usage.input_tokens,
            "completion_tokens": usage.output_tokens,
            "total_tokens": usage.input_tokens + usage.output_tokens,
            "prompt_tokens_details": {"cached_tokens": usage.cached_input_tokens},
        },
    });
    events.push(frame(None, &usage.to_string()));
    events.push(frame(None, "[DONE]"));
    events
}
