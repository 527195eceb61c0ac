//! Shared parts of the worker registry: the generated gRPC protocol, the
//! domain types both binaries agree on, and the validation rules the server
//! enforces and the agent checks before it sends anything.
//!
//! - [`proto`]: generated `registry.v1` messages, client and server.
//! - [`codec`]: the gRPC codec of both, with small initial buffers.
//! - [`domain`]: worker roles, statuses and runtime name normalization.
//! - [`validation`]: input limits and the checks that enforce them.
//! - [`json`]: conversion between `google.protobuf.Struct` and JSON.
//! - [`list_response`]: the List response, which can carry pre-encoded workers.
//! - [`duration`]: parsing of durations such as `30`, `200ms` or `2m`.

#![warn(missing_docs)]

pub mod codec;
pub mod domain;
pub mod duration;
pub mod json;
pub mod list_response;
pub mod validation;

/// Generated `registry.v1` protocol types, client and server.
#[allow(missing_docs)]
pub mod proto {
    tonic::include_proto!("registry.v1");

    pub use crate::list_response::{EncodedWorker, ListResponse};

    /// Encoded file descriptor set of `registry.proto`, served by reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("registry_descriptor");
}

/// Fully qualified name of the gRPC service, as health checks and reflection report it.
pub const SERVICE_NAME: &str = "registry.v1.WorkerRegistry";
