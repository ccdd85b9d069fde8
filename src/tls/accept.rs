//! The server side of a client's TLS handshake: rustls's unbuffered
//! server, driven by [`super::handshake`] over the plain socket, then the
//! connection handed to [`TlsStream`] with tollgate's own record layer.
//!
//! The bytes already read before the handshake (a direct-TLS
//! ClientHello) go straight to rustls, and records that arrive behind the
//! client's Finished (its start-up packet, often) are kept for the stream.

use std::io;
use std::rc::Rc;
use std::sync::Arc;

use monoio::net::TcpStream;
use rustls::server::UnbufferedServerConnection;
use rustls::ServerConfig;

use super::drive::{drive, invalid};
use super::handshake::Handshake;
use super::stream::TlsStream;
use super::ALPN_POSTGRESQL;
use crate::net::{BufferPool, Stream};

/// What the handshake settled, besides the stream.
pub struct Accepted {
    /// The TLS version's name (`TLSv1_3`, `TLSv1_2`).
    pub version: Option<&'static str>,
    /// The client named ALPN protocol "postgresql".
    pub alpn_postgresql: bool,
}

/// Runs the handshake on `io`, first feeding `prefix` (already read from
/// the socket).
pub async fn accept(
    config: Arc<ServerConfig>,
    mut io: TcpStream,
    prefix: Vec<u8>,
    pool: Rc<BufferPool>,
) -> io::Result<(TlsStream, Accepted)> {
    let conn = UnbufferedServerConnection::new(config).map_err(invalid)?;
    let mut hs = Handshake::new(conn, prefix);
    drive(&mut hs, &mut io, "client").await?;
    let accepted = Accepted {
        version: hs.connection().protocol_version().and_then(|v| v.as_str()),
        alpn_postgresql: hs.connection().alpn_protocol() == Some(ALPN_POSTGRESQL),
    };
    let (records, leftover) = hs.finish().map_err(io::Error::from)?;
    let stream = TlsStream::new(Stream::Tcp(io), records, leftover, pool);
    Ok((stream, accepted))
}
