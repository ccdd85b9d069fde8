//! Shared harness for integration tests: a real throwaway Postgres (started
//! by `tollgate::cluster`, as `nobody` when the tests run as root), a config
//! and token store in a temp folder, and the real `tollgate` binary started
//! on a free port with its log captured at TRACE level.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tollgate::cluster::{Cluster, ClusterOptions, HbaAuth};

pub const BIN: &str = env!("CARGO_BIN_EXE_tollgate");

pub struct Env {
    pub cluster: Cluster,
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    /// Every token handed out, for the log scan.
    pub secrets: Vec<String>,
    proxy: Option<Proxy>,
}

/// How to build an [`Env`].
pub struct EnvOptions {
    pub auth: HbaAuth,
    /// Top-level keys.
    pub top: String,
    /// Whole tables (e.g. `[tls]`), appended at the end.
    pub tables: String,
    /// Extra keys inside `[upstream]`.
    pub upstream: String,
    pub upstream_host: String,
    /// postgresql.conf settings for the cluster.
    pub cluster_conf: Vec<(String, String)>,
    /// Shards (`workers`).
    pub workers: usize,
    /// The PostgreSQL server binaries, when not the default ones.
    pub pg_bin_dir: Option<PathBuf>,
}

impl Default for EnvOptions {
    fn default() -> Self {
        EnvOptions {
            auth: HbaAuth::ScramSha256,
            top: String::new(),
            tables: String::new(),
            upstream: String::new(),
            upstream_host: "127.0.0.1".into(),
            cluster_conf: Vec::new(),
            workers: 2,
            pg_bin_dir: None,
        }
    }
}

pub struct Proxy {
    child: Child,
    pub addr: SocketAddr,
    pub log: PathBuf,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Env {
    /// A cluster with scram-sha-256 auth, role `app`, database `appdb`, and a
    /// proxy config (not started) pointing at it.
    pub fn new() -> Env {
        Self::with(HbaAuth::ScramSha256, "")
    }

    /// `extra` is appended to the top level of the config.
    pub fn with(auth: HbaAuth, extra: &str) -> Env {
        Self::build(EnvOptions {
            auth,
            top: extra.to_owned(),
            ..EnvOptions::default()
        })
    }

    pub fn build(opts: EnvOptions) -> Env {
        let cluster = Cluster::start(&ClusterOptions {
            password: "upstream-Pa55-word".into(),
            auth: opts.auth,
            extra_conf: opts.cluster_conf,
            bin_dir: opts.pg_bin_dir,
            ..ClusterOptions::default()
        })
        .expect("start throwaway Postgres");
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("tollgate.toml");
        let port = free_port();
        std::fs::write(
            &config,
            format!(
                "listen = \"127.0.0.1:{port}\"\nworkers = {workers}\n{top}\n\
                 [upstream]\nhost = \"{host}\"\nport = {}\n{upstream}\n\
                 [[upstream.credentials]]\nuser = \"app\"\npassword = \"{}\"\n\
                 [tokens]\nfile = \"tokens.toml\"\n{tables}\n",
                cluster.port(),
                cluster.password(),
                host = opts.upstream_host,
                upstream = opts.upstream,
                workers = opts.workers,
                top = opts.top,
                tables = opts.tables,
            ),
        )
        .unwrap();
        Env {
            cluster,
            dir,
            config,
            secrets: Vec::new(),
            proxy: None,
        }
    }

    /// Runs `tollgate token create` and returns the printed token.
    pub fn create_token(&mut self, args: &[&str]) -> String {
        let out = Command::new(BIN)
            .args(["token", "create", "--config"])
            .arg(&self.config)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "token create failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let token = String::from_utf8(out.stdout).unwrap().trim().to_owned();
        assert!(token.starts_with("tg_"), "unexpected output {token:?}");
        self.secrets.push(token.clone());
        token
    }

    /// Runs a `tollgate token ...` subcommand and returns stdout.
    pub fn token_cmd(&self, args: &[&str]) -> String {
        let out = Command::new(BIN)
            .arg("token")
            .arg(args[0])
            .arg("--config")
            .arg(&self.config)
            .args(&args[1..])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "token {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Starts the proxy without `RUST_LOG`, so the config's log level rules.
    pub fn start_proxy_config_logging(&mut self) -> SocketAddr {
        let log = self.dir.path().join("tollgate.log");
        let proxy = spawn_proxy_logging(&self.config, &log, None);
        let addr = proxy.addr;
        self.proxy = Some(proxy);
        addr
    }

    /// Starts the proxy with `configure` applied to its command.
    pub fn start_proxy_with(&mut self, configure: impl FnOnce(&mut Command)) -> SocketAddr {
        let log = self.dir.path().join("tollgate.log");
        let proxy = spawn_proxy_with(&self.config, &log, Some("debug"), configure);
        let addr = proxy.addr;
        self.proxy = Some(proxy);
        addr
    }

    /// Starts the proxy and waits until it accepts connections.
    pub fn start_proxy(&mut self) -> SocketAddr {
        let proxy = spawn_proxy(&self.config, &self.dir.path().join("tollgate.log"));
        let addr = proxy.addr;
        self.proxy = Some(proxy);
        addr
    }

    pub fn addr(&self) -> SocketAddr {
        self.proxy.as_ref().expect("proxy started").addr
    }

    /// The proxy's process id.
    /// Sends `signal` to the running proxy.
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) with a pid we started and a signal number.
        let rc = unsafe { libc::kill(self.pid() as i32, signal) };
        assert_eq!(rc, 0, "kill: {}", std::io::Error::last_os_error());
    }

