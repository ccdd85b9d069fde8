//! The things pgbench is pointed at, each started on a free loopback port and
//! stopped when dropped.
//!
//! - **direct**: Postgres itself, the baseline every row is compared with.
//! - **direct-unix**: Postgres over its Unix-domain socket (not in the
//!   default set), the baseline for tollgate-unix-upstream.
//! - **tollgate**: the release binary, `workers = shards`, a fresh token;
//!   as **tollgate-unix-upstream**, its upstream leg over Postgres' socket.
//! - **pgbouncer**: session pooling, one process per shard sharing the port
//!   with `so_reuseport = 1` (PgBouncer is single-threaded; this is how it
//!   is scaled across cores).
//! - **relay**: a TCP relay with no protocol parsing, the floor any proxy
//!   pays: HAProxy `mode tcp` with `nbthread = shards`, or the harness's own
//!   copy relay when HAProxy is missing.
//!
//! Every process is a [`ChildGuard`]: dropping it (normal end, error, or
//! Ctrl-C unwinding through `main`) sends SIGTERM, then SIGKILL. Configs and
//! logs live in a [`TempDir`] dropped after the processes. PgBouncer refuses
//! to run as root, so under root it and HAProxy run as `nobody`, like
//! Postgres does in `tollgate::cluster`.

use std::fmt;
use std::fs::File;
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::ValueEnum;
use serde::Serialize;

use crate::pgbench::Endpoint;
use crate::procstat;
use crate::tls::TlsFiles;
use crate::util::{file_tail, free_port, TempDir};

/// How long a target may take to listen on all its sockets.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a process gets to exit after SIGTERM before SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// The kinds of target, in the order they run within a repetition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum TargetKind {
    Direct,
    /// Postgres over its Unix-domain socket, where the throwaway cluster's
    /// pg_hba says `trust` (not in the default set; not with --upstream).
    DirectUnix,
    Tollgate,
    /// tollgate with clients over TCP as usual and its upstream leg over
    /// Postgres' Unix-domain socket (not in the default set; not with
    /// --upstream).
    TollgateUnixUpstream,
    /// tollgate with the admin listener and latency histograms on: run it
    /// beside `tollgate` to measure what metrics cost (not in the default
    /// set).
    TollgateMetrics,
    /// tollgate with `[pool] mode = "off"`: a login per client, as before
    /// session pooling (not in the default set).
    TollgateNopool,
    /// tollgate with `plain_relay = "readiness"`: the plain relay before
    /// the relay ring became the default, to compare with `tollgate` in
    /// one run (not in the default set).
    TollgateReadiness,
    /// tollgate with `[pool] mode = "transaction"` and
    /// `max_server_connections = --tx-pool-size` (not in the default set).
    TollgateTx,
    Pgbouncer,
    /// PgBouncer in transaction mode with the same total pool size (not in
    /// the default set).
    PgbouncerTx,
    Relay,
}

impl TargetKind {
    pub const ALL: [TargetKind; 4] = [
        TargetKind::Direct,
        TargetKind::Tollgate,
        TargetKind::Pgbouncer,
        TargetKind::Relay,
    ];

    pub fn name(self) -> &'static str {
        match self {
            TargetKind::Direct => "direct",
            TargetKind::DirectUnix => "direct-unix",
            TargetKind::Tollgate => "tollgate",
            TargetKind::TollgateUnixUpstream => "tollgate-unix-upstream",
            TargetKind::TollgateMetrics => "tollgate-metrics",
            TargetKind::TollgateNopool => "tollgate-nopool",
            TargetKind::TollgateReadiness => "tollgate-readiness",
            TargetKind::TollgateTx => "tollgate-tx",
            TargetKind::Pgbouncer => "pgbouncer",
            TargetKind::PgbouncerTx => "pgbouncer-tx",
            TargetKind::Relay => "relay",
        }
    }

    /// Whether this target is a tollgate (needs the tollgate binary).
    pub fn is_tollgate(self) -> bool {
        matches!(
            self,
            TargetKind::Tollgate
                | TargetKind::TollgateUnixUpstream
                | TargetKind::TollgateMetrics
                | TargetKind::TollgateNopool
                | TargetKind::TollgateReadiness
                | TargetKind::TollgateTx
        )
    }

    /// Whether this target reaches Postgres over its Unix-domain socket,
    /// which only the throwaway cluster offers the harness.
    pub fn needs_socket(self) -> bool {
        matches!(
            self,
            TargetKind::DirectUnix | TargetKind::TollgateUnixUpstream
        )
    }
}

