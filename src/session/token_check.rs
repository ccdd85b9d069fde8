//! The token check of a start-up: an opaque token against this shard's
//! snapshot of the token store, or a JWT against the verifier (through the
//! shard's cache of verified signatures) and the store's rules. Every
//! rejection reaches the client as the same 28P01 bytes and the audit log
//! with its real reason, and counts against the source's failure limit.

use std::time::{Instant, SystemTime};

use crate::audit::Attempt;
use crate::auth::{Grant, Presenter};
use crate::error::ClientError;
use crate::handshake::ClientStartup;
use crate::net::Peer;
use crate::secret::Secret;

use super::refusal::{Refusal, Reply};
use super::ShardContext;

/// A token that passed: who it is and what it allows.
pub(super) struct Checked {
    /// The token's public id (a JWT's log id); never the secret.
    pub token_id: String,
    pub grant: Grant,
    /// For a JWT: its `jti` (if any), for the deny-list.
    pub jwt_id: Option<Option<String>>,
}

/// Checks the token; every rejection reaches the client as the same bytes
/// and the audit log with its real reason.
pub(super) fn check_token(
    ctx: &ShardContext,
    startup: &ClientStartup,
    token: &Secret,
    peer: Peer,
    attempt: &mut Attempt,
) -> Result<Checked, Refusal> {
    let who = Presenter {
        user: &startup.user,
        database: &startup.database,
        address: peer.ip(),
    };
    if ctx.store.logins_refused() {
        return Err(Refusal::new(
            "token_store_stale",
            Reply::Client(ClientError::token_store_stale()),
        ));
    }
    let now = SystemTime::now();
    let rejected = |reason: &'static str| {
        ctx.failures.failed(peer.ip(), Instant::now());
        Refusal::new(
            reason,
            Reply::Client(ClientError::token_rejected(&startup.user)),
        )
    };
    let (token_id, outcome, jwt_id) = match &ctx.jwt {
        Some(_) if crate::auth::jwt::looks_like_jwt(token.expose()) => {
            match ctx.verify_jwt(token.expose(), now) {
                Ok(v) => {
                    let outcome = ctx
                        .tokens
                        .with(&ctx.store.published, |s| s.check_jwt(&v, &who, now));
                    (v.log_id, outcome, Some(v.jti))
                }
                Err(e) => return Err(rejected(e.as_str())),
            }
        }
        _ => {
            let verdict = ctx.tokens.with(&ctx.store.published, |store| {
                store.check(token.expose(), &who, now)
            });
            let id = verdict.token_id.unwrap_or_else(|| "-".to_owned());
            (id, verdict.outcome, None)
        }
    };
    attempt.token_id = (token_id != "-").then(|| token_id.clone());
    match outcome {
        Ok(grant) => Ok(Checked {
            token_id,
            grant,
            jwt_id,
        }),
        Err(reason) => Err(rejected(reason.as_str())),
    }
}
