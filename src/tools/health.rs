//! `tether health`: asks a running tether's admin server whether it is alive
//! (`/healthz`) or ready (`/readyz`), for container HEALTHCHECKs, Kubernetes
//! exec probes and scripts in images that have no curl.
//!
//! One HTTP/1.1 GET under one deadline, on a blocking socket: a probe must
//! answer within its own timeout whatever the admin server does.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// Why tether is not healthy (or could not be asked).
#[derive(Debug, thiserror::Error)]
pub enum HealthError {
    /// Nothing listens on the admin address: tether is not running there.
    #[error("connection to {addr} refused: is tether running with its admin server there?")]
    Refused {
        /// The address asked.
        addr: SocketAddr,
    },
    /// The admin server did not answer in time.
    #[error("no answer from {addr} within {timeout:?}")]
    Timeout {
        /// The address asked.
        addr: SocketAddr,
        /// The deadline that passed.
        timeout: Duration,
    },
    /// The admin server answered something other than 200.
    #[error("{path} on {addr} answered {status}{}", reason_suffix(.reason))]
    Status {
        /// The address asked.
        addr: SocketAddr,
        /// `/healthz` or `/readyz`.
        path: &'static str,
        /// The status it answered.
        status: u16,
        /// The first line of its body ("warming", "draining").
        reason: String,
    },
    /// The answer was not HTTP.
    #[error("{addr} answered something that is not an HTTP response")]
    Malformed {
        /// The address asked.
        addr: SocketAddr,
    },
    /// Any other socket error.
    #[error("cannot ask {addr}: {source}")]
    Io {
        /// The address asked.
        addr: SocketAddr,
        /// What the socket said.
        source: std::io::Error,
    },
    /// The address resolved to nothing.
    #[error("no address to ask")]
    NoAddress,
}

fn reason_suffix(reason: &str) -> String {
    if reason.is_empty() {
        String::new()
    } else {
        format!(" ({reason})")
    }
}

/// What to ask.
#[derive(Debug, Clone)]
pub struct HealthCheck {
    /// The admin server's addresses (a name's every address), tried in turn.
    pub admin: Vec<SocketAddr>,
    /// Ask `/readyz` (warm and not draining) instead of `/healthz` (alive).
    pub ready: bool,
    /// Deadline for the whole exchange, connect included.
    pub timeout: Duration,
}

/// The most of an answer read: admin health answers are a few bytes.
const MAX_ANSWER: usize = 4096;

/// The longest deadline honoured: a longer `--timeout` is clamped, so the
/// deadline cannot overflow the clock.
const MAX_TIMEOUT: Duration = Duration::from_secs(24 * 60 * 60);

impl HealthCheck {
    /// The path this check asks.
    pub fn path(&self) -> &'static str {
        if self.ready {
            "/readyz"
        } else {
            "/healthz"
        }
    }

    /// Asks each address in turn until one answers: `Ok` when the answer is
    /// 200, else the first answer's reason, or the last address's failure.
    pub fn run(&self) -> Result<(), HealthError> {
        let mut outcome = Err(HealthError::NoAddress);
        for addr in &self.admin {
            outcome = self.ask(*addr);
            match &outcome {
                Err(HealthError::Refused { .. }) | Err(HealthError::Io { .. }) => continue,
                _ => break,
            }
        }
        outcome
    }

    fn ask(&self, addr: SocketAddr) -> Result<(), HealthError> {
        let timeout = self.timeout.min(MAX_TIMEOUT);
        let deadline = Instant::now() + timeout;
        let io = |source: std::io::Error| match source.kind() {
            std::io::ErrorKind::ConnectionRefused => HealthError::Refused { addr },
            std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock => HealthError::Timeout {
                addr,
                timeout: self.timeout,
            },
            _ => HealthError::Io { addr, source },
        };
        let left = || {
            deadline
                .checked_duration_since(Instant::now())
                .filter(|d| !d.is_zero())
                .ok_or(HealthError::Timeout {
                    addr,
                    timeout: self.timeout,
                })
        };
        let mut stream = TcpStream::connect_timeout(&addr, left()?).map_err(io)?;
        stream.set_write_timeout(Some(left()?)).map_err(io)?;
        let request = format!(
            "GET {} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: tether-health\r\nConnection: close\r\n\r\n",
            self.path()
        );
        stream.write_all(request.as_bytes()).map_err(io)?;
        let mut answer = Vec::new();
        let mut chunk = [0u8; 1024];
        // Read until the answer is complete (its head and Content-Length
        // body), the server closes, or MAX_ANSWER: a server that keeps the
        // connection open, or resets it after answering, has still answered.
        while answer.len() < MAX_ANSWER && !is_complete(&answer) {
            stream.set_read_timeout(Some(left()?)).map_err(io)?;
            match stream.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => answer.extend_from_slice(&chunk[..n]),
                Err(_) if parse_answer(&answer).is_some() => break,
                Err(e) => return Err(io(e)),
            }
        }
        let (status, reason) = parse_answer(&answer).ok_or(HealthError::Malformed { addr })?;
        if status == 200 {
            Ok(())
        } else {
            Err(HealthError::Status {
                addr,
                path: self.path(),
                status,
                reason,
            })
        }
    }
}

/// Whether `answer` holds a whole response: a head, and as many body bytes
/// as its Content-Length says (none when it says nothing).
fn is_complete(answer: &[u8]) -> bool {
    let Some(end) = answer.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    let head = String::from_utf8_lossy(&answer[..end]);
    let length = head
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, value)| value.trim().parse::<usize>().ok());
    match length {
        Some(length) => answer.len() >= end + 4 + length,
        // No length: the body ends at the close; the status is what counts.
        None => false,
    }
}

/// The status code and the body's first line (tether's admin server puts the
/// reason there: "warming", "draining").
fn parse_answer(answer: &[u8]) -> Option<(u16, String)> {
    let text = String::from_utf8_lossy(answer);
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status_line = head.lines().next()?;
    let mut parts = status_line.split_whitespace();
    if !parts.next()?.starts_with("HTTP/1.") {
        return None;
    }
    let status = parts.next()?.parse().ok()?;
    let reason = body.lines().next().unwrap_or("").trim().to_owned();
    Some((status, reason))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_status_and_the_body_reason() {
        let answer = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\ncontent-length: 9\r\n\r\ndraining\n";
        assert_eq!(parse_answer(answer), Some((503, "draining".to_owned())));
        assert_eq!(
            parse_answer(b"HTTP/1.1 200 OK\r\n\r\n"),
            Some((200, String::new()))
        );
        assert_eq!(parse_answer(b"SSH-2.0-OpenSSH\r\n"), None);
        assert_eq!(
            parse_answer(b"HTTP/1.1 200 OK\r\n"),
            None,
            "head not finished"
        );
    }

    #[test]
    fn an_answer_is_complete_once_its_content_length_arrived() {
        assert!(!is_complete(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n"));
        assert!(!is_complete(
            b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nok"
        ));
        assert!(is_complete(
            b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nok\n"
        ));
        assert!(
            !is_complete(b"HTTP/1.0 200 OK\r\n\r\nok\n"),
            "no length: read to the close"
        );
    }
}
