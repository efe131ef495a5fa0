//! A sandboxd served in-process for one test.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use harness_proto::sandbox::v1 as pb;
use harness_proto::sandbox::v1::sandbox_service_client::SandboxServiceClient;
use harness_sandboxd::config::SandboxdConfig;
use harness_sandboxd::probe::HostProbe;
use harness_sandboxd::server::{Listener, serve};
use harness_sandboxd::service::Sandboxd;
use tokio::sync::oneshot;
use tonic::transport::Channel;

/// Every test daemon holds this shared; tests that measure memory or timing
/// hold it exclusively, so no other test in this process runs beside them and
/// skews the measurement.
static RUNNING: std::sync::LazyLock<Arc<tokio::sync::RwLock<()>>> =
    std::sync::LazyLock::new(|| Arc::new(tokio::sync::RwLock::new(())));

#[allow(dead_code)] // held for its Drop
enum Turn {
    Shared(tokio::sync::OwnedRwLockReadGuard<()>),
    Exclusive(tokio::sync::OwnedRwLockWriteGuard<()>),
}

pub struct TestDaemon {
    pub client: SandboxServiceClient<Channel>,
    pub channel: Channel,
    pub daemon: Arc<Sandboxd>,
    pub dir: tempfile::TempDir,
    stop: Option<oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<()>>,
    _turn: Turn,
    _cgroups: Option<CgroupParentGuard>,
}

/// Removes a test daemon's cgroup parent (in every hierarchy) when dropped.
pub struct CgroupParentGuard(String);

impl Drop for CgroupParentGuard {
    fn drop(&mut self) {
        // Sessions a failed test never destroyed.
        if let Ok(hierarchy) =
            harness_sandboxd::process::cgroup::CgroupHierarchy::from_host(Some(&self.0))
        {
            let _ = hierarchy.sweep_leftovers();
        }
        let Ok(mounts) = std::fs::read_dir("/sys/fs/cgroup") else {
            return;
        };
        for mount in mounts.flatten() {
            let parent = mount.path().join(self.0.trim_start_matches('/'));
            let _ = std::fs::remove_dir(parent.join("harness-sandboxd"));
            let _ = std::fs::remove_dir(&parent);
        }
    }
}

/// Panics with what is missing unless this host can run process sandboxes:
/// these tests must fail loudly, never pass silently, where they cannot run.
/// The `sandbox-init` of this build, where sandboxd looks for it by default:
/// next to the `sandboxd` binary. It is the `harness-sandbox-init` package's
/// binary, which `cargo test --workspace` builds.
pub fn sandbox_init_program() -> PathBuf {
    let path = harness_sandboxd::process::init_program::default_path(Path::new(env!(
        "CARGO_BIN_EXE_sandboxd"
    )));
    assert!(
        path.is_file(),
        "{} is missing: build it with `cargo build -p harness-sandbox-init` (`cargo test \
         --workspace` does)",
        path.display()
    );
    path
}

pub fn require_process_sandbox_host() -> HostProbe {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "process sandbox tests need root (CI runs as root)"
    );
    let host = harness_sandboxd::probe::probe_host();
    assert!(
        host.user_namespaces && host.seccomp_filter,
        "process sandbox tests need user namespaces and seccomp: {:?}",
        host.missing
    );
    host
}

impl TestDaemon {
    /// Starts a daemon whose tools dir holds the standard tools.
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    /// Starts a daemon after `prepare` has had a chance to edit its tools dir
    /// (passed in) and config.
    pub async fn start_with(prepare: impl FnOnce(&mut SandboxdConfig)) -> Self {
        let turn = Turn::Shared(Arc::clone(&RUNNING).read_owned().await);
        Self::start_in_turn(turn, HostProbe::default(), prepare).await
    }

    /// Starts a daemon whose process backend works: the real host probe,
    /// `sandbox-init` from this build, and a cgroup parent of its own (a
    /// daemon sweeps every session cgroup under its parent at start-up).
    pub async fn start_process(prepare: impl FnOnce(&mut SandboxdConfig)) -> Self {
        let host = require_process_sandbox_host();
        let turn = Turn::Shared(Arc::clone(&RUNNING).read_owned().await);
        let parent = format!("/harness-test-{}", uuid::Uuid::new_v4().simple());
        let mut daemon = Self::start_in_turn(turn, host, |config| {
            config.process.init_program = Some(sandbox_init_program());
            config.process.cgroup_parent = Some(parent.clone());
            prepare(config);
        })
        .await;
        daemon._cgroups = Some(CgroupParentGuard(parent));
        daemon
    }

