//! Choosing an endpoint for a request: round robin, or least outstanding
//! requests with a rotating start so ties spread; ejected endpoints and those
//! a request already failed to connect to are passed over.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::endpoint::Endpoint;
use super::{Pool, PoolError};
use crate::config::Balance;

impl Pool {
    pub(super) fn pick(&self) -> Result<Arc<Endpoint>, PoolError> {
        self.pick_excluding(&[])
    }

    /// Picks among endpoints that are not ejected and not in `excluded`.
    pub(super) fn pick_excluding(
        &self,
        excluded: &[SocketAddr],
    ) -> Result<Arc<Endpoint>, PoolError> {
        let all = self.endpoints();
        if all.is_empty() {
            return Err(PoolError::NoEndpoints {
                upstream: self.inner.name.clone(),
            });
        }
        if let [only] = all.as_slice() {
            // Nothing to choose between (a sidecar's usual backend): no
            // list is built for it.
            if excluded.contains(&only.addr) || only.is_ejected() {
                return Err(PoolError::AllEjected {
                    upstream: self.inner.name.clone(),
                });
            }
            return Ok(only.clone());
        }
        let endpoints: Vec<Arc<Endpoint>> = all
            .iter()
            .filter(|e| !excluded.contains(&e.addr) && !e.is_ejected())
            .cloned()
            .collect();
        if endpoints.is_empty() {
            return Err(PoolError::AllEjected {
                upstream: self.inner.name.clone(),
            });
        }
        let start = self.inner.next.fetch_add(1, Ordering::Relaxed);
        let chosen = match self.inner.settings.load().balance {
            Balance::RoundRobin => &endpoints[start % endpoints.len()],
            Balance::LeastOutstanding => {
                // Rotate the starting point so ties spread instead of piling on
                // the first endpoint.
                let n = endpoints.len();
                (0..n)
                    .map(|i| &endpoints[(start + i) % n])
                    .min_by_key(|e| e.outstanding.load(Ordering::Relaxed))
                    .unwrap_or(&endpoints[0])
            }
        };
        Ok(chosen.clone())
    }
}
