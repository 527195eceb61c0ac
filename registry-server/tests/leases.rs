//! Lease manager behaviour on a real SQLite file: flush before sweep, grace
//! after a restart, the mass-expiry guard and the heartbeat write budget.

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use registry_server::clock::Clock;
use registry_server::config::{Flags, Settings};
use registry_server::lease::{hash_token, LeaseSettings, Leases};
use registry_server::server::Server;
use registry_server::service::{GrantPolicy, RegistryService};
use registry_server::store::sqlite::SqliteStore;
use registry_server::store::{PoolOptions, Store};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::Request;
use worker_registry::domain::Status;
use worker_registry::proto::{self, worker_registry_server::WorkerRegistry};

/// Interval granted to every test worker; the lease TTL is three of them.
const INTERVAL: Duration = Duration::from_millis(200);

fn lease_settings(guard: bool) -> LeaseSettings {
    LeaseSettings {
        sweep_interval: Duration::from_millis(200),
        flush_interval: Duration::from_millis(100),
        mass_expiry_guard: guard,
        mass_expiry_threshold: 0.5,
        mass_expiry_min_live: 20,
        mass_expiry_rate: 0.1,
    }
}

fn policy() -> GrantPolicy {
    GrantPolicy {
        default_interval: INTERVAL,
        min_interval: Duration::from_millis(100),
        max_interval: Duration::from_secs(300),
        missed_heartbeats: 3,
    }
}

async fn open_store(dir: &std::path::Path) -> Arc<dyn Store> {
    let store = SqliteStore::open(&common::sqlite_url(dir), &PoolOptions::default())
        .await
        .unwrap();
    store.migrate().await.unwrap();
    Arc::new(store)
}

/// A registered worker: id and session token.
struct Session {
    id: i64,
    token: String,
}

async fn register(service: &RegistryService, name: &str) -> Session {
    let response = service
        .register(Request::new(common::register_request(name, name)))
        .await
        .unwrap()
        .into_inner();
    Session {
        id: response.worker.unwrap().id,
        token: response.session_token,
    }
}

async fn status_of(store: &Arc<dyn Store>, id: i64) -> Status {
    store.get_by_id(id).await.unwrap().unwrap().status
}

/// A heartbeat buffered in memory is written before the sweep decides, so
/// a lease that lapsed in the database but was renewed in memory survives.
#[tokio::test]
async fn flush_runs_before_sweep() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path()).await;
    let leases = Leases::new(Arc::clone(&store), Clock::new(), lease_settings(true));
    let service = RegistryService::new(Arc::clone(&leases), policy(), CancellationToken::new());
    let worker = register(&service, "buffered").await;

    tokio::time::sleep(Duration::from_millis(500)).await;
    leases
        .heartbeat(worker.id, hash_token(&worker.token), None)
        .await
        .unwrap();
    // The registration's lease (600 ms) has now lapsed in the database; only the buffer has the newer deadline.
    tokio::time::sleep(Duration::from_millis(200)).await;

    let expired = leases.sweep().await.unwrap();

    assert_eq!(expired, 0);
    assert_eq!(status_of(&store, worker.id).await, Status::Active);
}

/// After a restart, workers get their own TTL of grace: none expires at
/// once, a worker that heartbeats again keeps its lease, and a silent one
/// expires after the grace.
#[tokio::test]
async fn restart_grace_period() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path()).await;
    let first = Leases::new(Arc::clone(&store), Clock::new(), lease_settings(false));
    let service = RegistryService::new(Arc::clone(&first), policy(), CancellationToken::new());
    let returning = register(&service, "returning").await;
    let silent = register(&service, "silent").await;
    drop(service);
    drop(first);

    // The registry is down for three lease TTLs.
    tokio::time::sleep(Duration::from_millis(1800)).await;
    let restarted = Leases::new(Arc::clone(&store), Clock::new(), lease_settings(false));

    assert_eq!(restarted.sweep().await.unwrap(), 0, "no expiry right after the restart");
    restarted
        .heartbeat(returning.id, hash_token(&returning.token), None)
        .await
        .expect("a worker back within the grace keeps its lease");

    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(3) && status_of(&store, silent.id).await != Status::Inactive {
        restarted
            .heartbeat(returning.id, hash_token(&returning.token), None)
            .await
            .unwrap();
        restarted.sweep().await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let grace_end = started.elapsed();

    assert_eq!(status_of(&store, silent.id).await, Status::Inactive);
    assert_eq!(status_of(&store, returning.id).await, Status::Active);
    assert!(
        grace_end >= Duration::from_millis(450),
        "silent worker kept its grace, expired after {grace_end:?}"
    );
    println!("silent worker expired {grace_end:?} after the restart (TTL 600 ms)");
}

