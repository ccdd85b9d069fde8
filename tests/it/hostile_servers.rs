//! Hostile or broken upstream servers, end to end: the real binary logs in
//! for a raw client with a valid token, but its upstream is a scripted fake
//! PostgreSQL server in this test. Each case states what the server does,
//! the one FATAL error the client gets (SQLSTATE class 08, a generic text
//! that names the problem, no secret) and the reason the audit log gives,
//! what the fake server received, and that the same tollgate (one shard, so
//! the same thread) still logs a client in to a real Postgres afterwards.
//!
//! The fake server sits in front of a real throwaway cluster: a connection
//! with a script queued runs the script; any other is piped, byte for byte,
//! to the cluster, so the health check goes through the very same
//! `[upstream]` settings as the hostile case.
//!
//! <https://www.postgresql.org/docs/current/protocol-flow.html#PROTOCOL-FLOW-START-UP>,
//! <https://www.postgresql.org/docs/current/sasl-authentication.html>

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use crate::harness::*;
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;

const SSL_REQUEST: u32 = (1234 << 16) | 5679;
const AUTH_OK: i32 = 0;
const AUTH_CLEARTEXT: i32 = 3;
const AUTH_MD5: i32 = 5;
const AUTH_SASL: i32 = 10;
const AUTH_SASL_CONTINUE: i32 = 11;
const AUTH_SASL_FINAL: i32 = 12;

/// What the client reads for one kind of refusal (from src/error.rs,
/// generic on purpose), and the reason its audit event names.
#[derive(Clone, Copy)]
struct Expect {
    code: &'static str,
    message: &'static str,
    hint: Option<&'static str>,
    reason: &'static str,
}

const LOGIN_FAILED: &str = "tollgate could not log in to the database server";
/// The server refused tollgate's credentials.
const CREDENTIALS_REFUSED: Expect = Expect {
    code: "08001",
    message: LOGIN_FAILED,
    hint: Some("The proxy's upstream credentials were refused; its log has the details."),
    reason: "upstream_login",
};
/// The server's side of the authentication did not pass tollgate's checks:
/// a method `require_auth` does not allow, an unknown method or mechanism,
/// a SCRAM exchange that did not verify.
const AUTH_REFUSED: Expect = Expect {
    code: "08001",
    message: LOGIN_FAILED,
    hint: Some(
        "The server's authentication did not pass the proxy's checks (a method require_auth \
         does not allow, or a SCRAM exchange that did not verify); its log has the details.",
    ),
    reason: "upstream_auth",
};
const INVALID: Expect = Expect {
    code: "08006",
    message: "the database server sent an invalid message during start-up",
    hint: None,
    reason: "upstream_protocol",
};
const LOST: Expect = Expect {
    code: "08006",
    message: "the database server closed the connection during start-up",
    hint: None,
    reason: "upstream_lost",
};
const UNAVAILABLE: Expect = Expect {
    code: "08001",
    message: "could not connect to the database server",
    hint: None,
    reason: "upstream_connect",
};
const TLS_FAILED: Expect = Expect {
    code: "08001",
    message: "tollgate could not establish a secure connection to the database server",
    hint: Some("The proxy's upstream TLS settings were not satisfied; its log has the reason."),
    reason: "upstream_tls",
};
/// The client's `startup_timeout` ran out during the upstream login.
const LOGIN_TIMED_OUT: Expect = Expect {
    code: "08001",
    message: "the database server did not complete the login in time",
    hint: None,
    reason: "upstream_login_timeout",
};

// ---------------------------------------------------------------------------
// The fake server.
// ---------------------------------------------------------------------------

/// One upstream connection, seen from the fake server: everything tollgate
/// sent on it is kept in `got`.
struct Conn {
    s: TcpStream,
    got: Vec<u8>,
}

impl Conn {
    fn read_n(&mut self, n: usize) -> Option<Vec<u8>> {
        let mut b = vec![0u8; n];
        self.s.read_exact(&mut b).ok()?;
        self.got.extend_from_slice(&b);
        Some(b)
    }

    /// Reads untagged packets up to the StartupMessage, answering an
    /// SSLRequest with 'N' (tollgate's default is `tls = "prefer"`); the
    /// StartupMessage's body after the version word.
    fn startup(&mut self) -> Vec<u8> {
        loop {
            let head = self.read_n(8).expect("a start-up packet");
            let len = u32::from_be_bytes(head[..4].try_into().unwrap()) as usize;
            let code = u32::from_be_bytes(head[4..].try_into().unwrap());
            if code == SSL_REQUEST {
                assert_eq!(len, 8);
                self.send(b"N");
                continue;
            }
            assert_eq!(code, 3 << 16, "protocol 3.0");
            return self.read_n(len - 8).expect("the start-up body");
        }
    }

    /// Reads only the SSLRequest (for scripts that answer it themselves).
    fn ssl_request(&mut self) {
        let head = self.read_n(8).expect("SSLRequest");
        assert_eq!(
            head,
            [&8u32.to_be_bytes()[..], &SSL_REQUEST.to_be_bytes()].concat()
        );
    }

    /// One tagged frontend message, or `None` at EOF.
    fn message(&mut self) -> Option<(u8, Vec<u8>)> {
        let head = self.read_n(5)?;
        let len = u32::from_be_bytes(head[1..].try_into().unwrap()) as usize;
        Some((head[0], self.read_n(len - 4)?))
    }

    fn send(&mut self, bytes: &[u8]) {
        // The peer may already have given up: that is for the test to judge.
        let _ = self.s.write_all(bytes);
    }

    /// Reads until tollgate closes (or resets), for at most `within`;
    /// whether it did.
    fn drain(&mut self, within: Duration) -> bool {
        read_until_end(&mut self.s, &mut self.got, within) != Ending::StillOpen
    }
}

type Script = Box<dyn FnOnce(&mut Conn) + Send>;

/// What a scripted connection saw, once tollgate closed it.
struct Seen {
    /// Every byte tollgate sent, in order.
    bytes: Vec<u8>,
    /// Whether tollgate closed the connection after the script ended.
    closed: bool,
    /// The script's own assertion failure, if any.
    failure: Option<String>,
}

