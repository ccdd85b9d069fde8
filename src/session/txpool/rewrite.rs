//! The client's messages as a lent connection gets them: everything
//! passes through as sent, except what names a prepared statement.
//!
//! A client's named statement is kept by tollgate (its name, its SQL and
//! parameter types) and lives on the servers under a name derived from its
//! content (`tg_` and 32 hex digits of a SHA-256), shared by every client
//! that prepares the same. So:
//!
//! - Parse of a name is forwarded under the content name, or, when the
//!   connection already holds it, not forwarded and answered by tollgate;
//! - Bind and Describe of a name are forwarded under the content name,
//!   after a Parse of it (answer hidden) when the connection lacks it;
//! - Close of a name only forgets it (shared statements stay), answered
//!   by tollgate.
//!
//! Each Parse tollgate adds is preceded by a Close of the same name
//! (answer hidden; closing a statement that does not exist is no error),
//! so that what tollgate believes a connection holds can never make a
//! Parse fail. The unnamed statement is the client's own too: before the
//! first Bind or Describe of it on a lent connection that has not seen the
//! client's Parse of it, the client's last one is replayed (or the
//! connection's is closed, so that no other client's can be bound).
//!
//! <https://www.postgresql.org/docs/current/protocol-message-formats.html>

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::rc::Rc;

use super::expect::{Expect, Expectations, Kind, Previous, Undo};
use super::pin::{Found, PinScan};
use crate::server::statements::StatementCache;

/// Longest client message tollgate holds whole to rewrite (Parse, Bind,
/// Describe, Close): Postgres's own limit for a message,
/// `PQ_LARGE_MESSAGE_LIMIT` (src/include/libpq/libpq.h).
const MAX_HELD_MESSAGE: usize = 0x3fff_ffff;

/// Longest start of a Bind held for its two names before it is held
/// whole after all (names that long are pathological: Postgres looks
/// statements up by their first 63 bytes).
const MAX_BIND_PREFIX: usize = 64 * 1024;

/// A client's named statement.
pub struct Prepared {
    /// The name on the servers.
    pub name: Rc<[u8]>,
    /// Its Parse under that name, whole.
    pub parse: Box<[u8]>,
    /// What its text pins ([`super::pin`]): found again at each Bind, as
    /// each execution makes the state again (a client unpinned since its
    /// Parse is pinned again).
    pub pins: Found,
}

impl Prepared {
    /// `def` is the Parse's body after the client's name: the SQL text,
    /// then the parameter types.
    fn new(name: Rc<[u8]>, def: &[u8]) -> Prepared {
        let mut parse = Vec::with_capacity(5 + name.len() + 1 + def.len());
        put_message(&mut parse, b'P', &[&name, &[0], def]);
        let sql = cstr(def).map_or(def, |(sql, _)| sql);
        Prepared {
            name,
            parse: parse.into(),
            pins: PinScan::statement(sql),
        }
    }
}

/// The counts a rewrite adds to, per shard and upstream.
#[derive(Debug, Default, Clone, Copy)]
pub struct StatementCounts {
    /// Uses of a statement the connection held.
    pub hits: u64,
    /// Parses sent because the connection did not hold it.
    pub misses: u64,
    /// Statements closed to stay under `max_prepared_statements`.
    pub evictions: u64,
}

/// What one rewrite works on besides the client's bytes.
pub struct Lend<'a> {
    pub cache: &'a mut StatementCache,
    pub expect: &'a mut Expectations,
    pub capacity: usize,
    pub counts: &'a mut StatementCounts,
    /// In: the server is in copy-in mode (an Execute started COPY FROM
    /// STDIN); out: until the client's CopyDone or CopyFail.
    pub copy_in: bool,
    /// Syncs sent in copy-in mode, which the server ignores.
    pub syncs_ignored: u64,
    /// The client sent Terminate (never forwarded).
    pub terminated: bool,
    /// The session is in a failed transaction block: Postgres refuses a
    /// Parse there (25P02), so none is answered by tollgate.
    pub aborted: bool,
    /// Out: what the statements bound pin.
    pub pins: Found,
}

/// A corrupt client stream.
#[derive(Debug)]
pub struct Malformed;

