//! The `harness.sandbox.v1.SandboxService` implementation: request checking
//! and plumbing only; the work happens in [`crate::session`],
//! [`crate::workspace`] and [`crate::wasi`].

use std::hash::{Hash, Hasher};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use harness_proto::sandbox::v1 as pb;
use harness_proto::sandbox::v1::sandbox_service_server::SandboxService;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status};

use crate::config::SandboxdConfig;
use crate::error::ServiceError;
use crate::probe::HostProbe;
use crate::process::exec_tool::{EXEC_TOOL, ParsedExec};
use crate::process::sandbox::Command;
use crate::session::{Claim, InvocationRecord, Session, SessionManager};
use crate::wasi::backend::{Completed, WasiBackend};
use crate::workspace::{CapReached, Workspace};

/// Everything the daemon holds.
#[derive(Debug)]
pub struct Sandboxd {
    /// Configuration.
    pub config: Arc<SandboxdConfig>,
    /// Host probe results.
    pub host: Arc<HostProbe>,
    /// Sessions.
    pub sessions: SessionManager,
    /// The WASI backend.
    pub wasi: WasiBackend,
}

/// Invocations that may run at once; also the size of the wasmtime pool.
pub const MAX_CONCURRENT_INVOCATIONS: u32 = 1000;

/// Longest accepted `invocation_id`.
const MAX_INVOCATION_ID_LEN: usize = 256;

impl Sandboxd {
    /// Builds the daemon state: probes nothing of the kernel (pass the probe
    /// in), cleans up after a crashed instance, checks that a workspace can
    /// be created on the configured storage, and loads the tools directory.
    pub async fn start(
        config: SandboxdConfig,
        host: HostProbe,
    ) -> Result<Arc<Self>, crate::StartError> {
        let config = Arc::new(config);
        let wasi = WasiBackend::new(&config, MAX_CONCURRENT_INVOCATIONS)
            .map_err(crate::StartError::Wasi)?;
        let sessions = SessionManager::new(Arc::clone(&config), Arc::new(host.clone()))
            .map_err(crate::StartError::InitProgram)?;
        let leftovers =
            sessions
                .clean_up_after_crash()
                .map_err(|source| crate::StartError::StateDir {
                    path: config.sessions_dir(),
                    source,
                })?;
        if leftovers > 0 {
            tracing::warn!(
                leftovers,
                "removed sessions left behind by a previous sandboxd instance"
            );
        }
        Workspace::probe(&config.sessions_dir(), config.workspace_storage())
            .map_err(crate::StartError::WorkspaceStorage)?;
        wasi.rescan().await;
        Ok(Arc::new(Self {
            config,
            host: Arc::new(host),
            sessions,
            wasi,
        }))
    }

    /// Reaps expired sessions and rescans tools until `shutdown` resolves.
    pub async fn run_housekeeping(
        self: Arc<Self>,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        let mut reap = tokio::time::interval(Duration::from_secs(1));
        let mut rescan = tokio::time::interval(self.config.tools_rescan_interval);
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => return,
                _ = reap.tick() => { self.sessions.reap_expired().await; }
                _ = rescan.tick() => self.wasi.rescan().await,
            }
        }
    }
}

/// The gRPC service.
#[derive(Debug, Clone)]
pub struct SandboxApi {
    daemon: Arc<Sandboxd>,
}

impl SandboxApi {
    /// Serves `daemon`.
    pub fn new(daemon: Arc<Sandboxd>) -> Self {
        Self { daemon }
    }
}

type InvokeStream = Pin<Box<dyn Stream<Item = Result<pb::InvokeEvent, Status>> + Send>>;

