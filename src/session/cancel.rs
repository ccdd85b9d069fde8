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
//! In a fleet (`[fleet]`), the load balancer may send the CancelRequest to
//! another instance than the one serving the session. Keys then carry the
//! owner's instance id in the process id, and a tag in the secret made with
//! the fleet's shared cancel key ([`Fleet`]): any instance can tell a key
//! some instance issued from a guess, and forwards only the former, as a
//! plain CancelRequest, to the owner's advertised address. Nothing else is
//! shared; the owner still checks the whole secret against its table.
//!
//! [`handle`] acts on a CancelRequest that arrived on this shard;
//! [`serve_here`] is the owner's side, also run for requests routed from
//! other shards (`crate::shard`).
//!
//! <https://www.postgresql.org/docs/current/protocol-flow.html#PROTOCOL-FLOW-CANCELING-REQUESTS>

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
use monoio::net::TcpStream;
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};
use subtle::ConstantTimeEq;
use tracing::{debug, warn};

use super::{Route, ShardContext};
use crate::audit;
use crate::protocol::backend::BackendKey;
use crate::upstream::login::ISSUED_KEY_LEN;

/// Process-id bits for the instance id (bits 23..30; bit 31 stays clear
/// for clients that read the id as a signed Int32).
const INSTANCE_SHIFT: u32 = 23;
/// The rest of a fleet process id: the shard and a random slot.
const LOCAL_MASK: u32 = (1 << INSTANCE_SHIFT) - 1;
/// Set on a CancelRequest one instance forwards to another: the receiver
/// acts on it locally and never forwards it again, so no two instances with
/// different views of the registry can pass a cancel back and forth.
pub const FORWARDED: u32 = 1 << 31;

/// Where a CancelRequest goes.
#[derive(Debug, PartialEq, Eq)]
pub enum Destination {
    /// A session of this instance (process id without the forward mark).
    Here(u32),
    /// Another instance, at this address.
    Peer(std::net::SocketAddr),
    /// A key no instance of the fleet issued, or an owner not known.
    Nowhere,
}

/// The fleet's shared cancel key and the instance registry's view.
pub struct Fleet {
    key: hmac::Key,
    /// Claimed in the control database before the shards start; renewed
    /// (possibly changed) after a reconnect.
    instance_id: AtomicU8,
    /// Other instances' advertised addresses, by id, resolved by the
    /// control thread.
    peers: Mutex<std::collections::HashMap<u8, std::net::SocketAddr>>,
    pub advertise: String,
}

impl Fleet {
    pub fn new(cancel_key: &[u8], advertise: String) -> Self {
        Fleet {
            key: hmac::Key::new(hmac::HMAC_SHA256, cancel_key),
            instance_id: AtomicU8::new(0),
            peers: Mutex::default(),
            advertise,
        }
    }

    pub fn instance_id(&self) -> u8 {
        self.instance_id.load(Ordering::Relaxed)
    }

    pub fn set_instance_id(&self, id: u8) {
        self.instance_id.store(id, Ordering::Relaxed);
    }

    /// Whether `ip` is the advertised address of another instance.
    pub fn is_peer(&self, ip: std::net::IpAddr) -> bool {
        let peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        peers.values().any(|a| a.ip() == ip)
    }

    pub fn set_peers(&self, peers: std::collections::HashMap<u8, std::net::SocketAddr>) {
        *self.peers.lock().unwrap_or_else(|e| e.into_inner()) = peers;
    }

    /// The tag of a secret's random part. Two tags per secret, one for the
    /// 4 bytes a protocol 3.0 client gets and one for the 32 of 3.2, as the
    /// key is drawn before the server's protocol version is known.
    fn tag(&self, process_id: u32, random: &[u8], out: &mut [u8]) {
        let mut ctx = hmac::Context::with_key(&self.key);
        ctx.update(&[random.len() as u8]);
        ctx.update(&process_id.to_be_bytes());
        ctx.update(random);
        let tag = ctx.sign();
        out.copy_from_slice(&tag.as_ref()[..out.len()]);
    }

