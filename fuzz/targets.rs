//! The bodies of tollgate's fuzz targets, one `pub fn <target>(data: &[u8])`
//! each.
//!
//! Two builds share this file: the cargo-fuzz crate beside it (its library,
//! which `fuzz_targets/<target>.rs` call under libFuzzer on nightly), and the
//! main crate's `tests/it/fuzz_replay.rs` (`#[path]`-included), which runs every
//! file of `corpus/<target>/` and `regressions/<target>/` through the same
//! function on stable, so the corpora are regression tests everywhere.
//!
//! Each body does more than "does not panic": it checks the invariants a
//! user would notice (what was consumed, what a re-encoding gives back, that
//! chunking does not change a verdict, that nothing the client sent is
//! echoed or forwarded before authentication). Only tollgate's public API,
//! std and `bytes` (whose `BytesMut` the handshake API takes) are used.
//!
//! Input layouts (a leading selector byte, then the bytes under test) are
//! described on each function; fuzz/README.md has how to run them.
#![forbid(unsafe_code)]

use std::borrow::Cow;
use std::cell::RefCell;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, UNIX_EPOCH};

use bytes::BytesMut;
use tollgate::auth::jwt::{
    looks_like_jwt, JwtConfigRaw, JwtHmacKeyRaw, JwtPublicKeyRaw, JwtVerifier, RawSecret,
};
use tollgate::auth::{token, Presenter, TokenRecord, TokenStore};
use tollgate::error::ClientError;
use tollgate::handshake::{self as hs, AwaitStartup, Phase, Progress, StartupPolicy};
use tollgate::protocol::backend::{
    parse_error_fields, parse_login_message, BeLoginMessage, MAX_LOGIN_MESSAGE_LEN,
};
use tollgate::protocol::frame::{peek_frame, FrameVisitor, Framer, HEADER_LEN};
use tollgate::protocol::frontend::{parse_password_message, PasswordError, TAG_PASSWORD_MESSAGE};
use tollgate::protocol::proxy_header::{
    detect as detect_proxy, encode_v1, encode_v2, parse as parse_proxy, ProxyError, ProxyHeader,
    MAX_HEADER_LEN as MAX_PROXY_HEADER_LEN, V1_MAX_LEN,
};
use tollgate::protocol::startup::{
    encode_startup_message, parse_startup, FeStartupPacket, ProtocolVersion, CANCEL_REQUEST_CODE,
    GSSENC_REQUEST_CODE, MAX_CANCEL_KEY_LENGTH, MAX_STARTUP_PACKET_LENGTH,
    MIN_STARTUP_PACKET_LENGTH, SSL_REQUEST_CODE,
};
use tollgate::secret::Secret;
use tollgate::upstream::login::{Login, LoginStep, ISSUED_KEY_LEN};
use tollgate::upstream::scram::{ChannelBinding, KeyCache, ScramClient, MAX_ITERATIONS};

// ---------------------------------------------------------------------------
// startup
// ---------------------------------------------------------------------------

/// `parse_startup` on arbitrary bytes (StartupMessage with any parameters,
/// `options` included, CancelRequest, SSLRequest, GSSENCRequest).
pub fn startup(data: &[u8]) -> Reached {
    let result = parse_startup(data);
    // A decided verdict (a packet or an error) depends only on the bytes the
    // length word covers: what follows belongs to the next packet.
    if !matches!(result, Ok(None)) {
        let mut longer = data.to_vec();
        longer.extend_from_slice(b"\0\xffuser\0x\0\0");
        assert_eq!(parse_startup(&longer), result, "trailing bytes changed it");
    }
    match result {
        Ok(None) => {
            // Incomplete only while a valid declared length is not all there.
            if let Some(len) = declared_len(data) {
                assert!(
                    (MIN_STARTUP_PACKET_LENGTH as i64..=MAX_STARTUP_PACKET_LENGTH as i64)
                        .contains(&len)
                );
                assert!(len as usize > data.len());
            }
            "incomplete".into()
        }
        Ok(Some((packet, used))) => {
            assert!((MIN_STARTUP_PACKET_LENGTH..=MAX_STARTUP_PACKET_LENGTH).contains(&used));
            assert!(used <= data.len());
            assert_eq!(declared_len(data), Some(used as i64));
            // A strict prefix is "need more", never an error or a packet
            // (the short ones, and a few longer ones: all take one path).
            for n in (0..used.min(9)).chain([used / 2, used - 1]) {
                assert_eq!(parse_startup(&data[..n]), Ok(None), "prefix {n}");
            }
            let code = u32::from_be_bytes(data[4..8].try_into().unwrap());
            let mut again = BytesMut::new();
            match &packet {
                FeStartupPacket::SslRequest => {
                    assert_eq!((code, used), (SSL_REQUEST_CODE, 8));
                }
                FeStartupPacket::GssEncRequest => {
                    assert_eq!((code, used), (GSSENC_REQUEST_CODE, 8));
                }
                FeStartupPacket::CancelRequest {
                    process_id,
                    secret_key,
                } => {
                    assert_eq!(code, CANCEL_REQUEST_CODE);
                    assert!((4..=MAX_CANCEL_KEY_LENGTH).contains(&secret_key.len()));
                    again.extend_from_slice(&(used as i32).to_be_bytes());
                    again.extend_from_slice(&CANCEL_REQUEST_CODE.to_be_bytes());
                    again.extend_from_slice(&process_id.to_be_bytes());
                    again.extend_from_slice(secret_key);
                    assert_eq!(&again[..], &data[..used]);
                }
                FeStartupPacket::StartupMessage { version, params } => {
                    assert_eq!(version.major, 3);
                    assert_eq!(version.code(), code);
                    let mut names: Vec<&str> = Vec::new();
                    for (k, v) in params.iter() {
                        assert!(!k.is_empty() && !k.contains('\0') && !v.contains('\0'));
                        assert!(!names.contains(&k), "duplicate {k:?} accepted");
                        names.push(k);
                    }
                    if params.user().is_some() {
                        assert!(params.database().is_some());
                    }
                    // The parser accepts only the canonical layout, so the
                    // encoder gives back exactly the bytes it read.
                    encode_startup_message(&mut again, *version, params.iter());
                    assert_eq!(&again[..], &data[..used], "startup re-encoding differs");
                }
            }
            match packet {
                FeStartupPacket::SslRequest => "ssl_request".into(),
                FeStartupPacket::GssEncRequest => "gssenc_request".into(),
                FeStartupPacket::CancelRequest { .. } => "cancel_request".into(),
                FeStartupPacket::StartupMessage { .. } => "startup_message".into(),
            }
        }
        Err(e) => {
            let text = e.to_string();
            assert!(text.len() < 512, "long error text: {text}");
            let _ = e.sqlstate();
            e.kind().into()
        }
    }
}

