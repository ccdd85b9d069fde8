//! What a client may read when tollgate ends its connection.
//!
//! Every failure a client sees goes through [`ClientError`]: a SQLSTATE, a
//! message from an explicit allowlist of texts, and a `kind` that names the
//! failure in logs and metrics. Module errors carry the details (addresses,
//! upstream messages, token ids) for the log; they are turned into a
//! `ClientError` here, in one place, so no detail reaches a client by
//! accident.
#![forbid(unsafe_code)]

use bytes::BytesMut;

use crate::protocol::backend::{self, Severity};
use crate::protocol::sqlstate::{self, SqlState};

/// A FATAL error to send before closing the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientError {
    pub code: SqlState,
    pub message: String,
    pub hint: Option<&'static str>,
    /// Low-cardinality name for logs and metrics.
    pub kind: &'static str,
    /// Not sent: the connection is closed without a word, as Postgres
    /// closes it on a start-up packet it cannot frame (an impossible
    /// length, a CancelRequest of the wrong size). Clients rely on that
    /// silence: node-postgres ends a connection it has not started by
    /// writing Terminate, which reads as such a length. The refusal is
    /// still logged and counted under its kind.
    pub silent: bool,
}

impl ClientError {
    pub fn new(code: SqlState, kind: &'static str, message: impl Into<String>) -> Self {
        ClientError {
            code,
            message: message.into(),
            hint: None,
            kind,
            silent: false,
        }
    }

    /// The same refusal, closed without a word (see [`ClientError::silent`]).
    pub fn unsent(mut self) -> Self {
        self.silent = true;
        self
    }

    pub fn with_hint(mut self, hint: &'static str) -> Self {
        self.hint = Some(hint);
        self
    }

    /// The one response for every token rejection, whatever the reason, so
    /// that the bytes tell an attacker nothing (as Postgres does for
    /// passwords).
    pub fn token_rejected(user: &str) -> Self {
        ClientError::new(
            sqlstate::INVALID_PASSWORD,
            "token_rejected",
            format!("token authentication failed for user \"{user}\""),
        )
    }

    /// No `[[upstream]]` entry serves the database. Said only after the
    /// token was accepted, so it reveals nothing to someone without one.
    pub fn no_upstream_for_database(database: &str) -> Self {
        ClientError::new(
            sqlstate::INVALID_CATALOG_NAME,
            "no_upstream_for_database",
            format!("database \"{database}\" is not served by this proxy"),
        )
    }

    /// The control database has been out of reach longer than
    /// `max_staleness`: tokens cannot be checked against a current list, so
    /// no login is accepted (the operator chose to fail closed).
    pub fn token_store_stale() -> Self {
        ClientError::new(
            sqlstate::CANNOT_CONNECT_NOW,
            "token_store_stale",
            "tollgate cannot check tokens right now",
        )
        .with_hint("Its token store is out of date; try again later.")
    }

    /// A PROXY protocol header from a trusted balancer that does not parse.
    pub fn bad_proxy_header() -> Self {
        ClientError::new(
            sqlstate::PROTOCOL_VIOLATION,
            "proxy_header",
            "invalid PROXY protocol header",
        )
    }

    /// A PROXY protocol header from an address not in `proxy_trusted`.
    pub fn untrusted_proxy_header() -> Self {
        ClientError::new(
            sqlstate::PROTOCOL_VIOLATION,
            "proxy_untrusted",
            "PROXY protocol header from an address that is not a trusted load balancer",
        )
    }

    pub fn upstream_unavailable() -> Self {
        ClientError::new(
            sqlstate::SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION,
            "upstream_connect",
            "could not connect to the database server",
        )
    }

    pub fn upstream_login_failed() -> Self {
        ClientError::new(
            sqlstate::SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION,
            "upstream_login",
            "tollgate could not log in to the database server",
        )
        .with_hint("The proxy's upstream credentials were refused; its log has the details.")
    }

    pub fn upstream_tls() -> Self {
        ClientError::new(
            sqlstate::SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION,
            "upstream_tls",
            "tollgate could not establish a secure connection to the database server",
        )
        .with_hint("The proxy's upstream TLS settings were not satisfied; its log has the reason.")
    }

    pub fn upstream_lost() -> Self {
        ClientError::new(
            sqlstate::CONNECTION_FAILURE,
            "upstream_lost",
            "the database server closed the connection during start-up",
        )
    }

    pub fn upstream_protocol() -> Self {
        ClientError::new(
            sqlstate::CONNECTION_FAILURE,
            "upstream_protocol",
            "the database server sent an invalid message during start-up",
        )
    }

    pub fn replication_not_allowed() -> Self {
        ClientError::new(
            sqlstate::FEATURE_NOT_SUPPORTED,
            "replication_not_allowed",
            "replication connections are not allowed with this token",
        )
    }

