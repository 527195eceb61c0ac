//! Leases: the in-memory session table, buffered heartbeat writes, the
//! flusher and the expiry sweeper.
//!
//! Heartbeats are answered from memory and written to the database in one
//! statement per flush, so database load does not grow with the heartbeat
//! rate. The table is authoritative for sessions issued or ended through
//! this process. A change made elsewhere (another replica, or a row deleted
//! by hand) is noticed when the next flush updates no row for that session,
//! after which the worker's next heartbeat gets the right status code.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use sha2::{Digest, Sha256};
use tokio::sync::RwLock;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};
use worker_registry::domain::Status;

use crate::clock::Clock;
use crate::index::WorkerIndex;
use crate::store::{HeartbeatWrite, LeaseCounts, SessionRecord, Store, StoreError, Sweep};

/// Lease timing and guard settings.
#[derive(Debug, Clone)]
pub struct LeaseSettings {
    /// Time between expiry sweeps.
    pub sweep_interval: Duration,
    /// Maximum time a heartbeat stays buffered.
    pub flush_interval: Duration,
    /// Turns the mass-expiry guard on or off.
    pub mass_expiry_guard: bool,
    /// Share of live workers one sweep may expire before the guard applies.
    pub mass_expiry_threshold: f64,
    /// Minimum number of live workers for the guard to apply.
    pub mass_expiry_min_live: i64,
    /// Share of the live fleet the guard expires per sweep.
    pub mass_expiry_rate: f64,
}

