//! Configuration: raw serde structs that mirror the TOML file
//! (`deny_unknown_fields`, so a typo is an error, not a silent default), then
//! one validation step into an immutable, typed [`Config`].
#![forbid(unsafe_code)]

pub mod pgurl;

use std::collections::HashMap;
use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::secret::Secret;

/// PostgreSQL's own default for `authentication_timeout` is 60 s; a proxy
/// that holds a socket per pending login wants a tighter bound.
pub const DEFAULT_STARTUP_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
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
    #[serde(default)]
    workers: usize,
    pin_cpus: Option<bool>,
    startup_timeout: Option<String>,
    max_connections: Option<usize>,
    buffer_size: Option<usize>,
    upstream: RawUpstream,
    tokens: RawTokens,
    #[serde(default)]
    log: RawLog,
    tls: Option<RawTls>,
    jwt: Option<crate::auth::jwt::JwtConfigRaw>,
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

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
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
    file: String,
    #[serde(default)]
    on_expiry: crate::auth::OnExpiry,
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
    /// Number of shards; already resolved from 0 to the CPU count.
    pub workers: usize,
    /// Pin each shard to one CPU (default). On a machine where the proxy
    /// shares few cores with busy neighbours, letting the scheduler move
    /// shards can cut tail latency; measure both.
    pub pin_cpus: bool,
    pub startup_timeout: Duration,
    pub max_connections: usize,
    pub buffer_size: usize,
    pub upstream: UpstreamConfig,
    pub tokens_file: PathBuf,
    /// What expiry does to open sessions, unless a token says otherwise.
    pub on_expiry: crate::auth::OnExpiry,
    pub log_level: Option<String>,
    pub log_format: LogFormat,
    /// Client-facing TLS; `None` when not configured or disabled.
    pub tls: Option<ClientTlsConfig>,
    /// JWT verification, when configured.
    pub jwt: Option<crate::auth::jwt::JwtVerifier>,
}

#[derive(Debug, Clone)]
pub struct ClientTlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub mode: ClientTlsMode,
}

#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// The name as configured: used for TLS server-name checks.
    pub host: String,
    pub port: u16,
    /// `host` resolved once, at load: a lookup per connection would block
    /// the shard. Tried in order, as libpq does.
    pub addrs: Vec<SocketAddr>,
    pub connect_timeout: Duration,
    /// Password per role. A role listed without a password logs in with
    /// none (trust); a role not listed cannot log in.
    pub credentials: HashMap<String, Option<Secret>>,
    /// libpq-style sslmode for the upstream connection (default prefer).
    pub tls: crate::tls::UpstreamTlsMode,
    pub ca_file: Option<PathBuf>,
    /// Client certificate and key, for servers that use `cert` auth.
    pub client_cert: Option<(PathBuf, PathBuf)>,
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
        let raw: RawConfig = toml::from_str(&text).map_err(|e| err(e.to_string()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::from_raw(raw, base).map_err(err)
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
        let duration = |field: &str, v: Option<String>, default: Duration| match v {
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
        };
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
        if raw.upstream.host.is_empty() {
            return Err("[upstream] host is empty".into());
        }
        let addrs: Vec<SocketAddr> = (raw.upstream.host.as_str(), raw.upstream.port)
            .to_socket_addrs()
            .map_err(|e| format!("[upstream] host \"{}\": {e}", raw.upstream.host))?
            .collect();
        let mut credentials = HashMap::new();
        for c in raw.upstream.credentials {
            let password = read_password(&c, base)?;
            if credentials.insert(c.user.clone(), password).is_some() {
                return Err(format!(
                    "[[upstream.credentials]] lists user \"{}\" twice",
                    c.user
                ));
            }
        }
        let tls = match raw.tls {
            Some(t) if t.mode != ClientTlsMode::Disable => Some(ClientTlsConfig {
                cert: base.join(t.cert),
                key: base.join(t.key),
                mode: t.mode,
            }),
            _ => None,
        };
        let client_cert = match (raw.upstream.cert_file, raw.upstream.key_file) {
            (None, None) => None,
            (Some(c), Some(k)) => Some((base.join(c), base.join(k))),
            _ => return Err("[upstream] cert_file and key_file go together".into()),
        };
        let jwt = raw
            .jwt
            .map(|j| crate::auth::jwt::JwtVerifier::from_raw(j, base))
            .transpose()
            .map_err(|e| e.to_string())?;
        Ok(Config {
            jwt,
            tls,
            listen,
            workers,
            pin_cpus: raw.pin_cpus.unwrap_or(true),
            startup_timeout: duration(
                "startup_timeout",
                raw.startup_timeout,
                DEFAULT_STARTUP_TIMEOUT,
            )?,
            max_connections,
            buffer_size,
            upstream: UpstreamConfig {
                host: raw.upstream.host,
                port: raw.upstream.port,
                addrs,
                connect_timeout: duration(
                    "[upstream] connect_timeout",
                    raw.upstream.connect_timeout,
                    DEFAULT_CONNECT_TIMEOUT,
                )?,
                credentials,
                tls: raw
                    .upstream
                    .tls
                    .unwrap_or(crate::tls::UpstreamTlsMode::Prefer),
                ca_file: raw.upstream.ca_file.map(|f| base.join(f)),
                client_cert,
            },
            tokens_file: base.join(raw.tokens.file),
            on_expiry: raw.tokens.on_expiry,
            log_level: raw.log.level,
            log_format: raw.log.format.unwrap_or_default(),
        })
    }
}

/// Reads a credential's password from exactly one of its three sources.
fn read_password(c: &RawCredential, base: &Path) -> Result<Option<Secret>, String> {
    let who = format!("[[upstream.credentials]] user \"{}\"", c.user);
    match (&c.password, &c.password_file, &c.password_env) {
        (None, None, None) => Ok(None),
        (Some(p), None, None) => Ok(Some(Secret::new(p.as_bytes().to_vec()))),
        (None, Some(f), None) => {
            let path = base.join(f);
            let text = std::fs::read_to_string(&path)
                .map_err(|e| format!("{who}: password_file {}: {e}", path.display()))?;
            // Files usually end with a newline that is not part of the password.
            let p = text.strip_suffix('\n').unwrap_or(&text);
            let p = p.strip_suffix('\r').unwrap_or(p);
            Ok(Some(Secret::new(p.as_bytes().to_vec())))
        }
        (None, None, Some(var)) => std::env::var(var)
            .map(|p| Some(Secret::from(p)))
            .map_err(|_| format!("{who}: environment variable {var} is not set")),
        _ => Err(format!(
            "{who}: give only one of password, password_file and password_env"
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
        assert!(c.tokens_file.ends_with("tokens.toml"));
        assert!(c.tokens_file.is_absolute());
        let ro = c.upstream.credentials["ro"].as_ref().unwrap();
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
