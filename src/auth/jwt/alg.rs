//! The JWS algorithms tollgate verifies and the key material bound to them.
//!
//! This file owns RFC 8725 §3.1 ("use appropriate algorithms"): every
//! [`Material`] serves only the algorithms it was loaded for, and
//! [`Material::verify`] pairs each kind of key with its algorithms and
//! nothing else, so public key bytes can never act as an HMAC secret. The
//! `*_material` constructors are where PEM files and JWKS entries both turn
//! raw key bytes into bound material, so the binding rules live here once.

use std::fmt;

use ring::{hmac, signature};

use super::der;
use crate::secret::Secret;

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
    pub(super) fn hmac(self) -> Option<(hmac::Algorithm, usize)> {
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
pub(super) enum Material {
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
    pub(super) fn accepts(&self, alg: JwtAlg) -> bool {
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
    pub(super) fn verify(&self, alg: JwtAlg, msg: &[u8], sig: &[u8]) -> bool {
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
pub(super) struct Key {
    pub(super) kid: Option<String>,
    pub(super) material: Material,
}

pub(super) fn rsa_material(n: &[u8], e: &[u8], alg: JwtAlg) -> Result<Material, String> {
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

pub(super) fn ec_material(
    curve: der::Curve,
    point: &[u8],
    alg: JwtAlg,
) -> Result<Material, String> {
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

pub(super) fn ed25519_material(public: &[u8], alg: JwtAlg) -> Result<Material, String> {
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine as _;
    use ring::hmac;
    use ring::signature::KeyPair;
    use rustls_pki_types::pem::PemObject;
    use serde_json::json;

    use super::*;
    use crate::auth::jwt::test_support::*;
    use crate::auth::jwt::{looks_like_jwt, JwtRejection};

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
}
