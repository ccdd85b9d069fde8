//! The server side of sessions: logged-in PostgreSQL connections, which
//! in session pooling outlive the clients they serve.
//!
//! A session (see [`crate::session`]) drives its client and borrows a
//! server connection: from its shard's [`Pools`] when an idle one has the
//! client's [`PoolKey`], else from a fresh login. On checkout the
//! connection is readied for the client ([`checkout::prepare`]); when the
//! client leaves it is made fresh ([`reset`]) and pooled, or closed.
//!
//! Nothing here is shared between shards: each shard has its own pools
//! and its own share of each upstream's connection limit.

pub mod checkout;
mod conn;
mod key;
mod pool;
pub mod reset;
mod route;
pub mod statements;
pub mod wire;

pub use conn::{ConnState, NotPoolable, ServerConn};
pub use key::{is_reported, split_params, PoolKey, REPORTED};
pub use pool::{Claim, PoolCounters, PoolFull, Pools, RoutePool, Seat};
pub use route::Route;

/// Parameters a client sets on each connection it is given (the reported
/// ones under transaction pooling), by the server's names: shared, and
/// never changed in place while shared.
pub type Settable = std::rc::Rc<Vec<(String, String)>>;
