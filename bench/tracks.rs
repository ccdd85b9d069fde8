//! What the relay's per-session tracking costs per transaction, with the
//! latency histograms off (no admin listener) and on.
//!
//! One iteration is one pgbench select-only `-M prepared` transaction as
//! the relay sees it: the client's Bind/Execute/Sync in one chunk, the
//! server's BindComplete/DataRow/CommandComplete/ReadyForQuery in another.
//! With timing on, each transaction reads the clock twice and records a
//! query and a transaction latency; the difference between the two
//! benchmarks is what metrics add to a transaction, to hold against the
//! ~15–40 µs of tollgate CPU a transaction costs end to end (loadtest/).
//!
//! Run: `cargo bench --bench tracks`

use std::hint::black_box;
use std::rc::Rc;

use criterion::{criterion_group, criterion_main, Criterion};
use tollgate::metrics::ShardMetrics;
use tollgate::session::{SessionStats, Timing, Tracks};

fn push_msg(out: &mut Vec<u8>, tag: u8, payload: &[u8]) {
    out.push(tag);
    out.extend_from_slice(&((payload.len() + 4) as i32).to_be_bytes());
    out.extend_from_slice(payload);
}

/// A prepared select-only transaction: (client chunk, server chunk).
fn transaction() -> (Vec<u8>, Vec<u8>) {
    let mut client = Vec::new();
    // Bind: portal "", statement "P0_1", one text parameter (the aid).
    push_msg(&mut client, b'B', b"\0P0_1\0\0\0\0\x01\0\0\0\x0512345\0\0");
    push_msg(&mut client, b'E', b"\0\0\0\0\0");
    push_msg(&mut client, b'S', b"");
    let mut server = Vec::new();
    push_msg(&mut server, b'2', b"");
    push_msg(&mut server, b'D', b"\0\x01\0\0\0\x04-123");
    push_msg(&mut server, b'C', b"SELECT 1\0");
    push_msg(&mut server, b'Z', b"I");
    (client, server)
}

fn bench(c: &mut Criterion) {
    let (client, server) = transaction();
    let mut g = c.benchmark_group("tracks/select_only_prepared_txn");
    for timing in [false, true] {
        let metrics = Rc::new(ShardMetrics::new(0, timing, None));
        let t = timing.then(|| Timing::new(metrics.clone(), None));
        let mut tracks = Tracks::new(Rc::new(SessionStats::default()), t, None);
        let name = if timing { "timing_on" } else { "timing_off" };
        g.bench_function(name, |b| {
            b.iter(|| {
                tracks.saw_client(black_box(&client)).unwrap();
                tracks.saw_server(black_box(&server)).unwrap();
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
