//! Client and server sockets: TCP or Unix-domain, as one type for the
//! session and the pool, the client's address, and the Unix-domain socket
//! listener with its lock file; and the shard's relay ring.

mod buffers;
mod peer;
pub mod ready;
pub mod ring;
mod stream;
pub mod unix_socket;

pub use buffers::BufferPool;
pub use peer::Peer;
pub use ready::ReadyStream;
pub use stream::{Stream, StreamPoll};
