//! The admin server: `/metrics` (Prometheus text), `/healthz` (the process is
//! up), `/readyz` (503 until every pool's warm floor is open or
//! `runtime.ready_timeout` has passed, so an app started after tether finds
//! warm connections; 503 again once draining, so a load balancer or
//! Kubernetes stops sending new connections first), `/config` (the
//! effective configuration now) and `/pools` (every upstream connection and
//! what the pools did, as JSON); `POST /reload` reloads the configuration
//! file (200 with what changed, 400 with every problem and its key path, the
//! running configuration untouched), and `/logging` shows the log filter or,
//! with `POST /logging?level=…`, changes it until the next reload that
//! changes `log.level`.
//!
//! It binds loopback by default and keeps serving through the drain, so
//! readiness can report it.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::gauge::ConstGauge;

use arc_swap::ArcSwap;

use super::reload::{ListenerAddrs, Live, Outcome};
use crate::metrics::Metrics;
use crate::pool::Pool;

/// Failures to start the admin server.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The admin address could not be bound.
    #[error("cannot listen on {addr} for the admin server: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// What the admin endpoints show.
pub struct AdminState {
    /// Every metric.
    pub metrics: Arc<Metrics>,
    /// Cancelled once the pools are warm (or `ready_timeout` passed):
    /// `/readyz` turns 200.
    pub ready: CancellationToken,
    /// Cancelled when draining starts: `/readyz` turns 503.
    pub draining: CancellationToken,
    /// The running configuration, pools and reload.
    pub(crate) live: Arc<Live>,
}

/// Binds the admin address.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, AdminError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| AdminError::Bind { addr, source })
}

/// Starts serving on `socket`; the address it serves on.
pub fn start(
    socket: TcpListener,
    state: Arc<AdminState>,
    stop: CancellationToken,
) -> Option<SocketAddr> {
    let addr = socket.local_addr().ok();
    tracing::info!(admin = ?addr, "admin server listening");
    tokio::spawn(serve(socket, state, stop));
    addr
}

/// Serves admin requests until `stop` is cancelled.
pub async fn serve(listener: TcpListener, state: Arc<AdminState>, stop: CancellationToken) {
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    tracing::debug!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.cancelled() => return,
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(respond(&state, &request).await) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(error = %e, "admin connection failed");
            }
        });
    }
}

async fn respond(state: &AdminState, request: &Request<Incoming>) -> Response<Full<Bytes>> {
    let post = request.method() == Method::POST;
    let (status, content_type, body) = match request.uri().path() {
        "/reload" if post => reload(state).await,
        "/reload" => (
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "POST /reload reloads the configuration file\n".to_owned(),
        ),
        "/logging" => logging(request.uri().query(), post),
        "/metrics" => (
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            state.metrics.render(),
        ),
        "/healthz" => (StatusCode::OK, "text/plain", "ok\n".to_owned()),
        "/readyz" if state.draining.is_cancelled() => (
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "draining\n".to_owned(),
        ),
        "/readyz" if !state.ready.is_cancelled() => (
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "warming\n".to_owned(),
        ),
        "/readyz" => (StatusCode::OK, "text/plain", "ready\n".to_owned()),
        "/config" => (
            StatusCode::OK,
            "application/toml",
            state.live.config().to_toml(),
        ),
        "/pools" => pools_json(&state.live.pools.all()),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: try /metrics, /healthz, /readyz, /config, /pools, /logging or POST /reload\n".to_owned(),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    response
}

/// `POST /reload`: reloads the file; the report as JSON, 200 when it was
/// applied (or nothing changed), 400 when the file has problems, 500 when
/// it could not be applied.
async fn reload(state: &AdminState) -> (StatusCode, &'static str, String) {
    // A task of its own: a client that hangs up must not cancel a reload
    // half-way (hyper drops the service future when the connection goes).
    let live = state.live.clone();
    let report = match tokio::spawn(async move { live.reload_announced().await }).await {
        Ok(report) => report,
        Err(e) => {
            return (
                StatusCode::INTERNAL_SERVER_ERROR,
                "text/plain",
                format!("the reload failed: {e}\n"),
            )
        }
    };
    let status = match report.result {
        Outcome::Applied | Outcome::Unchanged => StatusCode::OK,
        Outcome::Invalid => StatusCode::BAD_REQUEST,
        Outcome::Failed => StatusCode::INTERNAL_SERVER_ERROR,
    };
    match serde_json::to_string_pretty(&report) {
        Ok(json) => (status, "application/json", json + "\n"),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain",
            format!("cannot render the report: {e}\n"),
        ),
    }
}

/// `/logging`: the log filter; `POST /logging?level=<filter>` changes it.
fn logging(query: Option<&str>, post: bool) -> (StatusCode, &'static str, String) {
    let asked = query
        .unwrap_or_default()
        .split('&')
        .find_map(|pair| pair.strip_prefix("level="));
    match (post, asked) {
        (true, Some(level)) => {
            let level = level
                .replace("%2C", ",")
                .replace("%3D", "=")
                .replace("%3A", ":");
            match crate::telemetry::set_filter(&level) {
                Ok(()) => (StatusCode::OK, "text/plain", format!("level: {level}\n")),
                Err(e) => (StatusCode::BAD_REQUEST, "text/plain", format!("{e}\n")),
            }
        }
        (true, None) => (
            StatusCode::BAD_REQUEST,
            "text/plain",
            "POST /logging?level=<level or filter>, e.g. level=debug\n".to_owned(),
        ),
        (false, _) => (
            StatusCode::OK,
            "text/plain",
            format!(
                "level: {}\n",
                crate::telemetry::filter().unwrap_or_else(|| "(not set by tether)".into())
            ),
        ),
    }
}

/// `/pools`: the pools' state as JSON.
fn pools_json(pools: &[Pool]) -> (StatusCode, &'static str, String) {
    match serde_json::to_string_pretty(&crate::pool::view(pools)) {
        Ok(mut json) => {
            json.push('\n');
            (StatusCode::OK, "application/json", json)
        }
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain",
            format!("cannot render the pools: {e}\n"),
        ),
    }
}

/// `tether_time_wait_on_listener`: TIME_WAIT sockets whose local port is a
/// TCP listener's, read from the kernel's table at scrape time, for the
/// listeners as the last reload left them.
pub struct ListenerTimeWait {
    listeners: Arc<ArcSwap<ListenerAddrs>>,
}

impl std::fmt::Debug for ListenerTimeWait {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ListenerTimeWait")
    }
}

impl ListenerTimeWait {
    /// A collector over the TCP listeners `listeners` holds.
    pub(crate) fn new(listeners: Arc<ArcSwap<ListenerAddrs>>) -> Self {
        Self { listeners }
    }
}

impl Collector for ListenerTimeWait {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let census = crate::census::time_wait().unwrap_or_default();
        let mut family = encoder.encode_descriptor(
            "time_wait_on_listener",
            "TIME_WAIT sockets whose local port is the listener's (kernel table)",
            None,
            ConstGauge::new(0i64).metric_type(),
        )?;
        for (listener, addr) in self.listeners.load().iter() {
            let crate::config::ListenAddr::Tcp(addr) = addr else {
                continue;
            };
            let count = census
                .iter()
                .filter(|s| s.local.port() == addr.port())
                .count();
            let labels = [("listener", listener.as_str())];
            ConstGauge::new(i64::try_from(count).unwrap_or(i64::MAX))
                .encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}
