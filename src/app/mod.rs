//! The app: a running tether's workers, listeners, pools and admin server.
//! [`run`] is `tether run` (workers, signals, readiness notification);
//! [`start`] and [`start_on`] build the app from a [`Config`] and hand back a
//! [`Running`] that drains it.
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
mod signals;
mod workers;

pub use signals::ignore_hangup;

use crate::config::{Config, ListenAddr, UpstreamConfig};
use crate::drain::Shutdown;
use crate::http::{Binding, BindingMetrics};
use crate::metrics::{Metrics, Name};
use crate::pool::metrics::PoolCollector;
use crate::pool::Pool;
use admin::{AdminError, AdminState};
use listeners::ListenerError;

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
    listeners: Vec<(String, ListenAddr)>,
    admin_addr: Option<std::net::SocketAddr>,
    admin_stop: CancellationToken,
    metrics: Arc<Metrics>,
    pools: Vec<Pool>,
    shutdown: Shutdown,
    tracker: TaskTracker,
    drain_timeout: Duration,
    ready: CancellationToken,
    logs: logs::Logs,
}

/// What a drain did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Drained {
    /// Whether connections were still open at `drain_timeout` and were reset.
    pub forced: bool,
}

/// Runs tether as `tether run` does, until SIGTERM or SIGINT, then drains:
/// raises the open-file limit, starts the workers (the calling thread is the
/// first, and also runs the admin server and the signal handlers), tells a
/// service manager when tether is ready and when it stops.
pub fn run(config: Config) -> Result<Drained, AppError> {
    open_file_limit(&config);
    let workers = workers::Workers::start(workers::count(config.runtime.worker_threads))
        .map_err(AppError::Runtime)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(AppError::Runtime);
    let result = runtime.and_then(|runtime| {
        let result = runtime.block_on(serve_until_signal(config, &workers));
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
    workers: &workers::Workers,
) -> Result<Drained, AppError> {
    // Before anything binds (see `signals`).
    let mut signals = signals::Signals::watch().map_err(AppError::Signals)?;
    // A stop asked for while starting (DNS can take `connect_timeout` per
    // upstream) is honoured at once: nothing was served, nothing to drain.
    let running = tokio::select! {
        started = start_on(config, workers.handles()) => started?,
        () = signals.stop_requested() => {
            tracing::info!("stopped before tether finished starting");
            return Ok(Drained { forced: false });
        }
    };
    // Connection tasks and accept loops: a burst's end shows as a fall.
    let tracker = running.tracker.clone();
    tokio::spawn(crate::memory::give_back_after_bursts(move || tracker.len()));
    let stopped_while_warming = tokio::select! {
        () = running.ready() => {
            crate::notify::ready("serving");
            false
        }
        () = signals.stop_requested() => true,
    };
    if !stopped_while_warming {
        signals.stop_requested().await;
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
/// current runtime.
pub async fn start(config: Config) -> Result<Running, AppError> {
    start_on(config, &[]).await
}

/// As [`start`], with `workers` as further single-threaded event loops: each
/// gets its own SO_REUSEPORT socket per TCP listener, its own accept loop and
/// its own share of every upstream pool, so a request is served on one thread
/// from accept to response (nginx's shape, without a work-stealing scheduler's
/// cross-thread wake-ups). Unix listeners are served by the current runtime.
pub async fn start_on(
    config: Config,
    workers: &[tokio::runtime::Handle],
) -> Result<Running, AppError> {
    let pools = start_pools(&config, workers).await;
    let all_pools: Vec<Pool> = pools.iter().flatten().cloned().collect();
    let metrics = Arc::new(Metrics::new());
    // Bind everything first so a bad address leaves nothing half-started.
    let bound = async {
        let logs = logs::Logs::start(&config.log, &metrics)?;
        logs.observe(&all_pools, &metrics);
        let admin = match config.admin.enabled {
            true => Some(admin::bind(config.admin.listen).await?),
            false => None,
        };
        let access = logs.access.as_ref();
        let bound = bind_listeners(&config, &pools, &metrics, workers, access)?;
        Ok::<_, AppError>((admin, bound, logs))
    };
    let (admin_socket, bound, logs) = match bound.await {
        Ok(bound) => bound,
        Err(e) => {
            all_pools.iter().for_each(Pool::close);
            return Err(e);
        }
    };
    let shutdown = Shutdown::default();
    let tracker = TaskTracker::new();
    let listeners = start_accepting(bound, &shutdown, &tracker, workers.len() + 1);
    metrics.register_collector(PoolCollector::new(all_pools.clone()));
    metrics.register_collector(admin::ListenerTimeWait::new(&listeners));
    let ready = watch_readiness(&all_pools, &config, &shutdown);
    let admin_stop = CancellationToken::new();
    let admin_addr = admin_socket.and_then(|socket| {
        let state = Arc::new(AdminState {
            metrics: metrics.clone(),
            ready: ready.clone(),
            draining: shutdown.drain.clone(),
            config: config.to_toml(),
            pools: all_pools.clone(),
        });
        admin::start(socket, state, admin_stop.clone())
    });
    Ok(Running {
        listeners,
        admin_addr,
        admin_stop,
        metrics,
        pools: all_pools,
        shutdown,
        tracker,
        drain_timeout: config.runtime.drain_timeout,
        ready,
        logs,
    })
}

/// Starts every worker's share of every upstream pool: `pools[w]` holds
/// worker `w`'s (worker 0 is the current runtime).
async fn start_pools(config: &Config, workers: &[tokio::runtime::Handle]) -> Vec<Vec<Pool>> {
    let shares = workers.len() + 1;
    let mut pools: Vec<Vec<Pool>> = Vec::with_capacity(shares);
    for w in 0..shares {
        let mut mine = Vec::new();
        for upstream in &config.upstreams {
            let settings = share_of(upstream, w, shares);
            let pool = match w {
                0 => Pool::start(settings).await,
                _ => match workers[w - 1].spawn(Pool::start(settings)).await {
                    Ok(pool) => pool,
                    // The worker's runtime is gone: its share lives here instead.
                    Err(e) => {
                        tracing::warn!(upstream = %upstream.name, worker = w, error = %e, "cannot start a pool share on its worker");
                        Pool::start(share_of(upstream, w, shares)).await
                    }
                },
            };
            mine.push(pool);
        }
        pools.push(mine);
    }
    pools
}

/// A listener socket bound for one worker, with what its accept loop serves.
struct BoundListener {
    socket: listeners::ListenSocket,
    binding: Arc<Binding>,
    /// The listener's `max_connections`, shared by its workers.
    limit: Arc<listeners::Limit>,
    /// The worker's runtime; `None` for the current one.
    runtime: Option<tokio::runtime::Handle>,
}

/// Binds every listener: one SO_REUSEPORT socket per worker for TCP, one
/// socket served by the current runtime for unix.
fn bind_listeners(
    config: &Config,
    pools: &[Vec<Pool>],
    metrics: &Arc<Metrics>,
    workers: &[tokio::runtime::Handle],
    access_log: Option<&crate::accesslog::AccessLog>,
) -> Result<Vec<BoundListener>, AppError> {
    let mut bound = Vec::new();
    for l in &config.listeners {
        let fallback_host = config
            .upstream(&l.upstream)
            .and_then(|u| u.endpoints.first().cloned())
            .unwrap_or_default();
        let label = Name::from(l.name.as_str());
        let limit = Arc::new(listeners::Limit::new(l));
        let shared = !workers.is_empty() && matches!(l.listen, ListenAddr::Tcp(_));
        let mut addr = l.listen.clone();
        for (w, worker_pools) in pools.iter().enumerate() {
            if w > 0 && !shared {
                break;
            }
            let pool = worker_pools
                .iter()
                .find(|p| p.name() == l.upstream)
                .cloned()
                .ok_or_else(|| AppError::UnknownUpstream {
                    listener: l.name.clone(),
                    upstream: l.upstream.clone(),
                })?;
            let socket = listeners::bind(&addr, shared)?;
            // Port 0: the other workers bind the port the first one got.
            addr = socket.local_addr();
            let binding = Arc::new(Binding {
                counters: BindingMetrics::new(metrics, &label),
                label: label.clone(),
                listener: l.clone(),
                pool,
                fallback_host: fallback_host.clone(),
                metrics: metrics.clone(),
                access_log: access_log.cloned(),
            });
            let runtime = w.checked_sub(1).map(|i| workers[i].clone());
            bound.push(BoundListener {
                socket,
                binding,
                limit: limit.clone(),
                runtime,
            });
        }
    }
    Ok(bound)
}

/// Starts every bound socket's accept loop on its worker; the listeners'
/// names and addresses.
fn start_accepting(
    bound: Vec<BoundListener>,
    shutdown: &Shutdown,
    tracker: &TaskTracker,
    shares: usize,
) -> Vec<(String, ListenAddr)> {
    let mut listeners = Vec::new();
    for BoundListener {
        socket,
        binding,
        limit,
        runtime,
    } in bound
    {
        let addr = socket.local_addr();
        let accepting = listeners::accept_loop(
            socket,
            binding.clone(),
            limit,
            shutdown.clone(),
            tracker.clone(),
        );
        match runtime {
            Some(handle) => {
                tracker.spawn_on(accepting, &handle);
            }
            None => {
                tracing::info!(listener = %binding.listener.name, listen = %addr, upstream = %binding.listener.upstream, workers = shares, "listening");
                listeners.push((binding.listener.name.clone(), addr));
                tracker.spawn(accepting);
            }
        }
    }
    listeners
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

/// Worker `index`'s share of an upstream's pool bounds among `shares` workers:
/// `max_connections`, `max_idle` and `min_idle` are split as evenly as they go
/// (never below one connection a worker may open, so every worker can serve).
fn share_of(upstream: &UpstreamConfig, index: usize, shares: usize) -> UpstreamConfig {
    let split = |total: usize| total / shares + usize::from(index < total % shares);
    let mut mine = upstream.clone();
    let pool = &mut mine.pool;
    pool.max_connections = split(pool.max_connections).max(1);
    pool.max_idle = split(pool.max_idle).min(pool.max_connections);
    pool.min_idle = split(pool.min_idle).min(pool.max_idle);
    mine
}

impl Running {
    /// The bound address of the listener called `name`.
    pub fn listen_addr(&self, name: &str) -> Option<&ListenAddr> {
        self.listeners
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, addr)| addr)
    }

    /// The bound TCP address of the listener called `name`.
    pub fn tcp_addr(&self, name: &str) -> Option<std::net::SocketAddr> {
        match self.listen_addr(name)? {
            ListenAddr::Tcp(addr) => Some(*addr),
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
        &self.metrics
    }

    /// The pool of the upstream called `name` (the first worker's share, when
    /// there are several workers).
    pub fn pool(&self, name: &str) -> Option<&Pool> {
        self.pools.iter().find(|p| p.name() == name)
    }

    /// Every worker's share of the pool of the upstream called `name`.
    pub fn pools<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Pool> + 'a {
        self.pools.iter().filter(move |p| p.name() == name)
    }

    /// Stops accepting, lets in-flight exchanges finish (their responses carry
    /// `Connection: close`), resets whatever is left at `drain_timeout`, and
    /// retires the pools.
    pub async fn drain(self) -> Drained {
        tracing::info!(timeout = ?self.drain_timeout, "draining");
        self.shutdown.drain.cancel();
        self.tracker.close();
        let forced = tokio::time::timeout(self.drain_timeout, self.tracker.wait())
            .await
            .is_err();
        if forced {
            tracing::warn!("drain timeout reached; resetting remaining connections");
            self.shutdown.force.cancel();
            self.tracker.wait().await;
        }
        for pool in &self.pools {
            pool.close();
        }
        // The drain's own lines (the pools' connections retired just now)
        // before the process exits; a sink that takes none delays it by this.
        self.logs.settle(Duration::from_secs(1)).await;
        self.admin_stop.cancel();
        tracing::info!(forced, "drained");
        Drained { forced }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_bounds_are_split_among_workers_with_at_least_one_connection_each() {
        let mut upstream = UpstreamConfig::new("backend", vec!["127.0.0.1:1".into()]);
        upstream.pool.max_connections = 5;
        upstream.pool.max_idle = 5;
        upstream.pool.min_idle = 3;
        let shares: Vec<_> = (0..2).map(|w| share_of(&upstream, w, 2).pool).collect();
        assert_eq!(
            shares.iter().map(|p| p.max_connections).collect::<Vec<_>>(),
            [3, 2]
        );
        assert_eq!(
            shares.iter().map(|p| p.min_idle).collect::<Vec<_>>(),
            [2, 1]
        );

        upstream.pool.max_connections = 1;
        upstream.pool.max_idle = 1;
        upstream.pool.min_idle = 1;
        for w in 0..4 {
            let share = share_of(&upstream, w, 4).pool;
            assert_eq!(share.max_connections, 1, "every worker may open one");
            assert!(share.min_idle <= share.max_idle && share.max_idle <= share.max_connections);
        }
    }
}
