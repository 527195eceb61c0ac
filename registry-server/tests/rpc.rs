//! RPC semantics against a real `registry-server` process on SQLite.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use common::{register_request, sqlite_url, ServerProcess};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use worker_registry::proto::{self, get_request::Key};

fn heartbeat(worker_id: i64, token: &str) -> proto::HeartbeatRequest {
    proto::HeartbeatRequest {
        worker_id,
        session_token: token.to_string(),
        status: 0,
    }
}

/// Sends one heartbeat on a new stream and returns its outcome.
async fn heartbeat_once(
    client: &mut proto::worker_registry_client::WorkerRegistryClient<tonic::transport::Channel>,
    request: proto::HeartbeatRequest,
) -> Result<proto::HeartbeatResponse, tonic::Status> {
    let (sender, receiver) = tokio::sync::mpsc::channel(1);
    sender.send(request).await.unwrap();
    let mut responses = client.heartbeat(ReceiverStream::new(receiver)).await?.into_inner();
    let response = responses.message().await?;
    response.ok_or_else(|| tonic::Status::unknown("stream ended without a response"))
}

/// Re-registering keeps the id, issues a new token and fences the old one.
#[tokio::test]
async fn reregister_keeps_id_and_fences_token() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(&sqlite_url(dir.path()), &[]);
    let mut client = server.client().await;

    let first = client
        .register(register_request("sensor-1", "inst-1"))
        .await
        .unwrap()
        .into_inner();
    let second = client
        .register(register_request("sensor-1", "inst-1"))
        .await
        .unwrap()
        .into_inner();

    let first_id = first.worker.as_ref().unwrap().id;
    assert_eq!(first_id, second.worker.as_ref().unwrap().id);
    assert_ne!(first.session_token, second.session_token);
    assert!(second.session_token.len() >= 22, "token carries at least 128 bits");

    let stale = heartbeat_once(&mut client, heartbeat(first_id, &first.session_token)).await;
    assert_eq!(stale.unwrap_err().code(), Code::FailedPrecondition);

    let current = heartbeat_once(&mut client, heartbeat(first_id, &second.session_token)).await;
    assert!(current.is_ok(), "{current:?}");

    let unknown = heartbeat_once(&mut client, heartbeat(999_999, &second.session_token)).await;
    assert_eq!(unknown.unwrap_err().code(), Code::NotFound);
}

/// Deregister twice succeeds, leaves the worker inactive and ends the lease.
#[tokio::test]
async fn deregister_twice_is_harmless() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(&sqlite_url(dir.path()), &[]);
    let mut client = server.client().await;
    let registered = client
        .register(register_request("sensor-2", "inst-2"))
        .await
        .unwrap()
        .into_inner();
    let id = registered.worker.unwrap().id;
    let request = proto::DeregisterRequest {
        worker_id: id,
        session_token: registered.session_token.clone(),
    };

    let first = client.deregister(request.clone()).await.unwrap().into_inner();
    let second = client.deregister(request).await.unwrap().into_inner();

    assert_eq!(first.worker.unwrap().status, proto::WorkerStatus::Inactive as i32);
    assert_eq!(second.worker.unwrap().status, proto::WorkerStatus::Inactive as i32);
    let stored = client
        .get(proto::GetRequest { key: Some(Key::Id(id)) })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stored.worker.unwrap().status, proto::WorkerStatus::Inactive as i32);

    let after = heartbeat_once(&mut client, heartbeat(id, &registered.session_token)).await;
    assert_eq!(after.unwrap_err().code(), Code::NotFound);

    let unknown = client
        .deregister(proto::DeregisterRequest {
            worker_id: 424_242,
            session_token: "x".into(),
        })
        .await;
    assert_eq!(unknown.unwrap_err().code(), Code::NotFound);
}

