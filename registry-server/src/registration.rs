//! Batches concurrent Register calls into multi-row writes.
//!
//! A registration storm (every agent of a fleet starting at once) would
//! otherwise cost one statement and one commit per agent. The batcher
//! takes whatever Register calls are waiting when an executor becomes
//! free, so a single call is written at once and a storm is written in
//! batches of up to [`MAX_BATCH`] rows.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{Map, Value as Json};
use tokio::sync::{mpsc, oneshot, Semaphore};
use worker_registry::validation::Registration;

use crate::store::{LeaseGrant, Store, StoreError, StoreResult, WorkerRecord};

/// Largest number of registrations written in one batch.
pub const MAX_BATCH: usize = 256;
/// Batches written at the same time; each needs one pooled connection.
const EXECUTORS: usize = 4;
/// Register calls that may wait for an executor before callers wait to enqueue.
const QUEUE_CAPACITY: usize = 8192;

/// An owned [`LeaseGrant`], so it can wait in the queue.
#[derive(Debug, Clone)]
pub struct PendingGrant {
    /// The validated request.
    pub registration: Registration,
    /// Capabilities document to store.
    pub capabilities: Map<String, Json>,
    /// SHA-256 of the new session token.
    pub token_hash: [u8; 32],
    /// Granted heartbeat interval.
    pub heartbeat_interval: Duration,
    /// Lease time to live.
    pub lease_ttl: Duration,
    /// The server's time when the request arrived.
    pub now: DateTime<Utc>,
    /// Time since the server last (re)gained its database, when the request arrived.
    pub since_regained: Duration,
}

impl PendingGrant {
    fn as_grant(&self) -> LeaseGrant<'_> {
        LeaseGrant {
            registration: &self.registration,
            capabilities: &self.capabilities,
            token_hash: &self.token_hash,
            heartbeat_interval: self.heartbeat_interval,
            lease_ttl: self.lease_ttl,
            now: self.now,
            since_regained: self.since_regained,
        }
    }
}

struct Job {
    grant: PendingGrant,
    reply: oneshot::Sender<StoreResult<WorkerRecord>>,
}

/// Queue of Register calls in front of [`Store::register_batch`].
#[derive(Debug, Clone)]
pub struct RegisterBatcher {
    sender: mpsc::Sender<Job>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job")
            .field("name", &self.grant.registration.name)
            .finish()
    }
}

impl RegisterBatcher {
    /// Starts the dispatcher task. It ends when every clone of the batcher
    /// is dropped.
    pub fn start(store: Arc<dyn Store>) -> Self {
        let (sender, receiver) = mpsc::channel(QUEUE_CAPACITY);
        tokio::spawn(dispatch(store, receiver));
        RegisterBatcher { sender }
    }

    /// Writes one registration, batched with others that wait at the same time.
    pub async fn register(&self, grant: PendingGrant) -> StoreResult<WorkerRecord> {
        let (reply, response) = oneshot::channel();
        self.sender
            .send(Job { grant, reply })
            .await
            .map_err(|_| StoreError::Unavailable("registry is shutting down".into()))?;
        response
            .await
            .map_err(|_| StoreError::Internal("register batch ended without a result".into()))?
    }
}

async fn dispatch(store: Arc<dyn Store>, mut receiver: mpsc::Receiver<Job>) {
    let executors = Arc::new(Semaphore::new(EXECUTORS));
    loop {
        // Waiting for a free executor first lets calls pile up meanwhile,
        // so a busy registry writes larger batches.
        let Ok(permit) = Arc::clone(&executors).acquire_owned().await else {
            return;
        };
        let Some(first) = receiver.recv().await else {
            return;
        };
        let mut jobs = vec![first];
        while jobs.len() < MAX_BATCH {
            match receiver.try_recv() {
                Ok(job) => jobs.push(job),
                Err(_) => break,
            }
        }

        let store = Arc::clone(&store);
        tokio::spawn(async move {
            let grants: Vec<LeaseGrant<'_>> = jobs.iter().map(|job| job.grant.as_grant()).collect();
            let results = store.register_batch(&grants).await;
            drop(grants);
            for (job, result) in jobs.into_iter().zip(results) {
                // A caller that went away no longer needs its result.
                let _ = job.reply.send(result);
            }
            drop(permit);
        });
    }
}
