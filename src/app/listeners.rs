//! Binding listeners and accepting connections.
//!
//! Each listener has a connection limit (a semaphore of owned permits, shared
//! by its workers) and backs off on accept errors such as EMFILE instead of
//! spinning or exiting. At the limit, with `evict_idle_at_cap`, a new
//! connection is accepted and the longest-idle keep-alive connection is reset
//! to make room for it (an idle client reconnects for free; a waiting one is a
//! stalled request); with none idle the accepted connection waits for a
//! permit. Without the key, at the limit tether stops accepting and new
//! connections wait in the kernel's backlog, as HAProxy's `maxconn` does.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{AcquireError, OwnedSemaphorePermit, Semaphore, TryAcquireError};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{ListenAddr, ListenerConfig};
use crate::downstream::{self, Admitted, ClientStream, Registry};
use crate::drain::Shutdown;
use crate::http::BindingSlot;
use crate::metrics::{ListenerLabel, Name, ReasonLabels};
use crate::sock;

/// Accept backlog: deep enough to absorb a burst of short-lived connections
/// from a legacy app while tether is at its connection limit.
const BACKLOG: u32 = 4096;

/// How often an accept loop waiting at the cap looks again for an idle
/// connection to reset, when none was idle (all busy) or the one asked
/// declined with no other idle: connections that went idle meanwhile are found
/// within this, at the cost of one scan of the listener's connections.
const RESCAN: Duration = Duration::from_millis(50);

/// How often, at most, an accept loop logs that its listener is at its cap.
const AT_CAP_LOG_EVERY: Duration = Duration::from_secs(60);

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

/// Removes a unix socket file when the listener goes away, unless the path
/// is another socket's by then (a reload that bound a listener there anew).
pub struct UnixPath {
    path: PathBuf,
    /// Device and inode of the file this socket made.
    made: Option<(u64, u64)>,
}

impl UnixPath {
    fn new(path: PathBuf) -> Self {
        let made = file_id(&path);
        Self { path, made }
    }
}

fn file_id(path: &std::path::Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path)
        .ok()
        .map(|meta| (meta.dev(), meta.ino()))
}

impl Drop for UnixPath {
    fn drop(&mut self) {
        if self.made.is_some() && file_id(&self.path) == self.made {
            let _ = std::fs::remove_file(&self.path);
        }
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
            Self::Unix(_, path) => ListenAddr::Unix(path.path.clone()),
        }
    }

    /// A connection the kernel has completed, without waiting: read from the
    /// socket itself (not from the reactor's readiness, which may not have
    /// seen it yet); `None` once the queue is empty.
    fn accept_queued(&self) -> Option<(ClientStream, Option<SocketAddr>)> {
        match self {
            Self::Tcp(l) => {
                let (socket, peer) = socket2::SockRef::from(l).accept().ok()?;
                let stream = std::net::TcpStream::from(socket);
                stream.set_nonblocking(true).ok()?;
                let stream = tokio::net::TcpStream::from_std(stream).ok()?;
                Some((ClientStream::Tcp(stream), peer.as_socket()))
            }
            Self::Unix(l, _) => {
                let (socket, _) = socket2::SockRef::from(l).accept().ok()?;
                let stream = std::os::unix::net::UnixStream::from(socket);
                stream.set_nonblocking(true).ok()?;
                let stream = tokio::net::UnixStream::from_std(stream).ok()?;
                Some((ClientStream::Unix(stream), None))
            }
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

/// A listener's connection limit, shared by its workers' accept loops: the
/// permits of `max_connections` and, with `evict_idle_at_cap`, the registry of
/// its live connections.
pub struct Limit {
    permits: Arc<Semaphore>,
    /// `max_connections` as last set.
    max: std::sync::Mutex<usize>,
    /// Connections admitted while `evict` was on, which room can be made
    /// from.
    registry: Arc<Registry>,
    evict: AtomicBool,
}

impl Limit {
    /// The limit `listener` sets.
    pub fn new(listener: &ListenerConfig) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(listener.max_connections)),
            max: std::sync::Mutex::new(listener.max_connections),
            registry: Arc::new(Registry::new()),
            evict: AtomicBool::new(listener.evict_idle_at_cap),
        }
    }

    /// Follows a reload of `listener`: a larger `max_connections` admits more
    /// at once, a smaller one takes permits out as connections end (none is
    /// closed for it); `evict_idle_at_cap` applies to connections accepted
    /// from now on.
    pub fn update(&self, listener: &ListenerConfig) {
        self.evict
            .store(listener.evict_idle_at_cap, Ordering::Relaxed);
        let mut max = self.max.lock().unwrap_or_else(|e| e.into_inner());
        let (from, to) = (*max, listener.max_connections);
        *max = to;
        if to > from {
            self.permits.add_permits(to - from);
        } else if let Ok(fewer) = u32::try_from(from - to) {
            let permits = self.permits.clone();
            tokio::spawn(async move {
                if let Ok(taken) = permits.acquire_many_owned(fewer).await {
                    taken.forget();
                }
            });
        }
    }

    fn evicting(&self) -> Option<&Arc<Registry>> {
        self.evict.load(Ordering::Relaxed).then_some(&self.registry)
    }
}

