//! `tether demo`: shows, in about 20 seconds, what tether is for.
//!
//! A keep-alive HTTP backend takes the same load twice from a legacy-style
//! client (a new connection per request, client closes first): straight at
//! the backend, then through tether. Where it can (Linux, as root), the
//! backend is on a host of its own: a network namespace behind a veth pair
//! (`hosts`), so the direct phase meets the failure tether exists for, the
//! app's host running out of ephemeral ports because each closed connection
//! holds its port in TIME_WAIT for 60 s. Elsewhere everything runs on
//! loopback, which shows the TIME_WAIT but not the exhaustion: Linux reuses a
//! loopback TIME_WAIT port after one second. The kernel's socket table is read
//! after each phase, so the TIME_WAIT figures are the kernel's, not tether's
//! opinion.

mod hosts;

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

use super::load::{self, LoadReport, Progress};
use crate::census::{self, TcpSocket};
use crate::config::{Config, ListenAddr, ListenerConfig, UpstreamConfig};
use hosts::Hosts;
pub use hosts::HostsError;

/// Failures of the demo.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// A socket of the demo could not be set up.
    #[error("cannot set up the demo: {0}")]
    Setup(#[from] std::io::Error),
    /// tether did not start.
    #[error("tether did not start: {0}")]
    Start(#[from] crate::app::AppError),
    /// tether could not open its pool toward the backend.
    #[error("tether could not open its {0} pooled connections to the backend")]
    Cold(usize),
    /// The kernel's socket table could not be read.
    #[error(transparent)]
    Census(#[from] census::CensusError),
    /// The backend's host went away mid-demo.
    #[error(transparent)]
    Hosts(#[from] HostsError),
}

/// How the demo runs.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Length of each phase.
    pub duration: Duration,
    /// Concurrent clients.
    pub concurrency: usize,
    /// Narrow the app host's ephemeral port range to this many ports (remote
    /// mode only); `None` keeps the kernel's default.
    pub ports: Option<u16>,
    /// Run on loopback even where a remote backend host could be made.
    pub loopback: bool,
}

/// Where the backend ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DemoMode {
    /// On a host of its own (a network namespace behind a veth pair).
    Namespaces,
    /// On loopback, beside the client.
    Loopback,
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
    /// Where the backend ran.
    pub mode: DemoMode,
    /// In loopback mode, why (no privileges, `--loopback`).
    pub loopback_reason: Option<String>,
    /// The backend's address.
    pub backend: SocketAddr,
    /// Ephemeral ports of the app's host (remote mode), after `ports`.
    pub ephemeral_ports: Option<u32>,
    /// Straight at the backend.
    pub direct: Phase,
    /// Through tether.
    pub tether: Phase,
    /// tether's pool size toward the backend (`pool.max_connections`).
    pub pool_size: usize,
    /// Connections the backend accepted from tether, warm-up included.
    pub pooled_connections: u64,
}

/// What loopback mode cannot show, in one line.
pub const LOOPBACK_LIMITS: &str = "on loopback Linux reuses a TIME_WAIT port after one second, so going direct slows down but never runs out of ports as it does toward another host";

/// Runs both phases: toward a backend on a host of its own where the kernel
/// allows it, else on loopback. Blocks; call it outside any async runtime.
pub fn run(options: &DemoOptions) -> Result<DemoReport, DemoError> {
    let reason = if options.loopback {
        "--loopback was given".to_owned()
    } else {
        match Hosts::create(options.ports) {
            Ok(hosts) => return run_on_hosts(&hosts, options),
            Err(e) => e.to_string(),
        }
    };
    eprintln!("loopback mode ({reason}): {LOOPBACK_LIMITS}");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let options = options.clone();
    let mut report = runtime.block_on(async move {
        let (backend, accepted) = start_backend(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
        eprintln!("backend listening on {backend} (keep-alive HTTP/1.1, in-process)");
        phases(backend, accepted, None, &options).await
    })?;
    report.loopback_reason = Some(reason);
    Ok(report)
}

fn run_on_hosts(hosts: &Hosts, options: &DemoOptions) -> Result<DemoReport, DemoError> {
    let backend_host = hosts.backend();
    let ports = hosts.ephemeral_ports();
    eprintln!(
        "two hosts: the app and tether in one network namespace, the backend in another, \
         joined by a veth pair; the app's host has {ports} ephemeral ports"
    );
    let options = options.clone();
    let mut report = hosts.block_on_app(async move {
        let bind = Hosts::backend_addr(80);
        let started = backend_host.spawn(start_backend(bind)).await;
        let (backend, accepted) =
            started.map_err(|e| HostsError::Enter(std::io::Error::other(e.to_string())))??;
        eprintln!("backend listening on {backend} (keep-alive HTTP/1.1, its own host)");
        phases(backend, accepted, Some(backend_host), &options).await
    })??;
    report.mode = DemoMode::Namespaces;
    report.ephemeral_ports = Some(ports);
    Ok(report)
}

/// tether first (a sidecar is already running when the app starts), warmed
/// to its whole pool; then the direct phase, then the same load through
/// tether. `backend_host` runs tasks on the backend's host when it has one.
async fn phases(
    backend: SocketAddr,
    accepted: Arc<AtomicU64>,
    backend_host: Option<tokio::runtime::Handle>,
    options: &DemoOptions,
) -> Result<DemoReport, DemoError> {
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
    // The whole pool opens before the direct phase: once that phase has used
    // up the app host's ports, no new connection toward the backend can open.
    upstream.pool.min_idle = pool_size;
    config.upstreams.push(upstream);
    config.admin.enabled = false;
    let before_tether = accepted.load(Ordering::Relaxed);
    let running = crate::app::start(config).await?;
    let Some(listen) = running.tcp_addr("demo") else {
        return Err(DemoError::Setup(std::io::Error::other(
            "listener has no TCP address",
        )));
    };
    running.ready().await;
    if !running.pools("backend").all(|p| p.is_warm()) {
        running.drain().await;
        return Err(DemoError::Cold(pool_size));
    }
    // The kernel has the pooled connections; let the backend's accept loop
    // count them too, so none is counted in the direct phase.
    for _ in 0..100 {
        if accepted.load(Ordering::Relaxed) - before_tether >= pool_size as u64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let warmed = accepted.load(Ordering::Relaxed) - before_tether;
    eprintln!("tether listening on {listen}, {pool_size} pooled connections open to the backend");
    let hosts = TimeWaitCensus { backend_host };
    let direct = phase("direct", backend, backend, None, options, &accepted, &hosts).await?;
    let through = phase(
        "tether",
        listen,
        backend,
        Some(listen),
        options,
        &accepted,
        &hosts,
    )
    .await?;
    running.drain().await;
    Ok(DemoReport {
        mode: DemoMode::Loopback,
        loopback_reason: None,
        backend,
        ephemeral_ports: None,
        pooled_connections: warmed + through.backend_connections,
        direct,
        tether: through,
        pool_size,
    })
}

/// Reads TIME_WAIT on the app's host (the current thread's) and on the
/// backend's (its runtime's threads, when it has a host of its own).
struct TimeWaitCensus {
    backend_host: Option<tokio::runtime::Handle>,
}

type Pairs = HashSet<(SocketAddr, SocketAddr)>;

impl TimeWaitCensus {
    async fn take(&self) -> Result<(Vec<TcpSocket>, Vec<TcpSocket>), DemoError> {
        let app = census::time_wait()?;
        let backend = match &self.backend_host {
            None => app.clone(),
            Some(host) => host
                .spawn(async { census::time_wait() })
                .await
                .map_err(|e| HostsError::Enter(std::io::Error::other(e.to_string())))??,
        };
        Ok((app, backend))
    }
}

fn pairs(sockets: &[TcpSocket]) -> Pairs {
    sockets.iter().map(|s| (s.local, s.remote)).collect()
}

async fn phase(
    name: &str,
    target: SocketAddr,
    backend: SocketAddr,
    listener: Option<SocketAddr>,
    options: &DemoOptions,
    accepted: &AtomicU64,
    hosts: &TimeWaitCensus,
) -> Result<Phase, DemoError> {
    let (app_before, backend_before) = hosts.take().await?;
    let (app_before, backend_before) = (pairs(&app_before), pairs(&backend_before));
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
    let (app_after, backend_after) = hosts.take().await?;
    let fresh = |after: Vec<TcpSocket>, before: &Pairs| -> Vec<TcpSocket> {
        after
            .into_iter()
            .filter(|s| !before.contains(&(s.local, s.remote)))
            .collect()
    };
    let app = fresh(app_after, &app_before);
    let in_backend = fresh(backend_after, &backend_before);
    Ok(Phase {
        backend_connections: accepted.load(Ordering::Relaxed) - accepted_before,
        time_wait_to_backend: app.iter().filter(|s| s.remote == backend).count(),
        time_wait_in_backend: in_backend.iter().filter(|s| s.local == backend).count(),
        time_wait_on_listener: listener.map(|l| app.iter().filter(|s| s.local == l).count()),
        load: report,
    })
}

/// A keep-alive HTTP/1.1 backend that counts the connections it accepts.
async fn start_backend(bind: SocketAddr) -> Result<(SocketAddr, Arc<AtomicU64>), DemoError> {
    let listener = TcpListener::bind(bind).await?;
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

/// Connects that failed because the app's host had no ephemeral port left.
fn out_of_ports(phase: &Phase) -> u64 {
    let errors = &phase.load.errors_by_kind;
    errors.get("EADDRNOTAVAIL").copied().unwrap_or(0)
}

/// How one row's figure is written for a phase.
type Figure = fn(&Phase) -> String;

/// The table's rows: a label, and how each phase's figure is written.
const ROWS: [(&str, Figure); 10] = [
    ("requests", |p| p.load.requests.to_string()),
    ("errors", |p| p.load.errors.to_string()),
    ("  out of ports (EADDRNOTAVAIL)", |p| {
        out_of_ports(p).to_string()
    }),
    ("requests/s", |p| format!("{:.0}", p.load.rps)),
    ("p50 latency (ms)", |p| format!("{:.2}", p.load.p50_ms)),
    ("p99 latency (ms)", |p| format!("{:.2}", p.load.p99_ms)),
    ("connections the backend accepted", |p| {
        p.backend_connections.to_string()
    }),
    ("TIME_WAIT toward the backend", |p| {
        p.time_wait_to_backend.to_string()
    }),
    ("TIME_WAIT in the backend", |p| {
        p.time_wait_in_backend.to_string()
    }),
    // Only the phase through tether has a listener.
    ("TIME_WAIT on tether's listener", |p| {
        p.time_wait_on_listener
            .map_or_else(|| "-".to_owned(), |n| n.to_string())
    }),
];

impl DemoReport {
    /// The side-by-side table and what it shows.
    pub fn table(&self) -> String {
        let row = |label: &str, a: &str, b: &str| format!("{label:<34} {a:>14} {b:>14}\n");
        let mut out = row("", "direct", "through tether");
        for (label, figure) in ROWS {
            out.push_str(&row(label, &figure(&self.direct), &figure(&self.tether)));
        }
        out.push('\n');
        match self.mode {
            DemoMode::Namespaces => self.explain_two_hosts(&mut out),
            DemoMode::Loopback => self.explain_loopback(&mut out),
        }
        for (phase, going) in [
            (&self.direct, "going direct"),
            (&self.tether, "through tether"),
        ] {
            if let Some(error) = &phase.load.first_error {
                out.push_str(&format!("First error {going}: {error}\n"));
            }
        }
        out
    }

    /// What the figures mean with the backend on a host of its own: going
    /// direct ran out of ephemeral ports (or would have), tether did not.
    fn explain_two_hosts(&self, out: &mut String) {
        let (d, t) = (&self.direct, &self.tether);
        let ports = self.ephemeral_ports.unwrap_or(0);
        match (out_of_ports(d), d.load.first_error_after_s) {
            (0, _) => out.push_str(&format!(
                "Going direct, the app left {} sockets in TIME_WAIT toward the backend \
                 ({}), each holding one of its {ports} ephemeral ports for 60 s; a longer \
                 run (--duration) uses them all up.\n",
                d.time_wait_to_backend, self.backend
            )),
            (failed, after) => out.push_str(&format!(
                "Going direct, the app ran out of its {ports} ephemeral ports after {:.1} s: \
                 each connection it closed holds its port in TIME_WAIT toward the backend \
                 ({}) for 60 s, and {failed} connects then failed with EADDRNOTAVAIL.\n",
                after.unwrap_or(0.0),
                self.backend
            )),
        }
        out.push_str(&format!(
            "Through tether, on the same host and after those ports were gone, {} of {} \
             requests succeeded over {} pooled connections (pool size {}) and no TIME_WAIT \
             piled up toward the backend. The app's connections to tether end on tether's \
             listening port, where a TIME_WAIT costs no ephemeral port.\n",
            t.load.requests,
            t.load.requests + t.load.errors,
            self.pooled_connections,
            self.pool_size
        ));
    }

    /// What the figures mean on loopback, and what loopback cannot show.
    fn explain_loopback(&self, out: &mut String) {
        out.push_str(&format!(
            "Through tether the backend saw {} pooled connections (pool size {}), and no\n\
             TIME_WAIT piled up toward it. The app's own ports stay free too: tether ends each\n\
             exchange, so the TIME_WAIT of each short connection lands on tether's listening\n\
             port, where it takes no ephemeral port (client_close = \"abort\" avoids even that).\n",
            self.pooled_connections, self.pool_size
        ));
        out.push_str(&format!(
            "Loopback mode ({}): {LOOPBACK_LIMITS}. Run as root on Linux to put the backend \
             on a host of its own.\n",
            self.loopback_reason.as_deref().unwrap_or("no remote host")
        ));
    }

    /// `{"mode": …, "direct": {…}, "tether": {…}, "pool_size": n, …}` for scripts.
    pub fn json(&self) -> String {
        let figures = |p: &Phase| Figures {
            requests: p.load.requests,
            errors: p.load.errors,
            errors_by_kind: p.load.errors_by_kind.clone(),
            first_error_after_s: p.load.first_error_after_s,
            rps: p.load.rps,
            p50_ms: p.load.p50_ms,
            p99_ms: p.load.p99_ms,
            backend_connections: p.backend_connections,
            time_wait_to_backend: p.time_wait_to_backend,
            time_wait_in_backend: p.time_wait_in_backend,
            time_wait_on_listener: p.time_wait_on_listener,
        };
        let report = JsonReport {
            mode: self.mode,
            loopback_reason: self.loopback_reason.clone(),
            loopback_limits: (self.mode == DemoMode::Loopback).then_some(LOOPBACK_LIMITS),
            backend: self.backend,
            ephemeral_ports: self.ephemeral_ports,
            direct: figures(&self.direct),
            tether: figures(&self.tether),
            pool_size: self.pool_size,
            pooled_connections: self.pooled_connections,
        };
        serde_json::to_string_pretty(&report).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
    }
}

#[derive(serde::Serialize)]
struct JsonReport {
    mode: DemoMode,
    loopback_reason: Option<String>,
    loopback_limits: Option<&'static str>,
    backend: SocketAddr,
    ephemeral_ports: Option<u32>,
    direct: Figures,
    tether: Figures,
    pool_size: usize,
    pooled_connections: u64,
}

#[derive(serde::Serialize)]
struct Figures {
    requests: u64,
    errors: u64,
    errors_by_kind: std::collections::BTreeMap<String, u64>,
    first_error_after_s: Option<f64>,
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    backend_connections: u64,
    time_wait_to_backend: usize,
    time_wait_in_backend: usize,
    time_wait_on_listener: Option<usize>,
}
