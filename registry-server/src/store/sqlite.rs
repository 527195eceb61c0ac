//! SQLite backend: one file, WAL mode, no set-up.
//!
//! Timestamps are fixed-width UTC text (see [`format_sqlite_time`]) so that
//! comparisons in SQL are plain text comparisons. Every statement binds the
//! server's time instead of calling SQLite's clock, so both backends decide
//! expiry the same way.

use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde_json::{Map, Value as Json};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous};
use sqlx::{QueryBuilder, Row, Sqlite, SqlitePool};
use tracing::instrument;
use worker_registry::domain::{Role, Status};
use worker_registry::validation::ListFilter;

use super::{
    duration_ms, format_sqlite_time, ExpiredWorker, HeartbeatWrite, IndexChanges, IndexRow, LeaseCounts, LeaseGrant,
    PoolOptions, RowChange, RowSelection, SessionRecord, Store, StoreError, StoreResult, Sweep, WorkerRecord,
};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/sqlite");

/// Columns read into a [`WorkerRecord`].
const WORKER_COLUMNS: &str = "id, name, worker_role, status, host, instance_id, capabilities, last_heartbeat, \
     lease_expires, lease_ttl_ms, heartbeat_interval_ms, created, updated";

/// A lease is live while the worker is active or busy and either its
/// deadline has not passed or the server is still inside its grace period.
/// Binds: `?1` now, `?2` milliseconds since the server regained its database.
const LIVE_PREDICATE: &str =
    "worker.status IN ('active', 'busy') AND (worker.lease_expires >= ?1 OR worker.lease_ttl_ms > ?2)";

/// SQLite store over a connection pool.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
}

impl SqliteStore {
    /// Opens (and creates if missing) the database file named by a
    /// `sqlite://` URL, in WAL mode with a busy timeout on every connection.
    pub async fn open(url: &str, options: &PoolOptions) -> anyhow::Result<Self> {
        let connect = SqliteConnectOptions::from_str(url)
            .map_err(|e| anyhow::anyhow!("invalid SQLite URL in database.url: {e}"))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            // Writers wait for the lock instead of failing with "database is locked".
            .busy_timeout(options.statement_timeout);

        let pool = SqlitePoolOptions::new()
            .max_connections(options.max_connections)
            .acquire_timeout(options.connect_timeout)
            .connect_with(connect)
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "failed to open SQLite database {url}: {e}; check that the directory exists and is writable"
                )
            })?;

        Ok(SqliteStore { pool })
    }

    /// Returns the pool, for tests and tools that need raw SQL.
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }
}

/// Maps sqlx errors to store errors. Busy and locked databases, pool
/// timeouts and I/O errors are transient, so clients see UNAVAILABLE.
fn map_error(error: sqlx::Error) -> StoreError {
    match &error {
        sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_) => {
            StoreError::Unavailable(error.to_string())
        }
        sqlx::Error::Database(db) => {
            // SQLITE_BUSY (5), SQLITE_LOCKED (6) and their extended codes.
            let primary = db
                .code()
                .and_then(|code| code.parse::<i32>().ok())
                .map(|code| code & 0xff);
            match primary {
                Some(5) | Some(6) => StoreError::Unavailable(error.to_string()),
                _ => StoreError::Internal(error.to_string()),
            }
        }
        _ => StoreError::Internal(error.to_string()),
    }
}

fn parse_time(column: &str, text: &str) -> StoreResult<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(text)
        .map(|time| time.with_timezone(&Utc))
        .map_err(|e| StoreError::Internal(format!("invalid timestamp {text:?} in column {column}: {e}")))
}

fn parse_optional_time(column: &str, text: Option<String>) -> StoreResult<Option<DateTime<Utc>>> {
    text.map(|t| parse_time(column, &t)).transpose()
}

fn millis(value: i64) -> Duration {
    Duration::from_millis(u64::try_from(value).unwrap_or(0))
}

