//! The run loop: register, keep the lease alive on one heartbeat stream,
//! reconnect or register again depending on the registry's status codes,
//! and deregister on shutdown.
//!
//! How the agent reacts to each outcome:
//!
//! | outcome | reaction |
//! |---|---|
//! | connection refused or timed out | back off, then try the next registry address |
//! | `UNAVAILABLE`, stream closed, no response within two intervals | back off, reconnect, keep the session |
//! | `NOT_FOUND` on a heartbeat (lease gone) | register again at once under the same name |
//! | `FAILED_PRECONDITION` (session superseded) | stop heartbeating, wait the backoff cap, register again |
//! | `ALREADY_EXISTS` on Register (another instance has a live lease on the name) | back off and retry |
//! | `INVALID_ARGUMENT` | exit with an error, because retrying cannot help |

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use serde_json::json;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Status};
use worker_registry::proto::worker_registry_client::WorkerRegistryClient;
use worker_registry::proto::{self, DeregisterRequest, HeartbeatRequest, RegisterRequest};
use worker_registry::{json as struct_json, validation};

use crate::backoff::Backoff;
use crate::config::Settings;
use crate::detect::Runtime;
use crate::shutdown::Shutdown;

/// Time one Register call may take once connected.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(10);

/// Time the whole deregistration may take, connecting included, so that a
/// stopped agent exits promptly even when the registry is down.
const DEREGISTER_DEADLINE: Duration = Duration::from_secs(2);

/// Heartbeat responses are awaited this many intervals before the
/// connection counts as dead.
const RESPONSE_DEADLINE_INTERVALS: u32 = 2;

/// Shortest HTTP/2 keepalive ping interval, so that a very short heartbeat
/// interval in tests does not flood the server with pings.
const MIN_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(1);

/// Retries up to this count are logged at warn level. Later ones are
/// logged at warn only every `WARN_EVERY_ATTEMPTS` retries or when
/// `WARN_AT_LEAST_EVERY` has passed since the last warn line, so a long
/// outage stays visible without one line per retry.
const ALWAYS_LOGGED_ATTEMPTS: u32 = 3;

/// Retry count step between warn lines after the first few retries.
const WARN_EVERY_ATTEMPTS: u32 = 10;

/// Maximum time between two warn lines while retries continue.
const WARN_AT_LEAST_EVERY: Duration = Duration::from_secs(60);

/// Errors that stop the agent with a non-zero exit status.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The agent's own checks reject the registration it would send.
    #[error("{0}; fix the configuration")]
    InvalidRegistration(validation::ValidationError),
    /// The registry rejected a request as invalid.
    #[error("the registry rejected the request as invalid: {0}; fix the configuration")]
    Rejected(String),
    /// A registry address cannot be used.
    #[error("invalid registry address {url:?}: {message}")]
    InvalidUrl {
        /// The address as configured.
        url: String,
        /// Reason the address was rejected.
        message: String,
    },
}

/// Lease of the agent's current registration.
struct Session {
    worker_id: i64,
    /// Secret for Heartbeat and Deregister; kept out of every log line.
    session_token: String,
    /// Interval the registry granted.
    interval: Duration,
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("worker_id", &self.worker_id)
            .field("session_token", &"<redacted>")
            .field("interval", &self.interval)
            .finish()
    }
}

/// Cause of one failed attempt to reach the registry.
#[derive(Debug)]
enum Failure {
    /// No connection could be opened to the registry at `url`.
    Connect {
        /// The address that failed, which is no longer the current one
        /// after a fail-over.
        url: String,
        /// The transport error.
        error: tonic::transport::Error,
    },
    /// The registry or the transport returned a status.
    Status(Status),
    /// No heartbeat response arrived in time.
    Timeout(Duration),
    /// The registry ended the heartbeat stream.
    Closed,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Connect { error, .. } => write!(f, "connection failed: {}", error_chain(error)),
            Failure::Status(status) => write!(f, "{:?}: {}", status.code(), status.message()),
            Failure::Timeout(after) => write!(f, "no response within {}", humantime::format_duration(*after)),
            Failure::Closed => f.write_str("stream closed by the registry"),
        }
    }
}

