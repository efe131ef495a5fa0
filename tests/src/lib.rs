//! Starts the real `sandboxd` and `control-plane` binaries as child processes
//! and connects gRPC clients to them. Used by the end-to-end tests in
//! `tests/e2e/` and by the `demo` binary.
//!
//! Binaries are found next to the running executable (`target/<profile>/`);
//! `cargo test --workspace` builds them, and the demo builds them itself.
//!
//! Each daemon's stderr (its log) goes to `<dir>/<name>.log`, appended over
//! restarts; its stdout goes to `<dir>/<name>.out`, rewritten at each start.
//! A daemon prints `listening on <address>` there for every listener once
//! they are all bound (with the real port for `127.0.0.1:0`):
//! [`announced_addresses`] reads them back.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use harness_daemon::ListenAddress;
use harness_daemon::paths::HOME_VARIABLE;
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
    /// sandboxd's loopback TCP listener, with
    /// [`ClusterOptions::loopback_tcp`] (stock gRPC clients dial
    /// `127.0.0.1:<port>`; [`connect`] takes `http://127.0.0.1:<port>`).
    pub sandboxd_tcp: Option<SocketAddr>,
    /// The control plane's loopback TCP listener, with
    /// [`ClusterOptions::loopback_tcp`].
    pub control_tcp: Option<SocketAddr>,
    /// The cgroup (path from each hierarchy's root) under which this
    /// cluster's sandboxd makes session cgroups; its own, because sandboxd
    /// sweeps every session cgroup under its parent when it starts.
    pub cgroup_parent: String,
    agents_dir: PathBuf,
    tools_dir: PathBuf,
    sandboxd_program: PathBuf,
    sandboxd: Child,
    control_plane: Child,
}

/// How to start a [`Cluster`].
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// The control plane's agents directory.
    pub agents_dir: PathBuf,
    /// Tool components for sandboxd: these files are copied into a tools
    /// directory of the cluster's own. `None`: the standard tools.
    pub tools: Option<Vec<PathBuf>>,
    /// Environment variables of the first control-plane process (e.g. the
    /// `HARNESS_CRASH_AT` test hook).
    pub control_plane_env: Vec<(String, String)>,
    /// Also listen on loopback TCP (`--listen 127.0.0.1:0`, a free port
    /// each), beside the Unix sockets; the ports are in
    /// [`Cluster::sandboxd_tcp`] and [`Cluster::control_tcp`] and stay the
    /// same over restarts.
    pub loopback_tcp: bool,
    /// Run sandboxd (and so its `sandbox-init`) from a copy in a directory
    /// only its owner may enter (`0700`), as from a clone made in
    /// `mktemp -d`: sandboxes must not need to walk the install path.
    pub private_install: bool,
}

impl ClusterOptions {
    /// The standard tools, agents from `agents_dir`.
    pub fn new(agents_dir: &Path) -> Self {
        Self {
            agents_dir: agents_dir.to_owned(),
            tools: None,
            control_plane_env: Vec::new(),
            loopback_tcp: false,
            private_install: false,
        }
    }
}

