//! What the allocator keeps and what it gives back.
//!
//! In steady traffic, freed heap is kept. Exchanges borrow buffers while a
//! message is in flight, so the top of an arena rises and falls by the
//! in-flight buffers at every burst; glibc's malloc returns the free top to
//! the kernel once it passes 128 KiB (`M_TRIM_THRESHOLD`) and takes it back
//! at the next burst, with a `brk` and a page fault per page touched again
//! (measured under keep-alive load: a `brk` per eight requests and 0.6 page
//! faults per request). [`retain`] raises that threshold to
//! `runtime.heap_retain` at start, as HAProxy keeps freed buffers in its
//! pools. Setting it ends glibc's adaptive thresholds, so the size above
//! which a block is mapped on its own (`M_MMAP_THRESHOLD`) is set with it,
//! in the ratio glibc keeps between the two: half of it, from 128 KiB (the
//! default) to 32 MiB (glibc's most). `heap_retain = 0` leaves glibc's
//! own policy.
//!
//! After a burst of client connections, memory is given back. glibc's
//! malloc keeps what a connection freed in its arenas (one per worker
//! thread), so ten thousand idle clients that came and went would leave
//! their 130 MB resident for good. Once a second the number of open client
//! connections is read; when it has fallen to half its peak since the last
//! trim, `malloc_trim(0)` hands every arena's free pages back to the kernel,
//! whatever the threshold. The allocator stays glibc's.

use std::time::Duration;

/// How often the open connections are counted: an atomic read, so often
/// enough that memory is back within seconds of a burst's end.
const CHECK_EVERY: Duration = Duration::from_secs(1);

/// Counts the open client connections with `open` every second, for ever, and
/// trims the allocator's free memory after each fall to half the peak.
pub async fn give_back_after_bursts(open: impl Fn() -> usize) {
    let mut tick = tokio::time::interval(CHECK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut peak = 0;
    loop {
        tick.tick().await;
        let now = open();
        peak = peak.max(now);
        if fell_by_half(peak, now) {
            // A trim after 10,000 connections takes tens of milliseconds:
            // off the event loop, which serves clients on this thread too.
            let _ = tokio::task::spawn_blocking(move || trim(peak, now)).await;
            peak = now;
        }
    }
}

/// Lets each malloc arena keep up to `bytes` of free memory at its top
/// rather than return it to the kernel at once, and maps blocks on their
/// own only from half that size (see the module's doc); 0 changes nothing.
/// Called at start, before the workers' threads exist.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
pub fn retain(bytes: u64) {
    /// glibc's default `M_MMAP_THRESHOLD`, and the most it accepts.
    const MMAP_DEFAULT: u64 = 128 * 1024;
    const MMAP_MAX: u64 = 32 * 1024 * 1024;
    if bytes == 0 {
        return;
    }
    let trim = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    let mmap = libc::c_int::try_from((bytes / 2).clamp(MMAP_DEFAULT, MMAP_MAX))
        .unwrap_or(libc::c_int::MAX);
    // SAFETY: mallopt takes no pointer and sets only malloc's own
    // parameters, under its lock; every value is valid (0 is its error
    // return). It runs at start, before the workers' threads are spawned.
    let set = unsafe {
        libc::mallopt(libc::M_TRIM_THRESHOLD, trim) == 1
            && libc::mallopt(libc::M_MMAP_THRESHOLD, mmap) == 1
    };
    if !set {
        tracing::warn!(
            bytes,
            "the allocator refused runtime.heap_retain: freed heap goes back to the kernel at its default threshold"
        );
    }
}

/// Other allocators have their own policy.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn retain(_bytes: u64) {}

/// Whether `now` connections are half the `peak` or fewer: what the gone
/// half freed is worth giving back, and a steady count never trims.
pub fn fell_by_half(peak: usize, now: usize) -> bool {
    now < peak && now <= peak / 2
}

/// Returns the free memory of every malloc arena to the kernel.
fn trim(peak: usize, now: usize) {
    let started = std::time::Instant::now();
    let released = release_free_memory();
    tracing::debug!(
        peak,
        now,
        released,
        took = ?started.elapsed(),
        "free memory returned to the system"
    );
}

/// `malloc_trim(0)`: true when memory was returned.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn release_free_memory() -> bool {
    // SAFETY: malloc_trim takes no pointer and touches only the allocator's
    // own state, under each arena's lock, so it is safe beside allocations on
    // other threads; Rust's global allocator is this same malloc.
    unsafe { libc::malloc_trim(0) == 1 }
}

/// Other allocators give memory back by themselves.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn release_free_memory() -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::fell_by_half;

    #[test]
    fn a_fall_to_half_the_peak_trims_and_a_steady_count_does_not() {
        assert!(fell_by_half(10_002, 2));
        assert!(fell_by_half(10, 5));
        assert!(fell_by_half(1, 0));
        assert!(!fell_by_half(10, 6));
        assert!(!fell_by_half(3, 2), "one of three connections gone");
        assert!(!fell_by_half(0, 0));
        assert!(!fell_by_half(7, 7));
    }
}
