//! A scripted session through both daemons.

use harness_e2e::{Cluster, demo_agents_dir};
use harness_proto::control::v1 as control;
use harness_proto::control::v1::session_event::Kind;

use crate::support::{events, finished_calls, kinds, start, write_agent};

fn demo_expected_kinds() -> Vec<&'static str> {
    let mut expected = vec!["started"];
    for _ in 0..3 {
        expected.extend(["text_delta"; 3]);
        expected.extend([
            "tool_call_requested",
            "policy_decision",
            "tool_started",
            "tool_finished",
            "turn_completed",
        ]);
    }
    expected.extend(["text_delta"; 3]);
    expected.extend(["turn_completed", "finished"]);
    expected
}

#[tokio::test]
async fn demo_session_runs_to_completion_with_the_expected_events() {
    let cluster = Cluster::start(&demo_agents_dir()).await.unwrap();
    let id = start(&cluster, "demo", "Leave a note.").await;
    let all = events(&cluster, &id, 0).await;

    assert_eq!(kinds(&all), demo_expected_kinds(), "{}", cluster.logs());
    let seqs: Vec<u64> = all.iter().map(|e| e.seq).collect();
    assert_eq!(
        seqs,
        (1..=all.len() as u64).collect::<Vec<_>>(),
        "sequence numbers must be 1..=N without gaps"
    );

    let outputs: Vec<serde_json::Value> = finished_calls(&all)
        .into_iter()
        .map(|done| match done.outcome {
            Some(control::tool_finished::Outcome::OutputJson(json)) => {
                serde_json::from_str(&json).unwrap()
            }
            other => panic!("{} failed: {other:?}", done.tool),
        })
        .collect();
    assert_eq!(
        outputs,
        vec![
            serde_json::json!({"path": "notes/hello.txt", "bytes_written": 24}),
            serde_json::json!({"path": "notes", "entries": [{"name": "hello.txt", "kind": "file", "size": 24}]}),
            serde_json::json!({"path": "notes/hello.txt", "content": "Hello from the harness!\n", "size": 24, "total_lines": 1, "truncated": false}),
        ]
    );
    let Some(Kind::Finished(end)) = &all.last().unwrap().kind else {
        panic!("last event is not finished");
    };
    assert_eq!(end.stop_reason(), control::StopReason::Completed);
    assert!(
        end.final_output
            .starts_with("Done: I wrote notes/hello.txt"),
        "{}",
        end.final_output
    );

    // The session's sandbox was torn down when it finished.
    let sandbox_id = all
        .iter()
        .find_map(|e| match &e.kind {
            Some(Kind::ToolStarted(started)) => Some(started.sandbox_session_id.clone()),
            _ => None,
        })
        .unwrap();
    assert!(
        !cluster.workspace_of(&sandbox_id).exists(),
        "sandbox workspace left behind"
    );
    cluster.stop().await.unwrap();
}

#[tokio::test]
async fn stream_events_from_the_middle_returns_exactly_the_rest() {
    let cluster = Cluster::start(&demo_agents_dir()).await.unwrap();
    let id = start(&cluster, "demo", "Leave a note.").await;
    let all = events(&cluster, &id, 0).await;
    assert!(all.len() > 20);
    for after in [1, 12, all.len() as u64 - 1, all.len() as u64] {
        let rest = events(&cluster, &id, after).await;
        assert_eq!(rest, all[after as usize..].to_vec(), "after_seq {after}");
    }
    cluster.stop().await.unwrap();
}

#[tokio::test]
async fn schema_violation_becomes_an_invalid_input_result_and_the_session_goes_on() {
    let agents = tempfile::tempdir().unwrap();
    write_agent(
        agents.path(),
        "bad_input",
        &[
            ("read_file", "{ path = 42 }"),
            ("write_file", "{ path = \"ok.txt\", content = \"fine\" }"),
        ],
        "finished anyway",
    );
    let cluster = Cluster::start(agents.path()).await.unwrap();
    let id = start(&cluster, "bad_input", "go").await;
    let all = events(&cluster, &id, 0).await;
    let calls = finished_calls(&all);
    assert_eq!(calls.len(), 2, "{}", cluster.logs());
    match &calls[0].outcome {
        Some(control::tool_finished::Outcome::Error(error)) => {
            assert_eq!(error.kind(), control::ToolErrorKind::InvalidInput);
            assert!(
                error.message.contains("/path") && error.message.contains("string"),
                "{}",
                error.message
            );
        }
        other => panic!("expected invalid_input, got {other:?}"),
    }
    assert!(
        matches!(
            calls[1].outcome,
            Some(control::tool_finished::Outcome::OutputJson(_))
        ),
        "{:?}",
        calls[1]
    );
    let Some(Kind::Finished(end)) = &all.last().unwrap().kind else {
        panic!("last event is not finished");
    };
    assert_eq!(end.stop_reason(), control::StopReason::Completed);
    cluster.stop().await.unwrap();
}
