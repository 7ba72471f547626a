//! `[runtime]`: process-wide settings — how many workers, how long the drain
//! may take, how long start-up (and a reload's new pools) wait for warm
//! pools, whether tether watches its configuration file, and how long freed
//! heap stays for reuse.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{defaults, Problems};

/// `[runtime]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RuntimeConfig {
    /// Workers, each a single-threaded event loop with its own accept socket
    /// (SO_REUSEPORT) and its own share of every upstream pool; 0 = one per
    /// core. Default: [`defaults::worker_threads`].
    #[serde(default = "defaults::worker_threads")]
    pub worker_threads: usize,
    /// After SIGTERM, time in-flight requests get to finish before the rest is
    /// aborted. Default: [`defaults::drain_timeout`].
    #[serde(default = "defaults::drain_timeout", with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// Longest tether waits at start for every pool's warm floor
    /// (`pool.min_idle` connections per endpoint) before it reports ready
    /// anyway (`/readyz`, systemd's READY=1); 0 = ready as soon as the
    /// listeners are bound. Default: [`defaults::ready_timeout`].
    /// A reload's new pools and endpoints wait as long for their warm floor
    /// before requests move to them.
    #[serde(default = "defaults::ready_timeout", with = "humantime_serde")]
    pub ready_timeout: Duration,
    /// Reload when the configuration file changes: an edit in place, a new
    /// file renamed over it, or a symlink swapped (a Kubernetes ConfigMap
    /// volume). Default: [`defaults::watch_config`].
    #[serde(default = "defaults::watch_config")]
    pub watch_config: bool,
    /// How often the file is looked at when `watch_config` is on. Default:
    /// [`defaults::watch_interval`].
    #[serde(default = "defaults::watch_interval", with = "humantime_serde")]
    pub watch_interval: Duration,
    /// How long freed heap pages stay with the process for the next burst
    /// before the allocator returns them to the kernel, gradually over this
    /// time (jemalloc's `dirty_decay_ms`); 0 = at once. A reload applies it.
    /// Default: [`defaults::heap_release_delay`].
    #[serde(default = "defaults::heap_release_delay", with = "humantime_serde")]
    pub heap_release_delay: Duration,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            worker_threads: defaults::worker_threads(),
            drain_timeout: defaults::drain_timeout(),
            ready_timeout: defaults::ready_timeout(),
            watch_config: defaults::watch_config(),
            watch_interval: defaults::watch_interval(),
            heap_release_delay: defaults::heap_release_delay(),
        }
    }
}

/// The longest `drain_timeout`, `ready_timeout`, `watch_interval` and
/// `heap_release_delay` accepted: longer is a typo (no service manager waits
/// that long, and an hour-old free page is not kept for reuse), and
/// far-future deadlines overflow the clock.
pub const MAX_WAIT: Duration = Duration::from_secs(60 * 60);

/// Checks `[runtime]`: the drain needs some time, and neither wait is absurd.
pub(super) fn validate(runtime: &RuntimeConfig, mut problems: Problems<'_>) {
    problems.positive("drain_timeout", runtime.drain_timeout);
    problems.at_most("drain_timeout", runtime.drain_timeout, MAX_WAIT);
    problems.at_most("ready_timeout", runtime.ready_timeout, MAX_WAIT);
    problems.positive("watch_interval", runtime.watch_interval);
    problems.at_most("watch_interval", runtime.watch_interval, MAX_WAIT);
    problems.at_most("heap_release_delay", runtime.heap_release_delay, MAX_WAIT);
}
