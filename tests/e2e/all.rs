//! End-to-end tests: the real `sandboxd` and `control-plane` binaries, started
//! as child processes on temp Unix sockets, driven over gRPC.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

mod confinement;
mod conversation;
mod crash;
mod crash_tree;
mod defaults;
mod health;
mod process;
mod replay;
mod session;
mod stock_client;
mod tcp;
