//! Calling HTTPS APIs through tether, as the README and the examples say:
//! `tether run` on a config derived from `config/http-proxy-https.toml` or
//! `config/https-api.toml` (the same listeners, routes and upstreams; the
//! listen addresses, endpoints, trust anchors and server names pointed at a
//! test API), and the app-side examples under `examples/` (Python's
//! `requests`; PHP's curl extension and `file_get_contents`) run several
//! times each, a new process and connection per run as a legacy app's calls
//! are. The API is an in-process HTTPS backend (rustls, certificates from
//! `common::tls` for the names the example verifies) that records each
//! request's SNI, target, Host and X-Forwarded-For and counts TLS
//! handshakes. The README's section shows configs that load as written.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::TcpListener;

use common::*;
use tether::config::{Config, ListenAddr};

/// One request as the API saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    /// The name tether sent as SNI.
    sni: String,
    /// The request target.
    target: String,
    host: String,
    x_forwarded_for: String,
}

/// The test API: HTTPS on loopback, answering every request with
/// [`answer`].
struct Api {
    addr: SocketAddr,
    handshakes: Arc<AtomicUsize>,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Api {
    async fn start(pki: &Pki) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(pki.server_config(false, false));
        let handshakes = Arc::new(AtomicUsize::new(0));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (count, record) = (handshakes.clone(), seen.clone());
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, count, record) = (acceptor.clone(), count.clone(), record.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    count.fetch_add(1, Ordering::SeqCst);
                    let sni = tls.get_ref().1.server_name().unwrap_or("").to_owned();
                    serve(tls, sni, record).await;
                });
            }
        });
        Self {
            addr,
            handshakes,
            seen,
        }
    }

    fn handshakes(&self) -> usize {
        self.handshakes.load(Ordering::SeqCst)
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

/// What the API answers a request for `path` that reached it as `sni`.
fn answer(sni: &str, path: &str) -> String {
    format!(r#"{{"api":"{sni}","path":"{path}"}}"#)
}

/// Serves one TLS connection with hyper, keep-alive, recording every request.
async fn serve(
    tls: tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    sni: String,
    record: Arc<Mutex<Vec<Seen>>>,
) {
    let service = hyper::service::service_fn(move |request: hyper::Request<_>| {
        let header = |name: &str| {
            let value = request.headers().get(name).and_then(|h| h.to_str().ok());
            value.unwrap_or("").to_owned()
        };
        record.lock().unwrap().push(Seen {
            sni: sni.clone(),
            target: request.uri().to_string(),
            host: header("host"),
            x_forwarded_for: header("x-forwarded-for"),
        });
        let body = answer(&sni, request.uri().path());
        async move {
            Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(Bytes::from(body))))
        }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(tls), service)
        .await;
}

/// The example `config/NAME`.
fn example(name: &str) -> Config {
    Config::load(&repo().join("config").join(name), std::iter::empty())
        .unwrap_or_else(|e| panic!("config/{name}: {e}"))
}

/// The name each upstream of `config` verifies: its `server_name`, else its
/// first endpoint's host.
fn verified_names(config: &Config) -> Vec<String> {
    config
        .upstreams
        .iter()
        .map(|u| {
            let tls = u
                .tls
                .as_ref()
                .expect("every upstream of the example is TLS");
            tls.server_name.clone().unwrap_or_else(|| {
                let (host, _) = u.endpoints[0].rsplit_once(':').unwrap();
                host.to_owned()
            })
        })
        .collect()
}

/// `config` pointed at the test API: every listener on an ephemeral port
/// (of 127.0.0.1, 127.0.0.2, …), every upstream's endpoints replaced by
/// `api`, trusting the test CA only and verifying the name the example
/// verifies; the admin server on an ephemeral port, the access log (when the
/// example writes one) in `dir`. Two workers, so the warm floor is the same
/// on any machine.
fn pointed_at(mut config: Config, api: SocketAddr, pki: &Pki, dir: &Path) -> Config {
    let names = verified_names(&config);
    for (i, listener) in config.listeners.iter_mut().enumerate() {
        // Port 0 twice on one address is one port asked for twice.
        let addr = SocketAddr::from(([127, 0, 0, 1 + i as u8], 0));
        listener.listen = ListenAddr::Tcp(addr);
    }
    for (upstream, name) in config.upstreams.iter_mut().zip(names) {
        upstream.endpoints = vec![api.to_string()];
        let tls = upstream.tls.as_mut().unwrap();
        tls.ca = vec![pki.ca_file()];
        tls.server_name = Some(name);
    }
    config.admin.listen = "127.0.0.1:0".parse().unwrap();
    if config.log.access.enabled {
        config.log.access.path = Some(access_log(dir));
    }
    config.runtime.worker_threads = 2;
    config.validate().unwrap();
    config
}

fn access_log(dir: &Path) -> PathBuf {
    dir.join("access.log")
}

/// The example, its test API and tether in front of it, ready: every
/// upstream's warm floor open, and the API's side of each handshake done.
struct Setup {
    config: Config,
    api: Api,
    tether: TetherProcess,
    /// Where the access log goes.
    dir: TempDir,
    _pki: Pki,
}

impl Setup {
    async fn start(name: &str) -> Self {
        let example = example(name);
        let names = verified_names(&example);
        let pki = Pki::for_names(
            "tether-https-app",
            &names.iter().map(String::as_str).collect::<Vec<_>>(),
        );
        let api = Api::start(&pki).await;
        let dir = TempDir::new("tether-https-app-log");
        let config = pointed_at(example, api.addr, &pki, dir.path());
        let tether = TetherProcess::start(&config);
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while get_once(tether.admin(), "/readyz").await.status != 200 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "tether never became ready"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let setup = Self {
            config,
            api,
            tether,
            dir,
            _pki: pki,
        };
        eventually(|| setup.api.handshakes() == setup.floor()).await;
        setup
    }

    /// The TLS connections the warm floor opens: per endpoint `min_idle`,
    /// at least one per worker.
    fn floor(&self) -> usize {
        let workers = self.config.runtime.worker_threads;
        self.config
            .upstreams
            .iter()
            .map(|u| u.endpoints.len() * u.pool.min_idle.max(workers))
            .sum()
    }

    async fn admin(&self, path: &str) -> String {
        get_once(self.tether.admin(), path).await.text()
    }

    /// Asserts that the runs cost no handshake: the API completed only the
    /// warm floor's, `before` was its count when the runs started, and
    /// tether's metrics count the same; `/pools` shows each upstream's
    /// pooled connections reused for every one of its `runs` and carrying
    /// them all, none opened on demand.
    async fn assert_pooled(&self, before: usize, runs: &[(&str, usize)]) {
        let handshakes = self.api.handshakes();
        let total: usize = runs.iter().map(|(_, n)| n).sum();
        println!("{total} runs, {handshakes} TLS handshakes");
        assert_eq!(handshakes, before, "a run cost a TLS handshake");
        assert!(handshakes <= self.floor(), "{handshakes} handshakes");
        assert!(total >= 3 * handshakes, "{total} runs are too few to tell");

        let metrics = self.admin("/metrics").await;
        let counted: f64 = self
            .config
            .upstreams
            .iter()
            .flat_map(|u| ["full", "resumed"].map(|kind| (u.name.clone(), kind)))
            .map(|(upstream, kind)| {
                let series = format!(
                    "tether_upstream_tls_handshakes_total{{upstream=\"{upstream}\",kind=\"{kind}\"}}"
                );
                metrics
                    .lines()
                    .find(|l| l.starts_with(&series))
                    .map_or(0.0, |_| series_value(&metrics, &series))
            })
            .sum();
        assert_eq!(counted as usize, handshakes, "{metrics}");

        let pools: Value = serde_json::from_str(&self.admin("/pools").await).unwrap();
        for (upstream, expected) in runs {
            let pool = pools
                .as_array()
                .unwrap()
                .iter()
                .find(|p| p["upstream"] == *upstream)
                .unwrap_or_else(|| panic!("no pool {upstream}: {pools:#}"));
            let endpoint = &pool["endpoints"][0];
            assert_eq!(endpoint["opened"]["demand"], 0, "{endpoint:#}");
            assert_eq!(endpoint["reused"], *expected as u64, "{endpoint:#}");
            let carried: u64 = endpoint["connections"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c["requests"].as_u64().unwrap())
                .sum();
            assert_eq!(carried, *expected as u64, "{endpoint:#}");
        }
    }
}

/// An example app under `examples/`, run once as `program`, with `proxy`
/// as its `http_proxy` (or none) and no other proxy variable set.
async fn run_app(program: &str, file: &str, args: &[&str], proxy: Option<&str>) -> Output {
    let mut command = tokio::process::Command::new(program);
    command.arg(repo().join("examples").join(file)).args(args);
    for name in [
        "http_proxy",
        "HTTP_PROXY",
        "https_proxy",
        "HTTPS_PROXY",
        "all_proxy",
        "ALL_PROXY",
        "no_proxy",
        "NO_PROXY",
    ] {
        command.env_remove(name);
    }
    if let Some(proxy) = proxy {
        command.env("http_proxy", proxy);
    }
    tokio::time::timeout(PATIENCE, command.output())
        .await
        .unwrap_or_else(|_| panic!("{program} {file} did not finish"))
        .unwrap_or_else(|e| {
            panic!("cannot run {program} ({e}): .ci/run installs python3 with requests, php-cli and php-curl")
        })
}

/// Asserts that a run succeeded and printed the API's answer to `path`
/// reached as `sni`.
#[track_caller]
fn printed_answer(out: &Output, sni: &str, path: &str) {
    assert!(out.status.success(), "{}\n{}", out.status, printed(out));
    let expected = format!("200\n{}\n", answer(sni, path));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        expected,
        "{}",
        printed(out)
    );
}

