//! Two hosts on one machine for the demo: the app's (the load client and
//! tether) and the backend's, each a network namespace of its own, joined by
//! a veth pair. To the kernel the backend is then a remote host, so a closed
//! connection toward it holds its ephemeral port in TIME_WAIT for 60 s, as it
//! does in production (on loopback Linux reuses such a port after one
//! second).
//!
//! The namespaces are anonymous: no name under `/run/netns`, no interface or
//! sysctl of this machine's own namespace touched. They live as long as the
//! demo holds their files and threads, so the kernel removes them, and the
//! veth pair with them, on every exit path: a normal end, an error, Ctrl-C,
//! even SIGKILL.

use std::fs::File;
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::Arc;

use crate::census::{self, LOCAL_PORT_RANGE};
use crate::rlimit::os_result;

/// Why the two hosts could not be made.
#[derive(Debug, thiserror::Error)]
pub enum HostsError {
    /// The kernel refused a new network namespace (it takes root, or
    /// CAP_SYS_ADMIN and CAP_NET_ADMIN).
    #[error("creating a network namespace needs root ({0})")]
    Namespace(std::io::Error),
    /// A namespace's thread could not be started or entered.
    #[error("cannot enter the demo's network namespace: {0}")]
    Enter(std::io::Error),
    /// `ip` from iproute2 could not be run.
    #[error("cannot run `ip` to make the veth pair ({0}); install iproute2")]
    Ip(std::io::Error),
    /// `ip` failed.
    #[error("`ip {args}` failed: {stderr}")]
    IpFailed {
        /// The arguments `ip` was given.
        args: String,
        /// What it said.
        stderr: String,
    },
    /// A sysctl of the app's namespace could not be set or read.
    #[error("cannot use {key} in the app's namespace: {source}")]
    Sysctl {
        /// The sysctl.
        key: &'static str,
        /// What the kernel said.
        source: std::io::Error,
    },
    /// A runtime for a namespace could not be started.
    #[error("cannot start the async runtime of a demo host: {0}")]
    Runtime(std::io::Error),
}

/// The app's address on the veth pair (RFC 2544's benchmarking range, which
/// no real network uses).
pub const APP_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// The backend's address on the veth pair.
pub const BACKEND_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const PREFIX: u8 = 30;
const APP_LINK: &str = "tether-app";
const BACKEND_LINK: &str = "tether-backend";

/// An anonymous network namespace, alive while this file is open.
struct Netns {
    file: Arc<File>,
}

impl Netns {
    /// A new namespace with its loopback up.
    fn create() -> Result<Self, HostsError> {
        let file = std::thread::spawn(|| -> std::io::Result<File> {
            unshare_network()?;
            // `thread-self`: `/proc/self` is the main thread's view.
            File::open("/proc/thread-self/ns/net")
        })
        .join()
        .map_err(|_| HostsError::Enter(std::io::Error::other("namespace thread panicked")))?
        .map_err(HostsError::Namespace)?;
        Ok(Self {
            file: Arc::new(file),
        })
    }

    /// Runs `f` on a thread inside this namespace: sockets it opens and
    /// processes it starts live there.
    fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> Result<T, HostsError> + Send + 'static,
    ) -> Result<T, HostsError> {
        let file = self.file.clone();
        std::thread::spawn(move || {
            enter_network(&file).map_err(HostsError::Enter)?;
            f()
        })
        .join()
        .map_err(|_| HostsError::Enter(std::io::Error::other("namespace thread panicked")))?
    }

    /// A tokio runtime whose every thread lives in this namespace.
    fn runtime(&self, name: &str, threads: usize) -> Result<tokio::runtime::Runtime, HostsError> {
        let file = self.file.clone();
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name(name)
            .enable_all()
            .on_thread_start(move || {
                if let Err(e) = enter_network(&file) {
                    // A thread outside the namespace would reach the wrong
                    // host: better no demo than a false one.
                    eprintln!("tether demo: cannot enter the demo's network namespace: {e}");
                    std::process::abort();
                }
            })
            .build()
            .map_err(HostsError::Runtime)
    }
}

#[allow(unsafe_code)]
fn unshare_network() -> std::io::Result<()> {
    // SAFETY: unshare(CLONE_NEWNET) only moves the calling thread into a new
    // network namespace; it touches no memory.
    os_result(unsafe { libc::unshare(libc::CLONE_NEWNET) })
}

