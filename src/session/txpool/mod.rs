//! Transaction pooling (`[pool] mode = "transaction"`): a client holds a
//! server connection only while a transaction of its own runs on it.
//!
//! The connection is lent at the first message of a transaction (a Query,
//! or the first extended-protocol message of a cycle) and taken back at
//! the ReadyForQuery that leaves the session idle (`I`), once nothing the
//! client sent is unanswered and neither stream is inside a message: a
//! pipelined client keeps its connection until the pipeline is drained.
//! In between, the relay is the plain one: bytes pass untouched, only
//! headers are read. Both sockets are read by readiness without leaving
//! completion mode ([`ReadyStream`]): lending a connection and taking it
//! back switches nothing (a connection idle a millisecond or more gets one
//! peek, to check that the server has not closed it), and the wait for
//! the client's next bytes stays posted from one transaction to the next
//! ([`Standing`]). No reset runs between two clients' transactions, so
//! the pool's connections must never hold session state: what could leave
//! some is found as it passes ([`pin`]) and pins its client to its
//! connection (counted by reason, logged once) until the client clears
//! it itself, as drivers' pools do when they take a connection back
//! ([`Pins`]); a connection still pinned is reset (`reset_query`) when its
//! client leaves.
//!
//! A client that prepares a statement between transactions (Parse and
//! Sync, as `PQprepare` does) needs no connection when a server with its
//! key has accepted the same statement before: tollgate answers it
//! ([`rewrite::Rewriter::answer_alone`]).
//!
//! What a client's session looks like besides its transactions follows it
//! from connection to connection: the reported parameters
//! ([`crate::server::REPORTED`]: its start-up values and its own `SET`s of
//! them, as the server reported them) are applied to each lent connection
//! where they differ, with the answers kept from the client. Its cancels
//! come to the session itself ([`cancel::CancelSignal`]): sent on to the
//! connection lent to it, or dropped between transactions, and a
//! connection is not given back while a cancel to it is on its way, so a
//! cancel never reaches the query of a client the connection serves next.
//!
//! Either side may be plain or TLS ([`Link`]): TLS records are opened in
//! the lent buffer, so a TLS client, or a TLS server connection, waits
//! holding none either.
//!
//! <https://www.postgresql.org/docs/current/protocol-flow.html>

mod answers;
mod expect;
mod pin;
mod rewrite;
mod scan;

pub use pin::{Found, Pin, Pins};
pub use scan::TxScan;

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tracing::{debug, info, warn};

use super::borrow::{self, acquire, Login};
use super::cancel;
use super::kill::KillSwitch;
use super::refusal::Reply;
use super::relay::lent::{Turn, Wire};
use super::relay::{
    before_terminate, reset_plan, session_ended, BufferPool, EndAction, EndedBy, Kept, ServerSide,
    Tracks,
};
use super::ShardContext;
use crate::audit::SessionId;
use crate::error::ClientError;
use crate::net::ready::{self, Readable, Standing};
use crate::net::ReadyStream;
use crate::server::{ConnState, RoutePool, ServerConn, Settable, REPORTED};
use crate::tls::stream::TlsStream;
use crate::upstream::UpstreamStream;
use answers::{Action, Answers};
use expect::Expectations;
use rewrite::{Lend, Rewriter, StatementCounts};

/// Everything a transaction-pooled session needs besides its sockets.
pub(super) struct Lending {
    pub ctx: Rc<ShardContext>,
    pub pool: Rc<RoutePool>,
    pub login: Login,
    /// Dropped before the session's last connection goes back: a late
    /// cancel with the client's key must find nothing.
    pub cancel_key: cancel::Reservation,
    pub kill: Rc<KillSwitch>,
    pub buffers: Rc<BufferPool>,
    pub reset_query: Rc<str>,
    pub session: SessionId,
}

/// How a transaction-pooled session ended, and the connection it still
/// held, for [`borrow::give_back`]: its state, and the stream with its
/// reset begun (`None`: close it).
pub(super) struct Outcome {
    pub by: EndedBy,
    pub held: Option<(Box<ConnState>, Option<Kept>)>,
}

/// A connection lent to the session.
struct Lent {
    stream: Link,
    state: RefCell<Box<ConnState>>,
}

/// How the serving of one lent connection stopped.
enum Served {
    /// Taken back at a transaction's end; the client goes on.
    Released,
    /// The session ended; `writing`: a write of client bytes to the
    /// server was cut.
    Ended { by: EndedBy, writing: bool },
}

