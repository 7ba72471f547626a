//! tether under test. In-process on ephemeral ports, through [`with_tether`]:
//! it starts tether, waits for the warm floor, runs the test body and always
//! drains, even when the body panics. As the binary an operator runs, through
//! [`TetherProcess`]: its config written from a [`Config`] value, its
//! addresses read from its log, killed when dropped.

use std::cell::{Ref, RefCell};
use std::future::Future;
use std::net::SocketAddr;
use std::ops::Deref;
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{mpsc, Arc};
use std::task::Poll;
use std::time::Duration;

use tether::config::{Config, ListenAddr, ListenerConfig, UpstreamConfig};
use tether::Running;

use super::{eventually, eventually_blocking, run_ok, send_signal, Backend, TempDir, PATIENCE};

/// A config with one listener (`app`, TCP port 0) and one upstream (`backend`),
/// the admin server on port 0, every other setting its default.
pub fn default_config(backend: SocketAddr) -> Config {
    let listener = ListenerConfig::new(
        "app",
        ListenAddr::Tcp("127.0.0.1:0".parse().unwrap()),
        "backend",
    );
    let upstream = UpstreamConfig::new("backend", vec![backend.to_string()]);
    let mut config = Config::default();
    config.listeners.push(listener);
    config.upstreams.push(upstream);
    config.admin.listen = "127.0.0.1:0".parse().unwrap();
    config.validate().unwrap();
    config
}

/// [`default_config`] with the waits shortened for in-process tests: half a
/// second of `close_grace`, five seconds to drain.
pub fn config_for(backend: SocketAddr) -> Config {
    let mut config = default_config(backend);
    config.listeners[0].close_grace = Duration::from_millis(500);
    config.runtime.drain_timeout = Duration::from_secs(5);
    config
}

/// tether running in-process, as a test body sees it: its addresses, and
/// (through `Deref`) everything [`Running`] tells.
pub struct Tether {
    running: Arc<Running>,
}

impl Tether {
    /// The address of the `app` listener.
    pub fn addr(&self) -> SocketAddr {
        self.running
            .tcp_addr("app")
            .expect("listener app is on TCP")
    }

    /// The admin server's address.
    pub fn admin(&self) -> SocketAddr {
        self.running
            .admin_addr()
            .expect("the admin server is enabled")
    }
}

impl Deref for Tether {
    type Target = Running;

    fn deref(&self) -> &Running {
        &self.running
    }
}

/// Starts tether with `config`, waits until every upstream's warm floor is
/// established, runs `body`, then drains tether, whether `body` returned or
/// panicked (the panic goes on once tether is drained). Returns what `body`
/// returned.
pub async fn with_tether<T, Body, Fut>(config: Config, body: Body) -> T
where
    Body: FnOnce(Tether) -> Fut,
    Fut: Future<Output = T>,
{
    with_tether_on(config, &[], body).await
}

/// Starts a [`Backend`] and tether in front of it ([`config_for`], then
/// `tune`), and runs `body` with both as [`with_tether`] does; the backend
/// outlives the drain.
pub async fn with_tether_and_backend<T, Body, Fut>(tune: impl FnOnce(&mut Config), body: Body) -> T
where
    Body: FnOnce(Backend, Tether) -> Fut,
    Fut: Future<Output = T>,
{
    let backend = Backend::start().await;
    let mut config = config_for(backend.addr);
    tune(&mut config);
    let theirs = backend.clone();
    with_tether(config, |t| body(theirs, t)).await
}