impl Seen {
    /// The tagged messages after the start-up packets (SSLRequest,
    /// StartupMessage), as (tag, body).
    fn messages(&self) -> Vec<(u8, Vec<u8>)> {
        let mut rest = &self.bytes[..];
        // Untagged packets first: SSLRequest (answered 'N') and the start-up.
        while rest.len() >= 8 {
            let len = u32::from_be_bytes(rest[..4].try_into().unwrap()) as usize;
            let code = u32::from_be_bytes(rest[4..8].try_into().unwrap());
            rest = &rest[len.min(rest.len())..];
            if code != SSL_REQUEST {
                break;
            }
        }
        let (messages, tail) = split_messages(rest);
        assert!(tail.is_empty(), "a partial message from tollgate: {tail:?}");
        messages
    }

    fn tags(&self) -> Vec<char> {
        self.messages().iter().map(|(t, _)| *t as char).collect()
    }
}

struct Fake {
    addr: SocketAddr,
    listener: Arc<TcpListener>,
    scripts: Arc<Mutex<VecDeque<Script>>>,
    seen: Mutex<mpsc::Receiver<Seen>>,
    paused: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
}

impl Fake {
    /// A fake server that pipes unscripted connections to `real`.
    fn start(real: SocketAddr) -> Fake {
        let listener = Arc::new(TcpListener::bind("127.0.0.1:0").unwrap());
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let scripts: Arc<Mutex<VecDeque<Script>>> = Arc::default();
        let (tx, seen) = mpsc::channel();
        let paused = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        {
            let (listener, scripts, paused, stop) = (
                listener.clone(),
                scripts.clone(),
                paused.clone(),
                stop.clone(),
            );
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    if paused.load(Ordering::SeqCst) {
                        std::thread::sleep(Duration::from_millis(5));
                        continue;
                    }
                    let s = match listener.accept() {
                        Ok((s, _)) => s,
                        Err(_) => {
                            std::thread::sleep(Duration::from_millis(2));
                            continue;
                        }
                    };
                    s.set_nonblocking(false).unwrap();
                    let _ = s.set_nodelay(true);
                    let script = scripts.lock().unwrap().pop_front();
                    match script {
                        Some(script) => {
                            let tx = tx.clone();
                            std::thread::spawn(move || run_script(s, script, tx));
                        }
                        None => pipe(s, real),
                    }
                }
            });
        }
        Fake {
            addr,
            listener,
            scripts,
            seen: Mutex::new(seen),
            paused,
            stop,
        }
    }

    /// Runs `script` on the next upstream connection.
    fn script(&self, script: impl FnOnce(&mut Conn) + Send + 'static) {
        self.scripts.lock().unwrap().push_back(Box::new(script));
    }

    /// On the next upstream connection, reads the start-up and sends
    /// `bytes` in one write.
    fn after_startup(&self, bytes: Vec<u8>) {
        self.script(move |c| {
            c.startup();
            c.send(&bytes);
        });
    }

    /// What the scripted connection received, once it closed; panics with
    /// the script's own failure if it had one.
    fn seen(&self) -> Seen {
        let seen = self
            .seen
            .lock()
            .unwrap()
            .recv_timeout(Duration::from_secs(20))
            .expect("the scripted connection did not end");
        if let Some(f) = &seen.failure {
            panic!("the fake server's script failed: {f}");
        }
        seen
    }

    /// Stops accepting and shrinks the backlog to nothing, so that new
    /// connections are neither accepted nor refused: their SYNs are dropped.
    fn stop_accepting(&self) {
        self.paused.store(true, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(20));
        // SAFETY: listen(2) on a listening socket we own only resizes its
        // backlog.
        assert_eq!(unsafe { libc::listen(self.listener.as_raw_fd(), 0) }, 0);
    }

    fn resume_accepting(&self) {
        // SAFETY: as above.
        assert_eq!(unsafe { libc::listen(self.listener.as_raw_fd(), 128) }, 0);
        self.paused.store(false, Ordering::SeqCst);
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn run_script(s: TcpStream, script: Script, tx: mpsc::Sender<Seen>) {
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let mut conn = Conn { s, got: Vec::new() };
    let failure = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| script(&mut conn)))
        .err()
        .map(|e| {
            e.downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default()
        });
    let closed = conn.drain(Duration::from_secs(10));
    let _ = tx.send(Seen {
        bytes: conn.got,
        closed,
        failure,
    });
}

/// Pipes a connection to the real server, both ways.
fn pipe(client: TcpStream, real: SocketAddr) {
    let Ok(server) = TcpStream::connect(real) else {
        return;
    };
    let _ = server.set_nodelay(true);
    for (mut from, mut to) in [
        (client.try_clone().unwrap(), server.try_clone().unwrap()),
        (server, client),
    ] {
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut from, &mut to);
            let _ = to.shutdown(std::net::Shutdown::Write);
        });
    }
}

// ---------------------------------------------------------------------------
// Server messages.
// ---------------------------------------------------------------------------

fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
    [&[tag][..], &(4 + body.len() as u32).to_be_bytes(), body].concat()
}

fn auth(code: i32, rest: &[u8]) -> Vec<u8> {
    msg(b'R', &[&code.to_be_bytes()[..], rest].concat())
}

/// An ErrorResponse with these fields, each NUL-terminated, and the final NUL.
fn error_response(fields: &[(u8, &str)]) -> Vec<u8> {
    let mut body = Vec::new();
    for (kind, value) in fields {
        body.push(*kind);
        body.extend_from_slice(value.as_bytes());
        body.push(0);
    }
    body.push(0);
    msg(b'E', &body)
}

/// A FATAL ErrorResponse as a server sends it.
fn fatal(code: &str, message: &str) -> Vec<u8> {
    error_response(&[
        (b'S', "FATAL"),
        (b'V', "FATAL"),
        (b'C', code),
        (b'M', message),
    ])
}

fn parameter_status(name: &str, value: &str) -> Vec<u8> {
    msg(b'S', format!("{name}\0{value}\0").as_bytes())
}

/// What a server sends once a login is accepted.
fn welcome() -> Vec<u8> {
    [
        auth(AUTH_OK, b""),
        parameter_status("server_version", "17.0"),
        msg(b'K', &[0, 0, 0, 42, 1, 2, 3, 4]),
        msg(b'Z', b"I"),
    ]
    .concat()
}

