//! End-to-end: real clients through the real binary to a real Postgres.

use std::time::Duration;

use crate::harness::*;

/// tokio-postgres through tollgate returns what a direct connection returns,
/// in simple and extended mode, text and binary.
#[test]
fn tokio_postgres_queries_match_a_direct_connection() {
    let mut env = Env::new();
    let token = env.create_token(&["--user", "app", "--database", "appdb"]);
    env.start_proxy();
    let via = env.conn_str("app", "appdb", &token);
    let direct = env.direct_conn_str();
    runtime().block_on(async {
        let proxy = pg_connect(&via).await.expect("connect through tollgate");
        let direct = pg_connect(&direct).await.unwrap();

        // Simple query protocol.
        let sql = "select g, md5(g::text), repeat('x', g * 100) from generate_series(1, 200) g";
        let a = proxy.simple_query(sql).await.unwrap();
        let b = direct.simple_query(sql).await.unwrap();
        assert_eq!(a.len(), b.len());
        let rows = |m: &[tokio_postgres::SimpleQueryMessage]| -> Vec<Vec<Option<String>>> {
            m.iter()
                .filter_map(|m| match m {
                    tokio_postgres::SimpleQueryMessage::Row(r) => {
                        Some((0..r.len()).map(|i| r.get(i).map(str::to_owned)).collect())
                    }
                    _ => None,
                })
                .collect()
        };
        assert_eq!(rows(&a), rows(&b));
        assert_eq!(rows(&a).len(), 200);

        // Extended protocol with parameters and binary results.
        let stmt = "select $1::int8 * 2, $2::text || 'z', now() is not null, '\\x00ff'::bytea";
        let a = proxy.query_one(stmt, &[&21i64, &"ab"]).await.unwrap();
        let b = direct.query_one(stmt, &[&21i64, &"ab"]).await.unwrap();
        assert_eq!(a.get::<_, i64>(0), 42);
        assert_eq!(a.get::<_, String>(1), b.get::<_, String>(1));
        assert!(a.get::<_, bool>(2));
        assert_eq!(a.get::<_, Vec<u8>>(3), vec![0u8, 255]);

        // A prepared statement reused, and a transaction.
        let prepared = proxy.prepare("select $1::int4 + 1").await.unwrap();
        for i in 0..50 {
            let r = proxy.query_one(&prepared, &[&i]).await.unwrap();
            assert_eq!(r.get::<_, i32>(0), i + 1);
        }
        proxy
            .batch_execute(
                "begin; create temp table t(x int); insert into t values (1),(2); commit",
            )
            .await
            .unwrap();
        let n: i64 = proxy
            .query_one("select sum(x) from t", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 3);

        // The session runs as the token's role, with the client's parameters.
        let r = proxy
            .query_one("select current_user::text, current_database()::text", &[])
            .await
            .unwrap();
        assert_eq!(
            (r.get::<_, String>(0), r.get::<_, String>(1)),
            ("app".into(), "appdb".into())
        );

        // A server error mid-session reaches the client and the session survives.
        let e = proxy.simple_query("select 1/0").await.unwrap_err();
        assert_eq!(e.as_db_error().unwrap().code().code(), "22012");
        assert_eq!(
            proxy
                .query_one("select 7", &[])
                .await
                .unwrap()
                .get::<_, i32>(0),
            7
        );

        // A large value streams through in both directions.
        let big = "y".repeat(8 * 1024 * 1024);
        let r = proxy
            .query_one("select length($1::text), md5($1::text)", &[&big])
            .await
            .unwrap();
        assert_eq!(r.get::<_, i32>(0), big.len() as i32);
    });
    env.assert_log_clean();
}

