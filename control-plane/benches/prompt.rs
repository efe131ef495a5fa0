//! Prompt assembly benchmark (a bench binary, not run in CI).
//!
//! ```text
//! cargo bench -p harness-control-plane --bench prompt
//! ```
//!
//! A 200-message history (system prompt, task, then 99 turns of an
//! assistant message with one tool call and a 1,500-character tool result)
//! and 8 tool definitions. Three figures, same run:
//!
//! - **per request**: what the loop does before each model request — the
//!   history index brought up to date with the turn's 2 new messages, then
//!   assembly (section digests, breakpoints, cache-miss check, calibrated
//!   estimate);
//! - **cold**: the same from an empty index (a resumed session's first
//!   request), digesting all 200 messages;
//! - **body (reference)**: encoding the OpenAI-compatible request body for
//!   the same request, which every request pays anyway.
//!
//! Knob: `BENCH_ITERATIONS` (default 2000).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use harness_control_plane::prompt::{self, Calibration, HistoryIndex, StaticPrefix};
use harness_control_plane::provider::{Message, ModelRequest, ToolCall, ToolDefinition, openai};

fn history() -> Vec<Message> {
    let mut messages = vec![
        Message::System {
            text: "You are a careful engineer. ".repeat(40),
        },
        Message::User {
            text: "Audit the repository and report every problem you find. ".repeat(10),
        },
    ];
    for turn in 0..99 {
        let call_id = format!("call_{turn}_0");
        messages.push(Message::Assistant {
            text: format!("Turn {turn}: reading the next file to check it. ").repeat(4),
            tool_calls: vec![ToolCall {
                call_id: call_id.clone(),
                tool: "read_file".to_owned(),
                arguments_json: format!(r#"{{"path":"src/module_{turn}.rs"}}"#),
            }],
        });
        messages.push(Message::ToolResult {
            call_id,
            tool: "read_file".to_owned(),
            content: "fn example() { let value = compute(); }\n".repeat(37),
            is_error: false,
        });
    }
    assert_eq!(messages.len(), 200);
    messages
}

fn tools() -> Vec<ToolDefinition> {
    (0..8)
        .map(|n| ToolDefinition {
            name: format!("tool_{n}"),
            description: "Does one thing to the workspace, described for a model. ".repeat(4),
            input_schema: serde_json::json!({
                "type": "object",
                "properties": {"path": {"type": "string"}, "limit": {"type": "integer"}},
                "required": ["path"],
            }),
        })
        .collect()
}

fn percentile(sorted: &[Duration], percent: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * percent / 100.0).round() as usize;
    sorted[index]
}

fn report(name: &str, mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    let p50 = percentile(&samples, 50.0);
    println!(
        "{name:<22} p50 {:>8.1} µs   p99 {:>8.1} µs   (n={})",
        p50.as_secs_f64() * 1e6,
        percentile(&samples, 99.0).as_secs_f64() * 1e6,
        samples.len()
    );
    p50
}

fn main() {
    let iterations: usize = std::env::var("BENCH_ITERATIONS")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(2000);
    let messages = history();
    let tools = tools();
    let prefix = StaticPrefix::new(
        "auditor",
        "model-x",
        &tools,
        "You are a careful engineer.",
        "",
        "",
    );
    let calibration = Some(Calibration {
        raw_estimate: 10_000,
        measured: 10_400,
    });
    // The previous request: the history without this turn's two messages.
    let mut warm = HistoryIndex::default();
    warm.update(1, &messages[..198]);
    let previous = prompt::assemble(
        &prefix,
        "model-x",
        &warm,
        &messages[..198],
        None,
        calibration,
    )
    .record;

    let mut per_request = Vec::with_capacity(iterations);
    let mut cold = Vec::with_capacity(iterations);
    let mut body = Vec::with_capacity(iterations);
    let shared = Arc::new(messages.clone());
    let tool_list = Arc::new(tools.clone());
    for _ in 0..iterations {
        let mut index = warm.clone();
        let started = Instant::now();
        index.update(1, &messages);
        let assembled = prompt::assemble(
            &prefix,
            "model-x",
            &index,
            &messages,
            Some(&previous),
            calibration,
        );
        per_request.push(started.elapsed());
        assert_eq!(assembled.record.cache_miss_reason, "");

        let started = Instant::now();
        let mut index = HistoryIndex::default();
        index.update(1, &messages);
        let assembled = prompt::assemble(
            &prefix,
            "model-x",
            &index,
            &messages,
            Some(&previous),
            calibration,
        );
        cold.push(started.elapsed());
        std::hint::black_box(&assembled);

        let request = ModelRequest {
            model: "model-x".to_owned(),
            messages: Arc::clone(&shared),
            tools: Arc::clone(&tool_list),
            max_output_tokens: None,
            output_schema: None,
            cache: assembled.cache,
            summarised_turns: 0,
        };
        let started = Instant::now();
        let bytes = serde_json::to_vec(&openai::request_body(&request)).unwrap();
        body.push(started.elapsed());
        std::hint::black_box(bytes);
    }
    let chars: usize = messages
        .iter()
        .map(|message| prompt::message_chars(message) as usize)
        .sum();
    println!("200 messages, {chars} characters, 8 tools");
    let warm_p50 = report("per request", per_request);
    let cold_p50 = report("cold (200 digested)", cold);
    let body_p50 = report("body (reference)", body);
    println!(
        "per request / body: {:.2}x   cold / body: {:.2}x",
        warm_p50.as_secs_f64() / body_p50.as_secs_f64(),
        cold_p50.as_secs_f64() / body_p50.as_secs_f64()
    );
}
