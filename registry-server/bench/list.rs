//! List under concurrent schedulers: each client pages through the workers
//! that match one capability filter, from the first page to the last, again
//! and again until the time is up.
//!
//! The clients leave each worker of a page encoded and only count them.
//! Decoding a page of 1,000 workers with their capabilities costs the
//! generator more CPU than serving it costs the server, and all clients
//! share the generator's one CPU, so full decoding would measure the
//! generator instead of the registry.

use std::time::{Duration, Instant};

use prost::bytes::Bytes;
use tonic::client::Grpc;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Channel;
use worker_registry::proto;

use crate::client::connect;
use crate::histogram::{Latencies, Summary};
use crate::report::{Observer, Window};

/// Outcome of one List run.
pub struct ListResult {
    /// List calls completed.
    pub calls: u64,
    /// Workers returned over all calls.
    pub workers: u64,
    /// Latency of one List call.
    pub latency: Summary,
    /// Process readings over the run.
    pub window: Window,
}

/// `registry.v1.ListResponse` with each worker kept as its encoded bytes,
/// which the wire format allows for any embedded message.
#[derive(Clone, PartialEq, prost::Message)]
struct EncodedPage {
    #[prost(bytes = "bytes", repeated, tag = "1")]
    workers: Vec<Bytes>,
    #[prost(string, tag = "2")]
    next_page_token: String,
}

/// Calls List and returns the page with its workers left encoded.
async fn list_encoded(client: &mut Grpc<Channel>, request: proto::ListRequest) -> anyhow::Result<EncodedPage> {
    client
        .ready()
        .await
        .map_err(|e| anyhow::anyhow!("List connection failed: {e}"))?;
    let codec = tonic_prost::ProstCodec::<proto::ListRequest, EncodedPage>::default();
    let path = PathAndQuery::from_static("/registry.v1.WorkerRegistry/List");
    let response = client
        .unary(tonic::Request::new(request), path, codec)
        .await
        .map_err(|e| anyhow::anyhow!("List failed: {e}"))?;
    Ok(response.into_inner())
}

/// Builds the filter a scheduler uses to place python work: live sensors with
/// python that heartbeated within `max_age`.
pub fn scheduler_filter(page_size: i32, max_age: Duration) -> proto::ListRequest {
    proto::ListRequest {
        role: proto::WorkerRole::Sensor as i32,
        statuses: vec![proto::WorkerStatus::Active as i32, proto::WorkerStatus::Busy as i32],
        runtimes: vec!["python".into()],
        max_heartbeat_age: Some(prost_types::Duration {
            seconds: max_age.as_secs() as i64,
            nanos: 0,
        }),
        page_size,
        ..Default::default()
    }
}

/// Runs `clients` concurrent pagers for `duration`.
pub async fn run(
    target: &str,
    clients: usize,
    request: proto::ListRequest,
    duration: Duration,
    observer: &Observer,
) -> anyhow::Result<ListResult> {
    let mut pagers = Vec::with_capacity(clients);
    for _ in 0..clients {
        pagers.push(Grpc::new(connect(target).await?));
    }
    let latencies = std::sync::Arc::new(Latencies::new());

    let start_sample = observer.sample().await?;
    let deadline = Instant::now() + duration;
    let tasks: Vec<_> = pagers
        .into_iter()
        .enumerate()
        .map(|(index, mut client)| {
            let latencies = std::sync::Arc::clone(&latencies);
            let mut request = request.clone();
            tokio::spawn(async move {
                let mut calls = 0u64;
                let mut workers = 0u64;
                while Instant::now() < deadline {
                    let started = Instant::now();
                    let page = list_encoded(&mut client, request.clone()).await?;
                    latencies.record(index, started.elapsed());

                    calls += 1;
                    workers += page.workers.len() as u64;
                    request.page_token = page.next_page_token;
                }
                anyhow::Ok((calls, workers))
            })
        })
        .collect();

    let mut calls = 0;
    let mut workers = 0;
    for task in tasks {
        let (task_calls, task_workers) = task.await??;
        calls += task_calls;
        workers += task_workers;
    }
    let window = observer.since(&start_sample).await?;

    Ok(ListResult {
        calls,
        workers,
        latency: latencies.take(),
        window,
    })
}
