//! Guessing floods: a source that fails to authenticate too often (bad
//! tokens, wrong cancel keys) is refused outright for the rest of its
//! window, before anything it sends is read; other sources log in as usual.

use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use crate::harness::*;

/// A raw connection to `addr` from the loopback address `source`.
fn raw_from(source: &str, addr: SocketAddr) -> Raw {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    let from: SocketAddr = format!("{source}:0").parse().unwrap();
    s.bind(&from.into()).unwrap();
    s.connect(&addr.into()).unwrap();
    let s: TcpStream = s.into();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    Raw(s)
}

/// Logs in from `source` with `token`: `Ok` once ReadyForQuery arrives,
/// else the (SQLSTATE, message) of the error.
fn login_from(source: &str, addr: SocketAddr, token: &str) -> Result<(), (String, String)> {
    let mut c = raw_from(source, addr);
    c.send(&startup_message(&[("user", "app"), ("database", "appdb")]));
    loop {
        let (tag, body) = c.read_message();
        match tag {
            // AuthenticationCleartextPassword: the token goes as password.
            b'R' if body[..4] == 3i32.to_be_bytes() => c.send(&password_message(token)),
            b'Z' => return Ok(()),
            b'E' => return Err(error_fields(&body)),
            _ => {}
        }
    }
}

/// A CancelRequest with a made-up key, from `source`.
fn guess_cancel_key(source: &str, addr: SocketAddr, pid: u32) {
    let mut c = raw_from(source, addr);
    let mut m = Vec::new();
    m.extend_from_slice(&16i32.to_be_bytes());
    m.extend_from_slice(&80877102i32.to_be_bytes());
    m.extend_from_slice(&pid.to_be_bytes());
    m.extend_from_slice(&0x5eed_u32.to_be_bytes());
    c.send(&m);
    // Postgres (and tollgate) answer a cancel with nothing but a close.
    assert!(c.read_to_close().is_empty());
}

#[test]
fn bad_token_floods_and_cancel_key_guessing_are_refused_per_source() {
    let mut env = Env::with(
        tollgate::cluster::HbaAuth::ScramSha256,
        "auth_failure_limit = 3\nauth_failure_window = \"60s\"",
    );
    let good = env.create_token(&["--user", "app"]);
    // The same token id with a wrong secret.
    let bad = format!("{}{}", &good[..good.len() - 4], "0000");
    env.secrets.push(bad.clone());
    env.start_proxy();
    let addr = env.addr();

    // 127.0.0.2 guesses tokens: three refusals as usual, then even the
    // right token is refused, with its own code and message.
    for _ in 0..3 {
        let (code, _) = login_from("127.0.0.2", addr, &bad).unwrap_err();
        assert_eq!(code, "28P01");
    }
    let (code, message) = login_from("127.0.0.2", addr, &good).unwrap_err();
    assert_eq!(code, "28000");
    assert!(
        message.contains("too many failed authentication"),
        "{message}"
    );

    // Another source is not affected.
    login_from("127.0.0.3", addr, &good).expect("another source logs in");

    // 127.0.0.4 guesses cancel keys; the cancels are checked on their
    // owning shard, so the refusal comes shortly after the third.
    login_from("127.0.0.4", addr, &good).expect("before guessing");
    for pid in [11, 12, 13] {
        guess_cancel_key("127.0.0.4", addr, pid);
    }
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        match login_from("127.0.0.4", addr, &good) {
            Err((code, _)) => {
                assert_eq!(code, "28000");
                break;
            }
            Ok(()) => assert!(Instant::now() < deadline, "cancel guessing not limited"),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    login_from("127.0.0.3", addr, &good).expect("the bystander still logs in");

    let log = env.log();
    assert!(log.contains("reason=\"auth_failure_limit\""), "{log}");
    env.assert_log_clean();
}

/// Slow or silent start-ups and stalled TLS handshakes from one source are
/// capped (`max_pending_per_source`): past the cap that source is refused
/// with 53300 before anything is read, other sources log in as usual, and
/// the source gets its room back as its stalled connections go.
#[test]
fn stalled_start_ups_and_tls_handshakes_are_capped_per_source() {
    let serving = ServingCert::new("floods CA", &["localhost"]);
    let mut env = Env::build(EnvOptions {
        top: "max_pending_per_source = 5".into(),
        tables: serving.table("allow"),
        ..EnvOptions::default()
    });
    let good = env.create_token(&["--user", "app"]);
    env.start_proxy();
    let addr = env.addr();

    // 127.0.0.5 holds five start-ups: two silent, one half a start-up
    // packet, two in the middle of a TLS handshake (SSLRequest answered,
    // half a ClientHello sent).
    let mut stalled = Vec::new();
    for _ in 0..2 {
        stalled.push(raw_from("127.0.0.5", addr));
    }
    let mut half = raw_from("127.0.0.5", addr);
    half.send(&startup_message(&[("user", "app")])[..6]);
    stalled.push(half);
    for _ in 0..2 {
        let mut tls = raw_from("127.0.0.5", addr);
        tls.send(&[0, 0, 0, 8, 4, 0xd2, 0x16, 0x2f]);
        let mut s = [0u8; 1];
        std::io::Read::read_exact(&mut tls.0, &mut s).unwrap();
        assert_eq!(&s, b"S");
        // A TLS record header announcing 512 bytes, then silence.
        tls.send(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01]);
        stalled.push(tls);
    }
    // Give the shards a moment to have accepted all five.
    std::thread::sleep(Duration::from_millis(200));

    let started = Instant::now();
    let (code, message) = login_from("127.0.0.5", addr, &good).unwrap_err();
    assert_eq!(code, "53300", "{message}");
    assert_eq!(
        message,
        "too many connections from this address are still logging in"
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    login_from("127.0.0.6", addr, &good).expect("another source logs in");

    // One stalled connection goes: the source has room for one again.
    drop(stalled.pop());
    let deadline = Instant::now() + Duration::from_secs(3);
    while login_from("127.0.0.5", addr, &good).is_err() {
        assert!(
            Instant::now() < deadline,
            "the source never got its room back"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let log = env.log();
    assert!(log.contains("reason=\"too_many_pending\""), "{log}");
    drop(stalled);
}
