//! The token store: a TOML file of token records, and the immutable snapshot
//! the connect path checks tokens against.
//!
//! The file holds each token's public id, its rules and the SHA-256 of its
//! secret, never the secret. Writes are atomic (temp file, fsync, rename), so
//! a reader sees the old file or the new one, never half of one.
#![forbid(unsafe_code)]

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

use super::cidr::Cidr;
use super::token::{self, is_valid_id};

/// Matches every database.
pub const ANY_DATABASE: &str = "*";

/// A token record as the file spells it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
struct RawRecord {
    id: String,
    user: String,
    databases: Vec<String>,
    secret_sha256: String,
    created_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    not_before: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    expires_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    revoked_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    comment: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    cidrs: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    max_connections: Option<u32>,
    /// Allows `replication=true|database` start-ups.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    replication: bool,
    /// The client may not set start-up parameters the token sets, nor send
    /// `options`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    lock_session: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    on_expiry: Option<OnExpiry>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pool_mode: Option<PoolModeRule>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    previous_secret_sha256: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    previous_valid_until: Option<String>,
    /// Names of the `[[upstream]]` entries the token may reach; empty: any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    upstreams: Vec<String>,
    // Tables last: TOML writes plain values before sub-tables.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    session: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
struct RawRevokedJwt {
    jti: String,
    revoked_at: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStore {
    #[serde(default, rename = "token")]
    tokens: Vec<RawRecord>,
    #[serde(default, rename = "revoked_jwt", skip_serializing_if = "Vec::is_empty")]
    revoked_jwts: Vec<RawRevokedJwt>,
}

pub use super::pool_mode::PoolModeRule;

/// What happens to open sessions when their token expires.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnExpiry {
    /// End the session with a FATAL error at a message boundary.
    #[default]
    Terminate,
    /// Let it run to completion; only new logins are refused.
    Keep,
}

impl std::str::FromStr for OnExpiry {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "terminate" => Ok(OnExpiry::Terminate),
            "keep" => Ok(OnExpiry::Keep),
            _ => Err(format!("\"{s}\" is not terminate or keep")),
        }
    }
}

/// The secret a rotated token had, accepted until `valid_until`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PreviousSecret {
    pub sha256: [u8; 32],
    pub valid_until: SystemTime,
}

/// Which of a token's secrets a session logged in with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecretSlot {
    Current,
    Previous,
}

/// A validated token record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRecord {
    pub id: String,
    pub user: String,
    pub databases: Vec<String>,
    pub secret_sha256: [u8; 32],
    pub created_at: SystemTime,
    pub not_before: Option<SystemTime>,
    pub expires_at: Option<SystemTime>,
    pub revoked_at: Option<SystemTime>,
    pub comment: Option<String>,
    /// Source networks allowed; empty = any.
    pub cidrs: Vec<Cidr>,
    /// Open sessions at once, across all shards.
    pub max_connections: Option<u32>,
    /// Whether replication connections (`replication=true|database`) may
    /// use this token; off unless set.
    pub replication: bool,
    /// Parameters injected into the upstream start-up packet.
    pub session: Vec<(String, String)>,
    /// Refuse a start-up that sets any of `session`'s parameters, or sends
    /// `options` (where `-c name=value` could set them).
    pub lock_session: bool,
    /// `None` follows the global `[tokens] on_expiry`.
    pub on_expiry: Option<OnExpiry>,
    /// `None` follows the route's `[pool] mode`.
    pub pool_mode: Option<PoolModeRule>,
    pub previous: Option<PreviousSecret>,
    /// Names of the upstreams the token may reach (routing picks the first
    /// that serves the database and is listed here); empty: any.
    pub upstreams: Vec<String>,
}

impl TokenRecord {
    /// A record with no rules beyond its role and databases.
    pub fn new(
        id: String,
        user: String,
        databases: Vec<String>,
        secret_sha256: [u8; 32],
        created_at: SystemTime,
    ) -> Self {
        TokenRecord {
            id,
            user,
            databases,
            secret_sha256,
            created_at,
            not_before: None,
            expires_at: None,
            revoked_at: None,
            comment: None,
            cidrs: Vec::new(),
            max_connections: None,
            replication: false,
            session: Vec::new(),
            lock_session: false,
            on_expiry: None,
            pool_mode: None,
            previous: None,
            upstreams: Vec::new(),
        }
    }

    pub fn allows_address(&self, ip: IpAddr) -> bool {
        self.cidrs.is_empty() || self.cidrs.iter().any(|c| c.contains(ip))
    }

    pub fn allows_database(&self, database: &str) -> bool {
        self.databases
            .iter()
            .any(|d| d == ANY_DATABASE || d == database)
    }