fn declared_len(data: &[u8]) -> Option<i64> {
    Some(i32::from_be_bytes(data.get(..4)?.try_into().ok()?) as i64)
}

// ---------------------------------------------------------------------------
// password
// ---------------------------------------------------------------------------

/// Longest PasswordMessage any configuration accepts (a 65535-byte JWT).
const MAX_PASSWORD_FRAME: usize = 65535 + 6;

/// The PasswordMessage parser, framed the way the handshake frames it, and
/// cross-checked against the handshake's own password phase.
pub fn password(data: &[u8]) -> Reached {
    if let Ok(Some(frame)) = peek_frame(data, MAX_PASSWORD_FRAME) {
        let msg = &data[..frame.total_len];
        match parse_password_message(msg) {
            Ok(pw) => {
                assert_eq!(msg[0], TAG_PASSWORD_MESSAGE);
                assert!(!pw.contains(&0));
                let mut again = vec![TAG_PASSWORD_MESSAGE];
                again.extend_from_slice(&((pw.len() + 5) as i32).to_be_bytes());
                again.extend_from_slice(pw);
                again.push(0);
                assert_eq!(again, msg, "password re-encoding differs");
                // What the session does next with a password.
                let _ = token::parse(pw);
                let _ = looks_like_jwt(pw);
            }
            Err(PasswordError::UnexpectedMessage(tag)) => {
                assert_eq!(tag, msg[0]);
                assert_ne!(tag, TAG_PASSWORD_MESSAGE);
            }
            Err(PasswordError::Malformed) => assert_eq!(msg[0], TAG_PASSWORD_MESSAGE),
        }
    }

    // The same bytes at the handshake's password prompt.
    let mut input = BytesMut::new();
    encode_startup_message(&mut input, ProtocolVersion::V3_0, [("user", "app")]);
    let mut output = BytesMut::new();
    let Ok(Progress::NeedMore(phase)) =
        hs::advance(Phase::Startup(AwaitStartup::new()), &mut input, &mut output)
    else {
        panic!("a plain StartupMessage must lead to the password prompt")
    };
    input.extend_from_slice(data);
    match hs::advance(phase, &mut input, &mut output) {
        Ok(Progress::Credentials { token, .. }) => {
            let frame = peek_frame(data, MAX_PASSWORD_FRAME).unwrap().unwrap();
            assert!(frame.total_len <= hs::MAX_PASSWORD_MESSAGE_LEN);
            assert_eq!(
                Ok(token.expose()),
                parse_password_message(&data[..frame.total_len])
            );
            assert_eq!(&input[..], &data[frame.total_len..], "leftover");
            "credentials".into()
        }
        Ok(Progress::NeedMore(Phase::Password(_))) => {
            assert!(matches!(
                peek_frame(data, MAX_PASSWORD_FRAME),
                Ok(None) | Err(_)
            ));
            "incomplete".into()
        }
        Ok(other) => panic!("unexpected step at the password prompt: {other:?}"),
        Err(e) => {
            check_client_error(&e);
            e.kind.into()
        }
    }
}

/// A ClientError's bytes parse back to its code and (NUL-free) message.
fn check_client_error(e: &ClientError) {
    let mut out = BytesMut::new();
    e.encode(&mut out);
    let frame = peek_frame(&out, usize::MAX).unwrap().unwrap();
    assert_eq!(frame.total_len, out.len());
    let Ok(BeLoginMessage::ErrorResponse(f)) = parse_login_message(&out) else {
        panic!("a ClientError must encode as an ErrorResponse")
    };
    assert_eq!(f.severity, "FATAL");
    assert_eq!(f.code, e.code.code());
    assert_eq!(f.message, e.message.replace('\0', "?"));
}

// ---------------------------------------------------------------------------
// scram_client
// ---------------------------------------------------------------------------

/// The password the fuzzed SCRAM exchanges log in with.
pub const SCRAM_PASSWORD: &[u8] = b"pencil";
/// The fixed client nonce; base64: [`SCRAM_CLIENT_NONCE`].
pub const SCRAM_NONCE: [u8; 18] = [0x2a; 18];
pub const SCRAM_CLIENT_NONCE: &str = "KioqKioqKioqKioqKioqKioq";
/// Channel-binding data for the `-PLUS` exchanges.
const CBIND_DATA: [u8; 32] = [0xcb; 32];

/// PBKDF2 rounds a fuzzed exchange may cost. The library's own cap
/// (`MAX_ITERATIONS`, a million) is most of a second of CPU per input, which would
/// turn the fuzzer into a PBKDF2 benchmark; counts between the two are
/// skipped here (they parse like any other count), counts above the
/// library's cap still go in, to check that they are refused.
pub const FUZZ_MAX_ITERATIONS: u64 = 4096;

thread_local! {
    static KEY_CACHE: RefCell<KeyCache> = RefCell::new(KeyCache::new());
}

/// Whether a server-first message names an iteration count the library
/// would accept but that costs more than [`FUZZ_MAX_ITERATIONS`]. The
/// library accepts only all-digit counts, so this sees every one it would.
fn too_many_rounds(server_first: &[u8]) -> bool {
    server_first.split(|&b| b == b',').any(|attr| {
        let Some(digits) = attr.strip_prefix(b"i=") else {
            return false;
        };
        if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
            return false;
        }
        let significant: &[u8] = &digits[digits.iter().take_while(|&&d| d == b'0').count()..];
        if significant.len() > 10 {
            return false; // refused by the library, cheaply
        }
        let value: u64 = std::str::from_utf8(significant)
            .unwrap()
            .parse()
            .unwrap_or(0);
        value > FUZZ_MAX_ITERATIONS && value <= u64::from(MAX_ITERATIONS)
    })
}

fn channel_binding(selector: u8) -> ChannelBinding {
    match selector % 3 {
        0 => ChannelBinding::NotSupported,
        1 => ChannelBinding::SupportedButNotUsed,
        _ => ChannelBinding::TlsServerEndPoint(CBIND_DATA.to_vec()),
    }
}

