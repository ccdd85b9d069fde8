//! The client side of start-up, as a sans-IO state machine.
//!
//! Each state is a type named for what it waits for and consumes itself to
//! produce the next, so a wrong transition does not compile. The driver feeds
//! it the bytes it read (`input`, consumed as messages are parsed) and sends
//! whatever it appended to `output`.
//!
//! ```text
//! AwaitStartup ─SSLRequest (TLS on)─► 'S' ─► StartTls ─► AwaitStartup (in TLS)
//!      │ ─TLS ClientHello (direct TLS)─► StartTls ─► AwaitStartup (in TLS)
//!      │ ─SSLRequest (TLS off)/GSSENCRequest─► 'N' ─► AwaitStartup
//!      │ ─CancelRequest─► Cancel
//!      └─StartupMessage─► AuthenticationCleartextPassword ─► AwaitPassword ─► Credentials
//! ```
//!
//! <https://www.postgresql.org/docs/current/protocol-flow.html#PROTOCOL-FLOW-START-UP>
#![forbid(unsafe_code)]

use bytes::{Buf, BytesMut};

use crate::error::ClientError;
use crate::protocol::backend;
use crate::protocol::frame::{peek_frame, FrameError};
use crate::protocol::frontend::{parse_password_message, PasswordError};
use crate::protocol::sqlstate;
use crate::protocol::startup::{
    parse_startup, FeStartupPacket, ProtocolVersion, StartupError, StartupParams,
    CANCEL_REQUEST_CODE,
};
use crate::secret::Secret;

/// Longest PasswordMessage accepted by default, tag and length included. An
/// opaque token is 88 bytes; Postgres allows far more for passwords, but
/// nothing a client could legitimately send needs it. A JWT raises the cap
/// to `[jwt] max_token_len`, still bounded.
pub const MAX_PASSWORD_MESSAGE_LEN: usize = 512;

/// The TLS content type of a handshake record: the first byte of a
/// ClientHello. No valid start-up packet starts with it (its length would
/// exceed 10000), so it unambiguously marks direct TLS.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// What the connection's transport allows, decided by the driver from the
/// configuration and the client's address.
#[derive(Debug, Clone, Copy)]
pub struct StartupPolicy {
    /// TLS is configured: answer SSLRequest with 'S', accept direct TLS.
    pub tls_available: bool,
    /// A token may be sent without TLS on this connection.
    pub plaintext_allowed: bool,
    /// Longest PasswordMessage accepted (larger when JWTs are configured).
    pub max_password_message: usize,
}

impl Default for StartupPolicy {
    fn default() -> Self {
        StartupPolicy {
            tls_available: false,
            plaintext_allowed: true,
            max_password_message: MAX_PASSWORD_MESSAGE_LEN,
        }
    }
}

/// Waiting for the first packet (or the next one after an SSL/GSS refusal
/// or a completed TLS handshake).
#[derive(Debug, Default)]
pub struct AwaitStartup {
    policy: StartupPolicy,
    in_tls: bool,
    ssl_refused: bool,
    gss_refused: bool,
}

/// The client's start-up, once its StartupMessage is accepted.
#[derive(Debug, Clone)]
pub struct ClientStartup {
    pub version: ProtocolVersion,
    pub params: StartupParams,
    pub user: String,
    pub database: String,
}

impl ClientStartup {
    /// A physical (`replication=true`) or logical (`replication=database`)
    /// replication connection; those need a token that allows them.
    pub fn is_replication(&self) -> bool {
        self.params
            .get("replication")
            .is_some_and(|v| !matches!(v, "false" | "off" | "no" | "0"))
    }
}

/// Waiting for the PasswordMessage that carries the token.
#[derive(Debug)]
pub struct AwaitPassword {
    startup: ClientStartup,
    max_len: usize,
}