/// Offers SCRAM-SHA-256 and reads the SASLInitialResponse; the client nonce.
fn scram_begin(c: &mut Conn) -> String {
    c.startup();
    c.send(&auth(AUTH_SASL, b"SCRAM-SHA-256\0\0"));
    let (tag, body) = c.message().expect("SASLInitialResponse");
    assert_eq!(tag, b'p');
    let nul = body.iter().position(|&b| b == 0).unwrap();
    assert_eq!(&body[..nul], b"SCRAM-SHA-256");
    let first = std::str::from_utf8(&body[nul + 5..]).unwrap();
    first
        .strip_prefix("n,,n=,r=")
        .unwrap_or_else(|| panic!("client-first-message {first:?}"))
        .to_owned()
}

/// A well-formed server-first-message for `client_nonce`.
fn good_server_first(client_nonce: &str) -> String {
    server_first(
        &format!("{client_nonce}fake-server-nonce"),
        &BASE64.encode(b"0123456789abcdef"),
        "4096",
    )
}

/// Runs SCRAM up to the client-final-message, then sends `server_final`
/// (and `after` in the same write).
fn scram_to_final(c: &mut Conn, server_final: &str, after: &[u8]) {
    let nonce = scram_begin(c);
    c.send(&auth(
        AUTH_SASL_CONTINUE,
        good_server_first(&nonce).as_bytes(),
    ));
    let (tag, body) = c.message().expect("SASLResponse");
    assert_eq!(tag, b'p');
    let text = String::from_utf8(body).unwrap();
    assert!(
        text.starts_with("c=biws,r=") && text.contains(",p="),
        "{text}"
    );
    c.send(
        &[
            auth(AUTH_SASL_FINAL, server_final.as_bytes()),
            after.to_vec(),
        ]
        .concat(),
    );
}

// ---------------------------------------------------------------------------
// The rig: a real cluster, the fake server in front of it, one tollgate.
// ---------------------------------------------------------------------------

struct Rig {
    env: Env,
    fake: Fake,
    token: String,
    /// Kept for the certificate files of the TLS cases.
    _files: Option<Files>,
}

#[derive(Default)]
struct RigOptions {
    /// Extra `[upstream]` keys; `connect_timeout = "3s"` unless given.
    upstream: String,
    /// Top-level keys.
    top: String,
    /// The cluster (and so the health check) speaks TLS.
    tls: bool,
}

impl RigOptions {
    /// These extra `[upstream]` keys.
    fn upstream(keys: &str) -> RigOptions {
        RigOptions {
            upstream: keys.into(),
            ..RigOptions::default()
        }
    }

    /// `tls = "require"` upstream, and a cluster that speaks TLS.
    fn tls_required() -> RigOptions {
        RigOptions {
            tls: true,
            ..RigOptions::upstream("tls = \"require\"")
        }
    }
}

fn rig(opts: RigOptions) -> Rig {
    let mut upstream = opts.upstream;
    if !upstream.contains("connect_timeout") {
        // Long enough never to fire in a case that should end sooner, short
        // enough that a hang shows up as a wrong answer, not a stuck test.
        upstream.push_str("\nconnect_timeout = \"3s\"");
    }
    let mut cluster_conf = Vec::new();
    let files = opts.tls.then(|| {
        let ca = Ca::new("hostile servers CA");
        let files = Files::new();
        let (cert, key) = ca.leaf(&["127.0.0.1"]);
        let cert = files.write("pg.crt", &cert, false);
        let key = files.write_server_key("pg.key", &key);
        cluster_conf = pg_ssl_conf(&cert, &key);
        files
    });
    let mut env = Env::build(EnvOptions {
        upstream,
        top: opts.top,
        cluster_conf,
        // Each hostile script answers one login: every client must make
        // its own, not be handed a pooled connection the health check left
        // (pooling against a real server is `pooling.rs`'s).
        tables: "[pool]\nmode = \"off\"\n".into(),
        ..EnvOptions::default()
    });
    let fake = Fake::start(SocketAddr::from(([127, 0, 0, 1], env.cluster.port())));
    // Point tollgate at the fake server, and give it one shard: the
    // hostile login and the health check then share a thread.
    let text = std::fs::read_to_string(&env.config).unwrap();
    let real_port = format!("\nport = {}\n", env.cluster.port());
    assert!(text.contains(&real_port) && text.contains("\nworkers = 2\n"));
    let text = text
        .replace(&real_port, &format!("\nport = {}\n", fake.addr.port()))
        .replace("\nworkers = 2\n", "\nworkers = 1\n");
    std::fs::write(&env.config, text).unwrap();
    let token = env.create_token(&["--user", "app", "--database", "appdb"]);
    env.start_proxy();
    Rig {
        env,
        fake,
        token,
        _files: files,
    }
}

/// How a refused login ended, from the client's side.
struct Refused {
    /// Everything the client received.
    bytes: Vec<u8>,
    /// From sending the token to the error and close.
    after: Duration,
}

impl Rig {
    /// Logs in with the valid token and expects exactly one FATAL error as
    /// `expect` says, then an orderly close (nothing of the server's is
    /// relayed), and an audit event with `expect`'s reason. Checks the
    /// error carries no secret.
    fn refused(&self, what: &str, expect: Expect) -> Refused {
        let mut raw = Raw::connect(self.env.addr());
        raw.0.set_nodelay(true).unwrap();
        raw.send(&startup_message(&[("user", "app"), ("database", "appdb")]));
        let (tag, body) = raw.read_message();
        assert_eq!((tag, &body[..]), (b'R', &3i32.to_be_bytes()[..]), "{what}");
        raw.send(&password_message(&self.token));
        let sent = Instant::now();
        let (got, ending) = raw.read_until_end(Duration::from_secs(20));
        let after = sent.elapsed();
        let message = assert_fatal(what, &got, ending, expect.code);
        let body = &split_messages(&got).0[0].1;
        let hint = error_field(body, b'H');
        // The audit event is written before the error is sent, so the last
        // refusal in the log is this one.
        let log = self.env.log();
        let reason = log
            .lines()
            .rev()
            .find(|l| l.contains("connection refused"))
            .and_then(|l| l.split_once("reason=\"")?.1.split('"').next());
        eprintln!(
            "{what}: {} {message:?} hint {hint:?} reason {reason:?} after {after:?}",
            expect.code
        );
        assert_eq!(message, expect.message, "{what}");
        assert_eq!(hint.as_deref(), expect.hint, "{what}");
        assert_eq!(reason, Some(expect.reason), "{what}");
        // The server_version every fake login sends, should it be relayed.
        assert!(
            !String::from_utf8_lossy(&got).contains("17.0"),
            "{what}: the server's messages reached the client"
        );
        let leaks = find_secrets(
            &[("the client's error", &String::from_utf8_lossy(&got))],
            &self.secrets(),
        );
        assert!(leaks.is_empty(), "{what}: {leaks:?}");
        Refused { bytes: got, after }
    }

