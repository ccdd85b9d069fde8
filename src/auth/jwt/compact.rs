//! The compact JWS form (RFC 7515 §7.1) taken apart strictly: three
//! segments, canonical unpadded base64url, JSON objects without duplicate
//! members.
//!
//! Strictness here is a security property, not pedantry: one token has one
//! spelling, and no two JSON parsers can disagree about which `alg`, `aud`
//! or `role` it carries. Everything returns [`JwtRejection::Malformed`] on
//! failure and allocates at most in proportion to the (bounded) token.

use std::collections::BTreeMap;
use std::fmt;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde::de;
use serde::Deserialize;
use serde_json::Value;

use super::JwtRejection;

/// Splits at exactly two dots. The signature may be empty here so that an
/// unsigned `alg: none` token is reported as such, not as "malformed".
pub(super) fn split_compact(token: &[u8]) -> Result<[&[u8]; 3], JwtRejection> {
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
pub(super) fn decode_b64(segment: &[u8]) -> Result<Vec<u8>, JwtRejection> {
    URL_SAFE_NO_PAD
        .decode(segment)
        .map_err(|_| JwtRejection::Malformed)
}

pub(super) fn decode_object(segment: &[u8]) -> Result<BTreeMap<String, Value>, JwtRejection> {
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

#[cfg(test)]
mod tests {
    use crate::auth::jwt::test_support::*;
    use crate::auth::jwt::{looks_like_jwt, JwtAlg, JwtRejection};

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
}
