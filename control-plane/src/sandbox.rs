//! Talking to sandboxd: the [`SandboxDispatch`] trait the agent loop uses, and
//! its gRPC implementation [`GrpcSandbox`].
//!
//! The trait exists so the loop can be tested against an in-memory fake; the
//! gRPC implementation is a thin mapping onto `harness.sandbox.v1`.

use futures::StreamExt;
use futures::future::BoxFuture;
use harness_proto::sandbox::v1 as sandbox;
use harness_proto::sandbox::v1::sandbox_service_client::SandboxServiceClient;
use tonic::transport::Channel;

use crate::transport::{self, AddressError};

/// Everything an invocation produced: its output chunks and its result.
#[derive(Debug, Clone, PartialEq)]
pub struct InvocationOutcome {
    /// stdout/stderr chunks, in the order sandboxd sent them.
    pub output: Vec<sandbox::OutputChunk>,
    /// The final result (success or typed tool error, plus usage).
    pub result: sandbox::InvokeResult,
}

/// A failed call to sandboxd (as opposed to a tool that ran and failed, which
/// is an [`InvocationOutcome`] carrying a typed error).
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// The sandboxd endpoint string is unusable.
    #[error("bad sandboxd endpoint")]
    Endpoint(#[source] AddressError),
    /// `CreateSession` failed.
    #[error("sandboxd CreateSession failed ({:?}): {}", .0.code(), .0.message())]
    CreateSession(tonic::Status),
    /// `CreateSession` answered without a session.
    #[error("sandboxd CreateSession returned no session")]
    MissingSession,
    /// `ListTools` failed.
    #[error("sandboxd ListTools failed ({:?}): {}", .0.code(), .0.message())]
    ListTools(tonic::Status),
    /// `Invoke` failed before producing a result.
    #[error("sandboxd Invoke failed ({:?}): {}", .0.code(), .0.message())]
    Invoke(tonic::Status),
    /// The `Invoke` stream ended without its final result.
    #[error("sandboxd Invoke stream ended without a result")]
    MissingResult,
    /// `DestroySession` failed.
    #[error("sandboxd DestroySession failed ({:?}): {}", .0.code(), .0.message())]
    DestroySession(tonic::Status),
    /// `ReadFiles` failed.
    #[error("sandboxd ReadFiles failed ({:?}): {}", .0.code(), .0.message())]
    ReadFiles(tonic::Status),
}

impl SandboxError {
    /// True if sandboxd could not be reached (it may be starting or
    /// restarting): worth another try.
    pub fn is_unreachable(&self) -> bool {
        match self {
            Self::CreateSession(status)
            | Self::ListTools(status)
            | Self::Invoke(status)
            | Self::DestroySession(status)
            | Self::ReadFiles(status) => status.code() == tonic::Code::Unavailable,
            Self::Endpoint(_) | Self::MissingSession | Self::MissingResult => false,
        }
    }
}

/// The sandboxd operations the agent loop needs.
pub trait SandboxDispatch: Send + Sync + std::fmt::Debug {
    /// Creates a sandbox session; returns its id.
    fn create_session(
        &self,
        request: sandbox::CreateSessionRequest,
    ) -> BoxFuture<'_, Result<String, SandboxError>>;

    /// Lists the tools sandboxd can run.
    fn list_tools(&self) -> BoxFuture<'_, Result<Vec<sandbox::Tool>, SandboxError>>;

    /// Runs one invocation to completion.
    fn invoke(
        &self,
        request: sandbox::InvokeRequest,
    ) -> BoxFuture<'_, Result<InvocationOutcome, SandboxError>>;

    /// Destroys the sandbox session `sandbox_session_id` (sandboxd's id, not
    /// a control-plane [`crate::ids::SessionId`]); idempotent on sandboxd's side.
    fn destroy_session(
        &self,
        sandbox_session_id: String,
        reason: String,
    ) -> BoxFuture<'_, Result<sandbox::TeardownReport, SandboxError>>;

    /// Reads workspace files of a sandbox session (contents up to a limit,
    /// sizes and SHA-256 digests).
    fn read_files(
        &self,
        request: sandbox::ReadFilesRequest,
    ) -> BoxFuture<'_, Result<Vec<sandbox::FileContent>, SandboxError>>;
}

/// [`SandboxDispatch`] over gRPC.
#[derive(Debug, Clone)]
pub struct GrpcSandbox {
    client: SandboxServiceClient<Channel>,
}

impl GrpcSandbox {
    /// A client for `endpoint` (`unix:<path>` or `http://host:port`) that
    /// connects on first use, so sandboxd may start after the control plane.
    pub fn connect_lazy(endpoint: &str) -> Result<Self, SandboxError> {
        let channel = transport::connect_lazy(endpoint).map_err(SandboxError::Endpoint)?;
        Ok(Self::new(channel))
    }

    /// A client on an existing channel.
    pub fn new(channel: Channel) -> Self {
        Self {
            client: SandboxServiceClient::new(channel),
        }
    }
}

impl SandboxDispatch for GrpcSandbox {
    fn create_session(
        &self,
        request: sandbox::CreateSessionRequest,
    ) -> BoxFuture<'_, Result<String, SandboxError>> {
        let mut client = self.client.clone();
        Box::pin(async move {
            let response = client
                .create_session(request)
                .await
                .map_err(SandboxError::CreateSession)?;
            response
                .into_inner()
                .session
                .map(|session| session.session_id)
                .ok_or(SandboxError::MissingSession)
        })
    }

    fn list_tools(&self) -> BoxFuture<'_, Result<Vec<sandbox::Tool>, SandboxError>> {
        let mut client = self.client.clone();
        Box::pin(async move {
            let response = client
                .list_tools(sandbox::ListToolsRequest {})
                .await
                .map_err(SandboxError::ListTools)?;
            Ok(response.into_inner().tools)
        })
    }

    fn invoke(
        &self,
        request: sandbox::InvokeRequest,
    ) -> BoxFuture<'_, Result<InvocationOutcome, SandboxError>> {
        let mut client = self.client.clone();
        Box::pin(async move {
            let mut events = client
                .invoke(request)
                .await
                .map_err(SandboxError::Invoke)?
                .into_inner();
            let mut output = Vec::new();
            while let Some(event) = events.next().await {
                match event.map_err(SandboxError::Invoke)?.event {
                    Some(sandbox::invoke_event::Event::Output(chunk)) => output.push(chunk),
                    Some(sandbox::invoke_event::Event::Result(result)) => {
                        return Ok(InvocationOutcome { output, result });
                    }
                    Some(sandbox::invoke_event::Event::Started(_)) => {
                        crate::crash_hook::invoke_acknowledged();
                    }
                    None => {}
                }
            }
            Err(SandboxError::MissingResult)
        })
    }

    fn destroy_session(
        &self,
        session_id: String,
        reason: String,
    ) -> BoxFuture<'_, Result<sandbox::TeardownReport, SandboxError>> {
        let mut client = self.client.clone();
        Box::pin(async move {
            let response = client
                .destroy_session(sandbox::DestroySessionRequest { session_id, reason })
                .await
                .map_err(SandboxError::DestroySession)?;
            Ok(response.into_inner().report.unwrap_or_default())
        })
    }

    fn read_files(
        &self,
        request: sandbox::ReadFilesRequest,
    ) -> BoxFuture<'_, Result<Vec<sandbox::FileContent>, SandboxError>> {
        let mut client = self.client.clone();
        Box::pin(async move {
            let response = client
                .read_files(request)
                .await
                .map_err(SandboxError::ReadFiles)?;
            Ok(response.into_inner().files)
        })
    }
}