#[tonic::async_trait]
impl SandboxService for SandboxApi {
    async fn capabilities(
        &self,
        _request: Request<pb::CapabilitiesRequest>,
    ) -> Result<Response<pb::CapabilitiesResponse>, Status> {
        let daemon = &self.daemon;
        let config = &daemon.config;
        Ok(Response::new(pb::CapabilitiesResponse {
            daemon_version: env!("CARGO_PKG_VERSION").to_owned(),
            backends: vec![
                pb::BackendAvailability {
                    backend: pb::Backend::Wasi as i32,
                    available: true,
                    reason: String::new(),
                },
                match daemon.sessions.process_backend().availability() {
                    Ok(()) => pb::BackendAvailability {
                        backend: pb::Backend::Process as i32,
                        available: true,
                        reason: String::new(),
                    },
                    Err(reason) => pb::BackendAvailability {
                        backend: pb::Backend::Process as i32,
                        available: false,
                        reason,
                    },
                },
            ],
            isolation: Some(daemon.host.to_proto()),
            limits: Some(pb::DaemonLimits {
                max_sessions: config.max_sessions,
                max_file_bytes: config.max_file_bytes,
                max_input_bytes: config.max_input_bytes,
                max_invocation_timeout: Some(harness_proto::duration_to_proto(
                    config.max_invocation_timeout,
                )),
                max_memory_bytes: config.max_memory_bytes,
            }),
            load: Some(pb::Load {
                sessions: u32::try_from(daemon.sessions.len()).unwrap_or(u32::MAX),
                running_invocations: daemon.sessions.running_invocations(),
            }),
        }))
    }

    async fn create_session(
        &self,
        request: Request<pb::CreateSessionRequest>,
    ) -> Result<Response<pb::CreateSessionResponse>, Status> {
        let request = request.into_inner();
        let policy = request.policy.unwrap_or_default();
        let session = self
            .daemon
            .sessions
            .create(&policy, request.labels)
            .map_err(ServiceError::from)?;
        if let Err(error) = self.daemon.sessions.start_process_sandbox(&session).await {
            self.daemon
                .sessions
                .destroy(&session.id, "process sandbox failed to start")
                .await;
            return Err(ServiceError::from(error).into());
        }
        tracing::info!(session = %session.id, "session created");
        Ok(Response::new(pb::CreateSessionResponse {
            session: Some(session.to_proto()),
        }))
    }

    async fn get_session(
        &self,
        request: Request<pb::GetSessionRequest>,
    ) -> Result<Response<pb::GetSessionResponse>, Status> {
        let session = self.session(&request.into_inner().session_id)?;
        Ok(Response::new(pb::GetSessionResponse {
            session: Some(session.to_proto()),
        }))
    }

    async fn list_sessions(
        &self,
        _request: Request<pb::ListSessionsRequest>,
    ) -> Result<Response<pb::ListSessionsResponse>, Status> {
        Ok(Response::new(pb::ListSessionsResponse {
            sessions: self
                .daemon
                .sessions
                .list()
                .iter()
                .map(|s| s.to_proto())
                .collect(),
        }))
    }

    async fn destroy_session(
        &self,
        request: Request<pb::DestroySessionRequest>,
    ) -> Result<Response<pb::DestroySessionResponse>, Status> {
        let request = request.into_inner();
        let report = self
            .daemon
            .sessions
            .destroy(&request.session_id, "requested")
            .await;
        Ok(Response::new(pb::DestroySessionResponse {
            report: Some(report),
        }))
    }

    async fn list_tools(
        &self,
        _request: Request<pb::ListToolsRequest>,
    ) -> Result<Response<pb::ListToolsResponse>, Status> {
        let mut tools = self.daemon.wasi.list_tools();
        if self
            .daemon
            .sessions
            .process_backend()
            .availability()
            .is_ok()
        {
            tools.tools.push(crate::process::exec_tool::tool());
            tools.tools.sort_by(|a, b| a.name.cmp(&b.name));
        }
        Ok(Response::new(tools))
    }

    type InvokeStream = InvokeStream;

