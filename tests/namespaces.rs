//! Two hosts on one machine: network namespaces joined by a veth pair, made and
//! removed by the tests themselves. `app` holds the client and tether, `backend`
//! a keep-alive HTTP server. Needs root (CI runs as root); without namespaces
//! the tests fail and say why.

mod common;

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{ip, spawn_tether};
use tether::census::{self, TcpState};

/// A network namespace, deleted on drop.
struct Netns(String);

impl Netns {
    fn new(name: &str) -> Self {
        let _ = Command::new("ip").args(["netns", "del", name]).output();
        ip(&["netns", "add", name]);
        ip(&["-n", name, "link", "set", "lo", "up"]);
        Self(name.to_owned())
    }

    fn sysctl(&self, key: &str, value: &str) {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.0,
                "sysctl",
                "-w",
                &format!("{key}={value}"),
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "sysctl {key}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Runs `f` on a thread that has entered this namespace: every socket it
    /// opens (and every process it spawns) lives there.
    fn run<T: Send + 'static>(
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

/// A current-thread runtime for a namespace thread.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[derive(Debug, Default)]
struct Churn {
    ok: u64,
    errors: u64,
    addr_not_available: u64,
    first_error: Option<String>,
}

/// Close-first clients, a new connection per request, for `window`.
async fn churn(target: SocketAddr, concurrency: usize, window: Duration) -> Churn {
    let deadline = tokio::time::Instant::now() + window;
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        tasks.push(tokio::spawn(async move {
            let mut c = Churn::default();
            while tokio::time::Instant::now() < deadline {
                match tokio::time::timeout(
                    Duration::from_secs(2),
                    tether::tools::load::one_request(target),
                )
                .await
                {
                    Ok(Ok(())) => c.ok += 1,
                    Ok(Err(e)) => {
                        c.errors += 1;
                        if let tether::tools::load::LoadError::Io(io) = &e {
                            if io.raw_os_error() == Some(libc::EADDRNOTAVAIL) {
                                c.addr_not_available += 1;
                            }
                        }
                        c.first_error.get_or_insert_with(|| e.to_string());
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                    Err(_) => {
                        c.errors += 1;
                        c.first_error.get_or_insert_with(|| "timed out".to_owned());
                    }
                }
            }
            c
        }));
    }
    let mut total = Churn::default();
    for t in tasks {
        let c = t.await.unwrap();
        total.ok += c.ok;
        total.errors += c.errors;
        total.addr_not_available += c.addr_not_available;
        if total.first_error.is_none() {
            total.first_error = c.first_error;
        }
    }
    total
}

fn time_wait_where(pred: impl Fn(&census::TcpSocket) -> bool) -> usize {
    census::time_wait()
        .unwrap()
        .iter()
        .filter(|s| pred(s))
        .count()
}

/// tether started inside a namespace, its listen address read from its log.
struct Tether {
    child: Child,
    addr: SocketAddr,
}

impl Tether {
    fn start(netns: &str, backend: SocketAddr, listener_extra: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("tether-ns-{}-{netns}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join(format!("tether-{}.toml", listener_extra.len()));
        std::fs::write(
            &file,
            format!(
                r#"
                [[listener]]
                name = "app"
                listen = "127.0.0.1:0"
                upstream = "backend"
                {listener_extra}
                [[upstream]]
                name = "backend"
                endpoints = ["{backend}"]
                [upstream.pool]
                min_idle = 2
                max_connections = 8
                [admin]
                enabled = false
                [runtime]
                worker_threads = 1
                drain_timeout = "2s"
                "#
            ),
        )
        .unwrap();
        let mut command = Command::new("ip");
        command
            .args([
                "netns",
                "exec",
                netns,
                env!("CARGO_BIN_EXE_tether"),
                "run",
                "--config",
            ])
            .arg(&file);
        let (child, addr) = spawn_tether(command);
        Self { child, addr }
    }
}

impl Drop for Tether {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

#[test]
fn two_hosts_with_a_narrow_port_range_exhaust_directly_and_not_through_tether() {
    let id = std::process::id() % 100_000;
    let app = Netns::new(&format!("tt-app-{id}"));
    let backend_ns = Netns::new(&format!("tt-be-{id}"));
    let (veth_app, veth_backend) = (format!("tva{id}"), format!("tvb{id}"));
    ip(&[
        "link",
        "add",
        &veth_app,
        "type",
        "veth",
        "peer",
        "name",
        &veth_backend,
    ]);
    ip(&["link", "set", &veth_app, "netns", &app.0]);
    ip(&["link", "set", &veth_backend, "netns", &backend_ns.0]);
    ip(&[
        "-n",
        &app.0,
        "addr",
        "add",
        "10.77.0.1/24",
        "dev",
        &veth_app,
    ]);
    ip(&[
        "-n",
        &backend_ns.0,
        "addr",
        "add",
        "10.77.0.2/24",
        "dev",
        &veth_backend,
    ]);
    ip(&["-n", &app.0, "link", "set", &veth_app, "up"]);
    ip(&["-n", &backend_ns.0, "link", "set", &veth_backend, "up"]);
    app.sysctl("net.ipv4.ip_local_port_range", "40000 40999");

    // The backend: a keep-alive HTTP/1.1 server counting the connections it accepts.
    let backend: SocketAddr = "10.77.0.2:8000".parse().unwrap();
    let accepted = Arc::new(AtomicU64::new(0));
    let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();
    let (report_tx, report_rx) = std::sync::mpsc::channel::<usize>();
    let counter = accepted.clone();
    let backend_thread = backend_ns.run(move || {
        runtime().block_on(async move {
            let listener = tokio::net::TcpListener::bind(backend).await.unwrap();
            ready_tx.send(()).unwrap();
            let serve = async move {
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    counter.fetch_add(1, Ordering::SeqCst);
                    tokio::spawn(async move {
                        let service = hyper::service::service_fn(|_req| async {
                            Ok::<_, std::convert::Infallible>(hyper::Response::new(
                                http_body_util::Full::new(bytes::Bytes::from_static(b"hello")),
                            ))
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                            .await;
                    });
                }
            };
            let wait = tokio::task::spawn_blocking(move || loop {
                if stop_rx.recv_timeout(Duration::from_millis(50)).is_ok() {
                    return;
                }
            });
            tokio::select! {
                _ = serve => {}
                _ = wait => {}
            }
            // TIME_WAIT in the backend's own table.
            report_tx
                .send(time_wait_where(|s| s.local == backend))
                .unwrap();
        })
    });
    ready_rx.recv_timeout(Duration::from_secs(5)).unwrap();

    let before = accepted.load(Ordering::SeqCst);
    let tether = Tether::start(&app.0, backend, "max_requests_per_connection = 1");
    let target = tether.addr;
    let started = Instant::now();
    let through = app
        .run(move || {
            let churn = runtime().block_on(churn(target, 16, Duration::from_secs(5)));
            let toward_backend = time_wait_where(|s| s.remote == backend);
            let client_side =
                time_wait_where(|s| s.remote == target && s.state == TcpState::TimeWait);
            (churn, toward_backend, client_side)
        })
        .join()
        .unwrap();
    let pooled = accepted.load(Ordering::SeqCst) - before;
    eprintln!(
        "through tether (max_requests_per_connection = 1): {} ok in {:.1}s, {} errors (first: {:?}), \
         {} TIME_WAIT toward the backend, {} on the app's ports, {} backend connections",
        through.0.ok,
        started.elapsed().as_secs_f64(),
        through.0.errors,
        through.0.first_error,
        through.1,
        through.2,
        pooled
    );
    drop(tether);

    // Default settings: the app closes first on loopback and meets the kernel's
    // reuse cap. Reported, not asserted.
    let tether_default = Tether::start(&app.0, backend, "");
    let target = tether_default.addr;
    let default_run = app
        .run(move || runtime().block_on(churn(target, 16, Duration::from_secs(3))))
        .join()
        .unwrap();
    eprintln!(
        "through tether (defaults): {} ok, {} errors ({} EADDRNOTAVAIL, first: {:?})",
        default_run.ok, default_run.errors, default_run.addr_not_available, default_run.first_error
    );
    drop(tether_default);

    // Control, run last because it uses up the app's ports toward the backend
    // for a minute: straight at the backend, the app runs out of ports.
    let before_direct = accepted.load(Ordering::SeqCst);
    let direct = app
        .run(move || {
            let churn = runtime().block_on(churn(backend, 16, Duration::from_secs(4)));
            let tw = time_wait_where(|s| s.remote == backend);
            (churn, tw)
        })
        .join()
        .unwrap();
    let direct_connections = accepted.load(Ordering::SeqCst) - before_direct;
    eprintln!(
        "direct: {} ok, {} errors ({} EADDRNOTAVAIL, first: {:?}), {} TIME_WAIT toward the backend, {} backend connections",
        direct.0.ok, direct.0.errors, direct.0.addr_not_available, direct.0.first_error, direct.1, direct_connections
    );
    assert!(
        direct.0.addr_not_available > 0,
        "the control must run out of ports, or this test proves nothing: {direct:?}"
    );

    stop_tx.send(()).unwrap();
    let in_backend_total = report_rx.recv_timeout(Duration::from_secs(5)).unwrap();
    backend_thread.join().unwrap();
    eprintln!("TIME_WAIT in the backend: {in_backend_total}");

    assert_eq!(through.0.errors, 0, "through tether: {:?}", through.0);
    assert!(
        through.0.ok >= 10_000,
        "through tether: only {} requests",
        through.0.ok
    );
    assert_eq!(
        through.1, 0,
        "no TIME_WAIT toward the backend through tether"
    );
    assert_eq!(
        through.2, 0,
        "no TIME_WAIT on the app's ports through tether"
    );
    assert_eq!(in_backend_total, 0, "no TIME_WAIT in the backend");
    assert!(
        pooled <= 8,
        "backend accepted {pooled} connections through tether (pool of 8)"
    );
}

#[test]
fn doctor_names_the_endpoint_a_churning_client_hits() {
    let id = std::process::id() % 100_000;
    let ns = Netns::new(&format!("tt-doc-{id}"));
    let report = ns
        .run(|| {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = listener.local_addr().unwrap();
            let server = std::thread::spawn(move || {
                for _ in 0..1500 {
                    // Wait for the client's FIN so the client is the one to close first.
                    let (mut s, _) = listener.accept().unwrap();
                    let _ = std::io::Read::read(&mut s, &mut [0u8; 1]);
                }
            });
            for _ in 0..1500 {
                // The client closes first: the TIME_WAIT stays on its side.
                let c = std::net::TcpStream::connect(addr).unwrap();
                drop(c);
            }
            server.join().unwrap();
            std::thread::sleep(Duration::from_millis(200));
            let from_proc =
                census::sockets_from_proc(std::path::Path::new("/proc/thread-self/net"))
                    .unwrap()
                    .iter()
                    .filter(|s| s.state == TcpState::TimeWait && s.remote == addr)
                    .count();
            let out = Command::new(env!("CARGO_BIN_EXE_tether"))
                .args(["doctor", "--json"])
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            (addr, from_proc, json)
        })
        .join()
        .unwrap();
    let (addr, from_proc, json) = report;
    let worst = &json["worst_offender"];
    assert_eq!(worst["endpoint"], addr.to_string(), "{json}");
    assert_eq!(worst["kind"], "remote", "{json}");
    assert_eq!(
        worst["time_wait"].as_u64().unwrap() as usize,
        from_proc,
        "{json}"
    );
    // Loopback may recycle a TIME_WAIT port after a second, so a slow run
    // leaves somewhat fewer than one per connection; doctor must match the table.
    assert!(from_proc >= 1000, "{from_proc}");
    let advice = json["advice"].to_string();
    assert!(
        advice.contains(&addr.to_string()) && advice.contains("tether"),
        "{advice}"
    );
}
