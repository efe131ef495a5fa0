//! placeholder
pub mod config;
pub mod probe;
pub mod sys;
pub mod workspace;
pub mod wasi;
pub mod session;