/// How long a daemon may take to answer health checks after starting.
const START_DEADLINE: Duration = Duration::from_secs(120);

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
        Self::start_with(ClusterOptions::new(agents_dir)).await
    }

    /// Starts both daemons as `options` say and waits until both answer
    /// health checks.
    pub async fn start_with(options: ClusterOptions) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("harness-")
            .tempdir()
            .context("cannot create a temp dir")?;
        let sandboxd_socket = dir.path().join("sandboxd.sock");
        let control_socket = dir.path().join("control-plane.sock");
        let sandboxd_endpoint = format!("unix:{}", sandboxd_socket.display());
        let control_endpoint = format!("unix:{}", control_socket.display());
        let tools_dir = match &options.tools {
            None => harness_tool_artifacts::tools_dir().to_owned(),
            Some(components) => {
                let tools_dir = dir.path().join("tools");
                std::fs::create_dir_all(&tools_dir)?;
                for component in components {
                    let name = component
                        .file_name()
                        .with_context(|| format!("{} has no file name", component.display()))?;
                    std::fs::copy(component, tools_dir.join(name))
                        .with_context(|| format!("cannot copy {}", component.display()))?;
                }
                tools_dir
            }
        };

        let cgroup_parent = format!("/harness-e2e-{}", uuid::Uuid::new_v4().simple());
        std::fs::write(
            dir.path().join("sandboxd.toml"),
            format!("[process]\ncgroup-parent = \"{cgroup_parent}\"\n"),
        )?;
        let tcp = options.loopback_tcp.then_some(LOOPBACK_ANY_PORT);
        let sandboxd_program = if options.private_install {
            install_privately(&dir.path().join("private"), &["sandboxd", "sandbox-init"])?
                .join("sandboxd")
        } else {
            binary("sandboxd")?
        };
        let sandboxd = spawn_sandboxd(
            &sandboxd_program,
            dir.path(),
            &sandboxd_endpoint,
            tcp,
            &tools_dir,
        )?;
        let mut cluster = Self {
            sandboxd_program,
            cgroup_parent,
            tools_dir,
            control_plane: spawn_control_plane(
                dir.path(),
                &control_endpoint,
                tcp,
                &sandboxd_endpoint,
                &options.agents_dir,
                &options.control_plane_env,
            )?,
            dir,
            sandboxd_endpoint,
            control_endpoint,
            sandboxd_tcp: None,
            control_tcp: None,
            agents_dir: options.agents_dir,
            sandboxd,
        };
        cluster.wait_sandboxd_healthy().await?;
        cluster.wait_control_plane_healthy().await?;
        if options.loopback_tcp {
            cluster.sandboxd_tcp = Some(cluster.announced_tcp("sandboxd")?);
            cluster.control_tcp = Some(cluster.announced_tcp("control-plane")?);
        }
        Ok(cluster)
    }

    async fn wait_sandboxd_healthy(&mut self) -> anyhow::Result<()> {
        wait_healthy(&self.sandboxd_endpoint, START_DEADLINE)
            .await
            .with_context(|| self.logs())
    }

    async fn wait_control_plane_healthy(&mut self) -> anyhow::Result<()> {
        wait_healthy(&self.control_endpoint, START_DEADLINE)
            .await
            .with_context(|| self.logs())
    }

    /// The TCP address daemon `name` announced (it is healthy, so it has
    /// announced every listener).
    fn announced_tcp(&self, name: &str) -> anyhow::Result<SocketAddr> {
        announced_addresses(&self.dir.path().join(format!("{name}.out")))?
            .into_iter()
            .find_map(|address| match address {
                ListenAddress::Tcp(tcp) => Some(tcp),
                ListenAddress::Unix(_) => None,
            })
            .with_context(|| format!("{name} announced no TCP listener\n{}", self.logs()))
    }

    /// Kills the control plane with SIGKILL (nothing flushed, nothing
    /// cleaned up) and waits until it is gone.
    pub async fn kill_control_plane(&mut self) -> anyhow::Result<std::process::ExitStatus> {
        self.control_plane
            .start_kill()
            .context("cannot SIGKILL the control plane")?;
        Ok(self.control_plane.wait().await?)
    }

    /// Waits (at most `within`) for the control plane to exit by itself, e.g.
    /// at a `HARNESS_CRASH_AT` point.
    pub async fn wait_control_plane_exit(
        &mut self,
        within: Duration,
    ) -> anyhow::Result<std::process::ExitStatus> {
        tokio::time::timeout(within, self.control_plane.wait())
            .await
            .with_context(|| format!("the control plane did not exit within {within:?}"))?
            .context("cannot wait for the control plane")
    }

    /// True while the control-plane process runs.
    pub fn control_plane_running(&mut self) -> bool {
        matches!(self.control_plane.try_wait(), Ok(None))
    }

    /// Starts a new control-plane process (the previous one must have
    /// exited) on the same database, socket and agents, with `env` added,
    /// and waits until it answers health checks.
    pub async fn restart_control_plane(&mut self, env: &[(String, String)]) -> anyhow::Result<()> {
        if self.control_plane_running() {
            bail!("the control plane is still running; kill it first");
        }
        self.control_plane = spawn_control_plane(
            self.dir.path(),
            &self.control_endpoint,
            self.control_tcp,
            &self.sandboxd_endpoint,
            &self.agents_dir,
            env,
        )?;
        self.wait_control_plane_healthy().await
    }

    /// Kills sandboxd with SIGKILL (nothing cleaned up) and waits until it
    /// is gone.
    pub async fn kill_sandboxd(&mut self) -> anyhow::Result<std::process::ExitStatus> {
        self.sandboxd
            .start_kill()
            .context("cannot SIGKILL sandboxd")?;
        Ok(self.sandboxd.wait().await?)
    }

    /// Starts a new sandboxd on the same state, socket, tools and config,
    /// and waits until it answers health checks.
    pub async fn restart_sandboxd(&mut self) -> anyhow::Result<()> {
        if matches!(self.sandboxd.try_wait(), Ok(None)) {
            bail!("sandboxd is still running; kill it first");
        }
        self.sandboxd = spawn_sandboxd(
            &self.sandboxd_program,
            self.dir.path(),
            &self.sandboxd_endpoint,
            self.sandboxd_tcp,
            &self.tools_dir,
        )?;
        self.wait_sandboxd_healthy().await
    }

    /// Directories of one sandbox session's cgroups, one per hierarchy
    /// that has it.
    pub fn session_cgroups(&self, sandbox_session_id: &str) -> Vec<PathBuf> {
        cgroup_mounts()
            .into_iter()
            .map(|mount| {
                mount
                    .join(self.cgroup_parent.trim_start_matches('/'))
                    .join("harness-sandboxd")
                    .join(sandbox_session_id)
            })
            .filter(|dir| dir.exists())
            .collect()
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

    /// Both daemons' logs and stdout, for failure messages.
    pub fn logs(&self) -> String {
        daemon_logs(self.dir.path(), &["sandboxd", "control-plane"])
    }

    /// Stops both daemons with SIGTERM (SIGKILL after 10 s) and removes the
    /// temp dir. Returns their exit statuses.
    pub async fn stop(
        mut self,
    ) -> anyhow::Result<(std::process::ExitStatus, std::process::ExitStatus)> {
        let control = terminate(&mut self.control_plane).await?;
        let sandboxd = terminate(&mut self.sandboxd).await?;
        remove_cgroup_parent(&self.cgroup_parent);
        Ok((control, sandboxd))
    }
}

