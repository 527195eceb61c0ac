//! `registry-bench`: the load generator behind `scripts/bench`.
//!
//! One process simulates many agents. Each agent is a task with its own
//! HTTP/2 connection and one bidirectional stream, so 10,000 agents need
//! 10,000 sockets but no extra processes. The subcommands drive the
//! registry, a no-op service with the same messages, etcd's lease API, or
//! PostgreSQL directly, print one markdown row per result and append it to
//! `--table`. Details of every ladder step go to stderr.

mod client;
mod direct;
mod etcd;
mod histogram;
mod ladder;
mod list;
mod noop;
mod procfs;
mod report;
mod storm;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};

use crate::ladder::{LadderSettings, StepResult};
use crate::report::{mebibytes, millis, Observer, PgObserver, Row};

/// Load generator for the worker registry benchmarks.
#[derive(Debug, Parser)]
#[command(about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Holds N heartbeat streams to a WorkerRegistry service (the registry
    /// or `noop-server`) and raises the rate until p99 or throughput fails.
    Heartbeat(HeartbeatArgs),
    /// Holds N etcd leases on LeaseKeepAlive streams and raises the rate the same way.
    Etcd(HeartbeatArgs),
    /// Serves a WorkerRegistry service that responds at once, to measure the transport.
    NoopServer {
        /// Address to listen on; port 0 picks a free port.
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
    },
    /// Registers N agents at once with bounded concurrency.
    Storm(StormArgs),
    /// Pages through List results with concurrent clients.
    List(ListArgs),
    /// Updates each worker's row directly in PostgreSQL, one UPDATE per heartbeat.
    Direct(DirectArgs),
}

/// Options every measuring subcommand shares.
#[derive(Debug, Args)]
struct Common {
    /// Scenario name for the table row.
    #[arg(long)]
    scenario: String,
    /// Backend name for the table row, such as sqlite, postgres, noop or etcd.
    #[arg(long)]
    backend: String,
    /// PID of the server process whose CPU time and memory are reported.
    #[arg(long)]
    server_pid: Option<u32>,
    /// PostgreSQL URL of a database other than the benchmark's, used to
    /// read pg_stat_database and pg_stat_activity.
    #[arg(long, requires = "pg_database")]
    pg_observe_url: Option<String>,
    /// Name of the benchmark database whose commits and backends are observed.
    #[arg(long, requires = "pg_observe_url")]
    pg_database: Option<String>,
    /// Markdown file the result row is appended to.
    #[arg(long)]
    table: Option<PathBuf>,
}

impl Common {
    async fn observer(&self) -> anyhow::Result<Observer> {
        let postgres = match (&self.pg_observe_url, &self.pg_database) {
            (Some(url), Some(database)) => Some(PgObserver::connect(url, database).await?),
            _ => None,
        };
        Ok(Observer {
            server_pid: self.server_pid,
            postgres,
        })
    }
}

#[derive(Debug, Args)]
struct HeartbeatArgs {
    /// Service URL, such as http://127.0.0.1:50051.
    #[arg(long)]
    target: String,
    /// Number of simulated agents, each with its own connection and stream.
    #[arg(long)]
    agents: usize,
    /// Connections opened at the same time during set-up.
    #[arg(long, default_value_t = 200)]
    connect_concurrency: usize,
    /// Prefix of worker names, so runs against one database do not collide.
    #[arg(long, default_value = "bench")]
    prefix: String,
    /// Aggregate heartbeat rate of the first step, per second; default one
    /// per agent per second, at most 2000.
    #[arg(long)]
    start_rate: Option<f64>,
    /// Factor from one step's rate to the next.
    #[arg(long, default_value_t = 1.5)]
    factor: f64,
    /// Maximum number of steps.
    #[arg(long, default_value_t = 10)]
    max_steps: usize,
    /// Time after each rate change before measuring, such as 2s.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    settle: Duration,
    /// Measured time of each step, such as 8s.
    #[arg(long, default_value = "8s", value_parser = humantime::parse_duration)]
    step: Duration,
    /// Highest p99 latency for a step to pass, such as 50ms.
    #[arg(long, default_value = "50ms", value_parser = humantime::parse_duration)]
    p99_limit: Duration,
    #[command(flatten)]
    common: Common,
}

