//! Throwaway PostgreSQL clusters.
//!
//! `tollgate quickstart`, the integration tests and the load-test harness all
//! need a real PostgreSQL server to proxy to, and none of them should depend
//! on (or disturb) a system-wide installation. This module creates a private
//! cluster in a fresh temporary directory, starts `postgres` as a child
//! process that we own, bootstraps an application role and database, and tears
//! everything down again (server stopped, directory removed) when the
//! [`Cluster`] is dropped.
//!
//! Layout of the temporary directory (mode 0700):
//!
//! ```text
//! $TMPDIR/tollgate-pg-<pid>-<n>-<time>/
//!     data/                 initdb output (PGDATA)
//!     .s.PGSQL.<port>       unix socket, used for the superuser bootstrap
//!     postgres.log          the server's stdout/stderr
//! ```
//!
//! The cluster is tuned for speed rather than durability (`fsync = off`,
//! `synchronous_commit = off`, `full_page_writes = off`): nothing in it is
//! meant to survive.
//!
//! Running as root: CI containers and many test environments run as root, and
//! PostgreSQL refuses to run as root. When the effective uid is 0, every
//! PostgreSQL program (`initdb`, `postgres`, `psql`) is therefore started as
//! the unprivileged user `nobody` (uid/gid looked up with `getpwnam_r`,
//! falling back to 65534/65534), and the temporary directory is chowned to that
//! user. Child processes get `HOME` and their working directory set to the
//! temporary directory, because `nobody` usually cannot read `/root` or the
//! project checkout. When not root, everything runs as the current user.
//!
//! Authentication: TCP connections (127.0.0.1 and ::1) use the method chosen
//! in [`ClusterOptions::auth`]; the unix socket is `trust`, which is only
//! reachable by the owner of the 0700 directory (and root) and is used to run
//! SQL as the bootstrap superuser `tollgate_admin` (see [`Cluster::psql`]).

use std::ffi::{CStr, OsStr, OsString};
use std::fmt;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::mem::MaybeUninit;
use std::net::TcpListener;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tracing::{debug, info, warn};

/// Name of the bootstrap superuser created by `initdb`.
const SUPERUSER: &str = "tollgate_admin";
/// Environment variable naming a directory that holds the PostgreSQL binaries.
const PG_BIN_ENV: &str = "TOLLGATE_PG_BIN";
/// How long to wait for the server to accept connections.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long to wait for a fast shutdown before resorting to SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Start attempts when the port is picked automatically and turns out to be taken.
const START_ATTEMPTS: u32 = 3;
/// Longest identifier PostgreSQL keeps without truncating (NAMEDATALEN - 1).
const MAX_IDENT_BYTES: usize = 63;
/// Lines of command output / server log quoted in errors.
const TAIL_LINES: usize = 30;
/// Fallback uid/gid of `nobody` when the passwd lookup fails.
const NOBODY_FALLBACK: (u32, u32) = (65534, 65534);

/// Errors from finding, starting or talking to a throwaway cluster.
#[derive(Debug)]
#[non_exhaustive]
pub enum ClusterError {
    /// A PostgreSQL program could not be found.
    BinaryNotFound {
        /// Program name, e.g. `initdb`.
        name: String,
        /// Human-readable description of every place that was searched.
        searched: Vec<String>,
    },
    /// The [`ClusterOptions`] cannot be turned into a working cluster.
    InvalidOptions(String),
    /// A filesystem or process-spawning operation failed.
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        source: io::Error,
    },
    /// A PostgreSQL program (`initdb`, `psql`, ...) exited unsuccessfully.
    CommandFailed {
        /// The command line (and the user it ran as).
        command: String,
        /// Its exit status.
        status: ExitStatus,
        /// The last lines of its stderr (or stdout if stderr was empty).
        output_tail: String,
    },
    /// The server could not listen on its port because it is already in use.
    PortInUse {
        /// The port that was taken.
        port: u16,
        /// The last lines of the server log.
        log_tail: String,
    },
    /// The server exited during startup.
    ServerExited {
        /// Its exit status.
        status: ExitStatus,
        /// The last lines of the server log.
        log_tail: String,
    },
    /// The server did not become ready in time.
    StartupTimeout {
        /// How long we waited.
        waited: Duration,
        /// The last lines of the server log.
        log_tail: String,
    },
}

impl ClusterError {
    fn io(context: impl Into<String>, source: io::Error) -> Self {
        ClusterError::Io {
            context: context.into(),
            source,
        }
    }
}

impl fmt::Display for ClusterError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClusterError::BinaryNotFound { name, searched } => {
                write!(
                    f,
                    "PostgreSQL program `{name}` not found; searched: {}. Install the PostgreSQL \
                     server binaries (e.g. `apt-get install postgresql`) or set {PG_BIN_ENV} to \
                     the directory containing them",
                    searched.join("; ")
                )
            }
            ClusterError::InvalidOptions(msg) => write!(f, "invalid cluster options: {msg}"),
            ClusterError::Io { context, source } => write!(f, "{context}: {source}"),
            ClusterError::CommandFailed {
                command,
                status,
                output_tail,
            } => {
                write!(f, "`{command}` failed ({status})")?;
                write_tail(f, "output", output_tail)
            }
            ClusterError::PortInUse { port, log_tail } => {
                write!(
                    f,
                    "PostgreSQL could not listen on 127.0.0.1:{port}: port already in use"
                )?;
                write_tail(f, "server log", log_tail)
            }
            ClusterError::ServerExited { status, log_tail } => {
                write!(f, "PostgreSQL exited during startup ({status})")?;
                write_tail(f, "server log", log_tail)
            }
            ClusterError::StartupTimeout { waited, log_tail } => {
                write!(
                    f,
                    "PostgreSQL did not accept connections within {} s",
                    waited.as_secs()
                )?;
                write_tail(f, "server log", log_tail)
            }
        }
    }
}

