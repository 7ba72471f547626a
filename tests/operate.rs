//! The binary as a service manager and its probes see it: `tether health`
//! answers 0 or 1 with a reason, `/readyz` waits for the warm floor, systemd's
//! notify socket hears READY=1 and STOPPING=1, and SIGHUP does not end it.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// How long anything here may take to happen.
const PATIENCE: Duration = Duration::from_secs(10);

/// A tether binary with the addresses it logged and its log lines.
struct Tether {
    child: Child,
    listen: SocketAddr,
    admin: SocketAddr,
    log: mpsc::Receiver<String>,
    /// Every line read from `log` so far.
    seen: std::cell::RefCell<Vec<String>>,
    dir: PathBuf,
}

impl Tether {
    /// Starts `tether run` forwarding to `backend`, with `runtime` appended to
    /// its `[runtime]` section and `env` in its environment.
    fn start(backend: &str, runtime: &str, env: &[(&str, &Path)]) -> Self {
        Self::start_under(backend, runtime, env, None)
    }

    /// As `start`, in network namespace `netns`.
    fn start_in(netns: &str, backend: &str, runtime: &str, env: &[(&str, &Path)]) -> Self {
        Self::start_under(
            backend,
            runtime,
            env,
            Some(&format!("true && exec ip netns exec {netns}")),
        )
    }

    /// As `start`, with `shell` (`ulimit …`, or `true && exec ip netns exec
    /// NS`) run first in the shell that then becomes tether.
    fn start_under(
        backend: &str,
        runtime: &str,
        env: &[(&str, &Path)],
        shell: Option<&str>,
    ) -> Self {
        use std::io::BufRead;
        let dir = std::env::temp_dir().join(format!(
            "tether-operate-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("tether.toml");
        std::fs::write(
            &file,
            format!(
                r#"
                [[listener]]
                name = "app"
                listen = "127.0.0.1:0"
                upstream = "backend"
                [[upstream]]
                name = "backend"
                endpoints = ["{backend}"]
                connect_timeout = "200ms"
                [upstream.pool]
                min_idle = 2
                [admin]
                listen = "127.0.0.1:0"
                [runtime]
                worker_threads = 2
                {runtime}
                "#
            ),
        )
        .unwrap();
        let mut command = match shell {
            None => {
                let mut c = Command::new(env!("CARGO_BIN_EXE_tether"));
                c.args(["run", "--config"]).arg(&file);
                c
            }
            Some(first) => {
                let mut c = Command::new("sh");
                c.arg("-c").arg(format!(
                    "{first} {}\"{}\" run --config \"{}\"",
                    if first.contains("exec") {
                        ""
                    } else {
                        "&& exec "
                    },
                    env!("CARGO_BIN_EXE_tether"),
                    file.display()
                ));
                c
            }
        };
        command
            .env_remove("RUST_LOG")
            .env_remove("NOTIFY_SOCKET")
            .stderr(Stdio::piped());
        for (key, value) in env {
            command.env(key, value);
        }
        let mut child = command.spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let (send, log) = mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                if send.send(line).is_err() {
                    return;
                }
            }
        });
        let mut tether = Self {
            child,
            listen: SocketAddr::from(([0, 0, 0, 0], 0)),
            admin: SocketAddr::from(([0, 0, 0, 0], 0)),
            log,
            seen: std::cell::RefCell::new(Vec::new()),
            dir,
        };
        let listen = tether.wait_for_log("listen=");
        tether.listen = field(&listen, "listen=");
        let admin = tether.wait_for_log("admin=Some(");
        tether.admin = field(&admin, "admin=Some(");
        tether
    }

    /// Waits for a log line containing `needle` and returns it.
    fn wait_for_log(&self, needle: &str) -> String {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.log.recv_timeout(left) {
                Ok(line) => {
                    self.seen.borrow_mut().push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(e) => panic!("no log line with {needle:?}: {e}"),
            }
        }
    }

    fn signal(&self, name: &str) {
        send_signal(self.child.id(), name);
    }
}

