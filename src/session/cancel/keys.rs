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
    /// The server's real key, and the server: routing may have chosen one
    /// of several, and a reload may have moved it since.
    upstream: (BackendKey, Arc<Route>),
}

/// What a shard's table says of a cancel's key.
#[derive(Clone)]
pub enum Lookup {
    None,
    /// One session: the server's key, and the server.
    One(BackendKey, Arc<Route>),
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
        let mut found = Lookup::None;
        for e in entries {
            let matches = e.issued.len() == request.secret_key.len()
                && bool::from(e.issued.ct_eq(&request.secret_key));
            if matches {
                found = match found {
                    Lookup::None => Lookup::One(e.upstream.0.clone(), e.upstream.1.clone()),
                    _ => Lookup::Ambiguous,
                };
            }
        }
        found
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
            upstream: (upstream, server),
        });
        self.process_id.set(Some(issued.process_id));
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
