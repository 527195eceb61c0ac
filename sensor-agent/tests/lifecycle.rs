//! The agent against a real `registry-server` on loopback: start-up order,
//! server restarts, lost rows, takeover by instance id, fail-over and
//! shutdown on SIGTERM.

mod common;

use std::path::Path;
use std::str::FromStr;
use std::time::{Duration, Instant, SystemTime};

use common::{
    client, find_worker, free_port, is_active, list_by_prefix, poll, start_agent, AgentOptions, ProcessGuard, Server,
};
use nix::sys::signal::Signal;
use sqlx::sqlite::SqliteConnectOptions;
use sqlx::ConnectOptions;
use worker_registry::proto::{self, Worker};

/// Heartbeat interval the agents request; the test server grants it.
const INTERVAL: Duration = Duration::from_millis(300);
const INTERVAL_TEXT: &str = "300ms";

/// Backoff cap of the agents, so that retries stay short.
const BACKOFF_CAP: Duration = Duration::from_millis(500);
const BACKOFF_CAP_TEXT: &str = "500ms";

/// Allowance for process start-up and scheduling on a loaded two-core machine.
const SLACK: Duration = Duration::from_secs(1);

/// Bound on waits that only guard against a hung test.
const LONG_WAIT: Duration = Duration::from_secs(15);

fn agent_options<'a>(name: &'a str, urls: Vec<String>, state_dir: &'a Path) -> AgentOptions<'a> {
    AgentOptions {
        name,
        urls,
        state_dir,
        heartbeat_interval: INTERVAL_TEXT,
        backoff_cap: BACKOFF_CAP_TEXT,
        extra_args: Vec::new(),
    }
}

/// Waits until `name` is listed as active and returns it.
async fn wait_active(url: &str, name: &str, timeout: Duration) -> Option<Worker> {
    let registry = client(url).await;
    poll(timeout, || {
        let mut registry = registry.clone();
        async move { find_worker(&mut registry, name).await.filter(is_active) }
    })
    .await
}

fn timestamp_after(timestamp: Option<&prost_types::Timestamp>, moment: SystemTime) -> bool {
    let Some(timestamp) = timestamp else {
        return false;
    };
    let Ok(time) = SystemTime::try_from(*timestamp) else {
        return false;
    };
    time > moment
}

fn agent_logs(agent: &ProcessGuard) -> String {
    agent.logs.dump()
}

/// An agent started beside a running server is listed as active with its
/// detected runtimes soon after start. The bound is 2 s so that a loaded
/// test machine does not fail it; unloaded, it takes about 100 ms.
#[tokio::test(flavor = "multi_thread")]
async fn agent_registers_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("registry.db"), "127.0.0.1:0");
    let started = Instant::now();
    let agent = start_agent(&agent_options("sensor-quick", vec![server.url()], dir.path()));

    let worker = wait_active(&server.url(), "sensor-quick", LONG_WAIT).await;

    let elapsed = started.elapsed();
    let worker = worker.unwrap_or_else(|| panic!("agent never registered; logs:\n{}", agent_logs(&agent)));
    assert!(elapsed < Duration::from_secs(2), "registered after {elapsed:?}");
    assert_eq!(worker.role, proto::WorkerRole::Sensor as i32);
    let names: Vec<&str> = worker.runtimes.iter().map(|runtime| runtime.name.as_str()).collect();
    assert!(names.contains(&"shell"), "runtimes {names:?}");
    assert!(names.contains(&"native"), "runtimes {names:?}");
    let capabilities = worker.capabilities.expect("capabilities document");
    assert!(capabilities.fields.contains_key("sensor_version"), "{capabilities:?}");
    assert!(
        capabilities.fields.contains_key("max_concurrent_sensors"),
        "{capabilities:?}"
    );
}

/// An agent started 10 s before the server registers within one backoff
/// step of the server coming up.
#[tokio::test(flavor = "multi_thread")]
async fn agent_started_before_server() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let agent = start_agent(&agent_options("sensor-early", vec![url.clone()], dir.path()));

    tokio::time::sleep(Duration::from_secs(10)).await;
    let _server = Server::start(&dir.path().join("registry.db"), &format!("127.0.0.1:{port}"));
    let up = Instant::now();

    let worker = wait_active(&url, "sensor-early", LONG_WAIT).await;

    let elapsed = up.elapsed();
    assert!(
        worker.is_some(),
        "agent never registered; logs:\n{}",
        agent_logs(&agent)
    );
    assert!(
        elapsed < BACKOFF_CAP + SLACK,
        "registered {elapsed:?} after the server came up; logs:\n{}",
        agent_logs(&agent)
    );
    let retries = agent.logs.with_message("registration failed; retrying");
    assert!(
        retries.len() >= 5,
        "expected retries during 10 s, got {}",
        retries.len()
    );
    assert!(
        retries.iter().all(|entry| entry["fields"]["attempt"].is_u64()),
        "{retries:?}"
    );
}

