//! JSON Web Tokens as passwords: a client whose password looks like a JWT is
//! verified here instead of being looked up in the token store.
//!
//! A JWT ([RFC 7519]) in compact JWS form ([RFC 7515] §7.1) is
//! `BASE64URL(header) "." BASE64URL(payload) "." BASE64URL(signature)`. It
//! reaches tollgate as the PasswordMessage of the start-up flow
//! (<https://www.postgresql.org/docs/current/protocol-flow.html#PROTOCOL-FLOW-START-UP>).
//!
//! The module is sans-IO on the verify path: [`JwtVerifier::verify`] takes
//! the token bytes and the current time and returns a typed verdict. Files
//! are touched only when the verifier is built ([`JwtVerifier::from_raw`]) and
//! when a JWKS file is re-read ([`JwtVerifier::reload_if_changed`]).
//!
//! It follows the JWT best current practices ([RFC 8725]):
//! - every key is bound to one algorithm (§3.1): an HMAC secret is only ever
//!   used for HS*, a public key only for the algorithm it was configured or
//!   published with, so the bytes of a public key can never become an HMAC
//!   secret ("algorithm confusion");
//! - `alg: none` is refused in any spelling, as are `crit` extensions we do
//!   not understand (RFC 7515 §4.1.11) and unknown algorithms;
//! - `exp` is required, `nbf` honoured, both with a small leeway; `aud` is
//!   required and checked, so a token minted for another service cannot log
//!   in to Postgres (§3.9); `typ`, when present, must name a JWT (§3.11);
//! - parsing is strict: unpadded canonical base64url, duplicate JSON members
//!   refused (RFC 7519 §4), and the whole token is bounded by
//!   `max_token_len`, which bounds every allocation made while parsing it.
//!
//! The signature is checked before the payload is parsed, so unauthenticated
//! JSON never reaches the claim logic. Rejections are for the log only: the
//! client always receives the same 28P01 bytes.
//!
//! [RFC 7515]: https://www.rfc-editor.org/rfc/rfc7515
//! [RFC 7519]: https://www.rfc-editor.org/rfc/rfc7519
//! [RFC 8725]: https://www.rfc-editor.org/rfc/rfc8725
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::alphabet;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, URL_SAFE_NO_PAD};
use base64::engine::DecodePaddingMode;
use base64::Engine as _;
use ring::{digest, hmac, signature};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::SubjectPublicKeyInfoDer;
use serde::de::{self, IgnoredAny};
use serde::Deserialize;
use serde_json::Value;
use zeroize::{Zeroize, Zeroizing};

use crate::secret::Secret;

/// Clock skew tolerated on `exp` and `nbf` when the config says nothing.
pub const DEFAULT_LEEWAY: Duration = Duration::from_secs(30);
/// RFC 7519 §4.1.4 speaks of "a few minutes"; more than this is a typo.
const MAX_LEEWAY: Duration = Duration::from_secs(600);
/// Bounds the token, hence every allocation made while parsing it.
pub const DEFAULT_MAX_TOKEN_LEN: usize = 4096;
/// PostgreSQL itself reads a password packet of at most
/// `PG_MAX_AUTH_TOKEN_LENGTH` = 65535 bytes (src/include/libpq/auth.h).
const MAX_MAX_TOKEN_LEN: usize = 65535;
/// Smaller than any real signed token with a role claim.
const MIN_MAX_TOKEN_LEN: usize = 128;
/// RFC 7518 §3.2: an HMAC key must be at least as long as the hash output;
/// HS256 is the smallest.
const MIN_HMAC_SECRET_LEN: usize = 32;
/// A JWKS with a handful of keys is a few KiB; this only stops a wrong path
/// (a log file, a device) from being read whole.
const MAX_JWKS_FILE_LEN: u64 = 1 << 20;
/// A token without `kid` is tried against every key of its algorithm, so the
/// key count bounds the work an invalid token can cause.
const MAX_KEYS: usize = 64;
/// 9999-12-31T23:59:59Z: later "dates" are nonsense, and refusing them keeps
/// `SystemTime` arithmetic far from overflow.
const MAX_NUMERIC_DATE: u64 = 253_402_300_799;
/// What an absent `cidrs` claim means: every address, spelled so that the
/// list is never empty (an empty list must not silently mean "anywhere").
pub const ANY_CIDRS: [&str; 2] = ["0.0.0.0/0", "::/0"];
/// What an absent `databases` claim means (same spelling as the token store).
pub const ANY_DATABASE: &str = super::store::ANY_DATABASE;
/// Start-up parameters a token may not set through its session claim: they
/// are governed by the role and database rules, not by injection.
const RESERVED_SESSION_PARAMS: [&str; 3] = ["user", "database", "replication"];

/// JWKS members are operator-provided files; some publishers pad their
/// base64url, which is harmless there (unlike in the token itself).
const JWK_B64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::URL_SAFE,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

// ---------------------------------------------------------------------------
// Detection
// ---------------------------------------------------------------------------

/// Whether a password is shaped like a compact JWS: three non-empty base64url
/// segments separated by two dots, starting with `eyJ` (the base64 of `{"`,
/// with which every JOSE header begins). Cheap, and never true for an opaque
/// `tg_` token, which contains no dot.
pub fn looks_like_jwt(password: &[u8]) -> bool {
    if !password.starts_with(b"eyJ") {
        return false;
    }
    let mut dots = 0;
    let mut segment_len = 0;
    for &b in password {
        match b {
            b'.' => {
                if segment_len == 0 {
                    return false;
                }
                dots += 1;
                segment_len = 0;
            }
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' => segment_len += 1,
            _ => return false,
        }
    }
    dots == 2 && segment_len > 0
}

// ---------------------------------------------------------------------------
// Algorithms
// ---------------------------------------------------------------------------

/// The JWS algorithms tollgate verifies (RFC 7518 §3.1, RFC 8037 §3.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JwtAlg {
    Hs256,
    Hs384,
    Hs512,
    Rs256,
    Ps256,
    Es256,
    Es384,
    EdDsa,
}

impl JwtAlg {
    const ALL: [JwtAlg; 8] = [
        JwtAlg::Hs256,
        JwtAlg::Hs384,
        JwtAlg::Hs512,
        JwtAlg::Rs256,
        JwtAlg::Ps256,
        JwtAlg::Es256,
        JwtAlg::Es384,
        JwtAlg::EdDsa,
    ];

    /// The name as JOSE spells it.
    pub fn name(self) -> &'static str {
        match self {
            JwtAlg::Hs256 => "HS256",
            JwtAlg::Hs384 => "HS384",
            JwtAlg::Hs512 => "HS512",
            JwtAlg::Rs256 => "RS256",
            JwtAlg::Ps256 => "PS256",
            JwtAlg::Es256 => "ES256",
            JwtAlg::Es384 => "ES384",
            JwtAlg::EdDsa => "EdDSA",
        }
    }

    /// Exact match: `alg` values are case-sensitive (RFC 7515 §4.1.1).
    pub fn from_name(name: &str) -> Option<JwtAlg> {
        JwtAlg::ALL.into_iter().find(|a| a.name() == name)
    }

    /// The HMAC function and its output length, for HS* only.
    fn hmac(self) -> Option<(hmac::Algorithm, usize)> {
        match self {
            JwtAlg::Hs256 => Some((hmac::HMAC_SHA256, 32)),
            JwtAlg::Hs384 => Some((hmac::HMAC_SHA384, 48)),
            JwtAlg::Hs512 => Some((hmac::HMAC_SHA512, 64)),
            _ => None,
        }
    }
}

impl fmt::Display for JwtAlg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

// ---------------------------------------------------------------------------
// Keys
// ---------------------------------------------------------------------------

/// Key material, each kind bound to the algorithms it may serve. Public key
/// bytes live in variants no HMAC arm can reach.
#[derive(Clone)]
enum Material {
    /// `alg: None` serves every HS* whose hash is no longer than the secret.
    Hmac {
        secret: Secret,
        alg: Option<JwtAlg>,
    },
    /// Modulus and exponent, big-endian without leading zeros (as ring wants).
    Rsa {
        n: Vec<u8>,
        e: Vec<u8>,
        alg: JwtAlg,
    },
    /// An uncompressed point (0x04 || X || Y) on the curve of `alg`.
    Ec {
        point: Vec<u8>,
        alg: JwtAlg,
    },
    Ed25519 {
        public: [u8; 32],
    },
}

impl Material {
    fn accepts(&self, alg: JwtAlg) -> bool {
        match self {
            Material::Hmac {
                alg: Some(bound), ..
            } => *bound == alg,
            Material::Hmac { secret, alg: None } => alg
                .hmac()
                .is_some_and(|(_, len)| secret.expose().len() >= len),
            Material::Rsa { alg: bound, .. } | Material::Ec { alg: bound, .. } => *bound == alg,
            Material::Ed25519 { .. } => alg == JwtAlg::EdDsa,
        }
    }

    /// Checks `sig` over `msg`. Each arm pairs one kind of material with the
    /// algorithms it may serve; every other pairing is `false`, whatever
    /// `accepts` said, so a selection bug cannot turn into a confusion bug.
    fn verify(&self, alg: JwtAlg, msg: &[u8], sig: &[u8]) -> bool {
        use signature::{RsaPublicKeyComponents, UnparsedPublicKey};
        match (self, alg) {
            (Material::Hmac { secret, .. }, JwtAlg::Hs256 | JwtAlg::Hs384 | JwtAlg::Hs512) => {
                let Some((algorithm, _)) = alg.hmac() else {
                    return false;
                };
                // ring compares the tags in constant time.
                let key = hmac::Key::new(algorithm, secret.expose());
                hmac::verify(&key, msg, sig).is_ok()
            }
            (Material::Rsa { n, e, .. }, JwtAlg::Rs256) => RsaPublicKeyComponents { n, e }
                .verify(&signature::RSA_PKCS1_2048_8192_SHA256, msg, sig)
                .is_ok(),
            (Material::Rsa { n, e, .. }, JwtAlg::Ps256) => RsaPublicKeyComponents { n, e }
                .verify(&signature::RSA_PSS_2048_8192_SHA256, msg, sig)
                .is_ok(),
            (Material::Ec { point, .. }, JwtAlg::Es256) => {
                UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, point)
                    .verify(msg, sig)
                    .is_ok()
            }
            (Material::Ec { point, .. }, JwtAlg::Es384) => {
                UnparsedPublicKey::new(&signature::ECDSA_P384_SHA384_FIXED, point)
                    .verify(msg, sig)
                    .is_ok()
            }
            (Material::Ed25519 { public }, JwtAlg::EdDsa) => {
                UnparsedPublicKey::new(&signature::ED25519, public)
                    .verify(msg, sig)
                    .is_ok()
            }
            _ => false,
        }
    }
}

impl fmt::Debug for Material {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Material::Hmac { alg, .. } => match alg {
                Some(a) => write!(f, "hmac({a})"),
                None => f.write_str("hmac(HS*)"),
            },
            Material::Rsa { n, alg, .. } => write!(f, "rsa{}({alg})", n.len() * 8),
            Material::Ec { alg, .. } => write!(f, "ec({alg})"),
            Material::Ed25519 { .. } => f.write_str("ed25519(EdDSA)"),
        }
    }
}

#[derive(Debug, Clone)]
struct Key {
    kid: Option<String>,
    material: Material,
}

// ---------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------

/// The `[jwt]` table as the file spells it.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtConfigRaw {
    /// When set, `iss` must equal it.
    pub issuer: Option<String>,
    /// Required: `aud` (a string or an array) must contain it.
    pub audience: Option<String>,
    /// Clock skew for `exp`/`nbf`, e.g. "30s".
    pub leeway: Option<String>,
    pub max_token_len: Option<usize>,
    #[serde(default)]
    pub hmac: Vec<JwtHmacKeyRaw>,
    #[serde(default)]
    pub public_key: Vec<JwtPublicKeyRaw>,
    #[serde(default)]
    pub claims: JwtClaimNamesRaw,
}

/// One `[[jwt.hmac]]` entry.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtHmacKeyRaw {
    pub kid: Option<String>,
    /// HS256, HS384 or HS512; absent = any of them the secret is long enough for.
    pub alg: Option<String>,
    pub secret: Option<RawSecret>,
    pub secret_file: Option<String>,
    pub secret_env: Option<String>,
}

/// One `[[jwt.public_key]]` entry: a PEM file (`file`, with `alg`) or a JWKS
/// file (`jwks_file`, `alg` optional).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtPublicKeyRaw {
    pub kid: Option<String>,
    pub alg: Option<String>,
    pub file: Option<String>,
    pub jwks_file: Option<String>,
}

/// `[jwt.claims]`: which claim carries each tollgate rule.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtClaimNamesRaw {
    pub role: Option<String>,
    pub databases: Option<String>,
    pub cidrs: Option<String>,
    pub session: Option<String>,
    pub max_connections: Option<String>,
}

/// A secret written inline in the config: redacted by `Debug` (the raw config
/// derives it) and zeroed on drop.
#[derive(Clone, Default)]
pub struct RawSecret(String);

impl RawSecret {
    pub fn new(s: impl Into<String>) -> Self {
        RawSecret(s.into())
    }
}

impl<'de> Deserialize<'de> for RawSecret {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(RawSecret)
    }
}

impl fmt::Debug for RawSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl Drop for RawSecret {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

/// Why the `[jwt]` configuration (or a key file it names) is unusable.
/// Operators read these; they name the setting or file, never a secret.
#[derive(Debug)]
pub enum JwtConfigError {
    Io {
        what: String,
        path: PathBuf,
        source: std::io::Error,
    },
    Invalid {
        what: String,
        message: String,
    },
}

impl fmt::Display for JwtConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            JwtConfigError::Io { what, path, source } => {
                write!(f, "{what}: {}: {source}", path.display())
            }
            JwtConfigError::Invalid { what, message } => write!(f, "{what}: {message}"),
        }
    }
}

impl std::error::Error for JwtConfigError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            JwtConfigError::Io { source, .. } => Some(source),
            JwtConfigError::Invalid { .. } => None,
        }
    }
}

fn invalid(what: impl Into<String>, message: impl Into<String>) -> JwtConfigError {
    JwtConfigError::Invalid {
        what: what.into(),
        message: message.into(),
    }
}

/// The claim names mapped to tollgate's rules.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ClaimNames {
    role: String,
    databases: String,
    cidrs: String,
    session: String,
    max_connections: String,
}

