//! `sandbox-init`, pid 1 of every sandboxd process sandbox, and what it shares
//! with sandboxd: the sandbox root as data ([`mount_plan`]), the reviewed
//! seccomp filter ([`seccomp`]) and landlock ruleset ([`landlock`]), and the
//! messages the two exchange ([`protocol`]). [`init`] is the program; its
//! module docs list the set-up steps in the order they run.
//!
//! This crate is linked into pid 1 of every sandbox, so it stays small: no
//! async runtime, no WebAssembly runtime, no gRPC (`docs/BENCHMARKS.md`
//! records the binary's size). sandboxd depends on it for the plans and the
//! protocol; nothing here depends on sandboxd.

pub mod init;
pub mod landlock;
pub mod mount_plan;
pub mod protocol;
pub mod seccomp;
pub mod sys;