fn worker_from_row(row: &SqliteRow) -> StoreResult<WorkerRecord> {
    let role: String = row.try_get("worker_role").map_err(map_error)?;
    let status: String = row.try_get("status").map_err(map_error)?;
    let capabilities: String = row.try_get("capabilities").map_err(map_error)?;
    let created: String = row.try_get("created").map_err(map_error)?;
    let updated: String = row.try_get("updated").map_err(map_error)?;

    let capabilities: Map<String, Json> = match serde_json::from_str(&capabilities) {
        Ok(Json::Object(object)) => object,
        Ok(_) | Err(_) => Map::new(),
    };

    let record = WorkerRecord {
        id: row.try_get("id").map_err(map_error)?,
        name: row.try_get("name").map_err(map_error)?,
        role: role.parse::<Role>().map_err(StoreError::Internal)?,
        status: status.parse::<Status>().map_err(StoreError::Internal)?,
        host: row
            .try_get::<Option<String>, _>("host")
            .map_err(map_error)?
            .unwrap_or_default(),
        instance_id: row.try_get("instance_id").map_err(map_error)?,
        capabilities,
        last_heartbeat: parse_optional_time("last_heartbeat", row.try_get("last_heartbeat").map_err(map_error)?)?,
        lease_expires: parse_optional_time("lease_expires", row.try_get("lease_expires").map_err(map_error)?)?,
        lease_ttl: millis(row.try_get("lease_ttl_ms").map_err(map_error)?),
        heartbeat_interval: millis(row.try_get("heartbeat_interval_ms").map_err(map_error)?),
        created: parse_time("created", &created)?,
        updated: parse_time("updated", &updated)?,
    };
    Ok(record)
}

