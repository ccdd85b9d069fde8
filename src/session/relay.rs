//! The relay: after start-up, bytes flow both ways untouched.
//!
//! Each direction reads into one fixed buffer, lets a [`Framer`] skim the
//! 5-byte message headers (to know where messages end; payloads are never
//! parsed), and writes the same buffer to the other side. The buffers are
//! allocated once per session and reused: nothing on the per-message path
//! allocates, locks, or touches memory another shard reads.
//!
//! A session can be ended from outside (token revoked, expired, rotated):
//! the server-to-client direction then stops at the next message boundary,
//! sends a FATAL ErrorResponse, and the server gets a Terminate, so neither
//! side ever sees half a message.
//!
//! When one side goes away the other is told as a direct connection would
//! tell it: a server that vanishes without an error of its own leaves the
//! client a FATAL 08006 (when the stream is at a message boundary), and a
//! client that vanishes while a query runs gets that query cancelled before
//! the server connection is closed, so the server stops the work.

use std::cell::Cell;

use bytes::BytesMut;
use monoio::io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt, Split, Splitable};

use super::kill::KillSwitch;
use crate::auth::Rejection;
use crate::error::ClientError;
use crate::protocol::backend::{TAG_ERROR_RESPONSE, TAG_READY_FOR_QUERY};
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
    /// Ended by tollgate because the token no longer allows it.
    Token(Rejection),
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
            EndedBy::Token(r) => r.as_str(),
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
    /// Query, Sync and FunctionCall messages relayed: each asks for one
    /// ReadyForQuery, so more of these than of those means work in flight.
    pub query_cycles_asked: u64,
    pub ended_by: EndedBy,
}

/// Client messages that each end in exactly one ReadyForQuery.
const CYCLE_TAGS: [u8; 3] = [b'Q', b'S', b'F'];
/// Terminate: the client closed the session itself.
const TAG_TERMINATE: u8 = b'X';

struct Counters {
    bytes: Cell<u64>,
    tagged: Cell<u64>,
}

/// Hands the login messages to the client, forwards any bytes the client
/// sent early, then relays until either side closes or `kill` fires.
///
/// `for_client` holds the server's login messages (AuthenticationOk through
/// ReadyForQuery), `leftover` anything the server sent after them, and
/// `client_pending` anything the client sent after its password.
/// `abandon` cancels the running query on the server; it is awaited only
/// when the client vanishes with a query in flight.
#[allow(clippy::too_many_arguments)]
pub async fn run<C, S, A, F>(
    mut client: C,
    mut server: S,
    mut for_client: BytesMut,
    leftover: BytesMut,
    client_pending: BytesMut,
    buffer_size: usize,
    kill: &KillSwitch,
    abandon: A,
) -> RelayStats
where
    C: Split + AsyncReadRent + AsyncWriteRent,
    S: Split + AsyncReadRent + AsyncWriteRent,
    A: FnOnce() -> F,
    F: std::future::Future<Output = ()>,
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
        query_cycles_asked: c2s.tagged.get(),
        ended_by,
    };

    // Both sides' framers must start with what was already sent, so the
    // early bytes go through them too.
    let mut client_framer = Framer::counting_any(&CYCLE_TAGS);
    let mut server_framer = Framer::counting(TAG_READY_FOR_QUERY);
    match client_framer.scan(&client_pending) {
        Ok(scan) => c2s.tagged.set(scan.tagged as u64),
        Err(_) => return stats(EndedBy::ClientProtocol),
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

    let (mut client_r, mut client_w) = client.into_split();
    let (mut server_r, mut server_w) = server.into_split();
    let ended_by = {
        let up = client_to_server(
            &mut client_r,
            &mut server_w,
            Vec::with_capacity(buffer_size),
            &mut client_framer,
            &c2s,
        );
        let down = server_to_client(
            &mut server_r,
            &mut client_w,
            Vec::with_capacity(buffer_size),
            &mut server_framer,
            &s2c,
            kill,
        );
        // Whichever direction ends first ends the session; dropping the
        // other cancels its pending read.
        monoio::select! {
            e = up => e,
            e = down => e,
        }
    };
    match ended_by {
        EndedBy::Token(_) if client_framer.at_boundary() => {
            // Close the server side cleanly, as a client would.
            let mut terminate = BytesMut::with_capacity(5);
            postgres_protocol::message::frontend::terminate(&mut terminate);
            let _ = server_w.write_all(terminate).await;
        }
        EndedBy::ServerClosed | EndedBy::ServerIo if server_lost_silently(&server_framer) => {
            let mut out = BytesMut::with_capacity(128);
            ClientError::server_closed().encode(&mut out);
            let _ = client_w.write_all(out).await;
        }
        EndedBy::ClientClosed | EndedBy::ClientIo
            if query_in_flight(&client_framer, c2s.tagged.get(), s2c.tagged.get()) =>
        {
            // Cancel before closing: a server only notices a closed socket
            // when it next reads or writes, which a long query may not do
            // for a long time.
            abandon().await;
        }
        _ => {}
    }
    stats(ended_by)
}