/// What a session under transaction pooling keeps besides its sockets.
struct Session {
    l: Lending,
    tracks: RefCell<Tracks>,
    /// The reported parameters the client's session has, by the server's
    /// names and values (shared with the lend that applies them and the
    /// connection readied with them: no copy per transaction).
    params: RefCell<Settable>,
    /// Pinned to the lent connection, by the first reason found.
    pinned: Cell<Option<Pin>>,
    /// Every reason the client is pinned for.
    pins: Cell<Pins>,
    /// What the client's statements cleared of its pins, once the server
    /// has run them (see [`Session::settle_clears`]).
    clearing: Cell<Pins>,
    /// The pin was logged (once per session).
    pin_told: Cell<bool>,
    /// The client sent Terminate (kept from the server).
    goodbye: Cell<bool>,
    /// Cancels of the client's key, for the session to act on.
    cancels: Rc<cancel::CancelSignal>,
    /// A cancel is being sent to the lent connection: it stays lent
    /// until the server has taken it.
    cancelling: Cell<bool>,
    /// Since when the session is idle in a transaction block (the server
    /// answered everything with status `T` or `E`, and the client has sent
    /// nothing since).
    idle_since: Cell<Option<Instant>>,
    /// The client's prepared statements, and its messages as the lent
    /// connection gets them.
    rewriter: RefCell<Rewriter>,
    /// The answers due on the lent connection, in order.
    expect: RefCell<Expectations>,
    /// The server's answers as the client gets them.
    answers: RefCell<Answers>,
    actions: RefCell<Vec<Action>>,
    /// tollgate's own answers are at the head of `expect`, with nothing
    /// from the server before them.
    answers_due: Flag,
    /// The client sent DISCARD ALL or DEALLOCATE ALL: its statements go.
    discarded: Cell<bool>,
    /// `max_prepared_statements`.
    statement_capacity: usize,
    /// Server bytes are being written to the client: the lent connection
    /// is not done with until they are.
    delivering: Cell<bool>,
    /// The lent connection is in copy-in mode from an extended-protocol
    /// Execute (see [`answers::Events::copy_in`]).
    copy_in: Cell<bool>,
    /// Raised as answers are delivered: a client stopped for a full
    /// expectation queue may read again.
    queue_room: Flag,
    idle_transaction_timeout: Option<Duration>,
}

/// What a session under transaction pooling starts with. Boxed into
/// [`run`]: an async fn keeps its arguments for its whole life, beside
/// what it moves them into, and a session's future is kept for as long as
/// the client stays (a pointer costs 8 bytes of it, these about 700).
pub(super) struct Opening {
    pub lending: Lending,
    /// The connection its login was shown from (readied with its start-up
    /// parameters), lent until the client's first transaction ends.
    pub first: ServerConn,
    /// The login's messages for the client.
    pub for_client: BytesMut,
    /// Client bytes read with the start-up.
    pub client_pending: BytesMut,
    pub tracks: Tracks,
}

/// Relays a session under transaction pooling.
pub(super) async fn run(client: Link, opening: Box<Opening>) -> Outcome {
    let out = relay(&client, opening).await;
    client.goodbye();
    out
}

async fn relay(client: &Link, opening: Box<Opening>) -> Outcome {
    // Unpacked by a plain function: what an async fn binds stays in its
    // future for good, moved out or not.
    let (s, mut first, for_client, client_pending) = Session::open(opening);
    // One readiness request on the client at a time, left posted from
    // one transaction to the next (see `Standing`).
    let wait = || client.socket().readable();
    let slot = std::pin::pin!(ready::unarmed(&wait));
    let standing = Standing::new(wait, slot);
    let client = &Client {
        link: client,
        standing: &standing,
    };
    s.l.cancel_key.delegate(s.cancels.clone());
    if write_all(client, &for_client).await.is_err() {
        if let Some(conn) = first.take() {
            s.release(conn).await;
        }
        return s.ended(EndedBy::ClientIo, None);
    }
    drop(for_client);
    let mut pending = (!client_pending.is_empty()).then_some(client_pending);
    let turn = Turn::new();
    loop {
        // Between transactions: no connection, no buffer, until the
        // client sends something (or is ended).
        let chunk = match pending.take() {
            Some(bytes) => Chunk::Owned(bytes),
            None => {
                if let Some(conn) = first.take() {
                    s.release(conn).await;
                }
                let res = loop {
                    let read = turn.read(read_lent(client, &s.l.buffers));
                    monoio::select! {
                        r = read => break r,
                        reason = s.l.kill.wait() => {
                            let _ = write_all(client, &session_ended(reason)).await;
                            return s.ended(EndedBy::Killed(reason), None);
                        }
                        // Nothing runs: acted on by doing nothing.
                        _ = s.cancels.wait() => drop(s.cancels.take()),
                    }
                };
                match res {
                    Ok(Some((buf, n))) => Chunk::Lent(buf, n),
                    Ok(None) => return s.ended(EndedBy::ClientClosed, None),
                    Err(_) => return s.ended(EndedBy::ClientIo, None),
                }
            }
        };
        let Some(forward) = s.saw_client(chunk.bytes()) else {
            chunk.give_back(&s.l.buffers);
            if let Some(conn) = first.take() {
                s.release(conn).await;
            }
            return s.ended(EndedBy::ClientProtocol, None);
        };
        if forward == 0 && s.goodbye.get() {
            // Terminate alone: nothing to lend for.
            chunk.give_back(&s.l.buffers);
            if let Some(conn) = first.take() {
                s.release(conn).await;
            }
            return s.ended(EndedBy::ClientClosed, None);
        }
        let alone = (first.is_none() && forward == chunk.bytes().len())
            .then(|| s.answer_alone(chunk.bytes()))
            .flatten();
        if let Some(answers) = alone {
            // A prepare of a known statement: no connection needed.
            chunk.give_back(&s.l.buffers);
            let write = write_all(client, &answers);
            monoio::select! {
                res = write => if res.is_err() {
                    return s.ended(EndedBy::ClientIo, None);
                },
                reason = s.l.kill.wait() => return s.ended(EndedBy::Killed(reason), None),
            }
            // A client that only prepares never waits on a server: it
            // takes its turn like one that does.
            turn.take().await;
            continue;
        }
        // Straight into the lend: a connection held in a binding of its
        // own would keep a place in the session's future for good.
        let lent = match first.take() {
            Some(conn) => s.start_lend(conn),
            None => match s.lend(client).await {
                Ok(conn) => s.start_lend(conn),
                Err(by) => {
                    chunk.give_back(&s.l.buffers);
                    return s.ended(by, None);
                }
            },
        };
        let served = s.serve(client, &lent, &chunk.bytes()[..forward]).await;
        chunk.give_back(&s.l.buffers);
        match served {
            Served::Released => s.release(s.end_lend(lent)).await,
            Served::Ended { by, writing } => {
                // Boxed: once per session, and larger than a lend.
                return Box::pin(s.end_lent(client, lent, by, writing)).await;
            }
        }
    }
}

