//! `[[upstream]]`: a backend — its endpoints, wire protocol, connect and DNS
//! clocks, and how requests are spread — with its nested sections: `pool`
//! ([`PoolConfig`]), `keepalive` ([`KeepaliveConfig`]) and `health`
//! ([`HealthConfig`]) and `tls` ([`TlsConfig`]), each in a file of its own.

use std::collections::HashSet;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{defaults, health, keepalive, pool, tls, Problem, Problems, Size};
use super::{HealthConfig, KeepaliveConfig, PoolConfig, TlsConfig};

/// The smallest `max_response_header_bytes`: a backend's ordinary head
/// (a few cookies, a CSP) must fit.
const MIN_RESPONSE_HEADER_BYTES: Size = Size::kib(8);

/// `[[upstream]]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Name listeners refer to; unique.
    pub name: String,
    /// `"host:port"` entries; names are resolved and re-resolved every `dns_refresh`.
    pub endpoints: Vec<String>,
    /// Wire protocol toward the backend. Default: [`Protocol::Http1`].
    #[serde(default)]
    pub protocol: Protocol,
    /// Time allowed for a TCP connect; then 502. Default:
    /// [`defaults::connect_timeout`].
    #[serde(default = "defaults::connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// The largest response head read from the backend (status line and
    /// fields); a larger one is a 502. At least 8KiB. Default:
    /// [`defaults::max_response_header_bytes`].
    #[serde(default = "defaults::max_response_header_bytes")]
    pub max_response_header_bytes: Size,
    /// Re-resolution interval for DNS names. Default: [`defaults::dns_refresh`].
    #[serde(default = "defaults::dns_refresh", with = "humantime_serde")]
    pub dns_refresh: Duration,
    /// Load-balancing policy across endpoints. Default:
    /// [`Balance::LeastOutstanding`].
    #[serde(default)]
    pub balance: Balance,
    /// Connection pool, per endpoint.
    #[serde(default)]
    pub pool: PoolConfig,
    /// TCP keepalive on every upstream socket, and HTTP probes.
    #[serde(default)]
    pub keepalive: KeepaliveConfig,
    /// Passive ejection of failing endpoints.
    #[serde(default)]
    pub health: HealthConfig,
    /// TLS toward the backend; present, it turns TLS on. Default: none
    /// (plain TCP).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsConfig>,
}

impl UpstreamConfig {
    /// An upstream with every optional key at its default.
    pub fn new(name: &str, endpoints: Vec<String>) -> Self {
        Self {
            name: name.to_owned(),
            endpoints,
            protocol: Protocol::default(),
            connect_timeout: defaults::connect_timeout(),
            max_response_header_bytes: defaults::max_response_header_bytes(),
            dns_refresh: defaults::dns_refresh(),
            balance: Balance::default(),
            pool: PoolConfig::default(),
            keepalive: KeepaliveConfig::default(),
            health: HealthConfig::default(),
            tls: None,
        }
    }
}

/// Upstream wire protocol.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    /// HTTP/1.1 with keep-alive: one request at a time per connection.
    #[default]
    Http1,
    /// HTTP/2 with prior knowledge (cleartext): many streams per connection,
    /// kept alive with PING frames.
    Http2,
}

/// How requests are spread across an upstream's endpoints.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    /// The endpoint with the fewest requests in flight; adapts to slow endpoints.
    #[default]
    LeastOutstanding,
    /// Each endpoint in turn.
    RoundRobin,
}

/// Splits `"host:port"`; IPv6 literals are written `"[::1]:80"`.
pub fn split_host_port(endpoint: &str) -> Result<(String, u16), String> {
    let (host, port) = endpoint
        .rsplit_once(':')
        .ok_or_else(|| format!("{endpoint:?} has no port; write \"host:port\""))?;
    let port: u16 = port
        .parse()
        .map_err(|_| format!("{endpoint:?}: port {port:?} is not a number from 1 to 65535"))?;
    if port == 0 {
        return Err(format!("{endpoint:?}: port 0 cannot be dialled"));
    }
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(format!("{endpoint:?} has no host"));
    }
    Ok((host.to_owned(), port))
}

/// Checks every `[[upstream]]`: unique names, endpoints that can be dialled,
/// clocks that run, and each nested section.
pub(super) fn validate(upstreams: &[UpstreamConfig], found: &mut Vec<Problem>) {
    let mut seen_names = HashSet::new();
    for (i, u) in upstreams.iter().enumerate() {
        let mut problems = Problems::new(format!("upstream[{i}]"), found);
        problems.unique_name(&u.name, "upstream", &mut seen_names);
        if u.endpoints.is_empty() {
            problems.add("endpoints", "at least one \"host:port\" is required");
        }
        for (j, endpoint) in u.endpoints.iter().enumerate() {
            if let Err(message) = split_host_port(endpoint) {
                problems.add(&format!("endpoints[{j}]"), message);
            }
        }
        problems.positive("connect_timeout", u.connect_timeout);
        problems.at_least(
            "max_response_header_bytes",
            u.max_response_header_bytes,
            MIN_RESPONSE_HEADER_BYTES,
        );
        problems.positive("dns_refresh", u.dns_refresh);
        pool::validate(&u.pool, problems.within("pool"));
        keepalive::validate_tcp(&u.keepalive, problems.within("keepalive"));
        health::validate(&u.health, problems.within("health"));
        keepalive::validate_http(&u.keepalive, problems.within("keepalive"));
        if let Some(t) = &u.tls {
            tls::validate(t, &u.endpoints, u.protocol, problems.within("tls"));
        }
    }
}
