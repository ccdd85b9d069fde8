//! tollgate's integration tests: one test binary, a module per area, so
//! the crate is linked once rather than once per file.
//!
//! Every area runs the real `tollgate` binary (or the library's shards in
//! this process) against a real throwaway PostgreSQL started by
//! [`harness`]. Pick an area with its module path:
//! `cargo test --release -- passthrough::`.

mod harness;

mod clients;
mod drivers;
mod fleet;
mod floods;
mod fuzz_replay;
mod hostile_clients;
mod hostile_servers;
mod hot_path_alloc;
mod idle_memory;
mod jwt;
mod lifecycle;
mod no_secrets;
mod observability;
mod passthrough;
mod pg18;
mod pgjdbc;
mod pooling;
mod props;
mod protocol;
mod reload;
mod resources;
mod shutdown;
mod timing;
mod tls;
mod txpool;
mod txpool_driver;
mod unix_sockets;
mod upgrade;
