//! A logged-in session becomes a relay: it is announced (audit event,
//! metric), registered with the shard (for the watcher, `/sessions` and
//! scrapes), given its per-session tracking, and handed to the relay. The
//! returned task runs the relay and records the session's end.

use std::rc::Rc;
use std::time::{Duration, SystemTime};

use bytes::BytesMut;
use tracing::{debug, warn};

use crate::audit;
use crate::auth::Grant;
use crate::handshake::ClientStartup;
use crate::server::ServerConn;
use crate::upstream::{self, UpstreamStream};

use super::borrow::{self, ServerLink};
use super::startup::Established;
use super::{relay, txpool, watch, RelayTask, ShardContext, Start};

/// Starts relaying for a logged-in session and returns the relay task,
/// which logs the session's end.
pub(super) fn established<C: relay::ClientSide + 'static>(
    ctx: &Rc<ShardContext>,
    client: C,
    input: BytesMut,
    est: Established,
    start: &Start,
    tls: Option<&'static str>,
) -> RelayTask {
    announce(ctx, &est, start, tls);
    let stats = Rc::new(relay::SessionStats::default());
    let tracks = tracks(ctx, start, &est.token_id, stats.clone());
    let Established {
        startup,
        token_id,
        grant,
        jwt_id,
        token_slot,
        cancel_key,
        route,
        server,
    } = est;
    let backend_pid = server.backend_pid();
    let mut watched = watched(start, tls, stats, token_id, &grant, jwt_id, startup);
    watched.backend_pid = backend_pid;
    let registration = ctx.tokens.with(&ctx.store.published, |store| {
        ctx.registry.register(watched, store, SystemTime::now())
    });
    let kill = registration.watched.kill.clone();
    // Transaction pooling, when the route's or the token's mode says so,
    // with a plain or a TLS server connection alike.
    let rest = Rest {
        tracks,
        kill,
        route,
        cancel_key,
        token_slot,
        registration,
    };
    let (b, login) = match server {
        ServerLink::Pooled(mut b) => match b.lending.take() {
            Some(login) => (b, login),
            None => return established_on(ctx, client, input, ServerLink::Pooled(b), rest),
        },
        server => return established_on(ctx, client, input, server, rest),
    };
    let client = match client.into_client() {
        relay::Client::Plain(c) => txpool::Link::Plain(crate::net::ReadyStream::new(c)),
        relay::Client::Tls(c) => txpool::Link::Tls(Box::new(c)),
    };
    established_tx(ctx, client, input, (b, login), rest, start)
}

/// The relay of a session under transaction pooling (see [`txpool`]).
fn established_tx(
    ctx: &Rc<ShardContext>,
    client: txpool::Link,
    input: BytesMut,
    (b, login): (borrow::Borrowed, borrow::Login),
    rest: Rest,
    start: &Start,
) -> RelayTask {
    let Rest {
        tracks,
        kill,
        route: _,
        cancel_key,
        token_slot,
        registration,
    } = rest;
    let borrow::Borrowed {
        conn,
        pool,
        for_client,
        ..
    } = b;
    let lending = txpool::Lending {
        ctx: ctx.clone(),
        pool: pool.clone(),
        login,
        cancel_key,
        kill,
        buffers: ctx.relay_buffers.clone(),
        reset_query: Rc::from(pool.config().reset_query.as_str()),
        session: start.id,
    };
    let opening = Box::new(txpool::Opening {
        lending,
        first: conn,
        for_client,
        client_pending: input,
        tracks,
    });
    let ctx = ctx.clone();
    Box::pin(async move {
        // Made here, not awaited from a capture: a captured future is kept
        // beside the one awaited, twice the session's size.
        let out = txpool::run(client, opening).await;
        drop(token_slot);
        record_end(&ctx.metrics, &registration, out.by.as_str());
        drop(registration);
        if let Some((state, kept)) = out.held {
            Box::pin(borrow::give_back(&ctx, pool, state, kept)).await;
        }
    })
}

/// What a session relays with besides its sockets.
struct Rest {
    tracks: relay::Tracks,
    kill: Rc<crate::session::kill::KillSwitch>,
    route: std::sync::Arc<super::Route>,
    cancel_key: super::cancel::Reservation,
    token_slot: Option<super::limits::TokenSlot>,
    registration: watch::Registration,
}