/// After the server is killed with SIGKILL and restarted on the same
/// database, heartbeats resume under the same worker id in a single row.
#[tokio::test(flavor = "multi_thread")]
async fn server_restart_keeps_worker() {
    let dir = tempfile::tempdir().unwrap();
    let database = dir.path().join("registry.db");
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut server = Server::start(&database, &listen);
    let agent = start_agent(&agent_options("sensor-restart", vec![server.url()], dir.path()));
    let first = wait_active(&server.url(), "sensor-restart", LONG_WAIT)
        .await
        .unwrap_or_else(|| panic!("agent never registered; logs:\n{}", agent_logs(&agent)));

    server.process.signal(Signal::SIGKILL);
    server.process.wait_exit(LONG_WAIT).expect("server exits after SIGKILL");
    let restarted_at = SystemTime::now();
    let server = Server::start(&database, &listen);

    let mut registry = client(&server.url()).await;
    let resumed = poll(LONG_WAIT, || {
        let mut registry = registry.clone();
        async move {
            find_worker(&mut registry, "sensor-restart")
                .await
                .filter(|worker| is_active(worker) && timestamp_after(worker.last_heartbeat.as_ref(), restarted_at))
        }
    })
    .await
    .unwrap_or_else(|| panic!("no heartbeat after the restart; logs:\n{}", agent_logs(&agent)));

    assert_eq!(resumed.id, first.id);
    assert_eq!(list_by_prefix(&mut registry, "sensor-restart").await.len(), 1);
    assert_eq!(count_rows(&database).await, 1);
}

async fn count_rows(database: &Path) -> i64 {
    let mut connection = sqlite_connection(database).await;
    sqlx::query_scalar("SELECT COUNT(*) FROM worker")
        .fetch_one(&mut connection)
        .await
        .expect("count rows")
}

async fn sqlite_connection(database: &Path) -> sqlx::SqliteConnection {
    SqliteConnectOptions::from_str(&format!("sqlite://{}", database.display()))
        .expect("valid SQLite URL")
        .busy_timeout(Duration::from_secs(5))
        .connect()
        .await
        .expect("open the registry database")
}

/// When the worker's row is deleted behind the server's back, the agent is
/// registered again within one heartbeat interval.
#[tokio::test(flavor = "multi_thread")]
async fn deleted_row_is_registered_again() {
    let dir = tempfile::tempdir().unwrap();
    let database = dir.path().join("registry.db");
    let server = Server::start(&database, "127.0.0.1:0");
    let agent = start_agent(&agent_options("sensor-deleted", vec![server.url()], dir.path()));
    let first = wait_active(&server.url(), "sensor-deleted", LONG_WAIT)
        .await
        .unwrap_or_else(|| panic!("agent never registered; logs:\n{}", agent_logs(&agent)));

    let mut connection = sqlite_connection(&database).await;
    let deleted = sqlx::query("DELETE FROM worker WHERE name = ?")
        .bind("sensor-deleted")
        .execute(&mut connection)
        .await
        .expect("delete the worker row");
    assert_eq!(deleted.rows_affected(), 1);
    let deleted_at = Instant::now();

    // The new row has a new id; SQLite's AUTOINCREMENT never reuses one.
    let registry = client(&server.url()).await;
    let again = poll(LONG_WAIT, || {
        let mut registry = registry.clone();
        async move {
            find_worker(&mut registry, "sensor-deleted")
                .await
                .filter(|worker| is_active(worker) && worker.id != first.id)
        }
    })
    .await;

    let elapsed = deleted_at.elapsed();
    assert!(
        again.is_some(),
        "agent never registered again; logs:\n{}",
        agent_logs(&agent)
    );
    assert!(
        elapsed < INTERVAL + SLACK,
        "registered again after {elapsed:?}; logs:\n{}",
        agent_logs(&agent)
    );
    assert!(
        !agent.logs.with_message("lease lost; registering again").is_empty(),
        "no lease-lost log; logs:\n{}",
        agent_logs(&agent)
    );
}

