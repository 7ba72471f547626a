//! `tether demo` proves the promise with the kernel's own figures: TIME_WAIT
//! toward the backend piles up going direct and stays at zero through tether.

use std::process::Command;

#[test]
fn demo_shows_time_wait_toward_the_backend_only_without_tether() {
    let out = Command::new(env!("CARGO_BIN_EXE_tether"))
        .args(["demo", "--duration", "1s", "--concurrency", "4", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let direct = &report["direct"];
    let tether = &report["tether"];
    let n = |v: &serde_json::Value, k: &str| v[k].as_f64().unwrap_or_else(|| panic!("{k} in {v}"));

    assert!(n(direct, "requests") > 100.0, "{report}");
    assert!(n(tether, "requests") > 100.0, "{report}");
    assert_eq!(n(tether, "errors"), 0.0, "{report}");
    // Direct: one backend connection and one TIME_WAIT per request.
    assert!(
        n(direct, "backend_connections") >= n(direct, "requests"),
        "{report}"
    );
    assert!(n(direct, "time_wait_to_backend") > 100.0, "{report}");
    // Through tether: a handful of pooled connections and no TIME_WAIT on the backend leg.
    assert!(
        n(tether, "backend_connections") <= n(&report, "pool_size"),
        "{report}"
    );
    assert_eq!(n(tether, "time_wait_to_backend"), 0.0, "{report}");
    assert_eq!(n(tether, "time_wait_in_backend"), 0.0, "{report}");
    for key in ["rps", "p50_ms", "p99_ms", "time_wait_on_listener"] {
        assert!(tether[key].is_number(), "{key} missing: {report}");
    }
}
