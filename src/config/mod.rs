//! Configuration: raw serde structs that mirror the TOML file
//! (`deny_unknown_fields`, so a typo is an error, not a silent default), then
//! one validation step into an immutable, typed [`Config`].
#![forbid(unsafe_code)]

mod auth_methods;
pub mod pgurl;
mod pool;

pub use auth_methods::AuthMethods;
pub use pool::{PoolConfig, PoolMode};

use std::collections::HashMap;
use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::secret::Secret;
use crate::toml_error;

/// PostgreSQL's own default for `authentication_timeout` is 60 s; a proxy
/// that holds a socket per pending login wants a tighter bound.
pub const DEFAULT_STARTUP_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Failed authentications a source may have per window before it is
/// refused outright for the rest of the window.
pub const DEFAULT_AUTH_FAILURE_LIMIT: u32 = 100;
pub const DEFAULT_AUTH_FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// Connections one source may have between accept and login at once.
/// Generous: a pool warming up opens many at once, and each holds its slot
/// only for the few milliseconds of a login.
pub const DEFAULT_MAX_PENDING_PER_SOURCE: u32 = 256;
/// Silence after which TCP keepalive probes a peer (both sides).
pub const DEFAULT_TCP_KEEPALIVE: Duration = Duration::from_secs(60);
/// How long SIGTERM lets open sessions finish before ending them.
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// Per-direction relay buffer. Big enough that a typical OLTP exchange is one
/// read and one write; small enough that 10 000 sessions fit in 320 MiB.
pub const DEFAULT_BUFFER_SIZE: usize = 16 * 1024;
const MIN_BUFFER_SIZE: usize = 1024;
const MAX_BUFFER_SIZE: usize = 16 * 1024 * 1024;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    listen: String,
    listen_tcp: Option<bool>,
    unix_socket_dir: Option<String>,
    unix_socket_permissions: Option<u32>,
    #[serde(default)]
    workers: usize,
    pin_cpus: Option<bool>,
    io_driver: Option<String>,
    plain_relay: Option<String>,
    startup_timeout: Option<String>,
    shutdown_timeout: Option<String>,
    tcp_keepalive: Option<String>,
    auth_failure_limit: Option<u32>,
    max_pending_per_source: Option<u32>,
    auth_failure_window: Option<String>,
    max_connections: Option<usize>,
    buffer_size: Option<usize>,
    proxy_protocol: Option<bool>,
    #[serde(default)]
    proxy_trusted: Vec<String>,
    upstream: RawUpstreams,
    tokens: RawTokens,
    fleet: Option<RawFleet>,
    #[serde(default)]
    log: RawLog,
    tls: Option<RawTls>,
    jwt: Option<crate::auth::jwt::JwtConfigRaw>,
    admin: Option<RawAdmin>,
    #[serde(default)]
    audit: RawAudit,
    pool: Option<pool::RawPool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    listen: String,
    token: Option<String>,
    token_file: Option<String>,
    token_env: Option<String>,
    latency_histograms: Option<bool>,
    per_token_metrics: Option<bool>,
    max_token_series: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAudit {
    queries: Option<bool>,
    max_query_length: Option<usize>,
    tag_application_name: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert: String,
    key: String,
    #[serde(default)]
    mode: ClientTlsMode,
}

/// Whether clients may (or must) use TLS.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientTlsMode {
    /// No TLS: SSLRequest is answered 'N'.
    Disable,
    /// TLS offered; plaintext only from loopback (a token never crosses a
    /// network in the clear).
    #[default]
    Allow,
    /// TLS required from everywhere.
    Require,
}

/// `[upstream]` (one server) or `[[upstream]]` (several, routed by
/// database). Deserialized by hand: an untagged enum would buffer the
/// input and turn a mistake inside into "matches no variant", losing the
/// field name and line.
#[derive(Debug)]
enum RawUpstreams {
    One(Box<RawUpstream>),
    Many(Vec<RawUpstream>),
}

impl<'de> Deserialize<'de> for RawUpstreams {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Either;
        impl<'de> serde::de::Visitor<'de> for Either {
            type Value = RawUpstreams;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an [upstream] table or [[upstream]] entries")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<RawUpstreams, A::Error> {
                RawUpstream::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(|u| RawUpstreams::One(Box::new(u)))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                seq: A,
            ) -> Result<RawUpstreams, A::Error> {
                Vec::<RawUpstream>::deserialize(serde::de::value::SeqAccessDeserializer::new(seq))
                    .map(RawUpstreams::Many)
            }
        }
        d.deserialize_any(Either)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    name: Option<String>,
    databases: Option<Vec<String>>,
    host: String,
    #[serde(default = "default_pg_port")]
    port: u16,
    connect_timeout: Option<String>,
    #[serde(default)]
    credentials: Vec<RawCredential>,
    tls: Option<crate::tls::UpstreamTlsMode>,
    ca_file: Option<String>,
    cert_file: Option<String>,
    key_file: Option<String>,
    require_auth: Option<String>,
    pool: Option<pool::RawPool>,
}

