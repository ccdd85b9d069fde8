//! The session's server connection: in session pooling, borrowed from the
//! shard's pool on checkout (or logged in fresh when none idles with the
//! client's key) and given back, reset, when the client leaves; with
//! `[pool] mode = "off"`, a login of the session's own that closes with it.
//!
//! The client cannot tell the two apart: it is shown the login messages a
//! fresh login would show it (the server's parameters with its own
//! start-up values applied, its own BackendKeyData with the backend's real
//! process id, ReadyForQuery), and it never sees a failure of a
//! connection it had not used yet.

use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tracing::{debug, warn};

use crate::auth::store::PoolModeRule;
use crate::config::PoolMode;
use crate::error::ClientError;
use crate::handshake::ClientStartup;
use crate::protocol::backend::BackendKey;
use crate::protocol::sqlstate;
use crate::protocol::startup::ProtocolVersion;
use crate::secret::Secret;
use crate::server::checkout::{prepare, PrepareError};
use crate::server::reset::{self, Plan};
use crate::server::{
    split_params, Claim, ConnState, PoolKey, RoutePool, ServerConn, Settable, REPORTED,
};
use crate::upstream::login::ISSUED_KEY_LEN;
use crate::upstream::{self, Upstream, UpstreamStream};

use super::refusal::{Refusal, Reply};
use super::relay::{Kept, ServerSide};
use super::startup::connect_upstream;
use super::{cancel, Route, ShardContext, Start};

/// How a session reaches its server.
pub(super) enum ServerLink {
    /// A login of its own, closed when the session ends.
    Own(Upstream),
    /// A pooled connection, given back when the session ends.
    Pooled(Borrowed),
}

/// A pooled connection lent to a session.
pub(super) struct Borrowed {
    pub conn: ServerConn,
    pub pool: Rc<RoutePool>,
    /// What the client is shown of the login.
    pub for_client: BytesMut,
    /// Served another client before.
    pub reused: bool,
    /// From the token check's end to a ready connection.
    pub checkout: Duration,
    /// Transaction pooling: how the session's later connections are
    /// logged in.
    pub lending: Option<Login>,
}

impl ServerLink {
    pub fn backend_pid(&self) -> Option<u32> {
        match self {
            ServerLink::Own(up) => up.ready.upstream_key.as_ref().map(|k| k.process_id),
            ServerLink::Pooled(b) => b.conn.state.pid(),
        }
    }

    pub fn tls(&self) -> bool {
        let stream = match self {
            ServerLink::Own(up) => &up.stream,
            ServerLink::Pooled(b) => &b.conn.stream,
        };
        matches!(stream, UpstreamStream::Tls(_))
    }

    pub fn auth_method(&self) -> &'static str {
        match self {
            ServerLink::Own(up) => up.ready.auth_method,
            ServerLink::Pooled(b) => b.conn.state.auth_method,
        }
    }

    pub fn minor(&self) -> u16 {
        match self {
            ServerLink::Own(up) => up.ready.minor,
            ServerLink::Pooled(b) => b.conn.state.minor,
        }
    }

    /// Whether the connection served another client before, and how long
    /// the checkout took (`None` without pooling).
    pub fn checkout(&self) -> Option<(bool, Duration)> {
        match self {
            ServerLink::Own(_) => None,
            ServerLink::Pooled(b) => Some((b.reused, b.checkout)),
        }
    }
}

/// What the client asked for, as the checkout needs it.
pub(super) struct Wanted<'a> {
    pub startup: &'a ClientStartup,
    pub token_id: &'a str,
    pub password: Option<Secret>,
    /// The start-up parameters tollgate would send upstream.
    pub params: Vec<(String, String)>,
    /// The token's own `session` parameters (they stay in the pool key).
    pub fixed: &'a [(String, String)],
    /// The token's pool mode, in place of the route's.
    pub pool_mode: Option<PoolModeRule>,
}

