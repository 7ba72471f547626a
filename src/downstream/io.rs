//! The client socket as hyper sees it. [`ClientIo`] resets the connection
//! (SO_LINGER 0) when dropped unless a path chose an orderly close, so every
//! path nobody thought about ends in RST, never in a FIN that would leave
//! TIME_WAIT behind. On the way it feeds the connection's clock and head scan,
//! and it sends tether's FIN in the flush that ends the last response.
//!
//! TCP and unix sockets are told apart once, when a connection is served:
//! [`ClientIo`] is generic over its [`Socket`], so the per-read and per-write
//! paths carry no dispatch.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};
use tokio::time::Instant;

use super::close::{Ending, ResetReason};
use super::head_scan::HeadScan;
use super::state::ClientState;
use crate::sock;

/// An accepted client stream.
pub enum ClientStream {
    /// TCP (usually loopback).
    Tcp(TcpStream),
    /// A unix stream socket (no RST exists there; aborts are plain closes).
    Unix(UnixStream),
}

/// A stream socket a client connection is served on.
pub(super) trait Socket:
    AsyncRead + AsyncWrite + std::os::fd::AsFd + Unpin + Send + 'static
{
    /// The TCP stream, for what only TCP has: RST, MSG_MORE and the count of
    /// unacknowledged bytes.
    fn tcp(&self) -> Option<&TcpStream>;
}

impl Socket for TcpStream {
    fn tcp(&self) -> Option<&TcpStream> {
        Some(self)
    }
}

impl Socket for UnixStream {
    fn tcp(&self) -> Option<&TcpStream> {
        None
    }
}

/// The client socket as hyper sees it; resets on drop unless an orderly close
/// was chosen.
pub(super) struct ClientIo<S: Socket> {
    socket: S,
    state: Arc<ClientState>,
    scan: HeadScan,
    reset_on_drop: bool,
}

impl<S: Socket> ClientIo<S> {
    /// Wraps an accepted socket; `max_head` bounds the head scan.
    pub(super) fn new(socket: S, state: Arc<ClientState>, max_head: usize) -> Self {
        Self {
            socket,
            state,
            scan: HeadScan::new(max_head),
            reset_on_drop: true,
        }
    }

    /// The connection's shared state.
    pub(super) fn state(&self) -> &ClientState {
        &self.state
    }

    /// Whether the client has closed its side (its FIN or RST is queued).
    pub(super) fn peer_closed(&self) -> bool {
        sock::peer_state(&self.socket) == sock::PeerState::Closed
    }

    /// Sends tether's FIN.
    pub(super) fn send_fin(&self) -> io::Result<()> {
        sock::send_fin(&self.socket)
    }

    /// Waits up to `grace` for the client's FIN: then the close is passive
    /// and orderly; otherwise RST, for `why`.
    pub(super) async fn close_on_client_fin(mut self, grace: Duration, why: ResetReason) -> Ending {
        if self.await_peer_fin(grace).await {
            self.close_orderly()
        } else {
            self.reset(why)
        }
    }

    /// Reads and discards until the client's FIN, for at most `grace`.
    async fn await_peer_fin(&mut self, grace: Duration) -> bool {
        // Whatever a closing client still sends is discarded: a small buffer does.
        let mut scratch = [0u8; 512];
        let wait = async {
            loop {
                match self.read(&mut scratch).await {
                    Ok(0) => return true,
                    Ok(_) => continue,
                    Err(_) => return false,
                }
            }
        };
        tokio::time::timeout(grace, wait).await.unwrap_or(false)
    }

    /// Waits until the client has acknowledged every byte sent, for at most
    /// `grace` (at once on a unix socket, which has no acknowledgements).
    pub(super) async fn await_acknowledged(&self, grace: Duration) {
        let Some(tcp) = self.socket.tcp() else { return };
        let deadline = Instant::now() + grace;
        let mut pause = Duration::from_micros(200);
        while Instant::now() < deadline {
            match sock::unacknowledged_bytes(tcp) {
                Ok(0) | Err(_) => return,
                Ok(_) => {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(20));
                }
            }
        }
    }

    /// Closes without a reset: the kernel sends FIN if nobody has yet.
    pub(super) fn close_orderly(mut self) -> Ending {
        self.reset_on_drop = false;
        Ending::Closed
    }

    /// Resets the connection, for `why`.
    pub(super) fn reset(self, why: ResetReason) -> Ending {
        // Drop does the reset.
        drop(self);
        Ending::Reset(why)
    }

    /// The TCP socket while the last bytes of a connection's last response
    /// are being written: they go with MSG_MORE, so they leave with the FIN
    /// that the flush will send.
    fn writing_last_response(&self) -> Option<&TcpStream> {
        self.socket.tcp().filter(|_| self.state.fin_ready())
    }
}

impl<S: Socket> Drop for ClientIo<S> {
    fn drop(&mut self) {
        if self.reset_on_drop {
            if let Some(tcp) = self.socket.tcp() {
                sock::reset_on_close(tcp);
            }
        }
    }
}

impl<S: Socket> AsyncRead for ClientIo<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.socket).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.state.clock.bytes_arrived();
            if this.state.take_rescan() {
                this.scan.restart();
            }
            if this.scan.feed(&buf.filled()[before..]) == Some(true) {
                this.state.flag_ambiguous_framing();
            }
        }
        polled
    }
}

impl<S: Socket> AsyncWrite for ClientIo<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if let Some(tcp) = self.writing_last_response() {
            return sock::poll_send_more(tcp, cx, &[io::IoSlice::new(buf)]);
        }
        Pin::new(&mut self.socket).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if let Some(tcp) = self.writing_last_response() {
            return sock::poll_send_more(tcp, cx, bufs);
        }
        Pin::new(&mut self.socket).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    /// hyper flushes once its buffer is written out; after the last response of
    /// a gracefully closed connection, that is where the FIN goes.
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let flushed = Pin::new(&mut self.socket).poll_flush(cx);
        if matches!(flushed, Poll::Ready(Ok(())))
            && self.state.take_fin_ready()
            && self.send_fin().is_ok()
        {
            self.state.note_fin_sent();
        }
        flushed
    }

    /// Never called by the serving path (it uses `poll_without_shutdown`); kept
    /// inert so nothing can send a FIN behind the close policy's back.
    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
