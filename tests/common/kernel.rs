//! What the kernel says, not what tether thinks: TIME_WAIT entries (through
//! tether's own census, sock_diag or `/proc/net/tcp`), a process's memory,
//! limits and signals, and network namespaces made with `ip` and removed on
//! drop.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::process::Command;

use tether::census::{self, TcpSocket};

use super::run_ok;

/// TIME_WAIT sockets now that `which` picks.
pub fn time_wait_count(which: impl Fn(&TcpSocket) -> bool) -> usize {
    census::time_wait()
        .unwrap()
        .iter()
        .filter(|s| which(s))
        .count()
}

/// Whether a TIME_WAIT socket from local port `local` to remote port `remote`
/// exists now: the side that holds it is the side that closed first.
pub fn time_wait_between(local: u16, remote: u16) -> bool {
    time_wait_count(|s| s.local.port() == local && s.remote.port() == remote) > 0
}

/// TIME_WAIT entries that appeared after a point in the test, so entries left
/// by earlier tests (which linger for a minute) cannot be mistaken for ours.
pub struct TimeWaitBaseline(HashSet<(SocketAddr, SocketAddr)>);

impl TimeWaitBaseline {
    pub fn now() -> Self {
        Self(
            census::time_wait()
                .unwrap()
                .into_iter()
                .map(|s| (s.local, s.remote))
                .collect(),
        )
    }

    pub fn new_entries(&self) -> Vec<TcpSocket> {
        census::time_wait()
            .unwrap()
            .into_iter()
            .filter(|s| !self.0.contains(&(s.local, s.remote)))
            .collect()
    }

    /// New TIME_WAIT sockets whose remote port is `port`.
    pub fn toward_port(&self, port: u16) -> usize {
        self.new_entries()
            .iter()
            .filter(|s| s.remote.port() == port)
            .count()
    }

    /// New TIME_WAIT sockets whose local port is `port`.
    pub fn on_local_port(&self, port: u16) -> usize {
        self.new_entries()
            .iter()
            .filter(|s| s.local.port() == port)
            .count()
    }

    /// New TIME_WAIT sockets on either side of connections to or from `port`.
    pub fn at_port(&self, port: u16) -> (usize, usize) {
        (self.toward_port(port), self.on_local_port(port))
    }
}

/// Minor page faults process `pid` has taken: a page it touched that the
/// kernel had to map (field 10 of `/proc/<pid>/stat`).
pub fn minor_faults(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // The command name, in parentheses, may hold spaces: count after it.
    let after_name = &stat[stat.rfind(')').unwrap() + 2..];
    after_name.split(' ').nth(7).unwrap().parse().unwrap()
}

/// Resident set size of a process, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// The soft and hard open-file limits of process `pid`.
pub fn open_file_limits(pid: u32) -> (u64, u64) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let mut numbers = line.split_whitespace().filter_map(|w| w.parse().ok());
    (numbers.next().unwrap(), numbers.next().unwrap())
}

/// Sends signal `name` ("TERM", "HUP", "INT") to process `pid`.
pub fn send_signal(pid: u32, name: &str) {
    let status = Command::new("kill")
        .args([&format!("-{name}"), &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill -{name} {pid}");
}

/// Runs `ip` (iproute2) with `args`; panics with its stderr when it fails.
pub fn ip(args: &[&str]) {
    run_ok(
        Command::new("ip").args(args),
        " (`ip` is in iproute2; network namespaces need root)",
    );
}

/// A network namespace with its loopback up, deleted on drop.
pub struct Netns(String);

impl Netns {
    /// Makes namespace `name`, replacing one a crashed run left behind.
    pub fn new(name: &str) -> Self {
        let _ = Command::new("ip").args(["netns", "del", name]).output();
        ip(&["netns", "add", name]);
        let netns = Self(name.to_owned());
        netns.ip(&["link", "set", "lo", "up"]);
        netns
    }

    pub fn name(&self) -> &str {
        &self.0
    }

    /// Runs `ip args` inside the namespace.
    pub fn ip(&self, args: &[&str]) {
        let mut all = vec!["-n", &self.0];
        all.extend_from_slice(args);
        ip(&all);
    }

    /// `program` as a command that runs inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.0, program]);
        command
    }

    /// Sets sysctl `key` inside the namespace.
    pub fn sysctl(&self, key: &str, value: &str) {
        run_ok(
            self.command("sysctl")
                .args(["-w", &format!("{key}={value}")]),
            "",
        );
    }

    /// Runs `f` on a thread that has entered this namespace: every socket it
    /// opens (and every process it spawns) lives there.
    pub fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let path = format!("/var/run/netns/{}", self.0);
        std::thread::spawn(move || {
            let file = std::fs::File::open(&path).unwrap();
            // SAFETY: setns with a valid namespace fd only changes this thread's
            // network namespace.
            #[allow(unsafe_code)]
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}
