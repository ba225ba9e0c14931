//! The http sink's per-batch work: encoding a batch (raw, NDJSON, InfluxDB
//! line protocol) and compressing it (gzip, zstd) into a reused body buffer,
//! and the adaptive limiter's bookkeeping per request.
//!
//! Records are line protocol with varying tags and values (about 90 bytes),
//! closer to sensor telemetry than the load generator's padded lines, so the
//! compression ratios printed at start mean something.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use std::hint::black_box;
use updraft::limiter::{AdaptiveLimit, AdaptiveParams, Outcome};
use updraft::record::{Batch, BatchView};
use updraft::sinks::http::config::{Compression, Encoding};
use updraft::sinks::http::encode::Encoder;

const RECORDS: usize = 4096;

fn telemetry() -> Batch {
    let mut b = Batch::default();
    let mut x = 0x2545_f491_4f6c_dd1du64;
    for i in 0..RECORDS {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let line = format!(
            "sensor,device=dev{:03},site=plant{} temp={}.{:02},hum={}i,volt={}.{:03} {}",
            i % 500,
            i % 7,
            15 + x % 20,
            x % 100,
            30 + (x >> 8) % 60,
            3 + (x >> 16) % 2,
            (x >> 20) % 1000,
            1_764_072_000_000_000_000u64 + i as u64 * 1_000_000
        );
        b.push(
            1_764_072_000_000_000_000 + i as u64,
            0,
            0,
            line.as_bytes(),
            &[],
        );
    }
    b
}

fn encode(c: &mut Criterion) {
    let batch = telemetry();
    let mut g = c.benchmark_group("http_body");
    g.throughput(Throughput::Elements(RECORDS as u64));
    let cases = [
        ("raw_none", Encoding::Raw, Compression::None),
        ("ndjson_none", Encoding::Ndjson, Compression::None),
        ("influx_none", Encoding::Influx, Compression::None),
        ("raw_gzip", Encoding::Raw, Compression::Gzip),
        ("raw_zstd", Encoding::Raw, Compression::Zstd),
    ];
    for (name, enc, comp) in cases {
        let mut e = Encoder::new(enc, comp, vec!["sensors".into()]);
        let mut body = Vec::with_capacity(2 << 20);
        e.encode(BatchView::Native(&batch), &mut body);
        eprintln!(
            "{name}: {} B payload -> {} B body ({:.1}:1)",
            batch.payload.len(),
            body.len(),
            batch.payload.len() as f64 / body.len() as f64
        );
        g.bench_function(format!("{name}_4096_records"), |b| {
            b.iter(|| {
                body.clear();
                let done = e.encode(BatchView::Native(black_box(&batch)), &mut body);
                black_box(done.records)
            })
        });
    }
    g.finish();
}

fn limiter(c: &mut Criterion) {
    let mut g = c.benchmark_group("limiter");
    g.throughput(Throughput::Elements(1));
    g.bench_function("adaptive_start_and_done", |b| {
        let mut l = AdaptiveLimit::new(AdaptiveParams::default(), 0);
        let mut now = 0u64;
        b.iter(|| {
            now += 250_000;
            l.on_start(black_box(3));
            l.on_done(Outcome::Answered, 20_000_000, now);
            black_box(l.permits())
        })
    });
    g.finish();
}

criterion_group!(benches, encode, limiter);
criterion_main!(benches);
