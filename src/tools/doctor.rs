//! `tether doctor`: reads the kernel's socket table and the TCP sysctls of this
//! host (its network namespace) and says where TIME_WAIT piles up, who causes
//! it, how many ephemeral ports are left, and what to do about it.

use std::net::SocketAddr;

use serde::Serialize;

use crate::census::{self, Census, CensusError, Headroom};

/// Above this many TIME_WAIT sockets on one endpoint, doctor gives advice.
const PRESSURE: usize = 1000;
/// How many endpoints each list shows.
const TOP: usize = 10;

/// What to look at.
#[derive(Debug, Clone, Default)]
pub struct DoctorOptions {
    /// Only sockets toward this remote endpoint.
    pub to: Option<SocketAddr>,
    /// Only sockets on this local port.
    pub port: Option<u16>,
}

/// The report, as printed with `--json`.
#[derive(Debug, Clone, Serialize)]
pub struct Diagnosis {
    /// The relevant sysctls, as the kernel shows them.
    pub sysctl: Vec<(String, String)>,
    /// TIME_WAIT sockets considered (after `--to` / `--port`).
    pub time_wait_total: usize,
    /// TIME_WAIT grouped by remote endpoint, largest first.
    pub by_remote: Vec<RemoteRow>,
    /// TIME_WAIT grouped by local endpoint, largest first.
    pub by_local: Vec<LocalRow>,
    /// The endpoint with the most TIME_WAIT, if any.
    pub worst_offender: Option<Offender>,
    /// Plain-language advice.
    pub advice: Vec<String>,
}

/// TIME_WAIT toward one remote endpoint.
#[derive(Debug, Clone, Serialize)]
pub struct RemoteRow {
    /// The remote endpoint.
    pub endpoint: SocketAddr,
    /// TIME_WAIT sockets toward it.
    pub time_wait: usize,
    /// Ephemeral ports left toward it.
    pub headroom: Headroom,
}

/// TIME_WAIT on one local endpoint.
#[derive(Debug, Clone, Serialize)]
pub struct LocalRow {
    /// The local endpoint.
    pub endpoint: SocketAddr,
    /// TIME_WAIT sockets on it.
    pub time_wait: usize,
}

/// The single largest source of TIME_WAIT.
#[derive(Debug, Clone, Serialize)]
pub struct Offender {
    /// `remote` (a client here connects to it) or `local` (a server here closes first).
    pub kind: &'static str,
    /// The endpoint.
    pub endpoint: SocketAddr,
    /// Its TIME_WAIT count.
    pub time_wait: usize,
}

const SYSCTLS: [&str; 4] = [
    "tcp_tw_reuse",
    "ip_local_port_range",
    "tcp_fin_timeout",
    "tcp_max_tw_buckets",
];

/// Reads the table and the sysctls and builds the diagnosis.
pub fn diagnose(options: &DoctorOptions) -> Result<Diagnosis, CensusError> {
    let census = Census::take()?;
    let range = census::local_port_range()?;
    let sysctl = SYSCTLS
        .iter()
        .map(|name| {
            let value = std::fs::read_to_string(format!("/proc/sys/net/ipv4/{name}"))
                .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
                .unwrap_or_else(|e| format!("unreadable: {e}"));
            ((*name).to_owned(), value)
        })
        .collect();
    Ok(diagnose_census(&census, range, sysctl, options))
}

