//! Property tests (proptest) of the codec and the pre-auth path:
//!
//! - every encoder/decoder pair round-trips: StartupMessage, the backend
//!   messages tollgate builds (authentication requests, ParameterStatus,
//!   BackendKeyData, ReadyForQuery, NegotiateProtocolVersion,
//!   ErrorResponse and `ClientError::encode`) against `parse_login_message`
//!   and `parse_error_fields`, PasswordMessage, and opaque tokens;
//! - a valid stream gives the same messages however it is split into
//!   chunks: the relay's `Framer`, `peek_frame`, the start-up parser fed
//!   incrementally, and the whole handshake state machine;
//! - no byte of the client's reaches the upstream before authentication:
//!   the handshake machine sends the client only its own bytes, and the real
//!   binary, in front of a fake upstream that records every connection,
//!   never connects to it for arbitrary pre-auth garbage or bad tokens
//!   (while a good token does reach it, with a StartupMessage of tollgate's).
//!
//! Case counts are kept small so that the file runs in seconds in release.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::BytesMut;
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use tollgate::auth::token;
use tollgate::error::ClientError;
use tollgate::handshake::{self, AwaitStartup, Phase, Progress};
use tollgate::protocol::backend::{self, parse_error_fields, parse_login_message, BeLoginMessage};
use tollgate::protocol::frame::{peek_frame, FrameVisitor, Framer, HEADER_LEN};
use tollgate::protocol::frontend::parse_password_message;
use tollgate::protocol::sqlstate;
use tollgate::protocol::startup::{
    encode_startup_message, parse_startup, FeStartupPacket, ProtocolVersion, StartupError,
    CANCEL_REQUEST_CODE, GSSENC_REQUEST_CODE, MAX_STARTUP_PACKET_LENGTH, SSL_REQUEST_CODE,
};

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// A parameter name as a client may send it: non-empty, no NUL.
fn param_name() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("user".to_owned()),
        Just("database".to_owned()),
        Just("options".to_owned()),
        Just("application_name".to_owned()),
        "_pq_\\.[a-z]{1,8}",
        "[^\\x00]{1,16}",
    ]
}

/// Any text without NUL (start-up values, messages).
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[^\\x00]{0,40}",
        "(-c [a-z_]{1,10}=[^\\x00 ]{0,10} ?){0,5}",
        Just("-c=".to_owned()),
    ]
}

/// Unique names in the order given, as a StartupMessage carries them.
fn params() -> impl Strategy<Value = Vec<(String, String)>> {
    vec((param_name(), text()), 0..12).prop_map(|pairs| {
        let mut seen = std::collections::HashSet::new();
        pairs
            .into_iter()
            .filter(|(k, _)| seen.insert(k.clone()))
            .collect()
    })
}

fn startup_bytes(minor: u16, params: &[(String, String)]) -> BytesMut {
    let mut b = BytesMut::new();
    encode_startup_message(
        &mut b,
        ProtocolVersion { major: 3, minor },
        params.iter().map(|(k, v)| (k.as_str(), v.as_str())),
    );
    b
}

fn request(code: u32) -> Vec<u8> {
    let mut v = 8i32.to_be_bytes().to_vec();
    v.extend_from_slice(&code.to_be_bytes());
    v
}

fn cancel_request(process_id: u32, key: &[u8]) -> Vec<u8> {
    let mut v = ((12 + key.len()) as i32).to_be_bytes().to_vec();
    v.extend_from_slice(&CANCEL_REQUEST_CODE.to_be_bytes());
    v.extend_from_slice(&process_id.to_be_bytes());
    v.extend_from_slice(key);
    v
}

fn message(tag: u8, payload: &[u8]) -> Vec<u8> {
    let mut v = vec![tag];
    v.extend_from_slice(&((payload.len() + 4) as i32).to_be_bytes());
    v.extend_from_slice(payload);
    v
}

/// Split points for `len` bytes: sorted, deduplicated, inside the buffer.
fn splits(len: usize, cuts: &[usize]) -> Vec<usize> {
    let mut at: Vec<usize> = cuts.iter().map(|c| c % (len + 1)).collect();
    at.push(0);
    at.push(len);
    at.sort_unstable();
    at.dedup();
    at
}

