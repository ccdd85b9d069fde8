//! What a shard's sessions share: the shard's copies of the settings, the
//! token snapshot and the JWT verifier, its key table, buffers, registry
//! and metrics (all `!Send`, never touched by another thread), and the
//! handles of what all shards share ([`Shared`], built once at start).
//!
//! Nothing here runs per message: a session reads its settings and checks
//! its token once, at start-up.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::SystemTime;

use crate::audit::SessionId;
use crate::auth::jwt::{JwtCache, JwtRejection, JwtVerifier, VerifiedJwt};
use crate::auth::live::{LiveJwt, LiveStore};
use crate::auth::TokenStore;
use crate::metrics::{ShardMetrics, TokenSeriesLimit};
use crate::snapshot::{Published, ShardCopy};
use crate::tls::ServerTls;
use crate::upstream::scram::KeyCache;

use super::settings::Settings;
use super::{cancel, failures, latch, limits, pending, relay, watch};

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
    /// Idle server connections, and this shard's share of each upstream's
    /// connection limit.
    pub pools: crate::server::Pools,
    /// Relay buffers, lent to sessions while bytes are in flight.
    pub relay_buffers: Rc<relay::BufferPool>,
    /// Cancel keys of this shard's sessions, and the way to other shards'.
    pub(super) cancel_keys: Rc<cancel::Keys>,
    pub(crate) cancels: Arc<cancel::Router>,
    pub(super) fleet: Option<Arc<cancel::Fleet>>,
    /// This shard's counters and histograms.
    pub metrics: Rc<ShardMetrics>,
    /// Failed authentications per source, across shards.
    pub(super) failures: Arc<failures::FailureLimiter>,
    /// Start-ups in progress per source, across shards.
    pub(super) pending: Arc<pending::PendingPerSource>,
    server_tls: Option<Arc<ServerTls>>,
    /// The live JWT verifier and this shard's copy of it.
    pub(super) jwt: Option<(Arc<LiveJwt>, ShardCopy<JwtVerifier>)>,
    /// Verified JWTs by SHA-256 of the token: signature checks (up to
    /// ~100 µs for RSA) run once per token per shard. Time claims and the
    /// deny-list are still checked on every use.
    jwt_cache: JwtCache,
    /// This shard's copy of the TLS config and the generation it came from.
    tls_config: RefCell<(u64, Option<Arc<rustls::ServerConfig>>)>,
    next_session: Cell<u64>,
    /// Connections accepted and not yet established or refused: a drain
    /// waits for them as for sessions, or a client logging in at the
    /// moment of SIGTERM would see the process vanish.
    starting: Cell<usize>,
    /// Accept loops running (TCP, Unix-domain socket). A drain waits for
    /// them to stop as well: a connection the kernel handed over just
    /// before a listener's shutdown is only seen when its loop gets the
    /// accept's result.
    accept_loops: Cell<usize>,
    /// Fires when the shard starts draining: the accept loop stops.
    pub draining: latch::Latch,
}

impl ShardContext {
    pub fn new(shard: usize, shared: &Shared) -> Self {
        let settings = shared.settings.get();
        let config = &settings.config;
        let timing = config.admin.as_ref().is_some_and(|a| a.latency_histograms);
        ShardContext {
            shard,
            relay_buffers: Rc::new(relay::BufferPool::new(config.buffer_size)),
            pools: crate::server::Pools::new(shard, config.workers),
            settings: ShardCopy::new(&shared.settings),
            published: shared.settings.clone(),
            tokens: ShardCopy::new(&shared.store.published),
            store: shared.store.clone(),
            token_limits: shared.token_limits.clone(),
            registry: Rc::default(),
            connections: shared.connections.clone(),
            server_tls: shared.server_tls.clone(),
            scram_keys: RefCell::new(KeyCache::new()),
            cancel_keys: Rc::new(cancel::Keys::new(shared.fleet.clone())),
            cancels: shared.cancels.clone(),
            fleet: shared.fleet.clone(),
            metrics: Rc::new(ShardMetrics::new(
                shard,
                timing,
                shared.token_series.clone(),
            )),
            failures: shared.failures.clone(),
            pending: shared.pending.clone(),
            tls_config: RefCell::new((0, None)),
            jwt_cache: JwtCache::new(),
            jwt: shared
                .jwt
                .as_ref()
                .map(|j| (j.clone(), ShardCopy::new(&j.published))),
            next_session: Cell::new(0),
            starting: Cell::new(0),
            accept_loops: Cell::new(0),
            draining: latch::Latch::default(),
        }
    }

    /// The current settings. A session takes them once, when it connects,
    /// and keeps them to its end: a reload changes what new sessions get.
    /// One atomic load when nothing was reloaded, and one reference count
    /// per connection, never per message.
    pub fn settings(&self) -> Arc<Settings> {
        self.settings.current(&self.published)
    }

    /// Start-ups in progress on this shard (see [`Starting`]).
    pub fn starting(&self) -> usize {
        self.starting.get()
    }

    /// Whether one of the shard's accept loops still runs.
    pub fn accepting(&self) -> bool {
        self.accept_loops.get() > 0
    }

    pub fn accept_loop_started(&self) {
        self.accept_loops.set(self.accept_loops.get() + 1);
    }

    pub fn accept_loop_stopped(&self) {
        self.accept_loops.set(self.accept_loops.get() - 1);
    }

    /// Session ids are unique per process: shard number, then a counter.
    pub(super) fn next_session_id(&self) -> SessionId {
        let n = self.next_session.get() + 1;
        self.next_session.set(n);
        SessionId {
            shard: self.shard,
            number: n,
        }
    }

    /// The config for the current certificate; refreshed only when the
    /// certificate changed (one atomic load otherwise).
    pub(super) fn tls_config(&self) -> Option<Arc<rustls::ServerConfig>> {
        let tls = self.server_tls.as_ref()?;
        let mut slot = self.tls_config.borrow_mut();
        if let Some((generation, config)) = tls.refresh(slot.0) {
            *slot = (generation, Some(config));
        }
        slot.1.clone()
    }

    /// Verifies a JWT, from this shard's cache when it was seen before.
    pub(super) fn verify_jwt(
        &self,
        token: &[u8],
        now: SystemTime,
    ) -> Result<VerifiedJwt, JwtRejection> {
        let Some((live, copy)) = &self.jwt else {
            return Err(JwtRejection::UnknownKey);
        };
        if copy.refresh(&live.published) {
            // New keys: earlier verdicts may rest on keys now gone.
            self.jwt_cache.clear();
        }
        copy.with(&live.published, |jwt| {
            self.jwt_cache.verify(jwt, token, now)
        })
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
            cancels: Arc::new(cancel::Router::new(shards)),
            fleet,
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

/// Counts a start-up in progress on its shard until dropped.
pub(super) struct Starting(Rc<ShardContext>);

impl Starting {
    pub(super) fn enter(ctx: &Rc<ShardContext>) -> Starting {
        ctx.starting.set(ctx.starting.get() + 1);
        Starting(ctx.clone())
    }
}

impl Drop for Starting {
    fn drop(&mut self) {
        self.0.starting.set(self.0.starting.get() - 1);
    }
}
