//! Network policy for every backend: the allowlist matcher
//! ([`allowlist`]), sandboxd's own name resolution ([`resolver`]), the one
//! checked way to open an outgoing connection and the log of decisions
//! ([`egress`]), the `wasi:http` egress hook ([`http_egress`]) and the
//! process backend's HTTP proxy ([`proxy`]), which connects through
//! [`egress`] too, so both backends enforce the same rules.

pub mod allowlist;
pub mod egress;
pub mod http_egress;
pub mod proxy;
pub mod resolver;
