//! One client connection from accept to close: the PROXY header from a
//! trusted balancer, the start-up (upgrading to TLS when asked), the token
//! check, the upstream login, then the relay, and the audit event of how it
//! ended. The session owns its sockets and buffers and never leaves the
//! shard that accepted it.
//!
//! What serves the shard as a whole (routed cancels, the admin bus, the
//! drain) lives in [`crate::shard`]; what a shard's sessions share is
//! [`ShardContext`].
//!
//! <https://www.postgresql.org/docs/current/protocol-flow.html>

mod borrow;
pub mod cancel;
mod context;
mod established;
pub mod failures;
pub mod kill;
pub mod latch;
mod limits;
mod params;
pub mod pending;
mod proxy_header;
mod refusal;
mod relay;
mod settings;
mod startup;
mod token_check;
pub mod txpool;
pub mod watch;

pub use borrow::maintain as maintain_pools;
pub use context::{ShardContext, Shared};
pub use refusal::out_of_fds_response;
/// The relay's per-session tracking, public for `bench/tracks.rs`.
pub use relay::{SessionStats, Timing, Tracks};
pub use settings::{Route, Settings};

use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use bytes::BytesMut;
use monoio::time::timeout_at;
use tracing::{warn, Instrument};

use crate::audit::{Attempt, SessionId};
use crate::error::ClientError;
use crate::handshake::{AwaitStartup, Phase};
use crate::metrics::ShardMetrics;
use crate::net::{Peer, Stream};
use crate::protocol::sqlstate;

use context::Starting;
use refusal::{close_with, encode, refused, Refusal, Reply};
use startup::StartupOutcome;

/// The client stream once TLS is up.
type ClientTls = crate::tls::stream::TlsStream;

/// The relay phase of a session, boxed so that it runs outside the
/// session's tracing span: entering a span on every poll of the hot path
/// costs more than the relay's own framing.
type RelayTask = Pin<Box<dyn Future<Output = ()>>>;

/// Per-connection facts the start-up needs.
struct Start {
    id: SessionId,
    /// The settings this session runs under, from connect to close.
    settings: Arc<Settings>,
    peer: Peer,
    deadline: monoio::time::Instant,
    over_limit: bool,
    started: Instant,
    started_at: SystemTime,
}

/// Holds one slot of `max_connections` until dropped, and counts the
/// connection as open in the shard's metrics meanwhile.
struct ConnectionSlot(Arc<AtomicUsize>, Rc<ShardMetrics>);

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
        self.1.connection_closed();
    }
}

/// Runs a client connection to completion. Never panics on client input;
/// every attempt leaves one audit event with its real outcome.
///
/// The connection counts as starting from this call on, before the future
/// first runs: a drain that looked between the accept and the task's
/// first poll would otherwise see an idle shard and let the process exit
/// with the connection in it.
pub fn run(ctx: Rc<ShardContext>, client: Stream, peer: Peer) -> impl Future<Output = ()> {
    let starting = Starting::enter(&ctx);
    serve_connection(ctx, client, peer, starting)
}

async fn serve_connection(ctx: Rc<ShardContext>, client: Stream, peer: Peer, starting: Starting) {
    let open = ctx.connections.fetch_add(1, Ordering::Relaxed);
    ctx.metrics.connection_opened();
    let _slot = ConnectionSlot(ctx.connections.clone(), ctx.metrics.clone());
    let id = ctx.next_session_id();
    let settings = ctx.settings();
    let config = &settings.config;
    let start = Start {
        id,
        peer,
        deadline: monoio::time::Instant::now() + config.startup_timeout,
        over_limit: open >= config.max_connections,
        started: Instant::now(),
        started_at: SystemTime::now(),
        settings,
    };
    // Boxed so that its memory is returned once the start-up is over: a
    // future is as large as its largest state, and the start-up's (TLS
    // handshake, login) would otherwise stay allocated for the whole life
    // of an idle session.
    let startup = Box::pin(async move {
        let mut start = start;
        let mut client = client;
        let mut input = BytesMut::with_capacity(1024);
        if proxy_header::from_trusted_balancer(&start) {
            // Before anything else, so that every rule, limit and log line
            // sees the real client.
            match proxy_header::read(&mut client, &mut input, &start).await {
                Ok(Some(real)) => start.peer = Peer::Tcp(real),
                Ok(None) => {}
                Err(refusal) => {
                    let attempt = Attempt::default();
                    return finish(&ctx, client, input, Err(refusal), &start, attempt).await;
                }
            }
        }
        let span =
            tracing::info_span!("session", id = %id, shard = ctx.shard, client = %start.peer);
        serve(ctx, client, start, input).instrument(span).await
    });
    let relay = startup.await;
    // An established session is in the registry by now.
    drop(starting);
    if let Some(relay) = relay {
        relay.await;
    }
}