fn pieces<'a>(bytes: &'a [u8], cuts: &[usize]) -> Vec<&'a [u8]> {
    splits(bytes.len(), cuts)
        .windows(2)
        .map(|w| &bytes[w[0]..w[1]])
        .collect()
}

// ---------------------------------------------------------------------------
// Round trips
// ---------------------------------------------------------------------------

proptest! {
    #![proptest_config(config(512))]

    /// encode_startup_message → parse_startup gives back the version and the
    /// parameters in order, and uses every byte; past 10000 bytes the
    /// length alone refuses it.
    #[test]
    fn startup_message_round_trips(minor in any::<u16>(), params in params(), pad in 0usize..12_000) {
        let mut params = params;
        if pad > 9_000 {
            params.push(("padding".into(), "x".repeat(pad)));
        }
        let b = startup_bytes(minor, &params);
        match parse_startup(&b) {
            Ok(Some((FeStartupPacket::StartupMessage { version, params: got }, used))) => {
                prop_assert!(b.len() <= MAX_STARTUP_PACKET_LENGTH);
                prop_assert_eq!(used, b.len());
                prop_assert_eq!(version, ProtocolVersion { major: 3, minor });
                let got: Vec<(String, String)> =
                    got.iter().map(|(k, v)| (k.to_owned(), v.to_owned())).collect();
                prop_assert_eq!(got, params);
            }
            Err(StartupError::InvalidLength(n)) => {
                prop_assert!(b.len() > MAX_STARTUP_PACKET_LENGTH);
                prop_assert_eq!(n, b.len() as i64);
            }
            other => prop_assert!(false, "{:?}", other),
        }
    }

    /// CancelRequest, SSLRequest and GSSENCRequest as libpq builds them.
    #[test]
    fn requests_round_trip(process_id in any::<u32>(), key in vec(any::<u8>(), 4..=256)) {
        let b = cancel_request(process_id, &key);
        prop_assert_eq!(
            parse_startup(&b),
            Ok(Some((FeStartupPacket::CancelRequest { process_id, secret_key: key }, b.len())))
        );
        prop_assert_eq!(parse_startup(&request(SSL_REQUEST_CODE)), Ok(Some((FeStartupPacket::SslRequest, 8))));
        prop_assert_eq!(parse_startup(&request(GSSENC_REQUEST_CODE)), Ok(Some((FeStartupPacket::GssEncRequest, 8))));
    }

    /// What tollgate builds for a client or reads from a server: each
    /// builder's bytes frame exactly and parse back to what was built.
    #[test]
    fn backend_messages_round_trip(
        process_id in any::<u32>(),
        key in vec(any::<u8>(), 1..=256),
        status in any::<u8>(),
        name in "[^\\x00]{0,20}",
        value in "[^\\x00]{0,40}",
        minor in 0u32..0xffff,
        options in vec("_pq_\\.[a-z]{1,8}", 0..5),
    ) {
        let mut b = BytesMut::new();
        backend::authentication_ok(&mut b);
        backend::authentication_cleartext_password(&mut b);
        backend::backend_key_data(&mut b, process_id, &key);
        backend::ready_for_query(&mut b, status);
        backend::parameter_status(&mut b, &name, &value);
        backend::negotiate_protocol_version(&mut b, minor, options.iter().map(String::as_str));
        let mut rest = &b[..];
        let mut got = Vec::new();
        while let Some(f) = peek_frame(rest, 1 << 20).unwrap() {
            got.push((rest[0], rest[HEADER_LEN..f.total_len].to_vec(), parse_login_message(&rest[..f.total_len])));
            rest = &rest[f.total_len..];
        }
        prop_assert!(rest.is_empty());
        prop_assert_eq!(got.len(), 6);
        prop_assert_eq!(&got[0].2, &Ok(BeLoginMessage::AuthenticationOk));
        prop_assert_eq!(&got[1].2, &Ok(BeLoginMessage::AuthenticationCleartextPassword));
        prop_assert_eq!(&got[2].2, &Ok(BeLoginMessage::BackendKeyData { process_id, secret_key: &key }));
        prop_assert_eq!(&got[3].2, &Ok(BeLoginMessage::ReadyForQuery { status }));
        prop_assert_eq!(&got[4].2, &Ok(BeLoginMessage::ParameterStatus));
        prop_assert_eq!(&got[4].1, &[name.as_bytes(), b"\0", value.as_bytes(), b"\0"].concat());
        prop_assert_eq!(
            &got[5].2,
            &Ok(BeLoginMessage::NegotiateProtocolVersion {
                newest_minor: minor as u16,
                unrecognized: options.len() as u32,
            })
        );
        let listed: Vec<u8> = options.iter().flat_map(|o| [o.as_bytes(), b"\0"].concat()).collect();
        prop_assert_eq!(&got[5].1[8..], &listed[..]);
    }

    /// ErrorResponse and ClientError::encode against parse_login_message and
    /// parse_error_fields: a NUL in the text cannot split a field.
    #[test]
    fn error_response_round_trips(
        fatal in any::<bool>(),
        code in prop::sample::select(vec![
            sqlstate::PROTOCOL_VIOLATION,
            sqlstate::INVALID_PASSWORD,
            sqlstate::INVALID_AUTHORIZATION_SPECIFICATION,
            sqlstate::TOO_MANY_CONNECTIONS,
            sqlstate::FEATURE_NOT_SUPPORTED,
        ]),
        message in any::<String>(),
        hint in proptest::option::of(Just("a hint")),
    ) {
        let severity = if fatal { backend::Severity::Fatal } else { backend::Severity::Error };
        let mut b = BytesMut::new();
        backend::error_response(&mut b, severity, code, &message, hint);
        let f = peek_frame(&b, usize::MAX).unwrap().unwrap();
        prop_assert_eq!(f.total_len, b.len());
        let expected = message.replace('\0', "?");
        let Ok(BeLoginMessage::ErrorResponse(e)) = parse_login_message(&b) else {
            return Err(TestCaseError::fail("not an ErrorResponse"));
        };
        prop_assert_eq!(e.severity, if fatal { "FATAL" } else { "ERROR" });
        prop_assert_eq!(e.code, code.code());
        prop_assert_eq!(e.message, expected.as_str());
        prop_assert_eq!(parse_error_fields(&b[HEADER_LEN..]), e);

        let mut c = BytesMut::new();
        let mut ce = ClientError::new(code, "prop", message.clone());
        if let Some(h) = hint {
            ce = ce.with_hint(h);
        }
        ce.encode(&mut c);
        let Ok(BeLoginMessage::ErrorResponse(e)) = parse_login_message(&c) else {
            return Err(TestCaseError::fail("ClientError is not an ErrorResponse"));
        };
        prop_assert_eq!((e.severity, e.code, e.message), ("FATAL", code.code(), expected.as_str()));
    }

    /// postgres-protocol's PasswordMessage against tollgate's parser.
    #[test]
    fn password_message_round_trips(password in vec(1u8..=255, 0..600), trailing in vec(any::<u8>(), 0..20)) {
        let mut b = BytesMut::new();
        postgres_protocol::message::frontend::password_message(&password, &mut b).unwrap();
        let f = peek_frame(&b, usize::MAX).unwrap().unwrap();
        prop_assert_eq!(f.total_len, b.len());
        b.extend_from_slice(&trailing);
        prop_assert_eq!(parse_password_message(&b[..f.total_len]), Ok(&password[..]));
    }

    /// A token id given to generate_with_id comes back from parse, and the
    /// secret parse returns hashes to what the store keeps.
    #[test]
    fn token_generate_parse_round_trips(id in "[a-z0-9]{12}", i in 0..token::TOKEN_LEN, bit in 0u32..7) {
        let t = token::generate_with_id(&id, &ring::rand::SystemRandom::new());
        let parsed = token::parse(t.token.expose()).unwrap();
        prop_assert_eq!(parsed.id, id.as_str());
        prop_assert_eq!(token::sha256(parsed.secret.expose()), t.secret_sha256);
        // Any one-character change is refused (the checksum covers it all).
        let mut bad = t.token.expose().to_vec();
        bad[i] ^= 1 << bit;
        match token::parse(&bad) {
            Err(_) => {}
            // Hex is read case-insensitively: an upper-case digit in the
            // checksum is the same token, and nothing else gets through.
            Ok(p) => {
                prop_assert!(bad.eq_ignore_ascii_case(t.token.expose()), "{:?}", bad);
                prop_assert_eq!(token::sha256(p.secret.expose()), t.secret_sha256);
            }
        }
    }
}

