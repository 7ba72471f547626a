//! One log's queue and its writer thread. The thread, not a tokio task, does
//! the writes: a write to a slow file or a full pipe blocks, and must never
//! block a worker that serves requests.

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, SyncSender, TryRecvError, TrySendError};

use prometheus_client::metrics::counter::Counter;
use serde::Serialize;

use super::LogError;
use crate::config::{AccessLogConfig, ConnectionLogConfig, LogFormat};

/// Bytes gathered before a write to the sink; the writer also flushes
/// whenever the queue runs empty, so lines are not held back when it is quiet.
const WRITE_BUFFER: usize = 64 * 1024;

/// Where one log goes and how: what [`Sink::start`] needs of `[log.access]`
/// or `[log.connections]`.
#[derive(Debug, Clone)]
pub struct SinkSettings {
    /// `access` or `connections`: the thread's name and the metric's label.
    pub log: &'static str,
    /// JSON or `key=value` text.
    pub format: LogFormat,
    /// The file appended to; `None`: standard output.
    pub path: Option<PathBuf>,
    /// The queue's bound, in lines.
    pub buffer_lines: usize,
}

impl From<&AccessLogConfig> for SinkSettings {
    fn from(c: &AccessLogConfig) -> Self {
        Self {
            log: "access",
            format: c.format,
            path: c.path.clone(),
            buffer_lines: c.buffer_lines,
        }
    }
}

impl From<&ConnectionLogConfig> for SinkSettings {
    fn from(c: &ConnectionLogConfig) -> Self {
        Self {
            log: "connections",
            format: c.format,
            path: c.path.clone(),
            buffer_lines: c.buffer_lines,
        }
    }
}

/// The request path's end of a log: formats a record and queues the line
/// without ever waiting. A cheap clone; the writer thread ends when the last
/// clone is dropped.
#[derive(Clone)]
pub struct Sink {
    queue: SyncSender<String>,
    format: LogFormat,
    dropped: Counter,
}

impl std::fmt::Debug for Sink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sink")
            .field("format", &self.format)
            .finish()
    }
}

/// Where the writer thread writes.
enum Target {
    Stdout,
    /// Opened at start: a regular file, so an open that fails is reported
    /// before anything is served.
    File(File),
    /// Opened by the writer thread: opening a FIFO for writing waits for a
    /// reader, which must not hold up the start.
    Fifo(PathBuf),
}

impl Sink {
    /// Opens the log's file (standard output without one) and starts its
    /// writer thread; `dropped` counts the lines the queue had no room for,
    /// or that the sink failed to take.
    pub fn start(settings: &SinkSettings, dropped: Counter) -> Result<Self, LogError> {
        let log = settings.log;
        let target = match &settings.path {
            None => Target::Stdout,
            Some(path) if is_fifo(path) => Target::Fifo(path.clone()),
            Some(path) => Target::File(append(path).map_err(|source| LogError::Open {
                log,
                path: path.display().to_string(),
                source,
            })?),
        };
        let (queue, lines) = mpsc::sync_channel(settings.buffer_lines.max(1));
        let lost = dropped.clone();
        std::thread::Builder::new()
            .name(format!("tether-log-{log}"))
            .spawn(move || write_lines(log, target, &lines, &lost))
            .map_err(|source| LogError::Thread { log, source })?;
        Ok(Self {
            queue,
            format: settings.format,
            dropped,
        })
    }

    /// Formats `record` as one line and queues it; drops (and counts) it when
    /// the queue is full.
    pub fn write<T: Serialize>(&self, record: &T) {
        let line = match self.format {
            LogFormat::Json => serde_json::to_string(record).map_err(|e| e.to_string()),
            LogFormat::Text => serde_json::to_value(record)
                .map(|v| text_line(&v))
                .map_err(|e| e.to_string()),
        };
        match line {
            Ok(line) => self.queue_line(line),
            Err(e) => {
                tracing::debug!(error = %e, "cannot format a log line");
                self.dropped.inc();
            }
        }
    }

    fn queue_line(&self, line: String) {
        match self.queue.try_send(line) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.dropped.inc();
            }
        }
    }
}

fn is_fifo(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.file_type().is_fifo())
}

fn append(path: &Path) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

/// The writer thread: writes every queued line, flushing whenever the queue
/// runs empty, until every [`Sink`] is gone.
fn write_lines(log: &'static str, target: Target, lines: &Receiver<String>, lost: &Counter) {
    let out: Box<dyn Write> = match target {
        Target::Stdout => Box::new(io::stdout()),
        Target::File(file) => Box::new(file),
        Target::Fifo(path) => match append(&path) {
            Ok(file) => Box::new(file),
            Err(e) => {
                tracing::error!(log, path = %path.display(), error = %e, "cannot open the log; its lines are dropped");
                // Lines keep being offered: let the queue fill and count them.
                while lines.recv().is_ok() {
                    lost.inc();
                }
                return;
            }
        },
    };
    let mut out = BufWriter::with_capacity(WRITE_BUFFER, out);
    let mut failing = false;
    loop {
        let line = match lines.try_recv() {
            Ok(line) => line,
            Err(TryRecvError::Empty) => {
                note(log, &mut failing, out.flush(), lost, 0);
                match lines.recv() {
                    Ok(line) => line,
                    Err(_) => break,
                }
            }
            Err(TryRecvError::Disconnected) => break,
        };
        let written = out
            .write_all(line.as_bytes())
            .and_then(|()| out.write_all(b"\n"));
        note(log, &mut failing, written, lost, 1);
    }
    let flushed = out.flush();
    note(log, &mut failing, flushed, lost, 0);
}

/// Counts a failed write as `lines` lost and warns once per run of failures.
fn note(log: &'static str, failing: &mut bool, result: io::Result<()>, lost: &Counter, lines: u64) {
    match result {
        Ok(()) => *failing = false,
        Err(e) => {
            lost.inc_by(lines);
            if !*failing {
                tracing::warn!(log, error = %e, "cannot write the log; its lines are dropped");
            }
            *failing = true;
        }
    }
}

/// A record as `key=value` pairs, keys in alphabetical order (the order of
/// `serde_json`'s map); absent (null) fields are left out, strings with
/// spaces, quotes or `=` are quoted.
fn text_line(value: &serde_json::Value) -> String {
    let mut line = String::new();
    let serde_json::Value::Object(fields) = value else {
        return value.to_string();
    };
    for (key, value) in fields {
        let rendered = match value {
            serde_json::Value::Null => continue,
            serde_json::Value::String(s)
                if !s.is_empty()
                    && !s.contains([' ', '"', '=', '\\'])
                    && !s.contains(char::is_control) =>
            {
                s.clone()
            }
            other => other.to_string(),
        };
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(key);
        line.push('=');
        line.push_str(&rendered);
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_lines_leave_out_absent_fields_and_quote_what_needs_it() {
        let value = serde_json::json!({"a": 1, "b": null, "c": "x y", "d": "plain", "e": true});
        assert_eq!(text_line(&value), r#"a=1 c="x y" d=plain e=true"#);
    }
}