/// The SCRAM-SHA-256 client against a hostile server.
///
/// Layout: a selector byte (channel binding: `% 3` = 0 none, 1 `y`, 2
/// `tls-server-end-point`), then the server-first-message, then optionally
/// a NUL and the server-final-message. The client nonce is
/// [`SCRAM_CLIENT_NONCE`] and the password [`SCRAM_PASSWORD`], so a seed can
/// carry a valid server signature.
pub fn scram_client(data: &[u8]) -> Reached {
    let Some((&selector, rest)) = data.split_first() else {
        return "empty".into();
    };
    let (server_first, server_final) = match rest.iter().position(|&b| b == 0) {
        Some(at) => (&rest[..at], Some(&rest[at + 1..])),
        None => (rest, None),
    };
    if too_many_rounds(server_first) {
        return "skipped".into();
    }
    let binding = channel_binding(selector);
    let (first, state) = ScramClient::start(SCRAM_PASSWORD, binding.clone(), Some(SCRAM_NONCE))
        .expect("a fixed nonce cannot fail");
    assert_eq!(first.mechanism, binding.mechanism());
    let bare = format!("n=,r={SCRAM_CLIENT_NONCE}");
    assert!(first.message.ends_with(bare.as_bytes()));

    let result = KEY_CACHE.with(|c| state.handle_server_first(server_first, &mut c.borrow_mut()));
    let (client_final, state) = match result {
        Ok(ok) => ok,
        Err(e) => {
            assert!(e.to_string().len() < 512);
            return format!("first:{e:?}");
        }
    };
    // Accepted: the server nonce extends ours, and the client-final names
    // it after the channel binding, then a 32-byte proof.
    let text = std::str::from_utf8(server_first).expect("accepted, so UTF-8");
    let server_nonce = text
        .strip_prefix("r=")
        .and_then(|t| t.split(',').next())
        .expect("accepted, so it starts with r=");
    assert!(server_nonce.starts_with(SCRAM_CLIENT_NONCE));
    assert!(server_nonce.len() > SCRAM_CLIENT_NONCE.len());
    let mut gs2 = match &binding {
        ChannelBinding::NotSupported => b"n,,".to_vec(),
        ChannelBinding::SupportedButNotUsed => b"y,,".to_vec(),
        ChannelBinding::TlsServerEndPoint(_) => b"p=tls-server-end-point,,".to_vec(),
    };
    if let ChannelBinding::TlsServerEndPoint(d) = &binding {
        gs2.extend_from_slice(d);
    }
    let client_final = String::from_utf8(client_final).expect("client-final is ASCII");
    let expected = format!("c={},r={server_nonce},p=", base64(&gs2, STANDARD, true));
    assert!(client_final.starts_with(&expected), "{client_final}");
    assert_eq!(client_final.len(), expected.len() + 44, "proof is 32 bytes");

    let Some(fin) = server_final else {
        return "first_accepted".into();
    };
    match state.handle_server_final(fin) {
        Ok(()) => {
            assert!(fin.starts_with(b"v=") && !fin.contains(&b','));
            "final_accepted".into()
        }
        Err(tollgate::upstream::scram::ScramError::ServerError(e)) => {
            assert!(fin.starts_with(b"e="));
            assert!(e.chars().count() <= 128);
            assert!(e.chars().all(|c| c.is_ascii_graphic() || c == ' '));
            "final:ServerError".into()
        }
        Err(e) => {
            assert!(e.to_string().len() < 512);
            format!("final:{e:?}")
        }
    }
}

// ---------------------------------------------------------------------------
// upstream_login
// ---------------------------------------------------------------------------

/// tollgate's upstream password in the login target: it must reach the
/// server only when the server asked for a cleartext password.
pub const LOGIN_PASSWORD: &[u8] = b"fuzz-upstream-Pa55word";
const ISSUED: [u8; ISSUED_KEY_LEN] = [0xab; ISSUED_KEY_LEN];
/// In a fuzzed AuthenticationSASLContinue, this stands for the client nonce
/// (random in a real login), so server-first messages can extend it.
pub const NONCE_PLACEHOLDER: &[u8] = b"@@";

