//! Frontend (client → server) messages tollgate reads during authentication.
//! Everything after authentication is relayed without parsing.
//!
//! Building frontend messages for the upstream login is left to
//! `postgres_protocol::message::frontend`, which does it well.
//!
//! <https://www.postgresql.org/docs/current/protocol-message-formats.html>

/// PasswordMessage (also carries SASL responses; the type depends on context).
pub const TAG_PASSWORD_MESSAGE: u8 = b'p';
/// Terminate: the client is closing the session.
pub const TAG_TERMINATE: u8 = b'X';

/// Why a PasswordMessage could not be read. Safe to show a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PasswordError {
    /// Another message type arrived where a password was expected.
    UnexpectedMessage(u8),
    /// The password is not a single NUL-terminated string.
    Malformed,
}

impl std::fmt::Display for PasswordError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PasswordError::UnexpectedMessage(tag) => write!(
                f,
                "expected password response, got message type {}",
                *tag as char
            ),
            PasswordError::Malformed => f.write_str("invalid password packet"),
        }
    }
}

impl std::error::Error for PasswordError {}

/// Extracts the password from a complete PasswordMessage (tag included).
/// The password must be one C string filling the whole body, as Postgres
/// requires ("invalid password packet size").
pub fn parse_password_message(msg: &[u8]) -> Result<&[u8], PasswordError> {
    if msg[0] != TAG_PASSWORD_MESSAGE {
        return Err(PasswordError::UnexpectedMessage(msg[0]));
    }
    let body = &msg[super::frame::HEADER_LEN..];
    match memchr::memchr(0, body) {
        Some(end) if end + 1 == body.len() => Ok(&body[..end]),
        _ => Err(PasswordError::Malformed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_password() {
        assert_eq!(
            parse_password_message(b"p\0\0\0\x0bhello\0"),
            Ok(&b"hello"[..])
        );
        assert_eq!(parse_password_message(b"p\0\0\0\x05\0"), Ok(&b""[..]));
    }

    #[test]
    fn rejects_other_shapes() {
        assert_eq!(
            parse_password_message(b"Q\0\0\0\x05\0"),
            Err(PasswordError::UnexpectedMessage(b'Q'))
        );
        assert_eq!(
            parse_password_message(b"p\0\0\0\x0ahello"),
            Err(PasswordError::Malformed)
        );
        assert_eq!(
            parse_password_message(b"p\0\0\0\x0dhel\0lo\0"),
            Err(PasswordError::Malformed)
        );
        assert_eq!(
            parse_password_message(b"p\0\0\0\x04"),
            Err(PasswordError::Malformed)
        );
    }
}
