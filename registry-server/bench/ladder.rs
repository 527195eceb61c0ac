//! The heartbeat rate ladder shared by the registry, the no-op service and
//! etcd: every agent keeps one stream open, the aggregate request rate rises step
//! by step, and the highest step that kept up is the sustained rate.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::stream::{self, StreamExt};
use rand::Rng;
use tokio::sync::mpsc;
use tokio::time::{sleep, sleep_until, Instant};
use tokio_util::sync::CancellationToken;
use tonic::Streaming;

use crate::histogram::{Latencies, Summary};
use crate::procfs;
use crate::report::{Observer, Window};

/// Requests one agent may have unanswered; past it, sends are skipped and
/// the step fails, so a stalled server cannot grow the generator's memory.
pub const MAX_OUTSTANDING: usize = 64;

/// One agent's open stream.
pub struct AgentStream<Req, Resp> {
    /// Feeds the request half of the stream.
    pub sender: mpsc::Sender<Req>,
    /// The response half.
    pub responses: Streaming<Resp>,
    /// The message sent on every tick.
    pub request: Req,
    /// Send time of the request written before the call was opened, which
    /// servers that send headers only with the first response need.
    pub first_sent: Instant,
}

/// Settings of one ladder.
#[derive(Debug, Clone)]
pub struct LadderSettings {
    /// Aggregate rate of the first step, in requests per second.
    pub start_rate: f64,
    /// Factor from one step's rate to the next.
    pub factor: f64,
    /// Maximum number of steps.
    pub max_steps: usize,
    /// Time after a rate change before measuring starts.
    pub settle: Duration,
    /// Measured time of one step.
    pub step: Duration,
    /// A step passes only with a p99 latency at or below this.
    pub p99_limit: Duration,
}

/// Result of one step.
#[derive(Debug, Clone, Copy)]
pub struct StepResult {
    /// Offered aggregate rate.
    pub offered: f64,
    /// Responses per second in the measured window.
    pub acks_per_second: f64,
    /// Latency from send to response.
    pub latency: Summary,
    /// Stream errors and rejected responses in the window.
    pub errors: u64,
    /// Sends skipped because an agent had [`MAX_OUTSTANDING`] unanswered requests.
    pub skipped: u64,
    /// Process readings over the window.
    pub window: Window,
    /// CPU seconds this generator used in the window.
    pub generator_cpu: f64,
    /// Whether the step kept up: at least 95% of the offered rate acknowledged,
    /// p99 within the limit, no errors and no skipped sends.
    pub passed: bool,
}

/// Counters shared by the agent tasks and the coordinator.
struct Shared {
    agents: usize,
    /// Current aggregate rate in requests per second, as f64 bits.
    rate_bits: AtomicU64,
    acks: AtomicU64,
    errors: AtomicU64,
    skipped: AtomicU64,
    latencies: Latencies,
    first_error: Mutex<Option<String>>,
    stop: CancellationToken,
}

impl Shared {
    fn interval(&self) -> Duration {
        let rate = f64::from_bits(self.rate_bits.load(Ordering::Relaxed));
        Duration::from_secs_f64(self.agents as f64 / rate)
    }

    fn fail(&self, message: String) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let mut first = self.first_error.lock().expect("error lock poisoned");
        first.get_or_insert(message);
    }
}

/// Opens `count` agents with `open`, at most `concurrency` at a time, and
/// returns them in index order. The first failure ends the run.
pub async fn open_agents<Req, Resp, F, Fut>(
    count: usize,
    concurrency: usize,
    open: F,
) -> anyhow::Result<Vec<AgentStream<Req, Resp>>>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<AgentStream<Req, Resp>>>,
{
    let mut opened: Vec<(usize, AgentStream<Req, Resp>)> = stream::iter(0..count)
        .map(|index| {
            let future = open(index);
            async move { future.await.map(|agent| (index, agent)) }
        })
        .buffer_unordered(concurrency)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<anyhow::Result<_>>()?;
    opened.sort_by_key(|(index, _)| *index);
    Ok(opened.into_iter().map(|(_, agent)| agent).collect())
}

