//! Invoking the standard tools: round trips, schema validation, idempotency.

use harness_proto::sandbox::v1 as pb;
use serde_json::json;

use crate::support::TestDaemon;

#[tokio::test]
async fn write_list_read_round_trip() {
    let mut daemon = TestDaemon::start().await;
    let id = daemon.create_session().await.session_id;
    let written = daemon
        .invoke(
            &id,
            "1",
            "write_file",
            json!({"path": "notes/hello.txt", "content": "hi there"}),
        )
        .await;
    assert_eq!(written.ok_json()["bytes_written"], json!(8));
    assert_eq!(
        std::fs::read_to_string(daemon.workspace_of(&id).join("notes/hello.txt")).unwrap(),
        "hi there"
    );

    let listed = daemon
        .invoke(&id, "2", "list_dir", json!({"path": "notes"}))
        .await
        .ok_json();
    let names: Vec<&str> = listed["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["hello.txt"]);

    let read = daemon
        .invoke(&id, "3", "read_file", json!({"path": "notes/hello.txt"}))
        .await;
    assert_eq!(read.ok_json()["content"], json!("hi there"));
    let started = read.started.unwrap();
    assert!(started.digest.starts_with("sha256:"), "{started:?}");
    daemon.shutdown().await;
}

#[tokio::test]
async fn schema_violations_are_invalid_input_naming_each_violation() {
    let mut daemon = TestDaemon::start().await;
    let id = daemon.create_session().await.session_id;
    let invoked = daemon
        .invoke(&id, "bad", "write_file", json!({"path": 7}))
        .await;
    assert_eq!(invoked.error_kind(), pb::ErrorKind::InvalidInput);
    let error = invoked.error();
    let paths: Vec<&str> = error
        .violations
        .iter()
        .map(|v| v.instance_path.as_str())
        .collect();
    assert!(
        paths.contains(&"/path"),
        "violations: {:?}",
        error.violations
    );
    assert!(
        error
            .violations
            .iter()
            .any(|v| v.message.contains("content")),
        "missing `content` not named: {:?}",
        error.violations
    );
    assert!(
        error.message.contains("/path") && error.message.contains("content"),
        "{}",
        error.message
    );
    // The daemon is fine afterwards.
    daemon
        .invoke(&id, "good", "list_dir", json!({}))
        .await
        .ok_json();
    daemon.shutdown().await;
}

#[tokio::test]
async fn malformed_json_and_unknown_tools_are_typed_errors() {
    let mut daemon = TestDaemon::start().await;
    let id = daemon.create_session().await.session_id;
    let request = pb::InvokeRequest {
        session_id: id.clone(),
        invocation_id: "m".to_owned(),
        target: Some(pb::invoke_request::Target::Wasi(pb::WasiCall {
            tool: "read_file".to_owned(),
            input_json: "{not json".to_owned(),
        })),
        timeout: None,
    };
    let invoked =
        crate::support::collect(daemon.client.invoke(request).await.unwrap().into_inner()).await;
    assert_eq!(invoked.error_kind(), pb::ErrorKind::InvalidInput);
    assert!(
        invoked.error().message.contains("not valid JSON"),
        "{}",
        invoked.error().message
    );

    let missing = daemon.invoke(&id, "n", "no_such_tool", json!({})).await;
    assert_eq!(missing.error_kind(), pb::ErrorKind::NotFound);
    daemon.shutdown().await;
}

#[tokio::test]
async fn repeated_invocation_id_replays_the_recorded_result_without_running_again() {
    let mut daemon = TestDaemon::start().await;
    let id = daemon.create_session().await.session_id;
    let input = json!({"path": "once.txt", "content": "first"});
    let first = daemon
        .invoke(&id, "same", "write_file", input.clone())
        .await;
    assert!(!first.result.as_ref().unwrap().replayed);
    // Change the file behind the tool's back: a re-execution would rewrite it.
    std::fs::write(daemon.workspace_of(&id).join("once.txt"), "changed").unwrap();
    let second = daemon.invoke(&id, "same", "write_file", input).await;
    assert!(second.result.as_ref().unwrap().replayed);
    assert_eq!(second.ok_json(), first.ok_json());
    assert_eq!(
        std::fs::read_to_string(daemon.workspace_of(&id).join("once.txt")).unwrap(),
        "changed"
    );

    let reuse = daemon
        .client
        .invoke(pb::InvokeRequest {
            session_id: id.clone(),
            invocation_id: "same".to_owned(),
            target: Some(pb::invoke_request::Target::Wasi(pb::WasiCall {
                tool: "write_file".to_owned(),
                input_json: json!({"path": "other.txt", "content": "x"}).to_string(),
            })),
            timeout: None,
        })
        .await
        .unwrap_err();
    assert_eq!(reuse.code(), tonic::Code::AlreadyExists);
    daemon.shutdown().await;
}

#[tokio::test]
async fn process_invocations_need_a_process_session() {
    let mut daemon = TestDaemon::start().await;
    let id = daemon.create_session().await.session_id;
    let status = daemon
        .client
        .invoke(pb::InvokeRequest {
            session_id: id,
            invocation_id: "p".to_owned(),
            target: Some(pb::invoke_request::Target::Process(pb::ProcessCall {
                argv: vec!["/bin/true".to_owned()],
                ..Default::default()
            })),
            timeout: None,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    assert!(
        status.message().contains("no process sandbox"),
        "{}",
        status.message()
    );
    daemon.shutdown().await;
}
