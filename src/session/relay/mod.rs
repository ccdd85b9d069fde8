//! The relay: after start-up, bytes flow both ways untouched.
//!
//! Each direction reads into a buffer, lets a [`Framer`] skim the 5-byte
//! message headers (to know where messages end; payloads are never parsed),
//! and writes the same buffer to the other side. Nothing on the
//! per-message path allocates, locks, or touches memory another shard reads.
//!
//! Two pumps share this logic. [`ringed`] serves sessions plain on both
//! sides on an io_uring shard (`plain_relay = "completion"`, the default):
//! receives posted to the shard's relay ring take a provided buffer only
//! when data arrives, and sends go out from that buffer, so an idle
//! session holds none and a busy shard enters the kernel once per turn,
//! not per read and write. [`lent`] serves every other session, TLS on
//! either side, or plain on the epoll driver or with `plain_relay =
//! "readiness"`: it waits for readiness holding no buffer and borrows one
//! from the shard's pool only while bytes are in flight (a TLS side opens
//! and seals its records in that same buffer).
//!
//! A session can be ended from outside (token revoked, expired, rotated):
//! the server-to-client direction then stops at the next message boundary,
//! sends a FATAL ErrorResponse, and the server gets a Terminate, so neither
//! side ever sees half a message.
//!
//! In session pooling the server connection outlives the client: the
//! client's Terminate is not forwarded, and when the client leaves (or is
//! ended) the relay stops at a point it can describe, starts the server
//! connection's reset ([`crate::server::reset`]) and hands the stream
//! back as [`Kept`]. A server connection the relay cannot hand back whole
//! is closed.
//!
//! When one side goes away the other is told as a direct connection would
//! tell it: a server that vanishes without an error of its own leaves the
//! client a FATAL 08006 (when the stream is at a message boundary), and a
//! client that vanishes while a query runs gets that query cancelled before
//! the server connection is closed, so the server stops the work.

pub(in crate::session) mod lent;
mod ringed;
mod tracks;

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;

use bytes::BytesMut;
use monoio::io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt, Split};

use super::kill::{KillReason, KillSwitch};
use crate::error::ClientError;
pub use crate::net::BufferPool;
use crate::net::Stream;
use crate::protocol::backend::TAG_ERROR_RESPONSE;
use crate::protocol::Framer;
use crate::server::reset::{self, Plan};
use crate::tls::stream::TlsStream;
pub use tracks::{QueryAudit, SessionStats, Timing, Tracks};

/// How a relayed session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndedBy {
    ClientClosed,
    ServerClosed,
    ClientIo,
    ServerIo,
    ClientProtocol,
    ServerProtocol,
    /// Ended by tollgate: the token no longer allows it, or an operator
    /// ended it.
    Killed(KillReason),
    /// Transaction pooling: idle in a transaction past
    /// `idle_transaction_timeout`.
    IdleInTransaction,
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
            EndedBy::Killed(r) => r.as_str(),
            EndedBy::IdleInTransaction => "idle_transaction_timeout",
        }
    }
}

/// Terminate: the client closed the session itself.
const TAG_TERMINATE: u8 = b'X';

impl Tracks {
    /// What to do once a pump stopped, before both sockets close.
    /// After the client's Terminate, the server closes too, and its EOF
    /// may win the race with the client's: the client still ended it.
    pub(in crate::session) fn attribute(&self, ended_by: EndedBy) -> EndedBy {
        match ended_by {
            EndedBy::ServerClosed if self.client.last_tag() == TAG_TERMINATE => {
                EndedBy::ClientClosed
            }
            other => other,
        }
    }

    pub(in crate::session) fn end_action(&self, ended_by: EndedBy) -> EndAction {
        match ended_by {
            EndedBy::Killed(_) if self.client.at_boundary() => {
                // Close the server side cleanly, as a client would.
                let mut terminate = BytesMut::with_capacity(5);
                postgres_protocol::message::frontend::terminate(&mut terminate);
                EndAction::TellServer(terminate)
            }
            EndedBy::ServerClosed | EndedBy::ServerIo if server_lost_silently(&self.server) => {
                let mut out = BytesMut::with_capacity(128);
                ClientError::server_closed().encode(&mut out);
                EndAction::TellClient(out)
            }
            EndedBy::ClientClosed | EndedBy::ClientIo
                if query_in_flight(
                    &self.client,
                    self.stats.cycles_asked.get(),
                    self.stats.queries.get(),
                ) =>
            {
                // Cancel before closing: a server only notices a closed
                // socket when it next reads or writes, which a long query
                // may not do for a long time.
                EndAction::Abandon
            }
            _ => EndAction::Nothing,
        }
    }
}

