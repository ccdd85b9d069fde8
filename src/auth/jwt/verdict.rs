//! What a verification returns: [`VerifiedJwt`], a token mapped to
//! tollgate's rules, or [`JwtRejection`], why it was refused.
//!
//! Both are shared by every step of the verify path and by the per-shard
//! [`JwtCache`](super::JwtCache), and both are safe to keep and to log:
//! neither holds the token, its signature or any secret.

use std::fmt;
use std::time::SystemTime;

use crate::auth::pool_mode::PoolModeRule;

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
    /// Raw CIDR strings; [`ANY_CIDRS`](super::ANY_CIDRS) when the claim is absent. Never empty.
    pub cidrs: Vec<String>,
    /// Start-up parameters to inject, sorted by name.
    pub session: Vec<(String, String)>,
    pub max_connections: Option<u32>,
    /// The pool mode claim, in place of the route's `[pool] mode`.
    pub pool_mode: Option<PoolModeRule>,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::jwt::JwtVerifier;

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
}
