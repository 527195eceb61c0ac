//! Server configuration: built-in defaults, then a YAML file (`--config`
//! or `ATTUNE_CONFIG`), then `ATTUNE__SECTION__KEY` environment variables,
//! then command-line flags, each layer overriding the one before.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};
use serde::Deserialize;

/// Default database: a SQLite file in the working directory, created on first start.
pub const DEFAULT_DATABASE_URL: &str = "sqlite://registry.db";
/// Default gRPC listen address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:50051";

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, ValueEnum, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Command-line flags; each one overrides the file and the environment.
#[derive(Debug, Clone, Default, Args)]
pub struct Flags {
    /// YAML configuration file.
    #[arg(long, global = true, env = "ATTUNE_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Database URL: sqlite://FILE or postgresql://USER@HOST/DB [default: sqlite://registry.db].
    #[arg(long, global = true, value_name = "URL")]
    pub database_url: Option<String>,

    /// Address and port the gRPC server listens on; port 0 picks a free port [default: 127.0.0.1:50051].
    #[arg(long, global = true, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,

    /// Heartbeat interval granted to agents that request none, such as 30s [default: 30s].
    #[arg(long, global = true, value_parser = parse_duration, value_name = "DURATION")]
    pub heartbeat_interval: Option<Duration>,

    /// Minimum heartbeat interval granted [default: 1s].
    #[arg(long, global = true, value_parser = parse_duration, value_name = "DURATION")]
    pub min_heartbeat_interval: Option<Duration>,

    /// Maximum heartbeat interval granted [default: 300s].
    #[arg(long, global = true, value_parser = parse_duration, value_name = "DURATION")]
    pub max_heartbeat_interval: Option<Duration>,

    /// Heartbeats a worker may miss before its lease runs out; TTL = interval x this [default: 3].
    #[arg(long, global = true, value_name = "COUNT")]
    pub missed_heartbeats: Option<u32>,

    /// Time between expiry sweeps [default: 5s].
    #[arg(long, global = true, value_parser = parse_duration, value_name = "DURATION")]
    pub sweep_interval: Option<Duration>,

    /// Maximum time a heartbeat stays buffered in memory before it is written [default: 1s].
    #[arg(long, global = true, value_parser = parse_duration, value_name = "DURATION")]
    pub flush_interval: Option<Duration>,

    /// Time between reads of rows that other replicas changed, for List; 100ms to 10m [default: 1s].
    #[arg(long, global = true, value_parser = parse_duration, value_name = "DURATION")]
    pub index_refresh_interval: Option<Duration>,

    /// Time allowed for a graceful shutdown before open connections are dropped [default: 10s].
    #[arg(long, global = true, value_parser = parse_duration, value_name = "DURATION")]
    pub shutdown_grace: Option<Duration>,

    /// Serve gRPC server reflection (true or false) [default: true].
    #[arg(long, global = true, value_name = "BOOL")]
    pub reflection: Option<bool>,

    /// Log format [default: text].
    #[arg(long, global = true, value_enum)]
    pub log_format: Option<LogFormat>,
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    worker_registry::duration::parse(text)
}

/// The whole server configuration after all layers are merged.
#[derive(Debug, Clone, Deserialize)]
pub struct Settings {
    /// Database connection settings.
    pub database: DatabaseSettings,
    /// Lease and server settings.
    pub registry: RegistrySettings,
    /// Logging settings.
    pub log: LogSettings,
}

/// Section `database`.
#[derive(Debug, Clone, Deserialize)]
pub struct DatabaseSettings {
    /// Database URL; the scheme selects the backend.
    pub url: String,
    /// Maximum pooled connections.
    pub max_connections: u32,
    /// Time to wait for a connection.
    #[serde(with = "worker_registry::duration::serde")]
    pub connect_timeout: Duration,
    /// Maximum run time of one statement.
    #[serde(with = "worker_registry::duration::serde")]
    pub statement_timeout: Duration,
}

