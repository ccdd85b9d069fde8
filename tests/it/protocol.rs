//! Protocol corners through the real binary: cancel with tollgate's own
//! keys (routed across shards), protocol-version negotiation, replication
//! start-ups, and what each side sees when the other fails.

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::harness::*;

/// A client logged in over the raw protocol, and the messages from
/// AuthenticationOk to the first ReadyForQuery.
struct Session {
    raw: Raw,
    login: Vec<(u8, Vec<u8>)>,
}

impl Session {
    fn open(addr: SocketAddr, version_minor: u16, pairs: &[(&str, &str)], token: &str) -> Session {
        let mut raw = Raw::connect(addr);
        raw.send(&startup(version_minor, pairs));
        let (tag, body) = raw.read_message();
        assert_eq!((tag, &body[..]), (b'R', &3i32.to_be_bytes()[..]));
        raw.send(&password_message(token));
        let mut login = Vec::new();
        loop {
            let m = raw.read_message();
            let done = m.0 == b'Z' || m.0 == b'E';
            login.push(m);
            if done {
                break;
            }
        }
        Session { raw, login }
    }

    fn app(addr: SocketAddr, token: &str) -> Session {
        Self::open(addr, 0, &[("user", "app"), ("database", "appdb")], token)
    }

    /// The BackendKeyData the client was given.
    fn key(&self) -> (u32, Vec<u8>) {
        let (_, body) = self
            .login
            .iter()
            .find(|(t, _)| *t == b'K')
            .expect("BackendKeyData");
        (
            u32::from_be_bytes(body[..4].try_into().unwrap()),
            body[4..].to_vec(),
        )
    }

    fn query(&mut self, sql: &str) {
        let mut b = bytes::BytesMut::new();
        postgres_protocol::message::frontend::query(sql, &mut b).unwrap();
        self.raw.send(&b);
    }

    /// Reads up to ReadyForQuery; returns the messages.
    fn until_ready(&mut self) -> Vec<(u8, Vec<u8>)> {
        let mut out = Vec::new();
        loop {
            let m = self.raw.read_message();
            let done = m.0 == b'Z';
            out.push(m);
            if done {
                return out;
            }
        }
    }

    /// The first column of the first row of a simple query.
    fn scalar(&mut self, sql: &str) -> String {
        self.query(sql);
        let msgs = self.until_ready();
        let (_, row) = msgs
            .iter()
            .find(|(t, _)| *t == b'D')
            .unwrap_or_else(|| panic!("no row for {sql}: {msgs:?}"));
        let len = i32::from_be_bytes(row[2..6].try_into().unwrap()) as usize;
        String::from_utf8(row[6..6 + len].to_vec()).unwrap()
    }
}

/// A cluster and a running proxy, with a token for role `app`.
fn running_with_app_token() -> (Env, String, SocketAddr) {
    let mut env = Env::new();
    let token = env.create_token(&["--user", "app"]);
    let addr = env.start_proxy();
    (env, token, addr)
}

fn startup(minor: u16, pairs: &[(&str, &str)]) -> Vec<u8> {
    let mut b = bytes::BytesMut::new();
    tollgate::protocol::startup::encode_startup_message(
        &mut b,
        tollgate::protocol::startup::ProtocolVersion { major: 3, minor },
        pairs.iter().copied(),
    );
    b.to_vec()
}

fn send_cancel(addr: SocketAddr, pid: u32, secret: &[u8]) {
    let mut m = Vec::new();
    m.extend_from_slice(&((12 + secret.len()) as i32).to_be_bytes());
    m.extend_from_slice(&((1234u32 << 16) | 5678).to_be_bytes());
    m.extend_from_slice(&pid.to_be_bytes());
    m.extend_from_slice(secret);
    let mut raw = Raw::connect(addr);
    raw.send(&m);
    // Like Postgres, tollgate answers nothing and closes.
    assert!(raw.read_to_close().is_empty());
}

fn sqlstate(msgs: &[(u8, Vec<u8>)]) -> Option<String> {
    msgs.iter()
        .find(|(t, _)| *t == b'E')
        .map(|(_, b)| error_fields(b).0)
}

/// Polls `f` until it returns true or `within` passes.
fn eventually(within: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + within;
    while Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    f()
}

fn active_sleeps(env: &Env) -> usize {
    env.cluster
        .psql(
            "postgres",
            "select count(*) from pg_stat_activity where query like 'select pg_sleep%'",
        )
        .unwrap()
        .parse()
        .unwrap()
}