/// Client bytes about to be forwarded.
enum Chunk {
    Lent(Vec<u8>, usize),
    Owned(BytesMut),
}

impl Chunk {
    fn bytes(&self) -> &[u8] {
        match self {
            Chunk::Lent(buf, n) => &buf[..*n],
            Chunk::Owned(b) => b,
        }
    }

    fn give_back(self, buffers: &BufferPool) {
        if let Chunk::Lent(buf, _) = self {
            buffers.put(buf);
        }
    }
}

impl Session {
    /// The session an opening starts, with the opening's connection and
    /// bytes.
    fn open(opening: Box<Opening>) -> (Session, Option<ServerConn>, BytesMut, BytesMut) {
        let Opening {
            lending: l,
            first,
            for_client,
            client_pending,
            mut tracks,
        } = *opening;
        let mut tx = Box::<TxScan>::default();
        // Logged in to a session whose SQL the scan cannot read as the
        // server does (a role's `standard_conforming_strings = off`,
        // say): pinned from its first transaction.
        let unreadable = ["standard_conforming_strings", "client_encoding"]
            .iter()
            .any(|k| {
                first
                    .state
                    .param(k)
                    .is_some_and(|v| pin::reads_sql_otherwise(k, v))
            });
        if unreadable {
            tx.pin_unreadable();
        }
        tracks.tx = Some(tx);
        // Shared with the other sessions that have the same: a connection
        // one of them was given needs no readying for the next.
        let params = l.pool.intern_settable(
            REPORTED
                .iter()
                .filter_map(|k| Some(((*k).to_owned(), first.state.param(k)?.to_owned())))
                .collect(),
        );
        let config = l.pool.config();
        let s = Session {
            statement_capacity: config.max_prepared_statements,
            idle_transaction_timeout: config.idle_transaction_timeout,
            l,
            tracks: RefCell::new(tracks),
            params: RefCell::new(params),
            pinned: Cell::new(None),
            pins: Cell::new(Pins::NONE),
            clearing: Cell::new(Pins::NONE),
            pin_told: Cell::new(false),
            goodbye: Cell::new(false),
            cancels: Rc::default(),
            cancelling: Cell::new(false),
            idle_since: Cell::new(None),
            rewriter: RefCell::default(),
            expect: RefCell::default(),
            answers: RefCell::default(),
            actions: RefCell::default(),
            answers_due: Flag::default(),
            discarded: Cell::new(false),
            delivering: Cell::new(false),
            copy_in: Cell::new(false),
            queue_room: Flag::default(),
        };
        (s, Some(first), for_client, client_pending)
    }

    /// Follows client bytes: framing, the statements that pin, and the
    /// Terminate that ends the session (kept from the server; noted in
    /// `goodbye`). Returns how many bytes to forward, or `None` for a
    /// corrupt stream.
    fn saw_client(&self, chunk: &[u8]) -> Option<usize> {
        let mut tracks = self.tracks.borrow_mut();
        tracks.saw_client(chunk).ok()?;
        let found = tracks
            .tx
            .as_mut()
            .map(|t| t.take_pins())
            .unwrap_or_default();
        if tracks.tx.as_mut().is_some_and(|t| t.take_discard()) {
            self.discarded.set(true);
        }
        let forward = match before_terminate(&tracks, chunk) {
            Some(n) => {
                self.goodbye.set(true);
                n
            }
            None => chunk.len(),
        };
        drop(tracks);
        if !chunk.is_empty() {
            // Anything sent after a clear may undo it (a ROLLBACK): only
            // a clear in the last message sent counts.
            self.clearing.set(Pins::NONE);
        }
        self.note_pins(found);
        Some(forward)
    }

    /// Pins the client to its connection for what was found, and notes
    /// what its statements clear.
    fn note_pins(&self, found: Found) {
        if let Some(first) = found.first {
            self.pins.set(self.pins.get().with(found.pins));
            self.clearing.set(self.clearing.get().without(found.pins));
            if self.pinned.get().is_none() {
                self.pin(first);
            }
        }
        self.clearing.set(self.clearing.get().with(found.clears));
    }

    /// Pins the client to its connection until it clears what it made.
    fn pin(&self, why: Pin) {
        self.pinned.set(Some(why));
        self.l.pool.counters.borrow_mut().pins.add(why.as_str(), 1);
        if !self.pin_told.replace(true) {
            info!(
                session = %self.l.session,
                reason = why.as_str(),
                "client pinned to its server connection until it clears its session state"
            );
        }
    }

