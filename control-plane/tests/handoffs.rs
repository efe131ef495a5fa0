//! Handoffs end to end: each agent on a fake model server of its own, so
//! the assertions are on the requests each model received.

use harness_fake_model::{FakeModel, FakeTurn, WireFormat};
use harness_proto::control::v1 as control;
use harness_proto::control::v1::session_event::Kind;
use serde_json::{Value, json};

use crate::support::{Sockets, TestPlane, describe};

fn agent(name: &str, model: &FakeModel, tools: &[&str], extra: &str) -> String {
    format!(
        "name = \"{name}\"\nprovider = \"openai\"\nmodel = \"fake-{name}\"\nbase-url = \"{}\"\n\
         system-prompt = \"You are {name}.\"\ntools = {tools:?}\n{extra}",
        model.base_url()
    )
}

async fn model(turns: Vec<FakeTurn>) -> FakeModel {
    FakeModel::start(WireFormat::OpenAi, turns).await.unwrap()
}

fn tool_names(body: &Value) -> Vec<String> {
    body["tools"]
        .as_array()
        .map(|tools| {
            tools
                .iter()
                .map(|tool| tool["function"]["name"].as_str().unwrap().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

async fn run(plane: &TestPlane, agent: &str, input: &str) -> Vec<control::SessionEvent> {
    let session = plane
        .client
        .clone()
        .start_session(control::StartSessionRequest {
            agent: agent.to_owned(),
            input: input.to_owned(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .session
        .unwrap();
    plane.events(&session.session_id, 0).await
}

#[tokio::test]
async fn after_a_transfer_every_request_is_the_targets() {
    let triage =
        model(vec![FakeTurn::text("Billing question.").with_call(
            "transfer_to_billing",
            r#"{"reason":"an invoice problem"}"#,
        )])
        .await;
    // The fake picks its reply by the assistant messages in the request:
    // with the full history, billing's first request already holds
    // triage's turn.
    let billing = model(vec![
        FakeTurn::text("(triage's turn: never asked of billing)"),
        FakeTurn::text("Checking.").with_call("read_file", r#"{"path":"invoices/march"}"#),
        FakeTurn::text("Refund issued."),
    ])
    .await;
    let files = [
        (
            "triage.toml",
            agent(
                "triage",
                &triage,
                &["list_dir"],
                "handoffs = [\"billing\"]\n",
            ),
        ),
        (
            "billing.toml",
            agent("billing", &billing, &["read_file"], ""),
        ),
    ];
    let files: Vec<(&str, &str)> = files.iter().map(|(n, c)| (*n, c.as_str())).collect();
    let plane = TestPlane::start_with_agents(Sockets::Tcp, &files).await;
    let events = run(&plane, "triage", "My March invoice is wrong.").await;
    let described: Vec<String> = events.iter().map(describe).collect();
    assert!(
        described
            .iter()
            .any(|line| line.ends_with("handoff triage -> billing \"an invoice problem\"")),
        "{described:#?}"
    );
    assert!(
        described
            .last()
            .unwrap()
            .ends_with("finished STOP_REASON_COMPLETED \"Refund issued.\""),
        "{described:#?}"
    );
    assert_eq!(
        tool_names(&triage.requests()[0].body),
        ["list_dir", "transfer_to_billing"]
    );
    let requests = billing.requests();
    assert_eq!(requests.len(), 2);
    for request in &requests {
        assert_eq!(request.body["model"], "fake-billing");
        assert_eq!(
            request.body["messages"][0],
            json!({"role": "system", "content": "You are billing."})
        );
        assert_eq!(tool_names(&request.body), ["read_file"]);
    }
    // Full history (the default): the triage turn is still there.
    let messages = requests[0].body["messages"].as_array().unwrap();
    assert_eq!(messages[1]["content"], "My March invoice is wrong.");
    assert_eq!(messages[2]["content"], "Billing question.");
    assert_eq!(messages.len(), 4, "{messages:#?}");
    plane.shut_down().await;
}

#[tokio::test]
async fn last_user_history_drops_earlier_turns() {
    let triage = model(vec![
        FakeTurn::text("Let me look first.").with_call("list_dir", r#"{"path":"."}"#),
        FakeTurn::text("Over to billing.")
            .with_call("transfer_to_billing", r#"{"reason":"invoice"}"#),
    ])
    .await;
    let billing = model(vec![FakeTurn::text("Refund issued.")]).await;
    let files = [
        (
            "triage.toml",
            agent(
                "triage",
                &triage,
                &["list_dir"],
                "handoffs = [\"billing\"]\n",
            ),
        ),
        (
            "billing.toml",
            agent(
                "billing",
                &billing,
                &[],
                "handoff-history = \"last-user\"\n",
            ),
        ),
    ];
    let files: Vec<(&str, &str)> = files.iter().map(|(n, c)| (*n, c.as_str())).collect();
    let plane = TestPlane::start_with_agents(Sockets::Tcp, &files).await;
    run(&plane, "triage", "My March invoice is wrong.").await;
    assert_eq!(
        billing.requests()[0].body["messages"],
        json!([
            {"role": "system", "content": "You are billing."},
            {"role": "user", "content": "My March invoice is wrong."},
        ])
    );
    plane.shut_down().await;
}

#[tokio::test]
async fn handoff_loops_are_bounded() {
    let transfers = |to: &str| {
        (0..8)
            .map(|turn| {
                FakeTurn::text("Not mine.").with_call(
                    &format!("transfer_to_{to}"),
                    &format!(r#"{{"reason":"try {turn}"}}"#),
                )
            })
            .collect::<Vec<_>>()
    };
    let ping = model(transfers("pong")).await;
    let pong = model(transfers("ping")).await;
    let files = [
        (
            "ping.toml",
            agent(
                "ping",
                &ping,
                &[],
                "handoffs = [\"pong\"]\nmax-handoffs = 2\nmax-turns = 6\n",
            ),
        ),
        (
            "pong.toml",
            agent(
                "pong",
                &pong,
                &[],
                "handoffs = [\"ping\"]\nmax-handoffs = 2\n",
            ),
        ),
    ];
    let files: Vec<(&str, &str)> = files.iter().map(|(n, c)| (*n, c.as_str())).collect();
    let plane = TestPlane::start_with_agents(Sockets::Tcp, &files).await;
    let events = run(&plane, "ping", "Help.").await;
    let handoffs = events
        .iter()
        .filter(|event| matches!(event.kind, Some(Kind::Handoff(_))))
        .count();
    assert_eq!(handoffs, 2);
    let refusals = events
        .iter()
        .filter(|event| {
            describe(event).contains(
                "TOOL_ERROR_KIND_LIMIT_EXCEEDED max-handoffs is 2: this session was handed over 2 times",
            )
        })
        .count();
    assert!(
        refusals >= 1,
        "{:#?}",
        events.iter().map(describe).collect::<Vec<_>>()
    );
    let Some(Kind::Finished(finished)) = &events.last().unwrap().kind else {
        panic!("no finished event");
    };
    assert_eq!(finished.stop_reason(), control::StopReason::MaxTurns);
    plane.shut_down().await;
}