/// Clients get their backend's process id with tollgate's secret, never
/// the server's, and a cancel arriving on either shard stops the right
/// query within a second; wrong keys do nothing.
#[test]
fn cancel_uses_tollgates_keys_and_crosses_shards() {
    let (env, token, addr) = running_with_app_token();
    let mut s = Session::app(addr, &token);
    let (pid, secret) = s.key();
    assert_eq!(secret.len(), 4);
    let backend: u32 = s.scalar("select pg_backend_pid()").parse().unwrap();
    assert_eq!(pid, backend, "the client's process id is its backend's");
    let mut other = Session::app(addr, &token);
    let (other_pid, other_secret) = other.key();
    assert_ne!(other_pid, pid);

    // A wrong secret, this secret with another session's process id, and
    // another session's secret with this one: all ignored.
    s.query("select pg_sleep(1.5)");
    std::thread::sleep(Duration::from_millis(200));
    let mut wrong = secret.clone();
    wrong[0] ^= 0x55;
    send_cancel(addr, pid, &wrong);
    send_cancel(addr, other_pid, &secret);
    send_cancel(addr, pid, &other_secret);
    let msgs = s.until_ready();
    assert_eq!(sqlstate(&msgs), None, "a wrong key cancelled the query");
    assert_eq!(other.scalar("select 7"), "7");

    // Twelve cancels: the kernel spreads the cancel connections over both
    // shards, so some must be routed to the owner from the other shard.
    for _ in 0..12 {
        let mut s = Session::app(addr, &token);
        let (pid, secret) = s.key();
        s.query("select pg_sleep(30)");
        std::thread::sleep(Duration::from_millis(100));
        let started = Instant::now();
        send_cancel(addr, pid, &secret);
        let msgs = s.until_ready();
        assert_eq!(sqlstate(&msgs).as_deref(), Some("57014"));
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
        // The session is still usable.
        assert_eq!(s.scalar("select 7"), "7");
    }
    let log = env.log();
    assert!(
        log.contains("cancel request routed to its shard"),
        "no cancel crossed shards"
    );
    assert!(!log.contains("cancel request not forwarded"));
    env.assert_log_clean();
}

/// The process id a client gets is its backend's, so what applications do
/// with it works as on a direct connection: the session's own NOTIFY comes
/// back with it, and `pg_terminate_backend` on it from another session ends
/// that session (57P01).
#[test]
fn the_client_side_process_id_is_the_backends() {
    let (env, token, addr) = running_with_app_token();
    let mut s = Session::app(addr, &token);
    let (pid, _) = s.key();

    s.query("listen tg_pid_test; notify tg_pid_test, 'hello'");
    let msgs = s.until_ready();
    let (_, notification) = msgs
        .iter()
        .find(|(t, _)| *t == b'A')
        .unwrap_or_else(|| panic!("no NotificationResponse: {msgs:?}"));
    assert_eq!(&notification[..4], &pid.to_be_bytes(), "the sender's pid");
    assert_eq!(&notification[4..], b"tg_pid_test\0hello\0");

    let mut other = Session::app(addr, &token);
    assert_eq!(
        other.scalar(&format!("select pg_terminate_backend({pid})")),
        "t"
    );
    let (got, _) = s.raw.read_until_end(Duration::from_secs(10));
    let (messages, _) = split_messages(&got);
    let fatal = messages
        .iter()
        .find(|(t, _)| *t == b'E')
        .unwrap_or_else(|| panic!("no error after pg_terminate_backend: {got:?}"));
    assert_eq!(error_fields(&fatal.1).0, "57P01");
    assert_eq!(other.scalar("select 1"), "1");
    env.assert_log_clean();
}

