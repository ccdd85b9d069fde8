//! [`JwtCache`]: verified JWTs kept per shard, so that a token's signature
//! (up to ~100 µs for RSA) is checked once per token per shard, not on every
//! connection that presents it.
//!
//! Only what cannot change is cached: the signature and claim checks of one
//! exact token, keyed by SHA-256 of the whole token, so a different token
//! can never meet another's verdict. The clock is not cached: every use
//! compares `exp` and `nbf` with `now` and the leeway of the verifier at
//! hand. Rejections are not cached either. Revocation (the deny-list) is the
//! caller's to check on every use, as before the cache.
//!
//! A verdict may rest on a key that a JWKS reload has since removed, so the
//! owner calls [`JwtCache::clear`] whenever its verifier's keys change. The
//! cache is bounded by emptying it when full: no per-entry bookkeeping on
//! the hit path, and a flood of distinct valid tokens costs only the
//! signature checks it would have cost without a cache.
//!
//! The map sits in a `RefCell` inside the cache, so a shard can share its
//! cache by `&` (as it shares the rest of its context); that makes the type
//! `Send` but not `Sync`: one cache per shard thread. No borrow is held while
//! [`JwtVerifier::verify`] runs.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt;
use std::time::SystemTime;

use super::{JwtRejection, JwtVerifier, VerifiedJwt};

/// Verified JWTs kept per shard; the cache is emptied when full.
const JWT_CACHE_ENTRIES: usize = 4096;

/// Verified JWTs by SHA-256 of the token, for one shard. See the module
/// documentation for what is cached and what is checked on every use.
#[derive(Default)]
pub struct JwtCache {
    entries: RefCell<HashMap<[u8; 32], VerifiedJwt>>,
}

impl JwtCache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// Forgets every verdict. Call it when the verifier's keys changed:
    /// earlier verdicts may rest on keys now gone.
    pub fn clear(&self) {
        self.entries.borrow_mut().clear();
    }

    /// Verifies a JWT at `now` with `jwt`, reusing the verdict of an earlier
    /// call for the same token. A cached verdict is still refused once
    /// expired (`exp` + leeway at or before `now`) or not yet valid (`nbf`
    /// after `now` + leeway), with the leeway of `jwt`.
    pub fn verify(
        &self,
        jwt: &JwtVerifier,
        token: &[u8],
        now: SystemTime,
    ) -> Result<VerifiedJwt, JwtRejection> {
        let key = crate::auth::token::sha256(token);
        let cached = self.entries.borrow().get(&key).cloned();
        let v = match cached {
            Some(v) => v,
            None => {
                let v = jwt.verify(token, now)?;
                let mut cache = self.entries.borrow_mut();
                if cache.len() >= JWT_CACHE_ENTRIES {
                    cache.clear();
                }
                cache.insert(key, v.clone());
                v
            }
        };
        // The signature is settled; the clock is not.
        let leeway = jwt.leeway();
        if v.expires_at + leeway <= now {
            return Err(JwtRejection::Expired);
        }
        if v.not_before.is_some_and(|nbf| nbf > now + leeway) {
            return Err(JwtRejection::NotYetValid);
        }
        Ok(v)
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.borrow().len()
    }
}

