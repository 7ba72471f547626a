//! What one line of each log says. Plain data, filled by the layers that know
//! it: the client connection and the proxy service for [`AccessRecord`], the
//! pool for [`UpstreamFacts`] and [`ConnectionRecord`].

use std::net::SocketAddr;
use std::time::Duration;

use serde::Serialize;

/// One access-log line: a request and its answer (`kind = "request"`), or
/// the end of a client connection whose last exchange did not say
/// `Connection: close` (`kind = "connection"`: an idle or header timeout, a
/// client that closed a keep-alive connection, a malformed request, an
/// eviction, the drain).
///
/// A request's line is written when its response body is done with; the
/// line of an exchange that ends its connection waits for the connection's
/// end and carries how it ended (`client_end`, `client_end_reason`), so a
/// client that opens a connection per request gets one line per request.
#[derive(Debug, Clone, Default, Serialize)]
pub struct AccessRecord {
    /// `request`, or `connection` for a line that only ends a connection.
    pub kind: &'static str,
    /// The listener's name.
    pub listener: String,
    /// The client's address (none on a unix socket).
    pub client: Option<SocketAddr>,
    /// The request method.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// The request target as sent, cut at `max_target_bytes`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// The client's HTTP version (`HTTP/1.1`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<&'static str>,
    /// The status the client got (from the upstream or from tether).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// Request body bytes read from the client.
    pub bytes_in: u64,
    /// Response body bytes handed to the client connection.
    pub bytes_out: u64,
    /// Milliseconds spent getting a connection from the pool (dial included
    /// when the request dialled one; every attempt summed).
    pub pool_wait_ms: f64,
    /// Milliseconds of connect and handshake of a connection dialled for this
    /// request; 0 when it went on a connection that was already open.
    pub connect_ms: f64,
    /// Milliseconds from the request head to the response head (the
    /// upstream's, or tether's own answer).
    pub ttfb_ms: f64,
    /// Milliseconds from the request head to the end of the response body.
    pub total_ms: f64,
    /// What the pool says about the upstream side, when the request got that
    /// far.
    #[serde(flatten)]
    pub upstream: UpstreamFacts,
    /// The `x-tether-error` reason, when tether answered itself.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// How the client connection ended, `FIN` or `RST`, on the line that
    /// carries its end.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_end: Option<&'static str>,
    /// Why: `fin` for an orderly close, else the reset's reason
    /// (`idle-timeout`, `close-grace`, …), as `tether_client_connections_closed`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_end_reason: Option<&'static str>,
    /// Requests the client connection carried, on the line that carries its end.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_requests: Option<u64>,
    /// The response said `Connection: close`: the line waits for the end of
    /// the connection.
    #[serde(skip)]
    pub last: bool,
}

/// The upstream side of one request, as the pool saw it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct UpstreamFacts {
    /// The upstream's name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream: Option<String>,
    /// The endpoint the request went to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<SocketAddr>,
    /// The upstream connection's id (as `/pools` and the connection log show it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_conn: Option<u64>,
    /// Whether that connection had been used (or sat idle) before.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reused: Option<bool>,
    /// Which request on that connection this was, from 1 (HTTP/2: which stream).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub conn_request: Option<u64>,
    /// Attempts on an upstream connection: 1, or 2 after the one retry; 0
    /// when the request never got a connection (refused, or no connection
    /// to be had).
    pub attempts: u32,
    /// Why it was sent again: `unsent` (the connection closed before it was
    /// written), `refused` (the HTTP/2 peer did not process it),
    /// `reused-connection-failed` (it failed on a reused connection before
    /// any response byte).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_reason: Option<&'static str>,
    /// Time spent in the pool's acquire, every attempt summed.
    #[serde(skip)]
    pub pool_wait: Duration,
    /// Connect and handshake of a connection dialled for this request.
    #[serde(skip)]
    pub connect: Duration,
}

/// One connection-log line: an upstream connection that ended.
#[derive(Debug, Clone, Serialize)]
pub struct ConnectionRecord {
    /// The connection's id.
    pub id: u64,
    /// The upstream's name.
    pub upstream: String,
    /// The address it was connected to.
    pub endpoint: SocketAddr,
    /// What opened it: `warm`, `refill`, `demand`, ….
    pub opened_by: &'static str,
    /// Milliseconds from its dial to its end.
    pub age_ms: f64,
    /// Requests (HTTP/2: streams) it carried.
    pub requests: u64,
    /// Milliseconds it had been idle when it ended; absent when it ended busy.
    pub idle_ms: Option<f64>,
    /// Who closed it first: `tether` or `backend`.
    pub closed_by: &'static str,
    /// How: `FIN` or `RST` from tether, `peer-first` when the backend closed
    /// first and tether's close was the passive one (or `RST` when the
    /// backend reset it).
    pub how: &'static str,
    /// Why: a retire reason (`idle`, `lifetime`, `max_requests`, `error`,
    /// `drain`, …) or `backend-closed`.
    pub reason: &'static str,
}

/// A duration in milliseconds, to the microsecond.
pub fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1_000_000.0).round() / 1000.0
}

/// `target` cut to at most `max` bytes at a character boundary, marked with
/// `...` when cut.
pub fn truncate_target(target: &str, max: usize) -> String {
    if target.len() <= max {
        return target.to_owned();
    }
    let mut end = max;
    while !target.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &target[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_targets_are_cut_at_a_character_boundary() {
        assert_eq!(truncate_target("/abc", 4), "/abc");
        assert_eq!(truncate_target("/abcdef", 4), "/abc...");
        assert_eq!(truncate_target("/é", 2), "/...");
    }

    #[test]
    fn milliseconds_keep_microseconds() {
        assert_eq!(ms(Duration::from_micros(1234)), 1.234);
        assert_eq!(ms(Duration::ZERO), 0.0);
    }
}
