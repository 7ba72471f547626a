//! How long one TIME_WAIT census takes with 100,000 sockets in the kernel's
//! table. Run with `cargo bench --bench census` (it fills the table itself, on
//! loopback, by opening and closing connections; the entries expire on their
//! own a minute later).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};

const TARGET: usize = 110_000;
const LISTENERS: usize = 10;

fn main() {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let mut addrs: Vec<SocketAddr> = Vec::new();
        for _ in 0..LISTENERS {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            addrs.push(listener.local_addr().expect("addr"));
            tokio::spawn(async move {
                loop {
                    let Ok((mut s, _)) = listener.accept().await else {
                        continue;
                    };
                    tokio::spawn(async move {
                        let mut buf = [0u8; 16];
                        let _ = s.read(&mut buf).await;
                    });
                }
            });
        }
        let started = Instant::now();
        let before = tether::census::time_wait().expect("census").len();
        let mut tasks = Vec::new();
        for worker in 0..16 {
            let addrs = addrs.clone();
            tasks.push(tokio::spawn(async move {
                let per_worker = TARGET / 16 + 1;
                for i in 0..per_worker {
                    let addr = addrs[(worker + i) % addrs.len()];
                    // The client closes first, so each connection leaves one TIME_WAIT.
                    if let Ok(s) = TcpStream::connect(addr).await {
                        drop(s);
                    }
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let all = tether::census::sockets().expect("census").len();
        let tw = tether::census::time_wait().expect("census").len();
        println!(
            "table: {all} TCP sockets, {tw} in TIME_WAIT ({} were there before), filled in {:.1}s",
            before,
            started.elapsed().as_secs_f64()
        );
        let mut runs = Vec::new();
        for _ in 0..15 {
            let t = Instant::now();
            let found = tether::census::time_wait().expect("census");
            runs.push(t.elapsed());
            assert!(found.len() >= tw / 2);
        }
        runs.sort();
        let mut proc_runs = Vec::new();
        for _ in 0..5 {
            let t = Instant::now();
            let _ =
                tether::census::sockets_from_proc(std::path::Path::new("/proc/net")).expect("proc");
            proc_runs.push(t.elapsed());
        }
        proc_runs.sort();
        println!(
            "for comparison, parsing /proc/net/tcp and tcp6: median {:.1} ms",
            proc_runs[proc_runs.len() / 2].as_secs_f64() * 1000.0
        );
        println!(
            "census::time_wait(): median {:.1} ms, min {:.1} ms, max {:.1} ms over {} runs",
            runs[runs.len() / 2].as_secs_f64() * 1000.0,
            runs[0].as_secs_f64() * 1000.0,
            runs[runs.len() - 1].as_secs_f64() * 1000.0,
            runs.len()
        );
    });
}
