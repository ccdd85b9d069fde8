//! Backend (server → client) messages: the few tollgate builds itself
//! (authentication requests, errors) and the ones it must understand while it
//! logs in to the upstream server on the client's behalf.
//!
//! <https://www.postgresql.org/docs/current/protocol-message-formats.html>

use bytes::{BufMut, BytesMut};

use super::sqlstate::SqlState;

pub const TAG_AUTHENTICATION: u8 = b'R';
pub const TAG_BACKEND_KEY_DATA: u8 = b'K';
pub const TAG_ERROR_RESPONSE: u8 = b'E';
pub const TAG_NEGOTIATE_PROTOCOL_VERSION: u8 = b'v';
pub const TAG_NOTICE_RESPONSE: u8 = b'N';
pub const TAG_PARAMETER_STATUS: u8 = b'S';
pub const TAG_READY_FOR_QUERY: u8 = b'Z';

const AUTH_OK: i32 = 0;
const AUTH_CLEARTEXT_PASSWORD: i32 = 3;
const AUTH_MD5_PASSWORD: i32 = 5;
const AUTH_SASL: i32 = 10;
const AUTH_SASL_CONTINUE: i32 = 11;
const AUTH_SASL_FINAL: i32 = 12;

/// Longest backend message tollgate accepts while logging in upstream. The
/// server sends only small messages before ReadyForQuery; a longer one is a
/// broken or hostile server.
pub const MAX_LOGIN_MESSAGE_LEN: usize = 64 * 1024;

/// Writes a tagged message: the tag, a length placeholder, the body written by
/// `body`, then patches the length.
fn put_message(out: &mut BytesMut, tag: u8, body: impl FnOnce(&mut BytesMut)) {
    out.put_u8(tag);
    let len_at = out.len();
    out.put_i32(0);
    body(out);
    let len = (out.len() - len_at) as i32;
    out[len_at..len_at + 4].copy_from_slice(&len.to_be_bytes());
}

fn put_cstr(out: &mut BytesMut, s: &str) {
    // A NUL inside would end the string early and desynchronize the client.
    out.extend(s.bytes().map(|b| if b == 0 { b'?' } else { b }));
    out.put_u8(0);
}

pub fn authentication_cleartext_password(out: &mut BytesMut) {
    put_message(out, TAG_AUTHENTICATION, |b| {
        b.put_i32(AUTH_CLEARTEXT_PASSWORD)
    });
}

pub fn authentication_ok(out: &mut BytesMut) {
    put_message(out, TAG_AUTHENTICATION, |b| b.put_i32(AUTH_OK));
}

pub fn parameter_status(out: &mut BytesMut, name: &str, value: &str) {
    put_message(out, TAG_PARAMETER_STATUS, |b| {
        put_cstr(b, name);
        put_cstr(b, value);
    });
}

pub fn backend_key_data(out: &mut BytesMut, process_id: u32, secret_key: &[u8]) {
    put_message(out, TAG_BACKEND_KEY_DATA, |b| {
        b.put_u32(process_id);
        b.put_slice(secret_key);
    });
}

pub fn ready_for_query(out: &mut BytesMut, status: u8) {
    put_message(out, TAG_READY_FOR_QUERY, |b| b.put_u8(status));
}

/// The contents of a BackendKeyData: what a CancelRequest must repeat.
#[derive(Clone, PartialEq, Eq)]
pub struct BackendKey {
    pub process_id: u32,
    pub secret_key: Box<[u8]>,
}

impl std::fmt::Debug for BackendKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The secret cancels queries: never in a log.
        write!(
            f,
            "BackendKey({}, <{} bytes>)",
            self.process_id,
            self.secret_key.len()
        )
    }
}

/// NegotiateProtocolVersion: the newest minor version supported, and the
/// protocol options (`_pq_.*`) that were not recognized.
pub fn negotiate_protocol_version<'a>(
    out: &mut BytesMut,
    newest_minor: u32,
    unrecognized: impl ExactSizeIterator<Item = &'a str>,
) {
    put_message(out, TAG_NEGOTIATE_PROTOCOL_VERSION, |b| {
        b.put_u32((3 << 16) | newest_minor);
        b.put_i32(unrecognized.len() as i32);
        for name in unrecognized {
            put_cstr(b, name);
        }
    });
}

