//! Unix-domain sockets on both sides: a client listener on
//! `<unix_socket_dir>/.s.PGSQL.<port>` (as libpq's `host=<dir>` expects),
//! and an upstream whose `host` is the server's socket directory.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::harness::*;

/// A short socket directory (sun_path holds 107 bytes).
fn socket_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("tgs")
        .tempdir_in("/tmp")
        .unwrap()
}

fn unix_conn(dir: &Path, port: u16, token: &str) -> String {
    format!(
        "host={} port={port} user=app dbname=appdb password={token}",
        dir.display()
    )
}

/// Starts `select pg_sleep(30)` on `client` and cancels it through the
/// client's cancel token (which connects the way the client did): 57014
/// within two seconds.
async fn cancel_reaches_its_query(client: tokio_postgres::Client) {
    let cancel = client.cancel_token();
    let query = tokio::spawn(async move { client.simple_query("select pg_sleep(30)").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    cancel.cancel_query(tokio_postgres::NoTls).await.unwrap();
    let r = query.await.unwrap();
    assert_eq!(r.unwrap_err().as_db_error().unwrap().code().code(), "57014");
    assert!(started.elapsed() < Duration::from_secs(2));
}

fn wait_for(what: &str, within: Duration, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !ready() {
        assert!(Instant::now() < deadline, "{what} never happened");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// psql, pgbench and a cancel through the socket; the audit log names the
/// peer as PostgreSQL does (`[local]`) with its uid and pid; with
/// `[tls] mode = "require"` a socket client still gets in without TLS
/// (TLS is for TCP); the socket and its lock go away with the process.
#[test]
fn clients_connect_through_the_unix_socket() {
    let dir = socket_dir();
    let cert = ServingCert::new("unix-ca", &["localhost"]);
    let mut env = Env::build(EnvOptions {
        top: format!("unix_socket_dir = \"{}\"", dir.path().display()),
        tables: cert.table("require"),
        ..EnvOptions::default()
    });
    let token = env.create_token(&["--user", "app"]);
    let addr = env.start_proxy();
    env.pgbench_init();
    let socket = dir.path().join(format!(".s.PGSQL.{}", addr.port()));
    let meta = std::fs::symlink_metadata(&socket).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o777);
    let lock = std::fs::read_to_string(format!("{}.lock", socket.display())).unwrap();
    assert!(
        lock.starts_with(&format!("{}\ntollgate\n", env.pid())),
        "{lock}"
    );

    let conn = unix_conn(dir.path(), addr.port(), &token);
    // The server sees a client of tollgate's; the client a session.
    assert_eq!(psql_ok(&conn, "select current_user"), "app");

    let bench = pg_tool("pgbench")
        .args(["-n", "-S", "-c", "4", "-j", "2", "-t", "50"])
        .arg(&conn)
        .output()
        .unwrap();
    let summary = pgbench_summary(&bench).unwrap_or_else(|all| panic!("{all}"));
    assert_eq!((summary.processed, summary.failed), (200, 0));

    // A wrong token over the socket is refused like any other.
    let bad = pg_tool("psql")
        .args([
            &unix_conn(dir.path(), addr.port(), "tg_wrong"),
            "-XAtc",
            "select 1",
        ])
        .output()
        .unwrap();
    assert!(!bad.status.success());

    // Cancel from a socket client reaches its query.
    runtime().block_on(async {
        cancel_reaches_its_query(pg_connect(&conn).await.unwrap()).await;
    });

    let log = env.log();
    // SAFETY: getuid(2) cannot fail and touches no memory.
    let uid = unsafe { libc::getuid() };
    let accepted = log
        .lines()
        .find(|l| l.contains("session started") && l.contains("client=[local]"))
        .unwrap_or_else(|| panic!("no [local] session in the log:\n{log}"));
    assert!(accepted.contains(&format!("peer_uid={uid}")), "{accepted}");
    assert!(accepted.contains("peer_pid="), "{accepted}");
    assert!(log.contains("client=[local]") && log.contains("outcome=\"rejected\""));
    env.assert_log_clean();

    env.signal(libc::SIGTERM);
    if env.wait_exit(Duration::from_secs(15)).is_none() {
        let log = env.log();
        let tail: Vec<&str> = log.lines().filter(|l| !l.contains(" TRACE ")).collect();
        panic!(
            "no exit after SIGTERM:\n{}",
            tail[tail.len().saturating_sub(40)..].join("\n")
        );
    }
    assert!(!socket.exists(), "the socket outlived the process");
    assert!(!PathBuf::from(format!("{}.lock", socket.display())).exists());
}

/// A process killed without its shutdown leaves its socket and lock; the
/// next start reclaims both. A lock held by a live process that is not a
/// tollgate (PostgreSQL's own, say) stops the start instead.
#[test]
fn a_killed_process_leaves_files_the_next_start_reclaims() {
    let dir = socket_dir();
    let mut env = Env::with(
        tollgate::cluster::HbaAuth::ScramSha256,
        &format!("unix_socket_dir = \"{}\"", dir.path().display()),
    );
    let token = env.create_token(&["--user", "app"]);
    let addr = env.start_proxy();
    let socket = dir.path().join(format!(".s.PGSQL.{}", addr.port()));
    let lock = PathBuf::from(format!("{}.lock", socket.display()));
    // The socket file is published once the whole start-up succeeded,
    // which can be just after the TCP listener (what start_proxy waits
    // for) accepts.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !(socket.exists() && lock.exists()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    env.signal(libc::SIGKILL);
    env.wait_exit(Duration::from_secs(5)).unwrap();
    assert!(socket.exists() && lock.exists());

    env.start_proxy();
    let conn = unix_conn(dir.path(), addr.port(), &token);
    assert_eq!(psql_ok(&conn, "select 1"), "1");
    env.signal(libc::SIGKILL);
    env.wait_exit(Duration::from_secs(5)).unwrap();

    // A live foreign owner (pid 1 is always alive): the start fails and
    // says why; nothing of the owner's is touched.
    std::fs::write(&lock, "1\n/var/lib/postgresql/15/main\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["serve", "--config"])
        .arg(&env.config)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is in use by process 1"), "{err}");
    assert!(std::fs::read_to_string(&lock).unwrap().starts_with("1\n"));
}

/// `listen_tcp = false`: only the socket, named by `listen`'s port.
#[test]
fn socket_only() {
    let dir = socket_dir();
    let mut env = Env::with(
        tollgate::cluster::HbaAuth::ScramSha256,
        &format!(
            "listen_tcp = false\nunix_socket_dir = \"{}\"",
            dir.path().display()
        ),
    );
    let token = env.create_token(&["--user", "app"]);
    let text = std::fs::read_to_string(&env.config).unwrap();
    let port: u16 = text
        .lines()
        .find_map(|l| l.strip_prefix("listen = \"127.0.0.1:"))
        .unwrap()
        .trim_end_matches('"')
        .parse()
        .unwrap();
    let log = env.dir.path().join("tollgate.log");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["serve", "--config"])
        .arg(&env.config)
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let socket = dir.path().join(format!(".s.PGSQL.{port}"));
    wait_for("the socket", Duration::from_secs(20), || {
        std::os::unix::net::UnixStream::connect(&socket).is_ok()
    });
    let conn = unix_conn(dir.path(), port, &token);
    assert_eq!(psql_ok(&conn, "select 2"), "2");
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
    let _ = child.kill();
    let _ = child.wait();
}

/// An upstream reached over the server's own socket directory: sessions,
/// session pooling and cancel all work, and the server sees a local
/// client (no address).
#[test]
fn an_upstream_over_its_unix_socket() {
    // One shard: the second client must reach the pool the first left.
    let mut env = Env::build(EnvOptions {
        workers: 1,
        ..EnvOptions::default()
    });
    let token = env.create_token(&["--user", "app"]);
    let text = std::fs::read_to_string(&env.config).unwrap();
    let socket_dir = env.cluster.socket_dir().display().to_string();
    std::fs::write(
        &env.config,
        text.replacen(
            "host = \"127.0.0.1\"",
            &format!("host = \"{socket_dir}\""),
            1,
        ),
    )
    .unwrap();
    env.start_proxy();
    let conn = env.conn_str("app", "appdb", &token);
    runtime().block_on(async {
        let client = pg_connect(&conn).await.unwrap();
        let row = client
            .query_one("select inet_server_addr()::text, pg_backend_pid()", &[])
            .await
            .unwrap();
        assert_eq!(row.get::<_, Option<String>>(0), None, "the server saw TCP");
        let pid: i32 = row.get(1);
        drop(client);
        // Session pooling over the socket: the next client gets the same
        // backend back.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let client = pg_connect(&conn).await.unwrap();
        let again: i32 = client
            .query_one("select pg_backend_pid()", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(again, pid);
        cancel_reaches_its_query(client).await;
    });
    env.assert_log_clean();
}
