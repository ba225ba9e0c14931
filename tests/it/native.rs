//! The native protocol between two real updrafts: an edge (tcp source,
//! `updraft` sink) forwarding to an aggregator (`updraft` source, tcp
//! sink) that the load generator's receiver checks.

use crate::harness::{free_addr, pki, send, spawn_send, u, Receiver, Updraft};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// An edge: tcp source `app` on `src`, `updraft` sink `up` to `agg`.
fn edge(src: SocketAddr, agg: SocketAddr, scheme: &str, sink_extra: &str) -> String {
    format!(
        r#"shards = 2
[sources.app]
type = "tcp"
address = "{src}"
[sinks.up]
type = "updraft"
inputs = ["app"]
url = "{scheme}://{agg}"
{sink_extra}
[sinks.up.retry]
initial_backoff_ms = 20
max_backoff_ms = 200
"#
    )
}

/// An aggregator: `updraft` source `edges` on `agg`, tcp sink `out` to `rx`.
fn aggregator(agg: SocketAddr, rx: SocketAddr, source_extra: &str, sink_extra: &str) -> String {
    format!(
        r#"shards = 2
[sources.edges]
type = "updraft"
address = "{agg}"
{source_extra}
[sinks.out]
type = "tcp"
inputs = ["edges"]
address = "{rx}"
{sink_extra}
[sinks.out.retry]
initial_backoff_ms = 20
max_backoff_ms = 200
"#
    )
}

const DISK_UP: &str = "[sinks.up.batch]\nmax_records = 1000\n[sinks.up.buffer]\ntype = \"disk\"";
const DISK_OUT: &str = "[sinks.out.batch]\nmax_records = 1000\n[sinks.out.buffer]\ntype = \"disk\"";
const EDGE_SENT: &str = r#"updraft_sink_sent_records_total{sink="up",type="updraft"}"#;
const EDGE_DURABLE: &str = r#"updraft_sink_durable_records_total{sink="up",type="updraft"}"#;
const FRAMES: &str = r#"updraft_source_frames_total{source="edges"}"#;
const DUP_FRAMES: &str = r#"updraft_source_duplicate_frames_total{source="edges"}"#;
const PROTOCOL_ERRORS: &str = r#"updraft_source_protocol_errors_total{source="edges"}"#;

#[test]
fn edge_disk_to_aggregator_disk_to_tcp_delivers_1m_records_exactly_once() {
    let (src, agg, rx_addr) = (free_addr(), free_addr(), free_addr());
    let rx = Receiver::start(rx_addr, 1_000_000, 120, &[]);
    let a = Updraft::start(&aggregator(agg, rx_addr, "", DISK_OUT));
    let e = Updraft::start(&edge(src, agg, "updraft", DISK_UP));
    send(
        src,
        &["--connections", "4", "--count", "1000000", "--size", "256"],
    );
    let (r, ok) = rx.finish();
    assert!(
        ok,
        "{r}\nedge:\n{}\naggregator:\n{}",
        e.log_text(),
        a.log_text()
    );
    assert_eq!(u(&r, "unique"), 1_000_000, "{r}");
    assert_eq!(u(&r, "duplicates"), 0, "{r}");
    assert_eq!(u(&r, "malformed"), 0, "{r}");
    assert_eq!(
        e.wait_metric(EDGE_SENT, 1_000_000.0, Duration::from_secs(10)),
        1_000_000.0,
        "the edge counts what the aggregator acknowledged"
    );
    // 1000 records per frame: at least 1000 frames, none of them twice.
    assert!(a.metric(FRAMES) >= 1000.0, "{}", a.metric(FRAMES));
    assert_eq!(a.metric(DUP_FRAMES), 0.0);
    assert_eq!(a.metric(PROTOCOL_ERRORS), 0.0);
}

