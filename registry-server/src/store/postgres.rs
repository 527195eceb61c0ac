//! Placeholder, replaced by the real backend.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use worker_registry::validation::ListFilter;

use super::*;

/// Placeholder backend.
pub struct PostgresStore;

impl PostgresStore {
    /// Placeholder.
    pub async fn open(_url: &str, _options: &PoolOptions) -> anyhow::Result<Self> {
        anyhow::bail!("backend not built yet")
    }
}

#[async_trait]
impl Store for PostgresStore {
    fn backend(&self) -> &'static str {
        "postgres"
    }
    async fn migrate(&self) -> StoreResult<()> {
        Err(StoreError::Internal("not built".into()))
    }
    async fn ping(&self) -> StoreResult<()> {
        Err(StoreError::Internal("not built".into()))
    }
    async fn register(&self, _grant: &LeaseGrant<'_>) -> StoreResult<WorkerRecord> {
        Err(StoreError::Internal("not built".into()))
    }
    async fn session(&self, _worker_id: i64) -> StoreResult<Option<SessionRecord>> {
        Err(StoreError::Internal("not built".into()))
    }
    async fn write_heartbeats(&self, _heartbeats: &[HeartbeatWrite]) -> StoreResult<Vec<i64>> {
        Err(StoreError::Internal("not built".into()))
    }
    async fn deregister(&self, _worker_id: i64, _token_hash: &[u8], _now: DateTime<Utc>) -> StoreResult<WorkerRecord> {
        Err(StoreError::Internal("not built".into()))
    }
    async fn get_by_id(&self, _id: i64) -> StoreResult<Option<WorkerRecord>> {
        Err(StoreError::Internal("not built".into()))
    }
    async fn get_by_name(&self, _name: &str) -> StoreResult<Option<WorkerRecord>> {
        Err(StoreError::Internal("not built".into()))
    }
    async fn list(&self, _filter: &ListFilter, _after_id: i64, _now: DateTime<Utc>) -> StoreResult<Vec<WorkerRecord>> {
        Err(StoreError::Internal("not built".into()))
    }
    async fn count_leases(&self, _sweep: &Sweep) -> StoreResult<LeaseCounts> {
        Err(StoreError::Internal("not built".into()))
    }
    async fn expire(&self, _sweep: &Sweep) -> StoreResult<Vec<ExpiredWorker>> {
        Err(StoreError::Internal("not built".into()))
    }
}
