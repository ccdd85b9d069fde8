//! What the server will answer, message by message, to what was sent on
//! a lent connection, and what of it the client sees.
//!
//! The client's named prepared statements live on the server under
//! tollgate's names, prepared on each connection when first needed
//! ([`super::rewrite`]). That adds messages the client did not send
//! (their answers are hidden) and drops some it did (answered by tollgate
//! itself, in place). The server answers extended-protocol messages in
//! order, so a queue of expectations, one per message sent (or answered
//! by tollgate), says for each server message whose answer it is.
//!
//! <https://www.postgresql.org/docs/current/protocol-flow.html#PROTOCOL-FLOW-EXT-QUERY>

#![forbid(unsafe_code)]

use std::collections::VecDeque;
use std::rc::Rc;

use super::rewrite::Prepared;

/// A message whose answers are expected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Parse,
    Bind,
    /// Describe of a statement: ParameterDescription, then RowDescription
    /// or NoData.
    DescribeStatement,
    /// Describe of a portal: RowDescription or NoData.
    DescribePortal,
    Execute,
    Close,
    /// Sync, Query and FunctionCall: answered up to ReadyForQuery, errors
    /// included.
    Sync,
}

impl Kind {
    /// Whether a server message with `tag` is the last answer to this one.
    /// (An ErrorResponse also ends the extended-protocol kinds; see
    /// [`Kind::ends_on_error`].)
    pub fn ended_by(self, tag: u8) -> bool {
        match self {
            Kind::Parse => tag == b'1',
            Kind::Bind => tag == b'2',
            Kind::Close => tag == b'3',
            Kind::DescribeStatement | Kind::DescribePortal => tag == b'T' || tag == b'n',
            Kind::Execute => matches!(tag, b'C' | b'I' | b's'),
            Kind::Sync => tag == b'Z',
        }
    }

    /// An ErrorResponse answers it, and the server then skips to Sync.
    pub fn ends_on_error(self) -> bool {
        self != Kind::Sync
    }
}

/// One expected answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expect {
    /// The server's answers to one message: relayed when `show`, else
    /// hidden (an ErrorResponse is always relayed: it is the client's
    /// failure). `stmt`: the server-side statement it concerns.
    Server {
        kind: Kind,
        show: bool,
        stmt: Option<Rc<[u8]>>,
    },
    /// tollgate's own answer (ParseComplete or CloseComplete) to a client
    /// message not forwarded, given in its place.
    Own(u8),
    /// What the entry before it did to the client's statement names,
    /// undone if the server skips or refuses that message (an error
    /// earlier in the pipeline, or the Parse itself failing), as Postgres
    /// would not have done it; forgotten once the entry is answered.
    Undo(Box<Undo>),
}

/// A statement name as it was before a Parse or Close changed it.
#[derive(Clone)]
pub struct Undo {
    pub previous: Previous,
    /// Set when the message it follows failed, rather than being skipped
    /// (see [`Expectations::skip_to_sync`]): a failed Parse of the
    /// unnamed statement has dropped the one before.
    pub failed: bool,
}

/// What a name meant before.
#[derive(Clone)]
pub enum Previous {
    /// A named statement of the client's (`None`: no such name).
    Named {
        name: Box<[u8]>,
        prepared: Option<Rc<Prepared>>,
    },
    /// The client's unnamed statement (its Parse), and whether the lent
    /// connection had it.
    Unnamed {
        parse: Option<Box<[u8]>>,
        here: bool,
    },
}

impl Undo {
    pub fn new(previous: Previous) -> Undo {
        Undo {
            previous,
            failed: false,
        }
    }

    fn name(&self) -> &[u8] {
        match &self.previous {
            Previous::Named { name, .. } => name,
            Previous::Unnamed { .. } => b"",
        }
    }
}

impl std::fmt::Debug for Undo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Undo({})", String::from_utf8_lossy(self.name()))
    }
}

impl PartialEq for Undo {
    fn eq(&self, other: &Self) -> bool {
        self.name() == other.name()
    }
}

