//! Sans-IO codec for the PostgreSQL frontend/backend protocol, version 3.
//!
//! Nothing here touches a socket or a clock: parsers take byte slices and
//! return `Ok(None)` when more bytes are needed; encoders append to a caller's
//! `BytesMut`. The session driver owns the I/O.
//!
//! Reference: <https://www.postgresql.org/docs/current/protocol-message-formats.html>
#![forbid(unsafe_code)]

pub mod backend;
pub mod frame;
pub mod frontend;
pub mod proxy_header;
pub mod sqlstate;
pub mod startup;

pub use frame::{FrameError, FrameVisitor, Framer};
