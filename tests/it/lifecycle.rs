//! Live tokens, end to end: revoke, expiry, rotation and store edits take
//! effect on a running proxy, including on sessions already open; and the
//! rules a token carries (connection limit, networks, session parameters).

use std::time::{Duration, Instant};

use crate::harness::*;

/// Shards that logged a started session.
fn shards_with_sessions(log: &str) -> Vec<String> {
    let mut shards: Vec<String> = log
        .lines()
        .filter(|l| l.contains("session started"))
        .filter_map(|l| {
            let at = l.find("shard=")? + "shard=".len();
            Some(l[at..].chars().take_while(char::is_ascii_digit).collect())
        })
        .collect();
    shards.sort();
    shards.dedup();
    shards
}

#[test]
fn revoke_ends_open_sessions_on_every_shard() {
    let mut env = Env::new();
    let doomed = env.create_token(&["--user", "app"]);
    let other = env.create_token(&["--user", "app"]);
    env.start_proxy();
    let conn = env.conn_str("app", "appdb", &doomed);
    runtime().block_on(async {
        // Open sessions until both shards hold some (the kernel picks).
        let mut sessions = Vec::new();
        for _ in 0..40 {
            sessions.push(connect_watched(&conn).await);
            if sessions.len() >= 4 && shards_with_sessions(&env.log()).len() == 2 {
                break;
            }
        }
        assert_eq!(shards_with_sessions(&env.log()), ["0", "1"]);
        let (bystander, bystander_end) =
            connect_watched(&env.conn_str("app", "appdb", &other)).await;
        // One session is mid-transaction, one is idle: both must end.
        sessions[0]
            .0
            .batch_execute("begin; select 1")
            .await
            .unwrap();

        let revoked_at = Instant::now();
        env.token_cmd(&["revoke", &doomed[3..15]]);
        for (_client, end) in sessions {
            let (code, message) = ended(end, Duration::from_millis(1500)).await;
            assert_eq!(code, "57P01");
            assert!(message.contains("revoked"), "{message}");
        }
        let took = revoked_at.elapsed();
        assert!(took < Duration::from_millis(1500), "took {took:?}");

        let (code, _) = connect_error(&conn).await;
        assert_eq!(code, "28P01");
        // Another token's session is untouched.
        bystander.simple_query("select 1").await.unwrap();
        assert!(bystander_end.is_empty());
    });
    assert!(env.log().contains("reason=\"revoked\""));
    env.assert_log_clean();
}

#[test]
fn expiry_terminates_or_keeps_open_sessions() {
    let mut env = Env::new();
    let short = env.create_token(&["--user", "app", "--ttl", "2s"]);
    let kept = env.create_token(&["--user", "app", "--ttl", "2s", "--on-expiry", "keep"]);
    // Its expiry is no later than this (creating it took some time, more on
    // a loaded machine, after `short`'s).
    let kept_expired = Instant::now() + Duration::from_secs(2);
    env.start_proxy();
    runtime().block_on(async {
        let (_a, a_end) = connect_watched(&env.conn_str("app", "appdb", &short)).await;
        let (b, _b_end) = connect_watched(&env.conn_str("app", "appdb", &kept)).await;
        let (code, message) = ended(a_end, Duration::from_secs(4)).await;
        assert_eq!(code, "57P01");
        assert!(message.contains("expired"), "{message}");
        // `keep`: the open session runs on; new logins are refused.
        tokio::time::sleep_until((kept_expired + Duration::from_millis(300)).into()).await;
        b.simple_query("select 1").await.unwrap();
        let (code, _) = connect_error(&env.conn_str("app", "appdb", &kept)).await;
        assert_eq!(code, "28P01");
    });
}

