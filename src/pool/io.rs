//! The IO object hyper drives for an upstream connection: reads and writes
//! through the socket the pool shares, counting bytes received.
//!
//! The socket is shared (`Arc<TcpStream>`) between hyper's connection task and
//! the pool, so the pool can peek at an idle connection for staleness and choose
//! how it ends (RST via linger 0, or FIN) without going through hyper's shutdown,
//! which would always send FIN and leave TIME_WAIT on tether.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;

use crate::sock;

/// The IO object handed to hyper: reads and writes through the shared socket and
/// counts bytes received, so a failed request can tell whether any response
/// byte arrived (only then is a retry unsafe).
pub(crate) struct UpstreamIo {
    socket: Arc<TcpStream>,
    received: Arc<AtomicU64>,
}

impl UpstreamIo {
    /// An IO over `socket` with a fresh received-bytes counter.
    pub(crate) fn new(socket: Arc<TcpStream>) -> Self {
        Self {
            socket,
            received: Arc::new(AtomicU64::new(0)),
        }
    }

    /// The counter of bytes received, shared with the connection that owns
    /// this IO.
    pub(crate) fn received(&self) -> Arc<AtomicU64> {
        self.received.clone()
    }
}

impl AsyncRead for UpstreamIo {
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
            self.received.fetch_add(read as u64, Ordering::Relaxed);
            return Poll::Ready(Ok(()));
        }
    }
}

impl AsyncWrite for UpstreamIo {
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
        sock::poll_write_when_ready(&self.socket, cx, |socket| socket.try_write_vectored(bufs))
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
