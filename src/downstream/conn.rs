//! The exchanges of one client connection, one after another in its task:
//! read a head, hand the request to the proxy service, write its response,
//! and go on while the connection is kept.
//!
//! Buffers are lent, not kept: between requests the connection holds no
//! buffer at all, only a wait for readability. When bytes arrive, they are
//! read into a buffer of their size (grown up to `max_header_bytes` for a
//! long head); the head is parsed in place ([`crate::h1::parse_request`]),
//! the service reads it there, and the bytes after the
//! head go to the request body. Bytes that follow the exchange (a pipelined
//! request) stay for the next one; without them the buffer is given up.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::task::Poll;

use bytes::{Buf, BytesMut};
use tokio_util::sync::CancellationToken;

use super::body::{BodySource, RequestBody};
use super::io::{ClientIo, Socket, Wire};
use super::response::{self, Answering};
use super::state::ClientState;
use super::ClientError;
use crate::h1::{parse_request, H1Error, HeadLimits, Parsed, RequestFraming, RequestHead, Version};
use crate::http::{
    Binding, ClientConnection, ClientRequest, ProxyError, ProxyResponse, ProxyService,
};
use crate::sock;

/// The least a head's buffer grows by when its first read did not hold it.
const MIN_GROWTH: usize = 1024;
/// Header fields a request may have, as hyper's server allows.
const MAX_HEADERS: usize = 100;

/// Why a connection stopped being served.
pub(super) enum Served {
    /// In order: the client closed between requests, the drain found it
    /// idle, or an exchange ended it.
    Finished,
    /// A malformed request was refused; its answer is written.
    Malformed,
    /// The socket failed, the client left mid-request, or a response body
    /// failed: no clean end is possible.
    Failed(ClientError),
    /// A client timeout expired.
    TimedOut(super::ResetReason),
    /// The drain deadline passed.
    Forced,
    /// Asked to make room at the listener's cap while idle.
    Evicted,
}

/// One client connection being served.
pub(super) struct Connection<S: Socket> {
    pub(super) io: ClientIo<S>,
    state: Arc<ClientState>,
    service: ProxyService<ClientState>,
    /// The connection's own child of the drain token.
    drain: CancellationToken,
    limits: HeadLimits,
    /// Bytes read past the last request (pipelined); `None` when nothing
    /// waits, so that an idle connection holds no buffer.
    pending: Option<BytesMut>,
    /// The binding current at accept, for what is counted per connection.
    binding: Arc<Binding>,
    client: Option<SocketAddr>,
}

impl<S: Socket> Connection<S> {
    /// A connection on `io`, answered by `service`.
    pub(super) fn new(
        io: ClientIo<S>,
        state: Arc<ClientState>,
        service: ProxyService<ClientState>,
        drain: CancellationToken,
        binding: Arc<Binding>,
        client: Option<SocketAddr>,
    ) -> Self {
        let limits = HeadLimits {
            max_head_bytes: binding.listener.max_header_bytes.as_usize(),
            max_headers: MAX_HEADERS,
        };
        Self {
            io,
            state,
            service,
            drain,
            limits,
            pending: None,
            binding,
            client,
        }
    }

    /// Serves requests until the connection is done with.
    pub(super) async fn serve(&mut self) -> Served {
        loop {
            let read = match self.read_head().await {
                Ok(Some(read)) => read,
                Ok(None) => return Served::Finished,
                Err(ClientError::Refused(error)) => return Box::pin(self.refuse(error)).await,
                Err(e) => return Served::Failed(e),
            };
            // Boxed: the exchange's state (the service's included) is held
            // only while a request is served, never by an idle connection.
            match boxed_in_place(|| self.exchange(read)).await {
                Ok(true) => continue,
                Ok(false) => return Served::Finished,
                Err(ClientError::Refused(error)) => return Box::pin(self.refuse(error)).await,
                Err(e) => return Served::Failed(e),
            }
        }
    }