    /// The upstream password and the client's token, as secrets to scan for.
    fn secrets(&self) -> Vec<(String, Vec<u8>)> {
        vec![
            (
                "upstream password".into(),
                self.env.cluster.password().as_bytes().to_vec(),
            ),
            ("token".into(), self.token.as_bytes().to_vec()),
            (
                "token secret".into(),
                self.token.as_bytes()[16..80].to_vec(),
            ),
        ]
    }

    /// Asserts the fake server received neither the password nor the token
    /// in any encoding.
    fn assert_no_secret_sent(&self, what: &str, seen: &Seen) {
        let leaks = find_secrets(
            &[("the fake server", &String::from_utf8_lossy(&seen.bytes))],
            &self.secrets(),
        );
        assert!(leaks.is_empty(), "{what}: {leaks:?}");
    }

    /// What the scripted connection received, checked: after the start-up
    /// exactly the messages tagged `tags`, then a close by tollgate, and no
    /// secret.
    fn seen_only(&self, what: &str, tags: &[char]) -> Seen {
        let seen = self.fake.seen();
        assert_eq!(
            seen.tags(),
            tags,
            "{what}: what tollgate sent after the start-up"
        );
        assert!(seen.closed, "{what}: tollgate did not close the upstream");
        self.assert_no_secret_sent(what, &seen);
        seen
    }

    /// The same tollgate, the same shard, the same `[upstream]`: a login
    /// through to the real cluster works and runs a query.
    fn assert_healthy(&self) {
        assert!(
            self.fake.scripts.lock().unwrap().is_empty(),
            "a script is still queued"
        );
        let mut raw = raw_login(
            self.env.addr(),
            &[("user", "app"), ("database", "appdb")],
            &self.token,
        )
        .unwrap_or_else(|e| panic!("a good login failed afterwards: {e:?}"));
        let rows = raw_query(&mut raw, "select 40 + 2").unwrap();
        assert_eq!(rows, [[Some("42".to_owned())]]);
    }

    /// The end of every case: healthy, and no secret in the log.
    fn finish(&self) {
        self.assert_healthy();
        self.env.assert_log_clean();
    }
}

// ---------------------------------------------------------------------------
// 1. Password requests, and no authentication at all.
// ---------------------------------------------------------------------------

/// A server that asks for a password with `request`, reads the answer, and
/// refuses it with 28P01 (as a server with another password would).
fn refusing_the_password(request: Vec<u8>) -> impl FnOnce(&mut Conn) + Send + 'static {
    move |c| {
        c.startup();
        c.send(&request);
        c.message().expect("a PasswordMessage");
        c.send(&fatal(
            "28P01",
            "password authentication failed for user \"app\"",
        ));
    }
}

/// Without `[upstream] require_auth` (the default, as in libpq), tollgate
/// answers whatever the server asks: a cleartext request gets the
/// configured password in the clear (here over plaintext TCP, after 'N' to
/// the SSLRequest of the default `tls = "prefer"`), an md5 request the md5
/// response, and a server that skips authentication (AuthenticationOk at
/// once) is accepted. The next test shows the setting that stops all three.
#[test]
fn without_require_auth_every_method_is_answered() {
    let rig = rig(RigOptions::default());
    let password = rig.env.cluster.password().to_owned();
    let salt = *b"salt";
    let md5 = postgres_protocol::authentication::md5_hash(b"app", password.as_bytes(), salt);
    for (what, request, answer) in [
        ("cleartext request", auth(AUTH_CLEARTEXT, b""), password),
        ("md5 request", auth(AUTH_MD5, &salt), md5),
    ] {
        rig.fake.script(refusing_the_password(request));
        // The server refused the credentials: tollgate's configuration
        // problem, not a failed check of the server.
        rig.refused(what, CREDENTIALS_REFUSED);
        assert_eq!(
            rig.fake.seen().messages(),
            [(b'p', format!("{answer}\0").into_bytes())],
            "{what}: the password goes to whoever asks for it"
        );
    }

    // No authentication at all: the session opens on the fake server.
    rig.fake.script(|c| {
        c.startup();
        c.send(&welcome());
        c.message(); // the client's Terminate
    });
    let mut raw = raw_login(
        rig.env.addr(),
        &[("user", "app"), ("database", "appdb")],
        &rig.token,
    )
    .expect("a server that asks for no password is accepted by default");
    raw.send(&msg(b'X', b""));
    drop(raw);
    let seen = rig.fake.seen();
    assert_eq!(seen.tags(), ['X']);
    assert!(rig.env.log().contains("upstream_auth=\"trust\""));
    rig.finish();
}

/// `require_auth = "scram-sha-256"` (libpq's setting of the same name):
/// a server that asks for a cleartext or md5 password, or skips
/// authentication, is refused before tollgate sends anything after the
/// start-up (no password, no hash of one), and nothing of what it sent
/// reaches the client. The real cluster's SCRAM login still works.
#[test]
fn require_auth_scram_refuses_password_requests_and_no_auth() {
    let rig = rig(RigOptions::upstream("require_auth = \"scram-sha-256\""));
    for (what, request, asked) in [
        (
            "cleartext request",
            auth(AUTH_CLEARTEXT, b""),
            "a cleartext password",
        ),
        ("md5 request", auth(AUTH_MD5, b"salt"), "an md5 password"),
        ("AuthenticationOk at once", welcome(), "no authentication"),
    ] {
        rig.fake.after_startup(request);
        rig.refused(what, AUTH_REFUSED);
        // Not even a PasswordMessage.
        rig.seen_only(what, &[]);
        let detail = format!("the server asked for {asked}, which require_auth does not allow");
        assert!(rig.env.log().contains(&detail), "{what}: no {detail:?}");
    }
    rig.finish();
    assert!(
        rig.env.log().contains("upstream_auth=\"SCRAM-SHA-256\""),
        "the health check did not log in with SCRAM"
    );
}

