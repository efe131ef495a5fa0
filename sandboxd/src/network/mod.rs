//! Network policy for every backend: the allowlist matcher
//! ([`allowlist`]), sandboxd's own name resolution ([`resolver`]), and the
//! `wasi:http` egress hook ([`http_egress`]). The process backend's proxy
//! will use the same matcher and resolver.

pub mod allowlist;
pub mod http_egress;
pub mod resolver;