    async fn invoke(
        &self,
        request: Request<pb::InvokeRequest>,
    ) -> Result<Response<Self::InvokeStream>, Status> {
        let request = request.into_inner();
        let session = self.session(&request.session_id)?;
        let invocation_id = checked_invocation_id(&request.invocation_id)?;
        let call = match request.target {
            Some(pb::invoke_request::Target::Wasi(call)) if call.tool == EXEC_TOOL => {
                let parsed = crate::process::exec_tool::parse(&call.input_json);
                return self
                    .invoke_process(session, invocation_id, parsed, request.timeout)
                    .await;
            }
            Some(pb::invoke_request::Target::Wasi(call)) => call,
            Some(pb::invoke_request::Target::Process(call)) => {
                let parsed = Ok(ParsedExec {
                    call,
                    timeout: None,
                });
                return self
                    .invoke_process(session, invocation_id, parsed, request.timeout)
                    .await;
            }
            None => {
                return Err(ServiceError::InvalidRequest(
                    "target is required: set wasi or process".to_owned(),
                )
                .into());
            }
        };
        let timeout =
            effective_timeout(request.timeout.as_ref(), session.policy.invocation_timeout);
        let fingerprint = request_fingerprint(&call, timeout);
        let (sender, receiver) = mpsc::channel(16);
        match session.claim(&invocation_id, fingerprint) {
            Claim::Existing(record) => {
                let result = recorded_result(record, &invocation_id, fingerprint).await?;
                let started = started_event(&invocation_id, self.tool_digest(&call.tool));
                return Ok(replayed(started, result));
            }
            Claim::New(completion) => {
                let daemon = Arc::clone(&self.daemon);
                // The invocation runs to completion even if the caller goes
                // away, so its result is recorded for an idempotent retry.
                tokio::spawn(async move {
                    let _ = sender
                        .send(Ok(started_event(
                            &invocation_id,
                            daemon
                                .wasi
                                .tool(&call.tool)
                                .map(|t| t.digest.clone())
                                .unwrap_or_default(),
                        )))
                        .await;
                    let completed = run_in_session(&daemon, &session, &call, timeout).await;
                    session.complete(&invocation_id, fingerprint, completed.result.clone());
                    let _ = completion.send(Some(completed.result.clone()));
                    for chunk in completed.chunks {
                        let _ = sender
                            .send(Ok(pb::InvokeEvent {
                                event: Some(pb::invoke_event::Event::Output(chunk)),
                            }))
                            .await;
                    }
                    let _ = sender.send(Ok(result_event(completed.result))).await;
                });
            }
        }
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(receiver),
        )))
    }

    async fn write_files(
        &self,
        request: Request<pb::WriteFilesRequest>,
    ) -> Result<Response<pb::WriteFilesResponse>, Status> {
        let request = request.into_inner();
        let session = self.session(&request.session_id)?;
        let max_file_bytes = self.daemon.config.max_file_bytes;
        let written = blocking(move || write_all(&session, &request.files, max_file_bytes)).await?;
        Ok(Response::new(pb::WriteFilesResponse { written }))
    }

    async fn read_files(
        &self,
        request: Request<pb::ReadFilesRequest>,
    ) -> Result<Response<pb::ReadFilesResponse>, Status> {
        let request = request.into_inner();
        let session = self.session(&request.session_id)?;
        let max = self.daemon.config.max_file_bytes;
        let limit = if request.max_bytes_per_file == 0 {
            max
        } else {
            request.max_bytes_per_file.min(max)
        };
        let files = blocking(move || read_all(&session, &request.paths, limit)).await?;
        Ok(Response::new(pb::ReadFilesResponse { files }))
    }
}