/// A connection for this client: an idle one with its key, or a new login,
/// waiting in line while the upstream's share on this shard is in use.
/// The client's cancel key is activated with the connection's real one.
pub(super) async fn check_out(
    ctx: &ShardContext,
    start: &Start,
    route: &Arc<Route>,
    wanted: Wanted<'_>,
    cancel_key: &cancel::Reservation,
) -> Result<Borrowed, Refusal> {
    refresh(ctx).await;
    let pool = ctx.pools.for_route(route);
    let config = &route.config.pool;
    let began = Instant::now();
    let minor = wanted.startup.version.minor;
    let transaction = match wanted.pool_mode {
        Some(mode) => mode == PoolModeRule::Transaction,
        None => config.mode == PoolMode::Transaction,
    };
    let (key, settable) = split_params(
        &wanted.startup.user,
        minor,
        wanted.params,
        wanted.fixed,
        transaction,
    );
    let key = pool.intern(key, Some(began));
    let deadline = start
        .deadline
        .min(monoio::time::Instant::now() + config.checkout_timeout);
    let login = Login {
        token_id: wanted.token_id.to_owned(),
        password: wanted.password,
        version: wanted.startup.version,
        route: route.clone(),
        key,
    };
    let settable = Rc::new(settable);
    let (conn, reused, changed) = acquire(ctx, &pool, &login, &settable, deadline, began).await?;
    let issued = issue_key(ctx, cancel_key, &conn, route, transaction);
    let mut for_client = BytesMut::with_capacity(512);
    conn.state
        .greeting_for(&changed, issued.as_ref(), &mut for_client);
    Ok(Borrowed {
        conn,
        pool,
        for_client,
        reused,
        checkout: began.elapsed(),
        lending: transaction.then_some(login),
    })
}

/// How a client's connections are logged in, kept for its session under
/// transaction pooling (each transaction may need a new login).
pub(super) struct Login {
    pub token_id: String,
    /// tollgate's own credential for the upstream role (never the token).
    pub password: Option<Secret>,
    pub version: ProtocolVersion,
    pub route: Arc<Route>,
    pub key: Rc<PoolKey>,
}

/// An idle connection with `login`'s key (checked, and readied with
/// `settable` where it differs), or a new login, before `deadline`. Also
/// says whether the connection served a client before, and what its
/// readying changed.
pub(super) async fn acquire(
    ctx: &ShardContext,
    pool: &Rc<RoutePool>,
    login: &Login,
    settable: &Settable,
    deadline: monoio::time::Instant,
    began: Instant,
) -> Result<(ServerConn, bool, Vec<(String, String)>), Refusal> {
    let config = &login.route.config.pool;
    // The seat of a connection that proved dead, for a login in its place.
    let mut kept: Option<Claim> = None;
    loop {
        let claim = match kept.take() {
            Some(claim) => claim,
            None => {
                let claimed = pool.claim(&login.key, deadline).await;
                let Ok((claim, waited)) = claimed else {
                    return Err(pool_full(pool));
                };
                if waited {
                    pool.waited(began.elapsed());
                }
                claim
            }
        };
        let (mut conn, reused) = match claim {
            Claim::Idle(conn) => match usable(pool, conn) {
                Ok(conn) => (conn, true),
                Err(seat) => {
                    kept = relogin(pool, seat);
                    continue;
                }
            },
            Claim::Login(seat) => {
                // Boxed: a login's future (connect, TLS, SCRAM) is
                // large, and it is rare next to the checkouts that reuse
                // a connection; the session's own future stays small.
                let conn = Box::pin(log_in(ctx, deadline, login, seat)).await?;
                pool.counters.borrow_mut().logins += 1;
                (conn, false)
            }
        };
        let check = reused && conn.state.idle_for(Instant::now()) >= config.check_after;
        // A connection readied for this very set of parameters before,
        // with nothing changed since, needs no look at them.
        let mut changed = Vec::new();
        if check || !conn.state.readied_with(settable) {
            changed = match ready(&mut conn, settable, check).await {
                Ok(changed) => changed,
                Err(PrepareError::Broken(reason)) if reused => {
                    // Never used by this client: it sees nothing of it.
                    debug!(reason, "idle server connection failed its check");
                    pool.closed("broken");
                    kept = relogin(pool, conn.into_seat());
                    continue;
                }
                Err(e) => return Err(not_ready(pool, conn, e)),
            };
        }
        if reused {
            pool.counters.borrow_mut().reused += 1;
            conn.state.served += 1;
        }
        return Ok((conn, reused, changed));
    }
}

