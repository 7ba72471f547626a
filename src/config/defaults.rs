//! Every default value of the configuration, written once, with the reason for
//! it. The serde `default = "defaults::…"` attributes, the `Default` impls and
//! the `new` constructors all call these functions, and the field docs point
//! here. A key whose type is an enum takes the variant marked `#[default]` on
//! that enum, where its reason is written.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use super::{LogFormat, Protocol, Size};

// [log]

/// `log.level`. Default `"info"`: connection-level events are `debug`, so
/// `info` stays quiet under load while still showing start-up, drain and
/// upstream failures.
pub fn log_level() -> String {
    "info".to_owned()
}

// [log.access], [log.connections]

/// `log.access.enabled`. Default false: a line per request is a cost (a
/// format and a write) an operator opts into.
pub const fn access_log_enabled() -> bool {
    false
}

/// `log.connections.enabled`. Default false, as for the access log.
pub const fn connection_log_enabled() -> bool {
    false
}

/// `log.access.format` and `log.connections.format`. Default `"json"`: these
/// logs are read by pipelines more than by people, and JSON needs no parser
/// of tether's own.
pub const fn access_log_format() -> LogFormat {
    LogFormat::Json
}

/// `log.access.buffer_lines` and `log.connections.buffer_lines`. Default 4096:
/// a stall of the sink (a slow disk, a paused pipe) of a tenth of a second at
/// 40 000 requests a second is absorbed, while a sink that never drains costs
/// at most a few MiB (a line is a few hundred bytes) before lines are dropped.
pub const fn log_buffer_lines() -> usize {
    4096
}

/// `log.access.max_target_bytes`. Default 512: longer than nearly every real
/// path and query, short enough that a client cannot make one line (and the
/// queue) large.
pub const fn max_target_bytes() -> usize {
    512
}

// [[listener]]

/// `listener.max_connections`. Default 10000: far above what a single legacy
/// app opens, low enough that a runaway client cannot exhaust file descriptors.
pub const fn listener_max_connections() -> usize {
    10_000
}

/// `listener.evict_idle_at_cap`. Default true: an idle keep-alive client
/// reconnects for free (its next request opens a new connection, as after an
/// idle timeout), while a new client left waiting at the cap is a stalled
/// request.
pub const fn evict_idle_at_cap() -> bool {
    true
}

/// `listener.header_timeout`. Default 10s: generous for any real client, short
/// enough to shed slowloris connections.
pub const fn header_timeout() -> Duration {
    Duration::from_secs(10)
}

/// `listener.send_timeout`. Default 60s, nginx's `send_timeout`: a client
/// still reading advances within seconds even on a slow link, while one that
/// stopped reading would hold its upstream connection for good.
pub const fn send_timeout() -> Duration {
    Duration::from_secs(60)
}

/// `listener.idle_timeout`. Default 60s: longer than the usual client-side pool
/// idle (so clients time out first and close), short enough to free
/// descriptors of vanished apps.
pub const fn idle_timeout() -> Duration {
    Duration::from_secs(60)
}

/// `listener.request_timeout`. Default 60s: matches common backend and
/// load-balancer timeouts.
pub const fn request_timeout() -> Duration {
    Duration::from_secs(60)
}

/// `listener.close_grace`. Default 1s: a live client closes within
/// milliseconds.
pub const fn close_grace() -> Duration {
    Duration::from_secs(1)
}

/// `listener.max_requests_per_connection`. Default 0 (unlimited): keep-alive
/// clients are never cut off.
pub const fn max_requests_per_connection() -> u64 {
    0
}

/// `listener.max_header_bytes`. Default 64KiB: above any legitimate cookie
/// load, bounded per connection.
pub const fn max_header_bytes() -> Size {
    Size::kib(64)
}

/// `upstream.max_response_header_bytes`. Default 64KiB: four times the
/// 16KiB buffer HAProxy and nginx give a response head by default, so a
/// backend heavy with cookies or policy headers passes; bounded per
/// exchange.
pub const fn max_response_header_bytes() -> Size {
    Size::kib(64)
}

/// `listener.request_buffer`. Default 64KiB: covers the form posts and API
/// calls of typical legacy apps at a bounded cost per request.
pub const fn request_buffer() -> Size {
    Size::kib(64)
}

/// `listener.http10_buffer`. Default 1MiB: covers typical API responses at a
/// bounded cost per request.
pub const fn http10_buffer() -> Size {
    Size::mib(1)
}

/// `listener.forwarded_for`. Default true: the backend otherwise sees every
/// request coming from the sidecar.
pub const fn forwarded_for() -> bool {
    true
}

// [[upstream]]

/// `upstream.connect_timeout`. Default 2s: a loopback or in-cluster connect
/// takes milliseconds, and a request should not wait long on an endpoint that
/// is down.
pub const fn connect_timeout() -> Duration {
    Duration::from_secs(2)
}

