//! The systemd unit in `deploy/systemd` and its example config hold together:
//! `systemd-analyze verify` accepts the unit as shipped, byte for byte, inside
//! a throwaway root that has the binary and config at the paths the unit names
//! (and refuses broken copies of it, so the check cannot pass by saying
//! nothing); `systemd-analyze security` rates its sandbox; the unit's timeouts,
//! descriptor limit and exit-status handling agree with the example config and
//! with what the binary does; and under the notify protocol the binary really
//! reports READY=1 and STOPPING=1 within the unit's timeouts.
//!
//! `systemd-analyze` comes with Debian's `systemd` package; without it these
//! tests fail rather than skip.

mod common;

use std::io::ErrorKind;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{printed, repo, run_ok, send_signal, tether_command, TempDir};

const UNIT_NAME: &str = "tether.service";
const BINARY: &str = "/usr/local/bin/tether";
const CONFIG: &str = "/etc/tether/tether.toml";
/// Descriptors the unit's LimitNOFILE comment sets aside beyond client and
/// upstream connections (admin server, accept sockets, event loops, sock_diag,
/// DNS, stdio).
const NOFILE_SLACK: u64 = 1024;
/// Time the unit's stop timeout leaves after drain_timeout for the resets and
/// the exit.
const STOP_MARGIN: Duration = Duration::from_secs(5);
/// Highest `systemd-analyze security` exposure accepted. Measured: 1.1 ("OK")
/// with systemd 252 (Debian 12). What is left is what a network proxy needs:
/// the host's network (no PrivateNetwork=, no IP allow list), AF_INET, AF_INET6,
/// AF_UNIX and AF_NETLINK sockets, /proc/sys readable, and the host's root.
const MAX_EXPOSURE: f64 = 1.5;

fn unit_path() -> PathBuf {
    repo().join("deploy/systemd/tether.service")
}

fn example_config_path() -> PathBuf {
    repo().join("deploy/systemd/tether.toml")
}

fn unit_text() -> String {
    std::fs::read_to_string(unit_path()).unwrap()
}

/// `systemd-analyze`, or a failure that says which package provides it.
fn systemd_analyze() -> PathBuf {
    let found = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/bin")])
        .map(|dir| dir.join("systemd-analyze"))
        .find(|p| p.is_file());
    found.unwrap_or_else(|| {
        panic!(
            "systemd-analyze not found: install Debian's `systemd` package \
             (apt-get install systemd) to check deploy/systemd/tether.service"
        )
    })
}

fn systemd_version() -> u32 {
    let out = Command::new(systemd_analyze())
        .arg("--version")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    // "systemd 252 (252.38-1~deb12u1)"
    text.split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("cannot read the systemd version from {text:?}"))
}

/// Copies a directory tree, keeping symlinks as they are.
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        let kind = entry.file_type().unwrap();
        if kind.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(entry.path()).unwrap(), &target).unwrap();
        } else if kind.is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// A root directory laid out as on a VM where tether is installed: `unit` as
/// /etc/systemd/system/tether.service, the built binary at /usr/local/bin,
/// the example config at /etc/tether, and the distribution's own units
/// (sysinit.target, network-online.target, multi-user.target, ...) that the
/// unit depends on, copied from this machine.
fn installed_root(label: &str, unit: &str) -> TempDir {
    let root = TempDir::new(&format!("deploy-systemd-{label}"));
    let system_units = ["/usr/lib/systemd/system", "/lib/systemd/system"]
        .iter()
        .map(Path::new)
        .find(|d| d.join("sysinit.target").exists())
        .unwrap_or_else(|| {
            panic!(
                "no systemd unit directory with sysinit.target: install Debian's `systemd` package"
            )
        });
    copy_tree(system_units, &root.path().join("usr/lib/systemd/system"));

    let bin = root.path().join(BINARY.trim_start_matches('/'));
    std::fs::create_dir_all(bin.parent().unwrap()).unwrap();
    if std::fs::hard_link(env!("CARGO_BIN_EXE_tether"), &bin).is_err() {
        std::fs::copy(env!("CARGO_BIN_EXE_tether"), &bin).unwrap();
    }
    // ExecReload's kill, as the distribution installs it.
    let kill = root.path().join("bin/kill");
    std::fs::create_dir_all(kill.parent().unwrap()).unwrap();
    std::fs::copy("/bin/kill", &kill).unwrap();
    let config = root.path().join(CONFIG.trim_start_matches('/'));
    std::fs::create_dir_all(config.parent().unwrap()).unwrap();
    std::fs::copy(example_config_path(), &config).unwrap();

    let units = root.path().join("etc/systemd/system");
    std::fs::create_dir_all(&units).unwrap();
    std::fs::write(units.join(UNIT_NAME), unit).unwrap();
    root
}

