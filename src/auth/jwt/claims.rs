//! The claim checks: what a token whose signature is good must also say
//! before it may log in, and how its claims map to tollgate's rules.
//!
//! Runs only on a payload whose signature has been checked (see
//! [`JwtVerifier::verify`]). `exp` is required and `nbf` honoured with the
//! leeway, `iss` and `aud` must match (RFC 8725 §3.9), and every rule claim
//! (role, databases, cidrs, session parameters, connection limit) is read
//! strictly: a claim of the wrong shape refuses the token rather than being
//! read as "nothing" or "anything". The result, [`VerifiedJwt`], carries no
//! token text.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ring::digest;
use serde_json::Value;

use super::{JwtRejection, JwtVerifier, VerifiedJwt, ANY_CIDRS, ANY_DATABASE};
use crate::auth::pool_mode::PoolModeRule;

/// 9999-12-31T23:59:59Z: later "dates" are nonsense, and refusing them keeps
/// `SystemTime` arithmetic far from overflow.
const MAX_NUMERIC_DATE: u64 = 253_402_300_799;
/// Start-up parameters a token may not set through its session claim: they
/// are governed by the role and database rules, not by injection.
const RESERVED_SESSION_PARAMS: [&str; 3] = ["user", "database", "replication"];

// A method of the verifier, as before the split: it reads the issuer,
// audience, leeway and claim names the verifier was configured with.
impl JwtVerifier {
    pub(super) fn check_claims(
        &self,
        claims: &BTreeMap<String, Value>,
        token: &[u8],
        signing_input: &[u8],
        now: SystemTime,
    ) -> Result<VerifiedJwt, JwtRejection> {
        let expires_at = match claims.get("exp") {
            None => return Err(JwtRejection::MissingClaim("exp")),
            Some(v) => numeric_date(v).ok_or(JwtRejection::BadClaim("exp"))?,
        };
        let not_before = match claims.get("nbf") {
            None => None,
            Some(v) => Some(numeric_date(v).ok_or(JwtRejection::BadClaim("nbf"))?),
        };
        // RFC 7519 §4.1.4: the token is valid only *before* exp.
        if expires_at
            .checked_add(self.leeway)
            .is_some_and(|limit| now >= limit)
        {
            return Err(JwtRejection::Expired);
        }
        if let Some(nbf) = not_before {
            if now.checked_add(self.leeway).is_some_and(|t| t < nbf) {
                return Err(JwtRejection::NotYetValid);
            }
        }
        if let Some(issuer) = &self.issuer {
            match claims.get("iss") {
                None => return Err(JwtRejection::MissingClaim("iss")),
                Some(Value::String(iss)) if iss == issuer => {}
                Some(Value::String(_)) => return Err(JwtRejection::WrongIssuer),
                Some(_) => return Err(JwtRejection::BadClaim("iss")),
            }
        }
        match claims.get("aud") {
            None => return Err(JwtRejection::MissingClaim("aud")),
            Some(Value::String(aud)) => {
                if *aud != self.audience {
                    return Err(JwtRejection::WrongAudience);
                }
            }
            Some(Value::Array(auds)) => {
                let mut found = false;
                for aud in auds {
                    match aud {
                        Value::String(a) => found |= *a == self.audience,
                        _ => return Err(JwtRejection::BadClaim("aud")),
                    }
                }
                if !found {
                    return Err(JwtRejection::WrongAudience);
                }
            }
            Some(_) => return Err(JwtRejection::BadClaim("aud")),
        }

        let jti = optional_string(claims, "jti")?;
        let subject = optional_string(claims, "sub")?;
        let names = &self.claims;
        let role = match claims.get(&names.role) {
            None => return Err(JwtRejection::MissingClaim("role")),
            Some(Value::String(r)) if is_plain(r) => r.clone(),
            Some(_) => return Err(JwtRejection::BadClaim("role")),
        };
        let databases = string_list(claims.get(&names.databases), "databases")?
            .unwrap_or_else(|| vec![ANY_DATABASE.to_owned()]);
        let cidrs = string_list(claims.get(&names.cidrs), "cidrs")?
            .unwrap_or_else(|| ANY_CIDRS.iter().map(|c| (*c).to_owned()).collect());
        let session = match claims.get(&names.session) {
            None => Vec::new(),
            Some(Value::Object(params)) => {
                let mut out = Vec::with_capacity(params.len());
                for (name, value) in params {
                    let Value::String(value) = value else {
                        return Err(JwtRejection::BadClaim("session"));
                    };
                    // Start-up parameters are NUL-terminated on the wire.
                    if !is_plain(name)
                        || value.contains('\0')
                        || RESERVED_SESSION_PARAMS.contains(&name.as_str())
                    {
                        return Err(JwtRejection::BadClaim("session"));
                    }
                    out.push((name.clone(), value.clone()));
                }
                // Sorted whatever map serde_json was built with, so the
                // injected parameters come out in a stable order.
                out.sort();
                out
            }
            Some(_) => return Err(JwtRejection::BadClaim("session")),
        };
        let max_connections = match claims.get(&names.max_connections) {
            None => None,
            Some(v) => Some(
                v.as_u64()
                    .and_then(|n| u32::try_from(n).ok())
                    .ok_or(JwtRejection::BadClaim("max_connections"))?,
            ),
        };
        // Only the two words: a mode tollgate does not know must not be
        // read as the route's default.
        let pool_mode = match claims.get(&names.pool_mode) {
            None => None,
            Some(Value::String(m)) => Some(
                m.parse::<PoolModeRule>()
                    .map_err(|_| JwtRejection::BadClaim("pool_mode"))?,
            ),
            Some(_) => return Err(JwtRejection::BadClaim("pool_mode")),
        };

        let log_id = match jti.as_deref() {
            Some(j) if is_loggable_id(j) => format!("jwt:{j}"),
            // Hash of the signed part: stable for one token, reveals nothing
            // a replay could use.
            _ => {
                let d = digest::digest(&digest::SHA256, signing_input);
                format!("jwt:{}", &hex::encode(&d.as_ref()[..6]))
            }
        };
        let mut signature_hash = [0u8; 32];
        signature_hash.copy_from_slice(digest::digest(&digest::SHA256, token).as_ref());

        Ok(VerifiedJwt {
            jti,
            subject,
            role,
            databases,
            cidrs,
            session,
            max_connections,
            pool_mode,
            expires_at,
            not_before,
            log_id,
            signature_hash,
        })
    }
}