// ---------------------------------------------------------------------------
// 2. SCRAM server-first and server-final.
// ---------------------------------------------------------------------------

/// A server-first-message: the (combined) nonce, the salt as sent, and the
/// iteration count as sent.
fn server_first(nonce: &str, salt: &str, iterations: &str) -> String {
    format!("r={nonce},s={salt},i={iterations}")
}

/// A valid salt, base64.
fn salt() -> String {
    BASE64.encode(b"salt")
}

impl Rig {
    /// A SCRAM case: the server answers the client-first-message with
    /// `first(client nonce)` (and, in the same write, what a naive client
    /// would relay next); the client gets `expect`, and the log says
    /// `logged`. After a bad server-first, tollgate sends no
    /// client-final-message (no proof), and the server hears nothing more.
    fn bad_server_first(
        &self,
        what: &str,
        first: impl FnOnce(&str) -> String + Send + 'static,
        expect: Expect,
        logged: &str,
    ) -> Refused {
        self.fake.script(move |c| {
            let nonce = scram_begin(c);
            let first = first(&nonce);
            c.send(&[auth(AUTH_SASL_CONTINUE, first.as_bytes()), welcome()].concat());
        });
        let r = self.refused(what, expect);
        // Only the SASLInitialResponse.
        self.seen_only(what, &['p']);
        self.assert_logged(what, logged);
        r
    }

    /// A SCRAM case that gets as far as the server-final-message, which is
    /// `server_final`, sent with AuthenticationOk, ParameterStatus,
    /// BackendKeyData and ReadyForQuery: none of them reaches the client,
    /// and the server hears nothing after the client-final-message.
    fn bad_server_final(&self, what: &str, server_final: &str, logged: &str) -> Refused {
        let server_final = server_final.to_owned();
        self.fake
            .script(move |c| scram_to_final(c, &server_final, &welcome()));
        let r = self.refused(what, AUTH_REFUSED);
        // The client-first and client-final messages only.
        self.seen_only(what, &['p', 'p']);
        self.assert_logged(what, logged);
        r
    }

    fn assert_logged(&self, what: &str, logged: &str) {
        assert!(
            self.env.log().contains(logged),
            "{what}: the log does not say {logged:?}"
        );
    }
}

#[test]
fn scram_server_nonce_not_extending_ours_is_refused() {
    let rig = rig(RigOptions::default());
    rig.bad_server_first(
        "foreign nonce",
        |_| server_first("AAAAAAAAAAAAAAAAAAAAAAAAserver", &salt(), "4096"),
        AUTH_REFUSED,
        "server nonce does not start with the client nonce",
    );
    rig.finish();
}

/// 64 KiB of nonce is beyond the longest message tollgate reads during a
/// login (64 KiB in all); 2 KiB is within it but beyond SCRAM's own bound.
#[test]
fn scram_huge_server_nonces_are_refused() {
    let rig = rig(RigOptions::default());
    rig.bad_server_first(
        "64 KiB nonce",
        |n| server_first(&format!("{n}{}", "x".repeat(64 * 1024)), &salt(), "4096"),
        INVALID,
        "upstream framing",
    );
    rig.assert_healthy();
    rig.bad_server_first(
        "2 KiB nonce",
        |n| server_first(&format!("{n}{}", "x".repeat(2048)), &salt(), "4096"),
        AUTH_REFUSED,
        "server message too long",
    );
    rig.finish();
}

#[test]
fn scram_zero_iterations_are_refused() {
    let rig = rig(RigOptions::default());
    rig.bad_server_first(
        "i=0",
        |n| server_first(&format!("{n}x"), &salt(), "0"),
        AUTH_REFUSED,
        "iteration count must be >= 1",
    );
    rig.finish();
}

/// 2^31 - 1 iterations would pin the shard for minutes of PBKDF2; the cap
/// refuses it before any derivation, so the answer comes at once (and the
/// other counts beyond the cap likewise).
#[test]
fn scram_huge_iteration_counts_are_refused_at_once() {
    let rig = rig(RigOptions::default());
    for (count, logged) in [
        ("2147483647", "iteration count exceeds the limit"),
        ("4294967295", "iteration count"),
        ("4294967296", "iteration count"),
        ("99999999999999999999999", "iteration count"),
        ("10000001", "iteration count exceeds the limit"),
    ] {
        let what = format!("i={count}");
        let r = rig.bad_server_first(
            &what,
            move |n| server_first(&format!("{n}x"), &salt(), count),
            AUTH_REFUSED,
            logged,
        );
        assert!(
            r.after < Duration::from_secs(1),
            "{what} took {:?}",
            r.after
        );
    }
    rig.finish();
}

#[test]
fn scram_salt_that_is_not_base64_is_refused() {
    let rig = rig(RigOptions::default());
    rig.bad_server_first(
        "salt not base64",
        |n| server_first(&format!("{n}x"), "not*base64!", "4096"),
        AUTH_REFUSED,
        "salt is empty or not valid base64",
    );
    rig.finish();
}

/// A server that does not know the verifier cannot prove it: a wrong
/// ServerSignature ends the login, and the AuthenticationOk, ParameterStatus,
/// BackendKeyData and ReadyForQuery sent with it reach no one.
#[test]
fn scram_wrong_server_signature_is_refused() {
    let rig = rig(RigOptions::default());
    let wrong = format!("v={}", BASE64.encode([7u8; 32]));
    rig.bad_server_final("wrong ServerSignature", &wrong, "server signature mismatch");
    // Not even base64 of 32 bytes.
    rig.bad_server_final(
        "short ServerSignature",
        "v=c2hvcnQ=",
        "server signature is not valid base64",
    );
    rig.finish();
}