    /// What the client's statements cleared is cleared once the server
    /// ran them: every cycle answered with no error since (an error
    /// forgets them, in [`Session::relay_answers`]) and the session
    /// outside a transaction block (a block could still roll them back).
    /// The client is unpinned when no reason is left.
    fn settle_clears(&self) {
        let clearing = self.clearing.get();
        if clearing.is_empty() {
            return;
        }
        let idle = {
            let tracks = self.tracks.borrow();
            if !tracks.drained() {
                return;
            }
            tracks.stats.status.get() == b'I'
        };
        self.clearing.set(Pins::NONE);
        if !idle {
            return;
        }
        let left = self.pins.get().without(clearing);
        self.pins.set(left);
        if left.is_empty() && self.pinned.take().is_some() {
            self.l.pool.counters.borrow_mut().unpins += 1;
            debug!(session = %self.l.session, "client unpinned: it cleared its session state");
        }
    }

    /// Follows server bytes, and notes the parameters they report on the
    /// connection and in the client's session.
    fn saw_server(&self, chunk: &[u8], state: &RefCell<Box<ConnState>>) -> bool {
        let mut tracks = self.tracks.borrow_mut();
        if tracks.saw_server(chunk).is_err() {
            return false;
        }
        let Some(tx) = tracks.tx.as_mut() else {
            return true;
        };
        let mut params = self.params.borrow_mut();
        let mut unknown = false;
        let mut unreadable = false;
        tx.drain_reports(|k, v| {
            unreadable |= pin::reads_sql_otherwise(k, v);
            // Reported, yet not one that follows clients: set out of the
            // lexer's sight (or by a role or function): the session has
            // state of its own now.
            if !crate::server::is_reported(k)
                && !SERVER_STATE.iter().any(|s| s.eq_ignore_ascii_case(k))
            {
                unknown = true;
            }
            state.borrow_mut().note_reported(k, v);
            let mine = params.iter().position(|(p, _)| p.eq_ignore_ascii_case(k));
            if let Some(p) = mine.map(|i| &mut Rc::make_mut(&mut params)[i]) {
                p.1.clear();
                p.1.push_str(v);
            }
        });
        drop(params);
        if unknown {
            tx.pin_unknown();
        }
        if unreadable {
            tx.pin_unreadable();
        }
        let found = tx.take_pins();
        drop(tracks);
        self.note_pins(found);
        true
    }

    /// tollgate's answers to client bytes sent between transactions that
    /// need no server (see [`Rewriter::answer_alone`]), followed as if the
    /// server had sent them; `None`: a connection is needed.
    fn answer_alone(&self, bytes: &[u8]) -> Option<Vec<u8>> {
        if self.pinned.get().is_some()
            || self.goodbye.get()
            || self.discarded.get()
            || bytes.first() != Some(&b'P')
        {
            return None;
        }
        // Tiny (5 or 6 bytes an answer), and only for a prepare.
        let mut out = Vec::new();
        let key = &self.l.login.key;
        let parses = self.rewriter.borrow_mut().answer_alone(
            bytes,
            |name| self.l.pool.vetted(key, name),
            &mut out,
        )?;
        // Whole messages of tollgate's own, at a boundary: always followed.
        let followed = self.tracks.borrow_mut().saw_server(&out);
        debug_assert!(followed.is_ok());
        self.l.pool.counters.borrow_mut().statements_hit += parses;
        Some(out)
    }

    /// Client bytes as the lent connection gets them (see [`rewrite`]), in
    /// a buffer of the shard's; `None` for a corrupt stream.
    fn rewrite(&self, lent: &Lent, bytes: &[u8]) -> Option<Vec<u8>> {
        let mut out = self.l.buffers.take_scratch();
        let mut state = lent.state.borrow_mut();
        let mut rewriter = self.rewriter.borrow_mut();
        if self.discarded.take() {
            rewriter.forget_all();
            *state.statements() = Default::default();
        }
        let mut counts = StatementCounts::default();
        let mut expect = self.expect.borrow_mut();
        let mut lend = Lend {
            cache: state.statements(),
            expect: &mut expect,
            capacity: self.statement_capacity,
            counts: &mut counts,
            copy_in: self.copy_in.get(),
            syncs_ignored: 0,
            terminated: false,
            aborted: self.tracks.borrow().stats.status.get() == b'E',
            pins: Found::default(),
        };
        let res = rewriter.feed(bytes, &mut lend, &mut out);
        let bound = lend.pins;
        self.copy_in.set(lend.copy_in);
        self.syncs_ignored(lend.syncs_ignored);
        if lend.terminated {
            self.goodbye.set(true);
        }
        if matches!(expect.front(), Some(expect::Expect::Own(_))) {
            self.answers_due.raise();
        }
        drop(expect);
        if counts.hits + counts.misses > 0 {
            let mut c = self.l.pool.counters.borrow_mut();
            c.statements_hit += counts.hits;
            c.statements_prepared += counts.misses;
            c.statements_evicted += counts.evictions;
        }
        // A statement that pins runs again: pinned before it reaches the
        // server.
        self.note_pins(bound);
        match res {
            Ok(()) => Some(out),
            Err(_) => {
                self.l.buffers.put_scratch(out);
                None
            }
        }
    }

