//! The subcommands that are not the proxy: `demo` (what tether is for, with
//! the kernel's figures), `doctor` (this host's TIME_WAIT and advice),
//! `doctor_tls` (`doctor --tls`: a backend's TLS as `[upstream.tls]` would
//! meet it), `load` (the benchmark client) and `health` (the probe). They use the proxy's
//! layers from above; nothing in the proxy imports them.

pub mod demo;
pub mod doctor;
pub mod doctor_tls;
pub mod health;
pub mod load;