struct Verdict {
    success: bool,
    /// Every line of output that mentions the unit, its binary or its config.
    about_unit: Vec<String>,
    all: String,
}

fn verify(label: &str, unit: &str) -> Verdict {
    let root = installed_root(label, unit);
    let out = Command::new(systemd_analyze())
        .arg("verify")
        .arg(format!("--root={}", root.path().display()))
        // Only this unit's own problems decide the exit status; its
        // dependencies are the distribution's.
        .arg("--recursive-errors=no")
        .arg(UNIT_NAME)
        .output()
        .unwrap();
    let all = printed(&out);
    let about_unit = all
        .lines()
        .filter(|l| l.contains("tether"))
        .map(str::to_owned)
        .collect();
    Verdict {
        success: out.status.success(),
        about_unit,
        all,
    }
}

#[test]
fn systemd_analyze_verify_accepts_the_unit_without_a_word() {
    let clean = verify("verify", &unit_text());
    assert!(
        clean.success && clean.about_unit.is_empty(),
        "systemd-analyze verify objects to deploy/systemd/tether.service:\n{}",
        clean.all
    );

    // The same check on broken copies must complain, or it proves nothing.
    // An unknown directive is only a warning (exit status 0) ...
    let unknown = unit_text().replacen("Type=notify\n", "Type=notify\nDrainTimeoutSec=30s\n", 1);
    let broken = verify("unknown-key", &unknown);
    assert!(
        broken
            .about_unit
            .iter()
            .any(|l| l.contains("DrainTimeoutSec")),
        "verify let an unknown directive through:\n{}",
        broken.all
    );
    // ... an ExecStart binary that is not installed is an error.
    let missing = unit_text().replace(
        &format!("ExecStart={BINARY} "),
        &format!("ExecStart={BINARY}-missing "),
    );
    assert_ne!(missing, unit_text());
    let broken = verify("missing-binary", &missing);
    assert!(
        !broken.success && broken.about_unit.iter().any(|l| l.contains("-missing")),
        "verify let a missing ExecStart binary through:\n{}",
        broken.all
    );
}

#[test]
fn systemd_analyze_security_rates_the_sandbox_ok() {
    let version = systemd_version();
    assert!(
        version >= 250,
        "systemd-analyze security --offline needs systemd 250 or newer, found {version}"
    );
    let root = installed_root("security", &unit_text());
    let out = Command::new(systemd_analyze())
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(format!("--root={}", root.path().display()))
        .arg(UNIT_NAME)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "systemd-analyze security failed:\n{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // "→ Overall exposure level for tether.service: 1.1 OK 🙂"
    let exposure: f64 = text
        .lines()
        .find_map(|l| l.split_once("Overall exposure level for tether.service:"))
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no overall exposure level in:\n{text}"));
    assert!(
        exposure <= MAX_EXPOSURE,
        "exposure {exposure} is above {MAX_EXPOSURE}:\n{text}"
    );
}

/// `[section] key=value` entries of a unit file, in order.
struct Unit(Vec<(String, String, String)>);