/// The upstream login state machine fed arbitrary server messages.
///
/// Layout: a selector byte (bits 0-1: channel binding as in
/// [`scram_client`]; bits 2-3: the client's protocol minor version; bit 4:
/// no password configured), then the server's byte stream, framed as the
/// session frames it. In an AuthenticationSASLContinue, [`NONCE_PLACEHOLDER`]
/// is replaced by the client nonce.
pub fn upstream_login(data: &[u8]) -> Reached {
    let Some((&selector, stream)) = data.split_first() else {
        return "empty".into();
    };
    let binding = channel_binding(selector & 3);
    let minor = u16::from((selector >> 2) & 3);
    let password = (selector & 0x10 == 0).then(|| Secret::new(LOGIN_PASSWORD.to_vec()));
    let mut to_server = BytesMut::new();
    let mut login = Some(Login::start(
        "app",
        password,
        binding,
        ProtocolVersion { major: 3, minor },
        [
            ("user", "ignored"),
            ("database", "appdb"),
            ("options", "-c search_path=x"),
        ]
        .into_iter(),
        ISSUED,
        &mut to_server,
    ));
    // The StartupMessage tollgate sends: the role once, first.
    let Ok(Some((FeStartupPacket::StartupMessage { version, params }, used))) =
        parse_startup(&to_server)
    else {
        panic!("Login::start must write a valid StartupMessage")
    };
    assert_eq!(used, to_server.len());
    assert_eq!(version.minor, minor.min(ProtocolVersion::NEWEST.minor));
    assert_eq!(params.iter().next(), Some(("user", "app")));
    let startup_len = used;

    let mut to_client = BytesMut::new();
    let mut asked_cleartext = false;
    let mut reached = String::from("incomplete");
    let mut rest = stream;
    while let Some(l) = login.take() {
        let Ok(Some(frame)) = peek_frame(rest, MAX_LOGIN_MESSAGE_LEN) else {
            break;
        };
        let raw = &rest[..frame.total_len];
        rest = &rest[frame.total_len..];
        let _ = parse_error_fields(&raw[HEADER_LEN..]);
        let msg = splice_nonce(raw, &to_server);
        let parsed = parse_login_message(&msg);
        match &parsed {
            Ok(BeLoginMessage::AuthenticationSaslContinue { data }) if too_many_rounds(data) => {
                return "skipped".into();
            }
            Ok(BeLoginMessage::AuthenticationCleartextPassword) => asked_cleartext = true,
            _ => {}
        }
        let step = KEY_CACHE
            .with(|c| l.on_message(&msg, &mut to_server, &mut to_client, &mut c.borrow_mut()));
        match step {
            Ok(LoginStep::Continue(next)) => login = Some(next),
            Ok(LoginStep::Ready(ready)) => {
                assert_eq!(to_client.last(), msg.last(), "ReadyForQuery relayed last");
                if let Some(k) = ready.issued_key {
                    // The backend's process id, tollgate's secret.
                    let up = ready.upstream_key.as_ref().expect("the server's key");
                    assert_eq!(k.process_id, up.process_id);
                    assert!(ISSUED.starts_with(&k.secret_key));
                }
                assert!(ready.minor <= ProtocolVersion::NEWEST.minor);
                reached = format!("ready:{}", ready.auth_method);
            }
            Err(e) => {
                let text = e.to_string();
                reached = format!("refused:{}", text.split(':').next().unwrap_or_default());
            }
        }
    }

    // What tollgate wrote to the server: whole frontend messages, and the
    // password only when the server asked for it in the clear.
    let mut sent = &to_server[startup_len..];
    while !sent.is_empty() {
        let f = peek_frame(sent, usize::MAX)
            .unwrap()
            .expect("whole messages");
        assert_eq!(sent[0], b'p', "only password/SASL messages go up");
        sent = &sent[f.total_len..];
    }
    // (Unless the server sent those bytes itself, e.g. inside its SCRAM
    // nonce, which the client-final repeats: an echo, not a leak.)
    let echoed = contains(stream, LOGIN_PASSWORD);
    if !asked_cleartext && !echoed {
        assert!(
            !contains(&to_server, LOGIN_PASSWORD),
            "the password went to a server that did not ask for it in the clear"
        );
    }
    // What tollgate wrote to the client: whole messages; no authentication
    // request but AuthenticationOk; only tollgate's own cancel secret.
    let mut got = &to_client[..];
    while !got.is_empty() {
        let f = peek_frame(got, usize::MAX)
            .unwrap()
            .expect("whole messages");
        let body = &got[HEADER_LEN..f.total_len];
        match got[0] {
            b'R' if known_finding("auth-ok-trailing-bytes") => {
                assert_eq!(&body[..4], [0, 0, 0, 0]);
            }
            b'R' => assert_eq!(
                body,
                [0, 0, 0, 0],
                "an authentication message other than a well-formed \
                 AuthenticationOk reached the client"
            ),
            b'K' => {
                // The server's process id is relayed; its secret never is.
                assert!(ISSUED.starts_with(&body[4..]));
            }
            _ => {}
        }
        got = &got[f.total_len..];
    }
    assert!(echoed || !contains(&to_client, LOGIN_PASSWORD));
    reached
}

/// Whether to let the fuzzer go past a finding that is reported but not yet
/// fixed in src/: `TOLLGATE_FUZZ_KNOWN=name,name` (for a long fuzzing run;
/// never in the replay test, which must fail until the fix lands).
///
/// - `auth-ok-trailing-bytes`: `parse_login_message` reads an
///   AuthenticationOk with bytes after its code as AuthenticationOk, and the
///   login relays that message verbatim to the client
///   (regressions/upstream_login/auth-ok-trailing-*).
fn known_finding(name: &str) -> bool {
    static KNOWN: OnceLock<String> = OnceLock::new();
    KNOWN
        .get_or_init(|| std::env::var("TOLLGATE_FUZZ_KNOWN").unwrap_or_default())
        .split(',')
        .any(|k| k == name)
}

/// Puts the client nonce (the tail of the SASLInitialResponse in
/// `to_server`) where an AuthenticationSASLContinue has the placeholder.
fn splice_nonce<'a>(msg: &'a [u8], to_server: &[u8]) -> Cow<'a, [u8]> {
    let is_continue = msg.len() >= 9 && msg[0] == b'R' && msg[5..9] == 11i32.to_be_bytes();
    let at = to_server.windows(5).rposition(|w| w == b"n=,r=");
    let (true, Some(at)) = (is_continue, at) else {
        return Cow::Borrowed(msg);
    };
    let nonce = &to_server[at + 5..];
    if !contains(&msg[9..], NONCE_PLACEHOLDER) {
        return Cow::Borrowed(msg);
    }
    let mut body = Vec::with_capacity(msg.len() + nonce.len());
    let mut data = &msg[9..];
    while let Some(i) = find(data, NONCE_PLACEHOLDER) {
        body.extend_from_slice(&data[..i]);
        body.extend_from_slice(nonce);
        data = &data[i + NONCE_PLACEHOLDER.len()..];
    }
    body.extend_from_slice(data);
    let mut out = vec![b'R'];
    out.extend_from_slice(&((body.len() + 8) as i32).to_be_bytes());
    out.extend_from_slice(&11i32.to_be_bytes());
    out.extend_from_slice(&body);
    Cow::Owned(out)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    find(haystack, needle).is_some()
}

// ---------------------------------------------------------------------------
// token
// ---------------------------------------------------------------------------

/// The HS256 secret of the fuzzed JWT verifier.
pub const JWT_HMAC_SECRET: &[u8] = b"fuzz-hmac-secret-of-at-least-32-bytes!!";
/// The verifier's clock: 2025-06-15. Seeds expire in 2096.
pub const JWT_NOW_SECS: u64 = 1_750_000_000;
pub const JWT_AUDIENCE: &str = "tollgate";
pub const JWT_ISSUER: &str = "https://issuer.test";
/// The one opaque token in the fuzzed store: id and 32 secret bytes.
pub const STORE_TOKEN_ID: &str = "fuzzfuzz0001";
pub const STORE_TOKEN_SECRET: [u8; 32] = [0x11; 32];

/// The folder of the public keys (fuzz/keys), from either crate.
fn keys_dir() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    [manifest.join("keys"), manifest.join("fuzz").join("keys")]
        .into_iter()
        .find(|d| d.join("rs256.pub.pem").is_file())
        .expect("fuzz/keys holds the JWT test keys")
}

