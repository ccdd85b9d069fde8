//! Config reloads without downtime: SIGHUP and `POST /reload` apply new
//! upstream credentials, limits, log level and TLS certificate to new
//! sessions; open sessions carry on; a bad file changes nothing; and while
//! the process drains, `/healthz` says so.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::harness::*;

const ADMIN_TOKEN: &str = "reload-admin-token-0123456789";

/// What the tests vary from one reload to the next.
#[derive(Clone)]
struct Variant {
    max_connections: usize,
    tcp_keepalive_s: u64,
    auth_failure_limit: u32,
    startup_timeout_s: u64,
    log_level: &'static str,
    /// Which certificate the client side presents.
    cert: usize,
    /// The upstream password, inline or from a file.
    password: String,
    password_in_file: bool,
    connect_timeout_s: u64,
}

struct Setup {
    env: Env,
    listen: SocketAddr,
    admin: SocketAddr,
    /// (cert, key) pairs; the first names `a.test`, the second `b.test`.
    certs: Vec<(PathBuf, PathBuf)>,
    ca_file: PathBuf,
    token: String,
}

impl Setup {
    fn new() -> Setup {
        let env = Env::new();
        let dir = env.dir.path().to_owned();
        let ca = Ca::new("reload test CA");
        let mut certs = Vec::new();
        for name in ["a.test", "b.test"] {
            let (cert, key) = ca.leaf(&["localhost", name]);
            let (c, k) = (
                dir.join(format!("{name}.crt")),
                dir.join(format!("{name}.key")),
            );
            std::fs::write(&c, cert).unwrap();
            std::fs::write(&k, key).unwrap();
            certs.push((c, k));
        }
        let ca_file = dir.join("ca.crt");
        std::fs::write(&ca_file, ca.pem()).unwrap();
        let mut setup = Setup {
            listen: SocketAddr::from(([127, 0, 0, 1], free_port())),
            admin: SocketAddr::from(([127, 0, 0, 1], free_port())),
            certs,
            ca_file,
            token: String::new(),
            env,
        };
        setup.write(&setup.variant(0));
        setup.token = setup.env.create_token(&["--user", "app"]);
        setup
    }

    fn variant(&self, i: usize) -> Variant {
        Variant {
            max_connections: 200 - i,
            tcp_keepalive_s: 30 + i as u64,
            auth_failure_limit: 50 + i as u32,
            startup_timeout_s: 10 - (i % 2) as u64,
            log_level: if i.is_multiple_of(2) { "info" } else { "debug" },
            cert: i % 2,
            password: self.env.cluster.password().to_owned(),
            password_in_file: i % 2 == 1,
            connect_timeout_s: 10 - (i % 2) as u64,
        }
    }

    /// Writes the whole config file for `v`, atomically (a reload must
    /// never read half a file).
    fn write(&self, v: &Variant) {
        let dir = self.env.dir.path();
        let credential = if v.password_in_file {
            let f = dir.join("upstream.password");
            std::fs::write(&f, &v.password).unwrap();
            format!("password_file = \"{}\"", f.display())
        } else {
            format!("password = \"{}\"", v.password)
        };
        let (cert, key) = &self.certs[v.cert];
        let text = format!(
            "listen = \"{listen}\"\nworkers = 2\nmax_connections = {max}\n\
             tcp_keepalive = \"{ka}s\"\nauth_failure_limit = {afl}\n\
             startup_timeout = \"{st}s\"\n\
             [upstream]\nhost = \"127.0.0.1\"\nport = {port}\nconnect_timeout = \"{ct}s\"\n\
             [[upstream.credentials]]\nuser = \"app\"\n{credential}\n\
             [tokens]\nfile = \"tokens.toml\"\n\
             [log]\nlevel = \"{level}\"\n\
             [tls]\ncert = \"{cert}\"\nkey = \"{key}\"\nmode = \"allow\"\n\
             [admin]\nlisten = \"{admin}\"\ntoken = \"{ADMIN_TOKEN}\"\n",
            listen = self.listen,
            max = v.max_connections,
            ka = v.tcp_keepalive_s,
            afl = v.auth_failure_limit,
            st = v.startup_timeout_s,
            port = self.env.cluster.port(),
            ct = v.connect_timeout_s,
            level = v.log_level,
            cert = cert.display(),
            key = key.display(),
            admin = self.admin,
        );
        write_atomically(&self.env.config, &text);
    }

