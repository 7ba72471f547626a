//! tether: a connection-pooling sidecar proxy.
//!
//! A legacy app opens a connection per request to a local port; tether carries
//! those requests over a few persistent upstream connections, keeps TIME_WAIT
//! off the backend, and aborts idle or misbehaving peers with RST. See
//! `ARCHITECTURE.md` for how the pieces fit.

#![deny(unsafe_code)]

pub mod admin;
pub mod census;
pub mod config;
pub mod demo;
pub mod doctor;
pub mod downstream;
pub mod health;
pub mod http;
pub mod listener;
pub mod load;
pub mod metrics;
pub mod notify;
pub mod pool;
pub mod rlimit;
pub mod server;
pub mod sock;
pub mod telemetry;

pub use config::Config;
pub use server::{start, Running};
