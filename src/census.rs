//! TIME_WAIT census: reads the kernel's TCP socket table (`/proc/net/tcp` and
//! `/proc/net/tcp6` of the current network namespace) and counts sockets by
//! state and endpoints.
//!
//! This is tether's proof of its promise: tests and operators read the kernel's
//! own table rather than tether's opinion of what it did.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Failures to read the socket table.
#[derive(Debug, thiserror::Error)]
pub enum CensusError {
    /// `/proc/net/tcp*` could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        path: &'static str,
        source: io::Error,
    },
}

/// TCP states as numbered by the kernel (`include/net/tcp_states.h`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TcpState {
    /// 01
    Established,
    /// 02
    SynSent,
    /// 03
    SynRecv,
    /// 04
    FinWait1,
    /// 05
    FinWait2,
    /// 06
    TimeWait,
    /// 07
    Close,
    /// 08
    CloseWait,
    /// 09
    LastAck,
    /// 0A
    Listen,
    /// 0B
    Closing,
    /// Anything else.
    Other(u8),
}

impl TcpState {
    fn from_code(code: u8) -> Self {
        match code {
            0x01 => Self::Established,
            0x02 => Self::SynSent,
            0x03 => Self::SynRecv,
            0x04 => Self::FinWait1,
            0x05 => Self::FinWait2,
            0x06 => Self::TimeWait,
            0x07 => Self::Close,
            0x08 => Self::CloseWait,
            0x09 => Self::LastAck,
            0x0A => Self::Listen,
            0x0B => Self::Closing,
            other => Self::Other(other),
        }
    }
}

/// One row of the kernel's TCP table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpSocket {
    /// Local address and port.
    pub local: SocketAddr,
    /// Remote address and port.
    pub remote: SocketAddr,
    /// Connection state.
    pub state: TcpState,
}

/// Every TCP socket of the current network namespace, IPv4 and IPv6.
pub fn sockets() -> Result<Vec<TcpSocket>, CensusError> {
    let mut all = Vec::new();
    for path in ["/proc/net/tcp", "/proc/net/tcp6"] {
        match std::fs::read_to_string(path) {
            Ok(text) => all.extend(text.lines().skip(1).filter_map(parse_line)),
            // A kernel without IPv6 has no tcp6 table.
            Err(e) if e.kind() == io::ErrorKind::NotFound && path.ends_with('6') => {}
            Err(source) => return Err(CensusError::Read { path, source }),
        }
    }
    Ok(all)
}

/// Sockets in TIME_WAIT.
pub fn time_wait() -> Result<Vec<TcpSocket>, CensusError> {
    Ok(sockets()?
        .into_iter()
        .filter(|s| s.state == TcpState::TimeWait)
        .collect())
}

/// TIME_WAIT sockets whose remote port is `port` (toward a backend).
pub fn time_wait_toward_port(port: u16) -> Result<usize, CensusError> {
    Ok(time_wait()?
        .iter()
        .filter(|s| s.remote.port() == port)
        .count())
}

/// TIME_WAIT sockets whose local port is `port` (on a listening port).
pub fn time_wait_on_local_port(port: u16) -> Result<usize, CensusError> {
    Ok(time_wait()?
        .iter()
        .filter(|s| s.local.port() == port)
        .count())
}

fn parse_line(line: &str) -> Option<TcpSocket> {
    let mut fields = line.split_whitespace();
    let _slot = fields.next()?;
    let local = parse_endpoint(fields.next()?)?;
    let remote = parse_endpoint(fields.next()?)?;
    let state = u8::from_str_radix(fields.next()?, 16).ok()?;
    Some(TcpSocket {
        local,
        remote,
        state: TcpState::from_code(state),
    })
}

/// `0100007F:1F90` → 127.0.0.1:8080. The kernel prints each 32-bit word of the
/// address as it lies in memory, read in native byte order.
fn parse_endpoint(text: &str) -> Option<SocketAddr> {
    let (addr, port) = text.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let ip = match addr.len() {
        8 => {
            let word = u32::from_str_radix(addr, 16).ok()?;
            IpAddr::V4(Ipv4Addr::from(word.to_ne_bytes()))
        }
        32 => {
            let mut bytes = [0u8; 16];
            for (i, chunk) in bytes.chunks_mut(4).enumerate() {
                let word = u32::from_str_radix(&addr[i * 8..i * 8 + 8], 16).ok()?;
                chunk.copy_from_slice(&word.to_ne_bytes());
            }
            IpAddr::V6(Ipv6Addr::from(bytes))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ipv4_and_ipv6_rows() {
        let v4 = "   0: 0100007F:1F90 0100007F:D431 06 00000000:00000000 03:00000F9A 00000000     0        0 0 3 0000000000000000";
        let s = parse_line(v4).unwrap();
        assert_eq!(s.local, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(s.remote.port(), 0xD431);
        assert_eq!(s.state, TcpState::TimeWait);
        let v6 = "   0: 00000000000000000000000001000000:1F90 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0";
        let s = parse_line(v6).unwrap();
        assert_eq!(s.local, "[::1]:8080".parse().unwrap());
        assert_eq!(s.state, TcpState::Listen);
    }

    #[test]
    fn sees_a_listening_socket_of_its_own() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let found = sockets()
            .unwrap()
            .into_iter()
            .any(|s| s.local.port() == port && s.state == TcpState::Listen);
        assert!(found);
    }
}
