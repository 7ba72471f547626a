//! The state one client connection shares between its task, its proxy
//! service and the response bodies it hands out: the clock, the request
//! count, and the flags of the close discipline. Each is an atomic that one
//! side sets and another reads later, so nobody wakes anybody.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::clock::Clock;
use super::close::Ending;
use crate::accesslog::{AccessRecord, Sink};
use crate::http::body::ExchangeDone;
use crate::http::ClientConnection;

/// Per-connection state shared by the connection task, its service and the
/// response bodies.
pub(super) struct ClientState {
    /// The header and idle timeouts.
    pub(super) clock: Clock,
    misbehaved: AtomicBool,
    requests: AtomicU64,
    /// The exchange in flight is the connection's last and the listener closes
    /// gracefully: FIN right behind its response's last byte.
    fin_after_response: AtomicBool,
    /// tether has already sent its FIN.
    fin_sent: AtomicBool,
    /// Cancelled when the process starts draining.
    drain: CancellationToken,
    /// The access log, when it is on.
    log: Option<Sink>,
    /// The line of the exchange that ended the connection, written with the
    /// connection's end.
    held: Mutex<Option<Box<AccessRecord>>>,
    /// The status and reason a malformed request was answered with.
    malformed: OnceLock<(u16, &'static str)>,
}

impl ClientState {
    /// The state of a connection just accepted; `drain` is its own child of
    /// the process-wide drain token.
    pub(super) fn new(
        header_timeout: Duration,
        idle_timeout: Duration,
        send_timeout: Duration,
        drain: CancellationToken,
        log: Option<Sink>,
    ) -> Self {
        Self {
            clock: Clock::new(header_timeout, idle_timeout, send_timeout),
            misbehaved: AtomicBool::new(false),
            requests: AtomicU64::new(0),
            fin_after_response: AtomicBool::new(false),
            fin_sent: AtomicBool::new(false),
            drain,
            log,
            held: Mutex::new(None),
            malformed: OnceLock::new(),
        }
    }

    /// A request was refused as malformed, answered `status` for `reason`.
    pub(super) fn note_malformed(&self, status: http::StatusCode, reason: &'static str) {
        let _ = self.malformed.set((status.as_u16(), reason));
    }

    /// Writes the access-log line that carries the connection's end: the
    /// held line of its last exchange, else a line of its own.
    pub(super) fn log_end(&self, ending: Ending, listener: &str, client: Option<SocketAddr>) {
        let Some(log) = &self.log else {
            return;
        };
        let held = self.held.lock().unwrap_or_else(|e| e.into_inner()).take();
        let mut record = held.unwrap_or_else(|| {
            let malformed = self.malformed.get();
            Box::new(AccessRecord {
                kind: "connection",
                listener: listener.to_owned(),
                client,
                status: malformed.map(|(status, _)| *status),
                error: malformed.map(|(_, reason)| (*reason).to_owned()),
                ..AccessRecord::default()
            })
        });
        record.client_end = Some(match ending {
            Ending::Closed => "FIN",
            Ending::Reset(_) => "RST",
        });
        record.client_end_reason = Some(ending.label());
        record.client_requests = Some(self.requests.load(Ordering::Relaxed));
        log.write(&*record);
    }

    /// Whether tether refused something the client sent.
    pub(super) fn misbehaved(&self) -> bool {
        self.misbehaved.load(Ordering::Relaxed)
    }

    /// Whether the response being written ends the connection and the
    /// service asked for tether's FIN right behind it: a last exchange, on a
    /// listener that closes gracefully, with a client that behaved.
    pub(super) fn wants_fin(&self) -> bool {
        self.fin_after_response.load(Ordering::Relaxed) && !self.misbehaved()
    }

    /// tether's FIN went out.
    pub(super) fn note_fin_sent(&self) {
        self.fin_sent.store(true, Ordering::Relaxed);
    }

    /// Whether tether has already sent its FIN.
    pub(super) fn fin_sent(&self) -> bool {
        self.fin_sent.load(Ordering::Relaxed)
    }
}

impl ExchangeDone for ClientState {
    fn exchange_logged(&self, record: Box<AccessRecord>) {
        let Some(log) = &self.log else {
            return;
        };
        if !record.last {
            log.write(&*record);
            return;
        }
        let earlier = self
            .held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .replace(record);
        if let Some(earlier) = earlier {
            log.write(&*earlier);
        }
    }
}

impl ClientConnection for ClientState {
    fn exchange_started(&self) {
        self.clock.set_busy();
    }

    fn count_request(&self) -> u64 {
        self.requests.fetch_add(1, Ordering::Relaxed) + 1
    }

    fn draining(&self) -> bool {
        self.drain.is_cancelled()
    }

    fn fin_after_response(&self) {
        self.fin_after_response.store(true, Ordering::Relaxed);
    }

    fn mark_misbehaved(&self) {
        self.misbehaved.store(true, Ordering::Relaxed);
    }
}
