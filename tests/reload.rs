//! Reloading a running tether, as an operator does it: SIGHUP, `POST /reload`,
//! an edit of the file, and a Kubernetes-style symlink swap. Under a steady
//! connection-per-request load nothing fails, settings change without a
//! connection opened toward the loaded backend, a moved upstream warms
//! before requests move, the allocator's release delay changes in place
//! (counted in the proxy's page faults), and an invalid file changes
//! nothing.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use tether::config::{Retire, RetirePolicy};
use tether::Config;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Clients that each send one request per connection, back to back, until
/// stopped; counting answers and failures.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
    failed: Arc<AtomicUsize>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(addr: SocketAddr, clients: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let tasks = (0..clients)
            .map(|_| {
                let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
                tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        match one_request(addr).await {
                            Ok(()) => ok.fetch_add(1, Ordering::Relaxed),
                            Err(e) => {
                                eprintln!("request failed: {e}");
                                failed.fetch_add(1, Ordering::Relaxed)
                            }
                        };
                    }
                })
            })
            .collect();
        Self {
            stop,
            ok,
            failed,
            tasks,
        }
    }

    fn answered(&self) -> usize {
        self.ok.load(Ordering::Relaxed)
    }

    /// Stops the clients; (answered, failed).
    async fn finish(self) -> (usize, usize) {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            task.await.unwrap();
        }
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }
}

/// One GET on a new connection, `Connection: close`; an error unless 200.
async fn one_request(addr: SocketAddr) -> Result<(), String> {
    let work = async {
        let mut stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
            .await
            .map_err(|e| e.to_string())?;
        let mut answer = Vec::new();
        stream
            .read_to_end(&mut answer)
            .await
            .map_err(|e| e.to_string())?;
        match answer.starts_with(b"HTTP/1.1 200") {
            true => Ok(()),
            false => Err(String::from_utf8_lossy(&answer).into_owned()),
        }
    };
    tokio::time::timeout(PATIENCE, work)
        .await
        .map_err(|_| "no answer".to_owned())?
}

/// Two upstreams: `loaded` (the load's, a warm floor of 4) behind listener
/// `app`, and `other` behind listener `side`; two workers.
fn two_upstreams(loaded: SocketAddr, other: SocketAddr) -> Config {
    let mut config = default_config(loaded);
    config.admin.enabled = true;
    config.admin.listen = "127.0.0.1:0".parse().unwrap();
    config.runtime.worker_threads = 2;
    config.runtime.watch_config = false;
    config.runtime.watch_interval = Duration::from_millis(100);
    let upstream = &mut config.upstreams[0];
    upstream.name = "loaded".into();
    upstream.pool.min_idle = 4;
    upstream.pool.max_idle = 8;
    upstream.pool.max_connections = 16;
    config.listeners[0].upstream = "loaded".into();
    let mut side = config.upstreams[0].clone();
    side.name = "other".into();
    side.endpoints = vec![other.to_string()];
    side.pool.min_idle = 1;
    config.upstreams.push(side);
    let mut listener = config.listeners[0].clone();
    listener.name = "side".into();
    listener.upstream = "other".into();
    // Port 0 twice on one address is one port asked for twice.
    listener.listen = "127.0.0.2:0".parse().unwrap();
    config.listeners.push(listener);
    config
}

/// The value of metric `name` (no labels) in `/metrics`.
async fn metric(admin: SocketAddr, name: &str) -> f64 {
    let body = get_once(admin, "/metrics").await.text();
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {body}"))
}

async fn generation(admin: SocketAddr) -> u64 {
    metric(admin, "tether_config_generation").await as u64
}

