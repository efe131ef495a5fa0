//! A fake sandboxd and an in-process control plane wired to it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use futures::stream::BoxStream;
use harness_control_plane::config::ControlPlaneConfig;
use harness_control_plane::server::{ControlPlane, Listener};
use harness_control_plane::transport::{self, ListenAddress};
use harness_proto::control::v1 as control;
use harness_proto::control::v1::control_service_client::ControlServiceClient;
use harness_proto::control::v1::session_event::Kind;
use harness_proto::sandbox::v1 as sandbox;
use harness_proto::sandbox::v1::sandbox_service_server::{SandboxService, SandboxServiceServer};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::{TcpListenerStream, UnixListenerStream};
use tonic::transport::{Channel, Server};
use tonic::{Request, Response, Status};

/// A path whose invocation starts and then never finishes.
pub const HANGING_PATH: &str = "hang/forever";

/// What the fake sandboxd saw.
#[derive(Debug, Default)]
pub struct SandboxRecord {
    /// Labels of each CreateSession.
    pub created: Vec<std::collections::HashMap<String, String>>,
    /// Policies of each CreateSession.
    pub policies: Vec<sandbox::SessionPolicy>,
    /// Each Invoke: (session, invocation id, tool, input as JSON).
    pub invocations: Vec<(String, String, String, serde_json::Value)>,
    /// Each DestroySession's session id.
    pub destroyed: Vec<String>,
    /// What `write_file` calls wrote, by (sandbox session, path).
    pub files: std::collections::BTreeMap<(String, String), String>,
}

/// The digest the fake reports for `content` (it is no hash: tests only
/// need it to name the contents).
pub fn fake_digest(content: &str) -> String {
    format!("digest-of-{content}")
}

/// A sandboxd stand-in with the three standard tools and canned answers.
#[derive(Debug, Clone, Default)]
pub struct FakeSandboxd {
    pub record: Arc<Mutex<SandboxRecord>>,
}

fn tool(name: &str, schema: &str) -> sandbox::Tool {
    sandbox::Tool {
        name: name.to_owned(),
        description: format!("{name} in the workspace"),
        input_schema_json: schema.to_owned(),
        output_schema_json: String::new(),
        backend: sandbox::Backend::Wasi.into(),
        digest: format!("sha256:{name}"),
    }
}

fn invalid_path(input: &serde_json::Value) -> Option<sandbox::ToolError> {
    if input.get("path").is_some_and(serde_json::Value::is_string) {
        return None;
    }
    Some(sandbox::ToolError {
        kind: sandbox::ErrorKind::InvalidInput.into(),
        message: "input does not match the tool's schema".to_owned(),
        violations: vec![sandbox::SchemaViolation {
            instance_path: "/path".to_owned(),
            message: format!("{} is not of type \"string\"", input["path"]),
        }],
    })
}

