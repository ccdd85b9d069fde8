//! Stopping without losing work: SIGTERM closes the listeners at once,
//! lets running queries and sessions finish until `shutdown_timeout`, then
//! ends the rest with FATAL 57P01 and exits 0; a second SIGTERM exits at
//! once.

use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::harness::*;

/// Polls until nothing accepts connections on `addr`.
fn wait_refused(addr: std::net::SocketAddr, within: Duration) -> Duration {
    let start = Instant::now();
    while TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok() {
        assert!(
            start.elapsed() < within,
            "still accepting connections {within:?} after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    start.elapsed()
}

/// A running proxy with `shutdown_timeout`, and a connection string.
fn proxy_draining_for(timeout: &str) -> (Env, String) {
    let mut env = Env::with(
        tollgate::cluster::HbaAuth::ScramSha256,
        &format!("shutdown_timeout = \"{timeout}\""),
    );
    let token = env.create_token(&["--user", "app"]);
    env.start_proxy();
    let conn = env.conn_str("app", "appdb", &token);
    (env, conn)
}

#[test]
fn sigterm_lets_queries_finish_then_ends_idle_sessions_and_exits_0() {
    let (mut env, conn) = proxy_draining_for("2s");
    let addr = env.addr();
    let rt = runtime();
    let (idle, idle_end) = rt.block_on(connect_watched(&conn));
    let (busy, _busy_end) = rt.block_on(connect_watched(&conn));
    let query = rt.spawn(async move {
        busy.query_one("select pg_sleep(1.5)::text, 42", &[])
            .await
            .map(|row| row.get::<_, i32>(1))
    });
    // Let the query reach the server before the signal, and the shard's
    // other tasks that wait for the drain (the pools' upkeep, every
    // second) poll after the listener's: each must still be woken.
    std::thread::sleep(Duration::from_millis(1200));

    let signalled = Instant::now();
    env.signal(libc::SIGTERM);
    let refused_after = wait_refused(addr, Duration::from_secs(1));

    // The running query finishes normally.
    let answer = rt
        .block_on(query)
        .unwrap()
        .expect("the running query failed");
    assert_eq!(answer, 42);
    // The idle session is ended after the drain time, with Postgres's code
    // for an administrator's shutdown.
    let (code, message) = rt.block_on(ended(idle_end, Duration::from_secs(5)));
    let idle_ended_after = signalled.elapsed();
    assert_eq!(code, "57P01", "{message}");
    assert!(
        idle_ended_after >= Duration::from_millis(1900),
        "ended before the drain time: {idle_ended_after:?}"
    );
    drop(idle);

    let status = env
        .wait_exit(Duration::from_secs(5))
        .expect("tollgate did not exit after draining");
    assert!(status.success(), "exit status {status}");
    let log = env.log();
    assert!(log.contains("shutting down"), "{log}");
    assert!(log.contains("drained; exiting"), "{log}");
    assert!(log.contains("ended_by=\"shutdown\""), "{log}");
    eprintln!(
        "listener closed {refused_after:?} after SIGTERM; idle session ended after \
         {idle_ended_after:?}; exited after {:?}",
        signalled.elapsed()
    );
}

#[test]
fn a_second_sigterm_exits_at_once() {
    let (mut env, conn) = proxy_draining_for("60s");
    let rt = runtime();
    let (_idle, _idle_end) = rt.block_on(connect_watched(&conn));
    env.signal(libc::SIGTERM);
    // Draining, with a session open: still running.
    assert!(env.wait_exit(Duration::from_millis(500)).is_none());
    let second = Instant::now();
    env.signal(libc::SIGTERM);
    let status = env
        .wait_exit(Duration::from_secs(2))
        .expect("tollgate did not exit on the second SIGTERM");
    assert!(status.success(), "exit status {status}");
    eprintln!("exited {:?} after the second SIGTERM", second.elapsed());
    assert!(env.log().contains("second signal"));
}

#[test]
fn the_drain_ends_when_the_last_session_leaves() {
    let (mut env, conn) = proxy_draining_for("60s");
    let rt = runtime();
    let (client, end) = rt.block_on(connect_watched(&conn));
    env.signal(libc::SIGTERM);
    std::thread::sleep(Duration::from_millis(300));
    // The session is still served while draining.
    let n: i32 = rt
        .block_on(client.query_one("select 7", &[]))
        .unwrap()
        .get(0);
    assert_eq!(n, 7);
    let left = Instant::now();
    // Close it (Terminate) and wait until the connection is gone.
    drop(client);
    let _ = rt.block_on(end);
    let status = env
        .wait_exit(Duration::from_secs(3))
        .expect("tollgate kept draining after the last session left");
    assert!(status.success(), "exit status {status}");
    eprintln!("exited {:?} after the last session left", left.elapsed());
    assert!(
        env.log().contains("ended=0"),
        "no session should have been cut"
    );
}