impl ClaimNames {
    fn from_raw(raw: JwtClaimNamesRaw) -> Result<ClaimNames, JwtConfigError> {
        let names = ClaimNames {
            role: raw.role.unwrap_or_else(|| "role".into()),
            databases: raw.databases.unwrap_or_else(|| "databases".into()),
            cidrs: raw.cidrs.unwrap_or_else(|| "cidrs".into()),
            session: raw.session.unwrap_or_else(|| "pg_session".into()),
            max_connections: raw
                .max_connections
                .unwrap_or_else(|| "max_connections".into()),
        };
        let all = [
            ("role", &names.role),
            ("databases", &names.databases),
            ("cidrs", &names.cidrs),
            ("session", &names.session),
            ("max_connections", &names.max_connections),
        ];
        for (i, (rule, claim)) in all.iter().enumerate() {
            let what = format!("[jwt.claims] {rule}");
            if claim.is_empty() {
                return Err(invalid(what, "must not be empty"));
            }
            // The registered claims have fixed meanings; reading a rule from
            // one of them would let e.g. `exp` double as a connection limit.
            if ["exp", "nbf", "iat", "iss", "aud", "jti"].contains(&claim.as_str()) {
                return Err(invalid(
                    what,
                    format!("\"{claim}\" is a registered claim and cannot carry a rule"),
                ));
            }
            if let Some((other, _)) = all[..i].iter().find(|(_, c)| c == claim) {
                return Err(invalid(
                    what,
                    format!("claim \"{claim}\" is already used for {other}"),
                ));
            }
        }
        Ok(names)
    }
}

/// A JWKS file and the keys last read from it.
#[derive(Debug, Clone)]
struct JwksSource {
    what: String,
    path: PathBuf,
    /// Only keys of this algorithm are used (and it is the algorithm of an
    /// RSA key that publishes none).
    only_alg: Option<JwtAlg>,
    /// The file's identity when last read (or last tried), to notice changes
    /// with one `stat`; `None` when it could not be stat'ed.
    stamp: Option<FileStamp>,
    content_sha256: [u8; 32],
    keys: Arc<[Key]>,
}

/// What `stat` says about a file; a change in any field means "read it again".
/// Inode and ctime catch an atomic rename even within one mtime tick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl FileStamp {
    fn of(meta: &std::fs::Metadata) -> FileStamp {
        use std::os::unix::fs::MetadataExt;
        FileStamp {
            dev: meta.dev(),
            ino: meta.ino(),
            len: meta.len(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        }
    }
}

/// Verifies JWT passwords. Immutable on the verify path; `Clone` is cheap
/// (keys are shared), so the control thread can hand a copy to each shard.
#[derive(Debug, Clone)]
pub struct JwtVerifier {
    issuer: Option<String>,
    audience: String,
    leeway: Duration,
    max_token_len: usize,
    claims: ClaimNames,
    /// `[[jwt.hmac]]` and PEM `[[jwt.public_key]]` entries.
    keys: Arc<[Key]>,
    jwks: Vec<JwksSource>,
}

impl JwtVerifier {
    /// Validates the raw `[jwt]` table and reads the files it names. Relative
    /// paths resolve against `base` (the config file's folder).
    pub fn from_raw(raw: JwtConfigRaw, base: &Path) -> Result<JwtVerifier, JwtConfigError> {
        let audience = match raw.audience {
            Some(a) if !a.is_empty() => a,
            Some(_) => return Err(invalid("[jwt] audience", "must not be empty")),
            None => {
                return Err(invalid(
                    "[jwt] audience",
                    "is required, so that a token issued for another service cannot log in",
                ))
            }
        };
        if raw.issuer.as_deref() == Some("") {
            return Err(invalid("[jwt] issuer", "must not be empty"));
        }
        let leeway = match raw.leeway.as_deref() {
            None => DEFAULT_LEEWAY,
            Some(s) => {
                let d = humantime::parse_duration(s)
                    .map_err(|e| invalid("[jwt] leeway", format!("\"{s}\": {e}")))?;
                if d > MAX_LEEWAY {
                    return Err(invalid(
                        "[jwt] leeway",
                        format!("at most {}", humantime::format_duration(MAX_LEEWAY)),
                    ));
                }
                d
            }
        };
        let max_token_len = raw.max_token_len.unwrap_or(DEFAULT_MAX_TOKEN_LEN);
        if !(MIN_MAX_TOKEN_LEN..=MAX_MAX_TOKEN_LEN).contains(&max_token_len) {
            return Err(invalid(
                "[jwt] max_token_len",
                format!("must be between {MIN_MAX_TOKEN_LEN} and {MAX_MAX_TOKEN_LEN}"),
            ));
        }
        let claims = ClaimNames::from_raw(raw.claims)?;

        let mut keys = Vec::new();
        for (i, h) in raw.hmac.into_iter().enumerate() {
            keys.push(hmac_key(h, i, base)?);
        }
        let mut jwks = Vec::new();
        for (i, p) in raw.public_key.into_iter().enumerate() {
            let what = entry_name("[[jwt.public_key]]", i, p.kid.as_deref());
            let alg = match p.alg.as_deref() {
                None => None,
                Some(name) => match JwtAlg::from_name(name) {
                    Some(a) if a.hmac().is_none() => Some(a),
                    Some(_) => {
                        return Err(invalid(
                            format!("{what} alg"),
                            format!(
                                "{name} is an HMAC algorithm; use [[jwt.hmac]] for shared secrets"
                            ),
                        ))
                    }
                    None => return Err(invalid(format!("{what} alg"), unknown_alg(name, false))),
                },
            };
            match (p.file, p.jwks_file) {
                (Some(file), None) => {
                    let Some(alg) = alg else {
                        return Err(invalid(
                            format!("{what} alg"),
                            "is required with file, and binds the key to that one algorithm",
                        ));
                    };
                    let path = base.join(file);
                    let material = pem_public_key(&path, alg, &what)?;
                    keys.push(Key {
                        kid: p.kid,
                        material,
                    });
                }
                (None, Some(file)) => {
                    if p.kid.is_some() {
                        return Err(invalid(
                            format!("{what} kid"),
                            "is taken from each key in the JWKS file; remove it here",
                        ));
                    }
                    let path = base.join(file);
                    let loaded = load_jwks(&path, alg, &what)?;
                    jwks.push(JwksSource {
                        what,
                        path,
                        only_alg: alg,
                        stamp: Some(loaded.stamp),
                        content_sha256: loaded.content_sha256,
                        keys: loaded.keys.into(),
                    });
                }
                _ => {
                    return Err(invalid(
                        what,
                        "give exactly one of file (a PEM public key) and jwks_file",
                    ))
                }
            }
        }

        if keys.is_empty() && jwks.is_empty() {
            return Err(invalid(
                "[jwt]",
                "needs at least one [[jwt.hmac]] or [[jwt.public_key]] entry",
            ));
        }
        // Operator-written kids must be unique, or "which key is k1?" has two
        // answers. (A JWKS is the publisher's business; see `candidates`.)
        for (i, k) in keys.iter().enumerate() {
            if let Some(kid) = &k.kid {
                if keys[..i].iter().any(|o| o.kid.as_ref() == Some(kid)) {
                    return Err(invalid("[jwt]", format!("kid \"{kid}\" is used twice")));
                }
            }
        }
        let total = keys.len() + jwks.iter().map(|j| j.keys.len()).sum::<usize>();
        if total > MAX_KEYS {
            return Err(invalid(
                "[jwt]",
                format!("{total} keys configured; at most {MAX_KEYS}"),
            ));
        }
        Ok(JwtVerifier {
            issuer: raw.issuer,
            audience,
            leeway,
            max_token_len,
            claims,
            keys: keys.into(),
            jwks,
        })
    }

    /// The configured bound on a token's length, in bytes.
    pub fn max_token_len(&self) -> usize {
        self.max_token_len
    }

    /// The configured clock-skew allowance.
    pub fn leeway(&self) -> Duration {
        self.leeway
    }

    /// The JWKS files this verifier watches.
    pub fn jwks_files(&self) -> impl Iterator<Item = &Path> {
        self.jwks.iter().map(|j| j.path.as_path())
    }

    /// Re-reads each JWKS file whose `stat` changed since it was last read.
    /// `Ok(true)` when some key set actually changed (publish the verifier
    /// to the shards), `Ok(false)` when nothing did.
    ///
    /// A file that fails to load keeps its previous keys in force, and is not
    /// tried again until it changes once more (so a broken file is reported
    /// once, not every tick). Each file is handled on its own: after `Err`
    /// other files may have been reloaded, so publish the verifier anyway; it
    /// is always consistent.
    pub fn reload_if_changed(&mut self) -> Result<bool, JwtConfigError> {
        let mut changed = false;
        let mut first_error = None;
        for src in &mut self.jwks {
            let now = std::fs::metadata(&src.path).ok().map(|m| FileStamp::of(&m));
            if now == src.stamp {
                continue;
            }
            match load_jwks(&src.path, src.only_alg, &src.what) {
                Ok(loaded) => {
                    src.stamp = Some(loaded.stamp);
                    if loaded.content_sha256 != src.content_sha256 {
                        src.content_sha256 = loaded.content_sha256;
                        src.keys = loaded.keys.into();
                        changed = true;
                    }
                }
                Err(e) => {
                    src.stamp = now;
                    first_error.get_or_insert(e);
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(changed),
        }
    }

    fn all_keys(&self) -> impl Iterator<Item = &Key> {
        self.keys
            .iter()
            .chain(self.jwks.iter().flat_map(|j| j.keys.iter()))
    }

    /// Verifies a JWT password at `now`. Cheap to call again with the same
    /// token (no state is kept); callers may cache by `signature_hash` but
    /// must still compare `expires_at` (and `not_before`) with the clock.
    pub fn verify(&self, token: &[u8], now: SystemTime) -> Result<VerifiedJwt, JwtRejection> {
        if token.len() > self.max_token_len {
            return Err(JwtRejection::Malformed);
        }
        let [header_b64, payload_b64, signature_b64] = split_compact(token)?;
        let signing_input = &token[..header_b64.len() + 1 + payload_b64.len()];

        let header = decode_object(header_b64)?;
        let alg = match header.get("alg") {
            Some(Value::String(name)) => {
                if name.eq_ignore_ascii_case("none") {
                    return Err(JwtRejection::AlgNone);
                }
                JwtAlg::from_name(name).ok_or(JwtRejection::UnsupportedAlg)?
            }
            _ => return Err(JwtRejection::Malformed),
        };
        // RFC 7515 §4.1.11: extensions marked critical that we do not
        // understand (all of them) make the token invalid.
        if header.contains_key("crit") {
            return Err(JwtRejection::Malformed);
        }
        // RFC 8725 §3.11: refuse other JWT kinds (DPoP proofs, logout
        // tokens, ...) that some issuer signs with the same key.
        match header.get("typ") {
            None => {}
            Some(Value::String(t)) if is_jwt_typ(t) => {}
            Some(_) => return Err(JwtRejection::Malformed),
        }
        let kid = match header.get("kid") {
            None => None,
            Some(Value::String(k)) => Some(k.as_str()),
            Some(_) => return Err(JwtRejection::Malformed),
        };

        // A signature with its payload is a credential: zero it after use.
        let signature = Zeroizing::new(decode_b64(signature_b64)?);
        if signature.is_empty() {
            return Err(JwtRejection::Malformed);
        }
        self.check_signature(kid, alg, signing_input, &signature)?;

        let claims = decode_object(payload_b64)?;
        self.check_claims(&claims, token, signing_input, now)
    }

    /// Selects keys and checks the signature. With a `kid`, only keys with
    /// that kid are candidates, falling back to keys configured without a
    /// kid (a single PEM key need not know the issuer's key ids); without a
    /// `kid`, every key is. Either way a candidate must be bound to `alg`.
    fn check_signature(
        &self,
        kid: Option<&str>,
        alg: JwtAlg,
        msg: &[u8],
        sig: &[u8],
    ) -> Result<(), JwtRejection> {
        let kid_is_known =
            kid.is_some_and(|kid| self.all_keys().any(|k| k.kid.as_deref() == Some(kid)));
        let is_candidate = |k: &Key| match kid {
            None => true,
            Some(kid) if kid_is_known => k.kid.as_deref() == Some(kid),
            Some(_) => k.kid.is_none(),
        };
        let mut tried = false;
        for key in self
            .all_keys()
            .filter(|k| is_candidate(k) && k.material.accepts(alg))
        {
            tried = true;
            if key.material.verify(alg, msg, sig) {
                return Ok(());
            }
        }
        Err(if tried {
            JwtRejection::BadSignature
        } else {
            JwtRejection::UnknownKey
        })
    }

    fn check_claims(
        &self,
        claims: &BTreeMap<String, Value>,
        token: &[u8],
        signing_input: &[u8],
        now: SystemTime,
    ) -> Result<VerifiedJwt, JwtRejection> {
        let expires_at = match claims.get("exp") {
            None => return Err(JwtRejection::MissingClaim("exp")),
            Some(v) => numeric_date(v).ok_or(JwtRejection::BadClaim("exp"))?,
        };
        let not_before = match claims.get("nbf") {
            None => None,
            Some(v) => Some(numeric_date(v).ok_or(JwtRejection::BadClaim("nbf"))?),
        };
        // RFC 7519 §4.1.4: the token is valid only *before* exp.
        if expires_at
            .checked_add(self.leeway)
            .is_some_and(|limit| now >= limit)
        {
            return Err(JwtRejection::Expired);
        }
        if let Some(nbf) = not_before {
            if now.checked_add(self.leeway).is_some_and(|t| t < nbf) {
                return Err(JwtRejection::NotYetValid);
            }
        }
        if let Some(issuer) = &self.issuer {
            match claims.get("iss") {
                None => return Err(JwtRejection::MissingClaim("iss")),
                Some(Value::String(iss)) if iss == issuer => {}
                Some(Value::String(_)) => return Err(JwtRejection::WrongIssuer),
                Some(_) => return Err(JwtRejection::BadClaim("iss")),
            }
        }
        match claims.get("aud") {
            None => return Err(JwtRejection::MissingClaim("aud")),
            Some(Value::String(aud)) => {
                if *aud != self.audience {
                    return Err(JwtRejection::WrongAudience);
                }
            }
            Some(Value::Array(auds)) => {
                let mut found = false;
                for aud in auds {
                    match aud {
                        Value::String(a) => found |= *a == self.audience,
                        _ => return Err(JwtRejection::BadClaim("aud")),
                    }
                }
                if !found {
                    return Err(JwtRejection::WrongAudience);
                }
            }
            Some(_) => return Err(JwtRejection::BadClaim("aud")),
        }

        let jti = optional_string(claims, "jti")?;
        let subject = optional_string(claims, "sub")?;
        let names = &self.claims;
        let role = match claims.get(&names.role) {
            None => return Err(JwtRejection::MissingClaim("role")),
            Some(Value::String(r)) if is_plain(r) => r.clone(),
            Some(_) => return Err(JwtRejection::BadClaim("role")),
        };
        let databases = string_list(claims.get(&names.databases), "databases")?
            .unwrap_or_else(|| vec![ANY_DATABASE.to_owned()]);
        let cidrs = string_list(claims.get(&names.cidrs), "cidrs")?
            .unwrap_or_else(|| ANY_CIDRS.iter().map(|c| (*c).to_owned()).collect());
        let session = match claims.get(&names.session) {
            None => Vec::new(),
            Some(Value::Object(params)) => {
                let mut out = Vec::with_capacity(params.len());
                for (name, value) in params {
                    let Value::String(value) = value else {
                        return Err(JwtRejection::BadClaim("session"));
                    };
                    // Start-up parameters are NUL-terminated on the wire.
                    if !is_plain(name)
                        || value.contains('\0')
                        || RESERVED_SESSION_PARAMS.contains(&name.as_str())
                    {
                        return Err(JwtRejection::BadClaim("session"));
                    }
                    out.push((name.clone(), value.clone()));
                }
                // Sorted whatever map serde_json was built with, so the
                // injected parameters come out in a stable order.
                out.sort();
                out
            }
            Some(_) => return Err(JwtRejection::BadClaim("session")),
        };
        let max_connections = match claims.get(&names.max_connections) {
            None => None,
            Some(v) => Some(
                v.as_u64()
                    .and_then(|n| u32::try_from(n).ok())
                    .ok_or(JwtRejection::BadClaim("max_connections"))?,
            ),
        };

        let log_id = match jti.as_deref() {
            Some(j) if is_loggable_id(j) => format!("jwt:{j}"),
            // Hash of the signed part: stable for one token, reveals nothing
            // a replay could use.
            _ => {
                let d = digest::digest(&digest::SHA256, signing_input);
                format!("jwt:{}", &hex::encode(&d.as_ref()[..6]))
            }
        };
        let mut signature_hash = [0u8; 32];
        signature_hash.copy_from_slice(digest::digest(&digest::SHA256, token).as_ref());

        Ok(VerifiedJwt {
            jti,
            subject,
            role,
            databases,
            cidrs,
            session,
            max_connections,
            expires_at,
            not_before,
            log_id,
            signature_hash,
        })
    }
}

/// A verified token, mapped to tollgate's rules. Holds nothing secret: not
/// the token, not its signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedJwt {
    /// `jti`, for the revocation deny-list.
    pub jti: Option<String>,
    /// `sub`, for logs. Issuer-chosen text: escape it when logging.
    pub subject: Option<String>,
    /// The Postgres role the token is for.
    pub role: String,
    /// `["*"]` when the claim is absent.
    pub databases: Vec<String>,
    /// Raw CIDR strings; [`ANY_CIDRS`] when the claim is absent. Never empty.
    pub cidrs: Vec<String>,
    /// Start-up parameters to inject, sorted by name.
    pub session: Vec<(String, String)>,
    pub max_connections: Option<u32>,
    /// `exp`, without the leeway.
    pub expires_at: SystemTime,
    pub not_before: Option<SystemTime>,
    /// "jwt:" + jti (when it is a short plain id), else "jwt:" + the first 12
    /// hex digits of SHA-256 over header.payload. Safe to log.
    pub log_id: String,
    /// SHA-256 of the whole token: a cache key.
    pub signature_hash: [u8; 32],
}

/// Why a JWT was refused. Logged only; the client always gets the same
/// 28P01 bytes. Carries no token text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JwtRejection {
    Malformed,
    UnsupportedAlg,
    AlgNone,
    /// No configured key has this kid (or none is bound to the token's alg).
    UnknownKey,
    BadSignature,
    Expired,
    NotYetValid,
    WrongIssuer,
    WrongAudience,
    /// Names the rule ("role", "exp", ...), not the configured claim name.
    MissingClaim(&'static str),
    BadClaim(&'static str),
}

impl JwtRejection {
    /// A stable, low-cardinality name for logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            JwtRejection::Malformed => "jwt_malformed",
            JwtRejection::UnsupportedAlg => "jwt_alg_not_supported",
            JwtRejection::AlgNone => "jwt_alg_none",
            JwtRejection::UnknownKey => "jwt_key_unknown",
            JwtRejection::BadSignature => "jwt_bad_signature",
            JwtRejection::Expired => "jwt_expired",
            JwtRejection::NotYetValid => "jwt_not_yet_valid",
            JwtRejection::WrongIssuer => "jwt_wrong_issuer",
            JwtRejection::WrongAudience => "jwt_wrong_audience",
            JwtRejection::MissingClaim(_) => "jwt_missing_claim",
            JwtRejection::BadClaim(_) => "jwt_bad_claim",
        }
    }
}

