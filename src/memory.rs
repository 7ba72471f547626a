//! The allocator, what it keeps and what it gives back.
//!
//! tether allocates with jemalloc, not the system's malloc. A new client
//! connection makes some twenty allocations (its task, its socket's
//! registration, the exchange buffers, cancellation handles) that glibc's
//! malloc served from its bins at about 300 instructions each, with a
//! consolidation of its fast bins whenever a buffer-sized block came;
//! jemalloc serves them from a per-thread cache. Counted under callgrind:
//! 34.2k → 30.7k user-space instructions per HTTP/1.0 connection, 24.4k →
//! 23.4k per keep-alive request. The library declares it, so the tests run
//! the allocator that ships.
//!
//! In steady traffic, freed heap is kept. Exchanges borrow buffers while a
//! message is in flight, so the heap rises and falls by the in-flight
//! buffers at every burst; giving the pages back to the kernel at each fall
//! costs a page fault per page touched again at the next burst. jemalloc
//! returns freed pages gradually, over `runtime.heap_release_delay`
//! (its `dirty_decay_ms`; [`release_delay`]), and a background thread of
//! its own does it ([`start_background_release`]), so an idle proxy gives
//! its memory back too. `0` returns them at once.
//!
//! After a burst of client connections, memory is given back at once. Once
//! a second the number of open client connections is read; when it has
//! fallen to half its peak since the last purge, every arena's free pages go
//! back to the kernel, whatever the delay.

use std::time::Duration;

/// The process's allocator (see the module's doc).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's `MALLCTL_ARENAS_ALL`: the arena index that names them all.
const ALL_ARENAS: u32 = 4096;

/// How often the open connections are counted: an atomic read, so often
/// enough that memory is back within seconds of a burst's end.
const CHECK_EVERY: Duration = Duration::from_secs(1);

/// Counts the open client connections with `open` every second, for ever, and
/// purges the allocator's free memory after each fall to half the peak.
pub async fn give_back_after_bursts(open: impl Fn() -> usize) {
    let mut tick = tokio::time::interval(CHECK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut peak = 0;
    loop {
        tick.tick().await;
        let now = open();
        peak = peak.max(now);
        if fell_by_half(peak, now) {
            // A purge after 10,000 connections takes milliseconds: off the
            // event loop, which serves clients on this thread too.
            let _ = tokio::task::spawn_blocking(move || purge(peak, now)).await;
            peak = now;
        }
    }
}

/// Starts the allocator's one background thread, which returns freed pages
/// on the release delay's clock while tether is idle (otherwise that waits
/// for tether's next allocation). Called once, at start.
pub fn start_background_release() {
    // One thread is enough for a sidecar's few arenas; by default jemalloc
    // may start one per CPU of the node, whatever the pod's quota.
    if let Err(error) = tikv_jemalloc_ctl::max_background_threads::write(1) {
        tracing::debug!(%error, "the allocator kept its number of background threads");
    }
    if let Err(error) = tikv_jemalloc_ctl::background_thread::write(true) {
        tracing::warn!(%error, "the allocator's background thread did not start: freed memory goes back only as tether allocates");
    }
}

/// Makes the allocator return freed pages to the kernel gradually over
/// `delay` (at once for zero), in every arena, those to come included.
/// Called at start and on a reload that changes `runtime.heap_release_delay`.
pub fn release_delay(delay: Duration) {
    let ms = isize::try_from(delay.as_millis()).unwrap_or(isize::MAX);
    if let Err(error) = set_decay(b"arenas.dirty_decay_ms\0", ms) {
        tracing::warn!(%error, ?delay, "the allocator refused runtime.heap_release_delay");
        return;
    }
    // `arenas.narenas` counts the arenas there may be; one no thread has
    // used yet does not exist (jemalloc answers EFAULT) and will start with
    // the default just set.
    let arenas = tikv_jemalloc_ctl::arenas::narenas::read().unwrap_or(0);
    let in_use = (0..arenas)
        .filter(|arena| set_decay(format!("arena.{arena}.dirty_decay_ms\0").as_bytes(), ms).is_ok())
        .count();
    tracing::debug!(?delay, in_use, "heap release delay set");
}

/// The release delay in force for arenas to come.
#[allow(unsafe_code)]
pub fn release_delay_in_force() -> Option<Duration> {
    // SAFETY: `arenas.dirty_decay_ms` is an ssize_t, which isize is.
    let ms: isize = unsafe { tikv_jemalloc_ctl::raw::read(b"arenas.dirty_decay_ms\0") }.ok()?;
    u64::try_from(ms).ok().map(Duration::from_millis)
}

/// Writes one arena's (or the default's) decay time.
#[allow(unsafe_code)]
fn set_decay(name: &[u8], ms: isize) -> tikv_jemalloc_ctl::Result<()> {
    // SAFETY: every `*dirty_decay_ms` control is an ssize_t, which isize is;
    // `name` ends in NUL.
    unsafe { tikv_jemalloc_ctl::raw::write(name, ms) }
}

/// Whether `now` connections are half the `peak` or fewer: what the gone
/// half freed is worth giving back, and a steady count never purges.
pub fn fell_by_half(peak: usize, now: usize) -> bool {
    now < peak && now <= peak / 2
}

/// Returns the free pages of every arena to the kernel.
fn purge(peak: usize, now: usize) {
    let started = std::time::Instant::now();
    let purged = purge_all_arenas();
    tracing::debug!(
        peak,
        now,
        purged,
        took = ?started.elapsed(),
        "free memory returned to the system"
    );
}

/// `arena.<MALLCTL_ARENAS_ALL>.purge`: true when jemalloc took it.
#[allow(unsafe_code)]
fn purge_all_arenas() -> bool {
    let name = format!("arena.{ALL_ARENAS}.purge\0");
    // SAFETY: the purge control takes and gives no value, so both pointers
    // are null; `name` ends in NUL. jemalloc locks each arena itself, so it
    // is safe beside allocations on other threads.
    let status = unsafe {
        tikv_jemalloc_sys::mallctl(
            name.as_ptr().cast(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            0,
        )
    };
    status == 0
}

#[cfg(test)]
mod tests {
    use super::fell_by_half;

    #[test]
    fn a_fall_to_half_the_peak_purges_and_a_steady_count_does_not() {
        assert!(fell_by_half(10_002, 2));
        assert!(fell_by_half(10, 5));
        assert!(fell_by_half(1, 0));
        assert!(!fell_by_half(10, 6));
        assert!(!fell_by_half(3, 2), "one of three connections gone");
        assert!(!fell_by_half(0, 0));
        assert!(!fell_by_half(7, 7));
    }
}
