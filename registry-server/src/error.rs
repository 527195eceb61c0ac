//! The one place where domain errors become gRPC status codes.
//!
//! Database details are logged here and never sent to clients.

use tonic::Status;
use tracing::{error, warn};
use worker_registry::validation::ValidationError;

use crate::lease::HeartbeatError;
use crate::store::StoreError;

/// Errors an RPC can end with.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The request broke a validation rule.
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    /// A store operation failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A heartbeat was rejected.
    #[error(transparent)]
    Heartbeat(#[from] HeartbeatError),
    /// The requested worker does not exist.
    #[error("{0}")]
    NotFound(String),
}

impl From<ServiceError> for Status {
    fn from(error: ServiceError) -> Self {
        match error {
            ServiceError::Invalid(invalid) => Status::invalid_argument(invalid.to_string()),
            ServiceError::NotFound(message) => Status::not_found(message),
            ServiceError::Heartbeat(HeartbeatError::NotFound(id)) => Status::not_found(format!(
                "worker {id} holds no live lease (unknown, expired or deregistered); register again"
            )),
            ServiceError::Heartbeat(HeartbeatError::Superseded(id)) => Status::failed_precondition(format!(
                "session token is not the current one of worker {id}: a newer registration superseded it, or it \
                 is wrong; stop heartbeating with this token and use the token of the latest RegisterResponse"
            )),
            ServiceError::Heartbeat(HeartbeatError::Store(store)) | ServiceError::Store(store) => store_status(store),
        }
    }
}

fn store_status(error: StoreError) -> Status {
    match error {
        StoreError::NotFound => Status::not_found("worker not found"),
        StoreError::AlreadyExists {
            name,
            host,
            instance_id,
        } => Status::already_exists(format!(
            "worker {name:?} is held by a live lease of instance {instance_id:?} on host {host:?}; \
             wait for it to expire or deregister, or use another name"
        )),
        StoreError::Superseded => {
            Status::failed_precondition("session was superseded by a newer registration; this token is no longer valid")
        }
        StoreError::Unavailable(detail) => {
            warn!(error = %detail, "database unavailable");
            Status::unavailable("database unavailable; retry with backoff")
        }
        StoreError::Internal(detail) => {
            error!(error = %detail, "database error");
            Status::internal("internal error; the registry logged the details")
        }
    }
}
