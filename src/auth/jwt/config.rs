//! The `[jwt]` table as the config file spells it, and the loading of the
//! keys it names inline or by file: HMAC secrets and PEM public keys.
//!
//! The raw types are what serde fills (unknown keys refused, inline secrets
//! redacted and zeroed); turning them into a verifier is
//! [`JwtVerifier::from_raw`](super::JwtVerifier::from_raw), which calls the
//! loaders here. Every error names the setting or file at fault and never a
//! secret, since operators read them in logs.

use std::fmt;
use std::path::{Path, PathBuf};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::SubjectPublicKeyInfoDer;
use serde::de;
use serde::Deserialize;
use zeroize::{Zeroize, Zeroizing};

use super::alg::{ec_material, ed25519_material, rsa_material, JwtAlg, Key, Material};
use super::der;
use crate::secret::Secret;

/// RFC 7518 §3.2: an HMAC key must be at least as long as the hash output;
/// HS256 is the smallest.
const MIN_HMAC_SECRET_LEN: usize = 32;

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
    pub pool_mode: Option<String>,
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

pub(super) fn invalid(what: impl Into<String>, message: impl Into<String>) -> JwtConfigError {
    JwtConfigError::Invalid {
        what: what.into(),
        message: message.into(),
    }
}

/// The claim names mapped to tollgate's rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct ClaimNames {
    pub(super) role: String,
    pub(super) databases: String,
    pub(super) cidrs: String,
    pub(super) session: String,
    pub(super) max_connections: String,
    pub(super) pool_mode: String,
}

impl ClaimNames {
    pub(super) fn from_raw(raw: JwtClaimNamesRaw) -> Result<ClaimNames, JwtConfigError> {
        let names = ClaimNames {
            role: raw.role.unwrap_or_else(|| "role".into()),
            databases: raw.databases.unwrap_or_else(|| "databases".into()),
            cidrs: raw.cidrs.unwrap_or_else(|| "cidrs".into()),
            session: raw.session.unwrap_or_else(|| "pg_session".into()),
            max_connections: raw
                .max_connections
                .unwrap_or_else(|| "max_connections".into()),
            pool_mode: raw.pool_mode.unwrap_or_else(|| "pool_mode".into()),
        };
        let all = [
            ("role", &names.role),
            ("databases", &names.databases),
            ("cidrs", &names.cidrs),
            ("session", &names.session),
            ("max_connections", &names.max_connections),
            ("pool_mode", &names.pool_mode),
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

pub(super) fn entry_name(table: &str, index: usize, kid: Option<&str>) -> String {
    match kid {
        Some(kid) => format!("{table} #{} (kid \"{kid}\")", index + 1),
        None => format!("{table} #{}", index + 1),
    }
}

pub(super) fn unknown_alg(name: &str, hmac: bool) -> String {
    let allowed = if hmac {
        "HS256, HS384 or HS512"
    } else {
        "RS256, PS256, ES256, ES384 or EdDSA"
    };
    format!("\"{name}\" is not supported; use {allowed}")
}

pub(super) fn hmac_key(
    raw: JwtHmacKeyRaw,
    index: usize,
    base: &Path,
) -> Result<Key, JwtConfigError> {
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
pub(super) fn pem_public_key(
    path: &Path,
    alg: JwtAlg,
    what: &str,
) -> Result<Material, JwtConfigError> {
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

#[cfg(test)]
mod tests {
    use crate::auth::jwt::test_support::*;

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
}