#[derive(Debug, Args)]
struct StormArgs {
    /// Registry URL, such as http://127.0.0.1:50051.
    #[arg(long)]
    target: String,
    /// Number of agents that register.
    #[arg(long)]
    agents: usize,
    /// Connections the registrations share.
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Register calls in flight at most.
    #[arg(long, default_value_t = 256)]
    concurrency: usize,
    /// Prefix of worker names.
    #[arg(long, default_value = "storm")]
    prefix: String,
    #[command(flatten)]
    common: Common,
}

#[derive(Debug, Args)]
struct ListArgs {
    /// Registry URL, such as http://127.0.0.1:50051.
    #[arg(long)]
    target: String,
    /// Concurrent clients, each with its own connection.
    #[arg(long, default_value_t = 8)]
    clients: usize,
    /// Workers per page.
    #[arg(long)]
    page_size: i32,
    /// Only workers whose last heartbeat is at most this old, such as 60s.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    max_heartbeat_age: Duration,
    /// Length of the run, such as 10s.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Number of workers in the database, for the table row.
    #[arg(long)]
    workers: usize,
    #[command(flatten)]
    common: Common,
}

#[derive(Debug, Args)]
struct DirectArgs {
    /// URL of the benchmark database, migrated by `registry-server migrate`.
    #[arg(long)]
    database_url: String,
    /// Number of workers, one row each.
    #[arg(long)]
    agents: usize,
    /// Updates per second, one per heartbeat.
    #[arg(long)]
    rate: f64,
    /// Length of the run, such as 10s.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Pooled connections.
    #[arg(long, default_value_t = 10)]
    pool: u32,
    #[command(flatten)]
    common: Common,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Heartbeat(args) => heartbeat(args, Target::Registry).await,
        Command::Etcd(args) => heartbeat(args, Target::Etcd).await,
        Command::NoopServer { listen } => noop::serve(listen).await,
        Command::Storm(args) => run_storm(args).await,
        Command::List(args) => run_list(args).await,
        Command::Direct(args) => run_direct(args).await,
    }
}

enum Target {
    Registry,
    Etcd,
}

/// Lease TTL granted by etcd, as long as the registry's default (3 x 30 s).
const ETCD_LEASE_TTL: Duration = Duration::from_secs(90);

/// First ladder step: one heartbeat per agent per second, at most 2000/s,
/// so a large fleet starts below the rate where it may already fail.
fn default_start_rate(agents: usize) -> f64 {
    agents.min(2000) as f64
}

async fn heartbeat(args: HeartbeatArgs, target: Target) -> anyhow::Result<()> {
    let observer = args.common.observer().await?;
    let idle_kib = observer.server_rss_kib();

    let opening = Instant::now();
    let settings = LadderSettings {
        start_rate: args.start_rate.unwrap_or(default_start_rate(args.agents)),
        factor: args.factor,
        max_steps: args.max_steps,
        settle: args.settle,
        step: args.step,
        p99_limit: args.p99_limit,
    };
    let (results, first_error, connected_kib) = match target {
        Target::Registry => {
            let agents = ladder::open_agents(args.agents, args.connect_concurrency, |index| {
                client::open_agent(&args.target, &args.prefix, index)
            })
            .await?;
            eprintln!(
                "opened {} agents in {:.1} s",
                agents.len(),
                opening.elapsed().as_secs_f64()
            );
            let connected_kib = observer.server_rss_kib();
            let (results, first_error) = ladder::run(agents, |_| true, &settings, &observer).await?;
            (results, first_error, connected_kib)
        }
        Target::Etcd => {
            let agents = ladder::open_agents(args.agents, args.connect_concurrency, |index| {
                let target = args.target.clone();
                async move {
                    let channel = client::connect(&target).await?;
                    etcd::open_lease(channel, ETCD_LEASE_TTL)
                        .await
                        .map_err(|e| anyhow::anyhow!("lease of agent {index}: {e}"))
                }
            })
            .await?;
            eprintln!(
                "opened {} leases in {:.1} s",
                agents.len(),
                opening.elapsed().as_secs_f64()
            );
            let connected_kib = observer.server_rss_kib();
            let (results, first_error) = ladder::run(agents, etcd::keepalive_accepted, &settings, &observer).await?;
            (results, first_error, connected_kib)
        }
    };
    let setup_seconds = opening.elapsed().as_secs_f64();

    let row = heartbeat_row(
        &args,
        &observer,
        &results,
        first_error,
        idle_kib,
        connected_kib,
        setup_seconds,
    );
    report::emit(args.common.table.as_deref(), &row)
}