/// What happened after feeding bytes to [`AwaitStartup`].
#[derive(Debug)]
pub enum StartupStep {
    NeedMore(AwaitStartup),
    /// The client asked for a password: send `output`, then read it.
    AwaitPassword(AwaitPassword),
    /// A CancelRequest: forward it and close, replying nothing.
    Cancel {
        process_id: u32,
        secret_key: Vec<u8>,
    },
    /// Run a TLS server handshake now (after sending `output`), then go on
    /// with `next` over the encrypted stream. For direct TLS the ClientHello
    /// is still in the input: it belongs to the TLS handshake.
    StartTls {
        next: AwaitStartup,
        direct: bool,
    },
}

/// What happened after feeding bytes to [`AwaitPassword`].
#[derive(Debug)]
pub enum PasswordStep {
    NeedMore(AwaitPassword),
    /// The client sent its token. Any bytes after the PasswordMessage are
    /// left in the input for the session to forward once logged in.
    Credentials {
        startup: ClientStartup,
        token: Secret,
    },
}

fn protocol_violation(kind: &'static str, message: impl Into<String>) -> ClientError {
    ClientError::new(sqlstate::PROTOCOL_VIOLATION, kind, message)
}

/// A start-up packet refused as Postgres refuses it
/// (`ProcessStartupPacket` in `backend_startup.c`): one it cannot frame (a
/// length out of range, a CancelRequest of the wrong size) is closed
/// without a word (COMMERROR, logged only); one it framed but cannot
/// accept gets FATAL. (Postgres answers an SSLRequest or GSSENCRequest of
/// any size; tollgate refuses a wrong-sized one with FATAL.)
fn startup_error(e: StartupError) -> ClientError {
    let unframed = matches!(
        e,
        StartupError::InvalidLength(_)
            | StartupError::InvalidRequestLength {
                code: CANCEL_REQUEST_CODE,
                ..
            }
    );
    let error = ClientError::new(e.sqlstate(), e.kind(), e.to_string());
    if unframed {
        error.unsent()
    } else {
        error
    }
}

impl From<FrameError> for ClientError {
    fn from(e: FrameError) -> Self {
        let kind = match e {
            FrameError::InvalidLength { .. } => "frame_length",
            FrameError::TooLong { .. } => "frame_too_long",
        };
        protocol_violation(kind, e.to_string())
    }
}

impl AwaitStartup {
    /// No TLS, plaintext allowed.
    pub fn new() -> Self {
        Self::default()
    }

    pub fn with_policy(policy: StartupPolicy) -> Self {
        AwaitStartup {
            policy,
            ..Self::default()
        }
    }

    /// Whether the session is (or will be, after `StartTls`) encrypted.
    pub fn in_tls(&self) -> bool {
        self.in_tls
    }

    fn into_tls(self, direct: bool) -> StartupStep {
        StartupStep::StartTls {
            next: AwaitStartup {
                in_tls: true,
                ..self
            },
            direct,
        }
    }