pub(in crate::session) enum EndAction {
    Nothing,
    TellServer(BytesMut),
    TellClient(BytesMut),
    Abandon,
}

/// The client side, as the relay needs to know it: the pump for plain
/// sockets or the one for TLS.
pub trait ClientSide: Split + AsyncReadRent + AsyncWriteRent + Sized {
    fn into_client(self) -> Client;
}

/// A client connection after its start-up.
pub enum Client {
    Plain(Stream),
    Tls(TlsStream),
}

impl ClientSide for Stream {
    fn into_client(self) -> Client {
        Client::Plain(self)
    }
}

impl ClientSide for TlsStream {
    fn into_client(self) -> Client {
        Client::Tls(self)
    }
}

/// The server side, likewise.
pub enum ServerSide {
    /// TCP without TLS, or a Unix-domain socket.
    Plain(Stream),
    Tls(Box<TlsStream>),
}

/// How a relay ended, and the server stream when it outlives the client.
pub struct Ended {
    pub by: EndedBy,
    pub kept: Option<Kept>,
}

/// A server connection handed back at the end of a pooled session, its
/// reset begun: `plan`'s prologue is sent; the server's answers start
/// with `leftover` and, before that, the rest of the message `framer` was
/// in the middle of.
pub struct Kept {
    pub server: ServerSide,
    pub plan: Plan,
    pub framer: Framer,
    pub leftover: BytesMut,
}

/// Whether an end leaves the server connection worth keeping: the client
/// went, or tollgate ended the session; the server itself is fine.
fn client_side(ended_by: EndedBy) -> bool {
    matches!(
        ended_by,
        EndedBy::ClientClosed | EndedBy::ClientIo | EndedBy::Killed(_) | EndedBy::IdleInTransaction
    )
}

/// The client's Terminate, when `chunk` (already scanned) ends with it:
/// with a kept server it is not forwarded. Returns how much of the chunk
/// to forward, or `None` when the chunk does not end the session.
pub(in crate::session) fn before_terminate(tracks: &Tracks, chunk: &[u8]) -> Option<usize> {
    const TERMINATE: [u8; 5] = [TAG_TERMINATE, 0, 0, 0, 4];
    (tracks.client.last_tag() == TAG_TERMINATE
        && tracks.client.at_boundary()
        && chunk.ends_with(&TERMINATE))
    .then(|| chunk.len() - TERMINATE.len())
}

/// With a kept server, after the chunk that ended with the client's
/// Terminate was forwarded (without it): notes the goodbye, and if
/// answers are still due, leaves it to the other direction to end the
/// session once they are relayed.
async fn goodbye_sent(goodbye: &Cell<bool>, tracks: &RefCell<Tracks>) -> EndedBy {
    goodbye.set(true);
    if tracks.borrow().in_flight() {
        std::future::pending::<()>().await;
    }
    EndedBy::ClientClosed
}

/// What the relay starts with, besides the sockets.
pub struct Opening {
    /// The server's login messages (AuthenticationOk through
    /// ReadyForQuery), for the client.
    pub for_client: BytesMut,
    /// Anything the server sent after them.
    pub leftover: BytesMut,
    /// Anything the client sent after its password.
    pub client_pending: BytesMut,
    /// The reset query, when the server connection outlives the client
    /// (session pooling; see the module doc).
    pub keep: Option<Rc<str>>,
}

