//! Configuration: the schema, its defaults (each with the reason for it), loading
//! from one TOML file plus `TETHER__…` environment overrides, and validation.
//!
//! Loading parses straight into final types (`Duration`, [`Size`], enums) and
//! then [`Config::validate`] checks the combinations. Every problem found is
//! reported with its key path, so an operator fixes a file in one pass, and
//! nothing binds before the whole file is known to be good.

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Prefix of environment variables that override file keys:
/// `TETHER__RUNTIME__DRAIN_TIMEOUT=10s`, `TETHER__LISTENER__0__LISTEN=127.0.0.1:9000`.
pub const ENV_PREFIX: &str = "TETHER__";

/// Problems found while loading or validating a configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read or is not TOML.
    #[error("cannot load {path}: {message}")]
    Load { path: String, message: String },
    /// One or more keys are wrong; each entry names its key path.
    #[error("{} problem(s) in the configuration:\n{}", .0.len(), format_problems(.0))]
    Invalid(Vec<Problem>),
}

/// One configuration problem and the key it is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Dotted key path, with `[i]` for array entries: `listener[0].idle_timeout`.
    pub key: String,
    /// What is wrong, in words an operator can act on.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

fn format_problems(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|p| format!("  - {p}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The whole configuration of one tether process.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Logging.
    #[serde(default)]
    pub log: LogConfig,
    /// Local ports the legacy app connects to. At least one.
    #[serde(default, rename = "listener")]
    pub listeners: Vec<ListenerConfig>,
    /// Backends, each with its own pool. At least one.
    #[serde(default, rename = "upstream")]
    pub upstreams: Vec<UpstreamConfig>,
    /// The admin server.
    #[serde(default)]
    pub admin: AdminConfig,
    /// Process-wide settings.
    #[serde(default)]
    pub runtime: RuntimeConfig,
}

/// `[admin]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Serve `/metrics`, `/healthz`, `/readyz` and `/config`. Default true: an
    /// operator should be able to see what tether is doing without a restart.
    #[serde(default = "defaults::yes")]
    pub enabled: bool,
    /// Address of the admin server. Default `"127.0.0.1:9901"`: loopback only,
    /// since `/config` shows the whole configuration.
    #[serde(default = "defaults::admin_listen")]
    pub listen: SocketAddr,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: defaults::admin_listen(),
        }
    }
}

/// `[log]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// Minimum level, or any `tracing` filter directive (`"info,tether::pool=debug"`).
    /// Default `"info"`: connection-level events are `debug`, so `info` stays quiet
    /// under load while still showing start-up, drain and upstream failures.
    #[serde(default = "default_log_level")]
    pub level: String,
    /// `"text"` for people, `"json"` for log pipelines. Default `"text"`.
    #[serde(default)]
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: default_log_level(),
            format: LogFormat::default(),
        }
    }
}

fn default_log_level() -> String {
    "info".to_owned()
}

/// Log output format.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Where a listener accepts connections.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    /// A TCP address; port 0 picks a free port (useful in tests).
    Tcp(SocketAddr),
    /// A unix stream socket path (`"unix:/run/tether.sock"`).
    Unix(PathBuf),
}

impl FromStr for ListenAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err("unix socket path is empty".to_owned());
            }
            return Ok(Self::Unix(PathBuf::from(path)));
        }
        s.parse::<SocketAddr>()
            .map(Self::Tcp)
            .map_err(|_| format!("{s:?} is neither an IP:port address nor \"unix:/path\""))
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tcp(addr) => write!(f, "{addr}"),
            Self::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

impl Serialize for ListenAddr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ListenAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// A byte size written `"64KiB"`, `"1MiB"`, `"512"` (bytes); binary units, and
/// printed back exactly in the largest unit that divides it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Size(pub u64);

impl Size {
    /// `n` KiB.
    pub const fn kib(n: u64) -> Self {
        Self(n * 1024)
    }
    /// `n` MiB.
    pub const fn mib(n: u64) -> Self {
        Self(n * 1024 * 1024)
    }
    /// The size in bytes.
    pub const fn as_u64(self) -> u64 {
        self.0
    }
    /// The size in bytes, saturating on 32-bit platforms.
    pub fn as_usize(self) -> usize {
        usize::try_from(self.0).unwrap_or(usize::MAX)
    }
}

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(&str, u64); 3] = [("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)];
        for (unit, scale) in UNITS {
            if self.0 >= scale && self.0 % scale == 0 {
                return write!(f, "{}{unit}", self.0 / scale);
            }
        }
        write!(f, "{}", self.0)
    }
}

impl FromStr for Size {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.trim()
            .parse::<bytesize::ByteSize>()
            .map(|b| Self(b.as_u64()))
            .map_err(|e| format!("{s:?} is not a size like \"64KiB\" or \"1MiB\": {e}"))
    }
}