/// The start-up of a connection whose real peer is known: admission, the
/// start-up on plain TCP, then, if the client asked for it, TLS and the
/// rest of the start-up inside it.
async fn serve(
    ctx: Rc<ShardContext>,
    mut client: Stream,
    start: Start,
    mut input: BytesMut,
) -> Option<RelayTask> {
    client.set_nodelay();
    client.set_keepalive(start.settings.config.tcp_keepalive);
    let mut attempt = Attempt::default();
    // Held until this function returns: the start-up is over then, and an
    // established session's relay runs outside it.
    let _pending = match admit(&ctx, &mut client, &mut input, &start).await {
        Ok(pending) => pending,
        Err(refusal) => return finish(&ctx, client, input, Err(refusal), &start, attempt).await,
    };
    let policy = startup::policy(&start.settings.config, &start.peer);
    let phase = Phase::Startup(AwaitStartup::with_policy(policy));
    let outcome =
        startup::start_up(&ctx, &mut client, &mut input, phase, &start, &mut attempt).await;
    let Ok(StartupOutcome::StartTls { next, direct }) = outcome else {
        return finish(&ctx, client, input, outcome, &start, attempt).await;
    };
    // For direct TLS the ClientHello is already in `input`: rustls reads it.
    let prefix = std::mem::take(&mut input).to_vec();
    let (mut tls, alpn_postgresql) = accept_tls(&ctx, client, prefix, &start, &mut attempt).await?;
    if direct && !alpn_postgresql {
        // PostgreSQL requires ALPN on direct TLS, so that a TLS connection
        // meant for another protocol cannot be replayed into this one.
        let e = ClientError::new(
            sqlstate::PROTOCOL_VIOLATION,
            "direct_tls_without_alpn",
            "direct TLS connection without ALPN protocol \"postgresql\"",
        );
        return finish(&ctx, tls, input, Err(e.into()), &start, attempt).await;
    }
    let outcome = startup::start_up(&ctx, &mut tls, &mut input, next, &start, &mut attempt).await;
    finish(&ctx, tls, input, outcome, &start, attempt).await
}

/// The checks made before any of the start-up is read: the source's recent
/// authentication failures, its start-ups in progress, and (behind load
/// balancers) a PROXY header from a peer that may not send one. Returns
/// the source's pending slot, held for the rest of the start-up.
async fn admit(
    ctx: &ShardContext,
    client: &mut Stream,
    input: &mut BytesMut,
    start: &Start,
) -> Result<pending::Pending, Refusal> {
    if ctx.failures.is_blocked(start.peer.ip(), Instant::now()) {
        // Refused before reading anything: a flood of bad tokens costs one
        // lookup per connection, no parsing, no TLS, no hashing.
        return Err(ClientError::too_many_auth_failures().into());
    }
    let Some(pending) = ctx.pending.enter(start.peer.ip()) else {
        return Err(ClientError::too_many_pending_from_source().into());
    };
    if start.settings.config.proxy_protocol
        && input.is_empty()
        && !proxy_header::from_trusted_balancer(start)
    {
        proxy_header::refuse_untrusted(client, input, start).await?;
    }
    Ok(pending)
}

/// The TLS handshake of a client that asked for TLS, before the start-up
/// deadline. A failure is recorded here (no error can reach a client whose
/// handshake failed) and returns `None`.
async fn accept_tls(
    ctx: &ShardContext,
    client: Stream,
    prefix: Vec<u8>,
    start: &Start,
    attempt: &mut Attempt,
) -> Option<(ClientTls, bool)> {
    // The start-up policy offers TLS on TCP only.
    let (Some(tls_config), Stream::Tcp(client)) = (ctx.tls_config(), client) else {
        warn!("TLS requested but no acceptor is configured for this connection");
        refused(ctx, start, attempt, &ClientError::internal().into());
        return None;
    };
    let handshake_started = Instant::now();
    let pool = ctx.relay_buffers.clone();
    let accept = crate::tls::accept::accept(tls_config, client, prefix, pool);
    let handshake = timeout_at(start.deadline, accept).await;
    let took = handshake_started.elapsed();
    let failure = match handshake {
        Ok(Ok((s, accepted))) => {
            ctx.metrics.tls_handshake(true, took);
            attempt.tls = accepted.version;
            return Some((s, accepted.alpn_postgresql));
        }
        Ok(Err(e)) => {
            let mut refusal = Refusal::new("tls_handshake", Reply::Nothing);
            refusal.detail = Some(crate::tls::describe_error(e));
            refusal
        }
        Err(_) => Refusal::new("startup_timeout", Reply::Nothing),
    };
    ctx.metrics.tls_handshake(false, took);
    refused(ctx, start, attempt, &failure);
    None
}

/// Ends a start-up: returns the relay of an established session, or acts
/// on a cancel, or sends the refusal and closes.
async fn finish<C: relay::ClientSide + 'static>(
    ctx: &Rc<ShardContext>,
    client: C,
    input: BytesMut,
    outcome: Result<StartupOutcome, Refusal>,
    start: &Start,
    attempt: Attempt,
) -> Option<RelayTask> {
    let refusal = match outcome {
        Ok(StartupOutcome::Session(est)) => {
            let tls = attempt.tls;
            return Some(established::established(
                ctx, client, input, *est, start, tls,
            ));
        }
        Ok(StartupOutcome::Cancel(request)) => {
            cancel::handle(ctx, request).await;
            // Closed only now that the cancel was acted on (see `handle`).
            drop(client);
            return None;
        }
        // The state machine never asks twice; treat it as a violation.
        Ok(StartupOutcome::StartTls { .. }) => ClientError::internal().into(),
        Err(refusal) => refusal,
    };
    refused(ctx, start, &attempt, &refusal);
    match refusal.reply {
        Reply::Nothing => {}
        Reply::Close => close_with(client, BytesMut::new()).await,
        Reply::Client(e) => close_with(client, encode(&e)).await,
        Reply::Relay(bytes) => close_with(client, BytesMut::from(&bytes[..])).await,
    }
    None
}