#[test]
fn generated_tokens_parse() {
    for _ in 0..64 {
        let t = token::generate();
        let parsed = token::parse(t.token.expose()).unwrap();
        assert_eq!(parsed.id, t.id);
        assert_eq!(token::sha256(parsed.secret.expose()), t.secret_sha256);
        assert_eq!(t.token.expose().len(), token::TOKEN_LEN);
    }
}

// ---------------------------------------------------------------------------
// Chunking invariance
// ---------------------------------------------------------------------------

/// What a visitor hears: merged payloads, so chunking cannot show.
#[derive(Debug, Default, PartialEq, Eq)]
struct Heard(Vec<(char, u8, Vec<u8>)>);

impl FrameVisitor for Heard {
    fn start(&mut self, tag: u8) {
        self.0.push(('s', tag, Vec::new()));
    }
    fn payload(&mut self, tag: u8, bytes: &[u8]) {
        match self.0.last_mut() {
            Some(('p', t, b)) if *t == tag => b.extend_from_slice(bytes),
            _ => self.0.push(('p', tag, bytes.to_vec())),
        }
    }
    fn end(&mut self, tag: u8, last_byte: u8) {
        self.0.push(('e', tag, vec![last_byte]));
    }
}

fn messages() -> impl Strategy<Value = Vec<(u8, Vec<u8>)>> {
    vec((any::<u8>(), vec(any::<u8>(), 0..300)), 0..30)
}

