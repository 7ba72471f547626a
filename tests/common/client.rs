//! The raw client: requests written byte for byte on real sockets, responses
//! read with the load client's reader, and how the server ended the
//! connection (FIN or RST) as the client's socket reports it.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;

use tokio::io::{AsyncBufRead, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

pub use tether::tools::load::Response;

use super::PATIENCE;

/// How the server ended a connection, as the client's socket reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// read() returned 0: FIN.
    Eof,
    /// read() failed with ECONNRESET: RST.
    Reset,
    /// Nothing within the patience.
    Open,
}

/// Reads until the server ends the connection, for at most [`PATIENCE`].
pub async fn read_to_end(stream: &mut (impl AsyncRead + Unpin)) -> (Vec<u8>, End) {
    let mut data = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return (data, End::Open),
            Ok(Ok(0)) => return (data, End::Eof),
            Ok(Ok(n)) => data.extend_from_slice(&buf[..n]),
            Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionReset => return (data, End::Reset),
            Ok(Err(e)) => panic!("unexpected read error: {e}"),
        }
    }
}

/// Sends raw bytes on a new connection and reads until the server ends it.
pub async fn exchange_raw(addr: SocketAddr, request: &[u8]) -> (Vec<u8>, End) {
    let mut client = Client::connect(addr).await;
    client.send(request).await;
    client.read_to_end().await
}

/// Parses a whole raw response.
pub async fn parse(bytes: &[u8]) -> Response {
    tether::tools::load::read_response(&mut &bytes[..], false)
        .await
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(bytes)))
}

/// One GET on a new connection with `Connection: close`; returns the response.
pub async fn get_once(addr: SocketAddr, path: &str) -> Response {
    let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
    Client::connect(addr)
        .await
        .request(request.as_bytes())
        .await
}

/// Runs `n` clients at once, each `client()` on a task of its own; what they
/// returned, in order. A client's panic goes on here.
pub async fn concurrently<T, Fut>(n: usize, client: impl Fn() -> Fut) -> Vec<T>
where
    Fut: Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let tasks: Vec<_> = (0..n).map(|_| tokio::spawn(client())).collect();
    let mut results = Vec::with_capacity(n);
    for task in tasks {
        results.push(task.await.unwrap_or_else(|e| match e.try_into_panic() {
            Ok(panic) => std::panic::resume_unwind(panic),
            Err(e) => panic!("{e}"),
        }));
    }
    results
}

/// Asserts that `resp` is tether's own answer `status`, giving `reason` in
/// `X-Tether-Error`.
pub fn assert_tether_error(resp: &Response, status: u16, reason: &str) {
    assert_eq!(
        (resp.status, resp.header("x-tether-error")),
        (status, Some(reason)),
        "{}",
        resp.text()
    );
}

/// A client connection: raw bytes out, parsed responses in.
pub struct Client {
    reader: BufReader<TcpStream>,
}

impl Client {
    pub async fn connect(addr: SocketAddr) -> Self {
        Self::over(TcpStream::connect(addr).await.unwrap())
    }

    /// A client on a connection made elsewhere.
    pub fn over(stream: TcpStream) -> Self {
        Self {
            reader: BufReader::new(stream),
        }
    }

    /// The client's own port.
    pub fn port(&self) -> u16 {
        self.reader.get_ref().local_addr().unwrap().port()
    }

    /// Writes `bytes` as they are.
    pub async fn send(&mut self, bytes: &[u8]) {
        self.reader.get_mut().write_all(bytes).await.unwrap();
    }

    /// Sends `request` and reads its response.
    pub async fn request(&mut self, request: &[u8]) -> Response {
        self.send(request).await;
        self.response().await
    }

    /// Reads the next response.
    pub async fn response(&mut self) -> Response {
        self.try_response(false).await.unwrap()
    }

    /// Reads the next response, one to a HEAD request (no body follows).
    pub async fn head_response(&mut self) -> Response {
        self.try_response(true).await.unwrap()
    }

    /// Reads the next response, or why it could not.
    pub async fn try_response(
        &mut self,
        to_head: bool,
    ) -> Result<Response, tether::tools::load::LoadError> {
        tether::tools::load::read_response(&mut self.reader, to_head).await
    }

    /// Reads what is left until the server ends the connection (see
    /// [`read_to_end`]).
    pub async fn read_to_end(&mut self) -> (Vec<u8>, End) {
        let mut data = self.reader.buffer().to_vec();
        Pin::new(&mut self.reader).consume(data.len());
        let (rest, end) = read_to_end(self.reader.get_mut()).await;
        data.extend(rest);
        (data, end)
    }

    /// The socket itself.
    pub fn stream(&mut self) -> &mut TcpStream {
        self.reader.get_mut()
    }
}

/// The value of the first series starting with `prefix` (a name, or a name
/// and its labels) in a `/metrics` text; panics, showing the text, if none.
pub fn series_value(text: &str, prefix: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no metric {prefix} in:\n{text}"))
}