/// psql with the token as its password, application_name passed through,
/// and two sessions at once.
#[test]
fn psql_and_pgbench_work_through_the_proxy() {
    let mut env = Env::new();
    let token = env.create_token(&["--user", "app", "--database", "appdb"]);
    env.start_proxy();
    let conn = format!(
        "{} application_name=tg-test",
        env.conn_str("app", "appdb", &token)
    );

    let out = pg_tool("psql")
        .args([
            &conn,
            "-XAt",
            "-c",
            "select current_setting('application_name'), current_user",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The client's own application_name, as on a direct connection.
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "tg-test|app");

    // `workers = 2` gives two shard threads (what `ps -T` shows).
    let mut shards: Vec<String> = std::fs::read_dir(format!("/proc/{}/task", env.pid()))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|c| c.trim().to_owned())
        .filter(|c| c.starts_with("tg-shard-"))
        .collect();
    shards.sort();
    assert_eq!(shards, ["tg-shard-0", "tg-shard-1"]);

    // Two psql sessions open at the same time both work.
    let mut a = pg_tool("psql")
        .args([&conn, "-XAt", "-c", "select pg_sleep(1); select 'a'"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let b = pg_tool("psql")
        .args([&conn, "-XAt", "-c", "select 'b'"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&b.stdout).trim(), "b");
    let a_out = {
        let status = a.wait().unwrap();
        assert!(status.success());
        let mut s = String::new();
        std::io::Read::read_to_string(a.stdout.as_mut().unwrap(), &mut s).unwrap();
        s
    };
    assert!(a_out.trim().ends_with('a'));

    // pgbench: initialise (COPY included), then select-only over the
    // extended protocol, all through tollgate.
    pgbench_through(env.addr(), &token, "extended", 3);
    env.assert_log_clean();
}

/// Every kind of bad token gets the same 28P01 bytes; the log tells them apart.
#[test]
fn bad_tokens_are_rejected_identically() {
    let mut env = Env::new();
    let good = env.create_token(&["--user", "app", "--database", "appdb"]);
    let expiring = env.create_token(&["--user", "app", "--ttl", "1s"]);
    let revoked = env.create_token(&["--user", "app"]);
    let other_role = env.create_token(&["--user", "ro"]);
    let revoked_id = &revoked[3..15];
    env.token_cmd(&["revoke", revoked_id]);
    let listing = env.token_cmd(&["list"]);
    assert!(listing
        .lines()
        .any(|l| l.starts_with(revoked_id) && l.contains("revoked")));
    assert!(
        !listing.contains(&good[16..]),
        "token list printed a secret"
    );
    env.start_proxy();
    std::thread::sleep(Duration::from_millis(1200)); // let `expiring` expire

    // Well-formed tokens (valid checksum) that were never issued.
    let with_checksum = |body: String| {
        let crc = crc32fast::hash(body.as_bytes());
        format!("{body}{crc:08x}")
    };
    let unknown = with_checksum(format!("tg_zzzzzzzzzzzz_{}", &good[16..80]));
    let wrong_secret = with_checksum(format!("{}{}", &good[..16], "5".repeat(64)));

    let cases = [
        ("malformed", "app", "appdb", "not-a-token".to_owned()),
        ("unknown", "app", "appdb", unknown),
        ("wrong secret", "app", "appdb", wrong_secret),
        ("expired", "app", "appdb", expiring.clone()),
        ("revoked", "app", "appdb", revoked.clone()),
        ("wrong database", "app", "postgres", good.clone()),
        ("wrong user", "ro", "appdb", good.clone()),
        ("other role's token", "app", "appdb", other_role.clone()),
    ];
    let mut responses = Vec::new();
    for (what, user, db, token) in &cases {
        let mut raw = Raw::connect(env.addr());
        raw.send(&startup_message(&[("user", user), ("database", db)]));
        let (tag, body) = raw.read_message();
        assert_eq!(
            (tag, &body[..]),
            (b'R', &3i32.to_be_bytes()[..]),
            "{what}: password request"
        );
        raw.send(&password_message(token));
        let rest = raw.read_to_close();
        let (code, message) = error_fields(&rest[5..]);
        assert_eq!(code, "28P01", "{what}");
        assert_eq!(
            message,
            format!("token authentication failed for user \"{user}\""),
            "{what}"
        );
        if *user == "app" {
            responses.push((what, rest));
        }
    }
    for (what, r) in &responses {
        assert_eq!(r, &responses[0].1, "{what} differs from {}", responses[0].0);
    }

    // And through a real driver.
    runtime().block_on(async {
        let (code, _) = connect_error(&env.conn_str("app", "appdb", &revoked)).await;
        assert_eq!(code, "28P01");
        assert!(pg_connect(&env.conn_str("app", "appdb", &good))
            .await
            .is_ok());
    });

    let log = env.log();
    for reason in [
        "malformed",
        "unknown_token",
        "bad_secret",
        "expired",
        "revoked",
        "database_not_allowed",
        "user_not_allowed",
    ] {
        assert!(log.contains(reason), "the log does not name \"{reason}\"");
    }
    assert!(
        log.contains(revoked_id),
        "the log does not name the token id"
    );
    env.assert_log_clean();
}

/// How a server answered a start-up attempt.
#[derive(Debug, PartialEq, Eq)]
enum Answer {
    /// Closed without a word.
    Silence,
    /// One FATAL ErrorResponse with this SQLSTATE.
    Fatal(String),
    /// An error in protocol 2.0's format ('E' and a bare string).
    FatalV2,
    /// It went on with the start-up: an authentication request.
    Proceeded,
}

/// Sends `bytes` to `addr` (then half-closes, with `close`) and says how
/// the server answered.
fn answer(addr: std::net::SocketAddr, bytes: &[u8], close: bool) -> Answer {
    let mut raw = Raw::connect(addr);
    raw.send(bytes);
    if close {
        raw.0.shutdown(std::net::Shutdown::Write).unwrap();
    }
    let (got, ending) = raw.read_until_end(Duration::from_secs(3));
    match got.first() {
        None => {
            assert_ne!(ending, Ending::StillOpen, "no answer and no close");
            Answer::Silence
        }
        Some(b'R') => Answer::Proceeded,
        Some(b'E') => match split_messages(&got).0.first() {
            Some((_, body)) => Answer::Fatal(error_fields(body).0),
            None => Answer::FatalV2,
        },
        Some(_) => panic!("unexpected answer {got:?}"),
    }
}

/// Broken start-ups are answered as Postgres answers them
/// (`ProcessStartupPacket`): each case goes to tollgate and straight to the
/// server, and both close without a word (a packet that cannot be framed)
/// or both send one FATAL with the same SQLSTATE (one framed but not
/// acceptable). Silent refusals are still in the audit log. Other sessions
/// carry on throughout.
#[test]
fn malformed_startup_is_refused_as_postgres_refuses_it() {
    let mut env = Env::new();
    let token = env.create_token(&["--user", "app"]);
    env.start_proxy();
    let direct = std::net::SocketAddr::from(([127, 0, 0, 1], env.cluster.port()));
    let v3 = [0u8, 3, 0, 0];
    let cases: Vec<(&str, Vec<u8>, bool, Answer)> = vec![
        (
            "length too large",
            [&20_000i32.to_be_bytes()[..], &v3].concat(),
            false,
            Answer::Silence,
        ),
        (
            "negative length",
            [&(-5i32).to_be_bytes()[..], &v3].concat(),
            false,
            Answer::Silence,
        ),
        // Postgres's limit of 10000 bytes excludes the length word.
        (
            "length 10005",
            [&10_005i32.to_be_bytes()[..], &v3].concat(),
            false,
            Answer::Silence,
        ),
        (
            "length below 8",
            [&4i32.to_be_bytes()[..], &v3].concat(),
            false,
            Answer::Silence,
        ),
        // node-postgres's connect-then-end: Terminate before anything.
        (
            "Terminate first",
            b"X\0\0\0\x04".to_vec(),
            false,
            Answer::Silence,
        ),
        (
            "PasswordMessage first",
            password_message(&token),
            false,
            Answer::Silence,
        ),
        (
            "CancelRequest without a key",
            [
                &12i32.to_be_bytes()[..],
                &80877102i32.to_be_bytes(),
                &[0; 4],
            ]
            .concat(),
            false,
            Answer::Silence,
        ),
        ("two bytes, then close", vec![0, 0], true, Answer::Silence),
        (
            "half a start-up packet, then close",
            startup_message(&[("user", "app")])[..10].to_vec(),
            true,
            Answer::Silence,
        ),
        (
            "no terminator",
            [&12i32.to_be_bytes()[..], &v3, b"user"].concat(),
            false,
            Answer::Fatal("08P01".into()),
        ),
        (
            "protocol 4.0",
            [&9i32.to_be_bytes()[..], &[0, 4, 0, 0, 0]].concat(),
            false,
            Answer::Fatal("0A000".into()),
        ),
        (
            "no user",
            startup_message(&[("database", "appdb")]),
            false,
            Answer::Fatal("28000".into()),
        ),
    ];
    runtime().block_on(async {
        let healthy = pg_connect(&env.conn_str("app", "appdb", &token))
            .await
            .unwrap();
        healthy.simple_query("begin; select 1").await.unwrap();
        for (what, bytes, close, want) in &cases {
            assert_eq!(&answer(direct, bytes, *close), want, "{what}: Postgres");
            assert_eq!(&answer(env.addr(), bytes, *close), want, "{what}: tollgate");
        }
        // A 2.0 client: Postgres answers in 2.0's error format, tollgate in
        // 3.0's (0A000), which no 2.0 client is left to read.
        let v2 = [&9i32.to_be_bytes()[..], &[0, 2, 0, 0, 0]].concat();
        assert_eq!(answer(direct, &v2, false), Answer::FatalV2);
        assert_eq!(
            answer(env.addr(), &v2, false),
            Answer::Fatal("0A000".into())
        );
        // Where tollgate is stricter, on purpose: a duplicate parameter
        // (`user` twice would let tollgate check one name and the server
        // log in another) and bytes that are not UTF-8.
        for (what, bytes) in [
            (
                "user twice",
                startup_message(&[("user", "app"), ("user", "postgres")]),
            ),
            (
                "not UTF-8",
                [&19i32.to_be_bytes()[..], &v3, b"user\0app\xff\0\0"].concat(),
            ),
        ] {
            assert_eq!(answer(direct, &bytes, false), Answer::Proceeded, "{what}");
            let got = answer(env.addr(), &bytes, false);
            assert_eq!(got, Answer::Fatal("08P01".into()), "{what}");
        }

        // A query instead of a password.
        let mut raw = Raw::connect(env.addr());
        raw.send(&startup_message(&[("user", "app")]));
        raw.read_message();
        raw.send(b"Q\0\0\0\x0dselect 1\0");
        let got = raw.read_to_close();
        assert_eq!(error_fields(&got[5..]).0, "08P01");

        // The open session still works, mid-transaction.
        let r = healthy.simple_query("select 41 + 1; commit").await.unwrap();
        let answer = r.iter().find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0).map(str::to_owned),
            _ => None,
        });
        assert_eq!(answer.as_deref(), Some("42"));
    });
    // The silent refusals are in the audit log with their reasons.
    let log = env.log();
    for reason in ["startup_length", "startup_request_length", "client_left"] {
        let line = format!("outcome=\"rejected\" reason=\"{reason}\"");
        let rejected: Vec<&str> = log.lines().filter(|l| l.contains("rejected")).collect();
        assert!(
            log.contains(&line),
            "no {line:?} in the log:\n{}",
            rejected.join("\n")
        );
    }
    env.assert_log_clean();
}

