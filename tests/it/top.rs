//! `updraft top --once` against a running collector: the figures it prints
//! are the ones its `/metrics` has.

use crate::harness::*;
use std::process::Command;
use std::time::Duration;

const SENT: &str = r#"updraft_sink_sent_records_total{sink="up",type="tcp"}"#;
const RECEIVED: &str = r#"updraft_source_received_records_total{source="app"}"#;

#[test]
fn top_once_prints_the_figures_metrics_has() {
    let (src, sink) = (free_addr(), free_addr());
    let u_ = Updraft::start(&tcp_to_tcp(src, sink, 2, "max_record_bytes = 300"));
    let rx = Receiver::start(sink, 10_000, 30, &[]);
    send(src, &["--count", "10000", "--size", "200"]);
    // Too long for the source: dropped, counted by reason.
    send(
        src,
        &["--count", "7", "--size", "400", "--stream-base", "9"],
    );
    let (r, ok) = rx.finish();
    assert!(ok, "{r}");
    u_.wait_metric(SENT, 10_000.0, Duration::from_secs(10));
    let metrics = http_get(u_.metrics, "/metrics").unwrap();
    let drops: Vec<(String, u64)> = metrics
        .lines()
        .filter(|l| l.starts_with(r#"updraft_source_dropped_records_total{source="app""#))
        .filter_map(|l| {
            let reason = l.split("reason=\"").nth(1)?.split('"').next()?.to_string();
            let n: f64 = l.rsplit(' ').next()?.parse().ok()?;
            (n > 0.0).then_some((reason, n as u64))
        })
        .collect();
    assert_eq!(
        drops.iter().map(|(_, n)| n).sum::<u64>(),
        7,
        "the long records are counted: {metrics}"
    );

    let out = Command::new(updraft())
        .args(["top", "--once", "--interval-ms", "200", "--metrics"])
        .arg(u_.metrics.to_string())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let title = text.lines().next().unwrap();
    assert!(
        title.contains(&format!(
            "2 shards on {}; since start: {} records received, {} sent",
            if metrics.contains(r#"backend="epoll""#) {
                "epoll"
            } else {
                "uring"
            },
            u_.metric(RECEIVED),
            u_.metric(SENT)
        )),
        "{text}"
    );
    let app = text
        .lines()
        .find(|l| l.starts_with("app "))
        .expect("a row for app");
    for (reason, n) in &drops {
        assert!(app.contains(&format!("{reason} {n}")), "{app}\n{text}");
    }
    let up: Vec<&str> = text
        .lines()
        .find(|l| l.starts_with("up "))
        .expect("a row for up")
        .split_whitespace()
        .collect();
    // SINK TYPE RECORDS/S BYTES/S (2 words) DROPPED (2 words) QUEUED RETRIES ...
    assert_eq!(up[1], "tcp", "{text}");
    assert_eq!(up[2], "0", "idle: no records per second: {text}");
    assert_eq!(
        (up[5], up[6]),
        (
            "full",
            &*format!(
                "{}",
                u_.metric(r#"updraft_sink_buffer_dropped_records_total{sink="up",type="tcp"}"#)
            )
        ),
        "{text}"
    );
    assert_eq!(
        up[8],
        format!(
            "{}",
            u_.metric(r#"updraft_sink_retries_total{sink="up",type="tcp"}"#)
        ),
        "{text}"
    );

    // Nothing listens: a clear error and exit 2.
    let out = Command::new(updraft())
        .args(["top", "--once", "--metrics"])
        .arg(free_addr().to_string())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read http://"));
}
