//! The `tether` command line: parse arguments, load the config, run.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use tether::config::{Config, ConfigError};

/// EX_USAGE from sysexits.h: the configuration is wrong.
const EXIT_BAD_CONFIG: u8 = 64;

/// Connection-pooling sidecar proxy: takes an app's short-lived connections on a
/// local port and carries their requests over a few persistent upstream
/// connections, so no TIME_WAIT piles up toward the backend.
#[derive(Parser)]
#[command(name = "tether", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy with the given configuration until SIGTERM or SIGINT,
    /// then drain: stop accepting, finish in-flight requests, exit 0. SIGHUP,
    /// `POST /reload` on the admin server, and (with `runtime.watch_config`)
    /// a change to the file reload it without dropping a connection.
    Run {
        /// TOML configuration file; `TETHER__SECTION__KEY` variables override it.
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Validate a configuration: print the effective config as TOML and exit 0,
    /// or print every problem with its key path and exit 64.
    Check {
        /// TOML configuration file; `TETHER__SECTION__KEY` variables override it.
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Ask a running tether's admin server whether it is alive (`/healthz`)
    /// or, with --ready, ready (`/readyz`: pools warm, not draining). Exits 0
    /// on 200, otherwise 1 with the reason on stderr. For HEALTHCHECKs and
    /// exec probes in images without curl.
    Health {
        /// The admin server's address (an unspecified address such as
        /// 0.0.0.0 means this host's loopback). Default: the config's
        /// `admin.listen` with --config, else 127.0.0.1:9901.
        #[arg(long, value_name = "HOST:PORT", conflicts_with = "config")]
        admin: Option<String>,
        /// Take the admin address from this configuration file.
        #[arg(short, long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Ask /readyz instead of /healthz.
        #[arg(long)]
        ready: bool,
        /// Deadline for the whole check, connect included.
        #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
    },
    /// Report TIME_WAIT on this host from the kernel's socket table: per remote
    /// endpoint and per local port, the worst offenders, ephemeral-port
    /// headroom, the relevant sysctls, and what to do about it. With --tls,
    /// check a backend's TLS instead, as an `[upstream.tls]` would meet it:
    /// the chain it sends, its names, verification, the session agreed and
    /// whether a second connection resumes; exits 1 when the handshake or
    /// verification fails.
    Doctor {
        /// Only sockets toward this remote endpoint ("10.0.0.5:80").
        #[arg(long, value_name = "HOST:PORT")]
        to: Option<String>,
        /// Only sockets on this local port.
        #[arg(long, value_name = "PORT")]
        port: Option<u16>,
        #[command(flatten)]
        tls: TlsCheckArgs,
        /// Print one JSON object instead of the report.
        #[arg(long)]
        json: bool,
    },
    /// Benchmark client: drives a target with a new connection per request
    /// (client closes first, or HTTP/1.0 waiting for the server to close) or
    /// with keep-alive clients, and prints throughput, latency percentiles,
    /// errors by cause and the kernel's count of connections opened.
    Load {
        #[command(flatten)]
        run: LoadArgs,
        /// Print one JSON object instead of a summary.
        #[arg(long)]
        json: bool,
    },
    /// Show what tether does, in about 20 seconds: the same
    /// connection-per-request load straight at a backend and then through
    /// tether, with errors and the kernel's TIME_WAIT counts side by side. As
    /// root on Linux the backend gets a host of its own (a network namespace
    /// behind a veth pair, removed when the demo ends), so going direct runs
    /// out of ephemeral ports as it does toward a real remote backend;
    /// otherwise it runs on loopback and says what that cannot show.
    Demo {
        /// Length of each of the two phases ("8s", "1m").
        #[arg(long, default_value = "8s", value_parser = humantime::parse_duration)]
        duration: std::time::Duration,
        /// Concurrent clients (also tether's pool size toward the backend).
        #[arg(long, default_value_t = 8)]
        concurrency: usize,
        /// Ephemeral ports of the app's host in remote-backend mode, so that
        /// going direct runs out in seconds rather than in a minute (a Linux
        /// host has 28,232); 0 keeps the kernel's range.
        #[arg(long, value_name = "N", default_value_t = 4096,
              value_parser = clap::value_parser!(u16).range(0..=45536))]
        ports: u16,
        /// Keep the backend on loopback even where it could have a host of
        /// its own.
        #[arg(long)]
        loopback: bool,
        /// Print one JSON object instead of the table.
        #[arg(long)]
        json: bool,
    },
}

