//! PostgreSQL backend of the [`Store`] trait.
//!
//! Several registry replicas may share one database, so every write that
//! decides ownership is a single statement whose `WHERE` clause carries the
//! decision: the register upsert, the heartbeat batch and the expiry sweep.
//! Timestamps are bound from the caller and truncated to milliseconds, the
//! precision the SQLite backend stores, so both backends compare them the
//! same way.

use std::collections::HashMap;
use std::future::Future;
use std::str::FromStr;
use std::time::Duration;

use anyhow::Context as _;
use async_trait::async_trait;
use chrono::{DateTime, SubsecRound, TimeDelta, Utc};
use serde_json::{Map, Value as Json};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow};
use sqlx::types::Json as SqlJson;
use sqlx::{Postgres, QueryBuilder, Row};
use tracing::instrument;
use worker_registry::domain::{Role, Status};
use worker_registry::validation::ListFilter;

use super::{
    duration_ms, redact_url, ExpiredWorker, HeartbeatWrite, IndexChanges, IndexRow, LeaseCounts, LeaseGrant,
    PoolOptions, RowChange, RowSelection, SessionRecord, Store, StoreError, StoreResult, Sweep, WorkerRecord,
};

/// Migrations of this backend, embedded at build time.
static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/postgres");

/// Attempts of one register call when PostgreSQL reports a unique violation
/// or a serialization failure, which a concurrent register of the same name
/// can cause. The next attempt reads the committed row.
const REGISTER_ATTEMPTS: usize = 4;

/// Extra time on top of the connect and statement timeouts before a store
/// call gives up on its own. It covers a connection whose server stopped responding
/// without closing it, because `statement_timeout` runs on the server and cannot fire then.
const CLIENT_DEADLINE_MARGIN: Duration = Duration::from_secs(1);

/// Columns of a [`WorkerRecord`], in the order [`decode_worker`] reads them.
const WORKER_COLUMNS: &str = r#"
    id, name, worker_role::text AS worker_role, status::text AS status, COALESCE(host, '') AS host,
    instance_id, capabilities, last_heartbeat, lease_expires, lease_ttl_ms, heartbeat_interval_ms,
    created, updated"#;

/// [`WORKER_COLUMNS`] without `capabilities`, for writes that know them.
const WORKER_COLUMNS_BUT_CAPABILITIES: &str = r#"
    id, name, worker_role::text AS worker_role, status::text AS status, COALESCE(host, '') AS host,
    instance_id, last_heartbeat, lease_expires, lease_ttl_ms, heartbeat_interval_ms,
    created, updated"#;

/// Conflict clause of both register upserts, single-row and batch. The
/// update runs only when the current holder has no live lease at the time
/// of the new registration (`EXCLUDED.last_heartbeat`) or is the same
/// instance. Otherwise RETURNING yields no row. `$11` is the time since the
/// server regained its database, in milliseconds.
const REGISTER_ON_CONFLICT: &str = r#"ON CONFLICT (name) DO UPDATE SET
                worker_role = EXCLUDED.worker_role,
                host = EXCLUDED.host,
                status = 'active',
                capabilities = EXCLUDED.capabilities,
                instance_id = EXCLUDED.instance_id,
                session_token_hash = EXCLUDED.session_token_hash,
                last_heartbeat = EXCLUDED.last_heartbeat,
                lease_expires = EXCLUDED.lease_expires,
                lease_ttl_ms = EXCLUDED.lease_ttl_ms,
                heartbeat_interval_ms = EXCLUDED.heartbeat_interval_ms,
                updated = EXCLUDED.updated
            WHERE NOT (w.status IN ('active', 'busy')
                       AND (w.lease_expires >= EXCLUDED.last_heartbeat OR w.lease_ttl_ms > $11))
               OR w.instance_id = EXCLUDED.instance_id"#;

/// Store on a PostgreSQL database, shared safely by several registry replicas.
#[derive(Debug, Clone)]
pub struct PostgresStore {
    /// Connection pool; every connection runs with `statement_timeout` set.
    pool: PgPool,
    /// Upper bound of one store call on the client side.
    call_deadline: Duration,
}

impl PostgresStore {
    /// Connects to the database at `url` and checks that it responds.
    ///
    /// Fails when the database cannot be reached within
    /// `options.connect_timeout`. Once open, the pool reconnects on its own,
    /// and calls made during an outage fail with [`StoreError::Unavailable`].
    pub async fn open(url: &str, options: &PoolOptions) -> anyhow::Result<Self> {
        let statement_timeout_ms = duration_ms(options.statement_timeout);
        let connect_options = PgConnectOptions::from_str(url)
            .with_context(|| format!("invalid PostgreSQL URL {}", redact_url(url)))?
            .application_name("registry-server")
            // A value without a unit is in milliseconds, and 0 would disable the timeout.
            .options([("statement_timeout", statement_timeout_ms.max(1))]);

        let pool = PgPoolOptions::new()
            .max_connections(options.max_connections)
            .acquire_timeout(options.connect_timeout)
            .connect_with(connect_options)
            .await
            .with_context(|| {
                format!(
                    "failed to connect to PostgreSQL at {} within {:?}",
                    redact_url(url),
                    options.connect_timeout
                )
            })?;

        let store = PostgresStore {
            pool,
            call_deadline: options.connect_timeout + options.statement_timeout + CLIENT_DEADLINE_MARGIN,
        };
        Ok(store)
    }