impl Serialize for Size {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bytes(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Bytes(n) => Ok(Self(n)),
            Raw::Text(t) => t.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// How a client connection is ended once an exchange has said `Connection: close`.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ClientClose {
    /// Half-close (FIN) right after the response (RFC 9112 lingering close), then
    /// RST if the client has not closed within `close_grace`. Clients that wait for
    /// the server to close get their answer at once; the TIME_WAIT lands on
    /// tether's listening port, which costs no ephemeral port.
    #[default]
    Graceful,
    /// Never send the first FIN: wait up to `close_grace` for the client's FIN,
    /// then RST. For clients known to close first.
    ClientFirst,
    /// RST once the client has acknowledged the whole response: no TIME_WAIT at
    /// either end of the client leg. For clients that read by length.
    Abort,
}

/// `[[listener]]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    /// Name used in logs and metrics; unique.
    pub name: String,
    /// `"127.0.0.1:8080"` or `"unix:/path/to.sock"`.
    pub listen: ListenAddr,
    /// Name of the `[[upstream]]` this listener forwards to.
    pub upstream: String,
    /// Concurrent client connections; beyond it, new connections wait in the
    /// kernel's accept queue. Default 10000: far above what a single legacy app
    /// opens, low enough that a runaway client cannot exhaust file descriptors.
    #[serde(default = "defaults::listener_max_connections")]
    pub max_connections: usize,
    /// Time allowed for a complete request head, from accept or from the first
    /// byte of a later request; then RST. Default 10s: generous for any real
    /// client, short enough to shed slowloris connections.
    #[serde(default = "defaults::header_timeout", with = "humantime_serde")]
    pub header_timeout: Duration,
    /// Time a keep-alive client may stay silent between requests; then RST.
    /// Default 60s: longer than the usual client-side pool idle (so clients time
    /// out first and close), short enough to free descriptors of vanished apps.
    #[serde(default = "defaults::idle_timeout", with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Time from a complete request head to the upstream's response head; then
    /// 504. Default 60s: matches common backend and load-balancer timeouts.
    #[serde(default = "defaults::request_timeout", with = "humantime_serde")]
    pub request_timeout: Duration,
    /// How long tether waits for the client's FIN when a connection ends before
    /// it resets. Default 1s: a live client closes within milliseconds.
    #[serde(default = "defaults::close_grace", with = "humantime_serde")]
    pub close_grace: Duration,
    /// Who sends the first FIN when an exchange ends the connection.
    #[serde(default)]
    pub client_close: ClientClose,
    /// Requests served on one client connection before tether ends it with
    /// `Connection: close`; 0 = unlimited. Default 0: keep-alive clients are never
    /// cut off. Set 1 for apps that open a connection per request and close first.
    #[serde(default)]
    pub max_requests_per_connection: u64,
    /// Largest request head (request line plus headers). Default 64KiB: above
    /// any legitimate cookie load, bounded per connection. At least 8KiB.
    #[serde(default = "defaults::max_header_bytes")]
    pub max_header_bytes: Size,
    /// Request body bytes read before the request is forwarded. A body that fits
    /// is checked whole (bad chunked framing gets a 400 and is never forwarded)
    /// and can be replayed on the one retry; larger bodies stream after this
    /// much. Default 64KiB: covers the form posts and API calls of typical
    /// legacy apps at a bounded cost per request.
    #[serde(default = "defaults::request_buffer")]
    pub request_buffer: Size,
    /// Upstream bodies of unknown length are buffered up to this size so HTTP/1.0
    /// clients get a Content-Length; larger ones are sent close-delimited.
    /// Default 1MiB: covers typical API responses at a bounded cost per request.
    #[serde(default = "defaults::http10_buffer")]
    pub http10_buffer: Size,
    /// Append the client's address to `X-Forwarded-For`. Default true: the
    /// backend otherwise sees every request coming from the sidecar.
    #[serde(default = "defaults::yes")]
    pub forwarded_for: bool,
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
        Self::Uniform(Retire::Abort)
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

/// `[[upstream]]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Name listeners refer to; unique.
    pub name: String,
    /// `"host:port"` entries; names are resolved and re-resolved every `dns_refresh`.
    pub endpoints: Vec<String>,
    /// Wire protocol toward the backend.
    #[serde(default)]
    pub protocol: Protocol,
    /// Time allowed for a TCP connect; then 502. Default 2s: a loopback or
    /// in-cluster connect takes milliseconds, and a request should not wait long
    /// on an endpoint that is down.
    #[serde(default = "defaults::connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Re-resolution interval for DNS names. Default 30s: the usual TTL of
    /// service records, so endpoint changes are picked up within one TTL.
    #[serde(default = "defaults::dns_refresh", with = "humantime_serde")]
    pub dns_refresh: Duration,
    /// Load-balancing policy across endpoints.
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
}

