//! Health, reflection, capabilities and session lifecycle over gRPC.

use harness_proto::sandbox::v1 as pb;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::support::TestDaemon;

#[tokio::test]
async fn health_check_reports_serving() {
    let daemon = TestDaemon::start().await;
    let mut health = HealthClient::new(daemon.channel.clone());
    for service in ["", "harness.sandbox.v1.SandboxService"] {
        let response = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.to_owned(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            response.status(),
            ServingStatus::Serving,
            "service {service:?}"
        );
    }
    daemon.shutdown().await;
}

#[tokio::test]
async fn capabilities_report_backends_and_limits() {
    let mut daemon = TestDaemon::start().await;
    daemon.create_session().await;
    let caps = daemon
        .client
        .capabilities(pb::CapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    let backends: Vec<(i32, bool)> = caps
        .backends
        .iter()
        .map(|b| (b.backend, b.available))
        .collect();
    assert_eq!(
        backends,
        vec![
            (pb::Backend::Wasi as i32, true),
            (pb::Backend::Process as i32, false)
        ]
    );
    assert_eq!(
        caps.load,
        Some(pb::Load {
            sessions: 1,
            running_invocations: 0
        })
    );
    assert_eq!(
        caps.limits.unwrap().max_memory_bytes,
        daemon.daemon.config.max_memory_bytes
    );
    daemon.shutdown().await;
}

#[tokio::test]
async fn destroy_removes_the_workspace_and_is_idempotent() {
    let mut daemon = TestDaemon::start().await;
    let session = daemon.create_session().await;
    let workspace = daemon.workspace_of(&session.session_id);
    daemon
        .invoke(
            &session.session_id,
            "w1",
            "write_file",
            serde_json::json!({"path": "a/b.txt", "content": "hello"}),
        )
        .await
        .ok_json();
    assert!(workspace.join("a/b.txt").exists());

    let destroy = |id: String| pb::DestroySessionRequest {
        session_id: id,
        reason: "test".to_owned(),
    };
    let report = daemon
        .client
        .destroy_session(destroy(session.session_id.clone()))
        .await
        .unwrap()
        .into_inner()
        .report
        .unwrap();
    assert!(
        !workspace.exists(),
        "workspace still present after DestroySession"
    );
    assert_eq!(
        (
            report.already_destroyed,
            report.workspace_removed,
            report.workspace_files_removed,
            report.workspace_bytes_removed,
            report.errors.clone()
        ),
        (false, true, 1, 5, vec![])
    );
    let again = daemon
        .client
        .destroy_session(destroy(session.session_id.clone()))
        .await
        .unwrap()
        .into_inner()
        .report
        .unwrap();
    assert!(again.already_destroyed);

    let status = daemon
        .client
        .get_session(pb::GetSessionRequest {
            session_id: session.session_id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound);
    daemon.shutdown().await;
}

#[tokio::test]
async fn shutdown_destroys_remaining_sessions() {
    let mut daemon = TestDaemon::start().await;
    let session = daemon.create_session().await;
    let workspace = daemon.workspace_of(&session.session_id);
    assert!(workspace.exists());
    daemon.shutdown().await;
    assert!(!workspace.exists());
}

#[tokio::test]
async fn process_sessions_fail_closed_naming_what_the_host_lacks() {
    // This daemon is told its host has no user namespaces and no seccomp.
    let mut daemon = TestDaemon::start().await;
    let status = daemon
        .client
        .create_session(pb::CreateSessionRequest {
            policy: Some(pb::SessionPolicy {
                backends: vec![pb::Backend::Process as i32],
                ..Default::default()
            }),
            labels: Default::default(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    for missing in [
        "user namespaces are unavailable",
        "seccomp filters are unavailable",
    ] {
        assert!(status.message().contains(missing), "{}", status.message());
    }
    assert!(daemon.daemon.sessions.is_empty());
    daemon.shutdown().await;
}

#[tokio::test]
async fn sessions_are_listed_with_their_labels() {
    let mut daemon = TestDaemon::start().await;
    let created = daemon
        .client
        .create_session(pb::CreateSessionRequest {
            policy: None,
            labels: [("tenant".to_owned(), "acme".to_owned())].into(),
        })
        .await
        .unwrap()
        .into_inner()
        .session
        .unwrap();
    let listed = daemon
        .client
        .list_sessions(pb::ListSessionsRequest {})
        .await
        .unwrap()
        .into_inner()
        .sessions;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].session_id, created.session_id);
    assert_eq!(
        listed[0].labels.get("tenant").map(String::as_str),
        Some("acme")
    );
    daemon.shutdown().await;
}
