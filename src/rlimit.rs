//! The process's open-file limit. Every client and upstream connection is a
//! descriptor, and many platforms start services with a soft limit of 1024
//! (containerd, Docker, a login shell) under a far higher hard limit. tether
//! raises its soft limit to the hard one at start, as nginx's
//! `worker_rlimit_nofile` and Go's runtime do, and says when even that is less
//! than the configuration can use: beyond it accepts fail with EMFILE (and are
//! retried after a pause) and dials fail.
//!
//! `os_result` reads the return code of this and tether's other direct
//! libc calls.

use crate::config::Config;

/// Descriptors kept for everything that is not a connection: the admin
/// server and its scrapes, accept and event-loop descriptors per worker,
/// sock_diag sockets, DNS lookups, stdio.
pub const SLACK: u64 = 256;

/// The open-file limit before and after [`raise_open_files`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenFiles {
    /// The soft limit tether started with.
    pub before: u64,
    /// The soft limit now.
    pub now: u64,
}

/// Raises the soft open-file limit to the hard limit.
pub fn raise_open_files() -> std::io::Result<OpenFiles> {
    let mut limit = get()?;
    let before = limit.rlim_cur;
    if limit.rlim_cur < limit.rlim_max {
        limit.rlim_cur = limit.rlim_max;
        set(&limit)?;
    }
    Ok(OpenFiles {
        before,
        now: limit.rlim_cur,
    })
}

/// Descriptors `config` can use at once: every listener's `max_connections`,
/// every configured endpoint's `pool.max_connections` (a DNS name that
/// resolves to several addresses gets a pool per address, so this is a floor
/// for those), and [`SLACK`].
pub fn descriptors_needed(config: &Config) -> u64 {
    let clients: u64 = config
        .listeners
        .iter()
        .map(|l| l.max_connections as u64)
        .sum();
    let upstream: u64 = config
        .upstreams
        .iter()
        .map(|u| u.endpoints.len() as u64 * u.pool.max_connections as u64)
        .sum();
    clients + upstream + SLACK
}

#[allow(unsafe_code)]
fn get() -> std::io::Result<libc::rlimit> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into the struct it is given.
    os_result(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) })?;
    Ok(limit)
}

#[allow(unsafe_code)]
fn set(limit: &libc::rlimit) -> std::io::Result<()> {
    // SAFETY: setrlimit only reads the struct it is given.
    os_result(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, limit) })
}

/// The result of a libc call that returns 0 on success and -1 with `errno`
/// set on failure (`getrlimit`, `unshare`, `setns`, …).
pub(crate) fn os_result(rc: libc::c_int) -> std::io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ListenAddr, ListenerConfig, UpstreamConfig};

    #[test]
    fn counts_clients_upstream_connections_and_slack() {
        let mut config = Config::default();
        for name in ["a", "b"] {
            let mut listener =
                ListenerConfig::new(name, ListenAddr::Tcp(([127, 0, 0, 1], 0).into()), "u");
            listener.max_connections = 1000;
            config.listeners.push(listener);
        }
        let mut upstream =
            UpstreamConfig::new("u", vec!["10.0.0.5:80".into(), "10.0.0.6:80".into()]);
        upstream.pool.max_connections = 100;
        config.upstreams.push(upstream);
        assert_eq!(descriptors_needed(&config), 2000 + 200 + SLACK);
    }

    #[test]
    fn raising_leaves_the_soft_limit_at_the_hard_one() {
        let limits = raise_open_files().unwrap();
        assert!(limits.now >= limits.before);
        assert_eq!(limits.now, get().unwrap().rlim_max);
    }
}
