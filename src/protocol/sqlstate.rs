//! The SQLSTATE codes tollgate itself reports, named as in the PostgreSQL
//! docs' Appendix A (<https://www.postgresql.org/docs/current/errcodes-appendix.html>).

/// A five-character SQLSTATE code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SqlState(&'static str);

impl SqlState {
    pub const fn code(&self) -> &'static str {
        self.0
    }
}

impl std::fmt::Display for SqlState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

/// 08001: tollgate could not establish the upstream connection.
pub const SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION: SqlState = SqlState("08001");
/// 08006: an established upstream connection failed.
pub const CONNECTION_FAILURE: SqlState = SqlState("08006");
/// 08P01: the peer broke the wire protocol.
pub const PROTOCOL_VIOLATION: SqlState = SqlState("08P01");
/// 0A000: e.g. an unsupported protocol major version.
pub const FEATURE_NOT_SUPPORTED: SqlState = SqlState("0A000");
/// 28000: e.g. no user name in the startup packet.
pub const INVALID_AUTHORIZATION_SPECIFICATION: SqlState = SqlState("28000");
/// 28P01: the token (password) was rejected.
pub const INVALID_PASSWORD: SqlState = SqlState("28P01");
/// 42501: the token does not allow what the start-up asks for.
pub const INSUFFICIENT_PRIVILEGE: SqlState = SqlState("42501");
/// 53300: tollgate's connection limit is reached.
pub const TOO_MANY_CONNECTIONS: SqlState = SqlState("53300");
/// 57P01: tollgate is shutting down.
pub const ADMIN_SHUTDOWN: SqlState = SqlState("57P01");
/// 57P03: tollgate cannot accept logins for now.
pub const CANNOT_CONNECT_NOW: SqlState = SqlState("57P03");
/// 3D000: no such database (as Postgres says it).
pub const INVALID_CATALOG_NAME: SqlState = SqlState("3D000");
/// 57P05: a client exceeded an idle or login timeout (idle_session_timeout's code).
pub const IDLE_SESSION_TIMEOUT: SqlState = SqlState("57P05");
/// 25P03: idle_in_transaction_session_timeout's code, and tollgate's
/// `idle_transaction_timeout` under transaction pooling.
pub const IDLE_IN_TRANSACTION_SESSION_TIMEOUT: SqlState = SqlState("25P03");
/// XX000: a failure inside tollgate.
pub const INTERNAL_ERROR: SqlState = SqlState("XX000");
