//! The token store: a TOML file of token records, and the immutable snapshot
//! the connect path checks tokens against.
//!
//! The file holds each token's public id, its rules and the SHA-256 of its
//! secret, never the secret. Writes are atomic (temp file, fsync, rename), so
//! a reader sees the old file or the new one, never half of one.
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

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
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStore {
    #[serde(default, rename = "token")]
    tokens: Vec<RawRecord>,
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
}

impl TokenRecord {
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
            "not yet valid"
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
}

impl Rejection {
    /// A stable name for logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Rejection::Malformed => "malformed",
            Rejection::UnknownId => "unknown token",
            Rejection::BadSecret => "bad secret",
            Rejection::NotYetValid => "not yet valid",
            Rejection::Expired => "expired",
            Rejection::Revoked => "revoked",
            Rejection::WrongUser => "not allowed for user",
            Rejection::WrongDatabase => "not allowed for database",
        }
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The result of a token check: the token id when it could be read (for the
/// log), and the verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub token_id: Option<String>,
    pub outcome: Result<(), Rejection>,
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
        let raw: RawStore = toml::from_str(text).map_err(|e| ParseError::Toml(e.to_string()))?;
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
        Ok(TokenStore { records })
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
        let raw = RawStore {
            tokens: tokens.into_iter().map(to_raw).collect(),
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

    /// Checks a presented token for `user` and `database` at `now`.
    ///
    /// The secret comparison runs whether or not the id is known, and in
    /// constant time, so timing tells an attacker nothing about ids or
    /// secrets. The order of the checks after that decides only what the
    /// log says.
    pub fn check(&self, presented: &[u8], user: &str, database: &str, now: SystemTime) -> Verdict {
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
        let expected = record.map_or(&DUMMY_HASH, |r| &r.secret_sha256);
        let actual = token::sha256(parsed.secret.expose());
        let secret_ok: bool = actual.ct_eq(expected).into();
        let outcome = match record {
            None => Err(Rejection::UnknownId),
            Some(_) if !secret_ok => Err(Rejection::BadSecret),
            Some(r) if r.revoked_at.is_some_and(|t| t <= now) => Err(Rejection::Revoked),
            Some(r) if r.expires_at.is_some_and(|t| t <= now) => Err(Rejection::Expired),
            Some(r) if r.not_before.is_some_and(|t| t > now) => Err(Rejection::NotYetValid),
            Some(r) if r.user != user => Err(Rejection::WrongUser),
            Some(r) if !r.allows_database(database) => Err(Rejection::WrongDatabase),
            Some(_) => Ok(()),
        };
        Verdict { token_id, outcome }
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
    Ok(TokenRecord {
        created_at: parse_time("created_at", id, &r.created_at)?,
        not_before: opt("not_before", &r.not_before)?,
        expires_at: opt("expires_at", &r.expires_at)?,
        revoked_at: opt("revoked_at", &r.revoked_at)?,
        secret_sha256,
        databases: r.databases,
        comment: r.comment,
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
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn record(t: &token::NewToken, user: &str, dbs: &[&str]) -> TokenRecord {
        TokenRecord {
            id: t.id.clone(),
            user: user.into(),
            databases: dbs.iter().map(|s| s.to_string()).collect(),
            secret_sha256: t.secret_sha256,
            created_at: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
            not_before: None,
            expires_at: None,
            revoked_at: None,
            comment: None,
        }
    }

    fn now() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000)
    }

    #[test]
    fn accepts_a_good_token_and_names_every_rejection() {
        let good = token::generate();
        let other = token::generate();
        let mut store = TokenStore::default();
        store.insert(record(&good, "app", &["appdb"]));
        let g = good.token.expose();
        assert_eq!(store.check(g, "app", "appdb", now()).outcome, Ok(()));
        assert_eq!(
            store.check(g, "app", "appdb", now()).token_id.as_deref(),
            Some(good.id.as_str())
        );
        assert_eq!(
            store.check(g, "other", "appdb", now()).outcome,
            Err(Rejection::WrongUser)
        );
        assert_eq!(
            store.check(g, "app", "postgres", now()).outcome,
            Err(Rejection::WrongDatabase)
        );
        assert_eq!(
            store
                .check(other.token.expose(), "app", "appdb", now())
                .outcome,
            Err(Rejection::UnknownId)
        );
        assert_eq!(
            store.check(b"hunter2", "app", "appdb", now()).outcome,
            Err(Rejection::Malformed)
        );
        // Same id, different secret (with a valid checksum).
        let forged = token::generate_with_id(&good.id, &ring::rand::SystemRandom::new());
        assert_eq!(
            store
                .check(forged.token.expose(), "app", "appdb", now())
                .outcome,
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
            store.check(t.token.expose(), "app", "x", now()).outcome,
            Err(Rejection::Expired)
        );
        r.expires_at = Some(now() + Duration::from_secs(60));
        r.not_before = Some(now() + Duration::from_secs(10));
        store.insert(r.clone());
        assert_eq!(
            store.check(t.token.expose(), "app", "x", now()).outcome,
            Err(Rejection::NotYetValid)
        );
        r.not_before = None;
        r.revoked_at = Some(now());
        store.insert(r);
        assert_eq!(
            store.check(t.token.expose(), "app", "x", now()).outcome,
            Err(Rejection::Revoked)
        );
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
        store.insert(r.clone());
        store.save(&path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let secret_hex = std::str::from_utf8(&t.token.expose()[16..80]).unwrap();
        assert!(!text.contains(secret_hex), "the secret reached the store");
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
}