    /// Fills in the tags of a fresh secret whose other bytes are random.
    fn seal(&self, process_id: u32, secret: &mut [u8; ISSUED_KEY_LEN]) {
        let mut short = [0u8; 2];
        self.tag(process_id, &secret[..2], &mut short);
        secret[2..4].copy_from_slice(&short);
        let mut long = [0u8; 8];
        self.tag(process_id, &secret[..ISSUED_KEY_LEN - 8], &mut long);
        secret[ISSUED_KEY_LEN - 8..].copy_from_slice(&long);
    }

    /// Whether `secret` carries a valid tag for `process_id`.
    fn verify(&self, process_id: u32, secret: &[u8]) -> bool {
        let (random, tag) = match secret.len() {
            4 => secret.split_at(2),
            ISSUED_KEY_LEN => secret.split_at(ISSUED_KEY_LEN - 8),
            _ => return false,
        };
        let mut expected = [0u8; 8];
        let expected = &mut expected[..tag.len()];
        self.tag(process_id, random, expected);
        bool::from(expected.ct_eq(tag))
    }

    /// Where a CancelRequest for `process_id` with `secret` goes.
    pub fn destination(&self, process_id: u32, secret: &[u8]) -> Destination {
        if process_id & FORWARDED != 0 {
            return Destination::Here(process_id & !FORWARDED);
        }
        let owner = (process_id >> INSTANCE_SHIFT) as u8;
        let own = self.instance_id();
        if owner == own || owner == 0 {
            return Destination::Here(process_id);
        }
        if !self.verify(process_id, secret) {
            return Destination::Nowhere;
        }
        let peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        match peers.get(&owner) {
            Some(addr) if self.advertise.parse() != Ok(*addr) => Destination::Peer(*addr),
            _ => Destination::Nowhere,
        }
    }
}

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
const INBOX_CAPACITY: usize = 1024;

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

/// Acts on a CancelRequest that arrived on a connection of this shard: in
/// a fleet, forwards it to the instance that owns the key (or drops a key
/// no instance issued); here, hands it to the shard that owns the session
/// and waits for it to act. Returns when the cancel has been acted on.
///
/// Postgres answers a CancelRequest with nothing, right or wrong, and
/// closes the connection once it has acted on it: clients (libpq's
/// PQcancel, and other instances forwarding a cancel) wait for that close,
/// so their next query cannot overtake the cancel. The caller closes the
/// connection after this returns.
pub(super) async fn handle(ctx: &ShardContext, mut request: CancelRequest) {
    if let Some(fleet) = &ctx.fleet {
        match fleet.destination(request.process_id, &request.secret_key) {
            Destination::Here(pid) => {
                request.from_peer = pid != request.process_id && fleet.is_peer(request.client.ip());
                request.process_id = pid;
            }
            Destination::Peer(addr) => {
                let result = forward_to_peer(addr, &request).await;
                ctx.metrics.cancel(result);
                audit::cancel(request.client, request.process_id, result);
                return;
            }
            Destination::Nowhere => {
                ctx.failures.failed(request.client.ip(), Instant::now());
                ctx.metrics.cancel("unknown_key");
                audit::cancel(request.client, request.process_id, "unknown_key");
                return;
            }
        }
    }
    let owner = ctx.cancels.owner(request.process_id);
    if owner == ctx.shard {
        serve_here(ctx, &request).await;
    } else {
        debug!(owner, "cancel request routed to its shard");
        // The owner drops `done` when it is through (or the router drops
        // the request when the inbox is full).
        let (done, finished) = flume::bounded(1);
        request.done = Some(done);
        ctx.cancels.route(request);
        let _ = monoio::time::timeout(FORWARD_CANCEL_TIMEOUT, finished.recv_async()).await;
    }
}

