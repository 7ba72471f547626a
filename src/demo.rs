//! `tether demo`: shows on loopback, in about 20 seconds, what tether is for.
//!
//! An in-process keep-alive HTTP backend takes the same load twice from a
//! legacy-style client (a new connection per request, client closes first):
//! first directly, then through an in-process tether. The kernel's socket table
//! is read after each phase, so the TIME_WAIT figures are the kernel's, not
//! tether's opinion.

use std::collections::HashSet;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::census::{self, TcpSocket};
use crate::config::{Config, ListenAddr, ListenerConfig, UpstreamConfig};
use crate::load::{self, LoadReport, Progress};

/// Failures of the demo.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// A socket of the demo could not be set up.
    #[error("cannot set up the demo: {0}")]
    Setup(#[from] std::io::Error),
    /// tether did not start.
    #[error("tether did not start: {0}")]
    Start(#[from] crate::server::ServerError),
    /// The kernel's socket table could not be read.
    #[error(transparent)]
    Census(#[from] census::CensusError),
}

/// How the demo runs.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Length of each phase.
    pub duration: Duration,
    /// Concurrent clients.
    pub concurrency: usize,
}

/// One phase's figures.
#[derive(Debug, Clone)]
pub struct Phase {
    /// What the load client measured.
    pub load: LoadReport,
    /// Connections the backend accepted during the phase.
    pub backend_connections: u64,
    /// New TIME_WAIT sockets whose remote end is the backend (the client side).
    pub time_wait_to_backend: usize,
    /// New TIME_WAIT sockets on the backend's own port.
    pub time_wait_in_backend: usize,
    /// New TIME_WAIT sockets on tether's listening port (through tether only).
    pub time_wait_on_listener: Option<usize>,
}

/// Both phases.
#[derive(Debug, Clone)]
pub struct DemoReport {
    /// Straight at the backend.
    pub direct: Phase,
    /// Through tether.
    pub tether: Phase,
    /// tether's pool size toward the backend (`pool.max_connections`).
    pub pool_size: usize,
}

/// Runs both phases.
pub async fn run(options: &DemoOptions) -> Result<DemoReport, DemoError> {
    let (backend, accepted) = start_backend().await?;
    eprintln!("backend listening on {backend} (keep-alive HTTP/1.1, in-process)");

    let direct = phase("direct", backend, backend, None, options, &accepted).await?;

    let pool_size = options.concurrency.max(2);
    let mut config = Config::default();
    let mut listener = ListenerConfig::new(
        "demo",
        ListenAddr::Tcp(SocketAddr::from(([127, 0, 0, 1], 0))),
        "backend",
    );
    // The app opens a connection per request; tether ends each exchange so the
    // app's own ports never sit in TIME_WAIT.
    listener.max_requests_per_connection = 1;
    config.listeners.push(listener);
    let mut upstream = UpstreamConfig::new("backend", vec![backend.to_string()]);
    upstream.pool.max_connections = pool_size;
    upstream.pool.max_idle = pool_size;
    config.upstreams.push(upstream);
    config.admin.enabled = false;
    let running = crate::server::start(config).await?;
    let Some(listen) = running.tcp_addr("demo") else {
        return Err(DemoError::Setup(std::io::Error::other(
            "listener has no TCP address",
        )));
    };
    eprintln!("tether listening on {listen}, pooling to the backend");
    // Let the warm connections open before measuring.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let through = phase("tether", listen, backend, Some(listen), options, &accepted).await?;
    running.drain().await;
    Ok(DemoReport {
        direct,
        tether: through,
        pool_size,
    })
}

async fn phase(
    name: &str,
    target: SocketAddr,
    backend: SocketAddr,
    listener: Option<SocketAddr>,
    options: &DemoOptions,
    accepted: &AtomicU64,
) -> Result<Phase, DemoError> {
    let before: HashSet<(SocketAddr, SocketAddr)> = census::time_wait()?
        .into_iter()
        .map(|s| (s.local, s.remote))
        .collect();
    let accepted_before = accepted.load(Ordering::Relaxed);
    let progress = Arc::new(Progress::default());
    let load = tokio::spawn(load::run(
        target,
        options.concurrency,
        options.duration,
        progress.clone(),
    ));
    let ticker = {
        let progress = progress.clone();
        let name = name.to_owned();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                eprint!(
                    "\r  {name:<7} {:>9} requests {:>7} errors",
                    progress.ok.load(Ordering::Relaxed),
                    progress.errors.load(Ordering::Relaxed)
                );
            }
        })
    };
    let report = load
        .await
        .map_err(|e| DemoError::Setup(std::io::Error::other(e.to_string())))?;
    ticker.abort();
    eprintln!(
        "\r  {name:<7} {:>9} requests {:>7} errors  done",
        report.requests, report.errors
    );
    // The last closes need a moment to reach their final state.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let fresh: Vec<TcpSocket> = census::time_wait()?
        .into_iter()
        .filter(|s| !before.contains(&(s.local, s.remote)))
        .collect();
    Ok(Phase {
        backend_connections: accepted.load(Ordering::Relaxed) - accepted_before,
        time_wait_to_backend: fresh.iter().filter(|s| s.remote == backend).count(),
        time_wait_in_backend: fresh.iter().filter(|s| s.local == backend).count(),
        time_wait_on_listener: listener.map(|l| fresh.iter().filter(|s| s.local == l).count()),
        load: report,
    })
}

