//! Typed ids of what sandboxd names across its modules: sandbox sessions and
//! the invocations in them.
//!
//! Both are strings inside but distinct types, so a function taking a
//! session and an invocation id cannot be called with them swapped. Strings
//! become ids at the edge (the gRPC service): a session id as the caller gave
//! it (an id no session has is simply not found), an invocation id only once
//! [`InvocationId::parse`] accepted it.
//!
//! ```compile_fail,E0308
//! use harness_sandboxd::ids::{InvocationId, SandboxSessionId};
//!
//! fn destroy(_session: &SandboxSessionId) {}
//! let invocation = InvocationId::parse("call-1").unwrap();
//! destroy(&invocation);
//! ```

use std::fmt;

/// The id of a sandbox session (`sbx-<uuid>` when sandboxd made it).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SandboxSessionId(String);

/// Lookups by the id as a request gave it: the derived `Hash` and `Eq` are
/// those of the string, as `Borrow` requires.
impl std::borrow::Borrow<str> for SandboxSessionId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl SandboxSessionId {
    /// A new, random id for a session being created.
    pub fn generate() -> Self {
        Self(format!("sbx-{}", uuid::Uuid::new_v4().simple()))
    }

    /// The session a request names.
    pub fn new(id: impl Into<String>) -> Self {
        Self(id.into())
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SandboxSessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Longest accepted invocation id.
pub const MAX_INVOCATION_ID_LEN: usize = 256;

/// The caller's id of one invocation, unique within its session: a repeat
/// with the same id gets the recorded result instead of running again.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct InvocationId(String);

/// Why a string is not an invocation id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invocation_id must be 1-{MAX_INVOCATION_ID_LEN} printable characters")]
pub struct InvalidInvocationId;

impl InvocationId {
    /// `id`, if it is 1 to [`MAX_INVOCATION_ID_LEN`] bytes with no control
    /// characters (it is logged and echoed back).
    pub fn parse(id: &str) -> Result<Self, InvalidInvocationId> {
        if id.is_empty() || id.len() > MAX_INVOCATION_ID_LEN || id.chars().any(char::is_control) {
            return Err(InvalidInvocationId);
        }
        Ok(Self(id.to_owned()))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for InvocationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invocation_ids_are_checked() {
        assert_eq!(
            InvocationId::parse("call-1").map(|id| id.to_string()),
            Ok("call-1".to_owned())
        );
        assert_eq!(
            InvocationId::parse(&"x".repeat(MAX_INVOCATION_ID_LEN)).map(|id| id.as_str().len()),
            Ok(MAX_INVOCATION_ID_LEN)
        );
        for bad in [
            String::new(),
            "a\nb".to_owned(),
            "x".repeat(MAX_INVOCATION_ID_LEN + 1),
        ] {
            assert_eq!(
                InvocationId::parse(&bad),
                Err(InvalidInvocationId),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn generated_session_ids_are_distinct_and_prefixed() {
        let (a, b) = (SandboxSessionId::generate(), SandboxSessionId::generate());
        assert_ne!(a, b);
        assert!(
            a.as_str().starts_with("sbx-") && a.as_str().len() == 36,
            "{a}"
        );
    }
}
