//! Helpers for the agent's integration tests: real `sensor-agent` and
//! `registry-server` processes on loopback, killed by a guard on drop, and
//! a gRPC client to inspect what the registry stores.

#![allow(dead_code)]

use std::collections::HashMap;
use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value as Json;
use tonic::transport::{Channel, Endpoint};
use worker_registry::proto::worker_registry_client::WorkerRegistryClient;
use worker_registry::proto::{self, ListRequest, Worker};

/// Time a server gets to print its listening address.
const SERVER_START_TIMEOUT: Duration = Duration::from_secs(30);

/// Returns the path of the `sensor-agent` binary under test.
pub fn agent_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_sensor-agent"))
}

/// Returns the path of the `registry-server` binary in the same target
/// directory, building it once when it is missing.
pub fn server_binary() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let path = agent_binary().with_file_name("registry-server");
            if !path.exists() {
                build_server();
            }
            assert!(path.exists(), "registry-server is still missing at {}", path.display());
            path
        })
        .clone()
}

fn build_server() {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo"));
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root");
    let status = Command::new(cargo)
        .args(["build", "-p", "registry-server", "--bin", "registry-server"])
        .current_dir(workspace)
        .status()
        .expect("failed to run cargo build -p registry-server");
    assert!(status.success(), "cargo build -p registry-server failed with {status}");
}

/// Returns a loopback port that was free a moment ago. Used where a process
/// must know the server's port before the server starts.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
    listener.local_addr().expect("local address").port()
}

/// Log lines of a child process, parsed as JSON where possible.
#[derive(Clone, Default)]
pub struct Logs(Arc<Mutex<Vec<Json>>>);

