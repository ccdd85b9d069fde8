//! Zero-downtime upgrade: a second tollgate started on the same port
//! (SO_REUSEPORT) shares new connections with the first; SIGTERM to the
//! first closes its listeners and drains it, and the second carries on.
//! pgbench connecting for every transaction runs through the whole swap
//! without a failed transaction.

use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::harness::*;

const MIGRATE_REQ: &str = "/proc/sys/net/ipv4/tcp_migrate_req";

/// Sets net.ipv4.tcp_migrate_req for the test, as the README asks of a
/// deployment that upgrades in place: connections that completed their
/// handshake on the old process's listener but were not yet accepted are
/// then handed to the new process's listener instead of being reset.
/// The old value comes back on drop. `None` where the sysctl cannot be
/// written (not root, or an old kernel).
struct MigrateReq(String);

impl MigrateReq {
    fn on() -> Option<MigrateReq> {
        let old = std::fs::read_to_string(MIGRATE_REQ).ok()?;
        std::fs::write(MIGRATE_REQ, "1").ok()?;
        Some(MigrateReq(old.trim().to_owned()))
    }
}

impl Drop for MigrateReq {
    fn drop(&mut self) {
        let _ = std::fs::write(MIGRATE_REQ, &self.0);
    }
}

fn wait_for_log(path: &std::path::Path, needle: &str, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        if std::fs::read_to_string(path).is_ok_and(|l| l.contains(needle)) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{needle:?} never appeared in {path:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The last `n` lines of a proxy log above debug level, for a failure
/// message (the test logs at trace, thousands of lines).
fn last_info_lines(log: &str, n: usize) -> String {
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| !l.contains(" TRACE ") && !l.contains(" DEBUG "))
        .collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[test]
fn pgbench_runs_through_an_in_place_upgrade() {
    let migrate = MigrateReq::on();
    if migrate.is_none() {
        eprintln!("{MIGRATE_REQ} not writable: queued connections may be reset at the swap");
    }
    let mut env = Env::with(
        tollgate::cluster::HbaAuth::ScramSha256,
        "shutdown_timeout = \"20s\"",
    );
    let token = env.create_token(&["--user", "app"]);
    env.start_proxy();
    let addr = env.addr();
    env.pgbench_init();

    // A new connection for every transaction, so connections keep arriving
    // throughout the swap; at a set rate, so the 2-core machine keeps CPU
    // for the postmaster's forks.
    let bench = pg_tool("pgbench")
        .args([
            "-n", "-S", "-C", "-c", "4", "-j", "2", "-R", "200", "-T", "10",
        ])
        .arg(format!(
            "host={} port={} user=app dbname=appdb password={token} sslmode=disable",
            addr.ip(),
            addr.port()
        ))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));

    // The new process: same config, same port, its own log.
    let new_log = env.dir.path().join("tollgate-new.log");
    let new = spawn_proxy(&env.config, &new_log);
    wait_for_log(&new_log, "tollgate listening", Duration::from_secs(10));
    std::thread::sleep(Duration::from_secs(1));

    // The old one stops accepting and drains.
    let signalled = Instant::now();
    env.signal(libc::SIGTERM);
    let status = env
        .wait_exit(Duration::from_secs(15))
        .expect("the old process did not finish draining");
    assert!(status.success(), "old process: {status}");
    let drained_in = signalled.elapsed();

    let out = bench.wait_with_output().unwrap();
    let PgbenchSummary {
        processed,
        failed,
        output,
    } = pgbench_summary(&out).unwrap_or_else(|all| {
        let new_text = std::fs::read_to_string(&new_log).unwrap_or_default();
        panic!(
            "pgbench failed across the swap:\n{all}\n\
                 old process, last lines:\n{}\nnew process, last lines:\n{}",
            last_info_lines(&env.log(), 30),
            last_info_lines(&new_text, 30)
        )
    });
    assert_eq!(failed, 0, "{output}");

    // Both processes served sessions; the new one served after the old left.
    let old_log = env.log();
    let new_text = std::fs::read_to_string(&new_log).unwrap();
    let (old_sessions, new_sessions) = (
        old_log.matches("session started").count(),
        new_text.matches("session started").count(),
    );
    assert!(old_log.contains("drained; exiting"), "{old_log}");
    assert!(old_sessions > 0 && new_sessions > 0);
    eprintln!(
        "{processed} transactions, 0 failed; old process served {old_sessions} sessions and \
         drained {drained_in:.2?} after SIGTERM; new process served {new_sessions}; \
         tcp_migrate_req {}",
        if migrate.is_some() { "on" } else { "unchanged" }
    );
    // The new process goes on alone.
    let rt = runtime();
    rt.block_on(pg_connect(&format!(
        "host={} port={} user=app dbname=appdb password={token} sslmode=disable",
        addr.ip(),
        addr.port()
    )))
    .expect("login on the new process");
    drop(new);
}