#[allow(unsafe_code)]
fn enter_network(file: &File) -> std::io::Result<()> {
    // SAFETY: setns with an open namespace file only changes the calling
    // thread's network namespace.
    os_result(unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) })
}

fn ip(args: &[&str]) -> Result<(), HostsError> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(HostsError::Ip)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(HostsError::IpFailed {
            args: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

/// Narrows the ephemeral port range of the calling thread's namespace to
/// `ports` ports when given, and says how many it has.
fn ephemeral_ports(ports: Option<u16>) -> Result<u32, HostsError> {
    let sysctl = |source| HostsError::Sysctl {
        key: "net.ipv4.ip_local_port_range",
        source,
    };
    if let Some(ports) = ports {
        let first: u32 = 20_000;
        let last = first + u32::from(ports.max(1)) - 1;
        std::fs::write(LOCAL_PORT_RANGE, format!("{first} {last}")).map_err(sysctl)?;
    }
    let range = std::fs::read_to_string(LOCAL_PORT_RANGE).map_err(sysctl)?;
    match census::parse_port_range(&range) {
        Some(bounds) => Ok(census::ports_in(bounds)),
        None => Err(sysctl(std::io::Error::other(format!(
            "unreadable range {range:?}"
        )))),
    }
}

/// The app's host and the backend's, each with its own runtime.
pub struct Hosts {
    app: tokio::runtime::Runtime,
    backend: tokio::runtime::Runtime,
    ephemeral_ports: u32,
    // Held so the namespaces outlive every socket and thread the demo puts
    // in them; the kernel frees them once these close and the threads end.
    _app_ns: Netns,
    _backend_ns: Netns,
}

impl Hosts {
    /// Makes both namespaces and the veth pair; with `ports`, narrows the
    /// app's ephemeral port range to that many ports (a host that other
    /// traffic already uses), else leaves the kernel's default.
    pub fn create(ports: Option<u16>) -> Result<Self, HostsError> {
        let app_ns = Netns::create()?;
        let backend_ns = Netns::create()?;
        // `ip` opens this path to find the peer's namespace; the demo's own
        // descriptor is reachable through /proc while the demo runs.
        let backend_path = format!(
            "/proc/{}/fd/{}",
            std::process::id(),
            backend_ns.file.as_raw_fd()
        );
        let app_cidr = format!("{APP_ADDR}/{PREFIX}");
        let backend_cidr = format!("{BACKEND_ADDR}/{PREFIX}");
        let ephemeral_ports = app_ns.run(move || {
            ip(&["link", "set", "lo", "up"])?;
            ip(&[
                "link",
                "add",
                APP_LINK,
                "type",
                "veth",
                "peer",
                "name",
                BACKEND_LINK,
                "netns",
                &backend_path,
            ])?;
            ip(&["addr", "add", &app_cidr, "dev", APP_LINK])?;
            ip(&["link", "set", APP_LINK, "up"])?;
            ephemeral_ports(ports)
        })?;
        backend_ns.run(move || {
            ip(&["link", "set", "lo", "up"])?;
            ip(&["addr", "add", &backend_cidr, "dev", BACKEND_LINK])?;
            ip(&["link", "set", BACKEND_LINK, "up"])
        })?;
        Ok(Self {
            app: app_ns.runtime("tether-demo-app", 2)?,
            backend: backend_ns.runtime("tether-demo-backend", 1)?,
            ephemeral_ports,
            _app_ns: app_ns,
            _backend_ns: backend_ns,
        })
    }

    /// Ephemeral ports the app's host has.
    pub fn ephemeral_ports(&self) -> u32 {
        self.ephemeral_ports
    }

    /// Where the backend listens.
    pub fn backend_addr(port: u16) -> SocketAddr {
        SocketAddr::from((BACKEND_ADDR, port))
    }

    /// A handle that runs tasks on the backend's host.
    pub fn backend(&self) -> tokio::runtime::Handle {
        self.backend.handle().clone()
    }

    /// Runs `future` on the app's host to completion, from outside any runtime.
    pub fn block_on_app<F>(&self, future: F) -> Result<F::Output, HostsError>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        // Spawned, not polled here: this thread is outside the namespace, and
        // a socket the future opened on it would live on the wrong host.
        let task = self.app.spawn(future);
        match self.app.block_on(task) {
            Ok(output) => Ok(output),
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => Err(HostsError::Enter(std::io::Error::other(e.to_string()))),
        }
    }
}