/// The relay of a session that keeps one server connection throughout:
/// its own login, or a pooled one for its session.
fn established_on<C: relay::ClientSide + 'static>(
    ctx: &Rc<ShardContext>,
    client: C,
    input: BytesMut,
    server: ServerLink,
    rest: Rest,
) -> RelayTask {
    let Rest {
        tracks,
        kill,
        route,
        cancel_key,
        token_slot,
        registration,
    } = rest;
    let (stream, for_client, leftover, key, pooled) = match server {
        ServerLink::Own(up) => (
            up.stream,
            up.for_client,
            up.leftover,
            up.ready.upstream_key,
            None,
        ),
        ServerLink::Pooled(b) => {
            let ServerConn { stream, state } = b.conn;
            let key = state.upstream_key.clone();
            (
                stream,
                b.for_client,
                BytesMut::new(),
                key,
                Some((b.pool, state)),
            )
        }
    };
    // The reset query, for a server connection that outlives the client.
    let keep: Option<Rc<str>> = pooled
        .as_ref()
        .map(|(pool, _)| Rc::from(pool.config().reset_query.as_str()));
    // A client that vanishes mid-query leaves a cancel behind it: sent to
    // the upstream this session logged in to, even after a reload.
    let abandon = move || async move {
        let Some(key) = key else { return };
        let tls = route.tls.as_deref();
        match upstream::send_cancel(&route.config, tls, &key).await {
            Ok(()) => debug!("query of a departed client cancelled"),
            Err(e) => warn!(error = %e, "could not cancel a departed client's query"),
        }
    };
    let server = match stream {
        UpstreamStream::Plain(s) => relay::ServerSide::Plain(s),
        UpstreamStream::Tls(s) => relay::ServerSide::Tls(s),
    };
    let opening = relay::Opening {
        for_client,
        leftover,
        client_pending: input,
        keep,
    };
    let pool = ctx.relay_buffers.clone();
    let relay = relay::run(client, server, opening, tracks, pool, kill, abandon);
    let ctx = ctx.clone();
    Box::pin(async move {
        let ended = relay.await;
        // Before the server connection can serve anyone else: a late
        // cancel with this client's key must find nothing.
        drop(cancel_key);
        drop(token_slot);
        record_end(&ctx.metrics, &registration, ended.by.as_str());
        // Until here the session's bytes count as live in a scrape.
        drop(registration);
        if let Some((pool, state)) = pooled {
            // Boxed: the reset's state would otherwise be part of every
            // idle session's task.
            Box::pin(borrow::give_back(&ctx, pool, state, ended.kept)).await;
        }
    })
}

/// The session as the shard's registry keeps it: who it is, its live
/// numbers, and what the watcher checks it against.
fn watched(
    start: &Start,
    tls: Option<&'static str>,
    stats: Rc<relay::SessionStats>,
    token_id: String,
    grant: &Grant,
    jwt_id: Option<Option<String>>,
    startup: ClientStartup,
) -> watch::Watched {
    let config = &start.settings.config;
    // A JWT ends at `exp` plus the leeway it was accepted with.
    let jwt_end = grant
        .expires_at
        .map(|t| t + config.jwt.as_ref().map_or(Duration::ZERO, |j| j.leeway()));
    watch::Watched {
        id: start.id,
        user: startup.user,
        database: startup.database,
        client: start.peer,
        tls,
        started_at: start.started_at,
        started: start.started,
        stats,
        token_id,
        backend_pid: None,
        secret_sha256: grant.secret_sha256,
        on_expiry: grant.on_expiry.unwrap_or(config.on_expiry),
        jwt: jwt_id.map(|jti| (jti, jwt_end.unwrap_or(SystemTime::UNIX_EPOCH))),
        kill: Default::default(),
    }
}

/// The session's accepted audit event and metric.
fn announce(ctx: &ShardContext, est: &Established, start: &Start, tls: Option<&'static str>) {
    ctx.metrics.accepted();
    audit::accepted(
        start.id,
        start.peer,
        tls,
        &audit::Accepted {
            token_id: &est.token_id,
            backend_pid: est.server.backend_pid(),
            user: &est.startup.user,
            database: &est.startup.database,
            upstream_tls: est.server.tls(),
            upstream_auth: est.server.auth_method(),
            protocol_minor: est.server.minor(),
            server_checkout: est.server.checkout(),
            setup: start.started.elapsed(),
        },
    );
}

/// What the relay tracks for this session: its counters always; latency
/// histograms and the query audit when they are on.
fn tracks(
    ctx: &ShardContext,
    start: &Start,
    token_id: &str,
    stats: Rc<relay::SessionStats>,
) -> relay::Tracks {
    let config = &start.settings.config;
    let timing = ctx
        .metrics
        .timing()
        .then(|| relay::Timing::new(ctx.metrics.clone(), ctx.metrics.token_series(token_id)));
    let audit_queries = config.audit.queries.then(|| {
        Box::new(relay::QueryAudit::new(
            start.id.to_string(),
            token_id.to_owned(),
            config.audit.max_query_length,
        ))
    });
    relay::Tracks::new(stats, timing, audit_queries)
}

/// The session's end: its metric and its audit event.
fn record_end(
    metrics: &crate::metrics::ShardMetrics,
    registration: &watch::Registration,
    ended_by: &'static str,
) {
    let w = &registration.watched;
    let totals = w.stats.totals();
    metrics.session_ended(ended_by, &totals);
    audit::ended(
        w.id,
        w.client,
        &audit::Ended {
            token_id: &w.token_id,
            backend_pid: w.backend_pid,
            user: &w.user,
            database: &w.database,
            duration: w.started.elapsed(),
            totals,
            ended_by,
        },
    );
}
