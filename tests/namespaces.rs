//! Two hosts on one machine: network namespaces joined by a veth pair, made and
//! removed by the tests themselves. `app` holds the client and tether, `backend`
//! a keep-alive HTTP server. Needs root (CI runs as root); without namespaces
//! the tests fail and say why.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use tether::census::{self, TcpState};

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
    let clients = concurrently(concurrency, || async move {
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
    })
    .await;
    let mut total = Churn::default();
    for c in clients {
        total.ok += c.ok;
        total.errors += c.errors;
        total.addr_not_available += c.addr_not_available;
        if total.first_error.is_none() {
            total.first_error = c.first_error;
        }
    }
    total
}

/// tether started inside namespace `netns`, in front of `backend`, with at
/// most `requests_per_connection` requests per client connection (the
/// default without).
fn tether_in(
    netns: &Netns,
    backend: SocketAddr,
    requests_per_connection: Option<u64>,
) -> TetherProcess {
    let mut config = default_config(backend);
    if let Some(n) = requests_per_connection {
        config.listeners[0].max_requests_per_connection = n;
    }
    config.upstreams[0].pool.min_idle = 2;
    config.upstreams[0].pool.max_connections = 8;
    config.admin.enabled = false;
    config.runtime.worker_threads = 1;
    config.runtime.drain_timeout = Duration::from_secs(2);
    TetherProcess::launch(
        &config,
        Launch {
            netns: Some(netns.name()),
            ..Launch::default()
        },
    )
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
    for (ns, veth, address) in [
        (&app, &veth_app, "10.77.0.1/24"),
        (&backend_ns, &veth_backend, "10.77.0.2/24"),
    ] {
        ip(&["link", "set", veth, "netns", ns.name()]);
        ns.ip(&["addr", "add", address, "dev", veth]);
        ns.ip(&["link", "set", veth, "up"]);
    }
    app.sysctl("net.ipv4.ip_local_port_range", "40000 40999");

    // The backend: a keep-alive HTTP/1.1 server counting the connections it accepts.
    let backend: SocketAddr = "10.77.0.2:8000".parse().unwrap();
    let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (report_tx, report_rx) = std::sync::mpsc::channel::<usize>();
    let backend_thread = backend_ns.run(move || {
        runtime().block_on(async move {
            let server = Backend::builder().bind(backend).start().await;
            ready_tx.send(server.stats.clone()).unwrap();
            // Until the test is done with it (or gone).
            let _ = tokio::task::spawn_blocking(move || stop_rx.recv()).await;
            drop(server);
            // TIME_WAIT in the backend's own table.
            report_tx
                .send(time_wait_count(|s| s.local == backend))
                .unwrap();
        })
    });
    let stats = ready_rx.recv_timeout(PATIENCE).unwrap();
    let accepted = || stats.accepted.load(std::sync::atomic::Ordering::SeqCst);

    let before = accepted();
    let tether = tether_in(&app, backend, Some(1));
    let target = tether.listen;
    let started = Instant::now();
    let through = app
        .run(move || {
            let churn = runtime().block_on(churn(target, 16, Duration::from_secs(5)));
            let toward_backend = time_wait_count(|s| s.remote == backend);
            let client_side =
                time_wait_count(|s| s.remote == target && s.state == TcpState::TimeWait);
            (churn, toward_backend, client_side)
        })
        .join()
        .unwrap();
    let pooled = accepted() - before;
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
    tether.stop();

    // Default settings: the app closes first on loopback and meets the kernel's
    // reuse cap. Reported, not asserted.
    let tether_default = tether_in(&app, backend, None);
    let target = tether_default.listen;
    let default_run = app
        .run(move || runtime().block_on(churn(target, 16, Duration::from_secs(3))))
        .join()
        .unwrap();
    eprintln!(
        "through tether (defaults): {} ok, {} errors ({} EADDRNOTAVAIL, first: {:?})",
        default_run.ok, default_run.errors, default_run.addr_not_available, default_run.first_error
    );
    tether_default.stop();

    // Control, run last because it uses up the app's ports toward the backend
    // for a minute: straight at the backend, the app runs out of ports.
    let before_direct = accepted();
    let direct = app
        .run(move || {
            let churn = runtime().block_on(churn(backend, 16, Duration::from_secs(4)));
            let tw = time_wait_count(|s| s.remote == backend);
            (churn, tw)
        })
        .join()
        .unwrap();
    let direct_connections = accepted() - before_direct;
    eprintln!(
        "direct: {} ok, {} errors ({} EADDRNOTAVAIL, first: {:?}), {} TIME_WAIT toward the backend, {} backend connections",
        direct.0.ok, direct.0.errors, direct.0.addr_not_available, direct.0.first_error, direct.1, direct_connections
    );
    assert!(
        direct.0.addr_not_available > 0,
        "the control must run out of ports, or this test proves nothing: {direct:?}"
    );

    stop_tx.send(()).unwrap();
    let in_backend_total = report_rx.recv_timeout(PATIENCE).unwrap();
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
            let out = tether_ok(&["doctor", "--json"]);
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
