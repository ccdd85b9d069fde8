//! JSON Web Key Set files (RFC 7517 §5): reading one into keys, and the
//! `stat` stamp that tells whether it must be read again.
//!
//! A JWKS is published by an identity provider, not written by us, so the
//! reader is lenient where that is harmless (unused members, padded
//! base64url, keys of kinds we do not verify, which are skipped with a log
//! line) and strict where it is not (private keys, broken keys of a kind we
//! do verify, oversized files). The reload loop itself is
//! [`JwtVerifier::reload_if_changed`](super::JwtVerifier::reload_if_changed).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::alphabet;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use base64::Engine as _;
use ring::digest;
use serde::de::IgnoredAny;
use serde::Deserialize;

use super::alg::{ec_material, ed25519_material, rsa_material, JwtAlg, Key, Material};
use super::config::{invalid, JwtConfigError};
use super::der;
use super::MAX_KEYS;

/// A JWKS with a handful of keys is a few KiB; this only stops a wrong path
/// (a log file, a device) from being read whole.
const MAX_JWKS_FILE_LEN: u64 = 1 << 20;

/// JWKS members are operator-provided files; some publishers pad their
/// base64url, which is harmless there (unlike in the token itself).
const JWK_B64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::URL_SAFE,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// A JWKS file and the keys last read from it.
#[derive(Debug, Clone)]
pub(super) struct JwksSource {
    pub(super) what: String,
    pub(super) path: PathBuf,
    /// Only keys of this algorithm are used (and it is the algorithm of an
    /// RSA key that publishes none).
    pub(super) only_alg: Option<JwtAlg>,
    /// The file's identity when last read (or last tried), to notice changes
    /// with one `stat`; `None` when it could not be stat'ed.
    pub(super) stamp: Option<FileStamp>,
    pub(super) content_sha256: [u8; 32],
    pub(super) keys: Arc<[Key]>,
}

/// What `stat` says about a file; a change in any field means "read it again".
/// Inode and ctime catch an atomic rename even within one mtime tick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct FileStamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl FileStamp {
    pub(super) fn of(meta: &std::fs::Metadata) -> FileStamp {
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

pub(super) struct LoadedJwks {
    pub(super) keys: Vec<Key>,
    pub(super) stamp: FileStamp,
    pub(super) content_sha256: [u8; 32],
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

pub(super) fn load_jwks(
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

#[cfg(test)]
mod tests {
    use ring::signature::{self, EcdsaKeyPair, KeyPair};
    use serde_json::{json, Value};

    use super::*;
    use crate::auth::jwt::test_support::*;
    use crate::auth::jwt::{JwtRejection, JwtVerifier};

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
}
