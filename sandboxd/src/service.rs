//! The `harness.sandbox.v1.SandboxService` implementation: request checking
//! and plumbing, and the invocation lifecycle once for every
//! [`crate::backend::Backend`]; the work happens in
//! [`crate::session`], [`crate::workspace`], [`crate::wasi`] and
//! [`crate::process`].

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use harness_proto::sandbox::v1 as pb;
use harness_proto::sandbox::v1::sandbox_service_server::SandboxService;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status};

use crate::backend::{Backend, OutputMode};
use crate::config::SandboxdConfig;
use crate::error::ServiceError;
use crate::ids::{InvocationId, SandboxSessionId};
use crate::probe::HostProbe;
use crate::process::exec_tool::{EXEC_TOOL, ParsedExec};
use crate::process::invocations::ProcessInvocations;
use crate::session::{Claim, InvocationRecord, Session, SessionManager};
use crate::wasi::backend::WasiBackend;
use crate::workspace::Workspace;

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
    pub wasi: Arc<WasiBackend>,
}

/// Invocations that may run at once; also the size of the wasmtime pool.
pub const MAX_CONCURRENT_INVOCATIONS: u32 = 1000;

impl Sandboxd {
    /// Builds the daemon state: probes nothing of the kernel (pass the probe
    /// in), cleans up after a crashed instance, checks that a workspace can
    /// be created on the configured storage, and loads the tools directory.
    pub async fn start(
        config: SandboxdConfig,
        host: HostProbe,
    ) -> Result<Arc<Self>, crate::StartError> {
        let config = Arc::new(config);
        let wasi = Arc::new(
            WasiBackend::new(&config, MAX_CONCURRENT_INVOCATIONS)
                .map_err(crate::StartError::Wasi)?,
        );
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
            .destroy(&SandboxSessionId::new(request.session_id), "requested")
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
        let invocation_id = InvocationId::parse(&request.invocation_id)
            .map_err(|e| ServiceError::InvalidRequest(e.to_string()))?;
        let process_call = match request.target {
            Some(pb::invoke_request::Target::Wasi(call)) if call.tool == EXEC_TOOL => {
                crate::process::exec_tool::parse(&call.input_json)
            }
            Some(pb::invoke_request::Target::Wasi(call)) => {
                let backend = Arc::clone(&self.daemon.wasi);
                return invoke_on(backend, session, invocation_id, call, request.timeout).await;
            }
            Some(pb::invoke_request::Target::Process(call)) => Ok(ParsedExec {
                call,
                timeout: None,
            }),
            None => {
                return Err(ServiceError::InvalidRequest(
                    "target is required: set wasi or process".to_owned(),
                )
                .into());
            }
        };
        let backend = Arc::new(ProcessInvocations);
        invoke_on(
            backend,
            session,
            invocation_id,
            process_call,
            request.timeout,
        )
        .await
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
        let files =
            blocking(move || read_all(&session, &request.paths, limit, request.allow_missing))
                .await?;
        Ok(Response::new(pb::ReadFilesResponse { files }))
    }
}

impl SandboxApi {
    fn session(&self, id: &str) -> Result<Arc<Session>, ServiceError> {
        Ok(self.daemon.sessions.get(id)?)
    }
}

/// The invocation lifecycle, the same for every [`Backend`]: admit, claim
/// the id (a repeat gets the recorded result, marked replayed), then run to
/// completion in a task of its own, so the result is recorded for an
/// idempotent retry even when the caller goes away. The stream carries
/// `started`, the output as the backend sends it, then the result.
async fn invoke_on<B: Backend>(
    backend: Arc<B>,
    session: Arc<Session>,
    invocation_id: InvocationId,
    call: B::Call,
    requested_timeout: Option<prost_types::Duration>,
) -> Result<Response<InvokeStream>, Status> {
    backend.admit(&session)?;
    let timeout = backend.timeout(&call, requested_timeout.as_ref(), &session);
    let fingerprint = backend.fingerprint(&call, timeout);
    let started = started_event(&invocation_id, B::KIND, backend.digest(&call));
    let completion = match session.claim(&invocation_id, fingerprint) {
        Claim::Existing(record) => {
            let result = recorded_result(record, &invocation_id, fingerprint).await?;
            return Ok(replayed(started, result));
        }
        Claim::New(completion) => completion,
    };
    let (sender, receiver) = mpsc::channel(64);
    tokio::spawn(async move {
        let _ = sender.send(Ok(started)).await;
        // Recorded as soon as it is known, not after the output has drained
        // to a slow reader.
        let record = |result: &pb::InvokeResult| {
            session.complete(&invocation_id, fingerprint, result.clone());
            let _ = completion.send(Some(result.clone()));
        };
        let ran = match B::OUTPUT {
            OutputMode::Captured => {
                let ran = backend.run(&session, call, timeout, None).await;
                record(&ran.result);
                ran
            }
            OutputMode::Streamed => {
                let (output, mut chunks) = mpsc::channel::<pb::OutputChunk>(64);
                let run = async {
                    let ran = backend.run(&session, call, timeout, Some(output)).await;
                    record(&ran.result);
                    ran
                };
                let forward = async {
                    while let Some(chunk) = chunks.recv().await {
                        let _ = sender.send(Ok(output_event(chunk))).await;
                    }
                };
                // One task: the backend runs while its output is forwarded.
                tokio::join!(run, forward).0
            }
        };
        for chunk in ran.captured {
            let _ = sender.send(Ok(output_event(chunk))).await;
        }
        let _ = sender.send(Ok(result_event(ran.result))).await;
    });
    Ok(Response::new(Box::pin(
        tokio_stream::wrappers::ReceiverStream::new(receiver),
    )))
}

fn output_event(chunk: pb::OutputChunk) -> pb::InvokeEvent {
    pb::InvokeEvent {
        event: Some(pb::invoke_event::Event::Output(chunk)),
    }
}

async fn recorded_result(
    record: InvocationRecord,
    invocation_id: &InvocationId,
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
        _ => Err(ServiceError::InvocationIdReused(invocation_id.to_string())),
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

fn started_event(
    invocation_id: &InvocationId,
    backend: pb::Backend,
    digest: String,
) -> pb::InvokeEvent {
    pb::InvokeEvent {
        event: Some(pb::invoke_event::Event::Started(pb::InvokeStarted {
            invocation_id: invocation_id.as_str().to_owned(),
            backend: backend as i32,
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
    allow_missing: bool,
) -> Result<Vec<pb::FileContent>, ServiceError> {
    let mut files = Vec::with_capacity(paths.len());
    for path in paths {
        let read = session.with_workspace(|ws| ws.read_file(path, limit))?;
        let file = match read {
            Ok(read) => pb::FileContent {
                path: path.clone(),
                content: read.content,
                size: read.size,
                truncated: read.truncated,
                sha256: read.sha256,
                missing: false,
            },
            Err(crate::workspace::WorkspaceError::NotFound { .. }) if allow_missing => {
                pb::FileContent {
                    path: path.clone(),
                    missing: true,
                    ..Default::default()
                }
            }
            Err(error) => return Err(error.into()),
        };
        files.push(file);
    }
    Ok(files)
}