/// A NumericDate (RFC 7519 §2): seconds since the epoch, possibly fractional.
fn numeric_date(v: &Value) -> Option<SystemTime> {
    let Value::Number(n) = v else { return None };
    let d = if let Some(secs) = n.as_u64() {
        if secs > MAX_NUMERIC_DATE {
            return None;
        }
        Duration::from_secs(secs)
    } else {
        // Negative, fractional or huge; NaN and infinities cannot occur in
        // JSON but are refused all the same.
        let secs = n.as_f64()?;
        if !(secs.is_finite() && (0.0..=MAX_NUMERIC_DATE as f64).contains(&secs)) {
            return None;
        }
        Duration::from_secs_f64(secs)
    };
    UNIX_EPOCH.checked_add(d)
}

fn optional_string(
    claims: &BTreeMap<String, Value>,
    name: &'static str,
) -> Result<Option<String>, JwtRejection> {
    match claims.get(name) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(JwtRejection::BadClaim(name)),
    }
}

/// A single string or a non-empty array of strings; `None` when absent. An
/// explicit empty list is refused rather than read as "nothing" or "anything".
fn string_list(v: Option<&Value>, rule: &'static str) -> Result<Option<Vec<String>>, JwtRejection> {
    match v {
        None => Ok(None),
        Some(Value::String(s)) if is_plain(s) => Ok(Some(vec![s.clone()])),
        Some(Value::Array(items)) if !items.is_empty() => items
            .iter()
            .map(|item| match item {
                Value::String(s) if is_plain(s) => Ok(s.clone()),
                _ => Err(JwtRejection::BadClaim(rule)),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some),
        Some(_) => Err(JwtRejection::BadClaim(rule)),
    }
}

/// Non-empty and free of NUL, which cannot travel in a start-up packet.
fn is_plain(s: &str) -> bool {
    !s.is_empty() && !s.contains('\0')
}

/// Whether a `jti` can go into a log line as it is: short, no spaces, quotes
/// or control characters (UUIDs and the usual random ids qualify).
fn is_loggable_id(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use ring::digest;
    use serde_json::{json, Value};

    use crate::auth::jwt::test_support::*;
    use crate::auth::jwt::{JwtAlg, JwtRejection};
    use crate::auth::pool_mode::PoolModeRule;

    #[test]
    fn expiry_and_not_before_honour_the_leeway() {
        let fx = Fx::new();
        let now = secs(fx.now);
        let with_exp = |exp: Value| fx.token_with(|c| drop(c.insert("exp".into(), exp)));
        assert!(fx.check(&with_exp(json!(now - 29))).is_ok());
        assert_eq!(
            fx.check(&with_exp(json!(now - 30))),
            Err(JwtRejection::Expired)
        );
        assert_eq!(
            fx.check(&with_exp(json!(now - 3600))),
            Err(JwtRejection::Expired)
        );
        let frac = fx.check(&with_exp(json!(now as f64 + 10.5))).unwrap();
        assert_eq!(frac.expires_at, fx.now + Duration::from_millis(10_500));
        for bad in [
            json!("soon"),
            json!(-1),
            json!(1e300),
            json!(null),
            json!([now]),
        ] {
            assert_eq!(fx.check(&with_exp(bad)), Err(JwtRejection::BadClaim("exp")));
        }
        let no_exp = fx.token_with(|c| drop(c.remove("exp")));
        assert_eq!(fx.check(&no_exp), Err(JwtRejection::MissingClaim("exp")));

        let with_nbf = |nbf: Value| fx.token_with(|c| drop(c.insert("nbf".into(), nbf)));
        let ok = fx.check(&with_nbf(json!(now + 29))).unwrap();
        assert_eq!(ok.not_before, Some(fx.now + Duration::from_secs(29)));
        assert_eq!(
            fx.check(&with_nbf(json!(now + 31))),
            Err(JwtRejection::NotYetValid)
        );
        assert_eq!(
            fx.check(&with_nbf(json!("later"))),
            Err(JwtRejection::BadClaim("nbf"))
        );

        // A configured leeway of zero is exact.
        let strict = Fx::with_top("leeway = \"0s\"");
        let token = strict.token_with(|c| drop(c.insert("exp".into(), json!(secs(strict.now)))));
        assert_eq!(strict.check(&token), Err(JwtRejection::Expired));
        let token =
            strict.token_with(|c| drop(c.insert("nbf".into(), json!(secs(strict.now) + 1))));
        assert_eq!(strict.check(&token), Err(JwtRejection::NotYetValid));
    }

    #[test]
    fn issuer_and_audience_are_checked() {
        let fx = Fx::new();
        let set = |name: &'static str, v: Value| fx.token_with(|c| drop(c.insert(name.into(), v)));
        let unset = |name: &'static str| fx.token_with(|c| drop(c.remove(name)));
        assert_eq!(
            fx.check(&set("iss", json!("https://evil.example.com"))),
            Err(JwtRejection::WrongIssuer)
        );
        assert_eq!(
            fx.check(&unset("iss")),
            Err(JwtRejection::MissingClaim("iss"))
        );
        assert_eq!(
            fx.check(&set("iss", json!(["x"]))),
            Err(JwtRejection::BadClaim("iss"))
        );
        assert_eq!(
            fx.check(&set("aud", json!("billing"))),
            Err(JwtRejection::WrongAudience)
        );
        assert_eq!(
            fx.check(&set("aud", json!(["billing", "crm"]))),
            Err(JwtRejection::WrongAudience)
        );
        assert!(fx
            .check(&set("aud", json!(["billing", "tollgate"])))
            .is_ok());
        assert_eq!(
            fx.check(&unset("aud")),
            Err(JwtRejection::MissingClaim("aud"))
        );
        assert_eq!(
            fx.check(&set("aud", json!(7))),
            Err(JwtRejection::BadClaim("aud"))
        );
        assert_eq!(
            fx.check(&set("aud", json!(["tollgate", 7]))),
            Err(JwtRejection::BadClaim("aud"))
        );
    }

    #[test]
    fn claims_map_to_rules() {
        let fx = Fx::new();
        let set = |name: &'static str, v: Value| fx.token_with(|c| drop(c.insert(name.into(), v)));
        assert_eq!(
            fx.check(&set("databases", json!("appdb")))
                .unwrap()
                .databases,
            vec!["appdb"]
        );
        assert_eq!(
            fx.check(&set("databases", json!(["a", "b"])))
                .unwrap()
                .databases,
            vec!["a", "b"]
        );
        assert_eq!(
            fx.check(&set("cidrs", json!(["10.0.0.0/8"])))
                .unwrap()
                .cidrs,
            vec!["10.0.0.0/8"]
        );
        for (name, bad) in [
            ("databases", json!([])),
            ("databases", json!([1])),
            ("databases", json!("")),
            ("databases", json!({"a": 1})),
            ("cidrs", json!([])),
            ("cidrs", json!(null)),
        ] {
            let rule = if name == "cidrs" {
                "cidrs"
            } else {
                "databases"
            };
            assert_eq!(fx.check(&set(name, bad)), Err(JwtRejection::BadClaim(rule)));
        }

        let ok = fx
            .check(&set(
                "pg_session",
                json!({"search_path": "app, public", "application_name": "billing"}),
            ))
            .unwrap();
        assert_eq!(
            ok.session,
            vec![
                ("application_name".to_string(), "billing".to_string()),
                ("search_path".to_string(), "app, public".to_string()),
            ]
        );
        for bad in [
            json!({"user": "postgres"}),
            json!({"database": "other"}),
            json!({"search_path": 1}),
            json!({"": "x"}),
            json!({"application_name": "a\u{0}b"}),
            json!(["search_path"]),
        ] {
            assert_eq!(
                fx.check(&set("pg_session", bad)),
                Err(JwtRejection::BadClaim("session"))
            );
        }

        assert_eq!(
            fx.check(&set("max_connections", json!(5)))
                .unwrap()
                .max_connections,
            Some(5)
        );
        for bad in [json!(-1), json!(1u64 << 32), json!("5"), json!(2.5)] {
            assert_eq!(
                fx.check(&set("max_connections", bad)),
                Err(JwtRejection::BadClaim("max_connections"))
            );
        }

        assert_eq!(fx.check(&fx.token_with(|_| ())).unwrap().pool_mode, None);
        for (word, mode) in [
            ("transaction", PoolModeRule::Transaction),
            ("session", PoolModeRule::Session),
        ] {
            assert_eq!(
                fx.check(&set("pool_mode", json!(word))).unwrap().pool_mode,
                Some(mode)
            );
        }
        for bad in [
            json!("Transaction"),
            json!("statement"),
            json!(""),
            json!(1),
        ] {
            assert_eq!(
                fx.check(&set("pool_mode", bad)),
                Err(JwtRejection::BadClaim("pool_mode"))
            );
        }

        let no_role = fx.token_with(|c| drop(c.remove("role")));
        assert_eq!(fx.check(&no_role), Err(JwtRejection::MissingClaim("role")));
        for bad in [json!(""), json!(5), json!(["app"])] {
            assert_eq!(
                fx.check(&set("role", bad)),
                Err(JwtRejection::BadClaim("role"))
            );
        }
        assert_eq!(
            fx.check(&set("jti", json!(5))),
            Err(JwtRejection::BadClaim("jti"))
        );
        assert_eq!(
            fx.check(&set("sub", json!(5))),
            Err(JwtRejection::BadClaim("sub"))
        );
    }

    #[test]
    fn custom_claim_names_are_followed() {
        let fx = Fx::new();
        let v = fx
            .load(&format!(
                "{}\n[jwt.claims]\nrole = \"pg_role\"\ndatabases = \"dbs\"\ncidrs = \"nets\"\n\
                 session = \"params\"\nmax_connections = \"conn_limit\"\n\
                 pool_mode = \"tg_pool\"\n",
                base_config("")
            ))
            .unwrap();
        let token = fx.token_with(|c| {
            // The default names are decoys now.
            c.insert("role".into(), json!("postgres"));
            c.insert("databases".into(), json!(["postgres"]));
            c.insert("pg_role".into(), json!("reporting"));
            c.insert("dbs".into(), json!("warehouse"));
            c.insert("nets".into(), json!(["192.0.2.0/24", "2001:db8::/32"]));
            c.insert("params".into(), json!({"statement_timeout": "5s"}));
            c.insert("conn_limit".into(), json!(3));
            c.insert("pool_mode".into(), json!("session"));
            c.insert("tg_pool".into(), json!("transaction"));
        });
        let ok = v.verify(token.as_bytes(), fx.now).unwrap();
        assert_eq!(ok.role, "reporting");
        assert_eq!(ok.databases, vec!["warehouse"]);
        assert_eq!(ok.cidrs, vec!["192.0.2.0/24", "2001:db8::/32"]);
        assert_eq!(
            ok.session,
            vec![("statement_timeout".to_string(), "5s".to_string())]
        );
        assert_eq!(ok.max_connections, Some(3));
        assert_eq!(ok.pool_mode, Some(PoolModeRule::Transaction));
        // "role" alone no longer names a role.
        let token = fx.token(JwtAlg::Es256, Some("es256"));
        assert_eq!(
            v.verify(token.as_bytes(), fx.now),
            Err(JwtRejection::MissingClaim("role"))
        );
    }

    #[test]
    fn log_id_and_cache_key_never_carry_the_token() {
        let fx = Fx::new();
        let token = fx.token_with(|c| drop(c.remove("jti")));
        let ok = fx.check(&token).unwrap();
        let signing_input = token.rsplit_once('.').unwrap().0;
        let expected = hex::encode(digest::digest(&digest::SHA256, signing_input.as_bytes()));
        assert_eq!(ok.log_id, format!("jwt:{}", &expected[..12]));
        assert_eq!(
            ok.signature_hash.as_slice(),
            digest::digest(&digest::SHA256, token.as_bytes()).as_ref()
        );
        let signature = token.rsplit_once('.').unwrap().1;
        let debug = format!("{ok:?}");
        assert!(!debug.contains(signature) && !debug.contains(signing_input));

        // A jti that could forge a log line is not logged as it is.
        let token =
            fx.token_with(|c| drop(c.insert("jti".into(), json!("x\" level=error msg=\"pwned"))));
        let ok = fx.check(&token).unwrap();
        assert_eq!(ok.jti.as_deref(), Some("x\" level=error msg=\"pwned"));
        assert!(
            ok.log_id.starts_with("jwt:") && ok.log_id.len() == 16,
            "{}",
            ok.log_id
        );

        // A fresh signature of the same claims is a different cache key.
        let again = fx.token_with(|c| drop(c.remove("jti")));
        assert_ne!(fx.check(&again).unwrap().signature_hash, ok.signature_hash);
    }
}
