//! Batch hand-off between two threads through one rtrb ring of the mesh, with
//! the return ring bringing emptied batches back: batches/s, and records/s for
//! batches of 1024 records.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use std::time::{Duration, Instant};
use updraft::record::Batch;
use updraft::route::{Crossing, Mesh};

const RECORDS_PER_BATCH: u64 = 1024;

fn hand_off(batches: u64) -> Duration {
    let mut ends = Mesh::build(2);
    let mut b_end = ends.pop().unwrap();
    let mut a_end = ends.pop().unwrap();
    let consumer = std::thread::spawn(move || {
        let inbound = b_end.inbound[0].as_mut().unwrap();
        let back = b_end.returns_out[0].as_mut().unwrap();
        let mut got = 0;
        while got < batches {
            match inbound.pop() {
                Ok(c) => {
                    got += 1;
                    std::hint::black_box(c.batch.len());
                    let _ = back.push(c.batch);
                }
                Err(_) => std::hint::spin_loop(),
            }
        }
    });
    let mut free: Vec<Batch> = (0..64)
        .map(|_| {
            let mut b = Batch::with_capacity(RECORDS_PER_BATCH as usize, 1 << 16);
            for i in 0..RECORDS_PER_BATCH {
                b.push(i, 0, 0, b"r", &[]);
            }
            b
        })
        .collect();
    let start = Instant::now();
    let out = a_end.out[1].as_mut().unwrap();
    let returns = a_end.returns_in[1].as_mut().unwrap();
    let mut sent = 0;
    while sent < batches {
        while let Ok(b) = returns.pop() {
            free.push(b);
        }
        let Some(b) = free.pop() else {
            std::hint::spin_loop();
            continue;
        };
        let c = Crossing {
            batch: b,
            generation: 1,
        };
        match out.push(c) {
            Ok(()) => sent += 1,
            Err(rtrb::PushError::Full(c)) => free.push(c.batch),
        }
    }
    consumer.join().unwrap();
    start.elapsed()
}

fn ring(c: &mut Criterion) {
    let mut g = c.benchmark_group("ring");
    g.throughput(Throughput::Elements(1));
    g.bench_function("batch_hand_off", |b| b.iter_custom(hand_off));
    g.throughput(Throughput::Elements(RECORDS_PER_BATCH));
    g.bench_function("records_in_1024_record_batches", |b| {
        b.iter_custom(hand_off)
    });
    g.finish();
}

criterion_group!(benches, ring);
criterion_main!(benches);
