//! Agents on network providers, end to end through the loop: the fake
//! model servers answer; the conversation they receive is checked.

use harness_fake_model::{FakeModel, FakeTurn, WireFormat};
use harness_proto::control::v1 as control;
use serde_json::json;

use crate::support::{Sockets, TestPlane, describe};

fn agent(name: &str, provider: &str, base_url: &str) -> String {
    format!(
        "name = \"{name}\"\nprovider = \"{provider}\"\nmodel = \"fake-model\"\nbase-url = \"{base_url}\"\n\
         system-prompt = \"Be brief.\"\ntools = [\"read_file\"]\n"
    )
}

#[tokio::test]
async fn malformed_arguments_from_the_model_come_back_to_it_as_an_error() {
    for (format, provider) in [
        (WireFormat::OpenAi, "openai"),
        (WireFormat::Anthropic, "anthropic"),
    ] {
        let model = FakeModel::start(
            format,
            vec![
                FakeTurn::text("Reading.").with_call("read_file", r#"{"path": "notes"#),
                FakeTurn::text("My arguments were broken."),
            ],
        )
        .await
        .unwrap();
        let agent_file = agent("remote", provider, &model.base_url());
        let plane =
            TestPlane::start_with_agents(Sockets::Tcp, &[("remote.toml", &agent_file)]).await;
        let session = plane.start_session("remote", "").await.session.unwrap();
        let events = plane.events(&session.session_id, 0).await;
        let described: Vec<String> = events.iter().map(describe).collect();
        assert!(
            described
                .last()
                .unwrap()
                .ends_with(r#" t2 finished STOP_REASON_COMPLETED "My arguments were broken.""#),
            "{provider}: {described:#?}"
        );
        assert!(plane.sandboxd.record.lock().unwrap().invocations.is_empty());
        let requests = model.requests();
        assert_eq!(requests.len(), 2);
        let error = "invalid_input: the arguments are not valid JSON (EOF while parsing a string at line 1 column 15): {\"path\": \"notes";
        let call_id = match format {
            WireFormat::OpenAi => "call_1_0",
            WireFormat::Anthropic => "toolu_1_0",
        };
        let result = match format {
            WireFormat::OpenAi => requests[1].body["messages"][3].clone(),
            WireFormat::Anthropic => requests[1].body["messages"][2]["content"][0].clone(),
        };
        let expected = match format {
            WireFormat::OpenAi => {
                json!({"role": "tool", "tool_call_id": call_id, "content": error})
            }
            WireFormat::Anthropic => json!({
                "type": "tool_result",
                "tool_use_id": call_id,
                "content": error,
                "is_error": true,
                "cache_control": {"type": "ephemeral"},
            }),
        };
        assert_eq!(result, expected, "{provider}");
        let usage = plane.session(&session.session_id).await.usage.unwrap();
        assert!(
            usage.input_tokens > 0 && usage.output_tokens > 0,
            "{usage:?}"
        );
        assert_eq!(usage.turns, 2);
        plane.shut_down().await;
    }
}

#[tokio::test]
async fn an_unreachable_provider_ends_the_session_with_a_clear_error() {
    let model = FakeModel::start(WireFormat::OpenAi, Vec::new())
        .await
        .unwrap();
    let base_url = model.base_url();
    drop(model);
    let agent_file = format!("{}max-turns = 2\n", agent("gone", "openai", &base_url));
    let plane = TestPlane::start_with_agents(Sockets::Tcp, &[("gone.toml", &agent_file)]).await;
    let session = plane.start_session("gone", "").await.session.unwrap();
    let events = plane.events(&session.session_id, 0).await;
    let Some(control::session_event::Kind::Finished(finished)) = &events.last().unwrap().kind
    else {
        panic!("no finished event");
    };
    assert_eq!(finished.stop_reason(), control::StopReason::Error);
    assert!(
        finished.message.starts_with(&format!(
            "model provider failed: model call to openai {base_url} failed after 4 attempts: cannot reach openai {base_url}"
        )),
        "{}",
        finished.message
    );
}