/// `[upstream.health]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HealthConfig {
    /// Consecutive failures (connect errors, or 5xx responses when
    /// `eject_on_5xx`) after which an endpoint gets no new requests. 0 turns
    /// ejection off. Default 5: one flaky request never ejects, a dead
    /// endpoint is out within a handful.
    #[serde(default = "defaults::eject_after")]
    pub eject_after: u32,
    /// Count 5xx responses as failures. Default false: a backend's 500 is
    /// usually about the request, not the endpoint.
    #[serde(default)]
    pub eject_on_5xx: bool,
    /// First ejection time; doubled on each ejection in a row. Default 5s.
    #[serde(default = "defaults::eject_time", with = "humantime_serde")]
    pub eject_time: Duration,
    /// Longest ejection time. Default 5m.
    #[serde(default = "defaults::eject_time_max", with = "humantime_serde")]
    pub eject_time_max: Duration,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            eject_after: defaults::eject_after(),
            eject_on_5xx: false,
            eject_time: defaults::eject_time(),
            eject_time_max: defaults::eject_time_max(),
        }
    }
}

/// `[upstream.pool]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    /// Connections opened at start and kept open with zero traffic (refilled when
    /// they drop). Default 2: the first requests never pay a handshake, and one
    /// spare covers a connection that is being replaced.
    #[serde(default = "defaults::min_idle")]
    pub min_idle: usize,
    /// Idle connections kept beyond a burst; the coldest extras are retired.
    /// Default 32: bursts up to 32 concurrent requests reuse warm connections.
    #[serde(default = "defaults::max_idle")]
    pub max_idle: usize,
    /// Connections per endpoint, idle and busy. Default 256: protects the backend
    /// from a stampede while leaving room for real concurrency.
    #[serde(default = "defaults::pool_max_connections")]
    pub max_connections: usize,
    /// Time a request waits for a free connection when `max_connections` is
    /// reached; then 503. Default 1s: a saturated pool should shed load quickly.
    #[serde(default = "defaults::acquire_timeout", with = "humantime_serde")]
    pub acquire_timeout: Duration,
    /// Idle time after which connections above `min_idle` are retired.
    /// Default 90s: shorter than common backend keep-alive timeouts would be
    /// wrong for those under 90s, so lower it to below your backend's.
    #[serde(default = "defaults::pool_idle_timeout", with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Age after which a connection is retired once idle (±10 % jitter so a pool
    /// does not recycle all at once). Default 30m: rebalances across endpoints
    /// and survives backend-side connection caps without constant churn.
    #[serde(default = "defaults::max_lifetime", with = "humantime_serde")]
    pub max_lifetime: Duration,
    /// How retired connections are closed: one policy, or one per reason.
    #[serde(default)]
    pub retire: RetirePolicy,
}

/// `[upstream.keepalive]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct KeepaliveConfig {
    /// Idle time before the first TCP keepalive probe. Default 30s: below the
    /// idle timeouts of common NATs and conntrack tables.
    #[serde(default = "defaults::tcp_idle", with = "humantime_serde")]
    pub tcp_idle: Duration,
    /// Interval between unanswered probes. Default 10s.
    #[serde(default = "defaults::tcp_interval", with = "humantime_serde")]
    pub tcp_interval: Duration,
    /// Unanswered probes before the kernel declares the connection dead.
    /// Default 3: a dead peer is detected within `tcp_idle + 3 × tcp_interval`.
    #[serde(default = "defaults::tcp_count")]
    pub tcp_count: u32,
    /// HTTP/2 only: PING interval on every connection, idle or not. Default
    /// 15s: well inside NAT and load-balancer idle timeouts (AWS: 350s).
    #[serde(default = "defaults::ping_interval", with = "humantime_serde")]
    pub ping_interval: Duration,
    /// HTTP/2 only: a PING not answered within this evicts the connection.
    /// Default 5s.
    #[serde(default = "defaults::ping_timeout", with = "humantime_serde")]
    pub ping_timeout: Duration,
    /// HTTP/1.1 probes on idle pooled connections.
    #[serde(default)]
    pub probe: ProbeConfig,
}

/// Probe request method.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "UPPERCASE")]
pub enum ProbeMethod {
    /// `HEAD`: no body to read.
    #[default]
    Head,
    /// `GET`.
    Get,
    /// `OPTIONS`.
    Options,
}

impl ProbeMethod {
    /// The HTTP method.
    pub fn as_method(self) -> http::Method {
        match self {
            Self::Head => http::Method::HEAD,
            Self::Get => http::Method::GET,
            Self::Options => http::Method::OPTIONS,
        }
    }
}

/// `[upstream.keepalive.probe]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ProbeConfig {
    /// Send probes. Default false: a probe is a request the app never made, so
    /// it is the operator's call; without probes tether still retires idle
    /// connections (RST) before the backend's announced or observed idle limit.
    #[serde(default)]
    pub enabled: bool,
    /// `HEAD`, `GET` or `OPTIONS`. Default `HEAD`: nothing to read back.
    #[serde(default)]
    pub method: ProbeMethod,
    /// Request target of the probe. Default `"/"`.
    #[serde(default = "defaults::probe_path")]
    pub path: String,
    /// Idle time after which a pooled connection is probed; set it below the
    /// backend's keep-alive timeout. Default 30s: below nginx's 75s and most
    /// load balancers' 60s.
    #[serde(default = "defaults::probe_interval", with = "humantime_serde")]
    pub interval: Duration,
    /// Time allowed for the probe's response; then the connection is reset.
    /// Default 2s.
    #[serde(default = "defaults::probe_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Status classes that count as alive. Default `["2xx", "3xx", "4xx"]`: a
    /// 404 still proves the connection works.
    #[serde(default = "defaults::probe_expect")]
    pub expect: Vec<String>,
}