    /// Relays a chunk of server bytes (already followed) as the client gets
    /// them: hidden answers left out, tollgate's own put in.
    async fn relay_answers(
        &self,
        client: &Client<'_>,
        state: &RefCell<Box<ConnState>>,
        chunk: &[u8],
    ) -> std::io::Result<()> {
        let mut actions = std::mem::take(&mut *self.actions.borrow_mut());
        let events = self.answers.borrow_mut().sort(
            chunk,
            &mut self.expect.borrow_mut(),
            state.borrow_mut().statements(),
            &mut actions,
        );
        {
            let mut answers = self.answers.borrow_mut();
            if !answers.undone.is_empty() {
                let mut rewriter = self.rewriter.borrow_mut();
                for u in answers.undone.drain(..) {
                    rewriter.undo(u);
                }
            }
            let key = &self.l.login.key;
            for (name, accepted) in answers.parsed.drain(..) {
                if accepted {
                    self.l.pool.vet(key, &name);
                } else {
                    self.l.pool.unvet(key, &name);
                }
            }
        }
        if events.copy_in {
            self.copy_in.set(true);
        } else if events.error {
            self.copy_in.set(false);
        }
        if events.error {
            // What the client cleared may not have run.
            self.clearing.set(Pins::NONE);
        }
        self.syncs_ignored(events.syncs_ignored);
        self.delivering.set(true);
        let res = match actions.as_slice() {
            [Action::Relay(r)] if r.start == 0 && r.end == chunk.len() => {
                write_all(client, chunk).await
            }
            _ => {
                let mut out = self.l.buffers.take_scratch();
                for a in &actions {
                    match a {
                        Action::Relay(r) => out.extend_from_slice(&chunk[r.clone()]),
                        Action::Answer(tag) => out.extend_from_slice(&[*tag, 0, 0, 0, 4]),
                        Action::Header(h) => out.extend_from_slice(h),
                    }
                }
                let res = write_all(client, &out).await;
                self.l.buffers.put_scratch(out);
                res
            }
        };
        self.delivering.set(false);
        self.queue_room.raise();
        *self.actions.borrow_mut() = actions;
        res
    }

    /// Syncs the server ignores (copy-in mode) ask for no ReadyForQuery.
    fn syncs_ignored(&self, n: u64) {
        if n > 0 {
            let tracks = self.tracks.borrow();
            let asked = &tracks.stats.cycles_asked;
            asked.set(asked.get().saturating_sub(n));
        }
    }

    /// Sends tollgate's own answers now at the head of the expectations.
    async fn answer_due(&self, client: &Client<'_>) -> std::io::Result<()> {
        let mut actions = std::mem::take(&mut *self.actions.borrow_mut());
        Answers::due(&mut self.expect.borrow_mut(), &mut actions);
        let mut out = [0u8; 5 * 8];
        let mut res = Ok(());
        self.delivering.set(true);
        for batch in actions.chunks(8) {
            let mut n = 0;
            for a in batch {
                if let Action::Answer(tag) = a {
                    out[n..n + 5].copy_from_slice(&[*tag, 0, 0, 0, 4]);
                    n += 5;
                }
            }
            res = write_all(client, &out[..n]).await;
            if res.is_err() {
                break;
            }
        }
        self.delivering.set(false);
        self.queue_room.raise();
        *self.actions.borrow_mut() = actions;
        res
    }

    /// How long the session has been idle in a transaction block.
    fn idle_in_transaction_for(&self) -> Duration {
        self.idle_since
            .get()
            .map_or(Duration::ZERO, |t| t.elapsed())
    }

    /// Whether the lent connection can go back now: unpinned, every cycle
    /// the client asked for answered, both streams between messages, and
    /// the session idle (not in a transaction block).
    fn releasable(&self, writing: bool) -> bool {
        let tracks = self.tracks.borrow();
        self.pinned.get().is_none()
            && !writing
            && !self.cancelling.get()
            && !self.delivering.get()
            && self.expect.borrow().is_empty()
            && tracks.drained()
            && tracks.client.at_boundary()
            && tracks.stats.status.get() == b'I'
    }

    /// A connection for the client's next transaction: claimed in turn,
    /// readied with the client's parameters, its cancel key pointed at it.
    /// The client is told and the session ends when none comes free in
    /// time, or the session is ended meanwhile.
    async fn lend(&self, client: &Client<'_>) -> Result<ServerConn, EndedBy> {
        let began = Instant::now();
        let config = self.l.pool.config();
        let deadline = monoio::time::Instant::now() + config.checkout_timeout;
        let settable = self.params.borrow().clone();
        let acquired = {
            let acquire = acquire(
                &self.l.ctx,
                &self.l.pool,
                &self.l.login,
                &settable,
                deadline,
                began,
            );
            monoio::select! {
                r = acquire => r,
                reason = self.l.kill.wait() => {
                    let _ = write_all(client, &session_ended(reason)).await;
                    return Err(EndedBy::Killed(reason));
                }
            }
        };
        match acquired {
            Ok((conn, _, _)) => Ok(conn),
            Err(refusal) => {
                debug!(
                    reason = refusal.reason,
                    "no server connection for a transaction"
                );
                let bytes = match refusal.reply {
                    Reply::Client(e) => {
                        let mut out = BytesMut::with_capacity(256);
                        e.encode(&mut out);
                        out.to_vec()
                    }
                    Reply::Relay(bytes) => bytes,
                    Reply::Nothing | Reply::Close => Vec::new(),
                };
                let _ = write_all(client, &bytes).await;
                Err(EndedBy::ServerIo)
            }
        }
    }

    /// Readies a connection for the relay.
    fn start_lend(&self, conn: ServerConn) -> Lent {
        let ServerConn { stream, state } = conn;
        tracing::trace!(session = %self.l.session, pid = ?state.pid(), "server connection lent");
        self.rewriter.borrow_mut().new_lend();
        self.expect.borrow_mut().clear();
        *self.answers.borrow_mut() = Answers::default();
        self.copy_in.set(false);
        Lent {
            stream: Link::from_upstream(stream),
            state: RefCell::new(state),
        }
    }