/// Keeps `sessions` heartbeating every 100 ms until `stop` is cancelled.
fn keep_alive(leases: Arc<Leases>, sessions: Vec<Session>, stop: CancellationToken) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let mut failures = 0;
        while !stop.is_cancelled() {
            for session in &sessions {
                if leases
                    .heartbeat(session.id, hash_token(&session.token), None)
                    .await
                    .is_err()
                {
                    failures += 1;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        failures
    })
}

/// With 80 of 100 workers frozen, the guard expires at most 10% of the
/// fleet per sweep, never a live worker, and all 80 in the end.
#[tokio::test]
async fn guard_bounds_mass_expiry() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path()).await;
    let leases = Leases::new(Arc::clone(&store), Clock::new(), lease_settings(true));
    let service = RegistryService::new(Arc::clone(&leases), policy(), CancellationToken::new());
    let mut sessions = Vec::new();
    for index in 0..100 {
        sessions.push(register(&service, &format!("guarded-{index:03}")).await);
    }
    let frozen: Vec<i64> = sessions[20..].iter().map(|s| s.id).collect();
    let live: Vec<Session> = sessions.drain(..20).collect();
    let live_ids: Vec<i64> = live.iter().map(|s| s.id).collect();
    let stop = CancellationToken::new();
    let keeper = keep_alive(Arc::clone(&leases), live, stop.clone());

    tokio::time::sleep(Duration::from_millis(800)).await;
    let mut per_sweep = Vec::new();
    for _ in 0..40 {
        let expired = leases.sweep().await.unwrap();
        per_sweep.push(expired);
        if per_sweep.iter().sum::<usize>() == frozen.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.cancel();
    let failures = keeper.await.unwrap();

    // While more than half of the live workers are expirable, a sweep
    // expires 10% of the live fleet, rounded up; after that, the rest at once.
    let mut expected = Vec::new();
    let (mut live_count, mut expirable) = (100usize, 80usize);
    while expirable > 0 {
        let n = if expirable * 2 > live_count {
            live_count.div_ceil(10)
        } else {
            expirable
        };
        expected.push(n);
        live_count -= n;
        expirable -= n;
    }
    println!("expired per sweep: {per_sweep:?}, expected {expected:?}");
    assert_eq!(
        per_sweep.iter().sum::<usize>(),
        80,
        "all frozen workers expire in the end"
    );
    assert_eq!(
        per_sweep[0], 10,
        "the first guarded sweep expires 10% of 100 live workers"
    );
    assert_eq!(per_sweep, expected, "each sweep expires at the guarded rate");
    assert!(per_sweep.len() >= 5, "expiry is spread over several sweeps");
    assert_eq!(failures, 0, "live workers' heartbeats never failed");
    for id in live_ids {
        assert_eq!(
            status_of(&store, id).await,
            Status::Active,
            "live worker {id} never expired"
        );
    }
    assert!(leases.metrics().guarded_sweeps.load(Ordering::Relaxed) >= 1);
}

/// With the guard off, one sweep expires every frozen worker.
#[tokio::test]
async fn guard_off_expires_all() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path()).await;
    let leases = Leases::new(Arc::clone(&store), Clock::new(), lease_settings(false));
    let service = RegistryService::new(Arc::clone(&leases), policy(), CancellationToken::new());
    for index in 0..100 {
        register(&service, &format!("unguarded-{index:03}")).await;
    }

    tokio::time::sleep(Duration::from_millis(800)).await;

    assert_eq!(leases.sweep().await.unwrap(), 100);
}