impl Default for ProbeConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            method: ProbeMethod::default(),
            path: defaults::probe_path(),
            interval: defaults::probe_interval(),
            timeout: defaults::probe_timeout(),
            expect: defaults::probe_expect(),
        }
    }
}

impl ProbeConfig {
    /// Whether a probe's status means the connection is alive.
    pub fn accepts(&self, status: u16) -> bool {
        let class = format!("{}xx", status / 100);
        self.expect.iter().any(|e| e.eq_ignore_ascii_case(&class))
    }
}

/// `[runtime]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RuntimeConfig {
    /// Workers, each a single-threaded event loop with its own accept socket
    /// (SO_REUSEPORT) and its own share of every upstream pool; 0 = one per
    /// core. Default 0.
    #[serde(default)]
    pub worker_threads: usize,
    /// After SIGTERM, time in-flight requests get to finish before the rest is
    /// aborted. Default 30s: Kubernetes' default termination grace period.
    #[serde(default = "defaults::drain_timeout", with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// Longest tether waits at start for every pool's warm floor
    /// (`pool.min_idle` connections per endpoint) before it reports ready
    /// anyway (`/readyz`, systemd's READY=1); 0 = ready as soon as the
    /// listeners are bound. Default 10s: a healthy backend answers in
    /// milliseconds, and a backend that is down must not keep the app beside
    /// tether from starting (requests then dial on demand).
    #[serde(default = "defaults::ready_timeout", with = "humantime_serde")]
    pub ready_timeout: Duration,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            worker_threads: 0,
            drain_timeout: defaults::drain_timeout(),
            ready_timeout: defaults::ready_timeout(),
        }
    }
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

impl Default for KeepaliveConfig {
    fn default() -> Self {
        Self {
            tcp_idle: defaults::tcp_idle(),
            tcp_interval: defaults::tcp_interval(),
            tcp_count: defaults::tcp_count(),
            ping_interval: defaults::ping_interval(),
            ping_timeout: defaults::ping_timeout(),
            probe: ProbeConfig::default(),
        }
    }
}

impl ListenerConfig {
    /// A listener with every optional key at its default.
    pub fn new(name: &str, listen: ListenAddr, upstream: &str) -> Self {
        Self {
            name: name.to_owned(),
            listen,
            upstream: upstream.to_owned(),
            max_connections: defaults::listener_max_connections(),
            header_timeout: defaults::header_timeout(),
            idle_timeout: defaults::idle_timeout(),
            request_timeout: defaults::request_timeout(),
            close_grace: defaults::close_grace(),
            client_close: ClientClose::default(),
            max_requests_per_connection: 0,
            max_header_bytes: defaults::max_header_bytes(),
            request_buffer: defaults::request_buffer(),
            http10_buffer: defaults::http10_buffer(),
            forwarded_for: true,
        }
    }
}

impl UpstreamConfig {
    /// An upstream with every optional key at its default.
    pub fn new(name: &str, endpoints: Vec<String>) -> Self {
        Self {
            name: name.to_owned(),
            endpoints,
            protocol: Protocol::default(),
            connect_timeout: defaults::connect_timeout(),
            dns_refresh: defaults::dns_refresh(),
            balance: Balance::default(),
            pool: PoolConfig::default(),
            keepalive: KeepaliveConfig::default(),
            health: HealthConfig::default(),
        }
    }
}

/// Default values, one function each so serde, `Default` and the docs agree.
mod defaults {
    use super::Size;
    use std::time::Duration;