/// HS256 (kid "hs"), RS256 (kid "rs"), ES256 (kid "es") and an EdDSA key
/// without a kid (the fallback for unknown kids).
pub fn jwt_verifier() -> &'static JwtVerifier {
    static V: OnceLock<JwtVerifier> = OnceLock::new();
    V.get_or_init(|| {
        let pk = |kid: Option<&str>, alg: &str, file: &str| JwtPublicKeyRaw {
            kid: kid.map(str::to_owned),
            alg: Some(alg.into()),
            file: Some(file.into()),
            jwks_file: None,
        };
        let raw = JwtConfigRaw {
            issuer: Some(JWT_ISSUER.into()),
            audience: Some(JWT_AUDIENCE.into()),
            leeway: Some("30s".into()),
            max_token_len: Some(4096),
            hmac: vec![JwtHmacKeyRaw {
                kid: Some("hs".into()),
                alg: Some("HS256".into()),
                secret: Some(RawSecret::new(
                    std::str::from_utf8(JWT_HMAC_SECRET).unwrap(),
                )),
                ..JwtHmacKeyRaw::default()
            }],
            public_key: vec![
                pk(Some("rs"), "RS256", "rs256.pub.pem"),
                pk(Some("es"), "ES256", "es256.pub.pem"),
                pk(None, "EdDSA", "ed25519.pub.pem"),
            ],
            claims: Default::default(),
        };
        JwtVerifier::from_raw(raw, &keys_dir()).expect("the fuzz JWT config is valid")
    })
}

fn store() -> &'static TokenStore {
    static S: OnceLock<TokenStore> = OnceLock::new();
    S.get_or_init(|| {
        let mut s = TokenStore::default();
        s.insert(TokenRecord::new(
            STORE_TOKEN_ID.into(),
            "app".into(),
            vec!["appdb".into()],
            token::sha256(&STORE_TOKEN_SECRET),
            UNIX_EPOCH,
        ));
        s
    })
}

/// The store's token as a client presents it.
pub fn store_token() -> String {
    let mut s = format!("tg_{STORE_TOKEN_ID}_{}", hex(&STORE_TOKEN_SECRET));
    let crc = crc32(s.as_bytes());
    s.push_str(&hex(&crc.to_be_bytes()));
    s
}

/// Opaque tokens and JWTs.
///
/// Layout: a mode byte, then the rest. Even mode: the rest is a password as
/// a client sends it: `token::parse`, the store check, `looks_like_jwt` and
/// `JwtVerifier::verify`. Odd mode: the rest is `<header JSON> NUL <claims
/// JSON>`, which is base64url-encoded and HS256-signed here with the
/// verifier's secret, so the claim checks behind the signature get fuzzed.
pub fn token(data: &[u8]) -> Reached {
    let Some((&mode, rest)) = data.split_first() else {
        return "empty".into();
    };
    if mode & 1 == 0 {
        let opaque = opaque(rest);
        let jwt = jwt(rest);
        format!("{opaque}/{jwt}")
    } else {
        let (header, claims) = match rest.iter().position(|&b| b == 0) {
            Some(at) => (&rest[..at], &rest[at + 1..]),
            None => (rest, &b"{}"[..]),
        };
        let mut signed = format!(
            "{}.{}",
            base64(header, URL_SAFE, false),
            base64(claims, URL_SAFE, false)
        )
        .into_bytes();
        let mac = hmac_sha256(JWT_HMAC_SECRET, &signed);
        signed.push(b'.');
        signed.extend_from_slice(base64(&mac, URL_SAFE, false).as_bytes());
        jwt(&signed)
    }
}

fn opaque(presented: &[u8]) -> Reached {
    let who = Presenter {
        user: "app",
        database: "appdb",
        address: IpAddr::V4(Ipv4Addr::LOCALHOST),
    };
    let now = UNIX_EPOCH + Duration::from_secs(JWT_NOW_SECS);
    let verdict = store().check(presented, &who, now);
    match token::parse(presented) {
        Ok(parsed) => {
            assert_eq!(presented.len(), token::TOKEN_LEN);
            assert!(presented.starts_with(token::PREFIX.as_bytes()));
            assert!(token::is_valid_id(parsed.id.as_bytes()));
            assert_eq!(parsed.id.as_bytes(), &presented[3..15]);
            assert_eq!(parsed.secret.expose().len(), token::SECRET_BYTES);
            // The secret is the hex after the id; the checksum is CRC-32
            // of all before it (computed independently here).
            assert_eq!(
                hex(parsed.secret.expose()),
                String::from_utf8_lossy(&presented[16..80]).to_ascii_lowercase()
            );
            let crc = u32::from_str_radix(std::str::from_utf8(&presented[80..]).unwrap(), 16);
            assert_eq!(crc, Ok(crc32(&presented[..80])));
            assert_eq!(verdict.token_id.as_deref(), Some(parsed.id));
            match verdict.outcome {
                Ok(_) => {
                    assert_eq!(parsed.id, STORE_TOKEN_ID);
                    assert_eq!(parsed.secret.expose(), STORE_TOKEN_SECRET);
                    "granted".into()
                }
                Err(r) => r.as_str().into(),
            }
        }
        Err(e) => {
            assert_eq!(verdict.token_id, None);
            assert!(verdict.outcome.is_err());
            format!("{e:?}")
        }
    }
}

fn jwt(presented: &[u8]) -> Reached {
    let looks = looks_like_jwt(presented);
    if looks {
        assert!(presented.starts_with(b"eyJ"));
        assert_eq!(presented.iter().filter(|&&b| b == b'.').count(), 2);
    }
    let now = UNIX_EPOCH + Duration::from_secs(JWT_NOW_SECS);
    let verifier = jwt_verifier();
    let v = match verifier.verify(presented, now) {
        Ok(v) => v,
        Err(e) => return e.as_str().into(),
    };
    assert!(presented.len() <= verifier.max_token_len());
    assert!(!v.role.is_empty() && !v.role.contains('\0'));
    assert!(!v.databases.is_empty() && !v.cidrs.is_empty());
    assert!(v
        .databases
        .iter()
        .chain(&v.cidrs)
        .all(|s| !s.is_empty() && !s.contains('\0')));
    assert!(v.session.windows(2).all(|w| w[0] <= w[1]), "session sorted");
    for (name, value) in &v.session {
        assert!(!["user", "database", "replication"].contains(&name.as_str()));
        assert!(!name.is_empty() && !name.contains('\0') && !value.contains('\0'));
    }
    assert!(v.expires_at + verifier.leeway() > now);
    if let Some(nbf) = v.not_before {
        assert!(nbf <= now + verifier.leeway());
    }
    assert_eq!(v.signature_hash, token::sha256(presented));
    assert!(v.log_id.starts_with("jwt:"));
    assert!(!contains(v.log_id.as_bytes(), presented));
    let who = Presenter {
        user: "app",
        database: "appdb",
        address: IpAddr::V4(Ipv4Addr::LOCALHOST),
    };
    match store().check_jwt(&v, &who, now) {
        Ok(grant) => {
            assert_eq!(v.role, "app");
            assert!(!grant.replication);
            "jwt_granted".into()
        }
        Err(r) => format!("jwt_verified:{}", r.as_str()),
    }
}

