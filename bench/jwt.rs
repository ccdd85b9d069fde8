//! JWT check: `JwtVerifier::verify` (signature, header and claims) for
//! HS256 and EdDSA, against the per-shard cache path (SHA-256 of the token
//! and a map lookup), which is what a reconnecting client pays.
//!
//! Run: `cargo bench --bench jwt`

use std::collections::HashMap;
use std::hint::black_box;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use criterion::{criterion_group, criterion_main, Criterion};
use ring::signature::{Ed25519KeyPair, KeyPair};
use tollgate::auth::jwt::{JwtConfigRaw, JwtVerifier, VerifiedJwt};

const SECRET: &str = "a-bench-hmac-secret-of-at-least-32-bytes!";

fn b64(v: &serde_json::Value) -> String {
    URL_SAFE_NO_PAD.encode(v.to_string())
}

fn claims() -> serde_json::Value {
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    serde_json::json!({
        "aud": "tollgate", "exp": exp, "jti": "bench-1", "role": "app",
        "databases": ["appdb"], "pg_session": {"statement_timeout": "5s"},
    })
}

fn bench_jwt(c: &mut Criterion) {
    let rng = ring::rand::SystemRandom::new();
    let ed =
        Ed25519KeyPair::from_pkcs8(Ed25519KeyPair::generate_pkcs8(&rng).unwrap().as_ref()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut spki = hex::decode("302a300506032b6570032100").unwrap();
    spki.extend_from_slice(ed.public_key().as_ref());
    std::fs::write(
        dir.path().join("ed.pem"),
        format!(
            "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
            STANDARD.encode(spki)
        ),
    )
    .unwrap();
    let raw: JwtConfigRaw = toml::from_str(&format!(
        "audience = \"tollgate\"\n[[hmac]]\nsecret = \"{SECRET}\"\n\
         [[public_key]]\nalg = \"EdDSA\"\nfile = \"ed.pem\"\n"
    ))
    .unwrap();
    let verifier = JwtVerifier::from_raw(raw, dir.path()).unwrap();

    let hs_input = format!(
        "{}.{}",
        b64(&serde_json::json!({"alg": "HS256"})),
        b64(&claims())
    );
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, SECRET.as_bytes());
    let hs = format!(
        "{hs_input}.{}",
        URL_SAFE_NO_PAD.encode(ring::hmac::sign(&key, hs_input.as_bytes()).as_ref())
    );
    let ed_input = format!(
        "{}.{}",
        b64(&serde_json::json!({"alg": "EdDSA"})),
        b64(&claims())
    );
    let ed_token = format!(
        "{ed_input}.{}",
        URL_SAFE_NO_PAD.encode(ed.sign(ed_input.as_bytes()).as_ref())
    );

    let now = SystemTime::now();
    let mut group = c.benchmark_group("jwt_check");
    group.sample_size(30);
    group.warm_up_time(Duration::from_millis(500));
    group.measurement_time(Duration::from_secs(2));
    for (name, token) in [("hs256_uncached", &hs), ("eddsa_uncached", &ed_token)] {
        verifier.verify(token.as_bytes(), now).expect(name);
        group.bench_function(name, |b| {
            b.iter(|| verifier.verify(black_box(token.as_bytes()), now))
        });
    }
    // The cached path: hash the token, look it up, clone the result.
    let mut cache: HashMap<[u8; 32], VerifiedJwt> = HashMap::new();
    let v = verifier.verify(ed_token.as_bytes(), now).unwrap();
    cache.insert(tollgate::auth::token::sha256(ed_token.as_bytes()), v);
    group.bench_function("cached", |b| {
        b.iter(|| {
            let k = tollgate::auth::token::sha256(black_box(ed_token.as_bytes()));
            cache.get(&k).cloned()
        })
    });
    group.finish();
}

criterion_group!(benches, bench_jwt);
criterion_main!(benches);
