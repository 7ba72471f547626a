//! The IO of an upstream connection: reads and writes through the socket the
//! pool shares, over TLS when the upstream has it, counting bytes received.
//!
//! The socket is shared (`Arc<TcpStream>`) between the connection's IO (the
//! HTTP/1.1 exchanges', or hyper's HTTP/2 connection task) and the pool, so
//! the pool can peek at an idle connection for staleness and choose how it
//! ends (RST via linger 0, or FIN) without a shutdown through the IO, which
//! would always send FIN and leave TIME_WAIT on tether. A TLS session is
//! shared the same way ([`Wire`]): the IO reads and writes through it, and
//! the pool reads through it when an idle connection has bytes waiting (a
//! session ticket is not stray data) and writes `close_notify` when it ends
//! one.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;

use super::rotation::Lineage;
use crate::sock::{self, PeerState};

/// A TLS session over the shared socket.
pub(crate) type TlsIo = tokio_rustls::client::TlsStream<RawIo>;

/// A TLS session shared by hyper's IO and the pool's [`Wire`]. A std mutex:
/// it is held only inside a poll or a non-blocking read, never across an await.
pub(crate) type SharedTls = Arc<Mutex<TlsIo>>;

/// Takes the session's lock; a panic inside a poll cannot leave rustls'
/// state torn (it is left as the failed call left it, which its next call
/// reports).
fn lock(tls: &SharedTls) -> MutexGuard<'_, TlsIo> {
    tls.lock().unwrap_or_else(|e| e.into_inner())
}

/// What the pool keeps of a connection's transport: the socket, for its
/// options and the peek, and the TLS session, if any.
#[derive(Clone)]
pub(crate) struct Wire {
    socket: Arc<TcpStream>,
    tls: Option<TlsWire>,
}

/// The TLS side of a [`Wire`].
#[derive(Clone)]
struct TlsWire {
    session: SharedTls,
    close_notify_wait: Duration,
    lineage: Option<Lineage>,
}

impl Wire {
    /// A plain TCP connection.
    pub(crate) fn plain(socket: Arc<TcpStream>) -> Self {
        Self { socket, tls: None }
    }

    /// A TLS connection whose aborts wait up to `close_notify_wait` for the
    /// `close_notify` to be acknowledged.
    /// `lineage` says which TLS material made it, if it rolls over when that
    /// material is replaced.
    pub(crate) fn tls(
        socket: Arc<TcpStream>,
        session: SharedTls,
        close_notify_wait: Duration,
        lineage: Option<Lineage>,
    ) -> Self {
        Self {
            socket,
            tls: Some(TlsWire {
                session,
                close_notify_wait,
                lineage,
            }),
        }
    }

    /// When the connection with `id` rolls over to newer TLS material, once
    /// the material it was made with is replaced.
    pub(crate) fn rollover_at(&self, id: u64) -> Option<tokio::time::Instant> {
        self.tls.as_ref()?.lineage.as_ref()?.rollover_at(id)
    }

    /// The socket.
    pub(crate) fn socket(&self) -> &TcpStream {
        &self.socket
    }

    /// Whether the runtime has seen the socket readable since it was last
    /// read dry (bytes, a FIN or an error arrived); otherwise the waker of
    /// `cx` is woken when it does.
    pub(crate) fn poll_arrival(&self, cx: &mut Context<'_>) -> bool {
        self.socket.poll_read_ready(cx).is_ready()
    }

    /// What an idle connection's peer did: the raw peek, and where it shows
    /// bytes on a TLS connection, what they are once rustls has read them
    /// (post-handshake records — session tickets, key updates — leave the
    /// connection quiet).
    pub(crate) fn peer_state(&self) -> PeerState {
        let raw = sock::peer_state(&*self.socket);
        match (&self.tls, raw) {
            (Some(tls), PeerState::StrayBytes) => super::tls::read_through(&mut lock(&tls.session)),
            _ => raw,
        }
    }

    /// Sends FIN, after a `close_notify` on TLS.
    pub(crate) fn send_fin(&self) -> io::Result<()> {
        if let Some(tls) = &self.tls {
            super::tls::close_notify(&mut lock(&tls.session));
        }
        sock::send_fin(&*self.socket)
    }

    /// Makes the connection end in RST. On TLS a `close_notify` goes first,
    /// and the reset waits (at most `close_notify_wait`) until the kernel's
    /// send queue is empty, so the backend reads a clean TLS end, then the
    /// RST; neither side keeps a TIME_WAIT.
    pub(crate) fn reset(&self) {
        let Some(tls) = &self.tls else {
            sock::reset_on_close(&*self.socket);
            return;
        };
        super::tls::close_notify(&mut lock(&tls.session));
        let (wire, wait) = (self.clone(), tls.close_notify_wait);
        let reset = async move {
            let deadline = tokio::time::Instant::now() + wait;
            while sock::unacknowledged_bytes(&*wire.socket).unwrap_or(0) > 0
                && tokio::time::Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            sock::reset_on_close(&*wire.socket);
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(reset);
            }
            // No runtime (a drop at exit): reset at once.
            Err(_) => sock::reset_on_close(&*self.socket),
        }
    }
}

