//! Reloading the configuration of a running tether, by difference.
//!
//! A new configuration is loaded and validated before anything changes (an
//! invalid one changes nothing and is answered with every problem and its key
//! path), then applied in an order that never leaves a request without
//! somewhere to go:
//!
//! 1. new listener sockets are bound (a bind failure changes nothing);
//! 2. pools for new upstreams, and for upstreams whose connections cannot be
//!    reused under the new settings (the protocol changed), are started and
//!    warmed to `min_idle`, for at most `runtime.ready_timeout`;
//! 3. every other changed upstream is reconfigured in place: settings that
//!    touch no socket are swapped, added endpoints warm before they join,
//!    removed ones drain (`pool::Pool::reconfigure`);
//! 4. the registry takes the new pools and every listener's binding is
//!    swapped, so new requests go to them; new and re-bound listeners start
//!    accepting, then removed and re-bound ones stop;
//! 5. pools nothing uses any more close: their leases finish, their idle
//!    connections retire by `pool.retire.drain`.
//!
//! Keys a running process cannot change (`runtime.worker_threads`,
//! `[admin]`,
//! `log.format`, `[log.access]`, `[log.connections]`) keep their running
//! values and are reported as needing a restart.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use serde::Serialize;

use super::listeners::ListenSocket;
use super::serving::{self, Context, ListenerRun};
use crate::config::{Config, ConfigError, UpstreamConfig};
use crate::metrics::Metrics;
use crate::pool::{OpenedBy, Pool, Registry, Shares};

/// How a reload ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The new configuration is running.
    Applied,
    /// The new configuration is the running one: nothing to do.
    Unchanged,
    /// The file has problems; nothing changed.
    Invalid,
    /// A listener could not be bound (or the file not read); nothing changed.
    Failed,
}

impl Outcome {
    /// The `result` label of `tether_config_reloads_total`.
    pub fn label(self) -> &'static str {
        match self {
            Self::Applied => "applied",
            Self::Unchanged => "unchanged",
            Self::Invalid => "invalid",
            Self::Failed => "failed",
        }
    }
}

/// One configuration problem, as `POST /reload` lists it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct KeyProblem {
    /// The key path: `listener[0].idle_timeout`.
    pub key: String,
    /// What is wrong with it.
    pub message: String,
}

/// What a reload did, as `POST /reload` answers and the log says.
#[derive(Debug, Clone, Serialize)]
pub struct ReloadReport {
    /// How it ended.
    pub result: Outcome,
    /// The configuration generation running after it (1 at start).
    pub generation: u64,
    /// What changed, one line each.
    pub changes: Vec<String>,
    /// Keys that changed but take effect only after a restart.
    pub restart_required: Vec<String>,
    /// Every problem of an invalid file.
    pub problems: Vec<KeyProblem>,
    /// Why a reload failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

/// The reload's metrics.
struct ReloadMetrics {
    generation: Gauge,
    reloads: Family<ResultLabel, Counter>,
    problems: Counter,
}

impl ReloadMetrics {
    fn register(metrics: &Metrics) -> Self {
        let this = Self {
            generation: Gauge::default(),
            reloads: Family::default(),
            problems: Counter::default(),
        };
        metrics.register(
            "config_generation",
            "Configuration generation running: 1 at start, one more for each reload applied",
            this.generation.clone(),
        );
        metrics.register(
            "config_reloads",
            "Configuration reloads, by result (applied, unchanged, invalid, failed)",
            this.reloads.clone(),
        );
        metrics.register(
            "config_problems",
            "Problems found in configurations offered for reload",
            this.problems.clone(),
        );
        this.generation.set(1);
        this
    }
}

/// What is running and may be reloaded: the configuration, the listeners,
/// and the registry of pools the workers, the admin server and the metrics
/// share.
pub(crate) struct Live {
    /// One reload at a time, and what the last one left running.
    applied: tokio::sync::Mutex<Applied>,
    /// The configuration running now, for readers that must not wait on a
    /// reload (`/config`, the drain, the file watch).
    current: ArcSwap<Config>,
    pub(crate) pools: Registry,
    /// Every listener's bound address, as the last reload left them.
    addrs: Arc<ArcSwap<ListenerAddrs>>,
    generation: AtomicU64,
    pub(crate) context: Context,
    metrics: ReloadMetrics,
    /// The file a reload reads, when tether was started from one.
    source: Option<PathBuf>,
}

/// What the last configuration applied left running.
pub(crate) struct Applied {
    pub config: Config,
    /// By listener name, in configuration order.
    pub listeners: Vec<(String, ListenerRun)>,
}

/// Listener names and where they listen.
pub(crate) type ListenerAddrs = Vec<(String, crate::config::ListenAddr)>;

impl Applied {
    fn addrs(&self) -> ListenerAddrs {
        self.listeners
            .iter()
            .map(|(name, run)| (name.clone(), run.addr.clone()))
            .collect()
    }
}

impl Live {
    /// The running state of `config` as start-up left it.
    pub(crate) fn new(
        applied: Applied,
        pools: Registry,
        context: Context,
        source: Option<PathBuf>,
    ) -> Self {
        let metrics = ReloadMetrics::register(&context.metrics);
        Self {
            addrs: Arc::new(ArcSwap::from_pointee(applied.addrs())),
            current: ArcSwap::from_pointee(applied.config.clone()),
            applied: tokio::sync::Mutex::new(applied),
            pools,
            generation: AtomicU64::new(1),
            context,
            metrics,
            source,
        }
    }

