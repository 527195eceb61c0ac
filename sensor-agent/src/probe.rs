//! Runs one short-lived probe command, such as `python3 --version`, with a
//! hard time limit.
//!
//! Each probe gets its own process group, so that a probe that forks (a
//! version manager shim, a wrapper script) is killed with all of its
//! children. The group is killed with SIGKILL when the time limit passes and
//! also right after the probe exits, because a background child that keeps
//! the stdout pipe open would otherwise keep the read waiting.

use std::io;
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Command;
use tokio::time::Instant;

/// Maximum number of bytes kept from each of stdout and stderr. Version
/// output is a line or two; a probe that writes more blocks on the full
/// pipe and is killed at the time limit.
const MAX_OUTPUT_BYTES: u64 = 16 * 1024;

/// Extra time to collect output that is already in the pipes after the
/// process group is gone.
const DRAIN_GRACE: Duration = Duration::from_millis(100);

/// Output and exit status of one probe.
#[derive(Debug, Clone)]
pub struct ProbeOutput {
    /// Standard output, lossily decoded as UTF-8.
    pub stdout: String,
    /// Standard error, lossily decoded as UTF-8.
    pub stderr: String,
    /// Exit status of the probe; `None` when it was killed at the time limit.
    pub status: Option<ExitStatus>,
}

impl ProbeOutput {
    /// Tells whether the probe exited on its own with status 0.
    pub fn succeeded(&self) -> bool {
        self.status.is_some_and(|status| status.success())
    }

    /// Tells whether the probe was killed because it ran out of time.
    pub fn timed_out(&self) -> bool {
        self.status.is_none()
    }
}

/// Runs `program` with `args`, stdin closed, and returns its output once it
/// exits or `timeout` passes, whichever comes first. Every process left in
/// the probe's process group is killed before this returns.
pub async fn run(program: &Path, args: &[&str], timeout: Duration) -> io::Result<ProbeOutput> {
    let deadline = Instant::now() + timeout;

    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()?;

    // With process_group(0) the group id equals the child's pid.
    let group = child.id().and_then(|pid| i32::try_from(pid).ok()).map(Pid::from_raw);

    let stdout = child.stdout.take().map(|pipe| tokio::spawn(read_limited(pipe)));
    let stderr = child.stderr.take().map(|pipe| tokio::spawn(read_limited(pipe)));

    let waited = tokio::time::timeout_at(deadline, child.wait()).await;

    // NOTE: when the probe has already been reaped and left no other
    // process behind, its group id is free and the kernel could in theory
    // hand it to a new group in the microseconds before this call.
    if let Some(group) = group {
        kill_group(group);
    }

    let status = match waited {
        Ok(status) => Some(status?),
        Err(_elapsed) => {
            // The group was just killed, so this reaps the probe at once.
            child.wait().await?;
            None
        }
    };

    // Output from a process that left the group (setsid) could keep a pipe
    // open for ever, so the drain is bounded as well.
    let drain_deadline = deadline.max(Instant::now() + DRAIN_GRACE);
    let output = ProbeOutput {
        stdout: collect(stdout, drain_deadline).await,
        stderr: collect(stderr, drain_deadline).await,
        status,
    };
    Ok(output)
}

fn kill_group(group: Pid) {
    match killpg(group, Signal::SIGKILL) {
        // ESRCH: every process of the group has already exited.
        Ok(()) | Err(Errno::ESRCH) => {}
        Err(error) => tracing::warn!(pgid = group.as_raw(), %error, "failed to kill probe process group"),
    }
}

async fn read_limited<R: AsyncRead + Unpin>(pipe: R) -> Vec<u8> {
    let mut buffer = Vec::new();

    // A read error only shortens the output, which parsing then rejects.
    let _ = pipe.take(MAX_OUTPUT_BYTES).read_to_end(&mut buffer).await;
    buffer
}

async fn collect(reader: Option<tokio::task::JoinHandle<Vec<u8>>>, deadline: Instant) -> String {
    let Some(mut handle) = reader else {
        return String::new();
    };
    match tokio::time::timeout_at(deadline, &mut handle).await {
        Ok(Ok(bytes)) => String::from_utf8_lossy(&bytes).into_owned(),
        Ok(Err(_join_error)) => String::new(),
        Err(_elapsed) => {
            handle.abort();
            String::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reads_stdout_and_status() {
        let output = run(
            Path::new("/bin/sh"),
            &["-c", "echo out; echo err >&2"],
            Duration::from_secs(5),
        )
        .await
        .unwrap();

        assert_eq!(output.stdout, "out\n");
        assert_eq!(output.stderr, "err\n");
        assert!(output.succeeded());
    }

    #[tokio::test]
    async fn kills_probe_at_timeout() {
        let started = std::time::Instant::now();

        let output = run(Path::new("/bin/sh"), &["-c", "sleep 600"], Duration::from_millis(300))
            .await
            .unwrap();

        assert!(output.timed_out());
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "took {:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn stdin_is_closed() {
        // cat copies stdin; with /dev/null it ends at once instead of waiting.
        let output = run(Path::new("/bin/cat"), &[], Duration::from_secs(5)).await.unwrap();

        assert!(output.succeeded());
        assert_eq!(output.stdout, "");
    }

    #[tokio::test]
    async fn missing_program_is_an_error() {
        let result = run(Path::new("/nonexistent/probe"), &[], Duration::from_secs(1)).await;

        assert_eq!(result.unwrap_err().kind(), io::ErrorKind::NotFound);
    }
}