/// Reasons a heartbeat is rejected.
#[derive(Debug, thiserror::Error)]
pub enum HeartbeatError {
    /// No live lease for this worker: register again.
    #[error("no live lease for worker {0}")]
    NotFound(i64),
    /// A newer registration replaced this session.
    #[error("session of worker {0} was superseded by a newer registration")]
    Superseded(i64),
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// An accepted heartbeat.
#[derive(Debug, Clone, Copy)]
pub struct HeartbeatAccepted {
    /// Server time at which the heartbeat arrived.
    pub server_time: DateTime<Utc>,
    /// New lease deadline.
    pub lease_deadline: DateTime<Utc>,
    /// Lease TTL.
    pub lease_ttl: Duration,
    /// Granted heartbeat interval.
    pub heartbeat_interval: Duration,
}

/// Counters exposed for logs, tests and benchmarks.
#[derive(Debug, Default)]
pub struct LeaseMetrics {
    /// Heartbeats accepted with a success response.
    pub heartbeats_accepted: AtomicU64,
    /// Heartbeat write statements sent to the database.
    pub heartbeat_statements: AtomicU64,
    /// Heartbeat write statements that failed and were retried.
    pub heartbeat_write_failures: AtomicU64,
    /// Workers this process marked inactive because their lease ran out.
    pub workers_expired: AtomicU64,
    /// Sweeps that the mass-expiry guard slowed down.
    pub guarded_sweeps: AtomicU64,
}

/// A session that this process has confirmed as current.
#[derive(Debug, Clone)]
struct Session {
    token_hash: [u8; 32],
    /// Monotonic lease deadline as seen by this process; never later than
    /// the one in the database, so the fast path never outlives the lease.
    deadline: Instant,
    lease_ttl: Duration,
    heartbeat_interval: Duration,
}

#[derive(Debug, Default)]
struct Table {
    sessions: HashMap<i64, Session>,
    pending: HashMap<i64, HeartbeatWrite>,
}

/// Database reachability as seen by this process.
#[derive(Debug)]
struct DatabaseState {
    down: AtomicBool,
    /// When this process last (re)gained its database; leases get a grace
    /// period of their own TTL from this moment.
    regained: Mutex<Instant>,
}

/// Called when the database goes down or comes back.
pub type AvailabilityHook = Box<dyn Fn(bool) + Send + Sync>;

/// The lease manager shared by the gRPC service and the background loops.
pub struct Leases {
    store: Arc<dyn Store>,
    clock: Clock,
    settings: LeaseSettings,
    table: Mutex<Table>,
    /// Held for reading while a heartbeat is checked against the database,
    /// and for writing while a sweep decides what to expire, so a heartbeat
    /// accepted on the slow path is always seen by the next sweep.
    sweep_gate: RwLock<()>,
    database: DatabaseState,
    on_availability: Mutex<Option<AvailabilityHook>>,
    /// Serializes flushes, because the sweeper and shutdown flush too.
    flush_lock: tokio::sync::Mutex<()>,
    /// Start of the last flush of any origin; the flusher waits a full
    /// flush interval after it, so sweeps do not add statements on top.
    last_flush: Mutex<Instant>,
    metrics: LeaseMetrics,
    /// Follows every write this process makes, for List.
    index: Arc<WorkerIndex>,
}

/// Hashes a session token; only the hash is stored or compared.
pub fn hash_token(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

impl Leases {
    /// Creates a lease manager over `store`.
    pub fn new(store: Arc<dyn Store>, clock: Clock, settings: LeaseSettings) -> Arc<Self> {
        Arc::new(Leases {
            store,
            clock,
            settings,
            table: Mutex::new(Table::default()),
            sweep_gate: RwLock::new(()),
            database: DatabaseState {
                down: AtomicBool::new(false),
                regained: Mutex::new(Instant::now()),
            },
            on_availability: Mutex::new(None),
            flush_lock: tokio::sync::Mutex::new(()),
            last_flush: Mutex::new(Instant::now()),
            metrics: LeaseMetrics::default(),
            index: Arc::new(WorkerIndex::new()),
        })
    }

    /// Sets the function called with `true` when the database comes back
    /// and `false` when it goes down; the server uses it for health status.
    pub fn set_availability_hook(&self, hook: AvailabilityHook) {
        *self.on_availability.lock().expect("availability hook lock") = Some(hook);
    }

    /// Returns the counters.
    pub fn metrics(&self) -> &LeaseMetrics {
        &self.metrics
    }

    /// Returns the server clock.
    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    /// Returns the worker index that serves List.
    pub fn index(&self) -> &Arc<WorkerIndex> {
        &self.index
    }

    /// Returns the store.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Tells whether the database was unreachable at the last attempt.
    pub fn database_down(&self) -> bool {
        self.database.down.load(Ordering::SeqCst)
    }

    /// Returns the time since this process last (re)gained its database.
    pub fn since_regained(&self) -> Duration {
        let regained = *self.database.regained.lock().expect("regained lock");
        Instant::now().saturating_duration_since(regained)
    }

    /// Records the outcome of a store call: an Unavailable error marks the
    /// database down, and the first success after that starts a new grace
    /// period.
    pub fn observe<T>(&self, result: &Result<T, StoreError>) {
        match result {
            Err(StoreError::Unavailable(reason)) => {
                if !self.database.down.swap(true, Ordering::SeqCst) {
                    warn!(error = %reason, "database unavailable");
                    self.notify_availability(false);
                }
            }
            Err(_) => {}
            Ok(_) => {
                if self.database.down.swap(false, Ordering::SeqCst) {
                    *self.database.regained.lock().expect("regained lock") = Instant::now();
                    info!("database available again; leases get a grace period of their own TTL");
                    self.notify_availability(true);
                }
            }
        }
    }

    fn notify_availability(&self, available: bool) {
        if let Some(hook) = self.on_availability.lock().expect("availability hook lock").as_ref() {
            hook(available);
        }
    }

    /// Records a session issued by a successful Register.
    pub fn session_started(&self, worker_id: i64, token_hash: [u8; 32], lease_ttl: Duration, interval: Duration) {
        let session = Session {
            token_hash,
            deadline: Instant::now() + lease_ttl,
            lease_ttl,
            heartbeat_interval: interval,
        };
        let mut table = self.table.lock().expect("lease table lock");
        table.pending.remove(&worker_id);
        table.sessions.insert(worker_id, session);
    }

    /// Forgets a session ended by a successful Deregister.
    pub fn session_ended(&self, worker_id: i64) {
        let mut table = self.table.lock().expect("lease table lock");
        table.pending.remove(&worker_id);
        table.sessions.remove(&worker_id);
    }

    /// Accepts a heartbeat or returns the reason it cannot be accepted.
    ///
    /// The fast path needs no database: the session is known, the token
    /// matches and the lease has not lapsed. Otherwise the session is read
    /// from the database once and cached.
    pub async fn heartbeat(
        &self,
        worker_id: i64,
        token_hash: [u8; 32],
        status: Option<Status>,
    ) -> Result<HeartbeatAccepted, HeartbeatError> {
        if let Some(accepted) = self.accept_known(worker_id, &token_hash, status) {
            return Ok(accepted);
        }

        let _gate = self.sweep_gate.read().await;

        let result = self.store.session(worker_id).await;
        self.observe(&result);
        let Some(record) = result? else {
            self.forget(worker_id);
            return Err(HeartbeatError::NotFound(worker_id));
        };

        self.check_record(&record, &token_hash)?;

        let now = Instant::now();
        let session = Session {
            token_hash,
            deadline: now,
            lease_ttl: record.lease_ttl,
            heartbeat_interval: record.heartbeat_interval,
        };
        let mut table = self.table.lock().expect("lease table lock");
        table.sessions.insert(worker_id, session);
        Ok(self.renew(&mut table, worker_id, status, now))
    }

    /// Renews a known session whose token matches and whose lease has not
    /// lapsed, from memory, or returns `None`.
    fn accept_known(&self, worker_id: i64, token_hash: &[u8; 32], status: Option<Status>) -> Option<HeartbeatAccepted> {
        let now = Instant::now();
        let mut table = self.table.lock().expect("lease table lock");
        let session = table.sessions.get(&worker_id)?;
        if session.token_hash != *token_hash || session.deadline < now {
            return None;
        }
        Some(self.renew(&mut table, worker_id, status, now))
    }

    /// Extends the lease of a session in the table and buffers its write.
    fn renew(&self, table: &mut Table, worker_id: i64, status: Option<Status>, now: Instant) -> HeartbeatAccepted {
        let session = table
            .sessions
            .get_mut(&worker_id)
            .expect("renewed session is in the table");
        session.deadline = now + session.lease_ttl;
        let token_hash = session.token_hash.to_vec();
        let server_time = self.clock.at(now);
        let lease_deadline = server_time + TimeDelta::from_std(session.lease_ttl).unwrap_or(TimeDelta::MAX);
        let accepted = HeartbeatAccepted {
            server_time,
            lease_deadline,
            lease_ttl: session.lease_ttl,
            heartbeat_interval: session.heartbeat_interval,
        };

        // A newer status wins; no status keeps the one already buffered.
        let previous_status = table.pending.get(&worker_id).and_then(|write| write.status);
        table.pending.insert(
            worker_id,
            HeartbeatWrite {
                worker_id,
                token_hash,
                at: server_time,
                lease_expires: lease_deadline,
                status: status.or(previous_status),
            },
        );

        self.metrics.heartbeats_accepted.fetch_add(1, Ordering::Relaxed);
        accepted
    }

    /// Checks a session read from the database against a heartbeat.
    fn check_record(&self, record: &SessionRecord, token_hash: &[u8; 32]) -> Result<(), HeartbeatError> {
        let current = record.token_hash.as_deref() == Some(token_hash.as_slice());
        if !record.status.is_live() {
            self.forget(record.id);
            return Err(HeartbeatError::NotFound(record.id));
        }
        if !current {
            self.forget(record.id);
            return Err(HeartbeatError::Superseded(record.id));
        }

        let now = self.clock.now();
        let unexpired = record.lease_expires.is_some_and(|deadline| deadline >= now);
        let in_grace = record.lease_ttl > self.since_regained();
        if !unexpired && !in_grace {
            return Err(HeartbeatError::NotFound(record.id));
        }
        Ok(())
    }

    fn forget(&self, worker_id: i64) {
        self.table.lock().expect("lease table lock").sessions.remove(&worker_id);
    }

    /// Writes all buffered heartbeats in one statement. On failure the
    /// batch goes back into the buffer, behind any newer heartbeat, and the
    /// next flush retries it.
    pub async fn flush(&self) -> Result<(), StoreError> {
        let _serialized = self.flush_lock.lock().await;
        *self.last_flush.lock().expect("last flush lock") = Instant::now();

        let batch: Vec<HeartbeatWrite> = {
            let mut table = self.table.lock().expect("lease table lock");
            table.pending.drain().map(|(_, write)| write).collect()
        };
        if batch.is_empty() {
            return Ok(());
        }

        self.metrics.heartbeat_statements.fetch_add(1, Ordering::Relaxed);
        let result = self.store.write_heartbeats(&batch).await;
        self.observe(&result);

        let updated = match result {
            Ok(updated) => updated,
            Err(error) => {
                self.metrics.heartbeat_write_failures.fetch_add(1, Ordering::Relaxed);
                let mut table = self.table.lock().expect("lease table lock");
                for write in batch {
                    table.pending.entry(write.worker_id).or_insert(write);
                }
                return Err(error);
            }
        };

        self.index.heartbeats_written(&batch, &updated);

        // A heartbeat that updated no row belongs to a session that ended
        // elsewhere. Forgetting the session sends the worker's next heartbeat
        // to the database, which returns the right status code.
        if updated.len() != batch.len() {
            let updated: std::collections::HashSet<i64> = updated.into_iter().collect();
            let mut table = self.table.lock().expect("lease table lock");
            for write in batch.iter().filter(|write| !updated.contains(&write.worker_id)) {
                let same_session = table
                    .sessions
                    .get(&write.worker_id)
                    .is_some_and(|session| session.token_hash.as_slice() == write.token_hash.as_slice());
                if same_session {
                    table.sessions.remove(&write.worker_id);
                    debug!(
                        worker_id = write.worker_id,
                        "buffered heartbeat updated no row; session forgotten"
                    );
                }
            }
        }
        Ok(())
    }

    /// Runs one sweep: flushes buffered heartbeats, then marks workers with
    /// a lapsed lease inactive, at a bounded rate when the mass-expiry guard
    /// applies. Returns the number of workers expired.
    pub async fn sweep(&self) -> Result<usize, StoreError> {
        if self.database_down() {
            let result = self.store.ping().await;
            self.observe(&result);
            result?;
        }

        // A heartbeat written before the expiry decision cannot be contradicted by it.
        self.flush().await?;

        let _gate = self.sweep_gate.write().await;

        let exclude_ids: Vec<i64> = self
            .table
            .lock()
            .expect("lease table lock")
            .pending
            .keys()
            .copied()
            .collect();
        let mut sweep = Sweep {
            now: self.clock.now(),
            since_regained: self.since_regained(),
            limit: i64::MAX,
            exclude_ids,
        };

        let counts = self.store.count_leases(&sweep).await;
        self.observe(&counts);
        let counts = counts?;
        if counts.expirable == 0 {
            return Ok(0);
        }
        sweep.limit = self.expiry_limit(counts);

        let result = self.store.expire(&sweep).await;
        self.observe(&result);
        let expired = result?;
        let expired_ids: Vec<i64> = expired.iter().map(|worker| worker.id).collect();
        self.index.expired(&expired_ids, sweep.now);

        let mut table = self.table.lock().expect("lease table lock");
        for worker in &expired {
            table.sessions.remove(&worker.id);
            let age_ms = worker
                .last_heartbeat
                .map(|last| (sweep.now - last).num_milliseconds())
                .unwrap_or(-1);
            info!(worker_id = worker.id, name = %worker.name, last_heartbeat_age_ms = age_ms, "worker expired");
        }
        drop(table);

        self.metrics
            .workers_expired
            .fetch_add(expired.len() as u64, Ordering::Relaxed);
        Ok(expired.len())
    }

    /// Returns how many workers this sweep may expire.
    fn expiry_limit(&self, counts: LeaseCounts) -> i64 {
        let settings = &self.settings;
        let guarded = settings.mass_expiry_guard
            && counts.live >= settings.mass_expiry_min_live
            && counts.expirable as f64 > settings.mass_expiry_threshold * counts.live as f64;
        if !guarded {
            return counts.expirable;
        }

        let limit = ((counts.live as f64 * settings.mass_expiry_rate).ceil() as i64).max(1);
        self.metrics.guarded_sweeps.fetch_add(1, Ordering::Relaxed);
        warn!(
            live = counts.live,
            expirable = counts.expirable,
            limit,
            "mass expiry guard: expiring at a bounded rate; check the network between agents and the registry"
        );
        limit
    }

    /// Runs the flusher until `shutdown` is cancelled, then flushes once more.
    ///
    /// A flush runs one flush interval after the previous one, whether the
    /// flusher or a sweep ran it, so heartbeat statements stay at most at one
    /// per flush interval plus one per sweep.
    pub async fn run_flusher(self: Arc<Self>, shutdown: CancellationToken) {
        let mut failures: u64 = 0;

        loop {
            let due = *self.last_flush.lock().expect("last flush lock") + self.settings.flush_interval;
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep_until(due) => {}
            }
            let last_flush = *self.last_flush.lock().expect("last flush lock");
            if Instant::now() < last_flush + self.settings.flush_interval {
                continue;
            }

            match self.flush().await {
                Ok(()) => failures = 0,
                Err(error) => {
                    failures += 1;
                    // Log the first failure and then every 30th, so an outage does not flood the log.
                    if failures == 1 || failures % 30 == 0 {
                        warn!(error = %error, failures, "heartbeat flush failed; retrying with the next flush");
                    }
                }
            }
        }

        if let Err(error) = self.flush().await {
            error!(error = %error, "final heartbeat flush failed; buffered heartbeats are lost");
        }
    }

    /// Runs the sweeper until `shutdown` is cancelled.
    pub async fn run_sweeper(self: Arc<Self>, shutdown: CancellationToken) {
        let mut ticker = tokio::time::interval(self.settings.sweep_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failures: u64 = 0;

        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = ticker.tick() => {}
            }

            match self.sweep().await {
                Ok(_) => failures = 0,
                Err(error) => {
                    failures += 1;
                    if failures == 1 || failures % 30 == 0 {
                        warn!(error = %error, failures, "expiry sweep failed; retrying with the next sweep");
                    }
                }
            }
        }
    }
}