// `tether doctor --tls` and its options.
#[derive(Args)]
struct TlsCheckArgs {
    /// Check TLS toward this backend ("backend.example:443", "10.0.0.5:443").
    #[arg(long = "tls", value_name = "HOST:PORT", conflicts_with_all = ["to", "port"])]
    target: Option<String>,
    /// The name sent as SNI and verified in the certificate. Default: HOST
    /// when it is a DNS name; an IP address sends no SNI and is verified
    /// against the certificate's IP addresses.
    #[arg(long, value_name = "NAME", requires = "target")]
    server_name: Option<String>,
    /// A PEM file of trust anchors (repeatable; "system" is the platform's
    /// store, as in `tls.ca`). Default: the platform's store.
    #[arg(long, value_name = "FILE", requires = "target")]
    ca: Vec<String>,
    /// ALPN protocols to offer, comma-separated ("" offers none).
    #[arg(
        long,
        value_name = "LIST",
        value_delimiter = ',',
        requires = "target",
        default_value = "h2,http/1.1"
    )]
    alpn: Vec<String>,
    /// Limit of each step: resolving, each connect, each handshake.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration,
          requires = "target")]
    timeout: std::time::Duration,
}

impl TlsCheckArgs {
    fn options(self) -> Option<tether::tools::doctor_tls::TlsCheckOptions> {
        Some(tether::tools::doctor_tls::TlsCheckOptions {
            target: self.target?,
            server_name: self.server_name,
            ca: self.ca,
            alpn: self.alpn.into_iter().filter(|p| !p.is_empty()).collect(),
            timeout: self.timeout,
        })
    }
}

// The run `tether load` makes, as its options.
#[derive(Args)]
struct LoadArgs {
    /// Address to send requests to.
    #[arg(long, value_name = "IP:PORT")]
    target: std::net::SocketAddr,
    /// How clients connect.
    #[arg(long, value_enum, default_value_t = tether::tools::load::Mode::CloseFirst)]
    mode: tether::tools::load::Mode,
    /// Concurrent clients.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// How long to run ("10s").
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: std::time::Duration,
    /// Request target.
    #[arg(long, default_value = "/")]
    path: String,
}

