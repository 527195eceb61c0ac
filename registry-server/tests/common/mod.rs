//! Test helpers: a real `registry-server` process on a loopback port, and
//! gRPC clients for it.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value as Json;
use tonic::transport::{Channel, Endpoint};
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

/// Builds the base command: JSON logs, a free loopback port, the given
/// database, and no `ATTUNE` variables inherited from the test environment.
pub fn server_command(database_url: &str, extra_args: &[&str]) -> Command {
    let mut command = Command::new(server_binary());
    for (key, _) in std::env::vars() {
        if key.starts_with("ATTUNE") {
            command.env_remove(key);
        }
    }
    command
        .args([
            "--log-format",
            "json",
            "--listen",
            "127.0.0.1:0",
            "--database-url",
            database_url,
        ])
        .args(extra_args)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    command
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
                if entry["fields"]["message"] == "listening" {
                    let address = entry["fields"]["address"].as_str().unwrap_or_default().to_string();
                    let _ = address_sender.send(address);
                }
                sink.lock().unwrap().push(entry);
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

    /// Connects a registry client.
    pub async fn client(&self) -> WorkerRegistryClient<Channel> {
        let channel = Endpoint::from_shared(self.url())
            .unwrap()
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await
            .expect("connect to registry-server");
        WorkerRegistryClient::new(channel)
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
