//! [`JwtVerifier`]: built once from the `[jwt]` table, then asked about
//! each JWT password.
//!
//! It owns the order of the checks, which is the point of the design: the
//! token length first, then the header (`alg`, `crit`, `typ`, `kid`), then
//! the signature against the keys bound to that algorithm, and only then
//! the payload, so unauthenticated JSON never reaches the claim logic in
//! [`claims`](super::claims). It also owns key selection by `kid` and the
//! reload of JWKS files.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde_json::Value;
use zeroize::Zeroizing;

use super::alg::{JwtAlg, Key};
use super::compact::{decode_b64, decode_object, split_compact};
use super::config::{
    entry_name, hmac_key, invalid, pem_public_key, unknown_alg, ClaimNames, JwtConfigError,
    JwtConfigRaw,
};
use super::jwks::{load_jwks, FileStamp, JwksSource};
use super::{JwtRejection, VerifiedJwt, DEFAULT_LEEWAY, DEFAULT_MAX_TOKEN_LEN, MAX_KEYS};

/// RFC 7519 §4.1.4 speaks of "a few minutes"; more than this is a typo.
const MAX_LEEWAY: Duration = Duration::from_secs(600);
/// PostgreSQL itself reads a password packet of at most
/// `PG_MAX_AUTH_TOKEN_LENGTH` = 65535 bytes (src/include/libpq/auth.h).
const MAX_MAX_TOKEN_LEN: usize = 65535;
/// Smaller than any real signed token with a role claim.
const MIN_MAX_TOKEN_LEN: usize = 128;

/// Verifies JWT passwords. Immutable on the verify path; `Clone` is cheap
/// (keys are shared), so the control thread can hand a copy to each shard.
#[derive(Debug, Clone)]
pub struct JwtVerifier {
    // The `pub(super)` fields are read by the claim checks (claims.rs).
    pub(super) issuer: Option<String>,
    pub(super) audience: String,
    pub(super) leeway: Duration,
    max_token_len: usize,
    pub(super) claims: ClaimNames,
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
}

fn is_jwt_typ(typ: &str) -> bool {
    ["JWT", "application/jwt", "at+jwt", "application/at+jwt"]
        .iter()
        .any(|t| typ.eq_ignore_ascii_case(t))
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

    use crate::auth::jwt::test_support::*;
    use crate::auth::jwt::{looks_like_jwt, JwtAlg, JwtRejection, DEFAULT_MAX_TOKEN_LEN};

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
}