/// Outcome that ends heartbeating on the current session. A broken
/// connection is not one of them, because the session may still be valid.
enum LeaseEnd {
    /// Shutdown was requested.
    Stop,
    /// The registry has no live lease for this worker.
    LeaseLost(Status),
    /// Another Register took over the session.
    Superseded(Status),
    /// The registry rejected the request as invalid.
    Invalid(Status),
}

/// The agent: one worker registration kept alive against a list of
/// registry addresses.
pub struct Agent {
    registration: RegisterRequest,
    endpoints: Vec<(String, Endpoint)>,
    /// Index into `endpoints` of the address in use.
    current: usize,
    /// Open connection; `None` after a transport error so that the next
    /// attempt reconnects and may fail over.
    client: Option<WorkerRegistryClient<Channel>>,
    requested_interval: Duration,
    backoff: Backoff,
    backoff_cap: Duration,
    shutdown: Shutdown,
    /// When the heartbeat stream was lost, until a heartbeat succeeds again.
    stream_lost_at: Option<Instant>,
    /// Time of the last retry logged at warn level.
    last_retry_warning: Option<Instant>,
}

impl Agent {
    /// Builds the Register request from the settings, the runtimes and the
    /// instance id, and checks it with the registry's own rules.
    pub fn new(
        settings: &Settings,
        runtimes: &[Runtime],
        instance_id: &str,
        shutdown: Shutdown,
    ) -> Result<Agent, AgentError> {
        let registration = build_registration(settings, runtimes, instance_id);
        validation::validate_register(&registration).map_err(AgentError::InvalidRegistration)?;

        // Pings at the heartbeat interval with an equal ack timeout notice a
        // silently dead registry within about two intervals, as the
        // heartbeat response deadline does.
        let keepalive = settings.heartbeat_interval.max(MIN_KEEPALIVE_INTERVAL);
        let mut endpoints = Vec::with_capacity(settings.registry_urls.len());
        for url in &settings.registry_urls {
            let endpoint = Endpoint::from_shared(url.clone())
                .map_err(|e| AgentError::InvalidUrl {
                    url: url.clone(),
                    message: e.to_string(),
                })?
                .connect_timeout(settings.connect_timeout)
                .http2_keep_alive_interval(keepalive)
                .keep_alive_timeout(keepalive)
                .keep_alive_while_idle(true)
                .tcp_nodelay(true);
            endpoints.push((url.clone(), endpoint));
        }

        let agent = Agent {
            registration,
            endpoints,
            current: 0,
            client: None,
            requested_interval: settings.heartbeat_interval,
            backoff: Backoff::new(settings.backoff_base, settings.backoff_cap),
            backoff_cap: settings.backoff_cap,
            shutdown,
            stream_lost_at: None,
            last_retry_warning: None,
        };
        Ok(agent)
    }

    /// Runs until shutdown is requested, then deregisters. Returns an error
    /// only when the registry rejects the registration as invalid.
    pub async fn run(mut self) -> Result<(), AgentError> {
        loop {
            let Some(mut session) = self.register().await? else {
                tracing::info!("stopped before registering");
                return Ok(());
            };

            match self.keep_alive(&mut session).await {
                LeaseEnd::Stop => {
                    self.deregister(&session).await;
                    return Ok(());
                }
                LeaseEnd::LeaseLost(status) => {
                    tracing::warn!(
                        worker_id = session.worker_id,
                        reason = status.message(),
                        "lease lost; registering again"
                    );
                }
                LeaseEnd::Superseded(status) => {
                    let retry_in = self.backoff_cap;
                    tracing::error!(
                        worker_id = session.worker_id,
                        reason = status.message(),
                        retry_in = %humantime::format_duration(retry_in),
                        "session superseded by another instance; heartbeats stopped"
                    );
                    if self.sleep_or_stop(retry_in).await {
                        tracing::info!(
                            "stopped while superseded; not deregistering a session held by another instance"
                        );
                        return Ok(());
                    }
                }
                LeaseEnd::Invalid(status) => return Err(AgentError::Rejected(status.message().to_string())),
            }
        }
    }