/// Hands the login messages to the client, forwards any bytes the client
/// sent early, then relays until either side closes or `kill` fires.
/// `abandon` cancels the running query on the server; it is awaited only
/// when the client vanishes with a query in flight.
///
/// Not an `async fn`: the set-up runs now and the returned future is the
/// pump alone, boxed at its own size, so an idle session carries no copy
/// of the arguments and no room for a pump it does not use (a plain
/// session must not pay for a TLS pump's state).
pub fn run<C, A, F>(
    client: C,
    server: ServerSide,
    opening: Opening,
    mut tracks: Tracks,
    pool: Rc<BufferPool>,
    kill: Rc<KillSwitch>,
    abandon: A,
) -> RelayFuture
where
    C: ClientSide + 'static,
    A: FnOnce() -> F + 'static,
    F: Future<Output = ()> + 'static,
{
    let Opening {
        mut for_client,
        leftover,
        client_pending,
        keep,
    } = opening;
    // Both framers must start with what was already sent, so the early
    // bytes go through them too.
    if tracks.saw_client(&client_pending).is_err() {
        return ended(EndedBy::ClientProtocol);
    }
    if tracks.saw_server(&leftover).is_err() {
        return ended(EndedBy::ServerProtocol);
    }
    for_client.extend_from_slice(&leftover);
    drop(leftover);
    let mut client_pending = client_pending;
    let said_goodbye = Cell::new(false);
    if keep.is_some() {
        // A Terminate sent right behind the password: kept here, like one
        // that comes later.
        if let Some(n) = before_terminate(&tracks, &client_pending) {
            client_pending.truncate(n);
            said_goodbye.set(true);
        }
    }
    let pump = Pump {
        for_client,
        client_pending,
        tracks: RefCell::new(tracks),
        pool,
        kill,
        abandon,
        keep,
        said_goodbye,
    };
    // The finest level: which pump a session runs on, for whoever debugs
    // the relay itself.
    let plain = matches!(server, ServerSide::Plain(_));
    tracing::trace!(
        plain_server = plain,
        ring = pump.pool.ring().is_some(),
        "relay starts"
    );
    match (client.into_client(), server) {
        (Client::Plain(client), ServerSide::Plain(server)) => match pump.pool.ring() {
            Some(ring) => Box::pin(ringed::run(client, server, pump, ring)),
            None => Box::pin(lent::run(client, server, pump)),
        },
        (Client::Tls(client), ServerSide::Plain(server)) => {
            Box::pin(lent::run(client, server, pump))
        }
        (Client::Plain(client), ServerSide::Tls(server)) => {
            Box::pin(lent::run(client, *server, pump))
        }
        (Client::Tls(client), ServerSide::Tls(server)) => {
            Box::pin(lent::run(client, *server, pump))
        }
    }
}

/// A relay in progress; resolves to how it ended. The session's numbers
/// are in the [`SessionStats`] its [`Tracks`] were made with.
pub type RelayFuture = Pin<Box<dyn Future<Output = Ended>>>;

fn ended(by: EndedBy) -> RelayFuture {
    Box::pin(std::future::ready(Ended { by, kept: None }))
}

/// What either pump gets besides the two sockets.
struct Pump<A> {
    /// Still to write when the pump starts.
    for_client: BytesMut,
    client_pending: BytesMut,
    /// Shared by both directions of the pump, borrowed per chunk and never
    /// across an await.
    tracks: RefCell<Tracks>,
    pool: Rc<BufferPool>,
    kill: Rc<KillSwitch>,
    /// Cancels the running query; see [`run`].
    abandon: A,
    /// The reset query, when the server connection outlives the client.
    keep: Option<Rc<str>>,
    /// With a kept server: the client sent Terminate, which was kept from
    /// the server. What it asked for before is still relayed; the session
    /// ends when all of it is answered.
    said_goodbye: Cell<bool>,
}

/// With a kept server (`keep` is the reset query), after a client-side
/// end: the reset's plan, whether a cancel must go first, and the prologue
/// to send. `None` when the server is not kept, or the end was the
/// server's.
pub(in crate::session) fn reset_plan(
    keep: Option<&str>,
    tracks: &RefCell<Tracks>,
    ended_by: EndedBy,
    (client_whole, said_goodbye): (bool, bool),
    intact: bool,
) -> Option<(Plan, bool, BytesMut)> {
    let query = keep?;
    if !client_side(ended_by) {
        return None;
    }
    let end = tracks
        .borrow()
        .end_state(client_whole, said_goodbye, intact);
    let plan = reset::plan(&end);
    let cancel = plan.needs_cancel(&end);
    let prologue = reset::prologue(&plan, query);
    Some((plan, cancel, prologue))
}

impl From<Stream> for ServerSide {
    fn from(s: Stream) -> Self {
        ServerSide::Plain(s)
    }
}

impl From<TlsStream> for ServerSide {
    fn from(s: TlsStream) -> Self {
        ServerSide::Tls(Box::new(s))
    }
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

/// The FATAL error that ends a session from outside.
pub(in crate::session) fn session_ended(reason: KillReason) -> BytesMut {
    let mut out = BytesMut::with_capacity(128);
    match reason {
        KillReason::Token(r) => ClientError::session_ended(r),
        // Postgres says the same for a fast shutdown.
        KillReason::Admin | KillReason::Shutdown => ClientError::admin_terminated(),
    }
    .encode(&mut out);
    out
}

/// Writes the opening bytes with the rent API, before a pump takes over.
async fn open<C: AsyncWriteRent, S: AsyncWriteRent>(
    client: &mut C,
    server: &mut S,
    for_client: BytesMut,
    client_pending: BytesMut,
) -> Result<(), EndedBy> {
    let (res, _) = client.write_all(for_client).await;
    res.map_err(|_| EndedBy::ClientIo)?;
    if !client_pending.is_empty() {
        let (res, _) = server.write_all(client_pending).await;
        res.map_err(|_| EndedBy::ServerIo)?;
    }
    Ok(())
}
