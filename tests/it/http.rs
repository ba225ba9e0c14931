//! The http sink against real endpoints: the load generator's verifying
//! receiver (plain, TLS, overloaded, failing), and VictoriaMetrics from the
//! distribution's packages.

use crate::harness::*;
use serde_json::Value;
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const SENT: &str = r#"updraft_sink_sent_records_total{sink="cloud",type="http"}"#;

/// A tcp source `app` and an http sink `cloud`; `sink` adds keys to the
/// sink's table, `tables` adds tables after it.
fn tcp_to_http(src: SocketAddr, shards: usize, uri: &str, sink: &str, tables: &str) -> String {
    format!(
        r#"
shards = {shards}
[sources.app]
type = "tcp"
address = "{src}"
[sinks.cloud]
type = "http"
inputs = ["app"]
uri = "{uri}"
{sink}
[sinks.cloud.retry]
initial_backoff_ms = 20
max_backoff_ms = 500
{tables}
"#
    )
}

fn http_receiver(listen: SocketAddr, expect: u64, timeout_s: u64, extra: &[&str]) -> Receiver {
    let mut args = vec!["--proto", "http"];
    args.extend_from_slice(extra);
    Receiver::start(listen, expect, timeout_s, &args)
}

#[test]
fn tcp_to_http_zstd_delivers_a_million_records_exactly_once() {
    let (src, sink) = (free_addr(), free_addr());
    let rx = http_receiver(sink, 1_000_000, 90, &["--linger-ms", "500"]);
    let u_ = Updraft::start(&tcp_to_http(
        src,
        2,
        &format!("http://{sink}/ingest"),
        "compression = \"zstd\"\nidempotency_header = \"Idempotency-Key\"",
        "",
    ));
    send(
        src,
        &["--connections", "4", "--count", "1000000", "--size", "200"],
    );
    let (r, ok) = rx.finish();
    assert!(ok, "{r}\n{}", u_.log_text());
    assert_eq!(u(&r, "unique"), 1_000_000, "{r}");
    assert_eq!(u(&r, "duplicates"), 0, "{r}");
    assert_eq!(u(&r, "lost"), 0, "{r}");
    assert_eq!(u(&r, "malformed"), 0, "{r}");
    // The bodies really were compressed.
    let h = &r["http"];
    assert!(u(h, "body_bytes") * 5 < u(h, "plain_bytes"), "{h}");
    u_.wait_metric(SENT, 1_000_000.0, Duration::from_secs(5));
}

#[test]
fn gzip_and_ndjson_bodies_arrive_whole() {
    let (src, sink) = (free_addr(), free_addr());
    let rx = http_receiver(sink, 50_000, 60, &[]);
    let u_ = Updraft::start(&tcp_to_http(
        src,
        1,
        &format!("http://{sink}/"),
        "compression = \"gzip\"\nencoding = \"ndjson\"",
        "",
    ));
    send(
        src,
        &["--connections", "2", "--count", "50000", "--size", "100"],
    );
    let (r, ok) = rx.finish();
    assert!(ok, "{r}\n{}", u_.log_text());
    assert_eq!((u(&r, "unique"), u(&r, "duplicates")), (50_000, 0), "{r}");
}

