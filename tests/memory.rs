//! The allocator keeps freed heap between bursts (`runtime.heap_retain`):
//! counted in the page faults a burst of exchange-sized buffers costs the
//! thread that makes it, before and after tether raises the threshold.
//! The one test in its binary: the threshold, once set, stays for the
//! process.

#![cfg(all(target_os = "linux", target_env = "gnu"))]

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

/// Faults per burst after a first one: each burst takes `count` buffers
/// of `size` bytes, touches every page of them, and gives them all back.
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
    let by_default = faults_per_burst(IN_FLIGHT, BUFFER);
    // An operator's malloc settings would change glibc's defaults.
    let tuned = [
        "GLIBC_TUNABLES",
        "MALLOC_TRIM_THRESHOLD_",
        "MALLOC_TOP_PAD_",
    ]
    .iter()
    .any(|name| std::env::var_os(name).is_some());
    if !tuned {
        assert!(
            by_default >= pages / 2,
            "glibc's default threshold returns the burst's {pages} pages to the kernel: {by_default} faults per burst"
        );
    }
    tether::memory::retain(
        tether::config::RuntimeConfig::default()
            .heap_retain
            .as_u64(),
    );
    let retained = faults_per_burst(IN_FLIGHT, BUFFER);
    eprintln!(
        "page faults per burst of {pages} pages: {by_default} by default, {retained} retained"
    );
    assert!(
        retained <= 2,
        "with heap_retain's default the next burst reuses the pages: {retained} faults per burst (by default {by_default})"
    );
    // Setting the threshold ends glibc's adaptive mmap threshold: a block
    // larger than the free heap kept so far (1.5 MiB: an HTTP/1.0
    // response's body buffered up to `http10_buffer`, say) must still come
    // from the heap and stay there, not be mapped, faulted in and unmapped
    // each time.
    let large = faults_per_burst(1, 3 * 512 * 1024);
    assert!(
        large <= 2,
        "a 1.5 MiB block is reused from the heap: {large} faults per burst"
    );
}