impl LoadArgs {
    fn spec(self) -> tether::tools::load::LoadSpec {
        tether::tools::load::LoadSpec {
            target: self.target,
            mode: self.mode,
            concurrency: self.concurrency,
            duration: self.duration,
            path: self.path,
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => match load(&config) {
            Ok(config) => {
                print!("{}", config.to_toml());
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Command::Health {
            admin,
            config,
            ready,
            timeout,
        } => {
            let admin = match health_address(admin.as_deref(), config.as_deref()) {
                Ok(addr) => addr,
                Err(e) => {
                    eprintln!("tether health: {e:#}");
                    return ExitCode::FAILURE;
                }
            };
            let check = tether::tools::health::HealthCheck {
                admin,
                ready,
                timeout,
            };
            match check.run() {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("tether health: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Doctor {
            to,
            port,
            tls,
            json,
        } => exit_code(match tls.options() {
            Some(options) => doctor_tls(&options, json),
            None => doctor(to.as_deref(), port, json),
        }),
        Command::Load { run, json } => exit_code(run_load(&run.spec(), json)),
        Command::Demo {
            duration,
            concurrency,
            ports,
            loopback,
            json,
        } => exit_code(demo(
            tether::tools::demo::DemoOptions {
                duration,
                concurrency,
                ports: (ports > 0).then_some(ports),
                loopback,
            },
            json,
        )),
        Command::Run { config: path } => {
            tether::app::ignore_hangup();
            let config = match load(&path) {
                Ok(config) => config,
                Err(code) => return code,
            };
            exit_code(run(config, path))
        }
    }
}

/// 0, or 1 with the error and its causes on stderr.
fn exit_code(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tether: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn load(path: &std::path::Path) -> Result<Config, ExitCode> {
    Config::load(path, std::env::vars()).map_err(|e| {
        match &e {
            ConfigError::Invalid(problems) => {
                eprintln!(
                    "tether: {} has {} problem(s):",
                    path.display(),
                    problems.len()
                );
                for problem in problems {
                    eprintln!("  {problem}");
                }
            }
            ConfigError::Load { .. } => eprintln!("tether: {e}"),
        }
        ExitCode::from(EXIT_BAD_CONFIG)
    })
}

/// The admin addresses `tether health` asks, in turn.
fn health_address(
    admin: Option<&str>,
    config: Option<&std::path::Path>,
) -> anyhow::Result<Vec<std::net::SocketAddr>> {
    use std::net::ToSocketAddrs;
    let addrs: Vec<std::net::SocketAddr> = match (admin, config) {
        (Some(admin), _) => admin
            .to_socket_addrs()
            .with_context(|| format!("cannot resolve {admin}"))?
            .collect(),
        (None, Some(path)) => {
            let config = Config::load(path, std::env::vars()).with_context(|| {
                format!("cannot read the admin address from {}", path.display())
            })?;
            anyhow::ensure!(
                config.admin.enabled,
                "{} disables the admin server",
                path.display()
            );
            vec![config.admin.listen]
        }
        (None, None) => vec![tether::config::AdminConfig::default().listen],
    };
    anyhow::ensure!(!addrs.is_empty(), "the admin address resolves to nothing");
    // A server bound to every address is reached on loopback from beside it.
    Ok(addrs
        .into_iter()
        .map(|mut addr| {
            if addr.ip().is_unspecified() {
                addr.set_ip(match addr {
                    std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                    std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
                });
            }
            addr
        })
        .collect())
}

fn run(config: Config, path: PathBuf) -> anyhow::Result<()> {
    tether::telemetry::init(&config.log);
    tether::app::run(config, path)?;
    Ok(())
}

fn doctor(to: Option<&str>, port: Option<u16>, json: bool) -> anyhow::Result<()> {
    use std::net::ToSocketAddrs;
    let to = match to {
        None => None,
        Some(endpoint) => Some(
            endpoint
                .to_socket_addrs()
                .with_context(|| format!("cannot resolve {endpoint}"))?
                .next()
                .with_context(|| format!("{endpoint} resolves to no address"))?,
        ),
    };
    let diagnosis =
        tether::tools::doctor::diagnose(&tether::tools::doctor::DoctorOptions { to, port })?;
    if json {
        println!("{}", serde_json::to_string_pretty(&diagnosis)?);
    } else {
        print!("{}", diagnosis.text());
    }
    Ok(())
}

fn doctor_tls(
    options: &tether::tools::doctor_tls::TlsCheckOptions,
    json: bool,
) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let report = runtime.block_on(tether::tools::doctor_tls::check(options))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.text());
    }
    Ok(report.verdict()?)
}

fn run_load(spec: &tether::tools::load::LoadSpec, json: bool) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let opens_before = tether::tools::load::active_opens();
    let progress = std::sync::Arc::new(tether::tools::load::Progress::default());
    let report = runtime.block_on(tether::tools::load::run_spec(spec, progress));
    let opened = tether::tools::load::active_opens()
        .zip(opens_before)
        .map(|(after, before)| after - before);
    let attempts = report.requests + report.errors;
    let per_request = opened.map(|o| o as f64 / attempts.max(1) as f64);
    if json {
        let mut value = serde_json::to_value(&report)?;
        value["mode"] = serde_json::to_value(spec.mode)?;
        value["connections_opened"] = serde_json::to_value(opened)?;
        value["connections_per_request"] = serde_json::to_value(per_request)?;
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        println!(
            "{} requests, {} errors {:?}, {:.0} req/s, p50 {:.3} ms, p99 {:.3} ms, p99.9 {:.3} ms, {} connections opened ({:.2} per request)",
            report.requests,
            report.errors,
            report.errors_by_kind,
            report.rps,
            report.p50_ms,
            report.p99_ms,
            report.p999_ms,
            opened.map_or_else(|| "?".to_owned(), |o| o.to_string()),
            per_request.unwrap_or(f64::NAN),
        );
    }
    Ok(())
}

fn demo(options: tether::tools::demo::DemoOptions, json: bool) -> anyhow::Result<()> {
    let report = tether::tools::demo::run(&options)?;
    if json {
        println!("{}", report.json());
    } else {
        println!();
        print!("{}", report.table());
    }
    Ok(())
}
