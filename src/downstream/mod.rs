//! The client side of tether: one task per accepted connection, serving HTTP/1.0
//! and HTTP/1.1 with hyper, and deciding how the connection ends.
//!
//! hyper would close with FIN on every path; tether wants FIN only where the
//! close discipline allows it. So the connection is served with
//! `poll_without_shutdown`, the socket is taken back afterwards on every path,
//! and the IO wrapper (`io`) resets (SO_LINGER 0) on drop unless a path has
//! explicitly chosen an orderly close (`close`). Timeouts (header, idle) are
//! tether's own, driven by a per-connection clock (`clock`) that the IO and
//! the service update through the connection's shared state (`state`), which
//! is also what the proxy service knows of the connection.

mod clock;
mod close;
mod head_scan;
mod io;
mod registry;
mod state;

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::sync::Arc;

use hyper_util::rt::TokioIo;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::drain::Shutdown;
use crate::http::{Binding, BindingSlot, ProxyService};
use crate::metrics::{Name, ReasonLabels};
use crate::sock;
use clock::Clock;
use close::close_by_policy;
pub use close::{Ending, ResetReason};
pub use io::ClientStream;
use io::{ClientIo, Socket};
use registry::Membership;
pub use registry::{Admitted, Registry, Waiting};
use state::ClientState;

/// hyper's side of one client connection.
type HyperConnection<S> =
    hyper::server::conn::http1::Connection<TokioIo<ClientIo<S>>, ProxyService<ClientState>>;

/// Why hyper stopped serving a connection.
enum Served {
    Finished(hyper::Result<()>),
    TimedOut(ResetReason),
    Forced,
    /// Asked to make room at the listener's cap while idle.
    Evicted,
}

/// Serves one client connection to its end, then closes it by the listener's
/// policy. `admitted` holds its permit (and registry) until it has ended.
/// Returns how it ended.
pub async fn serve(
    stream: ClientStream,
    client: Option<SocketAddr>,
    slot: Arc<BindingSlot>,
    shutdown: Shutdown,
    admitted: Admitted,
) -> Ending {
    // The connection's own settings (timeouts, limits, close policy) are the
    // ones current at accept; each request takes the binding current then.
    let binding = slot.load_full();
    // `debug`, so the default level (`info`) pays one level check for it and
    // formats nothing: a disabled span is `Span::none()` with a pointer to its
    // metadata, and entering it does nothing. At `debug`, every connection
    // logs its end inside the span anyway. The `info` events inside name the
    // client themselves, as they are seen where the span is off.
    let span = tracing::debug_span!(
        "client",
        addr = client.map(tracing::field::display),
        listener = %binding.listener.name,
    );
    let served = async {
        let ending = match stream {
            ClientStream::Tcp(socket) => {
                serve_socket(socket, client, &slot, shutdown, admitted).await
            }
            ClientStream::Unix(socket) => {
                serve_socket(socket, client, &slot, shutdown, admitted).await
            }
        };
        tracing::debug!(?ending, "client connection ended");
        ending
    };
    let ending = served.instrument(span).await;
    binding
        .metrics
        .client_closed
        .get_or_create(&ReasonLabels {
            listener: binding.label.clone(),
            reason: Name::from(ending.label()),
        })
        .inc();
    ending
}

async fn serve_socket<S: Socket>(
    socket: S,
    client: Option<SocketAddr>,
    slot: &Arc<BindingSlot>,
    shutdown: Shutdown,
    admitted: Admitted,
) -> Ending {
    let binding = slot.load_full();
    let listener = &binding.listener;
    // The connection's own tokens: polling them (on every wake-up of this task,
    // and once per request) touches only this connection's lock, not the
    // process-wide tokens every connection on every worker shares. The force
    // token doubles as the request to make room at the listener's cap: a
    // token of its own would add a lock to every wake-up.
    let drain = shutdown.drain.child_token();
    let force = shutdown.force.child_token();
    let state = Arc::new(ClientState::new(
        listener.header_timeout,
        listener.idle_timeout,
        drain.clone(),
        binding.access_log.as_ref().map(|log| log.sink.clone()),
    ));
    let member = admitted.join(&state, &force);
    let fd = SocketFd(socket.as_fd().as_raw_fd());
    let max_head = listener.max_header_bytes.as_usize();
    let io = ClientIo::new(socket, state.clone(), max_head);
    let service = ProxyService::new(slot.clone(), state.clone(), client);
    let connection = hyper::server::conn::http1::Builder::new()
        .half_close(true)
        .header_read_timeout(None)
        .max_header_size(max_head)
        .max_buf_size(max_head.max(8192 + 1) * 2)
        .serve_connection(TokioIo::new(io), service);
    let stop = Stop {
        force,
        shutdown: &shutdown.force,
        member: &member,
        fd,
    };
    let (served, io) = drive(connection, &state.clock, &drain, stop).await;
    let ending = close(served, io, client, &binding).await;
    state.log_end(ending, &listener.name, client);
    ending
}

