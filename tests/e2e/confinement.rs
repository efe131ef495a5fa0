//! Tools cannot read outside the workspace, and destroyed sessions leave
//! nothing behind: through the control plane and against sandboxd directly.

use harness_e2e::{Cluster, demo_agents_dir};
use harness_proto::control::v1 as control;
use harness_proto::sandbox::v1 as sandbox;

use crate::support::{events, finished_calls, host_secret, start, write_agent};

#[tokio::test]
async fn model_driven_escapes_are_refused_and_leak_nothing() {
    let agents = tempfile::tempdir().unwrap();
    write_agent(
        agents.path(),
        "escape",
        &[
            ("read_file", "{ path = \"../../etc/passwd\" }"),
            ("read_file", "{ path = \"/etc/passwd\" }"),
        ],
        "could not read it",
    );
    let cluster = Cluster::start(agents.path()).await.unwrap();
    let id = start(&cluster, "escape", "read the host's passwd").await;
    let all = events(&cluster, &id, 0).await;
    let calls = finished_calls(&all);
    assert_eq!(calls.len(), 2, "{}", cluster.logs());
    for call in &calls {
        match &call.outcome {
            Some(control::tool_finished::Outcome::Error(error)) => {
                assert_eq!(
                    error.kind(),
                    control::ToolErrorKind::Denied,
                    "{}",
                    error.message
                );
            }
            other => panic!("escape was not refused: {other:?}"),
        }
    }
    let transcript = format!("{all:?}");
    assert!(
        !transcript.contains(&host_secret()),
        "host /etc/passwd leaked into the session"
    );
    cluster.stop().await.unwrap();
}

async fn invoke_read(
    client: &mut sandbox::sandbox_service_client::SandboxServiceClient<tonic::transport::Channel>,
    session: &str,
    id: &str,
    path: &str,
) -> Vec<sandbox::InvokeEvent> {
    let mut stream = client
        .invoke(sandbox::InvokeRequest {
            session_id: session.to_owned(),
            invocation_id: id.to_owned(),
            target: Some(sandbox::invoke_request::Target::Wasi(sandbox::WasiCall {
                tool: "read_file".to_owned(),
                input_json: serde_json::json!({ "path": path }).to_string(),
            })),
            timeout: None,
        })
        .await
        .unwrap()
        .into_inner();
    let mut events = Vec::new();
    while let Some(event) = stream.message().await.unwrap() {
        events.push(event);
    }
    events
}

#[tokio::test]
async fn symlink_planted_in_the_workspace_does_not_lead_out_and_destroy_removes_everything() {
    let cluster = Cluster::start(&demo_agents_dir()).await.unwrap();
    let mut client = cluster.sandbox().await.unwrap();
    let session = client
        .create_session(sandbox::CreateSessionRequest::default())
        .await
        .unwrap()
        .into_inner()
        .session
        .unwrap();
    let workspace = cluster.workspace_of(&session.session_id);
    std::os::unix::fs::symlink("/etc", workspace.join("etc")).unwrap();

    for (n, path) in ["etc/passwd", "../../etc/passwd", "/etc/passwd"]
        .into_iter()
        .enumerate()
    {
        let events = invoke_read(&mut client, &session.session_id, &n.to_string(), path).await;
        let result = events
            .iter()
            .find_map(|e| match &e.event {
                Some(sandbox::invoke_event::Event::Result(result)) => Some(result.clone()),
                _ => None,
            })
            .unwrap();
        match result.outcome {
            Some(sandbox::invoke_result::Outcome::Error(error)) => {
                assert_eq!(
                    error.kind(),
                    sandbox::ErrorKind::Denied,
                    "{path}: {}",
                    error.message
                );
            }
            other => panic!("{path} was not refused: {other:?}"),
        }
        assert!(
            !format!("{events:?}").contains(&host_secret()),
            "{path} leaked host content"
        );
    }

    let report = client
        .destroy_session(sandbox::DestroySessionRequest {
            session_id: session.session_id.clone(),
            reason: "test".to_owned(),
        })
        .await
        .unwrap()
        .into_inner()
        .report
        .unwrap();
    assert!(
        report.workspace_removed && report.errors.is_empty(),
        "{report:?}"
    );
    assert!(
        !workspace.exists(),
        "workspace directory still exists after DestroySession"
    );
    assert!(
        std::path::Path::new("/etc/passwd").exists(),
        "teardown followed the symlink"
    );
    cluster.stop().await.unwrap();
}
