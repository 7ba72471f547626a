//! Socket helpers: every socket option tether sets lives here, so the close
//! discipline (linger 0 for aborts, keepalive and nodelay upstream) has one home.
//!
//! Options are best effort: a failure is logged and the connection carries on,
//! because a missing keepalive is better than a refused request.

use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};
use tokio::io::Interest;
use tokio::net::TcpStream;

use crate::config::KeepaliveConfig;

/// Makes the next `close()` of this socket send RST instead of FIN (SO_LINGER 0),
/// so neither side keeps a TIME_WAIT entry.
pub fn reset_on_close(socket: &impl AsFd) {
    if let Err(e) = SockRef::from(socket).set_linger(Some(Duration::ZERO)) {
        tracing::debug!(error = %e, "cannot set SO_LINGER 0; the close will be a FIN");
    }
}

/// Sends FIN now (shutdown of the write half) without closing the socket.
pub fn send_fin(socket: &impl AsFd) -> io::Result<()> {
    SockRef::from(socket).shutdown(std::net::Shutdown::Write)
}

/// Writes `bufs` with MSG_MORE when the socket is writable: like TCP_CORK for
/// this one write, the kernel holds a partial segment for the data that
/// follows, and the FIN that `shutdown` sends next rides on it. The last bytes
/// of a response and the FIN so leave in one segment: a client cannot read the
/// end of the response and close before tether's FIN is there. Costs no extra
/// syscall, where setting TCP_CORK did.
pub fn poll_send_more(
    socket: &TcpStream,
    cx: &mut Context<'_>,
    bufs: &[io::IoSlice<'_>],
) -> Poll<io::Result<usize>> {
    poll_write_when_ready(socket, cx, |socket| {
        socket.try_io(Interest::WRITABLE, || match bufs {
            [one] => SockRef::from(socket).send_with_flags(one, libc::MSG_MORE),
            _ => SockRef::from(socket).send_vectored_with_flags(bufs, libc::MSG_MORE),
        })
    })
}

/// Runs `write` (a non-blocking write on `socket` that clears readiness when
/// it would block) each time the socket is writable, until it does not block.
pub fn poll_write_when_ready(
    socket: &TcpStream,
    cx: &mut Context<'_>,
    mut write: impl FnMut(&TcpStream) -> io::Result<usize>,
) -> Poll<io::Result<usize>> {
    loop {
        ready!(socket.poll_write_ready(cx))?;
        match write(socket) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            other => return Poll::Ready(other),
        }
    }
}

/// Sets TCP_NODELAY and TCP keepalive (idle, interval, count) on an upstream socket.
pub fn configure_upstream(socket: &impl AsFd, keepalive: &KeepaliveConfig) {
    let sock = SockRef::from(socket);
    if let Err(e) = sock.set_nodelay(true) {
        tracing::warn!(error = %e, "cannot set TCP_NODELAY on upstream socket");
    }
    let params = TcpKeepalive::new()
        .with_time(keepalive.tcp_idle)
        .with_interval(keepalive.tcp_interval)
        .with_retries(keepalive.tcp_count);
    if let Err(e) = sock.set_tcp_keepalive(&params) {
        tracing::warn!(error = %e, "cannot set TCP keepalive on upstream socket");
    }
}

/// Sets TCP_NODELAY on a listening socket: responses are written whole, and
/// Nagle would only delay the last segment of each. Linux copies the option to
/// every socket the listener accepts, which saves a setsockopt per connection.
pub fn configure_listener(socket: &impl AsFd) {
    if let Err(e) = SockRef::from(socket).set_nodelay(true) {
        tracing::debug!(error = %e, "cannot set TCP_NODELAY on listening socket");
    }
}

/// What a non-blocking peek says about the peer of an otherwise idle socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerState {
    /// Nothing to read: the connection is open and quiet.
    Quiet,
    /// The peer sent FIN.
    Closed,
    /// Bytes are waiting that nobody asked for.
    StrayBytes,
    /// The socket reported an error (usually a received RST).
    Failed,
}

/// Peeks without consuming, to tell a quiet idle connection from one the peer
/// has closed or written to. The socket must be non-blocking (tokio's are).
pub fn peer_state(socket: &impl AsFd) -> PeerState {
    let mut buf = [MaybeUninit::<u8>::uninit(); 1];
    match SockRef::from(socket).peek(&mut buf) {
        Ok(0) => PeerState::Closed,
        Ok(_) => PeerState::StrayBytes,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => PeerState::Quiet,
        Err(_) => PeerState::Failed,
    }
}

/// Bytes sent but not yet acknowledged by the peer (plus any not yet sent):
/// `ioctl(TIOCOUTQ)`. Zero means the peer has the whole response, so a reset
/// now discards nothing it has not received.
#[allow(unsafe_code)]
pub fn unacknowledged_bytes(socket: &impl AsRawFd) -> io::Result<usize> {
    let mut pending: libc::c_int = 0;
    // SAFETY: TIOCOUTQ writes one c_int through the pointer, which points at a
    // live, properly aligned c_int; the fd is borrowed for the call's duration.
    let rc = unsafe { libc::ioctl(socket.as_raw_fd(), libc::TIOCOUTQ, &mut pending) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(usize::try_from(pending).unwrap_or(0))
}

/// Whether an accept error is about resources (descriptors, memory) and calls
/// for a pause rather than an immediate retry.
pub fn is_resource_exhaustion(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}
