//! Typed ids of the things the control plane names across its modules:
//! sessions and tenants.
//!
//! Both are strings inside, but distinct types, so a function taking a
//! tenant and a session id cannot be called with the two swapped: that no
//! longer compiles. Strings become ids at the edges only: the gRPC service
//! (from request fields), the store (from its rows) and tests.
//!
//! Neither carries rules of its own: any string is a well-formed id, as it
//! was before these types (an id nothing has is simply not found; requests
//! check their required fields themselves). New session ids are UUIDs
//! ([`SessionId::generate`]).
//!
//! Reading a tenant's session compiles with the arguments in order:
//!
//! ```
//! use harness_control_plane::ids::{SessionId, TenantId};
//! use harness_control_plane::store::EventStore;
//!
//! async fn read(store: &dyn EventStore, tenant: TenantId, session_id: SessionId) {
//!     let _session = store.get_session(tenant, session_id).await;
//! }
//! ```
//!
//! and not with them swapped:
//!
//! ```compile_fail,E0308
//! use harness_control_plane::ids::{SessionId, TenantId};
//! use harness_control_plane::store::EventStore;
//!
//! async fn read(store: &dyn EventStore, tenant: TenantId, session_id: SessionId) {
//!     let _session = store.get_session(session_id, tenant).await;
//! }
//! ```

use std::fmt;

/// The id of a control-plane session (not of a sandboxd session, which
/// stays a plain string: it is sandboxd's).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(String);

impl SessionId {
    /// A new, random id (a UUID v4) for a session being created.
    pub fn generate() -> Self {
        Self(uuid::Uuid::new_v4().to_string())
    }

    /// The session named `id` (as a caller or the store gives it).
    pub fn new(id: impl Into<String>) -> Self {
        Self(id.into())
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The id as an owned string (for a protobuf field, say).
    pub fn into_string(self) -> String {
        self.0
    }
}

/// The id of a tenant: who owns a session.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TenantId(String);

impl TenantId {
    /// The tenant named `id`.
    pub fn new(id: impl Into<String>) -> Self {
        Self(id.into())
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The id as an owned string (for a protobuf field, say).
    pub fn into_string(self) -> String {
        self.0
    }
}

/// `Display`, `AsRef<str>`, `From<String>`, `From<&str>` and comparisons
/// with text for an id type wrapping a `String`.
macro_rules! string_id {
    ($id:ident) => {
        impl fmt::Display for $id {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $id {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl From<String> for $id {
            fn from(id: String) -> Self {
                Self(id)
            }
        }

        impl From<&str> for $id {
            fn from(id: &str) -> Self {
                Self(id.to_owned())
            }
        }

        impl From<$id> for String {
            fn from(id: $id) -> Self {
                id.0
            }
        }

        impl PartialEq<str> for $id {
            fn eq(&self, other: &str) -> bool {
                self.0 == other
            }
        }

        impl PartialEq<&str> for $id {
            fn eq(&self, other: &&str) -> bool {
                self.0 == *other
            }
        }

        impl PartialEq<String> for $id {
            fn eq(&self, other: &String) -> bool {
                &self.0 == other
            }
        }
    };
}

string_id!(SessionId);
string_id!(TenantId);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_id_shows_and_compares_as_its_text() {
        let session = SessionId::new("s1");
        assert_eq!(session.to_string(), "s1");
        assert_eq!(session.as_str(), "s1");
        assert_eq!(session, "s1");
        assert_eq!(SessionId::from("s1".to_owned()), session);
        assert_eq!(String::from(session), "s1");
        let tenant = TenantId::from("default");
        assert_eq!(tenant.as_ref(), "default");
        assert_eq!(tenant.into_string(), "default");
    }

    #[test]
    fn generated_session_ids_are_distinct_uuids() {
        let first = SessionId::generate();
        let second = SessionId::generate();
        assert_ne!(first, second);
        assert!(uuid::Uuid::parse_str(first.as_str()).is_ok());
    }
}
