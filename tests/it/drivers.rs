//! The I/O drivers: the epoll fallback, forced with `io_driver = "epoll"`,
//! serves everything io_uring does (sessions, COPY both ways, pipelined
//! queries, cancel, pgbench), and so do both plain relays on io_uring;
//! `/metrics` names the driver and the ring set-up that run.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};

use crate::harness::*;

/// An env whose proxy runs with `top` (top-level keys), `tables` and the
/// admin listener on a free port, and a token for `app` on `appdb`.
fn env_with(top: &str, tables: &str) -> (Env, String, SocketAddr) {
    let port = free_port();
    let mut env = Env::build(EnvOptions {
        top: top.into(),
        tables: format!("{tables}[admin]\nlisten = \"127.0.0.1:{port}\"\n"),
        ..EnvOptions::default()
    });
    let token = env.create_token(&["--user", "app", "--database", "appdb"]);
    env.start_proxy();
    (env, token, SocketAddr::from(([127, 0, 0, 1], port)))
}

/// The `tollgate_build_info` sample's labels.
fn build_info(admin: SocketAddr) -> String {
    let metrics = http(admin, "GET", "/metrics", None).body;
    metrics
        .lines()
        .find(|l| l.starts_with("tollgate_build_info{"))
        .expect("tollgate_build_info")
        .to_owned()
}

#[test]
fn the_epoll_fallback_serves_everything() {
    let (env, token, admin) = env_with("io_driver = \"epoll\"\n", "");
    let info = build_info(admin);
    assert!(info.contains("driver=\"epoll\""), "{info}");
    assert!(info.contains("ring_flags=\"-\""), "{info}");
    serves_everything(&env, &token);
}

/// Transaction pooling reads its sockets by readiness without leaving
/// completion mode; on epoll that is monoio's readiness and a `poll(2)`.
/// The same sessions (the temporary table pins the first client, so COPY,
/// pipelining and cancel run over its pinned connection), then pgbench
/// with each transaction lent one of two connections.
#[test]
fn the_epoll_fallback_serves_transaction_pooling() {
    let (env, token, admin) = env_with(
        "io_driver = \"epoll\"\n",
        "[pool]\nmode = \"transaction\"\nmax_server_connections = 2\n",
    );
    assert!(build_info(admin).contains("driver=\"epoll\""));
    serves_everything(&env, &token);
    let metrics = http(admin, "GET", "/metrics", None).body;
    let lends: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("tollgate_pool_transaction_lends_total"))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum();
    assert!(lends > 100.0, "{lends} lends");
}

/// The shards and io_uring fds of the proxy `env` runs, when it runs on
/// io_uring.
fn rings(env: &Env, admin: SocketAddr) -> Option<(usize, usize)> {
    let metrics = http(admin, "GET", "/metrics", None).body;
    let shards: usize = metrics
        .lines()
        .find_map(|l| l.strip_prefix("tollgate_shards "))
        .and_then(|v| v.trim().parse().ok())
        .expect("tollgate_shards");
    let rings = std::fs::read_dir(format!("/proc/{}/fd", env.pid()))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|l| l.to_string_lossy() == "anon_inode:[io_uring]")
        .count();
    build_info(admin)
        .contains("driver=\"io_uring\"")
        .then_some((shards, rings))
}

