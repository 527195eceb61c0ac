//! Registration storm: many agents register at once through a bounded
//! number of connections and requests in flight.

use std::collections::BTreeMap;
use std::time::Instant;

use futures::stream::{self, StreamExt};
use worker_registry::proto::worker_registry_client::WorkerRegistryClient;

use crate::client::{connect, register_request};
use crate::histogram::Latencies;
use crate::report::Observer;

/// Outcome of one storm.
pub struct StormResult {
    /// Time from the first request to the last response.
    pub elapsed_seconds: f64,
    /// Registrations that succeeded.
    pub registered: usize,
    /// Failed registrations by gRPC code.
    pub errors: BTreeMap<String, usize>,
    /// The first error message, for the notes.
    pub first_error: Option<String>,
    /// Latency of one Register call.
    pub latency: crate::histogram::Summary,
    /// Process readings over the storm.
    pub window: crate::report::Window,
}

/// Registers `agents` workers named `PREFIX-INDEX` over `connections`
/// connections with at most `concurrency` calls in flight.
pub async fn run(
    target: &str,
    prefix: &str,
    agents: usize,
    connections: usize,
    concurrency: usize,
    observer: &Observer,
) -> anyhow::Result<StormResult> {
    let mut channels = Vec::with_capacity(connections);
    for _ in 0..connections {
        channels.push(connect(target).await?);
    }
    let latencies = Latencies::new();

    let start_sample = observer.sample().await?;
    let started = Instant::now();
    let outcomes: Vec<Result<(), tonic::Status>> = stream::iter(0..agents)
        .map(|index| {
            let mut client = WorkerRegistryClient::new(channels[index % connections].clone());
            let latencies = &latencies;
            async move {
                let call_started = Instant::now();
                let result = client.register(register_request(prefix, index)).await;
                latencies.record(index, call_started.elapsed());
                result.map(|_| ())
            }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    let elapsed_seconds = started.elapsed().as_secs_f64();
    let window = observer.since(&start_sample).await?;

    let mut errors = BTreeMap::new();
    let mut first_error = None;
    let mut registered = 0;
    for outcome in outcomes {
        match outcome {
            Ok(()) => registered += 1,
            Err(status) => {
                *errors.entry(format!("{:?}", status.code())).or_insert(0) += 1;
                first_error.get_or_insert_with(|| status.message().to_string());
            }
        }
    }

    Ok(StormResult {
        elapsed_seconds,
        registered,
        errors,
        first_error,
        latency: latencies.take(),
        window,
    })
}
