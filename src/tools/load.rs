//! A load client that behaves like the apps tether sits beside. Three modes:
//! a new connection per request where the client closes first after reading a
//! Content-Length body (curl, python requests); HTTP/1.0 per request, reading
//! until the server closes (ab, PHP's `file_get_contents`); and keep-alive
//! clients. Used by `tether demo` and by `tether load` (the benchmark client).
//! Its HTTP/1 response reader ([`read_response`]) is public: the integration
//! tests read tether's answers with the same code the load client trusts.

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
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
    let request = request_for(spec);
    let clients: Vec<_> = (0..spec.concurrency.max(1))
        .map(|_| {
            tokio::spawn(client(
                spec.target,
                spec.mode,
                request.clone(),
                deadline,
                progress.clone(),
            ))
        })
        .collect();
    let mut tally = Tally::default();
    for client in clients {
        if let Ok(one) = client.await {
            tally.merge(one);
        }
    }
    tally.report(started)
}

/// The request every client sends, in the mode's HTTP version.
fn request_for(spec: &LoadSpec) -> Arc<[u8]> {
    match spec.mode {
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
    .into()
}

/// One client: requests one after another until `deadline`.
async fn client(
    target: SocketAddr,
    mode: Mode,
    request: Arc<[u8]>,
    deadline: Instant,
    progress: Arc<Progress>,
) -> Tally {
    let mut tally = Tally::default();
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
                tally.latencies.push(begun.elapsed());
                progress.ok.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                progress.errors.fetch_add(1, Ordering::Relaxed);
                tally.error(begun, &e);
                kept = None;
                // Back off a little so a refused port is not hammered.
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    }
    tally
}

/// What one client, or all of them, measured.
#[derive(Default)]
struct Tally {
    latencies: Vec<Duration>,
    errors: BTreeMap<String, u64>,
    first_error: Option<(Instant, String)>,
}

impl Tally {
    fn error(&mut self, at: Instant, error: &LoadError) {
        *self.errors.entry(error.label()).or_default() += 1;
        self.first_error
            .get_or_insert_with(|| (at, error.to_string()));
    }

    fn merge(&mut self, mut other: Tally) {
        self.latencies.append(&mut other.latencies);
        for (kind, n) in other.errors {
            *self.errors.entry(kind).or_default() += n;
        }
        if let Some((at, error)) = other.first_error {
            if self
                .first_error
                .as_ref()
                .is_none_or(|(first, _)| at < *first)
            {
                self.first_error = Some((at, error));
            }
        }
    }

    fn report(mut self, started: Instant) -> LoadReport {
        let elapsed = started.elapsed().as_secs_f64();
        let latencies = &mut self.latencies;
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
            errors: self.errors.values().sum(),
            rps: latencies.len() as f64 / elapsed.max(f64::EPSILON),
            p50_ms: percentile(0.50),
            p99_ms: percentile(0.99),
            p999_ms: percentile(0.999),
            first_error_after_s: self
                .first_error
                .as_ref()
                .map(|(at, _)| at.duration_since(started).as_secs_f64()),
            first_error: self.first_error.map(|(_, error)| error),
            errors_by_kind: self.errors,
        }
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

/// A new connection to `target`, Nagle off (requests are single writes).
async fn dial(target: SocketAddr) -> Result<BufReader<TcpStream>, LoadError> {
    let stream = TcpStream::connect(target).await?;
    stream.set_nodelay(true)?;
    Ok(BufReader::new(stream))
}

async fn close_first(target: SocketAddr, request: &[u8]) -> Result<(), LoadError> {
    let mut reader = dial(target).await?;
    reader.get_mut().write_all(request).await?;
    read_by_length(&mut reader).await
    // Dropping the stream closes it: the client is the first to close.
}

async fn http10(target: SocketAddr, request: &[u8]) -> Result<(), LoadError> {
    let mut reader = dial(target).await?;
    reader.get_mut().write_all(request).await?;
    let response = read_response(&mut reader, false).await?;
    // Like ab: the exchange is over when the server closes.
    reader.read_to_end(&mut Vec::new()).await?;
    success(&response)
}

async fn keep_alive(
    target: SocketAddr,
    request: &[u8],
    kept: &mut Option<BufReader<TcpStream>>,
) -> Result<(), LoadError> {
    if kept.is_none() {
        *kept = Some(dial(target).await?);
    }
    let Some(reader) = kept.as_mut() else {
        return Err(LoadError::Malformed("no connection"));
    };
    reader.get_mut().write_all(request).await?;
    read_by_length(reader).await
}

/// Reads a response whose body has a Content-Length, as curl or python
/// requests would before closing first or sending the next request.
async fn read_by_length<R: AsyncBufRead + Unpin>(reader: &mut R) -> Result<(), LoadError> {
    let mut response = read_head(reader).await?;
    let framing @ Framing::Length(_) = response.framing(false)? else {
        return Err(LoadError::Malformed("no Content-Length"));
    };
    read_body(reader, &mut response, framing).await?;
    success(&response)
}

fn success(response: &Response) -> Result<(), LoadError> {
    if response.is_success() {
        Ok(())
    } else {
        Err(LoadError::Malformed("non-2xx status"))
    }
}

/// An HTTP/1 response as read off a socket: what `tether load` checks, and what
/// tether's integration tests assert on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Response {
    /// The status line's version token (`HTTP/1.1`).
    pub version: String,
    /// The status code; 0 when the status line has none.
    pub status: u16,
    /// The header fields in order, names lowercased, values trimmed.
    pub headers: Vec<(String, String)>,
    /// The body, de-chunked (empty after [`read_head`]).
    pub body: Vec<u8>,
}

