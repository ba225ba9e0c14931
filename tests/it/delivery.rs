//! Records arrive exactly once, in order per stream, through outages and
//! shutdown.

use crate::harness::*;
use std::time::Duration;

#[test]
fn a_million_records_over_four_tcp_connections_arrive_exactly_once() {
    let (src, sink) = (free_addr(), free_addr());
    let _u = Updraft::start(&tcp_to_tcp(src, sink, 2, ""));
    a_million_over_four_connections_arrive_once(src, sink);
}

#[test]
fn udp_datagrams_at_a_moderate_rate_arrive_exactly_once() {
    let (src, sink) = (free_addr(), free_addr());
    let u_ = Updraft::start(&format!(
        r#"
shards = 2
[sources.sensors]
type = "udp"
address = "{src}"
receive_buffer_bytes = 8388608
[sinks.up]
type = "tcp"
inputs = ["sensors"]
address = "{sink}"
"#
    ));
    let rx = Receiver::start(sink, 100_000, 60, &[]);
    send(
        src,
        &[
            "--proto",
            "udp",
            "--connections",
            "2",
            "--count",
            "100000",
            "--size",
            "128",
            "--rate",
            "25000",
        ],
    );
    let (r, ok) = rx.finish();
    assert!(ok, "{r}\n{}", u_.log_text());
    assert_eq!(u(&r, "unique"), 100_000, "{r}");
    assert_eq!(u(&r, "duplicates"), 0, "{r}");
    let dropped = u_.metric(
        r#"updraft_source_dropped_records_total{source="sensors",reason="receive_buffer"}"#,
    );
    assert_eq!(dropped, 0.0);
}