/// [`with_tether`] with `workers` as further event loops
/// ([`tether::app::start_on`]).
pub async fn with_tether_on<T, Body, Fut>(
    config: Config,
    workers: &[tokio::runtime::Handle],
    body: Body,
) -> T
where
    Body: FnOnce(Tether) -> Fut,
    Fut: Future<Output = T>,
{
    let floors: Vec<(String, usize)> = config
        .upstreams
        .iter()
        .map(|u| (u.name.clone(), u.pool.min_idle))
        .collect();
    let running = Arc::new(tether::app::start_on(config, workers, None).await.unwrap());
    let tether = Tether {
        running: running.clone(),
    };
    let outcome = catch_unwind(async {
        warm(&running, &floors).await;
        body(tether).await
    })
    .await;
    match Arc::into_inner(running) {
        Some(running) => {
            running.drain().await;
        }
        None => assert!(outcome.is_err(), "the test body kept tether past its end"),
    }
    outcome.unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

/// Waits until every endpoint of every upstream has its `min_idle`
/// connections established (summed over the workers' shares): not merely
/// dialling, or a request sent meanwhile would dial one of its own.
async fn warm(running: &Running, floors: &[(String, usize)]) {
    eventually(|| {
        floors.iter().all(|(upstream, min_idle)| {
            let shares: Vec<_> = running.pools(upstream).map(|p| p.endpoints()).collect();
            let endpoints = shares.first().map_or(0, |e| e.len());
            (0..endpoints).all(|i| {
                let established: usize = shares
                    .iter()
                    .filter_map(|e| e.get(i))
                    .map(|e| e.established_connections())
                    .sum();
                established >= *min_idle
            })
        })
    })
    .await;
}

/// Runs `future`, turning a panic inside it into an `Err` carrying the panic.
async fn catch_unwind<F: Future>(future: F) -> std::thread::Result<F::Output> {
    let mut future = std::pin::pin!(future);
    std::future::poll_fn(|cx| {
        match std::panic::catch_unwind(AssertUnwindSafe(|| future.as_mut().poll(cx))) {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(output)) => Poll::Ready(Ok(output)),
            Err(panic) => Poll::Ready(Err(panic)),
        }
    })
    .await
}

/// The `tether` binary as a command.
pub fn tether_command() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_tether"));
    command.env_remove("RUST_LOG");
    command
}

/// Runs `tether ARGS` to its end; panics with its stderr unless it succeeds.
pub fn tether_ok<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Output {
    run_ok(tether_command().args(args), "")
}

/// Runs `command` to its end: its exit code and stderr.
pub async fn code_and_stderr(command: &mut tokio::process::Command) -> (i32, String) {
    let out = command.output().await.unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// How to launch the binary beyond its config.
#[derive(Default)]
pub struct Launch<'a> {
    /// Shell commands run first, in the shell that then becomes tether
    /// (`ulimit -n 40`).
    pub shell: Option<&'a str>,
    /// A network namespace to run in.
    pub netns: Option<&'a str>,
    /// Further environment.
    pub env: &'a [(&'a str, &'a Path)],
}

/// `tether run` as a child process, with the addresses it logged and its log.
pub struct TetherProcess {
    pub child: Child,
    /// The `app` listener's address.
    pub listen: SocketAddr,
    /// The admin server's address, when enabled.
    pub admin: Option<SocketAddr>,
    log: mpsc::Receiver<String>,
    /// Every log line read so far.
    seen: RefCell<Vec<String>>,
    dir: TempDir,
}

impl TetherProcess {
    /// Starts `tether run` on `config` and waits until it has logged its
    /// addresses.
    pub fn start(config: &Config) -> Self {
        Self::launch(config, Launch::default())
    }