/// One client's statements, and its messages in flight.
#[derive(Default)]
pub struct Rewriter {
    header: [u8; 5],
    header_len: usize,
    tag: u8,
    /// Payload bytes of the current message still to come.
    remaining: usize,
    /// The current message is held whole (`held`) rather than streamed.
    holding: bool,
    held: Vec<u8>,
    statements: HashMap<Box<[u8]>, Rc<Prepared>>,
    /// The client's last Parse of the unnamed statement, whole.
    unnamed: Option<Box<[u8]>>,
    /// The lent connection has the client's unnamed statement (or none).
    unnamed_here: bool,
    /// The statement of the last Bind, for the Execute that follows.
    last_bind: Option<Rc<[u8]>>,
    /// Of the Bind being held: how many of its two names have ended.
    bind_nuls: u8,
    /// Syncs (and simple Queries and FunctionCalls, which end a cycle as
    /// well) sent on the lent connection: the extended-query cycle the
    /// next message belongs to.
    cycle: u64,
}

fn cstr(b: &[u8]) -> Option<(&[u8], &[u8])> {
    let i = memchr::memchr(0, b)?;
    Some((&b[..i], &b[i + 1..]))
}

/// The first message of `b` if it is whole there: its tag, its payload,
/// and what follows it.
fn whole_message(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = b.split_first()?;
    let len = rest.get(..4)?;
    let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
    if len < 4 || len > rest.len() {
        return None;
    }
    Some((tag, &rest[4..len], &rest[len..]))
}

fn put_message(out: &mut Vec<u8>, tag: u8, parts: &[&[u8]]) {
    let len: usize = 4 + parts.iter().map(|p| p.len()).sum::<usize>();
    out.push(tag);
    out.extend_from_slice(&(len as i32).to_be_bytes());
    for p in parts {
        out.extend_from_slice(p);
    }
}

/// The content name of a statement: `tg_` and 32 hex digits of the
/// SHA-256 of its SQL and parameter types (what follows the name in its
/// Parse).
fn content_name(rest: &[u8]) -> Rc<[u8]> {
    let d = ring::digest::digest(&ring::digest::SHA256, rest);
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut name = Vec::with_capacity(35);
    name.extend_from_slice(b"tg_");
    for b in &d.as_ref()[..16] {
        name.push(HEX[usize::from(b >> 4)]);
        name.push(HEX[usize::from(b & 15)]);
    }
    name.into()
}

impl Rewriter {
    /// A new lend begins: the connection has none of the client's unnamed
    /// statement.
    pub fn new_lend(&mut self) {
        self.unnamed_here = false;
        self.last_bind = None;
        self.cycle = 0;
    }

    /// Puts a statement name back as it was before a Parse or Close the
    /// server skipped or refused.
    pub fn undo(&mut self, u: Undo) {
        match u.previous {
            Previous::Named {
                name,
                prepared: Some(p),
            } => {
                self.statements.insert(name, p);
            }
            Previous::Named {
                name,
                prepared: None,
            } => {
                self.statements.remove(&name);
            }
            // Postgres drops the unnamed statement before it parses the
            // new one: a failed Parse leaves none, here and for the client.
            Previous::Unnamed { .. } if u.failed => {
                self.unnamed = None;
                self.unnamed_here = true;
            }
            Previous::Unnamed { parse, here } => {
                self.unnamed = parse;
                self.unnamed_here = here;
            }
        }
    }

    /// The client dropped all its statements (`DEALLOCATE ALL`, `DISCARD
    /// ALL`).
    pub fn forget_all(&mut self) {
        self.statements.clear();
        self.unnamed = None;
    }

