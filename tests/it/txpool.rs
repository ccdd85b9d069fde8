//! Transaction pooling (`[pool] mode = "transaction"`): clients hold a
//! server connection only for a transaction; whatever would leave session
//! state pins the client to its connection instead of leaking it; a
//! client's reported parameters and its cancels follow it from backend to
//! backend. Each test runs against a real PostgreSQL.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tollgate::cluster::HbaAuth;

use crate::harness::*;

/// An environment with `workers` shards, transaction pooling, `pool`
/// inside `[pool]`, and an admin listener (returned).
pub(crate) fn env_tx(workers: usize, pool: &str) -> (Env, SocketAddr) {
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let env = Env::build(EnvOptions {
        auth: HbaAuth::ScramSha256,
        workers,
        tables: format!("[pool]\nmode = \"transaction\"\n{pool}\n[admin]\nlisten = \"{admin}\"\n"),
        ..EnvOptions::default()
    });
    (env, admin)
}

/// Samples the app role's backends on a thread of its own until `done`,
/// returning the most seen.
fn sample_backends(direct: String, done: Arc<AtomicBool>) -> std::thread::JoinHandle<i64> {
    std::thread::spawn(move || {
        runtime().block_on(async {
            let watcher = pg_connect(&direct).await.unwrap();
            let mut most = 0;
            while !done.load(Ordering::Relaxed) {
                most = most.max(app_backends(&watcher).await);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            most
        })
    })
}

pub(crate) fn metric(admin: SocketAddr, line_start: &str) -> Option<f64> {
    let body = http(admin, "GET", "/metrics", None).body;
    body.lines()
        .filter(|l| l.starts_with(line_start))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .reduce(|a, b| a + b)
}

/// Every committed TPC-B transaction's updates are there, whole: the
/// account, teller and branch balances each sum to the history's deltas,
/// and there is one history row per transaction.
fn assert_tpcb_invariants(env: &Env, processed: u64) {
    let check = |sql: &str| env.cluster.psql("appdb", sql).unwrap().trim().to_owned();
    let history = check("select coalesce(sum(delta), 0) from pgbench_history");
    for table in ["accounts", "tellers", "branches"] {
        let col = &table[..1];
        let sum = check(&format!(
            "select coalesce(sum({col}balance), 0) from pgbench_{table}"
        ));
        assert_eq!(sum, history, "pgbench_{table} against pgbench_history");
    }
    let rows: u64 = check("select count(*) from pgbench_history")
        .parse()
        .unwrap();
    assert_eq!(rows, processed, "one history row per transaction");
}

/// A pgbench initialisation went through.
fn pgbench_init(init: &std::process::Output) {
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
}

#[test]
fn many_clients_share_few_backends_and_every_transaction_commits() {
    let (mut env, admin) = env_tx(2, "max_server_connections = 4");
    let token = env.create_token(&["-u", "app", "-d", "appdb"]);
    let addr = env.start_proxy();
    let direct = env.direct_conn_str();
    let pgbench = |args: &[&str]| pgbench_at(addr, &token, args);
    pgbench_init(&pgbench(&["-i", "-s", "1", "-q"]));
    let done = Arc::new(AtomicBool::new(false));
    let sampler = sample_backends(direct.clone(), done.clone());
    // TPC-B-like, 40 clients over 4 server connections, simple and
    // extended (unnamed statements) protocol.
    let mut processed = 0;
    for mode in ["simple", "extended"] {
        let run = pgbench(&["-n", "-M", mode, "-c", "40", "-j", "2", "-T", "3"]);
        let s = pgbench_summary(&run).unwrap_or_else(|all| panic!("pgbench failed:\n{all}"));
        assert_eq!(s.failed, 0, "{}", s.output);
        assert!(s.processed > 100, "only {} transactions", s.processed);
        processed += s.processed;
    }
    done.store(true, Ordering::Relaxed);
    let most = sampler.join().unwrap();
    assert!(most <= 4, "{most} backends at once, limit 4");
    assert!(most >= 2, "the sampler saw the pool at work ({most})");
    assert_tpcb_invariants(&env, processed);
    // Lent per transaction, never pinned.
    let lends = metric(admin, "tollgate_pool_transaction_lends_total").unwrap_or(0.0);
    assert!(lends >= processed as f64, "{lends} lends for {processed}");
    assert_eq!(metric(admin, "tollgate_pool_pins_total"), None);
    env.assert_log_clean();
}

/// pgbench (libpq, OpenSSL) through tollgate over TLS.
fn pgbench_over_tls(addr: SocketAddr, token: &str, args: &[&str]) -> std::process::Output {
    pg_tool("pgbench")
        .args([
            "-h",
            "localhost",
            "-p",
            &addr.port().to_string(),
            "-U",
            "app",
        ])
        .args(args)
        .arg("appdb")
        .env("PGPASSWORD", token)
        .env("PGSSLMODE", "require")
        .output()
        .unwrap()
}

/// TPC-B with prepared statements, 30 libpq clients over TLS through
/// `max_server_connections = 4` (set by the caller): no transaction
/// fails, the balances add up, never more than 4 backends, a lend per
/// transaction and no pin.
fn tpcb_over_tls_through_4_connections(env: &mut Env, token: &str, admin: SocketAddr) {
    let addr = env.start_proxy();
    let pgbench = |args: &[&str]| pgbench_over_tls(addr, token, args);
    pgbench_init(&pgbench(&["-i", "-s", "1", "-q"]));
    let done = Arc::new(AtomicBool::new(false));
    let sampler = sample_backends(env.direct_conn_str(), done.clone());
    let run = pgbench(&["-n", "-M", "prepared", "-c", "30", "-j", "2", "-T", "4"]);
    let s = pgbench_summary(&run).unwrap_or_else(|all| panic!("pgbench failed:\n{all}"));
    done.store(true, Ordering::Relaxed);
    assert_eq!(s.failed, 0, "{}", s.output);
    assert!(s.processed > 100, "only {} transactions", s.processed);
    let most = sampler.join().unwrap();
    assert!(most <= 4, "{most} backends at once, limit 4");
    assert_tpcb_invariants(env, s.processed);
    let lends = metric(admin, "tollgate_pool_transaction_lends_total").unwrap_or(0.0);
    assert!(
        lends >= s.processed as f64,
        "{lends} lends for {}",
        s.processed
    );
    assert_eq!(metric(admin, "tollgate_pool_pins_total"), None, "no pin");
}

/// TLS clients are pooled like plain ones: libpq (OpenSSL) runs TPC-B
/// with prepared statements over TLS, 30 clients through 4 server
/// connections, and no client is pinned for its TLS.
#[test]
fn tls_clients_share_few_backends_like_plain_ones() {
    let serving = ServingCert::new("tx CA", &["localhost"]);
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut env = Env::build(EnvOptions {
        auth: HbaAuth::ScramSha256,
        workers: 2,
        tables: format!(
            "[pool]\nmode = \"transaction\"\nmax_server_connections = 4\n\
             [admin]\nlisten = \"{admin}\"\n{}",
            serving.table("require")
        ),
        ..EnvOptions::default()
    });
    let token = env.create_token(&["-u", "app", "-d", "appdb"]);
    tpcb_over_tls_through_4_connections(&mut env, &token, admin);
    assert!(env.log().contains("tls=\"TLSv1_3\"") || env.log().contains("TLSv1_3"));
    env.assert_log_clean();
}

/// A TLS server leg is lent per transaction like a plain one: TLS on both
/// legs (verify-full to the server, channel binding), TPC-B with prepared
/// statements from 30 clients through 4 server connections, every
/// backend of the pool on TLS and no client pinned; then a 4 MB result
/// and a 300 KB query through a lent TLS connection, and a cancel, which
/// goes to the server over TLS too.
#[test]
fn tls_to_the_server_is_lent_per_transaction_like_plain() {
    let ca = Ca::new("tx both legs CA");
    let files = Files::new();
    let (mut options, _ca_file) = tls_on_both_legs(&ca, &files, "allow");
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    options.tables.push_str(&format!(
        "[pool]\nmode = \"transaction\"\nmax_server_connections = 4\n\
         [admin]\nlisten = \"{admin}\"\n"
    ));
    let mut env = Env::build(options);
    let token = env.create_token(&["-u", "app", "-d", "appdb"]);
    tpcb_over_tls_through_4_connections(&mut env, &token, admin);
    let direct = env.direct_conn_str();
    // The pool's backends, as the server sees them: all on TLS.
    let on_tls = psql_ok(
        &direct,
        "select count(*) filter (where s.ssl) || '/' || count(*) from pg_stat_ssl s \
         join pg_stat_activity a using (pid) where a.usename = 'app' \
         and a.pid <> pg_backend_pid()",
    );
    let (tls, all) = on_tls.split_once('/').unwrap();
    assert_eq!(tls, all, "{on_tls} of the pool's backends on TLS");
    assert!(all.parse::<i64>().unwrap() >= 1, "{on_tls}");
    assert!(
        env.log().contains("SCRAM-SHA-256-PLUS"),
        "no channel binding"
    );

    // Large data both ways through a lent TLS connection: records longer
    // than the relay's buffer, many in a row.
    let conn = env.conn_str("app", "appdb", &token);
    let long = "x".repeat(300_000);
    let out = psql_script(
        &conn,
        &format!(
            "select length('{long}');\n\
             select repeat('z', 4000000);\n\
             select 'after';\n"
        ),
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[0], "300000");
    assert!(lines[1].len() == 4_000_000 && lines[1].bytes().all(|b| b == b'z'));
    assert_eq!(lines[2], "after");

    runtime().block_on(async {
        let a = pg_connect(&conn).await.unwrap();
        let cancel = a.cancel_token();
        let running = tokio::spawn(async move { a.simple_query("select pg_sleep(20)").await });
        tokio::time::sleep(Duration::from_millis(300)).await;
        let started = Instant::now();
        cancel.cancel_query(tokio_postgres::NoTls).await.unwrap();
        let e = running.await.unwrap().expect_err("cancelled");
        assert_eq!(e.code().map(|c| c.code()), Some("57014"), "{e}");
        assert!(started.elapsed() < Duration::from_secs(5));
    });
    env.assert_log_clean();
}

#[test]
fn session_state_pins_its_client_and_never_reaches_another() {
    let (mut env, admin) = env_tx(1, "max_server_connections = 3");
    let token = env.create_token(&["-u", "app", "-d", "appdb"]);
    env.start_proxy();
    let conn = env.conn_str("app", "appdb", &token);
    runtime().block_on(async {
        let cases = [
            ("set statement_timeout = '1234ms'", "set"),
            ("create temp table mine(x int)", "temp_table"),
            ("select pg_advisory_lock(7)", "advisory_lock"),
            ("listen jobs", "listen"),
            ("prepare p as select 1", "sql_prepare"),
            ("set role app", "set_role"),
        ];
        for (sql, reason) in cases {
            let pinned = pg_connect(&conn).await.unwrap();
            pinned.batch_execute(sql).await.unwrap();
            // Pinned from here on (each transaction before may have run
            // on another backend).
            let pid = simple_one(&pinned, "select pg_backend_pid()::text").await;
            let other = pg_connect(&conn).await.unwrap();
            for _ in 0..5 {
                // The pinned client keeps its backend, and its state...
                assert_eq!(
                    simple_one(&pinned, "select pg_backend_pid()::text").await,
                    pid,
                    "{sql}"
                );
                // ...which the other client never gets.
                assert_ne!(
                    simple_one(&other, "select pg_backend_pid()::text").await,
                    pid,
                    "{sql}"
                );
                assert_eq!(
                    simple_one(&other, "select current_setting('statement_timeout')").await,
                    "0",
                    "{sql}"
                );
            }
            drop(pinned);
            drop(other);
            let pins = format!(
                "tollgate_pool_pins_total{{upstream=\"default\",shard=\"0\",reason=\"{reason}\"}}"
            );
            assert_eq!(metric(admin, &pins), Some(1.0), "{sql}");
        }
        // Once the pinned clients left, their backends were reset: nobody
        // finds their state.
        let c = pg_connect(&conn).await.unwrap();
        for _ in 0..6 {
            assert_eq!(
                simple_one(&c, "select current_setting('statement_timeout')").await,
                "0"
            );
            assert_eq!(
                simple_one(
                    &c,
                    "select coalesce(to_regclass('pg_temp.mine')::text, 'none')"
                )
                .await,
                "none"
            );
            assert_eq!(
                simple_one(&c, "select count(*)::text from pg_listening_channels()").await,
                "0"
            );
        }
    });
    let log = env.log();
    assert!(
        log.contains("client pinned to its server connection"),
        "{log}"
    );
}

#[test]
fn each_clients_reported_parameters_follow_it_across_backends() {
    // One server connection: every transaction of either client runs on it.
    let (mut env, admin) = env_tx(1, "max_server_connections = 1");
    let token = env.create_token(&["-u", "app", "-d", "appdb"]);
    env.start_proxy();
    let conn = env.conn_str("app", "appdb", &token);
    runtime().block_on(async {
        let a = pg_connect(&format!("{conn} application_name=alpha"))
            .await
            .unwrap();
        let b = pg_connect(&format!("{conn} application_name=beta"))
            .await
            .unwrap();
        a.batch_execute("set timezone = 'Asia/Tokyo'")
            .await
            .unwrap();
        b.batch_execute("set datestyle = 'German'").await.unwrap();
        for _ in 0..3 {
            assert_eq!(
                simple_one(&a, "select current_setting('application_name')").await,
                "alpha"
            );
            assert_eq!(
                simple_one(&b, "select current_setting('application_name')").await,
                "beta"
            );
            assert_eq!(
                simple_one(&a, "select current_setting('TimeZone')").await,
                "Asia/Tokyo"
            );
            assert_eq!(
                simple_one(&b, "select current_setting('TimeZone')").await,
                "Etc/UTC"
            );
            assert_eq!(
                simple_one(&a, "select current_setting('DateStyle')").await,
                "ISO, MDY"
            );
            assert_eq!(
                simple_one(&b, "select current_setting('DateStyle')").await,
                "German, DMY"
            );
        }
        // A SET rolled back is rolled back for the client too.
        a.batch_execute("begin; set application_name = 'gone'; rollback")
            .await
            .unwrap();
        assert_eq!(simple_one(&b, "select 1::text").await, "1");
        assert_eq!(
            simple_one(&a, "select current_setting('application_name')").await,
            "alpha"
        );
    });
    assert_eq!(
        metric(admin, "tollgate_pool_pins_total"),
        None,
        "nothing pinned"
    );
    let backends = env
        .cluster
        .psql(
            "postgres",
            "select count(*) from pg_stat_activity where usename = 'app' and backend_type = 'client backend'",
        )
        .unwrap();
    assert!(backends.trim().parse::<i64>().unwrap() <= 1, "{backends}");
}

#[test]
fn a_cancel_stops_the_clients_own_query_and_a_late_one_stops_nothing() {
    // One server connection: the late cancel's target, if it had one,
    // would be the other client's query.
    let (mut env, _admin) = env_tx(1, "max_server_connections = 1");
    let token = env.create_token(&["-u", "app", "-d", "appdb"]);
    env.start_proxy();
    let conn = env.conn_str("app", "appdb", &token);
    runtime().block_on(async {
        let a = pg_connect(&conn).await.unwrap();
        let b = pg_connect(&conn).await.unwrap();
        let cancel = a.cancel_token();
        let running = tokio::spawn(async move {
            let r = a.simple_query("select pg_sleep(20)").await;
            (a, r)
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        let started = Instant::now();
        cancel.cancel_query(tokio_postgres::NoTls).await.unwrap();
        let (a, r) = running.await.unwrap();
        let e = r.expect_err("cancelled");
        assert_eq!(e.code().map(|c| c.code()), Some("57014"), "{e}");
        assert!(started.elapsed() < Duration::from_secs(5));
        // Between transactions the key points at nothing: a late cancel
        // must not touch whoever runs on that backend now.
        let b_run = tokio::spawn(async move { b.simple_query("select pg_sleep(1)").await });
        tokio::time::sleep(Duration::from_millis(200)).await;
        cancel.cancel_query(tokio_postgres::NoTls).await.unwrap();
        b_run
            .await
            .unwrap()
            .expect("another client's query runs on");
        assert_eq!(simple_one(&a, "select 'still here'").await, "still here");
    });
}

#[test]
fn a_revoked_client_holding_a_connection_mid_transaction_ends_and_the_connection_is_rolled_back() {
    let (mut env, _admin) = env_tx(1, "max_server_connections = 1");
    let revoked = env.create_token(&["-u", "app", "-d", "appdb"]);
    let other = env.create_token(&["-u", "app", "-d", "appdb"]);
    env.cluster
        .psql(
            "appdb",
            "create table tx_t(x int); grant all on tx_t to app",
        )
        .unwrap();
    env.start_proxy();
    let id = revoked.split('_').nth(1).unwrap().to_owned();
    runtime().block_on(async {
        let (c, watch) = connect_watched(&env.conn_str("app", "appdb", &revoked)).await;
        c.batch_execute("begin; insert into tx_t values (1)")
            .await
            .unwrap();
        let revoked_at = Instant::now();
        env.token_cmd(&["revoke", &id]);
        let (code, _) = ended(watch, Duration::from_secs(3)).await;
        assert_eq!(code, "57P01");
        assert!(revoked_at.elapsed() < Duration::from_secs(2));
        // The one server connection was rolled back and serves the next.
        let n = pg_connect(&env.conn_str("app", "appdb", &other))
            .await
            .unwrap();
        assert_eq!(simple_one(&n, "select count(*)::text from tx_t").await, "0");
    });
}

#[test]
fn a_client_idle_in_a_transaction_too_long_is_ended_and_a_waiting_one_served() {
    let (mut env, _admin) = env_tx(
        1,
        "max_server_connections = 1\nidle_transaction_timeout = \"300ms\"\ncheckout_timeout = \"5s\"",
    );
    let token = env.create_token(&["-u", "app", "-d", "appdb"]);
    env.start_proxy();
    let conn = env.conn_str("app", "appdb", &token);
    runtime().block_on(async {
        let (idle, watch) = connect_watched(&conn).await;
        let waiter = pg_connect(&conn).await.unwrap();
        idle.batch_execute("begin").await.unwrap();
        let started = Instant::now();
        // Waits for the one connection until the idle client is ended.
        assert_eq!(simple_one(&waiter, "select 'served'").await, "served");
        assert!(started.elapsed() < Duration::from_secs(3));
        let (code, message) = ended(watch, Duration::from_secs(3)).await;
        assert_eq!(code, "25P03", "{message}");
    });
}

#[test]
fn a_client_that_waits_past_checkout_timeout_gets_53300() {
    let (mut env, _admin) = env_tx(
        1,
        "max_server_connections = 1\ncheckout_timeout = \"300ms\"",
    );
    let token = env.create_token(&["-u", "app", "-d", "appdb"]);
    env.start_proxy();
    let conn = env.conn_str("app", "appdb", &token);
    runtime().block_on(async {
        // Both log in while the connection is free (a login needs one
        // for the server's greeting).
        let holder = pg_connect(&conn).await.unwrap();
        let late = pg_connect(&conn).await.unwrap();
        holder.batch_execute("begin").await.unwrap();
        let e = late
            .simple_query("select 1")
            .await
            .expect_err("no connection free");
        let code = e
            .as_db_error()
            .map(|d| d.code().code().to_owned())
            .unwrap_or_default();
        assert_eq!(code, "53300", "{e}");
        holder.batch_execute("commit").await.unwrap();
        assert_eq!(simple_one(&holder, "select 'ok'").await, "ok");
    });
}

/// What the scan cannot follow keeps its client pinned through a
/// `RESET ALL`: `set_config` called by its OID in a FunctionCall, an
/// `UPDATE` of `pg_settings`, and a session whose plain strings take
/// backslash escapes (`standard_conforming_strings` off), in which a
/// `DISCARD ALL` inside a string would look run. On one server
/// connection nobody else gets in while the client is pinned; a real
/// `DISCARD ALL` lifts the first two, nothing lifts the third; whoever
/// comes next finds none of the state.
#[test]
fn what_the_scan_cannot_follow_pins_and_reaches_nobody() {
    let (mut env, admin) = env_tx(
        1,
        "max_server_connections = 1\ncheckout_timeout = \"300ms\"",
    );
    let token = env.create_token(&["-u", "app", "-d", "appdb"]);
    let addr = env.start_proxy();
    let conn = env.conn_str("app", "appdb", &token);
    // set_config(text, text, boolean)
    const SET_CONFIG_OID: u32 = 2078;
    let cases = [
        (
            fe::function_call(SET_CONFIG_OID, &["statement_timeout", "1234ms", "false"]),
            true,
        ),
        (
            fe::query("update pg_settings set setting = '1234ms' where name = 'statement_timeout'"),
            true,
        ),
        (
            fe::query("set standard_conforming_strings = off; set statement_timeout = '1234ms'"),
            false,
        ),
    ];
    runtime().block_on(async {
        let shut_out = || async {
            let e = pg_connect(&conn)
                .await
                .expect_err("the connection is pinned");
            assert_eq!(e.code().map(|c| c.code()), Some("53300"), "{e}");
        };
        let fresh = || async {
            let c = pg_connect(&conn).await.unwrap();
            assert_eq!(simple_one(&c, "show statement_timeout").await, "0");
            assert_eq!(
                simple_one(&c, "show standard_conforming_strings").await,
                "on"
            );
        };
        for (made, discard_lifts) in cases {
            let mut raw = raw_login(addr, &[("user", "app"), ("database", "appdb")], &token)
                .unwrap_or_else(|e| panic!("{e:?}"));
            raw.send(&made);
            let (tags, _) = read_to_ready(&mut raw);
            assert!(!tags.contains('E'), "{tags}");
            raw.send(&fe::query("reset all"));
            read_to_ready(&mut raw);
            // Read with backslash escapes, this is one string.
            raw.send(&fe::query("select 'a\\'; discard all; --'"));
            let (tags, rows) = read_to_ready(&mut raw);
            let hidden = rows == ["a'; discard all; --"];
            assert!(hidden || tags.contains('E'), "{tags} {rows:?}");
            shut_out().await;
            raw.send(&fe::query("discard all"));
            read_to_ready(&mut raw);
            raw.send(&fe::query("show statement_timeout"));
            let (_, rows) = read_to_ready(&mut raw);
            assert_eq!(rows, ["0"]);
            if discard_lifts {
                fresh().await;
            } else {
                shut_out().await;
            }
            drop(raw);
            // Its connection was reset as it left.
            let deadline = Instant::now() + Duration::from_secs(10);
            while metric(
                admin,
                "tollgate_pool_server_connections{upstream=\"default\",shard=\"0\",state=\"idle\"}",
            ) != Some(1.0)
            {
                assert!(Instant::now() < deadline, "the connection never came back");
                std::thread::sleep(Duration::from_millis(20));
            }
            fresh().await;
        }
    });
    for reason in ["function_call", "set_config", "set"] {
        let pins = format!(
            "tollgate_pool_pins_total{{upstream=\"default\",shard=\"0\",reason=\"{reason}\"}}"
        );
        assert_eq!(metric(admin, &pins), Some(1.0), "{reason}");
    }
    assert_eq!(
        metric(
            admin,
            "tollgate_pool_unpins_total{upstream=\"default\",shard=\"0\"}"
        ),
        Some(2.0)
    );
    env.assert_log_clean();
}

/// asyncpg's pattern: its type introspection runs `set_config('jit', ...,
/// false)` (which pins), and its pool sends a reset query when it takes a
/// connection back (which clears what pinned). Through one server
/// connection, the other client is served again once the state is gone,
/// and finds none of it; a clear that leaves state (`RESET ALL` after
/// `SET ROLE`) keeps the pin.
#[test]
fn a_client_that_clears_its_session_state_is_unpinned_and_leaves_none() {
    let (mut env, admin) = env_tx(
        1,
        "max_server_connections = 1\ncheckout_timeout = \"500ms\"",
    );
    let token = env.create_token(&["-u", "app", "-d", "appdb"]);
    env.start_proxy();
    let conn = env.conn_str("app", "appdb", &token);
    let unpins = "tollgate_pool_unpins_total{upstream=\"default\",shard=\"0\"}";
    let code = |e: tokio_postgres::Error| {
        e.as_db_error()
            .map(|d| d.code().code().to_owned())
            .unwrap_or_default()
    };
    runtime().block_on(async {
        // Both log in while the connection is free.
        let a = pg_connect(&conn).await.unwrap();
        let b = pg_connect(&conn).await.unwrap();
        a.batch_execute("select current_setting('jit'), set_config('jit', 'off', false)")
            .await
            .unwrap();
        // Pinned: the only connection stays with `a`.
        let e = b.simple_query("select 1").await.expect_err("pinned");
        assert_eq!(code(e), "53300");
        let b = pg_connect(&conn).await.expect_err("pinned");
        assert_eq!(code(b), "53300");
        assert_eq!(simple_one(&a, "select current_setting('jit')").await, "off");
        // A clear in a Query that fails is rolled back with it: still
        // pinned.
        let e = a
            .batch_execute("reset all; select 1 / 0")
            .await
            .expect_err("division by zero");
        assert_eq!(code(e), "22012");
        assert_eq!(simple_one(&a, "select current_setting('jit')").await, "off");
        assert_eq!(metric(admin, unpins).unwrap_or(0.0), 0.0);
        let b = pg_connect(&conn).await.expect_err("still pinned");
        assert_eq!(code(b), "53300");
        a.batch_execute("SELECT pg_advisory_unlock_all();\nCLOSE ALL;\nUNLISTEN *;\nRESET ALL;")
            .await
            .unwrap();
        assert_eq!(metric(admin, unpins), Some(1.0));
        // Unpinned: another client gets the connection, as the server
        // started it.
        let b = pg_connect(&conn).await.unwrap();
        assert_eq!(simple_one(&b, "select current_setting('jit')").await, "on");
        assert_eq!(simple_one(&a, "select 'a again'").await, "a again");

        // A prepared statement that pins pins again each time it runs.
        let stmt = a
            .prepare("select set_config('jit', 'off', false)")
            .await
            .unwrap();
        a.batch_execute("reset all").await.unwrap();
        assert_eq!(metric(admin, unpins), Some(2.0));
        assert_eq!(simple_one(&b, "select 'b served'").await, "b served");
        a.query(&stmt, &[]).await.unwrap();
        let e = b.simple_query("select 1").await.expect_err("pinned again");
        assert_eq!(code(e), "53300");
        a.batch_execute("reset all").await.unwrap();
        assert_eq!(metric(admin, unpins), Some(3.0));
        let b = pg_connect(&conn).await.unwrap();
        assert_eq!(simple_one(&b, "select current_setting('jit')").await, "on");

        // RESET ALL leaves the role: still pinned.
        a.batch_execute("set role app").await.unwrap();
        a.batch_execute("reset all").await.unwrap();
        let e = b.simple_query("select 1").await.expect_err("still pinned");
        assert_eq!(code(e), "53300");
        assert_eq!(metric(admin, unpins), Some(3.0));
        // A clear inside a transaction block may be rolled back: none.
        a.batch_execute("begin; discard temp; rollback")
            .await
            .unwrap();
        // DISCARD ALL leaves nothing.
        a.batch_execute("discard all").await.unwrap();
        assert_eq!(metric(admin, unpins), Some(4.0));
        let b = pg_connect(&conn).await.unwrap();
        assert_eq!(simple_one(&b, "select current_user::text").await, "app");
    });
    env.assert_log_clean();
}

/// A small deterministic generator (xorshift), so a failure repeats.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

#[test]
fn named_prepared_statements_work_from_any_backend_without_pinning() {
    // Two server connections holding at most three statements each, for
    // six clients using five statements: statements are prepared where
    // missing, evicted, closed and prepared again, all interleaved.
    let (mut env, admin) = env_tx(1, "max_server_connections = 2\nmax_prepared_statements = 3");
    let token = env.create_token(&["-u", "app", "-d", "appdb"]);
    env.start_proxy();
    let conn = env.conn_str("app", "appdb", &token);
    runtime().block_on(async {
        let clients = (0..6u64).map(|seed| {
            let conn = conn.clone();
            tokio::spawn(async move {
                let c = pg_connect(&conn).await.unwrap();
                let mut rng = Rng(seed * 7919 + 17);
                let mut held: Vec<Option<tokio_postgres::Statement>> = vec![None; 5];
                for round in 0..120 {
                    let k = rng.below(5) as usize;
                    match rng.below(4) {
                        // Forget it: tokio-postgres Closes it.
                        0 => held[k] = None,
                        _ => {
                            if held[k].is_none() {
                                let sql = format!(
                                    "select $1::int + {k}, current_setting('application_name')"
                                );
                                held[k] = Some(c.prepare(&sql).await.unwrap());
                            }
                            let stmt = held[k].as_ref().unwrap();
                            let i: i32 = round;
                            let row = c.query_one(stmt, &[&i]).await.unwrap_or_else(|e| {
                                panic!("client {seed} round {round} statement {k}: {e}")
                            });
                            assert_eq!(row.get::<_, i32>(0), i + k as i32, "client {seed}");
                        }
                    }
                    if round % 10 == 0 {
                        // A transaction block between, which holds its backend.
                        c.batch_execute("begin; select 1; commit").await.unwrap();
                    }
                }
            })
        });
        for c in clients.collect::<Vec<_>>() {
            c.await.unwrap();
        }
    });
    assert_eq!(
        metric(admin, "tollgate_pool_pins_total"),
        None,
        "nothing pinned"
    );
    let stat = |r: &str| {
        metric(
            admin,
            &format!("tollgate_pool_prepared_statements_total{{upstream=\"default\",shard=\"0\",result=\"{r}\"}}"),
        )
        .unwrap_or(0.0)
    };
    assert!(stat("hit") > 0.0, "shared statements were used where held");
    assert!(stat("prepared") > 0.0 && stat("evicted") > 0.0);
}

#[test]
fn a_statement_whose_plan_went_stale_after_ddl_recovers() {
    let (mut env, _admin) = env_tx(1, "max_server_connections = 1");
    let token = env.create_token(&["-u", "app", "-d", "appdb"]);
    env.cluster
        .psql(
            "appdb",
            "create table ddl_t(a int); insert into ddl_t values (1); grant all on ddl_t to app",
        )
        .unwrap();
    env.start_proxy();
    let conn = env.conn_str("app", "appdb", &token);
    runtime().block_on(async {
        let c = pg_connect(&conn).await.unwrap();
        let stmt = c.prepare("select * from ddl_t").await.unwrap();
        assert_eq!(c.query(&stmt, &[]).await.unwrap().len(), 1);
        env.cluster
            .psql("appdb", "alter table ddl_t add column b int")
            .unwrap();
        // As on a direct connection: the old statement fails once...
        let e = c.query(&stmt, &[]).await.expect_err("stale plan");
        assert_eq!(e.code().map(|c| c.code()), Some("0A000"), "{e}");
        // ...and the same SQL prepared again works, on the same backend.
        let again = c.prepare("select * from ddl_t").await.unwrap();
        let rows = c.query(&again, &[]).await.unwrap();
        assert_eq!(rows[0].len(), 2);
        let other = pg_connect(&conn).await.unwrap();
        let s = other.prepare("select * from ddl_t").await.unwrap();
        assert_eq!(other.query(&s, &[]).await.unwrap()[0].len(), 2);
    });
}

#[test]
fn pgbench_prepared_200_clients_over_10_backends_keep_the_tpcb_invariants() {
    let (mut env, admin) = env_tx(2, "max_server_connections = 10");
    let token = env.create_token(&["-u", "app", "-d", "appdb"]);
    let addr = env.start_proxy();
    let init = pgbench_at(addr, &token, &["-i", "-s", "2", "-q"]);
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    let done = Arc::new(AtomicBool::new(false));
    let sampler = sample_backends(env.direct_conn_str(), done.clone());
    // 100 clients per pgbench thread. pgbench prepares each statement
    // before its first use with the synchronous PQprepare, so a thread
    // stops all its clients, some holding a server connection in an open
    // transaction, until a Parse is answered: that of BEGIN, sent between
    // transactions, is answered by tollgate once a server has accepted it.
    let run = pgbench_at(
        addr,
        &token,
        &["-n", "-M", "prepared", "-c", "200", "-j", "2", "-T", "5"],
    );
    done.store(true, Ordering::Relaxed);
    let most = sampler.join().unwrap();
    let s = pgbench_summary(&run).unwrap_or_else(|all| panic!("pgbench failed:\n{all}"));
    assert_eq!(s.failed, 0, "{}", s.output);
    assert!(s.processed > 200, "only {} transactions", s.processed);
    assert!(most <= 10, "{most} backends at once, limit 10");
    assert_tpcb_invariants(&env, s.processed);
    assert_eq!(
        metric(admin, "tollgate_pool_pins_total"),
        None,
        "nothing pinned"
    );
    env.assert_log_clean();
}

#[test]
fn copy_from_stdin_by_the_extended_protocol_ends_its_lend() {
    // One server connection: a lend that never ended would stall the
    // second client.
    let (mut env, admin) = env_tx(1, "max_server_connections = 1\ncheckout_timeout = \"3s\"");
    let token = env.create_token(&["-u", "app", "-d", "appdb"]);
    env.cluster
        .psql(
            "appdb",
            "create table copy_t(x int); grant all on copy_t to app",
        )
        .unwrap();
    env.start_proxy();
    let conn = env.conn_str("app", "appdb", &token);
    runtime().block_on(async {
        use futures_util::SinkExt;
        let a = pg_connect(&conn).await.unwrap();
        let b = pg_connect(&conn).await.unwrap();
        for round in 0..3 {
            // tokio-postgres: Parse, Describe, Sync; then Bind, Execute,
            // Sync; CopyData...; CopyDone, Sync.
            let sink = a
                .copy_in::<_, bytes::Bytes>("copy copy_t from stdin")
                .await
                .unwrap();
            let mut sink = std::pin::pin!(sink);
            for i in 0..100 {
                sink.send(bytes::Bytes::from(format!("{i}\n")))
                    .await
                    .unwrap();
            }
            assert_eq!(sink.finish().await.unwrap(), 100);
            let n = simple_one(&b, "select count(*)::text from copy_t").await;
            assert_eq!(n, ((round + 1) * 100).to_string());
        }
        assert_eq!(simple_one(&a, "select 'after'").await, "after");
    });
    assert_eq!(
        metric(admin, "tollgate_pool_pins_total"),
        None,
        "nothing pinned"
    );
}

/// Extended-protocol messages, as a client writes them.
mod fe {
    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![tag];
        m.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
        m.extend_from_slice(body);
        m
    }

    pub fn parse(name: &str, sql: &str) -> Vec<u8> {
        msg(
            b'P',
            &[name.as_bytes(), b"\0", sql.as_bytes(), b"\0\0\0"].concat(),
        )
    }

    /// Bind of `stmt` to the unnamed portal, text parameters.
    pub fn bind(stmt: &str, params: &[&str]) -> Vec<u8> {
        let mut b = vec![0u8];
        b.extend_from_slice(stmt.as_bytes());
        b.extend_from_slice(&[0, 0, 0]);
        text_values(&mut b, params);
        msg(b'B', &b)
    }

    /// A count, then each value with its length, then no result formats
    /// (all text): how Bind and FunctionCall end.
    fn text_values(b: &mut Vec<u8>, values: &[&str]) {
        b.extend_from_slice(&(values.len() as i16).to_be_bytes());
        for v in values {
            b.extend_from_slice(&(v.len() as i32).to_be_bytes());
            b.extend_from_slice(v.as_bytes());
        }
        b.extend_from_slice(&[0, 0]);
    }

    pub fn describe(kind: u8, name: &str) -> Vec<u8> {
        msg(b'D', &[&[kind], name.as_bytes(), b"\0"].concat())
    }

    pub fn execute() -> Vec<u8> {
        msg(b'E', b"\0\0\0\0\0")
    }

    /// Execute of the unnamed portal, at most `rows` rows.
    pub fn execute_max(rows: i32) -> Vec<u8> {
        msg(b'E', &[b"\0".as_slice(), &rows.to_be_bytes()].concat())
    }

    pub fn close(kind: u8, name: &str) -> Vec<u8> {
        msg(b'C', &[&[kind], name.as_bytes(), b"\0"].concat())
    }

    pub fn sync() -> Vec<u8> {
        msg(b'S', b"")
    }

    pub fn flush() -> Vec<u8> {
        msg(b'H', b"")
    }

    pub fn query(sql: &str) -> Vec<u8> {
        msg(b'Q', &[sql.as_bytes(), b"\0"].concat())
    }

    /// FunctionCall of the function `oid` with text arguments, for a
    /// text result.
    pub fn function_call(oid: u32, args: &[&str]) -> Vec<u8> {
        let mut b = oid.to_be_bytes().to_vec();
        b.extend_from_slice(&[0, 0]);
        text_values(&mut b, args);
        msg(b'F', &b)
    }
}

/// The tags of `n` messages, and the values of their DataRows.
fn read_n(raw: &mut Raw, n: usize) -> (String, Vec<String>) {
    let mut tags = String::new();
    let mut rows = Vec::new();
    for _ in 0..n {
        let (tag, body) = raw.read_message();
        tags.push(tag as char);
        if tag == b'D' {
            rows.extend(data_row(&body).into_iter().map(|v| v.unwrap_or_default()));
        }
    }
    (tags, rows)
}

/// Tags up to and with ReadyForQuery, and the DataRow values.
fn read_to_ready(raw: &mut Raw) -> (String, Vec<String>) {
    let mut tags = String::new();
    let mut rows = Vec::new();
    loop {
        let (tag, body) = raw.read_message();
        tags.push(tag as char);
        if tag == b'D' {
            rows.extend(data_row(&body).into_iter().map(|v| v.unwrap_or_default()));
        }
        if tag == b'Z' {
            return (tags, rows);
        }
    }
}

#[test]
fn pipelined_extended_messages_are_answered_as_postgres_answers_them() {
    // One server connection holding one statement: the two clients' named
    // statements evict each other, so each use may need a hidden Parse,
    // and every answer tollgate gives or hides must land in its place.
    let (mut env, _admin) = env_tx(1, "max_server_connections = 1\nmax_prepared_statements = 1");
    let token = env.create_token(&["-u", "app", "-d", "appdb"]);
    let addr = env.start_proxy();
    let login = || raw_login(addr, &[("user", "app"), ("database", "appdb")], &token).unwrap();
    let (mut a, mut b) = (login(), login());
    let send = |raw: &mut Raw, msgs: &[Vec<u8>]| raw.send(&msgs.concat());

    send(&mut a, &[fe::parse("s1", "select $1::int"), fe::sync()]);
    assert_eq!(read_to_ready(&mut a).0, "1Z");
    send(
        &mut b,
        &[
            fe::parse("s2", "select 2"),
            fe::bind("s2", &[]),
            fe::execute(),
            fe::sync(),
        ],
    );
    assert_eq!(read_to_ready(&mut b), ("12DCZ".into(), vec!["2".into()]));
    // s1 was evicted by s2: prepared again, hidden, before the Bind.
    send(
        &mut a,
        &[
            fe::bind("s1", &["5"]),
            fe::describe(b'P', ""),
            fe::execute(),
            fe::close(b'S', "s1"),
            fe::sync(),
        ],
    );
    assert_eq!(read_to_ready(&mut a), ("2TDC3Z".into(), vec!["5".into()]));
    // Closed: gone for this client, as on a direct connection.
    send(&mut a, &[fe::describe(b'S', "s1"), fe::sync()]);
    assert_eq!(read_to_ready(&mut a).0, "EZ");
    // Parse again under the same name, other SQL; Describe; Flush only.
    send(
        &mut a,
        &[
            fe::parse("s1", "select $1::int + 1"),
            fe::describe(b'S', "s1"),
            fe::flush(),
        ],
    );
    assert_eq!(read_n(&mut a, 3).0, "1tT");
    send(&mut a, &[fe::bind("s1", &["1"]), fe::execute(), fe::sync()]);
    assert_eq!(read_to_ready(&mut a), ("2DCZ".into(), vec!["2".into()]));
    // An error mid-pipeline: the rest up to Sync is skipped, tollgate's own
    // answers included; the statements stay usable.
    send(
        &mut b,
        &[
            fe::parse("x", "select 10"),
            fe::bind("x", &[]),
            fe::execute(),
            fe::parse("y", "selec oops"),
            fe::bind("y", &[]),
            fe::execute(),
            fe::close(b'S', "x"),
            fe::sync(),
        ],
    );
    assert_eq!(read_to_ready(&mut b), ("12DCEZ".into(), vec!["10".into()]));
    send(&mut b, &[fe::bind("x", &[]), fe::execute(), fe::sync()]);
    assert_eq!(read_to_ready(&mut b), ("2DCZ".into(), vec!["10".into()]));
    send(
        &mut b,
        &[
            fe::bind("s2", &[]),
            fe::execute(),
            fe::close(b'S', "s2"),
            fe::sync(),
        ],
    );
    assert_eq!(read_to_ready(&mut b), ("2DC3Z".into(), vec!["2".into()]));
    // The unnamed statement is each client's own.
    send(&mut a, &[fe::parse("", "select 'mine'"), fe::sync()]);
    assert_eq!(read_to_ready(&mut a).0, "1Z");
    send(&mut b, &[fe::parse("", "select 'theirs'"), fe::sync()]);
    assert_eq!(read_to_ready(&mut b).0, "1Z");
    send(&mut a, &[fe::bind("", &[]), fe::execute(), fe::sync()]);
    assert_eq!(read_to_ready(&mut a), ("2DCZ".into(), vec!["mine".into()]));
}

/// `token create --pool-mode transaction` on a route that pools by
/// session: that token's clients share the connections per transaction,
/// while another token's client keeps one for its whole session.
#[test]
fn a_tokens_pool_mode_overrides_the_routes() {
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut env = Env::build(EnvOptions {
        auth: HbaAuth::ScramSha256,
        workers: 1,
        tables: format!(
            "[pool]\nmode = \"session\"\nmax_server_connections = 2\n\
             checkout_timeout = \"2s\"\n[admin]\nlisten = \"{admin}\"\n"
        ),
        ..EnvOptions::default()
    });
    let tx = env.create_token(&["-u", "app", "-d", "appdb", "--pool-mode", "transaction"]);
    let session = env.create_token(&["-u", "app", "-d", "appdb"]);
    let listing = env.token_cmd(&["list"]);
    assert!(
        listing
            .lines()
            .any(|l| l.starts_with(&tx[3..15]) && l.contains("pool_mode=transaction")),
        "{listing}"
    );
    env.start_proxy();
    runtime().block_on(async {
        // The session-mode client holds one of the two connections.
        let s = pg_connect(&env.conn_str("app", "appdb", &session))
            .await
            .unwrap();
        let pid = simple_one(&s, "select pg_backend_pid()").await;
        // Five clients of the transaction-mode token at once share the
        // other: by session, the second would wait and get 53300.
        let mut clients = Vec::new();
        for _ in 0..5 {
            clients.push(
                pg_connect(&env.conn_str("app", "appdb", &tx))
                    .await
                    .unwrap(),
            );
        }
        for round in 0..3 {
            for c in &clients {
                let got = simple_one(c, &format!("select {round} + 1")).await;
                assert_eq!(got, (round + 1).to_string());
            }
        }
        assert_eq!(simple_one(&s, "select pg_backend_pid()").await, pid);
    });
    let lends = metric(admin, "tollgate_pool_transaction_lends_total").unwrap_or(0.0);
    assert!(lends >= 15.0, "{lends} lends");
    env.assert_log_clean();
}

/// Backend messages up to the `readies`-th ReadyForQuery, as compared:
/// asynchronous ones (ParameterStatus, NoticeResponse) left out, and an
/// ErrorResponse reduced to its severity and SQLSTATE (its text may name
/// things differently).
fn answers_compared(raw: &mut Raw, readies: usize) -> Vec<(char, Vec<u8>)> {
    let mut got = Vec::new();
    let mut seen = 0;
    while seen < readies {
        let (tag, body) = raw.read_message();
        match tag {
            b'S' | b'N' => continue,
            b'E' => {
                let mut kept = Vec::new();
                for field in body.split(|&b| b == 0).filter(|f| !f.is_empty()) {
                    if matches!(field[0], b'V' | b'C') {
                        kept.extend_from_slice(field);
                        kept.push(b' ');
                    }
                }
                got.push(('E', kept));
            }
            b'Z' => {
                seen += 1;
                got.push(('Z', body));
            }
            _ => got.push((tag as char, body)),
        }
    }
    got
}

/// The state machine of the issue: four clients interleave random
/// pipelines of Parse/Bind/Describe/Execute/Close/Flush/Sync (errors at
/// Parse, at Bind and at Execute included, and transaction blocks) over
/// two server connections that hold two statements each, so statements
/// are prepared hidden, evicted and shared by content all the time; every
/// client sends the same bytes to its own direct connection, and every
/// answer through tollgate must equal Postgres's, message by message.
/// `TG_SEED` and `TG_STEPS` explore other runs.
#[test]
fn random_extended_protocol_pipelines_are_answered_as_a_direct_connection_answers_them() {
    let mut env = Env::build(EnvOptions {
        auth: HbaAuth::Password,
        workers: 1,
        tables: "[pool]\nmode = \"transaction\"\nmax_server_connections = 2\n\
                 max_prepared_statements = 2\n"
            .into(),
        ..EnvOptions::default()
    });
    let token = env.create_token(&["-u", "app", "-d", "appdb"]);
    let addr = env.start_proxy();
    let direct_addr: SocketAddr = format!("127.0.0.1:{}", env.cluster.port()).parse().unwrap();
    let params = [("user", "app"), ("database", "appdb")];
    let mut clients: Vec<(Raw, Raw)> = (0..4)
        .map(|_| {
            let through = raw_login(addr, &params, &token).unwrap();
            let direct = raw_login(direct_addr, &params, env.cluster.password()).unwrap();
            (through, direct)
        })
        .collect();
    // Each with one parameter: fine, a syntax error (at Parse), a division
    // by zero for 0 (at Execute: `random()` keeps the planner from folding
    // it, which would fail the Bind of a custom plan and not of a generic
    // one, and a statement shared by clients has its own plan cache),
    // several rows, two columns.
    let sqls = [
        "select $1::int * 2",
        "selec $1",
        "select 10 / ($1::int + (random() * 0)::int)",
        "select $1::int from generate_series(1, 3)",
        "select 'x' || $1::text as s, 42 as n",
    ];
    let names = ["", "a", "b", "c"];
    let values = ["0", "1", "7"];
    let seed: u64 = std::env::var("TG_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x5eed_1234_abcd);
    let mut rng = Rng(seed);
    let mut in_block: Option<usize> = None;
    let mut compared = 0;
    let steps: usize = std::env::var("TG_STEPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    for step in 0..steps {
        let who = rng.below(4) as usize;
        let mut msgs: Vec<Vec<u8>> = Vec::new();
        let mut said: Vec<String> = Vec::new();
        let readies;
        if in_block.is_none() && rng.below(12) == 0 {
            msgs.push(fe::query("begin"));
            said.push("Query begin".into());
            in_block = Some(who);
            readies = 1;
        } else if rng.below(15) == 0 {
            // A simple Query: it also drops the unnamed statement.
            msgs.push(fe::query("select 1"));
            said.push("Query select 1".into());
            readies = 1;
        } else if in_block == Some(who) && rng.below(4) == 0 {
            let end = ["commit", "rollback"][rng.below(2) as usize];
            msgs.push(fe::query(end));
            said.push(format!("Query {end}"));
            in_block = None;
            readies = 1;
        } else {
            for _ in 0..1 + rng.below(5) {
                let name = names[rng.below(4) as usize];
                match rng.below(6) {
                    0 | 1 => {
                        let sql = sqls[rng.below(sqls.len() as u64) as usize];
                        if !name.is_empty() {
                            // As drivers do: a name is closed before it
                            // is prepared again.
                            msgs.push(fe::close(b'S', name));
                            said.push(format!("Close S {name:?}"));
                        }
                        msgs.push(fe::parse(name, sql));
                        said.push(format!("Parse {name:?} {sql:?}"));
                    }
                    2 | 3 => {
                        let v = values[rng.below(3) as usize];
                        msgs.push(fe::bind(name, &[v]));
                        said.push(format!("Bind {name:?} {v}"));
                        if rng.below(2) == 0 {
                            msgs.push(fe::describe(b'P', ""));
                            said.push("Describe P".into());
                        }
                        if rng.below(3) == 0 {
                            // In steps: PortalSuspended, then the rest.
                            msgs.push(fe::execute_max(1));
                            said.push("Execute 1 row".into());
                        }
                        msgs.push(fe::execute());
                        said.push("Execute".into());
                        if rng.below(4) == 0 {
                            msgs.push(fe::close(b'P', ""));
                            said.push("Close P".into());
                        }
                    }
                    4 => {
                        msgs.push(fe::describe(b'S', name));
                        said.push(format!("Describe S {name:?}"));
                    }
                    _ => {
                        msgs.push(fe::close(b'S', name));
                        said.push(format!("Close S {name:?}"));
                    }
                }
            }
            if rng.below(5) == 0 {
                msgs.push(fe::flush());
                said.push("Flush".into());
            }
            msgs.push(fe::sync());
            said.push("Sync".into());
            readies = 1;
        }
        let bytes = msgs.concat();
        let (through, direct) = &mut clients[who];
        direct.send(&bytes);
        let want = answers_compared(direct, readies);
        through.send(&bytes);
        let got = answers_compared(through, readies);
        assert_eq!(
            got, want,
            "step {step}, client {who}, after {compared} equal answers, sent: {said:?}"
        );
        compared += want.len();
    }
    assert!(compared > 1000, "only {compared} answers compared");
}

/// A raw login as `app` on `appdb` with no parameter besides: the
/// TimeZone its greeting shows, and the session.
fn login_showing_timezone(addr: SocketAddr, token: &str) -> (String, Raw) {
    let mut raw = Raw::connect(addr);
    raw.send(&startup_message(&[("user", "app"), ("database", "appdb")]));
    assert_eq!(raw.read_message().0, b'R');
    raw.send(&password_message(token));
    let greeting = raw.read_until_ready_or_error();
    let tz = greeting
        .iter()
        .filter(|(t, _)| *t == b'S')
        .find_map(|(_, body)| {
            let mut parts = body.split(|&b| b == 0);
            let name = parts.next()?;
            let value = parts.next()?;
            name.eq_ignore_ascii_case(b"timezone")
                .then(|| String::from_utf8_lossy(value).into_owned())
        })
        .expect("TimeZone in the greeting");
    (tz, raw)
}

/// What the server says `SHOW TimeZone` is, over `raw`.
fn show_timezone(raw: &mut Raw) -> String {
    raw.send(&fe::query("show timezone"));
    let (tags, rows) = read_to_ready(raw);
    assert_eq!(tags, "TDCZ");
    rows[0].clone()
}

/// No reset runs between two clients' transactions, so a connection
/// carries the TimeZone the last client SET: a client that sent none gets
/// the login's back, the one its greeting shows, whether it pools by
/// transaction or (another token's, on the same upstream) by session.
#[test]
fn a_client_gets_the_login_values_of_what_it_did_not_set_whoever_had_its_connection() {
    let mut env = Env::build(EnvOptions {
        auth: HbaAuth::ScramSha256,
        workers: 1,
        tables: "[pool]\nmode = \"session\"\nmax_server_connections = 1\n".into(),
        ..EnvOptions::default()
    });
    let tx = env.create_token(&["-u", "app", "-d", "appdb", "--pool-mode", "transaction"]);
    let session = env.create_token(&["-u", "app", "-d", "appdb"]);
    let addr = env.start_proxy();
    let (login_tz, mut setter) = login_showing_timezone(addr, &tx);
    let other = if login_tz == "Asia/Tokyo" {
        "Europe/Paris"
    } else {
        "Asia/Tokyo"
    };
    setter.send(&fe::query(&format!("set timezone = '{other}'")));
    read_to_ready(&mut setter);
    assert_eq!(show_timezone(&mut setter), other);
    // Same key, the only connection: the one the setter left.
    let (shown, mut next) = login_showing_timezone(addr, &tx);
    assert_eq!(shown, login_tz);
    assert_eq!(show_timezone(&mut next), login_tz);
    // The setter's own value follows it.
    assert_eq!(show_timezone(&mut setter), other);
    drop(next);
    drop(setter);
    // A session-pooled client of the same upstream and parameters.
    let (shown, mut by_session) = login_showing_timezone(addr, &session);
    assert_eq!(shown, login_tz);
    assert_eq!(show_timezone(&mut by_session), login_tz);
}

/// A client's unnamed statement replayed on a connection that had
/// another's, in a pipeline where an error makes the server skip the
/// replay: the next use, still in the same pipeline, replays it again and
/// never runs the other client's.
#[test]
fn a_skipped_replay_of_the_unnamed_statement_is_replayed_again() {
    let (mut env, _admin) = env_tx(1, "max_server_connections = 1");
    let token = env.create_token(&["-u", "app", "-d", "appdb"]);
    let addr = env.start_proxy();
    let login = || raw_login(addr, &[("user", "app"), ("database", "appdb")], &token).unwrap();
    let (mut a, mut b) = (login(), login());
    a.send(&[fe::parse("", "select 'A'"), fe::sync()].concat());
    assert_eq!(read_to_ready(&mut a).0, "1Z");
    // The only connection now has b's unnamed statement.
    b.send(
        &[
            fe::parse("", "select 'B'"),
            fe::bind("", &[]),
            fe::execute(),
            fe::sync(),
        ]
        .concat(),
    );
    assert_eq!(read_to_ready(&mut b), ("12DCZ".into(), vec!["B".into()]));
    a.send(
        &[
            fe::bind("missing", &[]),
            fe::bind("", &[]),
            fe::execute(),
            fe::sync(),
            fe::bind("", &[]),
            fe::execute(),
            fe::sync(),
        ]
        .concat(),
    );
    assert_eq!(read_to_ready(&mut a).0, "EZ");
    assert_eq!(read_to_ready(&mut a), ("2DCZ".into(), vec!["A".into()]));
}
