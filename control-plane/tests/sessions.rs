//! Sessions end to end: the demo agent's full event log, idempotency, errors.

use futures::StreamExt;
use harness_proto::control::v1 as control;
use harness_proto::control::v1::session_event::Kind;
use serde_json::json;

use crate::support::{Sockets, TestPlane, describe};

const DEMO_FINAL: &str = "Done: I wrote notes/hello.txt, saw it in the notes directory listing, \
                          and read it back; it says \"Hello from the harness!\".";

fn expected_demo_log() -> Vec<String> {
    let lines = [
        r#"1 t0 started demo "Leave a note in the workspace.""#,
        r#"2 t1 text "I'll start by ""#,
        r#"3 t1 text "writing a note ""#,
        r#"4 t1 text "to notes/hello.txt.""#,
        "5 t1 requested call_1_0 write_file",
        "6 t1 policy call_1_0 VERDICT_ALLOW default",
        "7 t1 tool_started call_1_0 write_file sb-1",
        r#"8 t1 tool_finished call_1_0 ok {"bytes_written":24}"#,
        "9 t1 turn_completed 1 tool_use calls=1",
        r#"10 t2 text "The note is written. Let ""#,
        r#"11 t2 text "me list the notes directory ""#,
        r#"12 t2 text "to check it is there.""#,
        "13 t2 requested call_2_0 list_dir",
        "14 t2 policy call_2_0 VERDICT_ALLOW default",
        "15 t2 tool_started call_2_0 list_dir sb-1",
        r#"16 t2 output call_2_0 stderr "listing notes\n""#,
        r#"17 t2 tool_finished call_2_0 ok {"entries":[{"name":"hello.txt","kind":"file"}]}"#,
        "18 t2 turn_completed 2 tool_use calls=1",
        r#"19 t3 text "hello.txt is listed. Now ""#,
        r#"20 t3 text "I'll read it back ""#,
        r#"21 t3 text "to verify its contents.""#,
        "22 t3 requested call_3_0 read_file",
        "23 t3 policy call_3_0 VERDICT_ALLOW default",
        "24 t3 tool_started call_3_0 read_file sb-1",
        r#"25 t3 tool_finished call_3_0 ok {"content":"Hello from the harness!\n"}"#,
        "26 t3 turn_completed 3 tool_use calls=1",
        r#"27 t4 text "Done: I wrote notes/hello.txt, saw it in ""#,
        r#"28 t4 text "the notes directory listing, and read it ""#,
        r#"29 t4 text "back; it says \"Hello from the harness!\".""#,
        "30 t4 turn_completed 4 end_turn calls=0",
    ];
    let mut expected: Vec<String> = lines.iter().map(|line| (*line).to_owned()).collect();
    expected.push(format!(
        "31 t4 finished STOP_REASON_COMPLETED {DEMO_FINAL:?}"
    ));
    expected
}

async fn demo_runs_to_completion(sockets: Sockets) {
    let plane = TestPlane::start(sockets).await;
    let started = plane.start_session("demo", "").await;
    assert!(started.created);
    let session = started.session.unwrap();
    assert_eq!(
        (session.agent.as_str(), session.tenant.as_str()),
        ("demo", "default")
    );

    let events = plane.events(&session.session_id, 0).await;
    let described: Vec<String> = events.iter().map(describe).collect();
    assert_eq!(described, expected_demo_log());
    assert!(events.iter().all(|e| e.session_id == session.session_id));

    let finished = plane.session(&session.session_id).await;
    let usage = finished.usage.unwrap();
    assert_eq!(
        (
            finished.status(),
            finished.stop_reason(),
            finished.final_output.as_str(),
            finished.last_seq,
            usage.turns,
            usage.tool_calls,
        ),
        (
            control::SessionStatus::Finished,
            control::StopReason::Completed,
            DEMO_FINAL,
            31,
            4,
            3
        )
    );

    assert_sandbox_saw_the_demo(&plane, &session.session_id);
    plane.shut_down().await;
}

/// The fake sandboxd got the demo's three calls, its policy and the teardown.
fn assert_sandbox_saw_the_demo(plane: &TestPlane, session_id: &str) {
    let record = plane.sandboxd.record.lock().unwrap();
    let invocations: Vec<(&str, &str, &str, &serde_json::Value)> = record
        .invocations
        .iter()
        .map(|(sandbox_session, id, tool, input)| {
            (sandbox_session.as_str(), id.as_str(), tool.as_str(), input)
        })
        .collect();
    let id = |call: &str| format!("{session_id}:{call}");
    assert_eq!(
        invocations,
        [
            (
                "sb-1",
                id("call_1_0").as_str(),
                "write_file",
                &json!({"path": "notes/hello.txt", "content": "Hello from the harness!\n"})
            ),
            (
                "sb-1",
                id("call_2_0").as_str(),
                "list_dir",
                &json!({"path": "notes"})
            ),
            (
                "sb-1",
                id("call_3_0").as_str(),
                "read_file",
                &json!({"path": "notes/hello.txt"})
            ),
        ]
    );
    assert_eq!(
        record.created,
        [std::collections::HashMap::from([(
            "control-plane-session".to_owned(),
            session_id.to_owned()
        )])]
    );
    let policy = &record.policies[0];
    assert_eq!(
        (
            policy.backends.clone(),
            policy.workspace.as_ref().unwrap().size_limit_bytes,
            policy.limits.as_ref().unwrap().memory_bytes,
            policy.limits.as_ref().unwrap().invocation_timeout,
        ),
        (
            vec![i32::from(harness_proto::sandbox::v1::Backend::Wasi)],
            16 * 1024 * 1024,
            64 * 1024 * 1024,
            Some(prost_types::Duration {
                seconds: 30,
                nanos: 0
            }),
        )
    );
    assert_eq!(record.destroyed, ["sb-1"]);
}

