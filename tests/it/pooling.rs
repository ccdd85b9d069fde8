//! Warm server connections (`[pool] mode = "session"`, the default): a
//! client's server connection is reset and kept for the next client, and
//! nothing one client did is visible to the next. Each test runs against a
//! real PostgreSQL; most use one shard, so that consecutive clients meet
//! the same pool.

use std::collections::BTreeMap;
use std::io::Read;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tollgate::cluster::HbaAuth;

use crate::harness::*;

/// An environment with `workers` shards and `pool` inside `[pool]`.
fn env_with(workers: usize, pool: &str, auth: HbaAuth) -> Env {
    Env::build(EnvOptions {
        auth,
        workers,
        tables: format!("[pool]\n{pool}\n"),
        ..EnvOptions::default()
    })
}

async fn one_row(c: &tokio_postgres::Client, sql: &str) -> String {
    let row = c.query_one(sql, &[]).await.unwrap();
    row.get::<_, Option<String>>(0).unwrap_or_default()
}

async fn backend_pid(c: &tokio_postgres::Client) -> i32 {
    c.query_one("select pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0)
}

/// A client on backend `pid`: the previous client's reset runs after it
/// left, so a client arriving at once may get a new login meanwhile. The
/// clients that got other backends stay connected until then, so that
/// the next attempt cannot be given the same other backend again (the
/// pool hands out the most recently returned first).
async fn connect_on(conn: &str, pid: i32) -> tokio_postgres::Client {
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut others = Vec::new();
    loop {
        let c = pg_connect(conn).await.unwrap();
        if backend_pid(&c).await == pid {
            return c;
        }
        assert!(
            Instant::now() < deadline,
            "backend {pid} was never pooled again"
        );
        others.push(c);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The first column of the first row, by the simple protocol (which
/// leaves no prepared statement behind, unlike tokio-postgres's `query`).
async fn simple_one(c: &tokio_postgres::Client, sql: &str) -> String {
    for m in c.simple_query(sql).await.unwrap() {
        if let tokio_postgres::SimpleQueryMessage::Row(r) = m {
            return r.get(0).unwrap_or_default().to_owned();
        }
    }
    panic!("no row from {sql}");
}

#[test]
fn the_next_client_gets_the_same_backend_and_a_clean_session() {
    let mut env = env_with(1, "", HbaAuth::ScramSha256);
    env.cluster
        .psql(
            "appdb",
            "create role other nologin; grant other to app; \
             create table pool_t(id int primary key, v text); \
             insert into pool_t values (1, 'one'); grant all on pool_t to app, other;",
        )
        .unwrap();
    let token = env.create_token(&["-u", "app", "-d", "appdb"]);
    env.start_proxy();
    let conn = env.conn_str("app", "appdb", &token);
    runtime().block_on(async {
        let first = pg_connect(&conn).await.unwrap();
        let pid = backend_pid(&first).await;
        first
            .batch_execute(
                "set timezone = 'Asia/Tokyo'; set work_mem = '7MB';
                 create temp table scratch(x int);
                 prepare sql_level as select 1;
                 listen pool_channel;
                 select pg_advisory_lock(42);
                 declare held cursor with hold for select 1;
                 set role other;",
            )
            .await
            .unwrap();
        // A statement prepared at the protocol level (Parse with a name).
        let stmt = first.prepare("select $1::int + 1").await.unwrap();
        first.query_one(&stmt, &[&1i32]).await.unwrap();
        assert_eq!(one_row(&first, "select current_user::text").await, "other");
        drop(first);

        let second = connect_on(&conn, pid).await;
        let checks = [
            ("select current_setting('TimeZone')", "Etc/UTC"),
            ("select current_setting('work_mem')", "4MB"),
            ("select current_user::text", "app"),
            ("select session_user::text", "app"),
            ("select coalesce(to_regclass('pg_temp.scratch')::text, 'none')", "none"),
            ("select count(*)::text from pg_prepared_statements", "0"),
            ("select count(*)::text from pg_listening_channels()", "0"),
            (
                "select count(*)::text from pg_locks where locktype = 'advisory' and pid = pg_backend_pid()",
                "0",
            ),
            ("select count(*)::text from pg_cursors", "0"),
        ];
        for (sql, want) in checks {
            assert_eq!(simple_one(&second, sql).await, want, "{sql}");
        }
    });
    let log = env.log();
    assert!(log.contains("server_reused=true"), "audit shows the reuse");
    env.assert_log_clean();
}

/// Everything a start-up yields up to ReadyForQuery, over a raw socket:
/// ParameterStatus values and the BackendKeyData process id.
struct Greeting {
    params: BTreeMap<String, String>,
    pid: u32,
}

fn raw_login(addr: SocketAddr, params: &[(&str, &str)], password: Option<&str>) -> Greeting {
    let mut raw = Raw::connect(addr);
    raw.send(&startup_message(params));
    let mut greeting = Greeting {
        params: BTreeMap::new(),
        pid: 0,
    };
    loop {
        let (tag, body) = raw.read_message();
        match tag {
            b'R' if body[..4] == [0, 0, 0, 3] => {
                raw.send(&password_message(password.expect("asked for a password")))
            }
            b'R' => {}
            b'S' => {
                let mut parts = body.split(|b| *b == 0);
                let k = String::from_utf8(parts.next().unwrap().to_vec()).unwrap();
                let v = String::from_utf8(parts.next().unwrap().to_vec()).unwrap();
                greeting.params.insert(k, v);
            }
            b'K' => greeting.pid = u32::from_be_bytes(body[..4].try_into().unwrap()),
            b'Z' => break,
            b'E' => panic!("login failed: {:?}", error_fields(&body)),
            _ => {}
        }
    }
    raw.send(b"X\0\0\0\x04");
    let mut rest = Vec::new();
    let _ = raw.0.read_to_end(&mut rest);
    greeting
}

#[test]
fn each_client_sees_its_own_start_up_parameters_as_a_direct_login_shows_them() {
    // One connection: a client that comes while the last one's is still
    // being reset waits for it rather than logging in another (on a
    // loaded machine the reset can take longer than the next login).
    let mut env = env_with(1, "max_server_connections = 1", HbaAuth::Trust);
    let token = env.create_token(&["-u", "app", "-d", "appdb"]);
    let proxy = env.start_proxy();
    let direct: SocketAddr = format!("127.0.0.1:{}", env.cluster.port()).parse().unwrap();
    let cases: [&[(&str, &str)]; 5] = [
        &[("application_name", "first"), ("TimeZone", "Asia/Tokyo")],
        &[("application_name", "second"), ("DateStyle", "SQL, DMY")],
        &[
            ("search_path", "\"$user\", pg_catalog"),
            ("IntervalStyle", "iso_8601"),
        ],
        &[("client_encoding", "LATIN1"), ("extra_float_digits", "2")],
        &[],
    ];
    let mut pids = Vec::new();
    for extra in cases {
        let mut params = vec![("user", "app"), ("database", "appdb")];
        params.extend_from_slice(extra);
        let via = raw_login(proxy, &params, Some(&token));
        let straight = raw_login(direct, &params, None);
        assert_eq!(via.params, straight.params, "ParameterStatus for {extra:?}");
        pids.push(via.pid);
    }
    assert!(
        pids.windows(2).all(|w| w[0] == w[1]),
        "one pooled backend served all: {pids:?}"
    );
    // A parameter passed in `options` shapes the login: another backend,
    // and the value a direct login would show.
    let with_options = [
        ("user", "app"),
        ("database", "appdb"),
        ("options", "-c TimeZone=Europe/Paris"),
    ];
    let via = raw_login(proxy, &with_options, Some(&token));
    let straight = raw_login(direct, &with_options, None);
    assert_eq!(via.params, straight.params);
    assert_ne!(via.pid, pids[0]);
    // search_path, which PostgreSQL 15 does not report, checked with SHOW.
    runtime().block_on(async {
        let c = pg_connect(&format!(
            "{} options='-c search_path=public'",
            env.conn_str("app", "appdb", &token)
        ))
        .await
        .unwrap();
        assert_eq!(one_row(&c, "show search_path").await, "public");
        drop(c);
        let c = pg_connect(&env.conn_str("app", "appdb", &token))
            .await
            .unwrap();
        assert_eq!(one_row(&c, "show search_path").await, "\"$user\", public");
    });
}

#[test]
fn a_refused_start_up_parameter_is_fatal_as_at_a_direct_login() {
    let mut env = env_with(1, "", HbaAuth::ScramSha256);
    let token = env.create_token(&["-u", "app", "-d", "appdb"]);
    let addr = env.start_proxy();
    let mut raw = Raw::connect(addr);
    raw.send(&startup_message(&[
        ("user", "app"),
        ("database", "appdb"),
        ("TimeZone", "Not/AZone"),
    ]));
    let (tag, _) = raw.read_message();
    assert_eq!(tag, b'R');
    raw.send(&password_message(&token));
    let (tag, body) = raw.read_message();
    assert_eq!(tag, b'E', "an ErrorResponse");
    let (code, message) = error_fields(&body);
    assert_eq!(code, "22023");
    assert!(message.contains("TimeZone"), "{message}");
    assert!(
        tollgate::protocol::backend::parse_error_fields(&body).severity == "FATAL",
        "FATAL, as at start-up"
    );
    // The connection was not the client's fault: the next one works.
    runtime().block_on(async {
        let c = pg_connect(&env.conn_str("app", "appdb", &token))
            .await
            .unwrap();
        assert_eq!(one_row(&c, "select 'ok'").await, "ok");
    });
}

/// Sends one simple Query over a raw session and reads to ReadyForQuery
/// (or to CopyInResponse); returns the last tag and status byte.
fn raw_query(raw: &mut Raw, sql: &str) -> (u8, u8) {
    let mut q = vec![b'Q'];
    q.extend_from_slice(&((sql.len() + 5) as i32).to_be_bytes());
    q.extend_from_slice(sql.as_bytes());
    q.push(0);
    raw.send(&q);
    loop {
        let (tag, body) = raw.read_message();
        match tag {
            b'Z' => return (tag, body[0]),
            b'G' => return (tag, 0),
            _ => {}
        }
    }
}

/// A raw session through tollgate, logged in; its backend's pid.
fn raw_session(addr: SocketAddr, token: &str) -> (Raw, u32) {
    let mut raw = Raw::connect(addr);
    raw.send(&startup_message(&[("user", "app"), ("database", "appdb")]));
    let mut pid = 0;
    loop {
        let (tag, body) = raw.read_message();
        match tag {
            b'R' if body[..4] == [0, 0, 0, 3] => raw.send(&password_message(token)),
            b'K' => pid = u32::from_be_bytes(body[..4].try_into().unwrap()),
            b'Z' => return (raw, pid),
            b'E' => panic!("login failed: {:?}", error_fields(&body)),
            _ => {}
        }
    }
}

#[test]
fn a_client_that_vanishes_mid_transaction_mid_copy_or_mid_query_leaves_nothing_behind() {
    let mut env = env_with(1, "", HbaAuth::ScramSha256);
    env.cluster
        .psql(
            "appdb",
            "create table vanish(id int primary key, v text); insert into vanish values (1, 'one'); \
             grant all on vanish to app;",
        )
        .unwrap();
    let token = env.create_token(&["-u", "app", "-d", "appdb"]);
    let addr = env.start_proxy();
    let direct = env.direct_conn_str();
    let lock_free = || {
        runtime().block_on(async {
            let c = pg_connect(&direct).await.unwrap();
            c.batch_execute("set lock_timeout = '100ms'; begin; select * from vanish where id = 1 for update; rollback")
                .await
                .is_ok()
        })
    };

    // Mid-transaction, holding a row lock, with an uncommitted update.
    let (mut raw, pid) = raw_session(addr, &token);
    let (_, status) = raw_query(
        &mut raw,
        "begin; update vanish set v = 'changed' where id = 1",
    );
    assert_eq!(status, b'T');
    assert!(!lock_free(), "the row is locked while the client holds it");
    drop(raw);
    let deadline = Instant::now() + Duration::from_secs(2);
    while !lock_free() {
        assert!(Instant::now() < deadline, "the lock outlived its client");
        std::thread::sleep(Duration::from_millis(20));
    }

    // Mid-COPY: rows sent, no CopyDone.
    let (mut raw, pid2) = raw_session_retrying(addr, &token, pid);
    assert_eq!(pid2, pid, "the connection was reset and pooled");
    let (tag, _) = raw_query(&mut raw, "copy vanish from stdin");
    assert_eq!(tag, b'G', "CopyInResponse");
    let row = b"2\ttwo\n";
    let mut data = vec![b'd'];
    data.extend_from_slice(&((row.len() + 4) as i32).to_be_bytes());
    data.extend_from_slice(row);
    raw.send(&data);
    drop(raw);

    // Mid-query: a long sleep is cancelled rather than left running.
    let (mut raw, pid3) = raw_session_retrying(addr, &token, pid);
    assert_eq!(pid3, pid);
    let q = b"select pg_sleep(30)";
    let mut msg = vec![b'Q'];
    msg.extend_from_slice(&((q.len() + 5) as i32).to_be_bytes());
    msg.extend_from_slice(q);
    msg.push(0);
    raw.send(&msg);
    std::thread::sleep(Duration::from_millis(200));
    let vanished = Instant::now();
    drop(raw);

    runtime().block_on(async {
        // The next client gets the same backend, clean, well before the
        // sleep would have ended.
        let c = connect_on(&env.conn_str("app", "appdb", &token), pid as i32).await;
        assert!(vanished.elapsed() < Duration::from_secs(5));
        assert_eq!(
            one_row(&c, "select v from vanish where id = 1").await,
            "one"
        );
        assert_eq!(one_row(&c, "select count(*)::text from vanish").await, "1");
        c.batch_execute("begin; commit").await.unwrap();
    });
    env.assert_log_clean();
}

/// A raw session, retried until it lands on backend `pid` (a reset may
/// still be running when the next client arrives; see [`connect_on`]).
fn raw_session_retrying(addr: SocketAddr, token: &str, pid: u32) -> (Raw, u32) {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut others = Vec::new();
    loop {
        let (raw, got) = raw_session(addr, token);
        if got == pid || Instant::now() > deadline {
            return (raw, got);
        }
        others.push(raw);
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Backends of role `app` other than the caller's own.
#[test]
fn max_server_connections_caps_the_backends_and_the_rest_wait_in_line() {
    let mut env = env_with(2, "max_server_connections = 5", HbaAuth::ScramSha256);
    let token = env.create_token(&["-u", "app", "-d", "appdb"]);
    env.start_proxy();
    let conn = env.conn_str("app", "appdb", &token);
    let direct = env.direct_conn_str();
    runtime().block_on(async {
        let watcher = pg_connect(&direct).await.unwrap();
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let sampler = {
            let done = done.clone();
            tokio::spawn(async move {
                let mut most = 0;
                while !done.load(std::sync::atomic::Ordering::Relaxed) {
                    most = most.max(app_backends(&watcher).await);
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                most
            })
        };
        let clients: Vec<_> = (0..50)
            .map(|i| {
                let conn = conn.clone();
                tokio::spawn(async move {
                    let c = pg_connect(&conn)
                        .await
                        .map_err(|e| format!("client {i}: {e}"))?;
                    c.batch_execute("select pg_sleep(0.05)")
                        .await
                        .map_err(|e| format!("client {i}: {e}"))
                })
            })
            .collect();
        for c in clients {
            c.await.unwrap().unwrap();
        }
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        let most = sampler.await.unwrap();
        assert!(most <= 5, "{most} backends at once, limit 5");
        assert!(most >= 2, "the sampler saw the pool at work ({most})");
    });
}

#[test]
fn a_client_beyond_the_limit_gets_53300_after_checkout_timeout() {
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut env = env_with(
        1,
        &format!(
            "max_server_connections = 2\ncheckout_timeout = \"500ms\"\n\
             [admin]\nlisten = \"{admin}\""
        ),
        HbaAuth::ScramSha256,
    );
    let token = env.create_token(&["-u", "app", "-d", "appdb"]);
    env.start_proxy();
    let conn = env.conn_str("app", "appdb", &token);
    runtime().block_on(async {
        let a = pg_connect(&conn).await.unwrap();
        let b = pg_connect(&conn).await.unwrap();
        let started = Instant::now();
        let (code, message) = connect_error(&conn).await;
        assert_eq!(code, "53300", "{message}");
        assert!(message.contains("checkout_timeout"), "{message}");
        assert!(started.elapsed() >= Duration::from_millis(450));
        // A waiting client gets the first connection that comes back.
        let waiting = tokio::spawn({
            let conn = conn.clone();
            async move {
                let c = pg_connect(&conn).await.unwrap();
                backend_pid(&c).await
            }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        let freed = backend_pid(&a).await;
        drop(a);
        assert_eq!(waiting.await.unwrap(), freed);
        drop(b);
    });
    // What the admin API shows of it.
    let pools: serde_json::Value =
        serde_json::from_str(&http(admin, "GET", "/pools", None).body).unwrap();
    let pool = &pools[0];
    assert_eq!(pool["upstream"], "default");
    assert_eq!(pool["limit"], 2);
    assert_eq!(pool["checkout_timeouts"], 1);
    assert!(pool["checkouts_waited"].as_u64().unwrap() >= 1, "{pool}");
    assert!(pool["checkouts_reused"].as_u64().unwrap() >= 1, "{pool}");
    let metrics = http(admin, "GET", "/metrics", None).body;
    for line in [
        "tollgate_pool_checkout_timeouts_total{upstream=\"default\",shard=\"0\"} 1",
        "tollgate_pool_checkouts_total{upstream=\"default\",shard=\"0\",result=\"login\"} 2",
        "tollgate_pool_checkout_wait_seconds_count{upstream=\"default\"}",
    ] {
        assert!(metrics.contains(line), "{line} not in:\n{metrics}");
    }
}

#[test]
fn a_server_restart_empties_the_pool_and_the_next_clients_never_notice() {
    let mut env = env_with(1, "", HbaAuth::ScramSha256);
    let token = env.create_token(&["-u", "app", "-d", "appdb"]);
    env.start_proxy();
    let conn = env.conn_str("app", "appdb", &token);
    runtime().block_on(async {
        let open: Vec<_> = futures_join(&conn, 5).await;
        drop(open);
    });
    std::thread::sleep(Duration::from_millis(300));
    env.cluster.restart().unwrap();
    runtime().block_on(async {
        for i in 0..20 {
            let c = pg_connect(&conn)
                .await
                .unwrap_or_else(|e| panic!("client {i} after the restart: {e}"));
            assert_eq!(one_row(&c, "select 'ok'").await, "ok", "client {i}");
        }
    });
}

/// `n` clients connected at once.
async fn futures_join(conn: &str, n: usize) -> Vec<tokio_postgres::Client> {
    let mut v = Vec::new();
    for _ in 0..n {
        v.push(pg_connect(conn).await.unwrap());
    }
    v
}

#[test]
fn a_password_rotation_with_a_reload_fails_no_client_and_retires_old_connections() {
    // As many connections as the three opened first: between ALTER ROLE
    // and the reload a client must reuse one (a new login would fail),
    // and waits for one still being reset rather than logging in.
    let mut env = env_with(1, "max_server_connections = 3", HbaAuth::ScramSha256);
    let token = env.create_token(&["-u", "app", "-d", "appdb"]);
    env.start_proxy();
    let conn = env.conn_str("app", "appdb", &token);
    let old_pids: Vec<i32> = runtime().block_on(async {
        let open = futures_join(&conn, 3).await;
        let mut pids = Vec::new();
        for c in &open {
            pids.push(backend_pid(c).await);
        }
        pids
    });
    // The operator's order: the new password in Postgres, then in the
    // config, then a reload. Clients keep coming throughout.
    let new_password = "rotated-Pa55-word";
    env.cluster
        .psql(
            "appdb",
            &format!("alter role app password '{new_password}'"),
        )
        .unwrap();
    let client_round = |label: &str| {
        runtime().block_on(async {
            for i in 0..5 {
                let c = pg_connect(&conn)
                    .await
                    .unwrap_or_else(|e| panic!("{label} client {i}: {e}"));
                assert_eq!(one_row(&c, "select 'ok'").await, "ok");
            }
        })
    };
    client_round("between ALTER ROLE and the reload");
    let config = std::fs::read_to_string(&env.config).unwrap();
    std::fs::write(
        &env.config,
        config.replace(env.cluster.password(), new_password),
    )
    .unwrap();
    let reloads_before = env.log().matches("configuration reloaded").count();
    env.signal(libc::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(5);
    while env.log().matches("configuration reloaded").count() == reloads_before {
        assert!(Instant::now() < deadline, "no reload");
        std::thread::sleep(Duration::from_millis(20));
    }
    client_round("after the reload");
    // The connections logged in with the old password are gone.
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let alive: Vec<i32> = env
            .cluster
            .psql(
                "appdb",
                "select pid from pg_stat_activity where usename = 'app'",
            )
            .unwrap()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect();
        if old_pids.iter().all(|p| !alive.contains(p)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "old connections {old_pids:?} still in {alive:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_revoked_tokens_session_ends_and_its_connection_serves_the_next_client_clean() {
    let mut env = env_with(1, "", HbaAuth::ScramSha256);
    let revoked = env.create_token(&["-u", "app", "-d", "appdb"]);
    let other = env.create_token(&["-u", "app", "-d", "appdb"]);
    env.start_proxy();
    let id = revoked.split('_').nth(1).unwrap().to_owned();
    runtime().block_on(async {
        let (c, watch) = connect_watched(&env.conn_str("app", "appdb", &revoked)).await;
        let pid = backend_pid(&c).await;
        c.batch_execute("set timezone = 'Asia/Tokyo'; create temp table left_behind(x int)")
            .await
            .unwrap();
        let revoked_at = Instant::now();
        env.token_cmd(&["revoke", &id]);
        let (code, _) = ended(watch, Duration::from_secs(3)).await;
        assert_eq!(code, "57P01");
        assert!(revoked_at.elapsed() < Duration::from_secs(2));
        drop(c);
        let next = loop {
            let n = pg_connect(&env.conn_str("app", "appdb", &other))
                .await
                .unwrap();
            if backend_pid(&n).await == pid {
                break n;
            }
            assert!(
                revoked_at.elapsed() < Duration::from_secs(5),
                "never pooled again"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!(
            one_row(&next, "select current_setting('TimeZone')").await,
            "Etc/UTC"
        );
        assert_eq!(
            one_row(
                &next,
                "select coalesce(to_regclass('pg_temp.left_behind')::text, 'none')"
            )
            .await,
            "none"
        );
    });
}

#[test]
fn mode_off_gives_each_client_a_login_of_its_own() {
    let mut env = env_with(1, "mode = \"off\"", HbaAuth::ScramSha256);
    let token = env.create_token(&["-u", "app", "-d", "appdb"]);
    env.start_proxy();
    let conn = env.conn_str("app", "appdb", &token);
    runtime().block_on(async {
        let a = pg_connect(&conn).await.unwrap();
        let first = backend_pid(&a).await;
        drop(a);
        tokio::time::sleep(Duration::from_millis(100)).await;
        let b = pg_connect(&conn).await.unwrap();
        assert_ne!(backend_pid(&b).await, first, "a fresh backend");
        let direct = pg_connect(&env.direct_conn_str()).await.unwrap();
        assert_eq!(app_backends(&direct).await, 1, "only the open client's");
    });
    // No checkout to report: the audit event has no pooling fields.
    assert!(!env.log().contains("server_reused="));
}

/// With TLS on both legs (records opened and sealed by tollgate on both
/// sides, a server read that a kill cuts short included): a connection is
/// reused clean, and
/// one whose client was killed mid-query is cancelled, drained and reused.
#[test]
fn pooling_works_with_tls_on_both_legs() {
    let ca = Ca::new("pooling CA");
    let files = Files::new();
    let (options, ca_file) = tls_on_both_legs(&ca, &files, "require");
    let mut env = Env::build(EnvOptions {
        workers: 1,
        ..options
    });
    let token = env.create_token(&["--user", "app", "--database", "appdb"]);
    env.start_proxy();
    let conn = format!(
        "host=localhost hostaddr=127.0.0.1 port={} user=app dbname=appdb password={token} \
         sslmode=verify-full sslrootcert={}",
        env.addr().port(),
        ca_file.display()
    );
    let psql = |sql: &str| psql_ok(&conn, sql);
    let pid = psql("set timezone = 'Asia/Tokyo'; select pg_backend_pid()");
    // psql prints SET before the pid.
    let pid = pid.lines().last().unwrap().to_owned();
    // The reset runs after the client left; give it a moment.
    std::thread::sleep(Duration::from_millis(200));
    let (again, tz) = {
        let out = psql("select pg_backend_pid() || ' ' || current_setting('TimeZone')");
        let (p, t) = out.split_once(' ').unwrap();
        (p.to_owned(), t.to_owned())
    };
    if again != pid {
        let log = env.log();
        panic!("not reused over TLS ({again} != {pid}): {log}");
    }
    assert_eq!(tz, "Etc/UTC");

    // A client killed in the middle of a long query.
    let mut running = pg_tool("psql")
        .args([conn.as_str(), "-XAt", "-c", "select pg_sleep(30)"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(800));
    running.kill().unwrap();
    let _ = running.wait();
    let killed = Instant::now();
    let deadline = killed + Duration::from_secs(3);
    loop {
        let state = env
            .cluster
            .psql(
                "postgres",
                &format!("select state from pg_stat_activity where pid = {pid}"),
            )
            .unwrap();
        if state == "idle" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "backend {pid} still {state:?}: {}",
            env.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(200));
    let now = psql("select pg_backend_pid()");
    if now != pid {
        let log = env.log();
        let lines: Vec<_> = log
            .lines()
            .filter(|l| l.contains("server connection") || l.contains("cancel"))
            .collect();
        panic!("not reused: {}", lines.join("\n"));
    }
    // Idle within seconds of a 30 s sleep: it was cancelled.
    assert!(killed.elapsed() < Duration::from_secs(5));
}

/// Pids of the app role's backends, per the server.
fn app_pids(env: &Env) -> Vec<i32> {
    env.cluster
        .psql(
            "postgres",
            "select pid from pg_stat_activity where usename = 'app' and backend_type = 'client backend'",
        )
        .unwrap()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// Waits up to `within` for `ok` to hold.
fn eventually_holds(within: Duration, mut ok: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if ok() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn min_idle_opens_connections_at_start_and_idle_timeout_closes_the_rest() {
    let mut env = Env::build(EnvOptions {
        workers: 1,
        upstream: "databases = [\"appdb\"]".into(),
        tables: "[pool]\nmin_idle = 2\nidle_timeout = \"1s\"\n".into(),
        ..EnvOptions::default()
    });
    let token = env.create_token(&["-u", "app", "-d", "appdb"]);
    env.start_proxy();
    // Opened before any client came.
    assert!(
        eventually_holds(Duration::from_secs(5), || app_pids(&env).len() == 2),
        "min_idle at start: {:?}",
        app_pids(&env)
    );
    let warm = app_pids(&env);
    let conn = env.conn_str("app", "appdb", &token);
    runtime().block_on(async {
        // A client is served by one of them; five at once need three more.
        let c = pg_connect(&conn).await.unwrap();
        assert!(
            warm.contains(&backend_pid(&c).await),
            "a warm connection served it"
        );
        drop(c);
        let many = futures_join(&conn, 5).await;
        drop(many);
    });
    assert!(app_pids(&env).len() >= 5);
    // Idle past idle_timeout: closed down to min_idle, no further.
    assert!(
        eventually_holds(Duration::from_secs(6), || app_pids(&env).len() == 2),
        "idle_timeout: {:?}",
        app_pids(&env)
    );
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(app_pids(&env).len(), 2, "min_idle is kept");
}

#[test]
fn a_connection_past_max_lifetime_is_closed_instead_of_pooled() {
    let mut env = env_with(1, "max_lifetime = \"1s\"", HbaAuth::ScramSha256);
    let token = env.create_token(&["-u", "app", "-d", "appdb"]);
    env.start_proxy();
    let conn = env.conn_str("app", "appdb", &token);
    runtime().block_on(async {
        let c = pg_connect(&conn).await.unwrap();
        let old = backend_pid(&c).await;
        tokio::time::sleep(Duration::from_millis(1200)).await;
        drop(c);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let c = pg_connect(&conn).await.unwrap();
        assert_ne!(backend_pid(&c).await, old, "retired at its lifetime");
    });
    assert!(
        eventually_holds(Duration::from_secs(3), || app_pids(&env).len() == 1),
        "the old backend is gone: {:?}",
        app_pids(&env)
    );
}