/// Shows the number of entries, not the verdicts themselves.
impl fmt::Debug for JwtCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("JwtCache");
        match self.entries.try_borrow() {
            Ok(entries) => d.field("entries", &entries.len()),
            Err(_) => d.field("entries", &format_args!("<in use>")),
        };
        d.finish()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use serde_json::json;

    use super::*;
    use crate::auth::jwt::test_support::*;
    use crate::auth::jwt::JwtAlg;

    /// A verifier that knows none of the fixture's HMAC keys (its only key is
    /// ES384, without a kid): an HS256 token it accepts was never checked by
    /// it, so the verdict came from the cache.
    fn stranger(fx: &Fx) -> JwtVerifier {
        fx.load(
            "[jwt]\naudience = \"tollgate\"\n\
             [[jwt.public_key]]\nalg = \"ES384\"\nfile = \"es384.pub.pem\"\n",
        )
        .unwrap()
    }

    /// An HS256 token with the fixture's claims and this `jti`.
    fn hs256_token(fx: &Fx, jti: &str) -> String {
        let mut claims = fx.claims();
        claims["jti"] = json!(jti);
        fx.token_for(JwtAlg::Hs256, Some("hs256"), &claims)
    }

    #[test]
    fn a_cached_verdict_is_reused_without_checking_the_signature_again() {
        let fx = Fx::new();
        let stranger = stranger(&fx);
        let cache = JwtCache::new();
        let token = hs256_token(&fx, "id-1");

        // A rejection is not cached: the right verifier accepts it next.
        assert_eq!(
            cache.verify(&stranger, token.as_bytes(), fx.now),
            Err(JwtRejection::UnknownKey)
        );
        assert_eq!(cache.len(), 0);
        let first = cache.verify(&fx.v, token.as_bytes(), fx.now).unwrap();
        assert_eq!(first, fx.v.verify(token.as_bytes(), fx.now).unwrap());
        assert_eq!(cache.len(), 1);

        // The stranger could not verify it: this is the cached verdict.
        let again = cache.verify(&stranger, token.as_bytes(), fx.now).unwrap();
        assert_eq!(again, first);
        assert_eq!(cache.len(), 1);

        // Another token (same claims but jti) is not the same entry.
        let other = hs256_token(&fx, "id-2");
        assert_eq!(
            cache.verify(&stranger, other.as_bytes(), fx.now),
            Err(JwtRejection::UnknownKey)
        );
        assert_eq!(cache.len(), 1);
    }

    #[test]
    fn the_clock_is_checked_on_every_use_of_a_cached_verdict() {
        let fx = Fx::new();
        let stranger = stranger(&fx);
        let cache = JwtCache::new();
        // exp = now + 300, nbf = now + 10; both verifiers allow 30 s of skew.
        let mut claims = fx.claims();
        claims["nbf"] = json!(secs(fx.now) + 10);
        let token = fx.token_for(JwtAlg::Hs256, Some("hs256"), &claims);
        let token = token.as_bytes();
        assert!(cache.verify(&fx.v, token, fx.now).is_ok());

        let at = |secs: i64| {
            let d = Duration::from_secs(secs.unsigned_abs());
            if secs < 0 {
                fx.now - d
            } else {
                fx.now + d
            }
        };
        assert!(cache.verify(&stranger, token, at(329)).is_ok());
        assert_eq!(
            cache.verify(&stranger, token, at(330)),
            Err(JwtRejection::Expired)
        );
        assert_eq!(
            cache.verify(&stranger, token, at(3600)),
            Err(JwtRejection::Expired)
        );
        assert!(cache.verify(&stranger, token, at(-20)).is_ok());
        assert_eq!(
            cache.verify(&stranger, token, at(-21)),
            Err(JwtRejection::NotYetValid)
        );
        // Refusing a cached verdict on time does not evict it.
        assert_eq!(cache.len(), 1);

        // The leeway is the one of the verifier at hand. The strict fixture
        // has other EC keys but the same HMAC secret.
        let strict = Fx::with_top("leeway = \"0s\"");
        assert_eq!(
            cache.verify(&strict.v, token, at(300)),
            Err(JwtRejection::Expired)
        );
        assert_eq!(
            cache.verify(&strict.v, token, at(9)),
            Err(JwtRejection::NotYetValid)
        );
        assert!(cache.verify(&strict.v, token, at(10)).is_ok());
        assert!(cache.verify(&fx.v, token, at(300)).is_ok());
    }

    #[test]
    fn the_cache_is_emptied_when_full() {
        let fx = Fx::new();
        let stranger = stranger(&fx);
        let cache = JwtCache::new();
        let tokens: Vec<String> = (0..=JWT_CACHE_ENTRIES)
            .map(|i| hs256_token(&fx, &format!("id-{i}")))
            .collect();
        for token in &tokens[..JWT_CACHE_ENTRIES] {
            assert!(cache.verify(&fx.v, token.as_bytes(), fx.now).is_ok());
        }
        assert_eq!(cache.len(), JWT_CACHE_ENTRIES);
        let first = tokens[0].as_bytes();
        assert!(cache.verify(&stranger, first, fx.now).is_ok());

        // One more verdict does not fit: everything before it is forgotten.
        let last = tokens[JWT_CACHE_ENTRIES].as_bytes();
        assert!(cache.verify(&fx.v, last, fx.now).is_ok());
        assert_eq!(cache.len(), 1);
        assert_eq!(
            cache.verify(&stranger, first, fx.now),
            Err(JwtRejection::UnknownKey)
        );
        assert!(cache.verify(&stranger, last, fx.now).is_ok());
    }

    #[test]
    fn clear_forgets_every_verdict() {
        let fx = Fx::new();
        let stranger = stranger(&fx);
        let cache = JwtCache::new();
        let token = hs256_token(&fx, "id-1");
        assert!(cache.verify(&fx.v, token.as_bytes(), fx.now).is_ok());
        assert!(cache.verify(&stranger, token.as_bytes(), fx.now).is_ok());
        assert_eq!(format!("{cache:?}"), "JwtCache { entries: 1 }");

        cache.clear();
        assert_eq!(cache.len(), 0);
        assert_eq!(
            cache.verify(&stranger, token.as_bytes(), fx.now),
            Err(JwtRejection::UnknownKey)
        );
        assert!(cache.verify(&fx.v, token.as_bytes(), fx.now).is_ok());
        assert_eq!(cache.len(), 1);
    }

    #[test]
    fn one_cache_per_shard_thread() {
        fn sendable<T: Send>() {}
        sendable::<JwtCache>();
    }
}
