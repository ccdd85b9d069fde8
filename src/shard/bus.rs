//! How other threads talk to the shards: a bounded inbox per shard,
//! answered by a task on that shard (`super::services`, which alone may
//! read its `!Send` state), each request carrying its own reply channel.
//! The admin thread asks for metrics and sessions; the main thread asks
//! the shards to drain.

use std::sync::Mutex;

use crate::metrics::ShardSnapshot;
use crate::session::watch::SessionView;

/// Requests a shard may get from another thread.
pub enum Request {
    /// Are you there? (For /healthz: a shard that answers is running its
    /// event loop.)
    Ping(flume::Sender<()>),
    Metrics(flume::Sender<ShardSnapshot>),
    Sessions(flume::Sender<Vec<SessionView>>),
    /// End session `number` of this shard; answers whether it was open.
    Terminate {
        number: u64,
        reply: flume::Sender<bool>,
    },
    /// Stop accepting, let open sessions finish until `deadline`, then end
    /// the rest; answers, once the shard has no session left, how many it
    /// had to end.
    Drain {
        deadline: std::time::Instant,
        reply: flume::Sender<usize>,
    },
}

/// Requests waiting per shard before the admin side is told it is busy.
const INBOX: usize = 64;

pub struct Bus {
    senders: Vec<flume::Sender<Request>>,
    inboxes: Mutex<Vec<Option<flume::Receiver<Request>>>>,
}

impl Bus {
    pub fn new(shards: usize) -> Self {
        let (senders, inboxes) = (0..shards)
            .map(|_| {
                let (tx, rx) = flume::bounded(INBOX);
                (tx, Some(rx))
            })
            .unzip();
        Bus {
            senders,
            inboxes: Mutex::new(inboxes),
        }
    }

    pub fn shards(&self) -> usize {
        self.senders.len()
    }

    /// The inbox of `shard`, once: the shard's admin task takes it at start.
    pub fn take_inbox(&self, shard: usize) -> Option<flume::Receiver<Request>> {
        let mut inboxes = self.inboxes.lock().unwrap_or_else(|e| e.into_inner());
        inboxes.get_mut(shard).and_then(Option::take)
    }

    /// Sends a request to `shard`; false if its inbox is full or gone.
    pub fn send(&self, shard: usize, request: Request) -> bool {
        self.senders
            .get(shard)
            .is_some_and(|s| s.try_send(request).is_ok())
    }
}
