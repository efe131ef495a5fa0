//! Network egress from WASI tools: `http_fetch` through the allowlist hook,
//! raw `wasi:sockets` connects, and the special-range refusals. Every
//! destination is a server on 127.0.0.1 started by the test; names reach it
//! only through sandboxd's `static-hosts` override.

use std::net::SocketAddr;

use harness_proto::sandbox::v1 as pb;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::TestDaemon;

/// A one-route HTTP server on loopback answering every request with `body`.
async fn http_server(body: &'static str) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut buf = [0_u8; 1024];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                let response = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(response.as_bytes()).await;
            });
        }
    });
    address
}

fn network(allow: &[String], cidrs: &[&str]) -> pb::SessionPolicy {
    pb::SessionPolicy {
        network: Some(pb::NetworkPolicy {
            allow: allow.to_vec(),
            deny: vec![],
            allow_cidrs: cidrs.iter().map(|c| c.to_string()).collect(),
        }),
        ..Default::default()
    }
}

async fn daemon_resolving_test_names() -> TestDaemon {
    TestDaemon::start_with_test_tools(|config| {
        for name in [
            "api.allowed.test",
            "allowed.test",
            "evil-allowed.test",
            "other.test",
        ] {
            config
                .static_hosts
                .insert(name.to_owned(), vec!["127.0.0.1".parse().unwrap()]);
        }
    })
    .await
}

#[tokio::test]
async fn allowed_host_is_reachable_when_its_loopback_cidr_is_granted() {
    let server = http_server("hello from the allowed host").await;
    let mut daemon = daemon_resolving_test_names().await;
    let allow = vec![format!("*.allowed.test:{}", server.port())];
    let id = daemon
        .create_session_with(network(&allow, &["127.0.0.1/32"]))
        .await
        .session_id;
    let url = format!("http://api.allowed.test:{}/data", server.port());
    let fetched = daemon
        .invoke(&id, "ok", "http_fetch", json!({ "url": url }))
        .await
        .ok_json();
    assert_eq!(fetched["status"], json!(200));
    assert_eq!(fetched["body"], json!("hello from the allowed host"));
    daemon.shutdown().await;
}

#[tokio::test]
async fn hosts_off_the_allowlist_and_loopback_answers_are_denied() {
    let server = http_server("secret").await;
    let port = server.port();
    let mut daemon = daemon_resolving_test_names().await;
    let allow = vec![format!("*.allowed.test:{port}")];
    let id = daemon
        .create_session_with(network(&allow, &[]))
        .await
        .session_id;
    let cases = [
        // Allowed name, but it resolves to 127.0.0.1 and no CIDR is granted.
        format!("http://api.allowed.test:{port}/"),
        // The bare suffix and a look-alike are not covered by *.allowed.test.
        format!("http://allowed.test:{port}/"),
        format!("http://evil-allowed.test:{port}/"),
        // Not listed at all, an IP literal, and an unlisted port.
        format!("http://other.test:{port}/"),
        format!("http://127.0.0.1:{port}/"),
        format!("http://api.allowed.test:{}/", port.wrapping_add(1).max(1)),
    ];
    for (n, url) in cases.iter().enumerate() {
        let invoked = daemon
            .invoke(&id, &n.to_string(), "http_fetch", json!({ "url": url }))
            .await;
        assert_eq!(
            invoked.error_kind(),
            pb::ErrorKind::Denied,
            "{url}: {:?}",
            invoked.error()
        );
        assert!(
            !format!("{:?}", invoked.result).contains("secret"),
            "{url} reached the server"
        );
    }
    let session = daemon.held(&id).unwrap();
    let log = session.egress.as_ref().unwrap().log.records();
    assert_eq!(log.len(), cases.len(), "every refusal is logged: {log:?}");
    assert!(log.iter().all(|r| !r.allowed));
    daemon.shutdown().await;
}

#[tokio::test]
async fn sessions_without_network_cannot_fetch() {
    let server = http_server("secret").await;
    let mut daemon = daemon_resolving_test_names().await;
    let id = daemon.create_session().await.session_id;
    let url = format!("http://127.0.0.1:{}/", server.port());
    let invoked = daemon
        .invoke(&id, "n", "http_fetch", json!({ "url": url }))
        .await;
    assert_eq!(
        invoked.error_kind(),
        pb::ErrorKind::Denied,
        "{:?}",
        invoked.error()
    );
    daemon.shutdown().await;
}

#[tokio::test]
async fn raw_socket_connects_to_loopback_are_denied() {
    let server = http_server("secret").await;
    let mut daemon = daemon_resolving_test_names().await;
    let address = server.to_string();
    // No network at all.
    let closed = daemon.create_session().await.session_id;
    // An allow rule naming the address literally, but no loopback CIDR.
    let literal = daemon
        .create_session_with(network(std::slice::from_ref(&address), &[]))
        .await
        .session_id;
    for id in [closed, literal] {
        let invoked = daemon
            .invoke(
                &id,
                "c",
                "misbehave",
                json!({"action": "connect", "address": address}),
            )
            .await;
        let error = invoked.error();
        assert!(
            matches!(
                pb::ErrorKind::try_from(error.kind).unwrap(),
                pb::ErrorKind::Denied | pb::ErrorKind::Failed
            ),
            "{error:?}"
        );
        assert!(!format!("{error:?}").contains("secret"));
        assert!(
            error.message.to_lowercase().contains("denied")
                || error.message.to_lowercase().contains("permit")
                || error.message.to_lowercase().contains("access"),
            "{}",
            error.message
        );
    }
    daemon.shutdown().await;
}
