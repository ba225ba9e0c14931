//! SIGHUP reloads the config: sources and sinks added, removed or changed
//! while records flow, nothing lost on what stayed; a config that is bad,
//! or changes what a reload cannot, refused with the key named while the
//! running one goes on.

use crate::harness::*;
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

const APP: &str = r#"updraft_source_received_records_total{source="app"}"#;

fn app_and_up(app: SocketAddr, up: SocketAddr) -> String {
    tcp_to_tcp(app, up, 2, "")
}

/// Waits until nothing accepts connections on `addr`.
fn wait_closed(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while TcpStream::connect(addr).is_ok() {
        assert!(
            Instant::now() < deadline,
            "{addr} still accepts connections"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_reload_under_load_adds_a_sink_and_removes_a_source_losing_nothing_on_the_sink_that_stayed() {
    reload_under_load("");
}

#[test]
fn a_reload_while_records_cross_between_shards_routes_each_by_the_new_plan() {
    // Each connection's records go to the shard its peer hashes to: the
    // shards switch plans while batches are in the rings between them.
    reload_under_load("partition_by = \"peer\"");
}

/// Under load, a reload removes a source (and its only sink) and adds a
/// sink: the sink that stayed gets every record once, the added one every
/// record from the reload on.
fn reload_under_load(app_keys: &str) {
    let (app, extra, up, more) = (free_addr(), free_addr(), free_addr(), free_addr());
    let before = format!(
        r#"{}
[sources.extra]
type = "tcp"
address = "{extra}"
[sinks.side]
type = "blackhole"
inputs = ["extra"]
"#,
        tcp_to_tcp(app, up, 2, app_keys)
    );
    let after = format!(
        r#"{}
[sinks.more]
type = "tcp"
inputs = ["app"]
address = "{more}"
"#,
        tcp_to_tcp(app, up, 2, app_keys)
    );
    let count: u64 = 300_000;
    let r_up = Receiver::start(up, count, 90, &[]);
    let r_more = Receiver::start(more, count, 90, &["--idle-s", "3"]);
    let ud = Updraft::start(&before);
    let mut sender = spawn_send(
        app,
        &[
            "--connections",
            "4",
            "--count",
            &count.to_string(),
            "--size",
            "128",
            "--rate",
            "50000",
        ],
    );
    let mut side_sender = spawn_send(
        extra,
        &[
            "--count",
            "1000000",
            "--size",
            "64",
            "--rate",
            "2000",
            "--stream-base",
            "100",
        ],
    );
    ud.wait_metric(APP, 60_000.0, Duration::from_secs(30));
    ud.wait_metric(
        r#"updraft_source_received_records_total{source="extra"}"#,
        100.0,
        Duration::from_secs(10),
    );

    ud.rewrite_config(&after);
    let line = ud.reload();
    let received_at_reload = ud.metric(APP);
    assert!(
        line.contains("config reloaded")
            && line.contains(r#"sinks added ["more"]"#)
            && line.contains(r#"removed ["extra"]"#)
            && line.contains(r#"removed ["side"]"#),
        "{line}\n{}",
        ud.log_text()
    );
    assert!(
        received_at_reload < count as f64,
        "the stream ended before the reload: {received_at_reload}"
    );
    // The removed source's listener is closed and its connection ended.
    wait_closed(extra);
    let deadline = Instant::now() + Duration::from_secs(10);
    while side_sender.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "the removed source's connection was not closed"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let metrics = http_get(ud.metrics, "/metrics").unwrap();
    assert!(
        !metrics.contains(r#"source="extra""#) && !metrics.contains(r#"sink="side""#),
        "removed ones still shown:\n{metrics}"
    );
    assert!(metrics.contains(r#"sink="more""#), "{metrics}");

    assert!(sender.wait().unwrap().success());
    if !app_keys.is_empty() {
        let crossed = ud.metric(r#"updraft_shard_crossed_records_total{shard="0"}"#)
            + ud.metric(r#"updraft_shard_crossed_records_total{shard="1"}"#);
        assert!(crossed > 0.0, "no record crossed between shards");
    }
    let (r, ok) = r_up.finish();
    assert!(ok, "{r}\n{}", ud.log_text());
    assert_eq!(
        u(&r, "unique"),
        count,
        "the sink that stayed lost records: {r}"
    );
    assert_eq!(u(&r, "duplicates"), 0, "{r}");

    // The new sink has every record from the reload on: per connection, an
    // unbroken run up to its last record.
    let (m, _) = r_more.finish();
    let got = u(&m, "unique");
    assert!(
        got as f64 >= count as f64 - received_at_reload,
        "the added sink got {got}, less than the {} received after the reload: {m}",
        count as f64 - received_at_reload
    );
    assert_eq!(u(&m, "duplicates"), 0, "{m}");
    let streams = m["per_stream"].as_object().expect("per-stream summary");
    assert_eq!(streams.len(), 4, "{m}");
    for (id, s) in streams {
        assert_eq!(
            u(s, "newest_run"),
            u(s, "unique"),
            "stream {id} has a gap in the added sink: {m}"
        );
    }
}

#[test]
fn a_bad_config_on_sighup_is_refused_by_key_and_the_running_one_goes_on() {
    let (app, up, more) = (free_addr(), free_addr(), free_addr());
    let running = app_and_up(app, up);
    let r = Receiver::start(up, 20_000, 60, &[]);
    let ud = Updraft::start(&running);
    send(app, &["--count", "10000", "--size", "64"]);
    ud.wait_metric(APP, 10_000.0, Duration::from_secs(20));

    let refused = |config: String, key: &str| {
        ud.rewrite_config(&config);
        let line = ud.reload();
        assert!(
            line.contains("config reload refused") && line.contains(key),
            "expected a refusal naming {key}: {line}"
        );
    };
    // Not a config.
    refused(
        format!("{running}\n[sinks.up.retry\n"),
        "invalid table header",
    );
    // A sink whose input does not exist (and a sink added beside it).
    refused(
        format!(
            "{running}\n[sinks.more]\ntype = \"tcp\"\ninputs = [\"nope\"]\naddress = \"{more}\"\n"
        ),
        "sinks.more.inputs",
    );
    // What a reload cannot change.
    refused(
        running.replace("shards = 2", "shards = 1"),
        "shards changed",
    );
    // A port another process listens on: the sink added beside it is not
    // added either.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap();
    refused(
        format!(
            "{running}\n[sources.late]\ntype = \"tcp\"\naddress = \"{port}\"\n[sinks.more]\ntype = \"tcp\"\ninputs = [\"late\"]\naddress = \"{more}\"\n"
        ),
        "sources.late",
    );
    let metrics = http_get(ud.metrics, "/metrics").unwrap();
    assert!(
        !metrics.contains(r#"sink="more""#) && !metrics.contains(r#"source="late""#),
        "a refused reload changed the collector:\n{metrics}"
    );

    // The running config still carries records, all of them.
    send(
        app,
        &["--count", "10000", "--size", "64", "--stream-base", "50"],
    );
    let (s, ok) = r.finish();
    assert!(ok, "{s}\n{}", ud.log_text());
    assert_eq!(u(&s, "unique"), 20_000, "{s}");
    assert_eq!(u(&s, "duplicates"), 0, "{s}");
}

#[test]
fn a_sink_changed_by_a_reload_sends_what_its_disk_buffer_held() {
    changed_sink_sends_what_it_held("disk");
}

#[test]
fn a_sink_changed_by_a_reload_sends_what_its_memory_buffer_held() {
    changed_sink_sends_what_it_held("memory");
}

/// The sink's first address has no receiver: records wait in its buffer.
/// The reload points it at one; what the buffer held goes with it.
fn changed_sink_sends_what_it_held(buffer: &str) {
    let (app, down, up) = (free_addr(), free_addr(), free_addr());
    let config =
        |to: SocketAddr| app_and_up(app, to) + &format!("[sinks.up.buffer]\ntype = \"{buffer}\"\n");
    let ud = Updraft::start(&config(down));
    send(
        app,
        &["--connections", "2", "--count", "50000", "--size", "100"],
    );
    ud.wait_metric(APP, 50_000.0, Duration::from_secs(20));
    if buffer == "disk" {
        ud.wait_metric(
            r#"updraft_sink_durable_records_total{sink="up",type="tcp"}"#,
            50_000.0,
            Duration::from_secs(20),
        );
    }

    let r = Receiver::start(up, 60_000, 60, &[]);
    ud.rewrite_config(&config(up));
    let line = ud.reload();
    assert!(
        line.contains("config reloaded") && line.contains(r#"sinks added [], changed ["up"]"#),
        "{line}\n{}",
        ud.log_text()
    );
    // And what comes after the reload goes the same way.
    send(
        app,
        &[
            "--connections",
            "2",
            "--count",
            "10000",
            "--size",
            "100",
            "--stream-base",
            "10",
        ],
    );
    let (s, ok) = r.finish();
    assert!(ok, "{s}\n{}", ud.log_text());
    assert_eq!(u(&s, "unique"), 60_000, "{s}");
    assert_eq!(u(&s, "duplicates"), 0, "{s}");
}