/// An accepted connection with what admits it, or the accept error.
type Next = io::Result<(ClientStream, Option<SocketAddr>, Admitted)>;

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
            Ok(ListenSocket::Unix(listener, UnixPath::new(path.clone())))
        }
    }
}

/// Accepts until draining starts or `stop` (a child of the drain token: a
/// reload that removes or re-binds the listener cancels it, and its
/// connections then drain as they would at exit), one task per connection (tracked, so the
/// drain can wait for them) on the runtime the loop runs on. `limit` is the
/// listener's, shared by every worker's accept loop.
pub async fn accept_loop(
    socket: ListenSocket,
    slot: Arc<BindingSlot>,
    limit: Arc<Limit>,
    shutdown: Shutdown,
    tracker: TaskTracker,
    stop: CancellationToken,
) {
    // Only what never changes is kept of the binding: holding it would
    // keep the pool of its day alive for the listener's life.
    let (label, metrics, name) = {
        let binding = slot.load();
        let label = ListenerLabel {
            listener: binding.label.clone(),
        };
        (
            label,
            binding.metrics.clone(),
            binding.listener.name.clone(),
        )
    };
    // The listener's connections drain when it does: a reload that removes
    // or re-binds it ends their keep-alive after the exchange in flight.
    let connections = Shutdown {
        drain: stop.clone(),
        force: shutdown.force.clone(),
    };
    let accepted_total = metrics.client_accepted.get_or_create(&label).clone();
    let active = metrics.client_active.get_or_create(&label).clone();
    let accept_error = |kind: &str| {
        metrics
            .accept_errors
            .get_or_create(&ReasonLabels {
                listener: label.listener.clone(),
                reason: Name::from(kind),
            })
            .inc();
    };
    let serve = |stream, client, admitted| {
        accepted_total.inc();
        active.inc();
        let active = active.clone();
        let slot = slot.clone();
        let shutdown = connections.clone();
        // Boxed: the task's state is a few KiB, and tokio copies a spawned
        // future by value several times (into the task cell, and at each
        // stage change); a box is copied once.
        tracker.spawn(Box::pin(async move {
            downstream::serve(stream, client, slot, shutdown, admitted).await;
            active.dec();
        }));
    };
    let mut at_cap = AtCap::new(&name);
    let mut pause = Duration::from_millis(5);
    while let Some(next) = next_connection(&socket, &limit, &stop, &mut at_cap).await {
        match next {
            Ok((stream, client, admitted)) => {
                pause = Duration::from_millis(5);
                serve(stream, client, admitted);
            }
            Err(e) if sock::is_resource_exhaustion(&e) => {
                accept_error("resources");
                tracing::error!(listener = %name, error = %e, pause = ?pause, "accept failed: out of resources; pausing");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(1));
            }
            Err(e) => {
                // Per-connection errors (ECONNABORTED and friends) affect only that
                // connection.
                accept_error("connection");
                tracing::debug!(listener = %name, error = %e, "accept failed");
            }
        }
    }
    if !shutdown.drain.is_cancelled() {
        serve_backlog(&socket, &limit, serve).await;
    }
    tracing::info!(listener = %name, "stopped accepting");
    drop(socket);
}

/// Serves the connections the kernel has already completed on a socket a
/// reload removed or re-bound, instead of resetting them when it closes.
async fn serve_backlog(
    socket: &ListenSocket,
    limit: &Limit,
    serve: impl Fn(ClientStream, Option<SocketAddr>, Admitted),
) {
    while let Some((stream, client)) = socket.accept_queued() {
        let Ok(permit) = limit.permits.clone().acquire_owned().await else {
            return;
        };
        serve(stream, client, Admitted::new(permit, None));
    }
}

