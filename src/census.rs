//! TIME_WAIT census: reads the kernel's TCP socket table of the current network
//! namespace and counts sockets by state and endpoints.
//!
//! The table is read over sock_diag netlink (the kernel filters by state and
//! sends binary records: a census of 100k sockets takes milliseconds), falling
//! back to `/proc/net/tcp` and `tcp6` where netlink is unavailable. This is
//! tether's proof of its promise: tests and operators read the kernel's own
//! table rather than tether's opinion of what it did.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;

use netlink_packet_sock_diag::inet::StateFlags;

/// Failures to read the socket table.
#[derive(Debug, thiserror::Error)]
pub enum CensusError {
    /// `/proc/net/tcp*` could not be read.
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: io::Error },
    /// The sock_diag netlink exchange failed.
    #[error("sock_diag: {0}")]
    Netlink(String),
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
    by_states(StateFlags::all())
}

/// Sockets in TIME_WAIT.
pub fn time_wait() -> Result<Vec<TcpSocket>, CensusError> {
    by_states(StateFlags::TIME_WAIT)
}

/// Every TCP socket listed in a `/proc/<pid>/net` (or `/proc/net`) directory:
/// the table of that process's network namespace.
pub fn sockets_from_proc(net_dir: &Path) -> Result<Vec<TcpSocket>, CensusError> {
    let mut all = Vec::new();
    for name in ["tcp", "tcp6"] {
        let path = net_dir.join(name);
        match std::fs::read_to_string(&path) {
            Ok(text) => all.extend(text.lines().skip(1).filter_map(parse_line)),
            // A kernel without IPv6 has no tcp6 table.
            Err(e) if e.kind() == io::ErrorKind::NotFound && name == "tcp6" => {}
            Err(source) => {
                return Err(CensusError::Read {
                    path: path.display().to_string(),
                    source,
                })
            }
        }
    }
    Ok(all)
}

/// A snapshot of the socket table with the groupings an operator asks about.
#[derive(Debug, Clone, Default)]
pub struct Census {
    sockets: Vec<TcpSocket>,
}

/// The ephemeral-port budget toward one remote endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Headroom {
    /// Ports in `net.ipv4.ip_local_port_range`.
    pub range: u32,
    /// Distinct local ports in that range held by sockets toward the endpoint
    /// (any state, TIME_WAIT included).
    pub in_use: u32,
    /// What is left for new connections to it.
    pub free: u32,
}

impl Census {
    /// Reads every TCP socket of the current network namespace.
    pub fn take() -> Result<Self, CensusError> {
        Ok(Self {
            sockets: sockets()?,
        })
    }

    /// A census of sockets read elsewhere (another namespace's `/proc/<pid>/net`).
    pub fn from_sockets(sockets: Vec<TcpSocket>) -> Self {
        Self { sockets }
    }

    /// Every socket.
    pub fn sockets(&self) -> &[TcpSocket] {
        &self.sockets
    }

    /// The TIME_WAIT sockets.
    pub fn time_wait(&self) -> impl Iterator<Item = &TcpSocket> {
        self.sockets
            .iter()
            .filter(|s| s.state == TcpState::TimeWait)
    }

    /// TIME_WAIT sockets toward `remote`.
    pub fn time_wait_toward(&self, remote: SocketAddr) -> usize {
        self.time_wait().filter(|s| s.remote == remote).count()
    }

    /// TIME_WAIT sockets whose local port is `port`.
    pub fn time_wait_on_local_port(&self, port: u16) -> usize {
        self.time_wait().filter(|s| s.local.port() == port).count()
    }

    /// TIME_WAIT counts grouped by remote endpoint, largest first.
    pub fn time_wait_by_remote(&self) -> Vec<(SocketAddr, usize)> {
        group(self.time_wait().map(|s| s.remote))
    }

    /// TIME_WAIT counts grouped by local endpoint, largest first.
    pub fn time_wait_by_local(&self) -> Vec<(SocketAddr, usize)> {
        group(self.time_wait().map(|s| s.local))
    }

    /// Local ports in the ephemeral range still free toward `remote`.
    pub fn headroom(&self, remote: SocketAddr, range: (u16, u16)) -> Headroom {
        let (low, high) = range;
        let size = ports_in(range);
        let in_use: std::collections::HashSet<u16> = self
            .sockets
            .iter()
            .filter(|s| s.remote == remote && s.state != TcpState::Listen)
            .map(|s| s.local.port())
            .filter(|p| (low..=high).contains(p))
            .collect();
        let in_use = u32::try_from(in_use.len()).unwrap_or(u32::MAX);
        Headroom {
            range: size,
            in_use,
            free: size.saturating_sub(in_use),
        }
    }
}

