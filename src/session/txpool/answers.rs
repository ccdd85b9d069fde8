//! The server's answers as the client gets them: relayed untouched,
//! except the answers to messages tollgate added (hidden) and, in place of
//! messages tollgate did not forward, its own answers
//! ([`super::expect`]). Each chunk becomes a short list of byte ranges to
//! relay and answers to insert; a chunk with nothing to change is one
//! range.
//!
//! What the answers say also keeps [`StatementCache`] true: a
//! ParseComplete confirms a statement, an error forgets the statement it
//! concerns (a plan gone stale after DDL is then prepared again on next
//! use) and the Parses the server skipped with it.

#![forbid(unsafe_code)]

use std::ops::Range;
use std::rc::Rc;

use super::expect::{Expect, Expectations, Kind};
use crate::server::statements::StatementCache;

/// What to send the client of a chunk, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Relay(Range<usize>),
    /// tollgate's own answer: a message with this tag and no payload.
    Answer(u8),
    /// A message header that began in an earlier chunk, whole.
    Header([u8; 5]),
}

/// What a chunk of answers said that the session must act on.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Events {
    /// An Execute started COPY FROM STDIN: until the client's CopyDone or
    /// CopyFail, its Syncs are ignored by the server.
    pub copy_in: bool,
    /// Expected ReadyForQuery messages that will not come (see `copy_in`).
    pub syncs_ignored: u64,
    /// An ErrorResponse came (which also ends copy-in).
    pub error: bool,
}

/// Where the server stream is.
#[derive(Default)]
pub struct Answers {
    header: [u8; 5],
    header_len: usize,
    /// Payload bytes of the current message still to come.
    remaining: usize,
    /// The current message goes to the client.
    show: bool,
    events: Events,
    /// Changes to the client's statement names the server did not make
    /// (skipped or refused), last first: to undo.
    pub undone: Vec<super::expect::Undo>,
    /// Statements (server-side names) whose Parse the server accepted
    /// (`true`) or refused (`false`), for the pool to remember.
    pub parsed: Vec<(Rc<[u8]>, bool)>,
}

/// Messages the server may send at any time, answers to nothing.
fn asynchronous(tag: u8) -> bool {
    matches!(tag, b'N' | b'A' | b'S')
}

impl Answers {
    /// Sorts a chunk of server bytes into `actions`; returns what the
    /// session must act on.
    pub fn sort(
        &mut self,
        chunk: &[u8],
        expect: &mut Expectations,
        cache: &mut StatementCache,
        actions: &mut Vec<Action>,
    ) -> Events {
        actions.clear();
        self.events = Events::default();
        let relay = |actions: &mut Vec<Action>, r: Range<usize>| {
            if r.is_empty() {
                return;
            }
            if let Some(Action::Relay(last)) = actions.last_mut() {
                if last.end == r.start {
                    last.end = r.end;
                    return;
                }
            }
            actions.push(Action::Relay(r));
        };
        // The expectation at the head, once a message of this chunk found
        // it to be the server's: most messages (rows, say) neither end it
        // nor change anything, and are shown or hidden as it says without
        // another look at the queue. `None`: look.
        let mut head: Option<(Kind, bool)> = None;
        let mut pos = 0;
        while pos < chunk.len() {
            if self.remaining > 0 {
                let take = self.remaining.min(chunk.len() - pos);
                if self.show {
                    relay(actions, pos..pos + take);
                }
                self.remaining -= take;
                pos += take;
                if self.remaining == 0 && head.is_none() {
                    // tollgate's own answers that follow this message.
                    expect.take_own(|t| actions.push(Action::Answer(t)));
                }
                continue;
            }
            // A header, maybe split across chunks: its bytes are relayed
            // (or not) once the whole header says what it is.
            let start = pos;
            let take = (5 - self.header_len).min(chunk.len() - pos);
            self.header[self.header_len..self.header_len + take]
                .copy_from_slice(&chunk[pos..pos + take]);
            self.header_len += take;
            pos += take;
            if self.header_len < 5 {
                break;
            }
            let split = self.header_len > take;
            self.header_len = 0;
            let tag = self.header[0];
            let len = i32::from_be_bytes([
                self.header[1],
                self.header[2],
                self.header[3],
                self.header[4],
            ]);
            self.remaining = (len.max(4) - 4) as usize;
            let passes =
                head.filter(|&(kind, _)| !matches!(tag, b'E' | b'G' | b'Z') && !kind.ended_by(tag));
            if let Some((_, show)) = passes {
                self.show = show || asynchronous(tag);
            } else {
                expect.take_own(|t| actions.push(Action::Answer(t)));
                self.show = self.message(tag, expect, cache);
                head = None;
            }
            if self.show {
                if split {
                    // Its first bytes came in an earlier chunk, held back
                    // until the header said what it is.
                    actions.push(Action::Header(self.header));
                } else {
                    relay(actions, start..pos);
                }
            }
            if passes.is_none() {
                if self.remaining == 0 {
                    expect.take_own(|t| actions.push(Action::Answer(t)));
                }
                if let Some(Expect::Server { kind, show, .. }) = expect.front() {
                    head = Some((*kind, *show));
                }
            }
        }
        self.events
    }