    fn reload_via_api(&self) -> HttpResponse {
        http(self.admin, "POST", "/reload", Some(ADMIN_TOKEN))
    }

    /// Reloads by SIGHUP and waits until the reload counter moves.
    fn reload_via_sighup(&self) {
        let before = self.reloads();
        self.env.signal(libc::SIGHUP);
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.reloads() == before {
            assert!(Instant::now() < deadline, "SIGHUP did not reload");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// (successful, failed) reloads, from `/metrics`.
    fn reloads(&self) -> (u64, u64) {
        let m = http(self.admin, "GET", "/metrics", None).body;
        let find = |result: &str| {
            let prefix = format!("tollgate_config_reloads_total{{result=\"{result}\"}} ");
            m.lines()
                .find_map(|l| l.strip_prefix(prefix.as_str()))
                .unwrap_or_else(|| panic!("no reload counter for {result} in:\n{m}"))
                .parse::<u64>()
                .unwrap()
        };
        (find("ok"), find("error"))
    }

    fn conn(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user=app dbname=appdb password={} sslmode=disable",
            self.listen.port(),
            self.token
        )
    }

    /// psql over TLS, verifying tollgate's certificate for `name`.
    fn psql_verifying(&self, name: &str) -> std::process::Output {
        pg_tool("psql")
            .arg(format!(
                "host={name} hostaddr=127.0.0.1 port={} user=app dbname=appdb password={} \
                 sslmode=verify-full sslrootcert={}",
                self.listen.port(),
                self.token,
                self.ca_file.display()
            ))
            .args(["-XAtc", "select 1"])
            .output()
            .unwrap()
    }
}

fn json(r: &HttpResponse) -> serde_json::Value {
    serde_json::from_str(&r.body).unwrap_or_else(|e| panic!("{e}: {}", r.body))
}

fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension("toml.tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[test]
fn pgbench_runs_through_twenty_reloads_without_a_failed_transaction() {
    let mut s = Setup::new();
    s.env.start_proxy();
    s.env.pgbench_init();

    // A new connection (and upstream login) per transaction, over TLS, so
    // every reload is crossed by logins under both the old and the new
    // settings; and 4 clients that keep their sessions for the whole run.
    // Both at a set rate: at full speed they starve the postmaster of CPU
    // on a 2-core machine, and its connects then time out (directly too).
    let run = |connect_each_time: bool| {
        let mut c = pg_tool("pgbench");
        c.args(["-n", "-S", "-j", "2", "-T", "12"]);
        if connect_each_time {
            c.args(["-C", "-c", "2", "-R", "50"]);
        } else {
            c.args(["-c", "4", "-R", "500"]);
        }
        c.arg(format!(
            "host=127.0.0.1 port={} user=app dbname=appdb password={} sslmode=require",
            s.listen.port(),
            s.token
        ))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
    };
    let churn = run(true);
    let steady = run(false);
    std::thread::sleep(Duration::from_millis(1000));
    for i in 1..=20 {
        s.write(&s.variant(i));
        if i.is_multiple_of(2) {
            let r = s.reload_via_api();
            assert_eq!(r.status, 200, "{}", r.body);
            assert_eq!(json(&r)["restart_required"], serde_json::json!([]));
        } else {
            s.reload_via_sighup();
        }
        std::thread::sleep(Duration::from_millis(400));
    }
    for (what, child) in [("-C", churn), ("persistent", steady)] {
        let out = child.wait_with_output().unwrap();
        let summary = pgbench_summary(&out).unwrap_or_else(|all| {
            let log = s.env.log();
            let problems: Vec<&str> = log
                .lines()
                .filter(|l| l.contains(" WARN ") || l.contains(" ERROR ") || l.contains("rejected"))
                .take(20)
                .collect();
            panic!(
                "pgbench {what} failed:\n{all}\ntollgate:\n{}",
                problems.join("\n")
            );
        });
        let processed = summary.processed;
        assert_eq!(summary.failed, 0, "{}", summary.output);
        assert!(processed > 0, "{}", summary.output);
        eprintln!("pgbench {what}: {processed} transactions, 0 failed, through 20 reloads");
    }
    assert_eq!(s.reloads(), (20, 0));
    // The last reload (20, even) put certificate a.test back.
    let a = s.psql_verifying("a.test");
    assert!(a.status.success(), "{}", String::from_utf8_lossy(&a.stderr));
    assert!(!s.psql_verifying("b.test").status.success());
}

#[test]
fn reloads_apply_to_new_sessions_and_leave_open_ones_alone() {
    let mut s = Setup::new();
    s.env.start_proxy_config_logging();
    let rt = runtime();
    let (open, _open_end) = rt.block_on(connect_watched(&s.conn()));

    // Upstream credentials: the server's password changes, then the config.
    let new_password = "rotated-Upstream-pw-42";
    s.env
        .cluster
        .psql(
            "appdb",
            &format!("alter role app password '{new_password}'"),
        )
        .unwrap();
    let (code, _) = rt.block_on(connect_error(&s.conn()));
    assert_eq!(
        &code[..2],
        "08",
        "old credentials should fail upstream: {code}"
    );
    let mut v = s.variant(0);
    v.password = new_password.into();
    s.write(&v);
    s.reload_via_sighup();
    let fresh = rt
        .block_on(pg_connect(&s.conn()))
        .expect("login with new credentials");
    let n: i32 = rt
        .block_on(fresh.query_one("select 2", &[]))
        .unwrap()
        .get(0);
    assert_eq!(n, 2);
    // The session opened before any of this is untouched.
    let n: i32 = rt.block_on(open.query_one("select 1", &[])).unwrap().get(0);
    assert_eq!(n, 1);
    drop(fresh);

    // Limits: with one session open, max_connections = 1 refuses the next
    // login, and raising it lets it in.
    v.max_connections = 1;
    s.write(&v);
    assert_eq!(s.reload_via_api().status, 200);
    let (code, message) = rt.block_on(connect_error(&s.conn()));
    assert_eq!(code, "53300", "{message}");
    v.max_connections = 100;
    s.write(&v);
    assert_eq!(s.reload_via_api().status, 200);
    rt.block_on(pg_connect(&s.conn()))
        .expect("login after raising the limit");

    // Log level: at `warn`, a login leaves no INFO audit line; back at
    // `info`, it does again.
    let started = |log: &str| log.matches("session started").count();
    v.log_level = "warn";
    s.write(&v);
    s.reload_via_sighup();
    let before = started(&s.env.log());
    rt.block_on(pg_connect(&s.conn()))
        .expect("login at warn level");
    assert_eq!(started(&s.env.log()), before, "INFO logged at warn level");
    v.log_level = "info";
    s.write(&v);
    s.reload_via_sighup();
    rt.block_on(pg_connect(&s.conn()))
        .expect("login at info level");
    assert_eq!(
        started(&s.env.log()),
        before + 1,
        "no INFO after the reload to info"
    );

    // TLS: the new certificate is served to new handshakes.
    assert!(s.psql_verifying("a.test").status.success());
    v.cert = 1;
    s.write(&v);
    s.reload_via_sighup();
    let b = s.psql_verifying("b.test");
    assert!(b.status.success(), "{}", String::from_utf8_lossy(&b.stderr));
    assert!(!s.psql_verifying("a.test").status.success());

    let n: i32 = rt.block_on(open.query_one("select 3", &[])).unwrap().get(0);
    assert_eq!(n, 3, "the first session survived every reload");
    s.env.secrets.push(new_password.into());
    s.env.assert_log_clean();
}

#[test]
fn a_bad_file_changes_nothing_and_fixed_settings_wait_for_a_restart() {
    let mut s = Setup::new();
    s.env.start_proxy();
    let rt = runtime();
    let good = std::fs::read_to_string(&s.env.config).unwrap();

    // Unauthenticated reloads are refused.
    assert_eq!(http(s.admin, "POST", "/reload", None).status, 401);
    assert_eq!(
        http(s.admin, "POST", "/reload", Some("wrong-token-wrong-token")).status,
        401
    );

    // A syntax error, a bad value, and a missing certificate: 422, the
    // reason (without the values), and logins go on as before.
    let secretish = "s3cr3t-in-a-broken-line";
    let broken = [
        good.replace("[tokens]", &format!("password = {secretish}\n[tokens]")),
        good.replace("max_connections = 200", "max_connections = 0"),
        good.replace(
            "[log]\nlevel = \"info\"",
            "[log]\nlevel = \"info,tollgate=loud\"",
        ),
        good.replace(&s.certs[0].0.display().to_string(), "/nonexistent/cert.pem"),
    ];
    for (i, text) in broken.iter().enumerate() {
        assert_ne!(text, &good, "case {i} did not change the file");
        write_atomically(&s.env.config, text);
        let r = s.reload_via_api();
        assert_eq!(r.status, 422, "case {i}: {}", r.body);
        assert_eq!(json(&r)["reloaded"], false, "{}", r.body);
        assert!(
            !r.body.contains(secretish),
            "case {i} echoed a value: {}",
            r.body
        );
        rt.block_on(pg_connect(&s.conn()))
            .unwrap_or_else(|e| panic!("login after bad reload {i}: {e}"));
    }
    assert_eq!(s.reloads(), (0, broken.len() as u64));
    assert!(!s.env.log().contains(secretish));

    // Settings only a restart can change keep their running values, and
    // the answer names them; the rest of the file is applied.
    let moved = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let text = good
        .replace(&s.listen.to_string(), &moved.to_string())
        .replace("workers = 2", "workers = 1")
        .replace("max_connections = 200", "max_connections = 1");
    write_atomically(&s.env.config, &text);
    // The sessions above are closing.
    let deadline = Instant::now() + Duration::from_secs(5);
    while json(&http(s.admin, "GET", "/sessions", Some(ADMIN_TOKEN))) != serde_json::json!([]) {
        assert!(Instant::now() < deadline, "sessions still open");
        // Lets the dropped clients' connection tasks send Terminate.
        rt.block_on(async { tokio::time::sleep(Duration::from_millis(20)).await });
    }
    let r = s.reload_via_api();
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        json(&r)["restart_required"],
        serde_json::json!(["listen", "workers"]),
        "{}",
        r.body
    );
    assert!(std::net::TcpStream::connect(moved).is_err());
    let _held = rt
        .block_on(pg_connect(&s.conn()))
        .expect("still on the old port");
    let (code, _) = rt.block_on(connect_error(&s.conn()));
    assert_eq!(code, "53300", "max_connections = 1 was applied");
}

#[test]
fn healthz_reports_draining_after_sigterm() {
    let mut s = Setup::new();
    s.env.start_proxy();
    let rt = runtime();
    let r = http(s.admin, "GET", "/healthz", None);
    assert_eq!(r.status, 200, "{}", r.body);
    // An open session keeps the process draining, not exited.
    let (_open, _end) = rt.block_on(connect_watched(&s.conn()));
    s.env.signal(libc::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = http(s.admin, "GET", "/healthz", None);
        if r.status == 503 {
            assert_eq!(json(&r)["status"], "draining");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "healthz still {}: {}",
            r.status,
            r.body
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let m = http(s.admin, "GET", "/metrics", None).body;
    assert!(m.contains("\ntollgate_draining 1\n"), "{m}");
}
