//! `[[listener]]`: a local port (TCP or unix socket) the app connects to, the
//! upstream it forwards to (or its routes, by host: `route`), the client-leg
//! clocks and limits, and [`ClientClose`], which decides where a closing
//! connection's TIME_WAIT lands.

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::{defaults, route, AdminConfig, Problem, Problems, RouteConfig, Size, UpstreamConfig};

/// Real clients' heads (cookies, tokens) run to several KiB, and common servers
/// take at least 8 KiB: a smaller limit would refuse requests they serve.
const MIN_HEADER_BYTES: Size = Size::kib(8);

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

/// What tether does with a request header whose name contains `_`. A header
/// that, with `_` read as `-`, names `Content-Length` or `Transfer-Encoding`
/// is refused whatever this says: CGI-style backends (PHP-FPM, WSGI) map `-`
/// and `_` to the same variable, so it could frame the body differently
/// there than it did at tether.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum UnderscoresInHeaders {
    /// Remove such headers before forwarding, counted in
    /// `tether_request_headers_dropped_total`. The default, as nginx's
    /// (`underscores_in_headers off`): a CGI-style backend cannot tell
    /// `X_User` from `X-User`, so a client could pass one for the other.
    #[default]
    Drop,
    /// Forward them unchanged, for backends that read them on purpose.
    Pass,
    /// Refuse the request with 400 `underscore-in-header`.
    Reject,
}

/// `[[listener]]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    /// Name used in logs and metrics; unique.
    pub name: String,
    /// `"127.0.0.1:8080"` or `"unix:/path/to.sock"`.
    pub listen: ListenAddr,
    /// Name of the `[[upstream]]` this listener forwards to; with routes, the
    /// one a request no route matches goes to. May be left out (empty) when
    /// the listener has routes: such a request then gets 403 `no-route`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub upstream: String,
    /// Concurrent client connections; beyond it, new connections wait in the
    /// kernel's accept queue. Default: [`defaults::listener_max_connections`].
    #[serde(default = "defaults::listener_max_connections")]
    pub max_connections: usize,
    /// At `max_connections`, with a new connection waiting: reset the
    /// longest-idle keep-alive client connection (never one with a request in
    /// flight) to admit it; with none idle, the new one waits for a permit.
    /// Default: [`defaults::evict_idle_at_cap`].
    #[serde(default = "defaults::evict_idle_at_cap")]
    pub evict_idle_at_cap: bool,
    /// Time allowed for a complete request head, from accept or from the first
    /// byte of a later request; then RST. Default: [`defaults::header_timeout`].
    #[serde(default = "defaults::header_timeout", with = "humantime_serde")]
    pub header_timeout: Duration,
    /// Time a keep-alive client may stay silent between requests; then RST.
    /// Default: [`defaults::idle_timeout`].
    #[serde(default = "defaults::idle_timeout", with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Time a client may leave tether's response unread: a write to it that
    /// cannot proceed this long, from its last progress, resets the
    /// connection (and discards the upstream connection the body came on).
    /// Default: [`defaults::send_timeout`].
    #[serde(default = "defaults::send_timeout", with = "humantime_serde")]
    pub send_timeout: Duration,
    /// Time from a complete request head to the upstream's response head; then
    /// 504. Default: [`defaults::request_timeout`].
    #[serde(default = "defaults::request_timeout", with = "humantime_serde")]
    pub request_timeout: Duration,
    /// How long tether waits for the client's FIN when a connection ends before
    /// it resets. Default: [`defaults::close_grace`].
    #[serde(default = "defaults::close_grace", with = "humantime_serde")]
    pub close_grace: Duration,
    /// Who sends the first FIN when an exchange ends the connection. Default:
    /// [`ClientClose::Graceful`].
    #[serde(default)]
    pub client_close: ClientClose,
    /// Requests served on one client connection before tether ends it with
    /// `Connection: close`; 0 = unlimited. Set 1 for apps that open a
    /// connection per request and close first. Default:
    /// [`defaults::max_requests_per_connection`].
    #[serde(default = "defaults::max_requests_per_connection")]
    pub max_requests_per_connection: u64,
    /// Largest request head (request line plus headers). At least 8KiB.
    /// Default: [`defaults::max_header_bytes`].
    #[serde(default = "defaults::max_header_bytes")]
    pub max_header_bytes: Size,
    /// Request body bytes read before the request is forwarded. A body that fits
    /// is checked whole (bad chunked framing gets a 400 and is never forwarded)
    /// and can be replayed on the one retry; larger bodies stream after this
    /// much. Default: [`defaults::request_buffer`].
    #[serde(default = "defaults::request_buffer")]
    pub request_buffer: Size,
    /// Upstream bodies of unknown length are buffered up to this size so HTTP/1.0
    /// clients get a Content-Length; larger ones are sent close-delimited.
    /// Default: [`defaults::http10_buffer`].
    #[serde(default = "defaults::http10_buffer")]
    pub http10_buffer: Size,
    /// Append the client's address to `X-Forwarded-For`. Default:
    /// [`defaults::forwarded_for`].
    #[serde(default = "defaults::forwarded_for")]
    pub forwarded_for: bool,
    /// Request headers whose name contains `_`: dropped, passed or refused.
    /// Default: [`UnderscoresInHeaders::Drop`].
    #[serde(default)]
    pub underscores_in_headers: UnderscoresInHeaders,
    /// `[[listener.route]]`: upstreams chosen by the request's host (the
    /// target's authority for an absolute-form request, else `Host`), tried
    /// in order; the first match wins. Default: none.
    #[serde(default, rename = "route", skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<RouteConfig>,
}

