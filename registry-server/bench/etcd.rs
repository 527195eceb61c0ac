//! A minimal client of etcd's v3 `Lease` service: LeaseGrant and
//! LeaseKeepAlive, the two calls an agent would use to hold a lease.
//!
//! The messages are declared here with prost, field numbers as in etcd's
//! `etcdserverpb/rpc.proto` (3.4 and later), because the `etcd-client`
//! crate compiles its protos with a system `protoc`, which this workspace
//! does not need anywhere else.

use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Channel;
use tonic::Request;
use tonic_prost::ProstCodec;

use crate::ladder::{AgentStream, MAX_OUTSTANDING};

/// `etcdserverpb.ResponseHeader`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ResponseHeader {
    #[prost(uint64, tag = "1")]
    pub cluster_id: u64,
    #[prost(uint64, tag = "2")]
    pub member_id: u64,
    #[prost(int64, tag = "3")]
    pub revision: i64,
    #[prost(uint64, tag = "4")]
    pub raft_term: u64,
}

/// `etcdserverpb.LeaseGrantRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct LeaseGrantRequest {
    #[prost(int64, tag = "1")]
    pub ttl: i64,
    #[prost(int64, tag = "2")]
    pub id: i64,
}

/// `etcdserverpb.LeaseGrantResponse`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct LeaseGrantResponse {
    #[prost(message, optional, tag = "1")]
    pub header: Option<ResponseHeader>,
    #[prost(int64, tag = "2")]
    pub id: i64,
    #[prost(int64, tag = "3")]
    pub ttl: i64,
    #[prost(string, tag = "4")]
    pub error: String,
}

/// `etcdserverpb.LeaseKeepAliveRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct LeaseKeepAliveRequest {
    #[prost(int64, tag = "1")]
    pub id: i64,
}

/// `etcdserverpb.LeaseKeepAliveResponse`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct LeaseKeepAliveResponse {
    #[prost(message, optional, tag = "1")]
    pub header: Option<ResponseHeader>,
    #[prost(int64, tag = "2")]
    pub id: i64,
    #[prost(int64, tag = "3")]
    pub ttl: i64,
}

/// Checks a keepalive response: etcd returns TTL 0 for an unknown or expired lease.
pub fn keepalive_accepted(response: &LeaseKeepAliveResponse) -> bool {
    response.ttl > 0
}

/// Grants a lease of `ttl` on `channel` and opens its keepalive stream.
pub async fn open_lease(
    channel: Channel,
    ttl: Duration,
) -> anyhow::Result<AgentStream<LeaseKeepAliveRequest, LeaseKeepAliveResponse>> {
    let mut grpc = tonic::client::Grpc::new(channel);

    grpc.ready()
        .await
        .map_err(|e| anyhow::anyhow!("etcd connection not ready: {e}"))?;
    let grant = LeaseGrantRequest {
        ttl: ttl.as_secs() as i64,
        id: 0,
    };
    let granted = grpc
        .unary(
            Request::new(grant),
            PathAndQuery::from_static("/etcdserverpb.Lease/LeaseGrant"),
            ProstCodec::<LeaseGrantRequest, LeaseGrantResponse>::default(),
        )
        .await
        .map_err(|e| anyhow::anyhow!("etcd LeaseGrant failed: {e}"))?
        .into_inner();
    if !granted.error.is_empty() {
        anyhow::bail!("etcd LeaseGrant failed: {}", granted.error);
    }

    // etcd sends response headers with the first keepalive response, so the
    // first request goes into the stream before the call is awaited.
    let request = LeaseKeepAliveRequest { id: granted.id };
    let (sender, receiver) = mpsc::channel(MAX_OUTSTANDING);
    sender.try_send(request.clone()).expect("a new channel has room");
    let first_sent = Instant::now();

    grpc.ready()
        .await
        .map_err(|e| anyhow::anyhow!("etcd connection not ready: {e}"))?;
    let responses = grpc
        .streaming(
            Request::new(ReceiverStream::new(receiver)),
            PathAndQuery::from_static("/etcdserverpb.Lease/LeaseKeepAlive"),
            ProstCodec::<LeaseKeepAliveRequest, LeaseKeepAliveResponse>::default(),
        )
        .await
        .map_err(|e| anyhow::anyhow!("etcd LeaseKeepAlive failed: {e}"))?
        .into_inner();

    Ok(AgentStream {
        sender,
        responses,
        request,
        first_sent,
    })
}
