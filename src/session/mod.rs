//! One client connection from accept to close: drives the start-up state
//! machine, checks the token, logs in upstream, then relays bytes.
//!
//! The session owns its sockets and buffers and never leaves the shard that
//! accepted it.

mod relay;

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use bytes::BytesMut;
use monoio::io::{AsyncWriteRent, AsyncWriteRentExt};
use monoio::net::TcpStream;
use tracing::{debug, info, warn, Instrument};

use crate::auth::TokenStore;
use crate::config::Config;
use crate::error::ClientError;
use crate::handshake::{self, AwaitStartup, ClientStartup, Phase, Progress};
use crate::io_util::read_append;
use crate::secret::Secret;
use crate::upstream::login::LoginError;
use crate::upstream::scram::KeyCache;
use crate::upstream::{self, Upstream, UpstreamError};

/// What a shard's sessions share: read-only configuration and tokens, and
/// shard-local caches (`!Send`, never touched by another thread).
pub struct ShardContext {
    pub shard: usize,
    pub config: Arc<Config>,
    pub tokens: Arc<TokenStore>,
    /// Client connections open across all shards, for `max_connections`.
    /// Touched once per connect and once per close, never per message.
    pub connections: Arc<AtomicUsize>,
    pub scram_keys: RefCell<KeyCache>,
    next_session: Cell<u64>,
}

impl ShardContext {
    pub fn new(
        shard: usize,
        config: Arc<Config>,
        tokens: Arc<TokenStore>,
        connections: Arc<AtomicUsize>,
    ) -> Self {
        ShardContext {
            shard,
            config,
            tokens,
            connections,
            scram_keys: RefCell::new(KeyCache::new()),
            next_session: Cell::new(0),
        }
    }

    /// Session ids are unique per process: shard number, then a counter.
    fn next_session_id(&self) -> String {
        let n = self.next_session.get() + 1;
        self.next_session.set(n);
        format!("{}-{}", self.shard, n)
    }
}

/// Holds one slot of `max_connections` until dropped.
struct ConnectionSlot(Arc<AtomicUsize>);

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// How a start-up ended when it did not produce a session.
enum Refusal {
    /// A tollgate error for the client.
    Client(ClientError),
    /// The server's own ErrorResponse, relayed verbatim.
    Relay(Vec<u8>),
    /// The client went away; nothing to send.
    Gone,
}

impl From<ClientError> for Refusal {
    fn from(e: ClientError) -> Self {
        Refusal::Client(e)
    }
}

/// A logged-in session, ready to relay.
struct Established {
    startup: ClientStartup,
    token_id: String,
    upstream: Upstream,
}

enum StartupOutcome {
    Session(Box<Established>),
    Cancel {
        process_id: u32,
        secret_key: Vec<u8>,
    },
}

/// Runs a client connection to completion. Never panics on client input;
/// every refusal is logged here with its real reason.
pub async fn run(ctx: Rc<ShardContext>, client: TcpStream, peer: SocketAddr) {
    let id = ctx.next_session_id();
    let span = tracing::info_span!("session", id = %id, shard = ctx.shard, client = %peer);
    serve(ctx, client).instrument(span).await
}

async fn serve(ctx: Rc<ShardContext>, mut client: TcpStream) {
    let _ = client.set_nodelay(true);
    let open = ctx.connections.fetch_add(1, Ordering::Relaxed);
    let _slot = ConnectionSlot(ctx.connections.clone());
    let started = Instant::now();
    let mut input = BytesMut::with_capacity(1024);

    let deadline = ctx.config.startup_timeout;
    let outcome = match monoio::time::timeout(
        deadline,
        start_up(
            &ctx,
            &mut client,
            &mut input,
            open >= ctx.config.max_connections,
        ),
    )
    .await
    {
        Ok(r) => r,
        Err(_) => Err(Refusal::Client(ClientError::startup_timeout())),
    };
    match outcome {
        Ok(StartupOutcome::Session(est)) => {
            info!(
                token_id = %est.token_id,
                user = %est.startup.user,
                database = %est.startup.database,
                setup_us = started.elapsed().as_micros() as u64,
                "session started"
            );
            let stats = relay::run(client, est.upstream, input, ctx.config.buffer_size).await;
            info!(
                token_id = %est.token_id,
                duration_ms = started.elapsed().as_millis() as u64,
                bytes_from_client = stats.bytes_from_client,
                bytes_from_server = stats.bytes_from_server,
                query_cycles = stats.ready_for_query,
                ended_by = stats.ended_by.as_str(),
                "session ended"
            );
        }
        Ok(StartupOutcome::Cancel {
            process_id,
            secret_key,
        }) => {
            // Postgres answers a CancelRequest with nothing, right or wrong.
            drop(client);
            match upstream::forward_cancel(&ctx.config.upstream, process_id, &secret_key).await {
                Ok(()) => debug!("cancel request forwarded"),
                Err(e) => warn!(error = %e, "cancel request not forwarded"),
            }
        }
        Err(Refusal::Gone) => debug!("client left during start-up"),
        Err(Refusal::Client(e)) => {
            let mut out = BytesMut::with_capacity(256);
            e.encode(&mut out);
            close_with(client, out).await;
        }
        Err(Refusal::Relay(bytes)) => close_with(client, BytesMut::from(&bytes[..])).await,
    }
}