#[tokio::test]
async fn demo_session_runs_to_completion_over_tcp() {
    demo_runs_to_completion(Sockets::Tcp).await;
}

#[tokio::test]
async fn demo_session_runs_to_completion_over_unix_sockets() {
    demo_runs_to_completion(Sockets::Unix).await;
}

#[tokio::test]
async fn invalid_tool_input_is_reported_to_the_model_and_the_session_goes_on() {
    let plane = TestPlane::start(Sockets::Tcp).await;
    let session = plane.start_session("checker", "").await.session.unwrap();
    let described: Vec<String> = plane
        .events(&session.session_id, 0)
        .await
        .iter()
        .map(describe)
        .collect();
    assert_eq!(
        described,
        [
            r#"1 t0 started checker "Leave a note in the workspace.""#,
            r#"2 t1 text "Reading.""#,
            "3 t1 requested call_1_0 read_file",
            r#"4 t1 tool_finished call_1_0 TOOL_ERROR_KIND_INVALID_INPUT the arguments do not match the input schema of "read_file": at /path: 42 is not of type "string""#,
            "5 t1 turn_completed 1 tool_use calls=1",
            r#"6 t2 text "The path ""#,
            r#"7 t2 text "must be ""#,
            r#"8 t2 text "a string.""#,
            "9 t2 turn_completed 2 end_turn calls=0",
            r#"10 t2 finished STOP_REASON_COMPLETED "The path must be a string.""#,
        ]
    );
    // Checked before dispatch: sandboxd never saw the call.
    assert!(plane.sandboxd.record.lock().unwrap().invocations.is_empty());
}

#[tokio::test]
async fn a_repeated_idempotency_key_returns_the_first_session() {
    let plane = TestPlane::start(Sockets::Tcp).await;
    let first = plane.start_session("demo", "order-17").await;
    let again = plane.start_session("demo", "order-17").await;
    let other = plane.start_session("demo", "order-18").await;
    let first_id = first.session.unwrap().session_id;
    assert!(first.created);
    assert!(!again.created);
    assert_eq!(again.session.unwrap().session_id, first_id);
    assert!(other.created);
    plane.events(&first_id, 0).await;
    // The repeat started nothing: one sandbox session per created session.
    let other_id = other.session.unwrap().session_id;
    plane.events(&other_id, 0).await;
    assert_eq!(plane.sandboxd.record.lock().unwrap().created.len(), 2);
}

