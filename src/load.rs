//! A load client that behaves like a legacy app: a new TCP connection for every
//! request, the response read by its Content-Length, then the client closes
//! first (as curl and python requests do). Used by `tether demo`.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Failures of the load client itself.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// A response could not be parsed.
    #[error("malformed response: {0}")]
    Malformed(&'static str),
    /// The socket failed.
    #[error(transparent)]
    Io(#[from] io::Error),
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
#[derive(Debug, Clone, PartialEq)]
pub struct LoadReport {
    /// Requests answered with a 2xx.
    pub requests: u64,
    /// Requests that failed.
    pub errors: u64,
    /// Successful requests per second.
    pub rps: f64,
    /// Median latency of successful requests, milliseconds.
    pub p50_ms: f64,
    /// 99th percentile latency of successful requests, milliseconds.
    pub p99_ms: f64,
    /// The most common error, if any.
    pub first_error: Option<String>,
}

/// Runs `concurrency` clients against `target` for `duration`.
pub async fn run(
    target: SocketAddr,
    concurrency: usize,
    duration: Duration,
    progress: Arc<Progress>,
) -> LoadReport {
    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = Vec::with_capacity(concurrency);
    for _ in 0..concurrency.max(1) {
        let progress = progress.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut first_error = None;
            while Instant::now() < deadline {
                let begun = Instant::now();
                match one_request(target).await {
                    Ok(()) => {
                        latencies.push(begun.elapsed());
                        progress.ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        progress.errors.fetch_add(1, Ordering::Relaxed);
                        first_error.get_or_insert_with(|| e.to_string());
                        // Back off a little so a refused port is not hammered.
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                }
            }
            (latencies, first_error)
        }));
    }
    let mut latencies = Vec::new();
    let mut first_error = None;
    for task in tasks {
        if let Ok((mut l, e)) = task.await {
            latencies.append(&mut l);
            if first_error.is_none() {
                first_error = e;
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
        errors: progress.errors.load(Ordering::Relaxed),
        rps: latencies.len() as f64 / elapsed.max(f64::EPSILON),
        p50_ms: percentile(0.50),
        p99_ms: percentile(0.99),
        first_error,
    }
}

/// One request on a new connection: write, read the head and a Content-Length
/// body, then close first.
pub async fn one_request(target: SocketAddr) -> Result<(), LoadError> {
    let stream = TcpStream::connect(target).await?;
    stream.set_nodelay(true)?;
    let mut reader = BufReader::new(stream);
    reader
        .get_mut()
        .write_all(b"GET / HTTP/1.1\r\nHost: demo\r\nUser-Agent: tether-demo\r\n\r\n")
        .await?;
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
    // Dropping the stream closes it: the client is the first to close.
    Ok(())
}