proptest! {
    #![proptest_config(config(256))]

    /// The relay's framer hears the same messages whatever the chunking,
    /// and they are exactly the messages that were written.
    #[test]
    fn framer_is_chunking_invariant(msgs in messages(), cuts in vec(any::<usize>(), 0..40)) {
        let stream: Vec<u8> = msgs.iter().flat_map(|(t, p)| message(*t, p)).collect();
        let mut expected = Heard::default();
        for (t, p) in &msgs {
            expected.0.push(('s', *t, Vec::new()));
            if !p.is_empty() {
                expected.0.push(('p', *t, p.clone()));
            }
            let last = p.last().copied().unwrap_or(4);
            expected.0.push(('e', *t, vec![last]));
        }
        let mut heard = Heard::default();
        let mut framer = Framer::counting(b'Z');
        let mut completed = 0;
        let mut tagged = 0;
        for piece in pieces(&stream, &cuts) {
            // scan (the counts) and scan_with (the events) from one state.
            let scan = framer.clone().scan(piece).unwrap();
            completed += scan.completed;
            tagged += scan.tagged;
            framer.scan_with(piece, &mut heard).unwrap();
        }
        prop_assert_eq!(heard, expected);
        prop_assert!(framer.at_boundary());
        prop_assert_eq!(completed as usize, msgs.len());
        prop_assert_eq!(tagged as usize, msgs.iter().filter(|(t, _)| *t == b'Z').count());
        // peek_frame, as the start-up reads messages whole, agrees.
        let mut rest = &stream[..];
        for (t, p) in &msgs {
            let f = peek_frame(rest, usize::MAX).unwrap().unwrap();
            prop_assert_eq!((f.tag, &rest[f.body()]), (*t, &p[..]));
            rest = &rest[f.total_len..];
        }
        prop_assert_eq!(peek_frame(rest, usize::MAX), Ok(None));
    }

    /// Start-up packets fed to parse_startup piece by piece, as the session
    /// reads them, come out the same as from one buffer.
    #[test]
    fn startup_parser_is_chunking_invariant(
        packets in vec(prop_oneof![
            Just(request(SSL_REQUEST_CODE)),
            Just(request(GSSENC_REQUEST_CODE)),
            (any::<u32>(), vec(any::<u8>(), 4..=256)).prop_map(|(p, k)| cancel_request(p, &k)),
            (0u16..4, params()).prop_map(|(m, p)| startup_bytes(m, &p).to_vec()),
        ], 1..6),
        cuts in vec(any::<usize>(), 0..30),
    ) {
        let stream: Vec<u8> = packets.concat();
        let whole = parse_all(&[&stream[..]]);
        prop_assert_eq!(whole.len(), packets.len());
        prop_assert_eq!(parse_all(&pieces(&stream, &cuts)), whole);
    }
}

