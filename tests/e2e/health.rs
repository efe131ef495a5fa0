//! Both daemons answer the standard gRPC health check, and their server
//! reflection lists exactly the services each serves.

use futures::StreamExt;
use harness_e2e::{Cluster, connect, demo_agents_dir, health};
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

#[tokio::test]
async fn both_daemons_answer_the_health_check_and_stop_cleanly() {
    let cluster = Cluster::start(&demo_agents_dir()).await.unwrap();
    assert!(
        health(&cluster.sandboxd_endpoint).await.unwrap(),
        "sandboxd not SERVING"
    );
    assert!(
        health(&cluster.control_endpoint).await.unwrap(),
        "control-plane not SERVING"
    );
    let (control, sandboxd) = cluster.stop().await.unwrap();
    assert!(
        control.success() && sandboxd.success(),
        "exit statuses: {control}, {sandboxd}"
    );
}

/// The services `endpoint` lists through v1 reflection, sorted.
async fn listed_services(endpoint: &str) -> Vec<String> {
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = ServerReflectionClient::new(connect(endpoint).await.unwrap())
        .server_reflection_info(futures::stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.next().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("expected a service list, got {response:?}");
    };
    let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    names.sort();
    names
}

#[tokio::test]
async fn reflection_lists_only_what_each_daemon_serves() {
    let cluster = Cluster::start(&demo_agents_dir()).await.unwrap();
    let standard = [
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ];
    let with = |own: &str| -> Vec<String> {
        let mut names: Vec<String> = standard.iter().map(|s| (*s).to_owned()).collect();
        names.push(own.to_owned());
        names
    };
    assert_eq!(
        (
            listed_services(&cluster.sandboxd_endpoint).await,
            listed_services(&cluster.control_endpoint).await
        ),
        (
            with("harness.sandbox.v1.SandboxService"),
            with("harness.control.v1.ControlService")
        )
    );
    cluster.stop().await.unwrap();
}
