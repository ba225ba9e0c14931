//! Framing throughput in bytes/s: newline, octet counting, length-prefixed.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use std::hint::black_box;
use updraft::codec::{Decoded, Decoder};
use updraft::config::Framing;

const RECORD_BYTES: usize = 256;
const RECORDS: usize = 4096;

fn input(framing: Framing) -> Vec<u8> {
    let body = vec![b'x'; RECORD_BYTES - 1];
    let mut out = Vec::with_capacity(RECORDS * (RECORD_BYTES + 8));
    for _ in 0..RECORDS {
        match framing {
            Framing::Newline | Framing::Datagram => {
                out.extend_from_slice(&body);
                out.push(b'\n');
            }
            Framing::OctetCounting => {
                out.extend_from_slice(format!("{} ", body.len()).as_bytes());
                out.extend_from_slice(&body);
            }
            Framing::LengthPrefixed => {
                out.extend_from_slice(&(body.len() as u32).to_be_bytes());
                out.extend_from_slice(&body);
            }
        }
    }
    out
}

fn decode_all(d: &mut Decoder, buf: &[u8]) -> usize {
    let mut at = 0;
    let mut n = 0;
    loop {
        match d.decode(&buf[at..]) {
            Decoded::Record { record, consumed } => {
                black_box(record);
                at += consumed;
                n += 1;
            }
            _ => return n,
        }
    }
}

fn framing(c: &mut Criterion) {
    let mut g = c.benchmark_group("framing");
    for (name, f) in [
        ("newline", Framing::Newline),
        ("octet_counting", Framing::OctetCounting),
        ("length_prefixed", Framing::LengthPrefixed),
    ] {
        let buf = input(f);
        g.throughput(Throughput::Bytes(buf.len() as u64));
        g.bench_function(name, |b| {
            let mut d = Decoder::new(f, 65536);
            b.iter(|| assert_eq!(decode_all(&mut d, &buf), RECORDS))
        });
    }
    g.finish();
}

criterion_group!(benches, framing);
criterion_main!(benches);
