//! Batch build per record, and the rkyv archive of a batch: writing it and
//! validated access in place (what the write-ahead log will pay per batch).

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use std::hint::black_box;
use updraft::record::{access, archive_into, Batch, BatchPool};

const RECORDS: usize = 4096;
const RECORD_BYTES: usize = 255;

fn batch(c: &mut Criterion) {
    let record = vec![b'x'; RECORD_BYTES];
    let mut g = c.benchmark_group("batch");
    g.throughput(Throughput::Elements(RECORDS as u64));
    g.bench_function("build_4096x255B", |b| {
        let mut pool = BatchPool::new(RECORDS, RECORDS * (RECORD_BYTES + 1), 4);
        b.iter(|| {
            let mut batch = pool.take();
            for i in 0..RECORDS {
                batch.push(i as u64, 0, 0, black_box(&record));
            }
            pool.give(black_box(batch));
        })
    });

    let mut full = Batch::with_capacity(RECORDS, RECORDS * (RECORD_BYTES + 1));
    for i in 0..RECORDS {
        full.push(i as u64, 0, 0, &record);
    }
    g.bench_function("archive_4096x255B", |b| {
        let mut out = Some(rkyv::util::AlignedVec::with_capacity(2 << 20));
        b.iter(|| {
            let bytes = archive_into(&full, out.take().unwrap()).unwrap();
            black_box(bytes.len());
            out = Some(bytes);
        })
    });
    let bytes = archive_into(&full, rkyv::util::AlignedVec::new()).unwrap();
    g.bench_function("access_validated_4096x255B", |b| {
        b.iter(|| {
            let a = access(black_box(&bytes)).unwrap();
            black_box(a.record(RECORDS - 1).len())
        })
    });
    g.finish();
}

criterion_group!(benches, batch);
criterion_main!(benches);