/// Acts on a cancel for a session of this shard: a matching key sends the
/// server's real key to the server; anything else is dropped unanswered.
pub async fn serve_here(ctx: &ShardContext, request: &CancelRequest) {
    let result = match ctx.cancel_keys.upstream_key(request) {
        None => {
            // Guessing keys counts against the source like guessing tokens.
            if !request.from_peer {
                ctx.failures.failed(request.client.ip(), Instant::now());
            }
            "unknown_key"
        }
        Some((key, route)) => {
            // The server the session logged in to, with the settings it
            // started under: routing may have picked any upstream, and a
            // reload may have moved them since.
            let tls = route.tls.as_deref();
            match crate::upstream::send_cancel(&route.config, tls, &key).await {
                Ok(()) => "forwarded",
                Err(e) => {
                    warn!(error = %e, "cancel request not forwarded");
                    "upstream_failed"
                }
            }
        }
    };
    ctx.metrics.cancel(result);
    audit::cancel(request.client, request.process_id, result);
}

/// How long forwarding a cancel to another instance may take.
const FORWARD_CANCEL_TIMEOUT: Duration = Duration::from_secs(5);

/// Sends a CancelRequest on to the instance that owns its session, marked
/// as forwarded, on a new connection, and waits for that instance to close
/// it (it has acted on the request by then, as Postgres does).
async fn forward_to_peer(addr: SocketAddr, request: &CancelRequest) -> &'static str {
    let mut msg = Vec::with_capacity(12 + request.secret_key.len());
    msg.extend_from_slice(&((12 + request.secret_key.len()) as i32).to_be_bytes());
    msg.extend_from_slice(&crate::protocol::startup::CANCEL_REQUEST_CODE.to_be_bytes());
    msg.extend_from_slice(&(request.process_id | FORWARDED).to_be_bytes());
    msg.extend_from_slice(&request.secret_key);
    let attempt = async {
        let mut stream = TcpStream::connect(addr).await?;
        let (res, _) = stream.write_all(msg).await;
        res?;
        let (res, _) = stream.read(vec![0u8; 64]).await;
        res.map(|_| ())
    };
    match monoio::time::timeout(FORWARD_CANCEL_TIMEOUT, attempt).await {
        Ok(Ok(())) => "forwarded_to_peer",
        Ok(Err(e)) => {
            warn!(peer = %addr, error = %e, "cancel request not forwarded to its instance");
            "peer_failed"
        }
        Err(_) => {
            warn!(peer = %addr, "cancel request not forwarded: the instance did not answer in time");
            "peer_failed"
        }
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

    fn route(name: &str) -> Arc<Route> {
        let text = format!(
            "listen = \"127.0.0.1:1\"\n[upstream]\nname = \"{name}\"\nhost = \"127.0.0.1\"\n\
             [tokens]\nfile = \"t.toml\"\n"
        );
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, text).unwrap();
        let settings =
            super::super::Settings::new(crate::config::Config::load(&p).unwrap()).unwrap();
        settings.routes[0].clone()
    }

    fn fleet(id: u8, key: &[u8]) -> Arc<Fleet> {
        let f = Arc::new(Fleet::new(key, format!("10.0.0.{id}:6432")));
        f.set_instance_id(id);
        f
    }

    const FLEET_KEY: &[u8] = b"0123456789abcdef0123456789abcdef";

    #[test]
    fn fleet_keys_carry_the_instance_and_a_tag_any_member_can_check() {
        let a = fleet(7, FLEET_KEY);
        let b = fleet(9, FLEET_KEY);
        b.set_peers([(7, "10.0.0.7:6432".parse().unwrap())].into());
        let outsider = fleet(9, b"another key, another fleet, 32+ bytes");
        outsider.set_peers([(7, "10.0.0.7:6432".parse().unwrap())].into());
        for shard in 0..3 {
            let keys = Rc::new(Keys::new(shard, 3, Some(a.clone())));
            let router = Router::new(3, true);
            for _ in 0..100 {
                let r = keys.reserve();
                let pid = r.process_id;
                assert!(pid > 0 && pid <= i32::MAX as u32);
                assert_eq!(pid >> INSTANCE_SHIFT, 7);
                assert_eq!(router.owner(pid), shard);
                // Both lengths a client may be given carry a valid tag.
                for secret in [&r.secret[..4], &r.secret[..]] {
                    assert_eq!(a.destination(pid, secret), Destination::Here(pid));
                    assert_eq!(
                        b.destination(pid, secret),
                        Destination::Peer("10.0.0.7:6432".parse().unwrap())
                    );
                    assert_eq!(outsider.destination(pid, secret), Destination::Nowhere);
                }
                let mut wrong = r.secret;
                wrong[3] ^= 1;
                assert_eq!(b.destination(pid, &wrong[..4]), Destination::Nowhere);
                wrong = r.secret;
                wrong[31] ^= 1;
                assert_eq!(b.destination(pid, &wrong[..]), Destination::Nowhere);
                // Another process id, the same secret: the tag covers both.
                assert_eq!(b.destination(pid ^ 1, &r.secret[..4]), Destination::Nowhere);
                assert_eq!(b.destination(pid, &r.secret[..8]), Destination::Nowhere);
                // Forwarded once, never again: the mark makes it local.
                assert_eq!(
                    b.destination(pid | FORWARDED, &r.secret[..4]),
                    Destination::Here(pid)
                );
            }
        }
        // An owner not in the registry, or an instance's own address.
        let lost = fleet(9, FLEET_KEY);
        let keys = Rc::new(Keys::new(0, 1, Some(a.clone())));
        let r = keys.reserve();
        assert_eq!(
            lost.destination(r.process_id, &r.secret[..4]),
            Destination::Nowhere
        );
        lost.set_peers([(7, "10.0.0.9:6432".parse().unwrap())].into());
        assert_eq!(
            lost.destination(r.process_id, &r.secret[..4]),
            Destination::Nowhere
        );
    }

    #[test]
    fn process_ids_name_their_shard_and_stay_positive() {
        for shard in 0..3 {
            let keys = Rc::new(Keys::new(shard, 3, None));
            let router = Router::new(3, false);
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
        let keys = Rc::new(Keys::new(0, 1, None));
        let r = keys.reserve();
        let issued = key(r.process_id, &r.secret[..4]);
        let ask = |secret: &[u8]| {
            keys.upstream_key(&CancelRequest {
                process_id: r.process_id,
                secret_key: secret.into(),
                client: ([127, 0, 0, 1], 1).into(),
                from_peer: false,
                done: None,
            })
        };
        // Before the login completes nothing matches, not even empty.
        assert!(ask(&r.secret[..4]).is_none());
        assert!(ask(&[]).is_none());
        let server = route("two");
        r.activate(&issued, key(4242, &[9, 9, 9, 9]), server.clone());
        let (found, found_route) = ask(&r.secret[..4]).unwrap();
        assert_eq!(found, key(4242, &[9, 9, 9, 9]));
        // The cancel goes to the server the session was routed to.
        assert!(Arc::ptr_eq(&found_route, &server));
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
                from_peer: false,
                done: None,
            })
            .is_none());
        let pid = r.process_id;
        drop(r);
        assert!(keys
            .upstream_key(&CancelRequest {
                process_id: pid,
                secret_key: issued.secret_key.clone(),
                client: ([127, 0, 0, 1], 1).into(),
                from_peer: false,
                done: None,
            })
            .is_none());
    }

    #[test]
    fn a_full_inbox_drops_instead_of_growing() {
        let router = Router::new(2, false);
        for _ in 0..INBOX_CAPACITY + 10 {
            router.route(CancelRequest {
                process_id: 1,
                secret_key: Box::new([0; 4]),
                client: ([127, 0, 0, 1], 1).into(),
                from_peer: false,
                done: None,
            });
        }
        let inbox = router.take_inbox(1).unwrap();
        assert_eq!(inbox.len(), INBOX_CAPACITY);
        assert!(router.take_inbox(1).is_none());
        assert!(router.take_inbox(0).unwrap().is_empty());
    }
}
