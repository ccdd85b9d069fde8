//! JWTs as passwords, end to end: accepted when signed and valid, refused
//! otherwise with the same bytes as any bad token, and revocable by `jti`
//! with the same live effect as an opaque token.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::harness::*;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use ring::signature::{Ed25519KeyPair, KeyPair};

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn claims(exp_in: i64, aud: &str, jti: &str) -> serde_json::Value {
    serde_json::json!({
        "iss": "https://auth.test",
        "aud": aud,
        "exp": (now() as i64 + exp_in),
        "jti": jti,
        "sub": "ci-job",
        "role": "app",
        "databases": ["appdb"],
        "pg_session": {"statement_timeout": "4321ms"},
    })
}

fn eddsa(key: &Ed25519KeyPair, payload: &serde_json::Value) -> String {
    let input = format!(
        "{}.{}",
        b64(&serde_json::json!({"alg": "EdDSA", "typ": "JWT"})),
        b64(payload)
    );
    let sig = key.sign(input.as_bytes());
    format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()))
}

/// An Ed25519 public key as SPKI PEM: the fixed 12-byte prefix and the key.
fn ed25519_pem(key: &Ed25519KeyPair) -> String {
    let mut der = hex::decode("302a300506032b6570032100").unwrap();
    der.extend_from_slice(key.public_key().as_ref());
    format!(
        "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
        STANDARD.encode(der)
    )
}

#[test]
fn jwts_are_verified_revocable_and_refused_like_any_bad_token() {
    let rng = ring::rand::SystemRandom::new();
    let ed =
        Ed25519KeyPair::from_pkcs8(Ed25519KeyPair::generate_pkcs8(&rng).unwrap().as_ref()).unwrap();
    let files = tempfile::tempdir().unwrap();
    let pem = files.path().join("ed.pem");
    std::fs::write(&pem, ed25519_pem(&ed)).unwrap();
    let mut env = Env::build(EnvOptions {
        tables: format!(
            "[jwt]\nissuer = \"https://auth.test\"\naudience = \"tollgate\"\nleeway = \"1s\"\n\
             [[jwt.hmac]]\nsecret = \"{HMAC_SECRET}\"\n\
             [[jwt.public_key]]\nalg = \"EdDSA\"\nfile = \"{}\"\n",
            pem.display()
        ),
        ..EnvOptions::default()
    });
    env.start_proxy();
    let good_hs = hs256(&claims(60, "tollgate", "job-1"));
    let good_ed = eddsa(&ed, &claims(60, "tollgate", "job-2"));
    env.secrets.push(good_hs.clone());
    env.secrets.push(good_ed.clone());
    // The log must not hold a signature either.
    env.secrets
        .push(good_hs.rsplit('.').next().unwrap().to_owned());

    runtime().block_on(async {
        for token in [&good_hs, &good_ed] {
            let c = pg_connect(&env.conn_str("app", "appdb", token))
                .await
                .unwrap();
            let t: String = c
                .query_one("show statement_timeout", &[])
                .await
                .unwrap()
                .get(0);
            assert_eq!(t, "4321ms", "claims map to session parameters");
        }

        let mut tampered = good_hs.clone();
        let payload_at = tampered.find('.').unwrap() + 2;
        let flipped = if &tampered[payload_at..payload_at + 1] == "A" {
            "B"
        } else {
            "A"
        };
        tampered.replace_range(payload_at..payload_at + 1, flipped);
        let none = format!(
            "{}.{}.",
            b64(&serde_json::json!({"alg": "none"})),
            b64(&claims(60, "tollgate", "x"))
        );
        let cases = [
            ("expired", hs256(&claims(-30, "tollgate", "x"))),
            ("wrong audience", hs256(&claims(60, "other-service", "x"))),
            ("tampered", tampered),
            ("alg none", none),
            ("wrong database", good_hs.clone()),
        ];
        for (what, token) in &cases {
            let db = if *what == "wrong database" {
                "postgres"
            } else {
                "appdb"
            };
            let (code, message) = connect_error(&env.conn_str("app", db, token)).await;
            assert_eq!(code, "28P01", "{what}");
            assert_eq!(
                message, "token authentication failed for user \"app\"",
                "{what}"
            );
        }

        // Revoking the jti ends the open session and refuses new logins.
        let (client, connection) = tokio_postgres::connect(
            &env.conn_str("app", "appdb", &good_hs),
            tokio_postgres::NoTls,
        )
        .await
        .unwrap();
        let ended = tokio::spawn(connection);
        client.simple_query("select 1").await.unwrap();
        env.token_cmd(&["revoke-jwt", "job-1"]);
        let result = tokio::time::timeout(Duration::from_millis(1500), ended)
            .await
            .expect("the session was not ended within 1.5 s")
            .unwrap();
        let e = result.expect_err("ended without an error");
        let db = e.as_db_error().expect("a server error");
        assert_eq!(db.code().code(), "57P01");
        assert!(db.message().contains("revoked"), "{}", db.message());
        let (code, _) = connect_error(&env.conn_str("app", "appdb", &good_hs)).await;
        assert_eq!(code, "28P01");
        // The other JWT is unaffected.
        pg_connect(&env.conn_str("app", "appdb", &good_ed))
            .await
            .unwrap();
    });
    let log = env.log();
    for reason in ["jwt", "expired", "revoked"] {
        assert!(log.contains(reason), "the log does not name {reason}");
    }
    env.assert_log_clean();
}