    /// tollgate's own answers due now, with no server message before them.
    pub fn due(expect: &mut Expectations, actions: &mut Vec<Action>) {
        actions.clear();
        expect.take_own(|t| actions.push(Action::Answer(t)));
    }

    /// Whether a server message with `tag` goes to the client, and what it
    /// completes.
    fn message(&mut self, tag: u8, expect: &mut Expectations, cache: &mut StatementCache) -> bool {
        if asynchronous(tag) {
            return true;
        }
        let Some(Expect::Server { kind, show, stmt }) = expect.front() else {
            // Nothing expected (or only tollgate's own): relay.
            return true;
        };
        let (kind, show) = (*kind, *show);
        let stmt = if tag == b'E' { stmt.clone() } else { None };
        if tag == b'E' {
            self.events.error = true;
        }
        if tag == b'G' && kind == Kind::Execute {
            self.events.copy_in = true;
            self.events.syncs_ignored += expect.drop_syncs_after_front();
        }
        if tag == b'E' && kind.ends_on_error() {
            if let Some(s) = &stmt {
                cache.forget(s);
                if kind == Kind::Parse {
                    self.parsed.push((s.clone(), false));
                }
            }
            expect.pop();
            let undo = expect.skip_to_sync(|s| cache.forget(&s));
            self.undone.extend(undo);
            // The client's failure, even of a message it did not send.
            return true;
        }
        if tag == b'Z' && kind != Kind::Sync {
            // Out of step (cannot happen with a sane server): whatever
            // was expected before the next Sync will not come.
            let undo = expect.skip_to_sync(|s| cache.forget(&s));
            self.undone.extend(undo);
            expect.pop();
            return true;
        }
        if kind.ended_by(tag) {
            if let Some(Expect::Server {
                stmt: Some(s),
                kind: Kind::Parse,
                ..
            }) = expect.pop()
            {
                cache.prepared(&s);
                self.parsed.push((s, true));
            }
        }
        show
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::frame::test_message as msg;

    /// What the client gets of `server` (fed in `piece`-byte chunks).
    fn client_sees(
        server: &[u8],
        expect: &mut Expectations,
        piece: usize,
    ) -> (Vec<u8>, StatementCache) {
        let mut a = Answers::default();
        let mut cache = StatementCache::default();
        cache.parsing(b"tg_x"[..].into(), 0, 10);
        let mut actions = Vec::new();
        let mut out = Vec::new();
        for c in server.chunks(piece) {
            a.sort(c, expect, &mut cache, &mut actions);
            for act in &actions {
                match act {
                    Action::Relay(r) => out.extend_from_slice(&c[r.clone()]),
                    Action::Answer(t) => out.extend_from_slice(&[*t, 0, 0, 0, 4]),
                    Action::Header(h) => out.extend_from_slice(h),
                }
            }
        }
        Answers::due(expect, &mut actions);
        for act in &actions {
            if let Action::Answer(t) = act {
                out.extend_from_slice(&[*t, 0, 0, 0, 4]);
            }
        }
        (out, cache)
    }

    fn stmt() -> Option<std::rc::Rc<[u8]>> {
        Some(b"tg_x"[..].into())
    }

    #[test]
    fn hidden_answers_are_dropped_and_own_answers_take_their_place() {
        for piece in [1, 2, 3, 7, 1000] {
            let mut e = Expectations::default();
            e.server(Kind::Close, false, None);
            e.server(Kind::Parse, false, stmt());
            e.server(Kind::Bind, true, stmt());
            e.server(Kind::Execute, true, stmt());
            e.push(Expect::Own(b'3'));
            e.server(Kind::Sync, true, None);
            e.push(Expect::Own(b'1'));
            let server = [
                msg(b'3', b""),
                msg(b'1', b""),
                msg(b'2', b""),
                msg(b'D', b"\0\x01\0\0\0\x011"),
                msg(b'N', b"notice"),
                msg(b'D', b"\0\x01\0\0\0\x012"),
                msg(b'D', b"\0\x01\0\0\0\x013"),
                msg(b'C', b"SELECT 3\0"),
                msg(b'Z', b"I"),
            ]
            .concat();
            let (out, cache) = client_sees(&server, &mut e, piece);
            let want = [
                msg(b'2', b""),
                msg(b'D', b"\0\x01\0\0\0\x011"),
                msg(b'N', b"notice"),
                msg(b'D', b"\0\x01\0\0\0\x012"),
                msg(b'D', b"\0\x01\0\0\0\x013"),
                msg(b'C', b"SELECT 3\0"),
                msg(b'3', b""),
                msg(b'Z', b"I"),
                msg(b'1', b""),
            ]
            .concat();
            assert_eq!(out, want, "in pieces of {piece}");
            assert!(e.is_empty());
            assert_eq!(
                cache.held(b"tg_x"),
                Some(crate::server::statements::Held::Prepared)
            );
        }
    }

    #[test]
    fn copy_in_by_execute_drops_the_syncs_sent_behind_it() {
        let mut e = Expectations::default();
        e.server(Kind::Bind, true, None);
        e.server(Kind::Execute, true, None);
        e.server(Kind::Sync, true, None);
        let mut a = Answers::default();
        let mut cache = StatementCache::default();
        let mut actions = Vec::new();
        let server = [msg(b'2', b""), msg(b'G', b"\0\0\0")].concat();
        let ev = a.sort(&server, &mut e, &mut cache, &mut actions);
        assert!(ev.copy_in);
        assert_eq!(ev.syncs_ignored, 1);
        // The client's CopyDone and its Sync: CommandComplete, then ready.
        e.server(Kind::Sync, true, None);
        let server = [msg(b'C', b"COPY 1\0"), msg(b'Z', b"I")].concat();
        a.sort(&server, &mut e, &mut cache, &mut actions);
        assert!(e.is_empty());
    }

    #[test]
    fn an_error_is_shown_and_what_the_server_skips_is_forgotten() {
        let mut e = Expectations::default();
        e.server(Kind::Close, false, None);
        e.server(Kind::Parse, false, stmt());
        e.server(Kind::Bind, true, stmt());
        e.push(Expect::Own(b'1'));
        e.server(Kind::Sync, true, None);
        let server = [msg(b'3', b""), msg(b'E', b"SERROR\0\0"), msg(b'Z', b"I")].concat();
        let (out, cache) = client_sees(&server, &mut e, 4);
        assert_eq!(out, [msg(b'E', b"SERROR\0\0"), msg(b'Z', b"I")].concat());
        assert!(e.is_empty());
        assert_eq!(cache.held(b"tg_x"), None, "its Parse failed");
    }
}