/// The access log's request lines (the lines of client connections that
/// ended after their exchange left out).
fn request_lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str::<Value>(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .filter(|line| line["kind"] == "request")
        .collect()
}

/// What an app with `http_proxy` calls through `config/http-proxy-https.toml`:
/// (host, upstream), as its routes say.
const ROUTED: [(&str, &str); 2] = [
    ("api.example.com", "example-api"),
    ("payments.example.net", "payments"),
];

/// `setup`'s egress address, once its routes are checked to be [`ROUTED`].
fn egress(setup: &Setup) -> String {
    let listener = &setup.config.listeners[0];
    let routes: Vec<(String, &str)> = listener
        .routes
        .iter()
        .map(|r| (r.host.to_string(), r.upstream.as_str()))
        .collect();
    let expected: Vec<(String, &str)> = ROUTED.iter().map(|(h, u)| (h.to_string(), *u)).collect();
    assert_eq!(routes, expected, "the example's routes changed");
    format!("http://{}", setup.tether.listener_addr(&listener.name))
}

/// `call_api.py` with `http_proxy` set to tether, a new process per call,
/// to both APIs the routes name: every run prints the API's answer; the API
/// sees origin-form targets, the Host and SNI of the name the app called,
/// the app's address in X-Forwarded-For, and no TLS handshake beyond the
/// warm floor's; the access log names the upstream of every run. An `https://` URL is refused
/// by the example itself, with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_requests_with_http_proxy_reach_https_apis_over_pooled_tls() {
    let setup = Setup::start("http-proxy-https.toml").await;
    let proxy = egress(&setup);
    let before = setup.api.handshakes();
    let mut expected = Vec::new();
    for run in 0..12 {
        let (host, _) = ROUTED[usize::from(run % 3 == 2)];
        let path = format!("/v1/status/{run}");
        let url = format!("http://{host}{path}?run={run}");
        let out = run_app("python3", "python/call_api.py", &[&url], Some(&proxy)).await;
        printed_answer(&out, host, &path);
        expected.push(Seen {
            sni: host.to_owned(),
            target: format!("{path}?run={run}"),
            host: host.to_owned(),
            x_forwarded_for: "127.0.0.1".to_owned(),
        });
    }
    assert_eq!(setup.api.seen(), expected);
    setup
        .assert_pooled(before, &[(ROUTED[0].1, 8), (ROUTED[1].1, 4)])
        .await;

    let log = access_log(setup.dir.path());
    let mut lines = Vec::new();
    eventually(|| {
        lines = request_lines(&log);
        lines.len() >= 12
    })
    .await;
    for (run, line) in lines.iter().enumerate() {
        let (host, upstream) = ROUTED[usize::from(run % 3 == 2)];
        assert_eq!(line["upstream"], upstream, "{line}");
        assert_eq!(line["status"], 200, "{line}");
        // A pooled connection, no connect or handshake for this request.
        assert_eq!(line["reused"], true, "{line}");
        assert_eq!(line["connect_ms"], 0.0, "{line}");
        // The target as the app sent it: absolute form.
        let target = format!("http://{host}/v1/status/{run}?run={run}");
        assert_eq!(line["target"], target.as_str(), "{line}");
    }

    let out = run_app(
        "python3",
        "python/call_api.py",
        &["https://api.example.com/v1/status"],
        Some(&proxy),
    )
    .await;
    assert!(!out.status.success());
    let told = String::from_utf8_lossy(&out.stderr);
    assert!(
        told.contains("call http://api.example.com/v1/status"),
        "{told}"
    );
    assert_eq!(setup.api.seen().len(), 12);
}