    /// Registers, retrying with backoff. Returns `None` when shutdown is
    /// requested first.
    async fn register(&mut self) -> Result<Option<Session>, AgentError> {
        loop {
            // NOTE: a stop that interrupts a Register the registry has already
            // applied leaves the worker active until its lease expires,
            // because the agent never learns the session token to deregister.
            let mut stop = self.shutdown.clone();
            let result = tokio::select! {
                _ = stop.requested() => return Ok(None),
                result = self.try_register() => result,
            };

            let failure = match result {
                Ok(session) => {
                    self.backoff.reset();
                    return Ok(Some(session));
                }
                Err(failure) => failure,
            };

            if let Failure::Status(status) = &failure {
                if status.code() == Code::InvalidArgument {
                    return Err(AgentError::Rejected(status.message().to_string()));
                }
            }

            let delay = self.backoff.next_delay();
            self.log_retry("registration failed; retrying", &failure, delay);
            if self.sleep_or_stop(delay).await {
                return Ok(None);
            }
        }
    }

    async fn try_register(&mut self) -> Result<Session, Failure> {
        let mut client = self.connect().await?;

        let mut request = Request::new(self.registration.clone());
        request.set_timeout(REGISTER_TIMEOUT);
        let response = client
            .register(request)
            .await
            .map_err(|status| self.status_failure(status))?
            .into_inner();

        let interval = response
            .heartbeat_interval
            .and_then(positive_duration)
            .unwrap_or(self.requested_interval);
        let lease_ttl = response.lease_ttl.and_then(positive_duration).unwrap_or_default();
        let worker = response.worker.unwrap_or_default();

        tracing::info!(
            worker_id = worker.id,
            name = %worker.name,
            heartbeat_interval = %humantime::format_duration(interval),
            lease_ttl = %humantime::format_duration(lease_ttl),
            registry = %self.endpoints[self.current].0,
            "registered"
        );

        let session = Session {
            worker_id: worker.id,
            session_token: response.session_token,
            interval,
        };
        Ok(session)
    }

    /// Heartbeats until the lease ends or a stop is requested. Broken
    /// connections are retried here with backoff, keeping the session.
    async fn keep_alive(&mut self, session: &mut Session) -> LeaseEnd {
        loop {
            let failure = match self.heartbeat_stream(session).await {
                Ok(end) => {
                    // Registering again logs its own line, so a loss that
                    // ends this way is not reported as restored.
                    self.stream_lost_at = None;
                    return end;
                }
                Err(failure) => failure,
            };

            self.stream_lost_at.get_or_insert_with(Instant::now);
            let delay = self.backoff.next_delay();
            self.log_retry("heartbeat stream lost; reconnecting", &failure, delay);
            if self.sleep_or_stop(delay).await {
                return LeaseEnd::Stop;
            }
        }
    }

    /// Opens one heartbeat stream and sends one request per interval,
    /// reading one response per request. Returns an error when the
    /// connection breaks.
    async fn heartbeat_stream(&mut self, session: &mut Session) -> Result<LeaseEnd, Failure> {
        let mut stop = self.shutdown.clone();

        let mut client = self.connect().await?;

        // The first request is queued before the call, so the registry
        // receives it as soon as the stream opens.
        let (sender, receiver) = mpsc::channel(1);
        let mut sent_at = Instant::now();
        if sender.send(heartbeat_request(session)).await.is_err() {
            return Err(Failure::Closed);
        }

        let deadline = session.interval * RESPONSE_DEADLINE_INTERVALS;
        let opened = tokio::select! {
            _ = stop.requested() => return Ok(LeaseEnd::Stop),
            opened = tokio::time::timeout(deadline, client.heartbeat(ReceiverStream::new(receiver))) => opened,
        };
        let mut responses = match opened {
            Ok(Ok(response)) => response.into_inner(),
            Ok(Err(status)) => return self.classify(status),
            Err(_elapsed) => {
                self.client = None;
                return Err(Failure::Timeout(deadline));
            }
        };

        loop {
            let deadline = session.interval * RESPONSE_DEADLINE_INTERVALS;
            let reply = tokio::select! {
                _ = stop.requested() => return Ok(LeaseEnd::Stop),
                reply = tokio::time::timeout_at(sent_at + deadline, responses.message()) => reply,
            };
            match reply {
                Ok(Ok(Some(response))) => self.accept_heartbeat(session, &response),
                Ok(Ok(None)) => {
                    self.client = None;
                    return Err(Failure::Closed);
                }
                Ok(Err(status)) => return self.classify(status),
                Err(_elapsed) => {
                    self.client = None;
                    return Err(Failure::Timeout(deadline));
                }
            }

            // The stream is read while waiting, so that a stream the
            // registry ends or fails, as it does on shutdown, is noticed at
            // once instead of at the next send.
            let next_send = sent_at + session.interval;
            loop {
                let unrequested = tokio::select! {
                    _ = stop.requested() => return Ok(LeaseEnd::Stop),
                    _ = tokio::time::sleep_until(next_send) => break,
                    message = responses.message() => message,
                };
                match unrequested {
                    Ok(Some(_)) => tracing::debug!(
                        worker_id = session.worker_id,
                        "ignored a heartbeat response while no request was pending"
                    ),
                    Ok(None) => {
                        self.client = None;
                        return Err(Failure::Closed);
                    }
                    Err(status) => return self.classify(status),
                }
            }

            sent_at = Instant::now();
            if sender.send(heartbeat_request(session)).await.is_err() {
                self.client = None;
                return Err(Failure::Closed);
            }
        }
    }