/// A client that sends its first heartbeat only after the call returned gets a response.
#[tokio::test]
async fn heartbeat_first_message_after_call() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(&sqlite_url(dir.path()), &[]);
    let mut client = server.client().await;
    let registered = client
        .register(register_request("sensor-3", "inst-3"))
        .await
        .unwrap()
        .into_inner();
    let id = registered.worker.unwrap().id;

    let (sender, receiver) = tokio::sync::mpsc::channel(4);
    let call = tokio::time::timeout(Duration::from_secs(5), client.heartbeat(ReceiverStream::new(receiver)));
    let mut responses = call
        .await
        .expect("Heartbeat call returned before any message")
        .unwrap()
        .into_inner();

    for _ in 0..3 {
        sender.send(heartbeat(id, &registered.session_token)).await.unwrap();
        let response = tokio::time::timeout(Duration::from_secs(5), responses.message())
            .await
            .expect("one response per request")
            .unwrap()
            .expect("stream still open");
        assert_eq!(response.lease_ttl.unwrap().seconds, 90);
        assert!(response.server_time.is_some());
    }
}

/// Heartbeats with status BUSY are written by the next flush.
#[tokio::test]
async fn heartbeat_status_busy_is_stored() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(&sqlite_url(dir.path()), &["--flush-interval", "100ms"]);
    let mut client = server.client().await;
    let registered = client
        .register(register_request("sensor-4", "inst-4"))
        .await
        .unwrap()
        .into_inner();
    let id = registered.worker.unwrap().id;
    let mut busy = heartbeat(id, &registered.session_token);
    busy.status = proto::WorkerStatus::Busy as i32;

    heartbeat_once(&mut client, busy).await.unwrap();

    let stored = common::wait_until(Duration::from_secs(3), || {
        let mut client = client.clone();
        async move {
            let worker = client
                .get(proto::GetRequest { key: Some(Key::Id(id)) })
                .await
                .unwrap()
                .into_inner()
                .worker;
            worker.unwrap().status == proto::WorkerStatus::Busy as i32
        }
    })
    .await;
    assert!(stored, "status busy reached the database");

    let mut invalid = heartbeat(id, &registered.session_token);
    invalid.status = proto::WorkerStatus::Inactive as i32;
    let rejected = heartbeat_once(&mut client, invalid).await.unwrap_err();
    assert_eq!(rejected.code(), Code::InvalidArgument);
    assert!(rejected.message().contains("status"), "{}", rejected.message());
}

/// Get finds workers by id and by name and reports unknown ones as NOT_FOUND.
#[tokio::test]
async fn get_by_id_and_name() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(&sqlite_url(dir.path()), &[]);
    let mut client = server.client().await;
    let registered = client
        .register(register_request("sensor-5", "inst-5"))
        .await
        .unwrap()
        .into_inner();
    let id = registered.worker.unwrap().id;

    let by_id = client
        .get(proto::GetRequest { key: Some(Key::Id(id)) })
        .await
        .unwrap()
        .into_inner();
    let by_name = client
        .get(proto::GetRequest {
            key: Some(Key::Name("sensor-5".into())),
        })
        .await
        .unwrap()
        .into_inner();

    assert_eq!(by_id.worker.as_ref().unwrap().name, "sensor-5");
    assert_eq!(by_name.worker.as_ref().unwrap().id, id);

    let missing = client
        .get(proto::GetRequest {
            key: Some(Key::Name("nobody".into())),
        })
        .await;
    assert_eq!(missing.unwrap_err().code(), Code::NotFound);
    let empty = client.get(proto::GetRequest { key: None }).await.unwrap_err();
    assert_eq!(empty.code(), Code::InvalidArgument);
}

/// The fixture worker of the List tests, with the attributes filters look at.
#[derive(Debug, Clone)]
struct Fixture {
    name: String,
    role: proto::WorkerRole,
    runtimes: Vec<&'static str>,
    labels: BTreeMap<String, String>,
    inactive: bool,
}

fn fixture(index: usize) -> Fixture {
    let roles = [
        proto::WorkerRole::Action,
        proto::WorkerRole::Sensor,
        proto::WorkerRole::Hybrid,
    ];
    let mut runtimes = vec!["shell"];
    if index % 2 == 0 {
        runtimes.push("python");
    }
    if index % 3 == 0 {
        runtimes.push("node");
    }
    let mut labels = BTreeMap::new();
    labels.insert("zone".to_string(), format!("z{}", index % 4));
    if index % 5 == 0 {
        labels.insert("gpu".to_string(), "true".to_string());
    }
    let prefix = if index % 2 == 0 { "alpha" } else { "beta" };
    Fixture {
        name: format!("{prefix}-{index:03}"),
        role: roles[index % 3],
        runtimes,
        labels,
        inactive: index % 7 == 0,
    }
}