/// `upstream.dns_refresh`. Default 30s: the usual TTL of service records, so
/// endpoint changes are picked up within one TTL.
pub const fn dns_refresh() -> Duration {
    Duration::from_secs(30)
}

// [upstream.tls]

/// `upstream.tls.ca`. Default `["system"]`: the platform's trust store (read
/// with `rustls-native-certs`), so a CA an operator installed with the
/// system's tools (`update-ca-certificates`, a corporate root baked into the
/// image) is trusted as every other program on the host trusts it, and the
/// distribution keeps the list current; a compiled-in list would do neither.
pub fn tls_ca() -> Vec<String> {
    vec![super::tls::SYSTEM_ROOTS.to_owned()]
}

/// `upstream.tls.alpn`. Default `["http/1.1"]` for `protocol = "http1"` and
/// `["h2"]` for `"http2"`: offer exactly what the pool will speak, so a
/// backend that picks a protocol picks the one tether's connection expects.
pub fn tls_alpn(protocol: Protocol) -> Vec<String> {
    match protocol {
        Protocol::Http1 => vec!["http/1.1".to_owned()],
        Protocol::Http2 => vec!["h2".to_owned()],
    }
}

/// `upstream.tls.handshake_timeout`. Default 5s: a full handshake is two
/// round trips and a signature, well under a second even across regions; a
/// backend that takes longer is overloaded, and the request waiting behind
/// the dial should get its 502 rather than hang.
pub const fn tls_handshake_timeout() -> Duration {
    Duration::from_secs(5)
}

/// `upstream.tls.close_notify_wait`. Default 100ms: the `close_notify` of an
/// aborted connection is one small record, acknowledged within a round trip
/// on any healthy path; waiting longer only delays freeing the slot, and a
/// peer that does not acknowledge by then is reset anyway.
pub const fn tls_close_notify_wait() -> Duration {
    Duration::from_millis(100)
}

/// `upstream.tls.rotation_window`. Default 60s: when a certificate, key or
/// CA file changes, the pooled connections made with the old material are
/// replaced spread over this long, so a pool of many connections does not
/// send its backend a burst of full handshakes at once, while a certificate
/// taken out of use is out of every idle connection within a minute (a busy
/// one follows when its exchange ends).
pub const fn tls_rotation_window() -> Duration {
    Duration::from_secs(60)
}

// [upstream.pool]

/// `upstream.pool.min_idle`. Default 2: the first requests never pay a
/// handshake, and one spare covers a connection that is being replaced.
pub const fn min_idle() -> usize {
    2
}

/// `upstream.pool.max_idle`. Default 32: bursts up to 32 concurrent requests
/// reuse warm connections.
pub const fn max_idle() -> usize {
    32
}

/// `upstream.pool.max_connections`. Default 256: protects the backend from a
/// stampede while leaving room for real concurrency.
pub const fn pool_max_connections() -> usize {
    256
}

/// `upstream.pool.acquire_timeout`. Default 1s: a saturated pool should shed
/// load quickly.
pub const fn acquire_timeout() -> Duration {
    Duration::from_secs(1)
}

/// `upstream.pool.idle_timeout`. Default 90s: shorter than common backend
/// keep-alive timeouts would be wrong for those under 90s, so lower it to
/// below your backend's.
pub const fn pool_idle_timeout() -> Duration {
    Duration::from_secs(90)
}

/// `upstream.pool.max_lifetime`. Default 30m: rebalances across endpoints and
/// survives backend-side connection caps without constant churn.
pub const fn max_lifetime() -> Duration {
    Duration::from_secs(30 * 60)
}

// [upstream.health]

/// `upstream.health.eject_after`. Default 5: one flaky request never ejects, a
/// dead endpoint is out within a handful.
pub const fn eject_after() -> u32 {
    5
}

/// `upstream.health.eject_on_5xx`. Default false: a backend's 500 is usually
/// about the request, not the endpoint.
pub const fn eject_on_5xx() -> bool {
    false
}

/// `upstream.health.eject_time`. Default 5s.
pub const fn eject_time() -> Duration {
    Duration::from_secs(5)
}

/// `upstream.health.eject_time_max`. Default 5m.
pub const fn eject_time_max() -> Duration {
    Duration::from_secs(300)
}

// [upstream.keepalive]

/// `upstream.keepalive.tcp_idle`. Default 30s: below the idle timeouts of
/// common NATs and conntrack tables.
pub const fn tcp_idle() -> Duration {
    Duration::from_secs(30)
}

/// `upstream.keepalive.tcp_interval`. Default 10s.
pub const fn tcp_interval() -> Duration {
    Duration::from_secs(10)
}

