//! One client connection from accept to close: drives the start-up state
//! machine (upgrading to TLS when asked), checks the token, logs in
//! upstream, then relays bytes.
//!
//! The session owns its sockets and buffers and never leaves the shard that
//! accepted it.

pub mod cancel;
pub mod failures;
mod kill;
mod limits;
pub mod pending;
mod relay;
pub mod watch;

/// The relay's per-session tracking, public for `bench/tracks.rs`.
pub use relay::{SessionStats, Timing, Tracks};

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::BytesMut;
use monoio::io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt};
use monoio::net::TcpStream;
use monoio::time::timeout_at;
use tracing::{debug, warn, Instrument};

use crate::admin::bus::{Bus, Request as AdminRequest};
use crate::audit::{self, Attempt, SessionId};
use crate::auth::jwt::{JwtRejection, JwtVerifier, VerifiedJwt};
use crate::auth::live::{LiveJwt, LiveStore};
use crate::auth::{Grant, Presenter, TokenStore};
use crate::config::{ClientTlsMode, Config};
use crate::error::ClientError;
use crate::handshake::{self, AwaitStartup, ClientStartup, Phase, Progress, StartupPolicy};
use crate::io_util::read_append;
use crate::metrics::{ShardMetrics, TokenSeriesLimit};
use crate::protocol::sqlstate;
use crate::protocol::startup::MAX_STARTUP_PACKET_LENGTH;
use crate::reload::{Published, ShardCopy};
use crate::secret::Secret;
use crate::tls::{ServerTls, UpstreamTls, ALPN_POSTGRESQL};
use crate::upstream::login::LoginError;
use crate::upstream::scram::KeyCache;
use crate::upstream::{self, Upstream, UpstreamError, UpstreamStream};

/// The client stream once TLS is up.
type ClientTls = crate::tls::accept::ServerTlsStream<TcpStream>;

/// What a shard's sessions share: read-only configuration and tokens, and
/// shard-local caches (`!Send`, never touched by another thread).
pub struct ShardContext {
    pub shard: usize,
    /// What a reload can change, and this shard's copy of it.
    published: Arc<Published<Settings>>,
    settings: ShardCopy<Settings>,
    /// The live store, and this shard's copy of its current snapshot.
    pub store: Arc<LiveStore>,
    pub tokens: ShardCopy<TokenStore>,
    /// Open sessions per token, across shards (for per-token limits).
    pub token_limits: Arc<limits::TokenLimits>,
    /// This shard's open sessions, for the watcher.
    pub registry: Rc<watch::Registry>,
    /// Client connections open across all shards, for `max_connections`.
    /// Touched once per connect and once per close, never per message.
    pub connections: Arc<AtomicUsize>,
    pub scram_keys: RefCell<KeyCache>,
    /// Relay buffers, lent to sessions while bytes are in flight.
    relay_buffers: Rc<relay::BufferPool>,
    /// Cancel keys of this shard's sessions, and the way to other shards'.
    cancel_keys: Rc<cancel::Keys>,
    cancels: Arc<cancel::Router>,
    fleet: Option<Arc<cancel::Fleet>>,
    /// This shard's counters and histograms.
    pub metrics: Rc<ShardMetrics>,
    /// Requests from the admin thread.
    admin: Arc<Bus>,
    /// Failed authentications per source, across shards.
    failures: Arc<failures::FailureLimiter>,
    /// Start-ups in progress per source, across shards.
    pending: Arc<pending::PendingPerSource>,
    server_tls: Option<Arc<ServerTls>>,
    /// The live JWT verifier and this shard's copy of it.
    jwt: Option<(Arc<LiveJwt>, ShardCopy<JwtVerifier>)>,
    /// Verified JWTs by SHA-256 of the token: signature checks (up to
    /// ~100 µs for RSA) run once per token per shard. Time claims and the
    /// deny-list are still checked on every use.
    jwt_cache: RefCell<HashMap<[u8; 32], VerifiedJwt>>,
    /// This shard's copy of the TLS config and the generation it came from.
    tls_config: RefCell<(u64, Option<Arc<rustls::ServerConfig>>)>,
    next_session: Cell<u64>,
    /// Connections accepted and not yet established or refused: a drain
    /// waits for them as for sessions, or a client logging in at the
    /// moment of SIGTERM would see the process vanish.
    starting: Cell<usize>,
    /// Fires when the shard starts draining: the accept loop stops.
    pub draining: kill::KillSwitch,
}

impl ShardContext {
    pub fn new(shard: usize, shared: &Shared) -> Self {
        let settings = shared.settings.get();
        let config = &settings.config;
        let timing = config.admin.as_ref().is_some_and(|a| a.latency_histograms);
        ShardContext {
            shard,
            relay_buffers: Rc::new(relay::BufferPool::new(config.buffer_size)),
            settings: ShardCopy::new(&shared.settings),
            published: shared.settings.clone(),
            tokens: ShardCopy::new(&shared.store.published),
            store: shared.store.clone(),
            token_limits: shared.token_limits.clone(),
            registry: Rc::default(),
            connections: shared.connections.clone(),
            server_tls: shared.server_tls.clone(),
            scram_keys: RefCell::new(KeyCache::new()),
            cancel_keys: Rc::new(cancel::Keys::new(
                shard,
                shared.cancels.shards(),
                shared.fleet.clone(),
            )),
            cancels: shared.cancels.clone(),
            fleet: shared.fleet.clone(),
            metrics: Rc::new(ShardMetrics::new(
                shard,
                timing,
                shared.token_series.clone(),
            )),
            admin: shared.admin.clone(),
            failures: shared.failures.clone(),
            pending: shared.pending.clone(),
            tls_config: RefCell::new((0, None)),
            jwt_cache: RefCell::default(),
            jwt: shared
                .jwt
                .as_ref()
                .map(|j| (j.clone(), ShardCopy::new(&j.published))),
            next_session: Cell::new(0),
            starting: Cell::new(0),
            draining: kill::KillSwitch::default(),
        }
    }

