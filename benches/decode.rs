//! Decoding cost per record: locating a syslog message's, a line of line
//! protocol's and a JSON object's fields in place (and the field a
//! `partition_by` reads), on records of about 256 bytes.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use std::hint::black_box;
use updraft::codec::{influx, json, syslog};

const NOW: u64 = 1_796_299_200_000_000_000;

fn pad(head: &str, tail: &str) -> Vec<u8> {
    let mut r = head.as_bytes().to_vec();
    r.resize(255 - tail.len(), b'x');
    r.extend_from_slice(tail.as_bytes());
    r
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("decode");
    g.throughput(Throughput::Elements(1));
    let r5424 = pad(
        r#"<165>1 2026-12-03T12:00:00.003Z gw7.example.net sensor 1234 ID47 [meta seq="1" site="north"] reading "#,
        "",
    );
    let r3164 = pad("<34>Dec  3 12:00:00 gw7 sensor[4242]: reading ", "");
    let line = pad(
        "weather,device=d-000017,site=north temp=21.5,hum=40i,label=\"",
        "\" 1796299200000000000",
    );
    let obj = pad(
        r#"{"ts":"2026-12-03T12:00:00Z","device":"d-000017","site":"north","temp":21.5,"msg":""#,
        r#""}"#,
    );
    g.bench_function("syslog_5424", |b| {
        b.iter(|| black_box(syslog::parse(black_box(&r5424), NOW).unwrap()))
    });
    g.bench_function("syslog_3164", |b| {
        b.iter(|| black_box(syslog::parse(black_box(&r3164), NOW).unwrap()))
    });
    g.bench_function("influx_and_tag", |b| {
        b.iter(|| {
            let r = black_box(&line);
            let l = influx::parse(r).unwrap();
            black_box(influx::tag(r, &l, b"device"))
        })
    });
    g.bench_function("json_and_key", |b| {
        b.iter(|| black_box(json::parse(black_box(&obj), Some(b"device")).unwrap()))
    });
    g.bench_function("value_key", |b| {
        b.iter(|| black_box(updraft::route::value_key(black_box(b"d-000017"))))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