    /// The token's state at `now`, for listings.
    pub fn status(&self, now: SystemTime) -> &'static str {
        if self.revoked_at.is_some_and(|t| t <= now) {
            "revoked"
        } else if self.expires_at.is_some_and(|t| t <= now) {
            "expired"
        } else if self.not_before.is_some_and(|t| t > now) {
            "not_yet_valid"
        } else {
            "active"
        }
    }
}

/// Why a token was refused. The client always sees the same bytes; this is
/// what the log records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    Malformed,
    UnknownId,
    BadSecret,
    NotYetValid,
    Expired,
    Revoked,
    WrongUser,
    WrongDatabase,
    AddressNotAllowed,
    /// The previous secret of a rotated token, after its grace period.
    Rotated,
    /// The token was removed from the store.
    Deleted,
}

impl Rejection {
    /// A stable name for logs, audit events and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Rejection::Malformed => "malformed",
            Rejection::UnknownId => "unknown_token",
            Rejection::BadSecret => "bad_secret",
            Rejection::NotYetValid => "not_yet_valid",
            Rejection::Expired => "expired",
            Rejection::Revoked => "revoked",
            Rejection::WrongUser => "user_not_allowed",
            Rejection::WrongDatabase => "database_not_allowed",
            Rejection::AddressNotAllowed => "address_not_allowed",
            Rejection::Rotated => "rotated",
            Rejection::Deleted => "deleted",
        }
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who is presenting a token.
#[derive(Debug, Clone, Copy)]
pub struct Presenter<'a> {
    pub user: &'a str,
    pub database: &'a str,
    pub address: IpAddr,
}

/// What an accepted token grants the session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub slot: SecretSlot,
    /// SHA-256 of the secret used, so open sessions can be matched against
    /// later rotations (a second rotation retires the first's old secret).
    pub secret_sha256: [u8; 32],
    pub max_connections: Option<u32>,
    pub replication: bool,
    pub session: Vec<(String, String)>,
    pub lock_session: bool,
    pub expires_at: Option<SystemTime>,
    pub on_expiry: Option<OnExpiry>,
    /// `None`: the route's `[pool] mode`.
    pub pool_mode: Option<PoolModeRule>,
    /// Upstreams the session may be routed to; empty: any.
    pub upstreams: Vec<String>,
}

/// The result of a token check: the token id when it could be read (for the
/// log), and the verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub token_id: Option<String>,
    pub outcome: Result<Grant, Rejection>,
}

/// Failure to read or write the store file. Operators see these, clients never.
#[derive(Debug)]
pub enum StoreError {
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    Parse {
        path: PathBuf,
        message: String,
    },
    Invalid {
        path: PathBuf,
        message: String,
    },
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::Io { path, source } => {
                write!(f, "token store {}: {source}", path.display())
            }
            StoreError::Parse { path, message } => {
                write!(
                    f,
                    "token store {} is not valid TOML: {message}",
                    path.display()
                )
            }
            StoreError::Invalid { path, message } => {
                write!(f, "token store {}: {message}", path.display())
            }
        }
    }
}

impl std::error::Error for StoreError {}

/// An immutable set of token records, keyed by id.
#[derive(Debug, Default, Clone)]
pub struct TokenStore {
    records: HashMap<String, TokenRecord>,
    /// JWT ids revoked before their expiry, and when.
    revoked_jwts: HashMap<String, SystemTime>,
}

/// Compared against when the id is unknown, so that an unknown id costs the
/// same as a wrong secret.
const DUMMY_HASH: [u8; 32] = [0u8; 32];