    /// The current settings. A session takes them once, when it connects,
    /// and keeps them to its end: a reload changes what new sessions get.
    /// One atomic load when nothing was reloaded, and one reference count
    /// per connection, never per message.
    pub fn settings(&self) -> Arc<Settings> {
        self.settings.current(&self.published)
    }

    /// Session ids are unique per process: shard number, then a counter.
    fn next_session_id(&self) -> SessionId {
        let n = self.next_session.get() + 1;
        self.next_session.set(n);
        SessionId {
            shard: self.shard,
            number: n,
        }
    }

    /// The config for the current certificate; refreshed only when the
    /// certificate changed (one atomic load otherwise).
    fn tls_config(&self) -> Option<Arc<rustls::ServerConfig>> {
        let tls = self.server_tls.as_ref()?;
        let mut slot = self.tls_config.borrow_mut();
        if let Some((generation, config)) = tls.refresh(slot.0) {
            *slot = (generation, Some(config));
        }
        slot.1.clone()
    }

    /// Verifies a JWT, from this shard's cache when it was seen before.
    fn verify_jwt(&self, token: &[u8], now: SystemTime) -> Result<VerifiedJwt, JwtRejection> {
        let Some((live, copy)) = &self.jwt else {
            return Err(JwtRejection::UnknownKey);
        };
        if copy.refresh(&live.published) {
            // New keys: earlier verdicts may rest on keys now gone.
            self.jwt_cache.borrow_mut().clear();
        }
        copy.with(&live.published, |jwt| self.verify_jwt_with(jwt, token, now))
    }

    fn verify_jwt_with(
        &self,
        jwt: &JwtVerifier,
        token: &[u8],
        now: SystemTime,
    ) -> Result<VerifiedJwt, JwtRejection> {
        let key = crate::auth::token::sha256(token);
        let cached = self.jwt_cache.borrow().get(&key).cloned();
        let v = match cached {
            Some(v) => v,
            None => {
                let v = jwt.verify(token, now)?;
                let mut cache = self.jwt_cache.borrow_mut();
                if cache.len() >= JWT_CACHE_ENTRIES {
                    cache.clear();
                }
                cache.insert(key, v.clone());
                v
            }
        };
        // The signature is settled; the clock is not.
        let leeway = jwt.leeway();
        if v.expires_at + leeway <= now {
            return Err(JwtRejection::Expired);
        }
        if v.not_before.is_some_and(|nbf| nbf > now + leeway) {
            return Err(JwtRejection::NotYetValid);
        }
        Ok(v)
    }

    /// What this client may do before TLS: tokens travel in the clear only
    /// from loopback, unless TLS is not configured at all.
    fn policy(config: &Config, peer: &SocketAddr) -> StartupPolicy {
        let mut policy = match &config.tls {
            None => StartupPolicy::default(),
            Some(t) => StartupPolicy {
                tls_available: true,
                plaintext_allowed: t.mode == ClientTlsMode::Allow && peer.ip().is_loopback(),
                ..StartupPolicy::default()
            },
        };
        if let Some(jwt) = &config.jwt {
            // PasswordMessage framing: tag, length, the token, its NUL.
            policy.max_password_message = policy.max_password_message.max(jwt.max_token_len() + 6);
        }
        policy
    }
}

/// What a reload can change, published as one snapshot (see
/// [`ShardContext::settings`]). Keeping the upstream TLS config beside the
/// config it was built from means a session never pairs one with the
/// other's predecessor.
pub struct Settings {
    pub config: Config,
    /// One per `config.upstreams` entry, in the same order.
    pub routes: Vec<Arc<Route>>,
}

/// An upstream server with the TLS settings built from its entry.
pub struct Route {
    pub config: crate::config::UpstreamConfig,
    pub tls: Option<Arc<UpstreamTls>>,
}

impl Settings {
    /// Builds each upstream's TLS settings; fails on a bad certificate or
    /// CA file.
    pub fn new(config: Config) -> Result<Settings, crate::tls::TlsConfigError> {
        let routes = config
            .upstreams
            .iter()
            .map(|up| {
                let tls = UpstreamTls::new(
                    up.tls,
                    up.ca_file.as_deref(),
                    up.client_cert
                        .as_ref()
                        .map(|(c, k)| (c.as_path(), k.as_path())),
                )?
                .map(Arc::new);
                Ok(Arc::new(Route {
                    config: up.clone(),
                    tls,
                }))
            })
            .collect::<Result<_, crate::tls::TlsConfigError>>()?;
        Ok(Settings { config, routes })
    }
}

/// What all shards share, built once at start.
pub struct Shared {
    pub settings: Arc<Published<Settings>>,
    pub store: Arc<LiveStore>,
    pub jwt: Option<Arc<LiveJwt>>,
    pub connections: Arc<AtomicUsize>,
    pub token_limits: Arc<limits::TokenLimits>,
    pub server_tls: Option<Arc<ServerTls>>,
    pub cancels: Arc<cancel::Router>,
    /// The admin thread's way to the shards.
    pub admin: Arc<Bus>,
    /// Bounds per-token latency series across shards, when they are on.
    pub token_series: Option<Arc<TokenSeriesLimit>>,
    pub failures: Arc<failures::FailureLimiter>,
    pub pending: Arc<pending::PendingPerSource>,
    /// Cross-instance cancel routing, in a fleet.
    pub fleet: Option<Arc<cancel::Fleet>>,
}

