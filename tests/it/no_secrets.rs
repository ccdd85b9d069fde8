//! No secret reaches the log or the admin API, whatever the auth path.
//!
//! One proxy with JSON logs at TRACE, client TLS, JWT (HS256) and the admin
//! listener (with a bearer token) is driven through every login outcome:
//! opaque tokens good, with a wrong secret, unknown, malformed, revoked,
//! rotated and expired; JWTs good, badly signed, expired and malformed; a
//! token over TLS; upstream SCRAM. A second proxy in front of an md5 cluster
//! covers the other upstream login. Then the log and the /metrics and
//! /sessions bodies are scanned for every secret in plain text, hex (both
//! cases) and base64 (all four variants), and the log is checked to hold
//! what it should, so the scan cannot pass on an empty or truncated log.

use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::harness::*;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use ring::rand::SecureRandom;
use serde_json::Value;
use tollgate::cluster::HbaAuth;

const HMAC_KEY: &str = "no-secrets-hmac-key-0123456789-abcdefghij";
const WRONG_HMAC_KEY: &str = "a-different-hmac-key-9876543210-zyxwvuts";
const ADMIN_TOKEN: &str = "admin-bearer-7f3a9c1e5b2d4680-qwerty";
const WRONG_ADMIN_TOKEN: &str = "wrong-admin-bearer-11223344556677";

/// Everything the log must not hold: (what, bytes).
#[derive(Default)]
struct Secrets(Vec<(String, Vec<u8>)>);

impl Secrets {
    fn add(&mut self, what: impl Into<String>, secret: impl AsRef<[u8]>) {
        self.0.push((what.into(), secret.as_ref().to_vec()));
    }

    /// A password sent as a token: the whole string, and for a `tg_` token
    /// of the right length its secret part, as text and as the bytes it
    /// encodes.
    fn token(&mut self, what: &str, token: &str) {
        self.add(what, token);
        if token.starts_with("tg_") && token.len() == 88 {
            let secret = &token[16..80];
            self.add(format!("{what}: secret part"), secret);
            if let Ok(bytes) = hex::decode(secret) {
                self.add(format!("{what}: secret bytes"), bytes);
            }
        }
    }

    /// A JWT: the whole token, its signature segment and the signature bytes.
    fn jwt(&mut self, what: &str, jwt: &str) {
        self.add(what, jwt);
        let sig = jwt.rsplit('.').next().unwrap();
        self.add(format!("{what}: signature"), sig);
        if let Ok(bytes) = URL_SAFE_NO_PAD.decode(sig) {
            self.add(format!("{what}: signature bytes"), bytes);
        }
    }
}

fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    ring::rand::SystemRandom::new().fill(&mut b).unwrap();
    hex::encode(b)
}

/// A well-formed opaque token (right length, valid checksum).
fn forge_token(id: &str, secret_hex: &str) -> String {
    let body = format!("tg_{id}_{secret_hex}");
    let crc = crc32fast::hash(body.as_bytes());
    format!("{body}{}", hex::encode(crc.to_be_bytes()))
}

fn token_id(token: &str) -> &str {
    &token[3..15]
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn hs256(key: &str, exp_in: i64, jti: &str) -> String {
    let b64 = |v: Value| URL_SAFE_NO_PAD.encode(v.to_string());
    let input = format!(
        "{}.{}",
        b64(serde_json::json!({"alg": "HS256", "typ": "JWT"})),
        b64(serde_json::json!({
            "iss": "https://auth.test",
            "aud": "tollgate",
            "exp": now() + exp_in,
            "jti": jti,
            "sub": "ci-job",
            "role": "app",
            "databases": ["appdb"],
        }))
    );
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key.as_bytes());
    let sig = ring::hmac::sign(&key, input.as_bytes());
    format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()))
}

fn write_file(dir: &std::path::Path, name: &str, text: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p
}

