//! The gRPC contracts of the harness, and nothing else.
//!
//! - [`sandbox::v1`]: control plane → `sandboxd` (sessions, tools, invocations, files).
//! - [`control::v1`]: calling services → control plane (agent sessions and events).
//!
//! The `.proto` sources live beside this crate in `proto/harness/`; they are the
//! documentation of record for every rpc and field. [`FILE_DESCRIPTOR_SET`] is
//! served by both daemons through gRPC server reflection.

/// `harness.sandbox.v1`: the sandboxd API.
pub mod sandbox {
    /// Version 1.
    pub mod v1 {
        #![allow(missing_docs, clippy::all)]
        tonic::include_proto!("harness.sandbox.v1");
    }
}

/// `harness.control.v1`: the control-plane API.
pub mod control {
    /// Version 1.
    pub mod v1 {
        #![allow(missing_docs, clippy::all)]
        tonic::include_proto!("harness.control.v1");
    }
}

/// Encoded `FileDescriptorSet` of both packages (and the well-known types they
/// import), for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/harness_descriptor.bin"));

/// Converts a [`std::time::Duration`] into the protobuf well-known type.
pub fn duration_to_proto(duration: std::time::Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(duration.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(duration.subsec_nanos()).unwrap_or(0),
    }
}

/// Converts a protobuf duration into a [`std::time::Duration`]; negative values
/// become zero.
pub fn duration_from_proto(duration: &prost_types::Duration) -> std::time::Duration {
    let seconds = u64::try_from(duration.seconds).unwrap_or(0);
    let nanos = u32::try_from(duration.nanos).unwrap_or(0);
    std::time::Duration::new(seconds, nanos)
}

/// Converts a [`std::time::SystemTime`] into the protobuf well-known type.
pub fn timestamp_to_proto(time: std::time::SystemTime) -> prost_types::Timestamp {
    prost_types::Timestamp::from(time)
}
