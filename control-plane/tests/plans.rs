//! Supervised plans end to end: a read-only planning phase, an invalid
//! plan back to the model, approval before any step, steps as delegations
//! in dependency order, and the synthesis.

use std::time::Duration;

use harness_fake_model::{FakeModel, FakeTurn, WireFormat};
use harness_proto::control::v1 as control;
use harness_proto::control::v1::session_event::Kind;
use serde_json::Value;

use crate::support::{Sockets, TestPlane, describe};

fn agent(name: &str, model: &FakeModel, tools: &[&str], extra: &str) -> String {
    format!(
        "name = \"{name}\"\nprovider = \"openai\"\nmodel = \"fake-{name}\"\nbase-url = \"{}\"\n\
         system-prompt = \"You are the {name}.\"\ntools = {tools:?}\n{extra}",
        model.base_url()
    )
}

fn tool_results(body: &Value) -> Vec<String> {
    body["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|message| message["role"] == "tool")
        .map(|message| message["content"].as_str().unwrap().to_owned())
        .collect()
}

const PLAN: &str = r#"{"steps":[{"id":"a","objective":"Look at A.","agent":"investigator"},{"id":"b","objective":"Look at B.","agent":"investigator"},{"id":"c","objective":"Combine A and B.","agent":"investigator","depends_on":["a","b"],"budget":{"max_turns":2}}]}"#;

async fn plane() -> (TestPlane, FakeModel, FakeModel) {
    let supervisor = FakeModel::start(
        WireFormat::OpenAi,
        vec![
            FakeTurn::text("Looking around.")
                .with_call("write_file", r#"{"path":"x.md","content":"too early"}"#)
                .with_call("read_file", r#"{"path":"brief.md"}"#),
            FakeTurn::text("A plan.").with_call(
                "submit_plan",
                r#"{"steps":[{"id":"a","objective":"x","agent":"ghost"}]}"#,
            ),
            FakeTurn::text("A better plan.").with_call("submit_plan", PLAN),
            // The harness's own turns, one per wave: never asked.
            FakeTurn::text("(wave 1)"),
            FakeTurn::text("(wave 2)"),
            FakeTurn::text("Synthesis: A and B combine."),
        ],
    )
    .await
    .unwrap();
    let investigator = FakeModel::start(WireFormat::OpenAi, vec![FakeTurn::text("Found it.")])
        .await
        .unwrap();
    let files = [
        (
            "supervisor.toml",
            agent(
                "supervisor",
                &supervisor,
                &["read_file", "write_file"],
                "plan = true\nsubagents = [\"investigator\"]\n",
            ),
        ),
        (
            "investigator.toml",
            agent("investigator", &investigator, &[], ""),
        ),
    ];
    let files: Vec<(&str, &str)> = files.iter().map(|(n, c)| (*n, c.as_str())).collect();
    let plane = TestPlane::start_with_agents(Sockets::Tcp, &files).await;
    (plane, supervisor, investigator)
}

async fn start(plane: &TestPlane) -> String {
    plane
        .client
        .clone()
        .start_session(control::StartSessionRequest {
            agent: "supervisor".to_owned(),
            input: "Investigate.".to_owned(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .session
        .unwrap()
        .session_id
}

async fn resolve(
    plane: &TestPlane,
    session_id: &str,
    call_id: &str,
    decision: control::ApprovalDecision,
) {
    plane
        .client
        .clone()
        .resolve_approval(control::ResolveApprovalRequest {
            session_id: session_id.to_owned(),
            call_id: call_id.to_owned(),
            decision: decision.into(),
            reason: "reviewed".to_owned(),
            ..Default::default()
        })
        .await
        .unwrap();
}

#[tokio::test]
async fn an_approved_plan_runs_its_steps_in_dependency_order() {
    let (plane, supervisor, investigator) = plane().await;
    let session_id = start(&plane).await;
    let call_id = plane.pending_approval(&session_id).await;
    // Nothing ran before the approval: no step, no write.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(investigator.requests().is_empty());
    let requests = supervisor.requests();
    assert_eq!(requests.len(), 3);
    let first = tool_results(&requests[1].body);
    assert!(
        first[0].starts_with("denied: the planning phase is read-only: \"write_file\" runs only as part of an approved plan"),
        "{first:?}"
    );
    assert!(!first[1].starts_with("denied"), "{first:?}");
    let invalid = tool_results(&requests[2].body);
    assert_eq!(
        invalid[2],
        "invalid_input: the plan is invalid: step \"a\": agent \"ghost\" is not one of your subagents (investigator)"
    );
    assert!(
        plane
            .sandboxd
            .record
            .lock()
            .unwrap()
            .invocations
            .iter()
            .all(|(_, _, tool, _)| tool != "write_file")
    );

    resolve(
        &plane,
        &session_id,
        &call_id,
        control::ApprovalDecision::Allow,
    )
    .await;
    let events = plane.events(&session_id, 0).await;
    let described: Vec<String> = events.iter().map(describe).collect();
    assert!(
        described
            .last()
            .unwrap()
            .ends_with("finished STOP_REASON_COMPLETED \"Synthesis: A and B combine.\""),
        "{described:#?}"
    );
    // Steps a and b in one wave (turn), c in the next.
    let started: Vec<(u32, String)> = events
        .iter()
        .filter_map(|event| match &event.kind {
            Some(Kind::SubagentStarted(started)) => Some((event.turn, started.call_id.clone())),
            _ => None,
        })
        .collect();
    let approved_turn = started[0].0;
    assert_eq!(
        started,
        [
            (approved_turn, "plan_a".to_owned()),
            (approved_turn, "plan_b".to_owned()),
            (approved_turn + 1, "plan_c".to_owned()),
        ]
    );
    let budgets: Vec<Option<u32>> = events
        .iter()
        .filter_map(|event| match &event.kind {
            Some(Kind::SubagentStarted(started)) => Some(started.budget.unwrap().max_turns),
            _ => None,
        })
        .collect();
    assert_eq!(budgets[2], Some(2));
    assert_eq!(investigator.requests().len(), 3);
    let last = supervisor.requests().pop().unwrap();
    let notice = last.body["messages"].as_array().unwrap().last().unwrap()["content"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        notice,
        "[harness] Your plan ran:\n- a (investigator): completed\n- b (investigator): completed\n\
         - c (investigator): completed\nThe receipts above list the files each step wrote. Write \
         the synthesis now."
    );
    plane.shut_down().await;
}

#[tokio::test]
async fn a_denied_plan_ends_the_session_with_the_reason() {
    let (plane, _supervisor, investigator) = plane().await;
    let session_id = start(&plane).await;
    let call_id = plane.pending_approval(&session_id).await;
    resolve(
        &plane,
        &session_id,
        &call_id,
        control::ApprovalDecision::Deny,
    )
    .await;
    let events = plane.events(&session_id, 0).await;
    let Some(Kind::Finished(finished)) = &events.last().unwrap().kind else {
        panic!("no finished event");
    };
    assert_eq!(finished.stop_reason(), control::StopReason::PolicyViolation);
    assert!(
        finished.message.starts_with("the plan was not approved: ")
            && finished.message.contains("reviewed"),
        "{}",
        finished.message
    );
    assert!(investigator.requests().is_empty());
    plane.shut_down().await;
}
