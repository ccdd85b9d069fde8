//! Runs a [`Handshake`] over a plain TCP socket, either side: sends what
//! rustls wrote, reads when it waits for the peer, and on failure sends
//! the peer rustls's alert before giving up.

use std::io;

use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
use monoio::net::TcpStream;

use super::handshake::{Failed, Handshake, Side, Want};

/// Bytes read from the socket per call during the handshake.
const READ_SIZE: usize = 16 * 1024;

/// Drives `hs` until it is done; `peer` names the other side in errors.
pub(super) async fn drive<C: Side>(
    hs: &mut Handshake<C>,
    io: &mut TcpStream,
    peer: &str,
) -> io::Result<()> {
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
                        format!("{peer} closed the connection during the TLS handshake"),
                    ));
                }
                hs.incoming.extend_from_slice(&buf);
            }
            Ok(Want::Done) => return Ok(()),
            Err(Failed { error, alert }) => {
                // Tell the peer why before giving up.
                if !alert.is_empty() {
                    let _ = io.write_all(alert).await;
                }
                return Err(invalid(error));
            }
        }
    }
}

/// A rustls error as an I/O error that keeps it (see
/// [`describe_error`](super::describe_error)).
pub(super) fn invalid(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}
