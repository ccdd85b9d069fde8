//! The start-up of one client connection, in named steps: read the
//! StartupMessage and the token (the sans-IO [`handshake`] machine answers
//! SSLRequest, GSSENCRequest, CancelRequest and protocol negotiation), check
//! the token and the rules it carries, choose the upstream, and log in there
//! with tollgate's own credentials. Everything happens before the start-up
//! deadline; any step can end the start-up with a [`Refusal`].
//!
//! <https://www.postgresql.org/docs/current/protocol-flow.html#PROTOCOL-FLOW-START-UP>

use std::sync::Arc;
use std::time::Instant;

use bytes::BytesMut;
use monoio::io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt};
use monoio::time::timeout_at;
use tracing::warn;

use crate::audit::Attempt;
use crate::auth::Grant;
use crate::config::{ClientTlsMode, Config};
use crate::error::ClientError;
use crate::handshake::{self, ClientStartup, Phase, Progress, StartupPolicy};
use crate::io_util::read_append;
use crate::net::Peer;
use crate::protocol::sqlstate;
use crate::protocol::startup::MAX_STARTUP_PACKET_LENGTH;
use crate::secret::Secret;
use crate::upstream::{self, Upstream};

use super::borrow::{check_out, ServerLink, Wanted};
use super::params::{locked_parameter, upstream_params, upstream_startup_len};
use super::refusal::{upstream_refusal, Refusal, Reply};
use super::token_check::{check_token, Checked};
use super::{cancel, limits, Route, ShardContext, Start};

/// How a start-up ends when the connection goes on.
pub(super) enum StartupOutcome {
    /// Logged in upstream: relay from here.
    Session(Box<Established>),
    /// The connection carried a CancelRequest.
    Cancel(cancel::CancelRequest),
    /// TLS must start (SSLRequest, or a direct TLS ClientHello), then the
    /// start-up goes on at `next`.
    StartTls { next: Phase, direct: bool },
}

/// A logged-in session, ready to relay.
pub(super) struct Established {
    pub startup: ClientStartup,
    pub token_id: String,
    pub grant: Grant,
    /// For a JWT: its `jti`, for the deny-list.
    pub jwt_id: Option<Option<String>>,
    /// Counts against the token's `max_connections` while held.
    pub token_slot: Option<limits::TokenSlot>,
    /// The client's cancel key; released when the session ends.
    pub cancel_key: cancel::Reservation,
    /// The server routing chose.
    pub route: Arc<Route>,
    pub server: ServerLink,
}