/// The default plain relay, completion-driven (the shard's relay ring):
/// each shard has three io_uring fds, monoio's ring, its relay ring and
/// the duplicate of it the ring's reactor polls; everything is served;
/// and a server connection it hands back to the pool serves the next
/// client.
#[test]
fn the_default_relay_runs_on_the_relay_ring() {
    let (env, token, admin) = env_with("", "");
    if let Some((shards, rings)) = rings(&env, admin) {
        assert_eq!(rings, 3 * shards, "{shards} shards, {rings} io_uring fds");
    }
    serves_everything(&env, &token);
    runtime().block_on(async {
        let conn = env.conn_str("app", "appdb", &token);
        let first = backend_pid(&pg_connect(&conn).await.unwrap()).await;
        // The reset runs after the client left: a client arriving at once
        // may get another connection meanwhile.
        let deadline = Instant::now() + Duration::from_secs(3);
        let mut others = Vec::new();
        loop {
            let c = pg_connect(&conn).await.unwrap();
            let p = backend_pid(&c).await;
            if p == first {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "backend {first} was never pooled again"
            );
            others.push(c);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
}

/// `plain_relay = "readiness"`: no relay ring (one ring per shard,
/// monoio's), and the same sessions served by readiness waits.
#[test]
fn the_readiness_relay_serves_everything() {
    let (env, token, admin) = env_with("plain_relay = \"readiness\"\n", "");
    if let Some((shards, rings)) = rings(&env, admin) {
        assert_eq!(rings, shards, "{shards} shards, {rings} io_uring fds");
    }
    serves_everything(&env, &token);
}

async fn backend_pid(c: &tokio_postgres::Client) -> i32 {
    c.query_one("select pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0)
}

/// Sessions, COPY both ways, pipelined queries, a cancel and pgbench, all
/// through the proxy `env` runs.
fn serves_everything(env: &Env, token: &str) {
    runtime().block_on(async {
        let (client, conn) =
            tokio_postgres::connect(&env.conn_str("app", "appdb", token), tokio_postgres::NoTls)
                .await
                .unwrap();
        tokio::spawn(conn);
        client
            .batch_execute("create temp table t (id int, payload text)")
            .await
            .unwrap();

        // COPY in and out: 20,000 rows, many relay buffers each way.
        let sink = client
            .copy_in::<_, Bytes>("copy t from stdin")
            .await
            .unwrap();
        let mut sink = std::pin::pin!(sink);
        let mut sent = 0u64;
        for chunk in 0..20 {
            let rows: String = (0..1000)
                .map(|i| format!("{}\t{}\n", chunk * 1000 + i, "x".repeat(100)))
                .collect();
            sent += rows.len() as u64;
            sink.send(Bytes::from(rows)).await.unwrap();
        }
        assert_eq!(sink.finish().await.unwrap(), 20_000);
        let out = client.copy_out("copy t to stdout").await.unwrap();
        let mut out = std::pin::pin!(out);
        let mut got = 0u64;
        while let Some(chunk) = out.next().await {
            got += chunk.unwrap().len() as u64;
        }
        assert_eq!(got, sent);

        // Pipelined: all sent before the first answer is read.
        let queries = (0..50).map(|i| {
            let client = &client;
            async move {
                let row = client.query_one("select $1::int + 1", &[&i]).await.unwrap();
                row.get::<_, i32>(0)
            }
        });
        let answers = futures_util::future::join_all(queries).await;
        assert_eq!(answers, (1..=50).collect::<Vec<i32>>());

        // Cancel.
        let cancel = client.cancel_token();
        let sleeping = client.simple_query("select pg_sleep(30)");
        let started = Instant::now();
        let canceller = async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            cancel.cancel_query(tokio_postgres::NoTls).await.unwrap();
        };
        let (r, ()) = tokio::join!(sleeping, canceller);
        assert_eq!(r.unwrap_err().code().unwrap().code(), "57014");
        assert!(started.elapsed() < Duration::from_secs(5));
    });

    // pgbench, its tables made through tollgate too, four clients at once.
    pgbench_through(env.addr(), token, "prepared", 2);
    env.assert_log_clean();
}

#[test]
fn metrics_name_the_ring_set_up_that_runs() {
    let (_env, _token, admin) = env_with("", "");
    let info = build_info(admin);
    let known = [
        "ring_flags=\"single_issuer,coop_taskrun,taskrun_flag\"",
        "ring_flags=\"coop_taskrun,taskrun_flag\"",
        "ring_flags=\"none\"",
    ];
    if info.contains("driver=\"io_uring\"") {
        assert!(known.iter().any(|k| info.contains(k)), "{info}");
    } else {
        // A machine without io_uring: the fallback, and no flags.
        assert!(
            info.contains("driver=\"epoll\"") && info.contains("ring_flags=\"-\""),
            "{info}"
        );
    }
}