/// A login on the seat of a connection that proved dead, for the client
/// it was meant for (keeping its turn); none when the pool is over a
/// limit a reload lowered (the seat is freed, and the client claims again
/// in line).
fn relogin(pool: &RoutePool, seat: crate::server::Seat) -> Option<Claim> {
    if pool.over_limit() {
        return None;
    }
    Some(Claim::Login(seat))
}

/// Readies `conn` for a client with `settable` (see [`prepare`]), and
/// notes what it was readied with.
async fn ready(
    conn: &mut ServerConn,
    settable: &Settable,
    check: bool,
) -> Result<Vec<(String, String)>, PrepareError> {
    let restored = login_values_changed(&conn.state, settable);
    let changed = if restored.is_empty() {
        prepare(conn, settable, check).await?
    } else {
        prepare(conn, &[&settable[..], &restored].concat(), check).await?
    };
    conn.state.mark_readied(settable);
    Ok(changed)
}

/// The login's values of the parameters that follow clients where the
/// connection has another now and `settable` names none: under
/// transaction pooling a connection goes from client to client with no
/// reset, carrying what the last one `SET`, and a client that sent no
/// value expects the login's (the one its greeting shows).
fn login_values_changed(state: &ConnState, settable: &[(String, String)]) -> Vec<(String, String)> {
    if !state.changed_since_login() {
        // Nothing to restore; and this runs at every lend.
        return Vec::new();
    }
    (0..REPORTED.len())
        .filter(|&i| state.reported(i) != state.login_reported(i))
        .filter(|&i| {
            !settable
                .iter()
                .any(|(s, _)| s.eq_ignore_ascii_case(REPORTED[i]))
        })
        .filter_map(|i| Some((REPORTED[i].to_owned(), state.login_reported(i)?.to_owned())))
        .collect()
}

/// A new login for the pool, under `seat`: the key's parameters only (the
/// client's settable ones follow on checkout), and no client's cancel key
/// (each client gets its own on checkout).
async fn log_in(
    ctx: &ShardContext,
    deadline: monoio::time::Instant,
    login: &Login,
    seat: crate::server::Seat,
) -> Result<ServerConn, Refusal> {
    let Login {
        token_id,
        password,
        version,
        route,
        key,
    } = login;
    let params = login_params(key, password.clone(), *version);
    let up = connect_upstream(ctx, deadline, token_id, route, params).await?;
    let max_lifetime = route.config.pool.max_lifetime;
    ServerConn::from_login(up, route.clone(), key.clone(), seat, max_lifetime).map_err(|e| {
        warn!(reason = e.0, "a new server connection cannot be pooled");
        Refusal::new(
            "upstream_protocol",
            Reply::Client(ClientError::upstream_protocol()),
        )
    })
}

/// A pooled connection's login: as `key` says, with no cancel key of a
/// client's.
fn login_params(
    key: &PoolKey,
    password: Option<Secret>,
    version: ProtocolVersion,
) -> upstream::LoginParams<'_, impl Iterator<Item = (&str, &str)>> {
    upstream::LoginParams {
        user: &key.user,
        password,
        version,
        params: key.params.iter().map(|(k, v)| (k.as_str(), v.as_str())),
        issued_secret: [0; ISSUED_KEY_LEN],
        seal: None,
    }
}

