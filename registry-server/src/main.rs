//! `registry-server`: parses flags, loads configuration, starts logging and
//! runs the gRPC server or the migrations.

use std::io::IsTerminal;
use std::sync::atomic::Ordering;

use clap::{Parser, Subcommand};
use registry_server::config::{Flags, LogFormat, Settings};
use registry_server::server::{open_store, Server};
use registry_server::store::redact_url;
use tokio::signal::unix::{signal, SignalKind};
use tracing::info;
use tracing_subscriber::EnvFilter;

/// Worker registry: gRPC service that tracks workers, their runtimes and their leases.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,

    #[command(flatten)]
    flags: Flags,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Applies migrations and serves gRPC until SIGINT or SIGTERM (the default).
    Serve,
    /// Applies pending migrations and exits.
    Migrate,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();

    let settings = match Settings::load(&cli.flags) {
        Ok(settings) => settings,
        Err(error) => {
            eprintln!("registry-server: {error:#}");
            return std::process::ExitCode::from(2);
        }
    };
    init_logging(&settings);
    for warning in settings.warnings() {
        tracing::warn!("{warning}");
    }

    let result = match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => serve(settings).await,
        Command::Migrate => migrate(settings).await,
    };

    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(error = format!("{error:#}"), "registry-server failed");
            std::process::ExitCode::FAILURE
        }
    }
}

fn init_logging(settings: &Settings) {
    // sqlx logs PostgreSQL notices such as "relation already exists,
    // skipping" at info on every start; they are noise for operators.
    let directives = format!("{},sqlx::postgres::notice=warn", settings.log.level);
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(directives));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none());
    match settings.log.format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(false).init(),
    }
}

async fn migrate(settings: Settings) -> anyhow::Result<()> {
    open_store(&settings).await?;
    info!(database = %redact_url(&settings.database.url), "migrations applied");
    Ok(())
}

async fn serve(settings: Settings) -> anyhow::Result<()> {
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;

    let server = Server::start(settings).await?;
    let leases = std::sync::Arc::clone(&server.leases);

    let name = tokio::select! {
        _ = interrupt.recv() => "SIGINT",
        _ = terminate.recv() => "SIGTERM",
    };
    info!(signal = name, "signal received");
    server.shutdown().await;

    // A second signal skips the rest of the grace period.
    let result = tokio::select! {
        result = server.wait() => result,
        _ = interrupt.recv() => { info!("second signal; exiting now"); Ok(()) }
        _ = terminate.recv() => { info!("second signal; exiting now"); Ok(()) }
    };
    log_lease_counters(&leases);
    info!("stopped");
    result
}

/// Logs the lease counters once at exit, so benchmarks can compare
/// heartbeat write statements with heartbeats accepted.
fn log_lease_counters(leases: &registry_server::lease::Leases) {
    let metrics = leases.metrics();
    info!(
        heartbeats_accepted = metrics.heartbeats_accepted.load(Ordering::Relaxed),
        heartbeat_statements = metrics.heartbeat_statements.load(Ordering::Relaxed),
        heartbeat_write_failures = metrics.heartbeat_write_failures.load(Ordering::Relaxed),
        workers_expired = metrics.workers_expired.load(Ordering::Relaxed),
        guarded_sweeps = metrics.guarded_sweeps.load(Ordering::Relaxed),
        "lease counters"
    );
}
