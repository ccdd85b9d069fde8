//! One shard's table of cancel keys: for each session, the BackendKeyData
//! its client was given and the server's real key it stands for. The
//! process id the client gets is its backend's own (what `pg_backend_pid()`
//! says, so `pg_terminate_backend` and NOTIFY's sender pid mean what the
//! client thinks); the secret is tollgate's, drawn here, so a cancel must
//! come back through tollgate. Only the owner shard's thread touches the
//! table.
//!
//! The secret is random, except in a fleet, where its first byte names the
//! instance that issued it and a tag over the process id lets any instance
//! check it before forwarding (see [`super::fleet`]). A client under
//! protocol 3.0 gets the first 4 bytes, one under 3.2 all
//! [`ISSUED_KEY_LEN`]: alone, all 32 (3.0) or 256 (3.2) bits are random, as
//! Postgres's own keys are; in a fleet, 8 random bits and a 16-bit tag
//! (3.0), or 168 random bits and 80 bits of tags (3.2).
//!
//! Two servers behind tollgate may give sessions the same process id, and
//! in a fleet two such sessions may draw the same 3.0 secret (1 in 256): a
//! cancel matching more than one session is acted on for none
//! ([`Lookup::Ambiguous`]), never for the wrong one.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;

use ring::rand::{SecureRandom, SystemRandom};
use subtle::ConstantTimeEq;

use super::fleet::Fleet;
use super::router::CancelRequest;
use crate::protocol::backend::BackendKey;
use crate::session::Route;
use crate::upstream::login::SealKey;
use crate::upstream::login::ISSUED_KEY_LEN;

/// One session's keys, under its backend's process id.
struct Entry {
    /// Which reservation made it (two servers behind tollgate may use the
    /// same process id at once).
    reservation: u64,
    /// The secret the client was given.
    issued: Box<[u8]>,
    /// Where a matching cancel goes.
    target: Target,
}

/// Where a session's cancels go.
enum Target {
    /// The server's real key, and the server: routing may have chosen one
    /// of several, and a reload may have moved it since.
    Server(BackendKey, Arc<Route>),
    /// The session itself (transaction pooling): only it knows which
    /// connection, if any, runs its query right now.
    Session(Rc<CancelSignal>),
}

/// A transaction-pooled session's inbox for cancels of its key. Each
/// request carries a sender the session drops once it has acted on it (a
/// cancel sent to the connection lent to it, or nothing when none was),
/// so that the requester can wait for that, as clients wait for the
/// server to close a cancel connection.
#[derive(Default)]
pub struct CancelSignal {
    waiting: RefCell<Vec<flume::Sender<()>>>,
    waker: RefCell<Option<std::task::Waker>>,
}

impl CancelSignal {
    fn request(&self) -> flume::Receiver<()> {
        let (done, wait) = flume::bounded(1);
        self.waiting.borrow_mut().push(done);
        if let Some(w) = self.waker.borrow_mut().take() {
            w.wake();
        }
        wait
    }

    /// Resolves when a cancel is waiting.
    pub async fn wait(&self) {
        std::future::poll_fn(|cx| {
            if self.waiting.borrow().is_empty() {
                crate::io_util::remember_waker(&mut self.waker.borrow_mut(), cx.waker());
                std::task::Poll::Pending
            } else {
                std::task::Poll::Ready(())
            }
        })
        .await
    }

    /// The waiting cancels: dropping them tells their requesters they were
    /// acted on.
    pub fn take(&self) -> Vec<flume::Sender<()>> {
        std::mem::take(&mut self.waiting.borrow_mut())
    }
}

/// What a shard's table says of a cancel's key.
#[derive(Clone)]
pub enum Lookup {
    None,
    /// One session: the server's key, and the server.
    One(BackendKey, Arc<Route>),
    /// One session, which acts on the cancel itself; the receiver ends
    /// when it has.
    Delegated(flume::Receiver<()>),
    /// More than one session has this key: cancel none.
    Ambiguous,
}

/// One shard's key table. Shard-local: only the owner thread touches it.
pub struct Keys {
    fleet: Option<Arc<Fleet>>,
    table: RefCell<HashMap<u32, Vec<Entry>>>,
    next: Cell<u64>,
    rng: SystemRandom,
}

impl Keys {
    pub fn new(fleet: Option<Arc<Fleet>>) -> Self {
        Keys {
            fleet,
            table: RefCell::default(),
            next: Cell::new(0),
            rng: SystemRandom::new(),
        }
    }