    /// The next request head; `None` when the client closed, or the drain
    /// came, between requests.
    /// The head's bytes stay at the front of `pending`.
    async fn read_head(&mut self) -> Result<Option<RequestHead>, ClientError> {
        if self.pending.as_ref().is_some_and(|buf| !buf.is_empty()) {
            // A pipelined request's bytes: its head is being read from now.
            self.state.clock.bytes_arrived();
        }
        loop {
            if let Some(buf) = self.pending.as_mut().filter(|buf| !buf.is_empty()) {
                if let Parsed::Complete(head) =
                    parse_request(buf, self.limits).map_err(ClientError::Refused)?
                {
                    return Ok(Some(head));
                }
            }
            if !self.fill().await? {
                return Ok(None);
            }
        }
    }

    /// Reads more of a head. `false`: the client closed, or the drain came,
    /// before its first byte.
    async fn fill(&mut self) -> Result<bool, ClientError> {
        let wire = self.io.wire().clone();
        loop {
            let Some(buf) = self.pending.as_mut().filter(|buf| !buf.is_empty()) else {
                // Idle: nothing held while the client is silent.
                self.pending = None;
                if self.await_request(&wire).await {
                    return Ok(false);
                }
                match wire.read_first() {
                    Ok(first) if first.is_empty() => return Ok(false),
                    Ok(first) => {
                        self.pending = Some(first);
                        self.state.clock.bytes_arrived();
                        return Ok(true);
                    }
                    // The readiness was stale: wait again.
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Err(ClientError::Io(e)),
                }
            };
            if buf.len() == buf.capacity() {
                // Room for the rest of a long head, up to the limit, which
                // the parser enforces.
                let room = self.limits.max_head_bytes.saturating_sub(buf.len());
                buf.reserve(buf.capacity().max(MIN_GROWTH).min(room).max(1));
            }
            match wire.read_into(buf) {
                Ok(0) => return Err(ClientError::ClosedMidHead),
                Ok(_) => {
                    self.state.clock.bytes_arrived();
                    return Ok(true);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::future::poll_fn(|cx| wire.socket.poll_read_ready(cx)).await?;
                }
                Err(e) => return Err(ClientError::Io(e)),
            }
        }
    }

    /// Waits, holding nothing, for the next request's first bytes; `true`
    /// when the drain came first.
    async fn await_request(&self, wire: &Wire<S>) -> bool {
        std::future::poll_fn(|cx| {
            if self.drain.is_cancelled() {
                return Poll::Ready(true);
            }
            wire.socket.poll_read_ready(cx).map(|_| false)
        })
        .await
    }

    /// Serves one request whose head has been read: whether the connection
    /// carries another after it.
    async fn exchange(&mut self, head: RequestHead) -> Result<bool, ClientError> {
        // The head's bytes and what follows them; the connection takes back
        // what is left when the exchange is done.
        let mut buf = self.pending.take().unwrap_or_default();
        let answering = Answering {
            http10: head.version == Version::Http10,
            head_request: head.is_head(&buf),
            closing: false,
        };
        let has_body = !matches!(
            head.framing,
            RequestFraming::None | RequestFraming::Length(0)
        );
        let (body, mut head_bytes) = if has_body {
            // The body reads on from the bytes after the head, which are
            // split off (a split shares the buffer) to be lent to it.
            let head_bytes = buf.split_to(head.len);
            let wire = self.io.wire();
            let expect = head.expect_continue && head.version == Version::Http11;
            let generation = wire.inbound().lend(buf, head.framing, expect);
            let source: Weak<dyn BodySource> = Arc::downgrade(wire) as Weak<dyn BodySource>;
            let body = RequestBody::reading(source, generation, head.framing);
            (body, head_bytes)
        } else {
            // No split, and no allocation a split would need: the head is
            // read where it lies, and a pipelined request after it stays.
            (RequestBody::empty(), buf)
        };
        let request = ClientRequest {
            head: &head,
            bytes: &head_bytes[..head.len],
            body,
        };
        let response = self.call(request, !has_body).await?;
        head_bytes.advance(head.len);
        if !head_bytes.is_empty() {
            self.pending = Some(head_bytes);
        }
        drop(head);
        let wire = self.io.wire().clone();
        let prelude = if has_body {
            wire.inbound().start_response()
        } else {
            &[]
        };
        let answering = Answering {
            closing: self.state.draining(),
            ..answering
        };
        let last = response::write(&wire, response, &answering, prelude, &self.state).await?;
        let mut kept = !last && !self.state.misbehaved();
        if has_body {
            std::future::poll_fn(|cx| wire.inbound().poll_settled(cx)).await;
            match wire.inbound().reclaim(&wire) {
                Some(rest) if !rest.is_empty() => self.pending = Some(rest),
                Some(_) => {}
                // The body's end is not known: the next request cannot be
                // found, so the connection ends (hyper did the same).
                None => kept = false,
            }
        }
        Ok(kept)
    }