    pub fn yes() -> bool {
        true
    }
    pub fn admin_listen() -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], 9901))
    }
    pub fn listener_max_connections() -> usize {
        10_000
    }
    pub fn header_timeout() -> Duration {
        Duration::from_secs(10)
    }
    pub fn idle_timeout() -> Duration {
        Duration::from_secs(60)
    }
    pub fn request_timeout() -> Duration {
        Duration::from_secs(60)
    }
    pub fn close_grace() -> Duration {
        Duration::from_secs(1)
    }
    pub fn max_header_bytes() -> Size {
        Size::kib(64)
    }
    pub fn request_buffer() -> Size {
        Size::kib(64)
    }
    pub fn http10_buffer() -> Size {
        Size::mib(1)
    }
    pub fn connect_timeout() -> Duration {
        Duration::from_secs(2)
    }
    pub fn dns_refresh() -> Duration {
        Duration::from_secs(30)
    }
    pub fn min_idle() -> usize {
        2
    }
    pub fn max_idle() -> usize {
        32
    }
    pub fn pool_max_connections() -> usize {
        256
    }
    pub fn acquire_timeout() -> Duration {
        Duration::from_secs(1)
    }
    pub fn pool_idle_timeout() -> Duration {
        Duration::from_secs(90)
    }
    pub fn max_lifetime() -> Duration {
        Duration::from_secs(30 * 60)
    }
    pub fn tcp_idle() -> Duration {
        Duration::from_secs(30)
    }
    pub fn tcp_interval() -> Duration {
        Duration::from_secs(10)
    }
    pub fn tcp_count() -> u32 {
        3
    }
    pub fn ping_interval() -> Duration {
        Duration::from_secs(15)
    }
    pub fn ping_timeout() -> Duration {
        Duration::from_secs(5)
    }
    pub fn eject_after() -> u32 {
        5
    }
    pub fn eject_time() -> Duration {
        Duration::from_secs(5)
    }
    pub fn eject_time_max() -> Duration {
        Duration::from_secs(300)
    }
    pub fn probe_path() -> String {
        "/".to_owned()
    }
    pub fn probe_interval() -> Duration {
        Duration::from_secs(30)
    }
    pub fn probe_timeout() -> Duration {
        Duration::from_secs(2)
    }
    pub fn probe_expect() -> Vec<String> {
        ["2xx", "3xx", "4xx"].map(String::from).to_vec()
    }
    pub fn drain_timeout() -> Duration {
        Duration::from_secs(30)
    }
    pub fn ready_timeout() -> Duration {
        Duration::from_secs(10)
    }
}

/// hyper refuses read buffers below 8 KiB, so a smaller head limit cannot be honoured.
const MIN_HEADER_BYTES: u64 = 8 * 1024;

impl Config {
    /// Loads `path`, applies `TETHER__…` overrides from `env`, and validates.
    ///
    /// `env` is passed in (usually `std::env::vars()`) so tests never touch the
    /// process environment.
    pub fn load(
        path: &Path,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let load_error = |message: String| ConfigError::Load {
            path: path.display().to_string(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| load_error(e.to_string()))?;
        Self::from_toml_with_env(&text, env).map_err(|e| match e {
            ConfigError::Load { message, .. } => load_error(message),
            other => other,
        })
    }

    /// Parses TOML text without environment overrides, and validates.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        Self::from_toml_with_env(text, std::iter::empty())
    }

