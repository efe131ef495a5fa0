//! Health checking and server reflection.

use futures::StreamExt;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

use crate::support::{Sockets, TestPlane};

#[tokio::test]
async fn health_reports_serving_for_the_server_and_the_control_service() {
    let plane = TestPlane::start(Sockets::Unix).await;
    let channel = harness_control_plane::transport::connect_lazy(&plane.endpoint).unwrap();
    let mut health = HealthClient::new(channel);
    for service in ["", "harness.control.v1.ControlService"] {
        let status = health
            .check(HealthCheckRequest {
                service: service.to_owned(),
            })
            .await
            .unwrap()
            .into_inner()
            .status();
        assert_eq!(status, ServingStatus::Serving, "service {service:?}");
    }
    plane.shut_down().await;
}

#[tokio::test]
async fn reflection_lists_only_the_services_this_server_serves() {
    let plane = TestPlane::start(Sockets::Tcp).await;
    let channel = harness_control_plane::transport::connect_lazy(&plane.endpoint).unwrap();
    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = reflection
        .server_reflection_info(futures::stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.next().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("expected a service list, got {response:?}");
    };
    let mut names: Vec<String> = list
        .service
        .into_iter()
        .map(|service| service.name)
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
            "harness.control.v1.ControlService",
        ]
    );
}