    /// The start-up time ran out while tollgate was logging in upstream.
    pub fn upstream_login_timeout() -> Self {
        ClientError::new(
            sqlstate::SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION,
            "upstream_login_timeout",
            "the database server did not complete the login in time",
        )
    }

    /// The server's authentication did not pass tollgate's checks.
    pub fn upstream_auth_refused() -> Self {
        ClientError::new(
            sqlstate::SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION,
            "upstream_auth",
            "tollgate could not log in to the database server",
        )
        .with_hint(
            "The server's authentication did not pass the proxy's checks (a method require_auth \
             does not allow, or a SCRAM exchange that did not verify); its log has the details.",
        )
    }

    /// The client's address has `max_pending_per_source` connections that
    /// have not logged in yet.
    pub fn too_many_pending_from_source() -> Self {
        ClientError::new(
            sqlstate::TOO_MANY_CONNECTIONS,
            "too_many_pending",
            "too many connections from this address are still logging in",
        )
    }

    /// A token with `lock_session` and a start-up that sets `name` (one of
    /// the token's parameters, or `options`).
    pub fn session_locked(name: &str) -> Self {
        ClientError::new(
            sqlstate::INSUFFICIENT_PRIVILEGE,
            "session_locked",
            format!(
                "this token sets the session's parameters; the start-up may not set \"{name}\""
            ),
        )
    }

    /// The server connection ended with no error of the server's to relay
    /// (killed, crashed, network lost): what libpq reports in that case.
    pub fn server_closed() -> Self {
        ClientError::new(
            sqlstate::CONNECTION_FAILURE,
            "server_closed",
            "server closed the connection unexpectedly",
        )
    }

    pub fn too_many_connections() -> Self {
        ClientError::new(
            sqlstate::TOO_MANY_CONNECTIONS,
            "too_many_connections",
            "sorry, too many clients already",
        )
    }

    pub fn startup_timeout() -> Self {
        ClientError::new(
            sqlstate::PROTOCOL_VIOLATION,
            "startup_timeout",
            "start-up did not complete in time",
        )
    }

    /// A session ended because its token no longer allows it. Sent at a
    /// message boundary, with the code Postgres uses for
    /// pg_terminate_backend, so drivers treat it as a terminated connection.
    pub fn session_ended(reason: crate::auth::Rejection) -> Self {
        use crate::auth::Rejection;
        let why = match reason {
            Rejection::Revoked => "its token was revoked",
            Rejection::Expired => "its token expired",
            Rejection::Rotated => "its token was rotated and the old secret's grace period ended",
            Rejection::Deleted => "its token was deleted",
            _ => "its token is no longer valid",
        };
        ClientError::new(
            sqlstate::ADMIN_SHUTDOWN,
            "session_ended",
            format!("terminating connection because {why}"),
        )
    }

    /// Transaction pooling: the client held a server connection idle in a
    /// transaction past `idle_transaction_timeout`. Postgres's own words
    /// for its `idle_in_transaction_session_timeout`.
    pub fn idle_in_transaction_timeout() -> Self {
        ClientError::new(
            sqlstate::IDLE_IN_TRANSACTION_SESSION_TIMEOUT,
            "idle_transaction_timeout",
            "terminating connection due to idle-in-transaction timeout",
        )
    }

    /// A session ended through the admin API: Postgres's own words and
    /// code for pg_terminate_backend.
    pub fn admin_terminated() -> Self {
        ClientError::new(
            sqlstate::ADMIN_SHUTDOWN,
            "admin_terminated",
            "terminating connection due to administrator command",
        )
    }

    /// A source that failed to authenticate too often lately; refused
    /// before anything it sends is read.
    pub fn too_many_auth_failures() -> Self {
        ClientError::new(
            sqlstate::INVALID_AUTHORIZATION_SPECIFICATION,
            "auth_failure_limit",
            "too many failed authentication attempts from this address; try again later",
        )
    }

    pub fn token_connection_limit() -> Self {
        ClientError::new(
            sqlstate::TOO_MANY_CONNECTIONS,
            "token_connection_limit",
            "too many connections for this token",
        )
    }

    pub fn internal() -> Self {
        ClientError::new(
            sqlstate::INTERNAL_ERROR,
            "internal",
            "internal error in tollgate",
        )
    }

    /// Appends the FATAL ErrorResponse to `out`.
    pub fn encode(&self, out: &mut BytesMut) {
        backend::error_response(out, Severity::Fatal, self.code, &self.message, self.hint);
    }
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message, self.code)
    }
}

impl std::error::Error for ClientError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_rejections_are_byte_identical() {
        let mut a = BytesMut::new();
        let mut b = BytesMut::new();
        ClientError::token_rejected("app").encode(&mut a);
        ClientError::token_rejected("app").encode(&mut b);
        assert_eq!(a, b);
        assert!(a.windows(5).any(|w| w == b"28P01"));
    }
}