/// The upstream role's stored verifier (`pg_authid.rolpassword`).
fn rolpassword(env: &Env) -> String {
    env.cluster
        .psql(
            "postgres",
            "select rolpassword from pg_authid where rolname = 'app'",
        )
        .unwrap()
}

/// The upstream password and what a SCRAM client derives from it
/// (SaltedPassword, ClientKey, StoredKey, ServerKey), any of which would
/// let a reader of the log log in or impersonate the server.
fn upstream_scram_secrets(env: &Env, secrets: &mut Secrets) {
    secrets.add("upstream password", env.cluster.password());
    let verifier = rolpassword(env);
    // SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>
    let rest = verifier
        .strip_prefix("SCRAM-SHA-256$")
        .unwrap_or_else(|| panic!("not a SCRAM verifier: {verifier:?}"));
    let (params, keys) = rest.split_once('$').unwrap();
    let (iterations, salt) = params.split_once(':').unwrap();
    let (stored, server) = keys.split_once(':').unwrap();
    let salt = STANDARD.decode(salt).unwrap();
    let mut salted = [0u8; 32];
    ring::pbkdf2::derive(
        ring::pbkdf2::PBKDF2_HMAC_SHA256,
        iterations.parse().unwrap(),
        &salt,
        env.cluster.password().as_bytes(),
        &mut salted,
    );
    let hmac = |msg: &[u8]| {
        let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &salted);
        ring::hmac::sign(&k, msg).as_ref().to_vec()
    };
    let client_key = hmac(b"Client Key");
    let stored_key = ring::digest::digest(&ring::digest::SHA256, &client_key);
    assert_eq!(STANDARD.encode(stored_key.as_ref()), stored, "StoredKey");
    assert_eq!(STANDARD.encode(hmac(b"Server Key")), server, "ServerKey");
    secrets.add("SCRAM SaltedPassword", salted);
    secrets.add("SCRAM ClientKey", &client_key);
    secrets.add("SCRAM StoredKey", stored_key.as_ref());
    secrets.add("SCRAM ServerKey", hmac(b"Server Key"));
}

/// Every whole line parsed as JSON; panics on the first that is not. A
/// last line without its newline is being written as the log is read,
/// and is left out.
fn json_lines(log: &str) -> Vec<Value> {
    log.split_inclusive('\n')
        .filter(|l| l.ends_with('\n'))
        .map(str::trim_end)
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(n, l)| {
            serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("log line {} is not JSON ({e}): {l}", n + 1))
        })
        .collect()
}

fn audit<'a>(lines: &'a [Value], message: &str) -> Vec<&'a Value> {
    lines
        .iter()
        .filter(|l| l["target"] == "tollgate::audit" && l["message"] == message)
        .collect()
}