    pub fn on_input(
        mut self,
        input: &mut BytesMut,
        output: &mut BytesMut,
    ) -> Result<StartupStep, ClientError> {
        if input.first() == Some(&TLS_HANDSHAKE_RECORD) && !self.in_tls {
            // Direct TLS is only valid as the very first bytes.
            if !self.policy.tls_available || self.ssl_refused || self.gss_refused {
                return Err(protocol_violation(
                    "direct_tls_refused",
                    "direct TLS connection received, but TLS is not enabled on this server",
                ));
            }
            return Ok(self.into_tls(true));
        }
        let (packet, used) = match parse_startup(input) {
            Ok(Some(p)) => p,
            Ok(None) => return Ok(StartupStep::NeedMore(self)),
            Err(e) => return Err(startup_error(e)),
        };
        input.advance(used);
        match packet {
            FeStartupPacket::SslRequest | FeStartupPacket::GssEncRequest if self.in_tls => {
                Err(protocol_violation(
                    "startup_renegotiation",
                    "encryption request inside an encrypted session",
                ))
            }
            FeStartupPacket::SslRequest if self.policy.tls_available && !self.ssl_refused => {
                // Anything after the SSLRequest, before our 'S' could have
                // been read, was sent in the clear but would be treated as
                // if it came through TLS (CVE-2021-23214): refuse it.
                if !input.is_empty() {
                    return Err(protocol_violation(
                        "plaintext_after_ssl_request",
                        "received unencrypted data after SSL request",
                    ));
                }
                output.extend_from_slice(b"S");
                Ok(self.into_tls(false))
            }
            FeStartupPacket::SslRequest if !self.ssl_refused => {
                self.ssl_refused = true;
                output.extend_from_slice(b"N");
                Ok(StartupStep::NeedMore(self))
            }
            FeStartupPacket::GssEncRequest if !self.gss_refused => {
                self.gss_refused = true;
                output.extend_from_slice(b"N");
                Ok(StartupStep::NeedMore(self))
            }
            FeStartupPacket::SslRequest | FeStartupPacket::GssEncRequest => Err(
                protocol_violation("startup_renegotiation", "duplicate encryption request"),
            ),
            FeStartupPacket::CancelRequest {
                process_id,
                secret_key,
            } => Ok(StartupStep::Cancel {
                process_id,
                secret_key,
            }),
            FeStartupPacket::StartupMessage { version, params } => {
                if !self.in_tls && !self.policy.plaintext_allowed {
                    // Refuse before asking for the token, so it is never sent.
                    return Err(ClientError::new(
                        sqlstate::INVALID_AUTHORIZATION_SPECIFICATION,
                        "tls_required",
                        "TLS is required: connect with sslmode=require or stricter",
                    ));
                }
                let startup = accept_startup(version, params)?;
                backend::authentication_cleartext_password(output);
                Ok(StartupStep::AwaitPassword(AwaitPassword {
                    startup,
                    max_len: self.policy.max_password_message,
                }))
            }
        }
    }
}

/// Checks the StartupMessage's parameters. Protocol-version negotiation is
/// left to the upstream: the requested version and `_pq_.` options travel
/// with the upstream start-up, and the server's NegotiateProtocolVersion
/// (if any) reaches the client before AuthenticationOk, so the client gets
/// what the server would have answered it directly.
fn accept_startup(
    version: ProtocolVersion,
    params: StartupParams,
) -> Result<ClientStartup, ClientError> {
    let Some(user) = params.user().map(str::to_owned) else {
        return Err(ClientError::new(
            sqlstate::INVALID_AUTHORIZATION_SPECIFICATION,
            "startup_no_user",
            "no PostgreSQL user name specified in startup packet",
        ));
    };
    let database = params.database().unwrap_or(&user).to_owned();
    Ok(ClientStartup {
        version,
        params,
        user,
        database,
    })
}

impl AwaitPassword {
    pub fn startup(&self) -> &ClientStartup {
        &self.startup
    }

    pub fn on_input(self, input: &mut BytesMut) -> Result<PasswordStep, ClientError> {
        // The type first, as Postgres does: a second StartupMessage or a
        // CancelRequest here has no type byte, and its length read one
        // byte off would be blamed as "too long".
        if let Some(&tag) = input.first().filter(|&&t| t != b'p') {
            let e = PasswordError::UnexpectedMessage(tag);
            return Err(protocol_violation("password_unexpected", e.to_string()));
        }
        let Some(frame) = peek_frame(input, self.max_len).map_err(|e| match e {
            // A token never needs this much; say so rather than "invalid length".
            FrameError::TooLong { .. } => {
                protocol_violation("password_too_long", "password packet is too long")
            }
            e => e.into(),
        })?
        else {
            return Ok(PasswordStep::NeedMore(self));
        };
        let token = parse_password_message(&input[..frame.total_len])
            .map(|p| Secret::new(p.to_vec()))
            .map_err(|e| match e {
                PasswordError::UnexpectedMessage(_) => {
                    protocol_violation("password_unexpected", e.to_string())
                }
                PasswordError::Malformed => protocol_violation("password_malformed", e.to_string()),
            })?;
        // The PasswordMessage held the token: wipe it from the read buffer.
        zeroize::Zeroize::zeroize(&mut input[..frame.total_len]);
        input.advance(frame.total_len);
        Ok(PasswordStep::Credentials {
            startup: self.startup,
            token,
        })
    }
}