    /// Waits for a reload in progress and keeps others out while held.
    pub(crate) async fn hold_reloads(&self) -> tokio::sync::MutexGuard<'_, Applied> {
        self.applied.lock().await
    }

    /// The configuration running now.
    pub(crate) fn config(&self) -> Arc<Config> {
        self.current.load_full()
    }

    /// The configuration generation running now.
    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Relaxed)
    }

    /// The file a reload reads, if any.
    pub(crate) fn source(&self) -> Option<&std::path::Path> {
        self.source.as_deref()
    }

    /// The bound address of every listener, by name.
    pub(crate) fn listener_addrs(&self) -> Arc<ListenerAddrs> {
        self.addrs.load_full()
    }

    /// The handle the listeners' TIME_WAIT collector reads.
    pub(crate) fn listener_addrs_handle(&self) -> Arc<ArcSwap<ListenerAddrs>> {
        self.addrs.clone()
    }

    /// Reloads from the file tether was started from: read and validated on
    /// a blocking thread, away from the workers.
    pub(crate) async fn reload_from_source(&self) -> ReloadReport {
        let Some(path) = self.source.clone() else {
            return self.finish(Outcome::Failed, |r| {
                r.error = Some("tether was not started from a file".into())
            });
        };
        let loaded =
            tokio::task::spawn_blocking(move || Config::load(&path, std::env::vars())).await;
        match loaded {
            Ok(Ok(config)) => self.reload(config).await,
            Ok(Err(e)) => self.rejected(e),
            Err(e) => self.finish(Outcome::Failed, |r| r.error = Some(e.to_string())),
        }
    }

    /// Reloads from the file, telling a service manager it is reloading
    /// and when it serves again (SIGHUP, `POST /reload`, the file watch).
    pub(crate) async fn reload_announced(&self) -> ReloadReport {
        crate::notify::reloading();
        let report = self.reload_from_source().await;
        crate::notify::ready(&format!(
            "serving configuration generation {}",
            report.generation
        ));
        report
    }

    /// Answers a file that did not load or validate: nothing changes.
    pub(crate) fn rejected(&self, error: ConfigError) -> ReloadReport {
        let problems = match error {
            ConfigError::Invalid(problems) => problems
                .into_iter()
                .map(|p| KeyProblem {
                    key: p.key,
                    message: p.message,
                })
                .collect(),
            ConfigError::Load { path, message } => vec![KeyProblem {
                key: String::new(),
                message: format!("cannot load {path}: {message}"),
            }],
        };
        for problem in &problems {
            tracing::error!(key = %problem.key, problem = %problem.message, "reload refused: configuration problem");
        }
        self.metrics.problems.inc_by(problems.len() as u64);
        self.finish(Outcome::Invalid, |r| r.problems = problems)
    }

    /// Applies `config` by difference (see the module documentation).
    pub(crate) async fn reload(&self, config: Config) -> ReloadReport {
        if let Err(e) = config.validate() {
            return self.rejected(e);
        }
        config
            .upstreams
            .iter()
            .for_each(crate::pool::warn_unverified);
        let mut applied = self.applied.lock().await;
        if self.context.shutdown.drain.is_cancelled() {
            return self.finish(Outcome::Failed, |r| {
                r.error = Some("tether is draining".into())
            });
        }
        let (config, restart_required) = keep_restart_keys(&applied.config, config);
        for key in &restart_required {
            tracing::warn!(key = %key, "changed in the file, but applied only at a restart");
        }
        if config == applied.config {
            return self.finish(Outcome::Unchanged, |r| {
                r.restart_required = restart_required
            });
        }
        let changes = match self.apply(&mut applied, config).await {
            Ok(changes) => changes,
            Err(error) => {
                tracing::error!(%error, "reload failed; the running configuration is unchanged");
                return self.finish(Outcome::Failed, |r| r.error = Some(error));
            }
        };
        self.current.store(Arc::new(applied.config.clone()));
        self.addrs.store(Arc::new(applied.addrs()));
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        self.metrics
            .generation
            .set(i64::try_from(generation).unwrap_or(i64::MAX));
        tracing::info!(generation, changes = ?changes, "configuration reloaded");
        self.finish(Outcome::Applied, |r| {
            r.changes = changes;
            r.restart_required = restart_required;
        })
    }

    fn finish(&self, result: Outcome, fill: impl FnOnce(&mut ReloadReport)) -> ReloadReport {
        self.metrics
            .reloads
            .get_or_create(&ResultLabel {
                result: result.label(),
            })
            .inc();
        let mut report = ReloadReport {
            result,
            generation: self.generation(),
            changes: Vec::new(),
            restart_required: Vec::new(),
            problems: Vec::new(),
            error: None,
        };
        fill(&mut report);
        report
    }

    /// Steps 1 to 5; an `Err` (step 1 only) leaves everything as it was.
    async fn apply(&self, applied: &mut Applied, next: Config) -> Result<Vec<String>, String> {
        let plan = Plan::new(&applied.config, &next);
        let mut sockets = self.bind(&plan, &next)?;
        let mut changes = plan.describe();
        let started = self.start_pools(&plan, &next).await;
        self.reconfigure_pools(&plan, &next, &mut changes).await;
        let mut retiring: Vec<Shares> = Vec::new();
        for (name, shares) in started {
            retiring.extend(self.pools.insert(&name, shares));
        }
        let listeners = std::mem::take(&mut applied.listeners);
        let mut stopping = Vec::new();
        for listener in &next.listeners {
            let name = &listener.name;
            let existing = listeners.iter().position(|(n, _)| n == name);
            let run = match sockets.remove(name) {
                Some(bound) => {
                    stopping.extend(existing.map(|i| listeners[i].1.stop.clone()));
                    serving::serve(listener, bound, &next, &self.pools, &self.context)
                }
                None => self.keep_listener(&listeners, existing, listener, &next),
            };
            match run {
                Ok(run) => applied.listeners.push((name.clone(), run)),
                // Validation guarantees the upstream exists: this is a bug.
                Err(e) => {
                    tracing::error!(listener = %name, error = %e, "cannot serve the listener")
                }
            }
        }
        for (name, run) in &listeners {
            if next.listeners.iter().all(|l| &l.name != name) {
                stopping.push(run.stop.clone());
            }
        }
        stopping
            .iter()
            .for_each(tokio_util::sync::CancellationToken::cancel);
        for name in &plan.upstreams_removed {
            retiring.extend(self.pools.remove(name));
        }
        for pool in retiring.iter().flat_map(|shares| shares.iter()) {
            pool.close();
        }
        if applied.config.runtime.heap_release_delay != next.runtime.heap_release_delay {
            crate::memory::release_delay(next.runtime.heap_release_delay);
        }
        if applied.config.log.level != next.log.level {
            if let Err(e) = crate::telemetry::set_filter(&next.log.level) {
                tracing::warn!(error = %e, "cannot change the log level");
            }
        }
        applied.config = next;
        Ok(changes)
    }

    /// The running listener at `existing`, given its new settings.
    fn keep_listener(
        &self,
        listeners: &[(String, ListenerRun)],
        existing: Option<usize>,
        listener: &crate::config::ListenerConfig,
        next: &Config,
    ) -> Result<ListenerRun, super::AppError> {
        let Some(i) = existing else {
            return Err(super::AppError::UnknownUpstream {
                listener: listener.name.clone(),
                upstream: listener.upstream.clone(),
            });
        };
        let mut run = listeners[i].1.clone();
        run.update(listener, next, &self.pools, &self.context)?;
        Ok(run)
    }

    /// Step 1: every socket the new configuration needs, or why not.
    fn bind(
        &self,
        plan: &Plan,
        next: &Config,
    ) -> Result<std::collections::HashMap<String, Vec<ListenSocket>>, String> {
        let mut sockets = std::collections::HashMap::new();
        for listener in next.listeners.iter() {
            if plan.listeners_to_bind.contains(&listener.name) {
                let bound = serving::bind_sockets(listener, self.context.shares())
                    .map_err(|e| format!("listener {:?}: {e}", listener.name))?;
                sockets.insert(listener.name.clone(), bound);
            }
        }
        Ok(sockets)
    }

    /// Step 2: pools for new upstreams and for those a new pool replaces,
    /// warmed (for at most `runtime.ready_timeout`) before they are used.
    async fn start_pools(&self, plan: &Plan, next: &Config) -> Vec<(String, Shares)> {
        let mut started = Vec::new();
        for upstream in next.upstreams.iter() {
            if plan.upstreams_to_start.contains(&upstream.name) {
                let shares = serving::start_shares(upstream, &self.context, OpenedBy::Reload).await;
                started.push((upstream.name.clone(), shares));
            }
        }
        let all: Vec<Pool> = started
            .iter()
            .flat_map(|(_, s)| s.iter().cloned())
            .collect();
        if !Pool::warm_within(&all, next.runtime.ready_timeout).await {
            tracing::warn!(ready_timeout = ?next.runtime.ready_timeout, "new pools not warm within ready_timeout; requests move to them anyway");
        }
        started
    }

    /// Step 3: every other changed upstream, each share on its own worker.
    async fn reconfigure_pools(&self, plan: &Plan, next: &Config, changes: &mut Vec<String>) {
        let shares_count = self.context.shares();
        let warm_within = next.runtime.ready_timeout;
        for upstream in next.upstreams.iter() {
            if !plan.upstreams_changed.contains(&upstream.name) {
                continue;
            }
            let Some(shares) = self.pools.get(&upstream.name) else {
                continue;
            };
            let all_warm = Arc::new(tokio::sync::Barrier::new(shares.len()));
            let mut waiting = Vec::new();
            for (w, pool) in shares.iter().enumerate() {
                let settings = serving::share_of(upstream, w, shares_count);
                let (pool, all_warm) = (pool.clone(), all_warm.clone());
                let task = async move { pool.reconfigure(settings, warm_within, all_warm).await };
                // Spawned, so the shares run at once and meet at the barrier.
                let worker = w.checked_sub(1).and_then(|i| self.context.workers.get(i));
                waiting.push(match worker {
                    Some(worker) => worker.spawn(task),
                    None => tokio::spawn(task),
                });
            }
            let (mut added, mut removed) = (0, 0);
            for done in waiting {
                match done.await {
                    Ok(done) => {
                        added += done.added;
                        removed += done.removed;
                    }
                    Err(e) => {
                        tracing::warn!(upstream = %upstream.name, error = %e, "a pool share could not be reconfigured")
                    }
                }
            }
            if added + removed > 0 {
                changes.push(format!(
                    "upstream {:?}: endpoints changed ({added} added, {removed} removed, per worker share)",
                    upstream.name
                ));
            }
        }
    }
}