/// Canned outcome of a call: output chunks and the result.
fn answer(
    tool: &str,
    input: &serde_json::Value,
) -> (Vec<sandbox::OutputChunk>, sandbox::InvokeResult) {
    let usage = Some(sandbox::Usage {
        wall_time: Some(prost_types::Duration {
            seconds: 0,
            nanos: 2_000_000,
        }),
        peak_memory_bytes: 65536,
        ..Default::default()
    });
    if let Some(error) = invalid_path(input).filter(|_| tool != "list_dir") {
        let result = sandbox::InvokeResult {
            outcome: Some(sandbox::invoke_result::Outcome::Error(error)),
            usage,
            replayed: false,
        };
        return (Vec::new(), result);
    }
    let (output, chunks) = match tool {
        "write_file" => {
            let bytes = input["content"].as_str().map_or(0, str::len);
            (format!(r#"{{"bytes_written":{bytes}}}"#), Vec::new())
        }
        "list_dir" => (
            r#"{"entries":[{"name":"hello.txt","kind":"file"}]}"#.to_owned(),
            vec![sandbox::OutputChunk {
                stream: sandbox::OutputStream::Stderr.into(),
                data: b"listing notes\n".to_vec(),
                truncated: false,
            }],
        ),
        "read_file" => (
            r#"{"content":"Hello from the harness!\n"}"#.to_owned(),
            Vec::new(),
        ),
        _ => ("{}".to_owned(), Vec::new()),
    };
    let result = sandbox::InvokeResult {
        outcome: Some(sandbox::invoke_result::Outcome::Ok(
            sandbox::InvokeSuccess {
                output_json: output,
                exit_status: None,
            },
        )),
        usage,
        replayed: false,
    };
    (chunks, result)
}

#[tonic::async_trait]
impl SandboxService for FakeSandboxd {
    async fn capabilities(
        &self,
        _: Request<sandbox::CapabilitiesRequest>,
    ) -> Result<Response<sandbox::CapabilitiesResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn create_session(
        &self,
        request: Request<sandbox::CreateSessionRequest>,
    ) -> Result<Response<sandbox::CreateSessionResponse>, Status> {
        let request = request.into_inner();
        let mut record = self.record.lock().unwrap();
        record.created.push(request.labels.clone());
        record.policies.push(request.policy.unwrap_or_default());
        let session_id = format!("sb-{}", record.created.len());
        Ok(Response::new(sandbox::CreateSessionResponse {
            session: Some(sandbox::Session {
                session_id,
                labels: request.labels,
                ..Default::default()
            }),
        }))
    }

    async fn get_session(
        &self,
        _: Request<sandbox::GetSessionRequest>,
    ) -> Result<Response<sandbox::GetSessionResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn list_sessions(
        &self,
        _: Request<sandbox::ListSessionsRequest>,
    ) -> Result<Response<sandbox::ListSessionsResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn destroy_session(
        &self,
        request: Request<sandbox::DestroySessionRequest>,
    ) -> Result<Response<sandbox::DestroySessionResponse>, Status> {
        let session_id = request.into_inner().session_id;
        self.record
            .lock()
            .unwrap()
            .destroyed
            .push(session_id.clone());
        Ok(Response::new(sandbox::DestroySessionResponse {
            report: Some(sandbox::TeardownReport {
                session_id,
                cause: "requested".to_owned(),
                workspace_removed: true,
                ..Default::default()
            }),
        }))
    }

    async fn list_tools(
        &self,
        _: Request<sandbox::ListToolsRequest>,
    ) -> Result<Response<sandbox::ListToolsResponse>, Status> {
        let path = r#"{"type":"string"}"#;
        Ok(Response::new(sandbox::ListToolsResponse {
            tools: vec![
                tool(
                    "list_dir",
                    &format!(r#"{{"type":"object","properties":{{"path":{path}}}}}"#),
                ),
                tool(
                    "read_file",
                    &format!(
                        r#"{{"type":"object","required":["path"],"properties":{{"path":{path}}}}}"#
                    ),
                ),
                tool(
                    "write_file",
                    &format!(
                        r#"{{"type":"object","required":["path","content"],"properties":{{"path":{path},"content":{path}}}}}"#
                    ),
                ),
            ],
            load_errors: Vec::new(),
        }))
    }

    type InvokeStream = BoxStream<'static, Result<sandbox::InvokeEvent, Status>>;

    async fn invoke(
        &self,
        request: Request<sandbox::InvokeRequest>,
    ) -> Result<Response<Self::InvokeStream>, Status> {
        let request = request.into_inner();
        let Some(sandbox::invoke_request::Target::Wasi(call)) = request.target else {
            return Err(Status::invalid_argument(
                "fake sandboxd runs WASI calls only",
            ));
        };
        let input: serde_json::Value = serde_json::from_str(&call.input_json)
            .map_err(|error| Status::invalid_argument(error.to_string()))?;
        {
            let mut record = self.record.lock().unwrap();
            if call.tool == "write_file"
                && let (Some(path), Some(content)) =
                    (input["path"].as_str(), input["content"].as_str())
            {
                record.files.insert(
                    (request.session_id.clone(), path.to_owned()),
                    content.to_owned(),
                );
            }
            record.invocations.push((
                request.session_id,
                request.invocation_id.clone(),
                call.tool.clone(),
                input.clone(),
            ));
        }
        let started = sandbox::InvokeEvent {
            event: Some(sandbox::invoke_event::Event::Started(
                sandbox::InvokeStarted {
                    invocation_id: request.invocation_id,
                    backend: sandbox::Backend::Wasi.into(),
                    digest: format!("sha256:{}", call.tool),
                },
            )),
        };
        if input["path"] == HANGING_PATH {
            let hanging = futures::stream::iter([Ok(started)]).chain(futures::stream::pending());
            return Ok(Response::new(Box::pin(hanging)));
        }
        let (chunks, result) = answer(&call.tool, &input);
        let outputs = chunks.into_iter().map(|chunk| sandbox::InvokeEvent {
            event: Some(sandbox::invoke_event::Event::Output(chunk)),
        });
        let end = sandbox::InvokeEvent {
            event: Some(sandbox::invoke_event::Event::Result(result)),
        };
        let events: Vec<_> = std::iter::once(started)
            .chain(outputs)
            .chain([end])
            .map(Ok)
            .collect();
        Ok(Response::new(Box::pin(futures::stream::iter(events))))
    }

    async fn write_files(
        &self,
        _: Request<sandbox::WriteFilesRequest>,
    ) -> Result<Response<sandbox::WriteFilesResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn read_files(
        &self,
        request: Request<sandbox::ReadFilesRequest>,
    ) -> Result<Response<sandbox::ReadFilesResponse>, Status> {
        let request = request.into_inner();
        let record = self.record.lock().unwrap();
        let limit = match request.max_bytes_per_file {
            0 => usize::MAX,
            limit => usize::try_from(limit).unwrap(),
        };
        let mut files = Vec::new();
        for path in request.paths {
            match record
                .files
                .get(&(request.session_id.clone(), path.clone()))
            {
                Some(content) => files.push(sandbox::FileContent {
                    content: content.as_bytes()[..content.len().min(limit)].to_vec(),
                    size: content.len() as u64,
                    truncated: content.len() > limit,
                    sha256: fake_digest(content),
                    missing: false,
                    path,
                }),
                None if request.allow_missing => files.push(sandbox::FileContent {
                    path,
                    missing: true,
                    ..Default::default()
                }),
                None => return Err(Status::not_found(format!("no file {path}"))),
            }
        }
        Ok(Response::new(sandbox::ReadFilesResponse { files }))
    }
}

/// Which sockets the test uses for both servers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sockets {
    Tcp,
    Unix,
}

/// The "checker" agent: one call with an invalid path, then an answer.
const CHECKER_AGENT: &str = r#"
name = "checker"
description = "Reads a file with a bad path"
provider = "scripted"
model = "scripted-checker"
script = "checker.script.toml"
tools = ["read_file"]
max-turns = 3
"#;

const CHECKER_SCRIPT: &str = r#"
[[turn]]
text = "Reading."
[[turn.tool-calls]]
tool = "read_file"
arguments = { path = 42 }

[[turn]]
text = "The path must be a string."
"#;

/// The "asker" agent: a write_file call that needs approval, then an answer.
const ASKER_AGENT: &str = r#"
name = "asker"
provider = "scripted"
model = "scripted-asker"
script = "asker.script.toml"
tools = ["write_file"]

[budget]
max-tool-calls = 5

[[policy.rule]]
tool = "write_file"
when = { path = "notes/*" }
verdict = "ask"
reason = "writes need a human"
"#;

const ASKER_SCRIPT: &str = r#"
[[turn]]
text = "Writing."
[[turn.tool-calls]]
tool = "write_file"
arguments = { path = "notes/a.txt", content = "hi" }

[[turn]]
text = "Written, or not."
"#;

/// The "waiter" agent: one call that never finishes (until cancelled).
const WAITER_AGENT: &str = r#"
name = "waiter"
provider = "scripted"
model = "scripted-waiter"
script = "waiter.script.toml"
tools = ["read_file"]
"#;

const WAITER_SCRIPT: &str = r#"
[[turn]]
text = "Waiting."
[[turn.tool-calls]]
tool = "read_file"
arguments = { path = "hang/forever" }
"#;

/// A running control plane (and fake sandboxd); both stop on drop.
pub struct TestPlane {
    _dir: tempfile::TempDir,
    pub endpoint: String,
    pub sandboxd: FakeSandboxd,
    pub client: ControlServiceClient<Channel>,
    stops: Vec<oneshot::Sender<()>>,
    server: Option<JoinHandle<Result<(), harness_control_plane::server::ServerError>>>,
}

impl TestPlane {
    /// Starts a fake sandboxd and a control plane with the shipped demo agent
    /// and the checker and waiter agents.
    pub async fn start(sockets: Sockets) -> Self {
        Self::start_with_agents(sockets, &[]).await
    }

    /// Like [`TestPlane::start`], with more agent files (name, contents).
    pub async fn start_with_agents(sockets: Sockets, extra: &[(&str, &str)]) -> Self {
        Self::start_configured(sockets, extra, |_| {}).await
    }

    /// Like [`TestPlane::start_with_agents`], with the configuration changed
    /// by `configure` before the control plane opens.
    pub async fn start_configured(
        sockets: Sockets,
        extra: &[(&str, &str)],
        configure: impl FnOnce(&mut ControlPlaneConfig),
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let agents_dir = dir.path().join("agents");
        write_agents(&agents_dir);
        for (name, contents) in extra {
            // A name may hold folders (`skills/<skill>/SKILL.md`).
            let file = agents_dir.join(name);
            std::fs::create_dir_all(file.parent().unwrap()).unwrap();
            std::fs::write(file, contents).unwrap();
        }
        let sandboxd = FakeSandboxd::default();
        let (sandbox_stop, sandbox_endpoint) =
            serve_fake_sandboxd(sandboxd.clone(), sockets, dir.path()).await;
        let listen = match sockets {
            Sockets::Tcp => "127.0.0.1:0".to_owned(),
            Sockets::Unix => format!("unix:{}", dir.path().join("run/cp.sock").display()),
        };
        let mut config = ControlPlaneConfig {
            listen: vec![listen.parse().unwrap()],
            sandboxd: sandbox_endpoint,
            database: dir.path().join("state/cp.db"),
            agents_dir,
            tool_timeout: Duration::from_secs(10),
            max_parallel_tool_calls: 2,
            ..ControlPlaneConfig::default()
        };
        configure(&mut config);
        let plane = ControlPlane::open(&config).await.unwrap();
        let listener = Listener::bind(&listen.parse().unwrap()).await.unwrap();
        let endpoint = match listener.local_address().clone() {
            ListenAddress::Tcp(address) => format!("http://{address}"),
            unix @ ListenAddress::Unix(_) => unix.to_string(),
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(plane.serve(listener, async {
            let _ = stopped.await;
        }));
        let client = ControlServiceClient::new(transport::connect_lazy(&endpoint).unwrap());
        Self {
            _dir: dir,
            endpoint,
            sandboxd,
            client,
            stops: vec![stop, sandbox_stop],
            server: Some(server),
        }
    }

    /// Stops the control plane and waits for it to finish serving.
    pub async fn shut_down(mut self) {
        for stop in self.stops.drain(..) {
            let _ = stop.send(());
        }
        if let Some(server) = self.server.take() {
            tokio::time::timeout(Duration::from_secs(10), server)
                .await
                .expect("server stops within 10s")
                .unwrap()
                .unwrap();
        }
    }

    /// Waits until the session has a call awaiting approval; returns its id.
    pub async fn pending_approval(&self, session_id: &str) -> String {
        let mut client = self.client.clone();
        let mut stream = client
            .stream_events(control::StreamEventsRequest {
                session_id: session_id.to_owned(),
                after_seq: 0,
                follow: false,
            })
            .await
            .unwrap()
            .into_inner();
        let waiting = async {
            while let Some(event) = stream.next().await {
                if let Some(Kind::ApprovalRequested(request)) = event.unwrap().kind {
                    return request.call_id;
                }
            }
            panic!("the session ended without asking for approval");
        };
        tokio::time::timeout(Duration::from_secs(10), waiting)
            .await
            .expect("an approval is requested within 10s")
    }

    /// Starts a session and returns the response.
    pub async fn start_session(&self, agent: &str, key: &str) -> control::StartSessionResponse {
        self.client
            .clone()
            .start_session(control::StartSessionRequest {
                agent: agent.to_owned(),
                input: "Leave a note in the workspace.".to_owned(),
                idempotency_key: key.to_owned(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
    }

    /// Every event after `after_seq` until the stream ends (at `finished`).
    pub async fn events(&self, session_id: &str, after_seq: u64) -> Vec<control::SessionEvent> {
        let stream = self
            .client
            .clone()
            .stream_events(control::StreamEventsRequest {
                session_id: session_id.to_owned(),
                after_seq,
                follow: false,
            })
            .await
            .unwrap()
            .into_inner();
        tokio::time::timeout(
            Duration::from_secs(10),
            stream.map(|e| e.unwrap()).collect(),
        )
        .await
        .expect("the session finishes within 10s")
    }

    /// The session as GetSession shows it.
    pub async fn session(&self, session_id: &str) -> control::Session {
        self.client
            .clone()
            .get_session(control::GetSessionRequest {
                session_id: session_id.to_owned(),
            })
            .await
            .unwrap()
            .into_inner()
            .session
            .unwrap()
    }
}

impl Drop for TestPlane {
    fn drop(&mut self) {
        for stop in self.stops.drain(..) {
            let _ = stop.send(());
        }
    }
}

fn write_agents(agents_dir: &Path) {
    let shipped = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("agents");
    std::fs::create_dir_all(agents_dir).unwrap();
    for file in ["demo.toml", "demo.script.toml"] {
        std::fs::copy(shipped.join(file), agents_dir.join(file)).unwrap();
    }
    std::fs::write(agents_dir.join("checker.toml"), CHECKER_AGENT).unwrap();
    std::fs::write(agents_dir.join("checker.script.toml"), CHECKER_SCRIPT).unwrap();
    std::fs::write(agents_dir.join("waiter.toml"), WAITER_AGENT).unwrap();
    std::fs::write(agents_dir.join("asker.toml"), ASKER_AGENT).unwrap();
    std::fs::write(agents_dir.join("asker.script.toml"), ASKER_SCRIPT).unwrap();
    std::fs::write(agents_dir.join("waiter.script.toml"), WAITER_SCRIPT).unwrap();
}

async fn serve_fake_sandboxd(
    sandboxd: FakeSandboxd,
    sockets: Sockets,
    dir: &Path,
) -> (oneshot::Sender<()>, String) {
    let (stop, stopped) = oneshot::channel::<()>();
    let shutdown = async {
        let _ = stopped.await;
    };
    let router = Server::builder().add_service(SandboxServiceServer::new(sandboxd));
    let endpoint = match sockets {
        Sockets::Tcp => {
            let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
                .await
                .unwrap();
            let address = listener.local_addr().unwrap();
            let incoming = TcpListenerStream::new(listener);
            tokio::spawn(router.serve_with_incoming_shutdown(incoming, shutdown));
            format!("http://{address}")
        }
        Sockets::Unix => {
            let path = dir.join("sandboxd.sock");
            let listener = tokio::net::UnixListener::bind(&path).unwrap();
            let incoming = UnixListenerStream::new(listener);
            tokio::spawn(router.serve_with_incoming_shutdown(incoming, shutdown));
            format!("unix:{}", path.display())
        }
    };
    (stop, endpoint)
}

/// The kind and key fields of an event, one line: what the tests compare.
pub fn describe(event: &control::SessionEvent) -> String {
    let what = match event.kind.as_ref().unwrap() {
        Kind::Started(started) => format!("started {} {:?}", started.agent, started.input),
        Kind::TextDelta(delta) => format!("text {:?}", delta.text),
        Kind::ToolCallRequested(call) => format!("requested {} {}", call.call_id, call.tool),
        Kind::PolicyDecision(decision) => format!(
            "policy {} {} {}",
            decision.call_id,
            decision.verdict().as_str_name(),
            decision.rule
        ),
        Kind::ToolStarted(started) => format!(
            "tool_started {} {} {}",
            started.call_id, started.tool, started.sandbox_session_id
        ),
        Kind::ToolOutput(output) => format!(
            "output {} {} {:?}",
            output.call_id,
            output.stream,
            String::from_utf8_lossy(&output.data)
        ),
        Kind::ToolFinished(finished) => match finished.outcome.as_ref().unwrap() {
            control::tool_finished::Outcome::OutputJson(json) => {
                format!("tool_finished {} ok {json}", finished.call_id)
            }
            control::tool_finished::Outcome::Error(error) => format!(
                "tool_finished {} {} {}",
                finished.call_id,
                error.kind().as_str_name(),
                error.message
            ),
        },
        Kind::ApprovalRequested(request) => {
            format!("approval_requested {} {}", request.call_id, request.reason)
        }
        Kind::ApprovalResolved(resolved) => format!(
            "approval_resolved {} {} by {} {:?}",
            resolved.call_id,
            resolved.decision().as_str_name(),
            resolved.resolved_by,
            resolved.reason
        ),
        Kind::TurnCompleted(turn) => format!(
            "turn_completed {} {} calls={}",
            turn.turn, turn.model_stop_reason, turn.tool_calls
        ),
        Kind::Finished(finished) => format!(
            "finished {} {:?}",
            finished.stop_reason().as_str_name(),
            finished.final_output
        ),
        Kind::SubagentStarted(started) => format!(
            "subagent_started {} {} {}",
            started.call_id, started.agent, started.child_session_id
        ),
        Kind::SubagentFinished(finished) => format!(
            "subagent_finished {} {} {}",
            finished.call_id,
            finished.status().as_str_name(),
            finished.stop_reason().as_str_name()
        ),
        Kind::OutputRejected(rejected) => {
            format!("output_rejected {} {}", rejected.attempt, rejected.errors)
        }
        Kind::Handoff(handoff) => format!(
            "handoff {} -> {} {:?}",
            handoff.from_agent, handoff.to_agent, handoff.reason
        ),
        other => format!("unexpected {other:?}"),
    };
    format!("{} t{} {what}", event.seq, event.turn)
}
