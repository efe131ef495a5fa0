//! Integration tests: the real gRPC server in-process, a fake sandboxd served
//! over gRPC (no wasmtime), and the scripted provider.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

mod approvals;
mod conversations;
mod handoffs;
mod health;
mod network_agents;
mod plans;
mod prompts;
mod providers;
mod sessions;
mod skills;
mod stream_events;
mod structured_output;
mod subagents;
