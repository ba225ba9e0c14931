//! Records with structure: a source's `decoding`, what it does with records
//! that do not decode, and `partition_by = { field }` over the shard mesh.

use crate::harness::{free_addr, send, u, Receiver, Updraft};
use std::time::Duration;

fn config(src: std::net::SocketAddr, rx: std::net::SocketAddr, source_extra: &str) -> String {
    format!(
        r#"shards = 2
[sources.app]
type = "tcp"
address = "{src}"
{source_extra}
[sinks.out]
type = "tcp"
inputs = ["app"]
address = "{rx}"
"#
    )
}

#[test]
fn line_protocol_of_1000_devices_partitioned_by_tag_keeps_each_devices_order_exactly_once() {
    let (src, rx_addr) = (free_addr(), free_addr());
    let rx = Receiver::start(rx_addr, 1_000_000, 120, &[]);
    let u_ = Updraft::start(&config(
        src,
        rx_addr,
        "decoding = \"influx\"\npartition_by = { field = \"tag.device\" }",
    ));
    // Each device's records go over one of the 4 connections, which the
    // kernel spreads over the 2 shards; partitioning sends each device's to
    // the shard that owns it, so most connections' records are split.
    send(
        src,
        &[
            "--connections",
            "4",
            "--count",
            "1000000",
            "--size",
            "200",
            "--format",
            "influx",
            "--devices",
            "1000",
        ],
    );
    let (r, ok) = rx.finish();
    assert!(ok, "{r}\n{}", u_.log_text());
    assert_eq!(u(&r, "unique"), 1_000_000, "{r}");
    assert_eq!(u(&r, "streams"), 1000, "one stream per device: {r}");
    assert_eq!(u(&r, "duplicates"), 0, "{r}");
    assert_eq!(u(&r, "reordered"), 0, "each device's records in order: {r}");
    assert_eq!(
        u_.metric(r#"updraft_source_decode_errors_total{source="app"}"#),
        0.0
    );
    // About half of the records belong to the other shard than the one
    // that read them (hash partitioning over 2 shards).
    let crossed = u_.metric(r#"updraft_shard_crossed_records_total{shard="0"}"#)
        + u_.metric(r#"updraft_shard_crossed_records_total{shard="1"}"#);
    assert!(
        (300_000.0..=700_000.0).contains(&crossed),
        "records crossed to their device's shard: {crossed}"
    );
}

#[test]
fn records_that_do_not_decode_are_counted_then_passed_on_or_dropped() {
    for (policy, delivered) in [("pass", 1000u64), ("drop", 0)] {
        let (src, rx_addr) = (free_addr(), free_addr());
        let rx = Receiver::start(rx_addr, delivered.max(1), 5, &[]);
        let u_ = Updraft::start(&config(
            src,
            rx_addr,
            &format!("decoding = \"syslog\"\non_error = \"{policy}\""),
        ));
        // The load generator's raw records carry no <PRI>: not syslog.
        send(src, &["--count", "1000", "--size", "100"]);
        let errors = u_.wait_metric(
            r#"updraft_source_decode_errors_total{source="app"}"#,
            1000.0,
            Duration::from_secs(10),
        );
        assert_eq!(errors, 1000.0, "{policy}");
        let dropped =
            u_.metric(r#"updraft_source_dropped_records_total{source="app",reason="decode"}"#);
        assert_eq!(dropped, (1000 - delivered) as f64, "{policy}");
        let (r, _) = rx.finish();
        assert_eq!(u(&r, "unique"), delivered, "{policy}: {r}");
        assert!(
            u_.log_text().contains("not syslog: no <PRI> at the start"),
            "{}",
            u_.log_text()
        );
    }
    // Syslog records decode: none counted.
    let (src, rx_addr) = (free_addr(), free_addr());
    let rx = Receiver::start(rx_addr, 1000, 30, &[]);
    let u_ = Updraft::start(&config(
        src,
        rx_addr,
        "decoding = \"syslog\"\npartition_by = { field = \"host\" }",
    ));
    send(
        src,
        &[
            "--connections",
            "2",
            "--count",
            "1000",
            "--format",
            "syslog",
        ],
    );
    let (r, ok) = rx.finish();
    assert!(ok && u(&r, "unique") == 1000, "{r}");
    assert_eq!(
        u_.metric(r#"updraft_source_decode_errors_total{source="app"}"#),
        0.0
    );
}

#[test]
fn a_where_rule_sends_severities_0_to_2_to_one_sink_and_the_rest_to_another() {
    const N: u64 = 80_000; // 5,000 per connection: a multiple of 8 each
    let (src, alarms_addr, rest_addr) = (free_addr(), free_addr(), free_addr());
    // The load generator's syslog records have severity seq % 8: 3 in 8 are
    // 0..=2.
    let alarms = Receiver::start(alarms_addr, N * 3 / 8, 60, &[]);
    let rest = Receiver::start(rest_addr, N * 5 / 8, 60, &[]);
    let u_ = Updraft::start(&format!(
        r#"shards = 2
[sources.app]
type = "tcp"
address = "{src}"
decoding = "syslog"
partition_by = {{ field = "host" }}
[sinks.alarms]
type = "tcp"
inputs = ["app"]
address = "{alarms_addr}"
where = {{ field = "severity", in = ["0", "1", "2"] }}
[sinks.rest]
type = "tcp"
inputs = ["app"]
address = "{rest_addr}"
where = {{ field = "severity", not_in = ["0", "1", "2"] }}
"#
    ));
    send(
        src,
        &[
            "--connections",
            "16",
            "--count",
            &N.to_string(),
            "--format",
            "syslog",
        ],
    );
    let (a, a_ok) = alarms.finish();
    let (r, r_ok) = rest.finish();
    assert!(a_ok && r_ok, "{a}\n{r}\n{}", u_.log_text());
    assert_eq!(u(&a, "unique"), N * 3 / 8, "{a}");
    assert_eq!(u(&r, "unique"), N * 5 / 8, "{r}");
    assert_eq!(u(&a, "duplicates") + u(&r, "duplicates"), 0);
    // Records went over the mesh (partitioned by host: 16 hosts, one per
    // connection; that none of 16 lands on its host's shard has a chance
    // of 1 in 65,536) and kept their sinks there.
    let crossed = u_.metric(r#"updraft_shard_crossed_records_total{shard="0"}"#)
        + u_.metric(r#"updraft_shard_crossed_records_total{shard="1"}"#);
    assert!(
        crossed > 0.0,
        "no record crossed the mesh:\n{}",
        crate::harness::http_get(u_.metrics, "/metrics").unwrap_or_default()
    );
}
