//! The `registry.v1.WorkerRegistry` gRPC service.
//!
//! Every RPC has the same shape: validate and decode the request (errors
//! name the field), call the lease manager or the store, build the response.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use chrono::{DateTime, Utc};
use futures::Stream;
use rand::RngCore;
use serde_json::{Map, Value as Json};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info, instrument, warn};
use worker_registry::json::json_to_struct;
use worker_registry::proto::{self, worker_registry_server::WorkerRegistry};
use worker_registry::validation::{self, ListFilter, ValidationError};

use crate::error::ServiceError;
use crate::lease::{hash_token, HeartbeatAccepted, Leases};
use crate::registration::{PendingGrant, RegisterBatcher};
use crate::store::{StoreError, WorkerRecord};

/// Bounds of the heartbeat interval a worker is granted.
#[derive(Debug, Clone)]
pub struct GrantPolicy {
    /// Interval granted when the worker requests none.
    pub default_interval: Duration,
    /// Minimum interval granted.
    pub min_interval: Duration,
    /// Maximum interval granted.
    pub max_interval: Duration,
    /// Lease TTL as a multiple of the interval.
    pub missed_heartbeats: u32,
}

impl GrantPolicy {
    /// Clamps the requested interval to the bounds; zero or none means the default.
    pub fn interval(&self, requested: Option<Duration>) -> Duration {
        match requested {
            Some(interval) if !interval.is_zero() => interval.clamp(self.min_interval, self.max_interval),
            _ => self.default_interval,
        }
    }
}

/// The gRPC service implementation.
#[derive(Clone)]
pub struct RegistryService {
    leases: Arc<Leases>,
    registrations: RegisterBatcher,
    policy: GrantPolicy,
    shutdown: CancellationToken,
}

impl RegistryService {
    /// Creates the service. Cancelling `shutdown` ends open heartbeat streams
    /// with UNAVAILABLE.
    pub fn new(leases: Arc<Leases>, policy: GrantPolicy, shutdown: CancellationToken) -> Self {
        RegistryService {
            registrations: RegisterBatcher::start(Arc::clone(leases.store())),
            leases,
            policy,
            shutdown,
        }
    }

    fn observe<T>(&self, result: Result<T, StoreError>) -> Result<T, ServiceError> {
        self.leases.observe(&result);
        result.map_err(ServiceError::from)
    }
}

/// Creates a session token of 256 random bits, encoded as URL-safe base64.
fn new_session_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    URL_SAFE_NO_PAD.encode(bytes)
}

type HeartbeatStream = Pin<Box<dyn Stream<Item = Result<proto::HeartbeatResponse, Status>> + Send>>;

#[tonic::async_trait]
impl WorkerRegistry for RegistryService {
    #[instrument(name = "rpc.register", skip_all, fields(worker_name = %request.get_ref().name, worker_id))]
    async fn register(
        &self,
        request: Request<proto::RegisterRequest>,
    ) -> Result<Response<proto::RegisterResponse>, Status> {
        let registration = validation::validate_register(request.get_ref()).map_err(ServiceError::from)?;

        let interval = self.policy.interval(registration.requested_interval);
        let lease_ttl = interval * self.policy.missed_heartbeats;
        let token = new_session_token();
        let token_hash = hash_token(&token);
        let capabilities = registration.capabilities_document();

        let grant = PendingGrant {
            registration,
            capabilities,
            token_hash,
            heartbeat_interval: interval,
            lease_ttl,
            now: self.leases.clock().now(),
            since_regained: self.leases.since_regained(),
        };
        let record = self.observe(self.registrations.register(grant).await)?;

        self.leases.session_started(record.id, token_hash, lease_ttl, interval);
        tracing::Span::current().record("worker_id", record.id);
        info!(
            worker_id = record.id,
            name = %record.name,
            role = %record.role,
            host = %record.host,
            instance_id = %record.instance_id,
            interval_ms = interval.as_millis() as u64,
            "worker registered"
        );

        let mut worker = worker_to_proto(&record);
        self.leases.index().registered(record, &mut worker, &token_hash);
        let response = proto::RegisterResponse {
            worker: Some(worker),
            session_token: token,
            heartbeat_interval: Some(proto_duration(interval)),
            lease_ttl: Some(proto_duration(lease_ttl)),
        };
        Ok(Response::new(response))
    }

    type HeartbeatStream = HeartbeatStream;

