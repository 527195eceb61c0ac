//! Lease behaviour with real `sensor-agent` and `registry-server` processes
//! on loopback: killed, frozen and duplicate agents, and a registry outage.

mod common;

use std::collections::HashMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::{server_command, sqlite_url, ServerProcess};
use tonic::transport::Channel;
use worker_registry::proto::worker_registry_client::WorkerRegistryClient;
use worker_registry::proto::{self, get_request::Key};

/// Serializes the tests of this file: each measures delays of a few hundred
/// milliseconds, which two of them running side by side on a small machine
/// would stretch.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Heartbeat interval the agents request; the lease TTL is three of them.
const INTERVAL_MS: u64 = 200;
/// Server flags that allow the short test interval and sweep often.
const FAST_SERVER: [&str; 6] = [
    "--min-heartbeat-interval",
    "100ms",
    "--sweep-interval",
    "200ms",
    "--flush-interval",
    "100ms",
];

/// Path of the `sensor-agent` binary, built on first use when a test run
/// did not build it already.
fn agent_binary() -> &'static Path {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| {
        let path = common::server_binary().with_file_name("sensor-agent");
        if !path.exists() {
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let status = Command::new(cargo)
                .args(["build", "-p", "sensor-agent", "--bin", "sensor-agent"])
                .status()
                .expect("run cargo build for sensor-agent");
            assert!(status.success(), "cargo build -p sensor-agent failed");
        }
        path
    })
}

/// A `sensor-agent` child process, killed when dropped.
struct AgentProcess {
    child: Child,
}

impl AgentProcess {
    fn start(registry: &str, name: &str, state_dir: &Path) -> AgentProcess {
        let mut command = Command::new(agent_binary());
        for (key, _) in std::env::vars() {
            if key.starts_with("ATTUNE") {
                command.env_remove(key);
            }
        }
        let child = command
            .args(["--registry-url", registry, "--worker-name", name])
            .args(["--heartbeat-interval", &format!("{INTERVAL_MS}ms")])
            .args(["--runtimes", "shell", "--backoff-cap", "300ms", "--log-format", "json"])
            .arg("--state-dir")
            .arg(state_dir)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            // Agents log reconnect attempts to stderr; a file keeps test output readable.
            .stderr(std::fs::File::create(state_dir.join(format!("{name}.log"))).unwrap())
            .spawn()
            .expect("start sensor-agent");
        AgentProcess { child }
    }

    fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on a child this test started.
        let result = unsafe { libc::kill(self.child.id() as i32, signal) };
        assert_eq!(result, 0, "kill({}, {signal}) failed", self.child.id());
    }

    fn kill(&mut self) {
        self.signal(libc::SIGKILL);
        let _ = self.child.wait();
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        // A stopped process must be continued before it can exit.
        let _ = unsafe { libc::kill(self.child.id() as i32, libc::SIGCONT) };
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn connect(url: &str) -> WorkerRegistryClient<Channel> {
    let channel = tonic::transport::Endpoint::from_shared(url.to_string())
        .unwrap()
        .connect_timeout(Duration::from_secs(2))
        .connect_lazy();
    WorkerRegistryClient::new(channel)
}

/// Reads a worker by name; `None` when it is missing or the call fails.
async fn worker(client: &mut WorkerRegistryClient<Channel>, name: &str) -> Option<proto::Worker> {
    let request = proto::GetRequest {
        key: Some(Key::Name(name.to_string())),
    };
    client.get(request).await.ok()?.into_inner().worker
}

async fn is_active(client: &mut WorkerRegistryClient<Channel>, name: &str) -> bool {
    worker(client, name)
        .await
        .is_some_and(|w| w.status == proto::WorkerStatus::Active as i32)
}

/// Polls until `name` has status `status` or `timeout` passes; returns the time it took.
async fn wait_status(
    client: &mut WorkerRegistryClient<Channel>,
    name: &str,
    status: proto::WorkerStatus,
    timeout: Duration,
) -> Option<Duration> {
    let started = Instant::now();
    while started.elapsed() < timeout {
        if worker(client, name).await.is_some_and(|w| w.status == status as i32) {
            return Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    None
}

/// Names of the workers the server logged as expired.
/// An agent killed with SIGKILL is inactive within TTL + sweep interval +
/// flush interval of its last heartbeat.
#[tokio::test]
async fn killed_agent_expires_within_bound() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(&sqlite_url(dir.path()), &FAST_SERVER);
    let mut client = connect(&server.url()).await;
    let mut agent = AgentProcess::start(&server.url(), "killed-agent", dir.path());
    let registered = wait_status(
        &mut client,
        "killed-agent",
        proto::WorkerStatus::Active,
        Duration::from_secs(10),
    )
    .await;
    assert!(registered.is_some(), "agent registered");
    tokio::time::sleep(Duration::from_millis(1000)).await;

    agent.kill();
    let delay = wait_status(
        &mut client,
        "killed-agent",
        proto::WorkerStatus::Inactive,
        Duration::from_secs(5),
    )
    .await;

    // TTL 600 ms + sweep 200 ms + flush 100 ms, measured from the kill,
    // which comes at most one interval after the last heartbeat.
    let bound = Duration::from_millis(3 * INTERVAL_MS + 200 + 100);
    let delay = delay.expect("killed agent became inactive");
    println!(
        "killed agent inactive {} ms after SIGKILL (bound {} ms)",
        delay.as_millis(),
        bound.as_millis()
    );
    assert!(
        delay <= bound + Duration::from_millis(300),
        "inactive after {delay:?}, bound {bound:?}"
    );
    assert!(
        delay >= Duration::from_millis(3 * INTERVAL_MS - INTERVAL_MS),
        "not before the TTL: {delay:?}"
    );
}

/// An agent frozen with SIGSTOP for three TTLs expires exactly once and is
/// active again under the same id soon after SIGCONT, without flapping.
#[tokio::test]
async fn frozen_agent_expires_once() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(&sqlite_url(dir.path()), &FAST_SERVER);
    let mut client = connect(&server.url()).await;
    let agent = AgentProcess::start(&server.url(), "frozen-agent", dir.path());
    wait_status(
        &mut client,
        "frozen-agent",
        proto::WorkerStatus::Active,
        Duration::from_secs(10),
    )
    .await
    .expect("agent registered");
    let id = worker(&mut client, "frozen-agent").await.unwrap().id;

    agent.signal(libc::SIGSTOP);
    tokio::time::sleep(Duration::from_millis(9 * INTERVAL_MS)).await;
    assert!(!is_active(&mut client, "frozen-agent").await, "frozen agent expired");
    agent.signal(libc::SIGCONT);

    let back = wait_status(
        &mut client,
        "frozen-agent",
        proto::WorkerStatus::Active,
        Duration::from_secs(5),
    )
    .await
    .expect("agent active again after SIGCONT");
    println!("frozen agent active again {} ms after SIGCONT", back.as_millis());
    assert!(
        back <= Duration::from_millis(2 * INTERVAL_MS + 300),
        "back after {back:?}"
    );
    assert_eq!(
        worker(&mut client, "frozen-agent").await.unwrap().id,
        id,
        "same worker id"
    );

    // Watch for flapping: the worker stays active for ten intervals.
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(INTERVAL_MS / 2)).await;
        assert!(
            is_active(&mut client, "frozen-agent").await,
            "no flapping after the return"
        );
    }
    let expiries = server
        .expired_names()
        .iter()
        .filter(|name| *name == "frozen-agent")
        .count();
    assert_eq!(expiries, 1, "expired exactly once");
}

