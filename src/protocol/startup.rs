//! The untagged packets a client may send first: StartupMessage, SSLRequest,
//! GSSENCRequest and CancelRequest.
//!
//! These have no tag byte: an Int32 length (counting itself) and an Int32
//! code. Limits mirror PostgreSQL's `ProcessStartupPacket`
//! (src/backend/tcop/backend_startup.c) so that tollgate refuses what
//! Postgres refuses, with the same SQLSTATEs.
//!
//! <https://www.postgresql.org/docs/current/protocol-message-formats.html>

use std::fmt;

use super::sqlstate::{self, SqlState};

/// The longest start-up packet, length word included: Postgres's
/// `MAX_STARTUP_PACKET_LENGTH` (10000, src/include/libpq/pqcomm.h) bounds
/// the packet after its length word (`ProcessStartupPacket` subtracts the
/// word's 4 bytes first).
pub const MAX_STARTUP_PACKET_LENGTH: usize = 10_000 + 4;
/// Length word plus code word.
pub const MIN_STARTUP_PACKET_LENGTH: usize = 8;

/// `NEGOTIATE_SSL_CODE`: 1234 << 16 | 5679.
pub const SSL_REQUEST_CODE: u32 = (1234 << 16) | 5679;
/// `NEGOTIATE_GSS_CODE`: 1234 << 16 | 5680.
pub const GSSENC_REQUEST_CODE: u32 = (1234 << 16) | 5680;
/// `CANCEL_REQUEST_CODE`: 1234 << 16 | 5678.
pub const CANCEL_REQUEST_CODE: u32 = (1234 << 16) | 5678;

/// Longest cancel key protocol 3.2 allows (PostgreSQL 18: 256 bytes).
pub const MAX_CANCEL_KEY_LENGTH: usize = 256;

/// A protocol version as the StartupMessage carries it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProtocolVersion {
    pub major: u16,
    pub minor: u16,
}

impl ProtocolVersion {
    pub const V3_0: ProtocolVersion = ProtocolVersion { major: 3, minor: 0 };
    /// The newest version tollgate understands (PostgreSQL 18). A client
    /// asking for more is offered this, as a server would.
    pub const NEWEST: ProtocolVersion = ProtocolVersion { major: 3, minor: 2 };
    /// From 3.2 on, BackendKeyData keys may be longer than 4 bytes.
    pub const LONG_CANCEL_KEYS: u16 = 2;

    fn from_code(code: u32) -> Self {
        ProtocolVersion {
            major: (code >> 16) as u16,
            minor: (code & 0xffff) as u16,
        }
    }

    pub fn code(&self) -> u32 {
        ((self.major as u32) << 16) | self.minor as u32
    }
}

impl fmt::Display for ProtocolVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// The StartupMessage's name/value pairs, in the order the client sent them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StartupParams {
    pairs: Vec<(String, String)>,
}

impl StartupParams {
    pub fn get(&self, name: &str) -> Option<&str> {
        self.pairs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.pairs.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// Protocol options (`_pq_.*`) the client asked for.
    pub fn protocol_options(&self) -> impl Iterator<Item = &str> {
        self.iter()
            .map(|(k, _)| k)
            .filter(|k| k.starts_with("_pq_."))
    }

    pub fn user(&self) -> Option<&str> {
        self.get("user").filter(|u| !u.is_empty())
    }

    /// The database, which defaults to the user name as in Postgres.
    pub fn database(&self) -> Option<&str> {
        self.get("database")
            .filter(|d| !d.is_empty())
            .or_else(|| self.user())
    }

    pub fn push(&mut self, name: impl Into<String>, value: impl Into<String>) {
        self.pairs.push((name.into(), value.into()));
    }
}

/// A parsed untagged start-up packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FeStartupPacket {
    SslRequest,
    GssEncRequest,
    CancelRequest {
        process_id: u32,
        secret_key: Vec<u8>,
    },
    StartupMessage {
        version: ProtocolVersion,
        params: StartupParams,
    },
}

/// Why a start-up packet was refused. Every variant is safe to show a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartupError {
    InvalidLength(i64),
    InvalidRequestLength { code: u32, len: usize },
    UnsupportedProtocol(ProtocolVersion),
    MissingTerminator,
    DuplicateParameter(String),
    NotUtf8,
}

impl StartupError {
    pub fn sqlstate(&self) -> SqlState {
        match self {
            StartupError::UnsupportedProtocol(_) => sqlstate::FEATURE_NOT_SUPPORTED,
            _ => sqlstate::PROTOCOL_VIOLATION,
        }
    }