/// How a response's body is delimited (RFC 9112, section 6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body: an answer to HEAD, a 1xx, a 204 or a 304.
    Empty,
    /// `Content-Length` bytes.
    Length(usize),
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// Everything until the server closes.
    UntilClose,
}

impl Response {
    /// The first value of header `name`, in any case.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body as text, invalid UTF-8 replaced.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// Whether the status is 2xx.
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// How the body that follows this head is delimited; `to_head` when it
    /// answers a HEAD request.
    pub fn framing(&self, to_head: bool) -> Result<Framing, LoadError> {
        if to_head || (100..200).contains(&self.status) || self.status == 204 || self.status == 304
        {
            return Ok(Framing::Empty);
        }
        if self
            .header("transfer-encoding")
            .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
        {
            return Ok(Framing::Chunked);
        }
        match self.header("content-length") {
            Some(v) => v
                .parse()
                .map(Framing::Length)
                .map_err(|_| LoadError::Malformed("bad Content-Length")),
            None => Ok(Framing::UntilClose),
        }
    }
}

/// Reads one whole response: head, then the body as its head frames it;
/// `to_head` when it answers a HEAD request.
pub async fn read_response<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    to_head: bool,
) -> Result<Response, LoadError> {
    let mut response = read_head(reader).await?;
    let framing = response.framing(to_head)?;
    read_body(reader, &mut response, framing).await?;
    Ok(response)
}

/// Reads a status line and header fields, up to the blank line.
pub async fn read_head<R: AsyncBufRead + Unpin>(reader: &mut R) -> Result<Response, LoadError> {
    let mut line = String::new();
    if reader.read_line(&mut line).await? == 0 {
        return Err(LoadError::Malformed("connection closed before a response"));
    }
    let mut parts = line.trim_end().splitn(3, ' ');
    let mut response = Response {
        version: parts.next().unwrap_or("").to_owned(),
        status: parts.next().and_then(|s| s.parse().ok()).unwrap_or(0),
        ..Response::default()
    };
    loop {
        line.clear();
        if reader.read_line(&mut line).await? == 0 {
            return Err(LoadError::Malformed("connection closed inside the head"));
        }
        let field = line.trim_end();
        if field.is_empty() {
            return Ok(response);
        }
        if let Some((name, value)) = field.split_once(':') {
            response
                .headers
                .push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
        }
    }
}

/// Reads the body that follows `response`'s head into `response.body`.
pub async fn read_body<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    response: &mut Response,
    framing: Framing,
) -> Result<(), LoadError> {
    match framing {
        Framing::Empty => {}
        Framing::Length(n) => {
            let start = response.body.len();
            response.body.resize(start + n, 0);
            reader.read_exact(&mut response.body[start..]).await?;
        }
        Framing::Chunked => read_chunked(reader, &mut response.body).await?,
        Framing::UntilClose => {
            reader.read_to_end(&mut response.body).await?;
        }
    }
    Ok(())
}

/// Reads chunks into `body` up to the last one, then the trailer section.
async fn read_chunked<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    body: &mut Vec<u8>,
) -> Result<(), LoadError> {
    let mut line = String::new();
    loop {
        line.clear();
        reader.read_line(&mut line).await?;
        let size = line.trim().split(';').next().unwrap_or("");
        let size = usize::from_str_radix(size.trim(), 16)
            .map_err(|_| LoadError::Malformed("bad chunk size"))?;
        if size == 0 {
            break;
        }
        let start = body.len();
        body.resize(start + size + 2, 0);
        reader.read_exact(&mut body[start..]).await?;
        if !body.ends_with(b"\r\n") {
            return Err(LoadError::Malformed("chunk longer than its size"));
        }
        body.truncate(start + size);
    }
    loop {
        line.clear();
        if reader.read_line(&mut line).await? == 0 || line.trim_end().is_empty() {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn read(bytes: &[u8], to_head: bool) -> Result<Response, LoadError> {
        read_response(&mut &bytes[..], to_head).await
    }

    #[tokio::test]
    async fn bodies_are_read_as_their_head_frames_them() {
        let by_length = read(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokEXTRA",
            false,
        );
        let by_length = by_length.await.unwrap();
        assert_eq!((by_length.status, by_length.text()), (200, "ok".into()));

        let chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhe\r\n3;x=y\r\nllo\r\n0\r\nTrailer: t\r\n\r\n";
        assert_eq!(read(chunked, false).await.unwrap().text(), "hello");

        let until_close = read(b"HTTP/1.0 200 OK\r\nX-A: b\r\n\r\nall of it", false);
        let until_close = until_close.await.unwrap();
        assert_eq!(until_close.text(), "all of it");
        assert_eq!(until_close.header("x-a"), Some("b"));

        let head = read(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", true);
        assert!(head.await.unwrap().body.is_empty());
        let no_content = read(b"HTTP/1.1 204 No Content\r\n\r\n", false);
        assert!(no_content.await.unwrap().body.is_empty());
    }

    #[tokio::test]
    async fn malformed_responses_say_what_is_wrong() {
        let label = |r: Result<Response, LoadError>| r.unwrap_err().label();
        assert_eq!(
            label(read(b"", false).await),
            "connection closed before a response"
        );
        assert_eq!(
            label(read(b"HTTP/1.1 200 OK\r\nX: y\r\n", false).await),
            "connection closed inside the head"
        );
        let bad_length = b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n";
        assert_eq!(label(read(bad_length, false).await), "bad Content-Length");
        let long_chunk =
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nabc\r\n0\r\n\r\n";
        assert_eq!(
            label(read(long_chunk, false).await),
            "chunk longer than its size"
        );
    }
}