/// Keys a running process cannot change: the running values are kept in
/// `next`, and the keys that differed are returned.
fn keep_restart_keys(running: &Config, mut next: Config) -> (Config, Vec<String>) {
    let mut keys = Vec::new();
    if next.runtime.worker_threads != running.runtime.worker_threads {
        keys.push("runtime.worker_threads".to_owned());
        next.runtime.worker_threads = running.runtime.worker_threads;
    }
    if next.admin != running.admin {
        keys.push("admin".to_owned());
        next.admin = running.admin.clone();
    }
    if next.log.format != running.log.format {
        keys.push("log.format".to_owned());
        next.log.format = running.log.format;
    }
    // Each log's writer and file are opened once, at start.
    if next.log.access != running.log.access {
        keys.push("log.access".to_owned());
        next.log.access = running.log.access.clone();
    }
    if next.log.connections != running.log.connections {
        keys.push("log.connections".to_owned());
        next.log.connections = running.log.connections.clone();
    }
    (next, keys)
}

/// What a reload changes, by name.
#[derive(Debug, Default, PartialEq, Eq)]
struct Plan {
    /// Listeners that are new or listen somewhere else now.
    listeners_to_bind: Vec<String>,
    /// Listeners whose settings (not their address) changed.
    listeners_changed: Vec<String>,
    listeners_removed: Vec<String>,
    /// Upstreams that are new or whose connections cannot be reused.
    upstreams_to_start: Vec<String>,
    /// Upstreams reconfigured in place.
    upstreams_changed: Vec<String>,
    upstreams_removed: Vec<String>,
}

