//! Logging set-up from `[log]`: text or JSON lines through `tracing`, with a
//! filter that can be changed while tether runs (a reload that changes
//! `log.level`, or the admin server's `/logging`).
//!
//! `RUST_LOG`, when set, overrides `log.level` at start so an operator can
//! raise the level of one module without editing the file; a later change
//! of the filter replaces it.

use std::io::IsTerminal;
use std::sync::{Mutex, OnceLock};

use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

/// Failures to change the log filter.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The directive does not parse as a `tracing` filter.
    #[error("not a valid level or filter: {0}")]
    Filter(#[from] tracing_subscriber::filter::ParseError),
    /// Logging was not set up by [`init`] (a library user's own subscriber).
    #[error("logging was not set up by tether")]
    NotInstalled,
    /// The subscriber is gone.
    #[error("cannot change the filter: {0}")]
    Reload(String),
}

/// Swaps the installed subscriber's filter.
type SetFilter = Box<dyn Fn(EnvFilter) -> Result<(), String> + Send + Sync>;

/// The installed filter's handle and its directive now.
struct Installed {
    set: SetFilter,
    directive: Mutex<String>,
}

static INSTALLED: OnceLock<Installed> = OnceLock::new();

/// Installs the global subscriber. Call once, from `main`.
pub fn init(log: &LogConfig) {
    let (filter, directive) = match std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| EnvFilter::try_new(&v).ok().map(|f| (f, v)))
    {
        Some(from_env) => from_env,
        None => (EnvFilter::new(&log.level), log.level.clone()),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    // The two formats make two subscriber types, so two handle types.
    let (result, set): (_, SetFilter) = match log.format {
        LogFormat::Text => {
            let builder = builder.with_filter_reloading();
            let handle = builder.reload_handle();
            let set = move |f| handle.reload(f).map_err(|e| e.to_string());
            (builder.try_init(), Box::new(set))
        }
        LogFormat::Json => {
            let builder = builder.json().flatten_event(true).with_filter_reloading();
            let handle = builder.reload_handle();
            let set = move |f| handle.reload(f).map_err(|e| e.to_string());
            (builder.try_init(), Box::new(set))
        }
    };
    match result {
        Ok(()) => {
            let _ = INSTALLED.set(Installed {
                set,
                directive: Mutex::new(directive),
            });
        }
        Err(e) => eprintln!("tether: logging already initialised: {e}"),
    }
}

/// Makes `directive` (`"debug"`, `"info,tether::pool=trace"`) the log filter.
pub fn set_filter(directive: &str) -> Result<(), TelemetryError> {
    let filter = EnvFilter::try_new(directive)?;
    let installed = INSTALLED.get().ok_or(TelemetryError::NotInstalled)?;
    (installed.set)(filter).map_err(TelemetryError::Reload)?;
    *installed
        .directive
        .lock()
        .unwrap_or_else(|e| e.into_inner()) = directive.to_owned();
    tracing::info!(filter = directive, "log filter changed");
    Ok(())
}

/// The log filter now, when tether set logging up.
pub fn filter() -> Option<String> {
    INSTALLED.get().map(|installed| {
        installed
            .directive
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    })
}
