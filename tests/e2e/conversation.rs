//! Conversations end to end: a conversation agent answers three SendMessage
//! exchanges; the control plane is SIGKILLed between the second and the
//! third, restarts, resumes the waiting session and answers the third. A
//! repeated idempotency key appends its message once, before and after the
//! restart, and the fake model never sees a request twice.

use std::time::Duration;

use harness_e2e::{Cluster, ClusterOptions};
use harness_fake_model::{FakeModel, FakeTurn, WireFormat};
use harness_proto::control::v1 as control;
use harness_proto::control::v1::session_event::Kind;

use crate::support::{events, kinds, start};

fn script() -> Vec<FakeTurn> {
    vec![
        FakeTurn::text("Hello, what next?"),
        FakeTurn::text("Second answer."),
        FakeTurn::text("Third answer."),
        FakeTurn::text("Fourth answer."),
    ]
}

fn agent_file(base_url: &str) -> String {
    format!(
        r#"
name = "chat"
provider = "openai"
model = "fake-chat-model"
base-url = "{base_url}"
system-prompt = "Answer briefly."
tools = ["read_file"]
conversation = true
input-timeout = "10m"
"#
    )
}

/// Waits until the session waits for input; returns its events so far.
async fn until_waiting(cluster: &Cluster, session_id: &str) -> Vec<control::SessionEvent> {
    // StreamEvents without `follow` ends at waiting_for_input or finished.
    let all = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let all = events(cluster, session_id, 0).await;
            if matches!(
                all.last().and_then(|event| event.kind.as_ref()),
                Some(Kind::WaitingForInput(_))
            ) {
                return all;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("the session never waited for input:\n{}", cluster.logs()));
    let session = session_of(cluster, session_id).await;
    assert_eq!(session.status(), control::SessionStatus::WaitingForInput);
    all
}

async fn session_of(cluster: &Cluster, session_id: &str) -> control::Session {
    let mut client = cluster.control().await.unwrap();
    client
        .get_session(control::GetSessionRequest {
            session_id: session_id.to_owned(),
        })
        .await
        .unwrap()
        .into_inner()
        .session
        .unwrap()
}

async fn send(cluster: &Cluster, session_id: &str, message: &str, key: &str) -> u64 {
    let mut client = cluster.control().await.unwrap();
    client
        .send_message(control::SendMessageRequest {
            session_id: session_id.to_owned(),
            message: message.to_owned(),
            idempotency_key: key.to_owned(),
        })
        .await
        .unwrap()
        .into_inner()
        .seq
}

/// The (role, content) of each message of a request body.
fn dialogue(body: &serde_json::Value) -> Vec<String> {
    body["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|message| {
            format!(
                "{}: {}",
                message["role"].as_str().unwrap(),
                message["content"].as_str().unwrap_or_default()
            )
        })
        .collect()
}

#[tokio::test]
async fn a_conversation_survives_a_sigkill_between_messages_and_keys_append_once() {
    let model = FakeModel::start(WireFormat::OpenAi, script())
        .await
        .unwrap();
    let agents = tempfile::tempdir().unwrap();
    std::fs::write(
        agents.path().join("chat.toml"),
        agent_file(&model.base_url()),
    )
    .unwrap();
    let mut cluster = Cluster::start_with(ClusterOptions::new(agents.path()))
        .await
        .unwrap();
    let session_id = start(&cluster, "chat", "Hi.").await;
    until_waiting(&cluster, &session_id).await;

    let first = send(&cluster, &session_id, "Go on.", "msg-1").await;
    assert_eq!(
        send(&cluster, &session_id, "Go on.", "msg-1").await,
        first,
        "a repeated key appends once"
    );
    until_waiting(&cluster, &session_id).await;
    let second = send(&cluster, &session_id, "And then?", "msg-2").await;
    until_waiting(&cluster, &session_id).await;

    cluster.kill_control_plane().await.unwrap();
    cluster.restart_control_plane(&[]).await.unwrap();
    assert_eq!(
        send(&cluster, &session_id, "And then?", "msg-2").await,
        second,
        "keys hold across restarts"
    );
    send(&cluster, &session_id, "Last question.", "msg-3").await;
    let log = until_waiting(&cluster, &session_id).await;
    assert_eq!(
        kinds(&log)
            .into_iter()
            .filter(|kind| *kind != "text_delta")
            .collect::<Vec<_>>(),
        [
            "started",
            "turn_completed",
            "waiting_for_input",
            "user_message",
            "turn_completed",
            "waiting_for_input",
            "user_message",
            "turn_completed",
            "waiting_for_input",
            "user_message",
            "turn_completed",
            "waiting_for_input",
        ]
    );
    let Some(Kind::WaitingForInput(waiting)) = log.last().and_then(|event| event.kind.clone())
    else {
        panic!("not waiting: {:?}", kinds(&log));
    };
    assert_eq!(waiting.assistant_text, "Fourth answer.");

    let requests = model.requests();
    assert_eq!(requests.len(), 4, "one request per answer, none repeated");
    assert_eq!(
        dialogue(&requests[3].body),
        [
            "system: Answer briefly.",
            "user: Hi.",
            "assistant: Hello, what next?",
            "user: Go on.",
            "assistant: Second answer.",
            "user: And then?",
            "assistant: Third answer.",
            "user: Last question.",
        ]
    );

    let mut client = cluster.control().await.unwrap();
    let cancelled = client
        .cancel_session(control::CancelSessionRequest {
            session_id: session_id.clone(),
            reason: "conversation over".to_owned(),
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
    let refused = client
        .send_message(control::SendMessageRequest {
            session_id: session_id.clone(),
            message: "Anyone?".to_owned(),
            idempotency_key: "msg-4".to_owned(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    cluster.stop().await.unwrap();
}