/// SIGTERM makes the worker inactive within 1 s, and the agent exits 0.
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_deregisters() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("registry.db"), "127.0.0.1:0");
    let mut options = agent_options("sensor-term", vec![server.url()], dir.path());
    // A 15 s lease (5 s times 3 missed heartbeats) cannot expire during the
    // check, so only the Deregister call can make the worker inactive.
    options.heartbeat_interval = "5s";
    let mut agent = start_agent(&options);
    wait_active(&server.url(), "sensor-term", LONG_WAIT)
        .await
        .unwrap_or_else(|| panic!("agent never registered; logs:\n{}", agent_logs(&agent)));
    let mut registry = client(&server.url()).await;

    agent.signal(Signal::SIGTERM);
    let signalled = Instant::now();

    let inactive = poll(Duration::from_secs(1), || {
        let mut registry = registry.clone();
        async move {
            find_worker(&mut registry, "sensor-term")
                .await
                .filter(|worker| worker.status == proto::WorkerStatus::Inactive as i32)
        }
    })
    .await;
    assert!(
        inactive.is_some(),
        "worker not inactive 1 s after SIGTERM; logs:\n{}",
        agent_logs(&agent)
    );
    let status = agent
        .wait_exit(Duration::from_secs(3))
        .expect("agent exits after SIGTERM");
    assert!(
        status.success(),
        "agent exited with {status}; logs:\n{}",
        agent_logs(&agent)
    );
    assert!(signalled.elapsed() < Duration::from_secs(3));
    assert!(
        !agent.logs.with_message("deregistered").is_empty(),
        "no deregistered log"
    );
    assert!(find_worker(&mut registry, "sensor-term").await.is_some());
}

/// With the server killed, SIGTERM still ends the agent with status 0 within 3 s.
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_with_server_down() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(&dir.path().join("registry.db"), "127.0.0.1:0");
    let mut agent = start_agent(&agent_options("sensor-down", vec![server.url()], dir.path()));
    wait_active(&server.url(), "sensor-down", LONG_WAIT)
        .await
        .unwrap_or_else(|| panic!("agent never registered; logs:\n{}", agent_logs(&agent)));
    server.process.kill();

    agent.signal(Signal::SIGTERM);

    let status = agent.wait_exit(Duration::from_secs(3));
    assert!(
        status.is_some(),
        "agent still running 3 s after SIGTERM; logs:\n{}",
        agent_logs(&agent)
    );
    assert!(status.unwrap().success(), "logs:\n{}", agent_logs(&agent));
}

/// With the server frozen by SIGSTOP, which keeps connections open but
/// sends no response, SIGTERM still ends the agent with status 0 within 3 s.
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_with_server_frozen() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("registry.db"), "127.0.0.1:0");
    let mut agent = start_agent(&agent_options("sensor-frozen", vec![server.url()], dir.path()));
    wait_active(&server.url(), "sensor-frozen", LONG_WAIT)
        .await
        .unwrap_or_else(|| panic!("agent never registered; logs:\n{}", agent_logs(&agent)));
    server.process.signal(Signal::SIGSTOP);

    agent.signal(Signal::SIGTERM);

    let status = agent.wait_exit(Duration::from_secs(3));
    server.process.signal(Signal::SIGCONT);
    assert!(
        status.is_some(),
        "agent still running 3 s after SIGTERM; logs:\n{}",
        agent_logs(&agent)
    );
    assert!(status.unwrap().success(), "logs:\n{}", agent_logs(&agent));
}

/// An agent killed with SIGKILL and restarted with the same state directory
/// takes over its live lease at once under the same worker id.
#[tokio::test(flavor = "multi_thread")]
async fn restarted_agent_takes_over() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("registry.db"), "127.0.0.1:0");
    let options = agent_options("sensor-crash", vec![server.url()], dir.path());
    let mut first_agent = start_agent(&options);
    let first = wait_active(&server.url(), "sensor-crash", LONG_WAIT)
        .await
        .unwrap_or_else(|| panic!("agent never registered; logs:\n{}", agent_logs(&first_agent)));
    first_agent.kill();

    let second_agent = start_agent(&options);
    let registered = second_agent.logs.wait_for("registered", Duration::from_secs(5));

    assert!(
        registered.is_some(),
        "restart did not register; logs:\n{}",
        agent_logs(&second_agent)
    );
    assert_eq!(registered.unwrap()["fields"]["worker_id"], first.id);
    assert!(
        second_agent
            .logs
            .with_message("registration failed; retrying")
            .is_empty(),
        "restart had to retry; logs:\n{}",
        agent_logs(&second_agent)
    );
}