    async fn heartbeat(
        &self,
        request: Request<Streaming<proto::HeartbeatRequest>>,
    ) -> Result<Response<Self::HeartbeatStream>, Status> {
        let state = HeartbeatSession {
            inbound: request.into_inner(),
            leases: Arc::clone(&self.leases),
            shutdown: self.shutdown.clone(),
            token: None,
            ended: false,
        };

        // The response stream is returned at once and every message, the
        // first one included, is checked inside it, so a client that sends
        // only after the call returns does not wait forever. Each response
        // is computed when the transport polls for the next one, so a
        // stream needs no task or channel of its own.
        let responses = futures::stream::unfold(state, |mut session| async move {
            if session.ended {
                return None;
            }

            let message = tokio::select! {
                _ = session.shutdown.cancelled() => {
                    session.ended = true;
                    let status = Status::unavailable("registry is shutting down; reconnect and continue heartbeating");
                    return Some((Err(status), session));
                }
                message = session.inbound.message() => message,
            };

            let heartbeat = match message {
                Ok(Some(heartbeat)) => heartbeat,
                Ok(None) => return None,
                Err(status) => {
                    debug!(error = %status, "heartbeat stream closed by transport error");
                    return None;
                }
            };

            let token_hash = session.token_hash(&heartbeat.session_token);
            let response = handle_heartbeat(&session.leases, &heartbeat, token_hash)
                .await
                .map_err(Status::from);
            session.ended = response.is_err();
            Some((response, session))
        });

        Ok(Response::new(Box::pin(responses)))
    }

    #[instrument(name = "rpc.deregister", skip_all, fields(worker_id = request.get_ref().worker_id))]
    async fn deregister(
        &self,
        request: Request<proto::DeregisterRequest>,
    ) -> Result<Response<proto::DeregisterResponse>, Status> {
        let request = request.into_inner();
        validation::validate_session(request.worker_id, &request.session_token).map_err(ServiceError::from)?;
        let token_hash = hash_token(&request.session_token);

        let now = self.leases.clock().now();
        let result = self
            .leases
            .store()
            .deregister(request.worker_id, &token_hash, now)
            .await;
        let record = match self.observe(result) {
            Ok(record) => record,
            Err(ServiceError::Store(StoreError::NotFound)) => {
                warn!(worker_id = request.worker_id, "deregister rejected: unknown worker");
                return Err(ServiceError::NotFound(format!("worker {} not found", request.worker_id)).into());
            }
            Err(error) => {
                warn!(worker_id = request.worker_id, error = %error, "deregister rejected");
                return Err(error.into());
            }
        };

        self.leases.session_ended(record.id);
        self.leases.index().deregistered(&record);
        info!(worker_id = record.id, name = %record.name, "worker deregistered");

        let response = proto::DeregisterResponse {
            worker: Some(worker_to_proto(&record)),
        };
        Ok(Response::new(response))
    }

    #[instrument(name = "rpc.get", skip_all)]
    async fn get(&self, request: Request<proto::GetRequest>) -> Result<Response<proto::GetResponse>, Status> {
        let store = self.leases.store();
        let record = match request.into_inner().key {
            Some(proto::get_request::Key::Id(id)) => {
                if id <= 0 {
                    let invalid = ValidationError::new("id", format!("must be a positive worker id, got {id}"));
                    return Err(ServiceError::from(invalid).into());
                }
                self.observe(store.get_by_id(id).await)?
                    .ok_or_else(|| ServiceError::NotFound(format!("no worker with id {id}")))?
            }
            Some(proto::get_request::Key::Name(name)) => {
                validation::validate_worker_name("name", &name).map_err(ServiceError::from)?;
                self.observe(store.get_by_name(&name).await)?
                    .ok_or_else(|| ServiceError::NotFound(format!("no worker named {name:?}")))?
            }
            None => {
                let invalid = ValidationError::new("key", "set either id or name");
                return Err(ServiceError::from(invalid).into());
            }
        };

        let response = proto::GetResponse {
            worker: Some(worker_to_proto(&record)),
        };
        Ok(Response::new(response))
    }