    /// Waits up to `within` for the proxy to exit; its status, or `None`
    /// if it is still running.
    pub fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let proxy = self.proxy.as_mut().expect("proxy started");
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = proxy.child.try_wait().unwrap() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn pid(&self) -> u32 {
        self.proxy.as_ref().expect("proxy started").child.id()
    }

    pub fn log_path(&self) -> PathBuf {
        self.proxy.as_ref().expect("proxy started").log.clone()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// A libpq/tokio-postgres connection string through the proxy.
    pub fn conn_str(&self, user: &str, db: &str, token: &str) -> String {
        let a = self.addr();
        format!(
            "host={} port={} user={user} dbname={db} password={token} sslmode=disable",
            a.ip(),
            a.port()
        )
    }

    /// The same, straight to Postgres with the real password.
    pub fn direct_conn_str(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user=app dbname=appdb password={} sslmode=disable",
            self.cluster.port(),
            self.cluster.password()
        )
    }

    /// Asserts the log holds no token secret and no upstream password, in
    /// any of the [`secret_encodings`] (plain, hex, base64 variants).
    /// `pgbench -i -q -s 1` straight to the cluster: the tables a pgbench
    /// run through tollgate then uses.
    pub fn pgbench_init(&self) {
        let init = pg_tool("pgbench")
            .args(["-i", "-q", "-s", "1"])
            .arg(self.direct_conn_str())
            .output()
            .unwrap();
        assert!(
            init.status.success(),
            "pgbench -i: {}",
            String::from_utf8_lossy(&init.stderr)
        );
    }

    pub fn assert_log_clean(&self) {
        let log = self.log();
        assert!(!log.is_empty(), "the proxy log is empty");
        let mut needles: Vec<(String, String)> = Vec::new();
        let password = self.cluster.password().to_owned();
        needles.push(("upstream password".into(), password.clone()));
        for token in &self.secrets {
            // The secret part of the token (after tg_<id>_) and the whole token.
            needles.push(("token".into(), token.clone()));
            if token.starts_with("tg_") && token.len() >= 80 {
                needles.push(("token secret".into(), token[16..80].to_owned()));
            }
        }
        let mut forms = Vec::new();
        for (what, n) in &needles {
            for (encoding, form) in secret_encodings(n.as_bytes()) {
                forms.push((format!("{what} ({encoding})"), form));
            }
        }
        for (what, form) in forms {
            assert!(!log.contains(&form), "the log contains the {what}");
        }
    }
}

pub fn spawn_proxy(config: &Path, log: &Path) -> Proxy {
    spawn_proxy_logging(config, log, Some("trace"))
}

/// [`spawn_proxy`] with `RUST_LOG` set to `rust_log`, or unset (the
/// config's `[log] level` then rules).
pub fn spawn_proxy_logging(config: &Path, log: &Path, rust_log: Option<&str>) -> Proxy {
    spawn_proxy_with(config, log, rust_log, |_| {})
}

