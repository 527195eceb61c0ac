//! Registry client side of the benchmarks: connections, the request an agent
//! registers with, and heartbeat streams.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use tonic::Code;
use worker_registry::proto::worker_registry_client::WorkerRegistryClient;
use worker_registry::proto::{self};

use crate::ladder::{AgentStream, MAX_OUTSTANDING};

/// Heartbeat interval the simulated agents request: the registry's default
/// maximum, for a lease TTL of 15 minutes. Agents that register first send
/// nothing more until all N are connected, which can take longer than a
/// 30 s lease on a busy SQLite database. The ladder sends faster than this
/// interval, and the registry accepts early heartbeats.
const REQUESTED_INTERVAL: Duration = Duration::from_secs(300);

/// Opens one HTTP/2 connection to `target`, such as `http://127.0.0.1:50051`.
pub async fn connect(target: &str) -> anyhow::Result<Channel> {
    let endpoint = Endpoint::from_shared(target.to_string())
        .map_err(|e| anyhow::anyhow!("invalid target {target}: {e}"))?
        .connect_timeout(Duration::from_secs(10))
        .tcp_nodelay(true);
    endpoint
        .connect()
        .await
        .map_err(|e| anyhow::anyhow!("failed to connect to {target}: {e}"))
}

/// Builds the Register request of simulated agent `index`: a sensor with
/// shell and python, one label and the agent's own capability keys, about
/// the size of what `sensor-agent` sends.
pub fn register_request(prefix: &str, index: usize) -> proto::RegisterRequest {
    let runtimes = vec![
        proto::Runtime {
            name: "shell".into(),
            version: "5.2.15".into(),
            path: "/usr/bin/bash".into(),
        },
        proto::Runtime {
            name: "python".into(),
            version: "3.11.2".into(),
            path: "/usr/bin/python3".into(),
        },
    ];
    let labels = HashMap::from([("zone".to_string(), format!("zone-{}", index % 4))]);
    let capabilities = prost_types::Struct {
        fields: [
            ("sensor_version", prost_types::value::Kind::StringValue("0.1.0".into())),
            ("max_concurrent_sensors", prost_types::value::Kind::NumberValue(10.0)),
        ]
        .into_iter()
        .map(|(key, kind)| (key.to_string(), prost_types::Value { kind: Some(kind) }))
        .collect(),
    };

    proto::RegisterRequest {
        name: format!("{prefix}-{index}"),
        role: proto::WorkerRole::Sensor as i32,
        host: format!("host-{index}"),
        runtimes,
        labels,
        capabilities: Some(capabilities),
        instance_id: format!("{prefix}-instance-{index}"),
        heartbeat_interval: Some(prost_types::Duration {
            seconds: REQUESTED_INTERVAL.as_secs() as i64,
            nanos: 0,
        }),
    }
}

/// Register calls retried after UNAVAILABLE, over all agents of this process.
pub static REGISTER_RETRIES: AtomicU64 = AtomicU64::new(0);

/// Retries after UNAVAILABLE at most this often per agent, as an agent
/// would with backoff, before the run fails.
const MAX_REGISTER_ATTEMPTS: u32 = 8;

/// Registers agent `index`, retrying UNAVAILABLE with exponential backoff
/// from 100 ms, as `sensor-agent` does when the database is busy.
async fn register_with_retry(
    client: &mut WorkerRegistryClient<Channel>,
    prefix: &str,
    index: usize,
) -> anyhow::Result<proto::RegisterResponse> {
    let mut delay = Duration::from_millis(100);
    for attempt in 1..=MAX_REGISTER_ATTEMPTS {
        match client.register(register_request(prefix, index)).await {
            Ok(response) => return Ok(response.into_inner()),
            Err(status) if status.code() == Code::Unavailable && attempt < MAX_REGISTER_ATTEMPTS => {
                REGISTER_RETRIES.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
            Err(status) => {
                anyhow::bail!("Register of agent {index} failed after {attempt} attempts: {status}")
            }
        }
    }
    unreachable!("the last attempt returns or fails")
}

/// Connects agent `index`, registers it and opens its heartbeat stream.
pub async fn open_agent(
    target: &str,
    prefix: &str,
    index: usize,
) -> anyhow::Result<AgentStream<proto::HeartbeatRequest, proto::HeartbeatResponse>> {
    let channel = connect(target).await?;
    let mut client = WorkerRegistryClient::new(channel);

    let registered = register_with_retry(&mut client, prefix, index).await?;
    let worker_id = registered.worker.map(|worker| worker.id).unwrap_or_default();
    let request = proto::HeartbeatRequest {
        worker_id,
        session_token: registered.session_token,
        status: proto::WorkerStatus::Unspecified as i32,
    };

    let (sender, receiver) = mpsc::channel(MAX_OUTSTANDING);
    sender.try_send(request.clone()).expect("a new channel has room");
    let first_sent = Instant::now();
    let responses = client
        .heartbeat(ReceiverStream::new(receiver))
        .await
        .map_err(|e| anyhow::anyhow!("Heartbeat of agent {index} failed: {e}"))?
        .into_inner();

    Ok(AgentStream {
        sender,
        responses,
        request,
        first_sent,
    })
}