#[test]
fn partition_by_peer_keeps_each_streams_order_across_shards() {
    let (src, sink) = (free_addr(), free_addr());
    let u_ = Updraft::start(&tcp_to_tcp(src, sink, 2, "partition_by = \"peer\""));
    let rx = Receiver::start(sink, 400_000, 60, &[]);
    send(
        src,
        &["--connections", "8", "--count", "400000", "--size", "128"],
    );
    let (r, ok) = rx.finish();
    assert!(ok, "{r}");
    assert_eq!(u(&r, "streams"), 8, "{r}");
    assert_eq!(u(&r, "reordered"), 0, "{r}");
    assert_eq!(u(&r, "lost"), 0, "{r}");
    assert_eq!(u(&r, "duplicates"), 0, "{r}");
    // Both shards' sinks sent: records did cross to their owners.
    assert_eq!(
        u_.metric(r#"updraft_sink_sent_records_total{sink="up",type="tcp"}"#),
        400_000.0
    );
}

#[test]
fn the_tcp_sink_going_away_for_seconds_loses_nothing() {
    let (src, sink) = (free_addr(), free_addr());
    let u_ = Updraft::start(&tcp_to_tcp(src, sink, 2, ""));
    // The upstream restarts after 100k records and is gone for 3 s.
    let rx = Receiver::start(
        sink,
        500_000,
        60,
        &["--pause-after", "100000", "--pause-s", "3"],
    );
    send(
        src,
        &[
            "--connections",
            "4",
            "--count",
            "500000",
            "--size",
            "128",
            "--rate",
            "100000",
        ],
    );
    let (r, ok) = rx.finish();
    assert!(ok, "{r}\n{}", u_.log_text());
    assert_eq!(u(&r, "lost"), 0, "{r}");
    assert_eq!(u(&r, "unique"), 500_000, "{r}");
    assert!(u_.metric(r#"updraft_sink_send_errors_total{sink="up",type="tcp"}"#) > 0.0);
}

#[test]
fn a_sink_that_is_down_stops_tcp_sources_in_bounded_memory_and_loses_nothing() {
    let (src, sink) = (free_addr(), free_addr());
    let u_ = Updraft::start(&tcp_to_tcp(src, sink, 2, "").replace(
        "[sinks.up.retry]",
        "[sinks.up.batch]\nmax_bytes = 65536\n[sinks.up.buffer]\nmax_bytes = 1048576\n[sinks.up.retry]",
    ));
    let mut sender = spawn_send(
        src,
        &["--connections", "2", "--count", "300000", "--size", "256"],
    );
    std::thread::sleep(Duration::from_secs(2));
    // Nothing can leave, so the sender is held back: 1 MiB of buffer is far
    // less than 77 MB of records.
    assert!(
        sender.try_wait().unwrap().is_none(),
        "the sender should be blocked"
    );
    let queued = u_.metric(r#"updraft_sink_queued_batches{sink="up",type="tcp"}"#);
    assert!(queued <= 2.0 * 8.0, "queued {queued} batches");
    let received = u_.metric(r#"updraft_source_received_records_total{source="app"}"#);
    assert!(
        received < 100_000.0,
        "received {received} while the sink was down"
    );
    let backoff = u_.metric(r#"updraft_sink_retry_backoff_ms{sink="up",type="tcp"}"#);
    assert!(
        (20.0..=200.0).contains(&backoff),
        "retrying with a backoff ceiling of {backoff} ms"
    );
    let rss_kib: u64 = std::fs::read_to_string(format!("/proc/{}/status", u_.pid()))
        .unwrap()
        .lines()
        .find_map(|l| {
            l.strip_prefix("VmRSS:")
                .map(|v| v.trim().trim_end_matches(" kB").parse().unwrap())
        })
        .unwrap();
    assert!(rss_kib < 200 * 1024, "RSS {rss_kib} KiB");
    let rx = Receiver::start(sink, 300_000, 60, &[]);
    let (r, ok) = rx.finish();
    assert!(sender.wait().unwrap().success());
    assert!(ok, "{r}");
    assert_eq!(u(&r, "lost"), 0, "{r}");
    assert_eq!(u(&r, "duplicates"), 0, "{r}");
    let backoff = u_.metric(r#"updraft_sink_retry_backoff_ms{sink="up",type="tcp"}"#);
    assert_eq!(backoff, 0.0, "healthy again");
}

#[test]
fn sigterm_flushes_what_was_batched_and_exits_zero() {
    let (src, sink) = (free_addr(), free_addr());
    let mut u_ = Updraft::start(&tcp_to_tcp(src, sink, 2, "").replace(
        "[sinks.up.retry]",
        "[sinks.up.batch]\nmax_records = 100000\nlinger_ms = 600000\n[sinks.up.retry]",
    ));
    let rx = Receiver::start(sink, 1000, 30, &[]);
    send(
        src,
        &["--connections", "2", "--count", "1000", "--size", "100"],
    );
    u_.wait_metric(
        r#"updraft_source_received_records_total{source="app"}"#,
        1000.0,
        Duration::from_secs(10),
    );
    // Held in the open batch: a ten-minute linger has not passed.
    assert_eq!(
        u_.metric(r#"updraft_sink_sent_records_total{sink="up",type="tcp"}"#),
        0.0
    );
    let (status, took) = u_.terminate();
    assert!(status.success(), "exit status {status}");
    assert!(took < Duration::from_secs(5), "took {took:?}");
    let (r, ok) = rx.finish();
    assert!(ok, "{r}");
    assert_eq!(u(&r, "unique"), 1000, "{r}");
}

#[test]
fn the_file_sink_appends_every_record() {
    let src = free_addr();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out.log");
    let mut u_ = Updraft::start(&format!(
        r#"
shards = 2
[sources.app]
type = "tcp"
address = "{src}"
[sinks.disk]
type = "file"
inputs = ["app"]
path = "{}"
"#,
        path.display()
    ));
    send(
        src,
        &["--connections", "3", "--count", "30000", "--size", "80"],
    );
    u_.wait_metric(
        r#"updraft_sink_sent_records_total{sink="disk",type="file"}"#,
        30000.0,
        Duration::from_secs(10),
    );
    let (status, _) = u_.terminate();
    assert!(status.success());
    let text = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 30000);
    assert!(lines
        .iter()
        .all(|l| l.len() == 79 && l.starts_with("stream=")));
}

/// Issue 11 (fair admission): TCP senders flooding a sink whose upstream is
/// slower than they are are held back before the sink's queue is full; the
/// rest is headroom that keeps a modest UDP sensor stream flowing.
#[test]
fn held_back_tcp_senders_leave_headroom_for_a_udp_stream() {
    let (tcp, udp, sink) = (free_addr(), free_addr(), free_addr());
    let u_ = Updraft::start(&format!(
        r#"
shards = 2
[sources.app]
type = "tcp"
address = "{tcp}"
[sources.sensors]
type = "udp"
address = "{udp}"
receive_buffer_bytes = 8388608
[sinks.up]
type = "tcp"
inputs = ["app", "sensors"]
address = "{sink}"
"#
    ));
    // Each of the sink's two connections (one per shard) is read at
    // 12 MB/s: far slower than four senders flat out.
    let rx = Receiver::start(sink, 1_100_000, 120, &["--read-bytes-per-sec", "12000000"]);
    let mut flood = spawn_send(
        tcp,
        &["--connections", "4", "--count", "1000000", "--size", "256"],
    );
    std::thread::sleep(Duration::from_millis(500));
    let sensors = send(
        udp,
        &[
            "--proto",
            "udp",
            "--connections",
            "1",
            "--count",
            "100000",
            "--size",
            "256",
            "--rate",
            "20000",
            "--stream-base",
            "100",
        ],
    );
    assert_eq!(u(&sensors, "sent"), 100_000);
    assert!(
        flood.try_wait().unwrap().is_none(),
        "the tcp senders must still be held back while the sensors send"
    );
    assert!(flood.wait().unwrap().success());
    let (r, ok) = rx.finish();
    let full =
        u_.metric(r#"updraft_source_dropped_records_total{source="sensors",reason="sink_full"}"#);
    assert_eq!(full, 0.0, "udp datagrams dropped for a full sink: {r}");
    assert!(ok, "{r}\n{}", u_.log_text());
    assert_eq!(u(&r, "unique"), 1_100_000, "{r}");
    assert_eq!(u(&r, "duplicates"), 0, "{r}");
    assert!(
        u_.metric(r#"updraft_sink_backpressure_waits_total{sink="up",type="tcp"}"#) > 0.0,
        "the tcp senders were held back"
    );
}

/// Issue 14 (priorities): a high-priority UDP sensor stream (10,000/s) and
/// a low-priority TCP flood share one tcp sink that carries a fifth of what
/// they offer together (the receiver reads 40,000 lines/s of 200,000/s
/// offered). The sensors lose nothing; the flood is held back and loses
/// nothing either.
#[test]
fn a_high_priority_udp_stream_loses_nothing_beside_a_held_back_tcp_flood() {
    let (tcp, udp, sink) = (free_addr(), free_addr(), free_addr());
    let u_ = Updraft::start(&format!(
        r#"
shards = 1
[sources.sensors]
type = "udp"
address = "{udp}"
priority = 10
receive_buffer_bytes = 8388608
[sources.app]
type = "tcp"
address = "{tcp}"
priority = 1
[sinks.up]
type = "tcp"
inputs = ["app", "sensors"]
address = "{sink}"
buffer = {{ max_bytes = 8388608 }}
"#
    ));
    let rx = Receiver::start(sink, 700_000, 120, &["--read-bytes-per-sec", "10240000"]);
    let mut flood = spawn_send(
        tcp,
        &[
            "--connections",
            "4",
            "--count",
            "600000",
            "--size",
            "256",
            "--rate",
            "190000",
        ],
    );
    std::thread::sleep(Duration::from_millis(500));
    let sensors = send(
        udp,
        &[
            "--proto",
            "udp",
            "--count",
            "100000",
            "--size",
            "256",
            "--rate",
            "10000",
            "--stream-base",
            "100",
        ],
    );
    assert_eq!(u(&sensors, "sent"), 100_000);
    assert!(
        flood.try_wait().unwrap().is_none(),
        "the tcp flood (600,000 lines at 190,000/s) must still be held back when the sensors are done"
    );
    assert!(flood.wait().unwrap().success());
    let (r, ok) = rx.finish();
    for reason in ["sink_full", "receive_buffer"] {
        let dropped = u_.metric(&format!(
            r#"updraft_source_dropped_records_total{{source="sensors",reason="{reason}"}}"#
        ));
        assert_eq!(dropped, 0.0, "sensor datagrams dropped ({reason}): {r}");
    }
    assert!(ok, "{r}\n{}", u_.log_text());
    assert_eq!(r["per_stream"]["100"]["unique"], 100_000, "{r}");
    assert_eq!(u(&r, "unique"), 700_000, "{r}");
    assert_eq!(u(&r, "duplicates"), 0, "{r}");
    assert!(
        u_.metric(r#"updraft_sink_backpressure_waits_total{sink="up",type="tcp"}"#) > 0.0,
        "the tcp flood was held back"
    );
}

/// Issue 14 (priorities): two UDP streams that cannot wait share a sink
/// that carries about half of what they offer. The high-priority one loses
/// nothing; the low-priority one is the one dropped, and every datagram of
/// it is either delivered or counted.
#[test]
fn of_two_udp_streams_on_a_slow_sink_the_low_priority_one_is_dropped_and_counted() {
    let (alarms, debug, sink) = (free_addr(), free_addr(), free_addr());
    let u_ = Updraft::start(&format!(
        r#"
shards = 1
[sources.alarms]
type = "udp"
address = "{alarms}"
priority = 10
receive_buffer_bytes = 8388608
[sources.debug]
type = "udp"
address = "{debug}"
receive_buffer_bytes = 8388608
[sinks.up]
type = "tcp"
inputs = ["alarms", "debug"]
address = "{sink}"
buffer = {{ max_bytes = 8388608 }}
"#
    ));
    // 20,000 lines/s of the 40,000/s offered.
    let rx = Receiver::start(
        sink,
        u64::MAX / 2,
        120,
        &["--read-bytes-per-sec", "5120000", "--idle-s", "2"],
    );
    let udp = |count: &str, rate: &str, base: &str| {
        vec![
            "--proto".to_string(),
            "udp".into(),
            "--count".into(),
            count.into(),
            "--size".into(),
            "256".into(),
            "--rate".into(),
            rate.into(),
            "--stream-base".into(),
            base.into(),
        ]
    };
    let low = udp("300000", "30000", "200");
    let low: Vec<&str> = low.iter().map(String::as_str).collect();
    let mut flood = spawn_send(debug, &low);
    let high = udp("100000", "10000", "100");
    let high: Vec<&str> = high.iter().map(String::as_str).collect();
    let sent = send(alarms, &high);
    assert_eq!(u(&sent, "sent"), 100_000);
    assert!(flood.wait().unwrap().success());
    let (r, _) = rx.finish();
    let dropped = |source: &str, reason: &str| {
        u_.metric(&format!(
            r#"updraft_source_dropped_records_total{{source="{source}",reason="{reason}"}}"#
        )) as u64
    };
    assert_eq!(r["per_stream"]["100"]["unique"], 100_000, "{r}");
    assert_eq!(dropped("alarms", "sink_full"), 0, "{r}");
    assert_eq!(dropped("alarms", "receive_buffer"), 0, "{r}");
    let low_delivered = r["per_stream"]["200"]["unique"].as_u64().unwrap_or(0);
    let low_dropped = dropped("debug", "sink_full") + dropped("debug", "receive_buffer");
    assert!(dropped("debug", "sink_full") > 50_000, "{r}");
    assert_eq!(low_delivered + low_dropped, 300_000, "{r}");
    assert_eq!(u(&r, "duplicates"), 0, "{r}");
}

#[test]
fn a_tcp_sink_holds_to_its_byte_budget_and_holds_the_sender_back() {
    const RATE: f64 = 512.0 * 1024.0;
    let (src, sink) = (free_addr(), free_addr());
    let rx = Receiver::start(sink, u64::MAX / 2, 8, &[]);
    let u_ = Updraft::start(&format!(
        r#"shards = 2
[sources.app]
type = "tcp"
address = "{src}"
[sinks.out]
type = "tcp"
inputs = ["app"]
address = "{sink}"
rate_limit = {{ bytes_per_sec = 524288, burst_bytes = 65536 }}
[sinks.out.batch]
max_bytes = 65536
"#
    ));
    let mut sender = spawn_send(
        src,
        &["--connections", "2", "--count", "10000000", "--size", "256"],
    );
    let (r, _) = rx.finish();
    let _ = sender.kill();
    let _ = sender.wait();
    let seconds = r["seconds"].as_f64().unwrap();
    let per_sec = u(&r, "received") as f64 * 256.0 / seconds;
    assert!(seconds > 6.0, "{r}");
    assert!(
        (per_sec / RATE - 1.0).abs() <= 0.10,
        "{per_sec:.0} B/s against a budget of {RATE} over {seconds:.1} s: {r}"
    );
    // The budget pushed back like a slow sink: the tcp source was held
    // back (it can wait) rather than anything dropped.
    assert!(u_.metric(r#"updraft_sink_backpressure_waits_total{sink="out",type="tcp"}"#) > 0.0);
    assert!(u_.metric(r#"updraft_sink_rate_limit_wait_ms_total{sink="out",type="tcp"}"#) > 1000.0);
}
