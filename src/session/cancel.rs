//! Query cancellation with tollgate's own keys.
//!
//! Each client gets a BackendKeyData that tollgate made up: a random process
//! id whose value modulo the shard count names the shard that owns the
//! session, and a random secret. The server's real key stays with tollgate.
//! A CancelRequest arrives on a new connection, on whichever shard the
//! kernel picked; that shard hands it to the owner by message passing (one
//! bounded channel per shard), and the owner, the only thread that touches
//! its key table, checks the secret and sends the server's real key to the
//! server on a new connection.
//!
//! Nothing here runs per message: a key is issued once per session and a
//! cancel is rare. A wrong or unknown key is dropped without a word, as
//! Postgres does; a flood of guesses costs an accept, a channel send and a
//! hash lookup each, and a full channel drops the surplus.
//!
//! <https://www.postgresql.org/docs/current/protocol-flow.html#PROTOCOL-FLOW-CANCELING-REQUESTS>

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use ring::rand::{SecureRandom, SystemRandom};
use subtle::ConstantTimeEq;
use tracing::debug;

use crate::protocol::backend::BackendKey;
use crate::upstream::login::ISSUED_KEY_LEN;

/// A CancelRequest as the client sent it.
#[derive(Clone)]
pub struct CancelRequest {
    pub process_id: u32,
    pub secret_key: Box<[u8]>,
    /// Who sent it, for the audit log.
    pub client: std::net::SocketAddr,
}

/// Cancels waiting for their owner shard; beyond this, guesses are dropped.
const INBOX_CAPACITY: usize = 1024;

/// The channels between shards, built once before the shards start.
pub struct Router {
    routes: Vec<flume::Sender<CancelRequest>>,
    inboxes: std::sync::Mutex<Vec<Option<flume::Receiver<CancelRequest>>>>,
}

impl Router {
    pub fn new(shards: usize) -> Self {
        let (routes, inboxes) = (0..shards.max(1))
            .map(|_| {
                let (tx, rx) = flume::bounded(INBOX_CAPACITY);
                (tx, Some(rx))
            })
            .unzip();
        Router {
            routes,
            inboxes: std::sync::Mutex::new(inboxes),
        }
    }

    pub fn shards(&self) -> usize {
        self.routes.len()
    }

    /// The shard whose session `process_id` names.
    pub fn owner(&self, process_id: u32) -> usize {
        process_id as usize % self.routes.len()
    }

    /// Hands a cancel to its owner shard. Drops it when the owner's inbox is
    /// full: a cancel is best effort, and the client expects no answer.
    pub fn route(&self, request: CancelRequest) {
        let owner = self.owner(request.process_id);
        if self.routes[owner].try_send(request).is_err() {
            debug!(owner, "cancel inbox full; request dropped");
        }
    }

    /// The inbox of `shard`, taken once by the shard's thread at start.
    pub fn take_inbox(&self, shard: usize) -> Option<flume::Receiver<CancelRequest>> {
        let mut inboxes = self.inboxes.lock().unwrap_or_else(|e| e.into_inner());
        inboxes.get_mut(shard)?.take()
    }
}

/// What the owner shard knows of one session's keys.
struct Entry {
    /// The key the client was given; empty until the login completes.
    issued: Box<[u8]>,
    /// The server's real key.
    upstream: Option<BackendKey>,
}

/// One shard's key table. Shard-local: only the owner thread touches it.
pub struct Keys {
    shard: u32,
    shards: u32,
    table: RefCell<HashMap<u32, Entry>>,
    rng: SystemRandom,
}

