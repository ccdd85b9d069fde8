//! A token's pool mode: how its clients share a route's server
//! connections. Its own module because both token formats carry it (the
//! store's records and a JWT's claim) and the JWT verifier must not depend
//! on the store.

use serde::{Deserialize, Serialize};

/// How a token's clients share the server connections of a route that
/// pools them, in place of the route's `[pool] mode`. A route with
/// `mode = "off"` logs in per client whatever its tokens say.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PoolModeRule {
    /// One server connection for the whole session.
    Session,
    /// A server connection per transaction.
    Transaction,
}

impl PoolModeRule {
    pub fn as_str(self) -> &'static str {
        match self {
            PoolModeRule::Session => "session",
            PoolModeRule::Transaction => "transaction",
        }
    }
}

impl std::str::FromStr for PoolModeRule {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "session" => Ok(PoolModeRule::Session),
            "transaction" => Ok(PoolModeRule::Transaction),
            other => Err(format!(
                "pool mode {other:?} is neither \"session\" nor \"transaction\""
            )),
        }
    }
}