fn write_tail(f: &mut fmt::Formatter<'_>, what: &str, tail: &str) -> fmt::Result {
    if tail.trim().is_empty() {
        write!(f, " (no {what})")
    } else {
        write!(f, "; last lines of {what}:\n{tail}")
    }
}

impl std::error::Error for ClusterError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ClusterError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// Authentication method for TCP connections (a `pg_hba.conf` method).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HbaAuth {
    /// SCRAM-SHA-256 (the password is stored as a SCRAM verifier).
    #[default]
    ScramSha256,
    /// MD5 challenge/response (the password is stored MD5-hashed).
    Md5,
    /// Cleartext password (stored as a SCRAM verifier).
    Password,
    /// No authentication.
    Trust,
}

impl HbaAuth {
    /// The method keyword as written in `pg_hba.conf`.
    pub fn hba_method(self) -> &'static str {
        match self {
            HbaAuth::ScramSha256 => "scram-sha-256",
            HbaAuth::Md5 => "md5",
            HbaAuth::Password => "password",
            HbaAuth::Trust => "trust",
        }
    }

    /// The `password_encryption` setting that makes stored passwords usable
    /// with this method.
    fn password_encryption(self) -> &'static str {
        match self {
            HbaAuth::Md5 => "md5",
            HbaAuth::ScramSha256 | HbaAuth::Password | HbaAuth::Trust => "scram-sha-256",
        }
    }
}

/// What to create in a throwaway cluster.
#[derive(Clone)]
pub struct ClusterOptions {
    /// Login role created for the application (not a superuser).
    pub role: String,
    /// Password of [`role`](Self::role). Empty means no password.
    pub password: String,
    /// Database created with [`role`](Self::role) as owner.
    pub database: String,
    /// Authentication method for TCP connections.
    pub auth: HbaAuth,
    /// TCP port; `None` picks a free one (retrying if it gets taken meanwhile).
    pub port: Option<u16>,
    /// Extra `postgresql.conf` settings, written last as `name = 'value'`
    /// (values are always quoted, which PostgreSQL accepts for every type).
    pub extra_conf: Vec<(String, String)>,
    /// Where `postgres` and `initdb` are, when not the ones
    /// [`find_pg_bin`] finds (another major version, say). `psql` comes
    /// from there if it is there, else from the usual search.
    pub bin_dir: Option<PathBuf>,
    /// Runs the server in a session of its own, so that Linux schedules it
    /// as its own autogroup (as a service in its own cgroup would be),
    /// not as part of the caller's. The load harness sets it: sharing one
    /// autogroup with the proxy and pgbench, the backends were measured
    /// sitting runnable for seconds. The server then shuts down
    /// (immediately) when the thread that started it exits, since a kill
    /// of the caller's process group no longer reaches it.
    pub own_session: bool,
}

impl std::fmt::Debug for ClusterOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterOptions")
            .field("role", &self.role)
            .field("password", &"<redacted>")
            .field("database", &self.database)
            .field("auth", &self.auth)
            .field("port", &self.port)
            .field("extra_conf", &self.extra_conf)
            .field("bin_dir", &self.bin_dir)
            .field("own_session", &self.own_session)
            .finish()
    }
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            role: "app".to_owned(),
            password: "app-password".to_owned(),
            database: "appdb".to_owned(),
            auth: HbaAuth::ScramSha256,
            port: None,
            extra_conf: Vec::new(),
            bin_dir: None,
            own_session: false,
        }
    }
}

/// Makes `cmd`'s process the leader of a new session (and process group):
/// its own autogroup for the scheduler, and out of reach of the
/// terminal's signals.
pub fn new_session(cmd: &mut Command) {
    // SAFETY: runs in the forked child before exec; setsid is
    // async-signal-safe and touches no memory of the parent's.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Makes `cmd`'s process get `signal` when the calling thread exits
/// (`PR_SET_PDEATHSIG`), even by SIGKILL. Set after the uid switch, which
/// would clear it; fails the spawn if the caller died meanwhile.
fn die_with_caller(cmd: &mut Command, signal: libc::c_int) {
    // SAFETY: getpid has no preconditions.
    let parent = unsafe { libc::getpid() };
    // SAFETY: runs in the forked child before exec and calls only
    // async-signal-safe functions (prctl, getppid).
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, signal) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::getppid() != parent {
                return Err(std::io::Error::other("parent exited during spawn"));
            }
            Ok(())
        });
    }
}

/// Finds a PostgreSQL program.
///
/// Searches, in order: the directory named by `$TOLLGATE_PG_BIN`, every
/// directory on `$PATH`, and `/usr/lib/postgresql/<version>/bin` (highest
/// version first).
pub fn find_pg_bin(name: &str) -> Result<PathBuf, ClusterError> {
    let mut searched = Vec::new();

    match std::env::var_os(PG_BIN_ENV) {
        Some(dir) if !dir.is_empty() => {
            let candidate = Path::new(&dir).join(name);
            if is_executable(&candidate) {
                return Ok(candidate);
            }
            searched.push(format!("${PG_BIN_ENV} ({})", Path::new(&dir).display()));
        }
        _ => searched.push(format!("${PG_BIN_ENV} (not set)")),
    }

    match std::env::var_os("PATH") {
        Some(path) => {
            for dir in std::env::split_paths(&path) {
                let candidate = dir.join(name);
                if is_executable(&candidate) {
                    return Ok(candidate);
                }
            }
            searched.push(format!("$PATH ({})", path.to_string_lossy()));
        }
        None => searched.push("$PATH (not set)".to_owned()),
    }

    let root = Path::new("/usr/lib/postgresql");
    let mut versions: Vec<OsString> = fs::read_dir(root)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .map(|e| e.file_name())
                .collect()
        })
        .unwrap_or_default();
    versions.sort_by_key(|v| std::cmp::Reverse(version_key(v)));
    for version in &versions {
        let candidate = root.join(version).join("bin").join(name);
        if is_executable(&candidate) {
            return Ok(candidate);
        }
    }
    searched.push(if versions.is_empty() {
        format!("{}/*/bin (no versions installed)", root.display())
    } else {
        let list: Vec<_> = versions.iter().map(|v| v.to_string_lossy()).collect();
        format!("{}/{{{}}}/bin", root.display(), list.join(","))
    });

    Err(ClusterError::BinaryNotFound {
        name: name.to_owned(),
        searched,
    })
}

