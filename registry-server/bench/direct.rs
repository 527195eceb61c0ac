//! The design the registry replaces: every heartbeat is one UPDATE of the
//! worker's own row, sent straight to PostgreSQL through a pool.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::postgres::PgPoolOptions;
use tokio::sync::Semaphore;

use crate::histogram::{Latencies, Summary};
use crate::report::{Observer, Window};

/// Updates in flight at most; beyond it a scheduled update is skipped and
/// counted, so an overloaded database cannot grow the generator's memory.
const MAX_IN_FLIGHT: usize = 4096;

/// Outcome of one run.
pub struct DirectResult {
    /// Updates per second that completed.
    pub updates_per_second: f64,
    /// Latency of one UPDATE, including the wait for a pooled connection.
    pub latency: Summary,
    /// Failed updates.
    pub errors: u64,
    /// Scheduled updates skipped because [`MAX_IN_FLIGHT`] were pending.
    pub skipped: u64,
    /// Process readings over the run.
    pub window: Window,
}

/// Inserts `workers` rows into the migrated `worker` table of
/// `database_url` and updates them at `rate` per second for `duration`
/// through a pool of `pool_size` connections.
pub async fn run(
    database_url: &str,
    workers: usize,
    rate: f64,
    duration: Duration,
    pool_size: u32,
    observer: &Observer,
) -> anyhow::Result<DirectResult> {
    let pool = PgPoolOptions::new()
        .max_connections(pool_size)
        .min_connections(pool_size)
        .connect(database_url)
        .await
        .map_err(|e| anyhow::anyhow!("failed to connect to {database_url}: {e}"))?;

    // The same capabilities shape as the registry writes, so rows have a
    // realistic size.
    sqlx::query(
        "INSERT INTO worker (name, worker_role, status, host, capabilities, last_heartbeat)
         SELECT 'direct-' || g, 'sensor', 'active', 'host-' || g,
                jsonb_build_object(
                    'runtimes', jsonb_build_array('shell', 'python'),
                    'runtime_versions', jsonb_build_object('shell', '5.2.15', 'python', '3.11.2'),
                    'detected_interpreters', jsonb_build_array(
                        jsonb_build_object('name', 'shell', 'path', '/usr/bin/bash', 'version', '5.2.15'),
                        jsonb_build_object('name', 'python', 'path', '/usr/bin/python3', 'version', '3.11.2')),
                    'labels', jsonb_build_object('zone', 'zone-' || (g % 4)),
                    'sensor_version', '0.1.0',
                    'max_concurrent_sensors', 10),
                now()
         FROM generate_series(1, $1) AS g
         ON CONFLICT (name) DO NOTHING",
    )
    .bind(workers as i64)
    .execute(&pool)
    .await
    .map_err(|e| anyhow::anyhow!("failed to insert {workers} workers: {e}"))?;
    let ids: Vec<i64> = sqlx::query_scalar("SELECT id FROM worker WHERE name LIKE 'direct-%' ORDER BY id")
        .fetch_all(&pool)
        .await
        .map_err(|e| anyhow::anyhow!("failed to read worker ids: {e}"))?;
    let ids = Arc::new(ids);

    let latencies = Arc::new(Latencies::new());
    let errors = Arc::new(AtomicU64::new(0));
    let completed = Arc::new(AtomicU64::new(0));
    let permits = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let mut skipped = 0u64;
    let mut scheduled = 0u64;

    let start_sample = observer.sample().await?;
    let started = Instant::now();
    let mut ticker = tokio::time::interval(Duration::from_millis(1));
    while started.elapsed() < duration {
        ticker.tick().await;

        // Open loop: catch up to the number of updates due by now.
        let due = (started.elapsed().as_secs_f64() * rate) as u64;
        while scheduled < due {
            let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
                skipped += 1;
                scheduled += 1;
                continue;
            };
            let id = ids[scheduled as usize % ids.len()];
            scheduled += 1;

            let pool = pool.clone();
            let latencies = Arc::clone(&latencies);
            let errors = Arc::clone(&errors);
            let completed = Arc::clone(&completed);
            tokio::spawn(async move {
                let sent = Instant::now();
                let result = sqlx::query(
                    "UPDATE worker SET last_heartbeat = now(), updated = now(), status = 'active' WHERE id = $1",
                )
                .bind(id)
                .execute(&pool)
                .await;
                latencies.record(id as usize, sent.elapsed());
                match result {
                    Ok(_) => completed.fetch_add(1, Ordering::Relaxed),
                    Err(_) => errors.fetch_add(1, Ordering::Relaxed),
                };
                drop(permit);
            });
        }
    }

    // Updates still queued in the pool finish outside the window; only
    // those completed within it count towards the rate.
    let done = completed.load(Ordering::Relaxed);
    let window = observer.since(&start_sample).await?;
    let _ = tokio::time::timeout(Duration::from_secs(10), permits.acquire_many(MAX_IN_FLIGHT as u32)).await;

    Ok(DirectResult {
        updates_per_second: done as f64 / window.seconds,
        latency: latencies.take(),
        errors: errors.load(Ordering::Relaxed),
        skipped,
        window,
    })
}
