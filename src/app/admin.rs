//! The admin server: `/metrics` (Prometheus text), `/healthz` (the process is
//! up), `/readyz` (503 until every pool's warm floor is open or
//! `runtime.ready_timeout` has passed, so an app started after tether finds
//! warm connections; 503 again once draining, so a load balancer or
//! Kubernetes stops sending new connections first), `/config` (the
//! effective configuration) and `/pools` (every upstream connection and what
//! the pools did, as JSON).
//!
//! It binds loopback by default and keeps serving through the drain, so
//! readiness can report it.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::gauge::ConstGauge;

use crate::config::ListenAddr;
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
    /// The effective configuration as TOML.
    pub config: String,
    /// Every worker's share of every upstream pool, for `/pools`.
    pub pools: Vec<Pool>,
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
                async move { Ok::<_, Infallible>(respond(&state, &request)) }
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

fn respond(state: &AdminState, request: &Request<Incoming>) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match request.uri().path() {
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
        "/config" => (StatusCode::OK, "application/toml", state.config.clone()),
        "/pools" => pools_json(&state.pools),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: try /metrics, /healthz, /readyz, /config or /pools\n".to_owned(),
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
/// TCP listener's, read from the kernel's table at scrape time.
#[derive(Debug)]
pub struct ListenerTimeWait {
    /// Listener name and bound TCP address.
    listeners: Vec<(String, SocketAddr)>,
}

impl ListenerTimeWait {
    /// A collector over the TCP listeners among `listeners`.
    pub fn new<'a>(listeners: impl IntoIterator<Item = &'a (String, ListenAddr)>) -> Self {
        let listeners = listeners
            .into_iter()
            .filter_map(|(name, addr)| match addr {
                ListenAddr::Tcp(addr) => Some((name.clone(), *addr)),
                ListenAddr::Unix(_) => None,
            })
            .collect();
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
        for (listener, addr) in &self.listeners {
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