impl Plan {
    fn new(running: &Config, next: &Config) -> Self {
        let mut plan = Self::default();
        for listener in &next.listeners {
            match running.listeners.iter().find(|l| l.name == listener.name) {
                Some(old) if old.listen != listener.listen => {
                    plan.listeners_to_bind.push(listener.name.clone())
                }
                Some(old) if old != listener => plan.listeners_changed.push(listener.name.clone()),
                Some(_) => {}
                None => plan.listeners_to_bind.push(listener.name.clone()),
            }
        }
        plan.listeners_removed = removed(running.listeners.iter().map(|l| &l.name), |n| {
            next.listeners.iter().any(|l| &l.name == n)
        });
        for upstream in &next.upstreams {
            match running.upstream(&upstream.name) {
                Some(old) if needs_new_pool(old, upstream) => {
                    plan.upstreams_to_start.push(upstream.name.clone())
                }
                Some(old) if old != upstream => plan.upstreams_changed.push(upstream.name.clone()),
                Some(_) => {}
                None => plan.upstreams_to_start.push(upstream.name.clone()),
            }
        }
        plan.upstreams_removed = removed(running.upstreams.iter().map(|u| &u.name), |n| {
            next.upstream(n).is_some()
        });
        plan
    }

    /// One line per change, for the log and `POST /reload`.
    fn describe(&self) -> Vec<String> {
        let mut lines = Vec::new();
        let groups = [
            ("listener bound", &self.listeners_to_bind),
            ("listener updated in place", &self.listeners_changed),
            ("listener removed", &self.listeners_removed),
            ("upstream started as a new pool", &self.upstreams_to_start),
            ("upstream updated in place", &self.upstreams_changed),
            ("upstream removed", &self.upstreams_removed),
        ];
        for (what, names) in groups {
            lines.extend(names.iter().map(|name| format!("{what}: {name:?}")));
        }
        lines
    }
}