/// `upstream.keepalive.tcp_count`. Default 3: a dead peer is detected within
/// `tcp_idle + 3 × tcp_interval`.
pub const fn tcp_count() -> u32 {
    3
}

/// `upstream.keepalive.ping_interval`. Default 15s: well inside NAT and
/// load-balancer idle timeouts (AWS: 350s).
pub const fn ping_interval() -> Duration {
    Duration::from_secs(15)
}

/// `upstream.keepalive.ping_timeout`. Default 5s.
pub const fn ping_timeout() -> Duration {
    Duration::from_secs(5)
}

// [upstream.keepalive.probe]

/// `upstream.keepalive.probe.enabled`. Default false: a probe is a request the
/// app never made, so it is the operator's call; without probes tether still
/// retires idle connections (RST) before the backend's announced or observed
/// idle limit.
pub const fn probe_enabled() -> bool {
    false
}

/// `upstream.keepalive.probe.path`. Default `"/"`.
pub fn probe_path() -> String {
    "/".to_owned()
}

/// `upstream.keepalive.probe.interval`. Default 30s: below nginx's 75s and
/// most load balancers' 60s.
pub const fn probe_interval() -> Duration {
    Duration::from_secs(30)
}

/// `upstream.keepalive.probe.timeout`. Default 2s.
pub const fn probe_timeout() -> Duration {
    Duration::from_secs(2)
}

/// `upstream.keepalive.probe.expect`. Default `["2xx", "3xx", "4xx"]`: a 404
/// still proves the connection works.
pub fn probe_expect() -> Vec<String> {
    ["2xx", "3xx", "4xx"].map(String::from).to_vec()
}

// [admin]

/// `admin.enabled`. Default true: an operator should be able to see what
/// tether is doing without a restart.
pub const fn admin_enabled() -> bool {
    true
}

/// `admin.listen`. Default `"127.0.0.1:9901"`: loopback only, since `/config`
/// shows the whole configuration.
pub const fn admin_listen() -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9901)
}

// [runtime]

/// `runtime.worker_threads`. Default 0: one worker per core.
pub const fn worker_threads() -> usize {
    0
}

/// `runtime.drain_timeout`. Default 30s: Kubernetes' default termination grace
/// period.
pub const fn drain_timeout() -> Duration {
    Duration::from_secs(30)
}

/// `runtime.ready_timeout`. Default 10s: a healthy backend answers in
/// milliseconds, and a backend that is down must not keep the app beside
/// tether from starting (requests then dial on demand).
pub const fn ready_timeout() -> Duration {
    Duration::from_secs(10)
}

/// `runtime.watch_config`. Default on: a Kubernetes ConfigMap edit reaches
/// the mounted file by itself, and nobody is there to send SIGHUP.
pub const fn watch_config() -> bool {
    true
}

/// `runtime.watch_interval`. Default 1s: one `stat` a second costs nothing,
/// and an edit is live before the operator looks again.
pub const fn watch_interval() -> Duration {
    Duration::from_secs(1)
}

/// `runtime.heap_release_delay`. Default 10s, jemalloc's own: bursts that
/// come within seconds of each other reuse the same pages with no page
/// fault, and memory is back with the kernel seconds after traffic falls;
/// a burst of connections gives its memory back at once (`memory`).
pub const fn heap_release_delay() -> Duration {
    Duration::from_secs(10)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::config::{
        ClientClose, Config, ListenerConfig, Retire, RetirePolicy, Size, UnderscoresInHeaders,
        MINIMAL,
    };

    #[test]
    fn minimal_file_gets_documented_defaults() {
        let c = Config::from_toml(MINIMAL).unwrap();
        let l = &c.listeners[0];
        assert_eq!(l.max_connections, 10_000);
        assert_eq!(l.header_timeout, Duration::from_secs(10));
        assert_eq!(l.send_timeout, Duration::from_secs(60));
        assert_eq!(l.client_close, ClientClose::Graceful);
        assert_eq!(l.max_header_bytes, Size::kib(64));
        assert_eq!(l.underscores_in_headers, UnderscoresInHeaders::Drop);
        let u = &c.upstreams[0];
        assert_eq!(u.pool.min_idle, 2);
        assert_eq!(u.pool.retire, RetirePolicy::Uniform(Retire::Abort));
        assert_eq!(u.keepalive.tcp_count, 3);
        assert!(!u.keepalive.probe.enabled);
        assert_eq!(c.runtime.drain_timeout, Duration::from_secs(30));
        assert!(c.runtime.watch_config);
        assert_eq!(c.runtime.heap_release_delay, Duration::from_secs(10));
        assert_eq!(c.admin.listen, "127.0.0.1:9901".parse().unwrap());
        assert_eq!(l, &ListenerConfig::new("app", l.listen.clone(), "backend"));
    }
}