#[test]
fn kill_9_of_the_aggregator_twice_and_the_edge_once_loses_nothing() {
    const N: u64 = 300_000;
    let (src, agg, rx_addr) = (free_addr(), free_addr(), free_addr());
    // A slow receiver (2 MB/s per connection, 2 connections: about 10 s of
    // records of 128 bytes): the aggregator is held back and the edge's disk
    // buffer holds the backlog while both are killed. (At 4 MB/s the edge
    // was once done before its kill: the receiver's and the kernel's
    // buffers and the aggregator's log took the rest.)
    let rx = Receiver::start(
        rx_addr,
        N,
        120,
        &["--read-bytes-per-sec", "2000000", "--linger-ms", "1000"],
    );
    // The aggregator's log is kept small (8 MiB), so that the backlog waits
    // in the edge's log and the edge is still forwarding at every kill.
    let small = "[sinks.out.batch]\nmax_records = 1000\nmax_bytes = 131072\n[sinks.out.buffer]\ntype = \"disk\"\nmax_bytes = 8388608";
    let mut a = Updraft::start(&aggregator(agg, rx_addr, "", small));
    let mut e = Updraft::start(&edge(src, agg, "updraft", DISK_UP));
    send(
        src,
        &[
            "--connections",
            "4",
            "--count",
            &N.to_string(),
            "--size",
            "128",
        ],
    );
    // Every record is in the edge's disk buffer before the first kill (a
    // tcp sender gets no acknowledgement: a kill while it sends would lose
    // what the kernel had taken, which is not what this test is about).
    e.wait_metric(EDGE_DURABLE, N as f64, Duration::from_secs(30));
    let mut kills = Vec::new();
    for who in ["aggregator", "aggregator", "edge"] {
        std::thread::sleep(Duration::from_millis(700));
        let sent = e.metric(EDGE_SENT);
        assert!(
            sent < N as f64,
            "the edge must still be forwarding at the {who}'s kill ({sent} of {N} acknowledged)"
        );
        kills.push((who, sent));
        let u_ = if who == "edge" { &mut e } else { &mut a };
        u_.kill9();
        u_.restart();
    }
    let (r, ok) = rx.finish();
    assert!(
        ok,
        "{r}\nedge:\n{}\naggregator:\n{}",
        e.log_text(),
        a.log_text()
    );
    assert_eq!(u(&r, "lost"), 0, "{r}");
    assert_eq!(u(&r, "unique"), N, "{r}");
    // Duplicates, bounded: per kill and shard, what was in flight. The
    // edge's window (16 frames of at most 1000 records) that the aggregator
    // had taken but not acknowledged, and the aggregator's tcp sink's
    // batches (1000 records) written but not yet checkpointed (8 at most).
    let dups = u(&r, "duplicates");
    eprintln!(
        "kills (and what the edge had delivered then): {kills:?}; duplicates: {dups}; frames the aggregator recognised as sent before: {}",
        a.metric(DUP_FRAMES)
    );
    assert!(dups <= 3 * 2 * (16 + 8) * 1000, "{dups} duplicates: {r}");
    // The edge, killed while forwarding, sent what its log held unacknowledged
    // again after its restart.
    let replayed = e.metric(r#"updraft_sink_wal_replayed_batches_total{sink="up",type="updraft"}"#);
    assert!(replayed > 0.0, "{}", e.log_text());
}

#[test]
fn tls_with_a_test_ca_and_a_client_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let [ca, cert, key, client_cert, client_key] = pki(dir.path(), "native");
    let (src, agg, rx_addr) = (free_addr(), free_addr(), free_addr());
    let rx = Receiver::start(rx_addr, 50_000, 60, &[]);
    let a = Updraft::start(&aggregator(
        agg,
        rx_addr,
        &format!(
            "[sources.edges.tls]\ncert_file = \"{cert}\"\nkey_file = \"{key}\"\nca_file = \"{ca}\""
        ),
        "",
    ));
    // Without a client certificate the aggregator refuses the edge.
    let plain_src = free_addr();
    let refused = Updraft::start(&edge(
        plain_src,
        agg,
        "updrafts",
        &format!("[sinks.up.tls]\nca_file = \"{ca}\""),
    ));
    send(plain_src, &["--count", "10"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while a.metric(PROTOCOL_ERRORS) < 1.0 {
        assert!(Instant::now() < deadline, "{}", a.log_text());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        a.log_text().contains("TLS handshake failed"),
        "{}",
        a.log_text()
    );
    drop(refused);
    let e = Updraft::start(&edge(
        src,
        agg,
        "updrafts",
        &format!(
            "[sinks.up.tls]\nca_file = \"{ca}\"\ncert_file = \"{client_cert}\"\nkey_file = \"{client_key}\""
        ),
    ));
    send(src, &["--connections", "2", "--count", "50000"]);
    let (r, ok) = rx.finish();
    assert!(
        ok,
        "{r}\nedge:\n{}\naggregator:\n{}",
        e.log_text(),
        a.log_text()
    );
    assert_eq!(u(&r, "unique"), 50_000, "{r}");
    assert_eq!(u(&r, "duplicates"), 0, "{r}");
}

/// Connects to `agg`, writes `bytes`, and reads until the aggregator closes:
/// what it answered.
fn hostile(agg: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(agg).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    s.write_all(bytes).unwrap();
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    got
}

fn hello(version: u16) -> Vec<u8> {
    updraft::native::Hello {
        version,
        window: 8,
        sender: 77,
        stream: 0,
    }
    .encode()
    .to_vec()
}

#[test]
fn peers_sending_garbage_or_damaged_frames_are_disconnected_and_counted_while_others_flow() {
    const N: u64 = 200_000;
    let (src, agg, rx_addr) = (free_addr(), free_addr(), free_addr());
    let rx = Receiver::start(rx_addr, N, 90, &[]);
    let a = Updraft::start(&aggregator(agg, rx_addr, "", ""));
    let e = Updraft::start(&edge(src, agg, "updraft", ""));
    let mut sender = spawn_send(
        src,
        &[
            "--connections",
            "2",
            "--count",
            &N.to_string(),
            "--rate",
            "40000",
        ],
    );
    // Garbage instead of a greeting.
    let got = hostile(agg, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(got.is_empty() || got.starts_with(b"ERRO"), "{got:?}");
    // A greeting, then a frame whose archive does not match its CRC.
    let mut m = hello(updraft::native::VERSION);
    let archive = vec![7u8; 4000];
    updraft::native::put_frame(&mut m, 1, 0, 4096, 10, &archive);
    m[updraft::native::HELLO_BYTES + updraft::native::FRAME_HEADER_BYTES + 100] ^= 1;
    let got = hostile(agg, &m);
    let text = String::from_utf8_lossy(&got);
    assert!(text.contains("a frame failed its CRC"), "{text}");
    // Valid CRCs around bytes that are no archive (a hostile peer).
    let mut m = hello(updraft::native::VERSION);
    let junk: Vec<u8> = (0..4000u32).map(|i| (i * 7919 % 251) as u8).collect();
    updraft::native::put_frame(&mut m, 1, 0, 4096, 10, &junk);
    let text = String::from_utf8_lossy(&hostile(agg, &m)).into_owned();
    assert!(text.contains("failed validation"), "{text}");
    // A length past max_frame_bytes: refused from its header, unread.
    let mut m = hello(updraft::native::VERSION);
    let mut big = Vec::new();
    updraft::native::put_frame(&mut big, 1, 0, 4096, 1, &[0u8; 64]);
    big[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
    let hcrc = crc32c(&big[..40]);
    big[40..44].copy_from_slice(&hcrc.to_le_bytes());
    m.extend_from_slice(&big[..updraft::native::FRAME_HEADER_BYTES]);
    let text = String::from_utf8_lossy(&hostile(agg, &m)).into_owned();
    assert!(text.contains("longer than max_frame_bytes"), "{text}");
    // Another version of the protocol: told which this one speaks, closed.
    let got = hostile(agg, &hello(99));
    let w = updraft::native::Welcome::decode(&got).unwrap().unwrap();
    assert!(
        !w.accepted && w.version == updraft::native::VERSION,
        "{w:?}"
    );

    assert_eq!(a.metric(PROTOCOL_ERRORS), 5.0, "{}", a.log_text());
    let log = a.log_text();
    // Lines about bad input are rate-limited per shard: the first is there.
    assert!(
        log.contains("the connection is closed (counted)") && log.contains("peer=127.0.0.1"),
        "the log names the reason and the peer:\n{log}"
    );
    assert!(sender.wait().unwrap().success());
    let (r, ok) = rx.finish();
    assert!(
        ok,
        "{r}\nedge:\n{}\naggregator:\n{}",
        e.log_text(),
        a.log_text()
    );
    assert_eq!(u(&r, "unique"), N, "the edge was unaffected: {r}");
    assert_eq!(u(&r, "duplicates"), 0, "{r}");
}

fn crc32c(b: &[u8]) -> u32 {
    updraft::record::crc32c(b)
}