impl Shared {
    pub fn new(
        settings: Settings,
        store: Arc<LiveStore>,
        jwt: Option<Arc<LiveJwt>>,
        server_tls: Option<Arc<ServerTls>>,
        fleet: Option<Arc<cancel::Fleet>>,
    ) -> Self {
        let config = &settings.config;
        let shards = config.workers;
        Shared {
            store,
            jwt,
            connections: Arc::default(),
            token_limits: Arc::default(),
            server_tls,
            cancels: Arc::new(cancel::Router::new(shards, fleet.is_some())),
            fleet,
            admin: Arc::new(Bus::new(shards)),
            failures: Arc::new(failures::FailureLimiter::new(
                config.auth_failure_limit,
                config.auth_failure_window,
            )),
            token_series: config
                .admin
                .as_ref()
                .and_then(|a| a.per_token_series)
                .map(|max| Arc::new(TokenSeriesLimit::new(max))),
            pending: Arc::new(pending::PendingPerSource::new(
                config.max_pending_per_source,
            )),
            settings: Arc::new(Published::new(settings)),
        }
    }
}

/// Verified JWTs kept per shard; the cache is emptied when full.
const JWT_CACHE_ENTRIES: usize = 4096;

/// Counts a start-up in progress on its shard until dropped.
struct Starting(Rc<ShardContext>);

impl Starting {
    fn enter(ctx: &Rc<ShardContext>) -> Starting {
        ctx.starting.set(ctx.starting.get() + 1);
        Starting(ctx.clone())
    }
}

impl Drop for Starting {
    fn drop(&mut self) {
        self.0.starting.set(self.0.starting.get() - 1);
    }
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

/// How a start-up ended when it did not produce a session.
struct Refusal {
    /// The real reason: the audit event's and the metric's label.
    reason: &'static str,
    reply: Reply,
    /// More for the operator's log (an upstream error's text), never for
    /// the client.
    detail: Option<String>,
}

/// What a refused client is sent before the connection closes.
enum Reply {
    /// A tollgate error.
    Client(ClientError),
    /// The server's own ErrorResponse, relayed verbatim.
    Relay(Vec<u8>),
    /// Nothing: the client went away, or TLS failed.
    Nothing,
}

impl Refusal {
    fn new(reason: &'static str, reply: Reply) -> Self {
        Refusal {
            reason,
            reply,
            detail: None,
        }
    }