    /// Runs one store call, failing with Unavailable when it outlives the
    /// client-side deadline.
    async fn bounded<T>(&self, call: impl Future<Output = StoreResult<T>>) -> StoreResult<T> {
        match tokio::time::timeout(self.call_deadline, call).await {
            Ok(result) => result,
            Err(_) => Err(StoreError::Unavailable(format!(
                "timed out after {:?} waiting for PostgreSQL",
                self.call_deadline
            ))),
        }
    }

    /// Runs the register upsert once. Returns `None` when a live lease of
    /// another instance kept the existing row.
    async fn try_register(&self, grant: &LeaseGrant<'_>) -> Result<Option<WorkerRecord>, sqlx::Error> {
        let registration = grant.registration;
        let now = db_time(grant.now);
        let lease_ttl_ms = duration_ms(grant.lease_ttl);
        let lease_expires = now + TimeDelta::milliseconds(lease_ttl_ms);

        let sql = format!(
            r#"
            INSERT INTO worker AS w (
                name, worker_role, host, status, capabilities, instance_id, session_token_hash,
                last_heartbeat, lease_expires, lease_ttl_ms, heartbeat_interval_ms, created, updated)
            VALUES (
                $1,                        -- name
                $2::worker_role_enum,      -- role
                NULLIF($3, ''),            -- host
                'active',
                $4,                        -- capabilities
                $5,                        -- instance_id
                $6,                        -- session token hash
                $7,                        -- now
                $8,                        -- lease_expires
                $9,                        -- lease_ttl_ms
                $10,                       -- heartbeat_interval_ms
                $7, $7)
            {REGISTER_ON_CONFLICT}
            RETURNING {WORKER_COLUMNS}"#
        );

        let row = sqlx::query(&sql)
            .bind(&registration.name)
            .bind(registration.role.as_str())
            .bind(&registration.host)
            .bind(SqlJson(grant.capabilities))
            .bind(&registration.instance_id)
            .bind(grant.token_hash)
            .bind(now)
            .bind(lease_expires)
            .bind(lease_ttl_ms)
            .bind(duration_ms(grant.heartbeat_interval))
            .bind(duration_ms(grant.since_regained))
            .fetch_optional(&self.pool)
            .await?;

        row.as_ref().map(decode_worker).transpose()
    }

    /// Runs one multi-row register upsert for grants with distinct names and
    /// returns the rows it wrote, by name. A name missing from the result is
    /// held by a live lease of another instance, or was deleted meanwhile.
    async fn try_register_batch(
        &self,
        grants: &[&LeaseGrant<'_>],
    ) -> Result<HashMap<String, WorkerRecord>, sqlx::Error> {
        let count = grants.len();
        let mut names = Vec::with_capacity(count);
        let mut roles = Vec::with_capacity(count);
        let mut hosts = Vec::with_capacity(count);
        let mut capabilities = Vec::with_capacity(count);
        let mut instance_ids = Vec::with_capacity(count);
        let mut hashes = Vec::with_capacity(count);
        let mut times = Vec::with_capacity(count);
        let mut deadlines = Vec::with_capacity(count);
        let mut ttls = Vec::with_capacity(count);
        let mut intervals = Vec::with_capacity(count);
        let mut since_regained = i64::MAX;
        let mut documents: HashMap<&str, &Map<String, Json>> = HashMap::with_capacity(count);
        for grant in grants {
            let registration = grant.registration;
            let now = db_time(grant.now);
            let lease_ttl_ms = duration_ms(grant.lease_ttl);
            names.push(registration.name.clone());
            roles.push(registration.role.as_str());
            hosts.push(registration.host.clone());
            capabilities.push(serde_json::to_string(grant.capabilities).map_err(|e| sqlx::Error::Encode(Box::new(e)))?);
            documents.insert(registration.name.as_str(), grant.capabilities);
            instance_ids.push(registration.instance_id.clone());
            hashes.push(grant.token_hash.to_vec());
            times.push(now);
            deadlines.push(now + TimeDelta::milliseconds(lease_ttl_ms));
            ttls.push(lease_ttl_ms);
            intervals.push(duration_ms(grant.heartbeat_interval));
            // The shortest time since regaining the database keeps the most
            // leases in their grace period, so no grant takes over too early.
            since_regained = since_regained.min(duration_ms(grant.since_regained));
        }

        // Rows are inserted in name order so that concurrent batches tend to
        // lock them in the same order. A deadlock that still occurs fails the
        // batch, which then falls back to the single-row path and its retries.
        let sql = format!(
            r#"
            INSERT INTO worker AS w (
                name, worker_role, host, status, capabilities, instance_id, session_token_hash,
                last_heartbeat, lease_expires, lease_ttl_ms, heartbeat_interval_ms, created, updated)
            SELECT i.name, i.role::worker_role_enum, NULLIF(i.host, ''), 'active', i.capabilities::jsonb,
                   i.instance_id, i.hash, i.at, i.expires, i.ttl_ms, i.interval_ms, i.at, i.at
            FROM unnest(
                $1::text[],         -- names
                $2::text[],         -- roles
                $3::text[],         -- hosts
                $4::text[],         -- capabilities as JSON text
                $5::text[],         -- instance ids
                $6::bytea[],        -- session token hashes
                $7::timestamptz[],  -- registration times
                $8::timestamptz[],  -- lease deadlines
                $9::bigint[],       -- lease TTLs in ms
                $10::bigint[]       -- heartbeat intervals in ms
            ) AS i(name, role, host, capabilities, instance_id, hash, at, expires, ttl_ms, interval_ms)
            ORDER BY i.name
            {REGISTER_ON_CONFLICT}
            RETURNING {WORKER_COLUMNS_BUT_CAPABILITIES}"#
        );

        let rows = sqlx::query(&sql)
            .bind(&names)
            .bind(&roles)
            .bind(&hosts)
            .bind(&capabilities)
            .bind(&instance_ids)
            .bind(&hashes)
            .bind(&times)
            .bind(&deadlines)
            .bind(&ttls)
            .bind(&intervals)
            .bind(since_regained)
            .fetch_all(&self.pool)
            .await?;

        // A written row has the capabilities the grant sent, so they are
        // not read back and parsed again.
        let mut written = HashMap::with_capacity(rows.len());
        for row in &rows {
            let name: String = row.try_get("name")?;
            let document = documents.get(name.as_str()).map(|document| (*document).clone());
            let record = decode_worker_with(row, document.unwrap_or_default())?;
            written.insert(record.name.clone(), record);
        }
        Ok(written)
    }

    /// Reads one worker with the given `WHERE` condition on `$1`.
    async fn get_where<T>(&self, condition: &str, value: T) -> StoreResult<Option<WorkerRecord>>
    where
        T: for<'q> sqlx::Encode<'q, Postgres> + sqlx::Type<Postgres> + Send,
    {
        let sql = format!("SELECT {WORKER_COLUMNS} FROM worker WHERE {condition}");
        let row = sqlx::query(&sql)
            .bind(value)
            .fetch_optional(&self.pool)
            .await
            .map_err(map_error)?;
        row.as_ref().map(decode_worker).transpose().map_err(map_error)
    }
}

#[async_trait]
impl Store for PostgresStore {
    fn backend(&self) -> &'static str {
        "postgres"
    }

