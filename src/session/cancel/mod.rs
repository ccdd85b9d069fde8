//! Query cancellation with tollgate's own keys.
//!
//! Each client gets a BackendKeyData with its backend's real process id and
//! a secret tollgate drew ([`keys`]); the server's real secret stays with
//! tollgate. A CancelRequest arrives on a new connection, on whichever
//! shard the kernel picked. That shard looks in its own key table and asks
//! the other shards by message passing (one bounded channel per shard)
//! what theirs say, each shard being the only thread that touches its
//! table; with exactly one session found, it sends the server's real key
//! to that session's server on a new connection, and records the one audit
//! event.
//!
//! Nothing here runs per message: a key is issued once per session and a
//! cancel is rare. A wrong or unknown key is dropped without a word, as
//! Postgres does, and counts against the source like a bad token; a flood
//! of guesses costs an accept, a channel send per shard and a hash lookup
//! each, and a full channel drops the surplus.
//!
//! In a fleet (`[fleet]`), the load balancer may send the CancelRequest to
//! another instance than the one serving the session. Secrets then carry
//! the owner's instance id and a tag made with the fleet's shared cancel
//! key ([`Fleet`]): any instance can tell a key some instance issued from a
//! guess, and forwards only the former, as a plain CancelRequest, to the
//! owner's advertised address. Nothing else is shared; the owner still
//! checks the whole secret against its table.
//!
//! [`handle`] acts on a CancelRequest that arrived on this shard;
//! [`answer_routed`] is another shard's side (`crate::shard`).
//!
//! <https://www.postgresql.org/docs/current/protocol-flow.html#PROTOCOL-FLOW-CANCELING-REQUESTS>

mod fleet;
mod keys;
mod router;

pub use fleet::{Destination, Fleet, FORWARD_MARK};
pub use keys::{CancelSignal, Keys, Lookup, Reservation};
pub use router::{CancelRequest, Router};

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
use monoio::net::TcpStream;
use tracing::{debug, warn};

use super::{Route, ShardContext};
use crate::audit;
use crate::protocol::backend::BackendKey;

