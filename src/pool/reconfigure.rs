//! A reload's change to a running pool: the new settings are swapped in place
//! (every reader sees them at its next look, no connection is opened or
//! closed for it; what is fixed when a connection is dialled — TCP
//! keepalive, HTTP/2 pings — applies to the connections dialled from then
//! on), and a changed endpoint list is applied warm-first: the
//! endpoints it adds open their warm floor before they join the balancing
//! set, then the ones it drops leave it and drain.
//!
//! A change to what makes a connection reusable (the protocol) is not made
//! here: the app builds a new pool for it and retires this one.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Barrier;
use tokio::time::Instant;

use super::endpoint::Endpoint;
use super::maintain::resolve;
use super::view::OpenedBy;
use super::Pool;
use crate::config::UpstreamConfig;

/// How often a warm-up looks at the endpoints it waits for.
const WARM_POLL: Duration = Duration::from_millis(10);

/// What a reconfiguration did to the endpoint set.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Reconfigured {
    /// Endpoints that joined, with their warm floor open (or the wait over).
    pub added: usize,
    /// Endpoints that left and drain.
    pub removed: usize,
    /// Added endpoints still below their warm floor when the wait ended.
    pub cold: usize,
}

impl Pool {
    /// Applies `settings` (same name) to the running pool. Endpoints the new
    /// list adds are dialled to `pool.min_idle` first, for at most
    /// `warm_within`, and only then take requests; endpoints it drops leave
    /// the balancing set after that, finish their leases and retire their
    /// idle connections by `pool.retire.drain`.
    ///
    /// `shares` is met by every worker's share of the upstream once its
    /// added endpoints are warm, so that no share moves requests before all
    /// are warm.
    pub async fn reconfigure(
        &self,
        settings: UpstreamConfig,
        warm_within: Duration,
        shares: Arc<Barrier>,
    ) -> Reconfigured {
        let old = self.inner.settings.load_full();
        let endpoints_changed = old.endpoints != settings.endpoints;
        let (from, to) = (old.pool.max_connections, settings.pool.max_connections);
        let settings = Arc::new(settings);
        // Held from resolution to publication: a DNS refresh meanwhile would
        // publish the added endpoints cold.
        let _applying = self.inner.addresses.lock().await;
        self.inner.settings.store(settings.clone());
        if from != to {
            for endpoint in self.endpoints().iter() {
                endpoint.resize_slots(from, to);
            }
        }
        let mut done = Reconfigured::default();
        if endpoints_changed {
            done = self.replace_endpoints(&settings, warm_within, shares).await;
        }
        // A reload re-reads TLS files that changed (the watch would within
        // a second; a reload says now).
        if let Some(tls) = &self.inner.tls {
            tls.check_files_now();
        }
        // Sweep now: a shorter idle timeout or a smaller floor applies at once.
        self.inner.maintenance.notify_one();
        done
    }

    async fn replace_endpoints(
        &self,
        settings: &UpstreamConfig,
        warm_within: Duration,
        shares: Arc<Barrier>,
    ) -> Reconfigured {
        let deadline = Instant::now() + warm_within;
        let addrs = tokio::time::timeout_at(deadline, resolve(settings))
            .await
            .unwrap_or_default();
        if addrs.is_empty() {
            tracing::warn!(upstream = %self.inner.name, "no new endpoint resolves; keeping the current ones until DNS answers");
            let _ = tokio::time::timeout_at(deadline, shares.wait()).await;
            return Reconfigured::default();
        }
        let current = self.endpoints();
        let mut next = Vec::with_capacity(addrs.len());
        let mut added = Vec::new();
        for addr in addrs {
            match current.iter().find(|e| e.addr == addr) {
                Some(kept) => next.push(kept.clone()),
                None => {
                    let endpoint = self.new_endpoint(addr, OpenedBy::Reload);
                    added.push(endpoint.clone());
                    next.push(endpoint);
                }
            }
        }
        let cold = warm_up(&added, settings.pool.min_idle, deadline).await;
        // Bounded by the same deadline: a share that never comes (its
        // worker is gone) holds the others no longer than the warm-up may.
        let _ = tokio::time::timeout_at(deadline, shares.wait()).await;
        let removed = current
            .iter()
            .filter(|e| !next.iter().any(|n| Arc::ptr_eq(n, e)))
            .count();
        tracing::info!(upstream = %self.inner.name, added = added.len(), removed, cold, "endpoints replaced");
        self.publish(next);
        Reconfigured {
            added: added.len(),
            removed,
            cold,
        }
    }

    /// Waits, for at most `within`, until every share's endpoints have their
    /// warm floor open; whether they all do.
    pub async fn warm_within(pools: &[Pool], within: Duration) -> bool {
        let deadline = Instant::now() + within;
        loop {
            if pools.iter().all(Pool::is_warm) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(WARM_POLL).await;
        }
    }
}

/// Dials every endpoint in `endpoints` to `floor` connections; how many were
/// still below it at `deadline`.
async fn warm_up(endpoints: &[Arc<Endpoint>], floor: usize, deadline: Instant) -> usize {
    let below = || {
        endpoints
            .iter()
            .filter(|e| e.established_connections() < floor)
            .count()
    };
    loop {
        for endpoint in endpoints {
            endpoint.refill();
        }
        let cold = below();
        if cold == 0 || Instant::now() >= deadline {
            return cold;
        }
        tokio::time::sleep(WARM_POLL).await;
    }
}
