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

mod fleet;
mod keys;
mod router;

pub use fleet::{Destination, Fleet, FORWARDED};
pub use keys::{Keys, Reservation};
pub use router::{CancelRequest, Router};

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
use monoio::net::TcpStream;
use tracing::{debug, warn};

use super::ShardContext;
use crate::audit;

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
    use std::rc::Rc;
    use std::sync::Arc;

    use super::fleet::INSTANCE_SHIFT;
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