// ---------------------------------------------------------------------------
// framer
// ---------------------------------------------------------------------------

/// What a visitor hears, with the pieces of one payload merged (so that
/// chunking cannot show), and the stream offset of every message end.
#[derive(Debug, Default, PartialEq, Eq)]
struct Heard {
    events: Vec<(char, u8, Vec<u8>)>,
    ends: Vec<usize>,
    /// Bytes heard so far: every byte is a header's or a payload's.
    offset: usize,
}

impl FrameVisitor for Heard {
    fn start(&mut self, tag: u8) {
        self.events.push(('s', tag, Vec::new()));
        self.offset += HEADER_LEN;
    }
    fn payload(&mut self, tag: u8, bytes: &[u8]) {
        match self.events.last_mut() {
            Some(('p', t, b)) if *t == tag => b.extend_from_slice(bytes),
            _ => self.events.push(('p', tag, bytes.to_vec())),
        }
        self.offset += bytes.len();
    }
    fn end(&mut self, tag: u8, last_byte: u8) {
        self.events.push(('e', tag, vec![last_byte]));
        self.ends.push(self.offset);
    }
}

/// Chunk sizes from a seed: `1..=limit + 1`, xorshift-random.
fn chunk_sizes(limit: u8, seed: u8) -> impl Iterator<Item = usize> {
    let limit = u64::from(limit) + 1;
    let mut state = 0x9e37_79b9_7f4a_7c15u64 ^ u64::from(seed);
    std::iter::repeat_with(move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        1 + (state % limit) as usize
    })
}

/// The message framer over arbitrary bytes: one chunk and arbitrary chunks
/// must give the same messages (and the same error at the same place);
/// `peek_frame` must agree; `bytes_to_boundary` must land on a message end.
///
/// Layout: chunk-size limit byte, seed byte, then the stream.
pub fn framer(data: &[u8]) -> Reached {
    let [limit, seed, stream @ ..] = data else {
        return "empty".into();
    };
    const COUNTED: &[u8] = b"QZ";

    // The whole stream at once.
    let mut whole = Heard::default();
    let whole_result = Framer::counting_any(COUNTED).scan_with(stream, &mut whole);
    let mut f = Framer::counting_any(COUNTED);
    let whole_scan = f.scan(stream);
    assert_eq!(whole_scan.clone().err(), whole_result.clone().err());
    if let Ok(scan) = whole_scan {
        assert_eq!(scan.completed as usize, whole.ends.len());
        let tagged = whole
            .events
            .iter()
            .filter(|e| e.0 == 's' && COUNTED.contains(&e.1))
            .count();
        assert_eq!(scan.tagged as usize, tagged);
        let last_tag = whole.events.iter().rev().find(|e| e.0 == 'e').map(|e| e.1);
        assert_eq!(scan.last_completed_tag, last_tag);
        assert_eq!(f.last_tag(), last_tag.unwrap_or(0));
        assert_eq!(
            f.at_boundary(),
            stream.is_empty() || whole.ends.last() == Some(&stream.len())
        );
    }

    // peek_frame finds the same messages, and the same bad length.
    let mut at = 0;
    let mut peeked = Vec::new();
    loop {
        match peek_frame(&stream[at..], usize::MAX) {
            Ok(Some(frame)) => {
                at += frame.total_len;
                peeked.push(at);
            }
            Ok(None) => {
                assert!(whole_result.is_ok());
                break;
            }
            Err(e) => {
                assert_eq!(Err(e), whole_result);
                break;
            }
        }
    }
    assert_eq!(peeked, whole.ends, "peek_frame and the framer disagree");

    // In chunks: the same events, the same error, and bytes_to_boundary
    // agrees with the message ends at every split.
    let mut split = Heard::default();
    let mut framer = Framer::counting_any(COUNTED);
    let mut pos = 0;
    let mut result = Ok(());
    let mut completed = 0usize;
    for size in chunk_sizes(*limit, *seed) {
        if pos >= stream.len() {
            break;
        }
        let expected = if framer.at_boundary() {
            Some(0)
        } else {
            whole.ends.iter().find(|&&e| e > pos).map(|e| e - pos)
        };
        assert_eq!(
            framer.bytes_to_boundary(&stream[pos..]),
            expected,
            "at {pos}"
        );
        let chunk = &stream[pos..(pos + size).min(stream.len())];
        if let Ok(scan) = framer.clone().scan(chunk) {
            completed += scan.completed as usize;
        }
        result = framer.scan_with(chunk, &mut split);
        pos += chunk.len();
        if result.is_err() {
            break;
        }
    }
    assert_eq!(result, whole_result, "chunking changed the error");
    assert_eq!(split, whole, "chunking changed the messages");
    match whole_result {
        Ok(()) => {
            assert_eq!(completed, whole.ends.len());
            format!("messages:{}", whole.ends.len().min(3))
        }
        Err(e) => format!("{e:?}")
            .split(' ')
            .next()
            .unwrap_or_default()
            .into(),
    }
}

// ---------------------------------------------------------------------------
// handshake
// ---------------------------------------------------------------------------

/// How a fuzzed start-up ended.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    NeedMore,
    Refused {
        code: &'static str,
        kind: &'static str,
        message: String,
    },
    Cancel {
        process_id: u32,
        secret_key: Vec<u8>,
    },
    Credentials {
        user: String,
        database: String,
        params: Vec<(String, String)>,
        version: ProtocolVersion,
        token: Vec<u8>,
        /// Everything after the PasswordMessage, kept for the server.
        leftover: Vec<u8>,
    },
}

