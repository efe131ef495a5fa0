//! Loopback TCP is a first-class listener: both daemons serve the same
//! services (health, reflection, their API) on a Unix socket and on
//! `127.0.0.1:<port>` at once, for gRPC clients that cannot use Unix
//! sockets; TCP off loopback is refused unless `--insecure-listen` is given.

use std::path::Path;
use std::time::Duration;

use harness_daemon::ListenAddress;
use harness_daemon::paths::HOME_VARIABLE;
use harness_e2e::{
    Cluster, ClusterOptions, announced_addresses, binary, connect, daemon_logs, demo_agents_dir,
    health, spawn_daemon, terminate, wait_healthy,
};
use harness_proto::control::v1 as control;
use harness_proto::control::v1::control_service_client::ControlServiceClient;
use harness_proto::sandbox::v1 as sandbox;
use harness_proto::sandbox::v1::sandbox_service_client::SandboxServiceClient;
use tokio::process::Command;

#[tokio::test]
async fn both_daemons_serve_on_loopback_tcp_beside_their_sockets() {
    let cluster = Cluster::start_with(ClusterOptions {
        loopback_tcp: true,
        ..ClusterOptions::new(&demo_agents_dir())
    })
    .await
    .unwrap();
    let sandboxd_tcp = cluster.sandboxd_tcp.unwrap();
    let control_tcp = cluster.control_tcp.unwrap();
    assert!(
        sandboxd_tcp.ip().is_loopback() && sandboxd_tcp.port() != 0,
        "{sandboxd_tcp}"
    );
    assert!(
        control_tcp.ip().is_loopback() && control_tcp.port() != 0,
        "{control_tcp}"
    );
    let sandboxd_http = format!("http://{sandboxd_tcp}");
    let control_http = format!("http://{control_tcp}");
    for endpoint in [&sandboxd_http, &control_http] {
        assert!(health(endpoint).await.unwrap(), "{endpoint} not SERVING");
    }

    let tools = SandboxServiceClient::new(connect(&sandboxd_http).await.unwrap())
        .list_tools(sandbox::ListToolsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(
        tools.tools.iter().any(|tool| tool.name == "read_file"),
        "{tools:?}"
    );

    // A session started over TCP runs like one started on the socket.
    let mut client = ControlServiceClient::new(connect(&control_http).await.unwrap());
    let session_id = client
        .start_session(control::StartSessionRequest {
            agent: "demo".to_owned(),
            input: "Leave a note.".to_owned(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .session
        .unwrap()
        .session_id;
    let mut events = client
        .stream_events(control::StreamEventsRequest {
            session_id: session_id.clone(),
            after_seq: 0,
            follow: false,
        })
        .await
        .unwrap()
        .into_inner();
    let mut last = None;
    while let Some(event) = events.message().await.unwrap() {
        last = Some(event);
    }
    let Some(control::session_event::Kind::Finished(end)) = last.and_then(|e| e.kind) else {
        panic!("the session did not finish\n{}", cluster.logs());
    };
    assert_eq!(
        end.stop_reason(),
        control::StopReason::Completed,
        "{}",
        cluster.logs()
    );

    // The README's CLI example: --endpoint before or after the subcommand.
    for args in [
        vec![
            "--endpoint",
            control_http.as_str(),
            "get",
            session_id.as_str(),
        ],
        vec![
            "get",
            session_id.as_str(),
            "--endpoint",
            control_http.as_str(),
        ],
    ] {
        let output = Command::new(binary("control-plane").unwrap())
            .env_remove("HARNESS_ENDPOINT")
            .args(&args)
            .output()
            .await
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success() && stdout.contains(&session_id),
            "{args:?}: {}\n{stdout}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    let (control_status, sandboxd_status) = cluster.stop().await.unwrap();
    assert!(
        control_status.success() && sandboxd_status.success(),
        "exit statuses: {control_status}, {sandboxd_status}"
    );
}

/// Runs daemon `name` with `args` (in `home`) until it exits by itself.
async fn run_to_exit(home: &Path, name: &str, args: &[&str]) -> (bool, String) {
    let mut child = spawn_daemon(
        Command::new(binary(name).unwrap())
            .env(HOME_VARIABLE, home)
            .args(args),
        home,
        name,
    )
    .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(60), child.wait())
        .await
        .unwrap_or_else(|_| panic!("{name} kept running with {args:?}"))
        .unwrap();
    (status.success(), daemon_logs(home, &[name]))
}

#[tokio::test]
async fn tcp_off_loopback_is_refused_without_insecure_listen() {
    let home = tempfile::tempdir().unwrap();
    let tools = harness_tool_artifacts::tools_dir()
        .to_str()
        .unwrap()
        .to_owned();
    let agents = demo_agents_dir().to_str().unwrap().to_owned();
    for (name, args) in [
        (
            "sandboxd",
            vec!["--listen", "0.0.0.0:0", "--tools-dir", tools.as_str()],
        ),
        (
            "control-plane",
            vec![
                "serve",
                "--listen",
                "0.0.0.0:0",
                "--agents-dir",
                agents.as_str(),
            ],
        ),
    ] {
        let (success, logs) = run_to_exit(home.path(), name, &args).await;
        assert!(!success, "{name} started on 0.0.0.0\n{logs}");
        assert!(
            logs.contains(
                "refusing to listen on 0.0.0.0:0: callers are not authenticated, so anyone who \
                 can reach this address could call the daemon"
            ) && logs.contains("--insecure-listen"),
            "{name}: the error does not say why and how\n{logs}"
        );
    }
}

#[tokio::test]
async fn insecure_listen_allows_tcp_off_loopback() {
    let home = tempfile::tempdir().unwrap();
    let mut control_plane = spawn_daemon(
        Command::new(binary("control-plane").unwrap())
            .env(HOME_VARIABLE, home.path())
            .args(["serve", "--listen", "0.0.0.0:0", "--insecure-listen"])
            .arg("--agents-dir")
            .arg(demo_agents_dir()),
        home.path(),
        "control-plane",
    )
    .unwrap();
    let logs = || daemon_logs(home.path(), &["control-plane"]);
    let out = home.path().join("control-plane.out");
    let mut announced = Vec::new();
    for _ in 0..600 {
        announced = announced_addresses(&out).unwrap_or_default();
        if !announced.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let [ListenAddress::Tcp(address)] = announced[..] else {
        panic!("expected one TCP listener, got {announced:?}\n{}", logs());
    };
    assert!(
        address.ip().is_unspecified() && address.port() != 0,
        "{address}"
    );
    let local = format!("http://127.0.0.1:{}", address.port());
    wait_healthy(&local, Duration::from_secs(60))
        .await
        .unwrap_or_else(|error| panic!("{error:#}\n{}", logs()));
    assert!(
        logs().contains("without authentication"),
        "no warning logged\n{}",
        logs()
    );
    assert!(
        terminate(&mut control_plane).await.unwrap().success(),
        "{}",
        logs()
    );
}