impl SandboxApi {
    /// Runs a command in the session's process sandbox, streaming its
    /// output as it arrives. Idempotent by `invocation_id` like WASI calls.
    async fn invoke_process(
        &self,
        session: Arc<Session>,
        invocation_id: String,
        parsed: Result<ParsedExec, pb::ToolError>,
        requested_timeout: Option<prost_types::Duration>,
    ) -> Result<Response<InvokeStream>, Status> {
        session.process().map_err(ServiceError::from)?;
        let requested = requested_timeout.or_else(|| {
            parsed
                .as_ref()
                .ok()
                .and_then(|p| p.timeout.map(harness_proto::duration_to_proto))
        });
        let timeout = effective_timeout(requested.as_ref(), session.policy.invocation_timeout);
        let fingerprint = {
            let mut hasher = std::collections::hash_map::DefaultHasher::new();
            format!("{parsed:?}").hash(&mut hasher);
            timeout.hash(&mut hasher);
            hasher.finish()
        };
        let started = pb::InvokeEvent {
            event: Some(pb::invoke_event::Event::Started(pb::InvokeStarted {
                invocation_id: invocation_id.clone(),
                backend: pb::Backend::Process as i32,
                digest: String::new(),
            })),
        };
        let completion = match session.claim(&invocation_id, fingerprint) {
            Claim::Existing(record) => {
                let result = recorded_result(record, &invocation_id, fingerprint).await?;
                return Ok(replayed(started, result));
            }
            Claim::New(completion) => completion,
        };
        let (sender, receiver) = mpsc::channel(64);
        let max_output_bytes = session.policy.max_output_bytes;
        tokio::spawn(async move {
            let _ = sender.send(Ok(started)).await;
            let result = match parsed.and_then(|p| command_of(p.call, timeout, max_output_bytes)) {
                Err(error) => pb::InvokeResult {
                    outcome: Some(pb::invoke_result::Outcome::Error(error)),
                    usage: Some(pb::Usage::default()),
                    replayed: false,
                },
                Ok(command) => {
                    let _running = session.start_running();
                    let (chunks, mut chunk_receiver) = mpsc::channel::<pb::OutputChunk>(64);
                    let forward = {
                        let sender = sender.clone();
                        tokio::spawn(async move {
                            while let Some(chunk) = chunk_receiver.recv().await {
                                let _ = sender
                                    .send(Ok(pb::InvokeEvent {
                                        event: Some(pb::invoke_event::Event::Output(chunk)),
                                    }))
                                    .await;
                            }
                        })
                    };
                    let result = match session.process() {
                        Ok(sandbox) => sandbox.run(command, chunks, session.cancelled()).await,
                        Err(error) => {
                            drop(chunks);
                            pb::InvokeResult {
                                outcome: Some(pb::invoke_result::Outcome::Error(pb::ToolError {
                                    kind: pb::ErrorKind::Internal as i32,
                                    message: error.to_string(),
                                    violations: Vec::new(),
                                })),
                                usage: Some(pb::Usage::default()),
                                replayed: false,
                            }
                        }
                    };
                    let _ = forward.await;
                    result
                }
            };
            session.complete(&invocation_id, fingerprint, result.clone());
            let _ = completion.send(Some(result.clone()));
            let _ = sender.send(Ok(result_event(result))).await;
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(receiver),
        )))
    }

    fn session(&self, id: &str) -> Result<Arc<Session>, ServiceError> {
        Ok(self.daemon.sessions.get(id)?)
    }

    fn tool_digest(&self, tool: &str) -> String {
        self.daemon
            .wasi
            .tool(tool)
            .map(|t| t.digest.clone())
            .unwrap_or_default()
    }
}

async fn run_in_session(
    daemon: &Sandboxd,
    session: &Arc<Session>,
    call: &pb::WasiCall,
    timeout: Duration,
) -> Completed {
    let _running = session.start_running();
    tokio::select! {
        completed = daemon.wasi.invoke(session.workspace_root(), &session.policy, session.egress.as_ref(), call, timeout) => {
            attribute_to_full_workspace(completed, || {
                session.with_workspace(Workspace::cap_reached).ok().flatten()
            })
        }
        _ = session.cancelled() => Completed {
            chunks: vec![],
            digest: String::new(),
            result: pb::InvokeResult {
                outcome: Some(pb::invoke_result::Outcome::Error(pb::ToolError {
                    kind: pb::ErrorKind::Internal as i32,
                    message: "the sandbox session was destroyed while the invocation ran; it was stopped".to_owned(),
                    violations: vec![],
                })),
                usage: Some(pb::Usage::default()),
                replayed: false,
            },
        },
    }
}