    /// Parses TOML text, applies `TETHER__…` overrides from `env`, and validates.
    pub fn from_toml_with_env(
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut builder = config::Config::builder()
            .add_source(config::File::from_str(text, config::FileFormat::Toml));
        for (name, value) in env {
            let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            let key = env_key_to_path(rest);
            builder = builder
                .set_override(key.as_str(), env_value(&value))
                .map_err(|e| ConfigError::Load {
                    path: String::new(),
                    message: format!("environment variable {name}: {e}"),
                })?;
        }
        let merged = builder.build().map_err(|e| ConfigError::Load {
            path: String::new(),
            message: e.to_string(),
        })?;
        let tree: toml::Value = merged.try_deserialize().map_err(|e| ConfigError::Load {
            path: String::new(),
            message: e.to_string(),
        })?;
        let (config, mut problems, complete) = Self::from_tree(tree);
        // Cross-key checks need every section; with one missing they would
        // report problems that are only echoes of the parse failure.
        if complete {
            if let Err(ConfigError::Invalid(more)) = config.validate() {
                problems.extend(more);
            }
        }
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError::Invalid(problems))
        }
    }

    /// Deserializes section by section so that one bad section does not hide
    /// the problems in the others.
    fn from_tree(tree: toml::Value) -> (Self, Vec<Problem>, bool) {
        let mut problems = Vec::new();
        let mut config = Config::default();
        let mut complete = true;
        let toml::Value::Table(mut table) = tree else {
            let problem = Problem {
                key: "(root)".into(),
                message: "expected a table".into(),
            };
            return (config, vec![problem], false);
        };
        if let Some(v) = table.remove("log") {
            match section(v, "log", &mut problems) {
                Some(log) => config.log = log,
                None => complete = false,
            }
        }
        if let Some(v) = table.remove("admin") {
            match section(v, "admin", &mut problems) {
                Some(admin) => config.admin = admin,
                None => complete = false,
            }
        }
        if let Some(v) = table.remove("runtime") {
            match section(v, "runtime", &mut problems) {
                Some(runtime) => config.runtime = runtime,
                None => complete = false,
            }
        }
        for (name, target) in [("listener", true), ("upstream", false)] {
            let Some(value) = table.remove(name) else {
                continue;
            };
            let toml::Value::Array(items) = value else {
                problems.push(Problem {
                    key: name.into(),
                    message: format!("expected an array of tables: [[{name}]]"),
                });
                complete = false;
                continue;
            };
            for (i, item) in items.into_iter().enumerate() {
                let key = format!("{name}[{i}]");
                let parsed = if target {
                    section(item, &key, &mut problems).map(|l| config.listeners.push(l))
                } else {
                    section(item, &key, &mut problems).map(|u| config.upstreams.push(u))
                };
                complete &= parsed.is_some();
            }
        }
        for unknown in table.keys() {
            problems.push(Problem {
                key: unknown.clone(),
                message: "unknown key (expected log, listener, upstream, admin or runtime)".into(),
            });
        }
        (config, problems, complete)
    }

    /// Checks the combinations of keys; reports every problem at once.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        let mut problem = |key: String, message: String| problems.push(Problem { key, message });

        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            problem(
                "log.level".into(),
                format!("not a valid level or filter: {e}"),
            );
        }
        if self.listeners.is_empty() {
            problem(
                "listener".into(),
                "at least one [[listener]] is required".into(),
            );
        }
        if self.upstreams.is_empty() {
            problem(
                "upstream".into(),
                "at least one [[upstream]] is required".into(),
            );
        }
        let upstream_names: HashSet<&str> =
            self.upstreams.iter().map(|u| u.name.as_str()).collect();
        let mut seen_names = HashSet::new();
        let mut seen_addrs = HashSet::new();
        for (i, l) in self.listeners.iter().enumerate() {
            let key = |field: &str| format!("listener[{i}].{field}");
            if l.name.is_empty() {
                problem(key("name"), "must not be empty".into());
            } else if !seen_names.insert(l.name.as_str()) {
                problem(key("name"), format!("duplicate listener name {:?}", l.name));
            }
            if self.admin.enabled
                && l.listen == ListenAddr::Tcp(self.admin.listen)
                && self.admin.listen.port() != 0
            {
                problem(
                    key("listen"),
                    format!("{} is the admin server's address", l.listen),
                );
            }
            if !seen_addrs.insert(l.listen.to_string()) {
                problem(
                    key("listen"),
                    format!("{} is used by another listener", l.listen),
                );
            }
            if !upstream_names.contains(l.upstream.as_str()) {
                problem(
                    key("upstream"),
                    format!("no [[upstream]] is named {:?}", l.upstream),
                );
            }
            if l.max_connections == 0 {
                problem(key("max_connections"), "must be at least 1".into());
            }
            for (field, value) in [
                ("header_timeout", l.header_timeout),
                ("idle_timeout", l.idle_timeout),
                ("request_timeout", l.request_timeout),
            ] {
                if value.is_zero() {
                    problem(key(field), "must be greater than 0".into());
                }
            }
            if l.max_header_bytes.as_u64() < MIN_HEADER_BYTES {
                problem(key("max_header_bytes"), "must be at least 8KiB".into());
            }
        }
        let mut seen_upstreams = HashSet::new();
        for (i, u) in self.upstreams.iter().enumerate() {
            let key = |field: &str| format!("upstream[{i}].{field}");
            if u.name.is_empty() {
                problem(key("name"), "must not be empty".into());
            } else if !seen_upstreams.insert(u.name.as_str()) {
                problem(key("name"), format!("duplicate upstream name {:?}", u.name));
            }
            if u.endpoints.is_empty() {
                problem(
                    key("endpoints"),
                    "at least one \"host:port\" is required".into(),
                );
            }
            for (j, endpoint) in u.endpoints.iter().enumerate() {
                if let Err(message) = split_host_port(endpoint) {
                    problem(format!("upstream[{i}].endpoints[{j}]"), message);
                }
            }
            if u.connect_timeout.is_zero() {
                problem(key("connect_timeout"), "must be greater than 0".into());
            }
            if u.dns_refresh.is_zero() {
                problem(key("dns_refresh"), "must be greater than 0".into());
            }
            let p = &u.pool;
            if p.max_connections == 0 {
                problem(key("pool.max_connections"), "must be at least 1".into());
            }
            if p.min_idle > p.max_connections {
                problem(
                    key("pool.min_idle"),
                    format!(
                        "{} exceeds pool.max_connections ({})",
                        p.min_idle, p.max_connections
                    ),
                );
            }
            if p.min_idle > p.max_idle {
                problem(
                    key("pool.min_idle"),
                    format!("{} exceeds pool.max_idle ({})", p.min_idle, p.max_idle),
                );
            }
            if p.acquire_timeout.is_zero() {
                problem(key("pool.acquire_timeout"), "must be greater than 0".into());
            }
            if p.idle_timeout.is_zero() {
                problem(key("pool.idle_timeout"), "must be greater than 0".into());
            }
            if p.max_lifetime.is_zero() {
                problem(key("pool.max_lifetime"), "must be greater than 0".into());
            }
            let k = &u.keepalive;
            // The kernel takes these in whole seconds.
            if k.tcp_idle < Duration::from_secs(1) {
                problem(key("keepalive.tcp_idle"), "must be at least 1s".into());
            }
            if k.tcp_interval < Duration::from_secs(1) {
                problem(key("keepalive.tcp_interval"), "must be at least 1s".into());
            }
            if k.tcp_count == 0 {
                problem(key("keepalive.tcp_count"), "must be at least 1".into());
            }
            if u.health.eject_time.is_zero() || u.health.eject_time > u.health.eject_time_max {
                problem(
                    key("health.eject_time"),
                    "must be greater than 0 and at most health.eject_time_max".into(),
                );
            }
            if k.ping_interval.is_zero() || k.ping_timeout.is_zero() {
                problem(
                    key("keepalive.ping_interval"),
                    "ping_interval and ping_timeout must be greater than 0".into(),
                );
            }
            let probe = &k.probe;
            if probe.interval.is_zero() {
                problem(
                    key("keepalive.probe.interval"),
                    "must be greater than 0".into(),
                );
            }
            if probe.timeout.is_zero() {
                problem(
                    key("keepalive.probe.timeout"),
                    "must be greater than 0".into(),
                );
            }
            if !probe.path.starts_with('/')
                || probe.path.parse::<http::uri::PathAndQuery>().is_err()
            {
                problem(
                    key("keepalive.probe.path"),
                    format!(
                        "{:?} is not an origin-form path like \"/health\"",
                        probe.path
                    ),
                );
            }
            for (j, class) in probe.expect.iter().enumerate() {
                if !["1xx", "2xx", "3xx", "4xx", "5xx"]
                    .contains(&class.to_ascii_lowercase().as_str())
                {
                    problem(
                        format!("upstream[{i}].keepalive.probe.expect[{j}]"),
                        format!("{class:?} is not a status class like \"2xx\""),
                    );
                }
            }
        }
        if self.runtime.drain_timeout.is_zero() {
            problem(
                "runtime.drain_timeout".into(),
                "must be greater than 0".into(),
            );
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(problems))
        }
    }

    /// The effective configuration as TOML (every key, defaults filled in).
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }

    /// The upstream a listener forwards to (validation guarantees it exists).
    pub fn upstream(&self, name: &str) -> Option<&UpstreamConfig> {
        self.upstreams.iter().find(|u| u.name == name)
    }
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