impl Logs {
    fn collect<R: Read + Send + 'static>(
        &self,
        pipe: R,
        label: &'static str,
        on_line: impl Fn(&Json) + Send + 'static,
    ) {
        let sink = self.0.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                match serde_json::from_str::<Json>(&line) {
                    Ok(entry) => {
                        on_line(&entry);
                        sink.lock().unwrap().push(entry);
                    }
                    Err(_) => eprintln!("{label}: {line}"),
                }
            }
        });
    }

    /// Returns the entries whose message is `message`.
    pub fn with_message(&self, message: &str) -> Vec<Json> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|entry| entry["fields"]["message"] == message)
            .cloned()
            .collect()
    }

    /// Returns every entry, for failure messages.
    pub fn dump(&self) -> String {
        self.0
            .lock()
            .unwrap()
            .iter()
            .map(|entry| entry.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Waits until an entry with `message` is logged.
    pub fn wait_for(&self, message: &str, timeout: Duration) -> Option<Json> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(entry) = self.with_message(message).into_iter().next() {
                return Some(entry);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A child process that is killed with SIGKILL when the guard drops.
pub struct ProcessGuard {
    child: Child,
    /// Parsed JSON log lines of the process.
    pub logs: Logs,
}

impl ProcessGuard {
    /// Returns the process id.
    pub fn pid(&self) -> Pid {
        Pid::from_raw(i32::try_from(self.child.id()).expect("pid fits in i32"))
    }

    /// Sends `signal` to the process.
    pub fn signal(&self, signal: Signal) {
        kill(self.pid(), signal).unwrap_or_else(|e| panic!("kill({}, {signal}) failed: {e}", self.pid()));
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Kills the process with SIGKILL and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ProcessGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A `registry-server` process with a SQLite database in a directory the
/// caller owns.
pub struct Server {
    /// The process and its logs.
    pub process: ProcessGuard,
    /// `IP:port` the server listens on.
    pub address: String,
}

/// Server flags that make leases short enough for tests: a 100 ms floor for
/// granted intervals and quick sweeps and flushes.
pub const FAST_SERVER_ARGS: &[&str] = &[
    "--min-heartbeat-interval",
    "100ms",
    "--sweep-interval",
    "100ms",
    "--flush-interval",
    "100ms",
];

impl Server {
    /// Starts a server on `listen` (such as `127.0.0.1:0`) with the database
    /// file `database` and waits until it logs its address.
    pub fn start(database: &Path, listen: &str) -> Server {
        let mut command = Command::new(server_binary());
        command
            .env_clear()
            .env("RUST_LOG", "info")
            .args(["--log-format", "json", "--listen", listen])
            .arg("--database-url")
            .arg(format!("sqlite://{}", database.display()))
            .args(FAST_SERVER_ARGS)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command.spawn().expect("failed to start registry-server");

        let logs = Logs::default();
        let (address_sender, address_receiver) = std::sync::mpsc::channel::<String>();
        let stdout = child.stdout.take().expect("stdout is piped");
        let stderr = child.stderr.take().expect("stderr is piped");
        logs.collect(stdout, "server", move |entry| {
            if entry["fields"]["message"] == "listening" {
                let address = entry["fields"]["address"].as_str().unwrap_or_default().to_string();
                let _ = address_sender.send(address);
            }
        });
        logs.collect(stderr, "server", |_| {});
        let mut process = ProcessGuard { child, logs };

        let Ok(address) = address_receiver.recv_timeout(SERVER_START_TIMEOUT) else {
            let status = process.wait_exit(Duration::ZERO);
            panic!(
                "registry-server did not log its address within {SERVER_START_TIMEOUT:?} (exit status {status:?}); logs:\n{}",
                process.logs.dump()
            );
        };
        Server { process, address }
    }

    /// Returns the `http://IP:port` URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.address)
    }
}

/// Options for one agent process.
pub struct AgentOptions<'a> {
    /// Worker name.
    pub name: &'a str,
    /// Registry URLs, in fail-over order.
    pub urls: Vec<String>,
    /// Directory for the instance id.
    pub state_dir: &'a Path,
    /// Heartbeat interval to request, such as `300ms`.
    pub heartbeat_interval: &'a str,
    /// Backoff cap, such as `1s`.
    pub backoff_cap: &'a str,
    /// Extra flags.
    pub extra_args: Vec<String>,
}

/// Starts `sensor-agent run` with JSON logs and no environment variables
/// other than `PATH` and `RUST_LOG`.
pub fn start_agent(options: &AgentOptions) -> ProcessGuard {
    let mut command = Command::new(agent_binary());
    command.args(agent_args(options));
    spawn_agent(command)
}

/// Returns the arguments of `sensor-agent run` for `options`.
pub fn agent_args(options: &AgentOptions) -> Vec<OsString> {
    let mut args: Vec<OsString> = ["run", "--log-format", "json", "--worker-name", options.name]
        .into_iter()
        .map(OsString::from)
        .collect();
    args.extend(["--heartbeat-interval", options.heartbeat_interval].map(OsString::from));
    args.extend(["--backoff-cap", options.backoff_cap].map(OsString::from));
    args.extend(["--probe-timeout", "2s"].map(OsString::from));
    args.push(OsString::from("--state-dir"));
    args.push(options.state_dir.as_os_str().to_owned());
    for url in &options.urls {
        args.extend([OsString::from("--registry-url"), OsString::from(url)]);
    }
    args.extend(options.extra_args.iter().map(OsString::from));
    args
}

/// Spawns a prepared agent command with a clean environment and collects
/// its logs.
pub fn spawn_agent(mut command: Command) -> ProcessGuard {
    command
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("RUST_LOG", "sensor_agent=debug,info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn().expect("failed to start sensor-agent");

    let logs = Logs::default();
    logs.collect(child.stdout.take().expect("stdout is piped"), "agent", |_| {});
    logs.collect(child.stderr.take().expect("stderr is piped"), "agent", |_| {});
    ProcessGuard { child, logs }
}

/// Connects a registry client to `url`.
pub async fn client(url: &str) -> WorkerRegistryClient<Channel> {
    let channel = Endpoint::from_shared(url.to_string())
        .expect("valid URL")
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {url}: {e}"));
    WorkerRegistryClient::new(channel)
}

/// Lists the workers whose name starts with `prefix`.
pub async fn list_by_prefix(client: &mut WorkerRegistryClient<Channel>, prefix: &str) -> Vec<Worker> {
    let request = ListRequest {
        name_prefix: prefix.to_string(),
        ..ListRequest::default()
    };
    client.list(request).await.expect("List").into_inner().workers
}

/// Returns the worker named `name`, if listed.
pub async fn find_worker(client: &mut WorkerRegistryClient<Channel>, name: &str) -> Option<Worker> {
    list_by_prefix(client, name)
        .await
        .into_iter()
        .find(|worker| worker.name == name)
}

/// Tells whether a worker is listed as active.
pub fn is_active(worker: &Worker) -> bool {
    worker.status == proto::WorkerStatus::Active as i32
}

/// Polls `check` every 20 ms until it returns `Some` or `timeout` passes.
pub async fn poll<T, F, Fut>(timeout: Duration, mut check: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return Some(value);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Writes an executable script.
pub fn write_script(dir: &Path, name: &str, body: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, body).expect("write script");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod script");
    path
}

/// Runs `sensor-agent` with exactly the given environment and arguments and
/// returns its exit status, stdout and stderr.
pub fn run_agent_command(env: &HashMap<String, OsString>, args: &[&str]) -> (ExitStatus, String, String) {
    let output = Command::new(agent_binary())
        .env_clear()
        .envs(env)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("failed to run sensor-agent");
    (
        output.status,
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Returns the ids of processes in process group `pgid` that have not
/// exited; zombies count as exited, because they only wait to be reaped.
pub fn live_processes_in_group(pgid: i32) -> Vec<i32> {
    let mut live = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return live;
    };
    for entry in entries.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };

        // The command name in parentheses may contain spaces, so fields are
        // counted from the last closing parenthesis: state, ppid, pgrp.
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if fields.len() < 3 {
            continue;
        }
        let state = fields[0];
        let group: i32 = fields[2].parse().unwrap_or(-1);
        if group == pgid && state != "Z" && state != "X" {
            live.push(pid);
        }
    }
    live
}

/// Tells whether process `pid` is still running (zombies count as exited).
pub fn is_running(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}