/// A tool that failed while its workspace is at a cap failed because of it
/// (a WASI guest sees `ENOSPC` only as a generic I/O error): the failure
/// becomes `resource_exhausted`, naming the cap.
fn attribute_to_full_workspace(
    mut completed: Completed,
    cap_reached: impl FnOnce() -> Option<CapReached>,
) -> Completed {
    if let Some(pb::invoke_result::Outcome::Error(error)) = completed.result.outcome.as_mut()
        && error.kind == pb::ErrorKind::Failed as i32
        && let Some(cap) = cap_reached()
    {
        error.kind = pb::ErrorKind::ResourceExhausted as i32;
        error.message = format!("{} (the workspace is full: {cap})", error.message);
    }
    completed
}

async fn recorded_result(
    record: InvocationRecord,
    invocation_id: &str,
    fingerprint: u64,
) -> Result<pb::InvokeResult, ServiceError> {
    match record {
        InvocationRecord::Finished(result, hash) if hash == fingerprint => Ok(result),
        InvocationRecord::Running(mut receiver, hash) if hash == fingerprint => {
            let result = receiver.wait_for(Option::is_some).await.map_err(|_| {
                ServiceError::Internal(format!(
                    "invocation {invocation_id:?} ended without a result"
                ))
            })?;
            result
                .clone()
                .ok_or_else(|| ServiceError::Internal("missing result".to_owned()))
        }
        _ => Err(ServiceError::InvocationIdReused(invocation_id.to_owned())),
    }
}

/// Runs blocking file-system work off the async workers.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, ServiceError> + Send + 'static,
) -> Result<T, ServiceError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| ServiceError::Internal(e.to_string()))?
}

/// Checks a process call and turns it into a command.
fn command_of(
    call: pb::ProcessCall,
    timeout: Duration,
    max_output_bytes: u64,
) -> Result<Command, pb::ToolError> {
    let invalid = |message: &str| pb::ToolError {
        kind: pb::ErrorKind::InvalidInput as i32,
        message: message.to_owned(),
        violations: Vec::new(),
    };
    let via_shell = !call.shell.is_empty();
    let argv = match (call.argv.is_empty(), call.shell.is_empty()) {
        (false, true) => call.argv,
        (true, false) => vec!["/bin/sh".to_owned(), "-c".to_owned(), call.shell],
        _ => return Err(invalid("set exactly one of argv and shell")),
    };
    let mut environment: Vec<(String, String)> = call.environment.into_iter().collect();
    environment.sort();
    for (name, value) in &environment {
        if name.is_empty() || name.contains('=') || name.contains('\0') || value.contains('\0') {
            return Err(invalid(&format!("invalid environment variable {name:?}")));
        }
    }
    Ok(Command {
        argv,
        cwd: if call.cwd.is_empty() {
            crate::process::mount_plan::WORKSPACE.to_owned()
        } else {
            call.cwd
        },
        environment,
        stdin: call.stdin,
        timeout,
        max_output_bytes,
        via_shell,
    })
}

fn checked_invocation_id(id: &str) -> Result<String, ServiceError> {
    if id.is_empty() || id.len() > MAX_INVOCATION_ID_LEN || id.chars().any(char::is_control) {
        return Err(ServiceError::InvalidRequest(format!(
            "invocation_id must be 1-{MAX_INVOCATION_ID_LEN} printable characters"
        )));
    }
    Ok(id.to_owned())
}

/// The request's deadline, capped by the policy's.
fn effective_timeout(requested: Option<&prost_types::Duration>, policy: Duration) -> Duration {
    requested
        .map(harness_proto::duration_from_proto)
        .filter(|d| !d.is_zero())
        .map_or(policy, |d| d.min(policy))
}

fn request_fingerprint(call: &pb::WasiCall, timeout: Duration) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    call.tool.hash(&mut hasher);
    call.input_json.hash(&mut hasher);
    timeout.hash(&mut hasher);
    hasher.finish()
}

fn started_event(invocation_id: &str, digest: String) -> pb::InvokeEvent {
    pb::InvokeEvent {
        event: Some(pb::invoke_event::Event::Started(pb::InvokeStarted {
            invocation_id: invocation_id.to_owned(),
            backend: pb::Backend::Wasi as i32,
            digest,
        })),
    }
}