/// The server ended at a message boundary without an ErrorResponse of its
/// own as its last word (killed, crashed, connection lost): the client
/// must hear it from tollgate. Mid-message nothing can be added.
fn server_lost_silently(server: &Framer) -> bool {
    server.at_boundary() && server.last_tag() != TAG_ERROR_RESPONSE
}

/// The client asked for more query cycles than the server finished, and
/// did not say goodbye with Terminate.
fn query_in_flight(client: &Framer, asked: u64, finished: u64) -> bool {
    asked > finished && client.last_tag() != TAG_TERMINATE
}

/// Copies client bytes to the server until the client closes or fails.
async fn client_to_server<R: AsyncReadRent, W: AsyncWriteRent>(
    from: &mut R,
    to: &mut W,
    mut buf: Vec<u8>,
    framer: &mut Framer,
    counters: &Counters,
) -> EndedBy {
    loop {
        // monoio reads into the buffer's whole capacity from the start and
        // sets its length to what was read.
        let (res, b) = from.read(buf).await;
        buf = b;
        let n = match res {
            Ok(0) => return EndedBy::ClientClosed,
            Ok(n) => n,
            Err(_) => return EndedBy::ClientIo,
        };
        match framer.scan(&buf[..n]) {
            Ok(scan) => {
                if scan.tagged > 0 {
                    counters
                        .tagged
                        .set(counters.tagged.get() + scan.tagged as u64);
                }
            }
            Err(_) => return EndedBy::ClientProtocol,
        }
        counters.bytes.set(counters.bytes.get() + n as u64);
        let (res, b) = to.write_all(buf).await;
        buf = b;
        if res.is_err() {
            return EndedBy::ServerIo;
        }
    }
}

/// Copies server bytes to the client until either fails or closes, or
/// `kill` fires, in which case it stops at a message boundary and sends
/// the client a FATAL error naming the reason.
async fn server_to_client<R: AsyncReadRent, W: AsyncWriteRent>(
    from: &mut R,
    to: &mut W,
    mut buf: Vec<u8>,
    framer: &mut Framer,
    counters: &Counters,
    kill: &KillSwitch,
) -> EndedBy {
    loop {
        if let Some(reason) = kill.fired() {
            if framer.at_boundary() {
                return terminate_client(to, reason).await;
            }
        }
        let read = from.read(buf);
        let (res, b) = if framer.at_boundary() {
            // Idle or between messages: a kill may interrupt the wait.
            monoio::select! {
                r = read => r,
                reason = kill.wait() => return terminate_client(to, reason).await,
            }
        } else {
            read.await
        };
        buf = b;
        let n = match res {
            Ok(0) => return EndedBy::ServerClosed,
            Ok(n) => n,
            Err(_) => return EndedBy::ServerIo,
        };
        // After a kill, forward only up to the end of the message in flight.
        let n = match kill.fired() {
            Some(_) => framer.bytes_to_boundary(&buf[..n]).unwrap_or(n),
            None => n,
        };
        match framer.scan(&buf[..n]) {
            Ok(scan) => {
                if scan.tagged > 0 {
                    counters
                        .tagged
                        .set(counters.tagged.get() + scan.tagged as u64);
                }
            }
            Err(_) => return EndedBy::ServerProtocol,
        }
        counters.bytes.set(counters.bytes.get() + n as u64);
        buf.truncate(n);
        let (res, b) = to.write_all(buf).await;
        buf = b;
        if res.is_err() {
            return EndedBy::ClientIo;
        }
    }
}

/// Sends the FATAL error that ends a session whose token no longer allows it.
async fn terminate_client<W: AsyncWriteRent>(to: &mut W, reason: Rejection) -> EndedBy {
    let mut out = BytesMut::with_capacity(128);
    ClientError::session_ended(reason).encode(&mut out);
    let _ = to.write_all(out).await;
    EndedBy::Token(reason)
}