/// Collects every page of a List request and returns the names in order.
async fn list_all(
    client: &mut proto::worker_registry_client::WorkerRegistryClient<tonic::transport::Channel>,
    mut request: proto::ListRequest,
) -> Vec<proto::Worker> {
    let mut workers = Vec::new();
    loop {
        let response = client.list(request.clone()).await.unwrap().into_inner();
        workers.extend(response.workers);
        if response.next_page_token.is_empty() {
            return workers;
        }
        request.page_token = response.next_page_token;
    }
}

/// Every List filter, alone and combined, matches the selection computed here.
#[tokio::test]
async fn list_filters_match_fixture() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(&sqlite_url(dir.path()), &[]);
    let mut client = server.client().await;

    let fixtures: Vec<Fixture> = (0..210).map(fixture).collect();
    for item in &fixtures {
        let mut request = register_request(&item.name, &format!("inst-{}", item.name));
        request.role = item.role as i32;
        request.runtimes = item
            .runtimes
            .iter()
            .map(|name| proto::Runtime {
                name: name.to_string(),
                ..Default::default()
            })
            .collect();
        request.labels = item.labels.clone().into_iter().collect();
        let registered = client.register(request).await.unwrap().into_inner();
        if item.inactive {
            client
                .deregister(proto::DeregisterRequest {
                    worker_id: registered.worker.unwrap().id,
                    session_token: registered.session_token,
                })
                .await
                .unwrap();
        }
    }

    type Predicate = Box<dyn Fn(&Fixture) -> bool>;
    let label = |key: &str, value: &str| (key.to_string(), value.to_string());
    let cases: Vec<(&str, proto::ListRequest, Predicate)> = vec![
        ("everything", proto::ListRequest::default(), Box::new(|_| true)),
        (
            "role sensor",
            proto::ListRequest {
                role: proto::WorkerRole::Sensor as i32,
                ..Default::default()
            },
            Box::new(|f| f.role == proto::WorkerRole::Sensor),
        ),
        (
            "status inactive",
            proto::ListRequest {
                statuses: vec![proto::WorkerStatus::Inactive as i32],
                ..Default::default()
            },
            Box::new(|f| f.inactive),
        ),
        (
            "status active or busy",
            proto::ListRequest {
                statuses: vec![proto::WorkerStatus::Active as i32, proto::WorkerStatus::Busy as i32],
                ..Default::default()
            },
            Box::new(|f| !f.inactive),
        ),
        (
            "runtime python",
            proto::ListRequest {
                runtimes: vec!["python3".into()],
                ..Default::default()
            },
            Box::new(|f| f.runtimes.contains(&"python")),
        ),
        (
            "runtimes python and node",
            proto::ListRequest {
                runtimes: vec!["python".into(), "nodejs".into()],
                ..Default::default()
            },
            Box::new(|f| f.runtimes.contains(&"python") && f.runtimes.contains(&"node")),
        ),
        (
            "label zone z1",
            proto::ListRequest {
                labels: [label("zone", "z1")].into_iter().collect(),
                ..Default::default()
            },
            Box::new(|f| f.labels.get("zone").map(String::as_str) == Some("z1")),
        ),
        (
            "labels zone z0 and gpu",
            proto::ListRequest {
                labels: [label("zone", "z0"), label("gpu", "true")].into_iter().collect(),
                ..Default::default()
            },
            Box::new(|f| f.labels.get("zone").map(String::as_str) == Some("z0") && f.labels.contains_key("gpu")),
        ),
        (
            "name prefix beta",
            proto::ListRequest {
                name_prefix: "beta-".into(),
                ..Default::default()
            },
            Box::new(|f| f.name.starts_with("beta-")),
        ),
        (
            "heartbeat age 1h",
            proto::ListRequest {
                max_heartbeat_age: Some(prost_types::Duration {
                    seconds: 3600,
                    nanos: 0,
                }),
                ..Default::default()
            },
            Box::new(|_| true),
        ),
        (
            "combined",
            proto::ListRequest {
                role: proto::WorkerRole::Hybrid as i32,
                statuses: vec![proto::WorkerStatus::Active as i32],
                runtimes: vec!["python".into()],
                labels: [label("zone", "z2")].into_iter().collect(),
                name_prefix: "alpha".into(),
                max_heartbeat_age: Some(prost_types::Duration {
                    seconds: 3600,
                    nanos: 0,
                }),
                page_size: 7,
                ..Default::default()
            },
            Box::new(|f| {
                f.role == proto::WorkerRole::Hybrid
                    && !f.inactive
                    && f.runtimes.contains(&"python")
                    && f.labels.get("zone").map(String::as_str) == Some("z2")
                    && f.name.starts_with("alpha")
            }),
        ),
    ];

    for (case, request, predicate) in cases {
        for page_size in [0, 13] {
            let mut paged = request.clone();
            if paged.page_size == 0 {
                paged.page_size = page_size;
            }
            let listed: Vec<String> = list_all(&mut client, paged).await.into_iter().map(|w| w.name).collect();
            let expected: Vec<String> = fixtures
                .iter()
                .filter(|f| predicate(f))
                .map(|f| f.name.clone())
                .collect();
            assert_eq!(listed, expected, "case {case:?} with page size {page_size}");
        }
    }

    let none = list_all(
        &mut client,
        proto::ListRequest {
            max_heartbeat_age: Some(prost_types::Duration { seconds: 0, nanos: 0 }),
            runtimes: vec!["ruby".into()],
            ..Default::default()
        },
    )
    .await;
    assert!(none.is_empty());
}