impl ListenerConfig {
    /// A listener with every optional key at its default.
    pub fn new(name: &str, listen: ListenAddr, upstream: &str) -> Self {
        Self {
            name: name.to_owned(),
            listen,
            upstream: upstream.to_owned(),
            max_connections: defaults::listener_max_connections(),
            evict_idle_at_cap: defaults::evict_idle_at_cap(),
            header_timeout: defaults::header_timeout(),
            send_timeout: defaults::send_timeout(),
            idle_timeout: defaults::idle_timeout(),
            request_timeout: defaults::request_timeout(),
            close_grace: defaults::close_grace(),
            client_close: ClientClose::default(),
            max_requests_per_connection: defaults::max_requests_per_connection(),
            max_header_bytes: defaults::max_header_bytes(),
            request_buffer: defaults::request_buffer(),
            http10_buffer: defaults::http10_buffer(),
            forwarded_for: defaults::forwarded_for(),
            underscores_in_headers: UnderscoresInHeaders::default(),
            routes: Vec::new(),
        }
    }

    /// The upstream a request no route matches goes to, when there is one.
    pub fn default_upstream(&self) -> Option<&str> {
        Some(self.upstream.as_str()).filter(|name| !name.is_empty())
    }
}

/// Checks every `[[listener]]`: unique names and addresses, none on the admin
/// server's address, a default upstream or routes, upstreams that exist, and
/// limits that can be honoured.
pub(super) fn validate(
    listeners: &[ListenerConfig],
    upstreams: &[UpstreamConfig],
    admin: &AdminConfig,
    found: &mut Vec<Problem>,
) {
    let upstream_names: HashSet<&str> = upstreams.iter().map(|u| u.name.as_str()).collect();
    let mut seen_names = HashSet::new();
    let mut seen_addrs = HashSet::new();
    for (i, l) in listeners.iter().enumerate() {
        let mut problems = Problems::new(format!("listener[{i}]"), found);
        problems.unique_name(&l.name, "listener", &mut seen_names);
        if admin.enabled && l.listen == ListenAddr::Tcp(admin.listen) && admin.listen.port() != 0 {
            problems.add(
                "listen",
                format!("{} is the admin server's address", l.listen),
            );
        }
        if !seen_addrs.insert(l.listen.to_string()) {
            problems.add(
                "listen",
                format!("{} is used by another listener", l.listen),
            );
        }
        match l.default_upstream() {
            Some(name) if !upstream_names.contains(name) => {
                problems.add("upstream", format!("no [[upstream]] is named {name:?}"));
            }
            None if l.routes.is_empty() => problems.add(
                "upstream",
                "must name an [[upstream]] unless the listener has [[listener.route]] entries",
            ),
            _ => {}
        }
        route::validate(&l.routes, |n| upstream_names.contains(n), &mut problems);
        problems.at_least("max_connections", l.max_connections, 1);
        problems.positive("header_timeout", l.header_timeout);
        problems.positive("idle_timeout", l.idle_timeout);
        problems.positive("send_timeout", l.send_timeout);
        problems.positive("request_timeout", l.request_timeout);
        problems.at_least("max_header_bytes", l.max_header_bytes, MIN_HEADER_BYTES);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::split_host_port;

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