/// Sort key for version directory names such as `15`, `9.6` or `17beta1`.
fn version_key(name: &OsStr) -> Vec<u64> {
    name.to_string_lossy()
        .split('.')
        .map(|part| {
            let digits: String = part.chars().take_while(char::is_ascii_digit).collect();
            digits.parse().unwrap_or(0)
        })
        .collect()
}

fn is_executable(path: &Path) -> bool {
    fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// The PostgreSQL programs a cluster uses, all from one installation.
#[derive(Debug, Clone)]
struct PgBins {
    initdb: PathBuf,
    postgres: PathBuf,
    psql: PathBuf,
}

impl PgBins {
    /// Locates `postgres` with [`find_pg_bin`] and prefers the other programs
    /// from the same directory, so that `initdb` and `postgres` versions match
    /// (`$PATH` often mixes `/usr/local/bin` symlinks and Debian's
    /// `pg_wrapper`).
    fn locate(bin_dir: Option<&Path>) -> Result<Self, ClusterError> {
        let postgres = match bin_dir {
            Some(dir) => dir.join("postgres"),
            None => find_pg_bin("postgres")?,
        };
        let postgres = fs::canonicalize(&postgres).unwrap_or(postgres);
        let bin_dir = postgres.parent().map(Path::to_path_buf);
        let sibling = |name: &str| -> Result<PathBuf, ClusterError> {
            match &bin_dir {
                Some(dir) if is_executable(&dir.join(name)) => Ok(dir.join(name)),
                _ => find_pg_bin(name),
            }
        };
        Ok(PgBins {
            initdb: sibling("initdb")?,
            psql: sibling("psql")?,
            postgres,
        })
    }
}

/// The uid/gid PostgreSQL programs run as when we are root.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RunAs {
    uid: u32,
    gid: u32,
}

fn effective_uid() -> u32 {
    // SAFETY: geteuid takes no arguments, cannot fail and has no preconditions.
    unsafe { libc::geteuid() }
}

/// Looks up a user's uid and gid in the passwd database (thread-safe).
fn lookup_user_ids(name: &CStr) -> Option<(u32, u32)> {
    let mut buf: Vec<libc::c_char> = vec![0; 4096];
    loop {
        let mut pwd = MaybeUninit::<libc::passwd>::uninit();
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: `name` is NUL-terminated; `pwd`, `buf` (passed with its true
        // length) and `result` are valid for writes and outlive the call. When
        // getpwnam_r returns 0 with a non-null `result`, `result` points to
        // `pwd`, which it has initialised; we only copy two integers out of it.
        let (rc, ids) = unsafe {
            let rc = libc::getpwnam_r(
                name.as_ptr(),
                pwd.as_mut_ptr(),
                buf.as_mut_ptr(),
                buf.len(),
                &mut result,
            );
            let ids = (rc == 0 && !result.is_null()).then(|| ((*result).pw_uid, (*result).pw_gid));
            (rc, ids)
        };
        if rc == libc::ERANGE && buf.len() < (1 << 20) {
            buf.resize(buf.len() * 4, 0);
            continue;
        }
        return ids;
    }
}

/// `Some(nobody)` when running as root, `None` otherwise.
fn run_as() -> Option<RunAs> {
    static RUN_AS: OnceLock<Option<RunAs>> = OnceLock::new();
    *RUN_AS.get_or_init(|| {
        if effective_uid() != 0 {
            return None;
        }
        let (uid, gid) = match lookup_user_ids(c"nobody") {
            // A passwd entry mapping nobody to root would defeat the purpose.
            Some((uid, gid)) if uid != 0 => (uid, gid),
            _ => NOBODY_FALLBACK,
        };
        Some(RunAs { uid, gid })
    })
}

/// The (uid, gid) Postgres and its helpers run as when this process is
/// root (`nobody`), or `None` when not root. Shared with the load harness,
/// which runs PgBouncer the same way.
pub fn unprivileged_ids() -> Option<(u32, u32)> {
    run_as().map(|r| (r.uid, r.gid))
}

/// A running throwaway PostgreSQL cluster. Dropping it stops the server and
/// deletes its directory.
pub struct Cluster {
    base_dir: PathBuf,
    data_dir: PathBuf,
    log_path: PathBuf,
    port: u16,
    role: String,
    password: String,
    database: String,
    bins: PgBins,
    run_as: Option<RunAs>,
    child: Option<Child>,
    /// What the cluster was created with, for [`restart`](Self::restart).
    opts: ClusterOptions,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("base_dir", &self.base_dir)
            .field("port", &self.port)
            .field("role", &self.role)
            .field("password", &"<redacted>")
            .field("database", &self.database)
            .finish_non_exhaustive()
    }
}