/// Parses start-up packets from pieces arriving one by one.
fn parse_all(pieces: &[&[u8]]) -> Vec<FeStartupPacket> {
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    for piece in pieces {
        buf.extend_from_slice(piece);
        while let Some((p, used)) = parse_startup(&buf).unwrap() {
            out.push(p);
            let _ = buf.split_to(used);
        }
    }
    assert!(buf.is_empty());
    out
}

/// How a start-up ended, for comparisons.
#[derive(Debug, PartialEq, Eq)]
enum Ended {
    Credentials {
        params: Vec<(String, String)>,
        token: Vec<u8>,
        leftover: Vec<u8>,
    },
    Refused(&'static str),
    NeedMore,
}

/// Runs the handshake (TLS not configured) over `pieces`; returns what the
/// client was sent and how it ended.
fn run_handshake(pieces: &[&[u8]]) -> (Vec<u8>, Ended) {
    let mut phase = Phase::Startup(AwaitStartup::new());
    let mut input = BytesMut::new();
    let mut output = BytesMut::new();
    let mut sent = Vec::new();
    for (i, piece) in pieces.iter().enumerate() {
        input.extend_from_slice(piece);
        let progress = handshake::advance(phase, &mut input, &mut output);
        sent.extend_from_slice(&output.split());
        match progress {
            Ok(Progress::NeedMore(p)) => phase = p,
            Ok(Progress::Credentials { startup, token }) => {
                let mut leftover = input.to_vec();
                leftover.extend(pieces[i + 1..].concat());
                let params = startup
                    .params
                    .iter()
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
                    .collect();
                return (
                    sent,
                    Ended::Credentials {
                        params,
                        token: token.expose().to_vec(),
                        leftover,
                    },
                );
            }
            Ok(other) => panic!("unexpected {other:?}"),
            Err(e) => return (sent, Ended::Refused(e.kind)),
        }
    }
    (sent, Ended::NeedMore)
}

const ASK_PASSWORD: &[u8] = b"R\0\0\0\x08\0\0\0\x03";

proptest! {
    #![proptest_config(config(256))]

    /// A whole client start-up (optional refused SSL/GSS requests, the
    /// StartupMessage, the PasswordMessage, then the first queries) gives
    /// the same credentials, the same answers and the same leftover bytes
    /// however the client's writes are split.
    #[test]
    fn handshake_is_chunking_invariant(
        requests in prop::sample::select(vec![
            vec![],
            vec![SSL_REQUEST_CODE],
            vec![GSSENC_REQUEST_CODE],
            vec![SSL_REQUEST_CODE, GSSENC_REQUEST_CODE],
            vec![GSSENC_REQUEST_CODE, SSL_REQUEST_CODE],
        ]),
        params in params(),
        user in "[a-z]{1,10}",
        password in vec(1u8..=255, 0..200),
        after in vec(any::<u8>(), 0..100),
        cuts in vec(any::<usize>(), 0..30),
    ) {
        let mut params: Vec<(String, String)> = params.into_iter().filter(|(k, _)| k != "user").collect();
        params.insert(0, ("user".into(), user));
        let mut stream: Vec<u8> = requests.iter().flat_map(|c| request(*c)).collect();
        stream.extend_from_slice(&startup_bytes(0, &params));
        let mut pw = BytesMut::new();
        postgres_protocol::message::frontend::password_message(&password, &mut pw).unwrap();
        stream.extend_from_slice(&pw);
        stream.extend_from_slice(&after);

        let (sent, ended) = run_handshake(&[&stream[..]]);
        let mut answer = b"N".repeat(requests.len());
        answer.extend_from_slice(ASK_PASSWORD);
        prop_assert_eq!(&sent, &answer);
        prop_assert_eq!(
            &ended,
            &Ended::Credentials { params, token: password, leftover: after }
        );
        prop_assert_eq!(run_handshake(&pieces(&stream, &cuts)), (sent, ended));
    }

    /// Whatever a client sends before authenticating, the handshake answers
    /// only with tollgate's own bytes ('N', the password request, nothing
    /// else): no client byte is echoed. (The upstream side is below.)
    #[test]
    fn handshake_sends_only_its_own_bytes(
        garbage in vec(any::<u8>(), 0..400),
        prefix in prop_oneof![
            Just(Vec::new()),
            Just(request(SSL_REQUEST_CODE)),
            params().prop_map(|p| {
                let mut p = p;
                p.retain(|(k, _)| k != "user");
                p.insert(0, ("user".into(), "app".into()));
                startup_bytes(0, &p).to_vec()
            }),
        ],
        cuts in vec(any::<usize>(), 0..10),
    ) {
        let mut stream = prefix;
        stream.extend_from_slice(&garbage);
        let (sent, _) = run_handshake(&pieces(&stream, &cuts));
        let mut rest = &sent[..];
        while !rest.is_empty() {
            if let Some(r) = rest.strip_prefix(ASK_PASSWORD) {
                rest = r;
            } else {
                prop_assert_eq!(rest[0], b'N', "the client was sent {:?}", sent);
                rest = &rest[1..];
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Nothing reaches the upstream before authentication (the real binary)
// ---------------------------------------------------------------------------

/// A fake upstream that accepts connections and records what each sends
/// until it goes quiet; it answers nothing but an 'N' to an SSLRequest.
struct FakeUpstream {
    addr: SocketAddr,
    connections: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl FakeUpstream {
    fn start() -> FakeUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let connections: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
        let seen = connections.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                let index = {
                    let mut c = seen.lock().unwrap();
                    c.push(Vec::new());
                    c.len() - 1
                };
                let seen = seen.clone();
                std::thread::spawn(move || {
                    conn.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = conn.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        let mut all = seen.lock().unwrap();
                        all[index].extend_from_slice(&buf[..n]);
                        if all[index] == request(SSL_REQUEST_CODE) {
                            let _ = conn.write_all(b"N");
                        }
                    }
                });
            }
        });
        FakeUpstream { addr, connections }
    }

    fn connections(&self) -> Vec<Vec<u8>> {
        self.connections.lock().unwrap().clone()
    }
}

/// The tollgate binary in front of `upstream`, with one valid token.
struct Proxy {
    child: std::process::Child,
    addr: SocketAddr,
    token: String,
    _dir: tempfile::TempDir,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proxy {
    fn start(upstream: SocketAddr) -> Proxy {
        let dir = tempfile::tempdir().unwrap();
        let t = token::generate();
        let mut store = tollgate::auth::TokenStore::default();
        store.insert(tollgate::auth::TokenRecord::new(
            t.id.clone(),
            "app".into(),
            vec!["appdb".into()],
            t.secret_sha256,
            SystemTime::now(),
        ));
        store.save(&dir.path().join("tokens.toml")).unwrap();
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let config = dir.path().join("tollgate.toml");
        // The failure limit is off, so that a run of bad tokens does not
        // turn into refusals before anything is read.
        std::fs::write(
            &config,
            format!(
                "listen = \"127.0.0.1:{port}\"\nworkers = 1\npin_cpus = false\n\
                 auth_failure_limit = 0\nstartup_timeout = \"2s\"\n\
                 [upstream]\nhost = \"127.0.0.1\"\nport = {}\nconnect_timeout = \"1s\"\n\
                 [[upstream.credentials]]\nuser = \"app\"\npassword = \"upstream-secret-pw\"\n\
                 [tokens]\nfile = \"tokens.toml\"\n",
                upstream.port()
            ),
        )
        .unwrap();
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args(["serve", "--config"])
            .arg(&config)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(addr).is_err() {
            assert!(Instant::now() < deadline, "tollgate did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Proxy {
            child,
            addr,
            token: String::from_utf8(t.token.expose().to_vec()).unwrap(),
            _dir: dir,
        }
    }

    /// Sends `bytes`, closes the sending side, and reads the answer until
    /// tollgate closes (or 3 s).
    fn exchange(&self, bytes: &[u8]) -> Vec<u8> {
        let mut s = TcpStream::connect(self.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let _ = s.write_all(bytes);
        let _ = s.shutdown(Shutdown::Write);
        let mut got = Vec::new();
        let _ = s.read_to_end(&mut got);
        got
    }
}

/// Pre-auth client streams: garbage, and well-formed start-ups with bad
/// tokens (random, near-miss, JWT-shaped), with or without bytes after.
fn hostile_client(valid: String) -> impl Strategy<Value = Vec<u8>> {
    let startup = || {
        params().prop_map(|p| {
            let mut p = p;
            p.retain(|(k, _)| k != "user" && k != "database");
            p.insert(0, ("user".into(), "app".into()));
            p.insert(1, ("database".into(), "appdb".into()));
            startup_bytes(0, &p).to_vec()
        })
    };
    let near_miss = (0usize..token::TOKEN_LEN, 1u8..=255).prop_map(move |(i, x)| {
        let mut t = valid.clone().into_bytes();
        t[i] ^= x;
        if t.eq_ignore_ascii_case(valid.as_bytes()) {
            // Hex is case-insensitive: that would still be the good token.
            t[i] = b'!';
        }
        t.retain(|&b| b != 0);
        t
    });
    let bad_token = prop_oneof![
        vec(1u8..=255, 0..120),
        near_miss,
        "eyJ[A-Za-z0-9_-]{4,40}\\.[A-Za-z0-9_-]{4,40}\\.[A-Za-z0-9_-]{0,40}"
            .prop_map(String::into_bytes),
        "tg_[a-z0-9]{12}_[0-9a-f]{72}".prop_map(String::into_bytes),
    ];
    prop_oneof![
        vec(any::<u8>(), 0..300),
        (startup(), vec(any::<u8>(), 0..200)).prop_map(|(s, g)| [s, g].concat()),
        (
            prop::bool::ANY,
            startup(),
            bad_token,
            vec(any::<u8>(), 0..60)
        )
            .prop_map(|(ssl, s, t, after)| {
                let mut out = if ssl {
                    request(SSL_REQUEST_CODE)
                } else {
                    Vec::new()
                };
                out.extend_from_slice(&s);
                out.extend_from_slice(&message(b'p', &[&t[..], b"\0"].concat()));
                out.extend_from_slice(&after);
                out
            }),
    ]
}

#[test]
fn no_client_byte_reaches_the_upstream_before_authentication() {
    let upstream = FakeUpstream::start();
    let proxy = Proxy::start(upstream.addr);
    let mut runner = TestRunner::new(Config {
        cases: 96,
        failure_persistence: None,
        ..Config::default()
    });
    let valid = proxy.token.clone();
    let token_rejected = std::cell::Cell::new(0u32);
    runner
        .run(&hostile_client(valid.clone()), |bytes| {
            let got = proxy.exchange(&bytes);
            if got.windows(5).any(|w| w == b"28P01") {
                token_rejected.set(token_rejected.get() + 1);
            }
            prop_assert_eq!(
                upstream.connections().len(),
                0,
                "tollgate connected upstream for {:?}",
                bytes
            );
            Ok(())
        })
        .unwrap();
    let token_rejected = token_rejected.get();
    assert!(
        token_rejected > 10,
        "only {token_rejected} clients reached the token check"
    );

    // The control: a good token does reach the upstream, with tollgate's own
    // StartupMessage first, and neither the token nor the bytes the client
    // sent after it (they wait for the login to finish).
    let mut good = startup_bytes(
        0,
        &[
            ("user".into(), "app".into()),
            ("database".into(), "appdb".into()),
        ],
    )
    .to_vec();
    good.extend_from_slice(&message(b'p', &[valid.as_bytes(), b"\0"].concat()));
    good.extend_from_slice(&message(b'Q', b"select 'client-bytes-after-the-token'\0"));
    let _ = proxy.exchange(&good);
    let deadline = Instant::now() + Duration::from_secs(5);
    let first = loop {
        let c = upstream.connections();
        if c.first().is_some_and(|b| !b.is_empty()) {
            std::thread::sleep(Duration::from_millis(100));
            break upstream.connections()[0].clone();
        }
        assert!(
            Instant::now() < deadline,
            "a good token never reached the upstream"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    // tollgate asks for TLS first (upstream TLS "prefer"), then goes on in
    // the clear when refused.
    let first = match first.strip_prefix(&request(SSL_REQUEST_CODE)[..]) {
        Some(rest) => rest.to_vec(),
        None => first,
    };
    let Ok(Some((FeStartupPacket::StartupMessage { params, .. }, used))) = parse_startup(&first)
    else {
        panic!("the upstream's first bytes are not a StartupMessage: {first:?}")
    };
    assert_eq!(params.user(), Some("app"));
    assert_eq!(
        used,
        first.len(),
        "only the StartupMessage before the server answers"
    );
    let text = String::from_utf8_lossy(&first);
    assert!(!text.contains(&valid) && !text.contains("client-bytes-after-the-token"));
}
