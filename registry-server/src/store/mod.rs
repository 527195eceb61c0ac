//! Storage of the `worker` table behind one trait, with a SQLite and a
//! PostgreSQL implementation chosen by the database URL scheme.
//!
//! sqlx errors stay inside this module: each backend maps them to
//! [`StoreError`] in one function, so the service receives only domain errors.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde_json::{Map, Value as Json};
use worker_registry::domain::{Role, Status};
use worker_registry::validation::{ListFilter, Registration};

pub mod postgres;
pub mod sqlite;

/// Errors a store reports to the service.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No row matched.
    #[error("worker not found")]
    NotFound,
    /// The name is held by a live lease of another instance.
    #[error("worker {name:?} is held by a live lease of instance {instance_id:?} on host {host:?}")]
    AlreadyExists {
        /// Name that was requested.
        name: String,
        /// Host of the current holder.
        host: String,
        /// Instance id of the current holder.
        instance_id: String,
    },
    /// The session token does not match the current session.
    #[error("session superseded by a newer registration")]
    Superseded,
    /// The database cannot be reached or did not respond in time.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// Any other database failure; its text is logged, never sent to clients.
    #[error("database error: {0}")]
    Internal(String),
}

/// Result type of store methods.
pub type StoreResult<T> = Result<T, StoreError>;

/// A worker row as the service needs it.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerRecord {
    /// Primary key; stays the same across re-registrations.
    pub id: i64,
    /// Unique name.
    pub name: String,
    /// Role.
    pub role: Role,
    /// Status.
    pub status: Status,
    /// Host name; empty when unknown.
    pub host: String,
    /// Instance id of the holder of the last session.
    pub instance_id: String,
    /// Stored capabilities document.
    pub capabilities: Map<String, Json>,
    /// Time of the last accepted heartbeat or registration.
    pub last_heartbeat: Option<DateTime<Utc>>,
    /// Time after which the lease lapses unless renewed.
    pub lease_expires: Option<DateTime<Utc>>,
    /// Lease time to live granted at registration.
    pub lease_ttl: Duration,
    /// Heartbeat interval granted at registration.
    pub heartbeat_interval: Duration,
    /// Creation time of the row.
    pub created: DateTime<Utc>,
    /// Time of the last change to the row.
    pub updated: DateTime<Utc>,
}

/// The session fields of one worker, read to check a heartbeat.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionRecord {
    /// Worker id.
    pub id: i64,
    /// Worker name.
    pub name: String,
    /// Current status.
    pub status: Status,
    /// SHA-256 of the current session token, if any session was issued.
    pub token_hash: Option<Vec<u8>>,
    /// Instance id of the session holder.
    pub instance_id: String,
    /// Time after which the lease lapses unless renewed.
    pub lease_expires: Option<DateTime<Utc>>,
    /// Lease time to live.
    pub lease_ttl: Duration,
    /// Granted heartbeat interval.
    pub heartbeat_interval: Duration,
}

/// Everything a store needs to start a new lease.
#[derive(Debug, Clone)]
pub struct LeaseGrant<'a> {
    /// The validated request.
    pub registration: &'a Registration,
    /// Capabilities document to store.
    pub capabilities: &'a Map<String, Json>,
    /// SHA-256 of the new session token.
    pub token_hash: &'a [u8],
    /// Granted heartbeat interval.
    pub heartbeat_interval: Duration,
    /// Lease time to live.
    pub lease_ttl: Duration,
    /// The server's time for this registration.
    pub now: DateTime<Utc>,
    /// Time since this server last (re)gained its database; a lease whose
    /// TTL is longer than this is still in its grace period.
    pub since_regained: Duration,
}

/// One buffered heartbeat to write.
#[derive(Debug, Clone, PartialEq)]
pub struct HeartbeatWrite {
    /// Worker id.
    pub worker_id: i64,
    /// SHA-256 of the token the heartbeat presented; the row is updated
    /// only while it is still the current session.
    pub token_hash: Vec<u8>,
    /// Server time at which the heartbeat arrived.
    pub at: DateTime<Utc>,
    /// New lease deadline: `at` plus the lease TTL.
    pub lease_expires: DateTime<Utc>,
    /// Status the worker reported, if any.
    pub status: Option<Status>,
}