impl fmt::Display for JwtRejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            JwtRejection::MissingClaim(c) | JwtRejection::BadClaim(c) => {
                write!(f, "{} {c}", self.as_str())
            }
            _ => f.write_str(self.as_str()),
        }
    }
}

impl std::error::Error for JwtRejection {}

// ---------------------------------------------------------------------------
// Token parsing helpers
// ---------------------------------------------------------------------------

/// Splits at exactly two dots. The signature may be empty here so that an
/// unsigned `alg: none` token is reported as such, not as "malformed".
fn split_compact(token: &[u8]) -> Result<[&[u8]; 3], JwtRejection> {
    let mut parts = token.split(|&b| b == b'.');
    let (Some(h), Some(p), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(JwtRejection::Malformed);
    };
    if h.is_empty() || p.is_empty() {
        return Err(JwtRejection::Malformed);
    }
    Ok([h, p, s])
}

/// Unpadded, canonical base64url (RFC 7515 §2): padding, other alphabets and
/// non-zero trailing bits are refused, so one signature has one spelling.
fn decode_b64(segment: &[u8]) -> Result<Vec<u8>, JwtRejection> {
    URL_SAFE_NO_PAD
        .decode(segment)
        .map_err(|_| JwtRejection::Malformed)
}

fn decode_object(segment: &[u8]) -> Result<BTreeMap<String, Value>, JwtRejection> {
    let json = decode_b64(segment)?;
    serde_json::from_slice::<StrictObject>(&json)
        .map(|o| o.0)
        .map_err(|_| JwtRejection::Malformed)
}

/// A JSON object whose top-level member names are unique: RFC 7519 §4 lets a
/// parser reject duplicates, and rejecting them means no two parsers can
/// disagree about which `aud` or `role` a token carries.
struct StrictObject(BTreeMap<String, Value>);

impl<'de> Deserialize<'de> for StrictObject {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> de::Visitor<'de> for Visitor {
            type Value = StrictObject;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<StrictObject, A::Error> {
                let mut out = BTreeMap::new();
                while let Some(name) = map.next_key::<String>()? {
                    let value: Value = map.next_value()?;
                    if out.insert(name, value).is_some() {
                        return Err(de::Error::custom("duplicate member"));
                    }
                }
                Ok(StrictObject(out))
            }
        }
        d.deserialize_map(Visitor)
    }
}

fn is_jwt_typ(typ: &str) -> bool {
    ["JWT", "application/jwt", "at+jwt", "application/at+jwt"]
        .iter()
        .any(|t| typ.eq_ignore_ascii_case(t))
}

/// A NumericDate (RFC 7519 §2): seconds since the epoch, possibly fractional.
fn numeric_date(v: &Value) -> Option<SystemTime> {
    let Value::Number(n) = v else { return None };
    let d = if let Some(secs) = n.as_u64() {
        if secs > MAX_NUMERIC_DATE {
            return None;
        }
        Duration::from_secs(secs)
    } else {
        // Negative, fractional or huge; NaN and infinities cannot occur in
        // JSON but are refused all the same.
        let secs = n.as_f64()?;
        if !(secs.is_finite() && (0.0..=MAX_NUMERIC_DATE as f64).contains(&secs)) {
            return None;
        }
        Duration::from_secs_f64(secs)
    };
    UNIX_EPOCH.checked_add(d)
}

fn optional_string(
    claims: &BTreeMap<String, Value>,
    name: &'static str,
) -> Result<Option<String>, JwtRejection> {
    match claims.get(name) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(JwtRejection::BadClaim(name)),
    }
}

