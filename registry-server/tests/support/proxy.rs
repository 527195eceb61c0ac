//! A loopback TCP proxy in front of the test PostgreSQL server that can
//! simulate an outage: refuse connections, or hold them open without
//! forwarding a byte, as a network partition does.

use std::net::SocketAddr;

use tokio::io::copy_bidirectional;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// What the proxy does with new and open connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Forwards bytes both ways.
    Forward,
    /// Closes every connection at once.
    Refuse,
    /// Keeps connections open but forwards nothing.
    Blackhole,
}

/// A running proxy; stops when dropped.
pub struct Proxy {
    /// Loopback address the proxy listens on.
    pub address: SocketAddr,
    /// Current mode; connections watch it and react to changes.
    mode: watch::Sender<Mode>,
    /// Accept loop.
    task: JoinHandle<()>,
}

impl Proxy {
    /// Starts a proxy on an ephemeral loopback port that forwards to
    /// `upstream`, which must be a loopback address.
    pub async fn start(upstream: SocketAddr) -> Proxy {
        assert!(
            upstream.ip().is_loopback(),
            "the proxy forwards only to loopback addresses, got {upstream}"
        );
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("failed to bind the proxy to 127.0.0.1:0");
        let address = listener.local_addr().expect("proxy listener has no address");
        let (mode, mode_receiver) = watch::channel(Mode::Forward);

        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(serve(client, upstream, mode_receiver.clone()));
            }
        });
        Proxy { address, mode, task }
    }

    /// Switches the mode; forwarded connections stop forwarding at once.
    pub fn set_mode(&self, mode: Mode) {
        self.mode.send_replace(mode);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
        // Dropping the sender after this wakes every connection, which then ends.
        self.mode.send_replace(Mode::Refuse);
    }
}

/// Serves one client connection according to the mode.
async fn serve(mut client: TcpStream, upstream: SocketAddr, mut mode: watch::Receiver<Mode>) {
    let current = *mode.borrow_and_update();
    match current {
        Mode::Refuse => return,
        Mode::Blackhole => {
            // Holding `client` without reading it is the partition.
            let _ = mode.changed().await;
            return;
        }
        Mode::Forward => {}
    }

    let Ok(mut server) = TcpStream::connect(upstream).await else {
        return;
    };
    tokio::select! {
        _ = copy_bidirectional(&mut client, &mut server) => {}
        changed = mode.changed() => {
            if changed.is_ok() && *mode.borrow_and_update() == Mode::Blackhole {
                // Both sockets stay open and silent until the next change.
                let _ = mode.changed().await;
            }
        }
    }
}