/// What the client was sent, and how it ended.
#[derive(Debug, PartialEq, Eq)]
struct Run {
    to_client: Vec<u8>,
    outcome: Outcome,
    tls_starts: u32,
}

/// AuthenticationCleartextPassword: the only message the handshake builds
/// besides the one-byte 'S'/'N' answers.
const ASK_PASSWORD: &[u8] = b"R\0\0\0\x08\0\0\0\x03";

fn drive(policy: StartupPolicy, stream: &[u8], mut chunks: impl Iterator<Item = usize>) -> Run {
    let mut phase = Phase::Startup(AwaitStartup::with_policy(policy));
    let mut input = BytesMut::new();
    let mut output = BytesMut::new();
    let mut to_client = Vec::new();
    let mut tls_starts = 0;
    let mut pos = 0;
    let outcome = loop {
        if pos >= stream.len() {
            break Outcome::NeedMore;
        }
        let size = chunks.next().unwrap_or(stream.len());
        let end = (pos + size).min(stream.len());
        input.extend_from_slice(&stream[pos..end]);
        pos = end;
        let progress = hs::advance(phase, &mut input, &mut output);
        to_client.extend_from_slice(&output.split());
        match progress {
            Ok(Progress::NeedMore(next)) => phase = next,
            Ok(Progress::StartTls { next, .. }) => {
                // The bytes read so far belong to the TLS handshake (a
                // direct ClientHello); what follows is the decrypted stream.
                tls_starts += 1;
                input.clear();
                phase = next;
            }
            Ok(Progress::Cancel {
                process_id,
                secret_key,
            }) => {
                break Outcome::Cancel {
                    process_id,
                    secret_key,
                }
            }
            Ok(Progress::Credentials { startup, token }) => {
                let mut leftover = input.to_vec();
                leftover.extend_from_slice(&stream[pos..]);
                break Outcome::Credentials {
                    user: startup.user,
                    database: startup.database,
                    params: startup
                        .params
                        .iter()
                        .map(|(k, v)| (k.to_owned(), v.to_owned()))
                        .collect(),
                    version: startup.version,
                    token: token.expose().to_vec(),
                    leftover,
                };
            }
            Err(e) => {
                check_client_error(&e);
                break Outcome::Refused {
                    code: e.code.code(),
                    kind: e.kind,
                    message: e.message,
                };
            }
        }
    };
    Run {
        to_client,
        outcome,
        tls_starts,
    }
}

/// The pre-auth state machine fed arbitrary chunks.
///
/// Layout: a policy byte (bit 0: TLS available; bit 1: plaintext allowed;
/// bits 2-3: password cap 512, 64, 4102 or 65541 bytes), a chunk-size limit
/// byte, a seed byte, then the client's stream.
///
/// Checked: the client is sent only tollgate's own bytes ('S', 'N',
/// AuthenticationCleartextPassword) and never anything of its own; a token
/// comes only from a PasswordMessage that ends right where the leftover
/// begins; without TLS (whose start depends on what one read holds, by
/// design) the outcome is the same however the stream is chunked.
pub fn handshake(data: &[u8]) -> Reached {
    let [policy, limit, seed, stream @ ..] = data else {
        return "empty".into();
    };
    let policy = StartupPolicy {
        tls_available: policy & 1 != 0,
        plaintext_allowed: policy & 2 != 0,
        max_password_message: [512, 64, 4102, MAX_PASSWORD_FRAME][usize::from(policy >> 2 & 3)],
    };
    let whole = drive(policy, stream, std::iter::empty());
    let chunked = drive(policy, stream, chunk_sizes(*limit, *seed));
    for run in [&whole, &chunked] {
        check_run(&policy, stream, run);
    }
    if !policy.tls_available {
        assert_eq!(whole, chunked, "chunking changed the start-up");
    }
    match chunked.outcome {
        Outcome::NeedMore => "need_more".into(),
        Outcome::Refused { kind, .. } => kind.into(),
        Outcome::Cancel { .. } => "cancel".into(),
        Outcome::Credentials { .. } => "credentials".into(),
    }
}

fn check_run(policy: &StartupPolicy, stream: &[u8], run: &Run) {
    // Only tollgate's own bytes go to the client.
    let mut sent = &run.to_client[..];
    let mut asked = 0;
    while !sent.is_empty() {
        if let Some(rest) = sent.strip_prefix(ASK_PASSWORD) {
            asked += 1;
            sent = rest;
        } else if sent[0] == b'S' || sent[0] == b'N' {
            sent = &sent[1..];
        } else {
            panic!("the client was sent {:?}", run.to_client);
        }
    }
    assert!(asked <= 1, "the password was asked for twice");
    if policy.tls_available {
        assert!(run.tls_starts <= 1, "TLS started twice");
    } else {
        assert_eq!(run.tls_starts, 0);
        assert!(!run.to_client.contains(&b'S'));
    }
    match &run.outcome {
        Outcome::Credentials {
            user,
            token,
            leftover,
            params,
            ..
        } => {
            assert_eq!(asked, 1, "a token before the password was asked for");
            assert!(!user.is_empty());
            assert!(params.iter().any(|(k, v)| k == "user" && v == user));
            // The PasswordMessage sits right before the leftover.
            let msg_len = token.len() + 6;
            assert!(msg_len <= policy.max_password_message);
            let end = stream.len() - leftover.len();
            assert_eq!(&stream[end..], &leftover[..]);
            let msg = &stream[end - msg_len..end];
            assert_eq!(msg[0], TAG_PASSWORD_MESSAGE);
            assert_eq!(&msg[5..msg_len - 1], &token[..]);
            if !policy.plaintext_allowed {
                assert_eq!(run.tls_starts, 1, "a token in the clear");
            }
        }
        Outcome::Cancel { secret_key, .. } => {
            assert!((4..=MAX_CANCEL_KEY_LENGTH).contains(&secret_key.len()));
            assert_eq!(asked, 0);
        }
        Outcome::Refused { message, .. } => assert!(message.len() < 512),
        Outcome::NeedMore => {}
    }
}

// ---------------------------------------------------------------------------
// proxy
// ---------------------------------------------------------------------------

