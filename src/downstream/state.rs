//! The state one client connection shares between its IO, its proxy service
//! and its task: the clock, the request count, and the flags of the close
//! discipline. Each is an atomic that one side sets and another reads later,
//! so nobody wakes anybody.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::clock::Clock;
use super::close::Ending;
use crate::accesslog::{AccessRecord, Sink};
use crate::http::body::ExchangeDone;
use crate::http::ClientConnection;

/// Per-connection state shared by the IO, the service and the connection task.
pub(super) struct ClientState {
    /// The header and idle timeouts.
    pub(super) clock: Clock,
    misbehaved: AtomicBool,
    requests: AtomicU64,
    /// The head just read carried both Content-Length and Transfer-Encoding.
    ambiguous_framing: AtomicBool,
    /// Set when an exchange ends: the next bytes start a new head to scan.
    rescan: AtomicBool,
    /// The exchange in flight is the connection's last and the listener closes
    /// gracefully: FIN as soon as its response is flushed.
    fin_when_flushed: AtomicBool,
    /// The last response is complete; the next flush ends with a FIN.
    fin_ready: AtomicBool,
    /// tether has already sent its FIN.
    fin_sent: AtomicBool,
    /// Cancelled when the process starts draining.
    drain: CancellationToken,
    /// The access log, when it is on.
    log: Option<Sink>,
    /// The line of the exchange that ended the connection, written with the
    /// connection's end.
    held: Mutex<Option<Box<AccessRecord>>>,
    /// The status hyper answered a malformed request with (0: none).
    malformed: AtomicU16,
}

impl ClientState {
    /// The state of a connection just accepted; `drain` is its own child of
    /// the process-wide drain token.
    pub(super) fn new(
        header_timeout: Duration,
        idle_timeout: Duration,
        drain: CancellationToken,
        log: Option<Sink>,
    ) -> Self {
        Self {
            clock: Clock::new(header_timeout, idle_timeout),
            misbehaved: AtomicBool::new(false),
            requests: AtomicU64::new(0),
            ambiguous_framing: AtomicBool::new(false),
            rescan: AtomicBool::new(false),
            fin_when_flushed: AtomicBool::new(false),
            fin_ready: AtomicBool::new(false),
            fin_sent: AtomicBool::new(false),
            drain,
            log,
            held: Mutex::new(None),
            malformed: AtomicU16::new(0),
        }
    }

    /// hyper refused a request as malformed and answered `status`.
    pub(super) fn note_malformed(&self, status: http::StatusCode) {
        self.malformed.store(status.as_u16(), Ordering::Relaxed);
    }

    /// Writes the access-log line that carries the connection's end: the
    /// held line of its last exchange, else a line of its own.
    pub(super) fn log_end(&self, ending: Ending, listener: &str, client: Option<SocketAddr>) {
        let Some(log) = &self.log else {
            return;
        };
        let held = self.held.lock().unwrap_or_else(|e| e.into_inner()).take();
        let mut record = held.unwrap_or_else(|| {
            let malformed = self.malformed.load(Ordering::Relaxed);
            Box::new(AccessRecord {
                kind: "connection",
                listener: listener.to_owned(),
                client,
                status: (malformed != 0).then_some(malformed),
                error: (malformed != 0).then(|| "malformed-request".to_owned()),
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

    /// Whether an exchange ended since the last call: the next bytes read
    /// start a new head.
    pub(super) fn take_rescan(&self) -> bool {
        self.rescan.swap(false, Ordering::Relaxed)
    }

    /// The head just read declared both Content-Length and Transfer-Encoding.
    pub(super) fn flag_ambiguous_framing(&self) {
        self.ambiguous_framing.store(true, Ordering::Relaxed);
    }

    /// Whether the bytes being written end the connection's last response,
    /// which a FIN is to follow.
    pub(super) fn fin_ready(&self) -> bool {
        self.fin_ready.load(Ordering::Relaxed)
    }

    /// Whether the flush that just completed is the one to send the FIN
    /// after; asks once.
    pub(super) fn take_fin_ready(&self) -> bool {
        self.fin_ready.swap(false, Ordering::Relaxed)
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
    fn exchange_done(&self, complete: bool) {
        // Only a response handed over whole may be followed by a FIN: after a
        // truncated one, a FIN would make a close-delimited body look complete.
        if complete
            && self.fin_when_flushed.load(Ordering::Relaxed)
            && !self.misbehaved.load(Ordering::Relaxed)
        {
            self.fin_ready.store(true, Ordering::Relaxed);
        }
        self.rescan.store(true, Ordering::Relaxed);
        self.clock.set_idle();
    }

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

    fn take_ambiguous_framing(&self) -> bool {
        self.ambiguous_framing.swap(false, Ordering::Relaxed)
    }

    fn fin_after_response(&self) {
        self.fin_when_flushed.store(true, Ordering::Relaxed);
    }

    fn mark_misbehaved(&self) {
        self.misbehaved.store(true, Ordering::Relaxed);
    }
}
