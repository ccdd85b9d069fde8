//! MD5 password authentication towards the upstream PostgreSQL server.
//!
//! tollgate logs in to the real database with its *own* configured
//! credentials (clients authenticate to tollgate with API tokens, never with
//! the database password). Some servers are still configured with
//! `password_encryption = md5` / `md5` in `pg_hba.conf`; for those the server
//! sends `AuthenticationMD5Password` with a 4-byte salt and expects a
//! `PasswordMessage` whose payload is
//! `"md5" || hex(md5(hex(md5(password || user)) || salt))`.
//!
//! See <https://www.postgresql.org/docs/current/protocol-flow.html#PROTOCOL-FLOW-START-UP>.
//! SCRAM-SHA-256 (see [`super::scram`]) should be preferred whenever the
//! server offers it.

#![forbid(unsafe_code)]

/// Returns the payload of the `PasswordMessage` answering an
/// `AuthenticationMD5Password` request: `"md5"` followed by 32 lowercase hex
/// digits (35 ASCII bytes, without the trailing NUL the wire format adds).
///
/// `user` is the user name sent in the startup message (PostgreSQL salts the
/// stored MD5 hash with it).
pub fn md5_password_message_payload(user: &str, password: &[u8], salt: [u8; 4]) -> String {
    postgres_protocol::authentication::md5_hash(user.as_bytes(), password, salt)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_value() {
        // Independently computed with Python:
        //   inner = hashlib.md5(b"secret" + b"app").hexdigest()
        //   "md5" + hashlib.md5(inner.encode() + bytes([1, 2, 3, 4])).hexdigest()
        assert_eq!(
            md5_password_message_payload("app", b"secret", [1, 2, 3, 4]),
            "md5911f527656472583a006e7727877b33e"
        );
    }

    #[test]
    fn salt_and_user_matter() {
        let base = md5_password_message_payload("app", b"secret", [1, 2, 3, 4]);
        assert_ne!(
            base,
            md5_password_message_payload("app", b"secret", [1, 2, 3, 5])
        );
        assert_ne!(
            base,
            md5_password_message_payload("app2", b"secret", [1, 2, 3, 4])
        );
        assert_eq!(base.len(), 35);
        assert!(base.starts_with("md5"));
    }
}
