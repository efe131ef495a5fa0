//! Starts the real `sandboxd` and `control-plane` binaries as child processes
//! and connects gRPC clients to them. Used by the end-to-end tests in
//! `tests/e2e/` and by the `demo` binary.
//!
//! Binaries are found next to the running executable (`target/<profile>/`);
//! `cargo test --workspace` builds them, and the demo builds them itself.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use harness_proto::control::v1::control_service_client::ControlServiceClient;
use harness_proto::sandbox::v1::sandbox_service_client::SandboxServiceClient;
use tokio::process::{Child, Command};
use tonic::transport::Channel;

/// The two daemons, running in a temp dir that holds their sockets, state,
/// database and logs.
pub struct Cluster {
    /// Temp dir with everything the daemons write.
    pub dir: tempfile::TempDir,
    /// `unix:` endpoint of sandboxd.
    pub sandboxd_endpoint: String,
    /// `unix:` endpoint of the control plane.
    pub control_endpoint: String,
    sandboxd: Child,
    control_plane: Child,
}

/// Where the workspace repository is (for the demo agents and cargo).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_owned)
        .unwrap_or_default()
}

/// The directory of the demo agent definitions.
pub fn demo_agents_dir() -> PathBuf {
    repo_root().join("control-plane/agents")
}

/// Finds a workspace binary built alongside the current executable.
pub fn binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot find the current executable")?;
    for dir in exe.ancestors().skip(1).take(3) {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!(
        "binary `{name}` not found near {}; build it first with `cargo build --workspace --bins` \
         (`cargo test --workspace` does this)",
        exe.display()
    )
}

impl Cluster {
    /// Starts sandboxd (with the standard tools) and the control plane
    /// (with agents from `agents_dir`), and waits until both answer health
    /// checks.
    pub async fn start(agents_dir: &Path) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("harness-")
            .tempdir()
            .context("cannot create a temp dir")?;
        let sandboxd_socket = dir.path().join("sandboxd.sock");
        let control_socket = dir.path().join("control-plane.sock");
        let sandboxd_endpoint = format!("unix:{}", sandboxd_socket.display());
        let control_endpoint = format!("unix:{}", control_socket.display());

        let sandboxd = spawn_logged(
            Command::new(binary("sandboxd")?)
                .arg("serve")
                .arg("--listen")
                .arg(&sandboxd_endpoint)
                .arg("--state-dir")
                .arg(dir.path().join("sandboxd-state"))
                .arg("--tools-dir")
                .arg(harness_tool_artifacts::tools_dir()),
            &dir.path().join("sandboxd.log"),
        )?;
        let control_plane = spawn_logged(
            Command::new(binary("control-plane")?)
                .arg("serve")
                .arg("--listen")
                .arg(&control_endpoint)
                .arg("--sandboxd")
                .arg(&sandboxd_endpoint)
                .arg("--database")
                .arg(dir.path().join("control-plane.db"))
                .arg("--agents-dir")
                .arg(agents_dir),
            &dir.path().join("control-plane.log"),
        )?;
        let cluster = Self {
            dir,
            sandboxd_endpoint,
            control_endpoint,
            sandboxd,
            control_plane,
        };
        let deadline = Duration::from_secs(120);
        wait_healthy(&cluster.sandboxd_endpoint, deadline)
            .await
            .with_context(|| cluster.logs())?;
        wait_healthy(&cluster.control_endpoint, deadline)
            .await
            .with_context(|| cluster.logs())?;
        Ok(cluster)
    }

    /// A control-plane client.
    pub async fn control(&self) -> anyhow::Result<ControlServiceClient<Channel>> {
        Ok(ControlServiceClient::new(
            connect(&self.control_endpoint).await?,
        ))
    }

    /// A sandboxd client.
    pub async fn sandbox(&self) -> anyhow::Result<SandboxServiceClient<Channel>> {
        Ok(SandboxServiceClient::new(
            connect(&self.sandboxd_endpoint).await?,
        ))
    }

    /// Host path of a sandbox session's workspace.
    pub fn workspace_of(&self, sandbox_session_id: &str) -> PathBuf {
        self.dir
            .path()
            .join("sandboxd-state/sessions")
            .join(sandbox_session_id)
    }

    /// Both daemons' logs, for failure messages.
    pub fn logs(&self) -> String {
        let read =
            |name: &str| std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default();
        format!(
            "--- sandboxd.log ---\n{}\n--- control-plane.log ---\n{}",
            read("sandboxd.log"),
            read("control-plane.log")
        )
    }

    /// Stops both daemons with SIGTERM (SIGKILL after 10 s) and removes the
    /// temp dir. Returns their exit statuses.
    pub async fn stop(
        mut self,
    ) -> anyhow::Result<(std::process::ExitStatus, std::process::ExitStatus)> {
        let control = terminate(&mut self.control_plane).await?;
        let sandboxd = terminate(&mut self.sandboxd).await?;
        Ok((control, sandboxd))
    }
}

fn spawn_logged(command: &mut Command, log: &Path) -> anyhow::Result<Child> {
    let file =
        std::fs::File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
    command
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {:?}", command.as_std().get_program()))
}

async fn terminate(child: &mut Child) -> anyhow::Result<std::process::ExitStatus> {
    if let Some(pid) = child.id() {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(pid)?);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    }
    match tokio::time::timeout(Duration::from_secs(10), child.wait()).await {
        Ok(status) => Ok(status?),
        Err(_) => {
            child.kill().await?;
            Ok(child.wait().await?)
        }
    }
}

/// Connects to `unix:/path` or `http://host:port` (the control plane's
/// client transport, shared so every client connects the same way).
pub async fn connect(endpoint: &str) -> anyhow::Result<Channel> {
    Ok(harness_control_plane::transport::connect_lazy(endpoint)?)
}

/// Polls the standard gRPC health check until it reports SERVING.
pub async fn wait_healthy(endpoint: &str, within: Duration) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut last_error = String::from("not tried");
    while started.elapsed() < within {
        match health(endpoint).await {
            Ok(true) => return Ok(()),
            Ok(false) => last_error = "NOT_SERVING".to_owned(),
            Err(error) => last_error = format!("{error:#}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("{endpoint} did not become healthy within {within:?}: {last_error}")
}

/// One health check of the whole server (service "").
pub async fn health(endpoint: &str) -> anyhow::Result<bool> {
    let mut client = tonic_health::pb::health_client::HealthClient::new(connect(endpoint).await?);
    let response = client
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await?
        .into_inner();
    Ok(response.status() == tonic_health::pb::health_check_response::ServingStatus::Serving)
}
