//! One pooled HTTP/1.1 upstream connection: hyper's sender, the shared socket,
//! what the backend announced about it (`Keep-Alive`, `Connection: close`), and
//! how it ends (RST, FIN, or waiting for the backend's FIN).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use hyper::client::conn::http1::SendRequest;
use tokio::time::Instant;

use super::body::{ResponseBody, UpstreamBody};
use super::io::{UpstreamIo, Wire};
use super::lease::Slot;
use super::retire::{close_manner, Close};
use super::view::{ConnRecord, Ending};
use super::PoolError;
use crate::config::{Retire, RetirePolicy, RetireReason};
use crate::sock::PeerState;

/// Runs the HTTP/1.1 client handshake over `io`: the sender, and the
/// connection future hyper needs driven for the connection's life.
pub(crate) async fn handshake(
    addr: std::net::SocketAddr,
    io: UpstreamIo,
) -> Result<
    (
        SendRequest<UpstreamBody>,
        hyper::client::conn::http1::Connection<hyper_util::rt::TokioIo<UpstreamIo>, UpstreamBody>,
    ),
    PoolError,
> {
    hyper::client::conn::http1::Builder::new()
        .handshake(hyper_util::rt::TokioIo::new(io))
        .await
        .map_err(|source| PoolError::Handshake { addr, source })
}

/// A live upstream connection owned by the pool (idle) or by a [`Lease`] (busy).
pub(crate) struct Conn {
    pub(super) sender: SendRequest<UpstreamBody>,
    wire: Wire,
    received: Arc<AtomicU64>,
    expires: Instant,
    /// Requests sent on it.
    requests: u64,
    /// What the backend announced in `Keep-Alive: timeout=N, max=M`.
    announced: KeepAliveHint,
    /// An exchange said `Connection: close`: never pool it again.
    closing: bool,
    /// Retiring peer-first: its next request says `Connection: close`.
    goodbye: bool,
    /// What `/pools` shows of it.
    record: Arc<ConnRecord>,
    /// Held for the connection's whole life: counts it against
    /// `pool.max_connections` and wakes waiters when it is gone.
    _slot: Slot,
}

/// The backend's `Keep-Alive` response header: how long it keeps an idle
/// connection and how many requests it serves on one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KeepAliveHint {
    /// `timeout=N`.
    pub timeout: Option<std::time::Duration>,
    /// `max=M`.
    pub max: Option<u64>,
}

impl KeepAliveHint {
    /// Parses `timeout=5, max=100` (unknown parameters are ignored).
    pub fn parse(value: &str) -> Self {
        let mut hint = Self::default();
        for part in value.split(',') {
            let Some((name, number)) = part.split_once('=') else {
                continue;
            };
            let Ok(number) = number.trim().trim_matches('"').parse::<u64>() else {
                continue;
            };
            match name.trim().to_ascii_lowercase().as_str() {
                "timeout" => hint.timeout = Some(std::time::Duration::from_secs(number)),
                "max" => hint.max = Some(number),
                _ => {}
            }
        }
        hint
    }
}

/// How long a connection whose last exchange said `Connection: close` waits
/// for the backend's FIN (so that tether's close is the passive one) before
/// it is reset.
const PEER_CLOSE_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

impl Conn {
    /// A connection over `socket` whose HTTP/1 handshake gave `sender`: it
    /// holds `slot` as an established connection.
    pub(crate) fn new(
        sender: SendRequest<UpstreamBody>,
        wire: Wire,
        received: Arc<AtomicU64>,
        expires: Instant,
        mut slot: Slot,
        record: Arc<ConnRecord>,
    ) -> Self {
        slot.established();
        Self {
            record,
            sender,
            wire,
            received,
            expires,
            requests: 0,
            announced: KeepAliveHint::default(),
            closing: false,
            goodbye: false,
            _slot: slot,
        }
    }

    /// What `/pools` shows of it.
    pub(crate) fn record(&self) -> &ConnRecord {
        &self.record
    }

    /// Whether hyper still has the connection open. Costs no syscall; a FIN
    /// or RST that hyper has not read yet goes unnoticed (see [`Self::is_usable`]).
    pub(crate) fn is_open(&self) -> bool {
        !self.sender.is_closed()
    }

    /// Whether an idle connection can carry another request: hyper still has it
    /// open and nothing arrived on it unasked (no FIN, no stray bytes, no RST).
    pub(crate) fn is_usable(&self) -> bool {
        self.is_open() && self.wire.peer_state() == PeerState::Quiet
    }

    /// When it outlives its (jittered) `max_lifetime`, its client
    /// certificate, or (once replaced) the TLS material it was made with.
    pub(crate) fn expires(&self) -> Instant {
        match self.wire.rollover_at(self.record.id()) {
            Some(at) => at.min(self.expires),
            None => self.expires,
        }
    }

    /// The idle timeout the backend announced on this connection
    /// (`Keep-Alive: timeout=N`), if it did.
    pub(crate) fn announced_idle(&self) -> Option<std::time::Duration> {
        self.announced.timeout
    }

