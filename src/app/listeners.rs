//! Binding listeners and accepting connections.
//!
//! Each listener has a connection limit (a semaphore of owned permits: at the
//! limit tether stops accepting and new connections wait in the kernel's
//! backlog, as HAProxy's `maxconn` does) and backs off on accept errors such as
//! EMFILE instead of spinning or exiting.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, UnixListener};
use tokio::sync::Semaphore;
use tokio_util::task::TaskTracker;

use crate::config::ListenAddr;
use crate::downstream::{self, ClientStream};
use crate::drain::Shutdown;
use crate::http::Binding;
use crate::metrics::{ListenerLabel, Name, ReasonLabels};
use crate::sock;

/// Accept backlog: deep enough to absorb a burst of short-lived connections
/// from a legacy app while tether is at its connection limit.
const BACKLOG: u32 = 4096;

/// Failures to bind a listener.
#[derive(Debug, thiserror::Error)]
pub enum ListenerError {
    /// The address or path could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: String, source: io::Error },
}

/// A bound listening socket.
pub enum ListenSocket {
    /// TCP.
    Tcp(TcpListener),
    /// Unix stream socket, removed from the filesystem when dropped.
    Unix(UnixListener, UnixPath),
}

/// Removes a unix socket file when the listener goes away.
pub struct UnixPath(PathBuf);

impl Drop for UnixPath {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

impl ListenSocket {
    /// The bound address (`unix:/path` for unix sockets).
    pub fn local_addr(&self) -> ListenAddr {
        match self {
            Self::Tcp(l) => l
                .local_addr()
                .map(ListenAddr::Tcp)
                .unwrap_or(ListenAddr::Tcp(SocketAddr::from(([0, 0, 0, 0], 0)))),
            Self::Unix(_, path) => ListenAddr::Unix(path.0.clone()),
        }
    }

    async fn accept(&self) -> io::Result<(ClientStream, Option<SocketAddr>)> {
        match self {
            Self::Tcp(l) => {
                let (s, peer) = l.accept().await?;
                Ok((ClientStream::Tcp(s), Some(peer)))
            }
            Self::Unix(l, _) => {
                let (s, _) = l.accept().await?;
                Ok((ClientStream::Unix(s), None))
            }
        }
    }
}

/// Binds `addr`; a stale unix socket file left by an earlier run is replaced.
/// With `reuse_port`, TCP sockets set SO_REUSEPORT so that each worker can bind
/// its own socket on the same address and the kernel spreads new connections
/// among them.
pub fn bind(addr: &ListenAddr, reuse_port: bool) -> Result<ListenSocket, ListenerError> {
    let error = |source| ListenerError::Bind {
        addr: addr.to_string(),
        source,
    };
    match addr {
        ListenAddr::Tcp(sa) => {
            let socket = match sa {
                SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
                SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
            }
            .map_err(error)?;
            socket.set_reuseaddr(true).map_err(error)?;
            if reuse_port {
                socket.set_reuseport(true).map_err(error)?;
            }
            sock::configure_listener(&socket);
            socket.bind(*sa).map_err(error)?;
            Ok(ListenSocket::Tcp(socket.listen(BACKLOG).map_err(error)?))
        }
        ListenAddr::Unix(path) => {
            if let Ok(meta) = std::fs::symlink_metadata(path) {
                use std::os::unix::fs::FileTypeExt;
                if meta.file_type().is_socket() {
                    let _ = std::fs::remove_file(path);
                }
            }
            let listener = UnixListener::bind(path).map_err(error)?;
            Ok(ListenSocket::Unix(listener, UnixPath(path.clone())))
        }
    }
}

/// Accepts until draining starts, one task per connection (tracked, so the
/// drain can wait for them) on the runtime the loop runs on. `limit` holds the
/// listener's connection permits, shared by every worker's accept loop.
pub async fn accept_loop(
    socket: ListenSocket,
    binding: Arc<Binding>,
    limit: Arc<Semaphore>,
    shutdown: Shutdown,
    tracker: TaskTracker,
) {
    let label = ListenerLabel {
        listener: binding.label.clone(),
    };
    let accepted_total = binding
        .metrics
        .client_accepted
        .get_or_create(&label)
        .clone();
    let active = binding.metrics.client_active.get_or_create(&label).clone();
    let accept_error = |kind: &str| {
        binding
            .metrics
            .accept_errors
            .get_or_create(&ReasonLabels {
                listener: binding.label.clone(),
                reason: Name::from(kind),
            })
            .inc();
    };
    let mut pause = Duration::from_millis(5);
    loop {
        let permit = tokio::select! {
            permit = limit.clone().acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => return,
            },
            _ = shutdown.drain.cancelled() => break,
        };
        let accepted = tokio::select! {
            accepted = socket.accept() => accepted,
            _ = shutdown.drain.cancelled() => break,
        };
        match accepted {
            Ok((stream, client)) => {
                pause = Duration::from_millis(5);
                accepted_total.inc();
                active.inc();
                let active = active.clone();
                let binding = binding.clone();
                let shutdown = shutdown.clone();
                // Boxed: the task's state is a few KiB, and tokio copies a
                // spawned future by value several times (into the task cell,
                // and at each stage change); a box is copied once.
                tracker.spawn(Box::pin(async move {
                    let _permit = permit;
                    downstream::serve(stream, client, binding, shutdown).await;
                    active.dec();
                }));
            }
            Err(e) if sock::is_resource_exhaustion(&e) => {
                accept_error("resources");
                tracing::error!(listener = %binding.listener.name, error = %e, pause = ?pause, "accept failed: out of resources; pausing");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(1));
            }
            Err(e) => {
                // Per-connection errors (ECONNABORTED and friends) affect only that
                // connection.
                accept_error("connection");
                tracing::debug!(listener = %binding.listener.name, error = %e, "accept failed");
            }
        }
    }
    tracing::info!(listener = %binding.listener.name, "stopped accepting");
    drop(socket);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn accepted_client_sockets_have_nodelay() {
        let addr: SocketAddr = ([127, 0, 0, 1], 0).into();
        let ListenSocket::Tcp(listener) = bind(&ListenAddr::Tcp(addr), false).unwrap() else {
            panic!("expected a TCP listener");
        };
        let target = listener.local_addr().unwrap();
        let _client = tokio::net::TcpStream::connect(target).await.unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        assert!(accepted.nodelay().unwrap());
    }
}
