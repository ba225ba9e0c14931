//! Batch build per record, and the rkyv archive of a batch: writing it (into
//! another buffer, or in place as the write-ahead log does), its CRC, and
//! validated access in place.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use std::hint::black_box;
use updraft::record::{access, archive_in_place, archive_into, crc32c, Batch, BatchPool};

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
                batch.push(i as u64, 0, 0, black_box(&record), &[]);
            }
            pool.give(black_box(batch));
        })
    });

    let mut full = Batch::with_capacity(RECORDS, RECORDS * (RECORD_BYTES + 1));
    for i in 0..RECORDS {
        full.push(i as u64, 0, 0, &record, &[]);
    }
    g.bench_function("archive_4096x255B", |b| {
        let mut out = Some(rkyv::util::AlignedVec::with_capacity(2 << 20));
        b.iter(|| {
            let bytes = archive_into(&full, out.take().unwrap()).unwrap();
            black_box(bytes.len());
            out = Some(bytes);
        })
    });
    // The write-ahead log's way: only the entries and the root are written,
    // behind the records; the batch is refilled from a swapped buffer.
    g.bench_function("archive_in_place_4096x255B", |b| {
        let mut pool = BatchPool::new(RECORDS, RECORDS * (RECORD_BYTES + 1), 4);
        let mut spare = Some(pool.new_payload().into_buffer());
        let mut batch = pool.take();
        b.iter(|| {
            for i in 0..RECORDS {
                batch.push(i as u64, 0, 0, &record, &[]);
            }
            let (buf, len) = archive_in_place(&mut batch, spare.take().unwrap()).unwrap();
            black_box(len);
            batch.clear();
            spare = Some(buf);
        })
    });
    let bytes = archive_into(&full, rkyv::util::AlignedVec::new()).unwrap();
    g.bench_function("crc32c_archive_4096x255B", |b| {
        b.iter(|| black_box(crc32c(black_box(&bytes))))
    });
    // The crc32c crate (the `crc32` instruction, three streams), which the
    // log used before crc-fast: the same function, for comparison.
    g.bench_function("crc32c_crate_archive_4096x255B", |b| {
        b.iter(|| black_box(::crc32c::crc32c(black_box(&bytes))))
    });
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
