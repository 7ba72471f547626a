//! A load client that behaves like the apps tether sits beside. Three modes:
//! a new connection per request where the client closes first after reading a
//! Content-Length body (curl, python requests); HTTP/1.0 per request, reading
//! until the server closes (ab, PHP's `file_get_contents`); and keep-alive
//! clients. Used by `tether demo` and by `tether load` (the benchmark client).

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Failures of one request.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// A response could not be parsed.
    #[error("malformed response: {0}")]
    Malformed(&'static str),
    /// The socket failed.
    #[error(transparent)]
    Io(#[from] io::Error),
}

impl LoadError {
    /// A short label for error counts: the errno name for socket errors.
    pub fn label(&self) -> String {
        match self {
            Self::Malformed(what) => (*what).to_owned(),
            Self::Io(e) => match e.raw_os_error() {
                Some(libc::EADDRNOTAVAIL) => "EADDRNOTAVAIL".to_owned(),
                Some(libc::ECONNREFUSED) => "ECONNREFUSED".to_owned(),
                Some(libc::ECONNRESET) => "ECONNRESET".to_owned(),
                Some(libc::ETIMEDOUT) => "ETIMEDOUT".to_owned(),
                Some(libc::EPIPE) => "EPIPE".to_owned(),
                Some(n) => format!("errno {n}"),
                None => format!("{:?}", e.kind()),
            },
        }
    }
}

/// How each client talks to the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// New connection per request; read the Content-Length body; close first.
    #[default]
    CloseFirst,
    /// New HTTP/1.0 connection per request; read until the server closes.
    Http10,
    /// One keep-alive connection per client, reused for every request.
    KeepAlive,
}

/// Counters a running load updates, readable while it runs (progress lines).
#[derive(Debug, Default)]
pub struct Progress {
    /// Requests answered with a 2xx.
    pub ok: AtomicU64,
    /// Requests that failed (connect error, reset, non-2xx).
    pub errors: AtomicU64,
}

/// What a load run measured.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LoadReport {
    /// Requests answered with a 2xx.
    pub requests: u64,
    /// Requests that failed.
    pub errors: u64,
    /// Failed requests by cause (errno name or parse failure).
    pub errors_by_kind: BTreeMap<String, u64>,
    /// Successful requests per second.
    pub rps: f64,
    /// Median latency of successful requests, milliseconds.
    pub p50_ms: f64,
    /// 99th percentile latency, milliseconds.
    pub p99_ms: f64,
    /// 99.9th percentile latency, milliseconds.
    pub p999_ms: f64,
    /// The first error seen, in full.
    pub first_error: Option<String>,
    /// When the first error happened, in seconds from the start of the run
    /// (how long until a host ran out of ports, say).
    pub first_error_after_s: Option<f64>,
}

/// What to run.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    /// Where to send requests.
    pub target: SocketAddr,
    /// How clients connect.
    pub mode: Mode,
    /// Concurrent clients.
    pub concurrency: usize,
    /// How long to run.
    pub duration: Duration,
    /// Request target.
    pub path: String,
}

/// Runs `concurrency` close-first clients against `target` for `duration`.
pub async fn run(
    target: SocketAddr,
    concurrency: usize,
    duration: Duration,
    progress: Arc<Progress>,
) -> LoadReport {
    let spec = LoadSpec {
        target,
        mode: Mode::CloseFirst,
        concurrency,
        duration,
        path: "/".to_owned(),
    };
    run_spec(&spec, progress).await
}