#[test]
fn a_refused_batch_goes_to_the_dead_letter_directory_and_the_rest_flows_on() {
    let (src, sink) = (free_addr(), free_addr());
    // The third request is answered 400.
    let rx = http_receiver(sink, 100_000, 8, &["--bad-request-at", "3"]);
    let u_ = Updraft::start(&tcp_to_http(
        src,
        1,
        &format!("http://{sink}/"),
        "",
        "[sinks.cloud.batch]\nmax_records = 1000",
    ));
    send(
        src,
        &["--connections", "1", "--count", "100000", "--size", "100"],
    );
    let (r, _) = rx.finish();
    let dlq = u_.data_dir().join("dlq").join("cloud");
    let mut bodies = Vec::new();
    let mut notes = Vec::new();
    for e in std::fs::read_dir(&dlq)
        .unwrap_or_else(|e| panic!("{}: {e}\n{}", dlq.display(), u_.log_text()))
    {
        let p = e.unwrap().path();
        match p.extension().and_then(|x| x.to_str()) {
            Some("body") => bodies.push(std::fs::read(&p).unwrap()),
            Some("json") => notes.push(std::fs::read_to_string(&p).unwrap()),
            _ => panic!("unexpected file {}", p.display()),
        }
    }
    assert_eq!((bodies.len(), notes.len()), (1, 1), "one refused batch");
    let note: Value = serde_json::from_str(&notes[0]).unwrap();
    assert_eq!(note["status"], 400, "{note}");
    assert!(
        note["response"].as_str().unwrap().contains("rejected"),
        "{note}"
    );
    let dead = bodies[0].iter().filter(|&&b| b == b'\n').count() as u64;
    assert!(
        dead > 0 && dead <= 1000,
        "{dead} records in the refused batch"
    );
    assert_eq!(note["records"], dead, "{note}");
    // Everything else arrived, once; the refused records are counted.
    assert_eq!(u(&r, "unique") + dead, 100_000, "{r}");
    assert_eq!(u(&r, "duplicates"), 0, "{r}");
    assert_eq!(
        u_.metric(r#"updraft_sink_dead_letter_records_total{sink="cloud",type="http"}"#),
        dead as f64
    );
    assert_eq!(u_.metric(SENT), (100_000 - dead) as f64);
}

#[test]
fn an_outage_of_ten_seconds_loses_nothing() {
    let (src, sink) = (free_addr(), free_addr());
    // Connections are dropped without an answer from 1 s to 11 s.
    let rx = http_receiver(
        sink,
        200_000,
        90,
        &[
            "--outage-after-s",
            "1",
            "--outage-s",
            "10",
            "--linger-ms",
            "500",
        ],
    );
    let u_ = Updraft::start(&tcp_to_http(src, 2, &format!("http://{sink}/"), "", ""));
    // 15 s of traffic at 13,333 records/s: before, during and after.
    send(
        src,
        &[
            "--connections",
            "2",
            "--count",
            "200000",
            "--size",
            "128",
            "--rate",
            "13333",
        ],
    );
    let (r, ok) = rx.finish();
    assert!(ok, "{r}\n{}", u_.log_text());
    assert_eq!((u(&r, "unique"), u(&r, "lost")), (200_000, 0), "{r}");
    assert!(
        u(&r["http"], "dropped_in_outage") > 0,
        "the outage happened: {r}"
    );
    assert!(
        u_.metric(r#"updraft_sink_retries_total{sink="cloud",type="http"}"#) > 0.0,
        "requests were retried"
    );
}

/// One run against an endpoint with capacity 8 and 20 ms latency that
/// rejects requests beyond capacity with 429: (records/s, 429s).
fn capacity_run(concurrency: &str) -> (f64, u64, Value) {
    let (src, sink) = (free_addr(), free_addr());
    let records = 300_000u64;
    let rx = http_receiver(
        sink,
        records,
        120,
        &[
            "--capacity",
            "8",
            "--latency-ms",
            "20",
            "--over-capacity",
            "reject",
        ],
    );
    let u_ = Updraft::start(&tcp_to_http(
        src,
        1,
        &format!("http://{sink}/"),
        "",
        &format!("[sinks.cloud.batch]\nmax_records = 100\nmax_bytes = 65536\n[sinks.cloud.request]\nconcurrency = {concurrency}"),
    ));
    send(
        src,
        &[
            "--connections",
            "2",
            "--count",
            &records.to_string(),
            "--size",
            "128",
        ],
    );
    let (r, ok) = rx.finish();
    assert!(ok, "concurrency {concurrency}: {r}\n{}", u_.log_text());
    assert_eq!(u(&r, "unique"), records, "{r}");
    let rps = r["records_per_sec"].as_f64().unwrap();
    (rps, u(&r["http"], "throttled"), r)
}

#[test]
fn adaptive_concurrency_finds_an_endpoints_capacity() {
    // Fixed limits below, at and above the capacity, then adaptive, in the
    // same run (the machine's noise applies to all of them alike).
    let mut fixed = Vec::new();
    for c in ["4", "8", "32"] {
        let (rps, throttled, _) = capacity_run(c);
        eprintln!("fixed {c}: {rps:.0} records/s, {throttled} x 429");
        fixed.push((c, rps, throttled));
    }
    let (rps, throttled, r) = capacity_run("\"adaptive\"");
    eprintln!("adaptive: {rps:.0} records/s, {throttled} x 429: {r}");
    let best = fixed.iter().map(|f| f.1).fold(0.0, f64::max);
    assert!(
        rps >= 0.9 * best,
        "adaptive {rps:.0}/s vs best fixed {best:.0}/s: {fixed:?}"
    );
    let over = fixed.iter().find(|f| f.0 == "32").unwrap();
    assert!(
        throttled < over.2,
        "adaptive had {throttled} 429s, fixed 32 had {}",
        over.2
    );
}

fn write_pem(dir: &Path, name: &str, pem: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, pem).unwrap();
    p.display().to_string()
}

/// A CA and a certificate for 127.0.0.1 signed by it: (ca.pem, cert.pem,
/// key.pem) in `dir`.
fn test_pki(dir: &Path, ca_name: &str) -> (String, String, String) {
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name.push(
        rcgen::DnType::CommonName,
        format!("updraft test CA {ca_name}"),
    );
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let leaf =
        rcgen::CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
            .unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = leaf.signed_by(&key, &ca_cert, &ca_key).unwrap();
    (
        write_pem(dir, &format!("{ca_name}-ca.pem"), &ca_cert.pem()),
        write_pem(dir, &format!("{ca_name}-cert.pem"), &cert.pem()),
        write_pem(dir, &format!("{ca_name}-key.pem"), &key.serialize_pem()),
    )
}

#[test]
fn https_with_a_test_ca_delivers_and_a_wrong_ca_is_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = test_pki(dir.path(), "right");
    let (other_ca, _, _) = test_pki(dir.path(), "other");

    let (src, sink) = (free_addr(), free_addr());
    let rx = http_receiver(sink, 20_000, 60, &["--tls-cert", &cert, "--tls-key", &key]);
    let u_ = Updraft::start(&tcp_to_http(
        src,
        2,
        &format!("https://{sink}/"),
        // Uncompressed: bodies of up to 1 MiB, far past rustls's 64 KiB
        // plaintext buffer.
        "",
        &format!("[sinks.cloud.tls]\nca_file = \"{ca}\""),
    ));
    send(
        src,
        &["--connections", "2", "--count", "20000", "--size", "100"],
    );
    let (r, ok) = rx.finish();
    assert!(ok, "{r}\n{}", u_.log_text());
    assert_eq!((u(&r, "unique"), u(&r, "duplicates")), (20_000, 0), "{r}");
    drop(u_);

    // A collector that trusts another CA: nothing is sent, and the log
    // says why.
    let (src, sink) = (free_addr(), free_addr());
    let rx = http_receiver(sink, 1, 3, &["--tls-cert", &cert, "--tls-key", &key]);
    let u_ = Updraft::start(&tcp_to_http(
        src,
        1,
        &format!("https://{sink}/"),
        "",
        &format!("[sinks.cloud.tls]\nca_file = \"{other_ca}\""),
    ));
    send(
        src,
        &["--connections", "1", "--count", "100", "--size", "100"],
    );
    let (r, ok) = rx.finish();
    assert!(!ok, "nothing may arrive over an unverified connection: {r}");
    assert_eq!(u(&r["http"], "requests"), 0, "{r}");
    let log = u_.log_text();
    assert!(
        log.contains("invalid peer certificate") && log.contains("tls.ca_file"),
        "{log}"
    );
    assert!(u_.metric(SENT) == 0.0);
}