/// Severity of an ErrorResponse or NoticeResponse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    Fatal,
}

impl Severity {
    fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "ERROR",
            Severity::Fatal => "FATAL",
        }
    }
}

/// ErrorResponse with the fields every client reads: localized and
/// non-localized severity (S, V), code (C), message (M), optional hint (H).
pub fn error_response(
    out: &mut BytesMut,
    severity: Severity,
    code: SqlState,
    message: &str,
    hint: Option<&str>,
) {
    put_message(out, TAG_ERROR_RESPONSE, |b| {
        b.put_u8(b'S');
        put_cstr(b, severity.as_str());
        b.put_u8(b'V');
        put_cstr(b, severity.as_str());
        b.put_u8(b'C');
        put_cstr(b, code.code());
        b.put_u8(b'M');
        put_cstr(b, message);
        if let Some(hint) = hint {
            b.put_u8(b'H');
            put_cstr(b, hint);
        }
        b.put_u8(0);
    });
}

/// A backend message tollgate reads during the upstream login.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BeLoginMessage<'a> {
    AuthenticationOk,
    AuthenticationCleartextPassword,
    AuthenticationMd5Password {
        salt: [u8; 4],
    },
    AuthenticationSasl {
        mechanisms: Vec<&'a str>,
    },
    AuthenticationSaslContinue {
        data: &'a [u8],
    },
    AuthenticationSaslFinal {
        data: &'a [u8],
    },
    /// Any other authentication request (Kerberos, GSS, SSPI...).
    AuthenticationOther {
        code: i32,
    },
    ErrorResponse(ErrorFields<'a>),
    NoticeResponse,
    ParameterStatus,
    BackendKeyData {
        process_id: u32,
        secret_key: &'a [u8],
    },
    /// The newest protocol the server speaks (3.x: the minor version) and
    /// the count of options it did not recognize.
    NegotiateProtocolVersion {
        newest_minor: u16,
        unrecognized: u32,
    },
    ReadyForQuery {
        status: u8,
    },
    /// A message that has no business arriving during start-up.
    Unexpected {
        tag: u8,
    },
}

/// The fields of an ErrorResponse that tollgate looks at.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ErrorFields<'a> {
    pub severity: &'a str,
    pub code: &'a str,
    pub message: &'a str,
}

/// A backend message that is framed correctly but malformed inside.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MalformedMessage {
    pub tag: u8,
}

impl std::fmt::Display for MalformedMessage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "malformed backend message of type 0x{:02x}", self.tag)
    }
}

impl std::error::Error for MalformedMessage {}

