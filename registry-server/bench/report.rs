//! Observation of the processes under load, and the rows of the result table.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::time::Instant;

use sqlx::postgres::{PgPool, PgPoolOptions};

use crate::procfs;

/// One row of the markdown table that `scripts/bench` collects.
#[derive(Debug, Default)]
pub struct Row {
    pub scenario: String,
    pub backend: String,
    pub agents: String,
    pub rate: String,
    pub p50: String,
    pub p99: String,
    pub server_cpu: String,
    pub server_rss: String,
    pub database: String,
    pub notes: String,
}

impl Row {
    fn cells(&self) -> [&str; 10] {
        [
            &self.scenario,
            &self.backend,
            &self.agents,
            &self.rate,
            &self.p50,
            &self.p99,
            &self.server_cpu,
            &self.server_rss,
            &self.database,
            &self.notes,
        ]
    }
}

/// Prints `row` and appends it to `table` when one is given.
pub fn emit(table: Option<&Path>, row: &Row) -> anyhow::Result<()> {
    let line = format!("| {} |", row.cells().join(" | "));
    println!("{line}");

    if let Some(path) = table {
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| anyhow::anyhow!("failed to open table {}: {e}", path.display()))?;
        writeln!(file, "{line}").map_err(|e| anyhow::anyhow!("failed to write table {}: {e}", path.display()))?;
    }
    Ok(())
}

/// Formats a number of milliseconds with a precision that suits its size.
pub fn millis(value: f64) -> String {
    if value < 10.0 {
        format!("{value:.2}")
    } else {
        format!("{value:.0}")
    }
}

/// Formats KiB as MiB.
pub fn mebibytes(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

/// Wait for PostgreSQL backends to report their latest commits.
const STATS_DELAY: std::time::Duration = std::time::Duration::from_millis(1500);

/// Reads `pg_stat_database` and the CPU time of one database's backends.
pub struct PgObserver {
    pool: PgPool,
    database: String,
}

/// A point-in-time reading of the observed processes.
pub struct Sample {
    at: Instant,
    server_cpu: Option<f64>,
    commits: Option<i64>,
    backend_cpu: HashMap<u32, f64>,
}

/// Differences between two samples.
#[derive(Debug, Clone, Copy, Default)]
pub struct Window {
    /// Wall-clock length of the window.
    pub seconds: f64,
    /// Server CPU seconds used in the window.
    pub server_cpu: Option<f64>,
    /// Committed transactions per second in the observed database.
    pub commits_per_second: Option<f64>,
    /// CPU seconds used by the database's backends in the window.
    pub backend_cpu: Option<f64>,
}

impl Window {
    /// Formats the server's CPU seconds per second, or `-` when unknown.
    pub fn server_cpu_text(&self) -> String {
        self.server_cpu
            .map(|cpu| format!("{:.2}", cpu / self.seconds))
            .unwrap_or_else(|| "-".into())
    }

    /// Formats the commits per second with `decimals` decimals, or `-`
    /// when unknown.
    pub fn commits_text(&self, decimals: usize) -> String {
        self.commits_per_second
            .map(|commits| format!("{commits:.decimals$} commits/s"))
            .unwrap_or_else(|| "-".into())
    }
}

impl PgObserver {
    /// Connects to `url`, a database other than the observed one so the
    /// observer's own queries do not count in its commits.
    pub async fn connect(url: &str, database: &str) -> anyhow::Result<Self> {
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .connect(url)
            .await
            .map_err(|e| anyhow::anyhow!("failed to connect the PostgreSQL observer to {url}: {e}"))?;
        Ok(PgObserver {
            pool,
            database: database.to_string(),
        })
    }

    async fn commits(&self) -> anyhow::Result<i64> {
        let commits: i64 = sqlx::query_scalar("SELECT xact_commit FROM pg_stat_database WHERE datname = $1")
            .bind(&self.database)
            .fetch_one(&self.pool)
            .await
            .map_err(|e| anyhow::anyhow!("failed to read pg_stat_database for {}: {e}", self.database))?;
        Ok(commits)
    }

    async fn backend_pids(&self) -> anyhow::Result<Vec<u32>> {
        let pids: Vec<i32> = sqlx::query_scalar("SELECT pid FROM pg_stat_activity WHERE datname = $1")
            .bind(&self.database)
            .fetch_all(&self.pool)
            .await
            .map_err(|e| anyhow::anyhow!("failed to read pg_stat_activity for {}: {e}", self.database))?;
        Ok(pids.into_iter().map(|pid| pid as u32).collect())
    }
}

/// Samples the server process and, when given, a PostgreSQL database.
pub struct Observer {
    pub server_pid: Option<u32>,
    pub postgres: Option<PgObserver>,
}

impl Observer {
    /// Takes a reading now.
    pub async fn sample(&self) -> anyhow::Result<Sample> {
        let server_cpu = self.server_pid.and_then(|pid| procfs::cpu_seconds(pid).ok());

        let (commits, backend_cpu) = match &self.postgres {
            Some(postgres) => {
                let commits = postgres.commits().await?;
                let cpu = postgres
                    .backend_pids()
                    .await?
                    .into_iter()
                    .filter_map(|pid| procfs::cpu_seconds(pid).ok().map(|cpu| (pid, cpu)))
                    .collect();
                (Some(commits), cpu)
            }
            None => (None, HashMap::new()),
        };

        Ok(Sample {
            at: Instant::now(),
            server_cpu,
            commits,
            backend_cpu,
        })
    }

    /// Takes a reading now and returns its difference to `start`.
    pub async fn since(&self, start: &Sample) -> anyhow::Result<Window> {
        let mut end = self.sample().await?;
        let seconds = end.at.duration_since(start.at).as_secs_f64();

        // PostgreSQL backends send their commit counts to pg_stat_database
        // in batches at least a second apart, so the count is read again
        // 1.5 s later. Commits at the end of a short burst may still be missing.
        if let Some(postgres) = &self.postgres {
            tokio::time::sleep(STATS_DELAY).await;
            end.commits = Some(postgres.commits().await?);
        }

        let server_cpu = match (start.server_cpu, end.server_cpu) {
            (Some(before), Some(after)) => Some(after - before),
            _ => None,
        };
        let commits_per_second = match (start.commits, end.commits) {
            (Some(before), Some(after)) => Some((after - before) as f64 / seconds),
            _ => None,
        };

        // A backend that started within the window, such as one a pool
        // opened under load, counts with all its CPU time. A backend that
        // exited within the window is missed.
        let backend_cpu = self.postgres.as_ref().map(|_| {
            end.backend_cpu
                .iter()
                .map(|(pid, after)| after - start.backend_cpu.get(pid).copied().unwrap_or(0.0))
                .sum()
        });

        Ok(Window {
            seconds,
            server_cpu,
            commits_per_second,
            backend_cpu,
        })
    }

    /// Peak resident set size of the server, in KiB.
    pub fn server_peak_kib(&self) -> Option<u64> {
        self.server_pid.and_then(|pid| procfs::status_kib(pid, "VmHWM").ok())
    }

    /// Current resident set size of the server, in KiB.
    pub fn server_rss_kib(&self) -> Option<u64> {
        self.server_pid.and_then(|pid| procfs::status_kib(pid, "VmRSS").ok())
    }
}