/// What this client may do before TLS: tokens travel in the clear only
/// from loopback, unless TLS is not configured at all. A Unix-domain
/// socket never offers TLS (as in PostgreSQL): its bytes never leave the
/// host, and the socket file's mode says who may connect.
pub(super) fn policy(config: &Config, peer: &Peer) -> StartupPolicy {
    let mut policy = match &config.tls {
        None => StartupPolicy::default(),
        Some(_) if peer.is_local() => StartupPolicy::default(),
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

/// Reads the client's start-up and token, checks it, and logs in upstream,
/// all before `start.deadline`. Stops early when TLS must start or the
/// connection is a CancelRequest. Fills in `attempt` as it learns who the
/// client is.
pub(super) async fn start_up<C: AsyncReadRent + AsyncWriteRent>(
    ctx: &ShardContext,
    client: &mut C,
    input: &mut BytesMut,
    phase: Phase,
    start: &Start,
    attempt: &mut Attempt,
) -> Result<StartupOutcome, Refusal> {
    let (startup, token) = match read_credentials(client, input, phase, start).await? {
        Read::Credentials { startup, token } => (startup, token),
        Read::Done(outcome) => return Ok(outcome),
    };
    attempt.user = Some(startup.user.clone());
    attempt.database = Some(startup.database.clone());

    let checking = Instant::now();
    let checked = check_token(ctx, &startup, &token, start.peer, attempt);
    ctx.metrics.token_checked(checking.elapsed());
    let checked = checked?;
    drop(token);
    let Allowed { token_slot, params } = apply_rules(ctx, start, &startup, &checked)?;
    let (route, password) = choose_route(ctx, start, &startup, &checked.grant)?;
    // Replication connections speak another protocol after start-up and
    // are never pooled.
    let pooled = route.config.pool.mode.pooled() && !startup.is_replication();
    let (server, cancel_key) = if pooled {
        let cancel_key = ctx.cancel_keys.reserve();
        let wanted = Wanted {
            startup: &startup,
            token_id: &checked.token_id,
            password,
            params,
            fixed: &checked.grant.session,
            pool_mode: checked.grant.pool_mode,
        };
        let borrowed = check_out(ctx, start, &route, wanted, &cancel_key).await?;
        (ServerLink::Pooled(borrowed), cancel_key)
    } else {
        let (upstream, cancel_key) = log_in(
            ctx,
            start,
            &startup,
            &checked.token_id,
            &route,
            password,
            &params,
        )
        .await?;
        (ServerLink::Own(upstream), cancel_key)
    };
    // tollgate asked for the password, so the client is waiting for
    // AuthenticationOk: the server's, relayed with what follows it.
    Ok(StartupOutcome::Session(Box::new(Established {
        startup,
        token_id: checked.token_id,
        grant: checked.grant,
        jwt_id: checked.jwt_id,
        token_slot,
        cancel_key,
        route,
        server,
    })))
}

/// What reading the start-up came to.
enum Read {
    /// A StartupMessage and the token the client gave as its password.
    Credentials {
        startup: ClientStartup,
        token: Secret,
    },
    /// Not a login (yet): TLS first, or a CancelRequest.
    Done(StartupOutcome),
}

/// Runs the handshake machine over the client's bytes until it has the
/// start-up packet and the token, writing its answers (SSLRequest's 'S',
/// the password request, protocol negotiation) as it goes.
async fn read_credentials<C: AsyncReadRent + AsyncWriteRent>(
    client: &mut C,
    input: &mut BytesMut,
    mut phase: Phase,
    start: &Start,
) -> Result<Read, Refusal> {
    let mut output = BytesMut::with_capacity(256);
    loop {
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
                return Ok(Read::Done(StartupOutcome::Cancel(cancel::CancelRequest {
                    process_id,
                    secret_key: secret_key.into(),
                    client: start.peer,
                    from_peer: false,
                    reply: None,
                })))
            }
            Progress::StartTls { next, direct } => {
                return Ok(Read::Done(StartupOutcome::StartTls { next, direct }))
            }
            Progress::Credentials { startup, token } => {
                return Ok(Read::Credentials { startup, token })
            }
        }
        let read = read_append(client, std::mem::take(input), 1024);
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

/// What a token's rules let a start-up go on with.
struct Allowed {
    /// Counts against the token's `max_connections` while held.
    token_slot: Option<limits::TokenSlot>,
    /// The start-up parameters to send upstream.
    params: Vec<(String, String)>,
}

/// The rules a valid token carries beyond who it is: replication,
/// `lock_session`, its connection limit; and the start-up parameters it
/// makes, which must still fit a start-up packet.
fn apply_rules(
    ctx: &ShardContext,
    start: &Start,
    startup: &ClientStartup,
    checked: &Checked,
) -> Result<Allowed, Refusal> {
    let (peer, tag) = (start.peer, start.settings.config.audit.tag_application_name);
    let grant = &checked.grant;
    if startup.is_replication() && !grant.replication {
        return Err(ClientError::replication_not_allowed().into());
    }
    if let Some(name) = locked_parameter(startup, grant) {
        return Err(ClientError::session_locked(name).into());
    }
    let token_slot = match grant.max_connections {
        None => None,
        Some(max) => match ctx.token_limits.acquire(&checked.token_id, max) {
            Some(slot) => Some(slot),
            None => return Err(ClientError::token_connection_limit().into()),
        },
    };
    let params = upstream_params(startup, grant, &checked.token_id, peer.ip(), tag);
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
    Ok(Allowed { token_slot, params })
}

/// The upstream for this database (and this token's `upstreams` rule),
/// and tollgate's password for the role there.
fn choose_route(
    ctx: &ShardContext,
    start: &Start,
    startup: &ClientStartup,
    grant: &Grant,
) -> Result<(Arc<Route>, Option<Secret>), Refusal> {
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
    match route.config.credentials.get(&startup.user) {
        Some(p) => {
            let password = p.clone();
            Ok((route, password))
        }
        None => {
            // A token for a role tollgate has no login for is a config gap;
            // the client gets the upstream-login error, the log the reason.
            let e = ClientError::upstream_login_failed();
            Err(Refusal::new("no_upstream_credentials", Reply::Client(e)))
        }
    }
}

/// Connects and logs in to `route` as the client's role, under a cancel
/// key reserved for this session (activated with the server's real key).
async fn log_in(
    ctx: &ShardContext,
    start: &Start,
    startup: &ClientStartup,
    token_id: &str,
    route: &Arc<Route>,
    password: Option<Secret>,
    params: &[(String, String)],
) -> Result<(Upstream, cancel::Reservation), Refusal> {
    let cancel_key = ctx.cancel_keys.reserve();
    let login = upstream::LoginParams {
        user: &startup.user,
        password,
        version: startup.version,
        params: params.iter().map(|(k, v)| (k.as_str(), v.as_str())),
        issued_secret: cancel_key.secret,
        seal: ctx.cancel_keys.sealer(),
    };
    let upstream = connect_upstream(ctx, start.deadline, token_id, route, login).await?;
    if let (Some(issued), Some(real)) = (&upstream.ready.issued_key, &upstream.ready.upstream_key) {
        cancel_key.activate(issued, real.clone(), route.clone());
    }
    Ok((upstream, cancel_key))
}

/// Connects and logs in to `route`, before the start-up deadline; a
/// failure becomes the refusal the client is sent (and a warning: a
/// failing upstream is the operator's problem, not the client's).
pub(super) async fn connect_upstream<'a, P: Iterator<Item = (&'a str, &'a str)>>(
    ctx: &ShardContext,
    deadline: monoio::time::Instant,
    token_id: &str,
    route: &Route,
    login: upstream::LoginParams<'a, P>,
) -> Result<Upstream, Refusal> {
    let user = login.user;
    let login = upstream::connect_and_login(
        &route.config,
        route.tls.as_deref(),
        login,
        &ctx.scram_keys,
        &ctx.relay_buffers,
    );
    let connecting = Instant::now();
    let upstream = timeout_at(deadline, login)
        .await
        .map_err(|_| {
            // The client did its part; the server's login ran out the
            // start-up time. Not the client's error (08P01) but the server's.
            warn!(
                token_id = %token_id,
                user = %user,
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
            warn!(
                token_id = %token_id,
                user = %user,
                reason = e.kind(),
                error = %e,
                "upstream login failed"
            );
            upstream_refusal(e)
        })?;
    ctx.metrics.upstream_connected(connecting.elapsed());
    Ok(upstream)
}