/// Section `registry`.
#[derive(Debug, Clone, Deserialize)]
pub struct RegistrySettings {
    /// Listen address.
    pub listen: SocketAddr,
    /// Interval granted when an agent requests none.
    #[serde(with = "worker_registry::duration::serde")]
    pub heartbeat_interval: Duration,
    /// Lower bound of granted intervals.
    #[serde(with = "worker_registry::duration::serde")]
    pub min_heartbeat_interval: Duration,
    /// Upper bound of granted intervals.
    #[serde(with = "worker_registry::duration::serde")]
    pub max_heartbeat_interval: Duration,
    /// Lease TTL as a multiple of the granted interval.
    pub missed_heartbeats: u32,
    /// Time between expiry sweeps.
    #[serde(with = "worker_registry::duration::serde")]
    pub sweep_interval: Duration,
    /// Maximum time a heartbeat stays buffered before it is written.
    #[serde(with = "worker_registry::duration::serde")]
    pub flush_interval: Duration,
    /// Time between reads of changed rows into the worker index.
    #[serde(with = "worker_registry::duration::serde")]
    pub index_refresh_interval: Duration,
    /// Grace period of a shutdown.
    #[serde(with = "worker_registry::duration::serde")]
    pub shutdown_grace: Duration,
    /// Whether reflection is served.
    pub reflection: bool,
    /// Turns the mass-expiry guard on or off.
    pub mass_expiry_guard: bool,
    /// Share of live workers that one sweep may expire before the guard slows expiry down.
    pub mass_expiry_threshold: f64,
    /// Minimum number of live workers for the guard to apply.
    pub mass_expiry_min_live: i64,
    /// Share of the fleet the guard expires per sweep.
    pub mass_expiry_rate: f64,
}

/// Shortest allowed `registry.index_refresh_interval`.
const MIN_INDEX_REFRESH: Duration = Duration::from_millis(100);
/// Longest allowed `registry.index_refresh_interval`.
const MAX_INDEX_REFRESH: Duration = Duration::from_secs(600);

/// Section `log`.
#[derive(Debug, Clone, Deserialize)]
pub struct LogSettings {
    /// Output format.
    pub format: LogFormat,
    /// Filter directives in `RUST_LOG` syntax, such as `info` or `registry_server=debug`.
    pub level: String,
}

impl Settings {
    /// Merges defaults, the YAML file, the environment and the flags, then
    /// validates the result.
    pub fn load(flags: &Flags) -> anyhow::Result<Settings> {
        let mut builder = config::Config::builder()
            .set_default("database.url", DEFAULT_DATABASE_URL)?
            .set_default("database.max_connections", 10)?
            .set_default("database.connect_timeout", "5s")?
            .set_default("database.statement_timeout", "5s")?
            .set_default("registry.listen", DEFAULT_LISTEN)?
            .set_default("registry.heartbeat_interval", "30s")?
            .set_default("registry.min_heartbeat_interval", "1s")?
            .set_default("registry.max_heartbeat_interval", "300s")?
            .set_default("registry.missed_heartbeats", 3)?
            .set_default("registry.sweep_interval", "5s")?
            .set_default("registry.flush_interval", "1s")?
            .set_default("registry.index_refresh_interval", "1s")?
            .set_default("registry.shutdown_grace", "10s")?
            .set_default("registry.reflection", true)?
            .set_default("registry.mass_expiry_guard", true)?
            .set_default("registry.mass_expiry_threshold", 0.5)?
            .set_default("registry.mass_expiry_min_live", 20)?
            .set_default("registry.mass_expiry_rate", 0.1)?
            .set_default("log.format", "text")?
            .set_default("log.level", "info")?;

        if let Some(path) = &flags.config {
            builder = builder.add_source(config::File::from(path.as_path()).format(config::FileFormat::Yaml));
        }

        builder = builder.add_source(
            config::Environment::with_prefix("ATTUNE")
                .prefix_separator("__")
                .separator("__")
                .try_parsing(true),
        );

        builder = apply_flags(builder, flags)?;

        let merged = builder.build()?;
        check_unknown_keys(&merged)?;
        let settings: Settings = merged
            .try_deserialize()
            .map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;
        settings.validate()?;
        Ok(settings)
    }