    #[instrument(skip_all, name = "store.postgres.migrate")]
    async fn migrate(&self) -> StoreResult<()> {
        // The migrator takes a PostgreSQL advisory lock before it reads the
        // migration table, so replicas that start together apply each
        // migration once.
        // NOTE: waiting for that lock counts against statement_timeout, so a
        // replica that waits longer for another's migration fails with
        // Unavailable and must retry.
        let result = MIGRATOR.run(&self.pool).await;
        result.map_err(|error| match error {
            sqlx::migrate::MigrateError::Execute(error) => map_error(error),
            other => StoreError::Internal(format!("migration failed: {other}")),
        })
    }

    #[instrument(skip_all, name = "store.postgres.ping")]
    async fn ping(&self) -> StoreResult<()> {
        self.bounded(async {
            sqlx::query("SELECT 1").execute(&self.pool).await.map_err(map_error)?;
            Ok(())
        })
        .await
    }

    #[instrument(skip_all, name = "store.postgres.register", fields(worker_name = %grant.registration.name))]
    async fn register(&self, grant: &LeaseGrant<'_>) -> StoreResult<WorkerRecord> {
        self.bounded(async {
            let name = &grant.registration.name;
            let mut attempt = 1;
            loop {
                match self.try_register(grant).await {
                    Ok(Some(record)) => return Ok(record),
                    Ok(None) => {}
                    Err(error) if attempt < REGISTER_ATTEMPTS && is_register_race(&error) => {
                        tracing::debug!(attempt, error = %error, "register raced with another register, retrying");
                        attempt += 1;
                        continue;
                    }
                    Err(error) => return Err(map_error(error)),
                }

                // The upsert kept the row because another instance holds a
                // live lease. Read the holder; if the row was deleted in
                // between, the next attempt inserts it.
                let holder = sqlx::query(
                    r#"
                    SELECT COALESCE(host, '') AS host, instance_id
                    FROM worker
                    WHERE name = $1  -- name
                    "#,
                )
                .bind(name)
                .fetch_optional(&self.pool)
                .await
                .map_err(map_error)?;

                if let Some(row) = holder {
                    let already_exists = StoreError::AlreadyExists {
                        name: name.clone(),
                        host: row.try_get("host").map_err(map_error)?,
                        instance_id: row.try_get("instance_id").map_err(map_error)?,
                    };
                    return Err(already_exists);
                }
                if attempt >= REGISTER_ATTEMPTS {
                    return Err(StoreError::Internal(format!(
                        "register of {name:?} neither wrote nor found a row after {REGISTER_ATTEMPTS} attempts"
                    )));
                }
                attempt += 1;
            }
        })
        .await
    }

