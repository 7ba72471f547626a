//! A backend that speaks HTTP/1.1 by hand, for tests that must control every
//! byte on the wire: each accepted connection is given to a handler the test
//! writes ([`RawBackend::start`]), which reads requests and writes whatever
//! bytes it likes, as fast or as slowly as it likes. The backend records what
//! it was sent (each request head, its body as framed and decoded), how many
//! connections it accepted, and how each ended that the handler waited on.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::{CancellationToken, DropGuard};

use super::{read_to_end, End};

/// A request as the backend received it.
#[derive(Clone, Debug)]
pub struct RawRequest {
    /// Which accepted connection it came on, from 1.
    pub connection: usize,
    /// The request line and header fields, CRLFs and the empty line included.
    pub head: String,
    /// The body as it was framed on the wire (chunk sizes and trailers
    /// included); empty until the handler reads it.
    pub wire_body: Vec<u8>,
    /// The body once its framing is removed; `None` while the handler has not
    /// read it (or the stream ended inside it).
    pub body: Option<Vec<u8>>,
}

impl RawRequest {
    /// The request line, without its CRLF.
    pub fn request_line(&self) -> &str {
        self.head.lines().next().unwrap_or("")
    }

    /// The method.
    pub fn method(&self) -> &str {
        self.request_line().split(' ').next().unwrap_or("")
    }

    /// The target.
    pub fn target(&self) -> &str {
        self.request_line().split(' ').nth(1).unwrap_or("")
    }

    /// The value of the first field named `name` (any case), trimmed.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|line| {
            let (field, value) = line.split_once(':')?;
            field.eq_ignore_ascii_case(name).then(|| value.trim())
        })
    }

    /// How the body is framed: chunked, so many bytes, or none.
    fn framing(&self) -> Framing {
        let chunked = self
            .header("transfer-encoding")
            .is_some_and(|v| v.to_ascii_lowercase().ends_with("chunked"));
        if chunked {
            return Framing::Chunked;
        }
        match self.header("content-length") {
            Some(length) => Framing::Length(length.parse().expect("a numeric content-length")),
            None => Framing::Length(0),
        }
    }
}

enum Framing {
    Length(usize),
    Chunked,
}

/// What the backend saw, shared by its connections.
#[derive(Default)]
struct Seen {
    accepted: AtomicUsize,
    requests: Mutex<Vec<RawRequest>>,
    /// How connections ended, as [`RawConn::end`] saw it: (connection, end).
    ends: Mutex<Vec<(usize, End)>>,
}

/// The raw backend: a loopback listener whose connections go to the
/// handler; it stops accepting when dropped.
pub struct RawBackend {
    pub addr: SocketAddr,
    seen: Arc<Seen>,
    _stop: DropGuard,
}

impl RawBackend {
    /// Listens on an ephemeral loopback port and runs `handler` on a task of
    /// its own for every connection accepted.
    pub async fn start<F, Fut>(handler: F) -> Self
    where
        F: Fn(RawConn) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Seen::default());
        let stop = CancellationToken::new();
        let (accepting, cancelled) = (seen.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let stream = tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok((stream, _)) => stream,
                        Err(_) => continue,
                    },
                    _ = cancelled.cancelled() => return,
                };
                // Small writes leave at once, so a handler's pauses split
                // the bytes across segments as it means them to be.
                stream.set_nodelay(true).unwrap();
                let number = accepting.accepted.fetch_add(1, Ordering::SeqCst) + 1;
                tokio::spawn(handler(RawConn {
                    number,
                    stream,
                    buf: Vec::new(),
                    reset: false,
                    seen: accepting.clone(),
                }));
            }
        });
        Self {
            addr,
            seen,
            _stop: stop.drop_guard(),
        }
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.seen.accepted.load(Ordering::SeqCst)
    }

    /// Every request received so far, in arrival order.
    pub fn requests(&self) -> Vec<RawRequest> {
        self.seen.requests.lock().unwrap().clone()
    }

    /// The requests received on connection `number`.
    pub fn requests_on(&self, number: usize) -> Vec<RawRequest> {
        let all = self.requests();
        all.into_iter().filter(|r| r.connection == number).collect()
    }

    /// How connection `number` ended, once a handler waited for it
    /// ([`RawConn::end`]).
    pub fn end_of(&self, number: usize) -> Option<End> {
        let ends = self.seen.ends.lock().unwrap();
        ends.iter().find(|(n, _)| *n == number).map(|(_, end)| *end)
    }
}

/// One accepted connection, as its handler drives it.
pub struct RawConn {
    /// Which connection it is, from 1.
    pub number: usize,
    stream: TcpStream,
    /// Bytes read and not yet taken by a request.
    buf: Vec<u8>,
    /// A read or write failed with ECONNRESET: the peer reset it.
    reset: bool,
    seen: Arc<Seen>,
}

