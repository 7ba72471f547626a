//! How a client connection ends: the outcomes counted by
//! `tether_client_connections_closed`, and the listener's `client_close`
//! policy for a connection whose last exchange said `Connection: close`.
//! tether's own FIN is a choice made here; every other end is a reset.

use std::pin::Pin;
use std::time::Duration;

use tokio::time::Sleep;

use super::io::{ClientIo, Socket};
use crate::config::ClientClose;

/// How a client connection ended, for logs and the
/// `tether_client_connections_closed` metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// Orderly: FIN exchanged.
    Closed,
    /// Aborted with RST.
    Reset(ResetReason),
}

/// Why tether reset a client connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResetReason {
    /// No complete request head within `header_timeout`.
    HeaderTimeout,
    /// Silent between requests for `idle_timeout`.
    IdleTimeout,
    /// Left tether's response unread for `send_timeout`.
    SendTimeout,
    /// The socket failed, the client left in the middle of a request, or a
    /// response body failed while it was written.
    ConnectionError,
    /// Still open at the drain deadline.
    DrainDeadline,
    /// tether's own FIN could not be sent.
    FinFailed,
    /// The client did not close within `close_grace` after tether's FIN or
    /// goodbye.
    CloseGrace,
    /// `client_close = "abort"`: reset once the response was acknowledged.
    CloseAbort,
    /// A client that sent a bad request did not close within `close_grace`.
    Misbehaved,
    /// The longest-idle keep-alive connection, reset to admit a new one while
    /// the listener was at `max_connections`.
    Evicted,
}

impl Ending {
    /// The metric label: `fin`, or the reset's reason.
    pub fn label(self) -> &'static str {
        match self {
            Self::Closed => crate::http::FIN,
            Self::Reset(reason) => reason.label(),
        }
    }
}

impl ResetReason {
    /// The metric and log label.
    pub fn label(self) -> &'static str {
        match self {
            Self::HeaderTimeout => "header-timeout",
            Self::IdleTimeout => "idle-timeout",
            Self::SendTimeout => "send-timeout",
            Self::ConnectionError => "connection-error",
            Self::DrainDeadline => "drain-deadline",
            Self::FinFailed => "fin-failed",
            Self::CloseGrace => "close-grace",
            Self::CloseAbort => "close-policy-abort",
            Self::Misbehaved => "misbehaved",
            Self::Evicted => "evicted-idle",
        }
    }
}

/// Ends a connection whose last exchange said `Connection: close`, by the
/// listener's `client_close` policy; `grace` is its `close_grace`, timed by
/// the connection's `timer`.
pub(super) async fn close_by_policy<S: Socket>(
    io: ClientIo<S>,
    policy: ClientClose,
    grace: Duration,
    timer: Pin<&mut Sleep>,
) -> Ending {
    let fin_sent = io.state().fin_sent();
    if policy != ClientClose::Abort && !fin_sent && io.peer_closed() {
        // The client closed first: closing now is the passive close.
        return io.close_orderly();
    }
    match policy {
        ClientClose::Graceful => {
            if !fin_sent && io.send_fin().is_err() {
                return io.reset(ResetReason::FinFailed);
            }
            io.close_on_client_fin(grace, ResetReason::CloseGrace, timer)
                .await
        }
        ClientClose::ClientFirst => {
            io.close_on_client_fin(grace, ResetReason::CloseGrace, timer)
                .await
        }
        ClientClose::Abort => {
            io.await_acknowledged(grace).await;
            io.reset(ResetReason::CloseAbort)
        }
    }
}
