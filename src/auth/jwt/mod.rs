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
//! The files of this module, each owning one step:
//! - `alg`: the algorithms and the key material bound to them;
//! - `config`: the `[jwt]` table as written, and HMAC / PEM key loading;
//! - `jwks`: JWKS files, their keys and the stamps that tell a reload;
//! - `der`: the SubjectPublicKeyInfo reader behind PEM keys;
//! - `verify`: [`JwtVerifier`], from config to signature check;
//! - `compact`: the compact form, strict base64url and strict JSON;
//! - `claims`: the claim checks and their mapping to tollgate's rules;
//! - `verdict`: what a verification returns, [`VerifiedJwt`] or
//!   [`JwtRejection`];
//! - `cache`: [`JwtCache`], verified tokens kept per shard.
//!
//! [RFC 7515]: https://www.rfc-editor.org/rfc/rfc7515
//! [RFC 7519]: https://www.rfc-editor.org/rfc/rfc7519
//! [RFC 8725]: https://www.rfc-editor.org/rfc/rfc8725
#![forbid(unsafe_code)]

use std::time::Duration;

mod alg;
mod cache;
mod claims;
mod compact;
mod config;
mod der;
mod jwks;
#[cfg(test)]
mod test_support;
mod verdict;
mod verify;

pub use alg::JwtAlg;
pub use cache::JwtCache;
pub use config::{
    JwtClaimNamesRaw, JwtConfigError, JwtConfigRaw, JwtHmacKeyRaw, JwtPublicKeyRaw, RawSecret,
};
pub use verdict::{JwtRejection, VerifiedJwt};
pub use verify::JwtVerifier;

/// Clock skew tolerated on `exp` and `nbf` when the config says nothing.
pub const DEFAULT_LEEWAY: Duration = Duration::from_secs(30);
/// Bounds the token, hence every allocation made while parsing it.
pub const DEFAULT_MAX_TOKEN_LEN: usize = 4096;
/// A token without `kid` is tried against every key of its algorithm, so the
/// key count bounds the work an invalid token can cause.
const MAX_KEYS: usize = 64;
/// What an absent `cidrs` claim means: every address, spelled so that the
/// list is never empty (an empty list must not silently mean "anywhere").
pub const ANY_CIDRS: [&str; 2] = ["0.0.0.0/0", "::/0"];
/// What an absent `databases` claim means (same spelling as the token store).
pub const ANY_DATABASE: &str = super::store::ANY_DATABASE;

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

#[cfg(test)]
mod tests {
    use super::test_support::Fx;
    use super::*;

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
}
