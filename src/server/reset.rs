//! Making a server connection fresh again when its client leaves, so that
//! nothing one client did can reach the next.
//!
//! Where the client left the protocol decides how ([`plan`]):
//!
//! - **Clean**: between queries, nothing in flight. `ROLLBACK` if a
//!   transaction is open, then the reset query (`DISCARD ALL`).
//! - **Drain**: a query still running, an extended-protocol batch without
//!   its Sync, a COPY, or a server message cut short. Whatever runs is
//!   cancelled first (by the caller); then CopyFail (ignored outside
//!   COPY), an Execute of a portal that cannot exist (so that an unsynced
//!   batch aborts rather than commits at the Sync), Sync, `ROLLBACK`, a
//!   marker query carrying a random nonce, and the reset query. Everything
//!   up to the marker's row is the departed client's and is discarded.
//! - **Close**: the client left in the middle of a message of its own (the
//!   server holds half of it), or the relay could not stop cleanly.
//!
//! The connection is pooled only if the reset query succeeds and the
//! server ends idle (`ReadyForQuery` 'I').

use std::time::Duration;

use bytes::{BufMut, BytesMut};
use monoio::time::timeout;

use super::wire::{self, Message, Reader, WireError};
use super::ServerConn;
use crate::protocol::frame::Framer;

/// How long a reset may take before the connection is closed instead.
pub const RESET_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the relay left the two streams.
#[derive(Debug, Clone, Copy)]
pub struct EndState {
    /// The client's last message reached the server whole.
    pub client_at_boundary: bool,
    /// The relay stopped between server messages.
    pub server_at_boundary: bool,
    /// Query cycles asked for and not answered, or an extended batch
    /// without its Sync.
    pub in_flight: bool,
    /// The client ended with Terminate: what it asked for before runs to
    /// its end, as Postgres runs it before it reads the Terminate.
    pub said_goodbye: bool,
    /// The transaction status of the last ReadyForQuery.
    pub status: u8,
    /// False when the relay had to drop a read or write to the server
    /// half-done: the stream is in an unknown state.
    pub intact: bool,
}

/// How a returned connection is made fresh.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    Clean { rollback: bool },
    Drain { nonce: String },
    Close(&'static str),
}

impl Plan {
    /// Whether a cancel must go first: something may be running, and the
    /// client vanished rather than said goodbye.
    pub fn needs_cancel(&self, end: &EndState) -> bool {
        matches!(self, Plan::Drain { .. }) && end.in_flight && !end.said_goodbye
    }
}

pub fn plan(end: &EndState) -> Plan {
    if !end.intact {
        return Plan::Close("relay_cut");
    }
    if !end.client_at_boundary {
        return Plan::Close("client_mid_message");
    }
    if end.in_flight || !end.server_at_boundary {
        return Plan::Drain {
            nonce: crate::secret::random_hex(16),
        };
    }
    Plan::Clean {
        rollback: end.status != b'I',
    }
}

/// What is sent to carry out `plan` (nothing for Close).
pub fn prologue(plan: &Plan, reset_query: &str) -> BytesMut {
    let mut out = BytesMut::with_capacity(128 + reset_query.len());
    match plan {
        Plan::Close(_) => return out,
        Plan::Clean { rollback } => {
            if *rollback {
                wire::query(&mut out, "ROLLBACK");
            }
        }
        Plan::Drain { nonce } => {
            // CopyFail: ends a COPY FROM STDIN; ignored outside COPY.
            let reason = "tollgate: the client left";
            out.put_u8(b'f');
            out.put_i32((4 + reason.len() + 1) as i32);
            out.put_slice(reason.as_bytes());
            out.put_u8(0);
            // Execute of a portal no client can have named: an error,
            // which makes the server skip to Sync and roll back an
            // unsynced batch's implicit transaction instead of committing
            // it.
            let portal = format!("tollgate_reset_{nonce}");
            out.put_u8(b'E');
            out.put_i32((4 + portal.len() + 1 + 4) as i32);
            out.put_slice(portal.as_bytes());
            out.put_u8(0);
            out.put_i32(0);
            postgres_protocol::message::frontend::sync(&mut out);
            wire::query(&mut out, "ROLLBACK");
            wire::query(&mut out, &format!("SELECT '{nonce}'"));
        }
    }
    wire::query(&mut out, reset_query);
    out
}

/// Why a reset failed; the connection is closed.
#[derive(Debug)]
pub enum ResetError {
    Wire(WireError),
    /// The reset query failed, or left a transaction open.
    Refused,
}

impl ResetError {
    pub fn as_str(&self) -> &'static str {
        match self {
            ResetError::Wire(e) => e.as_str(),
            ResetError::Refused => "reset_refused",
        }
    }
}

