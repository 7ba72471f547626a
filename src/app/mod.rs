//! The app: a running tether's workers, listeners, pools and admin server.
//! [`run`] is `tether run` (workers, signals, readiness notification);
//! [`start`] and [`start_on`] build the app from a [`Config`] and hand back a
//! [`Running`] that reloads and drains it. Files: `serving` (what start and
//! reload both build), `reload` (the running state and the reload by
//! difference), `watch` (the config file's watch), `listeners`, `admin`,
//! `signals`, `workers`.
//!
//! [`start`] binds every socket before it returns (port 0 allowed), so tests run
//! the whole proxy in-process and read the bound addresses from [`Running`].

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub mod admin;
pub mod listeners;
mod logs;
mod reload;
mod serving;
mod signals;
mod watch;
mod workers;

pub use signals::ignore_hangup;

use crate::config::{Config, ListenAddr};
use crate::drain::Shutdown;
use crate::metrics::Metrics;
use crate::pool::metrics::PoolCollector;
use crate::pool::{OpenedBy, Pool, Registry};
use admin::{AdminError, AdminState};
use listeners::ListenerError;
use reload::Live;
pub use reload::{KeyProblem, Outcome, ReloadReport};
use serving::Context;

/// Failures to start or run.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// A listener could not be bound.
    #[error(transparent)]
    Listener(#[from] ListenerError),
    /// The admin server could not be bound.
    #[error(transparent)]
    Admin(#[from] AdminError),
    /// A listener names an upstream that does not exist (validation prevents it).
    #[error("listener {listener:?} names unknown upstream {upstream:?}")]
    UnknownUpstream { listener: String, upstream: String },
    /// An event loop or a worker thread could not be started.
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
    /// A signal handler could not be installed.
    #[error("cannot watch signals: {0}")]
    Signals(std::io::Error),
    /// The access or connection log could not be started.
    #[error(transparent)]
    Log(#[from] crate::accesslog::LogError),
}

/// A started tether.
pub struct Running {
    live: Arc<Live>,
    admin_addr: Option<std::net::SocketAddr>,
    admin_stop: CancellationToken,
    ready: CancellationToken,
}

/// What a drain did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Drained {
    /// Whether connections were still open at `drain_timeout` and were reset.
    pub forced: bool,
}

/// Runs tether as `tether run` does, until SIGTERM or SIGINT, then drains:
/// raises the open-file limit, sets how long the allocator keeps freed heap
/// (`runtime.heap_release_delay`), starts the workers (the calling thread is the
/// first, and also runs the admin server and the signal handlers), tells a
/// service manager when tether is ready and when it stops.
///
/// `source` is the file `config` was read from: SIGHUP, `POST /reload` and,
/// with `runtime.watch_config`, a change to the file reload it.
pub fn run(config: Config, source: std::path::PathBuf) -> Result<Drained, AppError> {
    open_file_limit(&config);
    crate::memory::release_delay(config.runtime.heap_release_delay);
    crate::memory::start_background_release();
    let workers = workers::Workers::start(workers::count(config.runtime.worker_threads))
        .map_err(AppError::Runtime)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(AppError::Runtime);
    let result = runtime.and_then(|runtime| {
        let result = runtime.block_on(serve_until_signal(config, source, &workers));
        // The drain is over: tasks still parked (a DNS lookup on a blocking
        // thread, say) must not hold the exit.
        runtime.shutdown_background();
        result
    });
    workers.stop();
    result
}

async fn serve_until_signal(
    config: Config,
    source: std::path::PathBuf,
    workers: &workers::Workers,
) -> Result<Drained, AppError> {
    // Before anything binds (see `signals`).
    let mut signals = signals::Signals::watch().map_err(AppError::Signals)?;
    // A stop asked for while starting (DNS can take `connect_timeout` per
    // upstream) is honoured at once: nothing was served, nothing to drain.
    let running = tokio::select! {
        started = start_on(config, workers.handles(), Some(source)) => started?,
        () = signals.stop_requested(|| tracing::warn!("SIGHUP while starting: ignored; send it again once tether serves")) => {
            tracing::info!("stopped before tether finished starting");
            return Ok(Drained { forced: false });
        }
    };
    // Connection tasks and accept loops: a burst's end shows as a fall.
    let tracker = running.live.context.tracker.clone();
    tokio::spawn(crate::memory::give_back_after_bursts(move || tracker.len()));
    tokio::spawn(watch::watch_config(running.live.clone()));
    let live = running.live.clone();
    let on_hangup = move || {
        let live = live.clone();
        tokio::spawn(async move { live.reload_announced().await });
    };
    let stopped_while_warming = tokio::select! {
        () = running.ready() => {
            crate::notify::ready("serving");
            false
        }
        () = signals.stop_requested(on_hangup.clone()) => true,
    };
    if !stopped_while_warming {
        signals.stop_requested(on_hangup).await;
    }
    crate::notify::stopping("draining");
    Ok(running.drain().await)
}

/// Raises the soft open-file limit and says when the hard one is too low.
fn open_file_limit(config: &Config) {
    let needed = crate::rlimit::descriptors_needed(config);
    match crate::rlimit::raise_open_files() {
        Ok(limits) if limits.now < needed => tracing::warn!(
            limit = limits.now,
            needed,
            "the open-file limit is below what this configuration can use (max_connections of every listener and pool): past it, accepts and dials fail with EMFILE; raise the hard limit (LimitNOFILE, ulimit -n, the container runtime's nofile)"
        ),
        Ok(limits) if limits.now > limits.before => {
            tracing::info!(from = limits.before, to = limits.now, "open-file limit raised to the hard limit")
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot raise the open-file limit"),
    }
}

/// Starts pools, binds every listener, then starts accepting, all on the
/// current runtime. A reload can only be asked of it through
/// [`Running::reload`]: it knows no file.
pub async fn start(config: Config) -> Result<Running, AppError> {
    start_on(config, &[], None).await
}

/// As [`start`], with `workers` as further single-threaded event loops: each
/// gets its own SO_REUSEPORT socket per TCP listener, its own accept loop and
/// its own share of every upstream pool, so a request is served on one thread
/// from accept to response (nginx's shape, without a work-stealing scheduler's
/// cross-thread wake-ups). Unix listeners are served by the current runtime.
/// `source` is the file a reload reads (SIGHUP, `POST /reload`, the watch).
pub async fn start_on(
    config: Config,
    workers: &[tokio::runtime::Handle],
    source: Option<std::path::PathBuf>,
) -> Result<Running, AppError> {
    let metrics = Arc::new(Metrics::new());
    let context = Context {
        workers: workers.to_vec(),
        logs: Arc::new(logs::Logs::start(&config.log, &metrics)?),
        metrics,
        shutdown: Shutdown::default(),
        tracker: TaskTracker::new(),
    };
    let pools = Registry::new();
    for upstream in &config.upstreams {
        let shares = serving::start_shares(upstream, &context, OpenedBy::Warm).await;
        pools.insert(&upstream.name, shares);
    }
    let bound = match bind_all(&config, context.shares()).await {
        Ok(bound) => bound,
        Err(e) => {
            pools.all().iter().for_each(Pool::close);
            return Err(e);
        }
    };
    let (admin_socket, sockets) = bound;
    let mut listeners = Vec::new();
    for (listener, sockets) in config.listeners.iter().zip(sockets) {
        let run = serving::serve(listener, sockets, &config, &pools, &context)?;
        listeners.push((listener.name.clone(), run));
    }
    let metrics = context.metrics.clone();
    metrics.register_collector(PoolCollector::new(pools.clone()));
    let ready = watch_readiness(&pools.all(), &config, &context.shutdown);
    let draining = context.shutdown.drain.clone();
    let applied = reload::Applied { config, listeners };
    let live = Arc::new(Live::new(applied, pools, context, source));
    metrics.register_collector(admin::ListenerTimeWait::new(live.listener_addrs_handle()));
    let admin_stop = CancellationToken::new();
    let admin_addr = admin_socket.and_then(|socket| {
        let state = Arc::new(AdminState {
            metrics,
            ready: ready.clone(),
            draining,
            live: live.clone(),
        });
        admin::start(socket, state, admin_stop.clone())
    });
    Ok(Running {
        live,
        admin_addr,
        admin_stop,
        ready,
    })
}

/// Binds the admin address and every listener's sockets, before anything
/// is served: a bad address leaves nothing half-started.
async fn bind_all(
    config: &Config,
    shares: usize,
) -> Result<
    (
        Option<tokio::net::TcpListener>,
        Vec<Vec<listeners::ListenSocket>>,
    ),
    AppError,
> {
    let admin = match config.admin.enabled {
        true => Some(admin::bind(config.admin.listen).await?),
        false => None,
    };
    let mut sockets = Vec::with_capacity(config.listeners.len());
    for listener in &config.listeners {
        sockets.push(serving::bind_sockets(listener, shares)?);
    }
    Ok((admin, sockets))
}

/// The token `/readyz` and systemd's READY=1 wait on: cancelled once the warm
/// floors are open or `runtime.ready_timeout` passed. A drain that starts
/// while warming ends the wait: the pools close.
fn watch_readiness(pools: &[Pool], config: &Config, shutdown: &Shutdown) -> CancellationToken {
    let ready = CancellationToken::new();
    let declaring = declare_ready(pools.to_vec(), config.runtime.ready_timeout, ready.clone());
    let drain = shutdown.drain.clone();
    tokio::spawn(async move {
        tokio::select! {
            () = declaring => {}
            () = drain.cancelled() => {}
        }
    });
    ready
}

/// Cancels `ready` once every pool share has its warm floor open, or once
/// `timeout` has passed: an app started after tether (a Kubernetes native
/// sidecar's startup probe, systemd's `After=`) then finds warm connections,
/// while a backend that is down delays it by `timeout` at most.
async fn declare_ready(pools: Vec<Pool>, timeout: Duration, ready: CancellationToken) {
    // Only at start, for at most `timeout`: polling is simpler than a
    // notification threaded through every endpoint, and costs nothing later.
    const POLL: Duration = Duration::from_millis(10);
    // Validation bounds the timeout; an unvalidated one past the clock's end
    // waits for the floor alone.
    let deadline = tokio::time::Instant::now().checked_add(timeout);
    loop {
        if pools.iter().all(Pool::is_warm) {
            tracing::info!("ready: every pool's warm floor is open");
            break;
        }
        if timeout.is_zero() {
            tracing::info!("ready: ready_timeout = 0, the warm floors open in the background");
            break;
        }
        if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
            let cold: Vec<&str> = pools
                .iter()
                .filter(|p| !p.is_warm())
                .map(Pool::name)
                .collect();
            tracing::warn!(upstreams = ?cold, ready_timeout = ?timeout, "ready before every warm floor is open; requests to these upstreams dial on demand");
            break;
        }
        tokio::time::sleep(POLL).await;
    }
    ready.cancel();
}

impl Running {
    /// The bound address of the listener called `name`.
    pub fn listen_addr(&self, name: &str) -> Option<ListenAddr> {
        self.live
            .listener_addrs()
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, addr)| addr.clone())
    }

    /// The bound TCP address of the listener called `name`.
    pub fn tcp_addr(&self, name: &str) -> Option<std::net::SocketAddr> {
        match self.listen_addr(name)? {
            ListenAddr::Tcp(addr) => Some(addr),
            ListenAddr::Unix(_) => None,
        }
    }

    /// The admin server's address, when it is enabled.
    pub fn admin_addr(&self) -> Option<std::net::SocketAddr> {
        self.admin_addr
    }

    /// Waits until tether is ready: every pool's warm floor is open, or
    /// `runtime.ready_timeout` has passed (`/readyz` answers 200 from then on).
    pub async fn ready(&self) {
        self.ready.cancelled().await;
    }

    /// Whether tether is ready (see [`Running::ready`]).
    pub fn is_ready(&self) -> bool {
        self.ready.is_cancelled()
    }

    /// Every metric.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.live.context.metrics
    }

    /// The pool of the upstream called `name` (the first worker's share, when
    /// there are several workers).
    pub fn pool(&self, name: &str) -> Option<Pool> {
        self.live.pools.get(name)?.first().cloned()
    }

    /// Every worker's share of the pool of the upstream called `name`.
    pub fn pools(&self, name: &str) -> impl Iterator<Item = Pool> {
        let shares = self.live.pools.get(name);
        shares
            .into_iter()
            .flat_map(|s| s.iter().cloned().collect::<Vec<_>>())
    }

    /// Applies `config` by difference, as a reload from the file does (see
    /// `reload`): what changed and the generation now.
    pub async fn reload(&self, config: Config) -> ReloadReport {
        self.live.reload(config).await
    }

    /// The configuration generation: 1 at start, one more per reload applied.
    pub fn generation(&self) -> u64 {
        self.live.generation()
    }

    /// Stops accepting, lets in-flight exchanges finish (their responses carry
    /// `Connection: close`), resets whatever is left at `drain_timeout`, and
    /// retires the pools.
    pub async fn drain(self) -> Drained {
        let drain_timeout = self.live.config().runtime.drain_timeout;
        let context = &self.live.context;
        tracing::info!(timeout = ?drain_timeout, "draining");
        context.shutdown.drain.cancel();
        context.tracker.close();
        let forced = tokio::time::timeout(drain_timeout, context.tracker.wait())
            .await
            .is_err();
        if forced {
            tracing::warn!("drain timeout reached; resetting remaining connections");
            context.shutdown.force.cancel();
            context.tracker.wait().await;
        }
        // After a reload in progress: the pools it started are closed too.
        let _no_reload = self.live.hold_reloads().await;
        for pool in &self.live.pools.all() {
            pool.close();
        }
        // The drain's own lines (the pools' connections retired just now)
        // before the process exits; a sink that takes none delays it by this.
        context.logs.settle(Duration::from_secs(1)).await;
        self.admin_stop.cancel();
        tracing::info!(forced, "drained");
        Drained { forced }
    }
}