/// Acts on a CancelRequest that arrived on a connection of this shard: in
/// a fleet, forwards it to the instance that owns the key (or drops a key
/// no instance issued); here, finds the session on this shard or asks the
/// others, and sends the server's key to its server. Returns when the
/// cancel has been acted on, with its one audit event recorded.
///
/// Postgres answers a CancelRequest with nothing, right or wrong, and
/// closes the connection once it has acted on it: clients (libpq's
/// PQcancel, and other instances forwarding a cancel) wait for that close,
/// so their next query cannot overtake the cancel. The caller closes the
/// connection after this returns.
pub(super) async fn handle(ctx: &ShardContext, mut request: CancelRequest) {
    if let Some(fleet) = &ctx.fleet {
        // A Unix-socket client counts as 127.0.0.1, never as a peer.
        let forwarded = (!request.client.is_local())
            .then(|| fleet.forwarded(request.client.ip(), &request.secret_key))
            .flatten();
        if let Some(original) = forwarded {
            request.secret_key = original.into();
            request.from_peer = true;
        } else {
            match fleet.destination(request.process_id, &request.secret_key) {
                Destination::Here => {}
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
    }
    let (lookup, all_answered) = find_session(ctx, &request).await;
    let result = match lookup {
        Lookup::One(key, route) => send_upstream(&key, &route).await,
        // Two sessions with this key: cancelling either could stop the
        // wrong query.
        Lookup::Ambiguous => "ambiguous_key",
        // The session acts on it: a cancel to the connection lent to it,
        // if any. Waited for, as a server's close is.
        Lookup::Delegated(done) => {
            let _ = monoio::time::timeout(FORWARD_CANCEL_TIMEOUT, done.recv_async()).await;
            "delegated"
        }
        // A shard that did not answer may hold it: not the client's fault.
        Lookup::None if !all_answered => "unanswered",
        Lookup::None => {
            // Guessing keys counts against the source like guessing tokens.
            if !request.from_peer {
                ctx.failures.failed(request.client.ip(), Instant::now());
            }
            "unknown_key"
        }
    };
    ctx.metrics.cancel(result);
    audit::cancel(request.client, request.process_id, result);
}

/// What all shards' key tables say of `request`: this shard's own first,
/// then the others', asked over their inboxes and awaited until every one
/// answered or the time is up. Also says whether every shard answered.
async fn find_session(ctx: &ShardContext, request: &CancelRequest) -> (Lookup, bool) {
    let mut found = ctx.cancel_keys.lookup(request);
    let others = ctx.cancels.shards() - 1;
    if others == 0 {
        return (found, true);
    }
    let (reply, answers) = flume::bounded(others);
    for shard in (0..ctx.cancels.shards()).filter(|&s| s != ctx.shard) {
        let mut asked = request.clone();
        asked.reply = Some(reply.clone());
        ctx.cancels.route(shard, asked);
    }
    // Each shard answers once and drops its sender (as does the router,
    // for a request it could not deliver): the channel ends with the last.
    drop(reply);
    let mut answered = 0;
    let collect = async {
        while let Ok(answer) = answers.recv_async().await {
            answered += 1;
            found = match (std::mem::replace(&mut found, Lookup::None), answer) {
                (f, Lookup::None) => f,
                (Lookup::None, one @ (Lookup::One(..) | Lookup::Delegated(_))) => one,
                _ => Lookup::Ambiguous,
            };
        }
    };
    let _ = monoio::time::timeout(FORWARD_CANCEL_TIMEOUT, collect).await;
    (found, answered == others)
}

/// Another shard's question: what this shard's key table says of it.
pub fn answer_routed(ctx: &ShardContext, request: &CancelRequest) {
    if let Some(reply) = &request.reply {
        let found = ctx.cancel_keys.lookup(request);
        if matches!(found, Lookup::One(..)) {
            debug!("cancel request routed to its shard");
        }
        let _ = reply.try_send(found);
    }
}

/// Sends the server's real key to the server the session logged in to,
/// with the settings it started under: routing may have picked any
/// upstream, and a reload may have moved them since.
async fn send_upstream(key: &BackendKey, route: &Route) -> &'static str {
    let tls = route.tls.as_deref();
    match crate::upstream::send_cancel(&route.config, tls, key).await {
        Ok(()) => "forwarded",
        Err(e) => {
            warn!(error = %e, "cancel request not forwarded");
            "upstream_failed"
        }
    }
}

/// How long forwarding a cancel to another instance may take.
const FORWARD_CANCEL_TIMEOUT: Duration = Duration::from_secs(5);

/// Sends a CancelRequest on to the instance that owns its session, marked
/// as forwarded, on a new connection, and waits for that instance to close
/// it (it has acted on the request by then, as Postgres does).
async fn forward_to_peer(addr: SocketAddr, request: &CancelRequest) -> &'static str {
    let mut msg = Vec::with_capacity(12 + request.secret_key.len());
    msg.extend_from_slice(&((13 + request.secret_key.len()) as i32).to_be_bytes());
    msg.extend_from_slice(&crate::protocol::startup::CANCEL_REQUEST_CODE.to_be_bytes());
    msg.extend_from_slice(&request.process_id.to_be_bytes());
    msg.extend_from_slice(&request.secret_key);
    msg.push(FORWARD_MARK);
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
    use std::rc::Rc;
    use std::sync::Arc;

    use super::router::INBOX_CAPACITY;
    use super::*;
    use crate::protocol::backend::BackendKey;
    use crate::session::Route;

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

    fn request(pid: u32, secret: &[u8]) -> CancelRequest {
        CancelRequest {
            process_id: pid,
            secret_key: secret.into(),
            client: std::net::SocketAddr::from(([127, 0, 0, 1], 1)).into(),
            from_peer: false,
            reply: None,
        }
    }

    const FLEET_KEY: &[u8] = b"0123456789abcdef0123456789abcdef";

    /// A fleet session's secret as the login leaves it: drawn, then sealed
    /// for the backend's process id.
    fn sealed(keys: &Rc<Keys>, pid: u32) -> Reservation {
        let mut r = keys.reserve();
        keys.sealer().expect("a fleet sealer")(pid, &mut r.secret);
        r
    }

    #[test]
    fn fleet_keys_carry_the_instance_and_a_tag_any_member_can_check() {
        let a = fleet(7, FLEET_KEY);
        let b = fleet(9, FLEET_KEY);
        b.set_peers([(7, "10.0.0.7:6432".parse().unwrap())].into());
        let outsider = fleet(9, b"another key, another fleet, 32+ bytes");
        outsider.set_peers([(7, "10.0.0.7:6432".parse().unwrap())].into());
        let keys = Rc::new(Keys::new(Some(a.clone())));
        // A backend's process id: whatever the server chose, any of 32 bits.
        for pid in [48_213, 0x8000_0001] {
            for _ in 0..100 {
                let r = sealed(&keys, pid);
                assert_eq!(r.secret[0], 7, "the instance id leads the secret");
                // Both lengths a client may be given carry a valid tag.
                for secret in [&r.secret[..4], &r.secret[..]] {
                    assert_eq!(a.destination(pid, secret), Destination::Here);
                    assert_eq!(
                        b.destination(pid, secret),
                        Destination::Peer("10.0.0.7:6432".parse().unwrap())
                    );
                    assert_eq!(outsider.destination(pid, secret), Destination::Nowhere);
                    // The tag covers the process id: the same secret names
                    // no session of another backend.
                    assert_eq!(b.destination(pid ^ 1, secret), Destination::Nowhere);
                }
                let mut wrong = r.secret;
                wrong[1] ^= 1;
                assert_eq!(b.destination(pid, &wrong[..4]), Destination::Nowhere);
                wrong = r.secret;
                wrong[31] ^= 1;
                assert_eq!(b.destination(pid, &wrong[..]), Destination::Nowhere);
                // Another instance byte with the same tag: not a key of the fleet.
                wrong = r.secret;
                wrong[0] = 8;
                assert_eq!(b.destination(pid, &wrong[..4]), Destination::Nowhere);
                assert_eq!(b.destination(pid, &r.secret[..8]), Destination::Nowhere);
            }
        }
        // An owner not in the registry, or an instance's own address.
        let lost = fleet(9, FLEET_KEY);
        let r = sealed(&keys, 77);
        assert_eq!(lost.destination(77, &r.secret[..4]), Destination::Nowhere);
        lost.set_peers([(7, "10.0.0.9:6432".parse().unwrap())].into());
        assert_eq!(lost.destination(77, &r.secret[..4]), Destination::Nowhere);
    }

    #[test]
    fn a_forward_mark_is_believed_only_from_another_instance() {
        let b = fleet(9, FLEET_KEY);
        b.set_peers([(7, "10.0.0.7:6432".parse().unwrap())].into());
        let peer = "10.0.0.7".parse().unwrap();
        let stranger = "192.0.2.1".parse().unwrap();
        for len in [4, 32] {
            let mut marked = vec![1u8; len];
            marked.push(FORWARD_MARK);
            assert_eq!(b.forwarded(peer, &marked), Some(&marked[..len]));
            assert_eq!(b.forwarded(stranger, &marked), None);
            marked[len] = 0;
            assert_eq!(b.forwarded(peer, &marked), None);
        }
        // A client's own 4- or 32-byte secret is never taken as marked.
        assert_eq!(b.forwarded(peer, &[1, 2, 3, FORWARD_MARK]), None);
    }

    #[test]
    fn secrets_are_random_and_released_with_their_session() {
        let keys = Rc::new(Keys::new(None));
        let server = route("one");
        let held: Vec<_> = (0..200)
            .map(|i| {
                let r = keys.reserve();
                let issued = key(1000 + i, &r.secret[..4]);
                r.activate(&issued, key(1000 + i, &[1, 2, 3, 4]), server.clone());
                r
            })
            .collect();
        assert_eq!(keys.len(), 200);
        // 200 draws of 32 random bits: no two alike (a collision has odds
        // of about 5 in a million).
        let mut firsts: Vec<[u8; 4]> = held
            .iter()
            .map(|r| r.secret[..4].try_into().unwrap())
            .collect();
        firsts.sort();
        firsts.dedup();
        assert_eq!(firsts.len(), 200);
        drop(held);
        assert_eq!(keys.len(), 0);
    }

    #[test]
    fn only_the_exact_issued_key_finds_the_upstream_key() {
        let none = |lookup: Lookup| matches!(lookup, Lookup::None);
        let keys = Rc::new(Keys::new(None));
        let r = keys.reserve();
        let pid = 4242;
        let issued = key(pid, &r.secret[..4]);
        // Before the login completes nothing matches.
        assert!(none(keys.lookup(&request(pid, &r.secret[..4]))));
        assert!(none(keys.lookup(&request(pid, &[]))));
        let server = route("two");
        r.activate(&issued, key(pid, &[9, 9, 9, 9]), server.clone());
        let Lookup::One(found, found_route) = keys.lookup(&request(pid, &r.secret[..4])) else {
            panic!("the issued key found nothing");
        };
        assert_eq!(found, key(pid, &[9, 9, 9, 9]));
        // The cancel goes to the server the session was routed to.
        assert!(Arc::ptr_eq(&found_route, &server));
        let mut wrong = r.secret;
        wrong[3] ^= 1;
        assert!(none(keys.lookup(&request(pid, &wrong[..4]))));
        // A longer key that starts right is still wrong.
        assert!(none(keys.lookup(&request(pid, &r.secret[..]))));
        // The right secret with another process id is wrong too.
        assert!(none(keys.lookup(&request(pid ^ 2, &r.secret[..4]))));

        // Another server behind tollgate may use the same process id: each
        // session is found by its own secret, and released alone.
        let other = keys.reserve();
        let other_key = key(pid, &other.secret[..4]);
        other.activate(&other_key, key(pid, &[7, 7, 7, 7]), server.clone());
        let Lookup::One(found, _) = keys.lookup(&request(pid, &other.secret[..4])) else {
            panic!("the second session's key found nothing");
        };
        assert_eq!(found, key(pid, &[7, 7, 7, 7]));
        // A third session with the very same key (a 1-in-256 draw in a
        // fleet under protocol 3.0): a cancel with it stops neither.
        let twin = keys.reserve();
        twin.activate(&other_key, key(pid, &[5; 4]), server);
        let ambiguous = keys.lookup(&request(pid, &other.secret[..4]));
        assert!(matches!(ambiguous, Lookup::Ambiguous));
        drop(twin);
        drop(r);
        assert!(none(keys.lookup(&request(pid, &issued.secret_key))));
        let one = keys.lookup(&request(pid, &other.secret[..4]));
        assert!(matches!(one, Lookup::One(..)));
        drop(other);
        assert_eq!(keys.len(), 0);
    }

    /// A shard context over a one-upstream config with `workers` shards
    /// and one failed guess allowed per source.
    fn shard_zero(workers: usize) -> (Rc<ShardContext>, Arc<crate::session::Shared>) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(dir.path().join("t.toml"), "").unwrap();
        std::fs::write(
            &p,
            format!(
                "listen = \"127.0.0.1:1\"\nworkers = {workers}\nauth_failure_limit = 1\n\
                 [upstream]\nhost = \"127.0.0.1\"\n[tokens]\nfile = \"t.toml\"\n"
            ),
        )
        .unwrap();
        let config = crate::config::Config::load(&p).unwrap();
        let store = crate::auth::live::LiveStore::load(&dir.path().join("t.toml")).unwrap();
        let settings = crate::session::Settings::new(config).unwrap();
        let shared = Arc::new(crate::session::Shared::new(
            settings, store, None, None, None,
        ));
        (Rc::new(ShardContext::new(0, &shared)), shared)
    }

    /// A shard that cannot be asked (here its inbox is full; it may as well
    /// be stuck) leaves a cancel `unanswered`: nothing is sent upstream,
    /// and the key does not count against the client as a guess, since it
    /// may well be that shard's. With every shard answering, the same
    /// unknown key is a guess.
    #[test]
    fn a_shard_that_does_not_answer_leaves_the_cancel_unanswered() {
        let localhost = std::net::IpAddr::from([127, 0, 0, 1]);
        let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()
            .unwrap();
        let (ctx, shared) = shard_zero(2);
        // Shard 1 never runs here; its inbox fills up.
        for _ in 0..INBOX_CAPACITY {
            shared.cancels.route(1, request(1, &[0; 4]));
        }
        rt.block_on(handle(&ctx, request(77, &[1, 2, 3, 4])));
        let cancels = ctx.metrics.snapshot(Default::default(), 0).cancels;
        assert_eq!(cancels.get("unanswered"), 1);
        assert_eq!(cancels.get("unknown_key"), 0);
        assert!(!shared.failures.is_blocked(localhost, Instant::now()));

        let (ctx, shared) = shard_zero(1);
        rt.block_on(handle(&ctx, request(77, &[1, 2, 3, 4])));
        assert_eq!(
            ctx.metrics
                .snapshot(Default::default(), 0)
                .cancels
                .get("unknown_key"),
            1
        );
        assert!(shared.failures.is_blocked(localhost, Instant::now()));
    }

    #[test]
    fn a_full_inbox_drops_instead_of_growing() {
        let router = Router::new(2);
        for _ in 0..INBOX_CAPACITY + 10 {
            router.route(1, request(1, &[0; 4]));
        }
        let inbox = router.take_inbox(1).unwrap();
        assert_eq!(inbox.len(), INBOX_CAPACITY);
        assert!(router.take_inbox(1).is_none());
        assert!(router.take_inbox(0).unwrap().is_empty());
    }
}
