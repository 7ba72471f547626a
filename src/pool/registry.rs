//! The registry of running pools, shared by the workers' listeners (which
//! take their pool from it when a binding is built), the admin server and
//! metrics (which read every pool at each request or scrape), and a reload
//! (which adds, replaces and removes pools while the others read).

use std::sync::Arc;

use dashmap::DashMap;

use super::Pool;

/// One upstream's pool, as one share per worker (`shares[w]` is worker
/// `w`'s).
pub type Shares = Arc<Vec<Pool>>;

/// Every upstream's pool by upstream name; a cheap handle.
#[derive(Clone, Default)]
pub struct Registry {
    pools: Arc<DashMap<String, Shares>>,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// The shares of the upstream called `name`.
    pub fn get(&self, name: &str) -> Option<Shares> {
        self.pools.get(name).map(|entry| entry.value().clone())
    }

    /// Makes `shares` the pool of `name`; the shares it replaces, if any.
    pub fn insert(&self, name: &str, shares: Shares) -> Option<Shares> {
        self.pools.insert(name.to_owned(), shares)
    }

    /// Takes the pool of `name` out; its shares, if it was there.
    pub fn remove(&self, name: &str) -> Option<Shares> {
        self.pools.remove(name).map(|(_, shares)| shares)
    }

    /// Every share of every pool, ordered by upstream name then worker.
    pub fn all(&self) -> Vec<Pool> {
        let mut named: Vec<(String, Shares)> = self
            .pools
            .iter()
            .map(|entry| (entry.key().clone(), entry.value().clone()))
            .collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        named
            .into_iter()
            .flat_map(|(_, shares)| shares.iter().cloned().collect::<Vec<_>>())
            .collect()
    }
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("upstreams", &self.pools.len())
            .finish()
    }
}