/// Paging visits every worker exactly once while new workers are registered.
#[tokio::test]
async fn list_paging_during_registration() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(&sqlite_url(dir.path()), &[]);
    let mut client = server.client().await;
    for index in 0..250 {
        let name = format!("page-{index:04}");
        client.register(register_request(&name, &name)).await.unwrap();
    }

    let mut writer = server.client().await;
    let registering = tokio::spawn(async move {
        for index in 250..400 {
            let name = format!("page-{index:04}");
            writer.register(register_request(&name, &name)).await.unwrap();
        }
    });

    let mut seen = Vec::new();
    let mut request = proto::ListRequest {
        page_size: 10,
        ..Default::default()
    };
    loop {
        let response = client.list(request.clone()).await.unwrap().into_inner();
        seen.extend(response.workers.into_iter().map(|w| w.name));
        if response.next_page_token.is_empty() {
            break;
        }
        request.page_token = response.next_page_token;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    registering.await.unwrap();

    let unique: HashSet<&String> = seen.iter().collect();
    assert_eq!(unique.len(), seen.len(), "no worker appears twice");
    for index in 0..250 {
        let name = format!("page-{index:04}");
        assert!(
            unique.contains(&name),
            "{name} present before paging started was visited"
        );
    }
    let mut sorted = seen.clone();
    sorted.sort();
    assert_eq!(sorted, seen, "pages are in id order");
}