/// A second installation with the same name is rejected while the first
/// holds the lease, keeps retrying, and takes over once the first stops.
#[tokio::test(flavor = "multi_thread")]
async fn other_instance_waits_for_lease() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("registry.db"), "127.0.0.1:0");
    let first_state = dir.path().join("first");
    let second_state = dir.path().join("second");
    let mut first_agent = start_agent(&agent_options("sensor-shared", vec![server.url()], &first_state));
    let first = wait_active(&server.url(), "sensor-shared", LONG_WAIT)
        .await
        .unwrap_or_else(|| panic!("first agent never registered; logs:\n{}", agent_logs(&first_agent)));

    let second_agent = start_agent(&agent_options("sensor-shared", vec![server.url()], &second_state));
    let rejected = second_agent
        .logs
        .wait_for("registration failed; retrying", LONG_WAIT)
        .unwrap_or_else(|| panic!("second agent was not rejected; logs:\n{}", agent_logs(&second_agent)));
    let reason = rejected["fields"]["reason"].as_str().unwrap_or_default().to_string();
    assert!(reason.contains("AlreadyExists"), "reason: {reason}");
    assert!(second_agent.logs.with_message("registered").is_empty());

    first_agent.signal(Signal::SIGTERM);
    first_agent
        .wait_exit(Duration::from_secs(3))
        .expect("first agent exits");
    let registered = second_agent.logs.wait_for("registered", BACKOFF_CAP + SLACK + SLACK);

    assert!(
        registered.is_some(),
        "second agent never took over; logs:\n{}",
        agent_logs(&second_agent)
    );
    assert_eq!(registered.unwrap()["fields"]["worker_id"], first.id);
}

/// With an unreachable first address, the agent fails over to the second,
/// and the retry log names the address that refused and the cause.
#[tokio::test(flavor = "multi_thread")]
async fn fails_over_to_next_url() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("registry.db"), "127.0.0.1:0");
    let dead_url = format!("http://127.0.0.1:{}", free_port());
    let agent = start_agent(&agent_options(
        "sensor-failover",
        vec![dead_url.clone(), server.url()],
        dir.path(),
    ));

    let worker = wait_active(&server.url(), "sensor-failover", Duration::from_secs(5)).await;

    assert!(
        worker.is_some(),
        "agent never reached the second address; logs:\n{}",
        agent_logs(&agent)
    );
    let registered = agent
        .logs
        .wait_for("registered", Duration::from_secs(1))
        .expect("registered log");
    assert_eq!(registered["fields"]["registry"], server.url().as_str());
    let retry = agent
        .logs
        .wait_for("registration failed; retrying", Duration::from_secs(1))
        .unwrap_or_else(|| panic!("no retry log; logs:\n{}", agent_logs(&agent)));
    assert_eq!(retry["fields"]["registry"], dead_url.as_str());
    let reason = retry["fields"]["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("Connection refused"), "reason: {reason}");
}