#[tokio::test]
async fn sessions_list_newest_first_with_pages() {
    let plane = TestPlane::start(Sockets::Tcp).await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(
            plane
                .start_session("checker", "")
                .await
                .session
                .unwrap()
                .session_id,
        );
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
    let mut client = plane.client.clone();
    let first = client
        .list_sessions(control::ListSessionsRequest {
            page_size: 2,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let second = client
        .list_sessions(control::ListSessionsRequest {
            page_size: 2,
            page_token: first.next_page_token.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let listed: Vec<String> = first
        .sessions
        .iter()
        .chain(&second.sessions)
        .map(|session| session.session_id.clone())
        .collect();
    ids.reverse();
    assert_eq!(listed, ids);
    assert_eq!(second.next_page_token, "");
    let demo_only = client
        .list_sessions(control::ListSessionsRequest {
            agent: "demo".to_owned(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(demo_only.sessions.len(), 0);
}

#[tokio::test]
async fn agents_are_listed_by_name_with_their_budget() {
    let plane = TestPlane::start(Sockets::Tcp).await;
    let agents = plane
        .client
        .clone()
        .list_agents(control::ListAgentsRequest {})
        .await
        .unwrap()
        .into_inner()
        .agents;
    let summary: Vec<(String, String, Vec<String>, Option<u32>)> = agents
        .into_iter()
        .map(|agent| {
            (
                agent.name,
                agent.provider,
                agent.tools,
                agent.budget.and_then(|budget| budget.max_turns),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            (
                "asker".to_owned(),
                "scripted".to_owned(),
                vec!["write_file".to_owned()],
                Some(20)
            ),
            (
                "checker".to_owned(),
                "scripted".to_owned(),
                vec!["read_file".to_owned()],
                Some(3)
            ),
            (
                "demo".to_owned(),
                "scripted".to_owned(),
                vec![
                    "write_file".to_owned(),
                    "list_dir".to_owned(),
                    "read_file".to_owned()
                ],
                Some(10)
            ),
            (
                "waiter".to_owned(),
                "scripted".to_owned(),
                vec!["read_file".to_owned()],
                Some(20)
            ),
        ]
    );
}

#[tokio::test]
async fn unknown_sessions_and_agents_are_not_found() {
    let plane = TestPlane::start(Sockets::Tcp).await;
    let mut client = plane.client.clone();
    let get = client
        .get_session(control::GetSessionRequest {
            session_id: "no-such-session".to_owned(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        (get.code(), get.message()),
        (tonic::Code::NotFound, "session no-such-session not found")
    );
    let stream = client
        .stream_events(control::StreamEventsRequest {
            session_id: "no-such-session".to_owned(),
            after_seq: 0,
            follow: false,
        })
        .await
        .unwrap_err();
    assert_eq!(stream.code(), tonic::Code::NotFound);
    let start = client
        .start_session(control::StartSessionRequest {
            agent: "ghost".to_owned(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        (start.code(), start.message()),
        (
            tonic::Code::NotFound,
            "agent \"ghost\" not found; ListAgents shows the available agents"
        )
    );
}

#[tokio::test]
async fn send_message_checks_its_fields_and_refuses_a_session_that_does_not_wait() {
    let plane = TestPlane::start(Sockets::Tcp).await;
    let mut client = plane.client.clone();
    let empty = client
        .send_message(control::SendMessageRequest {
            session_id: "s".to_owned(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        (empty.code(), empty.message()),
        (
            tonic::Code::InvalidArgument,
            "request field `message` must be set"
        )
    );
    let started = plane.start_session("checker", "").await;
    let session_id = started.session.unwrap().session_id;
    plane.events(&session_id, 0).await;
    let refused = client
        .send_message(control::SendMessageRequest {
            session_id: session_id.clone(),
            message: "more?".to_owned(),
            idempotency_key: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        (refused.code(), refused.message()),
        (
            tonic::Code::FailedPrecondition,
            format!(
                "session {session_id} is finished, not waiting for input; SendMessage is \
                 accepted only while a conversation session (an agent with conversation = \
                 true) waits between answers"
            )
            .as_str()
        )
    );
}

#[tokio::test]
async fn cancelling_a_finished_session_returns_it_unchanged() {
    let plane = TestPlane::start(Sockets::Tcp).await;
    let session = plane.start_session("checker", "").await.session.unwrap();
    plane.events(&session.session_id, 0).await;
    let cancelled = plane
        .client
        .clone()
        .cancel_session(control::CancelSessionRequest {
            session_id: session.session_id.clone(),
            reason: "too late".to_owned(),
        })
        .await
        .unwrap()
        .into_inner()
        .session
        .unwrap();
    assert_eq!(cancelled.stop_reason(), control::StopReason::Completed);
}

#[tokio::test]
async fn cancelling_a_running_session_interrupts_its_tool_call() {
    let plane = TestPlane::start(Sockets::Tcp).await;
    let session = plane.start_session("waiter", "").await.session.unwrap();
    let mut events = plane
        .client
        .clone()
        .stream_events(control::StreamEventsRequest {
            session_id: session.session_id.clone(),
            after_seq: 0,
            follow: false,
        })
        .await
        .unwrap()
        .into_inner();
    let mut seen = Vec::new();
    while let Some(event) = events.next().await {
        let event = event.unwrap();
        let dispatched = matches!(event.kind, Some(Kind::ToolStarted(_)));
        seen.push(describe(&event));
        if dispatched {
            break;
        }
    }
    let cancelled = plane
        .client
        .clone()
        .cancel_session(control::CancelSessionRequest {
            session_id: session.session_id.clone(),
            reason: "operator stop".to_owned(),
        })
        .await
        .unwrap()
        .into_inner()
        .session
        .unwrap();
    assert_eq!(
        (cancelled.status(), cancelled.stop_reason()),
        (
            control::SessionStatus::Finished,
            control::StopReason::Cancelled
        )
    );
    while let Some(event) = events.next().await {
        seen.push(describe(&event.unwrap()));
    }
    assert_eq!(
        seen,
        [
            r#"1 t0 started waiter "Leave a note in the workspace.""#,
            r#"2 t1 text "Waiting.""#,
            "3 t1 requested call_1_0 read_file",
            "4 t1 policy call_1_0 VERDICT_ALLOW default",
            "5 t1 tool_started call_1_0 read_file sb-1",
            "6 t1 tool_finished call_1_0 TOOL_ERROR_KIND_INTERRUPTED the session ended before this call finished; its side effects may or may not have happened",
            r#"7 t1 finished STOP_REASON_CANCELLED "Waiting.""#,
        ]
    );
    assert_eq!(plane.sandboxd.record.lock().unwrap().destroyed, ["sb-1"]);
}
