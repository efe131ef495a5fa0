//! sandboxd integration tests: the real gRPC service in-process on a Unix
//! socket in a temp dir, with the standard tool components built from source.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

mod adversarial;
mod confinement;
mod files;
mod invoke;
mod network;
mod process;
mod registry;
mod service;
