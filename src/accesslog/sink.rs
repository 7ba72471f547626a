//! One log's queue and its writer thread. The thread, not a tokio task, does
//! the writes: a write to a slow file or a full pipe blocks, and must never
//! block a worker that serves requests.

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::Arc;

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
    progress: Arc<Progress>,
}

/// How far the writer has come, for a process about to exit.
#[derive(Default)]
struct Progress {
    /// Lines queued.
    queued: AtomicU64,
    /// Lines the writer had taken, written and flushed when it last found
    /// the queue empty.
    settled: AtomicU64,
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
        let progress = Arc::new(Progress::default());
        let seen = progress.clone();
        std::thread::Builder::new()
            .name(format!("tether-log-{log}"))
            .spawn(move || write_lines(log, target, &lines, &lost, &seen))
            .map_err(|source| LogError::Thread { log, source })?;
        Ok(Self {
            queue,
            format: settings.format,
            dropped,
            progress,
        })
    }

    /// Whether every line queued so far has been written and flushed.
    pub fn settled(&self) -> bool {
        self.progress.settled.load(Ordering::Acquire)
            >= self.progress.queued.load(Ordering::Acquire)
    }

    /// Waits, up to `limit`, until every line queued so far is written: the
    /// last lines of a process that is about to exit.
    pub async fn settle(&self, limit: std::time::Duration) {
        const POLL: std::time::Duration = std::time::Duration::from_millis(5);
        let deadline = tokio::time::Instant::now() + limit;
        while !self.settled() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(POLL).await;
        }
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
            Ok(()) => {
                self.progress.queued.fetch_add(1, Ordering::AcqRel);
            }
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
fn write_lines(
    log: &'static str,
    target: Target,
    lines: &Receiver<String>,
    lost: &Counter,
    progress: &Progress,
) {
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
    let mut taken = 0u64;
    loop {
        let line = match lines.try_recv() {
            Ok(line) => line,
            Err(TryRecvError::Empty) => {
                note(log, &mut failing, out.flush(), lost, 0);
                progress.settled.store(taken, Ordering::Release);
                match lines.recv() {
                    Ok(line) => line,
                    Err(_) => break,
                }
            }
            Err(TryRecvError::Disconnected) => break,
        };
        taken += 1;
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

    #[tokio::test]
    async fn lines_are_appended_to_the_file_and_settle() {
        let path = std::env::temp_dir().join(format!("tether-sink-{}.log", fastrand::u64(..)));
        std::fs::write(&path, "earlier\n").unwrap();
        let settings = SinkSettings {
            log: "access",
            format: LogFormat::Text,
            path: Some(path.clone()),
            buffer_lines: 8,
        };
        let dropped = Counter::default();
        let sink = Sink::start(&settings, dropped.clone()).unwrap();
        sink.write(&serde_json::json!({"status": 200, "target": "/a b"}));
        sink.settle(std::time::Duration::from_secs(10)).await;
        assert!(sink.settled());
        let text = std::fs::read_to_string(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        assert_eq!(text, "earlier\nstatus=200 target=\"/a b\"\n");
        assert_eq!(dropped.get(), 0);
    }

    #[test]
    fn a_file_that_cannot_be_opened_is_reported_at_start() {
        let settings = SinkSettings {
            log: "connections",
            format: LogFormat::Json,
            path: Some(PathBuf::from("/nonexistent-dir/tether.log")),
            buffer_lines: 8,
        };
        let error = Sink::start(&settings, Counter::default()).unwrap_err();
        assert!(
            error.to_string().contains("/nonexistent-dir/tether.log"),
            "{error}"
        );
    }
}
