//! Which upstream a request goes to: a listener's route table, built with
//! its binding (so a reload that rebuilds bindings brings route changes),
//! and the request's host as routing reads it.
//!
//! A lookup allocates nothing: the host is split in place and compared with
//! each pattern's lower-cased bytes, in the order the routes were written. A
//! listener has a handful of routes, so a scan is cheaper than any map; a
//! listener without routes skips the host entirely.

use crate::config::{split_authority, HostPattern};
use crate::pool::Pool;

/// An upstream as a request reaches it: this worker's share of its pool, and
/// the Host an HTTP/1.0 request without one is given.
pub struct Target {
    /// This worker's share of the upstream's pool; its name is the upstream's.
    pub pool: Pool,
    /// Host sent upstream when an HTTP/1.0 client sent none: the upstream's
    /// first endpoint.
    pub fallback_host: String,
}

/// A listener's routes, in order, and its default upstream.
pub struct Routes {
    routes: Vec<(HostPattern, Target)>,
    default: Option<Target>,
}

impl Routes {
    /// A table of `routes`, tried in order, falling back to `default`.
    pub fn new(routes: Vec<(HostPattern, Target)>, default: Option<Target>) -> Self {
        Self { routes, default }
    }

    /// The upstream serving a request for `host` (an authority, as
    /// [`crate::h1::RequestHead::authority`] gives it): the first route that matches, else the
    /// default. `None`: nothing serves it (403 `no-route`).
    pub fn pick(&self, host: Option<&str>) -> Option<&Target> {
        if self.routes.is_empty() {
            return self.default.as_ref();
        }
        let chosen = host.and_then(|authority| {
            let (name, port) = split_authority(authority);
            self.routes
                .iter()
                .find(|(pattern, _)| pattern.matches(name, port))
        });
        chosen.map(|(_, target)| target).or(self.default.as_ref())
    }
}