/// A client that never finishes start-up is cut off at the deadline.
#[test]
fn slow_startup_times_out() {
    let mut env = Env::with(
        tollgate::cluster::HbaAuth::ScramSha256,
        "startup_timeout = \"1s\"",
    );
    env.start_proxy();
    let mut raw = Raw::connect(env.addr());
    raw.send(&[0, 0, 0]); // part of a length word, then silence
    let started = std::time::Instant::now();
    let got = raw.read_to_close();
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
        "{waited:?}"
    );
    assert_eq!(error_fields(&got[5..]).0, "08P01");
}

/// Upstream down: 08001 with a message that names no internal address.
#[test]
fn upstream_down_is_08001() {
    let mut env = Env::new();
    let token = env.create_token(&["--user", "app"]);
    env.start_proxy();
    let port = env.cluster.port();
    env.cluster.stop();
    runtime().block_on(async {
        let (code, message) = connect_error(&env.conn_str("app", "appdb", &token)).await;
        assert_eq!(code, "08001");
        assert!(!message.contains(&port.to_string()), "{message}");
    });
    assert!(env.log().contains("upstream login failed"));
}

/// md5 and cleartext upstream logins work too.
#[test]
fn md5_and_password_upstreams() {
    for auth in [
        tollgate::cluster::HbaAuth::Md5,
        tollgate::cluster::HbaAuth::Password,
    ] {
        let mut env = Env::with(auth, "");
        let token = env.create_token(&["--user", "app"]);
        env.start_proxy();
        runtime().block_on(async {
            let c = pg_connect(&env.conn_str("app", "appdb", &token))
                .await
                .unwrap();
            assert_eq!(
                c.query_one("select 5", &[]).await.unwrap().get::<_, i32>(0),
                5
            );
        });
        env.assert_log_clean();
    }
}

