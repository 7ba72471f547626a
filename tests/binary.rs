//! The `tether` binary as an operator runs it: SIGTERM drains and exits 0, and
//! gigabyte bodies stream through in bounded memory.

mod common;

use std::net::SocketAddr;
use std::process::{Child, Command};
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

struct Proxy {
    child: Child,
    addr: SocketAddr,
}

impl Proxy {
    /// Starts the binary on an ephemeral port and reads the bound address from
    /// its log.
    fn start(backend: SocketAddr, extra: &str) -> Self {
        Self::start_limited(backend, extra, None)
    }

    /// As `start`, with the process's open-file limit set to `nofile`.
    fn start_limited(backend: SocketAddr, extra: &str, nofile: Option<u32>) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "tether-bin-{}-{}",
            std::process::id(),
            backend.port()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("tether.toml");
        std::fs::write(
            &file,
            format!(
                r#"
                [log]
                level = "info"
                [[listener]]
                name = "app"
                listen = "127.0.0.1:0"
                upstream = "backend"
                {extra}
                [[upstream]]
                name = "backend"
                endpoints = ["{backend}"]
                [admin]
                listen = "127.0.0.1:0"
                [runtime]
                worker_threads = 2
                drain_timeout = "10s"
                "#
            ),
        )
        .unwrap();
        let command = match nofile {
            None => {
                let mut c = Command::new(env!("CARGO_BIN_EXE_tether"));
                c.args(["run", "--config"]).arg(&file);
                c
            }
            Some(limit) => {
                let mut c = Command::new("sh");
                c.arg("-c").arg(format!(
                    "ulimit -n {limit} && exec \"{}\" run --config \"{}\"",
                    env!("CARGO_BIN_EXE_tether"),
                    file.display()
                ));
                c
            }
        };
        let (child, addr) = spawn_tether(command);
        Self { child, addr }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn version_and_help_explain_the_commands() {
    let out = Command::new(env!("CARGO_BIN_EXE_tether"))
        .arg("--version")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains(env!("CARGO_PKG_VERSION")));
    let out = Command::new(env!("CARGO_BIN_EXE_tether"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("run") && help.contains("check"), "{help}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_the_request_in_flight_finish_and_exits_zero() {
    let backend = Backend::start().await;
    let mut proxy = Proxy::start(backend.addr, "");
    let addr = proxy.addr;

    let stream = TcpStream::connect(addr).await.unwrap();
    let mut reader = BufReader::new(stream);
    reader
        .get_mut()
        .write_all(b"GET /slow?1000 HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    wait_until(Duration::from_secs(5), || {
        backend.stats.in_flight.load(Ordering::SeqCst) == 1
    })
    .await;
    proxy.signal("TERM");
    let resp = read_response(&mut reader, false).await.unwrap();
    assert_eq!(resp.status, 200);
    assert_eq!(resp.body, b"slow");
    assert_eq!(
        resp.header("connection"),
        Some("close"),
        "keep-alive client told to go"
    );

    let status = tokio::task::spawn_blocking(move || proxy.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0));
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "no longer accepting"
    );
}

/// Samples the process's RSS every 50ms while `work` runs; returns the peak.
async fn peak_rss_during<F: std::future::Future<Output = ()>>(pid: u32, work: F) -> u64 {
    let stop = tokio_util::sync::CancellationToken::new();
    let sampler = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut peak = 0;
            while !stop.is_cancelled() {
                peak = peak.max(rss_kib(pid));
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            peak
        })
    };
    work.await;
    stop.cancel();
    sampler.await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gigabyte_upload_and_download_stream_in_bounded_memory() {
    const GIB: u64 = 1 << 30;
    let backend = Backend::start().await;
    let proxy = Proxy::start(backend.addr, "");
    let addr = proxy.addr;
    for _ in 0..20 {
        assert_eq!(get_once(addr, "/").await.status, 200);
    }
    let idle = rss_kib(proxy.pid());

    let upload = peak_rss_during(proxy.pid(), async {
        let stream = TcpStream::connect(addr).await.unwrap();
        let mut reader = BufReader::new(stream);
        reader
            .get_mut()
            .write_all(
                format!("POST /count HTTP/1.1\r\nHost: t\r\nContent-Length: {GIB}\r\n\r\n")
                    .as_bytes(),
            )
            .await
            .unwrap();
        let chunk = vec![b'u'; 256 * 1024];
        let mut sent = 0;
        while sent < GIB {
            reader.get_mut().write_all(&chunk).await.unwrap();
            sent += chunk.len() as u64;
        }
        let resp = read_response(&mut reader, false).await.unwrap();
        assert_eq!(resp.text(), GIB.to_string());
    })
    .await;

    let download = peak_rss_during(proxy.pid(), async {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(
                format!("GET /big?{GIB} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await
            .unwrap();
        let mut buf = vec![0u8; 256 * 1024];
        let mut total = 0u64;
        loop {
            let n = stream.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            total += n as u64;
        }
        // Head and chunk framing come on top of the body.
        assert!(total > GIB, "received {total}");
    })
    .await;

    let allowance = 8 * 1024;
    assert!(
        upload <= idle + allowance,
        "upload: idle {idle} KiB, peak {upload} KiB"
    );
    assert!(
        download <= idle + allowance,
        "download: idle {idle} KiB, peak {download} KiB"
    );
    eprintln!("RSS idle {idle} KiB, upload peak {upload} KiB, download peak {download} KiB");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_out_of_file_descriptors_pauses_accepting_and_never_kills_the_process() {
    let backend = Backend::start().await;
    let mut proxy = Proxy::start_limited(backend.addr, "header_timeout = \"1s\"", Some(40));
    let addr = proxy.addr;
    assert_eq!(get_once(addr, "/").await.status, 200);

    // Far more connections than descriptors: accept fails with EMFILE.
    let mut hogs = Vec::new();
    for _ in 0..80 {
        hogs.push(TcpStream::connect(addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        proxy.child.try_wait().unwrap().is_none(),
        "tether exited under EMFILE"
    );
    drop(hogs);

    // Once descriptors free up, it serves again.
    let mut served = false;
    for _ in 0..50 {
        if let Ok(Ok(resp)) = tokio::time::timeout(Duration::from_secs(2), async {
            let stream = TcpStream::connect(addr).await?;
            let mut reader = BufReader::new(stream);
            reader
                .get_mut()
                .write_all(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
                .await?;
            read_response(&mut reader, false).await
        })
        .await
        {
            if resp.status == 200 {
                served = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(served, "tether did not recover after EMFILE");
    assert!(proxy.child.try_wait().unwrap().is_none());
}