fn default_pg_port() -> u16 {
    5432
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCredential {
    user: String,
    password: Option<String>,
    password_file: Option<String>,
    password_env: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTokens {
    file: Option<String>,
    postgres: Option<String>,
    password: Option<String>,
    password_file: Option<String>,
    password_env: Option<String>,
    ca_file: Option<String>,
    max_staleness: Option<String>,
    #[serde(default)]
    on_expiry: crate::auth::OnExpiry,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFleet {
    cancel_key: Option<String>,
    cancel_key_file: Option<String>,
    cancel_key_env: Option<String>,
    advertise: Option<String>,
    advertise_env: Option<String>,
    instance_id: Option<u8>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    level: Option<String>,
    format: Option<LogFormat>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    /// Whether `listen` is bound. Without it, clients come only through
    /// the Unix-domain socket, whose name takes `listen`'s port.
    pub listen_tcp: bool,
    /// The Unix-domain socket listener, beside (or instead of) TCP.
    pub unix_socket: Option<UnixSocketConfig>,
    /// Number of shards; already resolved from 0 to the CPU count.
    pub workers: usize,
    /// Pin each shard to one CPU (default). On a machine where the proxy
    /// shares few cores with busy neighbours, letting the scheduler move
    /// shards can cut tail latency; measure both.
    pub pin_cpus: bool,
    /// What the shards run on (`io_driver`): io_uring where the kernel
    /// has it, or epoll.
    pub io_driver: IoDriver,
    /// How the relay moves bytes between plain sockets (`plain_relay`).
    pub plain_relay: PlainRelay,
    pub startup_timeout: Duration,
    /// On SIGTERM: how long open sessions may go on before they are ended.
    pub shutdown_timeout: Duration,
    /// Silence after which TCP keepalive probes a client.
    pub tcp_keepalive: Duration,
    /// Failed authentications per source (IPv4 address, IPv6 /64) within
    /// `auth_failure_window`, beyond which the source is refused; 0 turns
    /// the limit off (for clients that all arrive through one proxy
    /// address, until PROXY protocol support).
    pub auth_failure_limit: u32,
    /// Start-ups in progress per source (0 = no limit).
    pub max_pending_per_source: u32,
    pub auth_failure_window: Duration,
    pub max_connections: usize,
    pub buffer_size: usize,
    /// PROXY protocol headers are read from `proxy_trusted` peers.
    pub proxy_protocol: bool,
    pub proxy_trusted: Vec<crate::auth::cidr::Cidr>,
    /// The servers, in the order routing tries them (at least one).
    pub upstreams: Vec<UpstreamConfig>,
    pub tokens: TokenSource,
    /// Cross-instance cancel routing, when several instances share a
    /// control database.
    pub fleet: Option<FleetConfig>,
    /// What expiry does to open sessions, unless a token says otherwise.
    pub on_expiry: crate::auth::OnExpiry,
    pub log_level: Option<String>,
    pub log_format: LogFormat,
    /// Client-facing TLS; `None` when not configured or disabled.
    pub tls: Option<ClientTlsConfig>,
    /// JWT verification, when configured.
    pub jwt: Option<crate::auth::jwt::JwtVerifier>,
    /// The admin listener, when configured.
    pub admin: Option<AdminConfig>,
    pub audit: AuditConfig,
}

/// The admin listener (`[admin]`).
#[derive(Debug, Clone)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    /// Bearer token for `/sessions`; required unless `listen` is loopback.
    pub token: Option<Secret>,
    /// Time every query cycle and transaction into histograms (default on).
    pub latency_histograms: bool,
    /// Latency series per token, at most this many tokens (the rest share
    /// one `_other` series); `None` when off (default).
    pub per_token_series: Option<usize>,
}

/// Default and ceiling for `[admin] max_token_series`: each series costs
/// two histograms per shard (about 44 KiB) and a scrape's size.
pub const DEFAULT_TOKEN_SERIES: usize = 100;
const MAX_TOKEN_SERIES: usize = 10_000;

/// Attribution and query audit (`[audit]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditConfig {
    /// Log the SQL of every Query and Parse message (never Bind values).
    pub queries: bool,
    /// Bytes of SQL kept per message; longer text is cut and marked.
    pub max_query_length: usize,
    /// Suffix the application_name sent upstream with the token id and the
    /// client's address, for `pg_stat_activity`. Off by default: the client
    /// then sees the application_name it set, as on a direct connection,
    /// and the audit log and `/sessions` name each session's backend pid.
    pub tag_application_name: bool,
}

pub const DEFAULT_MAX_QUERY_LENGTH: usize = 1024;
const MAX_QUERY_LENGTH_CEILING: usize = 1024 * 1024;

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            queries: false,
            max_query_length: DEFAULT_MAX_QUERY_LENGTH,
            tag_application_name: false,
        }
    }
}

#[derive(Debug, Clone)]
pub struct ClientTlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub mode: ClientTlsMode,
}

/// Where tokens live.
#[derive(Debug, Clone, PartialEq)]
pub enum TokenSource {
    File(PathBuf),
    Postgres(ControlDb),
}

/// The control database (`[tokens] postgres`).
#[derive(Clone, PartialEq)]
pub struct ControlDb {
    /// The connection URL or key=value string; may hold a password, so it is
    /// never logged (see [`ControlDb::describe`]).
    pub url: Secret,
    pub password: Option<Secret>,
    pub ca_file: Option<PathBuf>,
    /// libpq's sslmode from the URL (tokio-postgres itself knows only
    /// disable, prefer and require, so verify-ca and verify-full are read
    /// here and the URL is given `require`); `require` with a `ca_file`
    /// verifies as verify-full does.
    pub tls: crate::tls::UpstreamTlsMode,
    /// Past this long without the control database, logins are refused.
    pub max_staleness: Option<Duration>,
}

impl ControlDb {
    /// host:port/dbname for logs, without user or password.
    pub fn describe(&self) -> String {
        match String::from_utf8_lossy(self.url.expose()).parse::<tokio_postgres::Config>() {
            Ok(c) => {
                let host = c
                    .get_hosts()
                    .first()
                    .map(|h| match h {
                        tokio_postgres::config::Host::Tcp(h) => h.clone(),
                        tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
                    })
                    .unwrap_or_default();
                let port = c.get_ports().first().copied().unwrap_or(5432);
                format!("{host}:{port}/{}", c.get_dbname().unwrap_or(""))
            }
            Err(_) => "(unparsable)".into(),
        }
    }
}

impl fmt::Debug for ControlDb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ControlDb")
            .field("at", &self.describe())
            .field("ca_file", &self.ca_file)
            .field("max_staleness", &self.max_staleness)
            .finish_non_exhaustive()
    }
}

/// `[fleet]`: how instances behind one load balancer forward cancels.
#[derive(Clone, PartialEq)]
pub struct FleetConfig {
    /// Shared by every instance; keys the tag in issued cancel keys.
    pub cancel_key: Secret,
    /// host:port where peers reach this instance's listener.
    pub advertise: String,
    /// Fixed instance id; `None` claims a free one in the control database.
    pub instance_id: Option<u8>,
}

impl fmt::Debug for FleetConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FleetConfig")
            .field("advertise", &self.advertise)
            .field("instance_id", &self.instance_id)
            .finish_non_exhaustive()
    }
}

/// The shortest shared cancel key accepted.
pub const MIN_CANCEL_KEY_LEN: usize = 32;

