//! The channels between shards for cancels: a CancelRequest reaches the
//! shard the kernel picked, which asks the others through their bounded
//! inboxes what their key tables say of it. Nothing in the key names the
//! shard, so every bit of the secret stays random.

use tracing::debug;

/// A CancelRequest as the client sent it.
#[derive(Clone)]
pub struct CancelRequest {
    pub process_id: u32,
    pub secret_key: Box<[u8]>,
    /// Who sent it, for the audit log.
    pub client: crate::net::Peer,
    /// Forwarded by another instance of the fleet: a wrong key is the
    /// original sender's guess, not the peer's, so it does not count
    /// against the peer's address (which would let a guesser get a peer's
    /// forwards refused).
    pub from_peer: bool,
    /// For a request asked of another shard: that shard's answer, what its
    /// key table says. The asking shard acts on the answers, records the
    /// outcome, and then closes the client's connection.
    pub reply: Option<flume::Sender<super::keys::Lookup>>,
}

/// Cancels waiting for a shard; beyond this, guesses are dropped.
pub(super) const INBOX_CAPACITY: usize = 1024;

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

    /// Hands a cancel to `shard`. Drops it when that shard's inbox is full:
    /// a cancel is best effort, and the client expects no answer.
    pub fn route(&self, shard: usize, request: CancelRequest) {
        if self.routes[shard].try_send(request).is_err() {
            debug!(shard, "cancel inbox full; request dropped");
        }
    }

    /// The inbox of `shard`, taken once by the shard's thread at start.
    pub fn take_inbox(&self, shard: usize) -> Option<flume::Receiver<CancelRequest>> {
        let mut inboxes = self.inboxes.lock().unwrap_or_else(|e| e.into_inner());
        inboxes.get_mut(shard)?.take()
    }
}
