//! Watching the configuration file (`runtime.watch_config`): a change
//! reloads it.
//!
//! The file is looked at ([`FileLook`]) every `runtime.watch_interval`
//! rather than through inotify: a look follows the path as it resolves now,
//! so it sees every way a file is replaced alike — an edit in place, an
//! editor's new file renamed over the old, and Kubernetes' swap of the
//! `..data` symlink of a ConfigMap volume, which changes no watched inode of
//! the file itself.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use super::reload::{Live, Outcome};
use crate::config::FileLook;

/// A change is applied once the file has looked the same for this long:
/// a writer that truncates and then writes is not read half-way.
const SETTLE: Duration = Duration::from_millis(100);

/// A reload that failed though the file was good (a new listener's port
/// still taken) is tried again after this.
const RETRY_FAILED: Duration = Duration::from_secs(5);

/// Reloads `live` whenever its source file changes, while
/// `runtime.watch_config` is on; ends when the drain starts.
pub(super) async fn watch_config(live: Arc<Live>) {
    let Some(path) = live.source().map(Path::to_path_buf) else {
        return;
    };
    let drain = live.context.shutdown.drain.clone();
    let mut last = FileLook::at(&path);
    loop {
        let runtime = live.config().runtime.clone();
        tokio::select! {
            () = tokio::time::sleep(runtime.watch_interval) => {}
            () = drain.cancelled() => return,
        }
        if !runtime.watch_config {
            // `last` stays: a change made while watching was off is seen
            // once it is back on (a reload of what already runs changes
            // nothing), and no change is lost at the moment it turns on.
            continue;
        }
        let seen = FileLook::at(&path);
        if seen == last {
            continue;
        }
        tokio::time::sleep(SETTLE).await;
        if FileLook::at(&path) != seen {
            continue;
        }
        if seen.is_none() {
            last = seen;
            tracing::warn!(path = %path.display(), "configuration file gone; still serving the last one loaded");
            continue;
        }
        tracing::info!(path = %path.display(), "configuration file changed: reloading");
        match live.reload_announced().await.result {
            // Not the file's fault (a port still taken): tried again.
            Outcome::Failed => tokio::time::sleep(RETRY_FAILED).await,
            // Applied, unchanged, or invalid until the file changes again.
            _ => last = seen,
        }
    }
}
