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

use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
use monoio::net::TcpStream;
use rustls::server::UnbufferedServerConnection;
use rustls::ServerConfig;

use super::handshake::{Failed, Handshake, Want};
use super::stream::TlsStream;
use super::ALPN_POSTGRESQL;
use crate::net::{BufferPool, Stream};

/// Bytes read from the socket per call during the handshake.
const READ_SIZE: usize = 16 * 1024;

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
    let mut buf = Vec::new();
    loop {
        match hs.advance() {
            Ok(Want::Send) => {
                let out = std::mem::take(&mut hs.outgoing);
                let (res, out) = io.write_all(out).await;
                hs.outgoing = out;
                res?;
                hs.sent();
            }
            Ok(Want::Receive) => {
                buf.clear();
                buf.reserve(READ_SIZE);
                // monoio reads into the whole capacity and sets the length.
                let (res, b) = io.read(buf).await;
                buf = b;
                if res? == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "client closed the connection during the TLS handshake",
                    ));
                }
                hs.incoming.extend_from_slice(&buf);
            }
            Ok(Want::Done) => break,
            Err(Failed { error, alert }) => {
                // Tell the client why before giving up.
                if !alert.is_empty() {
                    let _ = io.write_all(alert).await;
                }
                return Err(invalid(error));
            }
        }
    }
    let accepted = Accepted {
        version: hs.connection().protocol_version().and_then(|v| v.as_str()),
        alpn_postgresql: hs.connection().alpn_protocol() == Some(ALPN_POSTGRESQL),
    };
    let (records, leftover) = hs.finish().map_err(io::Error::from)?;
    let stream = TlsStream::new(Stream::Tcp(io), records, leftover, pool);
    Ok((stream, accepted))
}

fn invalid(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}