fn group(items: impl Iterator<Item = SocketAddr>) -> Vec<(SocketAddr, usize)> {
    let mut counts = std::collections::HashMap::new();
    for item in items {
        *counts.entry(item).or_insert(0usize) += 1;
    }
    let mut sorted: Vec<_> = counts.into_iter().collect();
    sorted.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    sorted
}

/// The file of `net.ipv4.ip_local_port_range`, the ephemeral port range of the
/// network namespace of the thread that opens it.
pub(crate) const LOCAL_PORT_RANGE: &str = "/proc/sys/net/ipv4/ip_local_port_range";

/// `net.ipv4.ip_local_port_range` of the current namespace.
pub fn local_port_range() -> Result<(u16, u16), CensusError> {
    let read_error = |source| CensusError::Read {
        path: LOCAL_PORT_RANGE.to_owned(),
        source,
    };
    let text = std::fs::read_to_string(LOCAL_PORT_RANGE).map_err(read_error)?;
    parse_port_range(&text).ok_or_else(|| {
        read_error(io::Error::new(
            io::ErrorKind::InvalidData,
            "expected two port numbers",
        ))
    })
}

/// The range as the kernel prints it (`"32768\t60999\n"`): two ports, the
/// lower first.
pub(crate) fn parse_port_range(text: &str) -> Option<(u16, u16)> {
    let mut parts = text
        .split_whitespace()
        .filter_map(|p| p.parse::<u16>().ok());
    match (parts.next(), parts.next()) {
        (Some(low), Some(high)) if low <= high => Some((low, high)),
        _ => None,
    }
}

/// How many ports `range` holds, both ends included.
pub(crate) fn ports_in(range: (u16, u16)) -> u32 {
    let (low, high) = range;
    u32::from(high.saturating_sub(low)) + 1
}

fn by_states(states: StateFlags) -> Result<Vec<TcpSocket>, CensusError> {
    match netlink::dump(states) {
        Ok(found) => Ok(found),
        Err(e) => {
            tracing::debug!(error = %e, "sock_diag unavailable; reading /proc/net/tcp");
            // thread-self: a thread that entered another network namespace
            // (the demo's hosts) reads its own table, not the main thread's.
            let all = sockets_from_proc(Path::new("/proc/thread-self/net"))?;
            Ok(all
                .into_iter()
                .filter(|s| states.contains(state_flag(s.state)))
                .collect())
        }
    }
}

fn state_flag(state: TcpState) -> StateFlags {
    match state {
        TcpState::Established => StateFlags::ESTABLISHED,
        TcpState::SynSent => StateFlags::SYN_SENT,
        TcpState::SynRecv => StateFlags::SYN_RECV,
        TcpState::FinWait1 => StateFlags::FIN_WAIT1,
        TcpState::FinWait2 => StateFlags::FIN_WAIT2,
        TcpState::TimeWait => StateFlags::TIME_WAIT,
        TcpState::Close => StateFlags::CLOSE,
        TcpState::CloseWait => StateFlags::CLOSE_WAIT,
        TcpState::LastAck => StateFlags::LAST_ACK,
        TcpState::Listen => StateFlags::LISTEN,
        TcpState::Closing => StateFlags::CLOSING,
        TcpState::Other(_) => StateFlags::empty(),
    }
}

/// The sock_diag exchange: one dump request per address family, filtered by
/// state in the kernel.
mod netlink {
    use std::net::SocketAddr;

    use netlink_packet_core::{
        NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_DUMP, NLM_F_REQUEST,
    };
    use netlink_packet_sock_diag::constants::{AF_INET, AF_INET6, IPPROTO_TCP};
    use netlink_packet_sock_diag::inet::{ExtensionFlags, InetRequest, SocketId, StateFlags};
    use netlink_packet_sock_diag::SockDiagMessage;
    use netlink_sys::protocols::NETLINK_SOCK_DIAG;
    use netlink_sys::Socket;

    use super::{CensusError, TcpSocket, TcpState};

    /// Receive buffer: the kernel packs many records into each datagram.
    const RECEIVE_BUFFER: usize = 256 * 1024;

