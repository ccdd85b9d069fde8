//! The channels between shards for cancels: a CancelRequest reaches the
//! shard the kernel picked, which hands it to the shard that owns the
//! session (named by the process id) through that shard's bounded inbox.

use tracing::debug;

use super::fleet::LOCAL_MASK;

/// A CancelRequest as the client sent it.
#[derive(Clone)]
pub struct CancelRequest {
    pub process_id: u32,
    pub secret_key: Box<[u8]>,
    /// Who sent it, for the audit log.
    pub client: std::net::SocketAddr,
    /// Forwarded by another instance of the fleet: a wrong key is the
    /// original sender's guess, not the peer's, so it does not count
    /// against the peer's address (which would let a guesser get a peer's
    /// forwards refused).
    pub from_peer: bool,
    /// Dropped when the request has been acted on (or dropped), for the
    /// shard holding the client's connection, which closes it then.
    pub done: Option<flume::Sender<()>>,
}

/// Cancels waiting for their owner shard; beyond this, guesses are dropped.
pub(super) const INBOX_CAPACITY: usize = 1024;

/// The channels between shards, built once before the shards start.
pub struct Router {
    /// The bits of a process id that name the shard (all of them unless
    /// the instance is part of a fleet).
    local_mask: u32,
    routes: Vec<flume::Sender<CancelRequest>>,
    inboxes: std::sync::Mutex<Vec<Option<flume::Receiver<CancelRequest>>>>,
}

impl Router {
    pub fn new(shards: usize, fleet: bool) -> Self {
        let (routes, inboxes) = (0..shards.max(1))
            .map(|_| {
                let (tx, rx) = flume::bounded(INBOX_CAPACITY);
                (tx, Some(rx))
            })
            .unzip();
        Router {
            local_mask: if fleet { LOCAL_MASK } else { u32::MAX },
            routes,
            inboxes: std::sync::Mutex::new(inboxes),
        }
    }

    pub fn shards(&self) -> usize {
        self.routes.len()
    }

    /// The shard whose session `process_id` names.
    pub fn owner(&self, process_id: u32) -> usize {
        (process_id & self.local_mask) as usize % self.routes.len()
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