    /// Checks relations between values that each look valid alone.
    pub fn validate(&self) -> anyhow::Result<()> {
        let scheme = self.database.url.split(':').next().unwrap_or_default();
        anyhow::ensure!(
            matches!(scheme, "sqlite" | "postgres" | "postgresql") && self.database.url.contains(':'),
            "invalid database.url {:?}: use sqlite://FILE or postgresql://USER@HOST:PORT/DB",
            crate::store::redact_url(&self.database.url)
        );
        if let Err(error) = tracing_subscriber::EnvFilter::builder().parse(&self.log.level) {
            anyhow::bail!(
                "invalid log.level {:?}: {error}; use a level such as info or debug, or directives such as \
                 info,registry_server=debug",
                self.log.level
            );
        }

        let registry = &self.registry;
        anyhow::ensure!(
            !registry.min_heartbeat_interval.is_zero(),
            "registry.min_heartbeat_interval must be greater than 0"
        );
        anyhow::ensure!(
            registry.min_heartbeat_interval <= registry.heartbeat_interval
                && registry.heartbeat_interval <= registry.max_heartbeat_interval,
            "registry.heartbeat_interval ({:?}) must lie between registry.min_heartbeat_interval ({:?}) and \
             registry.max_heartbeat_interval ({:?})",
            registry.heartbeat_interval,
            registry.min_heartbeat_interval,
            registry.max_heartbeat_interval
        );
        anyhow::ensure!(
            registry.missed_heartbeats >= 2,
            "registry.missed_heartbeats must be at least 2, got {}",
            registry.missed_heartbeats
        );
        anyhow::ensure!(
            !registry.sweep_interval.is_zero(),
            "registry.sweep_interval must be greater than 0"
        );
        anyhow::ensure!(
            !registry.flush_interval.is_zero(),
            "registry.flush_interval must be greater than 0"
        );
        // Below 100 ms the refresh queries alone keep a CPU busy. Above 10
        // minutes, a replica's List would miss other replicas'
        // registrations and expiries for that long.
        anyhow::ensure!(
            (MIN_INDEX_REFRESH..=MAX_INDEX_REFRESH).contains(&registry.index_refresh_interval),
            "registry.index_refresh_interval must be between 100ms and 10m, got {:?}",
            registry.index_refresh_interval
        );

        anyhow::ensure!(
            (0.0..=1.0).contains(&registry.mass_expiry_threshold),
            "registry.mass_expiry_threshold must be between 0 and 1, got {}",
            registry.mass_expiry_threshold
        );
        anyhow::ensure!(
            registry.mass_expiry_rate > 0.0 && registry.mass_expiry_rate <= 1.0,
            "registry.mass_expiry_rate must be above 0 and at most 1, got {}",
            registry.mass_expiry_rate
        );
        anyhow::ensure!(
            self.database.max_connections > 0,
            "database.max_connections must be at least 1"
        );
        Ok(())
    }

    /// Returns warnings about settings that work but weaken a guarantee.
    pub fn warnings(&self) -> Vec<String> {
        let registry = &self.registry;
        let mut warnings = Vec::new();

        // A buffered heartbeat should reach the database before the lease
        // it renews lapses there, or another replica sharing the database
        // could expire a live worker, or let another instance take its name.
        let slack = registry.min_heartbeat_interval * (registry.missed_heartbeats - 1);
        if registry.flush_interval >= slack {
            warnings.push(format!(
                "registry.flush_interval ({:?}) is not shorter than registry.min_heartbeat_interval x \
                 (registry.missed_heartbeats - 1) = {slack:?}; with several replicas on one database a worker \
                 on the shortest interval may be expired by another replica while its heartbeat is buffered",
                registry.flush_interval
            ));
        }
        warnings
    }