    fn accept_heartbeat(&mut self, session: &mut Session, response: &proto::HeartbeatResponse) {
        if let Some(lost_at) = self.stream_lost_at.take() {
            tracing::info!(
                worker_id = session.worker_id,
                registry = %self.endpoints[self.current].0,
                attempts = self.backoff.attempt(),
                downtime = %humantime::format_duration(round_to_millis(lost_at.elapsed())),
                "heartbeat stream restored"
            );
        }
        self.backoff.reset();

        let granted = response.heartbeat_interval.and_then(positive_duration);
        if let Some(granted) = granted.filter(|granted| *granted != session.interval) {
            tracing::info!(
                worker_id = session.worker_id,
                heartbeat_interval = %humantime::format_duration(granted),
                "heartbeat interval changed by the registry"
            );
            session.interval = granted;
        }

        let lease_ttl = response.lease_ttl.and_then(positive_duration).unwrap_or_default();
        tracing::debug!(
            worker_id = session.worker_id,
            lease_ttl = %humantime::format_duration(lease_ttl),
            "heartbeat acknowledged"
        );
    }

    /// Ends the lease so that the worker turns inactive at once. Failures
    /// are logged and otherwise ignored, because the lease expires anyway.
    async fn deregister(&mut self, session: &Session) {
        let worker_id = session.worker_id;
        let request = DeregisterRequest {
            worker_id,
            session_token: session.session_token.clone(),
        };

        let attempt = async {
            let mut client = self.connect().await?;
            let mut request = Request::new(request);
            request.set_timeout(DEREGISTER_DEADLINE);
            client.deregister(request).await.map_err(Failure::Status)
        };

        match tokio::time::timeout(DEREGISTER_DEADLINE, attempt).await {
            Ok(Ok(_)) => tracing::info!(worker_id, name = %self.registration.name, "deregistered"),
            Ok(Err(failure)) => tracing::warn!(
                worker_id,
                reason = %failure,
                "deregistration failed; the lease expires on its own"
            ),
            Err(_elapsed) => tracing::warn!(
                worker_id,
                deadline = %humantime::format_duration(DEREGISTER_DEADLINE),
                "deregistration timed out; the lease expires on its own"
            ),
        }
    }

    /// Returns the open connection or opens one to the current address. A
    /// failed connect moves on to the next address for the next attempt.
    async fn connect(&mut self) -> Result<WorkerRegistryClient<Channel>, Failure> {
        if let Some(client) = &self.client {
            return Ok(client.clone());
        }

        let (url, endpoint) = &self.endpoints[self.current];
        match endpoint.connect().await {
            Ok(channel) => {
                tracing::debug!(registry = %url, "connected");
                let client =
                    WorkerRegistryClient::new(channel).max_decoding_message_size(validation::MAX_MESSAGE_BYTES);
                self.client = Some(client.clone());
                Ok(client)
            }
            Err(error) => {
                let url = url.clone();
                self.fail_over();
                Err(Failure::Connect { url, error })
            }
        }
    }