#[test]
fn rotation_with_grace() {
    let mut env = Env::new();
    let old = env.create_token(&["--user", "app"]);
    env.start_proxy();
    runtime().block_on(async {
        let (_s, s_end) = connect_watched(&env.conn_str("app", "appdb", &old)).await;
        let new = env.token_cmd(&["rotate", &old[3..15], "--grace", "2s"]);
        let new = new.trim().to_owned();
        assert_eq!(&new[..16], &old[..16], "rotation keeps the id");
        assert_ne!(new, old);
        tokio::time::sleep(Duration::from_millis(500)).await;
        // Inside the grace: both secrets work.
        for t in [&old, &new] {
            let c = pg_connect(&env.conn_str("app", "appdb", t)).await.unwrap();
            c.simple_query("select 1").await.unwrap();
        }
        // After it: only the new one, and the old secret's session ends.
        let (code, message) = ended(s_end, Duration::from_secs(4)).await;
        assert_eq!(code, "57P01");
        assert!(message.contains("rotated"), "{message}");
        let (code, _) = connect_error(&env.conn_str("app", "appdb", &old)).await;
        assert_eq!(code, "28P01");
        let c = pg_connect(&env.conn_str("app", "appdb", &new))
            .await
            .unwrap();
        c.simple_query("select 1").await.unwrap();
        env.secrets.push(new);
    });
    env.assert_log_clean();
}

#[test]
fn a_broken_store_keeps_the_last_good_tokens() {
    let mut env = Env::new();
    let token = env.create_token(&["--user", "app"]);
    env.start_proxy();
    let store = env.dir.path().join("tokens.toml");
    let good = std::fs::read_to_string(&store).unwrap();
    std::fs::write(&store, "[[token]]\nid = \"oops").unwrap();
    std::thread::sleep(Duration::from_millis(800));
    runtime().block_on(async {
        let c = pg_connect(&env.conn_str("app", "appdb", &token))
            .await
            .unwrap();
        c.simple_query("select 1").await.unwrap();
    });
    assert!(env.log().contains("token store rejected"));
    // Fixed again (with one more token): picked up.
    std::fs::write(&store, good).unwrap();
    let fresh = env.create_token(&["--user", "app"]);
    std::thread::sleep(Duration::from_millis(800));
    runtime().block_on(async {
        let c = pg_connect(&env.conn_str("app", "appdb", &fresh))
            .await
            .unwrap();
        c.simple_query("select 1").await.unwrap();
    });
    env.assert_log_clean();
}

#[test]
fn token_rules() {
    // Tagged application_names (opt-in): the token's session parameters
    // and the tag both reach the server.
    let mut env = Env::build(EnvOptions {
        tables: "[audit]\ntag_application_name = true\n".into(),
        ..EnvOptions::default()
    });
    let limited = env.create_token(&["--user", "app", "--max-connections", "2"]);
    let elsewhere = env.create_token(&["--user", "app", "--cidr", "10.0.0.0/8"]);
    let local = env.create_token(&["--user", "app", "--cidr", "127.0.0.0/8"]);
    let read_only = env.create_token(&[
        "--user",
        "app",
        "--set",
        "default_transaction_read_only=on",
        "--set",
        "statement_timeout=1234ms",
    ]);
    env.start_proxy();
    runtime().block_on(async {
        // max_connections, counted across shards.
        let conn = env.conn_str("app", "appdb", &limited);
        let a = pg_connect(&conn).await.unwrap();
        let _b = pg_connect(&conn).await.unwrap();
        let (code, message) = connect_error(&conn).await;
        assert_eq!(code, "53300");
        assert!(
            message.contains("too many connections for this token"),
            "{message}"
        );
        drop(a);
        tokio::time::sleep(Duration::from_millis(300)).await;
        pg_connect(&conn).await.expect("a slot was freed");

        // Networks.
        let (code, _) = connect_error(&env.conn_str("app", "appdb", &elsewhere)).await;
        assert_eq!(code, "28P01");
        pg_connect(&env.conn_str("app", "appdb", &local))
            .await
            .unwrap();

        // Injected session parameters win over the client's.
        let conn = format!(
            "{} options='-c statement_timeout=0'",
            env.conn_str("app", "appdb", &read_only)
        );
        let c = pg_connect(&conn).await.unwrap();
        let timeout: String = c
            .query_one("show statement_timeout", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(timeout, "1234ms");
        let e = c.batch_execute("create table t(x int)").await.unwrap_err();
        assert_eq!(e.as_db_error().unwrap().code().code(), "25006");
        let app: String = c
            .query_one(
                "select application_name from pg_stat_activity where pid = pg_backend_pid()",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert!(
            app.ends_with(&format!("[tg:{}@127.0.0.1]", &read_only[3..15])),
            "{app}"
        );
    });
    assert!(env.log().contains("address_not_allowed"));
    env.assert_log_clean();
}