/// Where a start-up stands between two reads.
#[derive(Debug)]
pub enum Phase {
    Startup(AwaitStartup),
    Password(AwaitPassword),
}

/// The outcome of [`advance`].
#[derive(Debug)]
pub enum Progress {
    NeedMore(Phase),
    Cancel {
        process_id: u32,
        secret_key: Vec<u8>,
    },
    Credentials {
        startup: ClientStartup,
        token: Secret,
    },
    /// Send `output`, run a TLS server handshake, then continue with `next`
    /// over the encrypted stream.
    StartTls {
        next: Phase,
        direct: bool,
    },
}

/// Runs the machine over everything in `input` until it needs more bytes or
/// reaches an outcome. The driver sends `output` after each call.
pub fn advance(
    mut phase: Phase,
    input: &mut BytesMut,
    output: &mut BytesMut,
) -> Result<Progress, ClientError> {
    loop {
        phase = match phase {
            Phase::Startup(s) => {
                let before = input.len();
                match s.on_input(input, output)? {
                    StartupStep::NeedMore(s) if input.len() == before || input.is_empty() => {
                        return Ok(Progress::NeedMore(Phase::Startup(s)))
                    }
                    // A refused SSLRequest: the StartupMessage may follow in the same read.
                    StartupStep::NeedMore(s) => Phase::Startup(s),
                    StartupStep::AwaitPassword(p) => Phase::Password(p),
                    StartupStep::Cancel {
                        process_id,
                        secret_key,
                    } => {
                        return Ok(Progress::Cancel {
                            process_id,
                            secret_key,
                        })
                    }
                    StartupStep::StartTls { next, direct } => {
                        return Ok(Progress::StartTls {
                            next: Phase::Startup(next),
                            direct,
                        })
                    }
                }
            }
            Phase::Password(p) => {
                return Ok(match p.on_input(input)? {
                    PasswordStep::NeedMore(p) => Progress::NeedMore(Phase::Password(p)),
                    PasswordStep::Credentials { startup, token } => {
                        Progress::Credentials { startup, token }
                    }
                })
            }
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::startup::{encode_startup_message, SSL_REQUEST_CODE};

    fn startup_bytes(pairs: &[(&str, &str)]) -> BytesMut {
        let mut b = BytesMut::new();
        encode_startup_message(&mut b, ProtocolVersion::V3_0, pairs.iter().copied());
        b
    }

    fn password_bytes(p: &[u8]) -> BytesMut {
        let mut b = BytesMut::new();
        postgres_protocol::message::frontend::password_message(p, &mut b).unwrap();
        b
    }

    /// Runs a whole start-up delivered in `chunk`-byte pieces.
    fn run(bytes: &[u8], chunk: usize) -> Result<(ClientStartup, Secret, BytesMut), ClientError> {
        let mut input = BytesMut::new();
        let mut output = BytesMut::new();
        let mut phase = Phase::Startup(AwaitStartup::new());
        for piece in bytes.chunks(chunk) {
            input.extend_from_slice(piece);
            phase = match advance(phase, &mut input, &mut output)? {
                Progress::NeedMore(p) => p,
                Progress::Credentials { startup, token } => return Ok((startup, token, output)),
                Progress::Cancel { .. } | Progress::StartTls { .. } => panic!("unexpected step"),
            };
        }
        Err(ClientError::internal())
    }

    #[test]
    fn full_start_up_in_any_chunking() {
        let mut all = BytesMut::new();
        all.extend_from_slice(&8i32.to_be_bytes());
        all.extend_from_slice(&SSL_REQUEST_CODE.to_be_bytes());
        all.extend_from_slice(&startup_bytes(&[("user", "app"), ("database", "appdb")]));
        all.extend_from_slice(&password_bytes(b"tg_token"));
        for chunk in [1, 2, 3, 7, 1000] {
            let (s, token, output) = run(&all, chunk).unwrap();
            assert_eq!(s.user, "app");
            assert_eq!(s.database, "appdb");
            assert_eq!(token.expose(), b"tg_token");
            assert_eq!(&output[..], b"NR\0\0\0\x08\0\0\0\x03");
        }
    }

    #[test]
    fn bytes_after_the_password_stay_in_the_input() {
        let mut input = startup_bytes(&[("user", "app")]);
        let mut output = BytesMut::new();
        let StartupStep::AwaitPassword(p) = AwaitStartup::new()
            .on_input(&mut input, &mut output)
            .unwrap()
        else {
            panic!()
        };
        input.extend_from_slice(&password_bytes(b"t"));
        input.extend_from_slice(b"Q\0\0\0\x0dselect 1\0");
        let PasswordStep::Credentials { .. } = p.on_input(&mut input).unwrap() else {
            panic!()
        };
        assert_eq!(&input[..], b"Q\0\0\0\x0dselect 1\0");
    }

    #[test]
    fn no_user_is_28000() {
        let mut input = startup_bytes(&[("database", "x")]);
        let e = AwaitStartup::new()
            .on_input(&mut input, &mut BytesMut::new())
            .unwrap_err();
        assert_eq!(e.code, sqlstate::INVALID_AUTHORIZATION_SPECIFICATION);
    }

    #[test]
    fn second_ssl_request_is_a_violation() {
        let mut input = BytesMut::new();
        for _ in 0..2 {
            input.extend_from_slice(&8i32.to_be_bytes());
            input.extend_from_slice(&SSL_REQUEST_CODE.to_be_bytes());
        }
        let mut out = BytesMut::new();
        let StartupStep::NeedMore(s) = AwaitStartup::new().on_input(&mut input, &mut out).unwrap()
        else {
            panic!()
        };
        let e = s.on_input(&mut input, &mut out).unwrap_err();
        assert_eq!(e.code, sqlstate::PROTOCOL_VIOLATION);
    }

    #[test]
    fn password_limits() {
        let mut input = startup_bytes(&[("user", "app")]);
        let StartupStep::AwaitPassword(p) = AwaitStartup::new()
            .on_input(&mut input, &mut BytesMut::new())
            .unwrap()
        else {
            panic!()
        };
        // Oversized: rejected from the header alone.
        let mut big = BytesMut::from(&b"p"[..]);
        big.extend_from_slice(&100_000i32.to_be_bytes());
        let e = p.on_input(&mut big).unwrap_err();
        assert_eq!(e.kind, "password_too_long");
        assert_eq!(e.code, sqlstate::PROTOCOL_VIOLATION);
    }

    #[test]
    fn query_instead_of_password_is_a_violation() {
        let mut input = startup_bytes(&[("user", "app")]);
        let StartupStep::AwaitPassword(p) = AwaitStartup::new()
            .on_input(&mut input, &mut BytesMut::new())
            .unwrap()
        else {
            panic!()
        };
        let mut q = BytesMut::from(&b"Q\0\0\0\x0dselect 1\0"[..]);
        assert_eq!(p.on_input(&mut q).unwrap_err().kind, "password_unexpected");
    }

    fn tls_policy(plaintext_allowed: bool) -> StartupPolicy {
        StartupPolicy {
            tls_available: true,
            plaintext_allowed,
            ..StartupPolicy::default()
        }
    }

    fn ssl_request() -> BytesMut {
        let mut b = BytesMut::new();
        b.extend_from_slice(&8i32.to_be_bytes());
        b.extend_from_slice(&SSL_REQUEST_CODE.to_be_bytes());
        b
    }

    #[test]
    fn ssl_request_starts_tls_then_startup_inside_it() {
        let mut input = ssl_request();
        let mut out = BytesMut::new();
        let p = advance(
            Phase::Startup(AwaitStartup::with_policy(tls_policy(false))),
            &mut input,
            &mut out,
        )
        .unwrap();
        let Progress::StartTls { next, direct } = p else {
            panic!()
        };
        assert!(!direct);
        assert_eq!(&out[..], b"S");
        // Inside TLS the plaintext rule no longer applies.
        let mut input = startup_bytes(&[("user", "app")]);
        let p = advance(next, &mut input, &mut out).unwrap();
        assert!(matches!(p, Progress::NeedMore(Phase::Password(_))));
    }

    #[test]
    fn plaintext_after_ssl_request_is_refused() {
        let mut input = ssl_request();
        input.extend_from_slice(&startup_bytes(&[("user", "app")]));
        let mut out = BytesMut::new();
        let e = AwaitStartup::with_policy(tls_policy(true))
            .on_input(&mut input, &mut out)
            .unwrap_err();
        assert_eq!(e.kind, "plaintext_after_ssl_request");
        assert_eq!(e.code, sqlstate::PROTOCOL_VIOLATION);
        assert!(out.is_empty(), "nothing may be answered");
    }

    #[test]
    fn direct_tls_is_recognized_only_when_enabled_and_first() {
        let hello = BytesMut::from(&[0x16u8, 0x03, 0x01, 0x00, 0x20][..]);
        let mut input = hello.clone();
        let step = AwaitStartup::with_policy(tls_policy(true))
            .on_input(&mut input, &mut BytesMut::new())
            .unwrap();
        assert!(matches!(step, StartupStep::StartTls { direct: true, .. }));
        assert_eq!(input, hello, "the ClientHello stays for the TLS handshake");
        let e = AwaitStartup::new()
            .on_input(&mut hello.clone(), &mut BytesMut::new())
            .unwrap_err();
        assert_eq!(e.kind, "direct_tls_refused");
    }

    #[test]
    fn plaintext_startup_refused_when_tls_required() {
        let mut input = startup_bytes(&[("user", "app")]);
        let mut out = BytesMut::new();
        let e = AwaitStartup::with_policy(tls_policy(false))
            .on_input(&mut input, &mut out)
            .unwrap_err();
        assert_eq!(e.code, sqlstate::INVALID_AUTHORIZATION_SPECIFICATION);
        assert!(e.message.contains("TLS is required"));
        assert!(out.is_empty(), "no password request may go out");
    }

    #[test]
    fn encryption_request_inside_tls_is_a_violation() {
        let mut input = ssl_request();
        let StartupStep::StartTls { next, .. } = AwaitStartup::with_policy(tls_policy(true))
            .on_input(&mut input, &mut BytesMut::new())
            .unwrap()
        else {
            panic!()
        };
        let e = next
            .on_input(&mut ssl_request(), &mut BytesMut::new())
            .unwrap_err();
        assert_eq!(e.kind, "startup_renegotiation");
    }

    #[test]
    fn newer_protocol_and_options_are_left_to_the_upstream() {
        let mut input = BytesMut::new();
        encode_startup_message(
            &mut input,
            ProtocolVersion { major: 3, minor: 2 },
            [("user", "app"), ("_pq_.x", "1")],
        );
        let mut out = BytesMut::new();
        let StartupStep::AwaitPassword(p) =
            AwaitStartup::new().on_input(&mut input, &mut out).unwrap()
        else {
            panic!()
        };
        // Only the password request: negotiation is the server's answer.
        assert_eq!(out[0], b'R');
        assert_eq!(out.len(), 9);
        assert_eq!(p.startup().version, ProtocolVersion { major: 3, minor: 2 });
        assert_eq!(p.startup().params.protocol_options().count(), 1);
    }
}
