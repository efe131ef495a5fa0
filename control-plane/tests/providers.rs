//! The network providers against fake servers speaking the real wire
//! formats (OpenAI Chat Completions and Anthropic Messages, streaming), with
//! injected faults.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use harness_control_plane::error_report::error_chain;
use harness_control_plane::provider::anthropic::AnthropicFormat;
use harness_control_plane::provider::circuit::BreakerSettings;
use harness_control_plane::provider::http::{HttpProvider, HttpSettings, WireFormat};
use harness_control_plane::provider::openai::OpenAiFormat;
use harness_control_plane::provider::retry::RetryPolicy;
use harness_control_plane::provider::{
    CompletedTurn, Message, ModelProvider, ModelRequest, ModelStreamEvent, ProviderError,
    TokenUsage, ToolCall, ToolDefinition,
};
use harness_fake_model::{FakeModel, FakeStop, FakeTurn, Fault, StreamShape, WireFormat as Wire};
use serde_json::json;

const FORMATS: [Wire; 2] = [Wire::OpenAi, Wire::Anthropic];

fn settings() -> HttpSettings {
    HttpSettings {
        connect_timeout: Duration::from_secs(2),
        response_timeout: Duration::from_secs(5),
        idle_timeout: Duration::from_secs(2),
        retry: RetryPolicy {
            max_attempts: 3,
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(50),
            max_retry_after: Duration::from_secs(5),
        },
        breaker: BreakerSettings {
            failure_threshold: 10,
            cooldown: Duration::from_secs(30),
        },
    }
}

fn provider(model: &FakeModel, format: Wire, settings: HttpSettings) -> HttpProvider {
    let wire: Box<dyn WireFormat> = match format {
        Wire::OpenAi => Box::new(OpenAiFormat),
        Wire::Anthropic => Box::new(AnthropicFormat),
    };
    HttpProvider::new(wire, &model.base_url(), Some("test-key"), settings).unwrap()
}

fn request() -> ModelRequest {
    ModelRequest {
        model: "fake-model".to_owned(),
        messages: Arc::new(vec![
            Message::System {
                text: "Be brief.".to_owned(),
            },
            Message::User {
                text: "What is in a.txt?".to_owned(),
            },
        ]),
        tools: Arc::new(vec![ToolDefinition {
            name: "read_file".to_owned(),
            description: "Reads a file".to_owned(),
            input_schema: json!({"type": "object", "properties": {"path": {"type": "string"}}}),
        }]),
        max_output_tokens: Some(256),
        output_schema: None,
        cache: Default::default(),
        summarised_turns: 0,
    }
}

/// The deltas and the outcome of one model call.
async fn call(provider: &HttpProvider) -> (Vec<String>, Result<CompletedTurn, ProviderError>) {
    let mut stream = provider.stream_turn(request());
    let mut deltas = Vec::new();
    while let Some(item) = stream.next().await {
        match item {
            Ok(ModelStreamEvent::TextDelta(text)) => deltas.push(text),
            Ok(ModelStreamEvent::Completed(turn)) => return (deltas, Ok(turn)),
            Err(error) => return (deltas, Err(error)),
        }
    }
    (deltas, Err(ProviderError::Incomplete))
}

async fn start(format: Wire, script: Vec<FakeTurn>) -> FakeModel {
    FakeModel::start(format, script).await.unwrap()
}

fn tool_call(id: &str, tool: &str, arguments: &str) -> ToolCall {
    ToolCall {
        call_id: id.to_owned(),
        tool: tool.to_owned(),
        arguments_json: arguments.to_owned(),
    }
}

fn call_id(format: Wire, index: usize) -> String {
    match format {
        Wire::OpenAi => format!("call_1_{index}"),
        Wire::Anthropic => format!("toolu_1_{index}"),
    }
}