/// `POST /reload`; status and the JSON report.
async fn post_reload(admin: SocketAddr) -> (u16, serde_json::Value) {
    let response = Client::connect(admin)
        .await
        .request(b"POST /reload HTTP/1.1\r\nHost: admin\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
        .await;
    let report = serde_json::from_str(&response.text()).unwrap();
    (response.status, report)
}

/// Replaces `path` as an editor does: a new file renamed over it.
fn write_renamed(path: &Path, config: &Config) {
    let next = path.with_extension("toml.new");
    std::fs::write(&next, config.to_toml()).unwrap();
    std::fs::rename(&next, path).unwrap();
}

/// Makes `path` a Kubernetes ConfigMap volume's file: a symlink through
/// `..data`, itself a symlink to a timestamped directory.
fn configmap_publish(path: &Path, config: &Config, version: usize) {
    let dir = path.parent().unwrap();
    let name = path.file_name().unwrap();
    let versioned = dir.join(format!("..2026_12_02_{version}"));
    std::fs::create_dir_all(&versioned).unwrap();
    std::fs::write(versioned.join(name), config.to_toml()).unwrap();
    // The swap: a new `..data` link renamed over the old one.
    let tmp = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(versioned.file_name().unwrap(), &tmp).unwrap();
    std::fs::rename(&tmp, dir.join("..data")).unwrap();
    if std::fs::symlink_metadata(path).is_ok_and(|m| !m.file_type().is_symlink()) {
        std::fs::remove_file(path).unwrap();
        std::os::unix::fs::symlink(Path::new("..data").join(name), path).unwrap();
    }
}

/// The `i`-th variation: timeouts, policies and `other`'s endpoints change;
/// `loaded`'s connections stay as they are.
fn variation(base: &Config, i: usize, others: &[SocketAddr]) -> Config {
    let mut config = base.clone();
    let app = &mut config.listeners[0];
    app.request_timeout = Duration::from_secs(20 + i as u64);
    app.idle_timeout = Duration::from_secs(30 + i as u64);
    let loaded = &mut config.upstreams[0];
    loaded.connect_timeout = Duration::from_millis(500 + 10 * i as u64);
    loaded.pool.retire = RetirePolicy::Uniform(match i % 3 {
        0 => Retire::Abort,
        1 => Retire::Graceful,
        _ => Retire::PeerFirst,
    });
    loaded.health.eject_after = 3 + (i as u32 % 4);
    let other = &mut config.upstreams[1];
    other.endpoints = match i % 3 {
        0 => vec![others[0].to_string()],
        1 => vec![others[0].to_string(), others[1].to_string()],
        _ => vec![others[1].to_string()],
    };
    other.pool.acquire_timeout = Duration::from_secs(1 + i as u64 % 5);
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_reloads_under_load_fail_nothing_and_open_nothing_toward_the_loaded_backend() {
    let loaded = Backend::start().await;
    let others = [Backend::start().await, Backend::start().await];
    let other_addrs = [others[0].addr, others[1].addr];
    let base = two_upstreams(loaded.addr, others[0].addr);
    let tether = TetherProcess::start(&base);
    let admin = tether.admin();
    let file = tether.dir().join("tether.toml");
    health_ready(admin).await;
    eventually(|| loaded.accepted() >= 4).await;

    let load = Load::start(tether.listen, 2);
    eventually(|| load.answered() >= 50).await;
    let (accepted_before, closed_before) = (loaded.accepted(), loaded.closed());

    let mut expected = 1;
    for i in 0..20 {
        let mut next = variation(&base, i, &other_addrs);
        // The last ten reloads come from the watch: turned on by the tenth.
        next.runtime.watch_config = i >= 9;
        match i {
            0..=4 => {
                write_renamed(&file, &next);
                tether.signal("HUP");
            }
            5..=9 => {
                write_renamed(&file, &next);
                let (status, report) = post_reload(admin).await;
                assert_eq!(status, 200, "{report}");
                assert_eq!(report["result"], "applied", "{report}");
            }
            10..=14 => std::fs::write(&file, next.to_toml()).unwrap(),
            _ => configmap_publish(&file, &next, i),
        }
        expected += 1;
        until_generation(admin, expected).await;
        // Requests went on through every reload.
        let answered = load.answered();
        eventually(|| load.answered() > answered + 5).await;
    }
    let (answered, failed) = load.finish().await;
    eprintln!(
        "20 reloads: {answered} requests answered, {failed} failed; the loaded backend accepted {accepted_before} connections before and {} after, closed {closed_before} before and {} after",
        loaded.accepted(),
        loaded.closed()
    );
    assert_eq!(
        failed,
        0,
        "{failed} of {} requests failed",
        answered + failed
    );
    assert_eq!(
        loaded.accepted(),
        accepted_before,
        "the loaded backend accepted new connections during the reloads"
    );
    assert_eq!(
        loaded.closed(),
        closed_before,
        "a connection to the loaded backend closed during the reloads"
    );
    assert!(
        others[1].accepted() >= 1,
        "the other upstream's new endpoint was never used"
    );
    let reloads = get_once(admin, "/metrics").await.text();
    assert!(
        reloads.contains("tether_config_reloads_total{result=\"applied\"} 20"),
        "{reloads}"
    );
    assert!(tether.stop().success());
}

/// Page faults the proxy takes per burst of 16 HTTP/1.0 downloads of a
/// chunked 512 KiB body, which it buffers whole to send with a
/// Content-Length, eight at a time; after a first burst.
async fn faults_per_burst(tether: &TetherProcess) -> u64 {
    const BURSTS: u64 = 10;
    let burst = || async {
        for _ in 0..2 {
            let downloads = (0..8).map(|_| {
                tokio::spawn(exchange_raw(
                    tether.listen,
                    b"GET /big?524288 HTTP/1.0\r\nHost: t\r\n\r\n",
                ))
            });
            for download in downloads {
                let (bytes, _) = download.await.unwrap();
                assert!(bytes.len() > 512 * 1024, "a whole download");
            }
        }
    };
    burst().await;
    let before = minor_faults(tether.pid());
    for _ in 0..BURSTS {
        burst().await;
    }
    (minor_faults(tether.pid()) - before) / BURSTS
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_heap_release_delay_applies_at_start_and_on_reload() {
    let backend = Backend::start().await;
    let mut config = default_config(backend.addr);
    config.runtime.worker_threads = 1;
    config.runtime.heap_release_delay = Duration::ZERO;
    let tether = TetherProcess::start(&config);
    let at_once = faults_per_burst(&tether).await;

    config.runtime.heap_release_delay = Duration::from_secs(10);
    write_renamed(&tether.dir().join("tether.toml"), &config);
    let (status, report) = post_reload(tether.admin()).await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["result"], "applied", "{report}");
    assert!(
        report["restart_required"]
            .as_array()
            .is_none_or(|keys| keys.is_empty()),
        "{report}"
    );
    let kept = faults_per_burst(&tether).await;
    eprintln!("page faults per burst of 16 buffered downloads: {at_once} with no release delay, {kept} after a reload to 10s");
    assert!(
        at_once >= 256,
        "with no delay the burst's 2,048 pages of buffers go back to the kernel and fault in again: {at_once} faults per burst"
    );
    assert!(
        kept * 4 <= at_once,
        "after the reload the next burst reuses the kept pages: {kept} faults per burst, {at_once} before"
    );
    assert!(tether.stop().success());
}

/// Waits until the running configuration generation is `expected`.
async fn until_generation(admin: SocketAddr, expected: u64) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let now = generation(admin).await;
        if now == expected {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "generation {now}, expected {expected}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The binary on [`two_upstreams`], each with a backend of its own, ready.
async fn ready_binary() -> (TetherProcess, Config, [Backend; 2]) {
    let backends = [Backend::start().await, Backend::start().await];
    let base = two_upstreams(backends[0].addr, backends[1].addr);
    let tether = TetherProcess::start(&base);
    health_ready(tether.admin()).await;
    (tether, base, backends)
}

/// Waits until `/readyz` answers 200.
async fn health_ready(admin: SocketAddr) {
    for _ in 0..500 {
        if get_once(admin, "/readyz").await.status == 200 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("tether never became ready");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_moved_upstream_warms_its_new_address_before_requests_move() {
    let old = Backend::start().await;
    let new = Backend::start().await;
    let other = Backend::start().await;
    let base = two_upstreams(old.addr, other.addr);
    let tether = TetherProcess::start(&base);
    let admin = tether.admin();
    health_ready(admin).await;
    let load = Load::start(tether.listen, 2);
    eventually(|| load.answered() >= 50).await;

    let mut moved = base.clone();
    moved.upstreams[0].endpoints = vec![new.addr.to_string()];
    write_renamed(&tether.dir().join("tether.toml"), &moved);
    let (status, report) = post_reload(admin).await;
    assert_eq!(status, 200, "{report}");
    let answered = load.answered();
    eventually(|| load.answered() > answered + 50).await;
    let (answered, failed) = load.finish().await;

    assert_eq!(
        failed,
        0,
        "{failed} of {} requests failed",
        answered + failed
    );
    let warm = new
        .accepted_at_first_request()
        .expect("no request reached the new address");
    eprintln!("moved upstream: {answered} requests answered, {failed} failed; the new address had {warm} connections when its first request arrived");
    // Two workers, each with its share of the floor of four.
    assert!(
        warm >= 4,
        "the new address had {warm} connections when the first request arrived"
    );
    let before = old.requests();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        old.requests(),
        before,
        "requests still reach the old address"
    );
    eventually(|| old.open() == 0).await;
    let metrics = get_once(admin, "/metrics").await.text();
    assert!(
        metrics.lines().any(
            |l| l.starts_with("tether_upstream_connections_opened_by_total")
                && l.contains("cause=\"reload\"")
                && l.contains(&new.addr.to_string())
                && !l.ends_with(" 0")
        ),
        "{metrics}"
    );
    assert!(tether.stop().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_file_changes_nothing_and_the_answer_lists_its_key_paths() {
    let (tether, base, _backends) = ready_binary().await;
    let admin = tether.admin();
    let before = get_once(admin, "/config").await.text();
    let file = tether.dir().join("tether.toml");
    let mut text = base.to_toml();
    text = text.replacen("idle_timeout = \"", "idle_timeout = \"soon", 1);
    text.push_str("\n[bogus]\nkey = 1\n");
    std::fs::write(&file, text).unwrap();

    let (status, report) = post_reload(admin).await;
    assert_eq!(status, 400, "{report}");
    assert_eq!(report["result"], "invalid");
    assert_eq!(report["generation"], 1);
    let keys: Vec<&str> = report["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["key"].as_str().unwrap())
        .collect();
    assert!(keys.contains(&"bogus"), "{keys:?}");
    assert!(keys.iter().any(|k| k.ends_with("idle_timeout")), "{keys:?}");
    assert_eq!(generation(admin).await, 1);
    assert_eq!(get_once(admin, "/config").await.text(), before);
    assert_eq!(get_once(tether.listen, "/").await.status, 200);
    assert!(
        metric(admin, "tether_config_problems_total").await >= 2.0,
        "problems are counted"
    );
    tether.wait_for_log("reload refused");
    assert!(tether.stop().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_key_is_reported_and_not_applied_while_the_rest_is() {
    let (tether, base, _backends) = ready_binary().await;
    let admin = tether.admin();
    let mut next = base.clone();
    next.runtime.worker_threads = 5;
    next.listeners[0].request_timeout = Duration::from_secs(7);
    write_renamed(&tether.dir().join("tether.toml"), &next);
    let (status, report) = post_reload(admin).await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["restart_required"][0], "runtime.worker_threads");
    let running = Config::from_toml(&get_once(admin, "/config").await.text()).unwrap();
    assert_eq!(running.runtime.worker_threads, 2);
    assert_eq!(running.listeners[0].request_timeout, Duration::from_secs(7));
    assert!(tether.stop().success());
}

#[tokio::test]
async fn listeners_are_added_rebound_and_removed_by_name_new_socket_first() {
    let backend = Backend::start().await;
    let other = Backend::start().await;
    let base = two_upstreams(backend.addr, other.addr);
    let seen = backend.clone();
    with_tether(base.clone(), |t| async move {
        let old_app = t.addr();
        let side = t.tcp_addr("side").unwrap();
        // A request in flight on the old socket through the re-bind.
        let mut kept = Client::connect(old_app).await;
        kept.send(b"GET /slow?300 HTTP/1.1\r\nHost: test\r\n\r\n")
            .await;
        eventually(|| seen.in_flight() == 1).await;
        let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let free = held.local_addr().unwrap();
        drop(held);

        let mut next = base.clone();
        next.listeners[0].listen = tether::config::ListenAddr::Tcp(free);
        next.listeners.remove(1);
        let mut extra = next.listeners[0].clone();
        extra.name = "extra".into();
        extra.listen = "127.0.0.3:0".parse().unwrap();
        next.listeners.push(extra);
        let report = t.reload(next).await;
        assert_eq!(report.result, tether::app::Outcome::Applied, "{report:?}");

        assert_eq!(t.addr(), free);
        assert_eq!(get_once(free, "/").await.status, 200);
        let extra = t.tcp_addr("extra").unwrap();
        assert_eq!(get_once(extra, "/").await.status, 200);
        assert!(t.tcp_addr("side").is_none());
        eventually_async(|| async move { TcpStream::connect(side).await.is_err() }).await;
        eventually_async(|| async move { TcpStream::connect(old_app).await.is_err() }).await;
        let answer = kept
            .request(b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
            .await;
        assert_eq!(
            answer.status, 200,
            "the connection accepted before the re-bind is served"
        );
    })
    .await;
}

#[tokio::test]
async fn a_listener_that_cannot_bind_fails_the_reload_and_changes_nothing() {
    let backend = Backend::start().await;
    let other = Backend::start().await;
    let base = two_upstreams(backend.addr, other.addr);
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    with_tether(base.clone(), |t| async move {
        let mut next = base.clone();
        next.listeners[1].listen = tether::config::ListenAddr::Tcp(taken.local_addr().unwrap());
        next.listeners[0].request_timeout = Duration::from_secs(3);
        let report = t.reload(next).await;
        assert_eq!(report.result, tether::app::Outcome::Failed, "{report:?}");
        assert!(report.error.unwrap().contains("side"));
        assert_eq!(t.generation(), 1);
        let side = t.tcp_addr("side").unwrap();
        assert_eq!(get_once(side, "/").await.status, 200);
        assert_eq!(get_once(t.addr(), "/").await.status, 200);
    })
    .await;
}

/// Polls the async `condition` until it holds; panics after [`PATIENCE`].
async fn eventually_async<F, Fut>(mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !condition().await {
        assert!(tokio::time::Instant::now() < deadline, "condition not met");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// `method path` on the admin server; status and body.
async fn admin_call(admin: SocketAddr, method: &str, path: &str) -> (u16, String) {
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    );
    let response = Client::connect(admin)
        .await
        .request(request.as_bytes())
        .await;
    (response.status, response.text())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_level_changes_through_the_admin_server_and_on_reload() {
    let (tether, base, _backends) = ready_binary().await;
    let admin = tether.admin();
    assert_eq!(
        admin_call(admin, "GET", "/logging").await,
        (200, "level: info\n".into())
    );
    let (status, _) = admin_call(admin, "POST", "/logging?level=bogus=[").await;
    assert_eq!(status, 400);

    let (status, body) = admin_call(admin, "POST", "/logging?level=debug").await;
    assert_eq!((status, body.as_str()), (200, "level: debug\n"));
    assert_eq!(get_once(tether.listen, "/").await.status, 200);
    // A debug event of the client connection: off at `info`.
    tether.wait_for_log("client connection ended");

    let mut quiet = base.clone();
    quiet.log.level = "warn".into();
    write_renamed(&tether.dir().join("tether.toml"), &quiet);
    let (status, report) = post_reload(admin).await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(
        admin_call(admin, "GET", "/logging").await.1,
        "level: warn\n"
    );
    assert!(tether.stop().success());
}

#[tokio::test]
async fn a_unix_listener_renamed_onto_its_own_path_keeps_the_socket_file() {
    let backend = Backend::start().await;
    let dir = TempDir::new("reload-unix");
    let path = dir.path().join("app.sock");
    let mut base = default_config(backend.addr);
    let mut unix = base.listeners[0].clone();
    unix.name = "old-name".into();
    unix.listen = tether::config::ListenAddr::Unix(path.clone());
    base.listeners.push(unix);
    let ask = |path: std::path::PathBuf| async move {
        let mut stream = tokio::net::UnixStream::connect(&path).await.unwrap();
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await.unwrap();
        String::from_utf8_lossy(&answer).into_owned()
    };
    with_tether(base.clone(), |t| async move {
        assert!(ask(path.clone()).await.starts_with("HTTP/1.1 200"));
        let mut next = base.clone();
        next.listeners[1].name = "new-name".into();
        let report = t.reload(next).await;
        assert_eq!(report.result, tether::app::Outcome::Applied, "{report:?}");
        // The old listener's loop has ended by the time its name is gone.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            path.exists(),
            "the old listener removed the new one's socket file"
        );
        assert!(ask(path.clone()).await.starts_with("HTTP/1.1 200"));
    })
    .await;
}
