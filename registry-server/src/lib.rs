//! The worker registry server: the only owner of the `worker` table.
//!
//! - [`config`]: settings from defaults, YAML, environment and flags.
//! - [`store`]: the storage trait and its SQLite and PostgreSQL backends.
//! - [`lease`]: sessions, buffered heartbeat writes and the expiry sweeper.
//! - [`index`]: the in-memory worker index that serves List.
//! - [`registration`]: batching of concurrent Register calls.
//! - [`service`]: the `registry.v1.WorkerRegistry` gRPC service.
//! - [`server`]: assembly, health, reflection and graceful shutdown.

pub mod clock;
pub mod config;
pub mod error;
pub mod index;
pub mod lease;
pub mod registration;
pub mod server;
pub mod service;
pub mod store;
