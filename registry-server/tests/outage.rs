//! A `registry-server` process whose PostgreSQL connection runs through a
//! loopback proxy that the test cuts for 20 seconds.
//!
//! Needs `REGISTRY_TEST_POSTGRES_URL`; without it the test prints a skip
//! message, and with it an unreachable server fails it.

mod common;
mod support;

use std::time::{Duration, Instant};

use common::{register_request, server_command, ServerProcess};
use support::proxy::{Mode, Proxy};
use support::{postgres_admin_url, TestDatabase};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use worker_registry::proto::{self, get_request::Key};

/// Length of the simulated outage.
const OUTAGE: Duration = Duration::from_secs(20);
/// Maximum time an RPC may take to fail during the outage: the 1 s connect
/// timeout plus the 1 s statement timeout plus one second of slack.
const FAIL_WITHIN: Duration = Duration::from_secs(3);

async fn health_status(server: &ServerProcess) -> Option<i32> {
    let channel = tonic::transport::Endpoint::from_shared(server.url())
        .ok()?
        .connect()
        .await
        .ok()?;
    let mut health = HealthClient::new(channel);
    let request = HealthCheckRequest { service: String::new() };
    Some(health.check(request).await.ok()?.into_inner().status)
}

/// During a 20 s database outage, RPCs fail with UNAVAILABLE within the
/// timeout and health reports NOT_SERVING; afterwards the same process
/// serves again and no worker expired because of the outage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_outage_is_survived() {
    let Some(admin) = postgres_admin_url("database_outage_is_survived") else {
        return;
    };
    let database = TestDatabase::create(&admin).await;
    let mut upstream = url::Url::parse(&database.url).unwrap();
    let host = upstream.host_str().unwrap().to_string();
    let port = upstream.port().unwrap_or(5432);
    let upstream_addr = tokio::net::lookup_host((host.as_str(), port))
        .await
        .unwrap()
        .find(|address| address.ip().is_loopback())
        .expect("the test PostgreSQL server is on loopback");
    let proxy = Proxy::start(upstream_addr).await;
    upstream.set_host(Some("127.0.0.1")).unwrap();
    upstream.set_port(Some(proxy.address.port())).unwrap();
    let proxied_url = upstream.to_string();

    let mut command = server_command(
        &proxied_url,
        &[
            "--min-heartbeat-interval",
            "100ms",
            "--heartbeat-interval",
            "1s",
            "--sweep-interval",
            "500ms",
            "--flush-interval",
            "200ms",
        ],
    );
    command
        .env("ATTUNE__DATABASE__CONNECT_TIMEOUT", "1s")
        .env("ATTUNE__DATABASE__STATEMENT_TIMEOUT", "1s");
    let server = ServerProcess::spawn(command, &proxied_url);
    let mut client = server.client().await;

    // Five workers keep heartbeating every second, through the outage too.
    let mut keepers = Vec::new();
    let mut ids = Vec::new();
    for index in 0..5 {
        let name = format!("survivor-{index}");
        let registered = client
            .register(register_request(&name, &name))
            .await
            .unwrap()
            .into_inner();
        let id = registered.worker.unwrap().id;
        ids.push(id);
        let mut stream_client = client.clone();
        keepers.push(tokio::spawn(async move {
            let (sender, receiver) = tokio::sync::mpsc::channel(1);
            let mut responses = stream_client
                .heartbeat(ReceiverStream::new(receiver))
                .await
                .unwrap()
                .into_inner();
            let started = Instant::now();
            let mut failures = Vec::new();
            while started.elapsed() < OUTAGE + Duration::from_secs(8) {
                let request = proto::HeartbeatRequest {
                    worker_id: id,
                    session_token: registered.session_token.clone(),
                    status: 0,
                };
                if sender.send(request).await.is_err() {
                    failures.push("stream closed".to_string());
                    break;
                }
                match responses.message().await {
                    Ok(Some(_)) => {}
                    Ok(None) => {
                        failures.push("stream ended".to_string());
                        break;
                    }
                    Err(status) => {
                        failures.push(format!("{:?}: {}", status.code(), status.message()));
                        break;
                    }
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            failures
        }));
    }
    assert_eq!(health_status(&server).await, Some(ServingStatus::Serving as i32));

    proxy.set_mode(Mode::Blackhole);
    let outage_started = Instant::now();
    let mut saw_not_serving = false;
    let mut attempt = 0;
    while outage_started.elapsed() < OUTAGE {
        attempt += 1;
        let name = format!("during-outage-{attempt}");

        let started = Instant::now();
        let register = client.register(register_request(&name, &name)).await;
        let took = started.elapsed();
        let status = register.expect_err("Register fails while the database is unreachable");
        assert_eq!(status.code(), Code::Unavailable, "Register: {}", status.message());
        assert!(took <= FAIL_WITHIN, "Register failed after {took:?}");

        let started = Instant::now();
        let list = client.list(proto::ListRequest::default()).await;
        let took = started.elapsed();
        assert_eq!(list.expect_err("List fails").code(), Code::Unavailable);
        assert!(took <= FAIL_WITHIN, "List failed after {took:?}");

        let started = Instant::now();
        let get = client
            .get(proto::GetRequest {
                key: Some(Key::Id(ids[0])),
            })
            .await;
        let took = started.elapsed();
        assert_eq!(get.expect_err("Get fails").code(), Code::Unavailable);
        assert!(took <= FAIL_WITHIN, "Get failed after {took:?}");

        if health_status(&server).await == Some(ServingStatus::NotServing as i32) {
            saw_not_serving = true;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(saw_not_serving, "health reported NOT_SERVING during the outage");
    println!(
        "outage of {:?} with {attempt} rounds of failing RPCs",
        outage_started.elapsed()
    );

    proxy.set_mode(Mode::Forward);
    let restored = Instant::now();
    let mut registered_after = false;
    while restored.elapsed() < Duration::from_secs(15) {
        if client.register(register_request("after-outage", "after")).await.is_ok() {
            registered_after = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(registered_after, "the same process serves again after the outage");
    println!(
        "registry served again {} ms after the database came back",
        restored.elapsed().as_millis()
    );
    let serving = common::wait_until(Duration::from_secs(5), || async {
        health_status(&server).await == Some(ServingStatus::Serving as i32)
    })
    .await;
    assert!(serving, "health is SERVING again");

    for keeper in keepers {
        let failures = keeper.await.unwrap();
        assert!(
            failures.is_empty(),
            "heartbeats on open streams kept working: {failures:?}"
        );
    }
    for id in ids {
        let worker = client
            .get(proto::GetRequest { key: Some(Key::Id(id)) })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            worker.worker.unwrap().status,
            proto::WorkerStatus::Active as i32,
            "worker {id} survived"
        );
    }
    // "after-outage" sends no heartbeat and may expire; the survivors must not.
    let expired: Vec<_> = server
        .logs_with_message("worker expired")
        .into_iter()
        .filter(|entry| {
            entry["fields"]["name"]
                .as_str()
                .is_some_and(|name| name.starts_with("survivor-"))
        })
        .collect();
    assert!(
        expired.is_empty(),
        "no worker expired because of the outage: {expired:?}"
    );
    let internal = server
        .logs_with_message("database error")
        .into_iter()
        .filter(|entry| entry["level"] == "ERROR")
        .count();
    assert_eq!(internal, 0, "no INTERNAL error during the outage");
}