impl fmt::Display for TargetKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A child process that is stopped when dropped.
#[derive(Debug)]
pub struct ChildGuard {
    name: String,
    child: Child,
    log: PathBuf,
}

impl ChildGuard {
    /// Spawns `cmd` with stdout and stderr appended to `log`, in its own
    /// process group (a terminal Ctrl-C reaches only the harness, which
    /// stops children in order) and killed by the kernel if the harness dies.
    pub fn spawn(name: &str, mut cmd: Command, log: &Path) -> Result<ChildGuard, String> {
        let open = || {
            File::options()
                .create(true)
                .append(true)
                .open(log)
                .map_err(|e| format!("{name}: opening {}: {e}", log.display()))
        };
        cmd.stdin(Stdio::null()).stdout(open()?).stderr(open()?);
        crate::sys::own_session(&mut cmd);
        crate::sys::die_with_parent(&mut cmd);
        let child = cmd
            .spawn()
            .map_err(|e| format!("{name}: starting {:?}: {e}", cmd.get_program()))?;
        Ok(ChildGuard {
            name: name.to_owned(),
            child,
            log: log.to_owned(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// An error (with the end of its log) if the process has exited.
    pub fn check(&mut self) -> Result<(), String> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(format!(
                "{} exited ({status}); end of its log {}:\n{}",
                self.name,
                self.log.display(),
                file_tail(&self.log)
            )),
            Err(e) => Err(format!("{}: {e}", self.name)),
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        let _ = crate::sys::send_signal(self.child.id(), libc::SIGTERM);
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A running target.
pub struct Target {
    pub kind: TargetKind,
    /// What exactly runs, e.g. "relay (HAProxy 2.6.12, 2 threads)".
    pub label: String,
    /// Where pgbench connects, with the password it gives (tollgate: a token).
    pub endpoint: Endpoint,
    /// `Some(reason)` when this target cannot serve TLS cells.
    pub tls_unsupported: Option<String>,
    // Processes first, so they stop before their directory is removed.
    children: Vec<ChildGuard>,
    _dir: Option<TempDir>,
}

impl Target {
    /// The processes whose CPU time is this target's cost (none for direct).
    pub fn pids(&self) -> Vec<u32> {
        self.children.iter().map(ChildGuard::pid).collect()
    }

    /// An error if any of its processes has died.
    pub fn check_alive(&mut self) -> Result<(), String> {
        self.children.iter_mut().try_for_each(ChildGuard::check)
    }
}

/// What every target is started with.
pub struct StartContext<'a> {
    /// Postgres, as the `app` role with its real password.
    pub upstream: &'a Endpoint,
    /// The directory of Postgres' Unix-domain socket (`.s.PGSQL.<port>`):
    /// the throwaway cluster's, none with --upstream.
    pub upstream_socket_dir: Option<&'a Path>,
    /// tollgate workers, PgBouncer processes, HAProxy threads.
    pub shards: usize,
    /// The largest client count in the matrix, to size pools and limits.
    pub max_clients: u32,
    /// Certificate and key for targets that terminate TLS themselves.
    pub tls: Option<&'a TlsFiles>,
    /// Whether Postgres itself accepts TLS (the relay passes TLS through).
    pub upstream_tls: bool,
    /// uid/gid for servers that must not run as root.
    pub unprivileged: Option<(u32, u32)>,
    /// Server connections in all for the transaction-pooling targets.
    pub tx_pool_size: u32,
}

/// Postgres itself: nothing to start.
pub fn direct(ctx: &StartContext<'_>) -> Target {
    Target {
        kind: TargetKind::Direct,
        label: "direct (Postgres)".to_owned(),
        endpoint: ctx.upstream.clone(),
        tls_unsupported: (!ctx.upstream_tls).then(|| "direct: Postgres has no TLS".to_owned()),
        children: Vec::new(),
        _dir: None,
    }
}

/// Postgres over its Unix-domain socket: pgbench's `-h` is the socket's
/// directory, as libpq takes it. Nothing to start.
pub fn direct_unix(ctx: &StartContext<'_>) -> Result<Target, String> {
    let dir = socket_dir(ctx, TargetKind::DirectUnix)?;
    Ok(Target {
        kind: TargetKind::DirectUnix,
        label: "direct-unix (Postgres over its Unix socket, trust)".to_owned(),
        endpoint: Endpoint {
            host: dir,
            ..ctx.upstream.clone()
        },
        // libpq does not use TLS on a Unix-domain socket.
        tls_unsupported: Some("direct-unix: no TLS on a Unix-domain socket".to_owned()),
        children: Vec::new(),
        _dir: None,
    })
}

/// The socket directory as libpq and tollgate's `[upstream] host` take it.
fn socket_dir(ctx: &StartContext<'_>, kind: TargetKind) -> Result<String, String> {
    let dir = ctx.upstream_socket_dir.ok_or_else(|| {
        format!("{kind}: needs the throwaway cluster's Unix socket (not with --upstream)")
    })?;
    dir.to_str()
        .map(str::to_owned)
        .ok_or_else(|| format!("{kind}: socket directory {} is not UTF-8", dir.display()))
}

/// tollgate with a fresh token and `workers = shards`; as `kind`
/// `TollgateMetrics`, also the admin listener, which turns on the relay's
/// latency histograms; as `TollgateNopool`, without session pooling; as
/// `TollgateReadiness`, with the readiness-driven plain relay; as
/// `TollgateUnixUpstream`, with the upstream leg over Postgres' Unix socket.
pub fn tollgate(ctx: &StartContext<'_>, bin: &Path, kind: TargetKind) -> Result<Target, String> {
    let err = |e: std::io::Error| format!("tollgate: {e}");
    let dir = TempDir::new("loadtest-tollgate", None).map_err(err)?;
    let port = free_port().map_err(err)?;
    let up = ctx.upstream;
    // A host that is a path is a socket directory, as in libpq. The
    // cluster's pg_hba has `trust` for the socket and SCRAM for TCP: that
    // changes what a login costs, not what a transaction does.
    let upstream_host = if kind == TargetKind::TollgateUnixUpstream {
        socket_dir(ctx, kind)?
    } else {
        up.host.clone()
    };
    // `[log] level = "warn"`: per-connection info lines would distort -C runs.
    // `[upstream] tls = "disable"`: the upstream leg stays plaintext, as
    // PgBouncer's does (its default, prefer, would encrypt it whenever
    // Postgres has TLS on, i.e. in every cell of a --tls run).
    let mut config = format!(
        "# Written by the loadtest harness.\n\
         listen = \"127.0.0.1:{port}\"\n\
         workers = {shards}\n\n\
         [upstream]\n\
         host = {host}\n\
         port = {upport}\n\
         tls = \"disable\"\n\n\
         [[upstream.credentials]]\n\
         user = {user}\n\
         password = {password}\n\n\
         [tokens]\n\
         file = \"tokens.toml\"\n\n\
         [log]\n\
         level = \"warn\"\n",
        shards = ctx.shards,
        host = toml_str(&upstream_host),
        upport = up.port,
        user = toml_str(&up.user),
        password = toml_str(&up.password),
    );
    // `allow`: TLS when the client asks (TLS cells), plaintext otherwise.
    if let Some(files) = ctx.tls {
        config.push_str(&format!(
            "\n[tls]\ncert = {}\nkey = {}\nmode = \"allow\"\n",
            toml_str(&files.cert.to_string_lossy()),
            toml_str(&files.key.to_string_lossy()),
        ));
    }
    if kind == TargetKind::TollgateNopool {
        config.push_str("\n[pool]\nmode = \"off\"\n");
    }
    if kind == TargetKind::TollgateTx {
        config.push_str(&format!(
            "\n[pool]\nmode = \"transaction\"\nmax_server_connections = {}\n",
            ctx.tx_pool_size
        ));
    }
    if kind == TargetKind::TollgateReadiness {
        // A top-level key: it goes before the first table.
        config = config.replacen(
            "\n[upstream]\n",
            "plain_relay = \"readiness\"\n\n[upstream]\n",
            1,
        );
    }
    if kind == TargetKind::TollgateMetrics {
        let admin_port = free_port().map_err(err)?;
        config.push_str(&format!(
            "\n[admin]\nlisten = \"127.0.0.1:{admin_port}\"\nlatency_histograms = true\n"
        ));
    }
    let config_path = dir.write("tollgate.toml", &config, None).map_err(err)?;
    let token = create_token(bin, &config_path, &up.user, &up.database)?;

    let mut cmd = Command::new(bin);
    cmd.args(["serve", "--config"])
        .arg(&config_path)
        .env_remove("RUST_LOG")
        .current_dir(dir.path());
    let child = ChildGuard::spawn("tollgate", cmd, &dir.path().join("tollgate.log"))?;
    let mut children = vec![child];
    wait_listening(&mut children, port)?;
    let tx_label = format!(", transaction pooling over {}", ctx.tx_pool_size);
    let extra = match kind {
        TargetKind::TollgateMetrics => ", metrics on",
        TargetKind::TollgateNopool => ", pooling off",
        TargetKind::TollgateReadiness => ", readiness relay",
        TargetKind::TollgateTx => &tx_label,
        TargetKind::TollgateUnixUpstream => ", upstream over Unix socket",
        _ => "",
    };
    Ok(Target {
        kind,
        label: format!("tollgate ({} shards{extra})", ctx.shards),
        endpoint: Endpoint {
            port,
            password: token,
            ..up.clone()
        },
        tls_unsupported: ctx
            .tls
            .is_none()
            .then(|| "tollgate: no certificate (TLS cells not requested)".to_owned()),
        children,
        _dir: Some(dir),
    })
}

/// `tollgate token create`, which prints only the token.
fn create_token(bin: &Path, config: &Path, user: &str, database: &str) -> Result<String, String> {
    let out = Command::new(bin)
        .args(["token", "create", "--config"])
        .arg(config)
        .args([
            "--user",
            user,
            "--database",
            database,
            "--comment",
            "loadtest",
        ])
        .env_remove("RUST_LOG")
        .output()
        .map_err(|e| format!("tollgate token create: {e}"))?;
    let token = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    if !out.status.success() || !token.starts_with("tg_") {
        return Err(format!(
            "tollgate token create failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(token)
}

/// PgBouncer, `shards` processes on one SO_REUSEPORT port: in session
/// mode (`transaction` false), or in transaction mode with
/// `--tx-pool-size` server connections split over the processes.
pub fn pgbouncer(
    ctx: &StartContext<'_>,
    bin: &Path,
    auth: &str,
    transaction: bool,
) -> Result<Target, String> {
    let err = |e: std::io::Error| format!("pgbouncer: {e}");
    let owner = ctx.unprivileged;
    let dir = TempDir::new("loadtest-pgbouncer", owner).map_err(err)?;
    let port = free_port().map_err(err)?;
    let up = ctx.upstream;
    // Each process has its own pool and the kernel spreads clients unevenly,
    // so every process must be able to hold all clients on its own.
    let processes = ctx.shards.max(1) as u32;
    let (pool, mode) = if transaction {
        (ctx.tx_pool_size.div_ceil(processes).max(1), "transaction")
    } else {
        (ctx.max_clients + 4, "session")
    };
    let max_client_conn = (ctx.max_clients * 2).max(100);
    let d = dir.path().display();
    let tls = match ctx.tls {
        // `allow`: TLS when the client asks (TLS cells), plaintext otherwise.
        Some(files) => format!(
            "client_tls_sslmode = allow\nclient_tls_cert_file = {}\nclient_tls_key_file = {}\n",
            files.cert.display(),
            files.key.display()
        ),
        None => "client_tls_sslmode = disable\n".to_owned(),
    };
    let config = format!(
        ";; Written by the loadtest harness.\n\
         [databases]\n\
         {db} = host={host} port={upport} dbname={db}\n\n\
         [pgbouncer]\n\
         listen_addr = 127.0.0.1\n\
         listen_port = {port}\n\
         unix_socket_dir =\n\
         so_reuseport = 1\n\
         pool_mode = {mode}\n\
         auth_type = {auth}\n\
         auth_file = {d}/userlist.txt\n\
         max_client_conn = {max_client_conn}\n\
         default_pool_size = {pool}\n\
         reserve_pool_size = 0\n\
         logfile = {d}/pgbouncer.log\n\
         log_connections = 0\n\
         log_disconnections = 0\n\
         log_stats = 0\n\
         ignore_startup_parameters = extra_float_digits\n\
         server_tls_sslmode = disable\n\
         {tls}",
        db = up.database,
        host = up.host,
        upport = up.port,
    );
    // A plaintext password in the userlist serves any auth_type (SCRAM
    // included, PgBouncer ≥ 1.14) and logs in to Postgres with SCRAM.
    let userlist = format!("{} {}\n", pgb_quote(&up.user), pgb_quote(&up.password));
    dir.write("userlist.txt", &userlist, owner).map_err(err)?;
    let config_path = dir.write("pgbouncer.ini", &config, owner).map_err(err)?;

    let mut children = Vec::new();
    for i in 0..ctx.shards.max(1) {
        let mut cmd = Command::new(bin);
        cmd.arg(&config_path).current_dir(dir.path());
        if let Some((uid, gid)) = owner {
            cmd.uid(uid).gid(gid).env("HOME", dir.path());
        }
        let log = dir.path().join(format!("pgbouncer-{i}.out"));
        children.push(ChildGuard::spawn(&format!("pgbouncer #{i}"), cmd, &log)?);
        if let Some((uid, gid)) = owner {
            let _ = std::os::unix::fs::chown(&log, Some(uid), Some(gid));
        }
    }
    wait_listening(&mut children, port)?;
    Ok(Target {
        kind: if transaction {
            TargetKind::PgbouncerTx
        } else {
            TargetKind::Pgbouncer
        },
        label: format!(
            "pgbouncer ({}, {} processes, {mode} pooling{}, {auth})",
            tool_version(bin, "--version"),
            children.len(),
            if transaction {
                format!(" over {} in all", pool * processes)
            } else {
                String::new()
            }
        ),
        endpoint: Endpoint { port, ..up.clone() },
        tls_unsupported: ctx
            .tls
            .is_none()
            .then(|| "pgbouncer: no certificate (TLS cells not requested)".to_owned()),
        children,
        _dir: Some(dir),
    })
}

/// HAProxy in `mode tcp`, `nbthread = shards`.
pub fn haproxy(ctx: &StartContext<'_>, bin: &Path) -> Result<Target, String> {
    let err = |e: std::io::Error| format!("haproxy: {e}");
    let owner = ctx.unprivileged;
    let dir = TempDir::new("loadtest-haproxy", owner).map_err(err)?;
    let port = free_port().map_err(err)?;
    let up = ctx.upstream;
    let maxconn = (ctx.max_clients * 2).max(100);
    let config = format!(
        "# Written by the loadtest harness.\n\
         global\n\
         \x20   nbthread {threads}\n\
         \x20   maxconn {maxconn}\n\n\
         defaults\n\
         \x20   mode tcp\n\
         \x20   timeout connect 5s\n\
         \x20   timeout client 1h\n\
         \x20   timeout server 1h\n\n\
         listen pg\n\
         \x20   bind 127.0.0.1:{port}\n\
         \x20   server pg {host}:{upport}\n",
        threads = ctx.shards.max(1),
        host = up.host,
        upport = up.port,
    );
    let config_path = dir.write("haproxy.cfg", &config, owner).map_err(err)?;
    let mut cmd = Command::new(bin);
    // -db: foreground, one process (no master-worker), logs to stderr.
    cmd.arg("-db")
        .arg("-f")
        .arg(&config_path)
        .current_dir(dir.path());
    if let Some((uid, gid)) = owner {
        cmd.uid(uid).gid(gid);
    }
    let mut children = vec![ChildGuard::spawn(
        "haproxy",
        cmd,
        &dir.path().join("haproxy.log"),
    )?];
    wait_listening(&mut children, port)?;
    let version = tool_version(bin, "-v");
    let version = version
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ");
    Ok(Target {
        kind: TargetKind::Relay,
        label: format!("relay ({version}, mode tcp, {} threads)", ctx.shards.max(1)),
        endpoint: Endpoint { port, ..up.clone() },
        tls_unsupported: (!ctx.upstream_tls)
            .then(|| "relay: passes TLS through, but Postgres has none".to_owned()),
        children,
        _dir: Some(dir),
    })
}

/// The harness's own copy relay (see `relay.rs`), as a child process.
pub fn builtin_relay(ctx: &StartContext<'_>, exe: &Path) -> Result<Target, String> {
    let err = |e: std::io::Error| format!("relay: {e}");
    let dir = TempDir::new("loadtest-relay", None).map_err(err)?;
    let port = free_port().map_err(err)?;
    let up = ctx.upstream;
    let mut cmd = Command::new(exe);
    cmd.arg(crate::relay::SUBCOMMAND)
        .arg(format!("127.0.0.1:{port}"))
        .arg(format!("{}:{}", up.host, up.port))
        .current_dir(dir.path());
    let mut children = vec![ChildGuard::spawn(
        "builtin relay",
        cmd,
        &dir.path().join("relay.log"),
    )?];
    wait_listening(&mut children, port)?;
    Ok(Target {
        kind: TargetKind::Relay,
        label: "relay (builtin std-thread copy relay; HAProxy not installed)".to_owned(),
        endpoint: Endpoint { port, ..up.clone() },
        tls_unsupported: (!ctx.upstream_tls)
            .then(|| "relay: passes TLS through, but Postgres has none".to_owned()),
        children,
        _dir: Some(dir),
    })
}

/// Waits until every process listens on `port` itself and a connection
/// succeeds; fails early with the log of a process that exits.
fn wait_listening(children: &mut [ChildGuard], port: u16) -> Result<(), String> {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        for child in children.iter_mut() {
            child.check()?;
        }
        let all = children
            .iter()
            .all(|c| procstat::is_listening(c.pid(), port));
        if all && TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            let names: Vec<_> = children.iter().map(|c| c.name.as_str()).collect();
            return Err(format!(
                "{} not listening on 127.0.0.1:{port} after {} s",
                names.join(", "),
                START_TIMEOUT.as_secs()
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Finds a program on `$PATH` or in the sbin directories Debian installs
/// servers into (not on a non-root `$PATH`).
pub fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/local/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// The first line of `bin FLAG`, e.g. "PgBouncer 1.18.0".
fn tool_version(bin: &Path, flag: &str) -> String {
    Command::new(bin)
        .arg(flag)
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(str::to_owned)
        })
        .unwrap_or_else(|| "version unknown".to_owned())
}

fn toml_str(s: &str) -> String {
    serde_json::Value::String(s.to_owned()).to_string()
}

/// PgBouncer's auth_file quoting: double quotes, inner ones doubled.
fn pgb_quote(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(pgb_quote("a\"b"), "\"a\"\"b\"");
        // JSON string syntax is valid TOML basic-string syntax.
        assert_eq!(toml_str("p\"w\\d"), "\"p\\\"w\\\\d\"");
    }

    #[test]
    fn child_guard_stops_and_reports_exit() {
        let dir = TempDir::new("loadtest-test", None).unwrap();
        let mut sleeper = Command::new("sleep");
        sleeper.arg("60");
        let mut guard = ChildGuard::spawn("sleep", sleeper, &dir.path().join("log")).unwrap();
        let pid = guard.pid();
        assert!(guard.check().is_ok());
        drop(guard);
        assert!(!Path::new(&format!("/proc/{pid}")).exists());

        let mut quitter = Command::new("sh");
        quitter.args(["-c", "echo bye >&2; exit 3"]);
        let mut guard = ChildGuard::spawn("sh", quitter, &dir.path().join("log2")).unwrap();
        // Poll rather than sleep a fixed time: CI machines can be busy.
        let deadline = Instant::now() + Duration::from_secs(20);
        let e = loop {
            match guard.check() {
                Err(e) => break e,
                Ok(()) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Ok(()) => panic!("sh did not exit"),
            }
        };
        assert!(e.contains("exit status: 3") && e.contains("bye"), "{e}");
    }
}
