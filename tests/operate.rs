//! The binary as a service manager and its probes see it: `tether health`
//! answers 0 or 1 with a reason, `/readyz` waits for the warm floor, systemd's
//! notify socket hears READY=1 and STOPPING=1, and SIGHUP reloads (RELOADING=1,
//! then READY=1).

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use tether::Config;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// The config these tests run: two workers sharing a warm floor of two, a
/// dial given up after 200 ms.
fn operate_config(backend: SocketAddr) -> Config {
    let mut config = default_config(backend);
    config.upstreams[0].connect_timeout = Duration::from_millis(200);
    config.upstreams[0].pool.min_idle = 2;
    config.runtime.worker_threads = 2;
    config
}

/// `tether run` on `config` with `NOTIFY_SOCKET` set to `notify`.
fn start_notifying(config: &Config, notify: &Path, netns: Option<&str>) -> TetherProcess {
    TetherProcess::launch(
        config,
        Launch {
            netns,
            env: &[("NOTIFY_SOCKET", notify)],
            ..Launch::default()
        },
    )
}

/// A service manager's notify socket (what systemd passes as
/// `NOTIFY_SOCKET`), removed on drop.
struct NotifySocket {
    path: PathBuf,
    socket: tokio::net::UnixDatagram,
    _dir: TempDir,
}