fn load_settings(dir: &std::path::Path) -> Settings {
    let flags = Flags {
        database_url: Some(common::sqlite_url(dir)),
        listen: Some("127.0.0.1:0".parse().unwrap()),
        heartbeat_interval: Some(INTERVAL),
        min_heartbeat_interval: Some(Duration::from_millis(100)),
        sweep_interval: Some(Duration::from_secs(1)),
        flush_interval: Some(Duration::from_secs(1)),
        ..Flags::default()
    };
    Settings::load(&flags).unwrap()
}

/// 100 workers heartbeating every 200 ms for 60 s, with List in a loop and
/// the sweeper running: no client error, no false expiry, and at most two
/// heartbeat statements per flush interval.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeat_writes_are_batched() {
    const WORKERS: usize = 100;
    const RUN: Duration = Duration::from_secs(60);
    let dir = tempfile::tempdir().unwrap();
    let settings = load_settings(dir.path());
    let flush_interval = settings.registry.flush_interval;
    let server = Server::start(settings).await.unwrap();
    let url = format!("http://{}", server.local_addr);
    let channel = tonic::transport::Endpoint::from_shared(url)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let client = proto::worker_registry_client::WorkerRegistryClient::new(channel);

    let mut agents = Vec::new();
    let started = tokio::time::Instant::now();
    for index in 0..WORKERS {
        let mut client = client.clone();
        let name = format!("load-{index:03}");
        let registered = client
            .register(common::register_request(&name, &name))
            .await
            .unwrap()
            .into_inner();
        agents.push(tokio::spawn(async move {
            let id = registered.worker.unwrap().id;
            let (sender, receiver) = tokio::sync::mpsc::channel(1);
            let mut responses = client
                .heartbeat(ReceiverStream::new(receiver))
                .await
                .unwrap()
                .into_inner();
            let mut ticker = tokio::time::interval(INTERVAL);
            let (mut sent, mut errors) = (0u64, 0u64);
            while started.elapsed() < RUN {
                ticker.tick().await;
                let request = proto::HeartbeatRequest {
                    worker_id: id,
                    session_token: registered.session_token.clone(),
                    status: 0,
                };
                sent += 1;
                if sender.send(request).await.is_err() {
                    errors += 1;
                    break;
                }
                match responses.message().await {
                    Ok(Some(_)) => {}
                    _ => {
                        errors += 1;
                        break;
                    }
                }
            }
            (sent, errors)
        }));
    }

    let statements_before = server.leases.metrics().heartbeat_statements.load(Ordering::Relaxed);
    let measured_from = tokio::time::Instant::now();
    let mut lister = client.clone();
    let mut list_calls = 0u64;
    let mut list_errors = 0u64;
    while started.elapsed() < RUN {
        let request = proto::ListRequest {
            statuses: vec![proto::WorkerStatus::Active as i32],
            ..Default::default()
        };
        match lister.list(request).await {
            Ok(_) => list_calls += 1,
            Err(error) => {
                eprintln!("list failed: {error}");
                list_errors += 1;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let measured = measured_from.elapsed();
    let statements = server.leases.metrics().heartbeat_statements.load(Ordering::Relaxed) - statements_before;

    let mut sent_total = 0;
    let mut error_total = 0;
    for agent in agents {
        let (sent, errors) = agent.await.unwrap();
        sent_total += sent;
        error_total += errors;
    }
    let expired = server.leases.metrics().workers_expired.load(Ordering::Relaxed);
    let flushes = measured.as_secs_f64() / flush_interval.as_secs_f64();
    println!(
        "heartbeats sent {sent_total}, client errors {error_total}, list calls {list_calls}, list errors {list_errors}, \
         heartbeat statements {statements} in {measured:?} ({:.2} per flush interval), expired {expired}",
        statements as f64 / flushes
    );

    assert_eq!(error_total, 0, "no heartbeat failed");
    assert_eq!(list_errors, 0, "no List call failed");
    assert_eq!(expired, 0, "no live worker expired");
    assert!(
        statements as f64 <= 2.0 * flushes.ceil(),
        "{statements} heartbeat statements in {measured:?} exceed two per flush interval"
    );
    assert!(
        sent_total >= (WORKERS as u64) * 250,
        "heartbeats kept flowing: {sent_total}"
    );

    server.shutdown().await;
    server.wait().await.unwrap();
}