/// Deserializes one section, reporting every bad key in it: each failing key is
/// recorded and removed (so it takes its default) and the rest is tried again.
/// `None` when the section cannot stand even then (a required key is bad).
fn section<T: serde::de::DeserializeOwned>(
    mut value: toml::Value,
    key: &str,
    problems: &mut Vec<Problem>,
) -> Option<T> {
    // Bounded: each round removes one key, and a section has a few dozen.
    for _ in 0..64 {
        let error = match serde_path_to_error::deserialize::<_, T>(value.clone()) {
            Ok(parsed) => return Some(parsed),
            Err(e) => e,
        };
        let segments: Vec<String> = error
            .path()
            .iter()
            .filter_map(|segment| match segment {
                serde_path_to_error::Segment::Map { key } => Some(key.clone()),
                serde_path_to_error::Segment::Seq { index } => Some(index.to_string()),
                _ => None,
            })
            .collect();
        let inner = error.path().to_string();
        let full_key = if inner == "." || inner.is_empty() {
            key.to_owned()
        } else {
            format!("{key}.{inner}")
        };
        // The TOML deserializer appends the key and a blank line; the path says it.
        let message = error
            .into_inner()
            .to_string()
            .lines()
            .next()
            .unwrap_or_default()
            .trim()
            .to_owned();
        let already_reported = problems.iter().any(|p| p.key == full_key);
        if !already_reported {
            problems.push(Problem {
                key: full_key,
                message,
            });
        }
        if already_reported || segments.is_empty() || !remove_path(&mut value, &segments) {
            return None;
        }
    }
    None
}

fn remove_path(value: &mut toml::Value, segments: &[String]) -> bool {
    let Some((last, parents)) = segments.split_last() else {
        return false;
    };
    let mut node = value;
    for segment in parents {
        node = match node {
            toml::Value::Table(t) => match t.get_mut(segment) {
                Some(next) => next,
                None => return false,
            },
            toml::Value::Array(items) => {
                match segment.parse::<usize>().ok().and_then(|i| items.get_mut(i)) {
                    Some(next) => next,
                    None => return false,
                }
            }
            _ => return false,
        };
    }
    match node {
        toml::Value::Table(t) => t.remove(last).is_some(),
        toml::Value::Array(items) => match last.parse::<usize>() {
            Ok(i) if i < items.len() => {
                items.remove(i);
                true
            }
            _ => false,
        },
        _ => false,
    }
}

/// `LISTENER__0__IDLE_TIMEOUT` → `listener[0].idle_timeout`.
fn env_key_to_path(rest: &str) -> String {
    let mut path = String::new();
    for part in rest.split("__") {
        let part = part.to_ascii_lowercase();
        if part.chars().all(|c| c.is_ascii_digit()) && !part.is_empty() && !path.is_empty() {
            path.push('[');
            path.push_str(&part);
            path.push(']');
        } else {
            if !path.is_empty() {
                path.push('.');
            }
            path.push_str(&part);
        }
    }
    path
}

/// An override value is read as a TOML value when it is one (`10`, `true`,
/// `["a:1", "b:2"]`) and as a plain string otherwise (`30s`, `debug`).
fn env_value(text: &str) -> config::Value {
    let parsed = format!("v = {text}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"));
    match parsed {
        Some(v) => toml_to_config(v),
        None => config::Value::from(text),
    }
}