/// A JWT's `pool_mode` claim does what `token create --pool-mode` does for
/// an opaque token: on a route that pools by session, the issuer can make
/// a fleet of workers share connections per transaction.
#[test]
fn a_jwts_pool_mode_claim_overrides_the_routes() {
    let mut env = Env::build(EnvOptions {
        workers: 1,
        tables: format!(
            "[pool]\nmode = \"session\"\nmax_server_connections = 2\n\
             checkout_timeout = \"2s\"\n\
             [jwt]\nissuer = \"https://auth.test\"\naudience = \"tollgate\"\n\
             [[jwt.hmac]]\nsecret = \"{HMAC_SECRET}\"\n"
        ),
        ..EnvOptions::default()
    });
    env.start_proxy();
    let with_mode = |jti: &str, mode: Option<&str>| {
        let mut c = claims(60, "tollgate", jti);
        if let Some(mode) = mode {
            c["pool_mode"] = serde_json::json!(mode);
        }
        hs256(&c)
    };
    let tx = with_mode("workers", Some("transaction"));
    let session = with_mode("reports", None);
    runtime().block_on(async {
        // The session-mode client holds one of the two connections.
        let s = pg_connect(&env.conn_str("app", "appdb", &session))
            .await
            .unwrap();
        let pid = simple_one(&s, "select pg_backend_pid()").await;
        // Five transaction-mode clients at once share the other; by
        // session the second would wait and get 53300.
        let mut clients = Vec::new();
        for _ in 0..5 {
            clients.push(
                pg_connect(&env.conn_str("app", "appdb", &tx))
                    .await
                    .unwrap(),
            );
        }
        for _ in 0..3 {
            for c in &clients {
                // The claim's session parameters follow each client.
                assert_eq!(simple_one(c, "show statement_timeout").await, "4321ms");
            }
        }
        assert_eq!(simple_one(&s, "select pg_backend_pid()").await, pid);
    });
    // A mode tollgate does not know refuses the token, like any bad claim.
    let bad = with_mode("bad", Some("statement"));
    runtime().block_on(async {
        let err = pg_connect(&env.conn_str("app", "appdb", &bad))
            .await
            .err()
            .unwrap();
        assert_eq!(
            err.code(),
            Some(&tokio_postgres::error::SqlState::INVALID_PASSWORD)
        );
    });
}