/// The cgroup hierarchies' mount points (v1 controllers and v2).
fn cgroup_mounts() -> Vec<PathBuf> {
    std::fs::read_dir("/sys/fs/cgroup")
        .map(|entries| entries.flatten().map(|e| e.path()).collect())
        .unwrap_or_default()
}

/// Removes a cluster's (by now empty) cgroup parent in every hierarchy.
fn remove_cgroup_parent(parent: &str) {
    for mount in cgroup_mounts() {
        let dir = mount.join(parent.trim_start_matches('/'));
        let _ = std::fs::remove_dir(dir.join("harness-sandboxd"));
        let _ = std::fs::remove_dir(&dir);
    }
}

/// `--listen 127.0.0.1:0`: a free loopback port.
const LOOPBACK_ANY_PORT: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 0);

/// `--listen` flags: the Unix socket, and TCP if asked.
fn listen_args(unix_endpoint: &str, tcp: Option<SocketAddr>) -> Vec<String> {
    let mut args = vec!["--listen".to_owned(), unix_endpoint.to_owned()];
    if let Some(tcp) = tcp {
        args.extend(["--listen".to_owned(), tcp.to_string()]);
    }
    args
}

/// Copies the workspace binaries `names` into `root/bin`, `root` made
/// `0700`; returns the `bin` directory.
pub fn install_privately(root: &Path, names: &[&str]) -> anyhow::Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let bin = root.join("bin");
    std::fs::create_dir_all(&bin).with_context(|| format!("cannot create {}", bin.display()))?;
    std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("cannot make {} private", root.display()))?;
    for name in names {
        let source = binary(name)?;
        let target = bin.join(name);
        // A hard link costs nothing where the temp dir shares target/'s
        // file system; a copy works everywhere else.
        if std::fs::hard_link(&source, &target).is_err() {
            std::fs::copy(&source, &target).with_context(|| {
                format!("cannot copy {} to {}", source.display(), target.display())
            })?;
        }
    }
    Ok(bin)
}