/// Reads the client's start-up and token, checks it, and logs in upstream.
async fn start_up(
    ctx: &ShardContext,
    client: &mut TcpStream,
    input: &mut BytesMut,
    over_limit: bool,
) -> Result<StartupOutcome, Refusal> {
    let mut phase = Phase::Startup(AwaitStartup::new());
    let mut output = BytesMut::with_capacity(256);
    let (startup, token) = loop {
        let (res, buf) = read_append(client, std::mem::take(input), 1024).await;
        *input = buf;
        match res {
            Ok(0) | Err(_) => return Err(Refusal::Gone),
            Ok(_) => {}
        }
        let progress = handshake::advance(phase, input, &mut output).map_err(|e| {
            info!(reason = e.kind, "start-up refused");
            Refusal::Client(e)
        })?;
        if over_limit
            && matches!(
                progress,
                Progress::NeedMore(Phase::Password(_)) | Progress::Credentials { .. }
            )
        {
            // Refuse once the client has said who it is, so that it reads
            // our error rather than a reset.
            info!(reason = "too_many_connections", "start-up refused");
            return Err(ClientError::too_many_connections().into());
        }
        if !output.is_empty() {
            let (res, buf) = client.write_all(std::mem::take(&mut output)).await;
            output = buf;
            output.clear();
            if res.is_err() {
                return Err(Refusal::Gone);
            }
        }
        match progress {
            Progress::NeedMore(next) => phase = next,
            Progress::Cancel {
                process_id,
                secret_key,
            } => {
                return Ok(StartupOutcome::Cancel {
                    process_id,
                    secret_key,
                })
            }
            Progress::Credentials { startup, token } => break (startup, token),
        }
    };

    let token_id = check_token(ctx, &startup, &token)?;
    drop(token);

    let password = match ctx.config.upstream.credentials.get(&startup.user) {
        Some(p) => p.clone(),
        None => {
            // A token for a role tollgate has no login for is a config gap;
            // the client gets the upstream-login error, the log the reason.
            warn!(token_id = %token_id, user = %startup.user, "no upstream credentials for this role");
            return Err(ClientError::upstream_login_failed().into());
        }
    };
    let upstream = upstream::connect_and_login(
        &ctx.config.upstream,
        &startup.user,
        password,
        startup.params.forwardable(),
        &ctx.scram_keys,
    )
    .await
    .map_err(|e| {
        warn!(token_id = %token_id, user = %startup.user, reason = e.kind(), error = %e, "upstream login failed");
        match e {
            UpstreamError::Connect { .. } | UpstreamError::ConnectTimeout { .. } => {
                Refusal::Client(ClientError::upstream_unavailable())
            }
            UpstreamError::Io(_) | UpstreamError::Closed => Refusal::Client(ClientError::upstream_lost()),
            UpstreamError::Frame(_) | UpstreamError::Login(LoginError::Protocol { .. }) => {
                Refusal::Client(ClientError::upstream_protocol())
            }
            UpstreamError::Login(LoginError::ServerError { response, .. }) => Refusal::Relay(response),
            UpstreamError::Login(_) => Refusal::Client(ClientError::upstream_login_failed()),
        }
    })?;

    // tollgate asked for the password, so the client is waiting for
    // AuthenticationOk: the server's, relayed with what follows it.
    Ok(StartupOutcome::Session(Box::new(Established {
        startup,
        token_id,
        upstream,
    })))
}

/// Checks the token; every rejection reaches the client as the same bytes
/// and the log with its real reason.
fn check_token(
    ctx: &ShardContext,
    startup: &ClientStartup,
    token: &Secret,
) -> Result<String, Refusal> {
    let verdict = ctx.tokens.check(
        token.expose(),
        &startup.user,
        &startup.database,
        SystemTime::now(),
    );
    let token_id = verdict.token_id.unwrap_or_else(|| "-".to_owned());
    match verdict.outcome {
        Ok(()) => Ok(token_id),
        Err(reason) => {
            info!(
                token_id = %token_id,
                user = %startup.user,
                database = %startup.database,
                reason = reason.as_str(),
                "token rejected"
            );
            Err(ClientError::token_rejected(&startup.user).into())
        }
    }
}

/// Sends a final message and closes without a reset: shut down our side,
/// then drain what the client still sends for a moment, so that unread
/// bytes in our receive queue do not turn the close into an RST that
/// could destroy the error before the client reads it.
async fn close_with(mut client: TcpStream, out: BytesMut) {
    let (res, _) = client.write_all(out).await;
    if res.is_err() {
        return;
    }
    let _ = client.shutdown().await;
    let drain = async {
        let mut buf = Vec::with_capacity(4096);
        loop {
            let (res, b) = monoio::io::AsyncReadRent::read(&mut client, buf).await;
            buf = b;
            match res {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    };
    let _ = monoio::time::timeout(std::time::Duration::from_millis(500), drain).await;
}