/// A VictoriaMetrics server on loopback with its data in a temp dir.
struct Victoria {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Victoria {
    fn start() -> Victoria {
        let bin = [
            "/usr/bin/victoria-metrics",
            "/usr/local/bin/victoria-metrics",
        ]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("victoria-metrics is installed (scripts/test.sh installs the Debian package)");
        let dir = tempfile::tempdir().unwrap();
        let addr = free_addr();
        let child = Command::new(bin)
            .arg(format!("-httpListenAddr={addr}"))
            .arg(format!("-storageDataPath={}", dir.path().display()))
            .arg("-retentionPeriod=100y")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while http_get(addr, "/health").is_none() {
            assert!(
                Instant::now() < deadline,
                "victoria-metrics did not start on {addr}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Victoria {
            child,
            addr,
            _dir: dir,
        }
    }

    /// Samples stored for `metric`, counted from /api/v1/export.
    fn samples(&self, metric: &str) -> usize {
        let _ = http_get(self.addr, "/internal/force_flush");
        let Some(body) = http_get(self.addr, &format!("/api/v1/export?match[]={metric}")) else {
            return 0;
        };
        body.lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .map(|v| v["values"].as_array().map_or(0, |a| a.len()))
            .sum()
    }
}

impl Drop for Victoria {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn victoria_metrics_stores_every_influx_point_sent_through_updraft() {
    let vm = Victoria::start();
    let src = free_addr();
    let u_ = Updraft::start(&tcp_to_http(
        src,
        2,
        &format!("http://{}/write", vm.addr),
        "encoding = \"influx\"\ncompression = \"gzip\"",
        "",
    ));
    // 20,000 points over 10 series, one per millisecond per series, in the
    // last hour; plus lines that are not line protocol (counted, dropped).
    let n = 20_000u64;
    let base_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
        - 3_600_000;
    let mut text = String::new();
    for i in 0..n {
        let ts_ns = (base_ms + i / 10) * 1_000_000;
        text.push_str(&format!(
            "updraft_it,device=d{} value={}i {ts_ns}\n",
            i % 10,
            i
        ));
        if i % 5000 == 0 {
            text.push_str("this is not line protocol at all\n");
        }
    }
    let mut s = TcpStream::connect(src).unwrap();
    s.write_all(text.as_bytes()).unwrap();
    drop(s);
    u_.wait_metric(SENT, n as f64, Duration::from_secs(30));
    assert_eq!(
        u_.metric(r#"updraft_sink_encode_dropped_records_total{sink="cloud",type="http"}"#),
        4.0
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = vm.samples("updraft_it_value");
        if got == n as usize {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "victoria-metrics holds {got} of {n} points"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn header_secrets_come_from_the_environment_and_never_show() {
    let secret = "tok-3f9c2b7e1d";
    // The child inherits the variable (tests run one at a time).
    std::env::set_var("UPDRAFT_IT_TOKEN", secret);
    let (src, sink) = (free_addr(), free_addr());
    let auth = format!("Authorization: Bearer {secret}");
    let rx = http_receiver(sink, 10_000, 30, &["--require-header", &auth]);
    let u_ = Updraft::start(&tcp_to_http(
        src,
        1,
        &format!("http://{sink}/"),
        r#"headers = { Authorization = "Bearer ${UPDRAFT_IT_TOKEN}" }"#,
        "",
    ));
    send(
        src,
        &["--connections", "1", "--count", "10000", "--size", "100"],
    );
    let (r, ok) = rx.finish();
    assert!(
        ok,
        "the header reached the endpoint: {r}\n{}",
        u_.log_text()
    );
    assert_eq!(u(&r["http"], "unauthorized"), 0, "{r}");
    let metrics = http_get(u_.metrics, "/metrics").unwrap();
    assert!(!u_.log_text().contains(secret) && !metrics.contains(secret));

    // A missing variable is named; no value is printed.
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(
        &cfg,
        tcp_to_http(
            src,
            1,
            &format!("http://{sink}/"),
            r#"headers = { X-Key = "${UPDRAFT_IT_UNSET_VAR}" }"#,
            "",
        ),
    )
    .unwrap();
    let out = Command::new(updraft())
        .args(["validate", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("sinks.cloud.headers.X-Key") && err.contains("UPDRAFT_IT_UNSET_VAR"),
        "{err}"
    );
}

#[test]
fn a_disk_buffer_replays_unconfirmed_requests_after_kill_9_and_the_key_dedups_them() {
    let (src, sink) = (free_addr(), free_addr());
    // A slow endpoint (100 ms per request, 4 at a time): requests are in
    // flight when the collector is killed.
    let rx = http_receiver(
        sink,
        300_000,
        120,
        &[
            "--latency-ms",
            "100",
            "--capacity",
            "4",
            "--over-capacity",
            "queue",
            "--dedup-header",
            "Idempotency-Key",
            "--linger-ms",
            "1000",
        ],
    );
    let mut u_ = Updraft::start(&tcp_to_http(
        src,
        2,
        &format!("http://{sink}/"),
        "idempotency_header = \"Idempotency-Key\"\ncompression = \"zstd\"",
        "[sinks.cloud.batch]\nmax_records = 2000\n[sinks.cloud.buffer]\ntype = \"disk\"",
    ));
    send(
        src,
        &["--connections", "2", "--count", "300000", "--size", "128"],
    );
    let durable = r#"updraft_sink_durable_records_total{sink="cloud",type="http"}"#;
    u_.wait_metric(durable, 300_000.0, Duration::from_secs(30));
    let sent_before = u_.metric(SENT);
    assert!(
        sent_before < 300_000.0,
        "the endpoint is slow enough to kill mid-way"
    );
    u_.kill9();
    u_.restart();
    let (r, ok) = rx.finish();
    assert!(ok, "{r}\n{}", u_.log_text());
    assert_eq!((u(&r, "unique"), u(&r, "lost")), (300_000, 0), "{r}");
    // Whatever was sent again was recognised by its key, not counted twice.
    assert_eq!(u(&r, "duplicates"), 0, "{r}");
}

/// Issue 14: `write_when = "behind"` on an http sink (a batch output, which
/// keeps requests in flight): a healthy endpoint gets everything from
/// memory, nothing written to the disk; with the endpoint down, SIGTERM
/// writes what memory held (in flight or waiting) to the log, and the next
/// start delivers it.
#[test]
fn write_when_behind_on_http_sends_from_memory_and_keeps_what_sigterm_finds() {
    let (src, sink) = (free_addr(), free_addr());
    let cfg = tcp_to_http(
        src,
        2,
        &format!("http://{sink}/"),
        "idempotency_header = \"Idempotency-Key\"",
        "[sinks.cloud.buffer]\ntype = \"disk\"\nwrite_when = \"behind\"",
    );
    let rx = http_receiver(sink, 200_000, 60, &[]);
    let mut u_ = Updraft::start(&cfg);
    // What the endpoint keeps up with (a flood would spill, as it should).
    send(
        src,
        &[
            "--connections",
            "2",
            "--count",
            "200000",
            "--size",
            "128",
            "--rate",
            "50000",
        ],
    );
    let (r, ok) = rx.finish();
    assert!(ok, "{r}\n{}", u_.log_text());
    assert_eq!(u(&r, "unique"), 200_000, "{r}");
    let written = u_.metric(r#"updraft_sink_wal_written_bytes_total{sink="cloud",type="http"}"#);
    assert!(
        written < 0.01 * 200_000.0 * 128.0,
        "a healthy endpoint: {written} bytes written to the disk"
    );
    // Now the endpoint is gone.
    send(
        src,
        &[
            "--connections",
            "2",
            "--count",
            "20000",
            "--size",
            "128",
            "--stream-base",
            "100",
        ],
    );
    let (status, _) = u_.terminate();
    assert!(status.success(), "{}", u_.log_text());
    let rx = http_receiver(sink, 20_000, 60, &["--dedup-header", "Idempotency-Key"]);
    u_.restart();
    let (r, ok) = rx.finish();
    assert!(ok, "{r}\n{}", u_.log_text());
    assert_eq!((u(&r, "unique"), u(&r, "lost")), (20_000, 0), "{r}");
}

#[test]
fn a_source_rate_limit_drops_or_holds_back_what_is_over_it() {
    // drop: what passes plus what is counted equals what was sent.
    let (src, sink) = (free_addr(), free_addr());
    let cfg = tcp_to_http(src, 1, &format!("http://{sink}/"), "", "").replace(
        "address = \"",
        "rate_limit = { records_per_sec = 5000, when_exceeded = \"drop\" }\naddress = \"",
    );
    let rx = http_receiver(sink, 50_000, 4, &[]);
    let u_ = Updraft::start(&cfg);
    send(
        src,
        &["--connections", "1", "--count", "50000", "--size", "100"],
    );
    let (r, _) = rx.finish();
    let dropped = u_
        .metric(r#"updraft_source_dropped_records_total{source="app",reason="rate_limit"}"#)
        as u64;
    assert_eq!(u(&r, "unique") + dropped, 50_000, "{r}");
    assert!(u(&r, "unique") <= 5_000 * 5, "{r}");
    assert!(dropped > 0);
    drop(u_);

    // block: nothing is lost; the sender is slowed to the rate.
    let (src, sink) = (free_addr(), free_addr());
    let cfg = tcp_to_http(src, 1, &format!("http://{sink}/"), "", "").replace(
        "address = \"",
        "rate_limit = { records_per_sec = 10000, when_exceeded = \"block\" }\naddress = \"",
    );
    let rx = http_receiver(sink, 30_000, 30, &[]);
    let u_ = Updraft::start(&cfg);
    let t = Instant::now();
    send(
        src,
        &["--connections", "1", "--count", "30000", "--size", "100"],
    );
    let (r, ok) = rx.finish();
    assert!(ok, "{r}\n{}", u_.log_text());
    assert_eq!(u(&r, "unique"), 30_000, "{r}");
    assert!(
        t.elapsed() >= Duration::from_millis(1_500),
        "30,000 records at 10,000/s took {:?}",
        t.elapsed()
    );
}

#[test]
fn a_request_timed_out_mid_write_is_sent_again_whole() {
    let (src, sink) = (free_addr(), free_addr());
    // An endpoint that accepts connections and never reads: a 6 MiB body
    // cannot be written, so the write itself runs into request.timeout_ms.
    let stall = std::net::TcpListener::bind(sink).unwrap();
    stall.set_nonblocking(true).unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stopped = stop.clone();
    let staller = std::thread::spawn(move || {
        let mut held = Vec::new();
        while !stopped.load(std::sync::atomic::Ordering::Relaxed) {
            match stall.accept() {
                Ok((c, _)) => held.push(c),
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    });
    let u_ = Updraft::start(&tcp_to_http(
        src,
        1,
        &format!("http://{sink}/"),
        "",
        "[sinks.cloud.batch]\nmax_records = 60000\nmax_bytes = 6291456\nlinger_ms = 50\n[sinks.cloud.request]\ntimeout_ms = 500\nconcurrency = 1",
    ));
    send(
        src,
        &["--connections", "1", "--count", "50000", "--size", "120"],
    );
    let timeouts = r#"updraft_sink_http_responses_total{sink="cloud",type="http",class="timeout"}"#;
    u_.wait_metric(timeouts, 2.0, Duration::from_secs(20));
    // The endpoint comes back: the batch that timed out arrives whole, once.
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    staller.join().unwrap();
    let rx = http_receiver(sink, 50_000, 60, &[]);
    let (r, ok) = rx.finish();
    assert!(ok, "{r}\n{}", u_.log_text());
    assert_eq!((u(&r, "unique"), u(&r, "duplicates")), (50_000, 0), "{r}");
    assert!(!u_.log_text().contains("panicked"), "{}", u_.log_text());
}

#[test]
fn a_uri_naming_a_tag_sends_each_devices_records_to_its_own_path() {
    const N: u64 = 40_000;
    let (src, sink) = (free_addr(), free_addr());
    let rx = http_receiver(
        sink,
        N,
        60,
        &[
            "--expect-path",
            "/ingest/d{stream}",
            "--dedup-header",
            "Idempotency-Key",
        ],
    );
    let u_ = Updraft::start(&format!(
        r#"
shards = 2
[sources.app]
type = "tcp"
address = "{src}"
decoding = "influx"
[sinks.cloud]
type = "http"
inputs = ["app"]
uri = "http://{sink}/ingest/{{tag.device}}"
compression = "zstd"
idempotency_header = "Idempotency-Key"
[sinks.cloud.headers]
X-Device = "{{tag.device}}"
"#
    ));
    let args = device_args(4, N, 120, 40);
    send(src, &args.iter().map(String::as_str).collect::<Vec<_>>());
    let (r, ok) = rx.finish();
    assert_devices_once(&r, ok, N, 40, &u_.log_text());
    assert_eq!(
        u(&r["http"], "wrong_path"),
        0,
        "each device to its path: {r}"
    );
    u_.wait_metric(SENT, N as f64, Duration::from_secs(5));
}

#[test]
fn a_byte_budget_of_1_mib_per_second_holds_at_the_receiver_within_ten_percent() {
    const RATE: f64 = 1_048_576.0;
    let (src, sink) = (free_addr(), free_addr());
    // Never met: the receiver runs its 22 s and reports what came.
    let rx = http_receiver(sink, u64::MAX / 2, 22, &[]);
    let u_ = Updraft::start(&tcp_to_http(
        src,
        2,
        &format!("http://{sink}/ingest"),
        "compression = \"zstd\"\nrate_limit = { bytes_per_sec = 1048576 }",
        "",
    ));
    // Far more than 22 s of budget: the sink is held to it all along.
    let mut sender = spawn_send(
        src,
        &["--connections", "2", "--count", "50000000", "--size", "256"],
    );
    let (r, _) = rx.finish();
    let _ = sender.kill();
    let _ = sender.wait();
    let h = &r["http"];
    let seconds = r["seconds"].as_f64().unwrap();
    assert!(seconds > 20.0, "{r}");
    let per_sec = u(h, "body_bytes") as f64 / seconds;
    eprintln!(
        "bodies: {per_sec:.0} B/s over {seconds:.1} s, {:.3} of the budget",
        per_sec / RATE
    );
    assert!(
        (per_sec / RATE - 1.0).abs() <= 0.10,
        "{per_sec:.0} B/s of bodies against a budget of {RATE} over {seconds:.1} s: {r}"
    );
    // The budget was what held the sink back (the writes waited for it),
    // and the bodies were compressed (the cap is on wire bytes).
    assert!(
        u_.metric(r#"updraft_sink_rate_limit_wait_ms_total{sink="cloud",type="http"}"#) > 1000.0
    );
    assert!(u(h, "plain_bytes") > 3 * u(h, "body_bytes"), "{h}");
}

#[test]
fn drop_oldest_keeps_the_newest_records_and_counts_every_one_it_dropped() {
    const N: u64 = 100_000;
    let (src, sink) = (free_addr(), free_addr());
    // The endpoint is down while the records come: the buffer (256 KiB)
    // overflows and drops its oldest batches.
    let u_ = Updraft::start(&tcp_to_http(
        src,
        1,
        &format!("http://{sink}/"),
        "request = { concurrency = 1 }",
        "[sinks.cloud.buffer]\nmax_bytes = 262144\nwhen_full = \"drop_oldest\"\n[sinks.cloud.batch]\nmax_records = 500",
    ));
    send(
        src,
        &[
            "--connections",
            "1",
            "--count",
            &N.to_string(),
            "--size",
            "256",
        ],
    );
    let dropped = r#"updraft_sink_buffer_dropped_records_total{sink="cloud",type="http"}"#;
    let oldest = r#"updraft_sink_buffer_dropped_oldest_records_total{sink="cloud",type="http"}"#;
    assert!(u_.wait_metric(oldest, 1.0, Duration::from_secs(10)) > 0.0);
    // The endpoint comes up: what the buffer kept is delivered.
    let dir = tempfile::tempdir().unwrap();
    let saved = dir.path().join("bodies");
    let rx = http_receiver(sink, N, 30, &["--save", saved.to_str().unwrap()]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while u_.metric(SENT) + u_.metric(dropped) < N as f64 {
        assert!(Instant::now() < deadline, "{}", u_.log_text());
        std::thread::sleep(Duration::from_millis(50));
    }
    rx.stop();
    let (sent, dropped) = (u_.metric(SENT) as u64, u_.metric(dropped) as u64);
    assert_eq!(
        sent + dropped,
        N,
        "every record delivered or counted as dropped"
    );
    assert_eq!(u_.metric(oldest) as u64, dropped, "all of them the oldest");
    let text = std::fs::read_to_string(&saved).unwrap();
    let mut seqs: Vec<u64> = text
        .lines()
        .map(|l| l.split(" seq=").nth(1).unwrap()[..12].parse().unwrap())
        .collect();
    seqs.sort_unstable();
    seqs.dedup();
    assert_eq!(seqs.len() as u64, sent, "each delivered record once");
    // The newest records all arrived: one run up to the last record sent,
    // and before it at most what the sender had taken when the endpoint
    // was found down: the batch in its one request (retried) and the next
    // one, waiting for that request's slot (2 x 500 records).
    assert_eq!(seqs.last(), Some(&(N - 1)));
    let tail = seqs
        .iter()
        .rev()
        .zip((0..N).rev())
        .take_while(|(s, want)| *s == want)
        .count() as u64;
    assert!(
        sent - tail <= 1000,
        "{} delivered outside the newest run of {tail}",
        sent - tail
    );
    assert!(dropped > N / 2, "the buffer held {sent} of {N}");
}