/// Parses one complete message (tag included) as seen during login.
pub fn parse_login_message(msg: &[u8]) -> Result<BeLoginMessage<'_>, MalformedMessage> {
    let tag = msg[0];
    let body = &msg[super::frame::HEADER_LEN..];
    let bad = || MalformedMessage { tag };
    Ok(match tag {
        TAG_AUTHENTICATION => {
            let code = read_i32(body).ok_or_else(bad)?;
            let rest = &body[4..];
            match code {
                // Exactly the code: AuthenticationOk is relayed verbatim to
                // the client, which must not get bytes it cannot parse
                // (found by fuzzing: fuzz/regressions/upstream_login).
                AUTH_OK if rest.is_empty() => BeLoginMessage::AuthenticationOk,
                AUTH_CLEARTEXT_PASSWORD if rest.is_empty() => {
                    BeLoginMessage::AuthenticationCleartextPassword
                }
                AUTH_OK | AUTH_CLEARTEXT_PASSWORD => return Err(bad()),
                AUTH_MD5_PASSWORD => {
                    let salt: [u8; 4] = rest.try_into().map_err(|_| bad())?;
                    BeLoginMessage::AuthenticationMd5Password { salt }
                }
                AUTH_SASL => {
                    // A list of C strings ended by an empty one.
                    let mut mechanisms = Vec::new();
                    let mut rest = rest;
                    loop {
                        let end = memchr::memchr(0, rest).ok_or_else(bad)?;
                        if end == 0 {
                            if rest.len() != 1 {
                                return Err(bad());
                            }
                            break;
                        }
                        mechanisms.push(std::str::from_utf8(&rest[..end]).map_err(|_| bad())?);
                        rest = &rest[end + 1..];
                    }
                    BeLoginMessage::AuthenticationSasl { mechanisms }
                }
                AUTH_SASL_CONTINUE => BeLoginMessage::AuthenticationSaslContinue { data: rest },
                AUTH_SASL_FINAL => BeLoginMessage::AuthenticationSaslFinal { data: rest },
                code => BeLoginMessage::AuthenticationOther { code },
            }
        }
        // Both are relayed verbatim to the client (an error before
        // authentication, a notice after it), so they must be well formed:
        // a client cannot parse a field without its terminator, and reports
        // nothing useful for an error without a SQLSTATE.
        TAG_ERROR_RESPONSE => {
            BeLoginMessage::ErrorResponse(parse_error_response(body).ok_or_else(bad)?)
        }
        TAG_NOTICE_RESPONSE => {
            parse_error_response(body).ok_or_else(bad)?;
            BeLoginMessage::NoticeResponse
        }
        // Relayed verbatim too: exactly a name and a value, each
        // NUL-terminated, as the message format says.
        TAG_PARAMETER_STATUS => {
            let name_end = memchr::memchr(0, body).ok_or_else(bad)?;
            let value = &body[name_end + 1..];
            if memchr::memchr(0, value) != Some(value.len().wrapping_sub(1)) {
                return Err(bad());
            }
            BeLoginMessage::ParameterStatus
        }
        TAG_BACKEND_KEY_DATA => {
            let process_id = read_i32(body).ok_or_else(bad)? as u32;
            let secret_key = &body[4..];
            if secret_key.is_empty() || secret_key.len() > super::startup::MAX_CANCEL_KEY_LENGTH {
                return Err(bad());
            }
            BeLoginMessage::BackendKeyData {
                process_id,
                secret_key,
            }
        }
        TAG_NEGOTIATE_PROTOCOL_VERSION => {
            let version = read_i32(body).ok_or_else(bad)? as u32;
            let unrecognized = read_i32(body.get(4..).unwrap_or_default()).ok_or_else(bad)?;
            if version >> 16 != 3 || unrecognized < 0 {
                return Err(bad());
            }
            BeLoginMessage::NegotiateProtocolVersion {
                newest_minor: version as u16,
                unrecognized: unrecognized as u32,
            }
        }
        TAG_READY_FOR_QUERY => {
            let [status] = body else { return Err(bad()) };
            BeLoginMessage::ReadyForQuery { status: *status }
        }
        tag => BeLoginMessage::Unexpected { tag },
    })
}

/// Strictly parses an ErrorResponse or NoticeResponse body, as PostgreSQL
/// always sends one: NUL-terminated fields, a final NUL with nothing after
/// it, a severity, a message, and a SQLSTATE of five digits or upper-case
/// letters. `None` for anything else. Field types tollgate does not know
/// are allowed, as the format says they may be added at any time.
///
/// <https://www.postgresql.org/docs/current/protocol-error-fields.html>
pub fn parse_error_response(body: &[u8]) -> Option<ErrorFields<'_>> {
    let mut rest = body;
    let (mut severity, mut code, mut message) = (false, false, false);
    loop {
        let (&kind, tail) = rest.split_first()?;
        if kind == 0 {
            rest = tail;
            break;
        }
        let end = memchr::memchr(0, tail)?;
        let value = &tail[..end];
        match kind {
            b'S' => severity = true,
            b'M' => message = true,
            b'C' => {
                code = value.len() == 5
                    && value
                        .iter()
                        .all(|b| b.is_ascii_digit() || b.is_ascii_uppercase())
            }
            _ => {}
        }
        rest = &tail[end + 1..];
    }
    if !rest.is_empty() || !severity || !code || !message {
        return None;
    }
    Some(parse_error_fields(body))
}