impl Cluster {
    /// Creates, starts and bootstraps a new cluster.
    ///
    /// On error everything created so far is cleaned up.
    pub fn start(opts: &ClusterOptions) -> Result<Cluster, ClusterError> {
        validate(opts)?;
        let bins = PgBins::locate(opts.bin_dir.as_deref())?;
        let run_as = run_as();
        let base_dir = create_base_dir()?;
        // From here on, `Drop` cleans up if anything fails.
        let mut cluster = Cluster {
            data_dir: base_dir.join("data"),
            log_path: base_dir.join("postgres.log"),
            base_dir,
            port: 0,
            role: opts.role.clone(),
            password: opts.password.clone(),
            database: opts.database.clone(),
            bins,
            run_as,
            child: None,
            opts: opts.clone(),
        };
        if let Some(user) = run_as {
            chown(&cluster.base_dir, user)?;
        }
        cluster.initdb(opts)?;

        let mut attempt = 1;
        loop {
            cluster.port = match opts.port {
                Some(port) => port,
                None => pick_free_port()?,
            };
            match cluster.launch(opts) {
                Ok(()) => break,
                Err(err @ ClusterError::PortInUse { .. })
                    if opts.port.is_none() && attempt < START_ATTEMPTS =>
                {
                    warn!(
                        port = cluster.port,
                        attempt, "{err}; retrying with another port"
                    );
                    attempt += 1;
                }
                Err(err) => return Err(err),
            }
        }

        cluster.bootstrap()?;
        info!(
            port = cluster.port,
            dir = %cluster.base_dir.display(),
            role = %cluster.role,
            database = %cluster.database,
            auth = opts.auth.hba_method(),
            "throwaway PostgreSQL cluster started"
        );
        Ok(cluster)
    }

    /// TCP host the server listens on (always `127.0.0.1`).
    pub fn host(&self) -> &str {
        "127.0.0.1"
    }

    /// TCP port the server listens on (the unix socket uses the same number).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The cluster's data directory (PGDATA).
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Directory holding the server's unix socket (`.s.PGSQL.<port>`); this is
    /// the temporary directory that contains everything else.
    pub fn socket_dir(&self) -> &Path {
        &self.base_dir
    }

    /// File receiving the server's stdout/stderr.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The application login role.
    pub fn role(&self) -> &str {
        &self.role
    }

    /// The application role's password.
    pub fn password(&self) -> &str {
        &self.password
    }

    /// The application database (owned by [`role`](Self::role)).
    pub fn database(&self) -> &str {
        &self.database
    }

    /// The bootstrap superuser (reachable only over the unix socket).
    pub fn superuser(&self) -> &str {
        SUPERUSER
    }

    /// A libpq key/value connection string for the application role over TCP,
    /// e.g. `host=127.0.0.1 port=5432 user='app' password='...' dbname='appdb'`.
    pub fn conninfo(&self) -> String {
        format!(
            "host={} port={} user={} password={} dbname={}",
            self.host(),
            self.port,
            conninfo_value(&self.role),
            conninfo_value(&self.password),
            conninfo_value(&self.database)
        )
    }

    /// Runs `sql` (one or more statements, or psql meta-commands) in database
    /// `db` as the superuser over the unix socket, with `ON_ERROR_STOP`, and
    /// returns psql's unaligned, tuples-only (`-At`) output without the
    /// trailing newline. The SQL is passed on stdin, not the command line.
    pub fn psql(&self, db: &str, sql: &str) -> Result<String, ClusterError> {
        let mut cmd = self.command(&self.bins.psql);
        cmd.args(["-X", "-q", "-A", "-t", "-w", "-v", "ON_ERROR_STOP=1", "-h"])
            .arg(&self.base_dir)
            .arg("-p")
            .arg(self.port.to_string())
            .args(["-U", SUPERUSER, "-d"])
            .arg(format!("dbname={}", conninfo_value(db)))
            .args(["-f", "-"]);
        let output = run(cmd, self.run_as, Some(sql))?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        Ok(stdout.trim_end_matches('\n').to_owned())
    }