    /// Answers, without a server, a cycle sent between transactions that
    /// needs none: Parses of named statements a server with the client's
    /// key has already accepted (`vetted`, by server-side name), Closes,
    /// Flushes, ending with a Sync, all whole in `chunk`. This is what
    /// `PQprepare` and `PQsendPrepare` send: a client that prepares a
    /// known statement needs no connection for it, so a thread that
    /// prepares synchronously for one of its clients while others hold
    /// connections does not wait on them. Returns how many Parses it
    /// answered (into `out`, with the statements noted), or `None` with
    /// nothing changed.
    pub fn answer_alone(
        &mut self,
        chunk: &[u8],
        vetted: impl Fn(&[u8]) -> bool,
        out: &mut Vec<u8>,
    ) -> Option<u64> {
        if self.remaining != 0 || self.holding || self.header_len != 0 {
            return None;
        }
        let mut prepared = Vec::new();
        let mut rest = chunk;
        let mut last = 0;
        while !rest.is_empty() {
            let (tag, body, after) = whole_message(rest)?;
            match tag {
                b'P' => {
                    let (name, def) = cstr(body).filter(|(n, _)| !n.is_empty())?;
                    let server = content_name(def);
                    if !vetted(&server) {
                        return None;
                    }
                    prepared.push((name, server, def));
                }
                // Whole and nothing more, or Postgres would refuse it (08P01).
                b'C' if matches!(body.first(), Some(b'S' | b'P'))
                    && cstr(&body[1..]).is_some_and(|(_, rest)| rest.is_empty()) => {}
                b'H' | b'S' if body.is_empty() => {}
                _ => return None,
            }
            last = tag;
            rest = after;
        }
        if last != b'S' {
            return None;
        }
        let parses = prepared.len() as u64;
        let mut prepared = prepared.into_iter();
        rest = chunk;
        while let Some((tag, body, after)) = whole_message(rest) {
            match tag {
                b'P' => {
                    let Some((name, server, def)) = prepared.next() else {
                        break;
                    };
                    let p = Rc::new(Prepared::new(server, def));
                    self.statements.insert(name.into(), p);
                    put_message(out, b'1', &[]);
                }
                b'C' => {
                    if let Some((name, _)) = cstr(&body[1..]).filter(|_| body[0] == b'S') {
                        if name.is_empty() {
                            self.unnamed = None;
                        } else {
                            self.statements.remove(name);
                        }
                    }
                    put_message(out, b'3', &[]);
                }
                b'S' => put_message(out, b'Z', &[b"I"]),
                _ => {}
            }
            rest = after;
        }
        Some(parses)
    }

    /// Rewrites client bytes into `out` for the lent connection, noting
    /// the answers to expect.
    pub fn feed(
        &mut self,
        mut chunk: &[u8],
        lend: &mut Lend<'_>,
        out: &mut Vec<u8>,
    ) -> Result<(), Malformed> {
        while !chunk.is_empty() {
            if self.remaining == 0 && !self.holding {
                // A header.
                let take = (5 - self.header_len).min(chunk.len());
                self.header[self.header_len..self.header_len + take]
                    .copy_from_slice(&chunk[..take]);
                self.header_len += take;
                chunk = &chunk[take..];
                if self.header_len < 5 {
                    return Ok(());
                }
                self.header_len = 0;
                let tag = self.header[0];
                let len = i32::from_be_bytes([
                    self.header[1],
                    self.header[2],
                    self.header[3],
                    self.header[4],
                ]);
                if len < 4 || len as usize > MAX_HELD_MESSAGE {
                    return Err(Malformed);
                }
                self.tag = tag;
                self.remaining = len as usize - 4;
                if matches!(tag, b'P' | b'B' | b'D' | b'C') {
                    self.bind_nuls = 0;
                    self.holding = true;
                    self.held.clear();
                    self.held.extend_from_slice(&self.header);
                } else if tag == b'X' {
                    // Wherever it falls: the server connection outlives
                    // the client. Its payload (none is valid) is dropped.
                    lend.terminated = true;
                    self.holding = true;
                    self.held.clear();
                    self.held.extend_from_slice(&self.header);
                } else {
                    self.started(tag, lend);
                    out.extend_from_slice(&self.header);
                }
                if self.remaining == 0 && self.holding {
                    self.complete(lend, out)?;
                }
                continue;
            }
            let mut take = self.remaining.min(chunk.len());
            let mut names_in = false;
            if self.holding && self.tag == b'B' && self.bind_nuls < 2 {
                // A Bind is held only up to the end of its two names
                // (each byte looked at once): what follows may stream.
                for i in memchr::memchr_iter(0, &chunk[..take]) {
                    self.bind_nuls += 1;
                    if self.bind_nuls == 2 {
                        take = i + 1;
                        names_in = true;
                        break;
                    }
                }
            }
            if self.holding {
                self.held.extend_from_slice(&chunk[..take]);
            } else {
                out.extend_from_slice(&chunk[..take]);
            }
            self.remaining -= take;
            chunk = &chunk[take..];
            if self.remaining == 0 && self.holding {
                self.complete(lend, out)?;
            } else if names_in && self.held.len() <= MAX_BIND_PREFIX {
                self.stream_bind(lend, out);
            }
        }
        Ok(())
    }