    /// The lent connection, as the pool keeps it.
    fn end_lend(&self, lent: Lent) -> ServerConn {
        ServerConn {
            stream: lent.stream.into_upstream(),
            state: lent.state.into_inner(),
        }
    }

    /// Gives a clean connection back to the pool.
    async fn release(&self, conn: ServerConn) {
        tracing::trace!(session = %self.l.session, pid = ?conn.state.pid(), "server connection taken back");
        self.l.pool.counters.borrow_mut().lends += 1;
        borrow::put_back(&self.l.ctx, &self.l.pool, conn).await;
    }

    /// Relays between the client and a lent connection, starting with
    /// `first` (client bytes already followed), until the transaction ends
    /// or the session does.
    async fn serve(&self, client: &Client<'_>, lent: &Lent, first: &[u8]) -> Served {
        let writing = Cell::new(true);
        let res = match self.rewrite(lent, first) {
            Some(out) => {
                let res = write_all(&lent.stream, &out).await;
                self.l.buffers.put_scratch(out);
                res
            }
            None => {
                return Served::Ended {
                    by: EndedBy::ClientProtocol,
                    writing: false,
                }
            }
        };
        writing.set(false);
        if res.is_err() {
            return Served::Ended {
                by: EndedBy::ServerIo,
                writing: true,
            };
        }
        if self.goodbye.get() && self.tracks.borrow().drained() {
            return Served::Ended {
                by: EndedBy::ClientClosed,
                writing: false,
            };
        }
        if !self.goodbye.get() && self.releasable(false) {
            return Served::Released;
        }
        let up = self.client_to_server(client, lent, &writing);
        let down = self.server_to_client(lent, client, &writing);
        let canceller = self.canceller(lent, &writing);
        let served = monoio::select! {
            s = up => s,
            s = down => s,
            s = canceller => s,
        };
        match served {
            Served::Ended { by, .. } => Served::Ended {
                by: self.tracks.borrow().attribute(by),
                writing: writing.get(),
            },
            released => released,
        }
    }

    /// Sends the client's cancels on to the lent connection, each once the
    /// one before was taken; the lend ends here when the transaction ended
    /// while one was on its way.
    async fn canceller(&self, lent: &Lent, writing: &Cell<bool>) -> Served {
        loop {
            self.cancels.wait().await;
            let requests = self.cancels.take();
            self.cancelling.set(true);
            self.cancel_running(&lent.state).await;
            self.cancelling.set(false);
            // Their requesters learn it was acted on.
            drop(requests);
            if !self.goodbye.get() && self.releasable(writing.get()) {
                return Served::Released;
            }
        }
    }

