//! Keep-alive probes: a request of tether's own on an idle connection, so a
//! backend that drops idle connections silently is found out before a client's
//! request meets the dead connection.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::body::UpstreamBody;
use super::endpoint::Endpoint;
use super::h1::Conn;
use crate::config::RetireReason;

/// Largest probe response body read (and discarded).
const PROBE_BODY_LIMIT: usize = 64 * 1024;

/// Probes an idle connection; puts it back if the backend answers as
/// expected, discards it otherwise (as `pool.retire.error` says: RST unless
/// `graceful`).
pub(super) async fn probe(endpoint: Arc<Endpoint>, mut conn: Conn) {
    let upstream = endpoint.settings.load_full();
    let settings = &upstream.keepalive.probe;
    endpoint.stats.probes.fetch_add(1, Ordering::Relaxed);
    let host = upstream
        .endpoints
        .first()
        .cloned()
        .unwrap_or_else(|| endpoint.addr.to_string());
    // On a connection retiring peer-first, `Conn::send` makes this request say
    // `Connection: close`: the backend closes it after answering.
    let request = http::Request::builder()
        .method(settings.method.as_method())
        .uri(settings.path.as_str())
        .header(http::header::HOST, host)
        .header(http::header::USER_AGENT, "tether-probe")
        .body(UpstreamBody::from_bytes(None));
    let outcome = match request {
        Ok(request) => {
            tokio::time::timeout(settings.timeout, conn.probe(request, PROBE_BODY_LIMIT))
                .await
                .map_err(|_| "timed out".to_owned())
                .and_then(|r| r.map_err(|e| e.to_string()))
        }
        Err(e) => Err(e.to_string()),
    };
    match outcome {
        Ok(status) if settings.accepts(status) && conn.is_open() => {
            if let Some(timeout) = conn.announced_idle() {
                endpoint.note_announced_idle(timeout);
            }
            tracing::trace!(upstream = %endpoint.addr, status, "probe answered");
            endpoint.put_idle(conn);
        }
        other => {
            endpoint
                .stats
                .probe_failures
                .fetch_add(1, Ordering::Relaxed);
            tracing::info!(upstream = %endpoint.addr, outcome = ?other, "probe failed; discarding the connection");
            conn.close(RetireReason::Error, &endpoint.settings().pool.retire);
        }
    }
}