impl TokenStore {
    /// Reads the store. A missing file is an empty store, so that a fresh
    /// install can start before its first token exists.
    pub fn load(path: &Path) -> Result<TokenStore, StoreError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(TokenStore::default()),
            Err(source) => {
                return Err(StoreError::Io {
                    path: path.to_owned(),
                    source,
                })
            }
        };
        Self::parse(&text).map_err(|e| match e {
            ParseError::Toml(message) => StoreError::Parse {
                path: path.to_owned(),
                message,
            },
            ParseError::Invalid(message) => StoreError::Invalid {
                path: path.to_owned(),
                message,
            },
        })
    }

    fn parse(text: &str) -> Result<TokenStore, ParseError> {
        let raw: RawStore = toml::from_str(text)
            .map_err(|e| ParseError::Toml(crate::toml_error::describe(&e, text)))?;
        let mut revoked_jwts = HashMap::with_capacity(raw.revoked_jwts.len());
        for r in raw.revoked_jwts {
            let at =
                parse_time("revoked_at", &r.jti, &r.revoked_at).map_err(ParseError::Invalid)?;
            revoked_jwts.insert(r.jti, at);
        }
        let mut records = HashMap::with_capacity(raw.tokens.len());
        for r in raw.tokens {
            let record = validate(r).map_err(ParseError::Invalid)?;
            if records.contains_key(&record.id) {
                return Err(ParseError::Invalid(format!(
                    "token id {} appears twice",
                    record.id
                )));
            }
            records.insert(record.id.clone(), record);
        }
        Ok(TokenStore {
            records,
            revoked_jwts,
        })
    }

    /// Writes the store atomically: a temp file beside it, fsync, rename,
    /// fsync of the folder. The file is created readable by its owner only.
    pub fn save(&self, path: &Path) -> Result<(), StoreError> {
        let io = |source| StoreError::Io {
            path: path.to_owned(),
            source,
        };
        let mut tokens: Vec<&TokenRecord> = self.records.values().collect();
        tokens.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        let mut revoked_jwts: Vec<RawRevokedJwt> = self
            .revoked_jwts
            .iter()
            .map(|(jti, at)| RawRevokedJwt {
                jti: jti.clone(),
                revoked_at: humantime::format_rfc3339_seconds(*at).to_string(),
            })
            .collect();
        revoked_jwts.sort_by(|a, b| (&a.revoked_at, &a.jti).cmp(&(&b.revoked_at, &b.jti)));
        let raw = RawStore {
            tokens: tokens.into_iter().map(to_raw).collect(),
            revoked_jwts,
        };
        let text = format!(
            "# tollgate token store: ids, rules and SHA-256 of secrets (never the secrets).\n\
             # Managed by `tollgate token ...`; edits by hand are fine while the format holds.\n\n{}",
            toml::to_string_pretty(&raw).expect("token store serializes")
        );
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let file_name = path.file_name().ok_or_else(|| StoreError::Invalid {
            path: path.to_owned(),
            message: "the store path has no file name".into(),
        })?;
        let tmp = dir.join(format!(
            ".{}.tmp.{}",
            file_name.to_string_lossy(),
            std::process::id()
        ));
        {
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(io)?;
            f.write_all(text.as_bytes()).map_err(io)?;
            f.sync_all().map_err(io)?;
        }
        std::fs::rename(&tmp, path).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            io(e)
        })?;
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }

    /// Builds a store from rows in the file's field names, one JSON object
    /// per token, as the Postgres backend reads them. Unlike a file, which
    /// is taken whole or not at all, a row that does not validate is left
    /// out (its token is refused) and described in the returned list: one
    /// bad row written by hand must not hold back another token's
    /// revocation.
    pub fn from_rows(
        tokens: &[String],
        revoked_jwts: Vec<(String, SystemTime)>,
    ) -> (TokenStore, Vec<String>) {
        let mut store = TokenStore {
            records: HashMap::with_capacity(tokens.len()),
            revoked_jwts: revoked_jwts.into_iter().collect(),
        };
        let problems = store.insert_rows(tokens);
        (store, problems)
    }

    /// Brings the tokens `ids` up to date from `rows`, their rows as they
    /// are now (as [`from_rows`](Self::from_rows) takes them): a token with
    /// no row, or with a row that does not validate, is removed. Returns
    /// the invalid rows' descriptions.
    pub fn apply_rows(&mut self, ids: &[&str], rows: &[String]) -> Vec<String> {
        for id in ids {
            self.records.remove(*id);
        }
        self.insert_rows(rows)
    }

    fn insert_rows(&mut self, rows: &[String]) -> Vec<String> {
        let mut problems = Vec::new();
        for row in rows {
            // serde's messages may quote a value; say only where and what kind.
            let record = serde_json::from_str::<RawRecord>(row)
                .map_err(|e| {
                    let id = serde_json::from_str::<serde_json::Value>(row)
                        .ok()
                        .and_then(|v| v.get("id")?.as_str().map(str::to_owned))
                        .filter(|id| is_valid_id(id.as_bytes()))
                        .unwrap_or_else(|| "?".into());
                    format!(
                        "token {id}: its row is not in the expected form ({:?} error in the rules)",
                        e.classify()
                    )
                })
                .and_then(validate);
            match record {
                Ok(r) => {
                    self.records.insert(r.id.clone(), r);
                }
                Err(e) => problems.push(e),
            }
        }
        problems
    }

    /// Replaces the revoked JWT ids.
    pub fn set_revoked_jwts(&mut self, revoked_jwts: Vec<(String, SystemTime)>) {
        self.revoked_jwts = revoked_jwts.into_iter().collect();
    }

    /// A record in the file's field names, as JSON (the Postgres backend's
    /// `tollgate.put_token` takes this form).
    pub fn record_json(record: &TokenRecord) -> String {
        serde_json::to_string(&to_raw(record)).expect("token record serializes")
    }

    /// Revoked JWT ids and when.
    pub fn revoked_jwts(&self) -> impl Iterator<Item = (&str, SystemTime)> {
        self.revoked_jwts.iter().map(|(j, t)| (j.as_str(), *t))
    }

    pub fn get(&self, id: &str) -> Option<&TokenRecord> {
        self.records.get(id)
    }

    pub fn get_mut(&mut self, id: &str) -> Option<&mut TokenRecord> {
        self.records.get_mut(id)
    }

    pub fn insert(&mut self, record: TokenRecord) {
        self.records.insert(record.id.clone(), record);
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Records sorted by creation time, for listings.
    pub fn records(&self) -> Vec<&TokenRecord> {
        let mut v: Vec<&TokenRecord> = self.records.values().collect();
        v.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        v
    }

    /// Revokes a JWT by its `jti` (kept until removed by hand).
    pub fn revoke_jwt(&mut self, jti: &str, now: SystemTime) {
        self.revoked_jwts.entry(jti.to_owned()).or_insert(now);
    }

    /// When `jti` was (or is to be) revoked.
    pub fn jwt_revoked_at(&self, jti: &str) -> Option<SystemTime> {
        self.revoked_jwts.get(jti).copied()
    }

    pub fn is_jwt_revoked(&self, jti: &str, now: SystemTime) -> bool {
        self.revoked_jwts.get(jti).is_some_and(|t| *t <= now)
    }

    /// Checks a presented token for `who` at `now`.
    ///
    /// The secret comparisons (current and previous secret) run whether or
    /// not the id is known, and in constant time, so timing tells an
    /// attacker nothing about ids or secrets. The order of the checks after
    /// that decides only what the log says.
    pub fn check(&self, presented: &[u8], who: &Presenter<'_>, now: SystemTime) -> Verdict {
        let parsed = match token::parse(presented) {
            Ok(p) => p,
            Err(_) => {
                return Verdict {
                    token_id: None,
                    outcome: Err(Rejection::Malformed),
                }
            }
        };
        let token_id = Some(parsed.id.to_owned());
        let record = self.records.get(parsed.id);
        let actual = token::sha256(parsed.secret.expose());
        let current = record.map_or(&DUMMY_HASH, |r| &r.secret_sha256);
        let previous = record
            .and_then(|r| r.previous.as_ref())
            .map_or(&DUMMY_HASH, |p| &p.sha256);
        let current_ok: bool = actual.ct_eq(current).into();
        let previous_ok: bool = actual.ct_eq(previous).into();
        let Some(r) = record else {
            return Verdict {
                token_id,
                outcome: Err(Rejection::UnknownId),
            };
        };
        let slot = if current_ok {
            SecretSlot::Current
        } else if previous_ok && r.previous.is_some() {
            SecretSlot::Previous
        } else {
            return Verdict {
                token_id,
                outcome: Err(Rejection::BadSecret),
            };
        };
        let outcome = r.validity(&actual, now).and_then(|()| {
            if r.not_before.is_some_and(|t| t > now) {
                Err(Rejection::NotYetValid)
            } else if r.user != who.user {
                Err(Rejection::WrongUser)
            } else if !r.allows_database(who.database) {
                Err(Rejection::WrongDatabase)
            } else if !r.allows_address(who.address) {
                Err(Rejection::AddressNotAllowed)
            } else {
                Ok(Grant {
                    slot,
                    secret_sha256: actual,
                    max_connections: r.max_connections,
                    replication: r.replication,
                    session: r.session.clone(),
                    lock_session: r.lock_session,
                    expires_at: r.expires_at,
                    on_expiry: r.on_expiry,
                    pool_mode: r.pool_mode,
                    upstreams: r.upstreams.clone(),
                })
            }
        });
        Verdict { token_id, outcome }
    }

    /// Applies the rules carried by a verified JWT, and the `jti` deny-list.
    pub fn check_jwt(
        &self,
        jwt: &super::jwt::VerifiedJwt,
        who: &Presenter<'_>,
        now: SystemTime,
    ) -> Result<Grant, Rejection> {
        if jwt
            .jti
            .as_deref()
            .is_some_and(|j| self.is_jwt_revoked(j, now))
        {
            return Err(Rejection::Revoked);
        }
        if jwt.role != who.user {
            return Err(Rejection::WrongUser);
        }
        if !jwt
            .databases
            .iter()
            .any(|d| d == ANY_DATABASE || d == who.database)
        {
            return Err(Rejection::WrongDatabase);
        }
        // A claim that does not parse allows nothing (never fail open).
        let allowed = jwt
            .cidrs
            .iter()
            .any(|c| c.parse::<Cidr>().is_ok_and(|c| c.contains(who.address)));
        if !allowed {
            return Err(Rejection::AddressNotAllowed);
        }
        Ok(Grant {
            slot: SecretSlot::Current,
            secret_sha256: jwt.signature_hash,
            max_connections: jwt.max_connections,
            // JWTs carry no replication claim: replication needs an opaque
            // token whose rule an operator set explicitly.
            replication: false,
            session: jwt.session.clone(),
            // The issuer decides what a JWT sets; the client's same-named
            // parameters are dropped (see `upstream_params`), but it may
            // send others.
            lock_session: false,
            expires_at: Some(jwt.expires_at),
            on_expiry: None,
            pool_mode: jwt.pool_mode,
            upstreams: Vec::new(),
        })
    }

    /// Whether an open session that logged in with `token_id` and `slot`
    /// may go on at `now`: revocation, rotation, deletion and expiry
    /// (`Expired` is for the caller to weigh against the session's
    /// `on_expiry`).
    pub fn recheck(
        &self,
        token_id: &str,
        secret_sha256: &[u8; 32],
        now: SystemTime,
    ) -> Result<(), Rejection> {
        let r = self.records.get(token_id).ok_or(Rejection::Deleted)?;
        r.validity(secret_sha256, now)
    }

    /// The next time `recheck` may change its answer without the store
    /// changing: expiry, the end of a rotated secret's grace, or a
    /// revocation stamped later than this clock reads (by another machine
    /// whose clock is ahead, or scheduled).
    pub fn deadline(&self, token_id: &str, secret_sha256: &[u8; 32]) -> Option<SystemTime> {
        let r = self.records.get(token_id)?;
        let grace = r
            .previous
            .filter(|p| &r.secret_sha256 != secret_sha256 && &p.sha256 == secret_sha256)
            .map(|p| p.valid_until);
        [r.expires_at, grace, r.revoked_at]
            .into_iter()
            .flatten()
            .min()
    }
}

