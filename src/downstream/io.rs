//! The client socket. [`ClientIo`] owns it and resets the connection
//! (SO_LINGER 0) when dropped unless a path chose an orderly close, so every
//! path nobody thought about ends in RST, never in a FIN that would leave
//! TIME_WAIT behind.
//!
//! The socket sits in a [`Wire`], shared with the request body the exchange
//! lends it: tokio's sockets read and write through `&self`, so the body can
//! read the client's bytes in whichever task polls it (the pool's connection
//! task, for a body that streams) without a task or channel between them. A
//! body holds the wire weakly: the connection's end closes the socket
//! whatever a body still in the pool thinks.
//!
//! TCP and unix sockets are told apart once, when a connection is served:
//! everything here is generic over the [`Socket`], so the per-read and
//! per-write paths carry no dispatch.

use std::cell::RefCell;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::Interest;
use tokio::net::{TcpStream, UnixStream};
use tokio::time::{Instant, Sleep};

use super::body::Inbound;
use super::close::{Ending, ResetReason};
use super::state::ClientState;
use crate::sock;

/// An accepted client stream.
pub enum ClientStream {
    /// TCP (usually loopback).
    Tcp(TcpStream),
    /// A unix stream socket (no RST exists there; aborts are plain closes).
    Unix(UnixStream),
}

/// A stream socket a client connection is served on: tokio's own, through
/// `&self`.
pub(super) trait Socket: std::os::fd::AsFd + Send + Sync + 'static {
    /// The TCP stream, for what only TCP has: RST, MSG_MORE and the count of
    /// unacknowledged bytes.
    fn tcp(&self) -> Option<&TcpStream>;
    /// Waits for readability (or the peer's end).
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
    /// Waits for writability.
    fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
    /// Runs `io` if the socket is ready for `interest`; its `WouldBlock`
    /// clears the readiness.
    fn try_io<R>(&self, interest: Interest, io: impl FnOnce() -> io::Result<R>) -> io::Result<R>;
    /// Reads into the spare capacity of `buf`.
    fn try_read_buf(&self, buf: &mut BytesMut) -> io::Result<usize>;
    /// Reads into `buf`.
    fn try_read(&self, buf: &mut [u8]) -> io::Result<usize>;
    /// Writes what it can of `bufs`.
    fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize>;
    /// Writes what it can of `buf`.
    fn try_write(&self, buf: &[u8]) -> io::Result<usize>;
}

macro_rules! socket {
    ($type:ty, $tcp:expr) => {
        impl Socket for $type {
            fn tcp(&self) -> Option<&TcpStream> {
                $tcp(self)
            }
            fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                <$type>::poll_read_ready(self, cx)
            }
            fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                <$type>::poll_write_ready(self, cx)
            }
            fn try_io<R>(
                &self,
                interest: Interest,
                io: impl FnOnce() -> io::Result<R>,
            ) -> io::Result<R> {
                <$type>::try_io(self, interest, io)
            }
            fn try_read_buf(&self, buf: &mut BytesMut) -> io::Result<usize> {
                <$type>::try_read_buf(self, buf)
            }
            fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
                <$type>::try_read(self, buf)
            }
            fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
                <$type>::try_write_vectored(self, bufs)
            }
            fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
                <$type>::try_write(self, buf)
            }
        }
    };
}

socket!(TcpStream, Some);
socket!(UnixStream, |_| None);

/// Bytes a request's first read may take: most heads, and small bodies with
/// them.
const FIRST_READ: usize = 4 * 1024;

thread_local! {
    /// Where requests' first bytes are read on this thread, to be copied
    /// into a buffer of their own size: a request then costs an allocation
    /// the size of its head (small enough, mostly, for malloc's per-thread
    /// cache), not one of the largest head it could have.
    static FIRST: RefCell<Box<[u8]>> = RefCell::new(vec![0; FIRST_READ].into_boxed_slice());
}

/// The client socket, shared by the connection's task and the request body
/// being read, and what that body reads by.
pub(super) struct Wire<S> {
    pub(super) socket: S,
    inbound: Mutex<Inbound>,
}

impl<S: Socket> Wire<S> {
    pub(super) fn new(socket: S) -> Self {
        Self {
            socket,
            inbound: Mutex::new(Inbound::default()),
        }
    }