    #[instrument(name = "rpc.list", skip_all)]
    async fn list(&self, request: Request<proto::ListRequest>) -> Result<Response<proto::ListResponse>, Status> {
        let request = request.into_inner();
        let filter = validation::validate_list(&request).map_err(ServiceError::from)?;
        let after_id = decode_page_token(&request.page_token, &filter).map_err(ServiceError::from)?;

        let now = self.leases.clock().now();
        // While the database is down, List fails like every other call
        // rather than serve a picture that nothing keeps current.
        if self.leases.database_down() {
            let error = StoreError::Unavailable("the database is unreachable".into());
            return Err(ServiceError::from(error).into());
        }

        let index = self.leases.index();
        if index.is_current() {
            let page = index.list(&filter, after_id, now);
            let next_page_token = page
                .more_after
                .map(|last_id| encode_page_token(last_id, &filter))
                .unwrap_or_default();
            let mut response = proto::ListResponse::new(Vec::new(), next_page_token);
            for worker in page.workers {
                response.push_encoded(worker);
            }
            return Ok(Response::new(response));
        }

        // Until the index has loaded, or while its refreshes fail, List
        // reads from the database.
        let mut records = self.observe(self.leases.store().list(&filter, after_id, now).await)?;
        let next_page_token = if records.len() > filter.page_size {
            records.truncate(filter.page_size);
            let last_id = records.last().map(|record| record.id).unwrap_or(after_id);
            encode_page_token(last_id, &filter)
        } else {
            String::new()
        };

        let response = proto::ListResponse::new(records.iter().map(worker_to_proto).collect(), next_page_token);
        Ok(Response::new(response))
    }
}

/// The state of one Heartbeat stream.
struct HeartbeatSession {
    inbound: Streaming<proto::HeartbeatRequest>,
    leases: Arc<Leases>,
    shutdown: CancellationToken,
    /// The last token seen on this stream and its hash: an agent sends the
    /// same token in every message, so it is hashed once per session.
    token: Option<(String, [u8; 32])>,
    /// Set after a response that ends the stream.
    ended: bool,
}

impl HeartbeatSession {
    fn token_hash(&mut self, token: &str) -> [u8; 32] {
        match &self.token {
            Some((known, hash)) if known == token => *hash,
            _ => {
                let hash = hash_token(token);
                self.token = Some((token.to_string(), hash));
                hash
            }
        }
    }
}

/// Checks one heartbeat whose token hashes to `token_hash` and renews its lease.
async fn handle_heartbeat(
    leases: &Leases,
    heartbeat: &proto::HeartbeatRequest,
    token_hash: [u8; 32],
) -> Result<proto::HeartbeatResponse, ServiceError> {
    validation::validate_session(heartbeat.worker_id, &heartbeat.session_token)?;
    let status = validation::validate_heartbeat_status(heartbeat.status)?;

    let accepted: HeartbeatAccepted = match leases.heartbeat(heartbeat.worker_id, token_hash, status).await {
        Ok(accepted) => accepted,
        Err(error) => {
            warn!(worker_id = heartbeat.worker_id, error = %error, "heartbeat rejected");
            return Err(error.into());
        }
    };
    debug!(worker_id = heartbeat.worker_id, "heartbeat accepted");

    let response = proto::HeartbeatResponse {
        lease_ttl: Some(proto_duration(accepted.lease_ttl)),
        server_time: Some(proto_timestamp(accepted.server_time)),
        lease_deadline: Some(proto_timestamp(accepted.lease_deadline)),
        heartbeat_interval: Some(proto_duration(accepted.heartbeat_interval)),
    };
    Ok(response)
}

/// Builds the page token: the last id of the page and a fingerprint of the
/// filter, so that a token used with another filter is rejected.
fn encode_page_token(last_id: i64, filter: &ListFilter) -> String {
    URL_SAFE_NO_PAD.encode(format!("v1:{last_id}:{}", filter_fingerprint(filter)))
}

fn decode_page_token(token: &str, filter: &ListFilter) -> Result<i64, ValidationError> {
    if token.is_empty() {
        return Ok(0);
    }
    let invalid = || {
        ValidationError::new(
            "page_token",
            "is not a token from a previous List response with the same filters; start again without page_token",
        )
    };

    let bytes = URL_SAFE_NO_PAD.decode(token).map_err(|_| invalid())?;
    let text = String::from_utf8(bytes).map_err(|_| invalid())?;
    let mut parts = text.splitn(3, ':');
    let (Some("v1"), Some(id), Some(fingerprint)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(invalid());
    };
    let last_id: i64 = id.parse().map_err(|_| invalid())?;
    if fingerprint != filter_fingerprint(filter) || last_id < 0 {
        return Err(invalid());
    }
    Ok(last_id)
}