/// The next connection with its permit, waiting for one at the cap (and
/// making room with `evict_idle_at_cap`); `None` once draining.
async fn next_connection(
    socket: &ListenSocket,
    limit: &Limit,
    drain: &CancellationToken,
    at_cap: &mut AtCap,
) -> Option<Next> {
    let registry = limit.evicting();
    let admitted = |permit| Admitted::new(permit, registry.cloned());
    let Some(registry) = registry else {
        // A permit first: at the cap, new connections wait in the backlog.
        let permit = match free_permit(limit, at_cap)? {
            Some(permit) => permit,
            None => tokio::select! {
                permit = limit.permits.clone().acquire_owned() => permit.ok()?,
                _ = drain.cancelled() => return None,
            },
        };
        return accept(socket, drain, admitted(permit)).await;
    };
    // The connection first: room is made only for one that is waiting, and a
    // loop with nothing accepted holds no permit another loop's connection
    // could use.
    let (stream, client) = tokio::select! {
        accepted = socket.accept() => match accepted {
            Ok(accepted) => accepted,
            Err(e) => return Some(Err(e)),
        },
        _ = drain.cancelled() => return None,
    };
    let permit = match free_permit(limit, at_cap)? {
        Some(permit) => permit,
        None => {
            let acquire = limit.permits.clone().acquire_owned();
            tokio::pin!(acquire);
            make_room(registry, acquire, drain).await?
        }
    };
    Some(Ok((stream, client, admitted(permit))))
}

/// A permit if one is free now (`Some(None)`: the listener is at its cap,
/// noted); `None` once the limit is closed.
fn free_permit(limit: &Limit, at_cap: &mut AtCap) -> Option<Option<OwnedSemaphorePermit>> {
    match limit.permits.clone().try_acquire_owned() {
        Ok(permit) => Some(Some(permit)),
        Err(TryAcquireError::Closed) => None,
        Err(TryAcquireError::NoPermits) => {
            at_cap.note();
            Some(None)
        }
    }
}

/// Asks the longest-idle connection to go and waits for a permit, looking
/// again every [`RESCAN`] while fewer are going than accept loops wait.
async fn make_room(
    registry: &Arc<Registry>,
    mut acquire: std::pin::Pin<
        &mut impl std::future::Future<Output = Result<OwnedSemaphorePermit, AcquireError>>,
    >,
    drain: &CancellationToken,
) -> Option<OwnedSemaphorePermit> {
    let waiting = registry.wait();
    loop {
        // Biased, permit first: a permit freed by the connection that made
        // room is taken before a rescan could ask another to go.
        tokio::select! {
            biased;
            permit = &mut acquire => return permit.ok(),
            _ = drain.cancelled() => return None,
            _ = tokio::time::sleep(RESCAN) => waiting.rescan(),
        }
    }
}

/// Accepts one connection, admitted by `admitted`; `None` once draining.
async fn accept(
    socket: &ListenSocket,
    drain: &CancellationToken,
    admitted: Admitted,
) -> Option<Next> {
    tokio::select! {
        accepted = socket.accept() => Some(accepted.map(|(stream, client)| (stream, client, admitted))),
        _ = drain.cancelled() => None,
    }
}

/// When an accept loop last said its listener is at its cap, and how often it
/// has been since.
struct AtCap {
    listener: String,
    logged: Option<Instant>,
    since_logged: u64,
}

impl AtCap {
    fn new(listener: &str) -> Self {
        Self {
            listener: listener.to_owned(),
            logged: None,
            since_logged: 0,
        }
    }

    /// The listener is at its cap; logged at most once per
    /// [`AT_CAP_LOG_EVERY`] by each accept loop.
    fn note(&mut self) {
        self.since_logged += 1;
        if self
            .logged
            .is_some_and(|at| at.elapsed() < AT_CAP_LOG_EVERY)
        {
            return;
        }
        tracing::warn!(listener = %self.listener, times = self.since_logged, "listener at max_connections: new connections wait for a permit, or for an idle connection to be reset with evict_idle_at_cap");
        self.logged = Some(Instant::now());
        self.since_logged = 0;
    }
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
