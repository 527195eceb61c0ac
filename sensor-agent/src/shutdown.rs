//! SIGINT and SIGTERM handling.
//!
//! The handlers are installed explicitly, so the agent stops cleanly even as
//! PID 1 in a container, where the kernel ignores signals that have no
//! handler. The first signal requests a clean stop, and a second one ends
//! the process at once.

use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;

/// Exit status after a second SIGINT: 128 plus the signal number, as shells report it.
const EXIT_SECOND_SIGINT: i32 = 130;
/// Exit status after a second SIGTERM.
const EXIT_SECOND_SIGTERM: i32 = 143;

/// Handle that reports whether a stop was requested and waits for one.
#[derive(Debug, Clone)]
pub struct Shutdown {
    receiver: watch::Receiver<bool>,
}

impl Shutdown {
    /// Creates a handle that is triggered through the returned sender.
    pub fn new() -> (watch::Sender<bool>, Shutdown) {
        let (sender, receiver) = watch::channel(false);
        (sender, Shutdown { receiver })
    }

    /// Waits until a stop is requested.
    pub async fn requested(&mut self) {
        if self.receiver.wait_for(|stop| *stop).await.is_err() {
            // The sender is gone, so no stop can ever arrive.
            std::future::pending::<()>().await;
        }
    }
}

/// Installs the SIGINT and SIGTERM handlers and returns the handle they
/// trigger. Must be called inside a Tokio runtime.
pub fn install() -> std::io::Result<Shutdown> {
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let (sender, shutdown) = Shutdown::new();

    tokio::spawn(async move {
        let name = tokio::select! {
            _ = interrupt.recv() => "SIGINT",
            _ = terminate.recv() => "SIGTERM",
        };
        tracing::info!(signal = name, "stopping; a second signal exits at once");
        let _ = sender.send(true);

        let code = tokio::select! {
            _ = interrupt.recv() => EXIT_SECOND_SIGINT,
            _ = terminate.recv() => EXIT_SECOND_SIGTERM,
        };
        tracing::warn!(code, "second signal; exiting without deregistering");
        std::process::exit(code);
    });

    Ok(shutdown)
}