/// Runs a load as `spec` describes.
pub async fn run_spec(spec: &LoadSpec, progress: Arc<Progress>) -> LoadReport {
    let started = Instant::now();
    let deadline = started + spec.duration;
    let request: Arc<[u8]> = match spec.mode {
        Mode::Http10 => format!(
            "GET {} HTTP/1.0\r\nUser-Agent: tether-load\r\n\r\n",
            spec.path
        ),
        _ => format!(
            "GET {} HTTP/1.1\r\nHost: load\r\nUser-Agent: tether-load\r\n\r\n",
            spec.path
        ),
    }
    .into_bytes()
    .into();
    let mut tasks = Vec::with_capacity(spec.concurrency);
    for _ in 0..spec.concurrency.max(1) {
        let progress = progress.clone();
        let request = request.clone();
        let (target, mode) = (spec.target, spec.mode);
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut errors: BTreeMap<String, u64> = BTreeMap::new();
            let mut first_error = None;
            let mut kept: Option<BufReader<TcpStream>> = None;
            while Instant::now() < deadline {
                let begun = Instant::now();
                let outcome = match mode {
                    Mode::CloseFirst => close_first(target, &request).await,
                    Mode::Http10 => http10(target, &request).await,
                    Mode::KeepAlive => keep_alive(target, &request, &mut kept).await,
                };
                match outcome {
                    Ok(()) => {
                        latencies.push(begun.elapsed());
                        progress.ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        progress.errors.fetch_add(1, Ordering::Relaxed);
                        *errors.entry(e.label()).or_default() += 1;
                        first_error.get_or_insert_with(|| (begun, e.to_string()));
                        kept = None;
                        // Back off a little so a refused port is not hammered.
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                }
            }
            (latencies, errors, first_error)
        }));
    }
    let mut latencies = Vec::new();
    let mut errors_by_kind: BTreeMap<String, u64> = BTreeMap::new();
    let mut first_error: Option<(Instant, String)> = None;
    for task in tasks {
        if let Ok((mut l, errors, e)) = task.await {
            latencies.append(&mut l);
            for (kind, n) in errors {
                *errors_by_kind.entry(kind).or_default() += n;
            }
            if let Some((at, error)) = e {
                if first_error.as_ref().is_none_or(|(first, _)| at < *first) {
                    first_error = Some((at, error));
                }
            }
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    latencies.sort_unstable();
    let percentile = |p: f64| -> f64 {
        if latencies.is_empty() {
            return 0.0;
        }
        let index = ((latencies.len() as f64 - 1.0) * p).round() as usize;
        latencies[index.min(latencies.len() - 1)].as_secs_f64() * 1000.0
    };
    LoadReport {
        requests: latencies.len() as u64,
        errors: errors_by_kind.values().sum(),
        errors_by_kind,
        rps: latencies.len() as f64 / elapsed.max(f64::EPSILON),
        p50_ms: percentile(0.50),
        p99_ms: percentile(0.99),
        p999_ms: percentile(0.999),
        first_error_after_s: first_error
            .as_ref()
            .map(|(at, _)| at.duration_since(started).as_secs_f64()),
        first_error: first_error.map(|(_, error)| error),
    }
}

/// TCP connections this network namespace has opened (`ActiveOpens` in
/// /proc/net/snmp): proof that a per-request mode opened one per request.
pub fn active_opens() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/net/snmp").ok()?;
    let mut tcp = text.lines().filter(|l| l.starts_with("Tcp:"));
    let names = tcp.next()?;
    let values = tcp.next()?;
    let index = names.split_whitespace().position(|n| n == "ActiveOpens")?;
    values.split_whitespace().nth(index)?.parse().ok()
}

/// One request on a new connection: write, read the head and a Content-Length
/// body, then close first.
pub async fn one_request(target: SocketAddr) -> Result<(), LoadError> {
    close_first(
        target,
        b"GET / HTTP/1.1\r\nHost: demo\r\nUser-Agent: tether-demo\r\n\r\n",
    )
    .await
}

async fn close_first(target: SocketAddr, request: &[u8]) -> Result<(), LoadError> {
    let stream = TcpStream::connect(target).await?;
    stream.set_nodelay(true)?;
    let mut reader = BufReader::new(stream);
    reader.get_mut().write_all(request).await?;
    read_response(&mut reader).await
    // Dropping the stream closes it: the client is the first to close.
}

async fn http10(target: SocketAddr, request: &[u8]) -> Result<(), LoadError> {
    let mut stream = TcpStream::connect(target).await?;
    stream.set_nodelay(true)?;
    stream.write_all(request).await?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await?;
    let ok = response
        .split(|b| *b == b' ')
        .nth(1)
        .is_some_and(|status| status.first() == Some(&b'2'));
    if ok {
        Ok(())
    } else if response.is_empty() {
        Err(LoadError::Malformed("connection closed before a response"))
    } else {
        Err(LoadError::Malformed("non-2xx status"))
    }
}

async fn keep_alive(
    target: SocketAddr,
    request: &[u8],
    kept: &mut Option<BufReader<TcpStream>>,
) -> Result<(), LoadError> {
    if kept.is_none() {
        let stream = TcpStream::connect(target).await?;
        stream.set_nodelay(true)?;
        *kept = Some(BufReader::new(stream));
    }
    let Some(reader) = kept.as_mut() else {
        return Err(LoadError::Malformed("no connection"));
    };
    reader.get_mut().write_all(request).await?;
    read_response(reader).await
}

async fn read_response(reader: &mut BufReader<TcpStream>) -> Result<(), LoadError> {
    let mut line = String::new();
    if reader.read_line(&mut line).await? == 0 {
        return Err(LoadError::Malformed("connection closed before a response"));
    }
    let ok = line.split(' ').nth(1).is_some_and(|s| s.starts_with('2'));
    let mut length = None;
    loop {
        line.clear();
        if reader.read_line(&mut line).await? == 0 {
            return Err(LoadError::Malformed("connection closed inside the head"));
        }
        let header = line.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse::<usize>().ok();
            }
        }
    }
    let length = length.ok_or(LoadError::Malformed("no Content-Length"))?;
    let mut body = vec![0u8; length];
    reader.read_exact(&mut body).await?;
    if !ok {
        return Err(LoadError::Malformed("non-2xx status"));
    }
    Ok(())
}