    fn fail_over(&mut self) {
        if self.endpoints.len() < 2 {
            return;
        }
        let failed = self.current;
        self.current = (self.current + 1) % self.endpoints.len();
        tracing::debug!(
            failed = %self.endpoints[failed].0,
            next = %self.endpoints[self.current].0,
            "trying the next registry address"
        );
    }

    /// Maps a status that ends a heartbeat stream to the agent's reaction.
    fn classify(&mut self, status: Status) -> Result<LeaseEnd, Failure> {
        match status.code() {
            Code::NotFound => Ok(LeaseEnd::LeaseLost(status)),
            Code::FailedPrecondition => Ok(LeaseEnd::Superseded(status)),
            Code::InvalidArgument => Ok(LeaseEnd::Invalid(status)),
            _ => Err(self.status_failure(status)),
        }
    }

    /// Drops the connection after a status that may mean a transport
    /// problem, so that the next attempt reconnects.
    fn status_failure(&mut self, status: Status) -> Failure {
        let answered_by_registry = matches!(
            status.code(),
            Code::AlreadyExists | Code::NotFound | Code::FailedPrecondition | Code::InvalidArgument
        );
        if !answered_by_registry {
            self.client = None;
        }
        Failure::Status(status)
    }

    /// Logs one retry, at warn level as `is_logged_at_warn` decides and at
    /// debug level otherwise. The registry named is the one that failed.
    fn log_retry(&mut self, message: &'static str, failure: &Failure, delay: Duration) {
        let attempt = self.backoff.attempt();
        let registry = match failure {
            Failure::Connect { url, .. } => url.as_str(),
            _ => self.endpoints[self.current].0.as_str(),
        };
        let retry_in = humantime::format_duration(round_to_millis(delay));
        let since_warning = self.last_retry_warning.map(|at| at.elapsed());
        if is_logged_at_warn(attempt, since_warning) {
            tracing::warn!(attempt, reason = %failure, %retry_in, %registry, "{message}");
            self.last_retry_warning = Some(Instant::now());
        } else {
            tracing::debug!(attempt, reason = %failure, %retry_in, %registry, "{message}");
        }
    }

    /// Sleeps for `delay`; returns true when shutdown was requested first.
    async fn sleep_or_stop(&self, delay: Duration) -> bool {
        let mut stop = self.shutdown.clone();
        tokio::select! {
            _ = stop.requested() => true,
            _ = tokio::time::sleep(delay) => false,
        }
    }
}

/// Tells whether retry number `attempt` is logged at warn level rather than
/// debug. `since_warning` is the time since the last warn line, if any.
fn is_logged_at_warn(attempt: u32, since_warning: Option<Duration>) -> bool {
    attempt <= ALWAYS_LOGGED_ATTEMPTS
        || attempt % WARN_EVERY_ATTEMPTS == 0
        || since_warning.is_none_or(|elapsed| elapsed >= WARN_AT_LEAST_EVERY)
}

/// Formats an error followed by each cause in its `source()` chain. A
/// cause whose text the previous message already contains is skipped.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut previous = text.clone();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !previous.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        previous = cause_text;
        source = cause.source();
    }
    text
}

fn build_registration(settings: &Settings, runtimes: &[Runtime], instance_id: &str) -> RegisterRequest {
    // Only extra keys go here: the registry derives runtimes,
    // runtime_versions, detected_interpreters and labels from the request
    // fields and rejects them inside capabilities.
    let capabilities = json!({
        "sensor_version": env!("CARGO_PKG_VERSION"),
        "max_concurrent_sensors": settings.max_concurrent_sensors,
    });
    let capabilities = capabilities.as_object().map(struct_json::json_to_struct);

    RegisterRequest {
        name: settings.worker_name.clone(),
        role: proto::WorkerRole::Sensor as i32,
        host: settings.host.clone(),
        runtimes: runtimes.iter().map(Runtime::to_proto).collect(),
        labels: settings.labels.clone().into_iter().collect::<HashMap<_, _>>(),
        capabilities,
        instance_id: instance_id.to_string(),
        heartbeat_interval: prost_types::Duration::try_from(settings.heartbeat_interval).ok(),
    }
}