/// A keep-alive HTTP/1.1 backend that counts the connections it accepts.
async fn start_backend() -> Result<(SocketAddr, Arc<AtomicU64>), DemoError> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let accepted = Arc::new(AtomicU64::new(0));
    let counter = accepted.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            counter.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|_request| async {
                    Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from_static(
                        b"hello from the backend\n",
                    ))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok((addr, accepted))
}

impl DemoReport {
    /// The side-by-side table.
    pub fn table(&self) -> String {
        let d = &self.direct;
        let t = &self.tether;
        let row = |label: &str, a: String, b: String| format!("{label:<34} {a:>14} {b:>14}\n");
        let mut out = String::new();
        out.push_str(&row("", "direct".into(), "through tether".into()));
        out.push_str(&row(
            "requests",
            d.load.requests.to_string(),
            t.load.requests.to_string(),
        ));
        out.push_str(&row(
            "errors",
            d.load.errors.to_string(),
            t.load.errors.to_string(),
        ));
        out.push_str(&row(
            "requests/s",
            format!("{:.0}", d.load.rps),
            format!("{:.0}", t.load.rps),
        ));
        out.push_str(&row(
            "p50 latency (ms)",
            format!("{:.2}", d.load.p50_ms),
            format!("{:.2}", t.load.p50_ms),
        ));
        out.push_str(&row(
            "p99 latency (ms)",
            format!("{:.2}", d.load.p99_ms),
            format!("{:.2}", t.load.p99_ms),
        ));
        out.push_str(&row(
            "connections the backend accepted",
            d.backend_connections.to_string(),
            t.backend_connections.to_string(),
        ));
        out.push_str(&row(
            "TIME_WAIT toward the backend",
            d.time_wait_to_backend.to_string(),
            t.time_wait_to_backend.to_string(),
        ));
        out.push_str(&row(
            "TIME_WAIT in the backend",
            d.time_wait_in_backend.to_string(),
            t.time_wait_in_backend.to_string(),
        ));
        out.push_str(&row(
            "TIME_WAIT on tether's listener",
            "-".into(),
            t.time_wait_on_listener.unwrap_or(0).to_string(),
        ));
        out.push('\n');
        out.push_str(&format!(
            "Through tether the backend saw at most {} pooled connections (pool size {}), and no\n\
             TIME_WAIT piled up toward it. The app's own ports stay free too: tether ends each\n\
             exchange, so the TIME_WAIT of each short connection lands on tether's listening\n\
             port, where it takes no ephemeral port (client_close = \"abort\" avoids even that).\n",
            t.backend_connections, self.pool_size
        ));
        if let Some(error) = &d.load.first_error {
            out.push_str(&format!("First error going direct: {error}\n"));
        }
        if let Some(error) = &t.load.first_error {
            out.push_str(&format!("First error through tether: {error}\n"));
        }
        out
    }

    /// `{"direct": {…}, "tether": {…}, "pool_size": n}` for scripts.
    pub fn json(&self) -> String {
        let figures = |p: &Phase| Figures {
            requests: p.load.requests,
            errors: p.load.errors,
            rps: p.load.rps,
            p50_ms: p.load.p50_ms,
            p99_ms: p.load.p99_ms,
            backend_connections: p.backend_connections,
            time_wait_to_backend: p.time_wait_to_backend,
            time_wait_in_backend: p.time_wait_in_backend,
            time_wait_on_listener: p.time_wait_on_listener,
        };
        let report = JsonReport {
            direct: figures(&self.direct),
            tether: figures(&self.tether),
            pool_size: self.pool_size,
        };
        serde_json::to_string_pretty(&report).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
    }
}

#[derive(serde::Serialize)]
struct JsonReport {
    direct: Figures,
    tether: Figures,
    pool_size: usize,
}

#[derive(serde::Serialize)]
struct Figures {
    requests: u64,
    errors: u64,
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    backend_connections: u64,
    time_wait_to_backend: usize,
    time_wait_in_backend: usize,
    time_wait_on_listener: Option<usize>,
}