    /// Draws the secret for a new session, before its login; the server's
    /// process id joins it when the login is done
    /// ([`Reservation::activate`]). Released when the guard is dropped.
    pub fn reserve(self: &Rc<Self>) -> Reservation {
        let mut secret = [0u8; ISSUED_KEY_LEN];
        if self.rng.fill(&mut secret).is_err() {
            // getrandom does not fail on Linux once seeded; if it ever did,
            // a session whose cancels match nothing is the safe outcome.
            secret = [0; ISSUED_KEY_LEN];
        }
        if let Some(f) = &self.fleet {
            // The owner's instance id leads the secret (0 before this
            // instance has one: such a key is always taken as local); the
            // tags follow once the backend's process id is known.
            secret[0] = f.instance_id();
        }
        let id = self.next.get() + 1;
        self.next.set(id);
        Reservation {
            keys: self.clone(),
            id,
            process_id: Cell::new(None),
            secret,
        }
    }

    /// In a fleet, what finishes a session's secret once its backend's
    /// process id is known: the instance id and the tags.
    pub fn sealer(&self) -> Option<SealKey> {
        let fleet = self.fleet.clone()?;
        let instance = fleet.instance_id();
        (instance != 0)
            .then(|| -> SealKey { Box::new(move |pid, secret| fleet.seal(instance, pid, secret)) })
    }

    /// The sessions of this shard a cancel names with the right secret.
    pub fn lookup(&self, request: &CancelRequest) -> Lookup {
        let table = self.table.borrow();
        let Some(entries) = table.get(&request.process_id) else {
            return Lookup::None;
        };
        // Constant time per comparison: it must not tell a guesser how much
        // of the secret was right. Lengths are public (4 or 32 bytes).
        let mut found: Option<&Target> = None;
        let mut matches = 0;
        for e in entries {
            let matched = e.issued.len() == request.secret_key.len()
                && bool::from(e.issued.ct_eq(&request.secret_key));
            if matched {
                matches += 1;
                found = Some(&e.target);
            }
        }
        match (matches, found) {
            (1, Some(Target::Server(key, route))) => Lookup::One(key.clone(), route.clone()),
            (1, Some(Target::Session(signal))) => Lookup::Delegated(signal.request()),
            (0, _) | (_, None) => Lookup::None,
            _ => Lookup::Ambiguous,
        }
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.table.borrow().values().map(Vec::len).sum()
    }
}

/// The cancel key of one session, from before its login to its end;
/// released on drop.
pub struct Reservation {
    keys: Rc<Keys>,
    id: u64,
    /// The backend's process id, once known.
    process_id: Cell<Option<u32>>,
    /// What the client's secret is cut from (4 bytes or all of it).
    pub secret: [u8; ISSUED_KEY_LEN],
}

impl Reservation {
    /// Records the keys once the login is done: the one the client was
    /// given (the backend's process id, this secret) and the server's,
    /// which a matching cancel will use.
    pub fn activate(&self, issued: &BackendKey, upstream: BackendKey, server: Arc<Route>) {
        let mut table = self.keys.table.borrow_mut();
        self.release(&mut table);
        table.entry(issued.process_id).or_default().push(Entry {
            reservation: self.id,
            issued: issued.secret_key.clone(),
            target: Target::Server(upstream, server),
        });
        self.process_id.set(Some(issued.process_id));
    }

    /// Hands the key's cancels to the session itself (transaction
    /// pooling; see [`CancelSignal`]), once activated.
    pub fn delegate(&self, signal: Rc<CancelSignal>) {
        let Some(pid) = self.process_id.get() else {
            return;
        };
        let mut table = self.keys.table.borrow_mut();
        let entry = table
            .get_mut(&pid)
            .and_then(|es| es.iter_mut().find(|e| e.reservation == self.id));
        if let Some(e) = entry {
            e.target = Target::Session(signal);
        }
    }

    /// A process id for a client under transaction pooling, whose queries
    /// run on whichever backend is lent: none of the backends' own, so
    /// that a client never takes another client's backend for its own
    /// (Postgres process ids are positive `int4`s).
    pub fn synthetic_pid(&self) -> u32 {
        let mut b = [0u8; 4];
        let _ = self.keys.rng.fill(&mut b);
        (u32::from_be_bytes(b) & 0x7fff_ffff).max(1)
    }

    fn release(&self, table: &mut HashMap<u32, Vec<Entry>>) {
        let Some(pid) = self.process_id.take() else {
            return;
        };
        if let Some(entries) = table.get_mut(&pid) {
            entries.retain(|e| e.reservation != self.id);
            if entries.is_empty() {
                table.remove(&pid);
            }
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.release(&mut self.keys.table.borrow_mut());
    }
}

impl std::fmt::Debug for Reservation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Reservation({:?})", self.process_id.get())
    }
}
