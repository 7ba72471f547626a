//! What start-up and a reload both build: an upstream's pool as one share
//! per worker, a listener's binding to its pools (its default upstream's and
//! its routes'), and a listener served by one accept loop per worker socket.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::listeners::{self, Limit, ListenSocket, ListenerError};
use super::logs::Logs;
use super::AppError;
use crate::config::{Config, ListenAddr, ListenerConfig, UpstreamConfig};
use crate::drain::Shutdown;
use crate::http::{Binding, BindingMetrics, BindingSlot, Routes, Target};
use crate::metrics::{Metrics, Name};
use crate::pool::{OpenedBy, Pool, Registry, Shares};

/// What every listener and pool is started with: the workers, where
/// outcomes are counted, the drain tokens and the task tracker the drain
/// waits on.
pub(crate) struct Context {
    /// Further single-threaded event loops (worker 0 is the current runtime).
    pub workers: Vec<tokio::runtime::Handle>,
    /// The access and connection logs, for bindings and pools.
    pub logs: Arc<Logs>,
    pub metrics: Arc<Metrics>,
    pub shutdown: Shutdown,
    pub tracker: TaskTracker,
}

impl Context {
    /// Workers in all, the current runtime included.
    pub fn shares(&self) -> usize {
        self.workers.len() + 1
    }

    /// Runs `task` on worker `w`'s runtime (worker 0: here) and waits for
    /// it: what a pool share spawns must live on its own worker. A worker
    /// that is gone runs it here instead.
    pub async fn on_worker<T: Send + 'static>(
        &self,
        w: usize,
        task: impl std::future::Future<Output = T> + Send + 'static,
    ) -> Option<T> {
        match w.checked_sub(1).and_then(|i| self.workers.get(i)) {
            None => Some(task.await),
            Some(worker) => match worker.spawn(task).await {
                Ok(done) => Some(done),
                Err(e) => {
                    tracing::warn!(worker = w, error = %e, "a task on a worker failed");
                    None
                }
            },
        }
    }
}

/// Starts every worker's share of `upstream`'s pool, its first warm floor
/// counted as opened by `cause`.
pub(crate) async fn start_shares(
    upstream: &UpstreamConfig,
    context: &Context,
    cause: OpenedBy,
) -> Shares {
    let shares = context.shares();
    let mut pools = Vec::with_capacity(shares);
    for w in 0..shares {
        let settings = share_of(upstream, w, shares);
        let started = context
            .on_worker(w, Pool::start_opened_by(settings.clone(), cause))
            .await;
        let pool = match started {
            Some(pool) => pool,
            // The worker's runtime is gone: its share lives here instead.
            None => Pool::start_opened_by(settings, cause).await,
        };
        pools.push(pool);
    }
    context.logs.observe(&pools, &context.metrics);
    Arc::new(pools)
}

/// Worker `index`'s share of an upstream's pool bounds among `shares` workers:
/// `max_connections`, `max_idle` and `min_idle` are split as evenly as they go
/// (never below one connection a worker may open, so every worker can serve).
pub(crate) fn share_of(upstream: &UpstreamConfig, index: usize, shares: usize) -> UpstreamConfig {
    let split = |total: usize| total / shares + usize::from(index < total % shares);
    let mut mine = upstream.clone();
    let pool = &mut mine.pool;
    pool.max_connections = split(pool.max_connections).max(1);
    pool.max_idle = split(pool.max_idle).min(pool.max_connections);
    pool.min_idle = split(pool.min_idle).min(pool.max_idle);
    mine
}

/// A listener being served: its accept loops, what they read, and the token
/// that stops them.
#[derive(Clone)]
pub(crate) struct ListenerRun {
    /// The settings it was last given.
    pub config: ListenerConfig,
    /// Where it listens (the port the kernel chose, for port 0).
    pub addr: ListenAddr,
    /// One per accept loop; `slots[w]` is worker `w`'s.
    pub slots: Vec<Arc<BindingSlot>>,
    /// `max_connections`, shared by its accept loops.
    pub limit: Arc<Limit>,
    /// Stops its accept loops (a child of the drain token).
    pub stop: CancellationToken,
}

/// Binds `listener`'s sockets: one SO_REUSEPORT socket per worker for TCP
/// with workers, else one served by the current runtime.
pub(crate) fn bind_sockets(
    listener: &ListenerConfig,
    shares: usize,
) -> Result<Vec<ListenSocket>, ListenerError> {
    let shared = shares > 1 && matches!(listener.listen, ListenAddr::Tcp(_));
    let count = if shared { shares } else { 1 };
    let mut addr = listener.listen.clone();
    let mut sockets = Vec::with_capacity(count);
    for _ in 0..count {
        let socket = listeners::bind(&addr, shared)?;
        // Port 0: the other workers bind the port the first one got.
        addr = socket.local_addr();
        sockets.push(socket);
    }
    Ok(sockets)
}

