//! Two `registry-server` processes sharing one PostgreSQL database, and the
//! platform's SQL queries against a registry populated through gRPC.
//!
//! These tests need `REGISTRY_TEST_POSTGRES_URL`; without it they print a
//! skip message, and with it an unreachable server fails them.

mod common;
mod support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::{register_request, ServerProcess};
use sqlx::Row;
use support::{postgres_admin_url, TestDatabase};
use tokio_stream::wrappers::ReceiverStream;
use worker_registry::proto::{self, get_request::Key};

/// Flags for short leases: 200 ms interval, 600 ms TTL, frequent sweeps.
const FAST_SERVER: [&str; 10] = [
    "--min-heartbeat-interval",
    "100ms",
    "--heartbeat-interval",
    "200ms",
    "--sweep-interval",
    "200ms",
    "--flush-interval",
    "100ms",
    "--index-refresh-interval",
    "200ms",
];

/// Maximum wait for a change made through one replica to show in the
/// other's List: one refresh interval plus room for a slow machine.
const LIST_VISIBLE_WITHIN: Duration = Duration::from_secs(2);

/// A worker registered through one replica is listed by the other, and
/// heartbeats sent to the second keep alive the lease the first granted.
#[tokio::test]
async fn replicas_share_workers_and_leases() {
    let Some(admin) = postgres_admin_url("replicas_share_workers_and_leases") else {
        return;
    };
    let database = TestDatabase::create(&admin).await;
    let first = ServerProcess::start(&database.url, &FAST_SERVER);
    let second = ServerProcess::start(&database.url, &FAST_SERVER);
    let mut client_a = first.client().await;
    let mut client_b = second.client().await;

    let registered = client_a
        .register(register_request("replicated", "inst-r"))
        .await
        .unwrap()
        .into_inner();
    let id = registered.worker.unwrap().id;

    // B serves List from its worker index, which reads A's writes at its next refresh.
    let registered_at = Instant::now();
    let listed = loop {
        let listed = client_b.list(proto::ListRequest::default()).await.unwrap().into_inner();
        if !listed.workers.is_empty() || registered_at.elapsed() > LIST_VISIBLE_WITHIN {
            break listed;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(
        listed.workers.len(),
        1,
        "B did not list A's worker within {LIST_VISIBLE_WITHIN:?}"
    );
    assert_eq!(listed.workers[0].id, id);
    println!("A's registration listed by B after {:?}", registered_at.elapsed());

    // Heartbeat through B for five TTLs; A must keep seeing a live worker.
    let (sender, receiver) = tokio::sync::mpsc::channel(1);
    let mut responses = client_b
        .heartbeat(ReceiverStream::new(receiver))
        .await
        .unwrap()
        .into_inner();
    for _ in 0..15 {
        let request = proto::HeartbeatRequest {
            worker_id: id,
            session_token: registered.session_token.clone(),
            status: 0,
        };
        sender.send(request).await.unwrap();
        responses
            .message()
            .await
            .expect("heartbeat accepted by B")
            .expect("stream open");
        tokio::time::sleep(Duration::from_millis(200)).await;

        let seen_by_a = client_a
            .get(proto::GetRequest { key: Some(Key::Id(id)) })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            seen_by_a.worker.unwrap().status,
            proto::WorkerStatus::Active as i32,
            "A sees a live lease"
        );
    }

    assert!(first.expired_names().is_empty(), "A expired nothing");
    assert!(second.expired_names().is_empty(), "B expired nothing");
}

/// Sweepers in both replicas expire each stale worker exactly once and
/// never a worker that keeps heartbeating.
#[tokio::test]
async fn replicas_expire_each_worker_once() {
    let Some(admin) = postgres_admin_url("replicas_expire_each_worker_once") else {
        return;
    };
    let database = TestDatabase::create(&admin).await;
    // The guard is off so that expiry of most of the fleet happens at once.
    let mut command_a = common::server_command(&database.url, &FAST_SERVER);
    command_a.env("ATTUNE__REGISTRY__MASS_EXPIRY_GUARD", "false");
    let mut command_b = common::server_command(&database.url, &FAST_SERVER);
    command_b.env("ATTUNE__REGISTRY__MASS_EXPIRY_GUARD", "false");
    let first = ServerProcess::spawn(command_a, &database.url);
    let second = ServerProcess::spawn(command_b, &database.url);
    let mut client_a = first.client().await;
    let mut client_b = second.client().await;

    let mut stale = Vec::new();
    for index in 0..40 {
        let name = format!("stale-{index:02}");
        let client = if index % 2 == 0 { &mut client_a } else { &mut client_b };
        client.register(register_request(&name, &name)).await.unwrap();
        stale.push(name);
    }
    let live = client_b
        .register(register_request("live", "inst-live"))
        .await
        .unwrap()
        .into_inner();
    let live_id = live.worker.unwrap().id;

    let (sender, receiver) = tokio::sync::mpsc::channel(1);
    let mut responses = client_a
        .heartbeat(ReceiverStream::new(receiver))
        .await
        .unwrap()
        .into_inner();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(4);
    while tokio::time::Instant::now() < deadline {
        let request = proto::HeartbeatRequest {
            worker_id: live_id,
            session_token: live.session_token.clone(),
            status: 0,
        };
        sender.send(request).await.unwrap();
        responses
            .message()
            .await
            .expect("live heartbeat accepted")
            .expect("stream open");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let mut counts: HashMap<String, usize> = HashMap::new();
    for name in first.expired_names().into_iter().chain(second.expired_names()) {
        *counts.entry(name).or_default() += 1;
    }
    println!(
        "replica A expired {}, replica B expired {}",
        first.expired_names().len(),
        second.expired_names().len()
    );
    for name in &stale {
        assert_eq!(
            counts.get(name),
            Some(&1),
            "{name} expired exactly once across both replicas"
        );
    }
    assert_eq!(counts.get("live"), None, "the live worker was never expired");
    assert_eq!(counts.len(), stale.len(), "nothing else expired");

    let live_now = client_b
        .get(proto::GetRequest {
            key: Some(Key::Id(live_id)),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(live_now.worker.unwrap().status, proto::WorkerStatus::Active as i32);
}

/// The platform's four SQL queries run unchanged against a registry
/// populated through gRPC and return the registered workers.
#[tokio::test]
async fn platform_queries_after_grpc() {
    let Some(admin) = postgres_admin_url("platform_queries_after_grpc") else {
        return;
    };
    let database = TestDatabase::create(&admin).await;
    let server = ServerProcess::start(&database.url, &[]);
    let mut client = server.client().await;

    let runtime = |name: &str| proto::Runtime {
        name: name.to_string(),
        version: "1.0".into(),
        path: format!("/usr/bin/{name}"),
    };
    let workers = [
        (
            "sensor-py",
            proto::WorkerRole::Sensor,
            vec![runtime("python3"), runtime("bash")],
        ),
        (
            "sensor-node",
            proto::WorkerRole::Sensor,
            vec![runtime("node"), runtime("bash")],
        ),
        (
            "sensor-both",
            proto::WorkerRole::Sensor,
            vec![runtime("python"), runtime("nodejs")],
        ),
        ("action-py", proto::WorkerRole::Action, vec![runtime("python3")]),
        ("sensor-gone", proto::WorkerRole::Sensor, vec![runtime("python3")]),
    ];
    for (name, role, runtimes) in workers {
        let mut request = register_request(name, name);
        request.role = role as i32;
        request.runtimes = runtimes;
        let registered = client.register(request).await.unwrap().into_inner();
        if name == "sensor-gone" {
            client
                .deregister(proto::DeregisterRequest {
                    worker_id: registered.worker.unwrap().id,
                    session_token: registered.session_token,
                })
                .await
                .unwrap();
        }
    }

    let pool = sqlx::PgPool::connect(&database.url).await.unwrap();

    let labels: Vec<String> =
        sqlx::query_scalar("SELECT enumlabel FROM pg_enum WHERE enumtypid = 'worker_role_enum'::regtype")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(labels, ["action", "sensor", "hybrid"]);

    let sensors =
        sqlx::query("SELECT id, name, worker_role, status, capabilities FROM worker WHERE worker_role = 'sensor'")
            .fetch_all(&pool)
            .await
            .unwrap();
    let mut sensor_names: Vec<String> = sensors.iter().map(|row| row.get::<String, _>("name")).collect();
    sensor_names.sort();
    assert_eq!(sensor_names, ["sensor-both", "sensor-gone", "sensor-node", "sensor-py"]);

    let python = sqlx::query(
        "SELECT name, capabilities->'runtimes' FROM worker
 WHERE worker_role = 'sensor' AND capabilities->'runtimes' ? 'python'",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let mut python_names: Vec<String> = python.iter().map(|row| row.get::<String, _>(0)).collect();
    python_names.sort();
    assert_eq!(
        python_names,
        ["sensor-both", "sensor-gone", "sensor-py"],
        "exactly the sensors that reported python"
    );
    for row in &python {
        let runtimes: serde_json::Value = row.get(1);
        assert!(runtimes.as_array().unwrap().contains(&serde_json::json!("python")));
    }

    let lag = sqlx::query(
        "SELECT name, last_heartbeat, NOW() - last_heartbeat AS lag
  FROM worker WHERE worker_role = 'sensor' AND status = 'active'",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let mut active_names: Vec<String> = lag.iter().map(|row| row.get::<String, _>("name")).collect();
    active_names.sort();
    assert_eq!(active_names, ["sensor-both", "sensor-node", "sensor-py"]);
    for row in &lag {
        let lag: sqlx::postgres::types::PgInterval = row.get("lag");
        assert!(
            lag.microseconds.abs() < 60_000_000,
            "lag of a fresh worker is under a minute"
        );
    }
    pool.close().await;
}