/// A page token used with a different filter is rejected.
#[tokio::test]
async fn list_page_token_checks_filter() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(&sqlite_url(dir.path()), &[]);
    let mut client = server.client().await;
    for index in 0..3 {
        let name = format!("tok-{index}");
        client.register(register_request(&name, &name)).await.unwrap();
    }
    let first = client
        .list(proto::ListRequest {
            page_size: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();

    let other_filter = client
        .list(proto::ListRequest {
            page_size: 1,
            name_prefix: "x".into(),
            page_token: first.next_page_token.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();

    assert_eq!(other_filter.code(), Code::InvalidArgument);
    assert!(other_filter.message().contains("page_token"));
}

/// A bad Register request, with the field its error must name.
struct BadInput {
    case: &'static str,
    request: proto::RegisterRequest,
    field: &'static str,
}

fn runtime(name: &str) -> proto::Runtime {
    proto::Runtime {
        name: name.to_string(),
        ..Default::default()
    }
}

fn nested_capabilities(depth: usize) -> prost_types::Struct {
    let mut value = serde_json::json!("leaf");
    for _ in 0..depth {
        value = serde_json::json!({ "next": value });
    }
    worker_registry::json::json_to_struct(value.as_object().unwrap())
}

/// Each bad input gets INVALID_ARGUMENT naming the field, and nothing is stored.
#[tokio::test]
async fn register_rejects_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(&sqlite_url(dir.path()), &[]);
    let mut client = server.client().await;
    let base = || register_request("bad-input", "inst");

    let large = serde_json::json!({ "blob": "x".repeat(20 * 1024) });
    let cases = vec![
        BadInput {
            case: "empty name",
            request: proto::RegisterRequest {
                name: String::new(),
                ..base()
            },
            field: "name",
        },
        BadInput {
            case: "10 KB name",
            request: proto::RegisterRequest {
                name: "n".repeat(10 * 1024),
                ..base()
            },
            field: "name",
        },
        BadInput {
            case: "name with NUL",
            request: proto::RegisterRequest {
                name: "bad\0input".into(),
                ..base()
            },
            field: "name",
        },
        BadInput {
            case: "name with newline",
            request: proto::RegisterRequest {
                name: "bad\ninput".into(),
                ..base()
            },
            field: "name",
        },
        BadInput {
            case: "unknown role",
            request: proto::RegisterRequest { role: 42, ..base() },
            field: "role",
        },
        BadInput {
            case: "too many runtimes",
            request: proto::RegisterRequest {
                runtimes: (0..40).map(|i| runtime(&format!("rt{i}"))).collect(),
                ..base()
            },
            field: "runtimes",
        },
        BadInput {
            case: "duplicated runtime",
            request: proto::RegisterRequest {
                runtimes: vec![runtime("node"), runtime("nodejs")],
                ..base()
            },
            field: "runtimes[1].name",
        },
        BadInput {
            case: "relative runtime path",
            request: proto::RegisterRequest {
                runtimes: vec![proto::Runtime {
                    name: "python".into(),
                    version: "3.11".into(),
                    path: "bin/python3".into(),
                }],
                ..base()
            },
            field: "runtimes[0].path",
        },
        BadInput {
            case: "capabilities too large",
            request: proto::RegisterRequest {
                capabilities: Some(worker_registry::json::json_to_struct(large.as_object().unwrap())),
                ..base()
            },
            field: "capabilities",
        },
        BadInput {
            case: "capabilities too deep",
            request: proto::RegisterRequest {
                capabilities: Some(nested_capabilities(12)),
                ..base()
            },
            field: "capabilities",
        },
        BadInput {
            case: "capability string with NUL",
            request: proto::RegisterRequest {
                capabilities: Some(worker_registry::json::json_to_struct(
                    serde_json::json!({"note": "a\u{0}b"}).as_object().unwrap(),
                )),
                ..base()
            },
            field: "capabilities.note",
        },
        BadInput {
            case: "invalid label key",
            request: proto::RegisterRequest {
                labels: [("bad key!".to_string(), "v".to_string())].into_iter().collect(),
                ..base()
            },
            field: "labels key",
        },
        BadInput {
            case: "host with NUL",
            request: proto::RegisterRequest {
                host: "h\0".into(),
                ..base()
            },
            field: "host",
        },
    ];

    for case in cases {
        let error = client.register(case.request).await.unwrap_err();
        assert_eq!(
            error.code(),
            Code::InvalidArgument,
            "case {:?}: {}",
            case.case,
            error.message()
        );
        assert!(
            error.message().contains(case.field),
            "case {:?}: message {:?} names {:?}",
            case.case,
            error.message(),
            case.field
        );
    }

    let stored = client.list(proto::ListRequest::default()).await.unwrap().into_inner();
    assert!(stored.workers.is_empty(), "nothing stored: {:?}", stored.workers);
}

/// A message above the decoded size limit is rejected before it is parsed.
#[tokio::test]
async fn oversized_message_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(&sqlite_url(dir.path()), &[]);
    let mut client = server.client().await;
    let mut request = register_request("huge", "inst");
    request.host = "h".repeat(300 * 1024);

    let error = client.register(request).await.unwrap_err();

    assert_eq!(error.code(), Code::OutOfRange, "{}", error.message());
    let stored = client.list(proto::ListRequest::default()).await.unwrap().into_inner();
    assert!(stored.workers.is_empty());
}