impl Drop for Tether {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The address after `key` in a log line (`listen=127.0.0.1:5 …`, `admin=Some(127.0.0.1:6)`).
fn field(line: &str, key: &str) -> SocketAddr {
    let rest = line.split(key).nth(1).unwrap();
    let end = rest
        .find(|c: char| c.is_whitespace() || c == ')')
        .unwrap_or(rest.len());
    rest[..end]
        .parse()
        .unwrap_or_else(|e| panic!("{line}: {e}"))
}

/// A service manager's notify socket (what systemd passes as
/// `NOTIFY_SOCKET`), removed on drop.
struct NotifySocket {
    dir: PathBuf,
    path: PathBuf,
    socket: tokio::net::UnixDatagram,
}

impl NotifySocket {
    fn bind(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("tether-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let socket = tokio::net::UnixDatagram::bind(&path).unwrap();
        Self { dir, path, socket }
    }

    /// The next message, which must come within the patience.
    async fn next(&self, awaited: &str) -> String {
        let mut buf = vec![0u8; 4096];
        let n = tokio::time::timeout(PATIENCE, self.socket.recv(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("{awaited} within the patience"))
            .unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }
}

impl Drop for NotifySocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `tether health` with `args`: its exit code and stderr.
async fn health(args: &[&str]) -> (i32, String) {
    code_and_stderr(
        tokio::process::Command::new(env!("CARGO_BIN_EXE_tether"))
            .arg("health")
            .args(args),
    )
    .await
}

/// Polls `tether health` with `args` until it exits with `code`.
async fn health_until(args: &[&str], code: i32) -> String {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let (got, stderr) = health(args).await;
        if got == code {
            return stderr;
        }
        assert!(
            Instant::now() < deadline,
            "tether health {args:?} still exits {got}: {stderr}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A port nothing listens on.
fn closed_port() -> SocketAddr {
    let socket = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    socket.local_addr().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_exits_zero_against_a_running_tether_and_one_with_a_reason_otherwise() {
    let backend = Backend::start().await;
    let tether = Tether::start(&backend.addr.to_string(), "", &[]);
    let admin = tether.admin.to_string();

    assert_eq!(health(&["--admin", &admin]).await, (0, String::new()));
    health_until(&["--admin", &admin, "--ready"], 0).await;

    // The admin address can come from the config file itself.
    let from_config = tether.dir.join("health.toml");
    std::fs::write(
        &from_config,
        format!(
            "[[listener]]\nname = \"app\"\nlisten = \"127.0.0.1:0\"\nupstream = \"b\"\n\
             [[upstream]]\nname = \"b\"\nendpoints = [\"127.0.0.1:1\"]\n\
             [admin]\nlisten = \"{admin}\"\n"
        ),
    )
    .unwrap();
    let (code, stderr) = health(&["--config", from_config.to_str().unwrap(), "--ready"]).await;
    assert_eq!(code, 0, "{stderr}");

    // Nothing listening: refused, said so.
    let closed = closed_port().to_string();
    let (code, stderr) = health(&["--admin", &closed]).await;
    assert_eq!(code, 1);
    assert!(stderr.contains("refused"), "{stderr}");

    // Something that accepts and never answers: the deadline holds.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_addr = silent.local_addr().unwrap().to_string();
    let started = Instant::now();
    let (code, stderr) = health(&["--admin", &silent_addr, "--timeout", "300ms"]).await;
    assert_eq!(code, 1);
    assert!(stderr.contains("no answer"), "{stderr}");
    assert!(started.elapsed() < PATIENCE);
    drop(silent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_tether_is_alive_but_not_ready() {
    let backend = Backend::start().await;
    let tether = Tether::start(&backend.addr.to_string(), "drain_timeout = \"5s\"", &[]);
    let admin = tether.admin.to_string();
    health_until(&["--admin", &admin, "--ready"], 0).await;

    // A request in flight keeps the drain going.
    let mut stalled = TcpStream::connect(tether.listen).await.unwrap();
    stalled
        .write_all(b"GET /slow?3000 HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    wait_until(PATIENCE, || {
        backend
            .stats
            .in_flight
            .load(std::sync::atomic::Ordering::SeqCst)
            == 1
    })
    .await;
    tether.signal("TERM");
    tether.wait_for_log("draining");

    let (code, stderr) = health(&["--admin", &admin, "--ready"]).await;
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("503") && stderr.contains("draining"),
        "{stderr}"
    );
    let (code, stderr) = health(&["--admin", &admin]).await;
    assert_eq!(code, 0, "alive while draining: {stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_waits_for_the_warm_floor_at_most_ready_timeout() {
    // A backend that refuses: the warm floor cannot open.
    let dead = closed_port().to_string();
    let tether = Tether::start(&dead, "ready_timeout = \"2s\"", &[]);
    let admin = tether.admin.to_string();
    let started = Instant::now();
    let (code, stderr) = health(&["--admin", &admin, "--ready"]).await;
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("warming"), "{stderr}");
    // Alive all along.
    assert_eq!(health(&["--admin", &admin]).await.0, 0);
    health_until(&["--admin", &admin, "--ready"], 0).await;
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "ready after {:?}, before ready_timeout",
        started.elapsed()
    );
    tether.wait_for_log("ready before every warm floor is open");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_notify_socket_hears_ready_once_the_floor_is_open_and_stopping_on_sigterm() {
    let backend = Backend::start().await;
    let notify = NotifySocket::bind("notify");
    let tether = Tether::start(
        &backend.addr.to_string(),
        "",
        &[("NOTIFY_SOCKET", &notify.path)],
    );

    let message = notify.next("READY=1").await;
    assert!(message.lines().any(|l| l == "READY=1"), "{message}");
    assert!(message.contains("STATUS="), "{message}");
    // Two workers share min_idle = 2: one warm connection each, established
    // in the kernel before READY (the backend's accept loop may not have run
    // yet, so its own count can lag).
    let established = tether::census::sockets()
        .unwrap()
        .into_iter()
        .filter(|s| s.remote == backend.addr && s.state == tether::census::TcpState::Established)
        .count();
    assert!(
        established >= 2,
        "READY=1 with {established} warm connections"
    );
    assert_eq!(
        health(&["--admin", &tether.admin.to_string(), "--ready"])
            .await
            .0,
        0
    );

    tether.signal("TERM");
    let message = notify.next("STOPPING=1").await;
    assert!(message.lines().any(|l| l == "STOPPING=1"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_is_not_announced_before_the_floor_opens_or_ready_timeout_passes() {
    let notify = NotifySocket::bind("notify-cold");
    let dead = closed_port().to_string();
    let started = Instant::now();
    let _tether = Tether::start(
        &dead,
        "ready_timeout = \"1500ms\"",
        &[("NOTIFY_SOCKET", &notify.path)],
    );
    assert!(notify.next("READY=1").await.contains("READY=1"));
    assert!(
        started.elapsed() >= Duration::from_millis(1400),
        "READY=1 after {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_is_logged_and_ignored() {
    let backend = Backend::start().await;
    let mut tether = Tether::start(&backend.addr.to_string(), "", &[]);
    assert_eq!(get_once(tether.listen, "/").await.status, 200);
    tether.signal("HUP");
    let line = tether.wait_for_log("SIGHUP");
    assert!(line.contains("ignored"), "{line}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        tether.child.try_wait().unwrap().is_none(),
        "tether exited on SIGHUP"
    );
    assert_eq!(get_once(tether.listen, "/").await.status, 200);
    // A second one too: the handler stays installed.
    tether.signal("HUP");
    tether.wait_for_log("SIGHUP");
    assert_eq!(get_once(tether.listen, "/").await.status, 200);
    tether.signal("TERM");
    let deadline = Instant::now() + PATIENCE;
    let status = loop {
        if let Some(status) = tether.child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "no exit after SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success());
}

/// The soft and hard open-file limits of process `pid`.
fn open_file_limits(pid: u32) -> (u64, u64) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let mut numbers = line.split_whitespace().filter_map(|w| w.parse().ok());
    (numbers.next().unwrap(), numbers.next().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_soft_open_file_limit_is_raised_and_a_short_one_is_reported() {
    let backend = Backend::start().await;
    // Lowering a hard limit needs no privilege; raising it may.
    let hard = open_file_limits(std::process::id()).1.min(16384);
    // A soft limit of 1024 under a higher hard one, as container runtimes give.
    let tether = Tether::start_under(
        &backend.addr.to_string(),
        "",
        &[],
        Some(&format!("ulimit -S -n 1024 && ulimit -H -n {hard}")),
    );
    assert_eq!(open_file_limits(tether.child.id()), (hard, hard));
    assert_eq!(get_once(tether.listen, "/").await.status, 200);
    // The default max_connections (10000), one pool of 256 and the slack.
    let needed = 10_000 + 256 + tether::rlimit::SLACK;
    let warned = |t: &Tether| {
        t.seen
            .borrow()
            .iter()
            .any(|l| l.contains("WARN") && l.contains("open-file limit is below"))
    };
    assert_eq!(warned(&tether), hard < needed, "{:?}", tether.seen.borrow());

    // A hard limit below what the config can use: said at start, with figures.
    let short = Tether::start_under(
        &backend.addr.to_string(),
        "",
        &[],
        Some("ulimit -S -n 1024 && ulimit -H -n 2048"),
    );
    assert_eq!(open_file_limits(short.child.id()), (2048, 2048));
    assert!(warned(&short), "{:?}", short.seen.borrow());
    let needed = format!("needed={needed}");
    assert!(
        short.seen.borrow().iter().any(|l| l.contains(&needed)),
        "{:?}",
        short.seen.borrow()
    );
}

/// A network namespace where a SYN to 10.9.9.2 goes nowhere, so a dial
/// stays in progress until its timeout.
struct SilentNetwork(String);

impl SilentNetwork {
    fn new() -> Self {
        let name = format!("tether-silent-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        ip(&["netns", "add", &name]);
        let network = Self(name.clone());
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        // The far end has no address, and frames go to a MAC nobody has:
        // every SYN is dropped without an answer.
        ip(&[
            "-n", &name, "link", "add", "silent", "type", "veth", "peer", "name", "sink",
        ]);
        ip(&["-n", &name, "addr", "add", "10.9.9.1/24", "dev", "silent"]);
        ip(&["-n", &name, "link", "set", "silent", "up"]);
        ip(&["-n", &name, "link", "set", "sink", "up"]);
        ip(&[
            "-n",
            &name,
            "neigh",
            "add",
            "10.9.9.2",
            "lladdr",
            "02:00:00:00:00:02",
            "dev",
            "silent",
            "nud",
            "permanent",
        ]);
        network
    }

    /// `tether health` with `args`, run inside the namespace.
    async fn health(&self, args: &[&str]) -> (i32, String) {
        code_and_stderr(
            tokio::process::Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &self.0,
                    env!("CARGO_BIN_EXE_tether"),
                    "health",
                ])
                .args(args),
        )
        .await
    }
}

impl Drop for SilentNetwork {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dial_in_progress_is_not_a_warm_connection() {
    let network = SilentNetwork::new();
    let notify = NotifySocket::bind("notify-silent");
    let started = Instant::now();
    let tether = Tether::start_in(
        &network.0,
        "10.9.9.2:80",
        "ready_timeout = \"2s\"",
        &[("NOTIFY_SOCKET", &notify.path)],
    );
    // Dials to the silent address are in progress (each for connect_timeout,
    // then again after a backoff): not warm, so not ready.
    let admin = tether.admin.to_string();
    let (code, stderr) = network.health(&["--admin", &admin, "--ready"]).await;
    assert_eq!(code, 1, "ready while every dial is in progress: {stderr}");
    assert!(stderr.contains("warming"), "{stderr}");
    assert!(notify.next("READY=1").await.contains("READY=1"));
    assert!(
        started.elapsed() >= Duration::from_millis(1900),
        "READY=1 after {:?}, before ready_timeout",
        started.elapsed()
    );
    drop(tether);
}