    /// Of a Bind still arriving, whose portal and statement names are in
    /// (`held` ends with them): what follows them (the parameters, which
    /// may be as long as a message can be) is streamed rather than held,
    /// so a large Bind costs no more memory than any other message. Only
    /// the statement name is rewritten; the length field changes by its
    /// difference.
    fn stream_bind(&mut self, lend: &mut Lend<'_>, out: &mut Vec<u8>) {
        let body = &self.held[5..];
        let (Some(portal_len), Some(stmt_end)) =
            (memchr::memchr(0, body), memchr::memrchr(0, body))
        else {
            return;
        };
        let stmt_len = stmt_end - portal_len - 1;
        let held = std::mem::take(&mut self.held);
        let portal = &held[5..5 + portal_len];
        let stmt_at = 5 + portal_len + 1;
        let stmt = &held[stmt_at..stmt_at + stmt_len];
        let names_end = stmt_at + stmt_len + 1;
        let server = self.use_statement(stmt, true, lend, out);
        match &server {
            Some(s) => {
                let len = i32::from_be_bytes([held[1], held[2], held[3], held[4]]) as usize;
                // At most MAX_HELD_MESSAGE less a name plus a content name.
                let len = len - stmt.len() + s.len();
                out.push(b'B');
                out.extend_from_slice(&(len as i32).to_be_bytes());
                out.extend_from_slice(portal);
                out.push(0);
                out.extend_from_slice(s);
                out.push(0);
            }
            None => out.extend_from_slice(&held[..names_end]),
        }
        out.extend_from_slice(&held[names_end..]);
        self.last_bind = server.clone();
        lend.expect.server(Kind::Bind, true, server);
        self.holding = false;
        self.held = held;
        self.held.clear();
    }

    /// A streamed message starts: its answers are expected.
    fn started(&mut self, tag: u8, lend: &mut Lend<'_>) {
        match tag {
            b'E' => lend
                .expect
                .server(Kind::Execute, true, self.last_bind.clone()),
            b'Q' => {
                // A simple Query drops the unnamed statement (Postgres's
                // exec_simple_query), on the lent connection and so for
                // the client.
                self.unnamed = None;
                self.unnamed_here = true;
                self.cycle += 1;
                lend.expect.server(Kind::Sync, true, None);
            }
            // A Sync ends a cycle: what follows is not skipped for an
            // error before it. A Query or FunctionCall is counted too,
            // though Postgres skips them as well after an extended-query
            // error: counting a cycle too many only prepares again.
            b'S' | b'F' => {
                self.cycle += 1;
                lend.expect.server(Kind::Sync, true, None);
            }
            // Flush, CopyData, CopyDone, CopyFail: no answer of their own.
            _ => {}
        }
    }

    /// A held message is whole: forwarded, rewritten, or answered here.
    fn complete(&mut self, lend: &mut Lend<'_>, out: &mut Vec<u8>) -> Result<(), Malformed> {
        self.holding = false;
        if self.held.first() == Some(&b'X') {
            return Ok(());
        }
        let msg = std::mem::take(&mut self.held);
        let res = self.rewrite(&msg, lend, out);
        self.held = msg;
        // A large Bind is not kept for the session's life.
        if self.held.capacity() > 64 * 1024 {
            self.held = Vec::new();
        }
        res
    }