#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// Names the entry for token rules and logs ("default" for a single
    /// `[upstream]`).
    pub name: String,
    /// Databases routed here; `*` matches any.
    pub databases: Vec<String>,
    /// The name as configured: used for TLS server-name checks.
    pub host: String,
    pub port: u16,
    /// `host` resolved once, at load: a lookup per connection would block
    /// the shard. Tried in order, as libpq does. Empty with `socket`.
    pub addrs: Vec<SocketAddr>,
    /// With a `host` that is a path (as in libpq): the server's
    /// Unix-domain socket, `<host>/.s.PGSQL.<port>`. TLS is never used
    /// over it.
    pub socket: Option<PathBuf>,
    pub connect_timeout: Duration,
    /// Silence after which TCP keepalive probes the server (the top-level
    /// `tcp_keepalive`).
    pub keepalive: Duration,
    /// Password per role. A role listed without a password logs in with
    /// none (trust); a role not listed cannot log in.
    pub credentials: HashMap<String, Option<Secret>>,
    /// libpq-style sslmode for the upstream connection (default prefer).
    pub tls: crate::tls::UpstreamTlsMode,
    pub ca_file: Option<PathBuf>,
    /// Client certificate and key, for servers that use `cert` auth.
    pub client_cert: Option<(PathBuf, PathBuf)>,
    /// Authentication requests answered (libpq's `require_auth`).
    pub require_auth: AuthMethods,
    /// How server connections to it are kept (`[pool]`, overridden here).
    pub pool: PoolConfig,
}

/// `io_driver`: `"auto"` (the default) runs the shards on io_uring where
/// the kernel offers it and on epoll elsewhere; `"epoll"` always on epoll
/// (a kernel whose io_uring misbehaves, or to compare).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoDriver {
    Auto,
    Epoll,
}

impl IoDriver {
    fn parse(raw: Option<&str>) -> Result<IoDriver, String> {
        match raw {
            None | Some("auto") => Ok(IoDriver::Auto),
            Some("epoll") => Ok(IoDriver::Epoll),
            Some(other) => Err(format!(
                "io_driver: {other:?} is neither \"auto\" nor \"epoll\""
            )),
        }
    }
}

/// `plain_relay`: how sessions without TLS relay bytes on an io_uring
/// shard. `"completion"` (the default) posts receives to the shard's relay
/// ring that take a buffer only when data arrives, and sends from that
/// buffer ([`crate::net::ring`]); `"readiness"` waits for a socket to be
/// readable holding no buffer, then reads and writes it with syscalls of
/// its own. On epoll both mean readiness.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlainRelay {
    Readiness,
    Completion,
}

impl PlainRelay {
    fn parse(raw: Option<&str>) -> Result<PlainRelay, String> {
        match raw {
            Some("readiness") => Ok(PlainRelay::Readiness),
            None | Some("completion") => Ok(PlainRelay::Completion),
            Some(other) => Err(format!(
                "plain_relay: {other:?} is neither \"readiness\" nor \"completion\""
            )),
        }
    }
}

/// `unix_socket_dir`: a listener on `<dir>/.s.PGSQL.<port of listen>`, as
/// PostgreSQL names its own, so that libpq's `host=<dir>` finds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnixSocketConfig {
    pub dir: PathBuf,
    /// File mode of the socket (`unix_socket_permissions`, default 0o777
    /// as in PostgreSQL: the directory's own mode and the token guard it).
    pub mode: u32,
}

/// A configuration problem, with enough context to fix it.
#[derive(Debug)]
pub struct ConfigError {
    pub path: PathBuf,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path.display(), self.message)
    }
}

impl std::error::Error for ConfigError {}