    /// Client to server while lent. Ends the lend when what the client
    /// sent needs no answer and leaves the session releasable (a lone
    /// Flush, say).
    async fn client_to_server(
        &self,
        client: &Client<'_>,
        lent: &Lent,
        writing: &Cell<bool>,
    ) -> Served {
        let ended = |by| Served::Ended { by, writing: false };
        let turn = Turn::new();
        let mut ticker: Option<std::pin::Pin<Box<monoio::time::Sleep>>> = None;
        loop {
            if self.goodbye.get() {
                // The other direction ends the session once all is
                // answered; what cannot be (an unsynced batch, a COPY the
                // client left) is cut after RESET_TIMEOUT and reset.
                // Boxed, as a rare wait: a timer is 640 bytes aligned to
                // 128, which every lend's future would otherwise carry.
                Box::pin(monoio::time::sleep(crate::server::reset::RESET_TIMEOUT)).await;
                return ended(EndedBy::ClientClosed);
            }
            // A client that sends faster than it reads the answers (many
            // answered by tollgate itself, which the server's backpressure
            // does not bound) waits until they are delivered.
            while self.expect.borrow().len() >= MAX_EXPECTED {
                self.queue_room.wait().await;
            }
            let res = match self.idle_transaction_timeout {
                None => turn.read(read_lent(client, &self.l.buffers)).await,
                Some(limit) => {
                    // Looked at every quarter of the limit: the status
                    // changes as the server answers. One timer per lend,
                    // boxed (as above), set again for each read.
                    let tick = (limit / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
                    let timer = ticker.get_or_insert_with(|| Box::pin(monoio::time::sleep(tick)));
                    loop {
                        timer.as_mut().reset(monoio::time::Instant::now() + tick);
                        let read = turn.read(read_lent(client, &self.l.buffers));
                        monoio::select! {
                            r = read => break r,
                            _ = timer.as_mut() => {}
                        }
                        if self.idle_in_transaction_for() >= limit {
                            let mut out = BytesMut::with_capacity(128);
                            ClientError::idle_in_transaction_timeout().encode(&mut out);
                            let _ = write_all(client, &out).await;
                            return ended(EndedBy::IdleInTransaction);
                        }
                    }
                }
            };
            self.idle_since.set(None);
            let (buf, n) = match res {
                Ok(Some(read)) => read,
                Ok(None) => return ended(EndedBy::ClientClosed),
                Err(_) => return ended(EndedBy::ClientIo),
            };
            let Some(forward) = self.saw_client(&buf[..n]) else {
                self.l.buffers.put(buf);
                return ended(EndedBy::ClientProtocol);
            };
            let out = self.rewrite(lent, &buf[..forward]);
            self.l.buffers.put(buf);
            let Some(out) = out else {
                return ended(EndedBy::ClientProtocol);
            };
            writing.set(true);
            let res = write_all(&lent.stream, &out).await;
            writing.set(false);
            self.l.buffers.put_scratch(out);
            if res.is_err() {
                return ended(EndedBy::ServerIo);
            }
            if self.goodbye.get() {
                if self.tracks.borrow().drained() {
                    return ended(EndedBy::ClientClosed);
                }
                continue;
            }
            if self.releasable(false) {
                return Served::Released;
            }
            turn.take().await;
        }
    }

    /// Server to client while lent, until the transaction ends (the lend
    /// is over), either side fails, or the session is ended from outside
    /// (at a message boundary, with a FATAL error to the client).
    async fn server_to_client(
        &self,
        lent: &Lent,
        client: &Client<'_>,
        writing: &Cell<bool>,
    ) -> Served {
        let ended = |by| Served::Ended { by, writing: false };
        let kill = &self.l.kill;
        let at_boundary = || self.tracks.borrow().server.at_boundary();
        let turn = Turn::new();
        let reason = loop {
            if let Some(reason) = kill.fired().filter(|_| at_boundary()) {
                break reason;
            }
            let read = turn.read(read_lent(&lent.stream, &self.l.buffers));
            let res = if at_boundary() {
                monoio::select! {
                    r = read => r,
                    reason = kill.wait() => break reason,
                    _ = self.answers_due.wait() => {
                        // tollgate's own answers, with nothing from the
                        // server before them.
                        if self.answer_due(client).await.is_err() {
                            return ended(EndedBy::ClientIo);
                        }
                        if self.releasable(writing.get()) && kill.fired().is_none() {
                            return Served::Released;
                        }
                        continue;
                    }
                }
            } else {
                read.await
            };
            let (buf, n) = match res {
                Ok(Some(read)) => read,
                Ok(None) => return ended(EndedBy::ServerClosed),
                Err(_) => return ended(EndedBy::ServerIo),
            };
            // After a kill, forward only up to the end of the message in flight.
            let n = match kill.fired() {
                Some(_) => self
                    .tracks
                    .borrow()
                    .server
                    .bytes_to_boundary(&buf[..n])
                    .unwrap_or(n),
                None => n,
            };
            if !self.saw_server(&buf[..n], &lent.state) {
                self.l.buffers.put(buf);
                return ended(EndedBy::ServerProtocol);
            }
            let res = self.relay_answers(client, &lent.state, &buf[..n]).await;
            self.l.buffers.put(buf);
            if res.is_err() {
                return ended(EndedBy::ClientIo);
            }
            if self.goodbye.get() && self.tracks.borrow().drained() {
                return ended(EndedBy::ClientClosed);
            }
            let idle_in_block = {
                let t = self.tracks.borrow();
                t.drained() && t.stats.status.get() != b'I'
            };
            if idle_in_block && self.idle_since.get().is_none() {
                self.idle_since.set(Some(Instant::now()));
            }
            self.settle_clears();
            if self.releasable(writing.get()) && kill.fired().is_none() {
                return Served::Released;
            }
            turn.take().await;
        };
        let _ = write_all(client, &session_ended(reason)).await;
        ended(EndedBy::Killed(reason))
    }

    /// The session ended while a connection was lent: a clean one goes
    /// straight back; otherwise its reset begins (what runs is cancelled
    /// first, when the client vanished mid-query), or it is closed when
    /// the server side failed.
    async fn end_lent(
        &self,
        client: &Client<'_>,
        lent: Lent,
        by: EndedBy,
        writing: bool,
    ) -> Outcome {
        let client_left = matches!(
            by,
            EndedBy::ClientClosed
                | EndedBy::ClientIo
                | EndedBy::Killed(_)
                | EndedBy::IdleInTransaction
        );
        if self.cancelling.get() {
            // A cancel was cut mid-send: it may still reach whatever the
            // connection runs next. Closed, never reused.
            return self.ended(by, Some((lent.state.into_inner(), None)));
        }
        if client_left && self.releasable(writing) {
            self.release(self.end_lend(lent)).await;
            return self.ended(by, None);
        }
        let said_goodbye = self.goodbye.get();
        let kept = reset_plan(
            Some(&self.l.reset_query),
            &self.tracks,
            by,
            (!writing, said_goodbye),
            true,
        );
        if let Some((plan, cancel, prologue)) = kept {
            if cancel {
                self.cancel_running(&lent.state).await;
            }
            let mut plan = plan;
            if write_all(&lent.stream, &prologue).await.is_err() {
                plan = crate::server::reset::Plan::Close("broken");
            }
            let Lent { stream, state, .. } = lent;
            let kept = Kept {
                server: stream.into_server_side(),
                plan,
                framer: self.tracks.borrow().server.clone(),
                leftover: BytesMut::new(),
            };
            return self.ended(by, Some((state.into_inner(), Some(kept))));
        }
        // The server side ended: tell whoever must be told, and close.
        let action = self.tracks.borrow().end_action(by);
        match action {
            EndAction::TellClient(bytes) => {
                let _ = write_all(client, &bytes).await;
            }
            EndAction::TellServer(bytes) => {
                let _ = write_all(&lent.stream, &bytes).await;
            }
            EndAction::Abandon => self.cancel_running(&lent.state).await,
            EndAction::Nothing => {}
        }
        self.ended(by, Some((lent.state.into_inner(), None)))
    }

    /// Cancels what runs on a lent connection whose client vanished.
    async fn cancel_running(&self, state: &RefCell<Box<ConnState>>) {
        // Not borrowed across the send: the relay notes parameters on it.
        let (key, route) = {
            let state = state.borrow();
            (state.upstream_key.clone(), state.route.clone())
        };
        let Some(key) = key else {
            return;
        };
        // Boxed: a connection of its own (TLS included) makes a large
        // future, which every session would otherwise carry.
        let send = Box::pin(crate::upstream::send_cancel(
            &route.config,
            route.tls.as_deref(),
            &key,
        ));
        match send.await {
            Ok(()) => debug!("query of a departed client cancelled"),
            Err(e) => warn!(error = %e, "could not cancel a departed client's query"),
        }
    }

    fn ended(&self, by: EndedBy, held: Option<(Box<ConnState>, Option<Kept>)>) -> Outcome {
        // Cancels still waiting find no query of this client's running.
        drop(self.cancels.take());
        Outcome { by, held }
    }
}

async fn read_lent(
    from: &impl Wire,
    pool: &BufferPool,
) -> std::io::Result<Option<(Vec<u8>, usize)>> {
    from.read_lent(pool).await
}

async fn write_all(to: &impl Wire, bytes: &[u8]) -> std::io::Result<()> {
    to.write_all(bytes).await
}

/// Either end of the transaction relay, the client or a lent server
/// connection: a plain socket, or TLS with tollgate's record layer. Either
/// waits holding no buffer.
pub(in crate::session) enum Link {
    Plain(ReadyStream),
    /// Boxed as the pool keeps it, so lending moves a pointer.
    Tls(Box<TlsStream>),
}

/// The client's end of the transaction relay: its link, and the wait for
/// its next bytes, which stays posted between transactions.
struct Client<'a> {
    link: &'a Link,
    standing: &'a dyn Readable,
}

