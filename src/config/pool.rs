//! `[upstream.pool]`: the per-endpoint pool's floor, ceilings and clocks, and
//! how a retired connection is closed ([`Retire`], one policy or one per
//! [`RetireReason`]), which decides whether either side keeps a TIME_WAIT.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{defaults, Problems};

/// `[upstream.pool]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    /// Connections opened at start and kept open with zero traffic (refilled when
    /// they drop). Default: [`defaults::min_idle`].
    #[serde(default = "defaults::min_idle")]
    pub min_idle: usize,
    /// Idle connections kept beyond a burst; the coldest extras are retired.
    /// Default: [`defaults::max_idle`].
    #[serde(default = "defaults::max_idle")]
    pub max_idle: usize,
    /// Connections per endpoint, idle and busy. Default:
    /// [`defaults::pool_max_connections`].
    #[serde(default = "defaults::pool_max_connections")]
    pub max_connections: usize,
    /// Time a request waits for a free connection when `max_connections` is
    /// reached; then 503. Default: [`defaults::acquire_timeout`].
    #[serde(default = "defaults::acquire_timeout", with = "humantime_serde")]
    pub acquire_timeout: Duration,
    /// Idle time after which connections above `min_idle` are retired.
    /// Default: [`defaults::pool_idle_timeout`].
    #[serde(default = "defaults::pool_idle_timeout", with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Age after which a connection is retired once idle (±10 % jitter so a pool
    /// does not recycle all at once). Default: [`defaults::max_lifetime`].
    #[serde(default = "defaults::max_lifetime", with = "humantime_serde")]
    pub max_lifetime: Duration,
    /// How retired connections are closed: one policy, or one per reason.
    /// Default: [`Retire::Abort`] for every reason.
    #[serde(default)]
    pub retire: RetirePolicy,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            min_idle: defaults::min_idle(),
            max_idle: defaults::max_idle(),
            max_connections: defaults::pool_max_connections(),
            acquire_timeout: defaults::acquire_timeout(),
            idle_timeout: defaults::pool_idle_timeout(),
            max_lifetime: defaults::max_lifetime(),
            retire: RetirePolicy::default(),
        }
    }
}

/// How a pooled upstream connection is closed when it is retired.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Retire {
    /// RST once known idle: no TIME_WAIT on either side.
    #[default]
    Abort,
    /// FIN: tether is the active closer and holds the TIME_WAIT.
    Graceful,
    /// The backend closes first: HTTP/1.1 sends the connection's last request
    /// (the next client request, or a probe when probes are on) with
    /// `Connection: close`; HTTP/2 sends GOAWAY and closes after its streams.
    /// The backend holds the TIME_WAIT. Where no last request is coming, abort.
    PeerFirst,
}

/// Why a pooled connection is retired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetireReason {
    /// Idle too long (above the floor, over `max_idle`, or near the backend's
    /// idle limit).
    Idle,
    /// Past `max_lifetime`.
    Lifetime,
    /// The backend's `Keep-Alive: max=M` is reached.
    MaxRequests,
    /// Broken, stale, or abandoned mid-exchange.
    Error,
    /// Shutdown, or its endpoint left DNS.
    Drain,
}

impl RetireReason {
    /// Every reason, in the order the config lists them.
    pub const ALL: [RetireReason; 5] = [
        Self::Idle,
        Self::Lifetime,
        Self::MaxRequests,
        Self::Error,
        Self::Drain,
    ];

    /// The reason's name, as the `[upstream.pool.retire]` key spells it.
    pub fn label(self) -> &'static str {
        match self {
            Self::Idle => "idle",
            Self::Lifetime => "lifetime",
            Self::MaxRequests => "max_requests",
            Self::Error => "error",
            Self::Drain => "drain",
        }
    }
}

/// `retire`: one policy for every reason, or a table with one per reason.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum RetirePolicy {
    /// `retire = "abort"`
    Uniform(Retire),
    /// `[upstream.pool.retire]` with `idle`, `lifetime`, `max_requests`,
    /// `error`, `drain`.
    PerReason(RetireByReason),
}

impl Default for RetirePolicy {
    fn default() -> Self {
        Self::Uniform(Retire::default())
    }
}

impl RetirePolicy {
    /// The policy for one reason.
    pub fn for_reason(&self, reason: RetireReason) -> Retire {
        match self {
            Self::Uniform(retire) => *retire,
            Self::PerReason(table) => match reason {
                RetireReason::Idle => table.idle,
                RetireReason::Lifetime => table.lifetime,
                RetireReason::MaxRequests => table.max_requests,
                RetireReason::Error => table.error,
                RetireReason::Drain => table.drain,
            },
        }
    }
}

/// `[upstream.pool.retire]` as a table; each reason defaults to `abort`.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RetireByReason {
    /// Idle too long.
    #[serde(default)]
    pub idle: Retire,
    /// Past `max_lifetime`.
    #[serde(default)]
    pub lifetime: Retire,
    /// `Keep-Alive: max` reached.
    #[serde(default)]
    pub max_requests: Retire,
    /// Broken or abandoned.
    #[serde(default)]
    pub error: Retire,
    /// Shutdown or endpoint removed.
    #[serde(default)]
    pub drain: Retire,
}

/// Checks one `[upstream.pool]`: room for at least one connection, a floor
/// within both ceilings, and clocks that run.
pub(super) fn validate(p: &PoolConfig, mut problems: Problems<'_>) {
    problems.at_least("max_connections", p.max_connections, 1);
    for (ceiling, value) in [
        ("max_connections", p.max_connections),
        ("max_idle", p.max_idle),
    ] {
        if p.min_idle > value {
            let message = format!("{} exceeds pool.{ceiling} ({value})", p.min_idle);
            problems.add("min_idle", message);
        }
    }
    problems.positive("acquire_timeout", p.acquire_timeout);
    problems.positive("idle_timeout", p.idle_timeout);
    problems.positive("max_lifetime", p.max_lifetime);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, MINIMAL};

    #[test]
    fn retire_takes_one_policy_or_one_per_reason() {
        let table = format!("{MINIMAL}\n[upstream.pool.retire]\nlifetime = \"peer_first\"\n");
        let c = Config::from_toml(&table).unwrap();
        let policy = c.upstreams[0].pool.retire;
        assert_eq!(policy.for_reason(RetireReason::Lifetime), Retire::PeerFirst);
        assert_eq!(policy.for_reason(RetireReason::Idle), Retire::Abort);
        let again = Config::from_toml(&c.to_toml()).unwrap();
        assert_eq!(again.upstreams[0].pool.retire, policy);
        let uniform = format!("{MINIMAL}\n[upstream.pool]\nretire = \"graceful\"\n");
        let c = Config::from_toml(&uniform).unwrap();
        assert_eq!(
            c.upstreams[0].pool.retire.for_reason(RetireReason::Error),
            Retire::Graceful
        );
        let bad = format!("{MINIMAL}\n[upstream.pool]\nretire = \"sometimes\"\n");
        assert!(Config::from_toml(&bad).is_err());
    }
}