/// `max_connections` refuses the excess with 53300, after reading the start-up.
#[test]
fn too_many_connections_is_53300() {
    let mut env = Env::with(
        tollgate::cluster::HbaAuth::ScramSha256,
        "max_connections = 2",
    );
    let token = env.create_token(&["--user", "app"]);
    env.start_proxy();
    runtime().block_on(async {
        let a = pg_connect(&env.conn_str("app", "appdb", &token))
            .await
            .unwrap();
        let b = pg_connect(&env.conn_str("app", "appdb", &token))
            .await
            .unwrap();
        let (code, _) = connect_error(&env.conn_str("app", "appdb", &token)).await;
        assert_eq!(code, "53300");
        drop(a);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let c = pg_connect(&env.conn_str("app", "appdb", &token))
            .await
            .unwrap();
        c.simple_query("select 1").await.unwrap();
        b.simple_query("select 1").await.unwrap();
    });
}

/// Both of tollgate's sockets of a session probe a silent peer with TCP
/// keepalive, after `tcp_keepalive` of silence.
#[test]
fn tcp_keepalive_on_both_sides() {
    let mut env = Env::with(
        tollgate::cluster::HbaAuth::ScramSha256,
        "tcp_keepalive = \"45s\"",
    );
    let token = env.create_token(&["--user", "app"]);
    env.start_proxy();
    let proxy_port = env.addr().port();
    let pg_port = env.cluster.port();
    runtime().block_on(async {
        let client = pg_connect(&env.conn_str("app", "appdb", &token))
            .await
            .unwrap();
        client.simple_query("select 1").await.unwrap();
        // `ss -o` shows a keepalive timer on sockets that have one.
        let sockets = |filter: &str| {
            let out = std::process::Command::new("ss")
                .args(["-tonH", "state", "established", filter])
                .output()
                .expect("ss (iproute2) is installed");
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        // While bytes are unacknowledged, ss shows the retransmit timer
        // instead: wait for both sides to be quiet.
        let deadline = std::time::Instant::now() + Duration::from_secs(3);
        let (client_side, server_side) = loop {
            let c = sockets(&format!("( sport = :{proxy_port} )"));
            let s = sockets(&format!("( dport = :{pg_port} )"));
            let quiet = !c.contains("timer:(on") && !s.contains("timer:(on");
            if quiet || std::time::Instant::now() > deadline {
                break (c, s);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        for (side, lines) in [("client", &client_side), ("server", &server_side)] {
            assert!(!lines.trim().is_empty(), "no {side}-side socket found");
            for line in lines.lines() {
                let timer = line
                    .split("timer:(keepalive,")
                    .nth(1)
                    .unwrap_or_else(|| panic!("{side} side without keepalive: {line}"));
                let secs: u64 = timer
                    .split("sec")
                    .next()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or_else(|| panic!("unreadable timer: {line}"));
                assert!(secs <= 45, "{side} keepalive in {secs}s: {line}");
            }
        }
        drop(client);
    });
}
