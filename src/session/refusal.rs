//! How a start-up ends when it does not become a session: the real reason
//! (for the audit log and the `tollgate_connections_rejected_total` label),
//! what the client is told (a tollgate ErrorResponse, the server's own, or
//! nothing), and the close that makes sure the client can read it.
//!
//! What a client may read is decided here and in [`crate::error`]: upstream
//! failures reach it as generic messages, with the details in the log.

use bytes::BytesMut;
use monoio::io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt};

use crate::audit::{self, Attempt};
use crate::error::ClientError;
use crate::protocol::sqlstate;
use crate::upstream::login::LoginError;
use crate::upstream::UpstreamError;

use super::{ShardContext, Start};

/// How a start-up ended when it did not produce a session.
pub(super) struct Refusal {
    /// The real reason: the audit event's and the metric's label.
    pub(super) reason: &'static str,
    pub(super) reply: Reply,
    /// More for the operator's log (an upstream error's text), never for
    /// the client.
    pub(super) detail: Option<String>,
}

/// What a refused client is sent before the connection closes.
pub(super) enum Reply {
    /// A tollgate error.
    Client(ClientError),
    /// The server's own ErrorResponse, relayed verbatim.
    Relay(Vec<u8>),
    /// Nothing: the client went away, or TLS failed.
    Nothing,
    /// Nothing, but an orderly close, as Postgres closes on a start-up
    /// packet it cannot frame.
    Close,
}

impl Refusal {
    pub(super) fn new(reason: &'static str, reply: Reply) -> Self {
        Refusal {
            reason,
            reply,
            detail: None,
        }
    }

    pub(super) fn gone() -> Self {
        Refusal::new("client_left", Reply::Nothing)
    }
}

/// A tollgate error names its own reason (its `kind`).
impl From<ClientError> for Refusal {
    fn from(e: ClientError) -> Self {
        if e.silent {
            let mut refusal = Refusal::new(e.kind, Reply::Close);
            refusal.detail = Some(e.message);
            return refusal;
        }
        Refusal::new(e.kind, Reply::Client(e))
    }
}

/// Records a refused attempt: its audit event and its metric.
pub(super) fn refused(ctx: &ShardContext, start: &Start, attempt: &Attempt, refusal: &Refusal) {
    ctx.metrics.rejected(refusal.reason);
    audit::rejected(
        start.id,
        start.peer,
        attempt,
        refusal.reason,
        refusal.detail.as_deref(),
    );
}

/// What the client sees for an upstream failure: server errors verbatim,
/// tollgate's own failures as generic messages (the audit log has the
/// details).
pub(super) fn upstream_refusal(e: UpstreamError) -> Refusal {
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

/// Sends a final message and closes without a reset: shut down our side,
/// then drain what the client still sends for a moment, so that unread
/// bytes in our receive queue do not turn the close into an RST that
/// could destroy the error before the client reads it.
pub(super) async fn close_with<C: AsyncReadRent + AsyncWriteRent>(mut client: C, out: BytesMut) {
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

/// What a client accepted while the process is out of file descriptors is
/// told before it is let go, without anything of it read.
pub fn out_of_fds_response() -> BytesMut {
    encode(&ClientError::new(
        sqlstate::TOO_MANY_CONNECTIONS,
        "out_of_fds",
        "tollgate is out of file descriptors; try again later",
    ))
}

/// A tollgate error as the bytes of its ErrorResponse.
pub(super) fn encode(e: &ClientError) -> BytesMut {
    let mut out = BytesMut::with_capacity(256);
    e.encode(&mut out);
    out
}