/// The plain socket under hyper or under a TLS session: reads into the
/// caller's buffer without zeroing it, writes one piece with `send(2)` and
/// several vectored, never shuts down.
pub(crate) struct RawIo {
    socket: Arc<TcpStream>,
}

impl RawIo {
    /// An IO over `socket`.
    pub(crate) fn new(socket: Arc<TcpStream>) -> Self {
        Self { socket }
    }

    /// The socket.
    pub(crate) fn socket(&self) -> &TcpStream {
        &self.socket
    }
}

impl AsyncRead for RawIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            ready!(self.socket.poll_read_ready(cx))?;
            // Reads into the uninitialised part directly: zeroing it first
            // (initialize_unfilled) would cost a memset of hyper's whole read
            // buffer on every read. A read that leaves room in the buffer
            // drained the socket, so readiness is cleared as tokio's own
            // poll_read does: the next read waits for epoll instead of
            // costing a recv that returns EAGAIN (one per response otherwise).
            let room = buf.remaining();
            let mut read = 0;
            let attempt = self.socket.try_io(Interest::READABLE, || {
                read = self.socket.try_read_buf(buf)?;
                if read > 0 && read < room {
                    return Err(io::ErrorKind::WouldBlock.into());
                }
                Ok(())
            });
            match attempt {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && read > 0 => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
            return Poll::Ready(Ok(()));
        }
    }
}

impl AsyncWrite for RawIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[io::IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        // One piece goes with send(2), not writev(2): less work in the kernel.
        sock::poll_write_when_ready(&self.socket, cx, |socket| match bufs {
            [one] => socket.try_write(one),
            _ => socket.try_write_vectored(bufs),
        })
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    /// Deliberately does nothing: how an upstream connection ends (RST or FIN)
    /// is the pool's decision, taken on the shared socket.
    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// What hyper reads and writes through.
enum Transport {
    Plain(RawIo),
    Tls(SharedTls),
}

/// The IO of an upstream connection (an HTTP/1.1 connection's own, or the one
/// handed to hyper for HTTP/2): reads and writes through the shared socket
/// (or the TLS session over it) and counts bytes received, so a failed
/// request can tell whether any response byte arrived (only then is a retry
/// unsafe). Under TLS the count is of plaintext: a session ticket is no
/// response byte.
pub(crate) struct UpstreamIo {
    transport: Transport,
    received: u64,
}

impl UpstreamIo {
    /// An IO over `socket`, nothing received yet.
    pub(crate) fn new(socket: Arc<TcpStream>) -> Self {
        Self::over(Transport::Plain(RawIo::new(socket)))
    }

    /// An IO through the TLS session `tls`.
    pub(crate) fn tls(tls: SharedTls) -> Self {
        Self::over(Transport::Tls(tls))
    }

    fn over(transport: Transport) -> Self {
        Self {
            transport,
            received: 0,
        }
    }

    /// Bytes received so far.
    pub(crate) fn received_bytes(&self) -> u64 {
        self.received
    }

    /// Ready when the socket has something to read, or its peer closed or
    /// failed (under TLS that may be a session ticket: read to tell).
    pub(crate) fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &self.transport {
            Transport::Plain(raw) => raw.socket.poll_read_ready(cx),
            Transport::Tls(tls) => lock(tls).get_ref().0.socket.poll_read_ready(cx),
        }
    }
}

impl AsyncRead for UpstreamIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = match &mut self.transport {
            Transport::Plain(raw) => Pin::new(raw).poll_read(cx, buf),
            Transport::Tls(tls) => Pin::new(&mut *lock(tls)).poll_read(cx, buf),
        };
        let read = buf.filled().len() - before;
        self.received += read as u64;
        polled
    }
}

impl AsyncWrite for UpstreamIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.transport {
            Transport::Plain(raw) => Pin::new(raw).poll_write(cx, buf),
            Transport::Tls(tls) => Pin::new(&mut *lock(tls)).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.transport {
            Transport::Plain(raw) => Pin::new(raw).poll_write_vectored(cx, bufs),
            Transport::Tls(tls) => Pin::new(&mut *lock(tls)).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        matches!(self.transport, Transport::Plain(_))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.transport {
            Transport::Plain(_) => Poll::Ready(Ok(())),
            // rustls holds records until they are flushed to the socket.
            Transport::Tls(tls) => Pin::new(&mut *lock(tls)).poll_flush(cx),
        }
    }

    /// Deliberately does nothing: how an upstream connection ends (RST or
    /// FIN, `close_notify` first on TLS) is the pool's decision, taken on the
    /// shared socket.
    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
