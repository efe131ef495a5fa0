//! sandboxd: the per-host daemon that runs tool invocations in sandboxes.
//!
//! Reading order, following one `Invoke`:
//! - [`server`] binds the socket and serves [`service::SandboxApi`] with the
//!   gRPC health and reflection services.
//! - [`service`] checks the request, finds the [`session::Session`], claims
//!   the `invocation_id` (idempotency) and hands the call to a backend.
//! - [`wasi`] is the WASI backend: [`wasi::registry`] holds the tool
//!   components, [`wasi::invoke`] runs one call in a fresh store with the
//!   session's workspace preopened at `/workspace` and its limits applied.
//! - [`workspace`] does file I/O for `WriteFiles`/`ReadFiles`, resolving
//!   every path beneath the workspace.
//! - [`session`] resolves policies (failing closed on anything it cannot
//!   enforce), enforces TTL and idle timeouts, and tears sessions down.
//! - [`probe`] and [`sys`] find out what the host can isolate; `sys` is the
//!   only module that makes raw calls. Its `unsafe fn`s (forking, cloning
//!   the init, taking received descriptors, `dup2`) state their obligations
//!   in `# Safety`, and each caller's `unsafe` block says how it meets them.
//! - [`error`] is the one place errors become gRPC statuses.

pub mod backend;
pub mod config;
pub mod error;
pub mod ids;
pub mod network;
pub mod probe;
pub mod process;
pub mod server;
pub mod service;
pub mod session;
pub mod sys;
pub mod wasi;
pub mod workspace;

/// Errors starting the daemon.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The WASI backend could not be built.
    #[error("cannot start the WASI backend")]
    Wasi(#[source] wasi::WasiError),
    /// The state directory is unusable.
    #[error("cannot prepare the state directory {path}")]
    StateDir {
        /// The directory.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Workspaces cannot be created on the configured `workspace-storage`.
    #[error("cannot create workspaces on the configured workspace-storage")]
    WorkspaceStorage(#[source] workspace::WorkspaceError),
    /// The process backend's `sandbox-init` is there but unusable, or the
    /// configured `[process] init-program` is not there.
    #[error("the process backend's init program is unusable")]
    InitProgram(#[source] process::init_program::InitProgramError),
}
