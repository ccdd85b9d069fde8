//! The SCRAM-SHA-256 client step tollgate runs for every upstream login:
//! `ScramClient::start` → `handle_server_first` → `handle_server_final`,
//! against server messages computed here as a PostgreSQL server would
//! (RFC 5802 §3), at PostgreSQL's default 4096 iterations.
//!
//! With the per-shard `KeyCache` warm, a login costs a few HMACs; on a miss
//! it pays PBKDF2 (4096 × 2 SHA-256 compressions), which is what the cache
//! exists to avoid. The gap between the two is the point of this bench.
//!
//! Run: `cargo bench --bench scram`

use std::hint::black_box;
use std::num::NonZeroU32;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use criterion::{criterion_group, criterion_main, Criterion};
use ring::{hmac, pbkdf2};
use tollgate::upstream::scram::{ChannelBinding, KeyCache, ScramClient, NONCE_LEN};

/// PostgreSQL's default `scram_iterations`.
const ITERATIONS: u32 = 4096;
/// The kind of password quickstart generates (32 hex digits).
const PASSWORD: &[u8] = b"6f1c0e53a9d24b7f8e0a1c2d3e4f5a6b";
/// Fixed client nonce, so the server messages can be computed once.
const CLIENT_NONCE: [u8; NONCE_LEN] = *b"tollgate-bench-nce";
/// PostgreSQL appends 18 random bytes, base64: 24 characters.
const SERVER_NONCE: &str = "Zm9vYmFyYmF6cXV1eGNvcmdl";
/// PostgreSQL's salts are 16 bytes.
const SALT: [u8; 16] = *b"0123456789abcdef";

/// The server's two messages for one exchange with the fixed client nonce.
struct ServerScript {
    server_first: Vec<u8>,
    server_final: Vec<u8>,
}

/// Computes what a PostgreSQL server holding the verifier for `PASSWORD`
/// would send (RFC 5802 §3), independently of tollgate's client code.
fn server_script() -> ServerScript {
    let client_nonce = BASE64.encode(CLIENT_NONCE);
    let nonce = format!("{client_nonce}{SERVER_NONCE}");
    let server_first = format!("r={nonce},s={},i={ITERATIONS}", BASE64.encode(SALT));
    // Plain TCP, no channel binding: gs2 header "n,,", so c=biws.
    let client_first_bare = format!("n=,r={client_nonce}");
    let client_final_without_proof = format!("c=biws,r={nonce}");
    let auth_message = format!("{client_first_bare},{server_first},{client_final_without_proof}");

    let mut salted = [0u8; 32];
    pbkdf2::derive(
        pbkdf2::PBKDF2_HMAC_SHA256,
        NonZeroU32::new(ITERATIONS).unwrap(),
        &SALT,
        PASSWORD,
        &mut salted,
    );
    let server_key = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, &salted), b"Server Key");
    let signature = hmac::sign(
        &hmac::Key::new(hmac::HMAC_SHA256, server_key.as_ref()),
        auth_message.as_bytes(),
    );
    ServerScript {
        server_first: server_first.into_bytes(),
        server_final: format!("v={}", BASE64.encode(signature.as_ref())).into_bytes(),
    }
}

/// One whole client exchange; panics if the server's proof does not verify.
fn exchange(script: &ServerScript, cache: &mut KeyCache) {
    let (first, state) =
        ScramClient::start(PASSWORD, ChannelBinding::NotSupported, Some(CLIENT_NONCE))
            .expect("start");
    black_box(first);
    let (client_final, state) = state
        .handle_server_first(black_box(&script.server_first), cache)
        .expect("server-first");
    black_box(client_final);
    state
        .handle_server_final(black_box(&script.server_final))
        .expect("server signature verifies");
}

fn bench_scram(c: &mut Criterion) {
    let script = server_script();

    let mut group = c.benchmark_group("scram_exchange_4096");
    group.sample_size(10);
    group.warm_up_time(Duration::from_millis(500));

    // Warm per-shard cache: every login after the first for this verifier.
    let mut warm = KeyCache::new();
    exchange(&script, &mut warm);
    assert_eq!(warm.derivations(), 1);
    group.measurement_time(Duration::from_secs(2));
    group.bench_function("cache_hit", |b| b.iter(|| exchange(&script, &mut warm)));
    assert_eq!(warm.derivations(), 1, "a warm cache never derives again");

    // Cold: the entry is dropped before each login, so each one takes the
    // production miss path (fingerprint, PBKDF2, insert).
    let mut cold = KeyCache::new();
    group.measurement_time(Duration::from_secs(4));
    group.bench_function("cache_miss", |b| {
        b.iter(|| {
            cold.clear();
            exchange(&script, &mut cold)
        })
    });
    assert!(cold.derivations() > 1);

    // Caching disabled (capacity 0): PBKDF2 without the cache bookkeeping.
    let mut disabled = KeyCache::with_capacity(0);
    group.bench_function("cache_disabled", |b| {
        b.iter(|| exchange(&script, &mut disabled))
    });
    group.finish();
}

criterion_group!(benches, bench_scram);
criterion_main!(benches);
