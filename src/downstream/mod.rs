//! The client side of tether: one task per accepted connection, serving HTTP/1.0
//! and HTTP/1.1 with tether's own HTTP/1 codec ([`crate::h1`]), and deciding
//! how the connection ends.
//!
//! The task reads each request head into a buffer it lends and gives back
//! (`conn`), hands the request to the proxy service in place, and writes the
//! response itself (`response`); the request body is read from the same
//! socket by whoever polls it (`body`). tether sends FIN only where the
//! close discipline allows it: the socket's owner (`io`) resets (SO_LINGER 0)
//! on drop unless a path has explicitly chosen an orderly close (`close`).
//! Timeouts (header, idle) are tether's own, driven by a per-connection clock
//! (`clock`) that the task and the service update through the connection's
//! shared state (`state`), which is also what the proxy service knows of the
//! connection.

mod body;
mod clock;
mod close;
mod conn;
mod io;
mod registry;
mod response;
mod state;

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::sync::Arc;

use tokio::time::Sleep;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::drain::Shutdown;
use crate::h1::H1Error;
use crate::http::{Binding, BindingSlot, ProxyService};
use crate::pool::BodyError;
use crate::sock;
use clock::Clock;
use close::close_by_policy;
pub use close::{Ending, ResetReason};
use conn::{Connection, Served};
pub use io::ClientStream;
use io::{ClientIo, Socket};
use registry::Membership;
pub use registry::{Admitted, Registry, Waiting};
use state::ClientState;

/// What goes wrong on a client connection.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket failed.
    #[error("client connection failed: {0}")]
    Io(#[from] std::io::Error),
    /// The request (its head, or its body's framing) is refused.
    #[error(transparent)]
    Refused(H1Error),
    /// The client closed in the middle of a request head.
    #[error("the client closed the connection in the middle of a request head")]
    ClosedMidHead,
    /// The client closed before its request body ended.
    #[error("the client closed the connection before its request body ended")]
    ClosedMidBody,
    /// The client reset the connection while its request was served, or a
    /// body was read after the connection had ended.
    #[error("the client connection is gone")]
    Gone,
    /// The response body failed while it was written.
    #[error("response body failed: {0}")]
    ResponseBody(BodyError),
    /// The response body ended before its Content-Length.
    #[error("the response body ended before its Content-Length")]
    ResponseTooShort,
    /// The response body ran past its Content-Length.
    #[error("the response body ran past its Content-Length")]
    ResponseTooLong,
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
    binding.record_client_closed(ending.label());
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
        listener.send_timeout,
        drain.clone(),
        binding.access_log.as_ref().map(|log| log.sink.clone()),
    ));
    let member = admitted.join(&state, &force);
    let fd = SocketFd(socket.as_fd().as_raw_fd());
    let io = ClientIo::new(socket, state.clone());
    let service = ProxyService::new(slot.clone(), state.clone(), client);
    let mut connection = Connection::new(
        io,
        state.clone(),
        service,
        drain.clone(),
        binding.clone(),
        client,
    );
    let stop = Stop {
        force,
        shutdown: &shutdown.force,
        member: &member,
        fd,
    };
    // The connection's one timer: its client timeouts, then its close.
    let timer = state.clock.timer();
    tokio::pin!(timer);
    let served = drive(&mut connection, &state.clock, &drain, stop, timer.as_mut()).await;
    let ending = close(served, connection.io, &binding, timer).await;
    state.log_end(ending, &listener.name, client);
    ending
}

/// The connection's socket by number, for the one `ioctl` of an eviction
/// while the serving loop borrows the socket (and keeps it open).
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

/// Serves the connection until it is done, a client timeout expires, the
/// drain deadline passes or the connection makes room at the listener's cap.
async fn drive<S: Socket>(
    connection: &mut Connection<S>,
    clock: &Clock,
    drain: &CancellationToken,
    mut stop: Stop<'_>,
    timer: Pin<&mut Sleep>,
) -> Served {
    let expired = clock.expired(timer);
    let drained = drain.cancelled();
    let serving = connection.serve();
    tokio::pin!(expired, drained, serving);
    let mut draining = false;
    loop {
        // Biased, the connection first: when a request to make room is looked
        // at, the connection has read and written all it could, so the clock
        // and the socket's send queue tell the truth about it.
        tokio::select! {
            biased;
            served = &mut serving => return served,
            reason = &mut expired => return Served::TimedOut(reason),
            _ = stop.force.cancelled() => match stop.fired(clock) {
                Some(served) => return served,
                None => continue,
            },
            // Only the wake-up: an idle connection then ends at once, a busy
            // one after a response carrying `Connection: close`, as the
            // serving loop reads the drain itself.
            _ = &mut drained, if !draining => draining = true,
        }
    }
}

/// Ends the connection once it is no longer served, by why.
async fn close<S: Socket>(
    served: Served,
    io: ClientIo<S>,
    binding: &Binding,
    timer: Pin<&mut Sleep>,
) -> Ending {
    let listener = &binding.listener;
    let grace = listener.close_grace;
    match served {
        Served::Finished if io.state().misbehaved() => {
            io.close_on_client_fin(grace, ResetReason::Misbehaved, timer)
                .await
        }
        Served::Finished => close_by_policy(io, listener.client_close, grace, timer).await,
        // Answered with a 4xx and `Connection: close`; no FIN for it.
        Served::Malformed => {
            io.close_on_client_fin(grace, ResetReason::Misbehaved, timer)
                .await
        }
        Served::Failed(e) => {
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