    /// Starts a daemon with the test tools that runs alone in this process.
    pub async fn start_exclusive(prepare: impl FnOnce(&mut SandboxdConfig)) -> Self {
        let turn = Turn::Exclusive(Arc::clone(&RUNNING).write_owned().await);
        Self::start_in_turn(turn, HostProbe::default(), |config| {
            install_test_tools(config);
            prepare(config);
        })
        .await
    }

    async fn start_in_turn(
        turn: Turn,
        host: HostProbe,
        prepare: impl FnOnce(&mut SandboxdConfig),
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let tools_dir = dir.path().join("tools");
        std::fs::create_dir_all(&tools_dir).unwrap();
        for name in harness_tool_artifacts::STANDARD_TOOLS {
            let src = harness_tool_artifacts::tool_path(name);
            std::fs::copy(&src, tools_dir.join(format!("{name}.wasm"))).unwrap();
        }
        let mut config = SandboxdConfig {
            listen: vec![
                format!("unix:{}", dir.path().join("sandboxd.sock").display())
                    .parse()
                    .unwrap(),
            ],
            state_dir: dir.path().join("state"),
            tools_dir,
            // One compile cache for the whole test run keeps tests fast.
            cache_dir: Some(shared_cache_dir()),
            ..SandboxdConfig::default()
        };
        prepare(&mut config);
        let daemon = Sandboxd::start(config.clone(), host).await.unwrap();
        let listener = Listener::bind(&config.listen[0]).await.unwrap();
        let endpoint = listener.endpoint();
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(serve(Arc::clone(&daemon), listener, async {
            let _ = stopped.await;
        }));
        let server = tokio::spawn(async move {
            server.await.unwrap().unwrap();
        });
        let channel = connect(&endpoint).await;
        Self {
            client: SandboxServiceClient::new(channel.clone()),
            channel,
            daemon,
            dir,
            stop: Some(stop),
            server: Some(server),
            _turn: turn,
            _cgroups: None,
        }
    }

    /// Starts a daemon with the standard tools plus the test tools
    /// (`misbehave`, `tally`).
    pub async fn start_with_test_tools(prepare: impl FnOnce(&mut SandboxdConfig)) -> Self {
        Self::start_with(|config| {
            install_test_tools(config);
            prepare(config);
        })
        .await
    }

    pub fn tools_dir(&self) -> PathBuf {
        self.daemon.config.tools_dir.clone()
    }

    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(server) = self.server.take() {
            server.await.unwrap();
        }
    }

    pub async fn create_session(&mut self) -> pb::Session {
        self.create_session_with(pb::SessionPolicy::default()).await
    }

    pub async fn create_session_with(&mut self, policy: pb::SessionPolicy) -> pb::Session {
        self.client
            .create_session(pb::CreateSessionRequest {
                policy: Some(policy),
                labels: Default::default(),
            })
            .await
            .unwrap()
            .into_inner()
            .session
            .unwrap()
    }

    /// The daemon's own record of the session `session_id`.
    pub fn held(
        &self,
        session_id: &str,
    ) -> Result<Arc<harness_sandboxd::session::Session>, harness_sandboxd::session::SessionError>
    {
        self.daemon
            .sessions
            .get(&harness_sandboxd::ids::SandboxSessionId::new(session_id))
    }

    pub fn workspace_of(&self, session_id: &str) -> PathBuf {
        self.daemon.config.sessions_dir().join(session_id)
    }

    /// Asserts, from the host, that the files at the top of a session's
    /// workspace hold at most `cap` bytes.
    pub fn assert_workspace_within(&self, session_id: &str, cap: u64) {
        let used: u64 = std::fs::read_dir(self.workspace_of(session_id))
            .unwrap()
            .map(|entry| entry.unwrap().metadata().unwrap().len())
            .sum();
        assert!(
            used <= cap,
            "the workspace holds {used} bytes, over its cap of {cap}"
        );
    }

    /// Invokes a WASI tool and collects the whole stream.
    pub async fn invoke(
        &mut self,
        session_id: &str,
        invocation_id: &str,
        tool: &str,
        input: serde_json::Value,
    ) -> Invoked {
        invoke_on(&mut self.client, session_id, invocation_id, tool, input).await
    }
}