/// `call_api.php` with `http_proxy` set to tether (the curl extension, which
/// reads it from the environment) and with `--proxy` (file_get_contents with
/// a stream context, HTTP/1.0), a new process per call: every run prints the
/// API's answer, the API sees origin-form targets with the Host and SNI of
/// the name called, and no TLS handshake beyond the warm floor's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn php_curl_and_streams_with_http_proxy_reach_https_apis_over_pooled_tls() {
    let setup = Setup::start("http-proxy-https.toml").await;
    let proxy = egress(&setup);
    let before = setup.api.handshakes();
    let mut expected = Vec::new();
    for run in 0..12 {
        let (host, _) = ROUTED[usize::from(run % 3 == 2)];
        let path = format!("/v1/invoices/{run}");
        let url = format!("http://{host}{path}");
        let out = if run % 2 == 0 {
            run_app("php", "php/call_api.php", &[&url], Some(&proxy)).await
        } else {
            let args = ["--streams", "--proxy", &proxy, &url];
            run_app("php", "php/call_api.php", &args, None).await
        };
        printed_answer(&out, host, &path);
        expected.push(Seen {
            sni: host.to_owned(),
            target: path,
            host: host.to_owned(),
            x_forwarded_for: "127.0.0.1".to_owned(),
        });
    }
    assert_eq!(setup.api.seen(), expected);
    setup
        .assert_pooled(before, &[(ROUTED[0].1, 8), (ROUTED[1].1, 4)])
        .await;
}