#[tokio::test]
async fn text_only_turns_stream_deltas_and_complete_with_usage() {
    for format in FORMATS {
        let model = start(format, vec![FakeTurn::text("The file says hello.")]).await;
        let provider = provider(&model, format, settings());
        let (deltas, turn) = call(&provider).await;
        let turn = turn.unwrap();
        assert_eq!(deltas, ["The file", " says he", "llo."], "{format:?}");
        assert_eq!(turn.text, "The file says hello.");
        assert_eq!(
            (turn.tool_calls.len(), turn.stop_reason.as_str()),
            (0, "end_turn")
        );
        let body_len = serde_json::to_vec(&model.requests()[0].body).unwrap().len();
        assert!(turn.usage.input_tokens > 0, "{format:?}");
        assert!(
            turn.usage
                .input_tokens
                .abs_diff((body_len as u64).div_ceil(4))
                < 10,
            "{format:?}: input tokens track the request size"
        );
        assert_eq!(turn.usage.output_tokens, 5);
    }
}

#[tokio::test]
async fn requests_carry_the_credential_the_version_and_the_conversation() {
    let model = start(Wire::OpenAi, vec![FakeTurn::text("ok")]).await;
    call(&provider(&model, Wire::OpenAi, settings()))
        .await
        .1
        .unwrap();
    let sent = &model.requests()[0];
    assert_eq!(sent.credential.as_deref(), Some("Bearer test-key"));
    assert_eq!(
        sent.body["messages"],
        json!([
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is in a.txt?"},
        ])
    );
    assert_eq!(sent.body["tools"][0]["function"]["name"], "read_file");
    assert_eq!(sent.body["stream_options"], json!({"include_usage": true}));

    let model = start(Wire::Anthropic, vec![FakeTurn::text("ok")]).await;
    call(&provider(&model, Wire::Anthropic, settings()))
        .await
        .1
        .unwrap();
    let sent = &model.requests()[0];
    assert_eq!(
        (
            sent.credential.as_deref(),
            sent.anthropic_version.as_deref()
        ),
        (Some("test-key"), Some("2023-06-01"))
    );
    assert_eq!(sent.body["max_tokens"], 256);
    assert_eq!(sent.body["system"][0]["text"], "Be brief.");
    assert_eq!(sent.body["tools"][0]["name"], "read_file");
}