    /// The service's answer to `request`. Meanwhile, when no body is being
    /// read (which owns the socket's read side), a client that resets the
    /// connection is noticed and the exchange abandoned: its upstream
    /// request is cancelled rather than left to run for nobody. A client
    /// that only half-closes still gets its answer.
    async fn call(
        &mut self,
        request: ClientRequest<'_, RequestBody>,
        watch: bool,
    ) -> Result<ProxyResponse, ClientError> {
        let wire = self.io.wire().clone();
        let serving = self.service.call(request);
        tokio::pin!(serving);
        let mut watching = watch;
        std::future::poll_fn(|cx| {
            if let Poll::Ready(response) = serving.as_mut().poll(cx) {
                return Poll::Ready(Ok(response));
            }
            while watching {
                if wire.socket.poll_read_ready(cx).is_pending() {
                    break;
                }
                match client_side(&wire) {
                    sock::PeerState::Failed => return Poll::Ready(Err(ClientError::Gone)),
                    // Readiness cleared: look again (and register for the next).
                    sock::PeerState::Quiet => {}
                    // A half-close, or a pipelined request: nothing more to see.
                    sock::PeerState::Closed | sock::PeerState::StrayBytes => watching = false,
                }
            }
            Poll::Pending
        })
        .await
    }

    /// Answers a malformed request (`Connection: close`, no FIN: the
    /// client misbehaved), counts it and says so.
    async fn refuse(&mut self, error: H1Error) -> Served {
        let (status, reason) = error.answer();
        let listener = &self.binding.listener;
        // `info`, so seen where the connection's span is off: it names the client.
        tracing::info!(listener = %listener.name, client = ?self.client, %error, "malformed request refused");
        self.binding.record(status, Some(reason), None);
        self.state.note_malformed(status, reason);
        self.state.mark_misbehaved();
        let response = ProxyError::refused(status, reason, error.to_string())
            .into_response(true)
            .into();
        let answering = Answering {
            http10: false,
            head_request: false,
            closing: true,
        };
        let wire = self.io.wire().clone();
        if let Err(e) = response::write(&wire, response, &answering, &[], &self.state).await {
            tracing::debug!(error = %e, "the answer to a malformed request was not written");
        }
        Served::Malformed
    }
}

/// The future `make` returns, in a box of its own and built there. One made
/// on the stack and then boxed is copied whole: 3.5 KB for an exchange's,
/// at every request, where its first state is a few pointers.
#[inline(always)]
fn boxed_in_place<F: Future>(make: impl FnOnce() -> F) -> Pin<Box<F>> {
    Box::into_pin(Box::write(Box::new_uninit(), make()))
}

/// What the client's side of `wire` shows, without taking any byte: its
/// readiness is cleared when nothing is there, so the next look waits.
fn client_side<S: Socket>(wire: &Wire<S>) -> sock::PeerState {
    let looked = wire.socket.try_io(tokio::io::Interest::READABLE, || {
        match sock::peer_state(&wire.socket) {
            sock::PeerState::Quiet => Err(std::io::ErrorKind::WouldBlock.into()),
            seen => Ok(seen),
        }
    });
    looked.unwrap_or(sock::PeerState::Quiet)
}