/// A single string or a non-empty array of strings; `None` when absent. An
/// explicit empty list is refused rather than read as "nothing" or "anything".
fn string_list(v: Option<&Value>, rule: &'static str) -> Result<Option<Vec<String>>, JwtRejection> {
    match v {
        None => Ok(None),
        Some(Value::String(s)) if is_plain(s) => Ok(Some(vec![s.clone()])),
        Some(Value::Array(items)) if !items.is_empty() => items
            .iter()
            .map(|item| match item {
                Value::String(s) if is_plain(s) => Ok(s.clone()),
                _ => Err(JwtRejection::BadClaim(rule)),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some),
        Some(_) => Err(JwtRejection::BadClaim(rule)),
    }
}

/// Non-empty and free of NUL, which cannot travel in a start-up packet.
fn is_plain(s: &str) -> bool {
    !s.is_empty() && !s.contains('\0')
}

/// Whether a `jti` can go into a log line as it is: short, no spaces, quotes
/// or control characters (UUIDs and the usual random ids qualify).
fn is_loggable_id(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

// ---------------------------------------------------------------------------
// Key loading
// ---------------------------------------------------------------------------

fn entry_name(table: &str, index: usize, kid: Option<&str>) -> String {
    match kid {
        Some(kid) => format!("{table} #{} (kid \"{kid}\")", index + 1),
        None => format!("{table} #{}", index + 1),
    }
}

fn unknown_alg(name: &str, hmac: bool) -> String {
    let allowed = if hmac {
        "HS256, HS384 or HS512"
    } else {
        "RS256, PS256, ES256, ES384 or EdDSA"
    };
    format!("\"{name}\" is not supported; use {allowed}")
}

fn hmac_key(raw: JwtHmacKeyRaw, index: usize, base: &Path) -> Result<Key, JwtConfigError> {
    let what = entry_name("[[jwt.hmac]]", index, raw.kid.as_deref());
    let alg = match raw.alg.as_deref() {
        None => None,
        Some(name) => match JwtAlg::from_name(name) {
            Some(a) if a.hmac().is_some() => Some(a),
            _ => return Err(invalid(format!("{what} alg"), unknown_alg(name, true))),
        },
    };
    let secret = match (&raw.secret, &raw.secret_file, &raw.secret_env) {
        (Some(s), None, None) => Secret::new(s.0.as_bytes().to_vec()),
        (None, Some(f), None) => {
            let path = base.join(f);
            let mut bytes =
                Zeroizing::new(std::fs::read(&path).map_err(|source| JwtConfigError::Io {
                    what: format!("{what} secret_file"),
                    path: path.clone(),
                    source,
                })?);
            // Files usually end with a newline that is not part of the secret.
            let mut end = bytes.len();
            if bytes[..end].ends_with(b"\n") {
                end -= 1;
                if bytes[..end].ends_with(b"\r") {
                    end -= 1;
                }
            }
            bytes.truncate(end);
            Secret::new(bytes.to_vec())
        }
        (None, None, Some(var)) => std::env::var(var).map(Secret::from).map_err(|_| {
            invalid(
                format!("{what} secret_env"),
                format!("environment variable {var} is not set (or not UTF-8)"),
            )
        })?,
        _ => {
            return Err(invalid(
                what,
                "give exactly one of secret, secret_file and secret_env",
            ))
        }
    };
    let min = alg
        .and_then(JwtAlg::hmac)
        .map_or(MIN_HMAC_SECRET_LEN, |(_, len)| len);
    if secret.expose().len() < min {
        return Err(invalid(
            what,
            format!(
                "the secret is {} bytes; at least {min} are required (RFC 7518 §3.2)",
                secret.expose().len()
            ),
        ));
    }
    Ok(Key {
        kid: raw.kid,
        material: Material::Hmac { secret, alg },
    })
}

/// Reads a "BEGIN PUBLIC KEY" (SubjectPublicKeyInfo) PEM file and checks that
/// the key fits `alg`.
fn pem_public_key(path: &Path, alg: JwtAlg, what: &str) -> Result<Material, JwtConfigError> {
    let pem = std::fs::read(path).map_err(|source| JwtConfigError::Io {
        what: format!("{what} file"),
        path: path.to_owned(),
        source,
    })?;
    let bad = |message: String| invalid(format!("{what} file {}", path.display()), message);
    let spki = SubjectPublicKeyInfoDer::from_pem_slice(&pem)
        .map_err(|e| bad(format!("no \"BEGIN PUBLIC KEY\" PEM block ({e})")))?;
    let key = der::parse_spki(spki.as_ref())
        .map_err(|e| bad(format!("not a valid SubjectPublicKeyInfo: {e}")))?;
    let material = match key {
        der::SpkiKey::Rsa { n, e } => rsa_material(n, e, alg),
        der::SpkiKey::Ec { curve, point } => ec_material(curve, point, alg),
        der::SpkiKey::Ed25519(public) => ed25519_material(public, alg),
    };
    material.map_err(bad)
}

fn rsa_material(n: &[u8], e: &[u8], alg: JwtAlg) -> Result<Material, String> {
    if !matches!(alg, JwtAlg::Rs256 | JwtAlg::Ps256) {
        return Err(format!("an RSA key cannot be used for {alg}"));
    }
    let n = strip_leading_zeros(n);
    let e = strip_leading_zeros(e);
    // ring's RSA_*_2048_8192 verifiers refuse other sizes at verify time;
    // saying so at load time is kinder.
    let bits = match n.first() {
        Some(top) => n.len() * 8 - top.leading_zeros() as usize,
        None => 0,
    };
    if !(2048..=8192).contains(&bits) {
        return Err(format!(
            "the RSA modulus has {bits} bits; 2048 to 8192 are supported"
        ));
    }
    // ring accepts odd exponents from 3 to 2^33 - 1.
    if e.is_empty() || e.len() > 5 || e[e.len() - 1] & 1 == 0 || e == [1] {
        return Err("the RSA public exponent is not usable".into());
    }
    Ok(Material::Rsa {
        n: n.to_vec(),
        e: e.to_vec(),
        alg,
    })
}

fn ec_material(curve: der::Curve, point: &[u8], alg: JwtAlg) -> Result<Material, String> {
    let (fits, coordinate_len) = match curve {
        der::Curve::P256 => (alg == JwtAlg::Es256, 32),
        der::Curve::P384 => (alg == JwtAlg::Es384, 48),
    };
    if !fits {
        return Err(format!("a {} key cannot be used for {alg}", curve.name()));
    }
    // Uncompressed form only (SEC 1 §2.3.3), which is what ring verifies.
    if point.len() != 1 + 2 * coordinate_len || point[0] != 0x04 {
        return Err(format!("not an uncompressed {} point", curve.name()));
    }
    Ok(Material::Ec {
        point: point.to_vec(),
        alg,
    })
}

fn ed25519_material(public: &[u8], alg: JwtAlg) -> Result<Material, String> {
    if alg != JwtAlg::EdDsa {
        return Err(format!("an Ed25519 key cannot be used for {alg}"));
    }
    let public = <[u8; 32]>::try_from(public).map_err(|_| "an Ed25519 key is 32 bytes")?;
    Ok(Material::Ed25519 { public })
}

fn strip_leading_zeros(mut b: &[u8]) -> &[u8] {
    while let [0, rest @ ..] = b {
        b = rest;
    }
    b
}

struct LoadedJwks {
    keys: Vec<Key>,
    stamp: FileStamp,
    content_sha256: [u8; 32],
}

/// A JSON Web Key Set (RFC 7517 §5). Members we do not use (`x5c`, ...) are
/// ignored: a JWKS is published by an identity provider, not written by us.
#[derive(Deserialize)]
struct RawJwks {
    keys: Vec<RawJwk>,
}

#[derive(Deserialize)]
struct RawJwk {
    kty: String,
    kid: Option<String>,
    alg: Option<String>,
    #[serde(rename = "use")]
    use_: Option<String>,
    key_ops: Option<Vec<String>>,
    crv: Option<String>,
    x: Option<String>,
    y: Option<String>,
    n: Option<String>,
    e: Option<String>,
    /// Present only in private keys.
    d: Option<IgnoredAny>,
}

fn load_jwks(
    path: &Path,
    only_alg: Option<JwtAlg>,
    what: &str,
) -> Result<LoadedJwks, JwtConfigError> {
    let io = |source| JwtConfigError::Io {
        what: format!("{what} jwks_file"),
        path: path.to_owned(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    // The stamp comes from the open file, so a rename that lands while we
    // read is seen as a change on the next tick.
    let stamp = FileStamp::of(&file.metadata().map_err(io)?);
    let mut text = Vec::new();
    file.take(MAX_JWKS_FILE_LEN + 1)
        .read_to_end(&mut text)
        .map_err(io)?;
    let whatfile = format!("{what} jwks_file {}", path.display());
    if text.len() as u64 > MAX_JWKS_FILE_LEN {
        return Err(invalid(
            whatfile,
            format!("larger than {MAX_JWKS_FILE_LEN} bytes"),
        ));
    }
    let mut content_sha256 = [0u8; 32];
    content_sha256.copy_from_slice(digest::digest(&digest::SHA256, &text).as_ref());
    let jwks: RawJwks = serde_json::from_slice(&text)
        .map_err(|e| invalid(&whatfile, format!("not a JWKS: {e}")))?;
    let mut keys = Vec::new();
    for (i, jwk) in jwks.keys.into_iter().enumerate() {
        let name = match &jwk.kid {
            Some(kid) => format!("{whatfile} key #{} (kid \"{kid}\")", i + 1),
            None => format!("{whatfile} key #{}", i + 1),
        };
        if jwk.d.is_some() {
            return Err(invalid(
                name,
                "is a private key; a JWKS file for tollgate holds public keys only",
            ));
        }
        match jwk_material(&jwk, only_alg) {
            Ok(Jwk::Use(material)) => keys.push(Key {
                kid: jwk.kid,
                material,
            }),
            Ok(Jwk::Skip(why)) => tracing::warn!(key = %name, "JWKS key not used: {why}"),
            Err(message) => return Err(invalid(name, message)),
        }
    }
    if keys.is_empty() {
        return Err(invalid(whatfile, "holds no usable signing key"));
    }
    if keys.len() > MAX_KEYS {
        return Err(invalid(
            whatfile,
            format!("{} keys; at most {MAX_KEYS}", keys.len()),
        ));
    }
    Ok(LoadedJwks {
        keys,
        stamp,
        content_sha256,
    })
}

enum Jwk {
    Use(Material),
    /// Not ours to use: an encryption key, a symmetric key, an algorithm or
    /// curve we do not verify, another algorithm than the entry's `alg`.
    /// Publishers list such keys legitimately, so they are skipped (with a
    /// log line), not fatal.
    Skip(&'static str),
}

/// One JWK's material; `Err` for a key of a supported kind that is broken.
fn jwk_material(jwk: &RawJwk, only_alg: Option<JwtAlg>) -> Result<Jwk, String> {
    let skip = |why: &'static str| Ok(Jwk::Skip(why));
    if jwk.use_.as_deref().is_some_and(|u| u != "sig") {
        return skip("not a signature key (use)");
    }
    if jwk
        .key_ops
        .as_ref()
        .is_some_and(|ops| !ops.iter().any(|o| o == "verify"))
    {
        return skip("not a verification key (key_ops)");
    }
    let declared = match jwk.alg.as_deref() {
        None => None,
        Some(name) => match JwtAlg::from_name(name) {
            Some(a) if a.hmac().is_none() => Some(a),
            _ => return skip("algorithm not supported"),
        },
    };
    let b64 = |member: &Option<String>, name: &str| -> Result<Vec<u8>, String> {
        let v = member
            .as_deref()
            .ok_or_else(|| format!("\"{name}\" is missing"))?;
        JWK_B64
            .decode(v)
            .map_err(|_| format!("\"{name}\" is not base64url"))
    };
    // The algorithm a key serves: what it declares, else what its type
    // implies. Only RSA is ambiguous; RS256 is what issuers mean by default.
    let (material, alg) = match (jwk.kty.as_str(), jwk.crv.as_deref()) {
        ("RSA", _) => {
            let alg = declared.or(only_alg).unwrap_or(JwtAlg::Rs256);
            let (n, e) = (b64(&jwk.n, "n")?, b64(&jwk.e, "e")?);
            (rsa_material(&n, &e, alg)?, alg)
        }
        ("EC", Some(crv @ ("P-256" | "P-384"))) => {
            let (curve, alg, len) = if crv == "P-256" {
                (der::Curve::P256, JwtAlg::Es256, 32)
            } else {
                (der::Curve::P384, JwtAlg::Es384, 48)
            };
            if declared.is_some_and(|d| d != alg) {
                return Err(format!("alg does not fit a {crv} key"));
            }
            let (x, y) = (b64(&jwk.x, "x")?, b64(&jwk.y, "y")?);
            // RFC 7518 §6.2.1.2: coordinates are full length, never shortened.
            if x.len() != len || y.len() != len {
                return Err(format!("x and y of a {crv} key are {len} bytes each"));
            }
            let mut point = Vec::with_capacity(1 + 2 * len);
            point.push(0x04);
            point.extend_from_slice(&x);
            point.extend_from_slice(&y);
            (ec_material(curve, &point, alg)?, alg)
        }
        ("OKP", Some("Ed25519")) => {
            if declared.is_some_and(|d| d != JwtAlg::EdDsa) {
                return Err("alg does not fit an Ed25519 key".into());
            }
            let x = b64(&jwk.x, "x")?;
            (ed25519_material(&x, JwtAlg::EdDsa)?, JwtAlg::EdDsa)
        }
        ("oct", _) => return skip("symmetric keys are configured as [[jwt.hmac]], not in a JWKS"),
        _ => return skip("key type or curve not supported"),
    };
    if only_alg.is_some_and(|only| only != alg) {
        return skip("algorithm differs from the entry's alg");
    }
    Ok(Jwk::Use(material))
}

// ---------------------------------------------------------------------------
// DER
// ---------------------------------------------------------------------------

/// Just enough DER (X.690 §10) to take a SubjectPublicKeyInfo (RFC 5280
/// §4.1.2.7) apart into what ring verifies with: RSA modulus and exponent
/// (RFC 8017 A.1.1), an EC point (RFC 5480), an Ed25519 key (RFC 8410).
/// Definite lengths in minimal form only, single-byte tags, no trailing bytes.
mod der {
    use std::fmt;

    const INTEGER: u8 = 0x02;
    const BIT_STRING: u8 = 0x03;
    const NULL: u8 = 0x05;
    const OID: u8 = 0x06;
    const SEQUENCE: u8 = 0x30;

    /// 1.2.840.113549.1.1.1
    const OID_RSA_ENCRYPTION: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];
    /// 1.2.840.10045.2.1
    const OID_EC_PUBLIC_KEY: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
    /// 1.2.840.10045.3.1.7 (prime256v1)
    const OID_P256: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
    /// 1.3.132.0.34 (secp384r1)
    const OID_P384: &[u8] = &[0x2b, 0x81, 0x04, 0x00, 0x22];
    /// 1.3.101.112
    const OID_ED25519: &[u8] = &[0x2b, 0x65, 0x70];

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub(super) enum DerError {
        Truncated,
        UnexpectedTag,
        BadLength,
        TrailingData,
        BadValue,
        UnsupportedKey,
    }

    impl fmt::Display for DerError {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(match self {
                DerError::Truncated => "truncated",
                DerError::UnexpectedTag => "unexpected element",
                DerError::BadLength => "bad length encoding",
                DerError::TrailingData => "trailing data",
                DerError::BadValue => "bad value",
                DerError::UnsupportedKey => {
                    "unsupported key type (use RSA, EC P-256/P-384 or Ed25519)"
                }
            })
        }
    }

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub(super) enum Curve {
        P256,
        P384,
    }

    impl Curve {
        pub(super) fn name(self) -> &'static str {
            match self {
                Curve::P256 => "P-256",
                Curve::P384 => "P-384",
            }
        }
    }

    #[derive(Debug, PartialEq, Eq)]
    pub(super) enum SpkiKey<'a> {
        /// Positive integers, without the sign byte.
        Rsa {
            n: &'a [u8],
            e: &'a [u8],
        },
        Ec {
            curve: Curve,
            point: &'a [u8],
        },
        Ed25519(&'a [u8]),
    }

    pub(super) struct Reader<'a> {
        rest: &'a [u8],
    }

    impl<'a> Reader<'a> {
        pub(super) fn new(input: &'a [u8]) -> Self {
            Reader { rest: input }
        }

        /// The contents of the next element, which must have tag `tag`.
        pub(super) fn read(&mut self, tag: u8) -> Result<&'a [u8], DerError> {
            let [t, first, rest @ ..] = self.rest else {
                return Err(DerError::Truncated);
            };
            if *t != tag {
                return Err(DerError::UnexpectedTag);
            }
            let (len, rest) = match *first {
                n @ 0..=0x7f => (usize::from(n), rest),
                // Long form, minimal: one byte for 128..=255, two for
                // 256..=65535. Nothing in a public key is bigger; 0x80 (the
                // indefinite form) is BER, not DER.
                0x81 => match rest {
                    [n, rest @ ..] if *n >= 0x80 => (usize::from(*n), rest),
                    [_, ..] => return Err(DerError::BadLength),
                    [] => return Err(DerError::Truncated),
                },
                0x82 => match rest {
                    [hi, lo, rest @ ..] if *hi != 0 => {
                        ((usize::from(*hi) << 8) | usize::from(*lo), rest)
                    }
                    [_, _, ..] => return Err(DerError::BadLength),
                    _ => return Err(DerError::Truncated),
                },
                _ => return Err(DerError::BadLength),
            };
            if rest.len() < len {
                return Err(DerError::Truncated);
            }
            let (value, rest) = rest.split_at(len);
            self.rest = rest;
            Ok(value)
        }

        pub(super) fn peek_tag(&self) -> Option<u8> {
            self.rest.first().copied()
        }

        pub(super) fn finish(self) -> Result<(), DerError> {
            if self.rest.is_empty() {
                Ok(())
            } else {
                Err(DerError::TrailingData)
            }
        }
    }

    /// The contents of a BIT STRING that holds whole bytes.
    fn bit_string_bytes(value: &[u8]) -> Result<&[u8], DerError> {
        match value {
            [0, bytes @ ..] => Ok(bytes),
            _ => Err(DerError::BadValue),
        }
    }

    /// A positive INTEGER in minimal two's complement, without its sign byte.
    pub(super) fn positive_integer(value: &[u8]) -> Result<&[u8], DerError> {
        match value {
            [] => Err(DerError::BadValue),
            [b, ..] if b & 0x80 != 0 => Err(DerError::BadValue),
            [0] => Err(DerError::BadValue),
            [0, next, ..] if next & 0x80 == 0 => Err(DerError::BadValue),
            [0, rest @ ..] => Ok(rest),
            _ => Ok(value),
        }
    }

    pub(super) fn parse_spki(input: &[u8]) -> Result<SpkiKey<'_>, DerError> {
        let mut outer = Reader::new(input);
        let spki = outer.read(SEQUENCE)?;
        outer.finish()?;
        let mut spki = Reader::new(spki);
        let algorithm = spki.read(SEQUENCE)?;
        let public_key = bit_string_bytes(spki.read(BIT_STRING)?)?;
        spki.finish()?;

        let mut algorithm = Reader::new(algorithm);
        let oid = algorithm.read(OID)?;
        match oid {
            OID_RSA_ENCRYPTION => {
                // RFC 3279 §2.3.1 says NULL parameters; some encoders omit them.
                if algorithm.peek_tag().is_some() && !algorithm.read(NULL)?.is_empty() {
                    return Err(DerError::BadValue);
                }
                algorithm.finish()?;
                let mut outer = Reader::new(public_key);
                let mut rsa = Reader::new(outer.read(SEQUENCE)?);
                outer.finish()?;
                let n = positive_integer(rsa.read(INTEGER)?)?;
                let e = positive_integer(rsa.read(INTEGER)?)?;
                rsa.finish()?;
                Ok(SpkiKey::Rsa { n, e })
            }
            OID_EC_PUBLIC_KEY => {
                let curve = match algorithm.read(OID)? {
                    OID_P256 => Curve::P256,
                    OID_P384 => Curve::P384,
                    _ => return Err(DerError::UnsupportedKey),
                };
                algorithm.finish()?;
                Ok(SpkiKey::Ec {
                    curve,
                    point: public_key,
                })
            }
            OID_ED25519 => {
                // RFC 8410 §3: the parameters MUST be absent.
                algorithm.finish()?;
                Ok(SpkiKey::Ed25519(public_key))
            }
            _ => Err(DerError::UnsupportedKey),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::rand::SystemRandom;
    use ring::signature::{EcdsaKeyPair, Ed25519KeyPair, KeyPair, RsaKeyPair};
    use rustls_pki_types::PrivatePkcs8KeyDer;
    use serde_json::json;

    /// A throwaway 2048-bit key for these tests only, made with
    /// `openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048`
    /// (ring cannot generate RSA keys).
    const RSA_TEST_KEY_PEM: &str = "-----BEGIN PRIVATE KEY-----
MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQCpKAuMbOKwlSnt
Yy4BB3JyHDTrUt7EP3YIKEvOZqyPVJlY+cOhXXYKHBbspKSJLp3uHNneMQMVqNDC
x0vQUlXsMOH4O1jEC+5zTTH+SERNhGZHm4+ZvVmssq0B6SOv3baAdzad8+HeZEKm
cEpFs7e0YzxAaU3LCFkK5uAA4SX03lweiJvZH50eAsDSpgyhdfsmGanpz+FO61Pe
TZZwaiYC3wYMEqmarsLwagoKtzGWJGATP7bEp3WwjCrrhOlMPjTkL+j7dbrXClAy
eG93I8G4k03QCRDcD0pxGrqDZLn5CjwA5oLVVgsiktaXBwfxliMOU4kXJPewMpPk
kY4+s24pAgMBAAECggEACPTwCPClCjZDwOhHrHyb9eiCHCnIVjo0AkI7+AMIxRLK
MeNmapoby3Tpo9XN895DijL94vLTwnxXXXuXC0H+Kbem53F2WvR0x6cr7AEgmL2C
JZgvljOSrCnOg7ONal0CMl2IR1HSwRIBqMrOVqV+/IQP/IB27YwUxuvVqvDrr8JW
StkHa1Bsk+dqbfIoia6CeToRY9ovnCS1QV+SwPVfmtj330uPO8o77QRVUtfBrjZj
qRCR/ixy3zloZU57pvevYuFaVubCG1f7xDVuV1jXf0NTTOSP2lwoFjLWjTic4s9g
HpkCgzH0a74QHNfZ88walvqvvXjiql0IXnUMqLwReQKBgQDh1oJdlQoDnrcU8a2n
jvjw5oM59p/U6pjyjkPrYVMqW67UgxAB2g103x5xQSgcPxGAa57wePeEz2PPx9Eq
HmF2E6Uk8AasZdlla+OcTOW1cTQwhp+zfsX8zvvtqqG/PGt9ZfSecLEaJnm+yrp8
CpgnQxI4yVeoD8S2qjqa6GeJ3QKBgQC/v5KAGBp5/B4kWIkP8HB2eoQPPb2bUyV8
OJQnINWz5NGwJRRSTJCnTOurJLwbYSBI7ixx2JIlZ4yKmIEB2Qlv7FxleadeQW33
onrqP1C2HjhUlk3atU66ukk8wQUFkxqvp/sLRJrvzVpBnwfLSSpweFPjUbPfzq6C
BbKBQLnevQKBgHjxYMVvIHrJz7BGsUHvnj+coyAyhGwI6rnTGGqAp4IisWEbg0IK
nXQ+XNY4F5vw5pWIjQipL50PV5uZndlZhcYvRRyf8mL29FKNUcqNn+LoahOmtPXy
aWM3EdG4tIBugf4Y0MTdAutHOaHEfdQZ9FvqXmLM6MWXFDjitxnoZjJ9AoGAIXTg
r/8Ep6Io9DiKecB/Lv0Di9E/AxoH4VvR5d3hy8iyGaTuncmEN9zBBhSbyb8xref4
00hxf5tIt2oSoGrpLaE1IfOPE3AhKuMrxTGU+KHfPEsZfH7EJOqaGsKnCKj5MAsE
T5wB2LOg+vAvoPW8NPGZ2YEI/JUId+FcmxbbF5UCgYEAhnDEomdJg8ionkvbIwP4
8K55Uwv0gifTjmrwRAo/GRRTPK59+0oRFKNswGDcMeya30c4bPt3X+8+dLmso0EG
UGd3T8r66PsVazPeK1VeMh1tk3reHXAZF2kt1USwydH+mFxvXWScteftV9SoxJnR
YqTWLKOlN8sH32E2gkNl3es=
-----END PRIVATE KEY-----
";

    /// `openssl pkey -in key.pem -pubout` of the key above.
    const RSA_TEST_PUB_PEM: &str = "-----BEGIN PUBLIC KEY-----
MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAqSgLjGzisJUp7WMuAQdy
chw061LexD92CChLzmasj1SZWPnDoV12ChwW7KSkiS6d7hzZ3jEDFajQwsdL0FJV
7DDh+DtYxAvuc00x/khETYRmR5uPmb1ZrLKtAekjr922gHc2nfPh3mRCpnBKRbO3
tGM8QGlNywhZCubgAOEl9N5cHoib2R+dHgLA0qYMoXX7Jhmp6c/hTutT3k2WcGom
At8GDBKpmq7C8GoKCrcxliRgEz+2xKd1sIwq64TpTD405C/o+3W61wpQMnhvdyPB
uJNN0AkQ3A9KcRq6g2S5+Qo8AOaC1VYLIpLWlwcH8ZYjDlOJFyT3sDKT5JGOPrNu
KQIDAQAB
-----END PUBLIC KEY-----
";

    /// `openssl rsa -pubin -modulus` of the key above: a second opinion on
    /// what the DER reader must find.
    const RSA_TEST_MODULUS_HEX: &str = "A9280B8C6CE2B09529ED632E010772721C34EB52DEC43F7608284BCE66AC8F549958F9C3A15D760A1C16ECA4A4892E9DEE1CD9DE310315A8D0C2C74BD05255EC30E1F83B58C40BEE734D31FE48444D8466479B8F99BD59ACB2AD01E923AFDDB68077369DF3E1DE6442A6704A45B3B7B4633C40694DCB08590AE6E000E125F4DE5C1E889BD91F9D1E02C0D2A60CA175FB2619A9E9CFE14EEB53DE4D96706A2602DF060C12A99AAEC2F06A0A0AB731962460133FB6C4A775B08C2AEB84E94C3E34E42FE8FB75BAD70A5032786F7723C1B8934DD00910DC0F4A711ABA8364B9F90A3C00E682D5560B2292D6970707F196230E53891724F7B03293E4918E3EB36E29";

    /// 40 bytes: enough for HS256, too short for HS384 (48) and HS512 (64).
    const HS256_SECRET: &str = "hs256-test-secret-0123456789abcdefghijkl";
    const HS512_SECRET: &str = "hs512-test-secret-0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJ";

    // SubjectPublicKeyInfo headers, written out by hand from RFC 5480 and
    // RFC 8410 so that the key files do not come from the code under test.
    const P256_SPKI_PREFIX: &str = "3059301306072a8648ce3d020106082a8648ce3d030107034200";
    const P384_SPKI_PREFIX: &str = "3076301006072a8648ce3d020106052b81040022036200";
    const ED25519_SPKI_PREFIX: &str = "302a300506032b6570032100";

    const ISSUER: &str = "https://auth.example.com";

    fn b64(bytes: &[u8]) -> String {
        URL_SAFE_NO_PAD.encode(bytes)
    }

    fn spki_der(prefix_hex: &str, key: &[u8]) -> Vec<u8> {
        let mut der = hex::decode(prefix_hex).unwrap();
        der.extend_from_slice(key);
        der
    }

    fn pem(der: &[u8]) -> String {
        let body = base64::engine::general_purpose::STANDARD.encode(der);
        let mut pem = String::from("-----BEGIN PUBLIC KEY-----\n");
        for line in body.as_bytes().chunks(64) {
            pem.push_str(std::str::from_utf8(line).unwrap());
            pem.push('\n');
        }
        pem.push_str("-----END PUBLIC KEY-----\n");
        pem
    }

    fn secs(t: SystemTime) -> u64 {
        t.duration_since(UNIX_EPOCH).unwrap().as_secs()
    }

    /// A compact JWS over the JSON text of `header` and `claims`.
    fn jws_text(header: &str, claims: &str, sign: impl FnOnce(&[u8]) -> Vec<u8>) -> String {
        let input = format!("{}.{}", b64(header.as_bytes()), b64(claims.as_bytes()));
        let sig = sign(input.as_bytes());
        format!("{input}.{}", b64(&sig))
    }

    fn hmac_sign(alg: hmac::Algorithm, secret: &[u8], msg: &[u8]) -> Vec<u8> {
        hmac::sign(&hmac::Key::new(alg, secret), msg)
            .as_ref()
            .to_vec()
    }

    fn base_config(top: &str) -> String {
        format!(
            r#"
[jwt]
issuer = "{ISSUER}"
audience = "tollgate"
{top}

[[jwt.hmac]]
kid = "hs256"
secret = "{HS256_SECRET}"

[[jwt.hmac]]
kid = "hs512"
alg = "HS512"
secret_file = "hs512.key"

[[jwt.public_key]]
kid = "es256"
alg = "ES256"
file = "es256.pub.pem"

[[jwt.public_key]]
kid = "es384"
alg = "ES384"
file = "es384.pub.pem"

[[jwt.public_key]]
kid = "ed"
alg = "EdDSA"
file = "ed25519.pub.pem"

[[jwt.public_key]]
kid = "rs"
alg = "RS256"
file = "rsa.pub.pem"

[[jwt.public_key]]
kid = "ps"
alg = "PS256"
file = "rsa.pub.pem"
"#
        )
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct ConfigFile {
        jwt: JwtConfigRaw,
    }

    struct Fx {
        dir: tempfile::TempDir,
        rng: SystemRandom,
        es256: EcdsaKeyPair,
        es384: EcdsaKeyPair,
        ed: Ed25519KeyPair,
        rsa: RsaKeyPair,
        v: JwtVerifier,
        now: SystemTime,
    }

    fn ec_key(alg: &'static signature::EcdsaSigningAlgorithm, rng: &SystemRandom) -> EcdsaKeyPair {
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(alg, rng).unwrap();
        EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), rng).unwrap()
    }

    impl Fx {
        fn new() -> Fx {
            Fx::with_top("")
        }

        /// The standard fixture, with `top` added to the `[jwt]` table.
        fn with_top(top: &str) -> Fx {
            assert_eq!(HS512_SECRET.len(), 64);
            let rng = SystemRandom::new();
            let es256 = ec_key(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, &rng);
            let es384 = ec_key(&signature::ECDSA_P384_SHA384_FIXED_SIGNING, &rng);
            let ed_pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
            let ed = Ed25519KeyPair::from_pkcs8(ed_pkcs8.as_ref()).unwrap();
            let rsa_der = PrivatePkcs8KeyDer::from_pem_slice(RSA_TEST_KEY_PEM.as_bytes()).unwrap();
            let rsa = RsaKeyPair::from_pkcs8(rsa_der.secret_pkcs8_der()).unwrap();

            let dir = tempfile::tempdir().unwrap();
            let write =
                |name: &str, text: &str| std::fs::write(dir.path().join(name), text).unwrap();
            // The trailing newline is not part of the secret.
            write("hs512.key", &format!("{HS512_SECRET}\n"));
            write(
                "es256.pub.pem",
                &pem(&spki_der(P256_SPKI_PREFIX, es256.public_key().as_ref())),
            );
            write(
                "es384.pub.pem",
                &pem(&spki_der(P384_SPKI_PREFIX, es384.public_key().as_ref())),
            );
            write(
                "ed25519.pub.pem",
                &pem(&spki_der(ED25519_SPKI_PREFIX, ed.public_key().as_ref())),
            );
            write("rsa.pub.pem", RSA_TEST_PUB_PEM);

            let mut fx = Fx {
                rng,
                es256,
                es384,
                ed,
                rsa,
                v: JwtVerifier {
                    issuer: None,
                    audience: String::new(),
                    leeway: Duration::ZERO,
                    max_token_len: 0,
                    claims: ClaimNames::from_raw(JwtClaimNamesRaw::default()).unwrap(),
                    keys: Vec::new().into(),
                    jwks: Vec::new(),
                },
                dir,
                now: UNIX_EPOCH + Duration::from_secs(1_700_000_000),
            };
            fx.v = fx.load(&base_config(top)).unwrap();
            fx
        }

        fn load(&self, toml_text: &str) -> Result<JwtVerifier, JwtConfigError> {
            let file: ConfigFile = toml::from_str(toml_text).unwrap();
            JwtVerifier::from_raw(file.jwt, self.dir.path())
        }

        fn write(&self, name: &str, text: &str) {
            std::fs::write(self.dir.path().join(name), text).unwrap();
        }

        fn sign(&self, alg: JwtAlg, msg: &[u8]) -> Vec<u8> {
            match alg {
                JwtAlg::Hs256 => hmac_sign(hmac::HMAC_SHA256, HS256_SECRET.as_bytes(), msg),
                JwtAlg::Hs384 => hmac_sign(hmac::HMAC_SHA384, HS256_SECRET.as_bytes(), msg),
                JwtAlg::Hs512 => hmac_sign(hmac::HMAC_SHA512, HS512_SECRET.as_bytes(), msg),
                JwtAlg::Es256 => self.es256.sign(&self.rng, msg).unwrap().as_ref().to_vec(),
                JwtAlg::Es384 => self.es384.sign(&self.rng, msg).unwrap().as_ref().to_vec(),
                JwtAlg::EdDsa => self.ed.sign(msg).as_ref().to_vec(),
                JwtAlg::Rs256 | JwtAlg::Ps256 => {
                    let padding: &'static dyn signature::RsaEncoding = if alg == JwtAlg::Rs256 {
                        &signature::RSA_PKCS1_SHA256
                    } else {
                        &signature::RSA_PSS_SHA256
                    };
                    let mut sig = vec![0; self.rsa.public().modulus_len()];
                    self.rsa.sign(padding, &self.rng, msg, &mut sig).unwrap();
                    sig
                }
            }
        }

        fn claims(&self) -> Value {
            json!({
                "iss": ISSUER,
                "aud": "tollgate",
                "exp": secs(self.now) + 300,
                "iat": secs(self.now),
                "sub": "alice",
                "jti": "id-1",
                "role": "app",
            })
        }

        fn header(alg: JwtAlg, kid: Option<&str>) -> Value {
            let mut h = json!({"alg": alg.name(), "typ": "JWT"});
            if let Some(kid) = kid {
                h["kid"] = json!(kid);
            }
            h
        }

        /// A token signed with `alg`'s fixture key, over `claims`.
        fn token_for(&self, alg: JwtAlg, kid: Option<&str>, claims: &Value) -> String {
            jws_text(
                &Fx::header(alg, kid).to_string(),
                &claims.to_string(),
                |m| self.sign(alg, m),
            )
        }

        fn token(&self, alg: JwtAlg, kid: Option<&str>) -> String {
            self.token_for(alg, kid, &self.claims())
        }

        /// The default token, with `edit` applied to its claims.
        fn token_with(&self, edit: impl FnOnce(&mut serde_json::Map<String, Value>)) -> String {
            let mut claims = self.claims();
            edit(claims.as_object_mut().unwrap());
            self.token_for(JwtAlg::Es256, Some("es256"), &claims)
        }

        fn check(&self, token: &str) -> Result<VerifiedJwt, JwtRejection> {
            self.v.verify(token.as_bytes(), self.now)
        }
    }

    const EVERY_ALG: [(JwtAlg, &str); 7] = [
        (JwtAlg::Hs256, "hs256"),
        (JwtAlg::Hs512, "hs512"),
        (JwtAlg::Es256, "es256"),
        (JwtAlg::Es384, "es384"),
        (JwtAlg::EdDsa, "ed"),
        (JwtAlg::Rs256, "rs"),
        (JwtAlg::Ps256, "ps"),
    ];

    #[test]
    fn every_algorithm_verifies_with_and_without_kid() {
        let fx = Fx::new();
        for (alg, kid) in EVERY_ALG {
            for kid in [Some(kid), None] {
                let token = fx.token(alg, kid);
                assert!(looks_like_jwt(token.as_bytes()), "{alg}");
                let ok = fx
                    .check(&token)
                    .unwrap_or_else(|e| panic!("{alg} kid {kid:?}: {e}"));
                assert_eq!(ok.role, "app");
                assert_eq!(ok.subject.as_deref(), Some("alice"));
                assert_eq!(ok.jti.as_deref(), Some("id-1"));
                assert_eq!(ok.log_id, "jwt:id-1");
                assert_eq!(ok.databases, vec!["*".to_string()]);
                assert_eq!(ok.cidrs, vec!["0.0.0.0/0".to_string(), "::/0".to_string()]);
                assert!(ok.session.is_empty());
                assert_eq!(ok.max_connections, None);
                assert_eq!(ok.expires_at, fx.now + Duration::from_secs(300));
                assert_eq!(ok.not_before, None);
            }
        }
    }

    #[test]
    fn hmac_key_without_alg_serves_only_hashes_its_length_allows() {
        let fx = Fx::new();
        // The 40-byte "hs256" secret may not sign HS384 (RFC 7518 §3.2).
        let token = fx.token(JwtAlg::Hs384, Some("hs256"));
        assert_eq!(fx.check(&token), Err(JwtRejection::UnknownKey));
        // The HS512-bound key refuses HS256 even with the right secret.
        let claims = fx.claims().to_string();
        let header = Fx::header(JwtAlg::Hs256, Some("hs512")).to_string();
        let token = jws_text(&header, &claims, |m| {
            hmac_sign(hmac::HMAC_SHA256, HS512_SECRET.as_bytes(), m)
        });
        assert_eq!(fx.check(&token), Err(JwtRejection::UnknownKey));
    }

    #[test]
    fn expiry_and_not_before_honour_the_leeway() {
        let fx = Fx::new();
        let now = secs(fx.now);
        let with_exp = |exp: Value| fx.token_with(|c| drop(c.insert("exp".into(), exp)));
        assert!(fx.check(&with_exp(json!(now - 29))).is_ok());
        assert_eq!(
            fx.check(&with_exp(json!(now - 30))),
            Err(JwtRejection::Expired)
        );
        assert_eq!(
            fx.check(&with_exp(json!(now - 3600))),
            Err(JwtRejection::Expired)
        );
        let frac = fx.check(&with_exp(json!(now as f64 + 10.5))).unwrap();
        assert_eq!(frac.expires_at, fx.now + Duration::from_millis(10_500));
        for bad in [
            json!("soon"),
            json!(-1),
            json!(1e300),
            json!(null),
            json!([now]),
        ] {
            assert_eq!(fx.check(&with_exp(bad)), Err(JwtRejection::BadClaim("exp")));
        }
        let no_exp = fx.token_with(|c| drop(c.remove("exp")));
        assert_eq!(fx.check(&no_exp), Err(JwtRejection::MissingClaim("exp")));

        let with_nbf = |nbf: Value| fx.token_with(|c| drop(c.insert("nbf".into(), nbf)));
        let ok = fx.check(&with_nbf(json!(now + 29))).unwrap();
        assert_eq!(ok.not_before, Some(fx.now + Duration::from_secs(29)));
        assert_eq!(
            fx.check(&with_nbf(json!(now + 31))),
            Err(JwtRejection::NotYetValid)
        );
        assert_eq!(
            fx.check(&with_nbf(json!("later"))),
            Err(JwtRejection::BadClaim("nbf"))
        );

        // A configured leeway of zero is exact.
        let strict = Fx::with_top("leeway = \"0s\"");
        let token = strict.token_with(|c| drop(c.insert("exp".into(), json!(secs(strict.now)))));
        assert_eq!(strict.check(&token), Err(JwtRejection::Expired));
        let token =
            strict.token_with(|c| drop(c.insert("nbf".into(), json!(secs(strict.now) + 1))));
        assert_eq!(strict.check(&token), Err(JwtRejection::NotYetValid));
    }

    #[test]
    fn issuer_and_audience_are_checked() {
        let fx = Fx::new();
        let set = |name: &'static str, v: Value| fx.token_with(|c| drop(c.insert(name.into(), v)));
        let unset = |name: &'static str| fx.token_with(|c| drop(c.remove(name)));
        assert_eq!(
            fx.check(&set("iss", json!("https://evil.example.com"))),
            Err(JwtRejection::WrongIssuer)
        );
        assert_eq!(
            fx.check(&unset("iss")),
            Err(JwtRejection::MissingClaim("iss"))
        );
        assert_eq!(
            fx.check(&set("iss", json!(["x"]))),
            Err(JwtRejection::BadClaim("iss"))
        );
        assert_eq!(
            fx.check(&set("aud", json!("billing"))),
            Err(JwtRejection::WrongAudience)
        );
        assert_eq!(
            fx.check(&set("aud", json!(["billing", "crm"]))),
            Err(JwtRejection::WrongAudience)
        );
        assert!(fx
            .check(&set("aud", json!(["billing", "tollgate"])))
            .is_ok());
        assert_eq!(
            fx.check(&unset("aud")),
            Err(JwtRejection::MissingClaim("aud"))
        );
        assert_eq!(
            fx.check(&set("aud", json!(7))),
            Err(JwtRejection::BadClaim("aud"))
        );
        assert_eq!(
            fx.check(&set("aud", json!(["tollgate", 7]))),
            Err(JwtRejection::BadClaim("aud"))
        );
    }

    #[test]
    fn tampering_is_detected_for_every_algorithm() {
        let fx = Fx::new();
        for (alg, kid) in EVERY_ALG {
            let token = fx.token(alg, Some(kid));
            let [h, p, s]: [&str; 3] = token.split('.').collect::<Vec<_>>().try_into().unwrap();
            assert!(fx.check(&token).is_ok());

            let mut claims = fx.claims();
            claims["role"] = json!("postgres");
            let forged = format!("{h}.{}.{s}", b64(claims.to_string().as_bytes()));
            assert_eq!(fx.check(&forged), Err(JwtRejection::BadSignature), "{alg}");

            for i in [0, URL_SAFE_NO_PAD.decode(s).unwrap().len() - 1] {
                let mut sig = URL_SAFE_NO_PAD.decode(s).unwrap();
                sig[i] ^= 0x01;
                let forged = format!("{h}.{p}.{}", b64(&sig));
                assert_eq!(fx.check(&forged), Err(JwtRejection::BadSignature), "{alg}");
            }
            let short = format!("{h}.{p}.{}", b64(&URL_SAFE_NO_PAD.decode(s).unwrap()[1..]));
            assert_eq!(fx.check(&short), Err(JwtRejection::BadSignature), "{alg}");
        }
    }

    #[test]
    fn alg_none_is_refused_in_any_spelling() {
        let fx = Fx::new();
        let claims = fx.claims().to_string();
        for name in ["none", "None", "NONE", "nOnE"] {
            let header = json!({"alg": name, "typ": "JWT"}).to_string();
            let unsigned = format!("{}.{}.", b64(header.as_bytes()), b64(claims.as_bytes()));
            assert_eq!(fx.check(&unsigned), Err(JwtRejection::AlgNone), "{name}");
            assert!(!looks_like_jwt(unsigned.as_bytes()));
            // With a signature that would be valid HS256 over the same input.
            let signed = jws_text(&header, &claims, |m| fx.sign(JwtAlg::Hs256, m));
            assert_eq!(fx.check(&signed), Err(JwtRejection::AlgNone), "{name}");
        }
    }

    #[test]
    fn unknown_algorithms_crit_and_foreign_typ_are_refused() {
        let fx = Fx::new();
        let claims = fx.claims().to_string();
        let with_header =
            |h: Value| jws_text(&h.to_string(), &claims, |m| fx.sign(JwtAlg::Es256, m));
        for alg in ["HS1", "RS512", "ES512", "es256", "", "RSA-OAEP"] {
            let t = with_header(json!({"alg": alg, "kid": "es256"}));
            assert_eq!(fx.check(&t), Err(JwtRejection::UnsupportedAlg), "{alg}");
        }
        for h in [
            json!({"alg": 256}),
            json!({"kid": "es256"}),
            json!({"alg": "ES256", "kid": 1}),
        ] {
            assert_eq!(fx.check(&with_header(h)), Err(JwtRejection::Malformed));
        }
        // Correctly signed, but carrying an extension we cannot honour.
        let crit =
            with_header(json!({"alg": "ES256", "kid": "es256", "crit": ["b64"], "b64": false}));
        assert_eq!(fx.check(&crit), Err(JwtRejection::Malformed));
        // Correctly signed, but another kind of JWT.
        let dpop = with_header(json!({"alg": "ES256", "kid": "es256", "typ": "dpop+jwt"}));
        assert_eq!(fx.check(&dpop), Err(JwtRejection::Malformed));
        for typ in ["JWT", "jwt", "at+jwt", "application/at+JWT"] {
            let t = with_header(json!({"alg": "ES256", "kid": "es256", "typ": typ}));
            assert!(fx.check(&t).is_ok(), "{typ}");
        }
    }

    #[test]
    fn public_key_bytes_never_serve_as_an_hmac_secret() {
        let fx = Fx::new();
        let dir = fx.dir.path();
        let es256_pem = std::fs::read(dir.join("es256.pub.pem")).unwrap();
        let es256_der = spki_der(P256_SPKI_PREFIX, fx.es256.public_key().as_ref());
        let rsa_pem = std::fs::read(dir.join("rsa.pub.pem")).unwrap();
        let rsa_der = rustls_pki_types::SubjectPublicKeyInfoDer::from_pem_slice(&rsa_pem).unwrap();
        let ed_raw = fx.ed.public_key().as_ref().to_vec();
        let attacker_secrets: [(&str, Vec<u8>, &str); 6] = [
            ("es256", es256_pem, "ES256 PEM"),
            ("es256", es256_der, "ES256 SPKI DER"),
            (
                "es256",
                fx.es256.public_key().as_ref().to_vec(),
                "ES256 point",
            ),
            ("rs", rsa_pem, "RSA PEM"),
            ("rs", rsa_der.as_ref().to_vec(), "RSA SPKI DER"),
            ("ed", ed_raw, "Ed25519 key"),
        ];
        let claims = fx.claims().to_string();
        for (kid, secret, what) in attacker_secrets {
            for (alg, hmac_alg) in [
                (JwtAlg::Hs256, hmac::HMAC_SHA256),
                (JwtAlg::Hs384, hmac::HMAC_SHA384),
                (JwtAlg::Hs512, hmac::HMAC_SHA512),
            ] {
                let named = Fx::header(alg, Some(kid)).to_string();
                let t = jws_text(&named, &claims, |m| hmac_sign(hmac_alg, &secret, m));
                assert_eq!(fx.check(&t), Err(JwtRejection::UnknownKey), "{what} {alg}");
                let anonymous = Fx::header(alg, None).to_string();
                let t = jws_text(&anonymous, &claims, |m| hmac_sign(hmac_alg, &secret, m));
                let verdict = fx.check(&t);
                assert!(
                    matches!(
                        verdict,
                        Err(JwtRejection::BadSignature | JwtRejection::UnknownKey)
                    ),
                    "{what} {alg}: {verdict:?}"
                );
            }
        }
        // Control: the same construction with the real secret is accepted,
        // so the refusals above are about the key, not the token's shape.
        let header = Fx::header(JwtAlg::Hs256, Some("hs256")).to_string();
        let t = jws_text(&header, &claims, |m| {
            hmac_sign(hmac::HMAC_SHA256, HS256_SECRET.as_bytes(), m)
        });
        assert!(fx.check(&t).is_ok());
    }

    #[test]
    fn unknown_kid_and_kid_of_another_alg_are_refused() {
        let fx = Fx::new();
        assert_eq!(
            fx.check(&fx.token(JwtAlg::Es256, Some("k9"))),
            Err(JwtRejection::UnknownKey)
        );
        // Signed by the ES384 key, but naming the ES256 key.
        assert_eq!(
            fx.check(&fx.token(JwtAlg::Es384, Some("es256"))),
            Err(JwtRejection::UnknownKey)
        );
        // Same RSA key bytes under two kids: each kid serves only its alg.
        assert_eq!(
            fx.check(&fx.token(JwtAlg::Rs256, Some("ps"))),
            Err(JwtRejection::UnknownKey)
        );
        assert_eq!(
            fx.check(&fx.token(JwtAlg::Ps256, Some("rs"))),
            Err(JwtRejection::UnknownKey)
        );
        // HMAC kid with an asymmetric alg.
        assert_eq!(
            fx.check(&fx.token(JwtAlg::EdDsa, Some("hs256"))),
            Err(JwtRejection::UnknownKey)
        );
    }

    #[test]
    fn a_key_without_kid_serves_tokens_whatever_their_kid() {
        let fx = Fx::new();
        let v = fx
            .load(
                r#"
[jwt]
audience = "tollgate"
[[jwt.public_key]]
alg = "ES256"
file = "es256.pub.pem"
"#,
            )
            .unwrap();
        for kid in [Some("issuer-key-2024"), None] {
            let t = fx.token(JwtAlg::Es256, kid);
            assert!(v.verify(t.as_bytes(), fx.now).is_ok(), "{kid:?}");
        }
        let t = fx.token(JwtAlg::Es384, Some("issuer-key-2024"));
        assert_eq!(
            v.verify(t.as_bytes(), fx.now),
            Err(JwtRejection::UnknownKey)
        );
    }

    #[test]
    fn oversized_tokens_are_refused_before_anything_else() {
        let fx = Fx::new();
        let big = fx.token_with(|c| drop(c.insert("pad".into(), json!("x".repeat(4000)))));
        assert!(big.len() > DEFAULT_MAX_TOKEN_LEN);
        assert_eq!(fx.check(&big), Err(JwtRejection::Malformed));
        let roomy = Fx::with_top("max_token_len = 8192");
        let big = roomy.token_with(|c| drop(c.insert("pad".into(), json!("x".repeat(4000)))));
        assert!(roomy.check(&big).is_ok());
    }

    #[test]
    fn garbage_and_truncations_are_refused_without_panicking() {
        let fx = Fx::new();
        for (alg, kid) in EVERY_ALG {
            let token = fx.token(alg, Some(kid));
            let bytes = token.as_bytes();
            for end in 0..bytes.len() {
                assert!(
                    fx.v.verify(&bytes[..end], fx.now).is_err(),
                    "{alg} prefix {end}"
                );
                let _ = looks_like_jwt(&bytes[..end]);
            }
            for i in 0..bytes.len() {
                for replacement in [b'A', b'.', b'=', 0xff] {
                    if bytes[i] == replacement {
                        continue;
                    }
                    let mut mutated = bytes.to_vec();
                    mutated[i] = replacement;
                    assert!(fx.v.verify(&mutated, fx.now).is_err(), "{alg} byte {i}");
                }
            }
            // Padding is not base64url as JWS spells it.
            let padded = format!("{token}==");
            assert_eq!(fx.check(&padded), Err(JwtRejection::Malformed));
        }
        let deep = format!("{}{}", "[".repeat(2000), "]".repeat(2000));
        let garbage: Vec<Vec<u8>> = vec![
            b"".to_vec(),
            b".".to_vec(),
            b"..".to_vec(),
            b"...".to_vec(),
            b"eyJ..".to_vec(),
            b"a.b.c".to_vec(),
            b"a.b.c.d".to_vec(),
            vec![0xff, b'.', 0xfe, b'.', 0xfd],
            format!("{}.e30.AAAA", b64(b"[]")).into_bytes(),
            format!("{}.e30.AAAA", b64(b"null")).into_bytes(),
            format!("{}.e30.AAAA", b64(b"{\"alg\":\"HS256\"")).into_bytes(),
            format!("{}.e30.AAAA", b64(deep.as_bytes())).into_bytes(),
            format!(
                "{}.{}.AAAA",
                b64(b"{\"alg\":\"HS256\"}"),
                b64(deep.as_bytes())
            )
            .into_bytes(),
            format!("{} .e30.AAAA", b64(b"{\"alg\":\"HS256\"}")).into_bytes(),
        ];
        for g in garbage {
            assert!(
                fx.v.verify(&g, fx.now).is_err(),
                "{:?}",
                String::from_utf8_lossy(&g)
            );
        }
    }

    #[test]
    fn duplicate_members_are_refused() {
        let fx = Fx::new();
        let now = secs(fx.now);
        let claims = format!(
            r#"{{"iss":"{ISSUER}","aud":"tollgate","exp":{},"role":"app","role":"postgres"}}"#,
            now + 60
        );
        let header = Fx::header(JwtAlg::Es256, Some("es256")).to_string();
        let t = jws_text(&header, &claims, |m| fx.sign(JwtAlg::Es256, m));
        assert_eq!(fx.check(&t), Err(JwtRejection::Malformed));
        let header = r#"{"alg":"none","alg":"ES256","kid":"es256"}"#;
        let t = jws_text(header, &fx.claims().to_string(), |m| {
            fx.sign(JwtAlg::Es256, m)
        });
        assert_eq!(fx.check(&t), Err(JwtRejection::Malformed));
    }

    #[test]
    fn claims_map_to_rules() {
        let fx = Fx::new();
        let set = |name: &'static str, v: Value| fx.token_with(|c| drop(c.insert(name.into(), v)));
        assert_eq!(
            fx.check(&set("databases", json!("appdb")))
                .unwrap()
                .databases,
            vec!["appdb"]
        );
        assert_eq!(
            fx.check(&set("databases", json!(["a", "b"])))
                .unwrap()
                .databases,
            vec!["a", "b"]
        );
        assert_eq!(
            fx.check(&set("cidrs", json!(["10.0.0.0/8"])))
                .unwrap()
                .cidrs,
            vec!["10.0.0.0/8"]
        );
        for (name, bad) in [
            ("databases", json!([])),
            ("databases", json!([1])),
            ("databases", json!("")),
            ("databases", json!({"a": 1})),
            ("cidrs", json!([])),
            ("cidrs", json!(null)),
        ] {
            let rule = if name == "cidrs" {
                "cidrs"
            } else {
                "databases"
            };
            assert_eq!(fx.check(&set(name, bad)), Err(JwtRejection::BadClaim(rule)));
        }

        let ok = fx
            .check(&set(
                "pg_session",
                json!({"search_path": "app, public", "application_name": "billing"}),
            ))
            .unwrap();
        assert_eq!(
            ok.session,
            vec![
                ("application_name".to_string(), "billing".to_string()),
                ("search_path".to_string(), "app, public".to_string()),
            ]
        );
        for bad in [
            json!({"user": "postgres"}),
            json!({"database": "other"}),
            json!({"search_path": 1}),
            json!({"": "x"}),
            json!({"application_name": "a\u{0}b"}),
            json!(["search_path"]),
        ] {
            assert_eq!(
                fx.check(&set("pg_session", bad)),
                Err(JwtRejection::BadClaim("session"))
            );
        }

        assert_eq!(
            fx.check(&set("max_connections", json!(5)))
                .unwrap()
                .max_connections,
            Some(5)
        );
        for bad in [json!(-1), json!(1u64 << 32), json!("5"), json!(2.5)] {
            assert_eq!(
                fx.check(&set("max_connections", bad)),
                Err(JwtRejection::BadClaim("max_connections"))
            );
        }

        let no_role = fx.token_with(|c| drop(c.remove("role")));
        assert_eq!(fx.check(&no_role), Err(JwtRejection::MissingClaim("role")));
        for bad in [json!(""), json!(5), json!(["app"])] {
            assert_eq!(
                fx.check(&set("role", bad)),
                Err(JwtRejection::BadClaim("role"))
            );
        }
        assert_eq!(
            fx.check(&set("jti", json!(5))),
            Err(JwtRejection::BadClaim("jti"))
        );
        assert_eq!(
            fx.check(&set("sub", json!(5))),
            Err(JwtRejection::BadClaim("sub"))
        );
    }

    #[test]
    fn custom_claim_names_are_followed() {
        let fx = Fx::new();
        let v = fx
            .load(&format!(
                "{}\n[jwt.claims]\nrole = \"pg_role\"\ndatabases = \"dbs\"\ncidrs = \"nets\"\n\
                 session = \"params\"\nmax_connections = \"conn_limit\"\n",
                base_config("")
            ))
            .unwrap();
        let token = fx.token_with(|c| {
            // The default names are decoys now.
            c.insert("role".into(), json!("postgres"));
            c.insert("databases".into(), json!(["postgres"]));
            c.insert("pg_role".into(), json!("reporting"));
            c.insert("dbs".into(), json!("warehouse"));
            c.insert("nets".into(), json!(["192.0.2.0/24", "2001:db8::/32"]));
            c.insert("params".into(), json!({"statement_timeout": "5s"}));
            c.insert("conn_limit".into(), json!(3));
        });
        let ok = v.verify(token.as_bytes(), fx.now).unwrap();
        assert_eq!(ok.role, "reporting");
        assert_eq!(ok.databases, vec!["warehouse"]);
        assert_eq!(ok.cidrs, vec!["192.0.2.0/24", "2001:db8::/32"]);
        assert_eq!(
            ok.session,
            vec![("statement_timeout".to_string(), "5s".to_string())]
        );
        assert_eq!(ok.max_connections, Some(3));
        // "role" alone no longer names a role.
        let token = fx.token(JwtAlg::Es256, Some("es256"));
        assert_eq!(
            v.verify(token.as_bytes(), fx.now),
            Err(JwtRejection::MissingClaim("role"))
        );
    }

    #[test]
    fn log_id_and_cache_key_never_carry_the_token() {
        let fx = Fx::new();
        let token = fx.token_with(|c| drop(c.remove("jti")));
        let ok = fx.check(&token).unwrap();
        let signing_input = token.rsplit_once('.').unwrap().0;
        let expected = hex::encode(digest::digest(&digest::SHA256, signing_input.as_bytes()));
        assert_eq!(ok.log_id, format!("jwt:{}", &expected[..12]));
        assert_eq!(
            ok.signature_hash.as_slice(),
            digest::digest(&digest::SHA256, token.as_bytes()).as_ref()
        );
        let signature = token.rsplit_once('.').unwrap().1;
        let debug = format!("{ok:?}");
        assert!(!debug.contains(signature) && !debug.contains(signing_input));

        // A jti that could forge a log line is not logged as it is.
        let token =
            fx.token_with(|c| drop(c.insert("jti".into(), json!("x\" level=error msg=\"pwned"))));
        let ok = fx.check(&token).unwrap();
        assert_eq!(ok.jti.as_deref(), Some("x\" level=error msg=\"pwned"));
        assert!(
            ok.log_id.starts_with("jwt:") && ok.log_id.len() == 16,
            "{}",
            ok.log_id
        );

        // A fresh signature of the same claims is a different cache key.
        let again = fx.token_with(|c| drop(c.remove("jti")));
        assert_ne!(fx.check(&again).unwrap().signature_hash, ok.signature_hash);
    }

    #[test]
    fn looks_like_jwt_tells_jwts_from_opaque_tokens() {
        let fx = Fx::new();
        assert!(looks_like_jwt(fx.token(JwtAlg::Es256, None).as_bytes()));
        assert!(looks_like_jwt(b"eyJhbGciOiJIUzI1NiJ9.e30.c2ln"));
        let opaque = format!("tg_abcdefghijkl_{}{}", "ab".repeat(32), "0123abcd");
        assert!(!looks_like_jwt(opaque.as_bytes()));
        for not in [
            &b""[..],
            b"eyJ",
            b"eyJa.b",
            b"eyJa.b.c.d",
            b"eyJa..c",
            b"eyJa.b.",
            b".eyJa.b",
            b"eyJa.b.c=",
            b"eyJa.b+/.c",
            b"eyJa.b c.d",
            b"hunter2",
            b"Ja.b.c",
        ] {
            assert!(!looks_like_jwt(not), "{}", String::from_utf8_lossy(not));
        }
    }

    fn jwks_json(keys: &[Value]) -> String {
        json!({ "keys": keys }).to_string()
    }

    fn ec_jwk(kid: &str, key: &EcdsaKeyPair) -> Value {
        let point = key.public_key().as_ref();
        json!({"kty": "EC", "crv": "P-256", "kid": kid, "use": "sig",
               "x": b64(&point[1..33]), "y": b64(&point[33..65])})
    }

    /// Replaces a file the way deploy tools do: write aside, then rename.
    fn replace(path: &Path, text: &str) {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, path).unwrap();
    }

    #[test]
    fn jwks_file_keys_verify_and_reload_when_the_file_changes() {
        let fx = Fx::new();
        let rsa_n = hex::decode(RSA_TEST_MODULUS_HEX).unwrap();
        let initial = jwks_json(&[
            ec_jwk("j-ec", &fx.es256),
            // No "alg": RS256 is inferred for RSA.
            json!({"kty": "RSA", "kid": "j-rsa", "n": b64(&rsa_n), "e": "AQAB"}),
            json!({"kty": "OKP", "crv": "Ed25519", "kid": "j-ed", "alg": "EdDSA",
                   "x": b64(fx.ed.public_key().as_ref())}),
            // Not ours to use; must be skipped, never turned into keys.
            json!({"kty": "oct", "kid": "j-oct", "k": b64(HS256_SECRET.as_bytes())}),
            json!({"kty": "RSA", "kid": "j-enc", "use": "enc", "n": b64(&rsa_n), "e": "AQAB"}),
            json!({"kty": "EC", "crv": "P-521", "kid": "j-521", "x": "AA", "y": "AA"}),
        ]);
        let path = fx.dir.path().join("jwks.json");
        std::fs::write(&path, &initial).unwrap();
        let mut v = fx
            .load("[jwt]\naudience = \"tollgate\"\n[[jwt.public_key]]\njwks_file = \"jwks.json\"\n")
            .unwrap();
        assert_eq!(v.jwks_files().collect::<Vec<_>>(), vec![path.as_path()]);
        let check =
            |v: &JwtVerifier, alg, kid| v.verify(fx.token(alg, Some(kid)).as_bytes(), fx.now);
        assert!(check(&v, JwtAlg::Es256, "j-ec").is_ok());
        assert!(check(&v, JwtAlg::Rs256, "j-rsa").is_ok());
        assert!(check(&v, JwtAlg::EdDsa, "j-ed").is_ok());
        assert!(v
            .verify(fx.token(JwtAlg::Es256, None).as_bytes(), fx.now)
            .is_ok());
        assert_eq!(
            check(&v, JwtAlg::Ps256, "j-rsa"),
            Err(JwtRejection::UnknownKey)
        );
        assert_eq!(
            check(&v, JwtAlg::Hs256, "j-oct"),
            Err(JwtRejection::UnknownKey)
        );
        assert_eq!(
            check(&v, JwtAlg::Rs256, "j-enc"),
            Err(JwtRejection::UnknownKey)
        );
        assert!(!v.reload_if_changed().unwrap());

        // Rotation: a new EC key replaces everything.
        let rotated_key = ec_key(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, &fx.rng);
        replace(&path, &jwks_json(&[ec_jwk("j-ec2", &rotated_key)]));
        let before = v.clone();
        assert!(v.reload_if_changed().unwrap());
        assert_eq!(
            check(&v, JwtAlg::Es256, "j-ec"),
            Err(JwtRejection::UnknownKey)
        );
        assert_eq!(
            check(&v, JwtAlg::Rs256, "j-rsa"),
            Err(JwtRejection::UnknownKey)
        );
        let header = Fx::header(JwtAlg::Es256, Some("j-ec2")).to_string();
        let t = jws_text(&header, &fx.claims().to_string(), |m| {
            rotated_key.sign(&fx.rng, m).unwrap().as_ref().to_vec()
        });
        assert!(v.verify(t.as_bytes(), fx.now).is_ok());
        // A copy taken earlier (a shard's snapshot) is untouched.
        assert!(check(&before, JwtAlg::Es256, "j-ec").is_ok());
        assert!(!v.reload_if_changed().unwrap());

        // Same bytes, new file: nothing to publish.
        replace(&path, &jwks_json(&[ec_jwk("j-ec2", &rotated_key)]));
        assert!(!v.reload_if_changed().unwrap());

        // A broken file keeps the previous keys and is reported once.
        replace(&path, "{\"keys\": [");
        let err = v.reload_if_changed().unwrap_err();
        assert!(err.to_string().contains("jwks.json"), "{err}");
        assert!(v.verify(t.as_bytes(), fx.now).is_ok());
        assert!(!v.reload_if_changed().unwrap());
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(
            v.reload_if_changed(),
            Err(JwtConfigError::Io { .. })
        ));
        assert!(!v.reload_if_changed().unwrap());
        assert!(v.verify(t.as_bytes(), fx.now).is_ok());

        // Fixed again: picked up.
        std::fs::write(&path, &initial).unwrap();
        assert!(v.reload_if_changed().unwrap());
        assert!(check(&v, JwtAlg::Es256, "j-ec").is_ok());
    }

    #[test]
    fn jwks_files_are_validated() {
        let fx = Fx::new();
        let load = |keys: &[Value], alg: &str| {
            fx.write("jwks.json", &jwks_json(keys));
            fx.load(&format!(
                "[jwt]\naudience = \"tollgate\"\n[[jwt.public_key]]\njwks_file = \"jwks.json\"\n{alg}"
            ))
        };
        let p = fx.es256.public_key().as_ref();
        let private = json!({"kty": "EC", "crv": "P-256", "kid": "p", "x": b64(&p[1..33]),
                             "y": b64(&p[33..65]), "d": b64(&[1; 32])});
        let err = load(&[private], "").unwrap_err().to_string();
        assert!(
            err.contains("private key") && err.contains("kid \"p\""),
            "{err}"
        );
        let short = json!({"kty": "EC", "crv": "P-256", "x": b64(&p[1..32]), "y": b64(&p[33..65])});
        assert!(load(&[short], "").is_err());
        let mismatched = json!({"kty": "EC", "crv": "P-256", "alg": "ES384",
                                "x": b64(&p[1..33]), "y": b64(&p[33..65])});
        assert!(load(&[mismatched], "").is_err());
        let small_rsa = json!({"kty": "RSA", "n": b64(&[0xc5; 128]), "e": "AQAB"});
        assert!(load(&[small_rsa], "")
            .unwrap_err()
            .to_string()
            .contains("1024 bits"));
        let oct_only = json!({"kty": "oct", "k": "c2VjcmV0"});
        assert!(load(&[oct_only], "")
            .unwrap_err()
            .to_string()
            .contains("no usable"));
        // An entry alg restricts the set (and names the RSA alg).
        let rsa_n = hex::decode(RSA_TEST_MODULUS_HEX).unwrap();
        let keys = [
            ec_jwk("j-ec", &fx.es256),
            json!({"kty": "RSA", "kid": "j-rsa", "n": b64(&rsa_n), "e": "AQAB"}),
        ];
        let v = load(&keys, "alg = \"PS256\"\n").unwrap();
        assert!(v
            .verify(fx.token(JwtAlg::Ps256, Some("j-rsa")).as_bytes(), fx.now)
            .is_ok());
        assert_eq!(
            v.verify(fx.token(JwtAlg::Es256, Some("j-ec")).as_bytes(), fx.now),
            Err(JwtRejection::UnknownKey)
        );
        let err = load(&keys, "kid = \"x\"\n").unwrap_err().to_string();
        assert!(err.contains("kid"), "{err}");
    }

    #[test]
    fn config_errors_name_the_setting_and_never_the_secret() {
        let fx = Fx::new();
        let err = |text: &str| fx.load(text).unwrap_err().to_string();
        let head = "[jwt]\naudience = \"tollgate\"\n";

        let e = err(&format!(
            "{head}[[jwt.hmac]]\nkid = \"k1\"\nsecret = \"{HS256_SECRET}\"\nsecret_env = \"X\"\n"
        ));
        assert!(
            e.contains("[[jwt.hmac]] #1 (kid \"k1\")") && e.contains("exactly one"),
            "{e}"
        );
        assert!(!e.contains(HS256_SECRET));
        let e = err(&format!(
            "{head}[[jwt.hmac]]\nsecret = \"short-secret-value\"\n"
        ));
        assert!(
            e.contains("at least 32") && !e.contains("short-secret-value"),
            "{e}"
        );
        let e = err(&format!(
            "{head}[[jwt.hmac]]\nalg = \"HS512\"\nsecret = \"{HS256_SECRET}\"\n"
        ));
        assert!(
            e.contains("at least 64") && !e.contains(HS256_SECRET),
            "{e}"
        );
        let e = err(&format!(
            "{head}[[jwt.hmac]]\nsecret_env = \"TOLLGATE_JWT_TEST_UNSET_VAR\"\n"
        ));
        assert!(e.contains("TOLLGATE_JWT_TEST_UNSET_VAR"), "{e}");
        let e = err(&format!("{head}[[jwt.hmac]]\nsecret_file = \"nope.key\"\n"));
        assert!(e.contains("nope.key") && e.contains("secret_file"), "{e}");
        let e = err(&format!(
            "{head}[[jwt.hmac]]\nalg = \"RS256\"\nsecret = \"{HS256_SECRET}\"\n"
        ));
        assert!(e.contains("RS256"), "{e}");

        let e = err("[jwt]\n[[jwt.hmac]]\nsecret_file = \"hs512.key\"\n");
        assert!(e.contains("audience"), "{e}");
        let e = err(head);
        assert!(e.contains("at least one"), "{e}");
        let e = err(&format!(
            "{head}leeway = \"1h\"\n[[jwt.hmac]]\nsecret_file = \"hs512.key\"\n"
        ));
        assert!(e.contains("leeway"), "{e}");
        let e = err(&format!(
            "{head}leeway = \"soon\"\n[[jwt.hmac]]\nsecret_file = \"hs512.key\"\n"
        ));
        assert!(e.contains("leeway"), "{e}");
        let e = err(&format!(
            "{head}max_token_len = 10\n[[jwt.hmac]]\nsecret_file = \"hs512.key\"\n"
        ));
        assert!(e.contains("max_token_len"), "{e}");

        let pk = |body: &str| err(&format!("{head}[[jwt.public_key]]\n{body}"));
        let e = pk("alg = \"ES384\"\nfile = \"es256.pub.pem\"\n");
        assert!(
            e.contains("es256.pub.pem") && e.contains("P-256") && e.contains("ES384"),
            "{e}"
        );
        let e = pk("alg = \"RS256\"\nfile = \"ed25519.pub.pem\"\n");
        assert!(e.contains("Ed25519"), "{e}");
        let e = pk("alg = \"HS256\"\nfile = \"es256.pub.pem\"\n");
        assert!(e.contains("HMAC"), "{e}");
        let e = pk("file = \"es256.pub.pem\"\n");
        assert!(e.contains("alg") && e.contains("required"), "{e}");
        let e = pk("alg = \"ES256\"\nfile = \"es256.pub.pem\"\njwks_file = \"j.json\"\n");
        assert!(e.contains("exactly one"), "{e}");
        let e = pk("alg = \"ES256\"\nfile = \"missing.pem\"\n");
        assert!(e.contains("missing.pem"), "{e}");
        let e = pk("alg = \"ES256\"\nfile = \"hs512.key\"\n");
        assert!(e.contains("BEGIN PUBLIC KEY"), "{e}");

        let e = err(&format!(
            "{head}[[jwt.public_key]]\nkid = \"a\"\nalg = \"ES256\"\nfile = \"es256.pub.pem\"\n\
             [[jwt.public_key]]\nkid = \"a\"\nalg = \"ES384\"\nfile = \"es384.pub.pem\"\n"
        ));
        assert!(e.contains("\"a\" is used twice"), "{e}");
        let claims = |body: &str| err(&format!("{}\n[jwt.claims]\n{body}", base_config("")));
        assert!(claims("role = \"exp\"\n").contains("registered"));
        assert!(claims("databases = \"role\"\n").contains("already used"));

        // Unknown keys are typos, not defaults.
        let typo = format!("{head}audiance = \"x\"\n");
        assert!(toml::from_str::<ConfigFile>(&typo).is_err());
        // The raw config and the verifier print no secret.
        let raw: ConfigFile = toml::from_str(&base_config("")).unwrap();
        assert!(!format!("{:?}", raw.jwt).contains(HS256_SECRET));
        assert!(!format!("{:?}", fx.v).contains(HS256_SECRET));
        assert!(!format!("{:?}", fx.v).contains(HS512_SECRET));
    }

    #[test]
    fn rejections_have_stable_names() {
        assert_eq!(JwtRejection::AlgNone.as_str(), "jwt_alg_none");
        assert_eq!(
            JwtRejection::MissingClaim("role").to_string(),
            "jwt_missing_claim role"
        );
        fn shareable<T: Send + Sync + Clone>() {}
        shareable::<JwtVerifier>();
        shareable::<VerifiedJwt>();
    }

    #[test]
    fn der_reader_accepts_only_minimal_definite_lengths() {
        use der::{DerError, Reader};
        let read = |bytes: &[u8]| Reader::new(bytes).read(0x04).map(<[u8]>::len);
        assert_eq!(read(&[0x04, 0x02, 1, 2]), Ok(2));
        let mut long = vec![0x04, 0x81, 0x80];
        long.extend([0; 0x80]);
        assert_eq!(read(&long), Ok(0x80));
        let mut longer = vec![0x04, 0x82, 0x01, 0x00];
        longer.extend([0; 0x100]);
        assert_eq!(read(&longer), Ok(0x100));
        assert_eq!(read(&[0x04, 0x81, 0x10]), Err(DerError::BadLength));
        assert_eq!(read(&[0x04, 0x82, 0x00, 0x90]), Err(DerError::BadLength));
        assert_eq!(read(&[0x04, 0x80, 0x00, 0x00]), Err(DerError::BadLength));
        assert_eq!(read(&[0x04, 0x83, 0, 0, 1, 0]), Err(DerError::BadLength));
        assert_eq!(read(&[0x04, 0x03, 1, 2]), Err(DerError::Truncated));
        assert_eq!(read(&[0x04, 0x81]), Err(DerError::Truncated));
        assert_eq!(read(&[0x04]), Err(DerError::Truncated));
        assert_eq!(read(&[0x05, 0x00]), Err(DerError::UnexpectedTag));
        let mut r = Reader::new(&[0x04, 0x00, 0x05]);
        assert_eq!(r.read(0x04), Ok(&[][..]));
        assert_eq!(r.finish(), Err(DerError::TrailingData));

        assert_eq!(der::positive_integer(&[0x01, 0x00]), Ok(&[0x01, 0x00][..]));
        assert_eq!(der::positive_integer(&[0x00, 0x80]), Ok(&[0x80][..]));
        assert_eq!(
            der::positive_integer(&[0x00, 0x7f]),
            Err(DerError::BadValue)
        );
        assert_eq!(der::positive_integer(&[0x80]), Err(DerError::BadValue));
        assert_eq!(der::positive_integer(&[0x00]), Err(DerError::BadValue));
        assert_eq!(der::positive_integer(&[]), Err(DerError::BadValue));
    }

    #[test]
    fn spki_parsing_agrees_with_openssl_and_survives_truncation() {
        let rsa = SubjectPublicKeyInfoDer::from_pem_slice(RSA_TEST_PUB_PEM.as_bytes()).unwrap();
        let der::SpkiKey::Rsa { n, e } = der::parse_spki(rsa.as_ref()).unwrap() else {
            panic!("not RSA");
        };
        assert_eq!(hex::encode_upper(n), RSA_TEST_MODULUS_HEX);
        assert_eq!(e, [0x01, 0x00, 0x01]);

        let point = [4u8; 65];
        let p256 = spki_der(P256_SPKI_PREFIX, &point);
        assert_eq!(
            der::parse_spki(&p256),
            Ok(der::SpkiKey::Ec {
                curve: der::Curve::P256,
                point: &point[..]
            })
        );
        let p384 = spki_der(P384_SPKI_PREFIX, &[4u8; 97]);
        assert!(matches!(
            der::parse_spki(&p384),
            Ok(der::SpkiKey::Ec {
                curve: der::Curve::P384,
                ..
            })
        ));
        let ed = spki_der(ED25519_SPKI_PREFIX, &[7u8; 32]);
        assert_eq!(
            der::parse_spki(&ed),
            Ok(der::SpkiKey::Ed25519(&[7u8; 32][..]))
        );

        for input in [rsa.as_ref(), &p256, &p384, &ed] {
            for end in 0..input.len() {
                assert!(der::parse_spki(&input[..end]).is_err(), "prefix {end}");
            }
            let mut extra = input.to_vec();
            extra.push(0);
            assert_eq!(der::parse_spki(&extra), Err(der::DerError::TrailingData));
        }
        // P-521 (1.3.132.0.35) is not ours to verify.
        let mut p521 = spki_der(P384_SPKI_PREFIX, &[4u8; 97]);
        p521[19] = 0x23;
        assert_eq!(der::parse_spki(&p521), Err(der::DerError::UnsupportedKey));
    }
}