/// A registry that shuts down ends the heartbeat stream, and the agent
/// notices it at once instead of at its next heartbeat 20 s later. After a
/// restart on the same port and database, the agent logs the restored
/// stream for the same worker.
#[tokio::test(flavor = "multi_thread")]
async fn server_shutdown_is_noticed_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let database = dir.path().join("registry.db");
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut server = Server::start(&database, &listen);
    let mut options = agent_options("sensor-shutdown", vec![server.url()], dir.path());
    options.heartbeat_interval = "20s";
    let agent = start_agent(&options);
    let worker = wait_active(&server.url(), "sensor-shutdown", LONG_WAIT)
        .await
        .unwrap_or_else(|| panic!("agent never registered; logs:\n{}", agent_logs(&agent)));
    agent
        .logs
        .wait_for("heartbeat acknowledged", LONG_WAIT)
        .unwrap_or_else(|| panic!("no heartbeat acknowledged; logs:\n{}", agent_logs(&agent)));

    server.process.signal(Signal::SIGTERM);
    let stopped_at = Instant::now();
    let lost = agent.logs.wait_for("heartbeat stream lost; reconnecting", LONG_WAIT);
    let elapsed = stopped_at.elapsed();

    let lost = lost.unwrap_or_else(|| panic!("stream loss not noticed; logs:\n{}", agent_logs(&agent)));
    // Far below the 20 s interval, with room for a loaded machine.
    assert!(
        elapsed < 2 * SLACK,
        "noticed after {elapsed:?}; logs:\n{}",
        agent_logs(&agent)
    );
    let reason = lost["fields"]["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("Unavailable"), "reason: {reason}");

    server.process.wait_exit(LONG_WAIT).unwrap_or_else(|| {
        panic!(
            "server still running after SIGTERM; logs:\n{}",
            server.process.logs.dump()
        )
    });
    let server = Server::start(&database, &listen);
    let restored = agent
        .logs
        .wait_for("heartbeat stream restored", BACKOFF_CAP + 2 * SLACK)
        .unwrap_or_else(|| panic!("no restored log; logs:\n{}", agent_logs(&agent)));

    assert_eq!(restored["level"], "INFO");
    assert_eq!(restored["fields"]["worker_id"], worker.id);
    assert_eq!(restored["fields"]["registry"], server.url().as_str());
    assert!(
        restored["fields"]["attempts"].as_u64().is_some_and(|n| n >= 1),
        "{restored}"
    );
    assert!(restored["fields"]["downtime"].is_string(), "{restored}");
    assert!(
        agent.logs.with_message("registered").len() == 1,
        "agent registered again"
    );
}

/// A Register by another client with the same instance id supersedes the
/// agent's session, and the agent stops heartbeating with an error log.
#[tokio::test(flavor = "multi_thread")]
async fn superseded_session_stops_heartbeats() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("registry.db"), "127.0.0.1:0");
    let mut options = agent_options("sensor-superseded", vec![server.url()], dir.path());
    // A long cap keeps the agent from registering again during the test.
    options.backoff_cap = "30s";
    let agent = start_agent(&options);
    wait_active(&server.url(), "sensor-superseded", LONG_WAIT)
        .await
        .unwrap_or_else(|| panic!("agent never registered; logs:\n{}", agent_logs(&agent)));
    let instance_id = std::fs::read_to_string(dir.path().join("instance_id")).expect("instance id file");

    let mut registry = client(&server.url()).await;
    let request = proto::RegisterRequest {
        name: "sensor-superseded".to_string(),
        role: proto::WorkerRole::Sensor as i32,
        instance_id: instance_id.trim().to_string(),
        ..proto::RegisterRequest::default()
    };
    registry
        .register(request)
        .await
        .expect("takeover with the same instance id");

    let superseded = agent.logs.wait_for(
        "session superseded by another instance; heartbeats stopped",
        INTERVAL * 2 + SLACK,
    );
    assert!(superseded.is_some(), "no superseded log; logs:\n{}", agent_logs(&agent));
    assert_eq!(superseded.unwrap()["level"], "ERROR");
    let registrations = agent.logs.with_message("registered").len();
    tokio::time::sleep(INTERVAL * 3).await;
    assert_eq!(
        agent.logs.with_message("registered").len(),
        registrations,
        "agent registered again early"
    );
}

/// A server frozen by SIGSTOP is noticed within about two heartbeat
/// intervals, through the response deadline.
#[tokio::test(flavor = "multi_thread")]
async fn frozen_server_is_noticed() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("registry.db"), "127.0.0.1:0");
    let agent = start_agent(&agent_options("sensor-silent", vec![server.url()], dir.path()));
    wait_active(&server.url(), "sensor-silent", LONG_WAIT)
        .await
        .unwrap_or_else(|| panic!("agent never registered; logs:\n{}", agent_logs(&agent)));

    server.process.signal(Signal::SIGSTOP);
    let frozen_at = Instant::now();
    let lost = agent
        .logs
        .wait_for("heartbeat stream lost; reconnecting", INTERVAL * 3 + SLACK);
    let elapsed = frozen_at.elapsed();
    server.process.signal(Signal::SIGCONT);

    let lost = lost.unwrap_or_else(|| panic!("frozen server not noticed; logs:\n{}", agent_logs(&agent)));
    // The last heartbeat may have been sent up to one interval before the
    // freeze, and its response is awaited two intervals.
    assert!(elapsed < INTERVAL * 3 + SLACK, "noticed after {elapsed:?}");
    let reason = lost["fields"]["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("no response within"), "reason: {reason}");
}