    fn rewrite(
        &mut self,
        msg: &[u8],
        lend: &mut Lend<'_>,
        out: &mut Vec<u8>,
    ) -> Result<(), Malformed> {
        let tag = msg[0];
        let body = &msg[5..];
        match tag {
            b'P' => {
                let (name, rest) = cstr(body).ok_or(Malformed)?;
                if name.is_empty() {
                    let previous = Previous::Unnamed {
                        parse: self.unnamed.replace(msg.into()),
                        here: std::mem::replace(&mut self.unnamed_here, true),
                    };
                    out.extend_from_slice(msg);
                    lend.expect.server(Kind::Parse, true, None);
                    lend.expect
                        .push(Expect::Undo(Box::new(Undo::new(previous))));
                    return Ok(());
                }
                let prepared = Rc::new(Prepared::new(content_name(rest), rest));
                // A name prepared again replaces the old one (where
                // Postgres would refuse it: drivers never do this).
                let previous = self.statements.insert(name.into(), prepared.clone());
                // Answered here only when Postgres would surely accept it:
                // not in a failed block, nor behind a cycle that may fail one.
                if lend.cache.usable(&prepared.name, self.cycle)
                    && !lend.aborted
                    && !lend.expect.cycle_unanswered()
                {
                    lend.counts.hits += 1;
                    lend.expect.push(Expect::Own(b'1'));
                } else {
                    self.send_parse(&prepared, true, lend, out);
                }
                lend.expect
                    .push(Expect::Undo(Box::new(Undo::new(Previous::Named {
                        name: name.into(),
                        prepared: previous,
                    }))));
            }
            b'B' => {
                let (portal, rest) = cstr(body).ok_or(Malformed)?;
                let (stmt, rest) = cstr(rest).ok_or(Malformed)?;
                let server = self.use_statement(stmt, true, lend, out);
                match &server {
                    Some(s) => put_message(out, b'B', &[portal, &[0], s, &[0], rest]),
                    None => out.extend_from_slice(msg),
                }
                self.last_bind = server.clone();
                lend.expect.server(Kind::Bind, true, server);
            }
            b'D' => {
                let (&kind, rest) = body.split_first().ok_or(Malformed)?;
                let (name, _) = cstr(rest).ok_or(Malformed)?;
                if kind == b'S' {
                    let server = self.use_statement(name, false, lend, out);
                    match &server {
                        Some(s) => put_message(out, b'D', &[b"S", s, &[0]]),
                        None => out.extend_from_slice(msg),
                    }
                    lend.expect.server(Kind::DescribeStatement, true, server);
                } else {
                    out.extend_from_slice(msg);
                    lend.expect.server(Kind::DescribePortal, true, None);
                }
            }
            b'C' => {
                let (&kind, rest) = body.split_first().ok_or(Malformed)?;
                let (name, _) = cstr(rest).ok_or(Malformed)?;
                if kind == b'S' && !name.is_empty() {
                    // Shared on the server: only the client's name goes.
                    let previous = self.statements.remove(name);
                    lend.expect.push(Expect::Own(b'3'));
                    lend.expect
                        .push(Expect::Undo(Box::new(Undo::new(Previous::Named {
                            name: name.into(),
                            prepared: previous,
                        }))));
                } else {
                    out.extend_from_slice(msg);
                    lend.expect.server(Kind::Close, true, None);
                    if kind == b'S' {
                        // The connection's unnamed statement goes, whoever's
                        // it was: it now has the client's (none).
                        let previous = Previous::Unnamed {
                            parse: self.unnamed.take(),
                            here: std::mem::replace(&mut self.unnamed_here, true),
                        };
                        lend.expect
                            .push(Expect::Undo(Box::new(Undo::new(previous))));
                    }
                }
            }
            _ => return Err(Malformed),
        }
        Ok(())
    }

    /// Readies the statement a Bind (`binding`) or Describe names on the
    /// lent connection: its content name for a named one the client
    /// prepared (`None`: unnamed, or a name the client never prepared,
    /// which goes through as sent for the server to refuse). A Bind of a
    /// named statement whose text pins notes its pins: it runs again. (The
    /// unnamed statement needs none: its Parse was scanned as it came,
    /// and the simple Query that alone clears pins drops it.)
    fn use_statement(
        &mut self,
        name: &[u8],
        binding: bool,
        lend: &mut Lend<'_>,
        out: &mut Vec<u8>,
    ) -> Option<Rc<[u8]>> {
        if name.is_empty() {
            // What put the client's statement on the connection may still
            // be skipped, in an earlier cycle of the pipeline whose
            // answers have not come: then a later cycle cannot count on
            // it, or it could run another client's.
            if !self.unnamed_here || lend.expect.unnamed_in_doubt() {
                match &self.unnamed {
                    Some(parse) => {
                        out.extend_from_slice(parse);
                        lend.expect.server(Kind::Parse, false, None);
                    }
                    None => {
                        put_message(out, b'C', &[b"S", &[0]]);
                        lend.expect.server(Kind::Close, false, None);
                    }
                }
                // Skipped (an error earlier in the pipeline), the replay
                // leaves the connection with whatever it had: replayed
                // again on the next use.
                let previous = Previous::Unnamed {
                    parse: self.unnamed.clone(),
                    here: false,
                };
                lend.expect
                    .push(Expect::Undo(Box::new(Undo::new(previous))));
                self.unnamed_here = true;
            }
            return None;
        }
        let prepared = self.statements.get(name)?.clone();
        if binding {
            lend.pins = lend.pins.merge(prepared.pins);
        }
        if lend.cache.usable(&prepared.name, self.cycle) {
            lend.counts.hits += 1;
        } else {
            self.send_parse(&prepared, false, lend, out);
        }
        Some(prepared.name.clone())
    }

