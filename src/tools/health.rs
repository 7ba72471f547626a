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
    Refused { addr: SocketAddr },
    /// The admin server did not answer in time.
    #[error("no answer from {addr} within {timeout:?}")]
    Timeout { addr: SocketAddr, timeout: Duration },
    /// The admin server answered something other than 200.
    #[error("{path} on {addr} answered {status}{}", reason_suffix(.reason))]
    Status {
        addr: SocketAddr,
        path: &'static str,
        status: u16,
        reason: String,
    },
    /// The answer was not HTTP.
    #[error("{addr} answered something that is not an HTTP response")]
    Malformed { addr: SocketAddr },
    /// Any other socket error.
    #[error("cannot ask {addr}: {source}")]
    Io {
        addr: SocketAddr,
        source: std::io::Error,
    },
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
    /// The admin server's address.
    pub admin: SocketAddr,
    /// Ask `/readyz` (warm and not draining) instead of `/healthz` (alive).
    pub ready: bool,
    /// Deadline for the whole exchange, connect included.
    pub timeout: Duration,
}

/// The most of an answer read: admin health answers are a few bytes.
const MAX_ANSWER: usize = 4096;

impl HealthCheck {
    /// The path this check asks.
    pub fn path(&self) -> &'static str {
        if self.ready {
            "/readyz"
        } else {
            "/healthz"
        }
    }

    /// Asks once: `Ok` when the answer is 200.
    pub fn run(&self) -> Result<(), HealthError> {
        let addr = self.admin;
        let deadline = Instant::now() + self.timeout;
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
        while answer.len() < MAX_ANSWER {
            stream.set_read_timeout(Some(left()?)).map_err(io)?;
            match stream.read(&mut chunk).map_err(io)? {
                0 => break,
                n => answer.extend_from_slice(&chunk[..n]),
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
}