    /// The state of the request body being read.
    pub(super) fn inbound(&self) -> MutexGuard<'_, Inbound> {
        // A panic elsewhere leaves at worst a body that fails: no invariant
        // spans the lock.
        self.inbound.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Reads what has arrived into the spare capacity of `buf` (`WouldBlock`
    /// when nothing has). A read that leaves room clears the socket's
    /// readiness, as tokio's own `poll_read` does: the socket is drained, so
    /// waiting for the next request costs no `recv` that returns EAGAIN.
    pub(super) fn read_into(&self, buf: &mut BytesMut) -> io::Result<usize> {
        let room = buf.capacity() - buf.len();
        let mut got = 0;
        let read = self.socket.try_io(Interest::READABLE, || {
            got = self.socket.try_read_buf(buf)?;
            if got > 0 && got < room {
                // Reported as WouldBlock, so tokio clears the readiness.
                return Err(io::ErrorKind::WouldBlock.into());
            }
            Ok(got)
        });
        match read {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && got > 0 => Ok(got),
            other => other,
        }
    }

    /// The first bytes of a request, read as [`read_into`](Self::read_into)
    /// reads, into a buffer of their size; empty at the client's end.
    pub(super) fn read_first(&self) -> io::Result<BytesMut> {
        FIRST.with_borrow_mut(|scratch| {
            let mut got = 0;
            let read = self.socket.try_io(Interest::READABLE, || {
                got = self.socket.try_read(scratch)?;
                if got > 0 && got < scratch.len() {
                    return Err(io::ErrorKind::WouldBlock.into());
                }
                Ok(got)
            });
            match read {
                Ok(n) => Ok(BytesMut::from(&scratch[..n])),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && got > 0 => {
                    Ok(BytesMut::from(&scratch[..got]))
                }
                Err(e) => Err(e),
            }
        })
    }

    /// [`read_into`](Self::read_into), waiting for the socket.
    pub(super) fn poll_read_into(
        &self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
    ) -> Poll<io::Result<usize>> {
        loop {
            match self.read_into(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    ready!(self.socket.poll_read_ready(cx))?;
                }
                other => return Poll::Ready(other),
            }
        }
    }

    /// Writes what it can of `bufs`, waiting for the socket. With `more`, on
    /// TCP, the kernel holds the bytes for what follows: the FIN that comes
    /// next then leaves with them (see [`sock::poll_send_more`]).
    pub(super) fn poll_write(
        &self,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
        more: bool,
    ) -> Poll<io::Result<usize>> {
        if let (true, Some(tcp)) = (more, self.socket.tcp()) {
            return sock::poll_send_more(tcp, cx, bufs);
        }
        loop {
            // One piece goes with send(2) on TCP (write(2) on a unix socket),
            // cheaper in the kernel than writev(2).
            let written = match bufs {
                [one] => self.socket.try_write(one),
                _ => self.socket.try_write_vectored(bufs),
            };
            match written {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    ready!(self.socket.poll_write_ready(cx))?;
                }
                other => return Poll::Ready(other),
            }
        }
    }
}

/// The client connection's socket, owned: resets on drop unless an orderly
/// close was chosen.
pub(super) struct ClientIo<S: Socket> {
    wire: Arc<Wire<S>>,
    state: Arc<ClientState>,
    reset_on_drop: bool,
}

impl<S: Socket> ClientIo<S> {
    /// Takes an accepted socket.
    pub(super) fn new(socket: S, state: Arc<ClientState>) -> Self {
        Self {
            wire: Arc::new(Wire::new(socket)),
            state,
            reset_on_drop: true,
        }
    }

    /// The socket, shared with the request body being read.
    pub(super) fn wire(&self) -> &Arc<Wire<S>> {
        &self.wire
    }

    /// The connection's shared state.
    pub(super) fn state(&self) -> &ClientState {
        &self.state
    }

    /// Whether the client has closed its side (its FIN or RST is queued).
    pub(super) fn peer_closed(&self) -> bool {
        sock::peer_state(&self.wire.socket) == sock::PeerState::Closed
    }

    /// Sends tether's FIN.
    pub(super) fn send_fin(&self) -> io::Result<()> {
        sock::send_fin(&self.wire.socket)
    }

    /// Waits up to `grace` for the client's FIN: then the close is passive
    /// and orderly; otherwise RST, for `why`. `timer` is the connection's
    /// own, re-armed for the grace rather than a second one registered.
    pub(super) async fn close_on_client_fin(
        self,
        grace: Duration,
        why: ResetReason,
        timer: Pin<&mut Sleep>,
    ) -> Ending {
        if self.await_peer_fin(grace, timer).await {
            self.close_orderly()
        } else {
            self.reset(why)
        }
    }

    /// Reads and discards until the client's FIN, for at most `grace`.
    async fn await_peer_fin(&self, grace: Duration, mut timer: Pin<&mut Sleep>) -> bool {
        // Whatever a closing client still sends is discarded: a small buffer does.
        let mut scratch = [0u8; 512];
        let socket = &self.wire.socket;
        let wait = std::future::poll_fn(|cx| loop {
            match socket.try_read(&mut scratch) {
                Ok(0) => return Poll::Ready(true),
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if ready!(socket.poll_read_ready(cx)).is_err() {
                        return Poll::Ready(false);
                    }
                }
                Err(_) => return Poll::Ready(false),
            }
        });
        timer.as_mut().reset(Instant::now() + grace);
        tokio::select! {
            biased;
            closed = wait => closed,
            () = timer => false,
        }
    }

    /// Waits until the client has acknowledged every byte sent, for at most
    /// `grace` (at once on a unix socket, which has no acknowledgements).
    pub(super) async fn await_acknowledged(&self, grace: Duration) {
        let Some(tcp) = self.wire.socket.tcp() else {
            return;
        };
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
}

impl<S: Socket> Drop for ClientIo<S> {
    fn drop(&mut self) {
        // Linger 0 is set on the socket itself: should a body in the pool
        // hold the wire for a moment longer, its close is a reset all the same.
        if self.reset_on_drop {
            if let Some(tcp) = self.wire.socket.tcp() {
                sock::reset_on_close(tcp);
            }
        }
    }
}