/// `protocol::proxy_header::parse` (PROXY protocol v1 and v2, what a balancer sends
/// before the client's first byte) on arbitrary bytes: `detect` agrees with
/// it; a verdict depends neither on bytes after the header nor on where the
/// header is cut (every shorter prefix is "need more" or the same refusal);
/// "need more" never asks for more than the cap; what is consumed is exactly
/// the header; an accepted header re-encodes (v1 and v2) to bytes that parse
/// back to it, byte for byte where the encoding is canonical.
///
/// Layout: the bytes.
pub fn proxy_header(data: &[u8]) -> Reached {
    let result = parse_proxy(data);
    match detect_proxy(data) {
        None => assert_eq!(result, Ok(None), "undecided signature"),
        Some(false) => assert_eq!(result, Err(ProxyError::BadSignature)),
        Some(true) => assert_ne!(result, Err(ProxyError::BadSignature)),
    }
    // What comes after (here an SSLRequest) belongs to the client.
    if !matches!(result, Ok(None)) {
        let mut longer = data.to_vec();
        longer.extend_from_slice(b"\0\0\0\x08\x04\xd2\x16\x2f\r\n");
        assert_eq!(parse_proxy(&longer), result, "trailing bytes changed it");
    }
    // Cut anywhere before what decided it: "need more", or the same refusal
    // (an accepted header's prefixes are all "need more").
    let v1 = data.first() == Some(&b'P');
    let decided_at = match result {
        Ok(Some((_, used))) => used,
        // A refusal is decided within 107 bytes (v1) or 16 plus the cap (v2).
        _ => data.len().min(if v1 {
            V1_MAX_LEN + 1
        } else {
            MAX_PROXY_HEADER_LEN + 1
        }),
    };
    for n in 0..decided_at {
        match parse_proxy(&data[..n]) {
            Ok(None) => {}
            Err(e) if result == Err(e) => {}
            other => panic!("prefix {n}: {other:?}, whole input: {result:?}"),
        }
    }
    match result {
        Ok(None) => {
            // Never waiting for more than a whole header could hold.
            assert!(data.len() < if v1 { V1_MAX_LEN } else { MAX_PROXY_HEADER_LEN });
            "incomplete".into()
        }
        Ok(Some((header, used))) => {
            assert!(used <= data.len() && used <= MAX_PROXY_HEADER_LEN);
            let bytes = &data[..used];
            if v1 {
                // Through the first CRLF, within 107 bytes.
                assert!(used <= V1_MAX_LEN);
                assert!(bytes.ends_with(b"\r\n"));
                assert!(!bytes[..used - 2].windows(2).any(|w| w == b"\r\n"));
            } else {
                assert_eq!(
                    used,
                    16 + usize::from(u16::from_be_bytes([data[14], data[15]]))
                );
            }
            let version = if v1 { "v1" } else { "v2" };
            match header {
                ProxyHeader::Local => {
                    if v1 {
                        assert!(bytes.starts_with(b"PROXY UNKNOWN"));
                    } else {
                        assert!(data[12] == 0x20 || data[13] == 0x00);
                    }
                    let again = encode_v2(&header);
                    assert_eq!(parse_proxy(&again), Ok(Some((header, 16))));
                    format!("{version}_local")
                }
                ProxyHeader::Proxied {
                    source,
                    destination,
                } => {
                    // One family, as announced.
                    let ipv4 = source.is_ipv4();
                    assert_eq!(destination.is_ipv4(), ipv4);
                    if v1 {
                        assert_eq!(&bytes[6..10], if ipv4 { b"TCP4" } else { b"TCP6" });
                    } else {
                        assert_eq!(data[12], 0x21);
                        assert_eq!(data[13], if ipv4 { 0x11 } else { 0x21 });
                    }
                    let again_v1 = encode_v1(source, destination);
                    assert!(again_v1.len() <= V1_MAX_LEN);
                    assert_eq!(parse_proxy(&again_v1), Ok(Some((header, again_v1.len()))));
                    let again_v2 = encode_v2(&header);
                    assert_eq!(parse_proxy(&again_v2), Ok(Some((header, again_v2.len()))));
                    // Canonical encodings come back byte for byte: IPv4 text
                    // has one spelling; v2 without TLVs has one layout.
                    if v1 && ipv4 {
                        assert_eq!(again_v1, bytes, "v1 re-encoding differs");
                    }
                    let tlvs = !v1 && used > again_v2.len();
                    if !v1 && !tlvs {
                        assert_eq!(again_v2, bytes, "v2 re-encoding differs");
                    }
                    format!(
                        "{version}_proxied{}{}",
                        if ipv4 { 4 } else { 6 },
                        if tlvs { "+tlv" } else { "" }
                    )
                }
            }
        }
        Err(e) => {
            let text = e.to_string();
            assert!(text.len() < 200, "long error text: {text}");
            e.as_str().into()
        }
    }
}

// ---------------------------------------------------------------------------
// helpers (std only)
// ---------------------------------------------------------------------------

const STANDARD: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
const URL_SAFE: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

fn base64(bytes: &[u8], alphabet: &[u8; 64], pad: bool) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..=chunk.len() {
            out.push(alphabet[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
        if pad {
            for _ in chunk.len()..3 {
                out.push('=');
            }
        }
    }
    out
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// CRC-32 (IEEE), bit by bit: independent of the library's crc32fast.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// HMAC-SHA256 (RFC 2104) over tollgate's public SHA-256, for keys up to
/// 64 bytes.
fn hmac_sha256(key: &[u8], msg: &[u8]) -> [u8; 32] {
    assert!(key.len() <= 64);
    let mut k = [0u8; 64];
    k[..key.len()].copy_from_slice(key);
    let mut inner: Vec<u8> = k.iter().map(|b| b ^ 0x36).collect();
    inner.extend_from_slice(msg);
    let mut outer: Vec<u8> = k.iter().map(|b| b ^ 0x5c).collect();
    outer.extend_from_slice(&token::sha256(&inner));
    token::sha256(&outer)
}

/// How far an input got, for the replay test's checks that the seeds reach
/// what they were made for (e.g. "startup_message", "final_accepted",
/// "ready:trust", "jwt_granted", an error's kind).
pub type Reached = String;

/// A target body.
pub type Target = fn(&[u8]) -> Reached;

/// The fuzz targets by name, for the replay test.
pub const TARGETS: &[(&str, Target)] = &[
    ("startup", startup),
    ("password", password),
    ("scram_client", scram_client),
    ("upstream_login", upstream_login),
    ("token", token),
    ("framer", framer),
    ("handshake", handshake),
    ("proxy_header", proxy_header),
];