    /// As [`TetherProcess::start`], launched as `how` says.
    pub fn launch(config: &Config, how: Launch) -> Self {
        let dir = TempDir::new("tether-run");
        let file = dir.path().join("tether.toml");
        std::fs::write(&file, config.to_toml()).unwrap();
        let mut argv: Vec<String> = Vec::new();
        if let Some(netns) = how.netns {
            argv.extend(["ip", "netns", "exec", netns].map(str::to_owned));
        }
        argv.push(env!("CARGO_BIN_EXE_tether").to_owned());
        argv.extend(["run".to_owned(), "--config".to_owned()]);
        argv.push(file.display().to_string());
        let mut command = match how.shell {
            None => {
                let mut c = Command::new(&argv[0]);
                c.args(&argv[1..]);
                c
            }
            Some(first) => {
                let quoted: Vec<String> = argv.iter().map(|a| format!("\"{a}\"")).collect();
                let mut c = Command::new("sh");
                c.arg("-c")
                    .arg(format!("{first} && exec {}", quoted.join(" ")));
                c
            }
        };
        command
            .env_remove("RUST_LOG")
            .env_remove("NOTIFY_SOCKET")
            .envs(how.env.iter().copied())
            .stderr(Stdio::piped());
        let mut child = command.spawn().unwrap();
        let log = forward_log(child.stderr.take().unwrap());
        let mut process = Self {
            child,
            listen: SocketAddr::from(([0, 0, 0, 0], 0)),
            admin: None,
            log,
            seen: RefCell::new(Vec::new()),
            dir,
        };
        process.listen = field(&process.wait_for_log("listen="), "listen=");
        if config.admin.enabled {
            let admin = process.wait_for_log("admin=Some(");
            process.admin = Some(field(&admin, "admin=Some("));
        }
        process
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The address of the listener named `name`, as it logged it.
    pub fn listener_addr(&self, name: &str) -> SocketAddr {
        let needle = format!("listener={name} listen=");
        let logged = self.seen().iter().find(|l| l.contains(&needle)).cloned();
        let line = logged.unwrap_or_else(|| self.wait_for_log(&needle));
        field(&line, &needle)
    }

    /// The admin server's address (it must be enabled).
    pub fn admin(&self) -> SocketAddr {
        self.admin.expect("the admin server is enabled")
    }

    /// A directory of this process's own, removed with it.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Sends signal `name` ("TERM", "HUP").
    pub fn signal(&self, name: &str) {
        send_signal(self.pid(), name);
    }

    /// Waits for a log line containing `needle` and returns it.
    pub fn wait_for_log(&self, needle: &str) -> String {
        let deadline = std::time::Instant::now() + PATIENCE;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.log.recv_timeout(left) {
                Ok(line) => {
                    self.seen.borrow_mut().push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(e) => panic!(
                    "no log line with {needle:?} ({e}); tether logged {:#?}",
                    self.seen.borrow()
                ),
            }
        }
    }

    /// Every log line read so far (by [`TetherProcess::wait_for_log`]).
    pub fn seen(&self) -> Ref<'_, Vec<String>> {
        self.seen.borrow()
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Waits for the process to exit.
    pub fn exited(&mut self) -> ExitStatus {
        let mut status = None;
        eventually_blocking(|| {
            status = self.child.try_wait().unwrap();
            status.is_some()
        });
        status.unwrap()
    }

    /// SIGTERM, then waits for the exit.
    pub fn stop(mut self) -> ExitStatus {
        self.signal("TERM");
        self.exited()
    }
}

impl Drop for TetherProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads the child's log on a thread of its own (so the child never blocks on
/// a full pipe), echoing warnings and errors to the test's output.
fn forward_log(stderr: std::process::ChildStderr) -> mpsc::Receiver<String> {
    use std::io::BufRead;
    let (send, log) = mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if line.contains("WARN") || line.contains("ERROR") {
                eprintln!("tether: {line}");
            }
            if send.send(line).is_err() {
                return;
            }
        }
    });
    log
}

/// The address after `key` in a log line (`listen=127.0.0.1:5 …`,
/// `admin=Some(127.0.0.1:6)`).
fn field(line: &str, key: &str) -> SocketAddr {
    let rest = line.split(key).nth(1).unwrap();
    let end = rest
        .find(|c: char| c.is_whitespace() || c == ')')
        .unwrap_or(rest.len());
    rest[..end]
        .parse()
        .unwrap_or_else(|e| panic!("{line}: {e}"))
}