    #[instrument(skip_all, name = "store.postgres.register_batch", fields(count = grants.len()))]
    async fn register_batch(&self, grants: &[LeaseGrant<'_>]) -> Vec<StoreResult<WorkerRecord>> {
        if grants.len() <= 1 {
            let mut results = Vec::with_capacity(grants.len());
            for grant in grants {
                results.push(self.register(grant).await);
            }
            return results;
        }

        // One statement cannot upsert the same name twice, so a name that
        // repeats goes to a later round, which keeps the callers' order.
        let mut results: Vec<Option<StoreResult<WorkerRecord>>> = grants.iter().map(|_| None).collect();
        let mut remaining: Vec<usize> = (0..grants.len()).collect();
        while !remaining.is_empty() {
            let mut seen = std::collections::HashSet::new();
            let (round, later): (Vec<usize>, Vec<usize>) = remaining
                .iter()
                .partition(|&&index| seen.insert(grants[index].registration.name.as_str()));
            remaining = later;

            let batch: Vec<&LeaseGrant<'_>> = round.iter().map(|&index| &grants[index]).collect();
            let outcome = self
                .bounded(async { self.try_register_batch(&batch).await.map_err(map_error) })
                .await;
            let written = match outcome {
                Ok(written) => written,
                Err(StoreError::Unavailable(reason)) => {
                    // Retrying row by row would only wait for the same timeout again.
                    for &index in &round {
                        results[index] = Some(Err(StoreError::Unavailable(reason.clone())));
                    }
                    continue;
                }
                Err(error) => {
                    // A race with another register, or another failure of the
                    // batch: each grant gets the single-row path, with its
                    // retries and its own error.
                    tracing::debug!(error = %error, "register batch failed; registering one by one");
                    for &index in &round {
                        results[index] = Some(self.register(&grants[index]).await);
                    }
                    continue;
                }
            };

            for &index in &round {
                let name = &grants[index].registration.name;
                results[index] = Some(match written.get(name) {
                    Some(record) => Ok(record.clone()),
                    // Held by another instance, or deleted meanwhile: the
                    // single-row path reads the holder or inserts again.
                    None => self.register(&grants[index]).await,
                });
            }
        }

        results
            .into_iter()
            .map(|result| result.unwrap_or_else(|| Err(StoreError::Internal("register batch lost a result".into()))))
            .collect()
    }

    #[instrument(skip_all, name = "store.postgres.session", fields(worker_id))]
    async fn session(&self, worker_id: i64) -> StoreResult<Option<SessionRecord>> {
        self.bounded(async {
            let row = sqlx::query(
                r#"
                SELECT id, name, status::text AS status, session_token_hash, instance_id,
                       lease_expires, lease_ttl_ms, heartbeat_interval_ms
                FROM worker
                WHERE id = $1  -- worker id
                "#,
            )
            .bind(worker_id)
            .fetch_optional(&self.pool)
            .await
            .map_err(map_error)?;

            row.as_ref().map(decode_session).transpose().map_err(map_error)
        })
        .await
    }

    #[instrument(skip_all, name = "store.postgres.write_heartbeats", fields(count = heartbeats.len()))]
    async fn write_heartbeats(&self, heartbeats: &[HeartbeatWrite]) -> StoreResult<Vec<i64>> {
        if heartbeats.is_empty() {
            return Ok(Vec::new());
        }

        let batch = HeartbeatBatch::new(heartbeats);
        self.bounded(async {
            // When several input rows match one worker, UPDATE ... FROM
            // uses one of them and PostgreSQL does not define which, so the
            // batch keeps only the latest heartbeat per worker and token.
            let rows = sqlx::query(
                r#"
                UPDATE worker AS w
                SET last_heartbeat = h.at,
                    lease_expires = h.expires,
                    updated = h.at,
                    status = COALESCE(h.status::worker_status_enum, w.status)
                FROM unnest(
                    $1::bigint[],       -- worker ids
                    $2::bytea[],        -- session token hashes
                    $3::timestamptz[],  -- arrival times
                    $4::timestamptz[],  -- new lease deadlines
                    $5::text[]          -- reported statuses, NULL to keep
                ) AS h(id, hash, at, expires, status)
                WHERE w.id = h.id
                  AND w.session_token_hash = h.hash
                  AND w.status IN ('active', 'busy')
                RETURNING w.id
                "#,
            )
            .bind(&batch.ids)
            .bind(&batch.hashes)
            .bind(&batch.times)
            .bind(&batch.deadlines)
            .bind(&batch.statuses)
            .fetch_all(&self.pool)
            .await
            .map_err(map_error)?;

            let mut updated: Vec<i64> = rows
                .iter()
                .map(|row| row.try_get::<i64, _>("id"))
                .collect::<Result<_, _>>()
                .map_err(map_error)?;
            updated.sort_unstable();
            Ok(updated)
        })
        .await
    }

    #[instrument(skip_all, name = "store.postgres.deregister", fields(worker_id))]
    async fn deregister(&self, worker_id: i64, token_hash: &[u8], now: DateTime<Utc>) -> StoreResult<WorkerRecord> {
        self.bounded(async {
            let now = db_time(now);

            // The token hash stays, so that repeating the call with the same
            // token can be distinguished from a call with a superseded one.
            let sql = format!(
                r#"
                UPDATE worker
                SET status = 'inactive', lease_expires = $3, updated = $3  -- $3: now
                WHERE id = $1                                              -- worker id
                  AND session_token_hash = $2                              -- token hash
                  AND status <> 'inactive'
                RETURNING {WORKER_COLUMNS}"#
            );
            let row = sqlx::query(&sql)
                .bind(worker_id)
                .bind(token_hash)
                .bind(now)
                .fetch_optional(&self.pool)
                .await
                .map_err(map_error)?;
            if let Some(row) = row {
                return decode_worker(&row).map_err(map_error);
            }

            // Nothing changed: the worker is unknown, already deregistered
            // with this token, or now held by another session.
            let sql = format!("SELECT {WORKER_COLUMNS}, session_token_hash FROM worker WHERE id = $1");
            let row = sqlx::query(&sql)
                .bind(worker_id)
                .fetch_optional(&self.pool)
                .await
                .map_err(map_error)?;
            let Some(row) = row else {
                return Err(StoreError::NotFound);
            };

            let stored_hash: Option<Vec<u8>> = row.try_get("session_token_hash").map_err(map_error)?;
            match stored_hash {
                Some(stored) if stored == token_hash => decode_worker(&row).map_err(map_error),
                Some(_) => Err(StoreError::Superseded),
                // A row no registration ever wrote has no session to end.
                None => Err(StoreError::NotFound),
            }
        })
        .await
    }

    #[instrument(skip_all, name = "store.postgres.get_by_id", fields(worker_id = id))]
    async fn get_by_id(&self, id: i64) -> StoreResult<Option<WorkerRecord>> {
        self.bounded(self.get_where("id = $1", id)).await
    }

    #[instrument(skip_all, name = "store.postgres.get_by_name", fields(name))]
    async fn get_by_name(&self, name: &str) -> StoreResult<Option<WorkerRecord>> {
        self.bounded(self.get_where("name = $1", name.to_string())).await
    }

    #[instrument(skip_all, name = "store.postgres.list", fields(after_id))]
    async fn list(&self, filter: &ListFilter, after_id: i64, now: DateTime<Utc>) -> StoreResult<Vec<WorkerRecord>> {
        let mut query = build_list_query(filter, after_id, db_time(now));
        self.bounded(async {
            let rows = query.build().fetch_all(&self.pool).await.map_err(map_error)?;
            rows.iter()
                .map(decode_worker)
                .collect::<Result<Vec<_>, _>>()
                .map_err(map_error)
        })
        .await
    }

    #[instrument(skip_all, name = "store.postgres.count_leases")]
    async fn count_leases(&self, sweep: &Sweep) -> StoreResult<LeaseCounts> {
        self.bounded(async {
            let row = sqlx::query(
                r#"
                SELECT
                    count(*) AS live,
                    count(*) FILTER (
                        WHERE lease_expires < $1           -- now
                          AND lease_ttl_ms <= $2           -- since_regained ms
                          AND id <> ALL($3::bigint[])      -- excluded ids
                    ) AS expirable
                FROM worker
                WHERE status IN ('active', 'busy')
                "#,
            )
            .bind(db_time(sweep.now))
            .bind(duration_ms(sweep.since_regained))
            .bind(&sweep.exclude_ids)
            .fetch_one(&self.pool)
            .await
            .map_err(map_error)?;

            let counts = LeaseCounts {
                live: row.try_get("live").map_err(map_error)?,
                expirable: row.try_get("expirable").map_err(map_error)?,
            };
            Ok(counts)
        })
        .await
    }

    #[instrument(skip_all, name = "store.postgres.expire", fields(limit = sweep.limit))]
    async fn expire(&self, sweep: &Sweep) -> StoreResult<Vec<ExpiredWorker>> {
        if sweep.limit <= 0 {
            return Ok(Vec::new());
        }

        self.bounded(async {
            // SKIP LOCKED lets replicas sweep at once without waiting on each
            // other. A row another replica expired first fails the recheck in
            // the outer WHERE, so each worker is returned by exactly one sweep.
            // The CTE is MATERIALIZED because a subquery under IN may be
            // rescanned, and a rescan skips the rows this statement already
            // updated and locks the next ones past the limit.
            let rows = sqlx::query(
                r#"
                WITH picked AS MATERIALIZED (
                    SELECT id
                    FROM worker
                    WHERE status IN ('active', 'busy')
                      AND lease_expires < $1           -- now
                      AND lease_ttl_ms <= $2           -- since_regained ms
                      AND id <> ALL($3::bigint[])      -- excluded ids
                    ORDER BY lease_expires
                    LIMIT $4                           -- limit
                    FOR UPDATE SKIP LOCKED
                )
                UPDATE worker AS w
                SET status = 'inactive', updated = $1
                FROM picked
                WHERE w.id = picked.id
                  AND w.status IN ('active', 'busy')
                  AND w.lease_expires < $1
                  AND w.lease_ttl_ms <= $2
                RETURNING w.id, w.name, w.last_heartbeat
                "#,
            )
            .bind(db_time(sweep.now))
            .bind(duration_ms(sweep.since_regained))
            .bind(&sweep.exclude_ids)
            .bind(sweep.limit)
            .fetch_all(&self.pool)
            .await
            .map_err(map_error)?;

            let mut expired = rows
                .iter()
                .map(|row| {
                    Ok(ExpiredWorker {
                        id: row.try_get("id")?,
                        name: row.try_get("name")?,
                        last_heartbeat: row.try_get("last_heartbeat")?,
                    })
                })
                .collect::<Result<Vec<_>, sqlx::Error>>()
                .map_err(map_error)?;
            expired.sort_unstable_by_key(|worker| worker.id);
            Ok(expired)
        })
        .await
    }

    #[instrument(skip_all, name = "store.postgres.index_rows")]
    async fn index_rows(&self, selection: RowSelection<'_>) -> StoreResult<Vec<IndexRow>> {
        let rows = self
            .bounded(async {
                let rows = match selection {
                    RowSelection::Ids(ids) => {
                        let sql = format!(
                            "SELECT {WORKER_COLUMNS}, session_token_hash FROM worker WHERE id = ANY($1::bigint[]) ORDER BY id"
                        );
                        sqlx::query(&sql).bind(ids).fetch_all(&self.pool).await
                    }
                    RowSelection::After { after_id, limit } => {
                        let sql = format!(
                            "SELECT {WORKER_COLUMNS}, session_token_hash FROM worker WHERE id > $1 ORDER BY id LIMIT $2"
                        );
                        sqlx::query(&sql).bind(after_id).bind(limit).fetch_all(&self.pool).await
                    }
                };
                rows.map_err(map_error)
            })
            .await?;

        // Decoding runs outside the deadline, which is meant for the database.
        rows.iter()
            .map(|row| {
                Ok(IndexRow {
                    record: decode_worker(row)?,
                    token_hash: row.try_get("session_token_hash")?,
                })
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()
            .map_err(map_error)
    }

    #[instrument(skip_all, name = "store.postgres.index_changes")]
    async fn index_changes(&self, since: DateTime<Utc>) -> StoreResult<IndexChanges> {
        self.bounded(async {
            let since = db_time(since);
            let rows = sqlx::query(
                r#"
                SELECT id, status::text AS status, last_heartbeat, lease_expires, updated, session_token_hash
                FROM worker
                WHERE updated >= $1
                "#,
            )
            .bind(since)
            .fetch_all(&self.pool)
            .await
            .map_err(map_error)?;
            let total: i64 = sqlx::query_scalar("SELECT count(*) FROM worker")
                .fetch_one(&self.pool)
                .await
                .map_err(map_error)?;

            // Columns by position: a refresh reads every recently changed row,
            // and looking each column up by name costs more than decoding it.
            let rows = rows
                .iter()
                .map(|row| {
                    let id: i64 = row.try_get(0)?;
                    let status: &str = row.try_get(1)?;
                    Ok(RowChange {
                        id,
                        status: parse_column::<Status>(id, "status", status)?,
                        last_heartbeat: row.try_get(2)?,
                        lease_expires: row.try_get(3)?,
                        updated: row.try_get(4)?,
                        token_hash: row.try_get(5)?,
                    })
                })
                .collect::<Result<Vec<_>, sqlx::Error>>()
                .map_err(map_error)?;
            Ok(IndexChanges { rows, total })
        })
        .await
    }

    #[instrument(skip_all, name = "store.postgres.worker_ids")]
    async fn worker_ids(&self) -> StoreResult<Vec<i64>> {
        self.bounded(async {
            sqlx::query_scalar("SELECT id FROM worker ORDER BY id")
                .fetch_all(&self.pool)
                .await
                .map_err(map_error)
        })
        .await
    }
}

/// Heartbeats as the columns of the batch update, one entry per worker and token.
struct HeartbeatBatch {
    ids: Vec<i64>,
    hashes: Vec<Vec<u8>>,
    times: Vec<DateTime<Utc>>,
    deadlines: Vec<DateTime<Utc>>,
    statuses: Vec<Option<String>>,
}

impl HeartbeatBatch {
    /// Builds the columns, keeping the latest heartbeat of each worker and token.
    fn new(heartbeats: &[HeartbeatWrite]) -> Self {
        let mut positions: HashMap<(i64, &[u8]), usize> = HashMap::with_capacity(heartbeats.len());
        let mut latest: Vec<&HeartbeatWrite> = Vec::with_capacity(heartbeats.len());
        for heartbeat in heartbeats {
            match positions.entry((heartbeat.worker_id, heartbeat.token_hash.as_slice())) {
                std::collections::hash_map::Entry::Occupied(slot) => {
                    let latest_write = &mut latest[*slot.get()];
                    if latest_write.at <= heartbeat.at {
                        *latest_write = heartbeat;
                    }
                }
                std::collections::hash_map::Entry::Vacant(slot) => {
                    slot.insert(latest.len());
                    latest.push(heartbeat);
                }
            }
        }

        HeartbeatBatch {
            ids: latest.iter().map(|h| h.worker_id).collect(),
            hashes: latest.iter().map(|h| h.token_hash.clone()).collect(),
            times: latest.iter().map(|h| db_time(h.at)).collect(),
            deadlines: latest.iter().map(|h| db_time(h.lease_expires)).collect(),
            statuses: latest
                .iter()
                .map(|h| h.status.map(|s| s.as_str().to_string()))
                .collect(),
        }
    }
}

/// Builds the List query: every filter value is a bound parameter, and
/// keyset pagination on `id` reads one row more than a page.
fn build_list_query(filter: &ListFilter, after_id: i64, now: DateTime<Utc>) -> QueryBuilder<'static, Postgres> {
    let mut query = QueryBuilder::new(format!("SELECT {WORKER_COLUMNS} FROM worker WHERE id > "));
    query.push_bind(after_id);

    if let Some(role) = filter.role {
        query.push(" AND worker_role = ");
        query.push_bind(role.as_str()).push("::worker_role_enum");
    }

    if !filter.statuses.is_empty() {
        let statuses: Vec<&'static str> = filter.statuses.iter().map(|s| s.as_str()).collect();
        query.push(" AND status = ANY(");
        query.push_bind(statuses).push("::worker_status_enum[])");
    }

    if !filter.runtimes.is_empty() {
        // ?& matches when every name is an element of the runtimes array,
        // and the GIN index on capabilities->'runtimes' serves it.
        query.push(" AND capabilities -> 'runtimes' ?& ");
        query.push_bind(filter.runtimes.clone()).push("::text[]");
    }

    if !filter.labels.is_empty() {
        let labels: Map<String, Json> = filter
            .labels
            .iter()
            .map(|(key, value)| (key.clone(), Json::String(value.clone())))
            .collect();
        query.push(" AND capabilities -> 'labels' @> ");
        query.push_bind(SqlJson(labels)).push("::jsonb");
    }

    if let Some(age) = filter.max_heartbeat_age {
        match heartbeat_cutoff(now, age) {
            Some(cutoff) => {
                query.push(" AND last_heartbeat >= ");
                query.push_bind(cutoff);
            }
            // An age reaching before any storable time excludes only
            // workers that never sent a heartbeat.
            None => {
                query.push(" AND last_heartbeat IS NOT NULL");
            }
        }
    }

    if !filter.name_prefix.is_empty() {
        // starts_with treats % and _ literally, unlike LIKE.
        query.push(" AND starts_with(name, ");
        query.push_bind(filter.name_prefix.clone()).push(")");
    }

    let limit = i64::try_from(filter.page_size).unwrap_or(i64::MAX - 1) + 1;
    query.push(" ORDER BY id LIMIT ");
    query.push_bind(limit);
    query
}

/// Returns `now - age`, or `None` when that lies before the year 1, which
/// PostgreSQL timestamps and chrono cannot both represent.
fn heartbeat_cutoff(now: DateTime<Utc>, age: Duration) -> Option<DateTime<Utc>> {
    let age = TimeDelta::from_std(age).ok()?;
    let cutoff = now.checked_sub_signed(age)?;
    let earliest = DateTime::parse_from_rfc3339("0001-01-01T00:00:00Z").ok()?;
    (cutoff >= earliest).then_some(cutoff)
}

/// Truncates a timestamp to milliseconds, the precision SQLite stores.
fn db_time(time: DateTime<Utc>) -> DateTime<Utc> {
    time.trunc_subsecs(3)
}

/// Tells whether a register failure is a race with a concurrent register
/// that the next attempt resolves: a unique violation (23505), a
/// serialization failure (40001) or a deadlock (40P01).
fn is_register_race(error: &sqlx::Error) -> bool {
    let sqlx::Error::Database(database_error) = error else {
        return false;
    };
    matches!(database_error.code().as_deref(), Some("23505" | "40001" | "40P01"))
}

/// Maps an sqlx error to a [`StoreError`]: connection trouble, timeouts,
/// server shutdown and resource exhaustion become Unavailable, so the
/// caller retries; everything else is Internal.
fn map_error(error: sqlx::Error) -> StoreError {
    let unavailable = match &error {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(database_error) => {
            let code = database_error.code().unwrap_or_default();
            is_unavailable_sqlstate(&code)
        }
        _ => false,
    };

    if unavailable {
        StoreError::Unavailable(error.to_string())
    } else {
        StoreError::Internal(error.to_string())
    }
}

/// Tells whether a SQLSTATE means the database is unreachable or
/// overloaded: class 08 (connection exception), class 53 (insufficient
/// resources), 57P01 to 57P03 (admin or crash shutdown, cannot connect now)
/// and 57014 (query canceled, which `statement_timeout` raises).
fn is_unavailable_sqlstate(code: &str) -> bool {
    code.starts_with("08") || code.starts_with("53") || matches!(code, "57P01" | "57P02" | "57P03" | "57014")
}

/// Reads a [`WorkerRecord`] from a row with [`WORKER_COLUMNS`].
fn decode_worker(row: &PgRow) -> Result<WorkerRecord, sqlx::Error> {
    let id: i64 = row.try_get("id")?;
    let capabilities: SqlJson<Json> = row.try_get("capabilities")?;
    decode_worker_with(row, capabilities_object(id, capabilities.0)?)
}

/// Reads a [`WorkerRecord`] from a row without a capabilities column,
/// with capabilities known beforehand.
fn decode_worker_with(row: &PgRow, capabilities: Map<String, Json>) -> Result<WorkerRecord, sqlx::Error> {
    let id: i64 = row.try_get("id")?;
    let role: String = row.try_get("worker_role")?;
    let status: String = row.try_get("status")?;

    let record = WorkerRecord {
        id,
        name: row.try_get("name")?,
        role: parse_column::<Role>(id, "worker_role", &role)?,
        status: parse_column::<Status>(id, "status", &status)?,
        host: row.try_get("host")?,
        instance_id: row.try_get("instance_id")?,
        capabilities,
        last_heartbeat: row.try_get("last_heartbeat")?,
        lease_expires: row.try_get("lease_expires")?,
        lease_ttl: stored_duration(row.try_get("lease_ttl_ms")?),
        heartbeat_interval: stored_duration(row.try_get("heartbeat_interval_ms")?),
        created: row.try_get("created")?,
        updated: row.try_get("updated")?,
    };
    Ok(record)
}

/// Reads a [`SessionRecord`] from a row of the session query.
fn decode_session(row: &PgRow) -> Result<SessionRecord, sqlx::Error> {
    let id: i64 = row.try_get("id")?;
    let status: String = row.try_get("status")?;

    let record = SessionRecord {
        id,
        name: row.try_get("name")?,
        status: parse_column::<Status>(id, "status", &status)?,
        token_hash: row.try_get("session_token_hash")?,
        instance_id: row.try_get("instance_id")?,
        lease_expires: row.try_get("lease_expires")?,
        lease_ttl: stored_duration(row.try_get("lease_ttl_ms")?),
        heartbeat_interval: stored_duration(row.try_get("heartbeat_interval_ms")?),
    };
    Ok(record)
}

/// Parses an enum label read from the database.
fn parse_column<T: FromStr<Err = String>>(id: i64, column: &str, label: &str) -> Result<T, sqlx::Error> {
    label.parse::<T>().map_err(|message| sqlx::Error::ColumnDecode {
        index: column.to_string(),
        source: format!("worker {id}: {message}").into(),
    })
}

/// Unwraps the stored capabilities, which the registry always writes as an object.
fn capabilities_object(id: i64, value: Json) -> Result<Map<String, Json>, sqlx::Error> {
    match value {
        Json::Object(object) => Ok(object),
        other => Err(sqlx::Error::ColumnDecode {
            index: "capabilities".to_string(),
            source: format!("worker {id}: expected a JSON object, found {other}").into(),
        }),
    }
}

/// Converts stored milliseconds to a duration. Negative values, which only
/// a manual edit could write, count as zero.
fn stored_duration(milliseconds: i64) -> Duration {
    Duration::from_millis(u64::try_from(milliseconds).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Proves that connection, shutdown, timeout and resource SQLSTATEs count as unavailable and others do not.
    #[test]
    fn sqlstate_classification() {
        let unavailable = [
            "08000", "08006", "08P01", "53100", "53300", "57P01", "57P02", "57P03", "57014",
        ];
        for code in unavailable {
            assert!(is_unavailable_sqlstate(code), "{code} must be unavailable");
        }

        let internal = ["23505", "40001", "42P01", "22P02", "57000", "XX000", ""];
        for code in internal {
            assert!(!is_unavailable_sqlstate(code), "{code} must be internal");
        }
    }

    /// Proves that transport and pool errors map to Unavailable and decode errors to Internal.
    #[test]
    fn error_mapping() {
        let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        assert!(matches!(
            map_error(sqlx::Error::Io(refused)),
            StoreError::Unavailable(_)
        ));
        assert!(matches!(
            map_error(sqlx::Error::PoolTimedOut),
            StoreError::Unavailable(_)
        ));
        assert!(matches!(map_error(sqlx::Error::PoolClosed), StoreError::Unavailable(_)));
        assert!(matches!(map_error(sqlx::Error::RowNotFound), StoreError::Internal(_)));
        let decode = sqlx::Error::ColumnDecode {
            index: "status".into(),
            source: "bad label".into(),
        };
        assert!(matches!(map_error(decode), StoreError::Internal(_)));
    }

    /// Proves that timestamps lose their sub-millisecond part, as in the SQLite store.
    #[test]
    fn db_time_truncates_to_milliseconds() {
        let precise = DateTime::parse_from_rfc3339("2026-01-31T12:00:00.123987654Z")
            .unwrap()
            .with_timezone(&Utc);
        let expected = DateTime::parse_from_rfc3339("2026-01-31T12:00:00.123Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(db_time(precise), expected);
    }

    /// Proves that a heartbeat age reaching before the year 1 gives no cutoff.
    #[test]
    fn heartbeat_cutoff_bounds() {
        let now = DateTime::parse_from_rfc3339("2026-01-31T12:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let expected = DateTime::parse_from_rfc3339("2026-01-31T11:59:30Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(heartbeat_cutoff(now, Duration::from_secs(30)), Some(expected));
        assert_eq!(heartbeat_cutoff(now, Duration::from_secs(3000 * 365 * 86_400)), None);
        assert_eq!(heartbeat_cutoff(now, Duration::from_secs(u64::MAX)), None);
    }
}
