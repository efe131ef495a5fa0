//! Structured output on both wire formats: the schema reaches the provider
//! (OpenAI `response_format`, an Anthropic forced tool), a mismatching
//! answer goes back to the model, and the session ends with the matching
//! one.

use harness_fake_model::{FakeModel, FakeTurn, WireFormat};
use harness_proto::control::v1 as control;
use harness_proto::control::v1::session_event::Kind;
use serde_json::{Value, json};

use crate::support::{Sockets, TestPlane, describe};

const SCHEMA: &str = r#"{"type":"object","properties":{"severity":{"enum":["low","high"]}},"required":["severity"]}"#;

async fn run(
    format: WireFormat,
    turns: Vec<FakeTurn>,
    extra: &str,
) -> (FakeModel, Vec<control::SessionEvent>) {
    let provider = match format {
        WireFormat::OpenAi => "openai",
        WireFormat::Anthropic => "anthropic",
    };
    let model = FakeModel::start(format, turns).await.unwrap();
    let agent = format!(
        "name = \"rater\"\nprovider = \"{provider}\"\nmodel = \"fake\"\nbase-url = \"{}\"\n\
         system-prompt = \"Rate it.\"\noutput-schema = \"rating.schema.json\"\n{extra}",
        model.base_url()
    );
    let plane = TestPlane::start_with_agents(
        Sockets::Tcp,
        &[("rater.toml", &agent), ("rating.schema.json", SCHEMA)],
    )
    .await;
    let session = plane
        .client
        .clone()
        .start_session(control::StartSessionRequest {
            agent: "rater".to_owned(),
            input: "The site is down.".to_owned(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .session
        .unwrap();
    let events = plane.events(&session.session_id, 0).await;
    plane.shut_down().await;
    (model, events)
}

fn finished(events: &[control::SessionEvent]) -> control::SessionFinished {
    match &events.last().unwrap().kind {
        Some(Kind::Finished(finished)) => finished.clone(),
        _ => panic!("no finished event"),
    }
}

fn schema() -> Value {
    serde_json::from_str(SCHEMA).unwrap()
}

#[tokio::test]
async fn openai_gets_a_response_format_and_a_mismatch_goes_back_to_the_model() {
    let (model, events) = run(
        WireFormat::OpenAi,
        vec![
            FakeTurn::text("It is urgent."),
            FakeTurn::text(r#"{"severity":"high"}"#),
        ],
        "",
    )
    .await;
    let finished = finished(&events);
    assert_eq!(
        (finished.stop_reason(), finished.final_output.as_str()),
        (control::StopReason::Completed, r#"{"severity":"high"}"#)
    );
    let requests = model.requests();
    assert_eq!(requests.len(), 2);
    assert_eq!(
        requests[0].body["response_format"],
        json!({"type": "json_schema", "json_schema": {"name": "final_answer", "schema": schema()}})
    );
    let notice = requests[1].body["messages"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone();
    assert_eq!(notice["role"], "user");
    let text = notice["content"].as_str().unwrap();
    assert!(
        text.starts_with("[harness] Your final answer does not match the required output schema: the answer is not JSON"),
        "{text}"
    );
    let described: Vec<String> = events.iter().map(describe).collect();
    assert_eq!(
        described
            .iter()
            .filter(|line| line.contains("output_rejected 1 the answer is not JSON"))
            .count(),
        1,
        "{described:#?}"
    );
}

#[tokio::test]
async fn anthropic_answers_through_a_forced_tool() {
    let (model, events) = run(
        WireFormat::Anthropic,
        vec![
            FakeTurn::text("").with_call("final_answer", r#"{"severity":"urgent"}"#),
            FakeTurn::text("").with_call("final_answer", r#"{"severity":"low"}"#),
        ],
        "",
    )
    .await;
    let finished = finished(&events);
    assert_eq!(
        (finished.stop_reason(), finished.final_output.as_str()),
        (control::StopReason::Completed, r#"{"severity":"low"}"#)
    );
    let requests = model.requests();
    assert_eq!(requests.len(), 2);
    let body = &requests[0].body;
    assert_eq!(
        body["tool_choice"],
        json!({"type": "tool", "name": "final_answer"})
    );
    assert_eq!(body["tools"][0]["name"], "final_answer");
    assert_eq!(body["tools"][0]["input_schema"], schema());
    // The rejected answer is in the history as the assistant's text (the
    // end of the stable history, so a cache breakpoint); the rejection
    // follows it.
    let messages = requests[1].body["messages"].as_array().unwrap();
    assert_eq!(
        messages[1]["content"][0],
        json!({"type": "text", "text": r#"{"severity":"urgent"}"#, "cache_control": {"type": "ephemeral"}})
    );
    let notice = messages[2]["content"][0]["text"].as_str().unwrap();
    assert!(
        notice.contains(r#"at /severity: "urgent" is not one of "low" or "high""#),
        "{notice}"
    );
    // No tool call was recorded or dispatched for the answer.
    assert!(
        !events
            .iter()
            .any(|event| matches!(event.kind, Some(Kind::ToolCallRequested(_)))),
    );
}

#[tokio::test]
async fn retries_are_bounded() {
    let (model, events) = run(
        WireFormat::OpenAi,
        vec![FakeTurn::text("nope"), FakeTurn::text("still no")],
        "output-retries = 1\n",
    )
    .await;
    let finished = finished(&events);
    assert_eq!(finished.stop_reason(), control::StopReason::Error);
    assert!(
        finished
            .message
            .starts_with("the final answer does not match the output schema after 2 attempts"),
        "{}",
        finished.message
    );
    assert_eq!(model.requests().len(), 2);
}