/// The stream answering a repeated `invocation_id`: its start and the
/// recorded result, marked replayed; nothing runs again.
fn replayed(started: pb::InvokeEvent, result: pb::InvokeResult) -> Response<InvokeStream> {
    let replay = vec![
        Ok(started),
        Ok(result_event(pb::InvokeResult {
            replayed: true,
            ..result
        })),
    ];
    Response::new(Box::pin(futures::stream::iter(replay)))
}

fn result_event(result: pb::InvokeResult) -> pb::InvokeEvent {
    pb::InvokeEvent {
        event: Some(pb::invoke_event::Event::Result(result)),
    }
}

fn write_all(
    session: &Session,
    files: &[pb::FileWrite],
    max_file_bytes: u64,
) -> Result<Vec<pb::FileWritten>, ServiceError> {
    let mut written = Vec::with_capacity(files.len());
    for file in files {
        if file.content.len() as u64 > max_file_bytes {
            return Err(crate::workspace::WorkspaceError::TooLarge {
                path: file.path.clone(),
                size: file.content.len() as u64,
                limit: max_file_bytes,
            }
            .into());
        }
        let bytes =
            session.with_workspace(|ws| ws.write_file(&file.path, &file.content, file.mode))??;
        written.push(pb::FileWritten {
            path: file.path.clone(),
            bytes,
        });
    }
    Ok(written)
}

fn read_all(
    session: &Session,
    paths: &[String],
    limit: u64,
) -> Result<Vec<pb::FileContent>, ServiceError> {
    let mut files = Vec::with_capacity(paths.len());
    for path in paths {
        let (content, size, truncated) =
            session.with_workspace(|ws| ws.read_file(path, limit))??;
        files.push(pb::FileContent {
            path: path.clone(),
            content,
            size,
            truncated,
        });
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requested_timeouts_are_capped_by_the_policy() {
        let policy = Duration::from_secs(10);
        assert_eq!(effective_timeout(None, policy), policy);
        let short = harness_proto::duration_to_proto(Duration::from_secs(1));
        assert_eq!(
            effective_timeout(Some(&short), policy),
            Duration::from_secs(1)
        );
        let long = harness_proto::duration_to_proto(Duration::from_secs(100));
        assert_eq!(effective_timeout(Some(&long), policy), policy);
    }

    #[test]
    fn failures_in_a_full_workspace_become_resource_exhausted() {
        let failed = |kind: pb::ErrorKind, message: &str| Completed {
            chunks: vec![],
            digest: "d".to_owned(),
            result: pb::InvokeResult {
                outcome: Some(pb::invoke_result::Outcome::Error(pb::ToolError {
                    kind: kind as i32,
                    message: message.to_owned(),
                    violations: vec![],
                })),
                usage: None,
                replayed: false,
            },
        };
        let full = Some(CapReached::Bytes(4096));
        assert_eq!(
            attribute_to_full_workspace(failed(pb::ErrorKind::Failed, "`a`: I/O error"), || full)
                .result,
            failed(
                pb::ErrorKind::ResourceExhausted,
                "`a`: I/O error (the workspace is full: its size cap of 4096 bytes is reached)"
            )
            .result
        );
        // Not full, or not a tool failure: left as it is.
        for (kind, cap) in [
            (pb::ErrorKind::Failed, None),
            (pb::ErrorKind::InvalidInput, full),
            (pb::ErrorKind::Timeout, full),
        ] {
            assert_eq!(
                attribute_to_full_workspace(failed(kind, "m"), || cap).result,
                failed(kind, "m").result
            );
        }
    }

    #[test]
    fn invocation_ids_are_checked() {
        assert!(checked_invocation_id("call-1").is_ok());
        assert!(checked_invocation_id("").is_err());
        assert!(checked_invocation_id("a\nb").is_err());
        assert!(checked_invocation_id(&"x".repeat(300)).is_err());
    }
}