fn heartbeat_row(
    args: &HeartbeatArgs,
    observer: &Observer,
    results: &[StepResult],
    first_error: Option<String>,
    idle_kib: Option<u64>,
    connected_kib: Option<u64>,
    setup_seconds: f64,
) -> Row {
    let best = ladder::best(results);
    let failed = results.iter().find(|result| !result.passed);

    let mut notes = Vec::new();
    if let (Some(idle), Some(connected)) = (idle_kib, connected_kib) {
        let per_agent = connected.saturating_sub(idle) as f64 / args.agents as f64;
        notes.push(format!("{per_agent:.1} KiB RSS per connected agent"));
    }
    if let Some(step) = best {
        if let Some(server_cpu) = step.window.server_cpu {
            notes.push(format!(
                "server {:.0} CPU µs per ack",
                server_cpu * 1e6 / (step.acks_per_second * step.window.seconds)
            ));
        }
        notes.push(format!(
            "generator {:.2} CPU s/s",
            step.generator_cpu / step.window.seconds
        ));
        if let Some(backend_cpu) = step.window.backend_cpu {
            notes.push(format!(
                "PostgreSQL backends {:.3} CPU s/s",
                backend_cpu / step.window.seconds
            ));
        }
    }
    match failed {
        Some(step) => notes.push(format!(
            "next step {:.0}/s failed: {:.0}/s acknowledged, p99 {} ms, {} errors, {} skipped",
            step.offered,
            step.acks_per_second,
            millis(step.latency.p99_ms),
            step.errors,
            step.skipped
        )),
        None => notes.push("ladder ended without a failed step: rate is a lower bound".into()),
    }
    if let Some(error) = first_error {
        notes.push(format!("first error: {error}"));
    }
    let retries = client::REGISTER_RETRIES.load(std::sync::atomic::Ordering::Relaxed);
    if retries > 0 {
        notes.push(format!(
            "{retries} Register calls retried after UNAVAILABLE during set-up"
        ));
    }
    notes.push(format!("run {setup_seconds:.0} s"));

    let peak = observer.server_peak_kib();
    let mut row = Row {
        scenario: args.common.scenario.clone(),
        backend: args.common.backend.clone(),
        agents: args.agents.to_string(),
        server_rss: peak.map(mebibytes).unwrap_or_else(|| "-".into()),
        notes: notes.join("; "),
        ..Row::default()
    };
    match best {
        Some(step) => {
            row.rate = format!("{:.0}/s", step.acks_per_second);
            row.p50 = millis(step.latency.p50_ms);
            row.p99 = millis(step.latency.p99_ms);
            row.server_cpu = step.window.server_cpu_text();
            row.database = step.window.commits_text(1);
        }
        None => {
            row.rate = format!(
                "none passed (first step {:.0}/s)",
                args.start_rate.unwrap_or(default_start_rate(args.agents))
            );
            row.p50 = "-".into();
            row.p99 = "-".into();
            row.server_cpu = "-".into();
            row.database = "-".into();
        }
    }
    row
}