/// Runs the ladder over `agents` and returns every step's result.
/// `accept` separates a successful response from a rejection.
pub async fn run<Req, Resp>(
    agents: Vec<AgentStream<Req, Resp>>,
    accept: fn(&Resp) -> bool,
    settings: &LadderSettings,
    observer: &Observer,
) -> anyhow::Result<(Vec<StepResult>, Option<String>)>
where
    Req: Clone + Send + 'static,
    Resp: Send + 'static,
{
    let shared = Arc::new(Shared {
        agents: agents.len(),
        rate_bits: AtomicU64::new(settings.start_rate.to_bits()),
        acks: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        skipped: AtomicU64::new(0),
        latencies: Latencies::new(),
        first_error: Mutex::new(None),
        stop: CancellationToken::new(),
    });

    let tasks: Vec<_> = agents
        .into_iter()
        .enumerate()
        .map(|(index, agent)| tokio::spawn(drive_agent(index, agent, accept, Arc::clone(&shared))))
        .collect();

    let mut results = Vec::new();
    let mut rate = settings.start_rate;
    for _ in 0..settings.max_steps {
        // An agent picks up the new rate after its next send, so the
        // settle time covers at least one old interval. The first step
        // waits for one interval too, because agents start at random phases.
        let old_interval = shared.interval();
        shared.rate_bits.store(rate.to_bits(), Ordering::Relaxed);
        sleep(settings.settle.max(old_interval.mul_f64(1.1))).await;
        let errors_before = shared.errors.load(Ordering::Relaxed);
        let skipped_before = shared.skipped.load(Ordering::Relaxed);
        let acks_before = shared.acks.load(Ordering::Relaxed);
        shared.latencies.take();
        let start = observer.sample().await?;
        let generator_before = procfs::cpu_seconds(std::process::id()).unwrap_or(f64::NAN);

        sleep(settings.step).await;
        let acks = shared.acks.load(Ordering::Relaxed) - acks_before;
        let errors = shared.errors.load(Ordering::Relaxed) - errors_before;
        let skipped = shared.skipped.load(Ordering::Relaxed) - skipped_before;
        let latency = shared.latencies.take();
        let generator_cpu = procfs::cpu_seconds(std::process::id()).unwrap_or(f64::NAN) - generator_before;
        let window = observer.since(&start).await?;

        let acks_per_second = acks as f64 / window.seconds;
        let passed = acks_per_second >= 0.95 * rate
            && latency.p99_ms <= settings.p99_limit.as_secs_f64() * 1000.0
            && errors == 0
            && skipped == 0;
        let result = StepResult {
            offered: rate,
            acks_per_second,
            latency,
            errors,
            skipped,
            window,
            generator_cpu,
            passed,
        };
        eprintln!(
            "step: offered {:.0}/s, acknowledged {:.0}/s, {} samples, p50 {:.2} ms, p99 {:.2} ms, max {:.1} ms, errors {}, skipped {}, server cpu {:.2} s, generator cpu {:.2} s, {}",
            result.offered,
            result.acks_per_second,
            latency.count,
            latency.p50_ms,
            latency.p99_ms,
            latency.max_ms,
            errors,
            skipped,
            window.server_cpu.unwrap_or(f64::NAN),
            generator_cpu,
            if passed { "passed" } else { "failed" }
        );
        results.push(result);

        if !passed {
            break;
        }
        rate *= settings.factor;
    }

    shared.stop.cancel();
    for task in tasks {
        let _ = task.await;
    }
    let first_error = shared.first_error.lock().expect("error lock poisoned").take();
    Ok((results, first_error))
}

/// Sends on the agent's schedule and matches responses to send times. The
/// server responds in order, one response per request.
async fn drive_agent<Req, Resp>(
    index: usize,
    mut agent: AgentStream<Req, Resp>,
    accept: fn(&Resp) -> bool,
    shared: Arc<Shared>,
) where
    Req: Clone,
{
    let mut outstanding: VecDeque<Instant> = VecDeque::with_capacity(4);
    outstanding.push_back(agent.first_sent);

    // A random phase spreads the agents over the interval instead of
    // sending in lockstep.
    let phase = rand::rng().random_range(0.0..1.0);
    let mut next_send = Instant::now() + shared.interval().mul_f64(phase);

    loop {
        tokio::select! {
            biased;

            _ = shared.stop.cancelled() => break,

            message = agent.responses.message() => {
                match message {
                    Ok(Some(response)) => {
                        if let Some(sent) = outstanding.pop_front() {
                            shared.latencies.record(index, sent.elapsed());
                        }
                        if !accept(&response) {
                            shared.fail(format!("agent {index}: the server rejected a heartbeat"));
                            break;
                        }
                        shared.acks.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(None) => {
                        shared.fail(format!("agent {index}: the server closed the stream"));
                        break;
                    }
                    Err(status) => {
                        shared.fail(format!("agent {index}: {status}"));
                        break;
                    }
                }
            }

            _ = sleep_until(next_send) => {
                if outstanding.len() < MAX_OUTSTANDING && agent.sender.try_send(agent.request.clone()).is_ok() {
                    outstanding.push_back(Instant::now());
                } else {
                    shared.skipped.fetch_add(1, Ordering::Relaxed);
                }

                // The schedule is open-loop, but a generator stall longer
                // than one interval is not made up with a burst.
                let interval = shared.interval();
                next_send += interval;
                let now = Instant::now();
                if next_send + interval < now {
                    next_send = now;
                }
            }
        }
    }
}

/// Returns the highest passed step, if any.
pub fn best(results: &[StepResult]) -> Option<&StepResult> {
    results.iter().rev().find(|result| result.passed)
}
