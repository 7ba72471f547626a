//! The one retirement decision: given what is known of an idle upstream
//! connection and of its endpoint, and the time, what happens to it — kept,
//! handed out (perhaps for its last request), probed, or closed for a reason
//! and in the manner `pool.retire` sets for that reason.
//!
//! Pure functions over plain values: the endpoint's idle list, its checkout,
//! its return path and its sweeps (HTTP/1.1 and HTTP/2) all ask here, so the
//! rules exist once and are table-tested without sockets.

use std::time::Duration;

use tokio::time::Instant;

use crate::config::{PoolConfig, Retire, RetireReason};

/// Idle connections above `max_idle` are retired only after this long idle, so a
/// burst that briefly returns many connections does not churn them.
pub(crate) const OVER_MAX_IDLE_GRACE: Duration = Duration::from_millis(1000);

/// Idle connections checked out sooner than this skip the staleness peek: a
/// connection back in the list for only a moment cannot have met an idle
/// timeout, and hyper's own watch of the socket covers it.
pub(crate) const PEEK_AFTER_IDLE: Duration = Duration::from_millis(50);

/// How long a connection may stay idle given the backend's idle limit: three
/// quarters of it, so tether acts well before the backend does.
pub(crate) fn idle_limit(backend_limit: Duration) -> Duration {
    backend_limit.mul_f64(0.75)
}

/// Whether a checkout should pay for the peek (a syscall) to see whether the
/// backend closed a connection idle since `since`.
pub(crate) fn worth_peeking(since: Instant, now: Instant) -> bool {
    now.duration_since(since) >= PEEK_AFTER_IDLE
}

/// When the question is asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Moment {
    /// The connection just finished an exchange and would go back to the list.
    Returned,
    /// A request wants it now.
    CheckedOut,
    /// The pool's background sweep looks at it.
    Swept,
}

/// What is known of one idle connection.
#[derive(Debug, Clone, Copy)]
pub(crate) struct IdleFacts {
    /// Idle since.
    pub(crate) since: Instant,
    /// Opened at plus its jittered `max_lifetime`.
    pub(crate) expires: Instant,
    /// The shortest idle limit the backend announced (`Keep-Alive: timeout=N`)
    /// or was seen enforcing, if any.
    pub(crate) backend_idle_limit: Option<Duration>,
    /// It carried as many requests as the backend serves on one (`max=M`).
    pub(crate) at_request_limit: bool,
    /// Its last exchange said `Connection: close`: the backend closes it.
    pub(crate) said_close: bool,
    /// Still open as far as was checked (hyper's view, and the peek where
    /// one was worth it): no FIN, RST or stray bytes.
    pub(crate) alive: bool,
    /// When it is due for a probe, with probes on.
    pub(crate) probe_at: Option<Instant>,
}

/// What is known of the connection's endpoint.
#[derive(Debug, Clone, Copy)]
pub(crate) struct EndpointFacts {
    /// The endpoint left DNS or the pool is closing.
    pub(crate) removed: bool,
    /// The endpoint has more connections open than `min_idle`.
    pub(crate) above_floor: bool,
    /// How many idle connections were used more recently than this one, where
    /// the list is ordered (HTTP/1.1); `None` where it is not (HTTP/2).
    pub(crate) hotter: Option<usize>,
}

/// What happens to the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Usable: handed out at a checkout, kept otherwise; worth a look again
    /// at `recheck` (the next instant a rule could change its fate).
    Keep { recheck: Option<Instant> },
    /// Usable once more: its next request says `Connection: close`, so the
    /// backend closes it (retiring peer-first).
    LastRequest,
    /// Due for a probe; `last` makes the probe its last request.
    Probe { last: bool },
    /// Healthy, but closed now for this reason.
    Retire(RetireReason),
    /// Dead (the backend closed it, or sent something unasked): closed as the
    /// `error` reason says.
    Discard,
    /// The backend said it closes this connection: wait for its FIN.
    AwaitPeerClose,
}

/// The one decision. Rules, first match wins: the backend said close → wait
/// for it; dead → discard; endpoint removed → drain; `Keep-Alive: max`
/// reached → max_requests; near the backend's idle limit, or (in a sweep)
/// surplus idle above the floor or over `max_idle` → idle; past its lifetime
/// → lifetime, unless the lifetime policy is `peer_first` and a last request
/// can say goodbye; a probe due → probe.
pub(crate) fn decide(
    conn: &IdleFacts,
    endpoint: &EndpointFacts,
    moment: Moment,
    pool: &PoolConfig,
    now: Instant,
) -> Verdict {
    if conn.said_close {
        return Verdict::AwaitPeerClose;
    }
    if !conn.alive {
        return Verdict::Discard;
    }
    if endpoint.removed {
        return Verdict::Retire(RetireReason::Drain);
    }
    if conn.at_request_limit {
        return Verdict::Retire(RetireReason::MaxRequests);
    }
    let usable_until = conn
        .backend_idle_limit
        .map(|limit| conn.since + idle_limit(limit));
    if usable_until.is_some_and(|until| now >= until)
        || (moment == Moment::Swept && surplus(conn, endpoint, pool, now))
    {
        return Verdict::Retire(RetireReason::Idle);
    }
    if now >= conn.expires {
        if pool.retire.for_reason(RetireReason::Lifetime) != Retire::PeerFirst {
            return Verdict::Retire(RetireReason::Lifetime);
        }
        return match moment {
            // It waits in the list for the request that will be its last.
            Moment::Returned => Verdict::Keep { recheck: None },
            Moment::CheckedOut => Verdict::LastRequest,
            Moment::Swept if conn.probe_at.is_some() => Verdict::Probe { last: true },
            // No last request is coming: abort, as peer_first says.
            Moment::Swept => Verdict::Retire(RetireReason::Lifetime),
        };
    }
    if moment == Moment::Swept && conn.probe_at.is_some_and(|at| now >= at) {
        return Verdict::Probe { last: false };
    }
    let recheck = [usable_until, conn.probe_at, Some(conn.expires)]
        .into_iter()
        .flatten()
        .min();
    Verdict::Keep { recheck }
}