/// A connection that could not be readied for the client: a new one that
/// failed is closed and reported as lost; one the client's parameters were
/// refused on goes back to the pool, and the client gets the server's
/// error, as at a direct start-up.
fn not_ready(pool: &RoutePool, conn: ServerConn, e: PrepareError) -> Refusal {
    match e {
        PrepareError::Broken(reason) => {
            pool.closed("broken");
            let mut refusal =
                Refusal::new("upstream_lost", Reply::Client(ClientError::upstream_lost()));
            refusal.detail = Some(format!("a new server connection failed: {reason}"));
            refusal
        }
        PrepareError::Refused(fatal) => {
            pool.put_idle(conn, Instant::now());
            Refusal::new("startup_parameter_refused", Reply::Relay(fatal.to_vec()))
        }
    }
}

/// An idle connection still fit to lend: not closed by the server, not
/// past its lifetime, logged in as the current settings would. Otherwise
/// it is closed and counted, and its seat returned for a new login.
fn usable(pool: &RoutePool, conn: ServerConn) -> Result<ServerConn, crate::server::Seat> {
    let now = Instant::now();
    let reason = if conn.closed_by_server_lately(now) {
        "broken"
    } else if conn.worn_out(now) {
        "lifetime"
    } else if !conn
        .state
        .route
        .same_login(&pool.route(), &conn.state.key.user)
    {
        "reload"
    } else {
        return Ok(conn);
    };
    debug!(reason, "idle server connection closed instead of lent");
    pool.closed(reason);
    Err(conn.into_seat())
}

/// The client's BackendKeyData: the backend's real process id with this
/// session's own secret (sealed in a fleet), of the length the protocol
/// version in force uses.
///
/// Under transaction pooling (`synthetic`) the process id is none of the
/// backends': the client's queries run on whichever is lent.
fn issue_key(
    ctx: &ShardContext,
    cancel_key: &cancel::Reservation,
    conn: &ServerConn,
    route: &Arc<Route>,
    synthetic: bool,
) -> Option<BackendKey> {
    let real = conn.state.upstream_key.as_ref()?;
    let process_id = if synthetic {
        cancel_key.synthetic_pid()
    } else {
        real.process_id
    };
    let mut secret = cancel_key.secret;
    if let Some(seal) = ctx.cancel_keys.sealer() {
        seal(process_id, &mut secret);
    }
    let len = if conn.state.minor >= ProtocolVersion::LONG_CANCEL_KEYS {
        ISSUED_KEY_LEN
    } else {
        4
    };
    let issued = BackendKey {
        process_id,
        secret_key: secret[..len].into(),
    };
    cancel_key.activate(&issued, real.clone(), route.clone());
    Some(issued)
}

fn pool_full(pool: &RoutePool) -> Refusal {
    let e = ClientError::new(
        sqlstate::TOO_MANY_CONNECTIONS,
        "pool_full",
        format!(
            "no server connection to upstream \"{}\" came free within checkout_timeout \
             ({} in use on this shard)",
            pool.name,
            pool.open()
        ),
    );
    Refusal::new("pool_full", Reply::Client(e))
}

/// Takes back a connection whose client left: finishes its reset and pools
/// it, or closes it. `kept` is what the relay handed back (`None` when the
/// server side ended, or could not be stopped cleanly).
pub(super) async fn give_back(
    ctx: &ShardContext,
    pool: Rc<RoutePool>,
    state: Box<ConnState>,
    kept: Option<Kept>,
) {
    let Some(kept) = kept else {
        debug!("server connection closed: the relay could not hand it back whole");
        pool.closed("broken");
        return;
    };
    let stream = match kept.server {
        ServerSide::Plain(s) => UpstreamStream::Plain(s),
        ServerSide::Tls(s) => UpstreamStream::Tls(s),
    };
    let mut conn = ServerConn { stream, state };
    if let Plan::Close(reason) = kept.plan {
        debug!(
            reason,
            "server connection closed: its client left it unclean"
        );
        pool.closed("unclean");
        return;
    }
    if let Err(e) = reset::complete(&mut conn, &kept.plan, kept.framer, kept.leftover).await {
        debug!(reason = e.as_str(), "server connection reset failed");
        pool.counters.borrow_mut().reset_failures += 1;
        pool.closed("reset_failed");
        return;
    }
    pool.counters.borrow_mut().resets += 1;
    put_back(ctx, &pool, conn).await;
}

