//! Giving memory back after a burst of client connections. glibc's malloc
//! keeps what a connection freed in its arenas (one per worker thread), so
//! ten thousand idle clients that came and went would leave their 130 MB
//! resident for good. Once a second the number of open client connections is
//! read; when it has fallen to half its peak since the last trim,
//! `malloc_trim(0)` hands every arena's free pages back to the kernel. The
//! allocator itself is not changed: it keeps the request path as it is.

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