/// Reads the server's answers to [`prologue`] (already sent), from where
/// the relay stopped (`framer`, `leftover`), within [`RESET_TIMEOUT`].
/// Ok means the connection is as fresh as after its login.
pub async fn complete(
    conn: &mut ServerConn,
    plan: &Plan,
    framer: Framer,
    leftover: BytesMut,
) -> Result<(), ResetError> {
    let mut reader = Reader::resuming(framer, leftover);
    // The reset puts the parameters back to the login's (what it reports
    // on the way is noted again as it comes) and drops every statement.
    conn.state.forget_session();
    match timeout(RESET_TIMEOUT, read_answers(conn, plan, &mut reader)).await {
        Ok(r) => r,
        Err(_) => Err(ResetError::Wire(WireError::TimedOut)),
    }
}

async fn read_answers(
    conn: &mut ServerConn,
    plan: &Plan,
    reader: &mut Reader,
) -> Result<(), ResetError> {
    match plan {
        Plan::Close(_) => return Err(ResetError::Refused),
        Plan::Clean { rollback: true } => {
            until_ready(conn, reader).await?;
        }
        Plan::Clean { rollback: false } => {}
        Plan::Drain { nonce } => {
            // The departed client's answers, ours up to the marker's row,
            // then its ReadyForQuery.
            loop {
                let m = next(conn, reader).await?;
                if m.tag == b'D' && memchr::memmem::find(&m.body, nonce.as_bytes()).is_some() {
                    break;
                }
            }
            let (_, status) = until_ready(conn, reader).await?;
            if status != b'I' {
                return Err(ResetError::Refused);
            }
        }
    }
    match until_ready(conn, reader).await? {
        (false, b'I') => Ok(()),
        _ => Err(ResetError::Refused),
    }
}

/// The next message. A ParameterStatus (the reset query putting a
/// parameter back) is noted on the connection.
async fn next(conn: &mut ServerConn, reader: &mut Reader) -> Result<Message, ResetError> {
    let m = reader
        .next(&mut conn.stream)
        .await
        .map_err(ResetError::Wire)?;
    if m.tag == b'S' {
        if let Some((k, v)) = wire::parameter_status(&m.body) {
            conn.state.note_reported(&k, &v);
        }
    }
    Ok(m)
}

/// Reads up to ReadyForQuery: whether an ErrorResponse came first, and the
/// transaction status.
pub(super) async fn until_ready(
    conn: &mut ServerConn,
    reader: &mut Reader,
) -> Result<(bool, u8), ResetError> {
    let mut failed = false;
    loop {
        let m = next(conn, reader).await?;
        match m.tag {
            b'E' => failed = true,
            b'Z' => return Ok((failed, m.body.first().copied().unwrap_or(0))),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn end() -> EndState {
        EndState {
            client_at_boundary: true,
            server_at_boundary: true,
            in_flight: false,
            said_goodbye: false,
            status: b'I',
            intact: true,
        }
    }

    #[test]
    fn plans_follow_where_the_client_left() {
        assert_eq!(plan(&end()), Plan::Clean { rollback: false });
        let open_tx = EndState {
            status: b'T',
            ..end()
        };
        assert_eq!(plan(&open_tx), Plan::Clean { rollback: true });
        let running = EndState {
            in_flight: true,
            ..end()
        };
        let p = plan(&running);
        assert!(matches!(p, Plan::Drain { .. }));
        assert!(p.needs_cancel(&running));
        let goodbye = EndState {
            said_goodbye: true,
            ..running
        };
        assert!(
            !plan(&goodbye).needs_cancel(&goodbye),
            "what it asked for runs"
        );
        let cut = EndState {
            client_at_boundary: false,
            ..running
        };
        assert_eq!(plan(&cut), Plan::Close("client_mid_message"));
        let relay_cut = EndState {
            intact: false,
            ..end()
        };
        assert!(matches!(plan(&relay_cut), Plan::Close(_)));
    }

    #[test]
    fn a_drain_ends_with_the_marker_and_the_reset_query() {
        let p = Plan::Drain {
            nonce: "abc123".into(),
        };
        let out = prologue(&p, "DISCARD ALL");
        let mut framer = Framer::new();
        let mut tags = Vec::new();
        let mut rest = &out[..];
        while let Some(f) = crate::protocol::frame::peek_frame(rest, 1 << 20).unwrap() {
            tags.push(f.tag);
            rest = &rest[f.total_len..];
        }
        assert!(rest.is_empty());
        framer.scan(&out).unwrap();
        assert!(framer.at_boundary());
        assert_eq!(tags, b"fESQQQ");
        assert!(memchr::memmem::find(&out, b"SELECT 'abc123'").is_some());
        assert!(out.ends_with(b"DISCARD ALL\0"));
        let clean = prologue(&Plan::Clean { rollback: false }, "DISCARD ALL");
        assert_eq!(clean[0], b'Q');
        assert!(prologue(&Plan::Close("x"), "DISCARD ALL").is_empty());
    }
}