/// `e=` in the server-final-message ends the login; the server's text is
/// for the log (sanitised, cut), never the client.
#[test]
fn scram_error_in_server_final_is_refused() {
    let rig = rig(RigOptions::default());
    let r = rig.bad_server_final(
        "e= in server-final",
        "e=invalid-proof injected\u{7}text",
        "server reported error: invalid-proof injected?text",
    );
    let text = String::from_utf8_lossy(&r.bytes);
    assert!(!text.contains("invalid-proof") && !text.contains("injected"));
    rig.finish();
}

// ---------------------------------------------------------------------------
// 3. TLS negotiation.
// ---------------------------------------------------------------------------

impl Rig {
    /// The server answers the SSLRequest with `answer`, in one write: the
    /// client gets the TLS failure and nothing of `answer`; what the
    /// server received, with no secret in it.
    fn ssl_request_answered(&self, what: &str, answer: Vec<u8>) -> Seen {
        self.fake.script(move |c| {
            c.ssl_request();
            c.send(&answer);
        });
        let r = self.refused(what, TLS_FAILED);
        assert!(
            !String::from_utf8_lossy(&r.bytes).contains("INJECTED"),
            "{what}"
        );
        let seen = self.fake.seen();
        assert!(seen.closed, "{what}: tollgate did not close the upstream");
        self.assert_no_secret_sent(what, &seen);
        seen
    }
}

/// With `tls = "require"`, an ErrorResponse in answer to the SSLRequest is
/// a TLS failure; its text (unauthenticated plaintext, perhaps not even the
/// server's) is never read, let alone relayed, and the start-up never goes
/// out in the clear.
#[test]
fn error_answer_to_ssl_request_is_a_tls_failure() {
    let rig = rig(RigOptions::tls_required());
    let seen = rig.ssl_request_answered(
        "ErrorResponse to SSLRequest",
        fatal("53300", "sorry, too many clients already INJECTED"),
    );
    assert_eq!(seen.bytes.len(), 8, "only the SSLRequest: {:?}", seen.bytes);
    rig.finish();
}

/// CVE-2021-23222: the server answers 'S' and, in the same write, plaintext
/// that a client reading more than one byte would take for the server's
/// (here AuthenticationOk, ParameterStatus, BackendKeyData, ReadyForQuery).
/// tollgate reads exactly the 'S'; the rest goes to the TLS handshake, which
/// fails, and nothing of it reaches the client.
#[test]
fn bytes_after_the_s_of_ssl_request_are_never_processed() {
    let rig = rig(RigOptions::tls_required());
    let seen = rig.ssl_request_answered("'S' and injected bytes", [&b"S"[..], &welcome()].concat());
    // The SSLRequest, then TLS records only (a ClientHello, perhaps an
    // alert): no StartupMessage, no password in the clear.
    let tls = &seen.bytes[8..];
    assert_eq!(tls.first(), Some(&0x16), "a TLS handshake record: {tls:?}");
    assert!(!String::from_utf8_lossy(tls).contains("appdb"));
    rig.finish();
}

// ---------------------------------------------------------------------------
// 4. Broken ErrorResponses.
// ---------------------------------------------------------------------------

/// A server ErrorResponse during the login is relayed to the client only if
/// it is well formed: a client cannot parse one without a SQLSTATE, so it
/// gets tollgate's generic error instead.
#[test]
fn error_response_without_sqlstate_gets_a_generic_error() {
    let rig = rig(RigOptions::default());
    // Before authentication, and after it.
    let cases: [(&str, Vec<u8>); 3] = [
        (
            "no C field",
            error_response(&[(b'S', "FATAL"), (b'V', "FATAL"), (b'M', "no code here")]),
        ),
        ("no field at all", error_response(&[])),
        (
            "an empty C field",
            error_response(&[(b'S', "FATAL"), (b'C', ""), (b'M', "empty code")]),
        ),
    ];
    for (what, response) in cases {
        for after_auth in [false, true] {
            let ok = if after_auth {
                auth(AUTH_OK, b"")
            } else {
                vec![]
            };
            rig.fake.after_startup([ok, response.clone()].concat());
            let what = format!("{what} (after authentication: {after_auth})");
            let r = rig.refused(&what, INVALID);
            assert!(
                !String::from_utf8_lossy(&r.bytes).contains("code"),
                "{what}"
            );
            rig.seen_only(&what, &[]);
        }
    }
    // A well-formed server error is still relayed verbatim.
    let good = fatal("53300", "sorry, too many clients already");
    rig.fake.after_startup(good.clone());
    let r = rig.refused(
        "a well-formed error",
        Expect {
            code: "53300",
            message: "sorry, too many clients already",
            hint: None,
            reason: "upstream_error",
        },
    );
    assert_eq!(r.bytes, good);
    rig.seen_only("a well-formed error", &[]);
    rig.finish();
}

/// ErrorResponses too long to be a server's, with fields missing their
/// terminators, or whose length word promises more than arrives: a generic
/// error, no crash, and the same tollgate serves the next client.
#[test]
fn error_responses_with_huge_or_broken_fields_get_a_generic_error() {
    let rig = rig(RigOptions::upstream("connect_timeout = \"1s\""));
    let huge = "m".repeat(1 << 20);
    let cases: Vec<(&str, Vec<u8>, bool, Expect)> = vec![
        (
            "a 1 MiB message field",
            error_response(&[(b'S', "FATAL"), (b'C', "XX000"), (b'M', &huge)]),
            false,
            INVALID,
        ),
        (
            "fields without terminators",
            msg(b'E', b"SFATAL\0C53300\0Msorry, too many clients"),
            false,
            INVALID,
        ),
        (
            "no final terminator",
            msg(b'E', b"SFATAL\0VFATAL\0C53300\0Msorry\0"),
            false,
            INVALID,
        ),
        (
            "a code that is not five characters",
            error_response(&[(b'S', "FATAL"), (b'C', "5330000000"), (b'M', "x")]),
            false,
            INVALID,
        ),
        (
            "a length word of 2 GiB",
            [&b"E"[..], &0x7fff_fff0u32.to_be_bytes(), b"SFATAL\0"].concat(),
            false,
            INVALID,
        ),
        (
            "a negative length word",
            [&b"E"[..], &0xffff_fff0u32.to_be_bytes(), b"SFATAL\0"].concat(),
            false,
            INVALID,
        ),
        (
            "a length word beyond what arrives, then a close",
            [&b"E"[..], &1000u32.to_be_bytes(), b"SFATAL\0C53300\0"].concat(),
            true,
            LOST,
        ),
        (
            "a length word beyond what arrives, then silence",
            [&b"E"[..], &1000u32.to_be_bytes(), b"SFATAL\0C53300\0"].concat(),
            false,
            UNAVAILABLE,
        ),
    ];
    for (what, response, close, expect) in cases {
        rig.fake.script(move |c| {
            c.startup();
            c.send(&response);
            if close {
                let _ = c.s.shutdown(std::net::Shutdown::Both);
            }
        });
        let r = rig.refused(what, expect);
        assert!(
            !String::from_utf8_lossy(&r.bytes).contains("sorry"),
            "{what}"
        );
        rig.seen_only(what, &[]);
        rig.assert_healthy();
    }
    rig.env.assert_log_clean();
}