/// Idle longer than `idle_timeout` while the endpoint is above its floor, or
/// beyond `max_idle` hotter ones for longer than a short grace.
fn surplus(conn: &IdleFacts, endpoint: &EndpointFacts, pool: &PoolConfig, now: Instant) -> bool {
    let idle = now.duration_since(conn.since);
    let cold = idle >= pool.idle_timeout && endpoint.above_floor;
    let over_max = endpoint
        .hotter
        .is_some_and(|hotter| hotter >= pool.max_idle && idle >= OVER_MAX_IDLE_GRACE);
    cold || over_max
}

/// How a connection is closed at the socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Close {
    /// Linger 0: RST, no TIME_WAIT on either side.
    Reset,
    /// FIN: tether is the active closer and holds the TIME_WAIT.
    Fin,
    /// The backend already closed: closing now is the passive close.
    Passive,
}

/// The manner the policy for the connection's reason calls for, given whether
/// the backend already closed its side.
pub(crate) fn close_manner(policy: Retire, peer_closed: bool) -> Close {
    match policy {
        Retire::Graceful => Close::Fin,
        Retire::PeerFirst if peer_closed => Close::Passive,
        Retire::Abort | Retire::PeerFirst => Close::Reset,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{RetireByReason, RetirePolicy};

    const REASONS: [RetireReason; 5] = [
        RetireReason::Idle,
        RetireReason::Lifetime,
        RetireReason::MaxRequests,
        RetireReason::Error,
        RetireReason::Drain,
    ];
    const POLICIES: [Retire; 3] = [Retire::Abort, Retire::Graceful, Retire::PeerFirst];
    const MOMENTS: [Moment; 3] = [Moment::Returned, Moment::CheckedOut, Moment::Swept];

    /// A pool whose `reason` is retired by `policy` and every other reason by
    /// the opposite of it, so a test sees which reason's policy was read.
    fn pool(reason: RetireReason, policy: Retire) -> PoolConfig {
        let other = if policy == Retire::Graceful {
            Retire::Abort
        } else {
            Retire::Graceful
        };
        let mut table = RetireByReason {
            idle: other,
            lifetime: other,
            max_requests: other,
            error: other,
            drain: other,
        };
        match reason {
            RetireReason::Idle => table.idle = policy,
            RetireReason::Lifetime => table.lifetime = policy,
            RetireReason::MaxRequests => table.max_requests = policy,
            RetireReason::Error => table.error = policy,
            RetireReason::Drain => table.drain = policy,
        }
        PoolConfig {
            min_idle: 1,
            max_idle: 4,
            idle_timeout: Duration::from_secs(60),
            retire: RetirePolicy::PerReason(table),
            ..PoolConfig::default()
        }
    }

    /// A healthy connection idle for 10 s, far from every limit.
    fn fresh(now: Instant) -> IdleFacts {
        IdleFacts {
            since: now - Duration::from_secs(10),
            expires: now + Duration::from_secs(3600),
            backend_idle_limit: None,
            at_request_limit: false,
            said_close: false,
            alive: true,
            probe_at: None,
        }
    }

    fn endpoint() -> EndpointFacts {
        EndpointFacts {
            removed: false,
            above_floor: false,
            hotter: Some(0),
        }
    }

    /// Facts that make `reason` the one that applies.
    fn facts_for(reason: RetireReason, now: Instant) -> (IdleFacts, EndpointFacts) {
        let (mut conn, mut at) = (fresh(now), endpoint());
        match reason {
            // 10 s idle against a backend limit of 12 s: past ¾ of it.
            RetireReason::Idle => conn.backend_idle_limit = Some(Duration::from_secs(12)),
            RetireReason::Lifetime => conn.expires = now - Duration::from_secs(1),
            RetireReason::MaxRequests => conn.at_request_limit = true,
            RetireReason::Error => conn.alive = false,
            RetireReason::Drain => at.removed = true,
        }
        (conn, at)
    }

    /// What the decision should be for `reason` under `policy` at `moment`.
    fn expected(reason: RetireReason, policy: Retire, moment: Moment) -> Verdict {
        match (reason, policy, moment) {
            (RetireReason::Error, _, _) => Verdict::Discard,
            (RetireReason::Lifetime, Retire::PeerFirst, Moment::Returned) => {
                Verdict::Keep { recheck: None }
            }
            (RetireReason::Lifetime, Retire::PeerFirst, Moment::CheckedOut) => Verdict::LastRequest,
            _ => Verdict::Retire(reason),
        }
    }

    #[test]
    fn every_reason_under_every_policy_at_every_moment() {
        let now = Instant::now();
        for reason in REASONS {
            for policy in POLICIES {
                let settings = pool(reason, policy);
                for moment in MOMENTS {
                    let (conn, at) = facts_for(reason, now);
                    let verdict = decide(&conn, &at, moment, &settings, now);
                    assert_eq!(
                        verdict,
                        expected(reason, policy, moment),
                        "{reason:?} under {policy:?} at {moment:?}"
                    );
                    // The policy read for the close is the reason's own.
                    let closed_for = match verdict {
                        Verdict::Retire(r) => Some(r),
                        Verdict::Discard => Some(RetireReason::Error),
                        _ => None,
                    };
                    if let Some(r) = closed_for {
                        assert_eq!(settings.retire.for_reason(r), policy, "{reason:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn peer_first_lifetime_in_a_sweep_probes_last_when_probes_are_on() {
        let now = Instant::now();
        let settings = pool(RetireReason::Lifetime, Retire::PeerFirst);
        let (mut conn, at) = facts_for(RetireReason::Lifetime, now);
        conn.probe_at = Some(now + Duration::from_secs(5));
        assert_eq!(
            decide(&conn, &at, Moment::Swept, &settings, now),
            Verdict::Probe { last: true }
        );
    }

    #[test]
    fn surplus_rules_apply_only_in_a_sweep() {
        let now = Instant::now();
        let settings = pool(RetireReason::Idle, Retire::Abort);
        let mut cold = fresh(now);
        cold.since = now - Duration::from_secs(61);
        let above = EndpointFacts {
            above_floor: true,
            ..endpoint()
        };
        let over_max = EndpointFacts {
            hotter: Some(4),
            ..endpoint()
        };
        for (conn, at) in [(cold, above), (fresh(now), over_max)] {
            assert_eq!(
                decide(&conn, &at, Moment::Swept, &settings, now),
                Verdict::Retire(RetireReason::Idle)
            );
            assert!(matches!(
                decide(&conn, &at, Moment::CheckedOut, &settings, now),
                Verdict::Keep { .. }
            ));
        }
        // At the floor, a cold connection stays; unranked (HTTP/2), max_idle
        // does not apply; within the grace, an over-max one stays.
        let kept = [
            (cold, endpoint()),
            (
                fresh(now),
                EndpointFacts {
                    hotter: None,
                    ..endpoint()
                },
            ),
            (
                IdleFacts {
                    since: now - Duration::from_millis(500),
                    ..fresh(now)
                },
                over_max,
            ),
        ];
        for (conn, at) in kept {
            assert!(matches!(
                decide(&conn, &at, Moment::Swept, &settings, now),
                Verdict::Keep { .. }
            ));
        }
    }

    #[test]
    fn backend_said_close_wins_over_everything() {
        let now = Instant::now();
        let settings = pool(RetireReason::Drain, Retire::Abort);
        let (mut conn, at) = facts_for(RetireReason::Drain, now);
        conn.said_close = true;
        conn.alive = false;
        assert_eq!(
            decide(&conn, &at, Moment::Returned, &settings, now),
            Verdict::AwaitPeerClose
        );
    }

    #[test]
    fn due_probe_in_a_sweep_and_the_next_look() {
        let now = Instant::now();
        let settings = pool(RetireReason::Idle, Retire::Abort);
        let mut conn = fresh(now);
        conn.probe_at = Some(now);
        assert_eq!(
            decide(&conn, &endpoint(), Moment::Swept, &settings, now),
            Verdict::Probe { last: false }
        );
        conn.probe_at = Some(now + Duration::from_secs(3));
        conn.backend_idle_limit = Some(Duration::from_secs(20));
        // ¾ of 20 s after an idle start 10 s ago: 5 s from now; the probe is sooner.
        assert_eq!(
            decide(&conn, &endpoint(), Moment::Swept, &settings, now),
            Verdict::Keep {
                recheck: Some(now + Duration::from_secs(3))
            }
        );
    }

    #[test]
    fn close_manner_per_policy() {
        let table = [
            (Retire::Abort, false, Close::Reset),
            (Retire::Abort, true, Close::Reset),
            (Retire::Graceful, false, Close::Fin),
            (Retire::Graceful, true, Close::Fin),
            (Retire::PeerFirst, false, Close::Reset),
            (Retire::PeerFirst, true, Close::Passive),
        ];
        for (policy, peer_closed, close) in table {
            assert_eq!(
                close_manner(policy, peer_closed),
                close,
                "{policy:?} {peer_closed}"
            );
        }
    }
}