/// A second agent with the same name and another instance id waits while
/// the first is alive, then takes over the same worker id once it expired.
#[tokio::test]
async fn duplicate_name_waits_for_expiry() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let (first_dir, second_dir) = (dir.path().join("first"), dir.path().join("second"));
    std::fs::create_dir_all(&first_dir).unwrap();
    std::fs::create_dir_all(&second_dir).unwrap();
    let server = ServerProcess::start(&sqlite_url(dir.path()), &FAST_SERVER);
    let mut client = connect(&server.url()).await;

    let mut first = AgentProcess::start(&server.url(), "shared-name", &first_dir);
    wait_status(
        &mut client,
        "shared-name",
        proto::WorkerStatus::Active,
        Duration::from_secs(10),
    )
    .await
    .expect("first agent registered");
    let holder = worker(&mut client, "shared-name").await.unwrap();
    let _second = AgentProcess::start(&server.url(), "shared-name", &second_dir);

    for _ in 0..15 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let current = worker(&mut client, "shared-name").await.unwrap();
        assert_eq!(
            current.instance_id, holder.instance_id,
            "the live holder keeps its name"
        );
        assert_eq!(current.status, proto::WorkerStatus::Active as i32);
    }

    first.kill();
    let started = Instant::now();
    let mut taken_over = None;
    while started.elapsed() < Duration::from_secs(10) {
        if let Some(current) = worker(&mut client, "shared-name").await {
            if current.instance_id != holder.instance_id && current.status == proto::WorkerStatus::Active as i32 {
                taken_over = Some(current);
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let taken_over = taken_over.expect("second agent took over after the first expired");
    println!(
        "second agent took over {} ms after the first was killed",
        started.elapsed().as_millis()
    );
    assert_eq!(taken_over.id, holder.id, "same worker id");
    assert!(
        started.elapsed() >= Duration::from_millis(2 * INTERVAL_MS),
        "not before the first lease lapsed"
    );
}

/// An agent restarted after SIGKILL with the same instance id takes over
/// its own live lease at once, before the TTL runs out.
#[tokio::test]
async fn restarted_agent_takes_over_at_once() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    // A long lease (interval 1 s, TTL 3 s) makes "at once" measurable.
    let server = ServerProcess::start(&sqlite_url(dir.path()), &[]);
    let mut client = connect(&server.url()).await;
    let command_agent = |dir: &Path| {
        let mut command = Command::new(agent_binary());
        command
            .args(["--registry-url", &server.url(), "--worker-name", "restarted-agent"])
            .args([
                "--heartbeat-interval",
                "1s",
                "--runtimes",
                "shell",
                "--log-format",
                "json",
            ])
            .arg("--state-dir")
            .arg(dir)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        AgentProcess {
            child: command.spawn().unwrap(),
        }
    };
    let mut agent = command_agent(dir.path());
    wait_status(
        &mut client,
        "restarted-agent",
        proto::WorkerStatus::Active,
        Duration::from_secs(10),
    )
    .await
    .expect("agent registered");
    let before = worker(&mut client, "restarted-agent").await.unwrap();

    agent.kill();
    let started = Instant::now();
    let _restarted = command_agent(dir.path());
    let mut after = None;
    while started.elapsed() < Duration::from_secs(5) {
        let current = worker(&mut client, "restarted-agent").await.unwrap();
        if current.updated != before.updated
            && current.created == before.created
            && current.last_heartbeat != before.last_heartbeat
        {
            after = Some(current);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let after = after.expect("restarted agent registered again");
    println!(
        "restarted agent registered {} ms after SIGKILL",
        started.elapsed().as_millis()
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "took over before the 3 s TTL"
    );
    assert_eq!(after.id, before.id);
    assert_eq!(after.instance_id, before.instance_id);
    assert_eq!(after.status, proto::WorkerStatus::Active as i32);
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// With 20 agents, the registry killed for three TTLs and restarted: the
/// agents that are back within the grace never flip to inactive, and the
/// agents killed during the outage are inactive after grace + TTL.
#[tokio::test]
async fn outage_does_not_expire_fleet() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let database = sqlite_url(dir.path());
    let listen = format!("127.0.0.1:{}", free_port());
    let url = format!("http://{listen}");
    // The default command listens on port 0; this one keeps a fixed port
    // so the agents find the restarted registry at the same address.
    let server_args = |extra: &[&'static str]| {
        let command = server_command(&database, &FAST_SERVER);
        let args: Vec<String> = command.get_args().map(|a| a.to_string_lossy().into_owned()).collect();
        let mut fixed = Command::new(command.get_program());
        for (key, _) in std::env::vars() {
            if key.starts_with("ATTUNE") {
                fixed.env_remove(key);
            }
        }
        let mut args = args.into_iter();
        while let Some(arg) = args.next() {
            if arg == "--listen" {
                args.next();
                fixed.args(["--listen", &listen]);
            } else {
                fixed.arg(arg);
            }
        }
        fixed
            .args(extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped());
        fixed
    };

    let mut first = ServerProcess::spawn(server_args(&[]), &database);
    let mut client = connect(&url).await;
    let mut agents: HashMap<String, AgentProcess> = HashMap::new();
    for index in 0..20 {
        let name = format!("fleet-{index:02}");
        let state = dir.path().join(&name);
        std::fs::create_dir_all(&state).unwrap();
        agents.insert(name.clone(), AgentProcess::start(&url, &name, &state));
    }
    for index in 0..20 {
        let name = format!("fleet-{index:02}");
        wait_status(&mut client, &name, proto::WorkerStatus::Active, Duration::from_secs(15))
            .await
            .unwrap_or_else(|| panic!("{name} registered"));
    }
    let ids: HashMap<String, i64> = {
        let mut ids = HashMap::new();
        for name in agents.keys() {
            ids.insert(name.clone(), worker(&mut client, name).await.unwrap().id);
        }
        ids
    };

    // The registry dies without flushing, and five agents die during the outage.
    first.signal(libc::SIGKILL);
    first.wait_exit(Duration::from_secs(5)).expect("registry killed");
    let killed: Vec<String> = (15..20).map(|index| format!("fleet-{index:02}")).collect();
    for name in &killed {
        agents.get_mut(name).unwrap().kill();
    }
    tokio::time::sleep(Duration::from_millis(9 * INTERVAL_MS)).await;

    let restarted_at = Instant::now();
    let second = ServerProcess::spawn(server_args(&[]), &database);

    // Killed agents: inactive after grace (their TTL) plus at most one more TTL.
    for name in &killed {
        let delay = wait_status(&mut client, name, proto::WorkerStatus::Inactive, Duration::from_secs(5))
            .await
            .unwrap_or_else(|| panic!("{name} killed during the outage became inactive"));
        assert!(
            restarted_at.elapsed() >= Duration::from_millis(3 * INTERVAL_MS),
            "{name} kept its grace"
        );
        let _ = delay;
    }
    let settled = restarted_at.elapsed();
    println!(
        "agents killed during the outage were inactive {} ms after the restart",
        settled.as_millis()
    );
    assert!(
        settled <= Duration::from_millis(2 * 3 * INTERVAL_MS + 200 + 100 + 500),
        "within grace + TTL: {settled:?}"
    );

    // Returning agents: active throughout, with their old ids.
    for _ in 0..10 {
        for index in 0..15 {
            let name = format!("fleet-{index:02}");
            let current = worker(&mut client, &name).await.expect("worker readable");
            assert_eq!(current.id, ids[&name], "{name} kept its id");
            assert_eq!(
                current.status,
                proto::WorkerStatus::Active as i32,
                "{name} never flipped"
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let expired = second.expired_names();
    for index in 0..15 {
        let name = format!("fleet-{index:02}");
        assert!(!expired.contains(&name), "{name} was expired by the restarted registry");
    }
    let mut expired_killed = expired.clone();
    expired_killed.sort();
    assert_eq!(expired_killed, killed, "exactly the killed agents expired");
}
