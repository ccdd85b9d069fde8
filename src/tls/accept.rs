//! The server side of a client's TLS handshake, driven here rather than by
//! monoio-rustls's acceptor, for two reasons: the bytes already read before
//! the handshake (a direct-TLS ClientHello) go straight to rustls, and the
//! negotiated protocol version can be read before the connection is
//! wrapped into a stream that no longer exposes it.
//!
//! Every byte read from the socket is handed to rustls before the
//! handshake is declared done, so application data that arrives with the
//! client's Finished is kept (decrypted inside the connection) and read
//! first by the stream.

use std::io;
use std::sync::Arc;

use monoio::io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt};
use rustls::{ServerConfig, ServerConnection};

/// A client TLS stream once the handshake is done.
pub type ServerTlsStream<IO> = monoio_rustls::ServerTlsStream<IO>;

/// Bytes read from the socket per call during the handshake.
const READ_SIZE: usize = 16 * 1024;

/// Runs the handshake on `io`, first feeding `prefix` (already read from
/// the socket). Returns the stream and the TLS version's name
/// (`TLSv1_3`, `TLSv1_2`).
pub async fn accept<IO: AsyncReadRent + AsyncWriteRent>(
    config: Arc<ServerConfig>,
    mut io: IO,
    prefix: Vec<u8>,
) -> io::Result<(ServerTlsStream<IO>, Option<&'static str>)> {
    let mut conn = ServerConnection::new(config).map_err(invalid)?;
    let mut out = Vec::new();
    // First the bytes already read, then each read from the socket.
    let mut buf = prefix;
    loop {
        if let Err(e) = feed(&mut conn, &buf) {
            // Tell the client why (an alert) before giving up.
            let _ = flush(&mut conn, &mut io, &mut out).await;
            return Err(e);
        }
        flush(&mut conn, &mut io, &mut out).await?;
        if !conn.is_handshaking() {
            break;
        }
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
    }
    let version = conn.protocol_version().and_then(|v| v.as_str());
    Ok((ServerTlsStream::new(io, conn), version))
}

/// Hands all of `bytes` to rustls, processing records as they complete.
fn feed(conn: &mut ServerConnection, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        // `read_tls` takes what fits in its buffer; processing frees room.
        let taken = conn.read_tls(&mut bytes)?;
        conn.process_new_packets().map_err(invalid)?;
        if taken == 0 {
            // rustls takes nothing more once an authenticated close_notify
            // arrived (possible right after the client's Finished): bytes
            // after it must end the handshake, not spin here forever.
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "client closed TLS during the handshake",
            ));
        }
    }
    Ok(())
}

/// Writes whatever rustls wants to send.
async fn flush<IO: AsyncWriteRent>(
    conn: &mut ServerConnection,
    io: &mut IO,
    out: &mut Vec<u8>,
) -> io::Result<()> {
    while conn.wants_write() {
        out.clear();
        conn.write_tls(out)?;
        let (res, b) = io.write_all(std::mem::take(out)).await;
        *out = b;
        res?;
    }
    Ok(())
}

fn invalid(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Arc<ServerConfig> {
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let key = rustls_pki_types::PrivateKeyDer::Pkcs8(cert.signing_key.serialize_der().into());
        let config =
            ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(vec![cert.cert.der().clone()], key)
                .unwrap();
        Arc::new(config)
    }

    #[test]
    fn garbage_is_an_error_not_a_hang() {
        let mut conn = ServerConnection::new(config()).unwrap();
        assert!(feed(&mut conn, &[0xff; 300]).is_err());
        // A record header announcing a 16 KiB record, then nothing: rustls
        // waits for the rest, and so does the handshake (bounded by the
        // start-up deadline), without error or spin.
        let mut conn = ServerConnection::new(config()).unwrap();
        assert!(feed(&mut conn, &[0x16, 0x03, 0x01, 0x40, 0x00]).is_ok());
        assert!(conn.is_handshaking());
    }
}
