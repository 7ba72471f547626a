//! The pool's background work: keeping each endpoint's warm floor open,
//! sweeping idle connections, re-resolving DNS names, and looking at the TLS
//! files for a rotation.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::time::Instant;

use super::dial::{self, Dialled};
use super::endpoint::Endpoint;
use super::view::OpenedBy;
use super::{Pool, PoolInner};
use crate::config::UpstreamConfig;

/// How often the maintenance task looks at every endpoint even without a wake-up.
const MAINTENANCE_TICK: Duration = Duration::from_secs(1);
/// First and largest pause between refill attempts after connect failures.
const REFILL_BACKOFF_MIN: Duration = Duration::from_millis(200);
const REFILL_BACKOFF_MAX: Duration = Duration::from_secs(10);

impl Endpoint {
    /// Opens connections in the background until `min_idle` are open, one dial
    /// at a time, backing off (with jitter) after failures.
    pub(super) fn refill(self: &Arc<Self>) {
        if !self.below_floor() {
            // However it got there: later floor dials are refills.
            self.was_warm.store(true, Ordering::Relaxed);
            return;
        }
        if self.refill_backing_off() {
            return;
        }
        if self.refilling.swap(true, Ordering::AcqRel) {
            return;
        }
        let endpoint = self.clone();
        tokio::spawn(async move {
            while endpoint.below_floor() {
                let Some(slot) = endpoint.try_slot() else {
                    break;
                };
                let cause = if endpoint.was_warm.load(Ordering::Relaxed) {
                    OpenedBy::Refill
                } else {
                    endpoint.first_floor
                };
                match dial::open(&endpoint, slot, cause).await {
                    Ok(dialled) => {
                        endpoint.refill_failures.store(0, Ordering::Relaxed);
                        endpoint.record(true);
                        match dialled {
                            Dialled::Http1(conn) => endpoint.put_idle(conn),
                            Dialled::Http2(conn) => endpoint.push_h2(conn),
                        }
                    }
                    Err(e) => {
                        if !e.is_local_refusal() {
                            endpoint.record(false);
                        }
                        let failures = endpoint.refill_failures.fetch_add(1, Ordering::Relaxed) + 1;
                        let backoff = backoff(failures);
                        tracing::warn!(upstream = %endpoint.addr, error = %e, retry_in = ?backoff, "cannot open warm connection");
                        endpoint.back_off_refill(Instant::now() + backoff);
                        break;
                    }
                }
            }
            endpoint.refilling.store(false, Ordering::Release);
        });
    }

    /// Whether the endpoint is in the balancing set with fewer than
    /// `min_idle` connections open.
    fn below_floor(&self) -> bool {
        !self.removed.load(Ordering::Relaxed)
            && self.open_connections() < self.settings().pool.min_idle
    }
}

/// Jittered exponential backoff: 200ms, 400ms, … up to 10s, each ±25 %.
fn backoff(failures: u32) -> Duration {
    let exp = REFILL_BACKOFF_MIN.saturating_mul(1u32 << failures.saturating_sub(1).min(10));
    exp.min(REFILL_BACKOFF_MAX)
        .mul_f64(0.75 + fastrand::f64() * 0.5)
}

/// Resolves every configured endpoint; names that fail are logged and skipped.
pub(super) async fn resolve(settings: &UpstreamConfig) -> Vec<SocketAddr> {
    let mut addrs = Vec::new();
    for endpoint in &settings.endpoints {
        match tokio::net::lookup_host(endpoint.as_str()).await {
            Ok(found) => {
                for addr in found {
                    if !addrs.contains(&addr) {
                        addrs.push(addr);
                    }
                }
            }
            Err(e) => {
                tracing::warn!(upstream = %settings.name, endpoint = %endpoint, error = %e, "cannot resolve endpoint")
            }
        }
    }
    addrs
}

/// The pool's background task: refills the warm floor, reaps idle connections,
/// and re-resolves DNS names. Ends when the pool is closed or dropped.
pub(super) async fn maintain(pool: Weak<PoolInner>) {
    let mut next_resolve = {
        let Some(inner) = pool.upgrade() else { return };
        Instant::now() + inner.settings.load().dns_refresh
    };
    loop {
        let (maintenance, shutdown, wake) = {
            let Some(inner) = pool.upgrade() else { return };
            let handle = Pool { inner };
            let due = Instant::now() >= next_resolve || handle.endpoints().is_empty();
            // A reload changing the endpoints resolves them itself, and
            // publishes them warm: a resolution now would race it.
            let addresses = handle.inner.addresses.try_lock();
            if let (true, Ok(_applying)) = (due, addresses) {
                let settings = handle.inner.settings.load_full();
                let addrs = resolve(&settings).await;
                // Keep the old set when DNS fails entirely rather than emptying it.
                if !addrs.is_empty() {
                    handle.apply_addresses(addrs);
                }
                next_resolve = Instant::now() + settings.dns_refresh;
            }
            if let Some(tls) = &handle.inner.tls {
                tls.check_files();
            }
            let mut wake = Instant::now() + MAINTENANCE_TICK;
            for endpoint in handle.endpoints().iter() {
                if let Some(at) = endpoint.sweep() {
                    wake = wake.min(at);
                }
                endpoint.sweep_h2();
                endpoint.refill();
            }
            (
                handle.inner.maintenance.clone(),
                handle.inner.shutdown.clone(),
                wake,
            )
        };
        tokio::select! {
            _ = maintenance.notified() => {}
            _ = tokio::time::sleep_until(wake) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        assert!(backoff(1) <= Duration::from_millis(250));
        assert!(backoff(30) <= REFILL_BACKOFF_MAX.mul_f64(1.25));
        assert!(backoff(30) >= REFILL_BACKOFF_MAX.mul_f64(0.75));
    }
}