    pub(super) fn dump(states: StateFlags) -> Result<Vec<TcpSocket>, CensusError> {
        let error = |e: &dyn std::fmt::Display| CensusError::Netlink(e.to_string());
        let mut socket = Socket::new(NETLINK_SOCK_DIAG).map_err(|e| error(&e))?;
        socket.bind_auto().map_err(|e| error(&e))?;
        socket
            .connect(&netlink_sys::SocketAddr::new(0, 0))
            .map_err(|e| error(&e))?;
        let mut found = Vec::new();
        let mut buffer = vec![0u8; RECEIVE_BUFFER];
        for (family, socket_id) in [
            (AF_INET, SocketId::new_v4()),
            (AF_INET6, SocketId::new_v6()),
        ] {
            let mut header = NetlinkHeader::default();
            header.flags = NLM_F_REQUEST | NLM_F_DUMP;
            let mut request = NetlinkMessage::new(
                header,
                SockDiagMessage::InetRequest(InetRequest {
                    family,
                    protocol: IPPROTO_TCP,
                    extensions: ExtensionFlags::empty(),
                    states,
                    socket_id,
                })
                .into(),
            );
            request.finalize();
            let mut bytes = vec![0u8; request.buffer_len()];
            request.serialize(&mut bytes);
            socket.send(&bytes, 0).map_err(|e| error(&e))?;
            'datagrams: loop {
                let size = socket
                    .recv(&mut &mut buffer[..], 0)
                    .map_err(|e| error(&e))?;
                let mut offset = 0;
                while offset < size {
                    let message =
                        NetlinkMessage::<SockDiagMessage>::deserialize(&buffer[offset..size])
                            .map_err(|e| error(&e))?;
                    let length = message.header.length as usize;
                    match message.payload {
                        NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(response)) => {
                            let id = &response.header.socket_id;
                            found.push(TcpSocket {
                                local: SocketAddr::new(id.source_address, id.source_port),
                                remote: SocketAddr::new(
                                    id.destination_address,
                                    id.destination_port,
                                ),
                                state: TcpState::from_code(response.header.state),
                            });
                        }
                        NetlinkPayload::Done(_) => break 'datagrams,
                        NetlinkPayload::Error(e) => return Err(error(&format!("{e:?}"))),
                        _ => {}
                    }
                    if length == 0 {
                        break;
                    }
                    // Records are aligned to 4 bytes.
                    offset += (length + 3) & !3;
                }
            }
        }
        Ok(found)
    }
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
    fn netlink_and_proc_agree_on_time_wait() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let mut ports = Vec::new();
        for _ in 0..20 {
            let client = std::net::TcpStream::connect(addr).unwrap();
            let (server, _) = listener.accept().unwrap();
            ports.push(client.local_addr().unwrap().port());
            drop(client);
            drop(server);
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
        let ours = |all: Vec<TcpSocket>| -> usize {
            all.iter()
                .filter(|s| {
                    s.state == TcpState::TimeWait
                        && s.remote == addr
                        && ports.contains(&s.local.port())
                })
                .count()
        };
        // /proc/net/tcp is read in several chunks: while other tests open and
        // close sockets, one read can skip entries that moved between hash
        // buckets. A parser that is wrong is wrong on every read; a few reads
        // tell the two apart.
        let read_both = || {
            let via_netlink = ours(netlink::dump(StateFlags::TIME_WAIT).unwrap());
            let via_proc = ours(sockets_from_proc(Path::new("/proc/net")).unwrap());
            (via_netlink, via_proc)
        };
        let seen = (0..5)
            .map(|_| read_both())
            .find(|&seen| seen == (20, 20))
            .unwrap_or_else(read_both);
        assert_eq!(seen, (20, 20), "(netlink, /proc)");
    }

    #[test]
    fn groups_and_headroom_count_what_they_should() {
        let remote: SocketAddr = "10.0.0.5:80".parse().unwrap();
        let tw = |port: u16| TcpSocket {
            local: SocketAddr::new("10.0.0.1".parse().unwrap(), port),
            remote,
            state: TcpState::TimeWait,
        };
        let mut sockets: Vec<_> = (40000..40010).map(tw).collect();
        sockets.push(TcpSocket {
            local: "10.0.0.1:40100".parse().unwrap(),
            remote,
            state: TcpState::Established,
        });
        let census = Census::from_sockets(sockets);
        assert_eq!(census.time_wait_toward(remote), 10);
        assert_eq!(census.time_wait_by_remote(), vec![(remote, 10)]);
        let headroom = census.headroom(remote, (40000, 40999));
        assert_eq!(
            headroom,
            Headroom {
                range: 1000,
                in_use: 11,
                free: 989
            }
        );
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