/// Runs a command in a process session and collects the whole stream.
pub async fn exec_on(
    client: &mut SandboxServiceClient<Channel>,
    session_id: &str,
    invocation_id: &str,
    call: pb::ProcessCall,
    timeout: Option<std::time::Duration>,
) -> Invoked {
    let request = pb::InvokeRequest {
        session_id: session_id.to_owned(),
        invocation_id: invocation_id.to_owned(),
        target: Some(pb::invoke_request::Target::Process(call)),
        timeout: timeout.map(harness_proto::duration_to_proto),
    };
    collect(client.invoke(request).await.unwrap().into_inner()).await
}

/// A shell command line as a process call.
pub fn sh(command: &str) -> pb::ProcessCall {
    pb::ProcessCall {
        shell: command.to_owned(),
        ..Default::default()
    }
}

fn install_test_tools(config: &SandboxdConfig) {
    for name in harness_tool_artifacts::TEST_TOOLS {
        let src = harness_tool_artifacts::test_tool_path(name);
        std::fs::copy(&src, config.tools_dir.join(format!("{name}.wasm"))).unwrap();
    }
}

/// Invokes a WASI tool on any client and collects the whole stream.
pub async fn invoke_on(
    client: &mut SandboxServiceClient<Channel>,
    session_id: &str,
    invocation_id: &str,
    tool: &str,
    input: serde_json::Value,
) -> Invoked {
    let request = pb::InvokeRequest {
        session_id: session_id.to_owned(),
        invocation_id: invocation_id.to_owned(),
        target: Some(pb::invoke_request::Target::Wasi(pb::WasiCall {
            tool: tool.to_owned(),
            input_json: input.to_string(),
        })),
        timeout: None,
    };
    collect(client.invoke(request).await.unwrap().into_inner()).await
}

/// Everything an Invoke stream carried.
#[derive(Debug, Default)]
pub struct Invoked {
    pub started: Option<pb::InvokeStarted>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub truncated: bool,
    pub result: Option<pb::InvokeResult>,
}

impl Invoked {
    pub fn ok_json(&self) -> serde_json::Value {
        match self.result.as_ref().and_then(|r| r.outcome.clone()) {
            Some(pb::invoke_result::Outcome::Ok(ok)) => {
                serde_json::from_str(&ok.output_json).unwrap()
            }
            other => panic!("expected success, got {other:?}"),
        }
    }

    pub fn error(&self) -> pb::ToolError {
        match self.result.as_ref().and_then(|r| r.outcome.clone()) {
            Some(pb::invoke_result::Outcome::Error(error)) => error,
            other => panic!("expected an error, got {other:?}"),
        }
    }

    pub fn error_kind(&self) -> pb::ErrorKind {
        pb::ErrorKind::try_from(self.error().kind).unwrap()
    }
}

pub async fn collect(mut stream: tonic::Streaming<pb::InvokeEvent>) -> Invoked {
    let mut invoked = Invoked::default();
    while let Some(event) = stream.message().await.unwrap() {
        match event.event.unwrap() {
            pb::invoke_event::Event::Started(started) => {
                assert!(invoked.started.is_none(), "two started events");
                invoked.started = Some(started);
            }
            pb::invoke_event::Event::Output(chunk) => {
                assert!(invoked.result.is_none(), "output after the result");
                invoked.truncated |= chunk.truncated;
                match pb::OutputStream::try_from(chunk.stream).unwrap() {
                    pb::OutputStream::Stdout => invoked.stdout.extend(chunk.data),
                    _ => invoked.stderr.extend(chunk.data),
                }
            }
            pb::invoke_event::Event::Result(result) => {
                assert!(invoked.result.is_none(), "two results");
                invoked.result = Some(result);
            }
        }
    }
    assert!(invoked.started.is_some(), "stream without a started event");
    assert!(invoked.result.is_some(), "stream without a result");
    invoked
}

pub async fn connect(endpoint: &str) -> Channel {
    let path = PathBuf::from(endpoint.strip_prefix("unix:").unwrap());
    tonic::transport::Endpoint::from_static("http://[::]:50051")
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(path).await?,
                ))
            }
        }))
        .await
        .unwrap()
}

fn shared_cache_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("sandboxd-test-cache");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
