//! Test helpers: a real `registry-server` process on a loopback port, and
//! gRPC clients for it.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value as Json;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::health_client::HealthClient;
use worker_registry::proto;
use worker_registry::proto::worker_registry_client::WorkerRegistryClient;

/// Time a server gets to start and print its listening address.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A `registry-server` child process. Dropping it kills the process.
pub struct ServerProcess {
    child: Child,
    /// Address the server listens on.
    pub addr: SocketAddr,
    /// Database URL the server uses.
    pub database_url: String,
    logs: Arc<Mutex<Vec<Json>>>,
}

/// Path of the `registry-server` binary that cargo built for these tests.
pub fn server_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_registry-server"))
}

/// Returns a SQLite URL for a new database file in `dir`.
pub fn sqlite_url(dir: &Path) -> String {
    format!("sqlite://{}", dir.join("registry.db").display())
}

/// Builds a command for the server binary with JSON logs on stdout and no
/// `ATTUNE` variables inherited from the test environment. It sets neither
/// a listen address nor a database, so callers choose how to supply them.
pub fn base_command(extra_args: &[&str]) -> Command {
    let mut command = Command::new(server_binary());
    for (key, _) in std::env::vars() {
        if key.starts_with("ATTUNE") {
            command.env_remove(key);
        }
    }
    command
        .args(["--log-format", "json"])
        .args(extra_args)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    command
}

/// Builds the usual server command: [`base_command`] with a free loopback
/// port and the given database.
pub fn server_command(database_url: &str, extra_args: &[&str]) -> Command {
    let mut command = base_command(&["--listen", "127.0.0.1:0", "--database-url", database_url]);
    command.args(extra_args);
    command
}

/// Exit status and captured output of a process that ran to completion.
#[derive(Debug)]
pub struct CommandOutput {
    /// Exit status.
    pub status: ExitStatus,
    /// Everything written to stdout, decoded lossily as UTF-8.
    pub stdout: String,
    /// Everything written to stderr, decoded lossily as UTF-8.
    pub stderr: String,
}

/// Runs `command` with `stdin` as its input and captures stdout and stderr.
/// Panics, after killing the process, if it has not exited within `timeout`.
pub fn run_to_completion(mut command: Command, stdin: &[u8], timeout: Duration) -> CommandOutput {
    command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let program = command.get_program().to_string_lossy().into_owned();
    let mut child = command
        .spawn()
        .unwrap_or_else(|e| panic!("failed to start {program}: {e}"));

    // Separate threads drain the pipes, so a child that writes more than
    // a pipe buffer holds cannot block before it exits.
    let input = stdin.to_vec();
    let mut child_stdin = child.stdin.take().expect("stdin is piped");
    let writer = std::thread::spawn(move || {
        let _ = child_stdin.write_all(&input);
    });
    let stdout_reader = read_to_end_in_thread(child.stdout.take().expect("stdout is piped"));
    let stderr_reader = read_to_end_in_thread(child.stderr.take().expect("stderr is piped"));

    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{program} did not exit within {timeout:?}; killed it");
        }
        std::thread::sleep(Duration::from_millis(20));
    };

    let _ = writer.join();
    CommandOutput {
        status,
        stdout: stdout_reader.join().expect("stdout reader"),
        stderr: stderr_reader.join().expect("stderr reader"),
    }
}

fn read_to_end_in_thread(mut pipe: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = pipe.read_to_end(&mut bytes);
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

impl ServerProcess {
    /// Starts a server on `database_url` with extra flags and waits until it
    /// logs its listening address.
    pub fn start(database_url: &str, extra_args: &[&str]) -> ServerProcess {
        Self::spawn(server_command(database_url, extra_args), database_url)
    }

    /// Starts a server from a prepared command, which must log JSON to stdout.
    pub fn spawn(mut command: Command, database_url: &str) -> ServerProcess {
        let mut child = command.spawn().expect("failed to start registry-server");
        let stdout = child.stdout.take().expect("stdout is piped");
        let logs: Arc<Mutex<Vec<Json>>> = Arc::default();
        let (address_sender, address_receiver) = std::sync::mpsc::channel();

        let sink = Arc::clone(&logs);
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let Ok(entry) = serde_json::from_str::<Json>(&line) else {
                    eprintln!("server: {line}");
                    continue;
                };
                // The entry is stored before the address is sent, so the
                // listening line is in the logs once `spawn` returns.
                let address = (entry["fields"]["message"] == "listening")
                    .then(|| entry["fields"]["address"].as_str().unwrap_or_default().to_string());
                sink.lock().unwrap().push(entry);
                if let Some(address) = address {
                    let _ = address_sender.send(address);
                }
            }
        });

        let address = match address_receiver.recv_timeout(START_TIMEOUT) {
            Ok(address) => address,
            Err(_) => {
                let _ = child.kill();
                let status = child.wait().ok();
                panic!("registry-server did not log its listening address within {START_TIMEOUT:?}; exit status {status:?}");
            }
        };

        ServerProcess {
            child,
            addr: address.parse().expect("listening address is IP:port"),
            database_url: database_url.to_string(),
            logs,
        }
    }

    /// Returns the `http://IP:port` endpoint URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Returns the process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Opens a gRPC channel to the server.
    pub async fn channel(&self) -> Channel {
        Endpoint::from_shared(self.url())
            .unwrap()
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await
            .expect("connect to registry-server")
    }

    /// Connects a registry client.
    pub async fn client(&self) -> WorkerRegistryClient<Channel> {
        WorkerRegistryClient::new(self.channel().await)
    }

    /// Connects a `grpc.health.v1.Health` client.
    pub async fn health_client(&self) -> HealthClient<Channel> {
        HealthClient::new(self.channel().await)
    }

    /// Sends a signal to the server process.
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) with a pid this test started; no memory is shared.
        let result = unsafe { libc::kill(self.child.id() as i32, signal) };
        assert_eq!(result, 0, "kill({}, {signal}) failed", self.child.id());
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Returns the names of the workers this server logged as expired.
    pub fn expired_names(&self) -> Vec<String> {
        self.logs_with_message("worker expired")
            .iter()
            .filter_map(|entry| entry["fields"]["name"].as_str().map(str::to_string))
            .collect()
    }

    /// Returns the log entries whose message equals `message`.
    pub fn logs_with_message(&self, message: &str) -> Vec<Json> {
        self.logs
            .lock()
            .unwrap()
            .iter()
            .filter(|entry| entry["fields"]["message"] == message)
            .cloned()
            .collect()
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Builds a Register request with the given name and instance id.
pub fn register_request(name: &str, instance_id: &str) -> proto::RegisterRequest {
    proto::RegisterRequest {
        name: name.to_string(),
        role: proto::WorkerRole::Sensor as i32,
        host: "test-host".to_string(),
        instance_id: instance_id.to_string(),
        ..Default::default()
    }
}

/// Polls `check` every 20 ms until it returns true or `timeout` passes.
pub async fn wait_until<F, Fut>(timeout: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