/// The diagnosis of a given census (testable without a live table).
pub fn diagnose_census(
    census: &Census,
    range: (u16, u16),
    sysctl: Vec<(String, String)>,
    options: &DoctorOptions,
) -> Diagnosis {
    let wanted = |s: &&census::TcpSocket| {
        options.to.is_none_or(|to| s.remote == to)
            && options.port.is_none_or(|p| s.local.port() == p)
    };
    let filtered = Census::from_sockets(
        census
            .sockets()
            .iter()
            .filter(|s| s.state != census::TcpState::TimeWait || wanted(s))
            .copied()
            .collect(),
    );
    let time_wait_total = filtered.time_wait().count();
    let by_remote: Vec<RemoteRow> = filtered
        .time_wait_by_remote()
        .into_iter()
        .take(TOP)
        .map(|(endpoint, time_wait)| RemoteRow {
            endpoint,
            time_wait,
            headroom: census.headroom(endpoint, range),
        })
        .collect();
    // Single entries on client ports are the other side of the remote
    // grouping and only add noise.
    let by_local: Vec<LocalRow> = filtered
        .time_wait_by_local()
        .into_iter()
        .filter(|(endpoint, count)| is_server_port(endpoint.port(), range) || *count > 1)
        .take(TOP)
        .map(|(endpoint, time_wait)| LocalRow {
            endpoint,
            time_wait,
        })
        .collect();
    let servers: Vec<&LocalRow> = by_local
        .iter()
        .filter(|row| is_server_port(row.endpoint.port(), range))
        .collect();
    let worst_offender = worst_offender(by_remote.first(), servers.first().copied());
    let advice = advice(&by_remote, &servers, &sysctl, time_wait_total);
    Diagnosis {
        sysctl,
        time_wait_total,
        by_remote,
        by_local,
        worst_offender,
        advice,
    }
}

/// A local endpoint whose port is outside the ephemeral range is a server
/// port: a server here closed first.
fn is_server_port(port: u16, range: (u16, u16)) -> bool {
    port < range.0 || port > range.1
}

/// The worst remote endpoint, or the worst server port here when it has more.
fn worst_offender(remote: Option<&RemoteRow>, server: Option<&LocalRow>) -> Option<Offender> {
    let remote = remote.map(|r| Offender::new("remote", r.endpoint, r.time_wait));
    let local = server.map(|l| Offender::new("local", l.endpoint, l.time_wait));
    match (remote, local) {
        (Some(r), Some(l)) => Some(if l.time_wait > r.time_wait { l } else { r }),
        (r, l) => r.or(l),
    }
}

impl Offender {
    fn new(kind: &'static str, endpoint: SocketAddr, time_wait: usize) -> Self {
        Self {
            kind,
            endpoint,
            time_wait,
        }
    }
}

/// What to do: for each pressed remote endpoint and server port, for
/// `tcp_tw_reuse` off, or that all is well.
fn advice(
    by_remote: &[RemoteRow],
    servers: &[&LocalRow],
    sysctl: &[(String, String)],
    time_wait_total: usize,
) -> Vec<String> {
    let mut advice: Vec<String> = by_remote.iter().flat_map(remote_advice).collect();
    advice.extend(servers.iter().filter_map(|row| server_advice(row)));
    let tw_reuse = sysctl.iter().find(|(name, _)| name == "tcp_tw_reuse");
    if tw_reuse.is_some_and(|(_, value)| value == "0") {
        advice.push(
            "net.ipv4.tcp_tw_reuse = 0: outgoing connections never reuse a TIME_WAIT port; \
             1 lets them once it is safe (TCP timestamps)"
                .to_owned(),
        );
    }
    if advice.is_empty() {
        advice.push(format!(
            "no TIME_WAIT pressure: {} sockets in TIME_WAIT, none above {} on one endpoint",
            thousands(time_wait_total),
            thousands(PRESSURE)
        ));
    }
    advice
}

/// A client here that churns connections toward `row`, and ports running out.
fn remote_advice(row: &RemoteRow) -> impl Iterator<Item = String> {
    let churn = (row.time_wait >= PRESSURE).then(|| {
        format!(
            "{} TIME_WAIT toward {} from local ports — a client on this host opens a connection \
             per request; put tether in front of it (`tether demo` shows the difference)",
            thousands(row.time_wait),
            row.endpoint
        )
    });
    let exhausted = (u64::from(row.headroom.free) * 10 < u64::from(row.headroom.range)).then(|| {
        format!(
            "only {} of {} ephemeral ports are free toward {}: new connections to it will soon fail \
             with EADDRNOTAVAIL",
            thousands(row.headroom.free as usize),
            thousands(row.headroom.range as usize),
            row.endpoint
        )
    });
    churn.into_iter().chain(exhausted)
}