/// Waits until `ok(log)` holds, or panics with `what` after 10 s.
fn wait_for_log(env: &Env, what: &str, ok: impl Fn(&str) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ok(&env.log()) {
        assert!(
            Instant::now() < deadline,
            "the log never showed {what}:\n{}",
            env.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Connects until the login is refused (a revocation or expiry takes
/// effect asynchronously); returns the SQLSTATE.
async fn refused_eventually(conn: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match pg_connect(conn).await {
            Ok(_) => {
                assert!(Instant::now() < deadline, "still accepted after 10 s");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => {
                let db = e.as_db_error().unwrap_or_else(|| panic!("{e}"));
                return db.code().code().to_owned();
            }
        }
    }
}

/// An admin response's headers and body, for the scan.
fn whole(r: &HttpResponse) -> String {
    let mut s: String = r
        .headers
        .iter()
        .map(|(n, v)| format!("{n}: {v}\n"))
        .collect();
    s.push('\n');
    s.push_str(&r.body);
    s
}

/// Panics listing every secret found in `haystacks`.
fn assert_no_secrets(haystacks: &[(&str, &str)], secrets: &Secrets) {
    let found = find_secrets(haystacks, &secrets.0);
    assert!(
        found.is_empty(),
        "{} secret(s) leaked:\n{}",
        found.len(),
        found.join("\n")
    );
}

#[test]
fn no_secret_in_log_or_admin_api_on_any_auth_path() {
    let started = Instant::now();
    let ca = Ca::new("no-secrets CA");
    let files = tempfile::tempdir().unwrap();
    let (cert, key) = ca.leaf(&["localhost", "127.0.0.1"]);
    let cert = write_file(files.path(), "tg.crt", &cert);
    let key = write_file(files.path(), "tg.key", &key);
    let admin = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut env = Env::build(EnvOptions {
        tables: format!(
            "[log]\nformat = \"json\"\nlevel = \"trace\"\n\
             [tls]\ncert = \"{}\"\nkey = \"{}\"\nmode = \"allow\"\n\
             [jwt]\nissuer = \"https://auth.test\"\naudience = \"tollgate\"\nleeway = \"1s\"\n\
             [[jwt.hmac]]\nsecret = \"{HMAC_KEY}\"\n\
             [admin]\nlisten = \"{admin}\"\ntoken = \"{ADMIN_TOKEN}\"\nper_token_metrics = true\n",
            cert.display(),
            key.display()
        ),
        ..EnvOptions::default()
    });

    let mut secrets = Secrets::default();
    upstream_scram_secrets(&env, &mut secrets);
    secrets.add("JWT HMAC key", HMAC_KEY);
    secrets.add("wrong JWT HMAC key", WRONG_HMAC_KEY);
    secrets.add("admin bearer token", ADMIN_TOKEN);
    secrets.add("wrong admin bearer token", WRONG_ADMIN_TOKEN);

    let mut create = |what: &str, extra: &[&str]| {
        let mut args = vec!["--user", "app"];
        args.extend_from_slice(extra);
        let t = env.create_token(&args);
        secrets.token(what, &t);
        t
    };
    let good = create("good token", &["--database", "appdb"]);
    let victim = create("token whose id gets a wrong secret", &[]);
    let revoked = create("revoked token", &[]);
    let rotated = create("rotated token (old secret)", &[]);
    let expiring = create("expired token", &["--ttl", "1s"]);
    let tls_token = create("TLS token", &[]);
    let created = Instant::now();

    let bad_secret = forge_token(token_id(&victim), &random_hex(32));
    secrets.token("wrong secret for an existing id", &bad_secret);
    let unknown = forge_token(&random_hex(6), &random_hex(32));
    secrets.token("unknown token", &unknown);
    let mut bad_checksum = forge_token(token_id(&victim), &random_hex(32));
    bad_checksum.replace_range(80.., "00000000");
    secrets.token("token with a bad checksum", &bad_checksum);
    let not_a_token = format!("my-old-password-{}", random_hex(12));
    secrets.add("a password that is not a token", &not_a_token);

    let good_jwt = hs256(HMAC_KEY, 60, "jti-good");
    let bad_sig_jwt = hs256(WRONG_HMAC_KEY, 60, "jti-bad-signature");
    let expired_jwt = hs256(HMAC_KEY, -30, "jti-expired");
    let malformed_jwt = format!(
        "eyJ{}.{}.{}",
        random_hex(10),
        random_hex(12),
        random_hex(16)
    );
    secrets.jwt("good JWT", &good_jwt);
    secrets.jwt("JWT signed with the wrong key", &bad_sig_jwt);
    secrets.jwt("expired JWT", &expired_jwt);
    secrets.add("malformed JWT", &malformed_jwt);

    env.start_proxy();
    let port = env.addr().port();
    let mut bodies: Vec<(&str, String)> = Vec::new();

    runtime().block_on(async {
        // Accepted: an opaque token and a JWT in the clear (loopback), a
        // token over TLS. All three stay open for /sessions.
        let plain = pg_connect(&env.conn_str("app", "appdb", &good))
            .await
            .unwrap();
        plain.simple_query("select 1").await.unwrap();
        let jwt = pg_connect(&env.conn_str("app", "appdb", &good_jwt))
            .await
            .unwrap();
        jwt.simple_query("select 2").await.unwrap();
        let tls =
            tokio_postgres_rustls::MakeRustlsConnect::new((*rustls_client(&ca, None)).clone());
        let (tls_client, connection) = tokio_postgres::connect(
            &format!(
                "host=localhost hostaddr=127.0.0.1 port={port} user=app dbname=appdb \
                 password={tls_token} sslmode=require"
            ),
            tls,
        )
        .await
        .unwrap();
        tokio::spawn(connection);
        let r = tls_client
            .query_one("select $1::text || 'k'", &[&"o"])
            .await
            .unwrap();
        assert_eq!(r.get::<_, String>(0), "ok");
        // A refusal over TLS too.
        let tls =
            tokio_postgres_rustls::MakeRustlsConnect::new((*rustls_client(&ca, None)).clone());
        let refused = tokio_postgres::connect(
            &format!(
                "host=localhost hostaddr=127.0.0.1 port={port} user=app dbname=appdb \
                 password={bad_secret} sslmode=require"
            ),
            tls,
        )
        .await
        .err()
        .expect("a wrong secret over TLS was accepted");
        assert_eq!(refused.as_db_error().unwrap().code().code(), "28P01");

        // Refused: every reason the log must name, none with a secret.
        for (what, password) in [
            ("wrong secret", &bad_secret),
            ("unknown token", &unknown),
            ("bad checksum", &bad_checksum),
            ("not a token", &not_a_token),
            ("JWT with a bad signature", &bad_sig_jwt),
            ("expired JWT", &expired_jwt),
            ("malformed JWT", &malformed_jwt),
        ] {
            let (code, message) = connect_error(&env.conn_str("app", "appdb", password)).await;
            assert_eq!(code, "28P01", "{what}: {message}");
        }

        // Revoked: works, then is refused once the revocation is loaded.
        pg_connect(&env.conn_str("app", "appdb", &revoked))
            .await
            .unwrap();
        env.token_cmd(&["revoke", token_id(&revoked)]);
        let code = refused_eventually(&env.conn_str("app", "appdb", &revoked)).await;
        assert_eq!(code, "28P01", "revoked");

        // Rotated: the new secret (printed once, a secret too) works, the
        // old one stops.
        let new = env.token_cmd(&["rotate", token_id(&rotated)]);
        let new = new.trim().to_owned();
        assert!(new.starts_with("tg_"), "{new:?}");
        secrets.token("rotated token (new secret)", &new);
        let code = refused_eventually(&env.conn_str("app", "appdb", &rotated)).await;
        assert_eq!(code, "28P01", "rotated");
        let deadline = Instant::now() + Duration::from_secs(10);
        while pg_connect(&env.conn_str("app", "appdb", &new))
            .await
            .is_err()
        {
            assert!(Instant::now() < deadline, "the rotated secret never worked");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }

        // The admin API while the three sessions are open.
        for bearer in [None, Some(WRONG_ADMIN_TOKEN)] {
            let r = http(admin, "GET", "/sessions", bearer);
            assert_eq!(r.status, 401, "/sessions with bearer {bearer:?}");
            bodies.push(("GET /sessions (unauthorized)", whole(&r)));
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        let sessions = loop {
            let r = http(admin, "GET", "/sessions", Some(ADMIN_TOKEN));
            let body = whole(&r);
            assert_eq!(r.status, 200, "{body}");
            if body.matches("\"token_id\"").count() >= 3 && body.contains("TLSv1_3") {
                break body;
            }
            assert!(
                Instant::now() < deadline,
                "/sessions never showed all: {body}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert!(sessions.contains(token_id(&good)), "{sessions}");
        assert!(sessions.contains(token_id(&tls_token)), "{sessions}");
        assert!(sessions.contains("jwt:jti-good"), "{sessions}");
        bodies.push(("GET /sessions", sessions));
        let r = http(admin, "GET", "/metrics", Some(ADMIN_TOKEN));
        let metrics = whole(&r);
        assert_eq!(r.status, 200, "{metrics}");
        assert!(
            metrics.contains(&format!("token_id=\"{}\"", token_id(&good))),
            "no per-token series: {metrics}"
        );
        bodies.push(("GET /metrics", metrics));

        // Expired: 1 s after creation, plus what the check allows.
        let wait = Duration::from_millis(1100).saturating_sub(created.elapsed());
        tokio::time::sleep(wait).await;
        let code = refused_eventually(&env.conn_str("app", "appdb", &expiring)).await;
        assert_eq!(code, "28P01", "expired");

        drop((plain, jwt, tls_client));
    });

    let reasons = [
        "bad_secret",
        "unknown_token",
        "malformed",
        "revoked",
        "rotated",
        "expired",
        "jwt_bad_signature",
        "jwt_expired",
        "jwt_malformed",
    ];
    // The three sessions held open above end when their clients go (the
    // TLS one as client_io_error: the runtime drops it without close_notify).
    let held = [
        token_id(&good).to_owned(),
        "jwt:jti-good".to_owned(),
        token_id(&tls_token).to_owned(),
    ];
    wait_for_log(&env, "every refusal and the held sessions' ends", |log| {
        reasons
            .iter()
            .all(|r| log.contains(&format!("\"reason\":\"{r}\"")))
            && held.iter().all(|id| {
                log.lines().any(|l| {
                    l.contains("\"session ended\"") && l.contains(&format!("\"token_id\":\"{id}\""))
                })
            })
    });
    let log = env.log();

    // 1. format = "json" took effect: every line is JSON.
    let lines = json_lines(&log);

    // 2. No secret, in any encoding, in the log or the admin bodies.
    let mut haystacks = vec![("the proxy log", log.as_str())];
    haystacks.extend(bodies.iter().map(|(n, b)| (*n, b.as_str())));
    assert_no_secrets(&haystacks, &secrets);

    // 3. The log holds what it should, so the scan above was not vacuous.
    let refused = audit(&lines, "connection refused");
    for reason in reasons {
        assert!(
            refused.iter().any(|l| l["reason"] == reason),
            "no refusal with reason {reason}: {refused:?}"
        );
    }
    let wrong_secret = refused
        .iter()
        .find(|l| l["reason"] == "bad_secret")
        .unwrap();
    assert_eq!(wrong_secret["token_id"], token_id(&victim));
    assert!(
        refused
            .iter()
            .any(|l| l["reason"] == "bad_secret" && l["tls"] == "TLSv1_3"),
        "no refusal over TLS 1.3: {refused:?}"
    );
    let started_events = audit(&lines, "session started");
    assert!(
        started_events.len() >= 5,
        "sessions started: {started_events:?}"
    );
    assert!(
        started_events
            .iter()
            .any(|l| l["tls"] == "TLSv1_3" && l["token_id"] == token_id(&tls_token)),
        "no TLS 1.3 session for the TLS token: {started_events:?}"
    );
    assert!(
        started_events
            .iter()
            .any(|l| l["token_id"] == "jwt:jti-good"),
        "no JWT session: {started_events:?}"
    );
    assert!(
        started_events.iter().all(|l| l["upstream_auth"]
            .as_str()
            .is_some_and(|a| a.contains("SCRAM"))),
        "upstream login was not SCRAM: {started_events:?}"
    );
    // tollgate's one trace!() call site is the relay's start (which pump
    // a session runs on); dependencies add their own through the log
    // bridge. Either proves the filter is at TRACE.
    let level = |l: &&Value, lv: &str| l["level"] == lv;
    assert!(
        lines.iter().any(|l| level(&l, "TRACE")),
        "no TRACE line: is RUST_LOG=trace in effect?"
    );
    assert!(
        lines.iter().any(|l| level(&l, "DEBUG")
            && l["target"]
                .as_str()
                .is_some_and(|t| t.starts_with("tollgate"))),
        "no DEBUG line from tollgate itself"
    );
    eprintln!(
        "scanned {} log lines and {} admin bytes for {} secrets in {:.1?}",
        lines.len(),
        bodies.iter().map(|(_, b)| b.len()).sum::<usize>(),
        secrets.0.len(),
        started.elapsed()
    );
}

/// md5 upstream auth: neither the password nor the md5 hash Postgres
/// stores (which logs in as well as the password) reaches the log.
#[test]
fn no_secret_in_log_with_md5_upstream() {
    let mut env = Env::build(EnvOptions {
        auth: HbaAuth::Md5,
        tables: "[log]\nformat = \"json\"\nlevel = \"trace\"\n".into(),
        ..EnvOptions::default()
    });
    let mut secrets = Secrets::default();
    secrets.add("upstream password", env.cluster.password());
    let stored = rolpassword(&env);
    let hash = stored
        .strip_prefix("md5")
        .unwrap_or_else(|| panic!("not an md5 hash: {stored:?}"));
    secrets.add("stored md5 hash", hash);
    secrets.add("stored md5 hash bytes", hex::decode(hash).unwrap());
    let good = env.create_token(&["--user", "app"]);
    secrets.token("good token", &good);
    let victim = env.create_token(&["--user", "app"]);
    let bad = forge_token(token_id(&victim), &random_hex(32));
    secrets.token("wrong secret", &bad);
    env.start_proxy();
    runtime().block_on(async {
        let c = pg_connect(&env.conn_str("app", "appdb", &good))
            .await
            .unwrap();
        c.simple_query("select 1").await.unwrap();
        let (code, _) = connect_error(&env.conn_str("app", "appdb", &bad)).await;
        assert_eq!(code, "28P01");
    });
    wait_for_log(&env, "the refusal and the session's end", |log| {
        log.contains("\"reason\":\"bad_secret\"") && log.contains("\"session ended\"")
    });
    let log = env.log();
    let lines = json_lines(&log);
    assert_no_secrets(&[("the proxy log", log.as_str())], &secrets);
    let started = audit(&lines, "session started");
    assert!(
        started.iter().any(|l| l["upstream_auth"]
            .as_str()
            .is_some_and(|a| a.to_ascii_lowercase().contains("md5"))),
        "no session logged in with md5: {started:?}"
    );
    assert!(lines.iter().any(|l| l["level"] == "TRACE"), "no TRACE line");
}

/// The scanner itself: a secret is found in each encoding it is written in.
#[test]
fn scanner_finds_every_encoding() {
    // Has `+`, `/` and padding in base64, so all seven forms differ.
    let secret = b"tg_secret>>>???~~~~x".to_vec();
    let secrets = vec![("sample".to_owned(), secret.clone())];
    for (encoding, form) in secret_encodings(&secret) {
        let line = format!("{{\"level\":\"TRACE\",\"target\":\"x\",\"message\":\"a{form}b\"}}");
        let found = find_secrets(&[("log", line.as_str())], &secrets);
        assert!(
            found
                .iter()
                .any(|f| f.contains(&format!("({encoding})")) && f.contains("target=x")),
            "{encoding} not found: {found:?}"
        );
    }
    assert_eq!(secret_encodings(&secret).len(), 7);
}

/// A secret too short to scan without false positives is refused, not skipped.
#[test]
#[should_panic(expected = "shorter than")]
fn scanner_refuses_short_secrets() {
    let short = vec![("short".to_owned(), b"0123456789".to_vec())];
    find_secrets(&[("log", "")], &short);
}
