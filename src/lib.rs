//! tether: a connection-pooling sidecar proxy.
//!
//! A legacy app opens a connection per request to a local port; tether carries
//! those requests over a few persistent upstream connections, keeps TIME_WAIT
//! off the backend, and aborts idle or misbehaving peers with RST. See
//! `ARCHITECTURE.md` for how the pieces fit.

#![deny(unsafe_code)]

pub mod app;
pub mod census;
pub mod config;
pub mod downstream;
pub mod drain;
pub mod http;
pub mod metrics;
pub mod notify;
pub mod pool;
pub mod rlimit;
pub mod sock;
pub mod telemetry;
pub mod tools;

pub use app::{start, Running};
pub use config::Config;
