//! The allocator keeps freed heap between bursts (`runtime.heap_retain`):
//! counted in the page faults a burst of exchange-sized buffers costs the
//! thread that makes it, before and after tether raises the threshold.

#![cfg(all(target_os = "linux", target_env = "gnu"))]

/// Buffers in flight at once in one burst: 64 exchanges' 16 KiB each.
const IN_FLIGHT: usize = 64;
const BUFFER: usize = 16 * 1024;
const BURSTS: usize = 20;

/// Page faults this thread has taken.
fn faults() -> i64 {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes the struct it is given, and nothing else.
    let got = unsafe { libc::getrusage(libc::RUSAGE_THREAD, usage.as_mut_ptr()) };
    assert_eq!(got, 0, "getrusage: {}", std::io::Error::last_os_error());
    // SAFETY: filled in by the successful call above.
    unsafe { usage.assume_init() }.ru_minflt
}

/// Faults per burst after a first one: each burst takes the buffers,
/// touches every page of them, and gives them all back.
fn faults_per_burst() -> i64 {
    std::thread::spawn(|| {
        let burst = || {
            let buffers: Vec<Vec<u8>> = (0..IN_FLIGHT).map(|_| vec![1u8; BUFFER]).collect();
            std::hint::black_box(&buffers);
        };
        burst();
        let before = faults();
        for _ in 0..BURSTS {
            burst();
        }
        (faults() - before) / BURSTS as i64
    })
    .join()
    .expect("the burst thread ran")
}

#[test]
fn freed_buffers_stay_with_the_process_for_the_next_burst() {
    let pages = (IN_FLIGHT * BUFFER / 4096) as i64;
    let by_default = faults_per_burst();
    assert!(
        by_default >= pages / 2,
        "glibc's default threshold returns the burst's {pages} pages to the kernel: {by_default} faults per burst"
    );
    tether::memory::retain(tether::config::RuntimeConfig::default().heap_retain.as_u64());
    let retained = faults_per_burst();
    eprintln!("page faults per burst of {pages} pages: {by_default} by default, {retained} retained");
    assert!(
        retained <= 2,
        "with heap_retain's default the next burst reuses the pages: {retained} faults per burst (by default {by_default})"
    );
}
