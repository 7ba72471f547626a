//! `tether demo` proves the promise with the kernel's own figures. As root
//! (CI runs as root) the backend gets a host of its own, and going direct runs
//! out of ephemeral ports while every request through tether succeeds; on
//! loopback, and without the privileges, the JSON says which mode ran. The
//! demo's namespaces leave nothing behind, even when it is interrupted.

mod common;

use std::collections::HashSet;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use common::{eventually_blocking, printed, run_ok, send_signal, tether_command};

/// One demo at a time: each loads both cores, and a namespace number freed by
/// one may be reused by another's.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn demo(args: &[&str]) -> serde_json::Value {
    let out = run_ok(tether_command().arg("demo").args(args).arg("--json"), "");
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", printed(&out)))
}

fn n(v: &serde_json::Value, k: &str) -> f64 {
    v[k].as_f64().unwrap_or_else(|| panic!("{k} in {v}"))
}

/// What both modes show: through tether, no errors, a handful of pooled
/// connections and no TIME_WAIT toward or in the backend.
fn assert_tether_pools(report: &serde_json::Value) {
    let tether = &report["tether"];
    assert!(n(tether, "requests") > 100.0, "{report}");
    assert_eq!(n(tether, "errors"), 0.0, "{report}");
    assert!(
        n(tether, "backend_connections") <= n(report, "pool_size"),
        "{report}"
    );
    assert!(n(report, "pooled_connections") >= 1.0, "{report}");
    assert!(
        n(report, "pooled_connections") <= n(report, "pool_size"),
        "{report}"
    );
    assert_eq!(n(tether, "time_wait_to_backend"), 0.0, "{report}");
    assert_eq!(n(tether, "time_wait_in_backend"), 0.0, "{report}");
    for key in ["rps", "p50_ms", "p99_ms", "time_wait_on_listener"] {
        assert!(tether[key].is_number(), "{key} missing: {report}");
    }
}

#[test]
fn toward_a_remote_backend_going_direct_runs_out_of_ports_and_tether_does_not() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let report = demo(&["--duration", "3s", "--concurrency", "4", "--ports", "200"]);
    assert_eq!(report["mode"], "namespaces", "{report}");
    assert_eq!(n(&report, "ephemeral_ports"), 200.0, "{report}");
    let direct = &report["direct"];
    // Each closed connection holds its port for 60 s: at most 200 requests,
    // then only EADDRNOTAVAIL, well within the phase.
    assert!(
        n(&direct["errors_by_kind"], "EADDRNOTAVAIL") > 0.0,
        "{report}"
    );
    assert!(n(direct, "requests") <= 200.0, "{report}");
    assert!(n(direct, "first_error_after_s") < 2.0, "{report}");
    assert!(
        n(direct, "time_wait_to_backend") >= n(direct, "requests"),
        "{report}"
    );
    // Through tether, on the same host with those ports gone.
    assert_tether_pools(&report);
}

#[test]
fn on_loopback_the_json_says_so_and_what_it_cannot_show() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let report = demo(&["--duration", "1s", "--concurrency", "4", "--loopback"]);
    assert_eq!(report["mode"], "loopback", "{report}");
    assert!(
        report["loopback_limits"]
            .as_str()
            .is_some_and(|s| s.contains("one second")),
        "{report}"
    );
    let direct = &report["direct"];
    assert!(n(direct, "requests") > 100.0, "{report}");
    // Direct: one backend connection and one TIME_WAIT per request.
    assert!(
        n(direct, "backend_connections") >= n(direct, "requests"),
        "{report}"
    );
    assert!(n(direct, "time_wait_to_backend") > 100.0, "{report}");
    assert_tether_pools(&report);
}

#[test]
fn without_privileges_it_falls_back_to_loopback_and_says_why() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    // setpriv (util-linux) drops to nobody with no capabilities at all.
    let out = run_ok(
        Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "--inh-caps=-all",
                "--bounding-set=-all",
            ])
            .arg(env!("CARGO_BIN_EXE_tether"))
            .args([
                "demo",
                "--duration",
                "500ms",
                "--concurrency",
                "2",
                "--json",
            ]),
        " (setpriv is in util-linux)",
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["mode"], "loopback", "{report}");
    let reason = report["loopback_reason"].as_str().unwrap_or_default();
    assert!(reason.contains("needs root"), "{report}");
    // One line tells the user what this mode cannot show.
    assert!(
        stderr
            .lines()
            .any(|l| l.starts_with("loopback mode") && l.contains("one second")),
        "{stderr}"
    );
}

/// Network namespace inodes of every thread of `pid`.
fn namespaces_of(pid: u32) -> HashSet<String> {
    let mut found = HashSet::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return found;
    };
    for task in tasks.flatten() {
        if let Ok(link) = std::fs::read_link(task.path().join("ns/net")) {
            found.insert(link.to_string_lossy().into_owned());
        }
    }
    found
}

/// Network namespace inodes anything on this machine keeps alive: a
/// thread in it, an open descriptor of it, or a mount of it.
fn namespaces_in_use() -> HashSet<String> {
    let mut found = HashSet::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|p| p.parse().ok()) else {
            continue;
        };
        found.extend(namespaces_of(pid));
        if let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
            for fd in fds.flatten() {
                if let Ok(link) = std::fs::read_link(fd.path()) {
                    let link = link.to_string_lossy().into_owned();
                    if link.starts_with("net:[") {
                        found.insert(link);
                    }
                }
            }
        }
    }
    // A mount of a namespace (`ip netns add`) shows as its inode in mountinfo.
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    for word in mounts.split_whitespace() {
        if word.starts_with("net:[") {
            found.insert(word.to_owned());
        }
    }
    found
}

fn links() -> String {
    let out = Command::new("ip").args(["-o", "link"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn an_interrupted_demo_leaves_no_namespace_interface_or_sysctl_behind() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let own = namespaces_of(std::process::id());
    let range_before = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap();
    let links_before = links();
    let mut command = tether_command();
    // A run started in the background by a non-interactive shell inherits
    // SIGINT ignored; the interruption below must reach the demo as Ctrl-C
    // would. `signal` is async-signal-safe, as code between fork and exec
    // must be.
    #[allow(unsafe_code)]
    unsafe {
        command.pre_exec(|| {
            libc::signal(libc::SIGINT, libc::SIG_DFL);
            Ok(())
        });
    }
    let mut child = command
        .args(["demo", "--duration", "20s", "--ports", "1000"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Wait until its threads are in both namespaces of their own.
    let mut demo_namespaces = HashSet::new();
    eventually_blocking(|| {
        demo_namespaces = namespaces_of(child.id())
            .difference(&own)
            .cloned()
            .collect();
        demo_namespaces.len() >= 2
    });
    // The search below sees them while they are alive.
    assert!(
        demo_namespaces.is_subset(&namespaces_in_use()),
        "{demo_namespaces:?} not found"
    );
    // The host's own namespace is untouched while it runs.
    assert!(!links().contains("tether-app"), "{}", links());
    std::thread::sleep(Duration::from_millis(500));
    send_signal(child.id(), "INT");
    // The demo exits once SIGINT has it undo its namespaces.
    eventually_blocking(|| child.try_wait().unwrap().is_some());
    let left: Vec<String> = namespaces_in_use()
        .intersection(&demo_namespaces)
        .cloned()
        .collect();
    assert!(left.is_empty(), "namespaces still in use: {left:?}");
    assert_eq!(links(), links_before, "the host's interfaces changed");
    assert_eq!(
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap(),
        range_before
    );
}