impl Unit {
    fn parse(text: &str) -> Unit {
        let mut entries = Vec::new();
        let mut section = String::new();
        let mut pending = String::new();
        for line in text.lines() {
            let line = line.trim();
            if pending.is_empty() && (line.is_empty() || line.starts_with(['#', ';'])) {
                continue;
            }
            if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                section = name.to_owned();
                continue;
            }
            if let Some(head) = line.strip_suffix('\\') {
                pending.push_str(head);
                pending.push(' ');
                continue;
            }
            pending.push_str(line);
            let (key, value) = pending
                .split_once('=')
                .unwrap_or_else(|| panic!("not a key=value line: {pending:?}"));
            entries.push((
                section.clone(),
                key.trim().to_owned(),
                value.trim().to_owned(),
            ));
            pending.clear();
        }
        Unit(entries)
    }

    fn all(&self, section: &str, key: &str) -> Vec<&str> {
        self.0
            .iter()
            .filter(|(s, k, _)| s == section && k == key)
            .map(|(_, _, v)| v.as_str())
            .collect()
    }

    /// The value in force: the last assignment.
    fn get(&self, section: &str, key: &str) -> Option<&str> {
        self.all(section, key).last().copied()
    }

    fn service(&self, key: &str) -> &str {
        self.get("Service", key)
            .unwrap_or_else(|| panic!("the unit sets no {key}="))
    }
}

/// A systemd time span: "45s", "1min 30s", "500ms", or bare seconds.
fn time_span(value: &str) -> Duration {
    if let Ok(secs) = value.parse::<u64>() {
        return Duration::from_secs(secs);
    }
    let mut total = Duration::ZERO;
    let mut rest = value.trim();
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        let number: u64 = rest[..digits]
            .parse()
            .unwrap_or_else(|_| panic!("bad time span {value:?}"));
        rest = rest[digits..].trim_start();
        let unit_len = rest
            .find(|c: char| !c.is_ascii_alphabetic())
            .unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        rest = rest[unit_len..].trim_start();
        total += match unit {
            "ms" | "msec" => Duration::from_millis(number),
            "" | "s" | "sec" | "second" | "seconds" => Duration::from_secs(number),
            "m" | "min" | "minute" | "minutes" => Duration::from_secs(number * 60),
            "h" | "hr" | "hour" | "hours" => Duration::from_secs(number * 3600),
            _ => panic!("unexpected unit {unit:?} in time span {value:?}"),
        };
    }
    total
}

/// The example config as tether sees it, every default filled in: the TOML
/// that `tether check` prints for it.
fn effective_example_config() -> toml::Table {
    let out = run_ok(
        tether_command()
            .args(["check", "--config"])
            .arg(example_config_path()),
        "",
    );
    String::from_utf8(out.stdout).unwrap().parse().unwrap()
}

fn duration_at(table: &toml::Table, section: &str, key: &str) -> Duration {
    let text = table[section][key]
        .as_str()
        .unwrap_or_else(|| panic!("{section}.{key} is not a duration"));
    humantime::parse_duration(text).unwrap()
}

#[test]
fn tether_check_accepts_the_example_config() {
    let file: toml::Table = std::fs::read_to_string(example_config_path())
        .unwrap()
        .parse()
        .unwrap();
    // The unit's timeouts are written against these; the example states them.
    for key in ["drain_timeout", "ready_timeout"] {
        assert!(
            file.get("runtime").and_then(|r| r.get(key)).is_some(),
            "deploy/systemd/tether.toml should state runtime.{key}"
        );
    }
    let effective = effective_example_config();
    assert_eq!(
        effective["listener"][0]["listen"].as_str(),
        Some("127.0.0.1:8080"),
        "the app next to tether connects to 127.0.0.1:8080"
    );
}