/// Whether connections made under `old` cannot serve `new`: the protocol
/// spoken on them changed, or their TLS (identity, trust, name) did.
fn needs_new_pool(old: &UpstreamConfig, new: &UpstreamConfig) -> bool {
    old.protocol != new.protocol || old.tls != new.tls
}

fn removed<'a>(
    names: impl Iterator<Item = &'a String>,
    kept: impl Fn(&String) -> bool,
) -> Vec<String> {
    names.filter(|n| !kept(n)).cloned().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Protocol;

    fn config() -> Config {
        Config::from_toml(
            r#"
            [[listener]]
            name = "app"
            listen = "127.0.0.1:8080"
            upstream = "a"
            [[listener]]
            name = "other"
            listen = "127.0.0.1:8081"
            upstream = "b"
            [[upstream]]
            name = "a"
            endpoints = ["127.0.0.1:9000"]
            [[upstream]]
            name = "b"
            endpoints = ["127.0.0.1:9001"]
            "#,
        )
        .unwrap()
    }

    #[test]
    fn a_change_of_tls_needs_a_new_pool() {
        let plain = UpstreamConfig::new("a", vec!["127.0.0.1:9000".to_owned()]);
        let mut tls = plain.clone();
        tls.tls = Some(crate::config::TlsConfig::default());
        assert!(needs_new_pool(&plain, &tls));
        let mut other_name = tls.clone();
        if let Some(t) = other_name.tls.as_mut() {
            t.server_name = Some("backend.example".to_owned());
        }
        assert!(needs_new_pool(&tls, &other_name));
        let mut bigger = tls.clone();
        bigger.pool.max_connections += 1;
        assert!(!needs_new_pool(&tls, &bigger));
    }

    #[test]
    fn a_plan_names_each_change_by_kind() {
        let running = config();
        let mut next = config();
        next.listeners[0].idle_timeout *= 2;
        next.listeners[1].listen = "127.0.0.1:8082".parse().unwrap();
        next.upstreams[0].endpoints = vec!["127.0.0.1:9002".into()];
        next.upstreams[1].protocol = Protocol::Http2;
        let plan = Plan::new(&running, &next);
        assert_eq!(plan.listeners_changed, ["app"]);
        assert_eq!(plan.listeners_to_bind, ["other"]);
        assert_eq!(plan.upstreams_changed, ["a"]);
        assert_eq!(plan.upstreams_to_start, ["b"]);

        next.listeners.truncate(1);
        next.upstreams.truncate(1);
        let plan = Plan::new(&running, &next);
        assert_eq!(plan.listeners_removed, ["other"]);
        assert_eq!(plan.upstreams_removed, ["b"]);
        assert_eq!(Plan::new(&running, &running), Plan::default());
    }

    #[test]
    fn keys_that_need_a_restart_keep_their_running_values() {
        let running = config();
        let mut next = config();
        next.runtime.worker_threads = running.runtime.worker_threads + 3;
        next.admin.listen = "127.0.0.1:1".parse().unwrap();
        next.runtime.heap_release_delay *= 3;
        next.runtime.drain_timeout *= 2;
        let (kept, keys) = keep_restart_keys(&running, next.clone());
        assert_eq!(keys, ["runtime.worker_threads", "admin"]);
        assert_eq!(kept.runtime.worker_threads, running.runtime.worker_threads);
        assert_eq!(
            kept.runtime.heap_release_delay,
            next.runtime.heap_release_delay
        );
        assert_eq!(kept.admin, running.admin);
        assert_eq!(kept.runtime.drain_timeout, next.runtime.drain_timeout);
    }
}
