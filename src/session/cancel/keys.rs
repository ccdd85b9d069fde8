//! One shard's table of cancel keys: the BackendKeyData each client was
//! given (made up here; its process id names the shard), and the server's
//! real key it stands for. Only the owner shard's thread touches it.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;

use ring::rand::{SecureRandom, SystemRandom};
use subtle::ConstantTimeEq;

use super::fleet::{Fleet, INSTANCE_SHIFT, LOCAL_MASK};
use super::router::CancelRequest;
use crate::protocol::backend::BackendKey;
use crate::session::Route;
use crate::upstream::login::ISSUED_KEY_LEN;

/// What the owner shard knows of one session's keys.
struct Entry {
    /// The key the client was given; empty until the login completes.
    issued: Box<[u8]>,
    /// The server's real key, and the server: routing may have chosen one
    /// of several, and a reload may have moved it since.
    upstream: Option<(BackendKey, Arc<Route>)>,
}

/// One shard's key table. Shard-local: only the owner thread touches it.
pub struct Keys {
    shard: u32,
    shards: u32,
    fleet: Option<Arc<Fleet>>,
    table: RefCell<HashMap<u32, Entry>>,
    rng: SystemRandom,
}

impl Keys {
    pub fn new(shard: usize, shards: usize, fleet: Option<Arc<Fleet>>) -> Self {
        Keys {
            shard: shard as u32,
            shards: shards.max(1) as u32,
            fleet,
            table: RefCell::default(),
            rng: SystemRandom::new(),
        }
    }

    /// Reserves a process id for a new session and draws its secret. The
    /// reservation is released when the returned guard is dropped.
    pub fn reserve(self: &Rc<Self>) -> Reservation {
        // Process ids stay positive as an Int32 (clients may read them
        // signed) and are random, so they reveal nothing about how many
        // sessions there are and add 31 bits an attacker must guess.
        let instance = self.fleet.as_ref().map_or(0, |f| f.instance_id());
        let space = if instance == 0 {
            i32::MAX as u32
        } else {
            LOCAL_MASK + 1
        };
        let slots = space / self.shards;
        let mut random = [0u8; 4 + ISSUED_KEY_LEN];
        let mut table = self.table.borrow_mut();
        let process_id = loop {
            if self.rng.fill(&mut random).is_err() {
                // getrandom does not fail on Linux once seeded; if it ever
                // did, a session without cancel support is the safe outcome.
                random = [0; 4 + ISSUED_KEY_LEN];
            }
            let r = u32::from_be_bytes([random[0], random[1], random[2], random[3]]);
            let pid =
                ((r % slots) * self.shards + self.shard) | (u32::from(instance) << INSTANCE_SHIFT);
            if pid != 0 && !table.contains_key(&pid) {
                break pid;
            }
        };
        table.insert(
            process_id,
            Entry {
                issued: Box::default(),
                upstream: None,
            },
        );
        let mut secret = [0u8; ISSUED_KEY_LEN];
        secret.copy_from_slice(&random[4..]);
        if let (Some(f), true) = (&self.fleet, instance != 0) {
            f.seal(process_id, &mut secret);
        }
        Reservation {
            keys: self.clone(),
            process_id,
            secret,
        }
    }

    /// The server's key for a cancel that names a session of this shard
    /// with the right secret; `None` otherwise.
    pub fn upstream_key(&self, request: &CancelRequest) -> Option<(BackendKey, Arc<Route>)> {
        let table = self.table.borrow();
        let entry = table.get(&request.process_id)?;
        // Constant time: the comparison must not tell a guesser how much of
        // the secret was right. Lengths are public (4 or 32 bytes).
        let matches = entry.issued.len() == request.secret_key.len()
            && !entry.issued.is_empty()
            && bool::from(entry.issued.ct_eq(&request.secret_key));
        if matches {
            entry.upstream.clone()
        } else {
            None
        }
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.table.borrow().len()
    }
}

/// A process id held for one session; released on drop.
pub struct Reservation {
    keys: Rc<Keys>,
    pub process_id: u32,
    pub secret: [u8; ISSUED_KEY_LEN],
}

impl Reservation {
    /// Records the keys once the login is done: the one the client was
    /// given and the server's, which a matching cancel will use.
    pub fn activate(&self, issued: &BackendKey, upstream: BackendKey, server: Arc<Route>) {
        if let Some(e) = self.keys.table.borrow_mut().get_mut(&self.process_id) {
            e.issued = issued.secret_key.clone();
            e.upstream = Some((upstream, server));
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.keys.table.borrow_mut().remove(&self.process_id);
    }
}

impl std::fmt::Debug for Reservation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Reservation({})", self.process_id)
    }
}