/// tokio-postgres's cancel_token() works through tollgate within a second.
#[test]
fn tokio_postgres_cancel_token() {
    let mut env = Env::new();
    let token = env.create_token(&["--user", "app"]);
    env.start_proxy();
    runtime().block_on(async {
        let client = pg_connect(&env.conn_str("app", "appdb", &token))
            .await
            .unwrap();
        let cancel = client.cancel_token();
        let query = tokio::spawn(async move {
            let r = client.simple_query("select pg_sleep(30)").await;
            (r, client)
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        let started = Instant::now();
        cancel.cancel_query(tokio_postgres::NoTls).await.unwrap();
        let (r, client) = query.await.unwrap();
        assert_eq!(r.unwrap_err().as_db_error().unwrap().code().code(), "57014");
        assert!(started.elapsed() < Duration::from_secs(1));
        let one: i32 = client.query_one("select 1", &[]).await.unwrap().get(0);
        assert_eq!(one, 1);
    });
}

/// psql's Ctrl-C (SIGINT) cancels the running statement through tollgate.
#[test]
fn psql_ctrl_c_cancels() {
    let (env, token, addr) = running_with_app_token();
    let mut psql = pg_tool("psql")
        .args(["-X", "-h", "127.0.0.1", "-p"])
        .arg(addr.port().to_string())
        .args(["-U", "app", "-d", "appdb", "-c", "select pg_sleep(30)"])
        .env("PGPASSWORD", &token)
        .env("PGSSLMODE", "disable")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    assert!(eventually(Duration::from_secs(10), || active_sleeps(&env) == 1));
    let started = Instant::now();
    sigint(psql.id());
    let status = loop {
        if let Some(s) = psql.try_wait().unwrap() {
            break s;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "psql did not stop"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let took = started.elapsed();
    let mut stderr = String::new();
    psql.stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(!status.success());
    assert!(
        stderr.contains("canceling statement due to user request"),
        "{stderr}"
    );
    assert!(took < Duration::from_secs(1), "cancel took {took:?}");
}

fn sigint(pid: u32) {
    let ok = std::process::Command::new("kill")
        .args(["-INT", &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
}

/// A client asking for protocol 3.2 with a `_pq_.` option gets exactly the
/// NegotiateProtocolVersion the server gives a direct client, and then a
/// 3.0 (4-byte) cancel key; a 3.0 client gets no negotiation at all.
#[test]
fn protocol_negotiation_is_the_servers_answer() {
    let (env, token, addr) = running_with_app_token();
    let pairs = [
        ("user", "app"),
        ("database", "appdb"),
        ("_pq_.test_option", "1"),
    ];

    let mut direct = Raw::connect(format!("127.0.0.1:{}", env.cluster.port()).parse().unwrap());
    direct.send(&startup(2, &pairs));
    let (tag, direct_npv) = direct.read_message();
    assert_eq!(tag, b'v');

    let s = Session::open(addr, 2, &pairs, &token);
    assert_eq!(s.login[0], (b'v', direct_npv.clone()), "{:?}", s.login);
    assert_eq!(s.login[1].0, b'R');
    assert_eq!(s.key().1.len(), 4);
    assert_eq!(&direct_npv[..4], &(3u32 << 16).to_be_bytes());

    let s = Session::app(addr, &token);
    assert!(s.login.iter().all(|(t, _)| *t != b'v'));
    assert_eq!(s.login[0].0, b'R');
}

/// Replication start-ups need a token that allows them.
#[test]
fn replication_needs_a_token_rule() {
    let mut env = Env::new();
    let plain = env.create_token(&["--user", "app"]);
    let repl = env.create_token(&["--user", "app", "--allow-replication"]);
    let addr = env.start_proxy();
    env.cluster
        .psql("postgres", "alter role app replication")
        .unwrap();
    let pairs = [
        ("user", "app"),
        ("database", "appdb"),
        ("replication", "database"),
    ];

    let s = Session::open(addr, 0, &pairs, &plain);
    assert_eq!(sqlstate(&s.login).as_deref(), Some("0A000"));

    let mut s = Session::open(addr, 0, &pairs, &repl);
    assert_eq!(sqlstate(&s.login), None, "{:?}", s.login);
    s.query("IDENTIFY_SYSTEM");
    let msgs = s.until_ready();
    assert!(msgs.iter().any(|(t, _)| *t == b'D'), "{msgs:?}");
    assert!(env.log().contains("replication_not_allowed"));
}

/// A backend terminated by an administrator: the client gets the server's
/// own FATAL and a closed connection, other sessions carry on.
#[test]
fn terminated_backend_error_is_relayed_and_others_continue() {
    let mut env = Env::new();
    let token = env.create_token(&["--user", "app"]);
    let addr = env.start_proxy();
    let mut a = Session::app(addr, &token);
    let mut b = Session::app(addr, &token);
    let a_pid = a.scalar("select pg_backend_pid()");
    b.query("begin; select 1");
    b.until_ready();
    env.cluster
        .psql("postgres", &format!("select pg_terminate_backend({a_pid})"))
        .unwrap();
    let rest = a.raw.read_to_close();
    assert_eq!(rest[0], b'E');
    let (code, _) = error_fields(&rest[5..]);
    assert_eq!(code, "57P01");
    assert_eq!(b.scalar("select 2"), "2");
}

/// A backend that dies without a word (SIGKILL) leaves the client a FATAL
/// 08006 from tollgate; after the server restarts, new sessions work
/// without restarting tollgate.
#[test]
fn server_crash_and_restart() {
    let mut env = Env::new();
    let token = env.create_token(&["--user", "app"]);
    let addr = env.start_proxy();
    let mut a = Session::app(addr, &token);
    let pid = a.scalar("select pg_backend_pid()");
    let killed = std::process::Command::new("kill")
        .args(["-KILL", &pid])
        .status()
        .unwrap();
    assert!(killed.success());
    let rest = a.raw.read_to_close();
    assert_eq!(rest.first(), Some(&b'E'), "{rest:?}");
    let (code, message) = error_fields(&rest[5..]);
    assert_eq!(code, "08006");
    assert_eq!(message, "server closed the connection unexpectedly");

    // Crash recovery, then a full restart: tollgate needs neither.
    assert!(eventually(Duration::from_secs(20), || {
        login_works(addr, &token)
    }));
    let mut b = Session::app(addr, &token);
    env.cluster.restart().unwrap();
    let rest = b.raw.read_to_close();
    assert_eq!(rest.first(), Some(&b'E'));
    assert_eq!(error_fields(&rest[5..]).0, "57P01");
    assert!(login_works(addr, &token));
}

fn login_works(addr: SocketAddr, token: &str) -> bool {
    let mut raw = Raw::connect(addr);
    raw.send(&startup(0, &[("user", "app"), ("database", "appdb")]));
    raw.read_message();
    raw.send(&password_message(token));
    loop {
        match raw.read_message().0 {
            b'Z' => return true,
            b'E' => return false,
            _ => {}
        }
    }
}

/// A client that vanishes mid-query or mid-COPY: the query is cancelled,
/// and the server connection is closed (`[pool] mode = "off"`) or reset
/// and kept idle for the next client (session pooling).
#[test]
fn vanished_client_has_its_query_cancelled() {
    vanished_client("off");
    vanished_client("session");
}

fn vanished_client(mode: &str) {
    let mut env = Env::build(EnvOptions {
        tables: format!("[pool]\nmode = \"{mode}\"\n"),
        ..EnvOptions::default()
    });
    let token = env.create_token(&["--user", "app"]);
    let addr = env.start_proxy();
    env.cluster
        .psql(
            "appdb",
            "create table sink(t text); grant all on sink to app",
        )
        .unwrap();
    // Closed, or idle in the pool: in neither case still working.
    let settled = |env: &Env| -> bool {
        let busy = if mode == "off" {
            "select count(*) from pg_stat_activity where usename = 'app'"
        } else {
            "select count(*) from pg_stat_activity where usename = 'app' and state <> 'idle'"
        };
        env.cluster.psql("postgres", busy).unwrap() == "0"
    };

    let mut s = Session::app(addr, &token);
    s.query("select pg_sleep(30)");
    assert!(eventually(Duration::from_secs(5), || active_sleeps(&env) == 1));
    let started = Instant::now();
    drop(s);
    assert!(
        eventually(Duration::from_secs(2), || settled(&env)),
        "{mode}"
    );
    assert!(started.elapsed() < Duration::from_secs(2));

    let mut s = Session::app(addr, &token);
    s.query("copy sink from stdin");
    let (tag, _) = s.raw.read_message();
    assert_eq!(tag, b'G');
    let mut data = bytes::BytesMut::new();
    postgres_protocol::message::frontend::CopyData::new(&b"half a row"[..])
        .unwrap()
        .write(&mut data);
    s.raw.send(&data);
    drop(s);
    assert!(
        eventually(Duration::from_secs(2), || settled(&env)),
        "{mode}"
    );
    let rows = env
        .cluster
        .psql("appdb", "select count(*) from sink")
        .unwrap();
    assert_eq!(rows, "0");

    let log = env.log();
    assert!(log.contains("query of a departed client cancelled"));
    assert_eq!(log.matches("session ended").count(), 2);
}

/// An upstream that accepts but never answers the start-up: the connect
/// timeout ends the attempt with 08001.
#[test]
fn silent_upstream_times_out_with_08001() {
    let mut env = Env::build(EnvOptions {
        upstream: "connect_timeout = \"500ms\"".into(),
        ..EnvOptions::default()
    });
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_port = silent.local_addr().unwrap().port();
    let held = std::thread::spawn(move || {
        // Accept and hold connections without a word.
        let mut open: Vec<TcpStream> = Vec::new();
        for c in silent.incoming().take(1) {
            open.push(c.unwrap());
        }
        std::thread::sleep(Duration::from_secs(5));
    });
    let config = std::fs::read_to_string(&env.config).unwrap();
    let config = config.replace(
        &format!("port = {}\n", env.cluster.port()),
        &format!("port = {silent_port}\n"),
    );
    std::fs::write(&env.config, config).unwrap();
    let token = env.create_token(&["--user", "app"]);
    let addr = env.start_proxy();
    let started = Instant::now();
    let s = Session::app(addr, &token);
    let took = started.elapsed();
    assert_eq!(sqlstate(&s.login).as_deref(), Some("08001"));
    assert!(
        took >= Duration::from_millis(450) && took < Duration::from_secs(2),
        "{took:?}"
    );
    drop(held);
}