async fn run_storm(args: StormArgs) -> anyhow::Result<()> {
    let observer = args.common.observer().await?;
    let result = storm::run(
        &args.target,
        &args.prefix,
        args.agents,
        args.connections,
        args.concurrency,
        &observer,
    )
    .await?;

    let errors: usize = result.errors.values().sum();
    let mut notes = vec![
        format!(
            "all {} held a lease after {:.2} s",
            result.registered, result.elapsed_seconds
        ),
        format!("{} connections, {} in flight", args.connections, args.concurrency),
    ];
    if errors > 0 {
        notes[0] = format!(
            "{} of {} registered in {:.2} s",
            result.registered, args.agents, result.elapsed_seconds
        );
        notes.push(format!("errors: {:?}", result.errors));
    }
    if let Some(error) = result.first_error {
        notes.push(format!("first error: {error}"));
    }
    if let Some(backend_cpu) = result.window.backend_cpu {
        notes.push(format!(
            "PostgreSQL backends {:.2} CPU s/s",
            backend_cpu / result.window.seconds
        ));
    }

    let row = Row {
        scenario: args.common.scenario.clone(),
        backend: args.common.backend.clone(),
        agents: args.agents.to_string(),
        rate: format!("{:.0}/s", result.registered as f64 / result.elapsed_seconds),
        p50: millis(result.latency.p50_ms),
        p99: millis(result.latency.p99_ms),
        server_cpu: result.window.server_cpu_text(),
        server_rss: observer.server_peak_kib().map(mebibytes).unwrap_or_else(|| "-".into()),
        database: result.window.commits_text(0),
        notes: format!("{}; errors {errors}", notes.join("; ")),
    };
    report::emit(args.common.table.as_deref(), &row)
}

async fn run_list(args: ListArgs) -> anyhow::Result<()> {
    let observer = args.common.observer().await?;
    let request = list::scheduler_filter(args.page_size, args.max_heartbeat_age);
    let result = list::run(&args.target, args.clients, request, args.duration, &observer).await?;

    let calls_per_second = result.calls as f64 / result.window.seconds;
    let mut notes = vec![
        format!("page size {}, {} clients", args.page_size, args.clients),
        format!(
            "{:.0} workers per page on average",
            result.workers as f64 / result.calls.max(1) as f64
        ),
        format!("{} workers in the table", args.workers),
    ];
    if let Some(backend_cpu) = result.window.backend_cpu {
        notes.push(format!(
            "PostgreSQL backends {:.2} CPU s/s",
            backend_cpu / result.window.seconds
        ));
    }

    let row = Row {
        scenario: args.common.scenario.clone(),
        backend: args.common.backend.clone(),
        agents: args.workers.to_string(),
        rate: format!("{calls_per_second:.0} calls/s"),
        p50: millis(result.latency.p50_ms),
        p99: millis(result.latency.p99_ms),
        server_cpu: result.window.server_cpu_text(),
        server_rss: observer.server_peak_kib().map(mebibytes).unwrap_or_else(|| "-".into()),
        database: result.window.commits_text(0),
        notes: notes.join("; "),
    };
    report::emit(args.common.table.as_deref(), &row)
}

async fn run_direct(args: DirectArgs) -> anyhow::Result<()> {
    let observer = args.common.observer().await?;
    let result = direct::run(
        &args.database_url,
        args.agents,
        args.rate,
        args.duration,
        args.pool,
        &observer,
    )
    .await?;

    let mut notes = vec![
        format!("offered {:.0}/s through {} pooled connections", args.rate, args.pool),
        format!("errors {}, skipped {}", result.errors, result.skipped),
    ];
    if result.updates_per_second < 0.95 * args.rate {
        notes.push("did not keep up with the offered rate".into());
    }

    let row = Row {
        scenario: args.common.scenario.clone(),
        backend: args.common.backend.clone(),
        agents: args.agents.to_string(),
        rate: format!("{:.0}/s", result.updates_per_second),
        p50: millis(result.latency.p50_ms),
        p99: millis(result.latency.p99_ms),
        server_cpu: result
            .window
            .backend_cpu
            .map(|cpu| format!("{:.2} (PostgreSQL backends)", cpu / result.window.seconds))
            .unwrap_or_else(|| "-".into()),
        server_rss: "-".into(),
        database: result.window.commits_text(0),
        notes: notes.join("; "),
    };
    report::emit(args.common.table.as_deref(), &row)
}
