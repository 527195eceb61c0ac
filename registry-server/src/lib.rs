//! The worker registry server: the only owner of the `worker` table.
//!
//! - [`store`]: the storage trait and its SQLite and PostgreSQL backends.

pub mod store;