/// Pools a connection whose session is known clean, unless it may no
/// longer serve (shutting down, past its lifetime, or logged in as the
/// settings no longer say), in which case it is closed.
pub(super) async fn put_back(ctx: &ShardContext, pool: &RoutePool, conn: ServerConn) {
    let now = Instant::now();
    let retire = if ctx.draining.is_set() {
        Some("shutdown")
    } else if conn.worn_out(now) {
        Some("lifetime")
    } else if !pool.config().mode.pooled()
        || !conn
            .state
            .route
            .same_login(&pool.route(), &conn.state.key.user)
    {
        Some("reload")
    } else {
        None
    };
    match retire {
        Some(reason) => {
            debug!(reason, "server connection closed instead of pooled");
            pool.closed(reason);
            // Boxed, as a rare path (see `acquire`).
            Box::pin(conn.terminate()).await;
        }
        None => pool.put_idle(conn, now),
    }
}

/// Brings the shard's pools up to the current settings, closing the idle
/// connections a reload retired.
async fn refresh(ctx: &ShardContext) {
    let settings = ctx.settings();
    let stale = ctx.pools.refresh(&settings.routes);
    for (pool, conn) in stale {
        pool.closed("reload");
        conn.terminate().await;
    }
}

/// How long after its last client a key still gets `min_idle` connections
/// (the keys an upstream's config names get them for good).
const KEYS_KEPT_WARM: Duration = Duration::from_secs(3600);

/// After a failed background login, how long before the next.
const WARM_RETRY: Duration = Duration::from_secs(10);

/// How often a shard looks after its pools.
const MAINTENANCE_EVERY: Duration = Duration::from_secs(1);

/// Looks after the shard's pools for as long as it runs: applies reloads,
/// closes idle connections that died, outlived `max_lifetime` or idled
/// past `idle_timeout` (beyond `min_idle`), and opens connections to keep
/// `min_idle` for the keys clients used within the last hour (and, for
/// good, for each database an upstream names with each role it has a login
/// for). On a
/// drain, closes the idle ones and stops.
pub async fn maintain(ctx: Rc<ShardContext>) {
    let mut first = true;
    loop {
        if !std::mem::take(&mut first) {
            monoio::select! {
                _ = monoio::time::sleep(MAINTENANCE_EVERY) => {}
                _ = ctx.draining.wait() => {}
            }
        }
        refresh(&ctx).await;
        // Again after each reload too (cheap: a few map lookups).
        foresee_keys(&ctx);
        let draining = ctx.draining.is_set();
        for pool in ctx.pools.all() {
            retire_idle(&pool, ctx.pools.shards(), draining).await;
            if !draining {
                keep_min_idle(&ctx, &pool);
            }
        }
        if draining {
            return;
        }
    }
}

/// Closes the idle connections that are dead, too old, or idle too long.
async fn retire_idle(pool: &Rc<RoutePool>, shards: usize, all: bool) {
    let now = Instant::now();
    let config = pool.config();
    let min = min_idle_share(shards, &config);
    // Per key, idle connections beyond `min_idle` may time out, oldest
    // first.
    let mut spare: std::collections::HashMap<Rc<PoolKey>, usize> = Default::default();
    let since = now.checked_sub(KEYS_KEPT_WARM).unwrap_or(now);
    for (key, idle) in pool.recent_keys(since) {
        spare.insert(key, idle.saturating_sub(min));
    }
    let mut reasons = Vec::new();
    let closing = pool.take_idle_where(|c| {
        let reason = if all {
            "shutdown"
        } else if c.closed_by_server() {
            "broken"
        } else if c.worn_out(now) {
            "lifetime"
        } else if c.state.idle_for(now) >= config.idle_timeout {
            match spare.get_mut(&c.state.key) {
                Some(0) => return false,
                Some(n) => {
                    *n -= 1;
                    "idle"
                }
                None => "idle",
            }
        } else {
            return false;
        };
        reasons.push(reason);
        true
    });
    for (conn, reason) in closing.into_iter().zip(reasons) {
        pool.closed(reason);
        conn.terminate().await;
    }
}