#[async_trait]
impl Store for SqliteStore {
    fn backend(&self) -> &'static str {
        "sqlite"
    }

    async fn migrate(&self) -> StoreResult<()> {
        MIGRATOR
            .run(&self.pool)
            .await
            .map_err(|e| StoreError::Internal(format!("SQLite migration failed: {e}")))
    }

    async fn ping(&self) -> StoreResult<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await.map_err(map_error)?;
        Ok(())
    }

    #[instrument(name = "store.sqlite.register", skip_all, fields(worker_name = %grant.registration.name))]
    async fn register(&self, grant: &LeaseGrant<'_>) -> StoreResult<WorkerRecord> {
        let registration = grant.registration;
        let now = format_sqlite_time(grant.now);
        let expires = format_sqlite_time(grant.now + grant.lease_ttl);
        let capabilities = Json::Object(grant.capabilities.clone()).to_string();

        // The conflict update runs only when the existing lease is not live
        // or belongs to the same instance, so a live holder keeps its name.
        let sql = format!(
            "INSERT INTO worker (name, worker_role, host, status, capabilities, instance_id, session_token_hash, \
                 last_heartbeat, lease_expires, lease_ttl_ms, heartbeat_interval_ms, created, updated)
             VALUES (?3, ?4, ?5, 'active', ?6, ?7, ?8, ?1, ?9, ?10, ?11, ?1, ?1)
             ON CONFLICT (name) DO UPDATE SET
                 worker_role = excluded.worker_role,
                 host = excluded.host,
                 status = 'active',
                 capabilities = excluded.capabilities,
                 instance_id = excluded.instance_id,
                 session_token_hash = excluded.session_token_hash,
                 last_heartbeat = excluded.last_heartbeat,
                 lease_expires = excluded.lease_expires,
                 lease_ttl_ms = excluded.lease_ttl_ms,
                 heartbeat_interval_ms = excluded.heartbeat_interval_ms,
                 updated = excluded.updated
             WHERE NOT ({LIVE_PREDICATE}) OR worker.instance_id = excluded.instance_id
             RETURNING {WORKER_COLUMNS}"
        );

        let row = sqlx::query(&sql)
            .bind(&now) // ?1
            .bind(duration_ms(grant.since_regained)) // ?2
            .bind(&registration.name) // ?3
            .bind(registration.role.as_str()) // ?4
            .bind(&registration.host) // ?5
            .bind(&capabilities) // ?6
            .bind(&registration.instance_id) // ?7
            .bind(grant.token_hash) // ?8
            .bind(&expires) // ?9
            .bind(duration_ms(grant.lease_ttl)) // ?10
            .bind(duration_ms(grant.heartbeat_interval)) // ?11
            .fetch_optional(&self.pool)
            .await
            .map_err(map_error)?;

        if let Some(row) = row {
            return worker_from_row(&row);
        }

        let holder = sqlx::query("SELECT host, instance_id FROM worker WHERE name = ?1")
            .bind(&registration.name)
            .fetch_optional(&self.pool)
            .await
            .map_err(map_error)?;
        let (host, instance_id) = match holder {
            Some(row) => (
                row.try_get::<Option<String>, _>("host")
                    .map_err(map_error)?
                    .unwrap_or_default(),
                row.try_get::<String, _>("instance_id").map_err(map_error)?,
            ),
            None => (String::new(), String::new()),
        };
        Err(StoreError::AlreadyExists {
            name: registration.name.clone(),
            host,
            instance_id,
        })
    }

    async fn session(&self, worker_id: i64) -> StoreResult<Option<SessionRecord>> {
        let row = sqlx::query(
            "SELECT id, name, status, session_token_hash, instance_id, lease_expires, lease_ttl_ms, \
                    heartbeat_interval_ms
             FROM worker WHERE id = ?1",
        )
        .bind(worker_id)
        .fetch_optional(&self.pool)
        .await
        .map_err(map_error)?;

        let Some(row) = row else {
            return Ok(None);
        };

        let status: String = row.try_get("status").map_err(map_error)?;
        let session = SessionRecord {
            id: row.try_get("id").map_err(map_error)?,
            name: row.try_get("name").map_err(map_error)?,
            status: status.parse::<Status>().map_err(StoreError::Internal)?,
            token_hash: row.try_get("session_token_hash").map_err(map_error)?,
            instance_id: row.try_get("instance_id").map_err(map_error)?,
            lease_expires: parse_optional_time("lease_expires", row.try_get("lease_expires").map_err(map_error)?)?,
            lease_ttl: millis(row.try_get("lease_ttl_ms").map_err(map_error)?),
            heartbeat_interval: millis(row.try_get("heartbeat_interval_ms").map_err(map_error)?),
        };
        Ok(Some(session))
    }

    #[instrument(name = "store.sqlite.write_heartbeats", skip_all, fields(count = heartbeats.len()))]
    async fn write_heartbeats(&self, heartbeats: &[HeartbeatWrite]) -> StoreResult<Vec<i64>> {
        if heartbeats.is_empty() {
            return Ok(Vec::new());
        }

        // The batch travels as one JSON array so that the whole flush is one
        // statement whatever its size. The unary + keeps SQLite from driving
        // the join with the status index, because that plan scans the whole
        // array once per live worker. With it, each array element looks up
        // its row by id.
        let batch: Vec<Json> = heartbeats
            .iter()
            .map(|beat| {
                serde_json::json!({
                    "id": beat.worker_id,
                    "hash": hex_upper(&beat.token_hash),
                    "at": format_sqlite_time(beat.at),
                    "expires": format_sqlite_time(beat.lease_expires),
                    "status": beat.status.map(Status::as_str),
                })
            })
            .collect();

        let rows = sqlx::query(
            "UPDATE worker SET
                 last_heartbeat = beat.at,
                 lease_expires = beat.expires,
                 updated = beat.at,
                 status = COALESCE(beat.status, worker.status)
             FROM (
                 SELECT json_extract(value, '$.id') AS id,
                        json_extract(value, '$.hash') AS hash,
                        json_extract(value, '$.at') AS at,
                        json_extract(value, '$.expires') AS expires,
                        json_extract(value, '$.status') AS status
                 FROM json_each(?1)
             ) AS beat
             WHERE worker.id = beat.id
               AND hex(worker.session_token_hash) = beat.hash
               AND +worker.status IN ('active', 'busy')
             RETURNING worker.id",
        )
        .bind(Json::Array(batch).to_string()) // ?1
        .fetch_all(&self.pool)
        .await
        .map_err(map_error)?;

        rows.iter()
            .map(|row| row.try_get::<i64, _>("id").map_err(map_error))
            .collect()
    }

    #[instrument(name = "store.sqlite.deregister", skip_all, fields(worker_id))]
    async fn deregister(&self, worker_id: i64, token_hash: &[u8], now: DateTime<Utc>) -> StoreResult<WorkerRecord> {
        let now = format_sqlite_time(now);
        let sql = format!(
            "UPDATE worker SET
                 status = 'inactive',
                 lease_expires = CASE WHEN status IN ('active', 'busy') THEN ?3 ELSE lease_expires END,
                 updated = CASE WHEN status IN ('active', 'busy') THEN ?3 ELSE updated END
             WHERE id = ?1 AND session_token_hash = ?2
             RETURNING {WORKER_COLUMNS}"
        );
        let row = sqlx::query(&sql)
            .bind(worker_id) // ?1
            .bind(token_hash) // ?2
            .bind(&now) // ?3
            .fetch_optional(&self.pool)
            .await
            .map_err(map_error)?;

        match row {
            Some(row) => worker_from_row(&row),
            None => match self.get_by_id(worker_id).await? {
                Some(_) => Err(StoreError::Superseded),
                None => Err(StoreError::NotFound),
            },
        }
    }

    async fn get_by_id(&self, id: i64) -> StoreResult<Option<WorkerRecord>> {
        let sql = format!("SELECT {WORKER_COLUMNS} FROM worker WHERE id = ?1");
        let row = sqlx::query(&sql)
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(map_error)?;
        row.as_ref().map(worker_from_row).transpose()
    }

    async fn get_by_name(&self, name: &str) -> StoreResult<Option<WorkerRecord>> {
        let sql = format!("SELECT {WORKER_COLUMNS} FROM worker WHERE name = ?1");
        let row = sqlx::query(&sql)
            .bind(name)
            .fetch_optional(&self.pool)
            .await
            .map_err(map_error)?;
        row.as_ref().map(worker_from_row).transpose()
    }

    #[instrument(name = "store.sqlite.list", skip_all, fields(after_id))]
    async fn list(&self, filter: &ListFilter, after_id: i64, now: DateTime<Utc>) -> StoreResult<Vec<WorkerRecord>> {
        let mut query: QueryBuilder<Sqlite> =
            QueryBuilder::new(format!("SELECT {WORKER_COLUMNS} FROM worker WHERE id > "));
        query.push_bind(after_id);

        if let Some(role) = filter.role {
            query.push(" AND worker_role = ").push_bind(role.as_str());
        }

        if !filter.statuses.is_empty() {
            query.push(" AND status IN (");
            let mut separated = query.separated(", ");
            for status in &filter.statuses {
                separated.push_bind(status.as_str());
            }
            query.push(")");
        }

        for runtime in &filter.runtimes {
            query
                .push(" AND EXISTS (SELECT 1 FROM json_each(worker.capabilities, '$.runtimes') AS runtime WHERE runtime.value = ")
                .push_bind(runtime.clone())
                .push(")");
        }

        for (key, value) in &filter.labels {
            query
                .push(
                    " AND EXISTS (SELECT 1 FROM json_each(worker.capabilities, '$.labels') AS label WHERE label.key = ",
                )
                .push_bind(key.clone())
                .push(" AND label.value = ")
                .push_bind(value.clone())
                .push(")");
        }

        if let Some(age) = filter.max_heartbeat_age {
            // An age reaching before the first representable time matches
            // every worker that has sent a heartbeat at all.
            let cutoff = chrono::Duration::from_std(age)
                .ok()
                .and_then(|age| now.checked_sub_signed(age))
                .filter(|cutoff| cutoff.timestamp() >= 0);
            match cutoff {
                Some(cutoff) => {
                    query
                        .push(" AND last_heartbeat >= ")
                        .push_bind(format_sqlite_time(cutoff));
                }
                None => {
                    query.push(" AND last_heartbeat IS NOT NULL");
                }
            }
        }

        if !filter.name_prefix.is_empty() {
            // substr compares characters exactly; LIKE would treat % and _ as wildcards.
            query
                .push(" AND substr(name, 1, length(")
                .push_bind(filter.name_prefix.clone())
                .push(")) = ")
                .push_bind(filter.name_prefix.clone());
        }

        query.push(" ORDER BY id LIMIT ").push_bind(filter.page_size as i64 + 1);

        let rows = query.build().fetch_all(&self.pool).await.map_err(map_error)?;
        rows.iter().map(worker_from_row).collect()
    }

    async fn count_leases(&self, sweep: &Sweep) -> StoreResult<LeaseCounts> {
        let row = sqlx::query(
            "SELECT
                 COUNT(*) AS live,
                 COALESCE(SUM(CASE WHEN lease_expires < ?1 AND lease_ttl_ms <= ?2
                                        AND id NOT IN (SELECT value FROM json_each(?3))
                                   THEN 1 ELSE 0 END), 0) AS expirable
             FROM worker
             WHERE status IN ('active', 'busy')",
        )
        .bind(format_sqlite_time(sweep.now)) // ?1
        .bind(duration_ms(sweep.since_regained)) // ?2
        .bind(Json::from(sweep.exclude_ids.clone()).to_string()) // ?3
        .fetch_one(&self.pool)
        .await
        .map_err(map_error)?;

        let counts = LeaseCounts {
            live: row.try_get("live").map_err(map_error)?,
            expirable: row.try_get("expirable").map_err(map_error)?,
        };
        Ok(counts)
    }

    #[instrument(name = "store.sqlite.expire", skip_all, fields(limit = sweep.limit))]
    async fn expire(&self, sweep: &Sweep) -> StoreResult<Vec<ExpiredWorker>> {
        let exclude = Json::from(sweep.exclude_ids.clone()).to_string();

        // SQLite runs one writer at a time, so the inner SELECT and the
        // UPDATE see the same rows and a worker is expired only once.
        let rows = sqlx::query(
            "UPDATE worker SET status = 'inactive', updated = ?1
             WHERE id IN (
                 SELECT id FROM worker
                 WHERE status IN ('active', 'busy')
                   AND lease_expires < ?1
                   AND lease_ttl_ms <= ?2
                   AND id NOT IN (SELECT value FROM json_each(?3))
                 ORDER BY lease_expires
                 LIMIT ?4
             )
             RETURNING id, name, last_heartbeat",
        )
        .bind(format_sqlite_time(sweep.now)) // ?1
        .bind(duration_ms(sweep.since_regained)) // ?2
        .bind(exclude) // ?3
        .bind(sweep.limit) // ?4
        .fetch_all(&self.pool)
        .await
        .map_err(map_error)?;

        rows.iter()
            .map(|row| {
                let worker = ExpiredWorker {
                    id: row.try_get("id").map_err(map_error)?,
                    name: row.try_get("name").map_err(map_error)?,
                    last_heartbeat: parse_optional_time(
                        "last_heartbeat",
                        row.try_get("last_heartbeat").map_err(map_error)?,
                    )?,
                };
                Ok(worker)
            })
            .collect()
    }

    #[instrument(name = "store.sqlite.index_rows", skip_all)]
    async fn index_rows(&self, selection: RowSelection<'_>) -> StoreResult<Vec<IndexRow>> {
        let rows = match selection {
            RowSelection::Ids(ids) => {
                // One JSON array parameter instead of one parameter per id,
                // so no id count reaches SQLite's limit on parameters.
                let sql = format!(
                    "SELECT {WORKER_COLUMNS}, session_token_hash FROM worker \
                     WHERE id IN (SELECT value FROM json_each(?1)) ORDER BY id"
                );
                let ids = Json::from(ids.to_vec()).to_string();
                sqlx::query(&sql).bind(ids).fetch_all(&self.pool).await
            }
            RowSelection::After { after_id, limit } => {
                let sql = format!(
                    "SELECT {WORKER_COLUMNS}, session_token_hash FROM worker WHERE id > ?1 ORDER BY id LIMIT ?2"
                );
                sqlx::query(&sql).bind(after_id).bind(limit).fetch_all(&self.pool).await
            }
        }
        .map_err(map_error)?;

        rows.iter()
            .map(|row| {
                Ok(IndexRow {
                    record: worker_from_row(row)?,
                    token_hash: row.try_get("session_token_hash").map_err(map_error)?,
                })
            })
            .collect()
    }

    #[instrument(name = "store.sqlite.index_changes", skip_all)]
    async fn index_changes(&self, since: DateTime<Utc>) -> StoreResult<IndexChanges> {
        let rows = sqlx::query(
            "SELECT id, status, last_heartbeat, lease_expires, updated, session_token_hash \
             FROM worker WHERE updated >= ?1",
        )
        .bind(format_sqlite_time(since))
        .fetch_all(&self.pool)
        .await
        .map_err(map_error)?;
        let total: i64 = sqlx::query_scalar("SELECT count(*) FROM worker")
            .fetch_one(&self.pool)
            .await
            .map_err(map_error)?;

        let rows = rows
            .iter()
            .map(|row| {
                let status: String = row.try_get("status").map_err(map_error)?;
                let updated: String = row.try_get("updated").map_err(map_error)?;
                Ok(RowChange {
                    id: row.try_get("id").map_err(map_error)?,
                    status: status.parse::<Status>().map_err(StoreError::Internal)?,
                    last_heartbeat: parse_optional_time(
                        "last_heartbeat",
                        row.try_get("last_heartbeat").map_err(map_error)?,
                    )?,
                    lease_expires: parse_optional_time(
                        "lease_expires",
                        row.try_get("lease_expires").map_err(map_error)?,
                    )?,
                    updated: parse_time("updated", &updated)?,
                    token_hash: row.try_get("session_token_hash").map_err(map_error)?,
                })
            })
            .collect::<StoreResult<Vec<_>>>()?;
        Ok(IndexChanges { rows, total })
    }

    #[instrument(name = "store.sqlite.worker_ids", skip_all)]
    async fn worker_ids(&self) -> StoreResult<Vec<i64>> {
        sqlx::query_scalar("SELECT id FROM worker ORDER BY id")
            .fetch_all(&self.pool)
            .await
            .map_err(map_error)
    }
}

fn hex_upper(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02X}")).collect()
}