/// Parameters of one expiry sweep.
#[derive(Debug, Clone, PartialEq)]
pub struct Sweep {
    /// The server's time for this sweep.
    pub now: DateTime<Utc>,
    /// Time since this server last (re)gained its database. Workers whose
    /// TTL is longer than this are not expired yet.
    pub since_regained: Duration,
    /// Maximum number of workers to expire in this sweep.
    pub limit: i64,
    /// Workers with heartbeats buffered in memory, never expired by this sweep.
    pub exclude_ids: Vec<i64>,
}

/// A worker the sweeper marked inactive.
#[derive(Debug, Clone, PartialEq)]
pub struct ExpiredWorker {
    /// Worker id.
    pub id: i64,
    /// Worker name.
    pub name: String,
    /// Time of its last heartbeat.
    pub last_heartbeat: Option<DateTime<Utc>>,
}

/// Counts a sweep needs for the mass-expiry guard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LeaseCounts {
    /// Workers in status active or busy.
    pub live: i64,
    /// Of those, workers whose lease has run out and that this sweep may expire.
    pub expirable: i64,
}

/// Storage backend of the `worker` table.
///
/// Every method is a small number of statements; none keeps a transaction
/// open across calls. Timestamps come from the caller (the server's clock),
/// so that both backends compare them the same way.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Short backend name for logs: `sqlite` or `postgres`.
    fn backend(&self) -> &'static str;

    /// Applies pending migrations.
    async fn migrate(&self) -> StoreResult<()>;

    /// Checks that the database responds.
    async fn ping(&self) -> StoreResult<()>;

    /// Creates or takes over the worker named in the grant and starts a new
    /// session. Fails with [`StoreError::AlreadyExists`] while another
    /// instance holds a live lease on that name.
    async fn register(&self, grant: &LeaseGrant<'_>) -> StoreResult<WorkerRecord>;

    /// Registers several workers and returns one result per grant, in order.
    /// Each result is what [`Store::register`] would return for its grant.
    /// Backends override it to write a whole batch in one statement; the
    /// default registers one grant after the other.
    async fn register_batch(&self, grants: &[LeaseGrant<'_>]) -> Vec<StoreResult<WorkerRecord>> {
        let mut results = Vec::with_capacity(grants.len());
        for grant in grants {
            results.push(self.register(grant).await);
        }
        results
    }

    /// Reads the session fields of one worker.
    async fn session(&self, worker_id: i64) -> StoreResult<Option<SessionRecord>>;

    /// Writes buffered heartbeats in one statement and returns the ids of
    /// the rows it updated. A heartbeat whose token is no longer current, or
    /// whose worker is no longer active or busy, updates nothing.
    async fn write_heartbeats(&self, heartbeats: &[HeartbeatWrite]) -> StoreResult<Vec<i64>>;

    /// Ends the session: sets status inactive. The token hash stays, so a
    /// repeated Deregister with the same token succeeds again, while
    /// Heartbeat rejects it because the worker is no longer live.
    /// Fails with [`StoreError::NotFound`] for an unknown id and
    /// [`StoreError::Superseded`] when the token is not the current one.
    async fn deregister(&self, worker_id: i64, token_hash: &[u8], now: DateTime<Utc>) -> StoreResult<WorkerRecord>;

    /// Reads one worker by id.
    async fn get_by_id(&self, id: i64) -> StoreResult<Option<WorkerRecord>>;

    /// Reads one worker by name.
    async fn get_by_name(&self, name: &str) -> StoreResult<Option<WorkerRecord>>;

    /// Lists workers matching `filter` with ids above `after_id`, ordered by
    /// id, at most `filter.page_size + 1` rows so the caller can tell
    /// whether another page follows.
    async fn list(&self, filter: &ListFilter, after_id: i64, now: DateTime<Utc>) -> StoreResult<Vec<WorkerRecord>>;

    /// Counts live workers and those the sweep may expire.
    async fn count_leases(&self, sweep: &Sweep) -> StoreResult<LeaseCounts>;

    /// Marks at most `sweep.limit` workers with a lapsed lease inactive in
    /// one statement and returns them. Safe to run from several replicas at
    /// once: each worker is returned by exactly one of them.
    async fn expire(&self, sweep: &Sweep) -> StoreResult<Vec<ExpiredWorker>>;

    /// Reads whole rows with their session token hash for the worker
    /// index, in id order.
    async fn index_rows(&self, selection: RowSelection<'_>) -> StoreResult<Vec<IndexRow>>;

    /// Reads the changing fields of every row whose `updated` is at or
    /// after `since`, and counts all rows. Every write of the registry sets
    /// `updated`.
    async fn index_changes(&self, since: DateTime<Utc>) -> StoreResult<IndexChanges>;

    /// Reads the ids of all rows.
    async fn worker_ids(&self) -> StoreResult<Vec<i64>>;
}

/// Which rows [`Store::index_rows`] reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowSelection<'a> {
    /// The rows with these ids; unknown ids are skipped.
    Ids(&'a [i64]),
    /// At most `limit` rows with ids above `after_id`: one page of a full load.
    After {
        /// Rows with this id or a lower one are skipped.
        after_id: i64,
        /// Maximum number of rows.
        limit: i64,
    },
}

/// A whole row as the worker index keeps it.
#[derive(Debug, Clone, PartialEq)]
pub struct IndexRow {
    /// The row.
    pub record: WorkerRecord,
    /// SHA-256 of the current session token; it changes with every Register.
    pub token_hash: Option<Vec<u8>>,
}

/// The fields of a row that change without a new registration.
#[derive(Debug, Clone, PartialEq)]
pub struct RowChange {
    /// Worker id.
    pub id: i64,
    /// Status.
    pub status: Status,
    /// Time of the last accepted heartbeat or registration.
    pub last_heartbeat: Option<DateTime<Utc>>,
    /// Lease deadline.
    pub lease_expires: Option<DateTime<Utc>>,
    /// Time of the last change to the row.
    pub updated: DateTime<Utc>,
    /// SHA-256 of the current session token.
    pub token_hash: Option<Vec<u8>>,
}

/// Result of [`Store::index_changes`].
#[derive(Debug, Clone, PartialEq, Default)]
pub struct IndexChanges {
    /// Rows changed at or after the given time, in no particular order.
    pub rows: Vec<RowChange>,
    /// Number of rows in the table.
    pub total: i64,
}

/// Pool and timeout settings shared by both backends.
#[derive(Debug, Clone)]
pub struct PoolOptions {
    /// Maximum open connections.
    pub max_connections: u32,
    /// Time to wait for a connection before failing with Unavailable.
    pub connect_timeout: Duration,
    /// Maximum run time of one statement (PostgreSQL `statement_timeout`,
    /// SQLite busy timeout).
    pub statement_timeout: Duration,
}

impl Default for PoolOptions {
    fn default() -> Self {
        PoolOptions {
            max_connections: 10,
            connect_timeout: Duration::from_secs(5),
            statement_timeout: Duration::from_secs(5),
        }
    }
}

/// Opens the store that the URL scheme names: `sqlite:`, `postgres:` or
/// `postgresql:`.
pub async fn open(url: &str, options: &PoolOptions) -> anyhow::Result<Arc<dyn Store>> {
    let scheme = url.split(':').next().unwrap_or_default();
    match scheme {
        "sqlite" => Ok(Arc::new(sqlite::SqliteStore::open(url, options).await?)),
        "postgres" | "postgresql" => Ok(Arc::new(postgres::PostgresStore::open(url, options).await?)),
        _ => anyhow::bail!(
            "unsupported database URL scheme {scheme:?} in database.url: use sqlite://FILE or postgresql://USER@HOST/DB"
        ),
    }
}

/// Replaces the password in a database URL with `***` for logs: the one in
/// the user info and the `password` query parameter, which sqlx and libpq
/// also accept. When the URL does not parse, everything between `://` and
/// the last `@` is replaced, because the password position is unknown.
pub fn redact_url(url: &str) -> String {
    const MASK: &str = "***";

    let Ok(mut parsed) = url::Url::parse(url) else {
        return match (url.find("://"), url.rfind('@')) {
            (Some(scheme_end), Some(at)) if at > scheme_end => {
                format!("{}{MASK}{}", &url[..scheme_end + 3], &url[at..])
            }
            _ => url.to_string(),
        };
    };

    if parsed.password().is_some() {
        let _ = parsed.set_password(Some(MASK));
    }

    if parsed.query_pairs().any(|(key, _)| key == "password") {
        let pairs: Vec<(String, String)> = parsed
            .query_pairs()
            .map(|(key, value)| {
                let value = if key == "password" {
                    MASK.to_string()
                } else {
                    value.into_owned()
                };
                (key.into_owned(), value)
            })
            .collect();
        parsed.query_pairs_mut().clear().extend_pairs(pairs);
    }
    parsed.to_string()
}

/// Formats a timestamp the way the SQLite store keeps it: fixed width,
/// UTC, millisecond precision, so that text order is time order.
pub fn format_sqlite_time(time: DateTime<Utc>) -> String {
    time.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string()
}

/// Converts a duration to whole milliseconds for storage.
pub fn duration_ms(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}