impl Keys {
    pub fn new(shard: usize, shards: usize) -> Self {
        Keys {
            shard: shard as u32,
            shards: shards.max(1) as u32,
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
        let slots = i32::MAX as u32 / self.shards;
        let mut random = [0u8; 4 + ISSUED_KEY_LEN];
        let mut table = self.table.borrow_mut();
        let process_id = loop {
            if self.rng.fill(&mut random).is_err() {
                // getrandom does not fail on Linux once seeded; if it ever
                // did, a session without cancel support is the safe outcome.
                random = [0; 4 + ISSUED_KEY_LEN];
            }
            let r = u32::from_be_bytes([random[0], random[1], random[2], random[3]]);
            let pid = (r % slots) * self.shards + self.shard;
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
        Reservation {
            keys: self.clone(),
            process_id,
            secret,
        }
    }

    /// The server's key for a cancel that names a session of this shard
    /// with the right secret; `None` otherwise.
    pub fn upstream_key(&self, request: &CancelRequest) -> Option<BackendKey> {
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
    fn len(&self) -> usize {
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
    pub fn activate(&self, issued: &BackendKey, upstream: BackendKey) {
        if let Some(e) = self.keys.table.borrow_mut().get_mut(&self.process_id) {
            e.issued = issued.secret_key.clone();
            e.upstream = Some(upstream);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn key(pid: u32, secret: &[u8]) -> BackendKey {
        BackendKey {
            process_id: pid,
            secret_key: secret.into(),
        }
    }

    #[test]
    fn process_ids_name_their_shard_and_stay_positive() {
        for shard in 0..3 {
            let keys = Rc::new(Keys::new(shard, 3));
            let router = Router::new(3);
            let held: Vec<_> = (0..200).map(|_| keys.reserve()).collect();
            for r in &held {
                assert_eq!(router.owner(r.process_id), shard);
                assert!(r.process_id > 0 && r.process_id <= i32::MAX as u32);
            }
            assert_eq!(keys.len(), 200);
            drop(held);
            assert_eq!(keys.len(), 0);
        }
    }

    #[test]
    fn only_the_exact_issued_secret_finds_the_upstream_key() {
        let keys = Rc::new(Keys::new(0, 1));
        let r = keys.reserve();
        let issued = key(r.process_id, &r.secret[..4]);
        let ask = |secret: &[u8]| {
            keys.upstream_key(&CancelRequest {
                process_id: r.process_id,
                secret_key: secret.into(),
                client: ([127, 0, 0, 1], 1).into(),
            })
        };
        // Before the login completes nothing matches, not even empty.
        assert!(ask(&r.secret[..4]).is_none());
        assert!(ask(&[]).is_none());
        r.activate(&issued, key(4242, &[9, 9, 9, 9]));
        assert_eq!(ask(&r.secret[..4]), Some(key(4242, &[9, 9, 9, 9])));
        let mut wrong = r.secret;
        wrong[3] ^= 1;
        assert!(ask(&wrong[..4]).is_none());
        // A longer key that starts right is still wrong.
        assert!(ask(&r.secret[..]).is_none());
        assert!(keys
            .upstream_key(&CancelRequest {
                process_id: r.process_id ^ 2,
                secret_key: r.secret[..4].into(),
                client: ([127, 0, 0, 1], 1).into(),
            })
            .is_none());
        let pid = r.process_id;
        drop(r);
        assert!(keys
            .upstream_key(&CancelRequest {
                process_id: pid,
                secret_key: issued.secret_key.clone(),
                client: ([127, 0, 0, 1], 1).into(),
            })
            .is_none());
    }

    #[test]
    fn a_full_inbox_drops_instead_of_growing() {
        let router = Router::new(2);
        for _ in 0..INBOX_CAPACITY + 10 {
            router.route(CancelRequest {
                process_id: 1,
                secret_key: Box::new([0; 4]),
                client: ([127, 0, 0, 1], 1).into(),
            });
        }
        let inbox = router.take_inbox(1).unwrap();
        assert_eq!(inbox.len(), INBOX_CAPACITY);
        assert!(router.take_inbox(1).is_none());
        assert!(router.take_inbox(0).unwrap().is_empty());
    }
}