    /// A stable, low-cardinality name for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            StartupError::InvalidLength(_) => "startup_length",
            StartupError::InvalidRequestLength { .. } => "startup_request_length",
            StartupError::UnsupportedProtocol(_) => "startup_protocol",
            StartupError::MissingTerminator => "startup_terminator",
            StartupError::DuplicateParameter(_) => "startup_duplicate",
            StartupError::NotUtf8 => "startup_utf8",
        }
    }
}

impl fmt::Display for StartupError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StartupError::InvalidLength(_) => f.write_str("invalid length of startup packet"),
            StartupError::InvalidRequestLength { code, len } => {
                write!(f, "invalid length {len} for request code {code}")
            }
            StartupError::UnsupportedProtocol(v) => write!(
                f,
                "unsupported frontend protocol {v}: server supports 3.0 to 3.0"
            ),
            StartupError::MissingTerminator => {
                f.write_str("invalid startup packet layout: expected terminator as last byte")
            }
            StartupError::DuplicateParameter(name) => {
                // Names are client-chosen; keep the echo short and printable.
                let shown: String = name
                    .chars()
                    .take(64)
                    .map(|c| if c.is_control() { '?' } else { c })
                    .collect();
                write!(f, "duplicate startup parameter \"{shown}\"")
            }
            StartupError::NotUtf8 => f.write_str("startup packet parameters must be valid UTF-8"),
        }
    }
}

impl std::error::Error for StartupError {}

/// Parses one start-up packet at the front of `buf`.
///
/// Returns the packet and the bytes it used, or `Ok(None)` if incomplete.
/// The length word is checked before anything is buffered against it, so a
/// client cannot make tollgate wait for (or allocate) more than
/// [`MAX_STARTUP_PACKET_LENGTH`] bytes.
pub fn parse_startup(buf: &[u8]) -> Result<Option<(FeStartupPacket, usize)>, StartupError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = i32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
    if len < MIN_STARTUP_PACKET_LENGTH as i32 || len as usize > MAX_STARTUP_PACKET_LENGTH {
        return Err(StartupError::InvalidLength(len as i64));
    }
    let len = len as usize;
    if buf.len() < len {
        return Ok(None);
    }
    let code = u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]);
    let body = &buf[8..len];
    let packet = match code {
        SSL_REQUEST_CODE | GSSENC_REQUEST_CODE => {
            if len != MIN_STARTUP_PACKET_LENGTH {
                return Err(StartupError::InvalidRequestLength { code, len });
            }
            if code == SSL_REQUEST_CODE {
                FeStartupPacket::SslRequest
            } else {
                FeStartupPacket::GssEncRequest
            }
        }
        CANCEL_REQUEST_CODE => {
            if body.len() < 8 || body.len() > 4 + MAX_CANCEL_KEY_LENGTH {
                return Err(StartupError::InvalidRequestLength { code, len });
            }
            FeStartupPacket::CancelRequest {
                process_id: u32::from_be_bytes([body[0], body[1], body[2], body[3]]),
                secret_key: body[4..].to_vec(),
            }
        }
        _ => {
            let version = ProtocolVersion::from_code(code);
            if version.major != 3 {
                return Err(StartupError::UnsupportedProtocol(version));
            }
            FeStartupPacket::StartupMessage {
                version,
                params: parse_params(body)?,
            }
        }
    };
    Ok(Some((packet, len)))
}

/// Name/value C strings, ended by an empty name.
/// Parameters checked for duplicates by a linear search; a set beyond.
const LINEAR_DUPLICATE_CHECK: usize = 32;

fn parse_params(body: &[u8]) -> Result<StartupParams, StartupError> {
    if body.last() != Some(&0) {
        return Err(StartupError::MissingTerminator);
    }
    let mut params = StartupParams::default();
    // Duplicates: a linear search while there are few parameters (the
    // usual case: no allocation beyond `names`), a set beyond that, so a
    // start-up packed with thousands of names costs linear time, not
    // quadratic (fuzzing measured 5 ms per packet of 2,052 names).
    let mut names: Vec<&str> = Vec::with_capacity(8);
    let mut seen: Option<std::collections::HashSet<&str>> = None;
    let mut rest = body;
    loop {
        let name_end = memchr::memchr(0, rest).ok_or(StartupError::MissingTerminator)?;
        if name_end == 0 {
            // The terminator must be the very last byte.
            if rest.len() != 1 {
                return Err(StartupError::MissingTerminator);
            }
            return Ok(params);
        }
        let name = &rest[..name_end];
        rest = &rest[name_end + 1..];
        let value_end = memchr::memchr(0, rest).ok_or(StartupError::MissingTerminator)?;
        let value = &rest[..value_end];
        rest = &rest[value_end + 1..];
        if rest.is_empty() {
            // A value with no terminating empty name after it.
            return Err(StartupError::MissingTerminator);
        }
        let name = std::str::from_utf8(name).map_err(|_| StartupError::NotUtf8)?;
        let value = std::str::from_utf8(value).map_err(|_| StartupError::NotUtf8)?;
        let duplicate = match &mut seen {
            Some(set) => !set.insert(name),
            None => {
                let duplicate = names.contains(&name);
                names.push(name);
                if names.len() >= LINEAR_DUPLICATE_CHECK {
                    seen = Some(names.iter().copied().collect());
                }
                duplicate
            }
        };
        if duplicate {
            return Err(StartupError::DuplicateParameter(name.to_owned()));
        }
        params.push(name, value);
    }
}

