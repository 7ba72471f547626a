//! Worker event loops: one single-threaded tokio runtime per worker, each on
//! a thread of its own, so a request stays on one thread from accept to
//! response with no work-stealing scheduler between its client and upstream
//! tasks. The caller's thread is worker 0; [`Workers`] holds the others.

use tokio_util::sync::CancellationToken;

/// Worker runtimes 1..n, running until [`Workers::stop`].
pub(crate) struct Workers {
    handles: Vec<tokio::runtime::Handle>,
    threads: Vec<std::thread::JoinHandle<()>>,
    stop: CancellationToken,
}

impl Workers {
    /// Starts `count - 1` workers (the caller's thread is the first).
    pub(crate) fn start(count: usize) -> std::io::Result<Self> {
        let mut workers = Self {
            handles: Vec::new(),
            threads: Vec::new(),
            stop: CancellationToken::new(),
        };
        for index in 1..count {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            workers.handles.push(runtime.handle().clone());
            let stop = workers.stop.clone();
            let thread = std::thread::Builder::new()
                .name(format!("tether-worker-{index}"))
                .spawn(move || {
                    runtime.block_on(stop.cancelled_owned());
                    // Parked tasks (a blocked DNS lookup) must not hold the exit.
                    runtime.shutdown_background();
                });
            match thread {
                Ok(thread) => workers.threads.push(thread),
                Err(e) => {
                    workers.stop();
                    return Err(e);
                }
            }
        }
        Ok(workers)
    }

    /// Handles to spawn onto workers 1..n.
    pub(crate) fn handles(&self) -> &[tokio::runtime::Handle] {
        &self.handles
    }

    /// Ends every worker's event loop and waits for its thread.
    pub(crate) fn stop(self) {
        self.stop.cancel();
        for thread in self.threads {
            let _ = thread.join();
        }
    }
}

/// Workers for `worker_threads` (0 = one per core).
pub(crate) fn count(worker_threads: usize) -> usize {
    match worker_threads {
        0 => std::thread::available_parallelism().map_or(1, usize::from),
        n => n,
    }
}