// ---------------------------------------------------------------------------
// 5. Silent servers: the connect and start-up deadlines.
// ---------------------------------------------------------------------------

/// A refusal `after` sending the token came at the 1 s `connect_timeout`:
/// not before it, and not long after.
fn assert_at_the_connect_timeout(what: &str, after: Duration) {
    assert!(
        after >= Duration::from_millis(900) && after < Duration::from_millis(2500),
        "{what}: ended after {after:?}"
    );
}

/// A server that accepts and never says a word (not even to the SSLRequest):
/// `[upstream] connect_timeout` (1 s here) ends the attempt with 08001.
/// Meanwhile the same shard logs another client in.
#[test]
fn blackholed_server_ends_at_the_connect_timeout() {
    let rig = rig(RigOptions::upstream("connect_timeout = \"1s\""));
    rig.fake.script(|_| {});
    std::thread::scope(|s| {
        let stuck = s.spawn(|| rig.refused("blackholed", UNAVAILABLE));
        // While that one waits, another client gets through (the next
        // connection is piped to the real server).
        std::thread::sleep(Duration::from_millis(200));
        let t = Instant::now();
        rig.assert_healthy();
        assert!(
            t.elapsed() < Duration::from_millis(900),
            "{:?}",
            t.elapsed()
        );
        let r = stuck.join().unwrap();
        assert_at_the_connect_timeout("blackholed", r.after);
    });
    let seen = rig.fake.seen();
    assert!(seen.closed, "tollgate kept the silent connection open");
    assert_eq!(seen.bytes.len(), 8, "only the SSLRequest");
    // Silent after the start-up, in the middle of SCRAM.
    rig.fake.script(|c| {
        scram_begin(c);
    });
    let r = rig.refused("silent after SASLInitialResponse", UNAVAILABLE);
    assert!(r.after < Duration::from_millis(2500), "{:?}", r.after);
    rig.seen_only("silent after SASLInitialResponse", &['p']);
    assert!(rig.env.log().contains("no answer within 1s"));
    rig.finish();
}

/// A server whose listen backlog is full: the SYN is dropped, connect(2)
/// neither succeeds nor fails, and `connect_timeout` ends it.
#[test]
fn server_that_never_accepts_ends_at_the_connect_timeout() {
    let rig = rig(RigOptions::upstream("connect_timeout = \"1s\""));
    rig.fake.stop_accepting();
    // Fill the (now empty) backlog, and check a connection now hangs.
    let mut fillers = Vec::new();
    for _ in 0..3 {
        if let Ok(s) = TcpStream::connect_timeout(&rig.fake.addr, Duration::from_millis(200)) {
            fillers.push(s);
        }
    }
    assert!(
        TcpStream::connect_timeout(&rig.fake.addr, Duration::from_millis(300)).is_err(),
        "the backlog is not full: this test would prove nothing"
    );
    let r = rig.refused("never accepted", UNAVAILABLE);
    assert_at_the_connect_timeout("never accepted", r.after);
    drop(fillers);
    rig.fake.resume_accepting();
    assert!(rig.env.log().contains("no answer within 1s"));
    rig.finish();
}

/// When the client's own `startup_timeout` (1 s) is the shorter deadline, it
/// ends a login to a silent server just as surely. The client did its part,
/// so it is told the server did not finish (08001), not that it was too
/// slow itself (08P01), and the operator gets a warning.
#[test]
fn startup_timeout_ends_a_login_to_a_silent_server() {
    let rig = rig(RigOptions {
        top: "startup_timeout = \"1s\"".into(),
        ..RigOptions::upstream("connect_timeout = \"10s\"")
    });
    rig.fake.script(|c| {
        c.startup();
    });
    let r = rig.refused("silent, startup_timeout first", LOGIN_TIMED_OUT);
    assert!(r.after < Duration::from_millis(1500), "{:?}", r.after);
    rig.seen_only("silent, startup_timeout first", &[]);
    let log = rig.env.log();
    assert!(
        log.lines().any(|l| l.contains("WARN")
            && l.contains("upstream login did not finish within startup_timeout")),
        "no warning in the log"
    );
    rig.finish();
}

// ---------------------------------------------------------------------------
// 6. Closes, stray messages, odd mechanisms, malformed messages.
// ---------------------------------------------------------------------------

/// The server hangs up at each step of a SCRAM login: 08006, "closed".
#[test]
fn server_closing_mid_login_is_reported_as_lost() {
    let rig = rig(RigOptions::default());
    type Step = fn(&mut Conn);
    let steps: [(&str, Step); 5] = [
        ("after the start-up", |c| {
            c.startup();
        }),
        ("after the SASLInitialResponse", |c| {
            scram_begin(c);
        }),
        ("mid-message", |c| {
            scram_begin(c);
            c.send(&auth(AUTH_SASL_CONTINUE, b"r=abc")[..8]);
        }),
        ("after AuthenticationOk", |c| {
            c.startup();
            c.send(&auth(AUTH_OK, b""));
        }),
        ("after BackendKeyData, before ReadyForQuery", |c| {
            c.startup();
            let w = welcome();
            c.send(&w[..w.len() - 6]);
        }),
    ];
    for (what, step) in steps {
        rig.fake.script(move |c| {
            step(c);
            let _ = c.s.shutdown(std::net::Shutdown::Both);
        });
        // Nothing the server sent before closing is relayed (`refused`
        // checks).
        rig.refused(what, LOST);
        rig.assert_no_secret_sent(what, &rig.fake.seen());
    }
    rig.finish();
}