impl RawConn {
    /// Reads more into the buffer; false when the peer closed or reset.
    async fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 16 * 1024];
        match self.stream.read(&mut chunk).await {
            Ok(0) => false,
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
            Err(e) => {
                self.note(&e);
                false
            }
        }
    }

    /// Reads the next request head, and nothing of the body after it, and
    /// records the request; `None` when the connection ended first.
    pub async fn read_head(&mut self) -> Option<RawRequest> {
        let end = loop {
            if let Some(at) = find(&self.buf, b"\r\n\r\n") {
                break at + 4;
            }
            if !self.fill().await {
                return None;
            }
        };
        let head = String::from_utf8(self.buf.drain(..end).collect()).expect("an ASCII head");
        let request = RawRequest {
            connection: self.number,
            head,
            wire_body: Vec::new(),
            body: None,
        };
        self.seen.requests.lock().unwrap().push(request.clone());
        Some(request)
    }

    /// Reads the body of `request` (the head [`Self::read_head`] returned)
    /// as its framing says, records it, and returns the request with it;
    /// `None` when the connection ended inside it.
    pub async fn read_body(&mut self, mut request: RawRequest) -> Option<RawRequest> {
        let (wire, body) = match request.framing() {
            Framing::Length(n) => {
                let bytes = self.take(n).await?;
                (bytes.clone(), bytes)
            }
            Framing::Chunked => self.chunked().await?,
        };
        request.wire_body = wire;
        request.body = Some(body);
        let mut requests = self.seen.requests.lock().unwrap();
        if let Some(recorded) = requests
            .iter_mut()
            .rev()
            .find(|r| r.connection == self.number && r.body.is_none())
        {
            *recorded = request.clone();
        }
        Some(request)
    }

    /// Reads the next whole request; `None` when the connection ended first.
    pub async fn read_request(&mut self) -> Option<RawRequest> {
        let head = self.read_head().await?;
        self.read_body(head).await
    }

    /// Exactly `n` bytes.
    async fn take(&mut self, n: usize) -> Option<Vec<u8>> {
        while self.buf.len() < n {
            if !self.fill().await {
                return None;
            }
        }
        Some(self.buf.drain(..n).collect())
    }

    /// One line, its CRLF included.
    async fn line(&mut self) -> Option<Vec<u8>> {
        loop {
            if let Some(at) = find(&self.buf, b"\r\n") {
                return Some(self.buf.drain(..at + 2).collect());
            }
            if !self.fill().await {
                return None;
            }
        }
    }

    /// A chunked body: as it was on the wire, and decoded.
    async fn chunked(&mut self) -> Option<(Vec<u8>, Vec<u8>)> {
        let (mut wire, mut body) = (Vec::new(), Vec::new());
        loop {
            let line = self.line().await?;
            wire.extend_from_slice(&line);
            let text = String::from_utf8_lossy(&line);
            let size = text.trim_end().split(';').next().unwrap_or("").trim();
            let size = usize::from_str_radix(size, 16).expect("a hex chunk size");
            if size == 0 {
                break;
            }
            let data = self.take(size + 2).await?;
            assert!(data.ends_with(b"\r\n"), "chunk data longer than its size");
            wire.extend_from_slice(&data);
            body.extend_from_slice(&data[..size]);
        }
        // Trailer fields, up to the empty line.
        loop {
            let line = self.line().await?;
            wire.extend_from_slice(&line);
            if line == b"\r\n" {
                return Some((wire, body));
            }
        }
    }

    /// Notes a reset among the socket's errors.
    fn note(&mut self, error: &std::io::Error) {
        self.reset |= error.kind() == std::io::ErrorKind::ConnectionReset;
    }

    /// Writes `bytes` as they are; false when the peer is gone (a test's
    /// assertions tell whether it should have been).
    pub async fn write(&mut self, bytes: &[u8]) -> bool {
        match self.stream.write_all(bytes).await {
            Ok(()) => true,
            Err(e) => {
                self.note(&e);
                false
            }
        }
    }

    /// Writes `bytes` in pieces whose sizes cycle through `sizes`, pausing
    /// `pause` after each; false when the peer is gone before the last.
    pub async fn write_in_pieces(
        &mut self,
        bytes: &[u8],
        sizes: &[usize],
        pause: Duration,
    ) -> bool {
        let mut rest = bytes;
        for size in sizes.iter().cycle() {
            if rest.is_empty() {
                break;
            }
            let (piece, after) = rest.split_at((*size).min(rest.len()));
            if !self.write(piece).await {
                return false;
            }
            rest = after;
            tokio::time::sleep(pause).await;
        }
        true
    }

    /// Answers every request on the connection with what `answer` makes of
    /// it, until the peer closes.
    pub async fn serve(mut self, answer: impl Fn(&RawRequest) -> Vec<u8>) {
        while let Some(request) = self.read_request().await {
            if !self.write(&answer(&request)).await {
                return;
            }
        }
    }

    /// Sends FIN: the backend closes its side first.
    pub async fn shutdown(&mut self) {
        let _ = self.stream.shutdown().await;
    }

    /// Waits (for at most the patience) until the peer ends the connection,
    /// discarding whatever it still sends, and records how it ended (a reset
    /// a write or read already met counts).
    pub async fn end(&mut self) -> End {
        let end = match self.reset {
            true => End::Reset,
            false => read_to_end(&mut self.stream).await.1,
        };
        self.record_end(end);
        end
    }

    fn record_end(&self, end: End) {
        self.seen.ends.lock().unwrap().push((self.number, end));
    }

    /// Holds the connection open, reading nothing, for `time`.
    pub async fn hold(self, time: Duration) {
        tokio::time::sleep(time).await;
        drop(self);
    }

    /// The socket itself.
    pub fn stream(&mut self) -> &mut TcpStream {
        &mut self.stream
    }
}

/// Where `needle` first starts in `haystack`.
fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// `HTTP/1.1 200 OK` with `body`, framed by Content-Length.
pub fn ok_with(body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}
