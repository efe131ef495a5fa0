//! The WASI backend: tool components run by wasmtime.
//!
//! - [`engine`]: one engine per daemon (pooling allocator, copy-on-write
//!   memory images, epoch interruption) and the on-disk compile cache.
//! - [`registry`]: the tools directory: load, describe, validate, rescan.
//! - [`invoke`]: one invocation = fresh store + instantiate + call, with the
//!   session's workspace preopened at `/workspace` and nothing else.
//! - [`output`]: capped stdout/stderr capture.

pub mod backend;
pub mod engine;
pub mod invocations;
pub mod invoke;
pub mod output;
pub mod registry;

use std::path::PathBuf;

wasmtime::component::bindgen!({
    path: "../tools-wasm/wit",
    world: "tool-component",
    exports: { default: async },
});

pub use exports::harness::tool::tool::{ErrorKind as GuestErrorKind, ToolError as GuestToolError};

/// Errors setting up the WASI backend or loading a component.
#[derive(Debug, thiserror::Error)]
pub enum WasiError {
    /// The engine could not be configured.
    #[error("cannot create the wasmtime engine")]
    Engine {
        /// Why.
        #[source]
        source: wasmtime::Error,
    },
    /// The epoch ticker thread could not start.
    #[error("cannot start the epoch ticker thread")]
    Ticker {
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The compile cache could not be read or written.
    #[error("compile cache I/O failed at {path}")]
    CacheIo {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The component could not be compiled.
    #[error("component does not compile")]
    Compile {
        /// Why.
        #[source]
        source: wasmtime::Error,
    },
    /// The WASI imports could not be added to the linker.
    #[error("cannot link WASI imports")]
    Link {
        /// Why.
        #[source]
        source: wasmtime::Error,
    },
}