/// Messages that have no place in an authentication exchange.
#[test]
fn unexpected_messages_during_authentication_are_refused() {
    let rig = rig(RigOptions::default());
    type Step = fn(&mut Conn);
    let steps: [(&str, Step, Expect); 5] = [
        (
            "ReadyForQuery instead of an authentication request",
            |c| {
                c.startup();
                c.send(&msg(b'Z', b"I"));
            },
            INVALID,
        ),
        (
            "a DataRow in the middle of SCRAM",
            |c| {
                scram_begin(c);
                c.send(&msg(b'D', &[0, 1, 0, 0, 0, 1, b'x']));
            },
            INVALID,
        ),
        (
            "AuthenticationOk before the server-final-message",
            |c| {
                let n = scram_begin(c);
                c.send(&auth(AUTH_SASL_CONTINUE, good_server_first(&n).as_bytes()));
                c.message();
                c.send(&welcome());
            },
            INVALID,
        ),
        (
            "a second AuthenticationSASL mid-exchange",
            |c| {
                scram_begin(c);
                c.send(&auth(AUTH_SASL, b"SCRAM-SHA-256\0\0"));
            },
            INVALID,
        ),
        (
            "a GSS request (code 7)",
            |c| {
                c.startup();
                c.send(&auth(7, b""));
            },
            AUTH_REFUSED,
        ),
    ];
    for (what, step, expect) in steps {
        rig.fake.script(step);
        rig.refused(what, expect);
        let seen = rig.fake.seen();
        assert!(seen.closed, "{what}");
        assert!(seen.tags().len() <= 2, "{what}: {:?}", seen.tags());
        rig.assert_no_secret_sent(what, &seen);
    }
    rig.finish();
}

/// AuthenticationSASL that offers nothing tollgate speaks (or nothing at
/// all): refused without a SASLInitialResponse.
#[test]
fn sasl_offering_only_unknown_mechanisms_is_refused() {
    let rig = rig(RigOptions::default());
    for (what, list) in [
        ("unknown mechanisms", &b"SCRAM-SHA-1\0OAUTHBEARER\0\0"[..]),
        ("an empty list", b"\0"),
        ("PLUS only, on plain TCP", b"SCRAM-SHA-256-PLUS\0\0"),
    ] {
        rig.fake.after_startup(auth(AUTH_SASL, list));
        rig.refused(what, AUTH_REFUSED);
        rig.seen_only(what, &[]);
    }
    // A list that is not a list: no terminator.
    rig.fake.after_startup(auth(AUTH_SASL, b"SCRAM-SHA-256"));
    rig.refused("an unterminated list", INVALID);
    rig.seen_only("an unterminated list", &[]);
    assert!(rig
        .env
        .log()
        .contains("unsupported upstream authentication"));
    rig.finish();
}

/// After AuthenticationOk, a ParameterStatus or BackendKeyData that does
/// not parse ends the login: the client would choke on it, and tollgate
/// must read the key to substitute its own.
#[test]
fn malformed_parameter_status_or_backend_key_data_is_refused() {
    let rig = rig(RigOptions::default());
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("ParameterStatus without NULs", msg(b'S', b"server_version")),
        (
            "ParameterStatus with a name only",
            msg(b'S', b"server_version\0"),
        ),
        ("ParameterStatus with an empty body", msg(b'S', b"")),
        (
            "ParameterStatus with bytes after the value",
            msg(b'S', b"server_version\x0017\0junk"),
        ),
        ("BackendKeyData of 2 bytes", msg(b'K', &[0, 1])),
        ("BackendKeyData without a secret", msg(b'K', &[0, 0, 0, 1])),
        (
            "BackendKeyData with a 3.2-length key on 3.0",
            msg(b'K', &[[0u8, 0, 0, 1].as_slice(), &[9u8; 32]].concat()),
        ),
        (
            "BackendKeyData with a 300-byte key",
            msg(b'K', &[[0u8, 0, 0, 1].as_slice(), &[9u8; 300]].concat()),
        ),
        (
            "two BackendKeyData",
            [
                msg(b'K', &[0, 0, 0, 1, 1, 2, 3, 4]),
                msg(b'K', &[0, 0, 0, 2, 1, 2, 3, 4]),
            ]
            .concat(),
        ),
        ("ReadyForQuery of 2 bytes", msg(b'Z', b"II")),
    ];
    for (what, bad) in cases {
        rig.fake.after_startup(
            [
                auth(AUTH_OK, b""),
                parameter_status("server_version", "17.0"),
                bad,
                msg(b'Z', b"I"),
            ]
            .concat(),
        );
        rig.refused(what, INVALID);
        rig.seen_only(what, &[]);
    }
    rig.finish();
}

/// A server that streams ParameterStatus messages after AuthenticationOk
/// and never sends ReadyForQuery: tollgate collects the login's messages
/// for the client in memory, so it must stop at a bound, long before the
/// connect timeout, with its memory flat.
#[test]
fn endless_parameter_status_is_bounded() {
    let rig = rig(RigOptions::default());
    rig.assert_healthy();
    let pid = rig.env.pid();
    let (_, hwm0) = rss_kib(pid);
    rig.fake.script(|c| {
        c.startup();
        c.send(&auth(AUTH_OK, b""));
        let one = parameter_status("x", &"v".repeat(60 * 1024));
        // At most 128 MiB, so that a failing run cannot exhaust the machine.
        for _ in 0..(128 * 1024 * 1024 / one.len()) {
            if c.s.write_all(&one).is_err() {
                return;
            }
        }
    });
    let r = rig.refused("endless ParameterStatus", INVALID);
    assert!(r.after < Duration::from_secs(2), "{:?}", r.after);
    rig.seen_only("endless ParameterStatus", &[]);
    let (_, hwm1) = rss_kib(pid);
    eprintln!("VmHWM {hwm0} -> {hwm1} KiB");
    assert!(
        hwm1 - hwm0 < 16 * 1024,
        "peak resident memory grew by {} KiB",
        hwm1 - hwm0
    );
    rig.finish();
}