    /// Stops the server: SIGINT (fast shutdown), then SIGKILL if it is still
    /// running after 10 s. Idempotent; never panics. The directory is kept
    /// until the `Cluster` is dropped.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        let pid = child.id();
        match send_sigint(pid) {
            Ok(()) => {
                let deadline = Instant::now() + STOP_TIMEOUT;
                loop {
                    match child.try_wait() {
                        Ok(Some(status)) => {
                            debug!(pid, %status, "PostgreSQL stopped");
                            return;
                        }
                        Ok(None) if Instant::now() < deadline => {
                            std::thread::sleep(Duration::from_millis(20))
                        }
                        Ok(None) => {
                            warn!(pid, "PostgreSQL did not shut down within 10 s; killing it");
                            break;
                        }
                        Err(err) => {
                            warn!(pid, "waiting for PostgreSQL failed: {err}; killing it");
                            break;
                        }
                    }
                }
            }
            Err(err) => warn!(
                pid,
                "could not send SIGINT to PostgreSQL: {err}; killing it"
            ),
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Stops the server (fast shutdown) and starts it again on the same
    /// port and data, as an operator's restart would.
    pub fn restart(&mut self) -> Result<(), ClusterError> {
        self.stop();
        let opts = self.opts.clone();
        self.launch(&opts)
    }

    /// A command for a PostgreSQL program: PG* variables cleared, C locale,
    /// `HOME` and working directory set to the temporary directory, and
    /// running as `nobody` when we are root.
    fn command(&self, program: &Path) -> Command {
        let mut cmd = Command::new(program);
        for (key, _) in std::env::vars_os() {
            if key.as_bytes().starts_with(b"PG") {
                cmd.env_remove(key);
            }
        }
        cmd.env("HOME", &self.base_dir)
            .env("LC_ALL", "C")
            .env("LANG", "C")
            .env("PGCLIENTENCODING", "UTF8")
            .current_dir(&self.base_dir)
            .stdin(Stdio::null());
        if let Some(user) = self.run_as {
            cmd.uid(user.uid).gid(user.gid);
        }
        cmd
    }

    fn initdb(&self, opts: &ClusterOptions) -> Result<(), ClusterError> {
        let mut cmd = self.command(&self.bins.initdb);
        cmd.arg("-D").arg(&self.data_dir).args([
            "-U",
            SUPERUSER,
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        ]);
        run(cmd, self.run_as, None)?;

        // Our settings live in an included file that is rewritten on each
        // start attempt (the port may change between attempts).
        let conf = self.data_dir.join("postgresql.conf");
        let mut file = OpenOptions::new()
            .append(true)
            .open(&conf)
            .map_err(|e| ClusterError::io(format!("opening {}", conf.display()), e))?;
        file.write_all(b"\n# Added by tollgate::cluster\ninclude 'tollgate.conf'\n")
            .map_err(|e| ClusterError::io(format!("writing {}", conf.display()), e))?;

        let method = opts.auth.hba_method();
        let hba = format!(
            "# Generated by tollgate::cluster\n\
             # TYPE  DATABASE  USER  ADDRESS       METHOD\n\
             local   all       all                 trust\n\
             host    all       all   127.0.0.1/32  {method}\n\
             host    all       all   ::1/128       {method}\n\
             host    replication all 127.0.0.1/32  {method}\n"
        );
        self.write_file(&self.data_dir.join("pg_hba.conf"), &hba)
    }

    /// Writes `tollgate.conf` for the current port, spawns `postgres` and
    /// waits until it is ready.
    fn launch(&mut self, opts: &ClusterOptions) -> Result<(), ClusterError> {
        let mut conf =
            String::from("# Generated by tollgate::cluster; rewritten on every start attempt.\n");
        let mut set = |name: &str, value: &str| {
            conf.push_str(&format!("{name} = {}\n", conf_value(value)));
        };
        set("listen_addresses", "127.0.0.1");
        set("port", &self.port.to_string());
        set("unix_socket_directories", &self.base_dir.to_string_lossy());
        set("password_encryption", opts.auth.password_encryption());
        set("fsync", "off");
        set("synchronous_commit", "off");
        set("full_page_writes", "off");
        set("max_connections", "200");
        set("shared_buffers", "128MB");
        set("logging_collector", "off");
        set("log_destination", "stderr");
        set("log_line_prefix", "%m [%p] %q%u@%d ");
        for (name, value) in &opts.extra_conf {
            set(name, value);
        }
        self.write_file(&self.data_dir.join("tollgate.conf"), &conf)?;

        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .map_err(|e| ClusterError::io(format!("opening {}", self.log_path.display()), e))?;
        if let Some(user) = self.run_as {
            chown(&self.log_path, user)?;
        }
        let log_offset = log.metadata().map(|m| m.len()).unwrap_or(0);
        let log_err = log
            .try_clone()
            .map_err(|e| ClusterError::io("duplicating log file handle", e))?;

        let mut cmd = self.command(&self.bins.postgres);
        cmd.arg("-D")
            .arg(&self.data_dir)
            .stdout(log)
            .stderr(log_err);
        if opts.own_session {
            new_session(&mut cmd);
            // Out of the caller's process group, a kill of that group no
            // longer reaches the server: it goes down with the thread
            // that started it instead (SIGQUIT, an immediate shutdown).
            die_with_caller(&mut cmd, libc::SIGQUIT);
        }
        let description = describe(&cmd, self.run_as);
        debug!(command = %description, port = self.port, "starting PostgreSQL");
        let child = cmd
            .spawn()
            .map_err(|e| ClusterError::io(format!("spawning `{description}`"), e))?;
        self.child = Some(child);
        self.wait_ready(log_offset)
    }

    /// Polls until `postmaster.pid` reports `ready` (what `pg_ctl -w` checks),
    /// the server exits, or the startup timeout expires.
    fn wait_ready(&mut self, log_offset: u64) -> Result<(), ClusterError> {
        let started = Instant::now();
        let pid_file = self.data_dir.join("postmaster.pid");
        loop {
            let Some(child) = self.child.as_mut() else {
                return Err(ClusterError::InvalidOptions(
                    "internal error: server not running".to_owned(),
                ));
            };
            let pid = child.id();
            match child.try_wait() {
                Ok(Some(status)) => {
                    self.child = None;
                    let log_tail = self.log_tail(log_offset);
                    return Err(if is_port_in_use(&log_tail) {
                        ClusterError::PortInUse {
                            port: self.port,
                            log_tail,
                        }
                    } else {
                        ClusterError::ServerExited { status, log_tail }
                    });
                }
                Ok(None) => {}
                Err(e) => return Err(ClusterError::io("waiting for PostgreSQL", e)),
            }
            if postmaster_ready(&pid_file, pid) {
                return Ok(());
            }
            if started.elapsed() >= STARTUP_TIMEOUT {
                self.stop();
                return Err(ClusterError::StartupTimeout {
                    waited: started.elapsed(),
                    log_tail: self.log_tail(log_offset),
                });
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// Creates the application role and database.
    fn bootstrap(&self) -> Result<(), ClusterError> {
        let role = quote_ident(&self.role);
        let mut create_role = format!("CREATE ROLE {role} LOGIN");
        if !self.password.is_empty() {
            create_role.push_str(&format!(" PASSWORD {}", quote_literal(&self.password)));
        }
        self.psql("postgres", &create_role)?;

        let exists = self.psql(
            "postgres",
            &format!(
                "SELECT 1 FROM pg_database WHERE datname = {}",
                quote_literal(&self.database)
            ),
        )?;
        let db = quote_ident(&self.database);
        if exists.trim().is_empty() {
            self.psql("postgres", &format!("CREATE DATABASE {db} OWNER {role}"))?;
        } else {
            self.psql("postgres", &format!("ALTER DATABASE {db} OWNER TO {role}"))?;
        }
        Ok(())
    }

    /// Writes a file inside the cluster directory, readable by the server.
    fn write_file(&self, path: &Path, contents: &str) -> Result<(), ClusterError> {
        fs::write(path, contents)
            .map_err(|e| ClusterError::io(format!("writing {}", path.display()), e))?;
        fs::set_permissions(path, fs::Permissions::from_mode(0o600))
            .map_err(|e| ClusterError::io(format!("chmod {}", path.display()), e))?;
        if let Some(user) = self.run_as {
            chown(path, user)?;
        }
        Ok(())
    }

    /// The last lines the server logged since `offset`.
    fn log_tail(&self, offset: u64) -> String {
        let mut text = Vec::new();
        let read = File::open(&self.log_path).and_then(|mut f| {
            f.seek(SeekFrom::Start(offset))?;
            f.read_to_end(&mut text)
        });
        match read {
            Ok(_) => tail(&String::from_utf8_lossy(&text)),
            Err(e) => format!("(could not read {}: {e})", self.log_path.display()),
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop();
        match fs::remove_dir_all(&self.base_dir) {
            Ok(()) => debug!(dir = %self.base_dir.display(), "removed throwaway cluster"),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                warn!(dir = %self.base_dir.display(), "could not remove cluster directory: {e}")
            }
        }
    }
}

fn validate(opts: &ClusterOptions) -> Result<(), ClusterError> {
    let invalid = |msg: String| Err(ClusterError::InvalidOptions(msg));
    for (what, value) in [("role", &opts.role), ("database", &opts.database)] {
        if value.is_empty() {
            return invalid(format!("{what} name is empty"));
        }
        if value.len() > MAX_IDENT_BYTES {
            return invalid(format!(
                "{what} name {value:?} is longer than {MAX_IDENT_BYTES} bytes"
            ));
        }
        if value.contains('\0') {
            return invalid(format!("{what} name {value:?} contains a NUL byte"));
        }
    }
    if opts.role == SUPERUSER {
        return invalid(format!(
            "role name {SUPERUSER:?} is reserved for the superuser"
        ));
    }
    if opts.password.contains('\0') {
        return invalid("password contains a NUL byte".to_owned());
    }
    if opts.port == Some(0) {
        return invalid("port 0 is not valid; use None to pick a free port".to_owned());
    }
    for (name, value) in &opts.extra_conf {
        let name_ok = !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.');
        if !name_ok {
            return invalid(format!("invalid setting name {name:?} in extra_conf"));
        }
        if value.contains(['\0', '\n', '\r']) {
            return invalid(format!(
                "value of {name} in extra_conf contains a NUL or newline"
            ));
        }
    }
    Ok(())
}

/// Creates a unique 0700 directory under the system temp dir.
fn create_base_dir() -> Result<PathBuf, ClusterError> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut root = std::env::temp_dir();
    // Unix socket paths are limited to 107 bytes; the unique name plus
    // "/.s.PGSQL.65535" takes up to ~65 of them.
    if root.as_os_str().len() > 40 {
        root = PathBuf::from("/tmp");
    }
    loop {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let name = format!(
            "tollgate-pg-{}-{n}-{:x}{:08x}",
            std::process::id(),
            now.as_secs(),
            now.subsec_nanos()
        );
        let path = root.join(name);
        match DirBuilder::new().mode(0o700).create(&path) {
            Ok(()) => {
                // In case the umask stripped bits we want (it cannot add any).
                fs::set_permissions(&path, fs::Permissions::from_mode(0o700)).map_err(|e| {
                    let _ = fs::remove_dir(&path);
                    ClusterError::io(format!("chmod {}", path.display()), e)
                })?;
                return Ok(path);
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && n < 1_000_000 => continue,
            Err(e) => {
                return Err(ClusterError::io(
                    format!("creating temporary directory {}", path.display()),
                    e,
                ))
            }
        }
    }
}

fn chown(path: &Path, user: RunAs) -> Result<(), ClusterError> {
    std::os::unix::fs::chown(path, Some(user.uid), Some(user.gid)).map_err(|e| {
        ClusterError::io(
            format!("chown {} to {}:{}", path.display(), user.uid, user.gid),
            e,
        )
    })
}

fn pick_free_port() -> Result<u16, ClusterError> {
    let listener = TcpListener::bind(("127.0.0.1", 0))
        .map_err(|e| ClusterError::io("binding 127.0.0.1:0 to pick a free port", e))?;
    let port = listener
        .local_addr()
        .map_err(|e| ClusterError::io("reading local address of port probe", e))?
        .port();
    Ok(port)
}

/// Whether `postmaster.pid` belongs to `pid` and reports status `ready`.
fn postmaster_ready(pid_file: &Path, pid: u32) -> bool {
    let Ok(contents) = fs::read_to_string(pid_file) else {
        return false;
    };
    let lines: Vec<&str> = contents.lines().collect();
    // Line 1: postmaster pid; line 8: status (PostgreSQL 10+).
    lines.first().map(|l| l.trim()) == Some(pid.to_string().as_str())
        && lines.get(7).map(|l| l.trim()) == Some("ready")
}

fn is_port_in_use(log: &str) -> bool {
    log.contains("Address already in use") || log.contains("could not create any TCP/IP sockets")
}

/// Sends SIGINT (fast shutdown) via the shell's `kill` builtin, which keeps
/// this module free of `unsafe` signal calls. `pid` is our unreaped child, so
/// it cannot have been recycled.
fn send_sigint(pid: u32) -> io::Result<()> {
    let status = Command::new("/bin/sh")
        .args(["-c", "kill -INT \"$1\"", "sh"])
        .arg(pid.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()?;
    if status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!("`kill -INT {pid}` {status}")))
    }
}

/// Runs a command to completion, feeding it `stdin`, and fails with its output
/// tail unless it exits successfully.
fn run(
    mut cmd: Command,
    run_as: Option<RunAs>,
    stdin: Option<&str>,
) -> Result<Output, ClusterError> {
    let description = describe(&cmd, run_as);
    debug!(command = %description, "running");
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    if stdin.is_some() {
        cmd.stdin(Stdio::piped());
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| ClusterError::io(format!("spawning `{description}`"), e))?;
    let child_stdin = child.stdin.take();
    // Feed stdin from another thread so a chatty child cannot deadlock us.
    let output = std::thread::scope(|scope| {
        if let (Some(mut pipe), Some(input)) = (child_stdin, stdin) {
            scope.spawn(move || {
                // The child may exit early (e.g. ON_ERROR_STOP); its exit status
                // and stderr report that, so a broken pipe is not interesting.
                let _ = pipe.write_all(input.as_bytes());
            });
        }
        child.wait_with_output()
    })
    .map_err(|e| ClusterError::io(format!("waiting for `{description}`"), e))?;
    if output.status.success() {
        return Ok(output);
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    let output_tail = if stderr.trim().is_empty() {
        tail(&String::from_utf8_lossy(&output.stdout))
    } else {
        tail(&stderr)
    };
    Err(ClusterError::CommandFailed {
        command: description,
        status: output.status,
        output_tail,
    })
}

/// `program arg1 arg2 ... [as uid:gid]`, for logs and errors.
fn describe(cmd: &Command, run_as: Option<RunAs>) -> String {
    let mut text = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        text.push(' ');
        text.push_str(&arg.to_string_lossy());
    }
    if let Some(user) = run_as {
        text.push_str(&format!(" [as uid {}, gid {}]", user.uid, user.gid));
    }
    text
}

/// The last [`TAIL_LINES`] lines of `text`, at most ~8 KiB.
fn tail(text: &str) -> String {
    let trimmed = text.trim_end();
    let lines: Vec<&str> = trimmed.lines().collect();
    let mut out = lines[lines.len().saturating_sub(TAIL_LINES)..].join("\n");
    const MAX_BYTES: usize = 8192;
    if out.len() > MAX_BYTES {
        let mut start = out.len() - MAX_BYTES;
        while !out.is_char_boundary(start) {
            start += 1;
        }
        out = format!("...{}", &out[start..]);
    }
    out
}

/// `"ident"` with embedded double quotes doubled.
fn quote_ident(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

/// `'literal'` with embedded single quotes doubled (standard_conforming_strings).
fn quote_literal(literal: &str) -> String {
    format!("'{}'", literal.replace('\'', "''"))
}

/// A quoted `postgresql.conf` value (backslash escapes are interpreted there).
fn conf_value(value: &str) -> String {
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "''"))
}

/// A quoted libpq connection-string value.
fn conninfo_value(value: &str) -> String {
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "\\'"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `sql` over TCP using the libpq connection string `conninfo`.
    fn tcp_psql(cluster: &Cluster, conninfo: &str, sql: &str) -> Result<String, ClusterError> {
        let mut cmd = cluster.command(&cluster.bins.psql);
        cmd.args(["-X", "-q", "-A", "-t", "-w", "-v", "ON_ERROR_STOP=1", "-d"])
            .arg(conninfo)
            .args(["-c", sql]);
        let output = run(cmd, cluster.run_as, None)?;
        Ok(String::from_utf8_lossy(&output.stdout)
            .trim_end()
            .to_owned())
    }

    #[test]
    fn scram_cluster_starts_and_cleans_up() {
        let cluster = Cluster::start(&ClusterOptions::default()).expect("start cluster");
        assert_eq!(cluster.host(), "127.0.0.1");
        assert_ne!(cluster.port(), 0);
        assert!(cluster.data_dir().join("PG_VERSION").is_file());
        assert!(cluster
            .socket_dir()
            .join(format!(".s.PGSQL.{}", cluster.port()))
            .exists());

        let setting = cluster
            .psql("postgres", "select current_setting('password_encryption')")
            .expect("psql");
        assert_eq!(setting, "scram-sha-256");
        let role = cluster
            .psql(
                "postgres",
                "select rolname from pg_roles where rolname='app'",
            )
            .expect("psql");
        assert_eq!(role, "app");
        let owner = cluster
            .psql(
                "postgres",
                "select pg_get_userbyid(datdba) from pg_database where datname = 'appdb'",
            )
            .expect("psql");
        assert_eq!(owner, "app");
        let verifier = cluster
            .psql(
                "appdb",
                "select rolpassword from pg_authid where rolname = 'app'",
            )
            .expect("psql");
        assert!(verifier.starts_with("SCRAM-SHA-256$"), "{verifier}");

        // Multiple statements; the output of each appears in order.
        let multi = cluster
            .psql(
                "appdb",
                "create table t (x int); insert into t values (1), (2); select sum(x) from t",
            )
            .expect("psql");
        assert_eq!(multi, "3");

        // SQL errors are reported with psql's message.
        let err = cluster
            .psql("postgres", "select no_such_column from pg_class")
            .expect_err("bad SQL must fail");
        assert!(
            err.to_string().contains("no_such_column"),
            "unexpected error: {err}"
        );

        // Password authentication over TCP works, and a wrong password is refused.
        let who = tcp_psql(
            &cluster,
            &cluster.conninfo(),
            "select current_user || '@' || current_database()",
        )
        .expect("login over TCP");
        assert_eq!(who, "app@appdb");
        let wrong = cluster
            .conninfo()
            .replace("password='app-password'", "password='wrong'");
        assert_ne!(wrong, cluster.conninfo());
        let err = tcp_psql(&cluster, &wrong, "select 1").expect_err("wrong password");
        assert!(
            err.to_string().contains("password authentication failed"),
            "unexpected error: {err}"
        );

        let base = cluster.socket_dir().to_path_buf();
        let data_dir = cluster.data_dir().to_path_buf();
        drop(cluster);
        assert!(!data_dir.exists(), "{} still exists", data_dir.display());
        assert!(!base.exists(), "{} still exists", base.display());
    }

    #[test]
    fn md5_cluster_runs_alongside_scram_cluster() {
        let scram = Cluster::start(&ClusterOptions::default()).expect("start scram cluster");
        let md5_opts = ClusterOptions {
            role: "odd \"role\" name".to_owned(),
            password: "it's a \\ password".to_owned(),
            database: "odd 'db'".to_owned(),
            auth: HbaAuth::Md5,
            port: None,
            extra_conf: vec![("work_mem".to_owned(), "8MB".to_owned())],
            bin_dir: None,
            // The harness's way: started and stopped all the same.
            own_session: true,
        };
        let mut md5 = Cluster::start(&md5_opts).expect("start md5 cluster");
        assert_ne!(scram.port(), md5.port());
        assert_ne!(scram.socket_dir(), md5.socket_dir());

        assert_eq!(
            md5.psql("postgres", "select current_setting('password_encryption')")
                .expect("psql"),
            "md5"
        );
        assert_eq!(
            md5.psql("postgres", "select current_setting('work_mem')")
                .expect("psql"),
            "8MB"
        );
        assert_eq!(
            md5.psql(
                "postgres",
                "select distinct auth_method from pg_hba_file_rules where type = 'host'"
            )
            .expect("psql"),
            "md5"
        );
        let verifier = md5
            .psql(
                "odd 'db'",
                "select rolpassword from pg_authid where rolname = 'odd \"role\" name'",
            )
            .expect("psql");
        assert!(verifier.starts_with("md5"), "{verifier}");
        let who = tcp_psql(
            &md5,
            &md5.conninfo(),
            "select current_user || '@' || current_database()",
        )
        .expect("md5 login over TCP");
        assert_eq!(who, "odd \"role\" name@odd 'db'");
        let wrong = format!(
            "host=127.0.0.1 port={} user={} password=x dbname={}",
            md5.port(),
            conninfo_value(md5.role()),
            conninfo_value(md5.database())
        );
        let err = tcp_psql(&md5, &wrong, "select 1").expect_err("wrong password");
        assert!(
            err.to_string().contains("password authentication failed"),
            "unexpected error: {err}"
        );

        // The other cluster is unaffected.
        assert_eq!(
            scram
                .psql("postgres", "select current_setting('password_encryption')")
                .expect("psql"),
            "scram-sha-256"
        );

        // stop() is idempotent and leaves the directory until drop.
        md5.stop();
        md5.stop();
        assert!(md5.data_dir().exists());
        assert!(md5.psql("postgres", "select 1").is_err());
        let md5_base = md5.socket_dir().to_path_buf();
        drop(md5);
        assert!(!md5_base.exists());
        assert_eq!(scram.psql("postgres", "select 1").expect("psql"), "1");
    }

    #[test]
    fn taken_port_is_reported() {
        let listener = TcpListener::bind(("127.0.0.1", 0)).expect("bind");
        let port = listener.local_addr().expect("local_addr").port();
        let opts = ClusterOptions {
            port: Some(port),
            ..ClusterOptions::default()
        };
        match Cluster::start(&opts) {
            Err(ClusterError::PortInUse { port: p, log_tail }) => {
                assert_eq!(p, port);
                assert!(log_tail.contains("Address already in use"), "{log_tail}");
            }
            other => panic!("expected PortInUse, got {other:?}"),
        }
    }

    #[test]
    fn missing_binary_error_is_helpful() {
        let err = find_pg_bin("tollgate-no-such-pg-program").expect_err("must not exist");
        let msg = err.to_string();
        assert!(msg.contains("apt-get install postgresql"), "{msg}");
        assert!(msg.contains("$PATH"), "{msg}");
        assert!(find_pg_bin("initdb").is_ok());
    }

    #[test]
    fn invalid_options_are_rejected_before_doing_anything() {
        let opts = ClusterOptions {
            role: SUPERUSER.to_owned(),
            ..ClusterOptions::default()
        };
        assert!(matches!(
            Cluster::start(&opts),
            Err(ClusterError::InvalidOptions(_))
        ));
    }

    #[test]
    fn quoting() {
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote_literal("it's"), "'it''s'");
        assert_eq!(conf_value("a'b\\c"), "'a''b\\\\c'");
        assert_eq!(conninfo_value("a'b\\c"), "'a\\'b\\\\c'");
        assert_eq!(
            version_key(OsStr::new("9.6")).cmp(&version_key(OsStr::new("15"))),
            std::cmp::Ordering::Less
        );
    }
}
