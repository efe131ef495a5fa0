//! The control plane: runs agent sessions durably and records each as an
//! append-only event log; tool calls run on sandboxd.
//!
//! Follow one session through the modules:
//!
//! 1. [`config`] is read at start-up; [`server::ControlPlane::open`] loads the
//!    [`agent`] definitions (one TOML file per agent: model and [`provider`],
//!    [`policy`], [`budget`], sandbox policy), opens the [`store`] and creates
//!    a lazy [`sandbox`] client (addresses and channels live in
//!    [`transport`]), then the [`supervisor`] resumes every session a
//!    previous process left unfinished.
//! 2. A caller's `StartSession` arrives at [`service`]: the budget is lowered
//!    as asked, the session row is created (idempotent by tenant + key) and
//!    the [`supervisor::SessionSupervisor`] runs it as a task.
//! 3. The [`agent_loop`] replays whatever the log already holds, then turns:
//!    budgets are checked, the [`provider`] streams the model's reply, each
//!    tool call is validated, decided by [`policy`] (approvals wait for
//!    `ResolveApproval`), dispatched to sandboxd, and every step is written
//!    to the log through [`event_log::EventLog`] before anything leaves the
//!    process. It ends with the sandbox session destroyed and a `finished`
//!    event.
//! 4. `StreamEvents` readers follow the log through [`event_log`]: everything
//!    after their cursor from the store, then live appends, woken by a
//!    per-session watch channel. [`event`] holds the per-kind facts (names,
//!    usage, status) shared by the store, the loop and the [`transcript`],
//!    which renders events for people.
//!
//! Sessions and tenants are named by the typed ids of [`ids`] wherever they
//! cross a module, so that a tenant and a session id cannot be swapped.
//!
//! [`crash_hook`] is a test hook that kills the process at a chosen point.
//! Everything fallible returns a module's own `thiserror` enum (reported with
//! [`error_report::error_chain`]); only [`service::ServiceError`] is turned
//! into a gRPC status.

pub mod agent;
pub mod agent_loop;
pub mod budget;
pub mod compaction;
pub mod config;
pub mod context;
pub mod crash_hook;
pub mod error_report;
pub mod event;
pub mod event_log;
pub mod handoff;
pub mod harness_tools;
pub mod ids;
pub mod plan;
pub mod policy;
pub mod prompt;
pub mod provider;
pub mod sandbox;
pub mod server;
pub mod service;
pub mod skill;
pub mod store;
pub mod subagent;
pub mod supervisor;
mod sys;
pub mod transcript;
pub mod transport;
pub mod truncate;