impl TokenRecord {
    /// Revocation, rotation and expiry, which also apply to open sessions.
    /// `secret_sha256` is the hash of the secret the session presented
    /// (already known to be the current or the previous one at login).
    fn validity(&self, secret_sha256: &[u8; 32], now: SystemTime) -> Result<(), Rejection> {
        if self.revoked_at.is_some_and(|t| t <= now) {
            return Err(Rejection::Revoked);
        }
        // Comparing hashes of secrets: no timing concern.
        let current = &self.secret_sha256 == secret_sha256;
        let in_grace = self
            .previous
            .is_some_and(|p| &p.sha256 == secret_sha256 && p.valid_until > now);
        if !current && !in_grace {
            return Err(Rejection::Rotated);
        }
        if self.expires_at.is_some_and(|t| t <= now) {
            return Err(Rejection::Expired);
        }
        Ok(())
    }
}

enum ParseError {
    Toml(String),
    Invalid(String),
}

fn parse_time(field: &str, id: &str, value: &str) -> Result<SystemTime, String> {
    humantime::parse_rfc3339_weak(value)
        .map_err(|e| format!("token {id}: {field} \"{value}\" is not an RFC 3339 time: {e}"))
}

fn validate(r: RawRecord) -> Result<TokenRecord, String> {
    if !is_valid_id(r.id.as_bytes()) {
        return Err(format!(
            "token id \"{}\" must be {} characters of a-z and 0-9",
            r.id.escape_default(),
            token::ID_LEN
        ));
    }
    let id = &r.id;
    if r.user.is_empty() {
        return Err(format!("token {id}: user is empty"));
    }
    let mut secret_sha256 = [0u8; 32];
    hex::decode_to_slice(&r.secret_sha256, &mut secret_sha256)
        .map_err(|_| format!("token {id}: secret_sha256 must be 64 hex digits"))?;
    let opt = |field: &str, v: &Option<String>| {
        v.as_deref().map(|s| parse_time(field, id, s)).transpose()
    };
    let cidrs = r
        .cidrs
        .iter()
        .map(|c| {
            c.parse::<Cidr>()
                .map_err(|e| format!("token {id}: cidrs: {e}"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    for (name, value) in &r.session {
        validate_session_parameter(name, value).map_err(|e| format!("token {id}: session: {e}"))?;
    }
    let previous = match (&r.previous_secret_sha256, &r.previous_valid_until) {
        (None, None) => None,
        (Some(h), Some(until)) => {
            let mut sha256 = [0u8; 32];
            hex::decode_to_slice(h, &mut sha256)
                .map_err(|_| format!("token {id}: previous_secret_sha256 must be 64 hex digits"))?;
            Some(PreviousSecret {
                sha256,
                valid_until: parse_time("previous_valid_until", id, until)?,
            })
        }
        _ => {
            return Err(format!(
                "token {id}: previous_secret_sha256 and previous_valid_until go together"
            ))
        }
    };
    Ok(TokenRecord {
        created_at: parse_time("created_at", id, &r.created_at)?,
        not_before: opt("not_before", &r.not_before)?,
        expires_at: opt("expires_at", &r.expires_at)?,
        revoked_at: opt("revoked_at", &r.revoked_at)?,
        secret_sha256,
        databases: r.databases,
        comment: r.comment,
        cidrs,
        max_connections: r.max_connections,
        replication: r.replication,
        lock_session: r.lock_session,
        session: r.session.into_iter().collect(),
        on_expiry: r.on_expiry,
        pool_mode: r.pool_mode,
        previous,
        upstreams: r.upstreams,
        user: r.user,
        id: r.id,
    })
}

fn to_raw(r: &TokenRecord) -> RawRecord {
    let t = |t: SystemTime| humantime::format_rfc3339_seconds(t).to_string();
    RawRecord {
        id: r.id.clone(),
        user: r.user.clone(),
        databases: r.databases.clone(),
        secret_sha256: hex::encode(r.secret_sha256),
        created_at: t(r.created_at),
        not_before: r.not_before.map(t),
        expires_at: r.expires_at.map(t),
        revoked_at: r.revoked_at.map(t),
        comment: r.comment.clone(),
        cidrs: r.cidrs.iter().map(Cidr::to_string).collect(),
        max_connections: r.max_connections,
        replication: r.replication,
        lock_session: r.lock_session,
        on_expiry: r.on_expiry,
        pool_mode: r.pool_mode,
        previous_secret_sha256: r.previous.map(|p| hex::encode(p.sha256)),
        previous_valid_until: r.previous.map(|p| t(p.valid_until)),
        upstreams: r.upstreams.clone(),
        session: r.session.iter().cloned().collect(),
    }
}

/// Start-up parameters a token may inject: a GUC name, and a value without
/// NUL. The names that define the connection itself are refused.
pub fn validate_session_parameter(name: &str, value: &str) -> Result<(), String> {
    let name_ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.');
    if !name_ok {
        return Err(format!(
            "\"{}\" is not a parameter name",
            name.escape_default()
        ));
    }
    if matches!(name, "user" | "database" | "replication") || name.starts_with("_pq_.") {
        return Err(format!("\"{name}\" cannot be set by a token"));
    }
    if value.contains('\0') {
        return Err(format!("the value of \"{name}\" contains a NUL byte"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn record(t: &token::NewToken, user: &str, dbs: &[&str]) -> TokenRecord {
        TokenRecord::new(
            t.id.clone(),
            user.into(),
            dbs.iter().map(|s| s.to_string()).collect(),
            t.secret_sha256,
            SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
        )
    }

    fn now() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000)
    }

    fn check_from(
        store: &TokenStore,
        token: &[u8],
        user: &str,
        db: &str,
        ip: &str,
        at: SystemTime,
    ) -> Result<Grant, Rejection> {
        let who = Presenter {
            user,
            database: db,
            address: ip.parse().unwrap(),
        };
        store.check(token, &who, at).outcome
    }

    fn check(store: &TokenStore, token: &[u8], user: &str, db: &str) -> Result<Grant, Rejection> {
        check_from(store, token, user, db, "127.0.0.1", now())
    }

    #[test]
    fn accepts_a_good_token_and_names_every_rejection() {
        let good = token::generate();
        let other = token::generate();
        let mut store = TokenStore::default();
        let mut r = record(&good, "app", &["appdb"]);
        r.session = vec![("statement_timeout".into(), "5s".into())];
        store.insert(r);
        let g = good.token.expose();
        let grant = check(&store, g, "app", "appdb").unwrap();
        assert_eq!(grant.slot, SecretSlot::Current);
        assert_eq!(
            grant.session,
            [("statement_timeout".to_owned(), "5s".to_owned())]
        );
        let who = Presenter {
            user: "app",
            database: "appdb",
            address: "127.0.0.1".parse().unwrap(),
        };
        assert_eq!(
            store.check(g, &who, now()).token_id.as_deref(),
            Some(good.id.as_str())
        );
        assert_eq!(
            check(&store, g, "other", "appdb"),
            Err(Rejection::WrongUser)
        );
        assert_eq!(
            check(&store, g, "app", "postgres"),
            Err(Rejection::WrongDatabase)
        );
        assert_eq!(
            check(&store, other.token.expose(), "app", "appdb"),
            Err(Rejection::UnknownId)
        );
        assert_eq!(
            check(&store, b"hunter2", "app", "appdb"),
            Err(Rejection::Malformed)
        );
        // Same id, different secret (with a valid checksum).
        let forged = token::generate_with_id(&good.id, &ring::rand::SystemRandom::new());
        assert_eq!(
            check(&store, forged.token.expose(), "app", "appdb"),
            Err(Rejection::BadSecret)
        );
    }

    #[test]
    fn time_rules() {
        let t = token::generate();
        let mut store = TokenStore::default();
        let mut r = record(&t, "app", &["*"]);
        r.expires_at = Some(now() - Duration::from_secs(1));
        store.insert(r.clone());
        assert_eq!(
            check(&store, t.token.expose(), "app", "x"),
            Err(Rejection::Expired)
        );
        r.expires_at = Some(now() + Duration::from_secs(60));
        r.not_before = Some(now() + Duration::from_secs(10));
        store.insert(r.clone());
        assert_eq!(
            check(&store, t.token.expose(), "app", "x"),
            Err(Rejection::NotYetValid)
        );
        r.not_before = None;
        r.revoked_at = Some(now());
        store.insert(r);
        assert_eq!(
            check(&store, t.token.expose(), "app", "x"),
            Err(Rejection::Revoked)
        );
    }

    #[test]
    fn cidr_rules() {
        let t = token::generate();
        let mut store = TokenStore::default();
        let mut r = record(&t, "app", &["*"]);
        r.cidrs = vec!["10.0.0.0/8".parse().unwrap(), "127.0.0.1".parse().unwrap()];
        store.insert(r);
        let tok = t.token.expose();
        assert!(check_from(&store, tok, "app", "x", "10.9.8.7", now()).is_ok());
        assert!(check_from(&store, tok, "app", "x", "127.0.0.1", now()).is_ok());
        assert_eq!(
            check_from(&store, tok, "app", "x", "192.168.1.1", now()),
            Err(Rejection::AddressNotAllowed)
        );
    }

    #[test]
    fn rotation_grace_and_open_sessions() {
        let old = token::generate();
        let new = token::generate_with_id(&old.id, &ring::rand::SystemRandom::new());
        let newer = token::generate_with_id(&old.id, &ring::rand::SystemRandom::new());
        let mut store = TokenStore::default();
        let mut r = record(&new, "app", &["*"]);
        let grace_end = now() + Duration::from_secs(600);
        r.previous = Some(PreviousSecret {
            sha256: old.secret_sha256,
            valid_until: grace_end,
        });
        store.insert(r.clone());
        let g = check(&store, old.token.expose(), "app", "x").unwrap();
        assert_eq!(g.slot, SecretSlot::Previous);
        assert_eq!(
            check(&store, new.token.expose(), "app", "x").unwrap().slot,
            SecretSlot::Current
        );
        // Inside the grace the old secret's sessions may go on; after it, not.
        assert_eq!(store.recheck(&old.id, &old.secret_sha256, now()), Ok(()));
        assert_eq!(store.deadline(&old.id, &old.secret_sha256), Some(grace_end));
        assert_eq!(store.deadline(&old.id, &new.secret_sha256), None);
        // A revocation stamped ahead of this clock comes due later: the
        // watcher must look again then.
        let ahead = now() + Duration::from_secs(2);
        let mut revoked = store.clone();
        revoked.get_mut(&old.id).unwrap().revoked_at = Some(ahead);
        assert_eq!(revoked.recheck(&old.id, &new.secret_sha256, now()), Ok(()));
        assert_eq!(revoked.deadline(&old.id, &new.secret_sha256), Some(ahead));
        assert_eq!(
            revoked.recheck(&old.id, &new.secret_sha256, ahead),
            Err(Rejection::Revoked)
        );
        let later = grace_end + Duration::from_secs(1);
        assert_eq!(
            check_from(&store, old.token.expose(), "app", "x", "127.0.0.1", later),
            Err(Rejection::Rotated)
        );
        assert_eq!(
            store.recheck(&old.id, &old.secret_sha256, later),
            Err(Rejection::Rotated)
        );
        assert_eq!(store.recheck(&old.id, &new.secret_sha256, later), Ok(()));
        // A second rotation retires the first old secret at once.
        r.previous = Some(PreviousSecret {
            sha256: new.secret_sha256,
            valid_until: grace_end,
        });
        r.secret_sha256 = newer.secret_sha256;
        store.insert(r);
        assert_eq!(
            store.recheck(&old.id, &old.secret_sha256, now()),
            Err(Rejection::Rotated)
        );
        assert_eq!(store.recheck(&old.id, &new.secret_sha256, now()), Ok(()));
        assert_eq!(
            store.recheck("nosuchtoken0", &new.secret_sha256, now()),
            Err(Rejection::Deleted)
        );
    }

    #[test]
    fn revoked_jwts_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.toml");
        let mut store = TokenStore::default();
        store.revoke_jwt("abc-123", now());
        store.save(&path).unwrap();
        let loaded = TokenStore::load(&path).unwrap();
        assert!(loaded.is_jwt_revoked("abc-123", now()));
        assert!(!loaded.is_jwt_revoked("other", now()));
    }

    #[test]
    fn save_and_load_round_trip_without_secrets() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.toml");
        let t = token::generate();
        let mut store = TokenStore::default();
        let mut r = record(&t, "app", &["appdb", "reports"]);
        r.expires_at = Some(now());
        r.comment = Some("ci".into());
        r.cidrs = vec!["10.0.0.0/8".parse().unwrap()];
        r.max_connections = Some(3);
        r.on_expiry = Some(OnExpiry::Keep);
        r.pool_mode = Some(PoolModeRule::Transaction);
        r.session = vec![
            ("default_transaction_read_only".into(), "on".into()),
            ("statement_timeout".into(), "5s".into()),
        ];
        r.previous = Some(PreviousSecret {
            sha256: [7; 32],
            valid_until: now(),
        });
        store.insert(r.clone());
        store.save(&path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let secret_hex = std::str::from_utf8(&t.token.expose()[16..80]).unwrap();
        assert!(!text.contains(secret_hex), "the secret reached the store");
        assert!(text.contains("pool_mode = \"transaction\""), "{text}");
        let loaded = TokenStore::load(&path).unwrap();
        assert_eq!(loaded.get(&t.id), Some(&r));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn missing_file_is_empty_and_bad_files_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        assert!(TokenStore::load(&dir.path().join("none.toml"))
            .unwrap()
            .is_empty());
        let p = dir.path().join("bad.toml");
        std::fs::write(&p, "[[token]]\nid = 3\n").unwrap();
        assert!(matches!(
            TokenStore::load(&p),
            Err(StoreError::Parse { .. })
        ));
        std::fs::write(
            &p,
            "[[token]]\nid = \"UPPER\"\nuser = \"a\"\ndatabases = []\nsecret_sha256 = \"00\"\ncreated_at = \"2026-01-01T00:00:00Z\"\n",
        )
        .unwrap();
        let e = TokenStore::load(&p).unwrap_err().to_string();
        assert!(e.contains("must be 12 characters"), "{e}");
    }

    #[test]
    fn rows_applied_by_id_replace_remove_and_leave_the_rest() {
        let (a, b, c) = (token::generate(), token::generate(), token::generate());
        let row =
            |t: &token::NewToken, user: &str| TokenStore::record_json(&record(t, user, &["*"]));
        let (mut store, problems) =
            TokenStore::from_rows(&[row(&a, "app"), row(&b, "app"), row(&c, "app")], vec![]);
        assert!(problems.is_empty(), "{problems:?}");
        // a changed, b deleted (no row comes back), c not named: untouched.
        let problems = store.apply_rows(&[&a.id, &b.id], &[row(&a, "other")]);
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(store.len(), 2);
        assert_eq!(store.get(&a.id).unwrap().user, "other");
        assert!(store.get(&b.id).is_none());
        assert_eq!(store.get(&c.id).unwrap().user, "app");
        // A row broken by hand removes its token and is described, by id.
        let broken = row(&c, "app").replace("\"databases\":[\"*\"]", "\"databases\":7");
        let problems = store.apply_rows(&[&c.id], &[broken]);
        assert_eq!(problems.len(), 1);
        assert!(
            problems[0].starts_with(&format!("token {}:", c.id)),
            "{problems:?}"
        );
        assert!(store.get(&c.id).is_none());
        assert_eq!(store.len(), 1);

        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_750_000_000);
        store.set_revoked_jwts(vec![("jti-1".into(), at)]);
        assert_eq!(
            store.revoked_jwts().collect::<Vec<_>>(),
            vec![("jti-1", at)]
        );
    }
}