fn toml_to_config(value: toml::Value) -> config::Value {
    match value {
        toml::Value::String(s) => s.into(),
        toml::Value::Integer(i) => i.into(),
        toml::Value::Float(f) => f.into(),
        toml::Value::Boolean(b) => b.into(),
        toml::Value::Datetime(d) => d.to_string().into(),
        toml::Value::Array(items) => items
            .into_iter()
            .map(toml_to_config)
            .collect::<Vec<_>>()
            .into(),
        toml::Value::Table(table) => table
            .into_iter()
            .map(|(k, v)| (k, toml_to_config(v)))
            .collect::<std::collections::HashMap<_, _>>()
            .into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        [[listener]]
        name = "app"
        listen = "127.0.0.1:8080"
        upstream = "backend"

        [[upstream]]
        name = "backend"
        endpoints = ["127.0.0.1:9000"]
    "#;

    #[test]
    fn minimal_file_gets_documented_defaults() {
        let c = Config::from_toml(MINIMAL).unwrap();
        let l = &c.listeners[0];
        assert_eq!(l.max_connections, 10_000);
        assert_eq!(l.header_timeout, Duration::from_secs(10));
        assert_eq!(l.client_close, ClientClose::Graceful);
        assert_eq!(l.max_header_bytes, Size::kib(64));
        let u = &c.upstreams[0];
        assert_eq!(u.pool.min_idle, 2);
        assert_eq!(u.pool.retire, RetirePolicy::Uniform(Retire::Abort));
        assert_eq!(u.keepalive.tcp_count, 3);
        assert_eq!(c.runtime.drain_timeout, Duration::from_secs(30));
        assert_eq!(c.admin.listen, "127.0.0.1:9901".parse().unwrap());
        assert_eq!(l, &ListenerConfig::new("app", l.listen.clone(), "backend"));
    }

    #[test]
    fn environment_overrides_nested_and_indexed_keys() {
        let env = [
            ("TETHER__RUNTIME__DRAIN_TIMEOUT", "5s"),
            ("TETHER__LISTENER__0__CLIENT_CLOSE", "abort"),
            ("TETHER__LISTENER__0__MAX_REQUESTS_PER_CONNECTION", "1"),
            ("TETHER__UPSTREAM__0__POOL__MIN_IDLE", "4"),
            (
                "TETHER__UPSTREAM__0__ENDPOINTS",
                r#"["127.0.0.1:1", "127.0.0.1:2"]"#,
            ),
            ("OTHER", "ignored"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned()));
        let c = Config::from_toml_with_env(MINIMAL, env).unwrap();
        assert_eq!(c.runtime.drain_timeout, Duration::from_secs(5));
        assert_eq!(c.listeners[0].client_close, ClientClose::Abort);
        assert_eq!(c.listeners[0].max_requests_per_connection, 1);
        assert_eq!(c.upstreams[0].pool.min_idle, 4);
        assert_eq!(c.upstreams[0].endpoints.len(), 2);
    }

    #[test]
    fn every_problem_is_reported_with_its_key_path() {
        let text = r#"
            bogus = 1
            [log]
            level = "info"
            colour = "yes"
            [[listener]]
            name = "app"
            listen = "127.0.0.1:8080"
            upstream = "missing"
            max_header_bytes = "1KiB"
            [[listener]]
            name = "two"
            listen = "127.0.0.1:8081"
            upstream = "backend"
            idle_timeout = "soon"
            [[upstream]]
            name = "backend"
            endpoints = ["nohost"]
            [upstream.pool]
            min_idle = 8
            max_idle = 4
        "#;
        let Err(ConfigError::Invalid(problems)) = Config::from_toml(text) else {
            panic!("expected problems");
        };
        let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
        for expected in [
            "bogus",
            "log.colour",
            "listener[1].idle_timeout",
            "listener[0].upstream",
            "listener[0].max_header_bytes",
            "upstream[0].endpoints[0]",
            "upstream[0].pool.min_idle",
        ] {
            assert!(keys.contains(&expected), "{expected} missing from {keys:?}");
        }
    }

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

    #[test]
    fn effective_config_round_trips_through_toml() {
        let c = Config::from_toml(MINIMAL).unwrap();
        let again = Config::from_toml(&c.to_toml()).unwrap();
        assert_eq!(c, again);
    }

    #[test]
    fn listen_addresses_parse_tcp_and_unix() {
        assert_eq!(
            "unix:/tmp/x.sock".parse::<ListenAddr>().unwrap(),
            ListenAddr::Unix("/tmp/x.sock".into())
        );
        assert!(matches!(
            "[::1]:80".parse::<ListenAddr>().unwrap(),
            ListenAddr::Tcp(_)
        ));
        assert!("localhost:80".parse::<ListenAddr>().is_err());
        assert_eq!(split_host_port("[::1]:80").unwrap(), ("::1".to_owned(), 80));
        assert!(split_host_port("backend").is_err());
    }
}