fn heartbeat_request(session: &Session) -> HeartbeatRequest {
    HeartbeatRequest {
        worker_id: session.worker_id,
        session_token: session.session_token.clone(),
        // UNSPECIFIED keeps the status the registry has; the agent itself
        // does not track busy sensors.
        status: proto::WorkerStatus::Unspecified as i32,
    }
}

/// Converts a protocol duration, treating zero, negative and missing
/// values alike as absent.
fn positive_duration(duration: prost_types::Duration) -> Option<Duration> {
    Duration::try_from(duration).ok().filter(|duration| !duration.is_zero())
}

fn round_to_millis(duration: Duration) -> Duration {
    Duration::from_millis(u64::try_from(duration.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{load_layers, resolve, Overrides};

    fn settings() -> Settings {
        let layers = load_layers(None, Some(HashMap::new())).unwrap();
        resolve(layers, Overrides::default(), "box1").unwrap()
    }

    #[test]
    fn registration_carries_extra_capabilities_only() {
        let runtimes = vec![Runtime {
            name: "python".into(),
            version: "3.11.7".into(),
            path: "/usr/bin/python3".into(),
        }];

        let request = build_registration(&settings(), &runtimes, "abc");

        assert!(validation::validate_register(&request).is_ok());
        let capabilities = request.capabilities.unwrap();
        let mut keys: Vec<&String> = capabilities.fields.keys().collect();
        keys.sort();
        assert_eq!(keys, ["max_concurrent_sensors", "sensor_version"]);
        assert_eq!(request.role, proto::WorkerRole::Sensor as i32);
        assert_eq!(request.runtimes[0].path, "/usr/bin/python3");
        assert_eq!(request.heartbeat_interval.unwrap().seconds, 30);
    }

    /// After three retries only every tenth is logged at warn, while warn
    /// lines come less than a minute apart.
    #[test]
    fn retry_logs_thin_out() {
        let recent = Some(Duration::from_secs(5));

        let warned: Vec<u32> = (1..=40).filter(|attempt| is_logged_at_warn(*attempt, recent)).collect();

        assert_eq!(warned, [1, 2, 3, 10, 20, 30, 40]);
    }

    /// A retry is logged at warn when the last warn line is a minute old,
    /// so that a long outage with slow retries stays visible.
    #[test]
    fn retry_logs_at_least_once_a_minute() {
        assert!(is_logged_at_warn(17, Some(WARN_AT_LEAST_EVERY)));
        assert!(is_logged_at_warn(17, None));
        assert!(!is_logged_at_warn(17, Some(Duration::from_secs(59))));
    }

    /// Every cause of a chain is printed once, even when a message repeats
    /// the text of its cause.
    #[test]
    fn error_chain_lists_causes_once() {
        #[derive(Debug, thiserror::Error)]
        #[error("tcp connect error")]
        struct Connect(#[source] std::io::Error);
        #[derive(Debug, thiserror::Error)]
        #[error("transport error: {0}")]
        struct Transport(#[source] Connect);
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let refused_text = refused.to_string();

        let text = error_chain(&Transport(Connect(refused)));

        assert_eq!(text, format!("transport error: tcp connect error: {refused_text}"));
    }

    #[test]
    fn session_debug_hides_token() {
        let session = Session {
            worker_id: 7,
            session_token: "secret-token".into(),
            interval: Duration::from_secs(1),
        };

        let printed = format!("{session:?}");

        assert!(!printed.contains("secret-token"), "{printed}");
    }

    #[test]
    fn zero_duration_counts_as_absent() {
        assert_eq!(positive_duration(prost_types::Duration { seconds: 0, nanos: 0 }), None);
        assert_eq!(positive_duration(prost_types::Duration { seconds: -1, nanos: 0 }), None);
        assert_eq!(
            positive_duration(prost_types::Duration { seconds: 1, nanos: 0 }),
            Some(Duration::from_secs(1))
        );
    }
}