impl Wire for Client<'_> {
    async fn read_lent(&self, pool: &BufferPool) -> std::io::Result<Option<(Vec<u8>, usize)>> {
        self.link.read_lent_on(pool, self.standing).await
    }

    async fn write_all(&self, bytes: &[u8]) -> std::io::Result<()> {
        self.link.write_all(bytes).await
    }
}

impl Link {
    /// The socket under it.
    fn socket(&self) -> &ReadyStream {
        match self {
            Link::Plain(s) => s,
            Link::Tls(s) => s.socket(),
        }
    }

    /// As [`Wire::read_lent`], waiting for the socket on `standing`.
    async fn read_lent_on(
        &self,
        pool: &BufferPool,
        standing: &dyn Readable,
    ) -> std::io::Result<Option<(Vec<u8>, usize)>> {
        match self {
            Link::Plain(s) => {
                let (buf, n) = s
                    .read_with(|| pool.take(), |b| pool.put(b), Some(standing))
                    .await?;
                if n == 0 {
                    pool.put(buf);
                    return Ok(None);
                }
                Ok(Some((buf, n)))
            }
            Link::Tls(s) => s.read_lent_on(Some(standing)).await,
        }
    }

    fn from_upstream(stream: UpstreamStream) -> Link {
        match stream {
            UpstreamStream::Plain(s) => Link::Plain(ReadyStream::new(s)),
            UpstreamStream::Tls(s) => Link::Tls(s),
        }
    }

    fn into_upstream(self) -> UpstreamStream {
        match self {
            Link::Plain(s) => UpstreamStream::Plain(s.into_inner()),
            Link::Tls(s) => UpstreamStream::Tls(s),
        }
    }

    fn into_server_side(self) -> ServerSide {
        match self {
            Link::Plain(s) => ServerSide::Plain(s.into_inner()),
            Link::Tls(s) => ServerSide::Tls(s),
        }
    }
}

impl Wire for Link {
    async fn read_lent(&self, pool: &BufferPool) -> std::io::Result<Option<(Vec<u8>, usize)>> {
        match self {
            Link::Plain(s) => s.read_lent(pool).await,
            Link::Tls(s) => s.read_lent().await,
        }
    }

    async fn write_all(&self, bytes: &[u8]) -> std::io::Result<()> {
        match self {
            Link::Plain(s) => s.write_all(bytes).await,
            Link::Tls(s) => s.write_all(bytes).await,
        }
    }

    fn goodbye(&self) {
        if let Link::Tls(s) = self {
            s.close();
        }
    }
}

/// Answers expected at most before the client is read again.
const MAX_EXPECTED: usize = 4096;

/// Parameters the server reports about itself, not about the session
/// (a standby promoted, say): no client set them.
const SERVER_STATE: [&str; 2] = ["in_hot_standby", "default_transaction_read_only"];

/// A one-shot wake-up between the two directions of a lend.
#[derive(Default)]
struct Flag {
    raised: Cell<bool>,
    waker: RefCell<Option<std::task::Waker>>,
}

impl Flag {
    fn raise(&self) {
        self.raised.set(true);
        if let Some(w) = self.waker.borrow_mut().take() {
            w.wake();
        }
    }

    /// Resolves once raised, lowering it.
    async fn wait(&self) {
        std::future::poll_fn(|cx| {
            if self.raised.take() {
                std::task::Poll::Ready(())
            } else {
                crate::io_util::remember_waker(&mut self.waker.borrow_mut(), cx.waker());
                std::task::Poll::Pending
            }
        })
        .await
    }
}
