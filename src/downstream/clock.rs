//! The header, idle and send timeouts of one client connection, kept without a
//! timer operation per request: the phase and the instant it began live in
//! one atomic word, and a single lazy timer reads it when it fires. The same
//! timer then times the connection's close ([`super::close`]): a connection
//! registers one timer in its life.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::{Instant, Sleep};

use super::close::ResetReason;

/// What a client connection is doing, for its timeouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Reading a request head (or just accepted).
    Head,
    /// A request is being served; no client timeout runs.
    Busy,
    /// Waiting for the next request.
    Idle,
    /// A response is being written and the client's socket has taken
    /// nothing more since the phase began.
    Sending,
}

/// The header, idle and send timers of one connection.
///
/// The IO and the service update the phase without waking anyone; the
/// connection's single timer is lazy: when it fires it reads the phase and
/// either expires or re-arms. A timer that fires early costs one wake-up; one
/// that fires late would let a slow client overstay, so it is never armed past
/// the earliest deadline any phase could have from now.
pub(super) struct Clock {
    /// Phase in the top two bits, milliseconds since `origin` in the rest.
    word: AtomicU64,
    origin: Instant,
    header_timeout: Duration,
    idle_timeout: Duration,
    send_timeout: Duration,
}

const PHASE_SHIFT: u32 = 62;
const SINCE_MASK: u64 = (1 << PHASE_SHIFT) - 1;
/// The busy phase's word: it keeps no instant.
const BUSY: u64 = 1 << PHASE_SHIFT;

impl Clock {
    /// A clock in the head phase from now: the header timeout runs from accept.
    pub(super) fn new(
        header_timeout: Duration,
        idle_timeout: Duration,
        send_timeout: Duration,
    ) -> Self {
        Self {
            word: AtomicU64::new(0),
            origin: Instant::now(),
            header_timeout,
            idle_timeout,
            send_timeout,
        }
    }

    fn encode(&self, phase: Phase, at: Instant) -> u64 {
        let tag = match phase {
            Phase::Head => 0,
            Phase::Busy => 1,
            Phase::Idle => 2,
            Phase::Sending => 3,
        };
        let millis =
            u64::try_from(at.duration_since(self.origin).as_millis()).unwrap_or(SINCE_MASK);
        (tag << PHASE_SHIFT) | (millis & SINCE_MASK)
    }

    fn decode(&self, word: u64) -> (Phase, Instant) {
        let phase = match word >> PHASE_SHIFT {
            0 => Phase::Head,
            1 => Phase::Busy,
            2 => Phase::Idle,
            _ => Phase::Sending,
        };
        (
            phase,
            self.origin + Duration::from_millis(word & SINCE_MASK),
        )
    }

    /// A request is being served. Busy has no deadline, so no clock read.
    pub(super) fn set_busy(&self) {
        self.word.store(BUSY, Ordering::Release);
    }

    /// An exchange ended: the idle timeout runs from now.
    pub(super) fn set_idle(&self) {
        self.word
            .store(self.encode(Phase::Idle, Instant::now()), Ordering::Release);
    }

    /// A write to the client could not proceed: the send timeout runs from
    /// now, unless it already runs since an earlier one. Only a busy
    /// connection writes, so only a busy one starts it.
    pub(super) fn write_blocked(&self) {
        let word = self.word.load(Ordering::Acquire);
        if word == BUSY {
            let _ = self.word.compare_exchange(
                word,
                self.encode(Phase::Sending, Instant::now()),
                Ordering::AcqRel,
                Ordering::Relaxed,
            );
        }
    }

    /// A write to the client went through: a send timeout running stops.
    /// One load, and no clock read, when none ran.
    pub(super) fn write_progressed(&self) {
        let word = self.word.load(Ordering::Acquire);
        if word >> PHASE_SHIFT == 3 {
            let _ = self
                .word
                .compare_exchange(word, BUSY, Ordering::AcqRel, Ordering::Relaxed);
        }
    }

    /// Bytes arrived from the client: an idle connection starts a request head.
    pub(super) fn bytes_arrived(&self) {
        let word = self.word.load(Ordering::Acquire);
        if self.decode(word).0 == Phase::Idle {
            // Lost races are harmless: whoever wins set a newer phase.
            let _ = self.word.compare_exchange(
                word,
                self.encode(Phase::Head, Instant::now()),
                Ordering::AcqRel,
                Ordering::Relaxed,
            );
        }
    }

    /// When the connection went idle, if it is idle: its last response was
    /// handed over whole and no byte of a next request has arrived since.
    pub(super) fn idle_since(&self) -> Option<Instant> {
        match self.decode(self.word.load(Ordering::Acquire)) {
            (Phase::Idle, since) => Some(since),
            _ => None,
        }
    }

    fn deadline(&self) -> Option<(Instant, ResetReason)> {
        match self.decode(self.word.load(Ordering::Acquire)) {
            (Phase::Head, since) => Some((since + self.header_timeout, ResetReason::HeaderTimeout)),
            (Phase::Idle, since) => Some((since + self.idle_timeout, ResetReason::IdleTimeout)),
            (Phase::Sending, since) => Some((since + self.send_timeout, ResetReason::SendTimeout)),
            (Phase::Busy, _) => None,
        }
    }

    /// The connection's one timer, armed no later than the first deadline.
    pub(super) fn timer(&self) -> Sleep {
        let soonest = Instant::now() + self.horizon();
        let first = self.deadline().map_or(soonest, |(at, _)| at.min(soonest));
        tokio::time::sleep_until(first)
    }

    /// Any phase entered from now on has a deadline no earlier than this
    /// far ahead.
    fn horizon(&self) -> Duration {
        self.header_timeout
            .min(self.idle_timeout)
            .min(self.send_timeout)
    }

    /// Resolves with the reason once a deadline passes in the phase it was
    /// set for; `timer` is the connection's ([`Self::timer`]).
    pub(super) async fn expired(&self, mut timer: Pin<&mut Sleep>) -> ResetReason {
        let horizon = self.horizon();
        loop {
            timer.as_mut().await;
            let now = Instant::now();
            let next = match self.deadline() {
                Some((at, reason)) if at <= now => return reason,
                Some((at, _)) => at.min(now + horizon),
                None => now + horizon,
            };
            timer.as_mut().reset(next);
        }
    }
}