/// Hashes every filter field except the page size, which a client may
/// change between pages.
fn filter_fingerprint(filter: &ListFilter) -> String {
    let canonical = ListFilter {
        page_size: 0,
        ..filter.clone()
    };
    let digest = Sha256::digest(format!("{canonical:?}").as_bytes());
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// Converts a duration to its protobuf form.
pub fn proto_duration(duration: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(duration.as_secs()).unwrap_or(i64::MAX),
        nanos: duration.subsec_nanos() as i32,
    }
}

/// Converts a timestamp to its protobuf form.
pub fn proto_timestamp(time: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: time.timestamp(),
        nanos: time.timestamp_subsec_nanos() as i32,
    }
}

/// Converts a stored worker to its protobuf form. Runtimes are rebuilt
/// from the capabilities document: names from `runtimes`, versions from
/// `runtime_versions` and paths from `detected_interpreters`.
pub fn worker_to_proto(record: &WorkerRecord) -> proto::Worker {
    let capabilities = &record.capabilities;

    let runtime_names: Vec<&str> = capabilities
        .get("runtimes")
        .and_then(Json::as_array)
        .map(|names| names.iter().filter_map(Json::as_str).collect())
        .unwrap_or_default();

    let runtimes = runtime_names
        .iter()
        .map(|name| {
            let version = capabilities
                .get("runtime_versions")
                .and_then(|versions| versions.get(*name))
                .and_then(Json::as_str)
                .unwrap_or_default();
            let path = capabilities
                .get("detected_interpreters")
                .and_then(Json::as_array)
                .and_then(|interpreters| {
                    interpreters
                        .iter()
                        .find(|interpreter| interpreter.get("name").and_then(Json::as_str) == Some(*name))
                })
                .and_then(|interpreter| interpreter.get("path"))
                .and_then(Json::as_str)
                .unwrap_or_default();
            proto::Runtime {
                name: name.to_string(),
                version: version.to_string(),
                path: path.to_string(),
            }
        })
        .collect();

    let labels = string_labels(capabilities).collect();

    proto::Worker {
        id: record.id,
        name: record.name.clone(),
        role: record.role.to_proto() as i32,
        status: record.status.to_proto() as i32,
        host: record.host.clone(),
        runtimes,
        labels,
        capabilities: Some(json_to_struct(capabilities)),
        last_heartbeat: record.last_heartbeat.map(proto_timestamp),
        created: Some(proto_timestamp(record.created)),
        updated: Some(proto_timestamp(record.updated)),
        instance_id: record.instance_id.clone(),
        lease_expires: record.lease_expires.map(proto_timestamp),
    }
}

/// Returns the string-valued pairs of the `labels` object of a
/// capabilities document; other values are not labels a filter can match.
pub fn string_labels(capabilities: &Map<String, Json>) -> impl Iterator<Item = (String, String)> + '_ {
    capabilities
        .get("labels")
        .and_then(Json::as_object)
        .into_iter()
        .flatten()
        .filter_map(|(key, value)| value.as_str().map(|value| (key.clone(), value.to_string())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_token_round_trips_for_same_filter() {
        let filter = ListFilter {
            name_prefix: "sensor-".into(),
            page_size: 10,
            ..Default::default()
        };

        let token = encode_page_token(42, &filter);

        assert_eq!(decode_page_token(&token, &filter).unwrap(), 42);
        let resized = ListFilter {
            page_size: 500,
            ..filter.clone()
        };
        assert_eq!(decode_page_token(&token, &resized).unwrap(), 42);
    }

    #[test]
    fn page_token_rejects_other_filter() {
        let filter = ListFilter::default();
        let token = encode_page_token(42, &filter);
        let other = ListFilter {
            name_prefix: "x".into(),
            ..Default::default()
        };

        assert_eq!(decode_page_token(&token, &other).unwrap_err().field, "page_token");
        assert_eq!(decode_page_token("garbage!", &filter).unwrap_err().field, "page_token");
    }

    #[test]
    fn interval_is_clamped() {
        let policy = GrantPolicy {
            default_interval: Duration::from_secs(30),
            min_interval: Duration::from_secs(1),
            max_interval: Duration::from_secs(300),
            missed_heartbeats: 3,
        };

        assert_eq!(policy.interval(None), Duration::from_secs(30));
        assert_eq!(policy.interval(Some(Duration::ZERO)), Duration::from_secs(30));
        assert_eq!(policy.interval(Some(Duration::from_millis(10))), Duration::from_secs(1));
        assert_eq!(
            policy.interval(Some(Duration::from_secs(900))),
            Duration::from_secs(300)
        );
        assert_eq!(policy.interval(Some(Duration::from_secs(45))), Duration::from_secs(45));
    }
}