/// Reads the S/C/M fields of an ErrorResponse; tolerant of anything else, as
/// the format allows new field types at any time.
pub fn parse_error_fields(body: &[u8]) -> ErrorFields<'_> {
    let mut fields = ErrorFields::default();
    let mut rest = body;
    while let Some((&kind, tail)) = rest.split_first() {
        if kind == 0 {
            break;
        }
        let Some(end) = memchr::memchr(0, tail) else {
            break;
        };
        let value = std::str::from_utf8(&tail[..end]).unwrap_or("");
        match kind {
            b'S' => fields.severity = value,
            b'C' => fields.code = value,
            b'M' => fields.message = value,
            _ => {}
        }
        rest = &tail[end + 1..];
    }
    fields
}

fn read_i32(b: &[u8]) -> Option<i32> {
    Some(i32::from_be_bytes(b.get(..4)?.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::frame::peek_frame;
    use crate::protocol::sqlstate;

    #[test]
    fn error_response_round_trips() {
        let mut b = BytesMut::new();
        error_response(
            &mut b,
            Severity::Fatal,
            sqlstate::INVALID_PASSWORD,
            "token authentication failed for user \"app\"",
            None,
        );
        let f = peek_frame(&b, 1024).unwrap().unwrap();
        assert_eq!(f.total_len, b.len());
        let BeLoginMessage::ErrorResponse(e) = parse_login_message(&b).unwrap() else {
            panic!()
        };
        assert_eq!(e.severity, "FATAL");
        assert_eq!(e.code, "28P01");
        assert_eq!(e.message, "token authentication failed for user \"app\"");
    }

    #[test]
    fn nul_in_text_cannot_split_a_field() {
        let mut b = BytesMut::new();
        error_response(
            &mut b,
            Severity::Error,
            sqlstate::PROTOCOL_VIOLATION,
            "a\0b",
            None,
        );
        let BeLoginMessage::ErrorResponse(e) = parse_login_message(&b).unwrap() else {
            panic!()
        };
        assert_eq!(e.message, "a?b");
    }

    #[test]
    fn auth_requests_parse() {
        let mut b = BytesMut::new();
        authentication_cleartext_password(&mut b);
        assert_eq!(&b[..], &[b'R', 0, 0, 0, 8, 0, 0, 0, 3]);
        assert_eq!(
            parse_login_message(&b).unwrap(),
            BeLoginMessage::AuthenticationCleartextPassword
        );
        let sasl = b"R\0\0\0\x2a\0\0\0\x0aSCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0";
        assert_eq!(
            parse_login_message(sasl).unwrap(),
            BeLoginMessage::AuthenticationSasl {
                mechanisms: vec!["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]
            }
        );
        let md5 = b"R\0\0\0\x0c\0\0\0\x05abcd";
        assert_eq!(
            parse_login_message(md5).unwrap(),
            BeLoginMessage::AuthenticationMd5Password { salt: *b"abcd" }
        );
    }

    #[test]
    fn malformed_login_messages_are_errors_not_panics() {
        for m in [
            &b"R\0\0\0\x04"[..],
            b"R\0\0\0\x06\0\0",
            b"R\0\0\0\x0a\0\0\0\x05ab",
            b"R\0\0\0\x0d\0\0\0\x0aSCRAM",
            b"K\0\0\0\x08\0\0\0\x01",
            b"Z\0\0\0\x04",
            b"Z\0\0\0\x06II",
        ] {
            assert!(parse_login_message(m).is_err(), "{m:?}");
        }
        // Error fields missing their terminators degrade to empty fields.
        let e = parse_error_fields(b"SFATAL");
        assert_eq!(e.severity, "");
    }

    /// A hostile or broken server's ErrorResponse or NoticeResponse must not
    /// reach a client that cannot parse it (tests/it/hostile_servers.rs).
    #[test]
    fn broken_error_and_notice_responses_are_malformed() {
        for body in [
            &b""[..],
            b"\0",
            b"SFATAL\0MNo code\0\0",
            b"SFATAL\0C\0Mempty code\0\0",
            b"SFATAL\0C5330\0Mshort code\0\0",
            b"SFATAL\0C533000\0Mlong code\0\0",
            b"SFATAL\0Cab300\0Mlower case\0\0",
            b"C53300\0Mno severity\0\0",
            b"SFATAL\0C53300\0\0",
            b"SFATAL\0C53300\0Mno final NUL\0",
            b"SFATAL\0C53300\0Mno terminator",
            b"SFATAL\0C53300\0Mtrailing\0\0junk",
        ] {
            for tag in [TAG_ERROR_RESPONSE, TAG_NOTICE_RESPONSE] {
                let mut m = vec![tag];
                m.extend_from_slice(&(4 + body.len() as i32).to_be_bytes());
                m.extend_from_slice(body);
                assert_eq!(
                    parse_login_message(&m),
                    Err(MalformedMessage { tag }),
                    "{:?}",
                    String::from_utf8_lossy(body)
                );
            }
        }
        // What Postgres sends, with a field type tollgate does not know.
        let body = b"SFATAL\0VFATAL\0C53300\0Msorry, too many clients already\0Zfuture\0\0";
        assert_eq!(
            parse_error_response(body),
            Some(ErrorFields {
                severity: "FATAL",
                code: "53300",
                message: "sorry, too many clients already"
            })
        );
    }

    #[test]
    fn fixed_size_authentication_messages_have_nothing_after_them() {
        for body in [
            &[0u8, 0, 0, 0, 0][..],
            &[0, 0, 0, 0, b'x', b'y'],
            &[0, 0, 0, 3, 0],
            &[0, 0, 0, 5, 1, 2, 3, 4, 5],
            &[0, 0, 0, 10, b'S', 0, 0, b'x'],
        ] {
            let mut m = vec![TAG_AUTHENTICATION];
            m.extend_from_slice(&(4 + body.len() as i32).to_be_bytes());
            m.extend_from_slice(body);
            assert!(parse_login_message(&m).is_err(), "{body:?}");
        }
        let mut ok = BytesMut::new();
        authentication_ok(&mut ok);
        assert_eq!(
            parse_login_message(&ok),
            Ok(BeLoginMessage::AuthenticationOk)
        );
    }

    #[test]
    fn parameter_status_is_a_name_and_a_value() {
        let mut ok = BytesMut::new();
        parameter_status(&mut ok, "server_version", "17.0");
        assert_eq!(
            parse_login_message(&ok),
            Ok(BeLoginMessage::ParameterStatus)
        );
        let mut empty_value = BytesMut::new();
        parameter_status(&mut empty_value, "search_path", "");
        assert!(parse_login_message(&empty_value).is_ok());
        for body in [
            &b""[..],
            b"server_version",
            b"server_version\0",
            b"server_version\x0017",
            b"server_version\x0017\0junk",
            b"server_version\x0017\0\0",
        ] {
            let mut m = vec![TAG_PARAMETER_STATUS];
            m.extend_from_slice(&(4 + body.len() as i32).to_be_bytes());
            m.extend_from_slice(body);
            assert!(parse_login_message(&m).is_err(), "{body:?}");
        }
    }

    #[test]
    fn key_data_and_ready_round_trip() {
        let mut b = BytesMut::new();
        backend_key_data(&mut b, 7, &[1, 2, 3, 4]);
        ready_for_query(&mut b, b'I');
        let f = peek_frame(&b, 64).unwrap().unwrap();
        assert_eq!(
            parse_login_message(&b[..f.total_len]).unwrap(),
            BeLoginMessage::BackendKeyData {
                process_id: 7,
                secret_key: &[1, 2, 3, 4]
            }
        );
        assert_eq!(
            parse_login_message(&b[f.total_len..]).unwrap(),
            BeLoginMessage::ReadyForQuery { status: b'I' }
        );
    }

    #[test]
    fn negotiate_protocol_version_lists_options() {
        let mut b = BytesMut::new();
        negotiate_protocol_version(&mut b, 0, ["_pq_.a", "_pq_.b"].into_iter());
        assert_eq!(b[0], b'v');
        assert_eq!(&b[5..9], &(3u32 << 16).to_be_bytes());
        assert_eq!(&b[9..13], &2i32.to_be_bytes());
        assert_eq!(&b[13..], b"_pq_.a\0_pq_.b\0");
    }
}