/// This shard's part of `min_idle` (per key): an even split, rounded up.
fn min_idle_share(shards: usize, config: &crate::config::PoolConfig) -> usize {
    config.min_idle.div_ceil(shards.max(1))
}

/// Opens connections in the background where a key lately used has fewer
/// than `min_idle` idle, while seats are free and nobody waits.
fn keep_min_idle(ctx: &Rc<ShardContext>, pool: &Rc<RoutePool>) {
    let config = pool.config();
    if config.min_idle == 0 || !config.mode.pooled() {
        return;
    }
    let min = min_idle_share(ctx.pools.shards(), &config);
    let now = Instant::now();
    if !pool.may_warm(now) {
        return;
    }
    let since = now.checked_sub(KEYS_KEPT_WARM).unwrap_or(now);
    for (key, idle) in pool.recent_keys(since) {
        for _ in idle..min {
            let Some(seat) = pool.spare_seat() else {
                return;
            };
            pool.warming.set(pool.warming.get() + 1);
            let (ctx, pool) = (ctx.clone(), pool.clone());
            let key = key.clone();
            monoio::spawn(async move {
                warm(&ctx, &pool, key, seat).await;
                pool.warming.set(pool.warming.get() - 1);
            });
        }
    }
}

/// Notes the keys most clients will have before any arrives: each database
/// an upstream names (not `*`) with each role it logs in as, under
/// protocol 3.0 with no other parameters (libpq's, pgjdbc's and most
/// drivers' other start-up parameters are set on checkout).
fn foresee_keys(ctx: &ShardContext) {
    let settings = ctx.settings();
    for route in &settings.routes {
        let config = &route.config;
        if config.pool.min_idle == 0 || !config.pool.mode.pooled() {
            continue;
        }
        let pool = ctx.pools.for_route(route);
        for db in config.databases.iter().filter(|d| *d != "*") {
            for user in config.credentials.keys() {
                let params = vec![("database".to_owned(), db.clone())];
                let transaction = config.pool.mode == PoolMode::Transaction;
                let (key, _) = split_params(user, 0, params, &[], transaction);
                pool.intern(key, None);
            }
        }
    }
}

/// A background login for `min_idle`, pooled when done.
async fn warm(ctx: &ShardContext, pool: &RoutePool, key: Rc<PoolKey>, seat: crate::server::Seat) {
    let route = pool.route();
    let Some(password) = route.config.credentials.get(&key.user).cloned() else {
        return;
    };
    let version = ProtocolVersion {
        major: 3,
        minor: key.minor,
    };
    let login = login_params(&key, password, version);
    let up = upstream::connect_and_login(
        &route.config,
        route.tls.as_deref(),
        login,
        &ctx.scram_keys,
        &ctx.relay_buffers,
    )
    .await;
    let up = match up {
        Ok(up) => up,
        Err(e) => {
            pool.hold_warming(Instant::now() + WARM_RETRY);
            warn!(upstream = %pool.name, reason = e.kind(), error = %e, "could not open an idle server connection (min_idle)");
            return;
        }
    };
    pool.counters.borrow_mut().logins += 1;
    let max_lifetime = route.config.pool.max_lifetime;
    if let Ok(conn) = ServerConn::from_login(up, route, key, seat, max_lifetime) {
        pool.put_idle(conn, Instant::now());
    }
}
