//! A plain Pingora reverse proxy for the benchmarks: every request goes to one
//! backend over Pingora's keep-alive upstream pool, nothing else is done to it.
//!
//! Usage: pingora-bench-proxy LISTEN BACKEND THREADS POOL

use async_trait::async_trait;
use pingora::prelude::*;
use pingora::server::configuration::ServerConf;

struct Forward {
    backend: String,
}

#[async_trait]
impl ProxyHttp for Forward {
    type CTX = ();

    fn new_ctx(&self) -> Self::CTX {}

    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut ()) -> Result<Box<HttpPeer>> {
        Ok(Box::new(HttpPeer::new(
            self.backend.as_str(),
            false,
            String::new(),
        )))
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, listen, backend, threads, pool] = args.as_slice() else {
        eprintln!("usage: pingora-bench-proxy LISTEN BACKEND THREADS POOL");
        std::process::exit(2);
    };
    let conf = ServerConf {
        threads: threads.parse().unwrap_or(1),
        upstream_keepalive_pool_size: pool.parse().unwrap_or(64),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let mut proxy = http_proxy_service(
        &server.configuration,
        Forward {
            backend: backend.clone(),
        },
    );
    proxy.add_tcp(listen);
    server.add_service(proxy);
    server.run_forever();
}
