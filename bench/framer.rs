//! Framer scan throughput: how fast the relay follows message boundaries.
//!
//! The relay reads into a 16 KiB buffer per direction, scans the 5-byte
//! headers with [`Framer::scan`] and writes the same bytes out, so the
//! figure that matters is bytes (and messages) scanned per second over a
//! realistic server-to-client stream. Payloads are skipped by arithmetic, so
//! the cost is per header: a stream of small rows is the worst case per
//! byte, which is why it gets its own benchmark beside the mixed one.
//! Criterion reports both messages/s and GiB/s for each.
//!
//! Run: `cargo bench --bench framer`

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use tollgate::protocol::Framer;

/// The relay's buffer size (`buffer_size` default in the config).
const RELAY_CHUNK: usize = 16 * 1024;

/// xorshift64*: deterministic, so every run scans the same stream.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + (self.next() % (hi - lo + 1) as u64) as usize
    }
}

/// Appends one message: tag, Int32 length (counting itself), payload.
fn push_msg(out: &mut Vec<u8>, tag: u8, payload_len: usize, fill: u8) {
    out.push(tag);
    out.extend_from_slice(&((payload_len + 4) as i32).to_be_bytes());
    out.resize(out.len() + payload_len, fill);
}

/// What a DataRow size distribution looks like.
#[derive(Clone, Copy)]
enum Mix {
    /// OLTP and analytics results together: most rows 20–200 bytes, some
    /// 1–8 KB (JSON documents, text columns), an occasional 64–256 KB row
    /// (a bytea or a large jsonb).
    Mixed,
    /// Only 20–200 byte rows (what pgbench's select-only workload returns):
    /// the most headers per byte.
    SmallRows,
}

/// A stream of complete query results (`T`, `D`…, `C`, `Z`) of about
/// `target` bytes. Returns the bytes and the number of messages.
fn result_stream(mix: Mix, target: usize) -> (Vec<u8>, u64) {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut out = Vec::with_capacity(target + 512 * 1024);
    let mut messages = 0u64;
    while out.len() < target {
        // RowDescription: 19 + name bytes per column.
        let columns = rng.range(1, 12);
        push_msg(&mut out, b'T', 2 + columns * (19 + rng.range(2, 16)), b'c');
        messages += 1;
        let rows = match rng.range(0, 9) {
            0..=5 => rng.range(1, 10),   // point lookups
            6..=8 => rng.range(10, 200), // short lists
            _ => rng.range(200, 2000),   // reports
        };
        for _ in 0..rows {
            let size = match mix {
                Mix::SmallRows => rng.range(20, 200),
                Mix::Mixed => match rng.range(0, 999) {
                    0..=899 => rng.range(20, 200),
                    900..=994 => rng.range(1024, 8 * 1024),
                    _ => rng.range(64 * 1024, 256 * 1024),
                },
            };
            push_msg(&mut out, b'D', size, b'd');
            messages += 1;
        }
        // CommandComplete "SELECT n\0", then ReadyForQuery 'I'.
        let tag = format!("SELECT {rows}\0");
        out.push(b'C');
        out.extend_from_slice(&((tag.len() + 4) as i32).to_be_bytes());
        out.extend_from_slice(tag.as_bytes());
        push_msg(&mut out, b'Z', 1, b'I');
        messages += 2;
    }
    (out, messages)
}

/// Scans `stream` in `chunk`-byte reads, as the relay does; returns the
/// messages completed (so the work cannot be optimized away).
fn scan_chunked(stream: &[u8], chunk: usize) -> u64 {
    let mut framer = Framer::counting(b'Z');
    let mut completed = 0u64;
    for c in stream.chunks(chunk) {
        let scan = framer.scan(c).expect("stream is well formed");
        completed += u64::from(scan.completed) + u64::from(scan.tagged);
    }
    completed
}

fn bench_framer(c: &mut Criterion) {
    for (name, mix) in [("mixed", Mix::Mixed), ("small_rows", Mix::SmallRows)] {
        let (stream, messages) = result_stream(mix, 8 << 20);
        // The stream must frame exactly: every message completes once.
        let mut check = Framer::new();
        assert_eq!(u64::from(check.scan(&stream).unwrap().completed), messages);
        assert!(check.at_boundary());
        eprintln!(
            "framer/{name}: {} bytes, {messages} messages, {:.0} bytes/message",
            stream.len(),
            stream.len() as f64 / messages as f64
        );

        let mut group = c.benchmark_group(format!("framer/{name}"));
        // Criterion prints both: messages/s (elem/s) and GiB/s.
        group.throughput(Throughput::ElementsAndBytes {
            elements: messages,
            bytes: stream.len() as u64,
        });
        group.sample_size(20);
        group.warm_up_time(Duration::from_millis(500));
        group.measurement_time(Duration::from_secs(2));
        group.bench_with_input(BenchmarkId::new("scan", "16KiB_chunks"), &stream, |b, s| {
            b.iter(|| scan_chunked(black_box(s), RELAY_CHUNK))
        });
        group.bench_with_input(BenchmarkId::new("scan", "whole"), &stream, |b, s| {
            b.iter(|| scan_chunked(black_box(s), s.len()))
        });
        group.finish();
    }
}

criterion_group!(benches, bench_framer);
criterion_main!(benches);