/// The connection's socket by number, for the one `ioctl` of an eviction
/// while hyper owns the socket (and keeps it open).
struct SocketFd(RawFd);

impl AsRawFd for SocketFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

/// What ends a connection at once: the drain deadline, or a request to make
/// room at the listener's cap, both through `force`.
struct Stop<'a> {
    /// The connection's child of `shutdown`.
    force: CancellationToken,
    /// The process-wide force token.
    shutdown: &'a CancellationToken,
    member: &'a Membership,
    fd: SocketFd,
}

impl Stop<'_> {
    /// `force` fired: the drain deadline (`None`), or a request to make room,
    /// taken when the connection is idle with its last response acknowledged
    /// (a request that started since, or a response still being written,
    /// declines it and passes it on).
    fn fired(&mut self, clock: &Clock) -> Option<Served> {
        if self.shutdown.is_cancelled() {
            return Some(Served::Forced);
        }
        // A fresh token: the drain deadline is still watched, and a declining
        // connection can be asked again later.
        self.force = self.shutdown.child_token();
        let delivered = sock::unacknowledged_bytes(&self.fd).is_ok_and(|n| n == 0);
        match clock.idle_since() {
            Some(since) if delivered => {
                tracing::debug!(idle_for = ?since.elapsed(), "evicting the idle connection: the listener is at max_connections");
                Some(Served::Evicted)
            }
            _ => {
                tracing::debug!("asked to make room at max_connections, but busy: declined");
                self.member.decline(self.force.clone());
                None
            }
        }
    }
}

/// Lets hyper serve until it is done, a client timeout expires, the drain
/// deadline passes or the connection makes room at the listener's cap; then
/// takes the socket back from it.
async fn drive<S: Socket>(
    mut connection: HyperConnection<S>,
    clock: &Clock,
    drain: &CancellationToken,
    mut stop: Stop<'_>,
) -> (Served, ClientIo<S>) {
    let expired = clock.expired();
    tokio::pin!(expired);
    let mut draining = false;
    let served = loop {
        // Biased, hyper first: when a request to make room is looked at, hyper
        // has read and written all it could, so the clock and the socket's
        // send queue tell the truth about the connection.
        tokio::select! {
            biased;
            result = std::future::poll_fn(|cx| connection.poll_without_shutdown(cx)) => {
                break Served::Finished(result);
            }
            reason = &mut expired => break Served::TimedOut(reason),
            _ = stop.force.cancelled() => match stop.fired(clock) {
                Some(served) => break served,
                None => continue,
            },
            _ = drain.cancelled(), if !draining => draining = true,
        }
        // Idle connections end now; a busy one ends after its response, which
        // carries `Connection: close`.
        Pin::new(&mut connection).graceful_shutdown();
    };
    let parts = connection.into_parts();
    drop(parts.service);
    (served, parts.io.into_inner())
}

/// Ends the connection hyper has let go of, by why it stopped.
async fn close<S: Socket>(
    served: Served,
    io: ClientIo<S>,
    client: Option<SocketAddr>,
    binding: &Binding,
) -> Ending {
    let listener = &binding.listener;
    match served {
        Served::Finished(Ok(())) if io.state().misbehaved() => {
            io.close_on_client_fin(listener.close_grace, ResetReason::Misbehaved)
                .await
        }
        Served::Finished(Ok(())) => {
            close_by_policy(io, listener.client_close, listener.close_grace).await
        }
        Served::Finished(Err(e))
            if e.is_parse() || e.is_parse_too_large() || e.is_parse_status() =>
        {
            // hyper has answered with a 4xx (and Connection: close). `info`,
            // so seen where the connection's span is off: it names the client.
            tracing::info!(listener = %listener.name, ?client, error = %e, "malformed request refused");
            let status = if e.is_parse_too_large() {
                http::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
            } else {
                http::StatusCode::BAD_REQUEST
            };
            binding.record(status, Some("malformed-request"), None);
            io.state().note_malformed(status);
            io.close_on_client_fin(listener.close_grace, ResetReason::Misbehaved)
                .await
        }
        Served::Finished(Err(e)) => {
            tracing::debug!(error = %e, "client connection failed");
            io.reset(ResetReason::ConnectionError)
        }
        Served::TimedOut(reason) => {
            tracing::debug!(reason = reason.label(), "client connection timed out");
            io.reset(reason)
        }
        Served::Forced => io.reset(ResetReason::DrainDeadline),
        Served::Evicted => io.reset(ResetReason::Evicted),
    }
}
