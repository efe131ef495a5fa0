//! Replay is deterministic across configuration changes: a session killed
//! mid-way, whose agent file is edited (system prompt, model, token cap,
//! turn limit) before the control plane restarts, sends the model exactly
//! the requests an uninterrupted run of the original agent sends.
//!
//! Each run talks to its own fake OpenAI-compatible server, which keeps
//! every request body, so the two runs' requests can be compared one by one.

use std::time::Duration;

use futures::StreamExt;
use harness_e2e::{Cluster, ClusterOptions};
use harness_fake_model::{FakeModel, FakeTurn, WireFormat};
use harness_proto::control::v1 as control;
use harness_proto::control::v1::session_event::Kind;

use crate::support::{events, kinds, start};

fn script() -> Vec<FakeTurn> {
    vec![
        FakeTurn::text("First tally.").with_call("tally", r#"{"file":"count.txt","label":"one"}"#),
        FakeTurn::text("Second tally.").with_call("tally", r#"{"file":"count.txt","label":"two"}"#),
        FakeTurn::text("Reading it back.").with_call("read_file", r#"{"path":"count.txt"}"#),
        FakeTurn::text("Tallied twice."),
    ]
}

/// The agent file; `edited` changes what a resumed session must not pick up.
fn agent_file(base_url: &str, edited: bool) -> String {
    let (prompt, model, max_tokens, max_turns) = if edited {
        (
            "Ignore the tallies and write a poem.",
            "fake-edited-model",
            16,
            2,
        )
    } else {
        ("Tally carefully.", "fake-replay-model", 1024, 10)
    };
    format!(
        r#"
name = "replayer"
provider = "openai"
model = "{model}"
base-url = "{base_url}"
system-prompt = "{prompt}"
tools = ["tally", "read_file"]
max-tokens-per-turn = {max_tokens}
max-turns = {max_turns}
"#
    )
}

/// Follows the session until it finishes (true) or the stream breaks (false).
async fn follow_to_end(cluster: &Cluster, session_id: &str) -> bool {
    let Ok(mut client) = cluster.control().await else {
        return false;
    };
    let stream = client
        .stream_events(control::StreamEventsRequest {
            session_id: session_id.to_owned(),
            after_seq: 0,
            follow: true,
        })
        .await;
    let Ok(stream) = stream else {
        return false;
    };
    let mut stream = stream.into_inner();
    while let Some(item) = stream.next().await {
        match item {
            Ok(event) if matches!(event.kind, Some(Kind::Finished(_))) => return true,
            Ok(_) => {}
            Err(_) => return false,
        }
    }
    false
}

/// The request bodies a fake server received, as JSON text.
fn bodies(model: &FakeModel) -> Vec<String> {
    model
        .requests()
        .iter()
        .map(|request| request.body.to_string())
        .collect()
}

fn finished(events: &[control::SessionEvent]) -> control::SessionFinished {
    match events.last().and_then(|event| event.kind.clone()) {
        Some(Kind::Finished(finished)) => finished,
        _ => panic!("the session did not finish: {:?}", kinds(events)),
    }
}

#[tokio::test]
async fn a_session_resumed_after_its_agent_file_changed_sends_the_original_requests() {
    let uninterrupted = FakeModel::start(WireFormat::OpenAi, script())
        .await
        .unwrap();
    let interrupted = FakeModel::start(WireFormat::OpenAi, script())
        .await
        .unwrap();
    let agents = tempfile::tempdir().unwrap();
    let agent_path = agents.path().join("replayer.toml");
    std::fs::write(&agent_path, agent_file(&uninterrupted.base_url(), false)).unwrap();
    let tools = vec![
        harness_tool_artifacts::test_tool_path("tally"),
        harness_tool_artifacts::tool_path("read_file"),
    ];
    let mut cluster = Cluster::start_with(ClusterOptions {
        tools: Some(tools),
        ..ClusterOptions::new(agents.path())
    })
    .await
    .unwrap();

    // The uninterrupted run of the original agent.
    let baseline_id = start(&cluster, "replayer", "Tally twice.").await;
    assert!(
        tokio::time::timeout(
            Duration::from_secs(30),
            follow_to_end(&cluster, &baseline_id)
        )
        .await
        .unwrap(),
        "{}",
        cluster.logs()
    );
    let baseline = events(&cluster, &baseline_id, 0).await;
    assert_eq!(
        finished(&baseline).stop_reason(),
        control::StopReason::Completed
    );
    let expected = bodies(&uninterrupted);
    assert_eq!(expected.len(), 4);

    // The same agent on its own server, killed once sandboxd acknowledged
    // the second tally (turn 2's model call is recorded, its tool call runs).
    std::fs::write(&agent_path, agent_file(&interrupted.base_url(), false)).unwrap();
    cluster.kill_control_plane().await.unwrap();
    let hook = [(
        "HARNESS_CRASH_AT".to_owned(),
        "after-invoke-sent:2".to_owned(),
    )];
    cluster.restart_control_plane(&hook).await.unwrap();
    let session_id = start(&cluster, "replayer", "Tally twice.").await;
    let ended = tokio::time::timeout(
        Duration::from_secs(30),
        follow_to_end(&cluster, &session_id),
    )
    .await
    .unwrap();
    assert!(!ended, "the crash hook fired before the end");
    cluster
        .wait_control_plane_exit(Duration::from_secs(10))
        .await
        .unwrap();
    let before_restart = interrupted.requests().len();
    assert_eq!(before_restart, 2, "killed during turn 2");

    // Edited while the control plane is down; the restart resumes the session.
    std::fs::write(&agent_path, agent_file(&interrupted.base_url(), true)).unwrap();
    cluster.restart_control_plane(&[]).await.unwrap();
    assert!(
        tokio::time::timeout(
            Duration::from_secs(30),
            follow_to_end(&cluster, &session_id)
        )
        .await
        .unwrap(),
        "{}",
        cluster.logs()
    );
    let resumed = events(&cluster, &session_id, 0).await;
    let ending = finished(&resumed);
    assert_eq!(
        (ending.stop_reason(), ending.final_output.as_str()),
        (control::StopReason::Completed, "Tallied twice."),
        "{}",
        cluster.logs()
    );
    let actual = bodies(&interrupted);
    assert!(actual.len() > before_restart, "requests after the restart");
    for (index, (got, want)) in actual.iter().zip(&expected).enumerate() {
        assert_eq!(got, want, "model request {} differs", index + 1);
    }
    assert_eq!(actual.len(), expected.len());

    // The session resumed from its record: the agent as it was at the start.
    let Some(Kind::Started(started)) = resumed.first().and_then(|event| event.kind.clone()) else {
        panic!("no started event: {:?}", kinds(&resumed));
    };
    let recorded = started.resolved.unwrap();
    assert_eq!(
        (
            recorded.system_prompt.as_str(),
            recorded.model.as_str(),
            recorded.max_tokens_per_turn
        ),
        ("Tally carefully.", "fake-replay-model", Some(1024))
    );
    cluster.stop().await.unwrap();
}
