//! The one place where sandboxd errors become gRPC statuses.

use tonic::Status;

use crate::session::SessionError;
use crate::workspace::WorkspaceError;

/// Errors an rpc can fail with (as opposed to a tool failing, which is a
/// typed `InvokeResult`).
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The request is malformed.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// Session management failed.
    #[error(transparent)]
    Session(#[from] SessionError),
    /// A workspace file operation failed.
    #[error(transparent)]
    Workspace(#[from] WorkspaceError),
    /// `invocation_id` was reused for a different request.
    #[error("invocation_id {0:?} was already used for a different request in this session")]
    InvocationIdReused(String),
    /// The rpc or feature is not built yet.
    #[error("{0}")]
    Unimplemented(String),
    /// A blocking task failed to complete.
    #[error("internal task failed: {0}")]
    Internal(String),
}

impl From<ServiceError> for Status {
    fn from(error: ServiceError) -> Self {
        let message = harness_daemon::error_chain(&error);
        match &error {
            ServiceError::InvalidRequest(_) => Status::invalid_argument(message),
            ServiceError::InvocationIdReused(_) => Status::already_exists(message),
            ServiceError::Unimplemented(_) => Status::unimplemented(message),
            ServiceError::Internal(_) => Status::internal(message),
            ServiceError::Session(session) => match session {
                SessionError::NotFound(_) => Status::not_found(message),
                SessionError::TooManySessions(_) => Status::resource_exhausted(message),
                SessionError::InvalidPolicy(_) => Status::invalid_argument(message),
                SessionError::NotBuilt(_) => Status::unimplemented(message),
                SessionError::HostLacks(_) => Status::failed_precondition(message),
                SessionError::Destroyed(_) => Status::failed_precondition(message),
                SessionError::Workspace(_) => Status::internal(message),
                SessionError::NoProcessBackend(_) => Status::failed_precondition(message),
                SessionError::Process(process) => match process {
                    crate::process::ProcessError::HostLacks(_) => {
                        Status::failed_precondition(message)
                    }
                    crate::process::ProcessError::Bind(_)
                    | crate::process::ProcessError::Plan(_) => Status::invalid_argument(message),
                    crate::process::ProcessError::NoIdRange(_) => {
                        Status::resource_exhausted(message)
                    }
                    crate::process::ProcessError::Launch(_) => Status::internal(message),
                },
            },
            ServiceError::Workspace(workspace) => match workspace {
                WorkspaceError::OutsideWorkspace { .. } | WorkspaceError::Escape { .. } => {
                    Status::permission_denied(message)
                }
                WorkspaceError::NotFound { .. } => Status::not_found(message),
                WorkspaceError::TooLarge { .. }
                | WorkspaceError::QuotaExceeded { .. }
                | WorkspaceError::Full { .. } => Status::resource_exhausted(message),
                WorkspaceError::Io { .. } | WorkspaceError::Storage(_) => Status::internal(message),
            },
        }
    }
}
