//! Owns the listeners and pools of a running tether: starts them from a
//! [`Config`] and drains them.
//!
//! [`start`] binds every socket before it returns (port 0 allowed), so tests run
//! the whole proxy in-process and read the bound addresses from [`Running`].

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::{self, AdminError, AdminState};
use crate::config::{Config, ListenAddr};
use crate::downstream::Shutdown;
use crate::http::{Route, RouteMetrics};
use crate::listener::{self, ListenerError};
use crate::metrics::{Metrics, Name};
use crate::pool::Pool;

/// Failures to start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A listener could not be bound.
    #[error(transparent)]
    Listener(#[from] ListenerError),
    /// The admin server could not be bound.
    #[error(transparent)]
    Admin(#[from] AdminError),
    /// A listener names an upstream that does not exist (validation prevents it).
    #[error("listener {listener:?} names unknown upstream {upstream:?}")]
    UnknownUpstream { listener: String, upstream: String },
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
}

/// What a drain did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Drained {
    /// Whether connections were still open at `drain_timeout` and were reset.
    pub forced: bool,
}

/// Starts pools, binds every listener, then starts accepting.
pub async fn start(config: Config) -> Result<Running, ServerError> {
    let mut pools = Vec::new();
    for upstream in &config.upstreams {
        pools.push(Pool::start(upstream.clone()).await);
    }
    let shutdown = Shutdown {
        drain: CancellationToken::new(),
        force: CancellationToken::new(),
    };
    let metrics = Arc::new(Metrics::new());
    let admin_socket = if config.admin.enabled {
        match admin::bind(config.admin.listen).await {
            Ok(socket) => Some(socket),
            Err(e) => {
                pools.iter().for_each(Pool::close);
                return Err(e.into());
            }
        }
    } else {
        None
    };
    // Bind everything first so a bad address leaves nothing half-started.
    let mut bound = Vec::new();
    for l in &config.listeners {
        let pool = pools
            .iter()
            .find(|p| p.name() == l.upstream)
            .cloned()
            .ok_or_else(|| ServerError::UnknownUpstream {
                listener: l.name.clone(),
                upstream: l.upstream.clone(),
            })?;
        let fallback_host = config
            .upstream(&l.upstream)
            .and_then(|u| u.endpoints.first().cloned())
            .unwrap_or_default();
        let socket = match listener::bind(&l.listen) {
            Ok(socket) => socket,
            Err(e) => {
                pools.iter().for_each(Pool::close);
                return Err(e.into());
            }
        };
        let label = Name::from(l.name.as_str());
        let route = Arc::new(Route {
            counters: RouteMetrics::new(&metrics, &label),
            label,
            listener: l.clone(),
            pool,
            draining: shutdown.drain.clone(),
            fallback_host,
            metrics: metrics.clone(),
        });
        bound.push((socket, route));
    }
    let tracker = TaskTracker::new();
    let mut listeners = Vec::new();
    for (socket, route) in bound {
        let addr = socket.local_addr();
        tracing::info!(listener = %route.listener.name, listen = %addr, upstream = %route.listener.upstream, "listening");
        listeners.push((route.listener.name.clone(), addr));
        tracker.spawn(listener::accept_loop(
            socket,
            route,
            shutdown.clone(),
            tracker.clone(),
        ));
    }
    metrics.watch(
        pools.clone(),
        listeners
            .iter()
            .map(|(name, addr)| {
                let tcp = match addr {
                    ListenAddr::Tcp(a) => Some(*a),
                    ListenAddr::Unix(_) => None,
                };
                (name.clone(), tcp)
            })
            .collect(),
    );
    let admin_stop = CancellationToken::new();
    let admin_addr = match admin_socket {
        Some(socket) => {
            let addr = socket.local_addr().ok();
            let state = Arc::new(AdminState {
                metrics: metrics.clone(),
                draining: shutdown.drain.clone(),
                config: config.to_toml(),
            });
            tracing::info!(admin = ?addr, "admin server listening");
            tokio::spawn(admin::serve(socket, state, admin_stop.clone()));
            addr
        }
        None => None,
    };
    Ok(Running {
        listeners,
        admin_addr,
        admin_stop,
        metrics,
        pools,
        shutdown,
        tracker,
        drain_timeout: config.runtime.drain_timeout,
    })
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

    /// Every metric.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The pool of the upstream called `name`.
    pub fn pool(&self, name: &str) -> Option<&Pool> {
        self.pools.iter().find(|p| p.name() == name)
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
        self.admin_stop.cancel();
        tracing::info!(forced, "drained");
        Drained { forced }
    }
}