    /// Prepares a statement on the lent connection: a Close of whatever
    /// the connection had under its name first (and of the least recently
    /// used one, beyond the cache's capacity), answers hidden.
    fn send_parse(&mut self, p: &Prepared, show: bool, lend: &mut Lend<'_>, out: &mut Vec<u8>) {
        lend.counts.misses += 1;
        if let Some(old) = lend
            .cache
            .parsing(p.name.clone(), self.cycle, lend.capacity)
        {
            lend.counts.evictions += 1;
            put_message(out, b'C', &[b"S", &old, &[0]]);
            lend.expect.server(Kind::Close, false, None);
        }
        put_message(out, b'C', &[b"S", &p.name, &[0]]);
        lend.expect.server(Kind::Close, false, None);
        out.extend_from_slice(&p.parse);
        lend.expect.server(Kind::Parse, show, Some(p.name.clone()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::frame::test_message as msg;

    struct World {
        cache: StatementCache,
        expect: Expectations,
        counts: StatementCounts,
    }

    impl World {
        fn new() -> Self {
            World {
                cache: StatementCache::default(),
                expect: Expectations::default(),
                counts: StatementCounts::default(),
            }
        }

        fn feed(&mut self, r: &mut Rewriter, bytes: &[u8]) -> Vec<u8> {
            // Split anywhere: the result is the same.
            self.feed_in(r, bytes, 3)
        }

        fn feed_in(&mut self, r: &mut Rewriter, bytes: &[u8], piece: usize) -> Vec<u8> {
            let mut out = Vec::new();
            let mut lend = Lend {
                cache: &mut self.cache,
                expect: &mut self.expect,
                capacity: 2,
                counts: &mut self.counts,
                copy_in: false,
                syncs_ignored: 0,
                terminated: false,
                aborted: false,
                pins: Found::default(),
            };
            for c in bytes.chunks(piece) {
                r.feed(c, &mut lend, &mut out).unwrap();
            }
            out
        }

        fn tags(mut out: &[u8]) -> Vec<(u8, Vec<u8>)> {
            let mut msgs = Vec::new();
            while !out.is_empty() {
                let len = i32::from_be_bytes([out[1], out[2], out[3], out[4]]) as usize;
                msgs.push((out[0], out[5..1 + len].to_vec()));
                out = &out[1 + len..];
            }
            msgs
        }
    }

    fn parse(name: &str, sql: &str) -> Vec<u8> {
        msg(
            b'P',
            &[name.as_bytes(), b"\0", sql.as_bytes(), b"\0\0\0"].concat(),
        )
    }

    fn bind(stmt: &str) -> Vec<u8> {
        msg(b'B', &[b"\0", stmt.as_bytes(), b"\0\0\0\0\0\0\0"].concat())
    }

    #[test]
    fn a_named_statement_is_prepared_once_per_connection_under_its_content_name() {
        let mut w = World::new();
        let mut a = Rewriter::default();
        let out = w.feed(
            &mut a,
            &[
                parse("s1", "select 1"),
                bind("s1"),
                msg(b'E', b"\0\0\0\0\0"),
                msg(b'S', b""),
            ]
            .concat(),
        );
        let tags: Vec<u8> = World::tags(&out).iter().map(|m| m.0).collect();
        // Close (hidden), Parse, Bind, Execute, Sync.
        assert_eq!(tags, b"CPBES");
        let name = content_name(b"select 1\0\0\0");
        assert!(out.windows(name.len()).any(|w| w == &name[..]));
        assert!(
            !out.windows(3).any(|w| w == b"s1\0"),
            "the client's name never reaches the server"
        );
        // Another client, same SQL, same connection: nothing to prepare.
        let mut b = Rewriter::default();
        w.expect.clear();
        let out = w.feed(
            &mut b,
            &[parse("other", "select 1"), bind("other"), msg(b'S', b"")].concat(),
        );
        let tags: Vec<u8> = World::tags(&out).iter().map(|m| m.0).collect();
        assert_eq!(tags, b"BS");
        assert_eq!(w.expect.pop(), Some(Expect::Own(b'1')));
        // The first Bind, the second Parse and its Bind.
        assert_eq!(w.counts.hits, 3);
    }

    /// A Parse of a statement the connection holds is answered here only
    /// when no earlier cycle is unanswered: one that fails a transaction
    /// block makes Postgres refuse the Parse (25P02), so it goes to the
    /// server.
    #[test]
    fn a_parse_behind_an_unanswered_cycle_goes_to_the_server() {
        let mut w = World::new();
        let mut a = Rewriter::default();
        w.feed(&mut a, &[parse("s1", "select 1"), msg(b'S', b"")].concat());
        let name = content_name(b"select 1\0\0\0");
        w.cache.prepared(&name);
        w.expect.clear();
        let out = w.feed(
            &mut a,
            &[
                bind("s1"),
                msg(b'E', b"\0\0\0\0\0"),
                msg(b'S', b""),
                parse("s2", "select 1"),
                msg(b'S', b""),
            ]
            .concat(),
        );
        let tags: Vec<u8> = World::tags(&out).iter().map(|m| m.0).collect();
        assert_eq!(tags, b"BESCPS");
        // Nothing unanswered: answered here.
        w.expect.clear();
        w.cache.prepared(&name);
        let out = w.feed(&mut a, &[parse("s3", "select 1"), msg(b'S', b"")].concat());
        let tags: Vec<u8> = World::tags(&out).iter().map(|m| m.0).collect();
        assert_eq!(tags, b"S");
    }

    /// A Bind's parameters are streamed once its names are in: a 1 MB
    /// Bind in pieces of any size leaves nothing large held, and comes
    /// out the same, its statement name rewritten and its parameters
    /// untouched.
    #[test]
    fn a_long_bind_is_streamed_and_rewritten_as_a_whole_one() {
        let value = vec![b'v'; 1 << 20];
        let mut params = vec![0, 0, 0, 1];
        params.extend_from_slice(&(value.len() as i32).to_be_bytes());
        params.extend_from_slice(&value);
        params.extend_from_slice(&[0, 0]);
        let long_bind = |stmt: &str| {
            msg(
                b'B',
                &[b"p\0", stmt.as_bytes(), b"\0\0\0", &params[..]].concat(),
            )
        };
        let input = [
            parse("s1", "select $1::text"),
            long_bind("s1"),
            long_bind(""),
            msg(b'E', b"p\0\0\0\0\0"),
            msg(b'S', b""),
        ]
        .concat();
        let mut whole = World::new();
        let mut a = Rewriter::default();
        let expected = whole.feed_in(&mut a, &input, input.len());
        let mut got = Vec::new();
        // Small reads, and reads far longer than the names (a large
        // buffer_size): either way only the names are held.
        for piece in [3, 16 * 1024, 512 * 1024] {
            let mut pieces = World::new();
            let mut b = Rewriter::default();
            got = pieces.feed_in(&mut b, &input[..input.len() - 6], piece);
            assert!(
                b.held.capacity() <= 64 * 1024,
                "{piece}: {}",
                b.held.capacity()
            );
            got.extend(pieces.feed_in(&mut b, &input[input.len() - 6..], piece));
            assert!(got == expected, "{piece}: streamed and whole Binds differ");
        }
        let tags: Vec<u8> = World::tags(&got).iter().map(|m| m.0).collect();
        // The unnamed statement is the client's own (none): closed first.
        assert_eq!(tags, b"CPBCBES");
        let binds: Vec<_> = World::tags(&got)
            .into_iter()
            .filter(|m| m.0 == b'B')
            .collect();
        let name = content_name(b"select $1::text\0\0\0");
        assert!(binds[0].1.starts_with(&[b"p\0", &name[..], b"\0"].concat()));
        assert!(binds[1].1.starts_with(b"p\0\0"));
        assert!(binds.iter().all(|b| b.1.ends_with(&params)));
    }

    #[test]
    fn a_statement_missing_on_the_lent_connection_is_prepared_hidden_and_close_answered_here() {
        let mut w = World::new();
        let mut a = Rewriter::default();
        w.feed(&mut a, &parse("s1", "select 2"));
        // Next lend: another connection, with nothing.
        w.cache = StatementCache::default();
        w.expect.clear();
        a.new_lend();
        let out = w.feed(
            &mut a,
            &[bind("s1"), msg(b'C', b"Ss1\0"), msg(b'S', b"")].concat(),
        );
        let tags: Vec<u8> = World::tags(&out).iter().map(|m| m.0).collect();
        assert_eq!(tags, b"CPBS");
        let shown: Vec<bool> = std::iter::from_fn(|| w.expect.pop())
            .map(|e| match e {
                Expect::Server { show, .. } => show,
                Expect::Own(t) => {
                    assert_eq!(t, b'3');
                    true
                }
                Expect::Undo(_) => unreachable!("pop settles undo records"),
            })
            .collect();
        assert_eq!(shown, [false, false, true, true, true]);
        // Closed: the name means nothing now.
        let out = w.feed(&mut a, &bind("s1"));
        assert!(
            out.windows(3).any(|w| w == b"s1\0"),
            "passed through for the server to refuse"
        );
    }

    #[test]
    fn the_unnamed_statement_is_replayed_or_closed_on_a_new_connection() {
        let mut w = World::new();
        let mut a = Rewriter::default();
        a.new_lend();
        let out = w.feed(&mut a, &bind(""));
        let tags: Vec<u8> = World::tags(&out).iter().map(|m| m.0).collect();
        assert_eq!(
            tags, b"CB",
            "no Parse of its own: the connection's is closed"
        );
        a.new_lend();
        w.feed(&mut a, &parse("", "select 3"));
        a.new_lend();
        let out = w.feed(&mut a, &[bind(""), bind("")].concat());
        let tags: Vec<u8> = World::tags(&out).iter().map(|m| m.0).collect();
        assert_eq!(tags, b"PBB", "replayed once per lend");
    }

    #[test]
    fn a_prepare_of_a_vetted_statement_between_transactions_needs_no_server() {
        let mut a = Rewriter::default();
        let known = content_name(b"select 4\0\0\0");
        let vetted = |n: &[u8]| n == &known[..];
        // PQprepare: Parse and Sync; then a Close, a Flush and a Sync.
        let mut out = Vec::new();
        let cycle = [
            parse("s4", "select 4"),
            msg(b'S', b""),
            msg(b'C', b"Sgone\0"),
            msg(b'H', b""),
            msg(b'S', b""),
        ]
        .concat();
        assert_eq!(a.answer_alone(&cycle, vetted, &mut out), Some(1));
        let tags: Vec<u8> = World::tags(&out).iter().map(|m| m.0).collect();
        assert_eq!(tags, b"1Z3Z");
        assert!(World::tags(&out)
            .iter()
            .all(|(t, body)| (*t == b'Z') == (body == b"I")));
        // The name is the client's now: its Bind uses the content name.
        let mut w = World::new();
        a.new_lend();
        let out = w.feed(&mut a, &bind("s4"));
        assert!(out.windows(known.len()).any(|w| w == &known[..]));
        // Anything else needs a connection, and changes nothing.
        let mut out = Vec::new();
        for cycle in [
            // Never accepted by a server.
            [parse("s5", "select 5"), msg(b'S', b"")].concat(),
            // The unnamed statement.
            [parse("", "select 4"), msg(b'S', b"")].concat(),
            // A Describe (the server's descriptions).
            [parse("s4", "select 4"), msg(b'D', b"Ss4\0"), msg(b'S', b"")].concat(),
            // No Sync at the end, or a message cut short.
            parse("s4", "select 4"),
            [parse("s4", "select 4"), msg(b'S', b"")].concat()[..10].to_vec(),
        ] {
            assert_eq!(a.answer_alone(&cycle, vetted, &mut out), None);
            assert!(out.is_empty());
        }
        let mut w = World::new();
        let out = w.feed(&mut a, &bind("s5"));
        assert!(
            out.windows(3).any(|w| w == b"s5\0"),
            "s5 was never the client's"
        );
    }

    #[test]
    fn the_cache_stays_within_its_capacity() {
        let mut w = World::new();
        let mut a = Rewriter::default();
        for i in 0..4 {
            w.feed(&mut a, &parse(&format!("s{i}"), &format!("select {i}")));
        }
        assert_eq!(w.cache.len(), 2);
        assert_eq!(w.counts.evictions, 2);
    }
}
