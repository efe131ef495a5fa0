//! The defaults connect: both daemons started with nothing but their
//! directories (`--tools-dir`, `--agents-dir`) and `HARNESS_HOME` find each
//! other on the default sockets, and the CLI finds the control plane there
//! too, with no `--endpoint`.

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use harness_daemon::DefaultPaths;
use harness_daemon::paths::HOME_VARIABLE;
use harness_e2e::{
    binary, connect, daemon_logs, demo_agents_dir, spawn_daemon, terminate, wait_healthy,
};
use harness_proto::control::v1 as control;
use harness_proto::control::v1::control_service_client::ControlServiceClient;
use tokio::process::Command;

const START_WITHIN: Duration = Duration::from_secs(120);

/// Runs the control-plane CLI with `HARNESS_HOME` set and nothing else.
async fn cli(home: &Path, args: &[&str]) -> Output {
    Command::new(binary("control-plane").unwrap())
        .env(HOME_VARIABLE, home)
        .env_remove("HARNESS_ENDPOINT")
        .args(args)
        .output()
        .await
        .unwrap()
}

#[tokio::test]
async fn daemons_given_only_their_directories_run_a_session_on_the_default_sockets() {
    let home = tempfile::Builder::new()
        .prefix("harness-home-")
        .tempdir()
        .unwrap();
    let home = home.path();
    let paths = DefaultPaths::for_home(Some(home.as_os_str()));
    let logs = || daemon_logs(home, &["sandboxd", "control-plane"]);

    let mut sandboxd = spawn_daemon(
        Command::new(binary("sandboxd").unwrap())
            .env(HOME_VARIABLE, home)
            .arg("--tools-dir")
            .arg(harness_tool_artifacts::tools_dir()),
        home,
        "sandboxd",
    )
    .unwrap();
    let mut control_plane = spawn_daemon(
        Command::new(binary("control-plane").unwrap())
            .env(HOME_VARIABLE, home)
            .arg("serve")
            .arg("--agents-dir")
            .arg(demo_agents_dir()),
        home,
        "control-plane",
    )
    .unwrap();
    for endpoint in [paths.sandboxd_endpoint(), paths.control_plane_endpoint()] {
        wait_healthy(&endpoint, START_WITHIN)
            .await
            .unwrap_or_else(|error| panic!("{error:#}\n{}", logs()));
    }

    // The README's walk-through, minus every path: the CLI dials the default
    // control-plane socket, which dials the default sandboxd socket.
    let started = cli(
        home,
        &[
            "start",
            "--agent",
            "demo",
            "--input",
            "Leave a note in the workspace.",
            "--follow",
        ],
    )
    .await;
    let stdout = String::from_utf8_lossy(&started.stdout).into_owned();
    assert!(
        started.status.success(),
        "{}\n{stdout}\n{}",
        String::from_utf8_lossy(&started.stderr),
        logs()
    );
    let session_id = stdout
        .lines()
        .next()
        .and_then(|line| line.strip_prefix("session "))
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no session id in {stdout}"))
        .to_owned();

    let mut client =
        ControlServiceClient::new(connect(&paths.control_plane_endpoint()).await.unwrap());
    let session = client
        .get_session(control::GetSessionRequest {
            session_id: session_id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .session
        .unwrap();
    assert_eq!(
        (session.status(), session.stop_reason()),
        (
            control::SessionStatus::Finished,
            control::StopReason::Completed
        ),
        "{stdout}\n{}",
        logs()
    );
    assert_eq!(session.usage.unwrap_or_default().tool_calls, 3, "{stdout}");

    // Everything landed beneath HARNESS_HOME, where the defaults say.
    let exists: Vec<bool> = [
        &paths.sandboxd_socket,
        &paths.control_plane_socket,
        &paths.control_plane_database,
        &paths.sandboxd_state_dir.join("sessions"),
        &paths.sandboxd_cache_dir,
    ]
    .iter()
    .map(|path| path.exists())
    .collect();
    assert_eq!(exists, [true; 5], "{paths:#?}");

    let control_status = terminate(&mut control_plane).await.unwrap();
    let sandboxd_status = terminate(&mut sandboxd).await.unwrap();
    assert!(
        control_status.success() && sandboxd_status.success(),
        "exit statuses: {control_status}, {sandboxd_status}\n{}",
        logs()
    );
    assert!(
        !paths.sandboxd_socket.exists() && !paths.control_plane_socket.exists(),
        "sockets left behind"
    );
}