impl Eq for Undo {}

/// The expectations of one session, in the order the answers will come.
#[derive(Debug, Default)]
pub struct Expectations {
    queue: VecDeque<Expect>,
}

impl Expectations {
    pub fn push(&mut self, e: Expect) {
        self.queue.push_back(e);
    }

    pub fn server(&mut self, kind: Kind, show: bool, stmt: Option<Rc<[u8]>>) {
        self.push(Expect::Server { kind, show, stmt });
    }

    /// An earlier cycle (a Sync, a simple Query, a FunctionCall) is still
    /// unanswered: it may yet fail a transaction block, where Postgres
    /// refuses every Parse.
    pub fn cycle_unanswered(&self) -> bool {
        self.queue.iter().any(|e| {
            matches!(
                e,
                Expect::Server {
                    kind: Kind::Sync,
                    ..
                }
            )
        })
    }

    /// Nothing more is expected (undo records of answered messages aside).
    pub fn is_empty(&self) -> bool {
        self.queue.iter().all(|e| matches!(e, Expect::Undo(_)))
    }

    /// Drops the undo records at the head: their messages were answered.
    fn settle(&mut self) {
        while let Some(Expect::Undo(_)) = self.queue.front() {
            self.queue.pop_front();
        }
    }

    pub fn front(&mut self) -> Option<&Expect> {
        self.settle();
        self.queue.front()
    }

    pub fn pop(&mut self) -> Option<Expect> {
        self.settle();
        self.queue.pop_front()
    }

    /// tollgate's own answers now at the head.
    pub fn take_own(&mut self, mut each: impl FnMut(u8)) {
        loop {
            self.settle();
            let Some(Expect::Own(tag)) = self.queue.front() else {
                return;
            };
            each(*tag);
            self.queue.pop_front();
        }
    }

    /// After an ErrorResponse to an extended-protocol message (already
    /// popped): the server skips everything up to the next Sync, which it
    /// answers. Tells `skipped_parse` the statements whose Parse was
    /// skipped, and returns the undo records of what was skipped (the
    /// failed message's included), last first.
    pub fn skip_to_sync(&mut self, mut skipped_parse: impl FnMut(Rc<[u8]>)) -> Vec<Undo> {
        let mut undo = Vec::new();
        // The undo records at the head belong to the failed message.
        let mut failed = true;
        while let Some(e) = self.queue.front() {
            match e {
                Expect::Server {
                    kind: Kind::Sync, ..
                } => break,
                Expect::Server {
                    kind: Kind::Parse,
                    stmt: Some(s),
                    ..
                } => skipped_parse(s.clone()),
                _ => {}
            }
            match self.queue.pop_front() {
                Some(Expect::Undo(mut u)) => {
                    u.failed = failed;
                    undo.push(*u);
                }
                _ => failed = false,
            }
        }
        undo.reverse();
        undo
    }

    /// Whether a change to the unnamed statement is still unanswered in
    /// an earlier cycle (before a Sync) than the one being sent: the
    /// server may yet skip it.
    pub fn unnamed_in_doubt(&self) -> bool {
        let mut unanswered = false;
        let mut changed = false;
        for e in &self.queue {
            match e {
                Expect::Undo(u) => {
                    if unanswered && matches!(u.previous, Previous::Unnamed { .. }) {
                        changed = true;
                    }
                }
                Expect::Server {
                    kind: Kind::Sync, ..
                } if changed => return true,
                _ => unanswered = true,
            }
        }
        false
    }

    pub fn clear(&mut self) {
        self.queue.clear();
    }

    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// An Execute at the head started COPY FROM STDIN: the Syncs the
    /// client sent behind it reach the server in copy-in mode, which
    /// ignores them. Removes their expectations; returns how many.
    pub fn drop_syncs_after_front(&mut self) -> u64 {
        let mut n = 0;
        while let Some(Expect::Server {
            kind: Kind::Sync, ..
        }) = self.queue.get(1)
        {
            self.queue.remove(1);
            n += 1;
        }
        n
    }
}