    /// Returns the lease TTL granted with `interval`.
    pub fn lease_ttl(&self, interval: Duration) -> Duration {
        interval * self.registry.missed_heartbeats
    }
}

/// Keys the server reads, by section.
const SERVER_KEYS: [(&str, &[&str]); 3] = [
    (
        "database",
        &["url", "max_connections", "connect_timeout", "statement_timeout"],
    ),
    (
        "registry",
        &[
            "listen",
            "heartbeat_interval",
            "min_heartbeat_interval",
            "max_heartbeat_interval",
            "missed_heartbeats",
            "sweep_interval",
            "flush_interval",
            "index_refresh_interval",
            "shutdown_grace",
            "reflection",
            "mass_expiry_guard",
            "mass_expiry_threshold",
            "mass_expiry_min_live",
            "mass_expiry_rate",
        ],
    ),
    ("log", &["format", "level"]),
];

/// Keys of sensor-agent that may share a file or environment with the
/// server; the server ignores them.
const AGENT_REGISTRY_KEYS: [&str; 5] = ["url", "urls", "backoff_base", "backoff_cap", "connect_timeout"];

/// Rejects keys that neither the server nor the agent reads, so a typo such
/// as `registry.lisen` fails at start instead of being ignored.
fn check_unknown_keys(merged: &config::Config) -> anyhow::Result<()> {
    let sections: std::collections::HashMap<String, config::Value> = merged
        .clone()
        .try_deserialize()
        .map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;

    for (section, value) in sections {
        if section == "sensor" {
            continue;
        }
        let Some((_, known)) = SERVER_KEYS.iter().find(|(name, _)| *name == section) else {
            anyhow::bail!(
                "invalid configuration: unknown section {section:?}; the server reads database, registry and log"
            );
        };
        let Ok(table) = value.into_table() else {
            anyhow::bail!("invalid configuration: {section} must be a mapping of keys");
        };
        for key in table.keys() {
            let shared = section == "registry" && AGENT_REGISTRY_KEYS.contains(&key.as_str());
            if !known.contains(&key.as_str()) && !shared {
                anyhow::bail!(
                    "invalid configuration: unknown key {section}.{key}; known keys of {section}: {}",
                    known.join(", ")
                );
            }
        }
    }
    Ok(())
}

fn apply_flags(
    mut builder: config::ConfigBuilder<config::builder::DefaultState>,
    flags: &Flags,
) -> anyhow::Result<config::ConfigBuilder<config::builder::DefaultState>> {
    fn duration_text(duration: Duration) -> String {
        format!("{}ms", duration.as_millis())
    }

    if let Some(url) = &flags.database_url {
        builder = builder.set_override("database.url", url.as_str())?;
    }
    if let Some(listen) = flags.listen {
        builder = builder.set_override("registry.listen", listen.to_string())?;
    }
    let durations = [
        ("registry.heartbeat_interval", flags.heartbeat_interval),
        ("registry.min_heartbeat_interval", flags.min_heartbeat_interval),
        ("registry.max_heartbeat_interval", flags.max_heartbeat_interval),
        ("registry.sweep_interval", flags.sweep_interval),
        ("registry.flush_interval", flags.flush_interval),
        ("registry.index_refresh_interval", flags.index_refresh_interval),
        ("registry.shutdown_grace", flags.shutdown_grace),
    ];
    for (key, value) in durations {
        if let Some(duration) = value {
            builder = builder.set_override(key, duration_text(duration))?;
        }
    }
    if let Some(count) = flags.missed_heartbeats {
        builder = builder.set_override("registry.missed_heartbeats", count)?;
    }
    if let Some(reflection) = flags.reflection {
        builder = builder.set_override("registry.reflection", reflection)?;
    }
    if let Some(format) = flags.log_format {
        let text = match format {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        };
        builder = builder.set_override("log.format", text)?;
    }
    Ok(builder)
}