fn spawn_sandboxd(
    program: &Path,
    dir: &Path,
    endpoint: &str,
    tcp: Option<SocketAddr>,
    tools_dir: &Path,
) -> anyhow::Result<Child> {
    spawn_daemon(
        Command::new(program)
            // Every default path (the compile cache, say) inside the cluster's dir.
            .env(HOME_VARIABLE, dir)
            .arg("serve")
            .arg("--config")
            .arg(dir.join("sandboxd.toml"))
            .args(listen_args(endpoint, tcp))
            .arg("--state-dir")
            .arg(dir.join("sandboxd-state"))
            .arg("--tools-dir")
            .arg(tools_dir),
        dir,
        "sandboxd",
    )
}

/// Starts a control plane whose database and log live in `dir`; the log is
/// appended to, so it tells the story of every restart.
fn spawn_control_plane(
    dir: &Path,
    endpoint: &str,
    tcp: Option<SocketAddr>,
    sandboxd_endpoint: &str,
    agents_dir: &Path,
    env: &[(String, String)],
) -> anyhow::Result<Child> {
    let mut command = Command::new(binary("control-plane")?);
    command
        .env(HOME_VARIABLE, dir)
        .arg("serve")
        .args(listen_args(endpoint, tcp))
        .arg("--sandboxd")
        .arg(sandboxd_endpoint)
        .arg("--database")
        .arg(dir.join("control-plane.db"))
        .arg("--agents-dir")
        .arg(agents_dir)
        .envs(env.iter().map(|(name, value)| (name, value)));
    spawn_daemon(&mut command, dir, "control-plane")
}

/// Starts `command` (killed when the handle drops) with its stderr appended
/// to `<dir>/<name>.log` and its stdout written to `<dir>/<name>.out`.
pub fn spawn_daemon(command: &mut Command, dir: &Path, name: &str) -> anyhow::Result<Child> {
    let log = dir.join(format!("{name}.log"));
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .with_context(|| format!("cannot create {}", log.display()))?;
    let out = dir.join(format!("{name}.out"));
    let out =
        std::fs::File::create(&out).with_context(|| format!("cannot create {}", out.display()))?;
    command
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {:?}", command.as_std().get_program()))
}

/// The `.log` and `.out` files of daemons `names` in `dir`, for failure
/// messages.
pub fn daemon_logs(dir: &Path, names: &[&str]) -> String {
    let read = |file: String| std::fs::read_to_string(dir.join(file)).unwrap_or_default();
    names
        .iter()
        .map(|name| {
            format!(
                "--- {name}.log ---\n{}\n--- {name}.out ---\n{}",
                read(format!("{name}.log")),
                read(format!("{name}.out"))
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The addresses a daemon announced on stdout (`listening on <address>`
/// lines in `stdout_file`), in order.
pub fn announced_addresses(stdout_file: &Path) -> anyhow::Result<Vec<ListenAddress>> {
    let text = std::fs::read_to_string(stdout_file)
        .with_context(|| format!("cannot read {}", stdout_file.display()))?;
    text.lines()
        .filter_map(|line| line.strip_prefix("listening on "))
        .map(|address| {
            address
                .parse()
                .with_context(|| format!("bad announcement in {}", stdout_file.display()))
        })
        .collect()
}

/// Sends SIGTERM, waits 10 s, then SIGKILLs; returns the exit status.
pub async fn terminate(child: &mut Child) -> anyhow::Result<std::process::ExitStatus> {
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