impl NotifySocket {
    fn bind(name: &str) -> Self {
        let dir = TempDir::new(&format!("tether-{name}"));
        let path = dir.path().join("notify.sock");
        let socket = tokio::net::UnixDatagram::bind(&path).unwrap();
        Self {
            path,
            socket,
            _dir: dir,
        }
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
    let tether = TetherProcess::start(&operate_config(backend.addr));
    let admin = tether.admin().to_string();

    assert_eq!(health(&["--admin", &admin]).await, (0, String::new()));
    health_until(&["--admin", &admin, "--ready"], 0).await;

    // The admin address can come from the config file itself.
    let from_config = tether.dir().join("health.toml");
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
    let mut config = operate_config(backend.addr);
    config.runtime.drain_timeout = Duration::from_secs(5);
    let tether = TetherProcess::start(&config);
    let admin = tether.admin().to_string();
    health_until(&["--admin", &admin, "--ready"], 0).await;

    // A request in flight keeps the drain going.
    let mut stalled = TcpStream::connect(tether.listen).await.unwrap();
    stalled
        .write_all(b"GET /slow?3000 HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    eventually(|| backend.in_flight() == 1).await;
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
    let mut config = operate_config(closed_port());
    config.runtime.ready_timeout = Duration::from_secs(2);
    let tether = TetherProcess::start(&config);
    let admin = tether.admin().to_string();
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
    let tether = start_notifying(&operate_config(backend.addr), &notify.path, None);

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
        health(&["--admin", &tether.admin().to_string(), "--ready"])
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
    let mut config = operate_config(closed_port());
    config.runtime.ready_timeout = Duration::from_millis(1500);
    let started = Instant::now();
    let _tether = start_notifying(&config, &notify.path, None);
    assert!(notify.next("READY=1").await.contains("READY=1"));
    assert!(
        started.elapsed() >= Duration::from_millis(1400),
        "READY=1 after {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_file_and_the_notify_socket_hears_reloading_then_ready() {
    let backend = Backend::start().await;
    let notify = NotifySocket::bind("notify-reload");
    let mut config = operate_config(backend.addr);
    config.runtime.watch_config = false;
    let mut tether = start_notifying(&config, &notify.path, None);
    notify.next("READY=1").await;
    assert_eq!(get_once(tether.listen, "/").await.status, 200);

    config.listeners[0].request_timeout = Duration::from_secs(9);
    std::fs::write(tether.dir().join("tether.toml"), config.to_toml()).unwrap();
    tether.signal("HUP");
    let reloading = notify.next("RELOADING=1").await;
    assert!(reloading.contains("MONOTONIC_USEC="), "{reloading}");
    let ready = notify.next("READY=1").await;
    assert!(ready.contains("generation 2"), "{ready}");
    tether.wait_for_log("configuration reloaded");
    assert!(tether.is_running(), "tether exited on SIGHUP");
    assert_eq!(get_once(tether.listen, "/").await.status, 200);
    // A second one too: the handler stays installed (nothing changed now).
    tether.signal("HUP");
    assert!(notify.next("RELOADING=1").await.contains("RELOADING=1"));
    assert!(notify.next("READY=1").await.contains("generation 2"));
    assert_eq!(get_once(tether.listen, "/").await.status, 200);
    assert!(tether.stop().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_soft_open_file_limit_is_raised_and_a_short_one_is_reported() {
    let backend = Backend::start().await;
    let config = operate_config(backend.addr);
    let start_under = |limits: &str| {
        TetherProcess::launch(
            &config,
            Launch {
                shell: Some(limits),
                ..Launch::default()
            },
        )
    };
    // Lowering a hard limit needs no privilege; raising it may.
    let hard = open_file_limits(std::process::id()).1.min(16384);
    // A soft limit of 1024 under a higher hard one, as container runtimes give.
    let tether = start_under(&format!("ulimit -S -n 1024 && ulimit -H -n {hard}"));
    assert_eq!(open_file_limits(tether.pid()), (hard, hard));
    assert_eq!(get_once(tether.listen, "/").await.status, 200);
    // The default max_connections (10000), one pool of 256 and the slack.
    let needed = 10_000 + 256 + tether::rlimit::SLACK;
    let warned = |t: &TetherProcess| {
        t.seen()
            .iter()
            .any(|l| l.contains("WARN") && l.contains("open-file limit is below"))
    };
    assert_eq!(warned(&tether), hard < needed, "{:?}", tether.seen());

    // A hard limit below what the config can use: said at start, with figures.
    let short = start_under("ulimit -S -n 1024 && ulimit -H -n 2048");
    assert_eq!(open_file_limits(short.pid()), (2048, 2048));
    assert!(warned(&short), "{:?}", short.seen());
    let needed = format!("needed={needed}");
    assert!(
        short.seen().iter().any(|l| l.contains(&needed)),
        "{:?}",
        short.seen()
    );
}

/// A network namespace where a SYN to 10.9.9.2 goes nowhere, so a dial
/// stays in progress until its timeout.
struct SilentNetwork(Netns);

impl SilentNetwork {
    fn new() -> Self {
        let netns = Netns::new(&format!("tether-silent-{}", std::process::id()));
        // The far end has no address, and frames go to a MAC nobody has:
        // every SYN is dropped without an answer.
        netns.ip(&[
            "link", "add", "silent", "type", "veth", "peer", "name", "sink",
        ]);
        netns.ip(&["addr", "add", "10.9.9.1/24", "dev", "silent"]);
        netns.ip(&["link", "set", "silent", "up"]);
        netns.ip(&["link", "set", "sink", "up"]);
        netns.ip(&[
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
        Self(netns)
    }

    /// `tether health` with `args`, run inside the namespace.
    async fn health(&self, args: &[&str]) -> (i32, String) {
        let mut command =
            tokio::process::Command::from(self.0.command(env!("CARGO_BIN_EXE_tether")));
        code_and_stderr(command.arg("health").args(args)).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dial_in_progress_is_not_a_warm_connection() {
    let network = SilentNetwork::new();
    let notify = NotifySocket::bind("notify-silent");
    let mut config = operate_config("10.9.9.2:80".parse().unwrap());
    config.runtime.ready_timeout = Duration::from_secs(2);
    let started = Instant::now();
    let tether = start_notifying(&config, &notify.path, Some(network.0.name()));
    // Dials to the silent address are in progress (each for connect_timeout,
    // then again after a backoff): not warm, so not ready.
    let admin = tether.admin().to_string();
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