/// Encodes a StartupMessage (used by tests and by the upstream login).
pub fn encode_startup_message<'a>(
    out: &mut bytes::BytesMut,
    version: ProtocolVersion,
    params: impl IntoIterator<Item = (&'a str, &'a str)>,
) {
    use bytes::BufMut;
    let start = out.len();
    out.put_i32(0);
    out.put_u32(version.code());
    for (k, v) in params {
        out.put_slice(k.as_bytes());
        out.put_u8(0);
        out.put_slice(v.as_bytes());
        out.put_u8(0);
    }
    out.put_u8(0);
    let len = (out.len() - start) as i32;
    out[start..start + 4].copy_from_slice(&len.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;

    fn startup(pairs: &[(&str, &str)]) -> Vec<u8> {
        let mut b = BytesMut::new();
        encode_startup_message(&mut b, ProtocolVersion::V3_0, pairs.iter().copied());
        b.to_vec()
    }

    fn raw(len: i32, code: u32, body: &[u8]) -> Vec<u8> {
        let mut v = len.to_be_bytes().to_vec();
        v.extend_from_slice(&code.to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    /// A packet whose length word matches its body.
    fn sized(code: u32, body: &[u8]) -> Vec<u8> {
        raw(8 + body.len() as i32, code, body)
    }

    /// Duplicates are found whether they come before or after the switch
    /// from a linear search to a set, and many names parse in linear time.
    #[test]
    fn duplicates_are_found_among_many_parameters() {
        let names: Vec<String> = (0..1500).map(|i| format!("p{i}")).collect();
        let pairs: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "")).collect();
        let (p, _) = parse_startup(&startup(&pairs)).unwrap().unwrap();
        assert!(matches!(p, FeStartupPacket::StartupMessage { .. }));
        for (at, dup) in [
            (5, "p3"),
            (40, "p3"),
            (40, "p35"),
            (1500, "p1499"),
            (1500, "p0"),
        ] {
            let mut with = pairs[..at].to_vec();
            with.push((dup, "again"));
            let got = parse_startup(&startup(&with));
            assert_eq!(
                got.err(),
                Some(StartupError::DuplicateParameter(dup.into())),
                "{dup} after {at}"
            );
        }
    }

    #[test]
    fn parses_a_psql_startup() {
        let b = startup(&[
            ("user", "app"),
            ("database", "appdb"),
            ("application_name", "psql"),
            ("client_encoding", "UTF8"),
        ]);
        let (p, used) = parse_startup(&b).unwrap().unwrap();
        assert_eq!(used, b.len());
        let FeStartupPacket::StartupMessage { version, params } = p else {
            panic!("not a startup message")
        };
        assert_eq!(version, ProtocolVersion::V3_0);
        assert_eq!(params.user(), Some("app"));
        assert_eq!(params.database(), Some("appdb"));
        assert_eq!(params.get("application_name"), Some("psql"));
    }

    #[test]
    fn database_defaults_to_user() {
        let b = startup(&[("user", "app")]);
        let (FeStartupPacket::StartupMessage { params, .. }, _) =
            parse_startup(&b).unwrap().unwrap()
        else {
            panic!()
        };
        assert_eq!(params.database(), Some("app"));
    }

    #[test]
    fn every_prefix_is_incomplete_not_an_error() {
        let b = startup(&[("user", "app"), ("database", "appdb")]);
        for n in 0..b.len() {
            assert_eq!(parse_startup(&b[..n]), Ok(None), "prefix {n}");
        }
    }

    #[test]
    fn recognizes_requests() {
        let ssl = raw(8, SSL_REQUEST_CODE, &[]);
        assert_eq!(
            parse_startup(&ssl).unwrap(),
            Some((FeStartupPacket::SslRequest, 8))
        );
        let gss = raw(8, GSSENC_REQUEST_CODE, &[]);
        assert_eq!(
            parse_startup(&gss).unwrap(),
            Some((FeStartupPacket::GssEncRequest, 8))
        );
        let cancel = raw(16, CANCEL_REQUEST_CODE, &[0, 0, 0, 42, 1, 2, 3, 4]);
        assert_eq!(
            parse_startup(&cancel).unwrap(),
            Some((
                FeStartupPacket::CancelRequest {
                    process_id: 42,
                    secret_key: vec![1, 2, 3, 4]
                },
                16
            ))
        );
    }

    #[test]
    fn rejects_bad_lengths_before_buffering() {
        for len in [-1i32, 0, 3, 7, 10_005, i32::MAX, i32::MIN] {
            let b = len.to_be_bytes();
            assert!(
                matches!(parse_startup(&b), Err(StartupError::InvalidLength(_))),
                "len {len}"
            );
        }
        assert!(parse_startup(&raw(12, SSL_REQUEST_CODE, &[0; 4])).is_err());
        assert!(parse_startup(&raw(12, CANCEL_REQUEST_CODE, &[0; 4])).is_err());
        let long_key = vec![0u8; 4 + MAX_CANCEL_KEY_LENGTH + 1];
        assert!(parse_startup(&raw(
            8 + long_key.len() as i32,
            CANCEL_REQUEST_CODE,
            &long_key
        ))
        .is_err());
    }

    #[test]
    fn rejects_other_protocol_majors() {
        let b = raw(9, 2 << 16, &[0]);
        let e = parse_startup(&b).unwrap_err();
        assert_eq!(e.sqlstate(), sqlstate::FEATURE_NOT_SUPPORTED);
        let b = raw(9, 4 << 16, &[0]);
        assert!(parse_startup(&b).is_err());
    }

    #[test]
    fn accepts_newer_minor_versions_with_options() {
        let mut b = BytesMut::new();
        encode_startup_message(
            &mut b,
            ProtocolVersion { major: 3, minor: 2 },
            [("user", "app"), ("_pq_.test", "1")],
        );
        let (FeStartupPacket::StartupMessage { version, params }, _) =
            parse_startup(&b).unwrap().unwrap()
        else {
            panic!()
        };
        assert_eq!(version.minor, 2);
        assert_eq!(params.protocol_options().collect::<Vec<_>>(), ["_pq_.test"]);
    }

    #[test]
    fn rejects_hostile_layouts() {
        let v3 = ProtocolVersion::V3_0.code();
        // No terminator at all.
        assert_eq!(
            parse_startup(&sized(v3, b"user")),
            Err(StartupError::MissingTerminator)
        );
        // Name without value.
        assert_eq!(
            parse_startup(&sized(v3, b"user\0")),
            Err(StartupError::MissingTerminator)
        );
        // Value present but final empty name missing.
        assert_eq!(
            parse_startup(&sized(v3, b"user\0app\0")),
            Err(StartupError::MissingTerminator)
        );
        // Bytes after the terminator.
        assert_eq!(
            parse_startup(&sized(v3, b"user\0app\0\0xx")),
            Err(StartupError::MissingTerminator)
        );
        // Duplicate keys.
        assert!(matches!(
            parse_startup(&sized(v3, b"user\0a\0user\0b\0\0")),
            Err(StartupError::DuplicateParameter(_))
        ));
        // Not UTF-8.
        assert_eq!(
            parse_startup(&sized(v3, b"user\0\xff\xfe\0\0")),
            Err(StartupError::NotUtf8)
        );
        // Empty parameter list is well formed (the handshake then asks for a user).
        let (FeStartupPacket::StartupMessage { params, .. }, _) =
            parse_startup(&sized(v3, b"\0")).unwrap().unwrap()
        else {
            panic!()
        };
        assert_eq!(params.user(), None);
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // A cheap deterministic sweep; the fuzz target goes further.
        let mut seed = 0x9e3779b97f4a7c15u64;
        for _ in 0..20_000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let n = (seed % 40) as usize;
            let mut b: Vec<u8> = (0..n).map(|i| (seed >> (i % 8 * 8)) as u8).collect();
            if b.len() >= 8 {
                b[..4].copy_from_slice(&(n as i32).to_be_bytes());
                b[4..8].copy_from_slice(&ProtocolVersion::V3_0.code().to_be_bytes());
            }
            let _ = parse_startup(&b);
        }
    }
}
