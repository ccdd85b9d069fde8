//! Audit events: one per connection attempt (accepted, or rejected with
//! the real reason), one per session end, and, when `[audit] queries` is
//! on, one per Query or Parse message.
//!
//! They are `tracing` events with the target [`TARGET`], so a log
//! pipeline can route them apart (`RUST_LOG=tollgate::audit=info` keeps
//! only them), and they carry every identifying field themselves rather
//! than through a span: each line stands alone. The reason names are the
//! same as the `reason` label of `tollgate_connections_rejected_total`.
//!
//! No secret is ever a field: tokens appear by id, passwords not at all.

use std::time::Duration;

use tracing::info;

use crate::net::Peer;

/// The `tracing` target of every audit event.
pub const TARGET: &str = "tollgate::audit";

/// What is known of a connection attempt, as far as it got.
#[derive(Debug, Default)]
pub struct Attempt {
    pub user: Option<String>,
    pub database: Option<String>,
    pub token_id: Option<String>,
    /// The client's TLS version, once TLS is up.
    pub tls: Option<&'static str>,
}

/// Session ids are `{shard}-{n}`, unique within the process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionId {
    pub shard: usize,
    pub number: u64,
}

impl std::fmt::Display for SessionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.shard, self.number)
    }
}

/// A connection attempt refused. `detail` is for the operator (an upstream
/// error's text, say); the client was told less.
pub fn rejected(
    session: SessionId,
    client: Peer,
    attempt: &Attempt,
    reason: &'static str,
    detail: Option<&str>,
) {
    info!(
        target: TARGET,
        parent: None,
        event = "connection",
        outcome = "rejected",
        reason,
        session = %session,
        shard = session.shard,
        client = %client,
        peer_uid = client.credentials().0,
        peer_pid = client.credentials().1,
        token_id = attempt.token_id.as_deref(),
        user = attempt.user.as_deref(),
        database = attempt.database.as_deref(),
        tls = attempt.tls,
        detail,
        "connection refused"
    );
}

/// What the accepted-session event reports beyond the attempt.
pub struct Accepted<'a> {
    pub token_id: &'a str,
    /// The server's process id for this session (`pg_stat_activity.pid`),
    /// when the server sent one.
    pub backend_pid: Option<u32>,
    pub user: &'a str,
    pub database: &'a str,
    pub upstream_tls: bool,
    pub upstream_auth: &'static str,
    pub protocol_minor: u16,
    /// With pooling: whether the server connection served a client before,
    /// and how long the checkout took (waiting in line included).
    pub server_checkout: Option<(bool, Duration)>,
    pub setup: Duration,
}

pub fn accepted(session: SessionId, client: Peer, tls: Option<&'static str>, a: &Accepted) {
    info!(
        target: TARGET,
        parent: None,
        event = "connection",
        outcome = "accepted",
        session = %session,
        shard = session.shard,
        client = %client,
        peer_uid = client.credentials().0,
        peer_pid = client.credentials().1,
        token_id = a.token_id,
        backend_pid = a.backend_pid,
        user = a.user,
        database = a.database,
        tls,
        upstream_tls = a.upstream_tls,
        upstream_auth = a.upstream_auth,
        protocol = %format_args!("3.{}", a.protocol_minor),
        server_reused = a.server_checkout.map(|(reused, _)| reused),
        checkout_us = a.server_checkout.map(|(_, took)| took.as_micros() as u64),
        setup_us = a.setup.as_micros() as u64,
        "session started"
    );
}

/// What the session-end event reports.
pub struct Ended<'a> {
    pub token_id: &'a str,
    pub backend_pid: Option<u32>,
    pub user: &'a str,
    pub database: &'a str,
    pub duration: Duration,
    pub totals: crate::metrics::Totals,
    pub ended_by: &'static str,
}

pub fn ended(session: SessionId, client: Peer, e: &Ended) {
    info!(
        target: TARGET,
        parent: None,
        event = "session_end",
        session = %session,
        shard = session.shard,
        client = %client,
        token_id = e.token_id,
        backend_pid = e.backend_pid,
        user = e.user,
        database = e.database,
        duration_ms = e.duration.as_millis() as u64,
        bytes_from_client = e.totals.bytes_from_client,
        bytes_from_server = e.totals.bytes_from_server,
        queries = e.totals.queries,
        transactions = e.totals.transactions,
        ended_by = e.ended_by,
        "session ended"
    );
}

/// A CancelRequest, once its fate is known.
pub fn cancel(client: Peer, process_id: u32, result: &'static str) {
    info!(
        target: TARGET,
        parent: None,
        event = "cancel_request",
        client = %client,
        process_id,
        result,
        "cancel request"
    );
}