#[test]
fn the_unit_runs_tether_as_a_notify_service_at_the_installed_paths() {
    let unit = Unit::parse(&unit_text());
    assert_eq!(unit.service("Type"), "notify");
    assert_eq!(unit.service("NotifyAccess"), "main");
    assert_eq!(
        unit.all("Service", "ExecStart"),
        [format!("{BINARY} run --config {CONFIG}")],
        "one ExecStart, running the installed binary on the installed config"
    );
    assert_eq!(
        unit.get("Service", "ExecReload"),
        Some("/bin/kill -HUP $MAINPID"),
        "a reload is tether's SIGHUP"
    );
    // Every other command the unit runs is the installed tether on the
    // installed config.
    for (section, key, value) in &unit.0 {
        if section == "Service" && key.starts_with("Exec") && key != "ExecReload" {
            let mut words = value.split_whitespace();
            let program = words
                .next()
                .unwrap()
                .trim_start_matches(['@', '-', ':', '+', '!']);
            assert_eq!(program, BINARY, "{key}={value}");
            let words: Vec<&str> = words.collect();
            if let Some(at) = words.iter().position(|w| *w == "--config" || *w == "-c") {
                assert_eq!(words.get(at + 1).copied(), Some(CONFIG), "{key}={value}");
            }
        }
    }
    assert_eq!(unit.service("KillSignal"), "SIGTERM");
    assert_eq!(unit.service("Restart"), "on-failure");
    assert_eq!(unit.get("Install", "WantedBy"), Some("multi-user.target"));
    assert_eq!(unit.service("RuntimeDirectory"), "tether");
}

#[test]
fn the_unit_timeouts_leave_room_for_readiness_and_the_drain() {
    let unit = Unit::parse(&unit_text());
    let config = effective_example_config();
    let drain = duration_at(&config, "runtime", "drain_timeout");
    let ready = duration_at(&config, "runtime", "ready_timeout");
    let stop = time_span(unit.service("TimeoutStopSec"));
    let start = time_span(unit.service("TimeoutStartSec"));
    assert!(
        stop >= drain + STOP_MARGIN,
        "TimeoutStopSec {stop:?} must exceed drain_timeout {drain:?} by {STOP_MARGIN:?}: \
         systemd would SIGKILL a drain in progress"
    );
    assert!(
        start > ready,
        "TimeoutStartSec {start:?} must exceed ready_timeout {ready:?}: with a backend \
         down, systemd would kill tether before it reports ready"
    );
}

#[test]
fn a_bad_config_is_not_restarted_in_a_loop() {
    let unit = Unit::parse(&unit_text());
    let dir = TempDir::new("deploy-systemd-bad-config");
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[[listener]]\nname = \"app\"\nlisten = \"nowhere\"\n").unwrap();
    let out = tether_command()
        .args(["run", "--config"])
        .arg(&bad)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let code = out.status.code().expect("tether run exits on a bad config");
    assert_ne!(code, 0);
    let prevented: Vec<&str> = unit
        .all("Service", "RestartPreventExitStatus")
        .iter()
        .flat_map(|v| v.split_whitespace())
        .collect();
    assert!(
        prevented.contains(&code.to_string().as_str()),
        "tether run exits {code} on a bad config; RestartPreventExitStatus= is {prevented:?}"
    );
}

#[test]
fn limit_nofile_covers_every_connection_the_example_config_allows() {
    let unit = Unit::parse(&unit_text());
    let config = effective_example_config();
    let clients: u64 = config["listener"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["max_connections"].as_integer().unwrap() as u64)
        .sum();
    let upstream: u64 = config["upstream"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| {
            let endpoints = u["endpoints"].as_array().unwrap().len() as u64;
            endpoints * u["pool"]["max_connections"].as_integer().unwrap() as u64
        })
        .sum();
    let needed = clients + upstream + NOFILE_SLACK;
    let limit = unit.service("LimitNOFILE");
    let soft: u64 = limit
        .split(':')
        .next()
        .unwrap()
        .parse()
        .unwrap_or_else(|_| panic!("LimitNOFILE={limit} is not a number"));
    assert!(
        soft >= needed,
        "LimitNOFILE={limit} is below {clients} client + {upstream} upstream + \
         {NOFILE_SLACK} spare descriptors = {needed}"
    );
    // The unit's comment shows the arithmetic for the example config; keep it
    // true when the example changes.
    assert!(
        unit_text().contains(&format!("= {needed},")),
        "the LimitNOFILE comment in tether.service should give the sum {needed}"
    );
}

