//! SendMessage over gRPC: a conversation agent waits between answers, and
//! racing or repeated messages land once.

use harness_proto::control::v1 as control;

use crate::support::{Sockets, TestPlane};

const CHAT_AGENT: &str = r#"
name = "chat"
provider = "scripted"
model = "scripted-chat"
script = "chat.script.toml"
conversation = true
input-timeout = "5m"
"#;

const CHAT_SCRIPT: &str = r#"
[[turn]]
text = "One."
[[turn]]
text = "Two."
[[turn]]
text = "Three."
"#;

async fn chat_plane() -> TestPlane {
    TestPlane::start_with_agents(
        Sockets::Tcp,
        &[("chat.toml", CHAT_AGENT), ("chat.script.toml", CHAT_SCRIPT)],
    )
    .await
}

fn message(session_id: &str, text: &str, key: &str) -> control::SendMessageRequest {
    control::SendMessageRequest {
        session_id: session_id.to_owned(),
        message: text.to_owned(),
        idempotency_key: key.to_owned(),
    }
}

#[tokio::test]
async fn racing_messages_with_one_key_append_once_and_with_two_keys_one_wins() {
    let plane = chat_plane().await;
    let session_id = plane
        .start_session("chat", "")
        .await
        .session
        .unwrap()
        .session_id;
    // Without `follow`, the stream ends where the session waits.
    let first = plane.events(&session_id, 0).await;
    assert!(matches!(
        first.last().unwrap().kind,
        Some(control::session_event::Kind::WaitingForInput(_))
    ));
    assert_eq!(
        plane.session(&session_id).await.status(),
        control::SessionStatus::WaitingForInput
    );

    let mut a = plane.client.clone();
    let mut b = plane.client.clone();
    let (one, two) = tokio::join!(
        a.send_message(message(&session_id, "again", "same")),
        b.send_message(message(&session_id, "again", "same")),
    );
    let (one, two) = (one.unwrap().into_inner(), two.unwrap().into_inner());
    assert_eq!(one.seq, two.seq, "one key, one message");

    let after_first = plane.events(&session_id, one.seq).await;
    let waiting_seq = after_first.last().unwrap().seq;
    let (x, y) = tokio::join!(
        a.send_message(message(&session_id, "from x", "x")),
        b.send_message(message(&session_id, "from y", "y")),
    );
    let codes = [&x, &y].map(|result| result.as_ref().map(|_| ()).map_err(tonic::Status::code));
    assert!(
        codes.contains(&Ok(())) && codes.contains(&Err(tonic::Code::FailedPrecondition)),
        "exactly one of two racing messages lands: {codes:?}"
    );
    let landed = x.or(y).unwrap().into_inner().seq;
    assert_eq!(landed, waiting_seq + 1);
    let log = plane.events(&session_id, 0).await;
    let user_messages: Vec<(String, String)> = log
        .iter()
        .filter_map(|event| match &event.kind {
            Some(control::session_event::Kind::UserMessage(message)) => {
                Some((message.text.clone(), message.idempotency_key.clone()))
            }
            _ => None,
        })
        .collect();
    assert_eq!(user_messages.len(), 2, "{user_messages:?}");
    assert_eq!(user_messages[0], ("again".to_owned(), "same".to_owned()));
    assert_eq!(
        plane.session(&session_id).await.status(),
        control::SessionStatus::WaitingForInput
    );
    plane.shut_down().await;
}
