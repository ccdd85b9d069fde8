//! The client side of a TLS handshake with an upstream server: rustls's
//! unbuffered client, driven by [`super::handshake`] over the plain socket,
//! then the connection handed to [`TlsStream`] with tollgate's own record
//! layer, as on the client-facing side (see [`super::accept`]).
//!
//! So a pooled server connection waits between clients, and between
//! transactions, holding its keys and no buffer; and the transaction
//! relay reads and writes it like a client's TLS stream.

use std::io;
use std::rc::Rc;
use std::sync::Arc;

use monoio::net::TcpStream;
use rustls::client::UnbufferedClientConnection;
use rustls::ClientConfig;
use rustls_pki_types::ServerName;

use super::drive::{drive, invalid};
use super::handshake::Handshake;
use super::stream::TlsStream;
use crate::net::{BufferPool, Stream};

/// Runs the handshake on `io` (after the server's 'S' to SSLRequest).
/// Returns the stream and the server's end-entity certificate, which
/// channel binding hashes. `config` must allow secret extraction.
pub async fn connect(
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
    mut io: TcpStream,
    pool: Rc<BufferPool>,
) -> io::Result<(TlsStream, Option<Vec<u8>>)> {
    let conn = UnbufferedClientConnection::new(config, name).map_err(invalid)?;
    let mut hs = Handshake::new(conn, Vec::new());
    drive(&mut hs, &mut io, "server").await?;
    let cert = hs
        .connection()
        .peer_certificates()
        .and_then(|chain| chain.first())
        .map(|c| c.to_vec());
    let (records, leftover) = hs.finish().map_err(io::Error::from)?;
    Ok((
        TlsStream::new(Stream::Tcp(io), records, leftover, pool),
        cert,
    ))
}