/// `config/https-api.toml`, a port per API: `call_api.py` and `call_api.php`
/// (curl) call `http://127.0.0.1:PORT/…`, a new process per call, and name
/// the API in Host themselves (`--host`); the API sees the origin-form
/// target, that Host and the SNI of the port's upstream, and no TLS
/// handshake beyond the warm floor's. A call that names nothing arrives with
/// the Host the app sent: tether's listener address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_per_api_forwards_the_apps_host_over_pooled_tls() {
    let setup = Setup::start("https-api.toml").await;
    // Per listener: its address, its upstream and the name that verifies.
    let listeners: Vec<(SocketAddr, &str, String)> = setup
        .config
        .listeners
        .iter()
        .map(|l| {
            let upstream = setup.config.upstreams.iter().find(|u| u.name == l.upstream);
            let tls = upstream.unwrap().tls.as_ref().unwrap();
            let name = tls.server_name.clone().unwrap();
            (
                setup.tether.listener_addr(&l.name),
                l.upstream.as_str(),
                name,
            )
        })
        .collect();
    assert_eq!(listeners.len(), 2, "the example's listeners changed");
    let before = setup.api.handshakes();
    let mut expected = Vec::new();
    for run in 0..12 {
        let (addr, _, name) = &listeners[usize::from(run % 3 == 2)];
        let path = format!("/v1/orders/{run}");
        let url = format!("http://{addr}{path}");
        let args = ["--host", name.as_str(), url.as_str()];
        let out = if run % 2 == 0 {
            run_app("python3", "python/call_api.py", &args, None).await
        } else {
            run_app("php", "php/call_api.php", &args, None).await
        };
        printed_answer(&out, name, &path);
        expected.push(Seen {
            sni: name.clone(),
            target: path,
            host: name.clone(),
            x_forwarded_for: "127.0.0.1".to_owned(),
        });
    }
    assert_eq!(setup.api.seen(), expected);
    setup
        .assert_pooled(before, &[(listeners[0].1, 8), (listeners[1].1, 4)])
        .await;

    let (addr, _, name) = &listeners[0];
    let out = run_app(
        "python3",
        "python/call_api.py",
        &[&format!("http://{addr}/v1/orders")],
        None,
    )
    .await;
    printed_answer(&out, name, "/v1/orders");
    let last = setup.api.seen().pop().unwrap();
    assert_eq!(last.host, addr.to_string(), "{last:?}");
}

/// The README's section on HTTPS APIs shows configs that load as they are,
/// and names the example files this test runs.
#[test]
fn the_readmes_https_section_shows_whole_configs_and_the_examples() {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let section = readme
        .split("\n## ")
        .find(|part| part.starts_with("Calling HTTPS APIs"))
        .expect("README has a section on calling HTTPS APIs");
    let snippets: Vec<&str> = section
        .split("```toml\n")
        .skip(1)
        .map(|rest| rest.split("```").next().unwrap())
        .collect();
    assert_eq!(snippets.len(), 2, "one config per set-up");
    for snippet in snippets {
        let config = Config::from_toml(snippet).unwrap_or_else(|e| panic!("{e}:\n{snippet}"));
        assert!(
            config.upstreams.iter().all(|u| u.tls.is_some()),
            "{snippet}"
        );
    }
    for file in [
        "config/https-api.toml",
        "config/http-proxy-https.toml",
        "examples/python/call_api.py",
        "examples/php/call_api.php",
    ] {
        assert!(
            section.contains(&format!("`{file}`")),
            "README does not name {file}"
        );
        assert!(repo().join(file).is_file(), "{file}");
    }
}
