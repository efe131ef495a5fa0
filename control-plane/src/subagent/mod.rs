//! Subagents: agents called as tools, each in a child session of its own.
//!
//! An agent lists `subagents = ["researcher"]`; its model sees one harness
//! tool per subagent, `delegate_to_<name> {task, files?}`. A call is a
//! delegation, durable like every other step:
//!
//! 1. The parent's loop decides it before anything runs ([`limits`]: depth
//!    and child count; [`reserve`]: the child's budget out of what the
//!    parent has left) and records the decision — the child's session id,
//!    budget, lineage and workspace — in the call's step record, with
//!    `subagent_started`, in the batch that records `tool_started`.
//! 2. The tool ([`delegate`]) creates the child session (idempotent by the
//!    call's invocation id) with the task and the [`context_pack`] of the
//!    files named, launches it like any session, waits for its loop to end
//!    (the supervisor says when) and then reads its log, once; a child whose
//!    loop does not run here is followed instead.
//! 3. When the child's `finished` is in, the [`receipt`] built from the
//!    child's log is the call's one result, and `subagent_finished` adds the
//!    child's usage to the parent's.
//!
//! A control plane killed at any point resumes both sessions on their own
//! logs: the parent's call in flight runs again with the recorded
//! delegation, finds the child instead of creating another, and waits for
//! it; the child resumes like any interrupted session.
//!
//! The child sees only its own system prompt and tools and the task —
//! none of the parent's messages. By default it works in the parent's
//! sandbox session (`workspace = "shared"` on the subagent's file) and
//! never destroys it; `workspace = "isolated"` gives it a fresh one.

pub mod context_pack;
pub mod delegate;
pub mod limits;
pub mod receipt;
pub mod reserve;

pub use delegate::{DelegateTool, Delegator};