#[tokio::test]
async fn one_tool_call_is_assembled() {
    for format in FORMATS {
        let script = vec![FakeTurn::text("Reading.").with_call("read_file", r#"{"path":"a.txt"}"#)];
        let model = start(format, script).await;
        let (_, turn) = call(&provider(&model, format, settings())).await;
        let turn = turn.unwrap();
        assert_eq!(
            turn.tool_calls,
            [tool_call(
                &call_id(format, 0),
                "read_file",
                r#"{"path":"a.txt"}"#
            )],
            "{format:?}"
        );
        assert_eq!(turn.stop_reason, "tool_use");
    }
}

#[tokio::test]
async fn parallel_tool_calls_split_across_chunks_are_assembled_in_order() {
    for format in FORMATS {
        let script = vec![
            FakeTurn::text("Three reads.")
                .with_call("read_file", r#"{"path":"a.txt"}"#)
                .with_call("read_file", r#"{"path":"some/longer/name.txt"}"#)
                .with_call("list_dir", r#"{}"#),
        ];
        let model = start(format, script).await;
        // Three characters per piece; OpenAI pieces of different calls interleaved.
        model.set_shape(StreamShape {
            argument_chunk_chars: 3,
            interleave_tool_calls: true,
            ..StreamShape::default()
        });
        let (_, turn) = call(&provider(&model, format, settings())).await;
        assert_eq!(
            turn.unwrap().tool_calls,
            [
                tool_call(&call_id(format, 0), "read_file", r#"{"path":"a.txt"}"#),
                tool_call(
                    &call_id(format, 1),
                    "read_file",
                    r#"{"path":"some/longer/name.txt"}"#
                ),
                tool_call(&call_id(format, 2), "list_dir", "{}"),
            ],
            "{format:?}"
        );
    }
}

#[tokio::test]
async fn cached_prompt_tokens_are_reported() {
    for format in FORMATS {
        let model = start(format, vec![FakeTurn::text("ok").with_cached_tokens(40)]).await;
        let (_, turn) = call(&provider(&model, format, settings())).await;
        let usage: TokenUsage = turn.unwrap().usage;
        assert_eq!(usage.cached_input_tokens, 40, "{format:?}");
        assert!(
            usage.input_tokens > 40,
            "{format:?}: cached tokens are part of the input"
        );
    }
}

#[tokio::test]
async fn a_429_with_retry_after_is_retried_after_the_wait() {
    for format in FORMATS {
        let model = start(format, vec![FakeTurn::text("Finally.")]).await;
        model.push_fault(Fault::Status {
            code: 429,
            retry_after: Some("1".to_owned()),
        });
        let started = Instant::now();
        let (deltas, turn) = call(&provider(&model, format, settings())).await;
        assert_eq!(turn.unwrap().text, "Finally.", "{format:?}");
        assert_eq!(deltas.concat(), "Finally.");
        assert!(
            started.elapsed() >= Duration::from_secs(1),
            "{format:?}: Retry-After honoured, waited {:?}",
            started.elapsed()
        );
        assert_eq!(model.requests().len(), 2);
    }
}

#[tokio::test]
async fn a_stream_broken_mid_way_is_retried_without_repeating_text() {
    for format in FORMATS {
        let text = "A long answer that streams in many pieces.";
        let model = start(format, vec![FakeTurn::text(text)]).await;
        model.push_fault(Fault::DisconnectAfter { events: 4 });
        let (deltas, turn) = call(&provider(&model, format, settings())).await;
        assert_eq!(turn.unwrap().text, text, "{format:?}");
        assert_eq!(deltas.concat(), text, "{format:?}: no text delivered twice");
        assert_eq!(model.requests().len(), 2);
    }
}

#[tokio::test]
async fn a_mid_stream_error_event_is_retried() {
    for format in FORMATS {
        let model = start(format, vec![FakeTurn::text("Recovered answer.")]).await;
        model.push_fault(Fault::StreamError { after: 3 });
        let (deltas, turn) = call(&provider(&model, format, settings())).await;
        assert_eq!(turn.unwrap().text, "Recovered answer.", "{format:?}");
        assert_eq!(deltas.concat(), "Recovered answer.");
        assert_eq!(model.requests().len(), 2, "{format:?}");
    }
}

#[tokio::test]
async fn a_malformed_chunk_is_retried() {
    for format in FORMATS {
        let model = start(format, vec![FakeTurn::text("Clean the second time.")]).await;
        model.push_fault(Fault::MalformedEvent { after: 2 });
        let (deltas, turn) = call(&provider(&model, format, settings())).await;
        assert_eq!(turn.unwrap().text, "Clean the second time.", "{format:?}");
        assert_eq!(deltas.concat(), "Clean the second time.");
        assert_eq!(model.requests().len(), 2, "{format:?}");
    }
}

#[tokio::test]
async fn malformed_tool_arguments_reach_the_caller_verbatim() {
    for format in FORMATS {
        let broken = r#"{"path": "a.txt"#;
        let model = start(
            format,
            vec![FakeTurn::text("Oops.").with_call("read_file", broken)],
        )
        .await;
        let (_, turn) = call(&provider(&model, format, settings())).await;
        assert_eq!(
            turn.unwrap().tool_calls,
            [tool_call(&call_id(format, 0), "read_file", broken)],
            "{format:?}: the loop turns it into an invalid_input result"
        );
    }
}

#[tokio::test]
async fn max_tokens_and_pause_turn_stop_reasons_are_normalised() {
    for format in FORMATS {
        let model = start(
            format,
            vec![FakeTurn::text("Cut off mid").stopping(FakeStop::MaxTokens)],
        )
        .await;
        let (_, turn) = call(&provider(&model, format, settings())).await;
        let turn = turn.unwrap();
        assert_eq!(
            (turn.text.as_str(), turn.stop_reason.as_str()),
            ("Cut off mid", "max_tokens"),
            "{format:?}"
        );
    }
    let model = start(
        Wire::Anthropic,
        vec![FakeTurn::text("Searching…").stopping(FakeStop::PauseTurn)],
    )
    .await;
    let (_, turn) = call(&provider(&model, Wire::Anthropic, settings())).await;
    assert_eq!(turn.unwrap().stop_reason, "pause_turn");
}

#[tokio::test]
async fn client_errors_are_not_retried_and_say_what_the_provider_said() {
    for format in FORMATS {
        let model = start(format, vec![FakeTurn::text("never")]).await;
        model.push_fault(Fault::Status {
            code: 401,
            retry_after: None,
        });
        let (_, turn) = call(&provider(&model, format, settings())).await;
        let error = turn.unwrap_err();
        assert_eq!(
            error_chain(&error),
            format!(
                "{} {} answered HTTP 401: injected status 401",
                match format {
                    Wire::OpenAi => "openai",
                    Wire::Anthropic => "anthropic",
                },
                model.base_url()
            )
        );
        assert_eq!(model.requests().len(), 1);
    }
}

#[tokio::test]
async fn when_retries_run_out_the_error_names_the_attempts_and_the_last_failure() {
    let model = start(Wire::OpenAi, vec![FakeTurn::text("never")]).await;
    for _ in 0..3 {
        model.push_fault(Fault::Status {
            code: 503,
            retry_after: None,
        });
    }
    let (_, turn) = call(&provider(&model, Wire::OpenAi, settings())).await;
    let error = turn.unwrap_err();
    let endpoint = format!("openai {}", model.base_url());
    assert_eq!(
        error_chain(&error),
        format!(
            "model call to {endpoint} failed after 3 attempts: {endpoint} answered HTTP 503: injected status 503"
        )
    );
    assert_eq!(model.requests().len(), 3);
}

#[tokio::test]
async fn a_retry_after_beyond_the_limit_fails_at_once() {
    let model = start(Wire::Anthropic, vec![FakeTurn::text("never")]).await;
    model.push_fault(Fault::Status {
        code: 429,
        retry_after: Some("3600".to_owned()),
    });
    let (_, turn) = call(&provider(&model, Wire::Anthropic, settings())).await;
    assert!(
        matches!(
            turn,
            Err(ProviderError::RetryAfterTooLong { retry_after, .. }) if retry_after == Duration::from_secs(3600)
        ),
        "{turn:?}"
    );
    assert_eq!(model.requests().len(), 1);
}

#[tokio::test]
async fn an_idle_stream_times_out_and_is_retried() {
    let model = start(Wire::OpenAi, vec![FakeTurn::text("Slowly but surely.")]).await;
    model.set_shape(StreamShape {
        event_delay: Duration::from_millis(400),
        ..StreamShape::default()
    });
    let impatient = HttpSettings {
        idle_timeout: Duration::from_millis(100),
        retry: RetryPolicy {
            max_attempts: 2,
            ..settings().retry
        },
        ..settings()
    };
    let (_, turn) = call(&provider(&model, Wire::OpenAi, impatient)).await;
    let error = turn.unwrap_err();
    assert!(
        error_chain(&error)
            .ends_with("sent nothing for 0.1s while waiting for the next stream chunk"),
        "{}",
        error_chain(&error)
    );
    assert_eq!(model.requests().len(), 2);
}

#[tokio::test]
async fn the_circuit_breaker_opens_after_repeated_failures_and_fails_fast() {
    let model = start(Wire::OpenAi, vec![FakeTurn::text("ok")]).await;
    for _ in 0..2 {
        model.push_fault(Fault::Status {
            code: 500,
            retry_after: None,
        });
    }
    let fragile = HttpSettings {
        retry: RetryPolicy {
            max_attempts: 1,
            ..settings().retry
        },
        breaker: BreakerSettings {
            failure_threshold: 2,
            cooldown: Duration::from_secs(60),
        },
        ..settings()
    };
    let provider = provider(&model, Wire::OpenAi, fragile);
    for _ in 0..2 {
        let (_, turn) = call(&provider).await;
        assert!(matches!(turn, Err(ProviderError::RetriesExhausted { .. })));
    }
    // Open: the next call fails without reaching the server.
    let (_, turn) = call(&provider).await;
    let error = turn.unwrap_err();
    assert!(
        error_chain(&error).contains("circuit breaker for openai"),
        "{}",
        error_chain(&error)
    );
    assert_eq!(model.requests().len(), 2);
}

#[tokio::test]
async fn an_unreachable_endpoint_is_a_clear_error() {
    let model = start(Wire::OpenAi, vec![]).await;
    let base_url = model.base_url();
    drop(model);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let provider = HttpProvider::new(Box::new(OpenAiFormat), &base_url, None, settings()).unwrap();
    let (_, turn) = call(&provider).await;
    let error = turn.unwrap_err();
    let chain = error_chain(&error);
    assert!(
        chain.starts_with(&format!(
            "model call to openai {base_url} failed after 3 attempts: cannot reach openai {base_url}"
        )),
        "{chain}"
    );
}
