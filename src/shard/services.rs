//! What each shard serves besides its clients, for as long as it runs:
//! cancel requests routed here by other shards, the requests of the bus
//! (metrics, sessions, terminations from the admin thread; the drain from
//! the main thread). Each reads only this shard's own state, on its own
//! thread; answers are built here and sent whole.

use std::rc::Rc;
use std::time::Duration;

use crate::session::kill::KillReason;
use crate::session::{cancel, ShardContext};

use super::bus::Request;

/// Answers the cancels other shards ask about, for as long as the shard
/// runs: a lookup in this shard's key table, no I/O (the asking shard
/// sends the cancel on).
pub(super) async fn serve_routed_cancels(ctx: Rc<ShardContext>) {
    let Some(inbox) = ctx.cancels.take_inbox(ctx.shard) else {
        return;
    };
    while let Ok(request) = inbox.recv_async().await {
        cancel::answer_routed(&ctx, &request);
    }
}

/// Answers the bus.
pub(super) async fn serve_bus(ctx: Rc<ShardContext>, inbox: flume::Receiver<Request>) {
    while let Ok(request) = inbox.recv_async().await {
        // A requester that gave up has dropped its receiver; nothing to do.
        match request {
            Request::Ping(reply) => {
                let _ = reply.try_send(());
            }
            Request::Metrics(reply) => {
                let live = ctx.registry.live_totals();
                let active = ctx.registry.len() as u64;
                let mut snapshot = ctx.metrics.snapshot(live, active);
                snapshot.pools = ctx.pools.views();
                let _ = reply.try_send(snapshot);
            }
            Request::Sessions(reply) => {
                let _ = reply.try_send(ctx.registry.views());
            }
            Request::Terminate { number, reply } => {
                let _ = reply.try_send(ctx.registry.terminate(number));
            }
            Request::Drain { deadline, reply } => {
                monoio::spawn(drain(ctx.clone(), deadline, reply));
            }
        }
    }
}

/// How often a draining shard looks whether its sessions are gone.
const DRAIN_POLL: Duration = Duration::from_millis(50);
/// After the drain deadline, how long ended sessions get to say goodbye
/// (the FATAL message, the server's Terminate) before the shard reports.
const DRAIN_GRACE: Duration = Duration::from_secs(2);

/// Stops accepting, waits for the shard's sessions to end on their own
/// until `deadline`, then ends the rest with 57P01, and reports how many
/// it ended once none is left (or the grace time is over).
async fn drain(ctx: Rc<ShardContext>, deadline: std::time::Instant, reply: flume::Sender<usize>) {
    ctx.draining.set();
    let busy = || ctx.accepting() || !ctx.registry.is_empty() || ctx.starting() > 0;
    while busy() && std::time::Instant::now() < deadline {
        monoio::time::sleep(DRAIN_POLL).await;
    }
    let ended = ctx.registry.end_all(KillReason::Shutdown);
    let grace = std::time::Instant::now() + DRAIN_GRACE;
    while busy() && std::time::Instant::now() < grace {
        monoio::time::sleep(DRAIN_POLL).await;
    }
    let _ = reply.try_send(ended);
}
