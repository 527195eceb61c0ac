//! A `WorkerRegistry` service that does no work: Register returns a made-up
//! session and Heartbeat responds to each message at once with a response of the
//! same shape as the registry's. Load against it measures the limit of
//! tonic, HTTP/2 and loopback TCP on this machine.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, SystemTime};

use futures::{Stream, StreamExt};
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status, Streaming};
use worker_registry::proto::worker_registry_server::{WorkerRegistry, WorkerRegistryServer};
use worker_registry::proto::{self};

/// Interval and TTL put in responses; the values only give the messages
/// the registry's size.
const INTERVAL: Duration = Duration::from_secs(10);
const LEASE_TTL: Duration = Duration::from_secs(30);

#[derive(Default)]
struct NoopRegistry {
    next_id: AtomicI64,
}

type HeartbeatStream = Pin<Box<dyn Stream<Item = Result<proto::HeartbeatResponse, Status>> + Send>>;

fn duration(value: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: value.as_secs() as i64,
        nanos: value.subsec_nanos() as i32,
    }
}

fn heartbeat_response() -> proto::HeartbeatResponse {
    let now = SystemTime::now();
    proto::HeartbeatResponse {
        lease_ttl: Some(duration(LEASE_TTL)),
        server_time: Some(now.into()),
        lease_deadline: Some((now + LEASE_TTL).into()),
        heartbeat_interval: Some(duration(INTERVAL)),
    }
}

#[tonic::async_trait]
impl WorkerRegistry for NoopRegistry {
    async fn register(
        &self,
        request: Request<proto::RegisterRequest>,
    ) -> Result<Response<proto::RegisterResponse>, Status> {
        let request = request.into_inner();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let worker = proto::Worker {
            id,
            name: request.name,
            role: request.role,
            status: proto::WorkerStatus::Active as i32,
            host: request.host,
            ..Default::default()
        };
        let response = proto::RegisterResponse {
            worker: Some(worker),
            // As long as the registry's 256-bit tokens in URL-safe base64.
            session_token: "A".repeat(43),
            heartbeat_interval: Some(duration(INTERVAL)),
            lease_ttl: Some(duration(LEASE_TTL)),
        };
        Ok(Response::new(response))
    }

    type HeartbeatStream = HeartbeatStream;

    async fn heartbeat(
        &self,
        request: Request<Streaming<proto::HeartbeatRequest>>,
    ) -> Result<Response<Self::HeartbeatStream>, Status> {
        let responses = request
            .into_inner()
            .map(|message| message.map(|_| heartbeat_response()));
        Ok(Response::new(Box::pin(responses)))
    }

    async fn deregister(
        &self,
        _request: Request<proto::DeregisterRequest>,
    ) -> Result<Response<proto::DeregisterResponse>, Status> {
        Err(Status::unimplemented(
            "the no-op service serves only Register and Heartbeat",
        ))
    }

    async fn get(&self, _request: Request<proto::GetRequest>) -> Result<Response<proto::GetResponse>, Status> {
        Err(Status::unimplemented(
            "the no-op service serves only Register and Heartbeat",
        ))
    }

    async fn list(&self, _request: Request<proto::ListRequest>) -> Result<Response<proto::ListResponse>, Status> {
        Err(Status::unimplemented(
            "the no-op service serves only Register and Heartbeat",
        ))
    }
}

/// Serves the no-op service on `listen` until SIGINT or SIGTERM. Prints one
/// JSON line with the bound address first, as the registry logs it.
pub async fn serve(listen: SocketAddr) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("failed to listen on {listen}: {e}"))?;
    let address = listener.local_addr()?;
    println!(
        "{}",
        serde_json::json!({"fields": {"message": "listening", "address": address.to_string()}})
    );

    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let stop = async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
    };

    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    tonic::transport::Server::builder()
        .add_service(WorkerRegistryServer::new(NoopRegistry::default()))
        .serve_with_incoming_shutdown(incoming, stop)
        .await?;
    Ok(())
}