    /// How the backend closed it, if it did: `peer-first` after its FIN,
    /// `RST` after its reset. A peek: for a connection being discarded.
    pub(crate) fn closed_by_backend(&self) -> Option<&'static str> {
        match self.wire.peer_state() {
            PeerState::Closed => Some("peer-first"),
            PeerState::Failed => Some("RST"),
            PeerState::Quiet | PeerState::StrayBytes => None,
        }
    }

    /// The connection's id.
    pub(crate) fn id(&self) -> u64 {
        self.record.id()
    }

    /// Requests sent on it so far: after a send, that request's number.
    pub(crate) fn requests(&self) -> u64 {
        self.requests
    }

    /// Whether it has carried as many requests as the backend serves on one
    /// connection (`Keep-Alive: max=M`).
    pub(crate) fn at_request_limit(&self) -> bool {
        self.announced.max.is_some_and(|max| self.requests >= max)
    }

    /// Whether an exchange on it said `Connection: close`: the backend closes
    /// it, so it must never be pooled again.
    pub(crate) fn is_closing(&self) -> bool {
        self.closing
    }

    /// Makes its next request its last (retiring peer-first): that request
    /// says `Connection: close`, and the backend closes after answering it.
    pub(crate) fn end_after_next_request(&mut self) {
        self.goodbye = true;
    }

    /// Sends a request of the pool's own (a probe) once hyper is ready for
    /// it. Such a request is never sent anywhere else, so a failure does not
    /// give it back (a client's request goes through [`Lease::send`], which
    /// does). On a connection ending after this request
    /// ([`Self::end_after_next_request`]) the request says `Connection: close`.
    pub(crate) async fn send(
        &mut self,
        request: http::Request<UpstreamBody>,
    ) -> Result<http::Response<ResponseBody>, hyper::Error> {
        let mut request = request;
        self.sender.ready().await?;
        self.prepare(&mut request);
        let response = self.sender.send_request(request).await?;
        Ok(response.map(ResponseBody::new))
    }

    /// Counts a request about to be sent, and makes it say `Connection: close`
    /// when it is the connection's last: what every send does first.
    #[inline]
    pub(super) fn prepare(&mut self, request: &mut http::Request<UpstreamBody>) {
        self.requests += 1;
        self.record.served(self.requests);
        if self.goodbye {
            request.headers_mut().insert(
                http::header::CONNECTION,
                http::HeaderValue::from_static("close"),
            );
            self.closing = true;
        }
    }

    /// The socket, for tests that check its options.
    #[cfg(test)]
    pub(crate) fn socket(&self) -> &tokio::net::TcpStream {
        self.wire.socket()
    }

    /// Records `Keep-Alive: timeout=N, max=M` and `Connection: close`.
    pub(crate) fn note_response(&mut self, headers: &http::HeaderMap) {
        const KEEP_ALIVE: http::HeaderName = http::HeaderName::from_static("keep-alive");
        if let Some(value) = headers.get(KEEP_ALIVE).and_then(|v| v.to_str().ok()) {
            let hint = KeepAliveHint::parse(value);
            if hint.timeout.is_some() {
                self.announced.timeout = hint.timeout;
            }
            if hint.max.is_some() {
                self.announced.max = hint.max;
            }
        }
        self.closing |= crate::connection_header::has_token(headers, "close");
    }

    /// Bytes received so far on this connection.
    pub(crate) fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    /// Closes the connection the way the retire policy for `reason` calls for.
    pub(crate) fn close(self, reason: RetireReason, policy: &RetirePolicy) {
        let policy = policy.for_reason(reason);
        // Only peer_first asks whether the backend closed already (a peek).
        let peer_closed =
            policy == Retire::PeerFirst && self.wire.peer_state() == PeerState::Closed;
        let manner = close_manner(policy, peer_closed);
        self.record.ended(match manner {
            Close::Fin => Ending::by_tether("FIN", reason),
            Close::Reset => Ending::by_tether("RST", reason),
            Close::Passive => Ending::by_backend("peer-first", reason.label()),
        });
        match manner {
            Close::Fin => {
                if let Err(e) = self.wire.send_fin() {
                    tracing::debug!(error = %e, "cannot half-close retired upstream connection");
                }
            }
            Close::Passive => {}
            Close::Reset => self.wire.reset(),
        }
        // Dropping the sender ends hyper's connection task, which drops its half
        // of the socket; the last drop closes it.
    }

    /// Closes a connection whose last exchange said `Connection: close`: the
    /// backend closes it, so wait briefly for its FIN and close passively;
    /// reset if it does not come.
    pub(crate) fn close_after_peer(self) {
        tokio::spawn(async move {
            let waited = tokio::time::timeout(PEER_CLOSE_WAIT, async {
                loop {
                    if self.wire.socket().readable().await.is_err() {
                        return;
                    }
                    match self.wire.peer_state() {
                        PeerState::Quiet => tokio::task::yield_now().await,
                        _ => return,
                    }
                }
            })
            .await;
            // Its last request said goodbye only when retiring at its lifetime.
            let reason = if self.goodbye {
                RetireReason::Lifetime.label()
            } else {
                "backend-closed"
            };
            if waited.is_err() || self.wire.peer_state() != PeerState::Closed {
                self.wire.reset();
                self.record.ended(Ending {
                    closed_by: "tether",
                    how: "RST",
                    reason,
                });
            } else {
                self.record.ended(Ending::by_backend("peer-first", reason));
            }
        });
    }
}