#[test]
fn the_sandbox_keeps_what_a_proxy_needs() {
    let unit = Unit::parse(&unit_text());
    assert_eq!(unit.service("DynamicUser"), "yes");
    assert_eq!(unit.service("CapabilityBoundingSet"), "");
    assert_eq!(unit.service("AmbientCapabilities"), "");
    let mut families: Vec<&str> = unit
        .service("RestrictAddressFamilies")
        .split_whitespace()
        .collect();
    families.sort_unstable();
    // AF_NETLINK: the TIME_WAIT counts come from the kernel's sock_diag.
    assert_eq!(families, ["AF_INET", "AF_INET6", "AF_NETLINK", "AF_UNIX"]);
    for key in [
        "PrivateNetwork",
        "IPAddressDeny",
        "IPAddressAllow",
        "ProcSubset",
    ] {
        assert!(
            unit.get("Service", key).is_none(),
            "{key}= would cut tether off from its backends or from /proc/sys"
        );
    }
    assert!(unit
        .all("Service", "SystemCallFilter")
        .contains(&"@system-service"));
    assert_eq!(unit.service("SystemCallErrorNumber"), "EPERM");
}

/// Binds a loopback port and gives it back, for a child to bind.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits for a notify message containing `line`, returning every message seen.
fn wait_for(
    socket: &UnixDatagram,
    line: &str,
    deadline: Instant,
) -> Result<Vec<String>, Vec<String>> {
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(seen);
        }
        socket.set_read_timeout(Some(left)).unwrap();
        match socket.recv(&mut buf) {
            Ok(n) => {
                let message = String::from_utf8_lossy(&buf[..n]).into_owned();
                let found = message.lines().any(|l| l == line);
                seen.push(message);
                if found {
                    return Ok(seen);
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Err(seen)
            }
            Err(e) => panic!("notify socket: {e}"),
        }
    }
}

/// Kills and reaps the child if the test ends early.
struct Reap(std::process::Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn tether_reports_ready_and_stopping_within_the_unit_timeouts() {
    let unit = Unit::parse(&unit_text());
    let start_timeout = time_span(unit.service("TimeoutStartSec"));
    let stop_timeout = time_span(unit.service("TimeoutStopSec"));

    // The example config, with its backend replaced by one on loopback that
    // accepts and holds connections, and its ports by free ones.
    let backend = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let backend_addr = backend.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in backend.incoming() {
            match stream {
                Ok(s) => held.push(s),
                Err(_) => break,
            }
        }
    });
    let dir = TempDir::new("deploy-systemd-notify");
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    let log_path = dir.path().join("stderr.log");
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();

    let began = Instant::now();
    let child = tether_command()
        .args(["run", "--config"])
        .arg(example_config_path())
        .env("NOTIFY_SOCKET", &socket_path)
        .env(
            "TETHER__LISTENER__0__LISTEN",
            format!("127.0.0.1:{}", free_port()),
        )
        .env(
            "TETHER__ADMIN__LISTEN",
            format!("127.0.0.1:{}", free_port()),
        )
        .env(
            "TETHER__UPSTREAM__0__ENDPOINTS",
            format!("[\"{backend_addr}\"]"),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    let mut child = Reap(child);

    let ready = wait_for(&socket, "READY=1", began + start_timeout);
    assert!(
        ready.is_ok(),
        "no READY=1 within TimeoutStartSec ({start_timeout:?}); got {ready:?}; stderr:\n{}",
        log()
    );

    send_signal(child.0.id(), "TERM");
    let stopped_at = Instant::now();
    let stopping = wait_for(&socket, "STOPPING=1", stopped_at + stop_timeout);
    assert!(
        stopping.is_ok(),
        "no STOPPING=1 after SIGTERM: {stopping:?}; stderr:\n{}",
        log()
    );
    let status = loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            stopped_at.elapsed() < stop_timeout,
            "tether did not exit within TimeoutStopSec ({stop_timeout:?}); stderr:\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        status.success(),
        "tether exited {status} after SIGTERM; stderr:\n{}",
        log()
    );
}
