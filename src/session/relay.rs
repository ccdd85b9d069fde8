//! The relay: after start-up, bytes flow both ways untouched.
//!
//! Each direction reads into one fixed buffer, lets a [`Framer`] skim the
//! 5-byte message headers (to know where messages end; payloads are never
//! parsed), and writes the same buffer to the other side. The buffers are
//! allocated once per session and reused: nothing on the per-message path
//! allocates, locks, or touches memory another shard reads.

use std::cell::Cell;

use bytes::BytesMut;
use monoio::io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt, Split, Splitable};

use crate::protocol::backend::TAG_READY_FOR_QUERY;
use crate::protocol::Framer;

/// How a relayed session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndedBy {
    ClientClosed,
    ServerClosed,
    ClientIo,
    ServerIo,
    ClientProtocol,
    ServerProtocol,
}

impl EndedBy {
    pub fn as_str(self) -> &'static str {
        match self {
            EndedBy::ClientClosed => "client_closed",
            EndedBy::ServerClosed => "server_closed",
            EndedBy::ClientIo => "client_io_error",
            EndedBy::ServerIo => "server_io_error",
            EndedBy::ClientProtocol => "client_protocol_error",
            EndedBy::ServerProtocol => "server_protocol_error",
        }
    }
}

/// Counters for the session-end log line.
#[derive(Debug)]
pub struct RelayStats {
    pub bytes_from_client: u64,
    pub bytes_from_server: u64,
    /// ReadyForQuery messages relayed: one per completed query cycle.
    pub ready_for_query: u64,
    pub ended_by: EndedBy,
}

/// Which side a pump reads from, for naming how it ended.
#[derive(Clone, Copy)]
enum Side {
    Client,
    Server,
}

struct Counters {
    bytes: Cell<u64>,
    tagged: Cell<u64>,
}

/// Hands the login messages to the client, forwards any bytes the client
/// sent early, then relays until either side closes.
///
/// `for_client` holds the server's login messages (AuthenticationOk through
/// ReadyForQuery), `leftover` anything the server sent after them, and
/// `client_pending` anything the client sent after its password.
pub async fn run<C, S>(
    mut client: C,
    mut server: S,
    mut for_client: BytesMut,
    leftover: BytesMut,
    client_pending: BytesMut,
    buffer_size: usize,
) -> RelayStats
where
    C: Split + AsyncReadRent + AsyncWriteRent,
    S: Split + AsyncReadRent + AsyncWriteRent,
{
    let c2s = Counters {
        bytes: Cell::new(client_pending.len() as u64),
        tagged: Cell::new(0),
    };
    let s2c = Counters {
        bytes: Cell::new(leftover.len() as u64),
        tagged: Cell::new(0),
    };
    let stats = |ended_by| RelayStats {
        bytes_from_client: c2s.bytes.get(),
        bytes_from_server: s2c.bytes.get(),
        ready_for_query: s2c.tagged.get(),
        ended_by,
    };

    // Both sides' framers must start with what was already sent, so the
    // early bytes go through them too.
    let mut client_framer = Framer::new();
    let mut server_framer = Framer::counting(TAG_READY_FOR_QUERY);
    if client_framer.scan(&client_pending).is_err() {
        return stats(EndedBy::ClientProtocol);
    }
    match server_framer.scan(&leftover) {
        Ok(scan) => s2c.tagged.set(scan.tagged as u64),
        Err(_) => return stats(EndedBy::ServerProtocol),
    }
    for_client.extend_from_slice(&leftover);
    let (res, _) = client.write_all(for_client).await;
    if res.is_err() {
        return stats(EndedBy::ClientIo);
    }
    if !client_pending.is_empty() {
        let (res, _) = server.write_all(client_pending).await;
        if res.is_err() {
            return stats(EndedBy::ServerIo);
        }
    }

    let (client_r, client_w) = client.into_split();
    let (server_r, server_w) = server.into_split();
    let up = pump(
        client_r,
        server_w,
        Vec::with_capacity(buffer_size),
        client_framer,
        &c2s,
        Side::Client,
    );
    let down = pump(
        server_r,
        client_w,
        Vec::with_capacity(buffer_size),
        server_framer,
        &s2c,
        Side::Server,
    );
    // Whichever side ends first ends the session; dropping the other pump
    // cancels its pending read and closes both sockets.
    let ended_by = monoio::select! {
        e = up => e,
        e = down => e,
    };
    stats(ended_by)
}

/// Copies `from` to `to` until one fails or `from` closes.
async fn pump<R: AsyncReadRent, W: AsyncWriteRent>(
    mut from: R,
    mut to: W,
    mut buf: Vec<u8>,
    mut framer: Framer,
    counters: &Counters,
    side: Side,
) -> EndedBy {
    let (closed, io_err, proto_err, write_err) = match side {
        Side::Client => (
            EndedBy::ClientClosed,
            EndedBy::ClientIo,
            EndedBy::ClientProtocol,
            EndedBy::ServerIo,
        ),
        Side::Server => (
            EndedBy::ServerClosed,
            EndedBy::ServerIo,
            EndedBy::ServerProtocol,
            EndedBy::ClientIo,
        ),
    };
    loop {
        // monoio reads into the buffer's whole capacity from the start and
        // sets its length to what was read.
        let (res, b) = from.read(buf).await;
        buf = b;
        let n = match res {
            Ok(0) => return closed,
            Ok(n) => n,
            Err(_) => return io_err,
        };
        match framer.scan(&buf[..n]) {
            Ok(scan) => {
                if scan.tagged > 0 {
                    counters
                        .tagged
                        .set(counters.tagged.get() + scan.tagged as u64);
                }
            }
            Err(_) => return proto_err,
        }
        counters.bytes.set(counters.bytes.get() + n as u64);
        let (res, b) = to.write_all(buf).await;
        buf = b;
        if res.is_err() {
            return write_err;
        }
    }
}