/// `listener` bound to worker `w`'s share of its upstreams' pools: its
/// default upstream and each route's.
pub(crate) fn binding(
    listener: &ListenerConfig,
    config: &Config,
    pools: &Registry,
    w: usize,
    context: &Context,
) -> Result<Binding, AppError> {
    let metrics = &context.metrics;
    let target = |upstream: &str| target(listener, upstream, config, pools, w);
    let default = listener.default_upstream().map(target).transpose()?;
    let mut routes = Vec::with_capacity(listener.routes.len());
    for route in &listener.routes {
        routes.push((route.host.clone(), target(&route.upstream)?));
    }
    let label = Name::from(listener.name.as_str());
    Ok(Binding {
        counters: BindingMetrics::new(metrics, &label),
        label,
        listener: listener.clone(),
        routes: Routes::new(routes, default),
        metrics: metrics.clone(),
        access_log: context.logs.access.clone(),
    })
}

/// Worker `w`'s share of `upstream`'s pool, as `listener` reaches it.
fn target(
    listener: &ListenerConfig,
    upstream: &str,
    config: &Config,
    pools: &Registry,
    w: usize,
) -> Result<Target, AppError> {
    let unknown = || AppError::UnknownUpstream {
        listener: listener.name.clone(),
        upstream: upstream.to_owned(),
    };
    let shares = pools.get(upstream).ok_or_else(unknown)?;
    let pool = shares
        .get(w)
        .or_else(|| shares.first())
        .cloned()
        .ok_or_else(unknown)?;
    Ok(Target {
        pool,
        fallback_host: config
            .upstream(upstream)
            .and_then(|u| u.endpoints.first().cloned())
            .unwrap_or_default(),
    })
}

/// Serves `listener` on its bound `sockets`: an accept loop per socket on
/// its worker, each reading its own binding slot.
pub(crate) fn serve(
    listener: &ListenerConfig,
    sockets: Vec<ListenSocket>,
    config: &Config,
    pools: &Registry,
    context: &Context,
) -> Result<ListenerRun, AppError> {
    let limit = Arc::new(Limit::new(listener));
    let stop = context.shutdown.drain.child_token();
    let mut slots = Vec::with_capacity(sockets.len());
    let mut accepting = Vec::with_capacity(sockets.len());
    for (w, socket) in sockets.into_iter().enumerate() {
        let slot = Arc::new(BindingSlot::from_pointee(binding(
            listener, config, pools, w, context,
        )?));
        slots.push(slot.clone());
        accepting.push((w, socket, slot));
    }
    let addr = accepting
        .first()
        .map(|(_, socket, _)| socket.local_addr())
        .unwrap_or_else(|| listener.listen.clone());
    // Spawned only once every binding is built: a failure leaves no loop.
    for (w, socket, slot) in accepting {
        let loop_ = listeners::accept_loop(
            socket,
            slot,
            limit.clone(),
            context.shutdown.clone(),
            context.tracker.clone(),
            stop.clone(),
        );
        match w.checked_sub(1).and_then(|i| context.workers.get(i)) {
            Some(worker) => {
                context.tracker.spawn_on(loop_, worker);
            }
            None => {
                context.tracker.spawn(loop_);
            }
        }
    }
    tracing::info!(listener = %listener.name, listen = %addr, upstream = %listener.upstream, routes = listener.routes.len(), workers = context.shares(), "listening");
    Ok(ListenerRun {
        config: listener.clone(),
        addr,
        slots,
        limit,
        stop,
    })
}

impl ListenerRun {
    /// Gives the running listener `listener`'s settings and its pool as
    /// `pools` has it now: new connections and new requests take them; its
    /// sockets stay.
    pub fn update(
        &mut self,
        listener: &ListenerConfig,
        config: &Config,
        pools: &Registry,
        context: &Context,
    ) -> Result<(), AppError> {
        let mut bindings = Vec::with_capacity(self.slots.len());
        for w in 0..self.slots.len() {
            bindings.push(binding(listener, config, pools, w, context)?);
        }
        for (slot, binding) in self.slots.iter().zip(bindings) {
            slot.store(Arc::new(binding));
        }
        self.limit.update(listener);
        self.config = listener.clone();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::UpstreamConfig;

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
