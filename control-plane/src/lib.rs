//! The control plane: runs agent sessions and records each as an append-only
//! event log; tool calls run on sandboxd.
//!
//! Follow one session through the modules:
//!
//! 1. [`config`] is read at start-up; [`server::ControlPlane::open`] loads the
//!    [`agent`] definitions (one TOML file per agent; each names a
//!    [`provider`]), opens the [`store`] and creates a lazy [`sandbox`] client
//!    (addresses and channels live in [`transport`]).
//! 2. A caller's `StartSession` arrives at [`service`]: the session row is
//!    created in the [`store`] (idempotent by tenant + key) and handed to the
//!    [`supervisor::SessionSupervisor`], which runs it as a background task
//!    (and, at start-up, closes sessions a previous process left unfinished).
//! 3. The [`agent_loop`] appends `started`, creates a sandbox session, fetches
//!    the agent's tool definitions, then turns: the [`provider`] streams the
//!    model's reply, each tool call passes the policy and is dispatched to
//!    sandboxd, and every step is appended to the log through
//!    [`event_log::EventLog`] before the next one starts. It ends with the
//!    sandbox session destroyed and a `finished` event.
//! 4. `StreamEvents` readers follow the log through [`event_log`]: everything
//!    after their cursor from the store, then live appends, woken by a
//!    per-session watch channel. [`event`] holds the per-kind facts (names,
//!    usage, status) shared by the store, the loop and the [`transcript`],
//!    which renders events for people.
//!
//! Everything fallible returns a module's own `thiserror` enum (reported with
//! [`error_report::error_chain`]); only [`service::ServiceError`] is turned
//! into a gRPC status.

pub mod agent;
pub mod agent_loop;
pub mod config;
pub mod error_report;
pub mod event;
pub mod event_log;
pub mod provider;
pub mod sandbox;
pub mod server;
pub mod service;
pub mod store;
pub mod supervisor;
pub mod transcript;
pub mod transport;
