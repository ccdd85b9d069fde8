//! tollgate: a PostgreSQL wire-protocol proxy that authenticates clients with
//! API tokens, logs in to the real server with credentials only it knows, and
//! then relays the protocol untouched.
//!
//! See DESIGN.md in the shared folder for the data flow; each module's own
//! documentation says what it owns.

pub mod admin;
pub mod audit;
pub mod auth;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod control;
pub mod controldb;
pub mod error;
pub mod handshake;
mod io_util;
pub mod logging;
pub mod metrics;
pub mod net;
pub mod protocol;
pub mod secret;
pub mod server;
pub mod session;
pub mod shard;
pub mod snapshot;
pub mod tls;
pub mod toml_error;
pub mod upstream;
