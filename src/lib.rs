//! tether: a connection-pooling sidecar proxy.
//!
//! A legacy app opens a connection per request to a local port; tether carries
//! those requests over a few persistent upstream connections, keeps TIME_WAIT
//! off the backend, and aborts idle or misbehaving peers with RST. See
//! `ARCHITECTURE.md` for how the pieces fit.
//!
//! # Layout
//!
//! Layers, top to bottom; a module imports only from layers below it:
//! [`tools`] (demo, doctor, load, health) → [`app`] (run, start, workers,
//! signals, listeners, admin) → [`downstream`] (one client connection) →
//! [`http`] (the proxy service) → [`pool`] (upstream pools) → leaves:
//! [`config`], [`accesslog`], [`connection_header`], [`drain`], [`h1`], [`sock`], [`metrics`], [`census`], [`telemetry`],
//! [`notify`], [`rlimit`], [`memory`], which import nothing of tether but `config`.
//! `http` asks the client connection through a trait of its own
//! ([`http::ClientConnection`]) that `downstream` implements, and the pool's
//! metrics are a collector `app` registers. `tests/source_tree.rs` checks every
//! arrow.

#![deny(unsafe_code)]

pub mod accesslog;
pub mod app;
pub mod census;
pub mod config;
pub mod connection_header;
pub mod downstream;
pub mod drain;
pub mod h1;
pub mod http;
pub mod memory;
pub mod metrics;
pub mod notify;
pub mod pool;
pub mod rlimit;
pub mod sock;
pub mod telemetry;
pub mod tools;

pub use app::{start, Running};
pub use config::Config;