/// Parses `30s`, `10m`, `1h`, `30d` (and combinations such as `1h 30m`).
/// A duration setting that must be more than zero; `default` when unset.
fn positive_duration(
    field: &str,
    v: Option<String>,
    default: Duration,
) -> Result<Duration, String> {
    match v {
        None => Ok(default),
        Some(s) => parse_duration(&s)
            .and_then(|d| {
                if d.is_zero() {
                    Err("must be more than zero".into())
                } else {
                    Ok(d)
                }
            })
            .map_err(|e| format!("{field}: {e}")),
    }
}

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim())
        .map_err(|e| format!("\"{s}\" is not a duration like 30s, 10m, 1h or 30d ({e})"))
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let err = |message: String| ConfigError {
            path: path.to_owned(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(format!("cannot read: {e}")))?;
        let raw: RawConfig =
            toml::from_str(&text).map_err(|e| err(toml_error::describe(&e, &text)))?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::from_raw(raw, base).map_err(err)
    }

    /// Only `[tokens]`, for `tollgate token ...`: an operator's shell need
    /// not have the upstream passwords, the admin token or the fleet's
    /// advertise variable that serving needs.
    pub fn load_tokens(path: &Path) -> Result<TokenSource, ConfigError> {
        let err = |message: String| ConfigError {
            path: path.to_owned(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(format!("cannot read: {e}")))?;
        let mut table: toml::Table =
            toml::from_str(&text).map_err(|e| err(toml_error::describe(&e, &text)))?;
        let tokens: RawTokens = table
            .remove("tokens")
            .ok_or_else(|| err("[tokens] is missing".into()))?
            .try_into()
            .map_err(|e: toml::de::Error| {
                err(format!(
                    "[tokens]: {}",
                    toml_error::hide_values(e.message())
                ))
            })?;
        let base = path.parent().unwrap_or(Path::new("."));
        token_source(&tokens, base).map_err(err)
    }

    fn from_raw(raw: RawConfig, base: &Path) -> Result<Config, String> {
        let listen = raw
            .listen
            .to_socket_addrs()
            .map_err(|e| format!("listen = \"{}\": {e}", raw.listen))?
            .next()
            .ok_or_else(|| format!("listen = \"{}\" resolves to no address", raw.listen))?;
        let workers = match raw.workers {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n if n > 1024 => return Err(format!("workers = {n} is more than 1024")),
            n => n,
        };
        let duration = positive_duration;
        let buffer_size = raw.buffer_size.unwrap_or(DEFAULT_BUFFER_SIZE);
        if !(MIN_BUFFER_SIZE..=MAX_BUFFER_SIZE).contains(&buffer_size) {
            return Err(format!(
                "buffer_size = {buffer_size} must be between {MIN_BUFFER_SIZE} and {MAX_BUFFER_SIZE}"
            ));
        }
        let max_connections = raw.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS);
        if max_connections == 0 {
            return Err("max_connections must be at least 1".into());
        }
        if let Some(level) = &raw.log.level {
            // Checked here so that a reload with a bad level fails whole.
            tracing_subscriber::EnvFilter::try_new(level)
                .map_err(|e| format!("[log] level: {e}"))?;
        }
        let tls = match raw.tls {
            Some(t) if t.mode != ClientTlsMode::Disable => Some(ClientTlsConfig {
                cert: base.join(t.cert),
                key: base.join(t.key),
                mode: t.mode,
            }),
            _ => None,
        };
        let jwt = raw
            .jwt
            .map(|j| crate::auth::jwt::JwtVerifier::from_raw(j, base))
            .transpose()
            .map_err(|e| e.to_string())?;
        let admin = raw.admin.map(|a| admin_config(a, base)).transpose()?;
        let audit = AuditConfig {
            queries: raw.audit.queries.unwrap_or(false),
            max_query_length: raw
                .audit
                .max_query_length
                .unwrap_or(DEFAULT_MAX_QUERY_LENGTH),
            tag_application_name: raw.audit.tag_application_name.unwrap_or(false),
        };
        if !(1..=MAX_QUERY_LENGTH_CEILING).contains(&audit.max_query_length) {
            return Err(format!(
                "[audit] max_query_length = {} must be between 1 and {MAX_QUERY_LENGTH_CEILING}",
                audit.max_query_length
            ));
        }
        let tcp_keepalive = duration("tcp_keepalive", raw.tcp_keepalive, DEFAULT_TCP_KEEPALIVE)?;
        let listen_tcp = raw.listen_tcp.unwrap_or(true);
        let unix_socket = unix_socket_config(
            raw.unix_socket_dir.as_deref(),
            raw.unix_socket_permissions,
            base,
        )?;
        if !listen_tcp && raw.fleet.is_some() {
            // The other instances forward cancels to `listen` over TCP.
            return Err(
                "listen_tcp = false cannot go with [fleet]: instances forward cancels \
                        to each other's TCP listener"
                    .into(),
            );
        }
        if !listen_tcp && (unix_socket.is_none() || listen.port() == 0) {
            return Err(
                "listen_tcp = false needs unix_socket_dir, and a port in listen to name the \
                 socket"
                    .into(),
            );
        }
        let auth_failure_limit = raw.auth_failure_limit.unwrap_or(DEFAULT_AUTH_FAILURE_LIMIT);
        let (single, raws) = match raw.upstream {
            RawUpstreams::One(u) => (true, vec![*u]),
            RawUpstreams::Many(v) => (false, v),
        };
        if raws.is_empty() {
            return Err("[[upstream]]: list at least one server".into());
        }
        let pool = PoolConfig::resolve(&PoolConfig::default(), raw.pool, "[pool]")?;
        let mut upstreams: Vec<UpstreamConfig> = Vec::with_capacity(raws.len());
        for (i, u) in raws.into_iter().enumerate() {
            let u = upstream_config(u, i, single, base, tcp_keepalive, &pool)?;
            if upstreams.iter().any(|o| o.name == u.name) {
                return Err(format!("[[upstream]] name \"{}\" appears twice", u.name));
            }
            upstreams.push(u);
        }
        let proxy_protocol = raw.proxy_protocol.unwrap_or(false);
        let proxy_trusted = raw
            .proxy_trusted
            .iter()
            .map(|c| {
                c.parse::<crate::auth::cidr::Cidr>()
                    .map_err(|e| format!("proxy_trusted: {e}"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if proxy_protocol && proxy_trusted.is_empty() {
            return Err(
                "proxy_protocol = true needs proxy_trusted: the load balancers' networks, \
                 the only peers whose PROXY headers are believed"
                    .into(),
            );
        }
        let tokens = token_source(&raw.tokens, base)?;
        let fleet = raw
            .fleet
            .map(|f| fleet_config(f, listen, base))
            .transpose()?;
        if fleet.is_some() && !matches!(tokens, TokenSource::Postgres(_)) {
            return Err(
                "[fleet] needs [tokens] postgres: instances find each other through the \
                 control database"
                    .into(),
            );
        }
        Ok(Config {
            auth_failure_limit,
            max_pending_per_source: raw
                .max_pending_per_source
                .unwrap_or(DEFAULT_MAX_PENDING_PER_SOURCE),
            auth_failure_window: duration(
                "auth_failure_window",
                raw.auth_failure_window,
                DEFAULT_AUTH_FAILURE_WINDOW,
            )?,
            tcp_keepalive,
            admin,
            audit,
            jwt,
            tls,
            listen,
            listen_tcp,
            unix_socket,
            workers,
            pin_cpus: raw.pin_cpus.unwrap_or(true),
            io_driver: IoDriver::parse(raw.io_driver.as_deref())?,
            plain_relay: PlainRelay::parse(raw.plain_relay.as_deref())?,
            shutdown_timeout: duration(
                "shutdown_timeout",
                raw.shutdown_timeout,
                DEFAULT_SHUTDOWN_TIMEOUT,
            )?,
            startup_timeout: duration(
                "startup_timeout",
                raw.startup_timeout,
                DEFAULT_STARTUP_TIMEOUT,
            )?,
            max_connections,
            buffer_size,
            upstreams,
            proxy_protocol,
            proxy_trusted,
            tokens,
            fleet,
            on_expiry: raw.tokens.on_expiry,
            log_level: raw.log.level,
            log_format: raw.log.format.unwrap_or_default(),
        })
    }
}

fn upstream_config(
    u: RawUpstream,
    index: usize,
    single: bool,
    base: &Path,
    keepalive: Duration,
    pool: &PoolConfig,
) -> Result<UpstreamConfig, String> {
    let name = match (u.name, single) {
        (Some(n), _) => n,
        (None, true) => "default".to_owned(),
        (None, false) => return Err(format!("[[upstream]] entry {} has no name", index + 1)),
    };
    let at = if single {
        "[upstream]".to_owned()
    } else {
        format!("[[upstream]] \"{name}\"")
    };
    if name.is_empty() || name.len() > 63 || name.chars().any(|c| c.is_control()) {
        return Err(format!("{at}: name must be 1 to 63 printable characters"));
    }
    let databases = u.databases.unwrap_or_else(|| vec!["*".to_owned()]);
    if databases.is_empty() || databases.iter().any(|d| d.is_empty()) {
        return Err(format!("{at}: databases must list names, or \"*\" for any"));
    }
    if u.host.is_empty() {
        return Err(format!("{at}: host is empty"));
    }
    let (addrs, socket, tls) = upstream_endpoint(&u.host, u.port, u.tls, &at)?;
    let mut credentials = HashMap::new();
    for c in u.credentials {
        let password = read_password(&c, base)?;
        if credentials.insert(c.user.clone(), password).is_some() {
            return Err(format!("{at}: credentials list user \"{}\" twice", c.user));
        }
    }
    let client_cert = match (u.cert_file, u.key_file) {
        (None, None) => None,
        (Some(c), Some(k)) => Some((base.join(c), base.join(k))),
        _ => return Err(format!("{at}: cert_file and key_file go together")),
    };
    let pool = PoolConfig::resolve(pool, u.pool, &format!("{at} pool"))?;
    let connect_timeout = positive_duration(
        &format!("{at} connect_timeout"),
        u.connect_timeout,
        DEFAULT_CONNECT_TIMEOUT,
    )?;
    Ok(UpstreamConfig {
        name,
        databases,
        host: u.host,
        port: u.port,
        addrs,
        socket,
        connect_timeout,
        keepalive,
        credentials,
        tls,
        ca_file: u.ca_file.map(|f| base.join(f)),
        client_cert,
        require_auth: match &u.require_auth {
            None => AuthMethods::ANY,
            Some(list) => {
                AuthMethods::parse(list).map_err(|e| format!("{at} require_auth: {e}"))?
            }
        },
        pool,
    })
}

impl UpstreamConfig {
    pub fn serves(&self, database: &str) -> bool {
        self.databases.iter().any(|d| d == "*" || d == database)
    }
}

impl Config {
    /// The upstream a session for `database` goes to: the first entry that
    /// serves the database and that `allowed` (the token's list; empty:
    /// any) names. `Err(true)` when some entry serves the database but the
    /// token may reach none of them; `Err(false)` when none serves it.
    pub fn route(&self, database: &str, allowed: &[String]) -> Result<usize, bool> {
        let mut served = false;
        for (i, u) in self.upstreams.iter().enumerate() {
            if u.serves(database) {
                served = true;
                if allowed.is_empty() || allowed.iter().any(|a| a == &u.name) {
                    return Ok(i);
                }
            }
        }
        Err(served)
    }

    /// The token file, when tokens live in one.
    pub fn tokens_file(&self) -> Option<&Path> {
        match &self.tokens {
            TokenSource::File(p) => Some(p),
            TokenSource::Postgres(_) => None,
        }
    }
}

fn token_source(t: &RawTokens, base: &Path) -> Result<TokenSource, String> {
    match (&t.file, &t.postgres) {
        (Some(f), None) => {
            if t.password.is_some()
                || t.password_file.is_some()
                || t.password_env.is_some()
                || t.ca_file.is_some()
                || t.max_staleness.is_some()
            {
                return Err(
                    "[tokens] password, ca_file and max_staleness go with postgres, not file"
                        .into(),
                );
            }
            Ok(TokenSource::File(base.join(f)))
        }
        (None, Some(url)) => {
            use crate::tls::UpstreamTlsMode as Mode;
            let mut url = url.clone();
            let mut mode = None;
            for (word, m) in [
                ("verify-full", Mode::VerifyFull),
                ("verify-ca", Mode::VerifyCa),
            ] {
                let given = format!("sslmode={word}");
                if url.contains(&given) {
                    url = url.replace(&given, "sslmode=require");
                    mode = Some(m);
                }
            }
            let parsed = url
                .parse::<tokio_postgres::Config>()
                .map_err(|_| "[tokens] postgres is not a valid connection URL".to_owned())?;
            let ca_file = t.ca_file.as_ref().map(|f| base.join(f));
            let tls = match (mode, parsed.get_ssl_mode(), &ca_file) {
                (Some(m), _, None) => {
                    return Err(format!(
                        "[tokens] postgres: sslmode={} needs ca_file",
                        m.as_str()
                    ))
                }
                (Some(m), _, Some(_)) => m,
                (None, tokio_postgres::config::SslMode::Disable, _) => Mode::Disable,
                (None, tokio_postgres::config::SslMode::Prefer, None) => Mode::Prefer,
                (None, _, Some(_)) => Mode::VerifyFull,
                (None, _, None) => Mode::Require,
            };
            if parsed.get_hosts().is_empty() {
                return Err("[tokens] postgres names no host".into());
            }
            let password = read_secret(
                "[tokens] password",
                &t.password,
                &t.password_file,
                &t.password_env,
                base,
            )?;
            let max_staleness = t
                .max_staleness
                .as_deref()
                .map(parse_duration)
                .transpose()
                .map_err(|e| format!("[tokens] max_staleness: {e}"))?;
            Ok(TokenSource::Postgres(ControlDb {
                url: Secret::new(url.into_bytes()),
                password,
                ca_file,
                tls,
                max_staleness,
            }))
        }
        _ => Err("[tokens]: set either file or postgres".into()),
    }
}

fn fleet_config(f: RawFleet, listen: SocketAddr, base: &Path) -> Result<FleetConfig, String> {
    let cancel_key = read_secret(
        "[fleet] cancel_key",
        &f.cancel_key,
        &f.cancel_key_file,
        &f.cancel_key_env,
        base,
    )?
    .ok_or(
        "[fleet] needs cancel_key, cancel_key_file or cancel_key_env (the same on every instance)",
    )?;
    if cancel_key.expose().len() < MIN_CANCEL_KEY_LEN {
        return Err(format!(
            "[fleet] cancel_key: use at least {MIN_CANCEL_KEY_LEN} characters"
        ));
    }
    let advertise = match (f.advertise, f.advertise_env) {
        (Some(a), None) => a,
        (None, Some(var)) => {
            let v = std::env::var(&var)
                .map_err(|_| format!("[fleet] advertise_env: {var} is not set"))?;
            with_port(v.trim(), listen.port())
        }
        (None, None) if !listen.ip().is_unspecified() => listen.to_string(),
        (None, None) => {
            return Err(format!(
                "[fleet]: listen = \"{listen}\" is not an address the other instances can \
                 reach; set advertise or advertise_env"
            ))
        }
        _ => return Err("[fleet]: give advertise or advertise_env, not both".into()),
    };
    if f.instance_id == Some(0) {
        return Err("[fleet] instance_id must be between 1 and 255".into());
    }
    Ok(FleetConfig {
        cancel_key,
        advertise,
        instance_id: f.instance_id,
    })
}

fn unix_socket_config(
    dir: Option<&str>,
    mode: Option<u32>,
    base: &Path,
) -> Result<Option<UnixSocketConfig>, String> {
    let Some(dir) = dir else {
        if mode.is_some() {
            return Err("unix_socket_permissions is set without unix_socket_dir".into());
        }
        return Ok(None);
    };
    if dir.is_empty() {
        return Err("unix_socket_dir is empty".into());
    }
    let mode = mode.unwrap_or(0o777);
    if mode > 0o777 {
        return Err(format!(
            "unix_socket_permissions = {mode:#o} is not a file mode (0o000 to 0o777)"
        ));
    }
    Ok(Some(UnixSocketConfig {
        dir: base.join(dir),
        mode,
    }))
}

/// Where an upstream is reached: its addresses, or, with a `host` that is
/// an absolute path (libpq's rule), its Unix-domain socket, where TLS is
/// not used (`prefer` means none there, and `require` or stricter is a
/// mistake worth stopping for).
fn upstream_endpoint(
    host: &str,
    port: u16,
    tls: Option<crate::tls::UpstreamTlsMode>,
    at: &str,
) -> Result<
    (
        Vec<SocketAddr>,
        Option<PathBuf>,
        crate::tls::UpstreamTlsMode,
    ),
    String,
> {
    use crate::tls::UpstreamTlsMode as Mode;
    let tls = tls.unwrap_or(Mode::Prefer);
    if !host.starts_with('/') {
        let addrs = (host, port)
            .to_socket_addrs()
            .map_err(|e| format!("{at}: host \"{host}\": {e}"))?
            .collect();
        return Ok((addrs, None, tls));
    }
    if !matches!(tls, Mode::Disable | Mode::Prefer) {
        return Err(format!(
            "{at}: host \"{}\" is a Unix-domain socket directory, where TLS is not used; \
             tls = \"{}\" cannot be met (use \"disable\" or \"prefer\")",
            host,
            tls.as_str()
        ));
    }
    let socket = crate::net::unix_socket::socket_path(Path::new(host), port);
    Ok((Vec::new(), Some(socket), Mode::Disable))
}

/// `host` or `host:port` (IPv6 bare or bracketed) with `port` added when
/// missing.
fn with_port(host: &str, port: u16) -> String {
    if host.parse::<SocketAddr>().is_ok() {
        return host.to_owned();
    }
    if let Ok(ip) = host.parse::<std::net::IpAddr>() {
        return SocketAddr::new(ip, port).to_string();
    }
    if host.contains(':') {
        return host.to_owned();
    }
    format!("{host}:{port}")
}

fn admin_config(a: RawAdmin, base: &Path) -> Result<AdminConfig, String> {
    let listen = a
        .listen
        .to_socket_addrs()
        .map_err(|e| format!("[admin] listen = \"{}\": {e}", a.listen))?
        .next()
        .ok_or_else(|| format!("[admin] listen = \"{}\" resolves to no address", a.listen))?;
    let token = read_secret("[admin] token", &a.token, &a.token_file, &a.token_env, base)?;
    if token.is_none() && !listen.ip().is_loopback() {
        return Err(format!(
            "[admin] listen = \"{listen}\" is not loopback: set token, token_file or token_env \
             so that /sessions needs a bearer token"
        ));
    }
    if token.as_ref().is_some_and(|t| t.expose().len() < 16) {
        return Err("[admin] token: use at least 16 characters".into());
    }
    let per_token_series = match a.per_token_metrics.unwrap_or(false) {
        false => None,
        true => {
            let max = a.max_token_series.unwrap_or(DEFAULT_TOKEN_SERIES);
            if !(1..=MAX_TOKEN_SERIES).contains(&max) {
                return Err(format!(
                    "[admin] max_token_series = {max} must be between 1 and {MAX_TOKEN_SERIES}"
                ));
            }
            Some(max)
        }
    };
    Ok(AdminConfig {
        listen,
        token,
        latency_histograms: a.latency_histograms.unwrap_or(true),
        per_token_series,
    })
}

/// Reads a credential's password from exactly one of its three sources.
fn read_password(c: &RawCredential, base: &Path) -> Result<Option<Secret>, String> {
    let who = format!("[upstream] credentials of user \"{}\"", c.user);
    read_secret(&who, &c.password, &c.password_file, &c.password_env, base)
}

/// Reads a secret given inline, in a file, or in an environment variable
/// (at most one of them).
fn read_secret(
    who: &str,
    inline: &Option<String>,
    file: &Option<String>,
    env: &Option<String>,
    base: &Path,
) -> Result<Option<Secret>, String> {
    match (inline, file, env) {
        (None, None, None) => Ok(None),
        (Some(p), None, None) => Ok(Some(Secret::new(p.as_bytes().to_vec()))),
        (None, Some(f), None) => {
            let path = base.join(f);
            let text = std::fs::read_to_string(&path)
                .map_err(|e| format!("{who}: file {}: {e}", path.display()))?;
            // Files usually end with a newline that is not part of the password.
            let p = text.strip_suffix('\n').unwrap_or(&text);
            let p = p.strip_suffix('\r').unwrap_or(p);
            Ok(Some(Secret::new(p.as_bytes().to_vec())))
        }
        (None, None, Some(var)) => std::env::var(var)
            .map(|p| Some(Secret::from(p)))
            .map_err(|_| format!("{who}: environment variable {var} is not set")),
        _ => Err(format!(
            "{who}: give only one of the value, a file and an environment variable"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("tollgate.toml");
        std::fs::write(&p, text).unwrap();
        std::fs::write(dir.path().join("pw"), "from-file\n").unwrap();
        Config::load(&p)
    }

    const MINIMAL: &str = r#"
listen = "127.0.0.1:6432"
workers = 2
[upstream]
host = "127.0.0.1"
port = 5432
[[upstream.credentials]]
user = "app"
password = "p"
[[upstream.credentials]]
user = "ro"
password_file = "pw"
[tokens]
file = "tokens.toml"
"#;

    #[test]
    fn minimal_config_loads_with_defaults() {
        let c = load(MINIMAL).unwrap();
        assert_eq!(c.workers, 2);
        assert_eq!(c.listen.port(), 6432);
        assert_eq!(c.startup_timeout, DEFAULT_STARTUP_TIMEOUT);
        assert!(c.tokens_file().unwrap().ends_with("tokens.toml"));
        assert!(c.tokens_file().unwrap().is_absolute());
        let ro = c.upstreams[0].credentials["ro"].as_ref().unwrap();
        assert_eq!(ro.expose(), b"from-file");
    }

    #[test]
    fn unknown_fields_and_bad_values_are_errors() {
        let e = load(&MINIMAL.replace("workers = 2", "wokers = 2")).unwrap_err();
        assert!(e.message.contains("wokers"), "{e}");
        let e = load(&format!("startup_timeout = \"soon\"\n{MINIMAL}")).unwrap_err();
        assert!(e.message.contains("startup_timeout"), "{e}");
        let e =
            load(&MINIMAL.replace("password = \"p\"", "password = \"p\"\npassword_env = \"X\""))
                .unwrap_err();
        assert!(e.message.contains("only one of"), "{e}");
        // No secret in the error text.
        assert!(!e.to_string().contains("\"p\""));
        // A syntax error or a misspelt key must not quote the line either:
        // it may hold a password.
        for bad in [
            "pasword = \"S3cret-upstream-PW\"",
            "password = \"S3cret-upstream-PW",
            "password = S3cret-upstream-PW",
            "password = 53125312",
        ] {
            let e = load(&MINIMAL.replace("password = \"p\"", bad)).unwrap_err();
            assert!(!e.to_string().contains("S3cret"), "{e}");
            assert!(!e.to_string().contains("53125312"), "{e}");
            assert!(e.message.starts_with("line "), "{e}");
        }
    }

    #[test]
    fn unix_domain_sockets_on_both_sides() {
        let c = load(&format!(
            "unix_socket_dir = \"/run/tollgate\"\nunix_socket_permissions = 0o770\n{MINIMAL}"
        ))
        .unwrap();
        let u = c.unix_socket.unwrap();
        assert_eq!((u.dir.to_str().unwrap(), u.mode), ("/run/tollgate", 0o770));
        assert!(c.listen_tcp);
        // Socket only: needs the directory and a port to name the socket.
        let c = load(&format!(
            "listen_tcp = false\nunix_socket_dir = \"/run/tollgate\"\n{MINIMAL}"
        ))
        .unwrap();
        assert!(!c.listen_tcp);
        let e = load(&format!("listen_tcp = false\n{MINIMAL}")).unwrap_err();
        assert!(e.message.contains("unix_socket_dir"), "{e}");
        let e = load(&format!(
            "listen_tcp = false\nunix_socket_dir = \"/run/tollgate\"\n{MINIMAL}\n[fleet]\n\
             cancel_key = \"0123456789abcdef0123456789abcdef\"\n"
        ))
        .unwrap_err();
        assert!(e.message.contains("[fleet]"), "{e}");
        let e = load(&format!(
            "unix_socket_dir = \"/run/tollgate\"\nunix_socket_permissions = 1000\n{MINIMAL}"
        ))
        .unwrap_err();
        assert!(e.message.contains("not a file mode"), "{e}");
        let e = load(&format!("unix_socket_permissions = 0o700\n{MINIMAL}")).unwrap_err();
        assert!(e.message.contains("without unix_socket_dir"), "{e}");

        // An upstream whose host is a path: its socket, without TLS.
        let up = MINIMAL.replace("host = \"127.0.0.1\"", "host = \"/var/run/postgresql\"");
        let c = load(&up).unwrap();
        let u = &c.upstreams[0];
        assert_eq!(
            u.socket.as_deref(),
            Some(Path::new("/var/run/postgresql/.s.PGSQL.5432"))
        );
        assert!(u.addrs.is_empty());
        assert_eq!(u.tls, crate::tls::UpstreamTlsMode::Disable);
        let e = load(&up.replace("port = 5432", "port = 5432\ntls = \"require\"")).unwrap_err();
        assert!(e.message.contains("TLS is not used"), "{e}");
    }

    #[test]
    fn pool_settings_apply_to_every_upstream_unless_one_overrides_them() {
        let text = r#"
listen = "127.0.0.1:6432"
[pool]
max_server_connections = 20
idle_timeout = "1m"
[[upstream]]
name = "main"
host = "127.0.0.1"
[upstream.pool]
max_server_connections = 5
mode = "off"
[[upstream]]
name = "other"
host = "127.0.0.1"
[tokens]
file = "tokens.toml"
"#;
        let c = load(text).unwrap();
        let (main, other) = (&c.upstreams[0].pool, &c.upstreams[1].pool);
        assert_eq!(main.max_server_connections, 5);
        assert_eq!(main.mode, PoolMode::Off);
        assert_eq!(main.idle_timeout, Duration::from_secs(60), "inherited");
        assert_eq!(other.max_server_connections, 20);
        assert_eq!(other.mode, PoolMode::Session);
        let tx = text.replace("mode = \"off\"", "mode = \"transaction\"");
        assert_eq!(
            load(&tx).unwrap().upstreams[0].pool.mode,
            PoolMode::Transaction
        );
        let bad = text.replace("mode = \"off\"", "mode = \"statement\"");
        assert!(load(&bad).is_err());
        let unknown = text.replace("idle_timeout", "idle_timout");
        assert!(load(&unknown).is_err());
    }

    #[test]
    fn several_upstreams_route_by_database_and_token_rule() {
        let text = r#"
listen = "127.0.0.1:6432"
[[upstream]]
name = "main"
databases = ["app", "billing"]
host = "127.0.0.1"
[[upstream.credentials]]
user = "app"
password = "p1"
[[upstream]]
name = "replica"
databases = ["app"]
host = "127.0.0.1"
port = 5433
[[upstream]]
name = "rest"
host = "127.0.0.1"
port = 5434
[tokens]
file = "tokens.toml"
"#;
        let c = load(text).unwrap();
        let names: Vec<_> = c.upstreams.iter().map(|u| u.name.as_str()).collect();
        assert_eq!(names, ["main", "replica", "rest"]);
        // Credentials belong to the entry they follow.
        assert!(c.upstreams[0].credentials.contains_key("app"));
        assert!(c.upstreams[1].credentials.is_empty());
        assert_eq!(c.route("app", &[]), Ok(0));
        assert_eq!(c.route("app", &["replica".into()]), Ok(1));
        assert_eq!(c.route("billing", &["replica".into()]), Err(true));
        assert_eq!(c.route("other", &[]), Ok(2));
        assert_eq!(c.route("other", &["main".into()]), Err(true));
        let e = load(&text.replace("name = \"rest\"\n", "")).unwrap_err();
        assert!(e.message.contains("entry 3 has no name"), "{e}");
        let e = load(&text.replace("\"replica\"", "\"main\"")).unwrap_err();
        assert!(e.message.contains("appears twice"), "{e}");
        // A mistake inside an entry keeps its line and field name.
        let e = load(&text.replace("port = 5433", "prot = 5433")).unwrap_err();
        assert!(
            e.message.starts_with("line ") && e.message.contains("prot"),
            "{e}"
        );
        // The single-table form is named "default" and serves every database.
        let c = load(MINIMAL).unwrap();
        assert_eq!(c.upstreams[0].name, "default");
        assert_eq!(c.route("anything", &[]), Ok(0));
    }

    #[test]
    fn control_database_and_fleet_are_validated_without_quoting_secrets() {
        let pg = MINIMAL.replace(
            "file = \"tokens.toml\"",
            "postgres = \"postgres://ctl:Url-S3cret@db.internal:6543/control\"\n\
             password_file = \"pw\"\nmax_staleness = \"5m\"",
        );
        let c = load(&pg).unwrap();
        let TokenSource::Postgres(db) = &c.tokens else {
            panic!("not postgres")
        };
        assert_eq!(db.describe(), "db.internal:6543/control");
        assert_eq!(db.max_staleness, Some(Duration::from_secs(300)));
        assert_eq!(db.password.as_ref().unwrap().expose(), b"from-file");
        assert!(!format!("{c:?}").contains("S3cret"));
        let e = load(&pg.replace("postgres = ", "file = \"t.toml\"\npostgres = ")).unwrap_err();
        assert!(e.message.contains("either file or postgres"), "{e}");
        let e = load(&pg.replace("postgres://", "nonsense Url-S3cret ")).unwrap_err();
        assert!(!e.to_string().contains("S3cret"), "{e}");

        let fleet = |body: &str| load(&format!("{pg}\n[fleet]\n{body}\n"));
        let key = "cancel_key = \"0123456789abcdef0123456789abcdef\"";
        let c = fleet(&format!("{key}\ninstance_id = 4")).unwrap();
        let f = c.fleet.unwrap();
        assert_eq!(
            (f.advertise.as_str(), f.instance_id),
            ("127.0.0.1:6432", Some(4))
        );
        assert!(!format!("{f:?}").contains("0123456789abcdef"));
        let e = fleet("cancel_key = \"short-Key-S3cret\"").unwrap_err();
        assert!(
            e.message.contains("at least 32") && !e.message.contains("S3cret"),
            "{e}"
        );
        assert!(fleet(&format!("{key}\ninstance_id = 0")).is_err());
        let e = load(&format!("{MINIMAL}\n[fleet]\n{key}\n")).unwrap_err();
        assert!(e.message.contains("needs [tokens] postgres"), "{e}");
        let e = load(&format!(
            "{}\n[fleet]\n{key}\n",
            pg.replace("127.0.0.1:6432", "0.0.0.0:6432")
        ))
        .unwrap_err();
        assert!(e.message.contains("advertise"), "{e}");
        assert_eq!(with_port("10.1.2.3", 6432), "10.1.2.3:6432");
        assert_eq!(with_port("fd00::7", 6432), "[fd00::7]:6432");
        assert_eq!(with_port("pod.ns.svc:7000", 6432), "pod.ns.svc:7000");
        assert_eq!(with_port("pod.ns.svc", 6432), "pod.ns.svc:6432");
    }

    #[test]
    fn admin_and_audit_are_off_by_default_and_validated() {
        let c = load(MINIMAL).unwrap();
        assert!(c.admin.is_none());
        assert_eq!(c.audit, AuditConfig::default());

        let c = load(&format!(
            "{MINIMAL}[admin]\nlisten = \"127.0.0.1:9187\"\nper_token_metrics = true\n\
             [audit]\nqueries = true\nmax_query_length = 200\ntag_application_name = true\n"
        ))
        .unwrap();
        let a = c.admin.unwrap();
        assert_eq!(a.listen.port(), 9187);
        assert!(a.latency_histograms && a.token.is_none());
        assert_eq!(a.per_token_series, Some(DEFAULT_TOKEN_SERIES));
        assert!(c.audit.queries);
        assert_eq!(c.audit.max_query_length, 200);
        assert!(c.audit.tag_application_name);

        // Off loopback, /sessions must not be open to anyone.
        let e = load(&format!("{MINIMAL}[admin]\nlisten = \"0.0.0.0:9187\"\n")).unwrap_err();
        assert!(e.message.contains("not loopback"), "{e}");
        let c = load(&format!(
            "{MINIMAL}[admin]\nlisten = \"0.0.0.0:9187\"\ntoken_file = \"pw\"\ntoken = \"x\"\n"
        ))
        .unwrap_err();
        assert!(c.message.contains("only one of"), "{c}");
        let e = load(&format!(
            "{MINIMAL}[admin]\nlisten = \"0.0.0.0:9187\"\ntoken = \"short-admin\"\n"
        ))
        .unwrap_err();
        assert!(e.message.contains("16 characters"), "{e}");
        assert!(!e.to_string().contains("short-admin"));
        let e = load(&format!("auth_failure_window = \"0s\"\n{MINIMAL}")).unwrap_err();
        assert!(e.message.contains("auth_failure_window"), "{e}");
        let e = load(&format!("{MINIMAL}[audit]\nmax_query_length = 0\n")).unwrap_err();
        assert!(e.message.contains("max_query_length"), "{e}");
    }

    #[test]
    fn durations_read_as_people_write_them() {
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("10m").unwrap(), Duration::from_secs(600));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(
            parse_duration("30d").unwrap(),
            Duration::from_secs(30 * 86400)
        );
        assert!(parse_duration("forever").is_err());
    }
}