/// A second SIGTERM ends the agent at once, without waiting for the
/// deregistration deadline of a frozen server.
#[tokio::test(flavor = "multi_thread")]
async fn second_signal_exits_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("registry.db"), "127.0.0.1:0");
    let mut options = agent_options("sensor-twice", vec![server.url()], dir.path());
    // A 5 s interval also sets 5 s HTTP/2 keepalive pings, so on a slow
    // machine no ping timeout can close the connection and let the
    // deregistration fail early, before the second signal arrives.
    options.heartbeat_interval = "5s";
    let mut agent = start_agent(&options);
    wait_active(&server.url(), "sensor-twice", LONG_WAIT)
        .await
        .unwrap_or_else(|| panic!("agent never registered; logs:\n{}", agent_logs(&agent)));
    server.process.signal(Signal::SIGSTOP);

    agent.signal(Signal::SIGTERM);
    agent
        .logs
        .wait_for("stopping; a second signal exits at once", Duration::from_secs(1))
        .unwrap_or_else(|| panic!("first signal not logged; logs:\n{}", agent_logs(&agent)));
    let second_at = Instant::now();
    agent.signal(Signal::SIGTERM);

    let status = agent.wait_exit(Duration::from_secs(1));
    let elapsed = second_at.elapsed();
    server.process.signal(Signal::SIGCONT);
    let status = status.unwrap_or_else(|| panic!("agent still running after the second signal"));
    assert_eq!(status.code(), Some(143), "logs:\n{}", agent_logs(&agent));
    // Well under the 2 s deregistration deadline the first signal started.
    assert!(elapsed < Duration::from_millis(1500), "exit took {elapsed:?}");
}

/// As PID 1 of a new PID namespace, where signals without a handler are
/// dropped, the agent still deregisters on SIGTERM and exits 0.
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_as_pid_1() {
    let probe = std::process::Command::new("unshare")
        .args(["--pid", "--fork", "true"])
        .stderr(std::process::Stdio::null())
        .status();
    if !probe.is_ok_and(|status| status.success()) {
        eprintln!("skipped: `unshare --pid --fork` is not available here (needs util-linux and CAP_SYS_ADMIN)");
        return;
    }

    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("registry.db"), "127.0.0.1:0");
    let mut options = agent_options("sensor-init", vec![server.url()], dir.path());
    options.heartbeat_interval = "5s";
    let mut command = std::process::Command::new("unshare");
    command
        .args(["--pid", "--fork", "--kill-child", "--"])
        .arg(common::agent_binary())
        .args(common::agent_args(&options));
    let mut wrapper = common::spawn_agent(command);
    wait_active(&server.url(), "sensor-init", LONG_WAIT)
        .await
        .unwrap_or_else(|| panic!("agent never registered; logs:\n{}", agent_logs(&wrapper)));
    let agent_pid = only_child(wrapper.pid().as_raw());
    let namespace_pid = namespace_pid(agent_pid);
    assert_eq!(namespace_pid, 1, "agent is not PID 1 in its namespace");

    nix::sys::signal::kill(nix::unistd::Pid::from_raw(agent_pid), Signal::SIGTERM).expect("signal the agent");

    let status = wrapper.wait_exit(Duration::from_secs(3));
    assert!(
        status.is_some(),
        "agent ignored SIGTERM as PID 1; logs:\n{}",
        agent_logs(&wrapper)
    );
    assert!(status.unwrap().success(), "logs:\n{}", agent_logs(&wrapper));
    assert!(
        !wrapper.logs.with_message("deregistered").is_empty(),
        "no deregistered log"
    );
}

/// Returns the single child process of `pid`.
fn only_child(pid: i32) -> i32 {
    let path = format!("/proc/{pid}/task/{pid}/children");
    let children = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {path}: {e}"));
    let pids: Vec<i32> = children.split_whitespace().filter_map(|pid| pid.parse().ok()).collect();
    assert_eq!(pids.len(), 1, "expected one child of {pid}, found {pids:?}");
    pids[0]
}

/// Returns the pid of process `pid` inside its own PID namespace.
fn namespace_pid(pid: i32) -> i32 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read process status");
    let line = status
        .lines()
        .find(|line| line.starts_with("NSpid:"))
        .expect("NSpid line in /proc status");
    line.split_whitespace()
        .last()
        .and_then(|pid| pid.parse().ok())
        .expect("NSpid ends with a pid")
}
