//! The allocator keeps freed heap between bursts for
//! `runtime.heap_release_delay`: counted in the page faults a burst of
//! exchange-sized buffers costs the thread that makes it, with the default
//! delay and with none. The one test in its binary: the delay is the
//! process's.

#![cfg(target_os = "linux")]

use std::time::Duration;

/// Buffers in flight at once in one burst: 64 exchanges' 16 KiB each.
const IN_FLIGHT: usize = 64;
const BUFFER: usize = 16 * 1024;
const BURSTS: usize = 20;

/// Page faults this thread has taken.
fn faults() -> libc::c_long {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes the struct it is given, and nothing else.
    let got = unsafe { libc::getrusage(libc::RUSAGE_THREAD, usage.as_mut_ptr()) };
    assert_eq!(got, 0, "getrusage: {}", std::io::Error::last_os_error());
    // SAFETY: filled in by the successful call above.
    unsafe { usage.assume_init() }.ru_minflt
}

/// Faults per burst after a first one, on a new thread: each burst takes
/// `count` buffers of `size` bytes, touches every page of them, and gives
/// them all back.
fn faults_per_burst(count: usize, size: usize) -> libc::c_long {
    std::thread::spawn(move || {
        let burst = || {
            let buffers: Vec<Vec<u8>> = (0..count).map(|_| vec![1u8; size]).collect();
            std::hint::black_box(&buffers);
        };
        burst();
        let before = faults();
        for _ in 0..BURSTS {
            burst();
        }
        (faults() - before) / BURSTS as libc::c_long
    })
    .join()
    .expect("the burst thread ran")
}

#[test]
fn freed_buffers_stay_with_the_process_for_the_next_burst() {
    let pages = (IN_FLIGHT * BUFFER / 4096) as libc::c_long;
    tether::memory::release_delay(Duration::ZERO);
    assert_eq!(
        tether::memory::release_delay_in_force(),
        Some(Duration::ZERO)
    );
    let at_once = faults_per_burst(IN_FLIGHT, BUFFER);
    let default = tether::config::RuntimeConfig::default().heap_release_delay;
    tether::memory::release_delay(default);
    assert_eq!(tether::memory::release_delay_in_force(), Some(default));
    let delayed = faults_per_burst(IN_FLIGHT, BUFFER);
    eprintln!(
        "page faults per burst of {pages} pages: {at_once} released at once, {delayed} with the {default:?} delay"
    );
    assert!(
        at_once >= pages / 2,
        "with no delay the burst's {pages} pages go back to the kernel and fault in again: {at_once} faults per burst"
    );
    // Slack for the background thread, which may decay a few extents if
    // this thread is descheduled between bursts on a loaded machine.
    assert!(
        delayed <= pages / 10,
        "with heap_release_delay's default the next burst reuses the pages: {delayed} faults per burst (at once {at_once})"
    );
    // A block larger than the thread's cache takes (1.5 MiB: an HTTP/1.0
    // response's body buffered up to `http10_buffer`, say) comes from the
    // kept pages too.
    let large = faults_per_burst(1, 3 * 512 * 1024);
    assert!(
        large <= 2,
        "a 1.5 MiB block is reused from the heap: {large} faults per burst"
    );
}
