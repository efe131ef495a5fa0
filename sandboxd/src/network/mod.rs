//! Network policy for every backend: the allowlist matcher
//! ([`allowlist`]), sandboxd's own name resolution ([`resolver`]), the one
//! checked way to open an outgoing connection and the log of decisions
//! ([`egress`]), and the `wasi:http` egress hook ([`http_egress`]). The
//! process backend's proxy ([`crate::process::proxy`]) connects through
//! [`egress`] too, so both backends enforce the same rules.

pub mod allowlist;
pub mod egress;
pub mod http_egress;
pub mod resolver;