/// A server here that closes its clients' connections first.
fn server_advice(row: &LocalRow) -> Option<String> {
    (row.time_wait >= PRESSURE).then(|| {
        format!(
            "{} TIME_WAIT on local port {} — a server on this host closes its clients' connections \
             first; let clients close (keep-alive, `Connection: close` answered by the client) or \
             reset idle ones",
            thousands(row.time_wait),
            row.endpoint.port()
        )
    })
}

fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

impl Diagnosis {
    /// The report for people.
    pub fn text(&self) -> String {
        let mut out = String::new();
        out.push_str("TCP settings (net.ipv4):\n");
        for (name, value) in &self.sysctl {
            out.push_str(&format!("  {name:<22} {value}\n"));
        }
        out.push_str(&format!(
            "\nTIME_WAIT sockets: {}\n",
            thousands(self.time_wait_total)
        ));
        if !self.by_remote.is_empty() {
            out.push_str("\nToward remote endpoints (a client on this host closed first):\n");
            out.push_str("  endpoint                          TIME_WAIT   free ephemeral ports\n");
            for row in &self.by_remote {
                out.push_str(&format!(
                    "  {:<32} {:>10}   {} of {}\n",
                    row.endpoint.to_string(),
                    thousands(row.time_wait),
                    thousands(row.headroom.free as usize),
                    thousands(row.headroom.range as usize)
                ));
            }
        }
        if !self.by_local.is_empty() {
            out.push_str("\nOn local endpoints:\n");
            for row in &self.by_local {
                out.push_str(&format!(
                    "  {:<32} {:>10}\n",
                    row.endpoint.to_string(),
                    thousands(row.time_wait)
                ));
            }
        }
        if let Some(worst) = &self.worst_offender {
            out.push_str(&format!(
                "\nWorst offender: {} ({}), {} TIME_WAIT\n",
                worst.endpoint,
                worst.kind,
                thousands(worst.time_wait)
            ));
        }
        out.push_str("\nAdvice:\n");
        for line in &self.advice {
            out.push_str(&format!("  - {line}\n"));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::census::{TcpSocket, TcpState};

    #[test]
    fn names_the_endpoint_a_churning_client_hits_and_advises_tether() {
        let backend: SocketAddr = "10.0.0.5:80".parse().unwrap();
        let mut sockets: Vec<TcpSocket> = (32768..(32768 + 1500))
            .map(|port| TcpSocket {
                local: SocketAddr::new("10.0.0.1".parse().unwrap(), port),
                remote: backend,
                state: TcpState::TimeWait,
            })
            .collect();
        sockets.push(TcpSocket {
            local: "10.0.0.1:8080".parse().unwrap(),
            remote: "10.0.0.9:50000".parse().unwrap(),
            state: TcpState::TimeWait,
        });
        let census = Census::from_sockets(sockets);
        let sysctl = vec![("tcp_tw_reuse".to_owned(), "0".to_owned())];
        let d = diagnose_census(&census, (32768, 33767), sysctl, &DoctorOptions::default());
        let worst = d.worst_offender.as_ref().unwrap();
        assert_eq!(
            (worst.kind, worst.endpoint, worst.time_wait),
            ("remote", backend, 1500)
        );
        assert!(d
            .advice
            .iter()
            .any(|a| a.contains("toward 10.0.0.5:80") && a.contains("tether")));
        assert!(d.advice.iter().any(|a| a.contains("EADDRNOTAVAIL")));
        assert!(d.advice.iter().any(|a| a.contains("tcp_tw_reuse = 0")));
        let only = diagnose_census(
            &census,
            (32768, 33767),
            Vec::new(),
            &DoctorOptions {
                to: None,
                port: Some(8080),
            },
        );
        assert_eq!(only.time_wait_total, 1);
    }

    #[test]
    fn thousands_are_grouped() {
        assert_eq!(thousands(14_000), "14,000");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1_234_567), "1,234,567");
    }
}