    fn gone() -> Self {
        Refusal::new("client_left", Reply::Nothing)
    }
}

/// A tollgate error names its own reason (its `kind`).
impl From<ClientError> for Refusal {
    fn from(e: ClientError) -> Self {
        Refusal::new(e.kind, Reply::Client(e))
    }
}

/// A logged-in session, ready to relay.
struct Established {
    startup: ClientStartup,
    token_id: String,
    grant: Grant,
    /// For a JWT: its `jti`, for the deny-list.
    jwt_id: Option<Option<String>>,
    /// Counts against the token's `max_connections` while held.
    token_slot: Option<limits::TokenSlot>,
    /// The client's cancel key; released when the session ends.
    cancel_key: cancel::Reservation,
    /// The server routing chose.
    route: Arc<Route>,
    upstream: Upstream,
}

enum StartupOutcome {
    Session(Box<Established>),
    Cancel(cancel::CancelRequest),
    StartTls { next: Phase, direct: bool },
}

/// Per-connection facts the start-up needs.
struct Start {
    id: SessionId,
    /// The settings this session runs under, from connect to close.
    settings: Arc<Settings>,
    peer: SocketAddr,
    deadline: monoio::time::Instant,
    over_limit: bool,
    started: Instant,
    started_at: SystemTime,
}

/// The relay phase of a session, boxed so that it runs outside the
/// session's tracing span: entering a span on every poll of the hot path
/// costs more than the relay's own framing.
type RelayTask = Pin<Box<dyn Future<Output = ()>>>;

/// Runs a client connection to completion. Never panics on client input;
/// every attempt leaves one audit event with its real outcome.
pub async fn run(ctx: Rc<ShardContext>, client: TcpStream, peer: SocketAddr) {
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
    let starting = Starting::enter(&ctx);
    let startup = Box::pin(async move {
        let mut start = start;
        let mut client = client;
        let mut input = BytesMut::with_capacity(1024);
        let config = &start.settings.config;
        if config.proxy_protocol && config.proxy_trusted.iter().any(|c| c.contains(peer.ip())) {
            // Before anything else, so that every rule, limit and log line
            // sees the real client.
            match read_proxy_header(&mut client, &mut input, &start).await {
                Ok(Some(real)) => start.peer = real,
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

/// Reads a PROXY protocol header from a trusted load balancer: the real
/// client's address, or `None` when the connection has no header (a peer
/// in the balancers' network connecting directly, such as another
/// instance forwarding a cancel) or a LOCAL one (the balancer's health
/// check). Bytes after the header stay in `input` for the start-up.
async fn read_proxy_header(
    client: &mut TcpStream,
    input: &mut BytesMut,
    start: &Start,
) -> Result<Option<SocketAddr>, Refusal> {
    use crate::protocol::proxy::{self, ProxyHeader};
    loop {
        match proxy::detect(input) {
            Some(false) => return Ok(None),
            Some(true) => match proxy::parse(input) {
                Ok(Some((header, len))) => {
                    let _ = input.split_to(len);
                    return Ok(match header {
                        ProxyHeader::Proxied { source, .. } => Some(source),
                        ProxyHeader::Local => None,
                    });
                }
                Ok(None) => {}
                Err(e) => {
                    let mut refusal =
                        Refusal::new(e.as_str(), Reply::Client(ClientError::bad_proxy_header()));
                    refusal.detail = Some(e.to_string());
                    return Err(refusal);
                }
            },
            None => {}
        }
        let read = read_append(client, std::mem::take(input), 256);
        let (res, buf) = timeout_at(start.deadline, read)
            .await
            .map_err(|_| Refusal::from(ClientError::startup_timeout()))?;
        *input = buf;
        match res {
            Ok(0) | Err(_) => return Err(Refusal::gone()),
            Ok(_) => {}
        }
    }
}

async fn serve(
    ctx: Rc<ShardContext>,
    mut client: TcpStream,
    start: Start,
    mut input: BytesMut,
) -> Option<RelayTask> {
    let _ = client.set_nodelay(true);
    let config = &start.settings.config;
    crate::io_util::set_keepalive(&client, config.tcp_keepalive);
    let mut attempt = Attempt::default();
    if ctx.failures.is_blocked(start.peer.ip(), Instant::now()) {
        // Refused before reading anything: a flood of bad tokens costs one
        // lookup per connection, no parsing, no TLS, no hashing.
        let refusal = ClientError::too_many_auth_failures().into();
        return finish(&ctx, client, input, Err(refusal), &start, attempt).await;
    }
    // Held until this function returns: the start-up is over then, and an
    // established session's relay runs outside it.
    let Some(_pending) = ctx.pending.enter(start.peer.ip()) else {
        let refusal = ClientError::too_many_pending_from_source().into();
        return finish(&ctx, client, input, Err(refusal), &start, attempt).await;
    };
    if config.proxy_protocol
        && input.is_empty()
        && !config
            .proxy_trusted
            .iter()
            .any(|c| c.contains(start.peer.ip()))
    {
        // Only the balancers' headers are believed; anyone else sending one
        // is told so, rather than getting a puzzling start-up error.
        let read = read_append(&mut client, std::mem::take(&mut input), 1024);
        let Ok((res, buf)) = timeout_at(start.deadline, read).await else {
            let refusal = ClientError::startup_timeout().into();
            return finish(&ctx, client, input, Err(refusal), &start, attempt).await;
        };
        input = buf;
        if !matches!(res, Ok(n) if n > 0) {
            return finish(&ctx, client, input, Err(Refusal::gone()), &start, attempt).await;
        }
        if crate::protocol::proxy::detect(&input) == Some(true) {
            let refusal = Refusal::new(
                "proxy_untrusted",
                Reply::Client(ClientError::untrusted_proxy_header()),
            );
            return finish(&ctx, client, input, Err(refusal), &start, attempt).await;
        }
    }
    let policy = ShardContext::policy(config, &start.peer);
    let phase = Phase::Startup(AwaitStartup::with_policy(policy));
    let outcome = start_up(&ctx, &mut client, &mut input, phase, &start, &mut attempt).await;
    let Ok(StartupOutcome::StartTls { next, direct }) = outcome else {
        return finish(&ctx, client, input, outcome, &start, attempt).await;
    };

    let Some(tls_config) = ctx.tls_config() else {
        warn!("TLS requested but no acceptor is configured");
        refused(&ctx, &start, &attempt, &ClientError::internal().into());
        return None;
    };
    // For direct TLS the ClientHello is already in `input`: hand it to rustls.
    let prefix = std::mem::take(&mut input).to_vec();
    let handshake_started = Instant::now();
    let accept = crate::tls::accept::accept(tls_config, client, prefix);
    let handshake = timeout_at(start.deadline, accept).await;
    let took = handshake_started.elapsed();
    let mut tls: ClientTls = match handshake {
        Ok(Ok((s, version))) => {
            ctx.metrics.tls_handshake(true, took);
            attempt.tls = version;
            s
        }
        Ok(Err(e)) => {
            ctx.metrics.tls_handshake(false, took);
            let mut refusal = Refusal::new("tls_handshake", Reply::Nothing);
            refusal.detail = Some(crate::tls::describe_error(e));
            refused(&ctx, &start, &attempt, &refusal);
            return None;
        }
        Err(_) => {
            ctx.metrics.tls_handshake(false, took);
            let refusal = Refusal::new("startup_timeout", Reply::Nothing);
            refused(&ctx, &start, &attempt, &refusal);
            return None;
        }
    };
    if direct && tls.alpn_protocol().as_deref() != Some(ALPN_POSTGRESQL) {
        // PostgreSQL requires ALPN on direct TLS, so that a TLS connection
        // meant for another protocol cannot be replayed into this one.
        let e = ClientError::new(
            sqlstate::PROTOCOL_VIOLATION,
            "direct_tls_without_alpn",
            "direct TLS connection without ALPN protocol \"postgresql\"",
        );
        return finish(&ctx, tls, input, Err(e.into()), &start, attempt).await;
    }
    let outcome = start_up(&ctx, &mut tls, &mut input, next, &start, &mut attempt).await;
    finish(&ctx, tls, input, outcome, &start, attempt).await
}

/// Records a refused attempt: its audit event and its metric.
fn refused(ctx: &ShardContext, start: &Start, attempt: &Attempt, refusal: &Refusal) {
    ctx.metrics.rejected(refusal.reason);
    audit::rejected(
        start.id,
        start.peer,
        attempt,
        refusal.reason,
        refusal.detail.as_deref(),
    );
}

/// Ends a start-up: returns the relay of an established session, or
/// forwards a cancel, or sends the refusal and closes.
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
            return Some(established(ctx, client, input, *est, start, attempt.tls))
        }
        Ok(StartupOutcome::Cancel(mut request)) => {
            // Postgres answers a CancelRequest with nothing, right or wrong,
            // and closes the connection once it has acted on it: clients
            // (libpq's PQcancel, and other instances forwarding a cancel)
            // wait for that close, so their next query cannot overtake the
            // cancel. The connection is dropped on every path below, after
            // the work.
            if let Some(fleet) = &ctx.fleet {
                match fleet.destination(request.process_id, &request.secret_key) {
                    cancel::Destination::Here(pid) => {
                        request.from_peer =
                            pid != request.process_id && fleet.is_peer(request.client.ip());
                        request.process_id = pid;
                    }
                    cancel::Destination::Peer(addr) => {
                        let result = forward_cancel(addr, &request).await;
                        ctx.metrics.cancel(result);
                        audit::cancel(request.client, request.process_id, result);
                        return None;
                    }
                    cancel::Destination::Nowhere => {
                        ctx.failures.failed(request.client.ip(), Instant::now());
                        ctx.metrics.cancel("unknown_key");
                        audit::cancel(request.client, request.process_id, "unknown_key");
                        return None;
                    }
                }
            }
            let owner = ctx.cancels.owner(request.process_id);
            if owner == ctx.shard {
                cancel_here(ctx, &request).await;
            } else {
                debug!(owner, "cancel request routed to its shard");
                // The owner drops `done` when it is through (or the router
                // drops the request when the inbox is full).
                let (done, finished) = flume::bounded(1);
                request.done = Some(done);
                ctx.cancels.route(request);
                let _ = monoio::time::timeout(FORWARD_CANCEL_TIMEOUT, finished.recv_async()).await;
            }
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
        Reply::Client(e) => close_with(client, encode(&e)).await,
        Reply::Relay(bytes) => close_with(client, BytesMut::from(&bytes[..])).await,
    }
    None
}

/// Starts relaying for a logged-in session: registers it with the shard
/// (for the watcher, `/sessions` and scrapes), and returns the relay task,
/// which logs the session's end.
fn established<C: relay::ClientSide + 'static>(
    ctx: &Rc<ShardContext>,
    client: C,
    input: BytesMut,
    est: Established,
    start: &Start,
    tls: Option<&'static str>,
) -> RelayTask {
    ctx.metrics.accepted();
    audit::accepted(
        start.id,
        start.peer,
        tls,
        &audit::Accepted {
            token_id: &est.token_id,
            user: &est.startup.user,
            database: &est.startup.database,
            upstream_tls: matches!(est.upstream.stream, UpstreamStream::Tls(_)),
            upstream_auth: est.upstream.ready.auth_method,
            protocol_minor: est.upstream.ready.minor,
            setup: start.started.elapsed(),
        },
    );
    let Upstream {
        stream,
        for_client,
        leftover,
        ready,
    } = est.upstream;
    let cancel_key = est.cancel_key;
    // A client that vanishes mid-query leaves a cancel behind it.
    let abandon = {
        // The upstream this session logged in to, even after a reload.
        let route = est.route.clone();
        let key = ready.upstream_key;
        move || async move {
            let Some(key) = key else { return };
            let tls = route.tls.as_deref();
            match upstream::send_cancel(&route.config, tls, &key).await {
                Ok(()) => debug!("query of a departed client cancelled"),
                Err(e) => warn!(error = %e, "could not cancel a departed client's query"),
            }
        }
    };
    let config = &start.settings.config;
    let on_expiry = est.grant.on_expiry.unwrap_or(config.on_expiry);
    // A JWT ends at `exp` plus the leeway it was accepted with.
    let jwt_end = est
        .grant
        .expires_at
        .map(|t| t + config.jwt.as_ref().map_or(Duration::ZERO, |j| j.leeway()));
    let stats = Rc::new(relay::SessionStats::default());
    let timing = ctx
        .metrics
        .timing()
        .then(|| relay::Timing::new(ctx.metrics.clone(), ctx.metrics.token_series(&est.token_id)));
    let audit_queries = config.audit.queries.then(|| {
        Box::new(relay::QueryAudit::new(
            start.id.to_string(),
            est.token_id.clone(),
            config.audit.max_query_length,
        ))
    });
    let tracks = relay::Tracks::new(stats.clone(), timing, audit_queries);
    let watched = watch::Watched {
        id: start.id,
        user: est.startup.user,
        database: est.startup.database,
        client: start.peer,
        tls,
        started_at: start.started_at,
        started: start.started,
        stats,
        token_id: est.token_id,
        secret_sha256: est.grant.secret_sha256,
        on_expiry,
        jwt: est
            .jwt_id
            .map(|jti| (jti, jwt_end.unwrap_or(SystemTime::UNIX_EPOCH))),
        kill: Default::default(),
    };
    let registration = ctx.tokens.with(&ctx.store.published, |store| {
        ctx.registry.register(watched, store, SystemTime::now())
    });
    let token_slot = est.token_slot;
    let server = match stream {
        UpstreamStream::Plain(s) => relay::ServerSide::Plain(s),
        UpstreamStream::Tls(s) => relay::ServerSide::Tls(s),
    };
    let opening = relay::Opening {
        for_client,
        leftover,
        client_pending: input,
    };
    let pool = ctx.relay_buffers.clone();
    let kill = registration.watched.kill.clone();
    let relay = relay::run(client, server, opening, tracks, pool, kill, abandon);
    let metrics = ctx.metrics.clone();
    Box::pin(async move {
        let ended_by = relay.await;
        drop(cancel_key);
        drop(token_slot);
        let w = &registration.watched;
        let totals = w.stats.totals();
        metrics.session_ended(ended_by.as_str(), &totals);
        audit::ended(
            w.id,
            w.client,
            &audit::Ended {
                token_id: &w.token_id,
                user: &w.user,
                database: &w.database,
                duration: w.started.elapsed(),
                totals,
                ended_by: ended_by.as_str(),
            },
        );
        // Last: until here the session's bytes count as live in a scrape.
        drop(registration);
    })
}

/// Tells a client accepted while the process is out of file descriptors
/// why it cannot be served, without reading anything.
pub async fn refuse_out_of_fds(client: TcpStream) {
    let e = ClientError::new(
        sqlstate::TOO_MANY_CONNECTIONS,
        "out_of_fds",
        "tollgate is out of file descriptors; try again later",
    );
    close_with(client, encode(&e)).await;
}

/// Acts on a cancel for a session of this shard: a matching key sends the
/// server's real key to the server; anything else is dropped unanswered.
async fn cancel_here(ctx: &ShardContext, request: &cancel::CancelRequest) {
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
            match upstream::send_cancel(&route.config, tls, &key).await {
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
async fn forward_cancel(addr: SocketAddr, request: &cancel::CancelRequest) -> &'static str {
    let mut msg = Vec::with_capacity(12 + request.secret_key.len());
    msg.extend_from_slice(&((12 + request.secret_key.len()) as i32).to_be_bytes());
    msg.extend_from_slice(&crate::protocol::startup::CANCEL_REQUEST_CODE.to_be_bytes());
    msg.extend_from_slice(&(request.process_id | cancel::FORWARDED).to_be_bytes());
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

/// Serves cancels routed here by other shards, for as long as the shard
/// runs. Each is handled in its own task so one slow server connection
/// does not hold up the rest.
pub async fn serve_routed_cancels(ctx: Rc<ShardContext>) {
    let Some(inbox) = ctx.cancels.take_inbox(ctx.shard) else {
        return;
    };
    while let Ok(request) = inbox.recv_async().await {
        let ctx = ctx.clone();
        monoio::spawn(async move { cancel_here(&ctx, &request).await });
    }
}

/// Answers the admin thread, for as long as the shard runs. Everything it
/// reads is this shard's own; answers are built here and sent whole.
pub async fn serve_admin(ctx: Rc<ShardContext>) {
    let Some(inbox) = ctx.admin.take_inbox(ctx.shard) else {
        return;
    };
    while let Ok(request) = inbox.recv_async().await {
        // A requester that gave up has dropped its receiver; nothing to do.
        match request {
            AdminRequest::Ping(reply) => {
                let _ = reply.try_send(());
            }
            AdminRequest::Metrics(reply) => {
                let live = ctx.registry.live_totals();
                let active = ctx.registry.len() as u64;
                let _ = reply.try_send(ctx.metrics.snapshot(live, active));
            }
            AdminRequest::Sessions(reply) => {
                let _ = reply.try_send(ctx.registry.views());
            }
            AdminRequest::Terminate { number, reply } => {
                let _ = reply.try_send(ctx.registry.terminate(number));
            }
            AdminRequest::Drain { deadline, reply } => {
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
    ctx.draining.fire(kill::KillReason::Shutdown);
    let busy = || !ctx.registry.is_empty() || ctx.starting.get() > 0;
    while busy() && std::time::Instant::now() < deadline {
        monoio::time::sleep(DRAIN_POLL).await;
    }
    let ended = ctx.registry.end_all(kill::KillReason::Shutdown);
    let grace = std::time::Instant::now() + DRAIN_GRACE;
    while busy() && std::time::Instant::now() < grace {
        monoio::time::sleep(DRAIN_POLL).await;
    }
    let _ = reply.try_send(ended);
}

fn encode(e: &ClientError) -> BytesMut {
    let mut out = BytesMut::with_capacity(256);
    e.encode(&mut out);
    out
}

/// Reads the client's start-up and token, checks it, and logs in upstream,
/// all before `start.deadline`. Stops early when TLS must start. Fills in
/// `attempt` as it learns who the client is.
async fn start_up<C: AsyncReadRent + AsyncWriteRent>(
    ctx: &ShardContext,
    client: &mut C,
    input: &mut BytesMut,
    mut phase: Phase,
    start: &Start,
    attempt: &mut Attempt,
) -> Result<StartupOutcome, Refusal> {
    let mut output = BytesMut::with_capacity(256);
    let timed_out = || Refusal::from(ClientError::startup_timeout());
    let (startup, token) = loop {
        let progress = if input.is_empty() {
            Ok(Progress::NeedMore(phase))
        } else {
            handshake::advance(phase, input, &mut output)
        };
        let progress = progress?;
        if start.over_limit
            && matches!(
                progress,
                Progress::NeedMore(Phase::Password(_)) | Progress::Credentials { .. }
            )
        {
            // Refuse once the client has said who it is, so that it reads
            // our error rather than a reset.
            return Err(ClientError::too_many_connections().into());
        }
        if !output.is_empty() {
            let (res, buf) = client.write_all(std::mem::take(&mut output)).await;
            output = buf;
            output.clear();
            if res.is_err() {
                return Err(Refusal::gone());
            }
        }
        match progress {
            Progress::NeedMore(next) => phase = next,
            Progress::Cancel {
                process_id,
                secret_key,
            } => {
                return Ok(StartupOutcome::Cancel(cancel::CancelRequest {
                    process_id,
                    secret_key: secret_key.into(),
                    client: start.peer,
                    from_peer: false,
                    done: None,
                }))
            }
            Progress::StartTls { next, direct } => {
                return Ok(StartupOutcome::StartTls { next, direct })
            }
            Progress::Credentials { startup, token } => break (startup, token),
        }
        let read = read_append(client, std::mem::take(input), 1024);
        let (res, buf) = timeout_at(start.deadline, read)
            .await
            .map_err(|_| timed_out())?;
        *input = buf;
        match res {
            Ok(0) | Err(_) => return Err(Refusal::gone()),
            Ok(_) => {}
        }
    };
    attempt.user = Some(startup.user.clone());
    attempt.database = Some(startup.database.clone());

    let checking = Instant::now();
    let checked = check_token(ctx, &startup, &token, start.peer, attempt);
    ctx.metrics.token_checked(checking.elapsed());
    let (token_id, grant, jwt_id) = checked?;
    drop(token);
    if startup.is_replication() && !grant.replication {
        return Err(ClientError::replication_not_allowed().into());
    }
    if let Some(name) = locked_parameter(&startup, &grant) {
        return Err(ClientError::session_locked(name).into());
    }
    let token_slot = match grant.max_connections {
        None => None,
        Some(max) => match ctx.token_limits.acquire(&token_id, max) {
            Some(slot) => Some(slot),
            None => return Err(ClientError::token_connection_limit().into()),
        },
    };
    let params = upstream_params(&startup, &grant, &token_id, start.peer.ip());
    if upstream_startup_len(&startup.user, &params) > MAX_STARTUP_PACKET_LENGTH {
        // The server would drop it without a word, and the client would
        // hear of a lost server instead of its own oversized start-up.
        return Err(ClientError::new(
            sqlstate::PROTOCOL_VIOLATION,
            "startup_too_long",
            "startup packet too long once tollgate's own parameters are added",
        )
        .into());
    }

    let settings = &start.settings;
    let route = match settings.config.route(&startup.database, &grant.upstreams) {
        Ok(i) => settings.routes[i].clone(),
        Err(true) => {
            // The token's rule, not the request: the same bytes as any other
            // refused token, the reason only in the log.
            ctx.failures.failed(start.peer.ip(), Instant::now());
            return Err(Refusal::new(
                "upstream_not_allowed",
                Reply::Client(ClientError::token_rejected(&startup.user)),
            ));
        }
        Err(false) => {
            return Err(Refusal::new(
                "no_upstream_for_database",
                Reply::Client(ClientError::no_upstream_for_database(&startup.database)),
            ))
        }
    };
    let password = match route.config.credentials.get(&startup.user) {
        Some(p) => p.clone(),
        None => {
            // A token for a role tollgate has no login for is a config gap;
            // the client gets the upstream-login error, the log the reason.
            let e = ClientError::upstream_login_failed();
            return Err(Refusal::new("no_upstream_credentials", Reply::Client(e)));
        }
    };
    let cancel_key = ctx.cancel_keys.reserve();
    let login = upstream::connect_and_login(
        &route.config,
        route.tls.as_deref(),
        upstream::LoginParams {
            user: &startup.user,
            password,
            version: startup.version,
            params: params.iter().map(|(k, v)| (k.as_str(), v.as_str())),
            issued_key: (cancel_key.process_id, cancel_key.secret),
        },
        &ctx.scram_keys,
    );
    let connecting = Instant::now();
    let upstream = timeout_at(start.deadline, login)
        .await
        .map_err(|_| {
            // The client did its part; the server's login ran out the
            // start-up time. Not the client's error (08P01) but the server's.
            warn!(
                token_id = %token_id,
                user = %startup.user,
                "upstream login did not finish within startup_timeout"
            );
            let mut refusal = Refusal::new(
                "upstream_login_timeout",
                Reply::Client(ClientError::upstream_login_timeout()),
            );
            refusal.detail = Some("the server did not complete the login in time".into());
            refusal
        })?
        .map_err(|e| {
            // Beside the audit event: a failing upstream is the operator's
            // problem, not the client's, so it is a warning.
            warn!(
                token_id = %token_id,
                user = %startup.user,
                reason = e.kind(),
                error = %e,
                "upstream login failed"
            );
            upstream_refusal(e)
        })?;
    ctx.metrics.upstream_connected(connecting.elapsed());

    if let (Some(issued), Some(real)) = (&upstream.ready.issued_key, &upstream.ready.upstream_key) {
        cancel_key.activate(issued, real.clone(), route.clone());
    }
    // tollgate asked for the password, so the client is waiting for
    // AuthenticationOk: the server's, relayed with what follows it.
    Ok(StartupOutcome::Session(Box::new(Established {
        startup,
        token_id,
        grant,
        jwt_id,
        token_slot,
        cancel_key,
        route,
        upstream,
    })))
}

/// The size of the StartupMessage tollgate sends upstream for `params`
/// (as `upstream::login` encodes it: `user` first, no other `user`).
fn upstream_startup_len(user: &str, params: &[(String, String)]) -> usize {
    let pair = |k: &str, v: &str| k.len() + 1 + v.len() + 1;
    let rest: usize = params
        .iter()
        .filter(|(k, _)| k != "user")
        .map(|(k, v)| pair(k, v))
        .sum();
    // Length and version words, the pairs, the final terminator.
    8 + pair("user", user) + rest + 1
}

/// Longest application_name Postgres keeps (NAMEDATALEN - 1).
const MAX_APPLICATION_NAME: usize = 63;

/// The start-up parameters sent upstream: the client's, then the token's
/// `session` parameters (which win: a read-only token stays read-only
/// whatever the client asks at start-up), and `application_name` suffixed
/// with the token id and the client's address, so pg_stat_activity shows
/// which token and which client each backend belongs to.
/// With `lock_session`, the first start-up parameter the client may not
/// send: one the token sets, or `options` (whose `-c name=value` switches
/// could set anything, and which Postgres reads before the key/value
/// parameters, so they could not win anyway; the rule makes the attempt an
/// error rather than silently ignored).
fn locked_parameter<'a>(startup: &ClientStartup, grant: &'a Grant) -> Option<&'a str> {
    if !grant.lock_session {
        return None;
    }
    if startup
        .params
        .get("options")
        .is_some_and(|o| !o.trim().is_empty())
    {
        return Some("options");
    }
    // GUC names are case-insensitive: `SEARCH_PATH` sets search_path.
    grant
        .session
        .iter()
        .map(|(name, _)| name.as_str())
        .find(|name| {
            startup
                .params
                .iter()
                .any(|(k, _)| k.eq_ignore_ascii_case(name))
        })
}

fn upstream_params(
    startup: &ClientStartup,
    grant: &Grant,
    token_id: &str,
    client: std::net::IpAddr,
) -> Vec<(String, String)> {
    // Case-insensitive, as GUC names are; the token's value would win
    // anyway (it comes last), but the server need not see the client's.
    let overridden = |k: &str| {
        k.eq_ignore_ascii_case("application_name")
            || grant.session.iter().any(|(g, _)| g.eq_ignore_ascii_case(k))
    };
    let mut params: Vec<(String, String)> = startup
        .params
        .iter()
        .filter(|(k, _)| !overridden(k))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    params.extend(grant.session.iter().cloned());
    // The server's own client_addr is tollgate's; this is the real one
    // (from a PROXY header when a load balancer sent one).
    let suffix = format!("[tg:{token_id}@{client}]");
    let app = startup.params.get("application_name").unwrap_or("");
    let room = MAX_APPLICATION_NAME.saturating_sub(suffix.len() + 1);
    let mut cut = app.len().min(room);
    while !app.is_char_boundary(cut) {
        cut -= 1;
    }
    let app = app[..cut].trim_end();
    let name = if app.is_empty() {
        suffix
    } else {
        format!("{app} {suffix}")
    };
    params.push(("application_name".to_owned(), name));
    params
}

/// What the client sees for an upstream failure: server errors verbatim,
/// tollgate's own failures as generic messages (the audit log has the
/// details).
fn upstream_refusal(e: UpstreamError) -> Refusal {
    let reason = e.kind();
    let detail = Some(e.to_string());
    let reply = match e {
        UpstreamError::Connect { .. } | UpstreamError::ConnectTimeout { .. } => {
            Reply::Client(ClientError::upstream_unavailable())
        }
        UpstreamError::TlsRefused | UpstreamError::Tls(_) => {
            Reply::Client(ClientError::upstream_tls())
        }
        UpstreamError::Io(_) | UpstreamError::Closed => Reply::Client(ClientError::upstream_lost()),
        UpstreamError::Frame(_) | UpstreamError::Login(LoginError::Protocol { .. }) => {
            Reply::Client(ClientError::upstream_protocol())
        }
        UpstreamError::Login(LoginError::ServerError { response, .. }) => Reply::Relay(response),
        // The server's side of the authentication failed tollgate's checks:
        // not a credentials problem, maybe not even the real server.
        UpstreamError::Login(LoginError::Unsupported { .. } | LoginError::Scram(_)) => {
            Reply::Client(ClientError::upstream_auth_refused())
        }
        UpstreamError::Login(_) => Reply::Client(ClientError::upstream_login_failed()),
    };
    Refusal {
        reason,
        reply,
        detail,
    }
}

/// Checks the token; every rejection reaches the client as the same bytes
/// and the audit log with its real reason.
fn check_token(
    ctx: &ShardContext,
    startup: &ClientStartup,
    token: &Secret,
    peer: SocketAddr,
    attempt: &mut Attempt,
) -> Result<(String, Grant, Option<Option<String>>), Refusal> {
    let who = Presenter {
        user: &startup.user,
        database: &startup.database,
        address: peer.ip(),
    };
    if ctx.store.logins_refused() {
        return Err(Refusal::new(
            "token_store_stale",
            Reply::Client(ClientError::token_store_stale()),
        ));
    }
    let now = SystemTime::now();
    let rejected = |reason: &'static str| {
        ctx.failures.failed(peer.ip(), Instant::now());
        Refusal::new(
            reason,
            Reply::Client(ClientError::token_rejected(&startup.user)),
        )
    };
    let (token_id, outcome, jwt_id) = match &ctx.jwt {
        Some(_) if crate::auth::jwt::looks_like_jwt(token.expose()) => {
            match ctx.verify_jwt(token.expose(), now) {
                Ok(v) => {
                    let outcome = ctx
                        .tokens
                        .with(&ctx.store.published, |s| s.check_jwt(&v, &who, now));
                    (v.log_id, outcome, Some(v.jti))
                }
                Err(e) => return Err(rejected(e.as_str())),
            }
        }
        _ => {
            let verdict = ctx.tokens.with(&ctx.store.published, |store| {
                store.check(token.expose(), &who, now)
            });
            let id = verdict.token_id.unwrap_or_else(|| "-".to_owned());
            (id, verdict.outcome, None)
        }
    };
    attempt.token_id = (token_id != "-").then(|| token_id.clone());
    match outcome {
        Ok(grant) => Ok((token_id, grant, jwt_id)),
        Err(reason) => Err(rejected(reason.as_str())),
    }
}

/// Sends a final message and closes without a reset: shut down our side,
/// then drain what the client still sends for a moment, so that unread
/// bytes in our receive queue do not turn the close into an RST that
/// could destroy the error before the client reads it.
async fn close_with<C: AsyncReadRent + AsyncWriteRent>(mut client: C, out: BytesMut) {
    let (res, _) = client.write_all(out).await;
    if res.is_err() {
        return;
    }
    let _ = client.shutdown().await;
    let drain = async {
        let mut buf = Vec::with_capacity(4096);
        loop {
            let (res, b) = client.read(buf).await;
            buf = b;
            match res {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    };
    let _ = monoio::time::timeout(std::time::Duration::from_millis(500), drain).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_startup_len_matches_the_encoding() {
        let params: Vec<(String, String)> = [
            ("database", "appdb"),
            ("user", "ignored"),
            ("application_name", "psql [tg:abc]"),
            ("options", "-c x.y=é"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let mut out = BytesMut::new();
        let sent = std::iter::once(("user", "app")).chain(
            params
                .iter()
                .filter(|(k, _)| k != "user")
                .map(|(k, v)| (k.as_str(), v.as_str())),
        );
        crate::protocol::startup::encode_startup_message(
            &mut out,
            crate::protocol::startup::ProtocolVersion::V3_0,
            sent,
        );
        assert_eq!(upstream_startup_len("app", &params), out.len());
    }
}