/// [`spawn_proxy_logging`], with `configure` applied to the command last
/// (resource limits, say).
pub fn spawn_proxy_with(
    config: &Path,
    log: &Path,
    rust_log: Option<&str>,
    configure: impl FnOnce(&mut Command),
) -> Proxy {
    let text = std::fs::read_to_string(config).unwrap();
    let listen: SocketAddr = text
        .lines()
        .find_map(|l| l.strip_prefix("listen = "))
        .unwrap()
        .trim_matches('"')
        .parse()
        .unwrap();
    let mut command = Command::new(BIN);
    command.args(["serve", "--config"]).arg(config);
    match rust_log {
        Some(level) => command.env("RUST_LOG", level),
        None => command.env_remove("RUST_LOG"),
    };
    configure(&mut command);
    let child = command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap();
    let mut proxy = Proxy {
        child,
        addr: listen,
        log: log.to_owned(),
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if TcpStream::connect(listen).is_ok() {
            return proxy;
        }
        if let Ok(Some(status)) = proxy.child.try_wait() {
            panic!(
                "tollgate exited with {status}: {}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        assert!(
            Instant::now() < deadline,
            "tollgate did not start listening"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A raw protocol client for byte-level tests.
#[derive(Debug)]
pub struct Raw(pub TcpStream);

impl Raw {
    pub fn connect(addr: SocketAddr) -> Raw {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        Raw(s)
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.0.write_all(bytes).unwrap();
    }

    /// Reads until the server closes (or the timeout) and returns everything.
    pub fn read_to_close(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        let _ = self.0.read_to_end(&mut out);
        out
    }

    /// Reads one backend message (tag, body).
    pub fn read_message(&mut self) -> (u8, Vec<u8>) {
        let mut head = [0u8; 5];
        self.0.read_exact(&mut head).unwrap();
        let len = i32::from_be_bytes(head[1..5].try_into().unwrap()) as usize;
        let mut body = vec![0u8; len - 4];
        self.0.read_exact(&mut body).unwrap();
        (head[0], body)
    }
}

pub fn startup_message(pairs: &[(&str, &str)]) -> Vec<u8> {
    let mut b = bytes::BytesMut::new();
    tollgate::protocol::startup::encode_startup_message(
        &mut b,
        tollgate::protocol::startup::ProtocolVersion::V3_0,
        pairs.iter().copied(),
    );
    b.to_vec()
}

pub fn password_message(p: &str) -> Vec<u8> {
    let mut b = bytes::BytesMut::new();
    postgres_protocol::message::frontend::password_message(p.as_bytes(), &mut b).unwrap();
    b.to_vec()
}

/// The (code, message) fields of an ErrorResponse body.
pub fn error_fields(body: &[u8]) -> (String, String) {
    let f = tollgate::protocol::backend::parse_error_fields(body);
    (f.code.to_owned(), f.message.to_owned())
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Connects with tokio-postgres, driving the connection in the background.
/// The first column of the first row, by the simple protocol (no named
/// statement, so no pin).
pub async fn simple_one(c: &tokio_postgres::Client, sql: &str) -> String {
    for m in c.simple_query(sql).await.unwrap() {
        if let tokio_postgres::SimpleQueryMessage::Row(r) = m {
            return r.get(0).unwrap_or_default().to_owned();
        }
    }
    panic!("no row from {sql}");
}

pub async fn pg_connect(conn: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(conn, tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// A connection whose background task reports how the connection ended.
pub async fn connect_watched(
    conn: &str,
) -> (
    tokio_postgres::Client,
    tokio::sync::oneshot::Receiver<Result<(), tokio_postgres::Error>>,
) {
    let (client, connection) = tokio_postgres::connect(conn, tokio_postgres::NoTls)
        .await
        .expect("connect through tollgate");
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let _ = tx.send(connection.await);
    });
    (client, rx)
}

/// Waits for a watched connection to end and returns its (code, message).
pub async fn ended(
    rx: tokio::sync::oneshot::Receiver<Result<(), tokio_postgres::Error>>,
    within: Duration,
) -> (String, String) {
    let result = tokio::time::timeout(within, rx)
        .await
        .expect("the session was not ended in time")
        .expect("connection task gone");
    let e = result.expect_err("the connection ended without an error");
    let db = e
        .as_db_error()
        .unwrap_or_else(|| panic!("not a server error: {e}"));
    (db.code().code().to_owned(), db.message().to_owned())
}

/// The SQLSTATE and message of a failed connection attempt.
pub async fn connect_error(conn: &str) -> (String, String) {
    match pg_connect(conn).await {
        Ok(_) => panic!("connection unexpectedly succeeded"),
        Err(e) => {
            let db = e
                .as_db_error()
                .unwrap_or_else(|| panic!("not a server error: {e}"));
            (db.code().code().to_owned(), db.message().to_owned())
        }
    }
}

/// Runs a Postgres client tool (psql, pgbench) from the cluster's bin dir.
pub fn pg_tool(name: &str) -> Command {
    let mut c = Command::new(tollgate::cluster::find_pg_bin(name).unwrap());
    c.env_remove("PGPASSWORD").env_remove("PGHOST");
    c
}

/// psql running `sql` from its standard input (no limit on the length of
/// a statement, unlike `-c`), stopping at the first error; its output.
pub fn psql_script(conn: &str, sql: &str) -> String {
    let mut child = pg_tool("psql")
        .args([conn, "-XAt", "-v", "ON_ERROR_STOP=1", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let sql = sql.to_owned();
    // Written from a thread: psql answers while it reads.
    let writer = std::thread::spawn(move || stdin.write_all(sql.as_bytes()));
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `sql` with psql over `conn`, asserting success; its output,
/// unaligned and trimmed.
pub fn psql_ok(conn: &str, sql: &str) -> String {
    let out = pg_tool("psql")
        .args([conn, "-XAt", "-c", sql])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Asserts that a check program (another driver's test, in
/// `tests/tools/`) exited 0 and printed just "ok"; shows all it printed
/// otherwise.
pub fn assert_printed_ok(out: &std::process::Output) {
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        out.status.success() && stdout.trim() == "ok",
        "{stdout}\n{stderr}"
    );
}

/// What a finished pgbench run reported.
#[derive(Debug)]
pub struct PgbenchSummary {
    /// "number of transactions actually processed".
    pub processed: u64,
    /// "number of failed transactions" (pgbench 15 and later print it).
    pub failed: u64,
    /// stdout and stderr, for assertion messages.
    pub output: String,
}

/// Reads pgbench's summary from its output: `Err` with everything it
/// printed when it exited non-zero or printed no summary.
/// pgbench through tollgate at `addr` as `app` on `appdb`: makes its
/// tables (COPY included), then runs select-only with four clients for
/// `secs` seconds in query `mode`; fails the test on any failed
/// transaction or when hardly any ran.
pub fn pgbench_through(addr: SocketAddr, token: &str, mode: &str, secs: u32) {
    let pgbench = |args: &[&str]| pgbench_at(addr, token, args);
    let init = pgbench(&["-i", "-s", "1", "-q"]);
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    let secs = secs.to_string();
    let run = pgbench(&["-S", "-M", mode, "-c", "4", "-j", "2", "-T", &secs]);
    let PgbenchSummary {
        processed,
        failed,
        output,
    } = pgbench_summary(&run).unwrap_or_else(|all| panic!("pgbench failed:\n{all}"));
    assert_eq!(failed, 0, "{output}");
    assert!(processed > 100, "only {processed} transactions");
}

/// Runs pgbench with `args` through tollgate at `addr`, as `app` on
/// `appdb`.
pub fn pgbench_at(addr: SocketAddr, token: &str, args: &[&str]) -> std::process::Output {
    pg_tool("pgbench")
        .args(["-h", &addr.ip().to_string(), "-p", &addr.port().to_string()])
        .args(["-U", "app"])
        .args(args)
        .arg("appdb")
        .env("PGPASSWORD", token)
        .env("PGSSLMODE", "disable")
        .output()
        .unwrap()
}

/// The app role's client backends, as the server counts them (less the
/// asking one).
pub async fn app_backends(c: &tokio_postgres::Client) -> i64 {
    c.query_one(
        "select count(*) from pg_stat_activity where usename = 'app' \
         and backend_type = 'client backend' and pid <> pg_backend_pid()",
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

pub fn pgbench_summary(out: &std::process::Output) -> Result<PgbenchSummary, String> {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let output = format!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    if !out.status.success() {
        return Err(output);
    }
    // "1000/1000" with -t, "1234" with -T; "0 (0.000%)" for failures.
    let field = |prefix: &str| -> Option<u64> {
        let value = stdout.lines().find_map(|l| l.strip_prefix(prefix))?;
        value.split(['/', ' ']).next()?.trim().parse().ok()
    };
    match (
        field("number of transactions actually processed: "),
        field("number of failed transactions: "),
    ) {
        (Some(processed), Some(failed)) => Ok(PgbenchSummary {
            processed,
            failed,
            output,
        }),
        _ => Err(output),
    }
}

/// (VmRSS, VmHWM) of a process in KiB, from `/proc/<pid>/status`: its
/// resident memory now and the peak since it started.
pub fn rss_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().strip_suffix("kB"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
    };
    (field("VmRSS:"), field("VmHWM:"))
}

// --- admin API helpers ---

/// A response from the admin listener.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    /// Header names lower-cased, in the order received.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// One HTTP/1.1 request (`Connection: close`) to the admin listener, with
/// an optional bearer token. Retries the connect for a few seconds, since
/// the admin listener comes up just after the shards. Checks that the body
/// is exactly as long as `Content-Length` says.
pub fn http(addr: SocketAddr, method: &str, path: &str, bearer: Option<&str>) -> HttpResponse {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut stream = loop {
        match TcpStream::connect(addr) {
            Ok(s) => break s,
            Err(e) => {
                assert!(Instant::now() < deadline, "admin listener {addr}: {e}");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    };
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let auth = bearer
        .map(|b| format!("Authorization: Bearer {b}\r\n"))
        .unwrap_or_default();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    stream
        .read_to_end(&mut raw)
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    let raw = String::from_utf8(raw).expect("an admin response is UTF-8");
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("{method} {path}: no end of head in {raw:?}"));
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap();
    let status = status_line
        .strip_prefix("HTTP/1.1 ")
        .and_then(|s| s.get(..3))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{method} {path}: bad status line {status_line:?}"));
    let headers: Vec<(String, String)> = lines
        .map(|l| {
            let (n, v) = l
                .split_once(':')
                .unwrap_or_else(|| panic!("bad header {l:?}"));
            (n.trim().to_ascii_lowercase(), v.trim().to_owned())
        })
        .collect();
    let response = HttpResponse {
        status,
        headers,
        body: body.to_owned(),
    };
    if let Some(len) = response.header("content-length") {
        assert_eq!(
            len.parse::<usize>().unwrap(),
            response.body.len(),
            "{method} {path}: Content-Length does not match the body"
        );
    }
    response
}

// --- no-secrets helpers ---

/// Every encoding a secret is scanned for: plain, hex in both cases, and
/// base64 in its four alphabets/padding variants. `plain` is `None` for
/// bytes that are not UTF-8 (they cannot appear verbatim in a text log).
pub fn secret_encodings(secret: &[u8]) -> Vec<(&'static str, String)> {
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
    use base64::Engine;
    let mut forms = Vec::new();
    if let Ok(s) = std::str::from_utf8(secret) {
        forms.push(("plain", s.to_owned()));
    }
    forms.push(("hex", hex::encode(secret)));
    forms.push(("HEX", hex::encode_upper(secret)));
    forms.push(("base64", STANDARD.encode(secret)));
    forms.push(("base64 (no padding)", STANDARD_NO_PAD.encode(secret)));
    forms.push(("base64url", URL_SAFE.encode(secret)));
    forms.push(("base64url (no padding)", URL_SAFE_NO_PAD.encode(secret)));
    forms.sort_by(|a, b| a.1.cmp(&b.1));
    forms.dedup_by(|a, b| a.1 == b.1);
    forms
}

/// Shortest secret [`find_secrets`] accepts: anything shorter could match
/// by chance, so a test that registers one is wrong, not lucky.
pub const MIN_SECRET_LEN: usize = 16;

/// Scans every haystack (name, text) for every secret (what, bytes) in every
/// [`secret_encodings`] form; returns one description per hit, naming the
/// haystack, the line number, the line's `target` and `level` when it is a
/// JSON log line, and the line itself (cut to 600 characters).
pub fn find_secrets(haystacks: &[(&str, &str)], secrets: &[(String, Vec<u8>)]) -> Vec<String> {
    let mut found = Vec::new();
    for (what, secret) in secrets {
        assert!(
            secret.len() >= MIN_SECRET_LEN,
            "secret {what:?} is {} bytes, shorter than {MIN_SECRET_LEN}: scanning for it \
             would risk false positives",
            secret.len()
        );
        for (encoding, form) in secret_encodings(secret) {
            for (name, text) in haystacks {
                for (n, line) in text.lines().enumerate() {
                    if !line.contains(&form) {
                        continue;
                    }
                    let json: Option<serde_json::Value> = serde_json::from_str(line).ok();
                    let field = |k: &str| {
                        json.as_ref()
                            .and_then(|j| j.get(k))
                            .and_then(|v| v.as_str())
                            .unwrap_or("?")
                            .to_owned()
                    };
                    let cut: String = line.chars().take(600).collect();
                    found.push(format!(
                        "{what} ({encoding}) in {name} line {}: target={} level={}: {cut}",
                        n + 1,
                        field("target"),
                        field("level"),
                    ));
                }
            }
        }
    }
    found
}

// --- JWT helpers ---

/// A JWT signed with HS256 under `secret`, carrying `claims`.
pub fn hs256_jwt(secret: &str, claims: &serde_json::Value) -> String {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;
    let b64 = |v: &serde_json::Value| URL_SAFE_NO_PAD.encode(v.to_string());
    let input = format!(
        "{}.{}",
        b64(&serde_json::json!({"alg": "HS256", "typ": "JWT"})),
        b64(claims)
    );
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    let sig = ring::hmac::sign(&key, input.as_bytes());
    format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()))
}

// --- TLS helpers ---

/// A folder Postgres (running as `nobody` under root) can read, holding
/// certificate files.
pub struct Files(tempfile::TempDir);

impl Files {
    pub fn new() -> Files {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        Files(d)
    }

    /// Writes `text` to `name`, readable by its owner only if `secret`.
    pub fn write(&self, name: &str, text: &str, secret: bool) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let p = self.0.path().join(name);
        std::fs::write(&p, text).unwrap();
        let mode = if secret { 0o600 } else { 0o644 };
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    /// A key file for Postgres, which insists its key be owned by its own
    /// user: `nobody` when the tests run as root.
    pub fn write_server_key(&self, name: &str, text: &str) -> PathBuf {
        let p = self.write(name, text, true);
        if let Some((uid, gid)) = tollgate::cluster::unprivileged_ids() {
            std::os::unix::fs::chown(&p, Some(uid), Some(gid)).unwrap();
        }
        p
    }
}

/// A certificate for tollgate's client side, signed by a CA of its own,
/// in a folder of its own.
pub struct ServingCert {
    pub ca: Ca,
    pub files: Files,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl ServingCert {
    /// A new CA named `ca_name` and a leaf for `names`.
    pub fn new(ca_name: &str, names: &[&str]) -> ServingCert {
        let ca = Ca::new(ca_name);
        let files = Files::new();
        let (cert, key) = ca.leaf(names);
        let cert = files.write("tg.crt", &cert, false);
        let key = files.write("tg.key", &key, true);
        ServingCert {
            ca,
            files,
            cert,
            key,
        }
    }

    /// The `[tls]` table that serves this certificate in `mode`.
    pub fn table(&self, mode: &str) -> String {
        tls_table(&self.cert, &self.key, mode)
    }
}

/// Certificates for TLS on both legs, from one CA: the cluster's for
/// `localhost`, tollgate's for `localhost` and 127.0.0.1. Returns the
/// options (cluster TLS on, upstream `verify-full` by name, `[tls]` in
/// `client_mode`) and the CA file clients verify with.
pub fn tls_on_both_legs(ca: &Ca, files: &Files, client_mode: &str) -> (EnvOptions, PathBuf) {
    let (pg_cert, pg_key) = ca.leaf(&["localhost"]);
    let pg_cert = files.write("pg.crt", &pg_cert, false);
    let pg_key = files.write_server_key("pg.key", &pg_key);
    let (tg_cert, tg_key) = ca.leaf(&["localhost", "127.0.0.1"]);
    let tg_cert = files.write("tg.crt", &tg_cert, false);
    let tg_key = files.write("tg.key", &tg_key, true);
    let ca_file = files.write("ca.crt", &ca.pem(), false);
    let options = EnvOptions {
        cluster_conf: pg_ssl_conf(&pg_cert, &pg_key),
        upstream_host: "localhost".into(),
        upstream: format!("tls = \"verify-full\"\nca_file = \"{}\"", ca_file.display()),
        tables: tls_table(&tg_cert, &tg_key, client_mode),
        ..EnvOptions::default()
    };
    (options, ca_file)
}

/// A TLS client connection.
pub type TlsClient = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// SSLRequest, 'S', then a TLS handshake verified against `ca` for
/// "localhost".
pub fn tls_connect(addr: SocketAddr, ca: &Ca) -> TlsClient {
    let mut sock = TcpStream::connect(addr).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    sock.write_all(&ssl_request()).unwrap();
    let mut answer = [0u8; 1];
    sock.read_exact(&mut answer).unwrap();
    assert_eq!(&answer, b"S");
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let conn = rustls::ClientConnection::new(rustls_client(ca, None), name).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, sock);
    while tls.conn.is_handshaking() {
        tls.conn.complete_io(&mut tls.sock).unwrap();
    }
    tls
}

/// An SSLRequest packet.
pub fn ssl_request() -> Vec<u8> {
    const SSL_REQUEST: u32 = (1234 << 16) | 5679;
    [&8u32.to_be_bytes()[..], &SSL_REQUEST.to_be_bytes()].concat()
}

/// A `[tls]` table for tollgate's client side.
pub fn tls_table(cert: &Path, key: &Path, mode: &str) -> String {
    format!(
        "[tls]\ncert = \"{}\"\nkey = \"{}\"\nmode = \"{mode}\"\n",
        cert.display(),
        key.display()
    )
}

/// postgresql.conf settings that turn TLS on with `cert` and `key`.
pub fn pg_ssl_conf(cert: &Path, key: &Path) -> Vec<(String, String)> {
    vec![
        ("ssl".into(), "on".into()),
        ("ssl_cert_file".into(), cert.display().to_string()),
        ("ssl_key_file".into(), key.display().to_string()),
    ]
}

/// A test certificate authority.
pub struct Ca {
    issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().unwrap();
        Ca {
            issuer: rcgen::CertifiedIssuer::self_signed(params, key).unwrap(),
        }
    }

    /// (certificate PEM, key PEM) for `names` (DNS names or IP addresses).
    pub fn leaf(&self, names: &[&str]) -> (String, String) {
        use rcgen::{CertificateParams, DnType, KeyPair};
        let mut params =
            CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.distinguished_name.push(DnType::CommonName, names[0]);
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    pub fn roots(&self) -> rustls::RootCertStore {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.issuer.der().clone()).unwrap();
        roots
    }
}

// --- hostile-client helpers ---

/// How a connection ended when read to its end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// An orderly close (EOF).
    Closed,
    /// A reset (ECONNRESET or EPIPE).
    Reset,
    /// Still open when the wait was over.
    StillOpen,
}

impl Raw {
    /// Reads everything until the peer closes, waiting at most `within`
    /// in all; says how the connection ended.
    pub fn read_until_end(&mut self, within: Duration) -> (Vec<u8>, Ending) {
        let mut out = Vec::new();
        let ending = read_until_end(&mut self.0, &mut out, within);
        (out, ending)
    }

    /// Reads backend messages up to and including the first ReadyForQuery
    /// or ErrorResponse.
    pub fn read_until_ready_or_error(&mut self) -> Vec<(u8, Vec<u8>)> {
        let mut got = Vec::new();
        loop {
            let (tag, body) = self.read_message();
            let end = tag == b'Z' || tag == b'E';
            got.push((tag, body));
            if end {
                return got;
            }
        }
    }
}

/// Appends everything `s` yields to `out` until the peer closes, waiting at
/// most `within` in all; says how the connection ended.
pub fn read_until_end(s: &mut TcpStream, out: &mut Vec<u8>, within: Duration) -> Ending {
    let deadline = Instant::now() + within;
    let mut buf = [0u8; 8192];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ending::StillOpen;
        }
        s.set_read_timeout(Some(left)).unwrap();
        match s.read(&mut buf) {
            Ok(0) => return Ending::Closed,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Ending::StillOpen
            }
            Err(_) => return Ending::Reset,
        }
    }
}

/// Splits a byte stream into backend messages (tag, body); the second part
/// is whatever is left that does not form a whole message.
pub fn split_messages(mut bytes: &[u8]) -> (Vec<(u8, Vec<u8>)>, Vec<u8>) {
    let mut out = Vec::new();
    while bytes.len() >= 5 {
        let len = i32::from_be_bytes(bytes[1..5].try_into().unwrap());
        if len < 4 || bytes.len() < 1 + len as usize {
            break;
        }
        let total = 1 + len as usize;
        out.push((bytes[0], bytes[5..total].to_vec()));
        bytes = &bytes[total..];
    }
    (out, bytes.to_vec())
}

/// The fields of an ErrorResponse body, by field type.
pub fn error_field(body: &[u8], field: u8) -> Option<String> {
    let mut rest = body;
    while let Some((&kind, tail)) = rest.split_first() {
        if kind == 0 {
            return None;
        }
        let end = tail.iter().position(|&b| b == 0)?;
        if kind == field {
            return Some(String::from_utf8_lossy(&tail[..end]).into_owned());
        }
        rest = &tail[end + 1..];
    }
    None
}

/// Asserts that `got` is exactly one FATAL ErrorResponse with SQLSTATE
/// `code`, and nothing else, and that the connection then closed in an
/// orderly way. Returns the message text.
pub fn assert_fatal(what: &str, got: &[u8], ending: Ending, code: &str) -> String {
    let (messages, rest) = split_messages(got);
    assert!(
        messages.len() == 1 && rest.is_empty() && messages[0].0 == b'E',
        "{what}: expected exactly one ErrorResponse, got {got:?}"
    );
    let body = &messages[0].1;
    let severity = error_field(body, b'V').or_else(|| error_field(body, b'S'));
    assert_eq!(severity.as_deref(), Some("FATAL"), "{what}: severity");
    let (got_code, message) = error_fields(body);
    assert_eq!(got_code, code, "{what}: SQLSTATE (message {message:?})");
    assert_eq!(
        ending,
        Ending::Closed,
        "{what}: the connection was not closed cleanly after the error"
    );
    message
}

/// A field of `/proc/<pid>/status` in KiB (e.g. `VmPeak:`, `VmHWM:`).
pub fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// A logged-in raw session, or the (SQLSTATE, message) of the FATAL error
/// that refused it. Connects, sends the StartupMessage with `params`, answers
/// the password request with `token`, and reads up to ReadyForQuery.
pub fn raw_login(
    addr: SocketAddr,
    params: &[(&str, &str)],
    token: &str,
) -> Result<Raw, (String, String)> {
    raw_login_on(Raw::connect(addr), params, token)
}

/// [`raw_login`] on a connection already made (and maybe already sent a
/// prefix, such as a PROXY protocol header).
pub fn raw_login_on(
    mut raw: Raw,
    params: &[(&str, &str)],
    token: &str,
) -> Result<Raw, (String, String)> {
    raw.0.set_nodelay(true).unwrap();
    raw.send(&startup_message(params));
    let (tag, body) = raw.read_message();
    if tag == b'E' {
        return Err(refused_then_closed(&mut raw, &body));
    }
    assert_eq!(
        (tag, &body[..]),
        (b'R', &3i32.to_be_bytes()[..]),
        "password request"
    );
    raw.send(&password_message(token));
    let got = raw.read_until_ready_or_error();
    let (tag, body) = got.last().unwrap();
    if *tag == b'E' {
        return Err(refused_then_closed(&mut raw, body));
    }
    assert!(
        got.iter().any(|(t, b)| *t == b'R' && b[..] == [0, 0, 0, 0]),
        "no AuthenticationOk in {got:?}"
    );
    Ok(raw)
}

/// Checks that a login's ErrorResponse is FATAL and the last thing sent
/// before an orderly close; its (SQLSTATE, message).
fn refused_then_closed(raw: &mut Raw, body: &[u8]) -> (String, String) {
    let fields = error_fields(body);
    let severity = error_field(body, b'V').or_else(|| error_field(body, b'S'));
    assert_eq!(severity.as_deref(), Some("FATAL"), "{fields:?}");
    let (rest, ending) = raw.read_until_end(Duration::from_secs(5));
    assert!(
        rest.is_empty() && ending == Ending::Closed,
        "after {fields:?}: {rest:?}, {ending:?}"
    );
    fields
}

/// Runs one simple query on a raw session: the rows as text, or the
/// (SQLSTATE, message) of its error. A FATAL error is the session's last
/// word (a token revoked while it logged in, say): no ReadyForQuery
/// follows, and reading on could meet a reset.
pub fn raw_query(raw: &mut Raw, sql: &str) -> Result<Vec<Vec<Option<String>>>, (String, String)> {
    let mut q = vec![b'Q'];
    q.extend_from_slice(&((4 + sql.len() + 1) as i32).to_be_bytes());
    q.extend_from_slice(sql.as_bytes());
    q.push(0);
    raw.send(&q);
    let mut rows = Vec::new();
    let mut error = None;
    loop {
        let (tag, body) = raw.read_message();
        match tag {
            b'D' => rows.push(data_row(&body)),
            b'E' => {
                let f = tollgate::protocol::backend::parse_error_fields(&body);
                error = Some((f.code.to_owned(), f.message.to_owned()));
                if f.severity == "FATAL" {
                    break;
                }
            }
            b'Z' => break,
            _ => {}
        }
    }
    match error {
        Some(e) => Err(e),
        None => Ok(rows),
    }
}

/// The text columns of a DataRow body.
pub fn data_row(body: &[u8]) -> Vec<Option<String>> {
    let n = u16::from_be_bytes([body[0], body[1]]) as usize;
    let mut at = 2;
    let mut cols = Vec::with_capacity(n);
    for _ in 0..n {
        let len = i32::from_be_bytes(body[at..at + 4].try_into().unwrap());
        at += 4;
        if len < 0 {
            cols.push(None);
        } else {
            let len = len as usize;
            cols.push(Some(
                String::from_utf8_lossy(&body[at..at + len]).into_owned(),
            ));
            at += len;
        }
    }
    cols
}

/// A client TLS config trusting `ca`, offering `alpn` if given.
pub fn rustls_client(ca: &Ca, alpn: Option<&[u8]>) -> std::sync::Arc<rustls::ClientConfig> {
    let mut c = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(ca.roots())
    .with_no_client_auth();
    if let Some(a) = alpn {
        c.alpn_protocols = vec![a.to_vec()];
    }
    std::sync::Arc::new(c)
}

/// The HMAC secret of the JWTs [`hs256`] signs (`[[jwt.hmac]] secret`).
pub const HMAC_SECRET: &str = "a-test-hmac-secret-of-at-least-32-bytes!!";

/// A JSON value in unpadded base64url, as a JWT part.
pub fn b64(v: &serde_json::Value) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
}

/// A JWT with `payload`, signed HS256 with [`HMAC_SECRET`].
pub fn hs256(payload: &serde_json::Value) -> String {
    use base64::Engine;
    let input = format!(
        "{}.{}",
        b64(&serde_json::json!({"alg": "HS256", "typ": "JWT"})),
        b64(payload)
    );
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, HMAC_SECRET.as_bytes());
    let sig = ring::hmac::sign(&key, input.as_bytes());
    format!(
        "{input}.{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sig.as_ref())
    )
}

/// The target directory's `sub`-folder, where `tests/tools/` scripts
/// install what some tests need.
pub fn tools_dir(sub: &str) -> std::path::PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"));
    target.join(sub)
}

/// Runs `tests/tools/<script>` when `present` says what it installs is
/// missing (one install at a time across the test run); an install that
/// fails fails the test, never skips it.
pub fn install_once(script: &str, present: impl Fn() -> bool) {
    static INSTALL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_at_a_time = INSTALL.lock().unwrap_or_else(|e| e.into_inner());
    if present() {
        return;
    }
    let script = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/tools")
        .join(script);
    let out = std::process::Command::new("bash")
        .arg(&script)
        .output()
        .unwrap();
    assert!(
        out.status.success() && present(),
        "{} failed:\n{}{}",
        script.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
