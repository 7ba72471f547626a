//! Fixtures shared by the integration tests: one configurable test backend
//! ([`backend`]), a raw-socket client that tells FIN from RST ([`client`]),
//! tether in-process and as a binary ([`tether`]), what the kernel says about
//! sockets, processes and namespaces ([`kernel`]), the repository's files
//! ([`repo`]), certificates for HTTPS backends ([`tls`]), and a backend that
//! writes exact bytes ([`raw`]). Here: the one [`PATIENCE`] that bounds every
//! wait, polling, temporary directories and running commands.

#![allow(dead_code)]

mod backend;
mod client;
mod kernel;
mod raw;
mod repo;
mod tether;
mod tls;

// Each test file uses some of these.
#[allow(unused_imports)]
pub use self::{backend::*, client::*, kernel::*, raw::*, repo::*, tether::*, tls::*};

use std::process::{Command, Output};
use std::time::Duration;

/// How long anything a test waits for may take to happen on a loaded 2-core
/// machine. A test that passes never waits this long; one that fails says so
/// after it.
pub const PATIENCE: Duration = Duration::from_secs(10);

/// How often a condition is polled.
const POLL: Duration = Duration::from_millis(10);

/// Polls `condition` until it holds; panics after [`PATIENCE`].
pub async fn eventually(condition: impl FnMut() -> bool) {
    eventually_within(PATIENCE, condition).await;
}

/// Polls `condition` until it holds; panics after `limit` (for waits whose
/// bound is what the test asserts).
pub async fn eventually_within(limit: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !condition() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not met within {limit:?}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// [`eventually`] for a thread without a runtime.
#[track_caller]
pub fn eventually_blocking(mut condition: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + PATIENCE;
    while !condition() {
        assert!(
            std::time::Instant::now() < deadline,
            "condition not met within {PATIENCE:?}"
        );
        std::thread::sleep(POLL);
    }
}

/// A directory of the test's own under the system's temporary directory,
/// removed on drop.
pub struct TempDir(std::path::PathBuf);

impl TempDir {
    pub fn new(label: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "{label}-{}-{:x}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    pub fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs `command` to its end; panics with its stderr, and `hint`, unless it
/// succeeds.
#[track_caller]
pub fn run_ok(command: &mut Command, hint: &str) -> Output {
    let out = command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}{hint}"));
    assert!(
        out.status.success(),
        "{command:?}: {}\n{}{hint}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// What a command printed: its stdout, then its stderr.
pub fn printed(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}
