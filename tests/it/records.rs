//! Records with structure: a source's `decoding`, what it does with records
//! that do not decode, and `partition_by = { field }` over the shard mesh.

use crate::harness::{free_addr, send, u, wait_listening, Receiver, Updraft};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

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
fn a_where_rule_sends_severities_up_to_3_to_one_sink_and_the_rest_to_another() {
    const N: u64 = 80_000; // 5,000 per connection: a multiple of 8 each
    let (src, alarms_addr, rest_addr) = (free_addr(), free_addr(), free_addr());
    // The load generator's syslog records have severity seq % 8: 4 in 8 are
    // 0..=3 (emergency to error).
    let alarms = Receiver::start(alarms_addr, N / 2, 60, &[]);
    let rest = Receiver::start(rest_addr, N / 2, 60, &[]);
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
where = {{ field = "severity", in = ["0", "1", "2", "3"] }}
[sinks.rest]
type = "tcp"
inputs = ["app"]
address = "{rest_addr}"
where = {{ field = "severity", not_in = ["0", "1", "2", "3"] }}
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
    assert_eq!(u(&a, "unique"), N / 2, "{a}");
    assert_eq!(u(&r, "unique"), N / 2, "{r}");
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

/// rsyslogd from the distribution's package on its own config: takes
/// syslog over TCP at `input` and forwards every message with omfwd to
/// `counted` (RFC 5424, octet-counted) and to `lines` (rsyslog's forwarding
/// format, newline-framed).
struct Rsyslog {
    child: std::process::Child,
    dir: tempfile::TempDir,
}

impl Rsyslog {
    fn start(input: SocketAddr, counted: SocketAddr, lines: SocketAddr) -> Rsyslog {
        const RSYSLOGD: &str = "/usr/sbin/rsyslogd";
        assert!(
            std::path::Path::new(RSYSLOGD).exists(),
            "{RSYSLOGD} is installed (scripts/test.sh installs the Debian package)"
        );
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("rsyslog.conf");
        std::fs::write(
            &conf,
            format!(
                r#"global(workDirectory="{d}")
module(load="imtcp")
input(type="imtcp" address="127.0.0.1" port="{}")
*.* action(type="omfwd" target="127.0.0.1" port="{}" protocol="tcp" TCP_Framing="octet-counted" template="RSYSLOG_SyslogProtocol23Format")
*.* action(type="omfwd" target="127.0.0.1" port="{}" protocol="tcp" template="RSYSLOG_ForwardFormat")
"#,
                input.port(),
                counted.port(),
                lines.port(),
                d = dir.path().display()
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.path().join("rsyslog.log")).unwrap();
        let child = std::process::Command::new(RSYSLOGD)
            .arg("-n")
            .arg("-f")
            .arg(&conf)
            .arg("-i")
            .arg(dir.path().join("rsyslog.pid"))
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        wait_listening(input, "rsyslogd");
        Rsyslog { child, dir }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("rsyslog.log")).unwrap_or_default()
    }
}

impl Drop for Rsyslog {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends one message with util-linux `logger` over TCP to `to`.
fn logger(to: SocketAddr, args: &[&str], message: &str) {
    let out = std::process::Command::new("logger")
        .args(["--tcp", "-n", "127.0.0.1", "-P", &to.port().to_string()])
        .args(args)
        .arg(message)
        // BSD timestamps carry no zone: the sender's is UTC, as the
        // collector reads them.
        .env("TZ", "UTC")
        .output()
        .expect("logger (util-linux) is installed");
    assert!(
        out.status.success(),
        "logger {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn syslog_from_logger_and_rsyslog_becomes_ndjson_objects_of_its_fields() {
    let (lines, counted, rx_addr, rsyslog_in) =
        (free_addr(), free_addr(), free_addr(), free_addr());
    let dir = tempfile::tempdir().unwrap();
    let saved = dir.path().join("bodies.ndjson");
    let rx = Receiver::start(
        rx_addr,
        1_000_000,
        120,
        &["--proto", "http", "--save", saved.to_str().unwrap()],
    );
    let u_ = Updraft::start(&format!(
        r#"shards = 2
[sources.lines]
type = "tcp"
address = "{lines}"
decoding = "syslog"
[sources.counted]
type = "tcp"
address = "{counted}"
framing = "octet_counting"
decoding = "syslog"
[sinks.out]
type = "http"
inputs = ["lines", "counted"]
uri = "http://{rx_addr}/"
encoding = "ndjson"
[sinks.out.batch]
linger_ms = 20
"#
    ));
    let rsyslog = Rsyslog::start(rsyslog_in, counted, lines);
    logger(
        lines,
        &[
            "--rfc5424",
            "-t",
            "app5424",
            "--id=4242",
            "-p",
            "local3.err",
            "--msgid",
            "M1",
        ],
        "logger 5424 newline",
    );
    logger(
        lines,
        &[
            "--rfc3164",
            "-t",
            "app3164",
            "--id=17",
            "-p",
            "user.warning",
        ],
        "logger 3164 newline",
    );
    logger(
        counted,
        &[
            "--octet-count",
            "--rfc5424",
            "-t",
            "oc5424",
            "-p",
            "daemon.notice",
        ],
        "logger 5424 counted",
    );
    logger(
        counted,
        &[
            "--octet-count",
            "--rfc3164",
            "-t",
            "oc3164",
            "-p",
            "local7.info",
        ],
        "logger 3164 counted",
    );
    // Through rsyslog: each arrives twice, once per forwarding action.
    logger(
        rsyslog_in,
        &["--rfc5424", "-t", "via5424", "--id=99", "-p", "local0.crit"],
        "through rsyslog 5424",
    );
    logger(
        rsyslog_in,
        &["--rfc3164", "-t", "via3164", "-p", "mail.alert"],
        "through rsyslog 3164",
    );
    // A timestamp far from the receive time: the record's own is kept.
    let mut s = std::net::TcpStream::connect(lines).unwrap();
    std::io::Write::write_all(
        &mut s,
        b"<14>1 2020-01-02T03:04:05.678+01:00 fixed-host fixed-app 9 ID9 - from the past\n",
    )
    .unwrap();
    drop(s);

    const EXPECT: usize = 9;
    let deadline = Instant::now() + Duration::from_secs(30);
    let objects = loop {
        let text = std::fs::read_to_string(&saved).unwrap_or_default();
        let objects: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect();
        if objects.len() >= EXPECT {
            break objects;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {EXPECT} records:\n{text}\n{}\n{}",
            objects.len(),
            u_.log_text(),
            rsyslog.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    rx.stop();
    assert_eq!(objects.len(), EXPECT, "{objects:#?}");
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    let host = host.trim();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let find = |source: &str, message: &str| -> &serde_json::Value {
        objects
            .iter()
            .find(|o| {
                o["source"] == source && o["message"].as_str().map(str::trim) == Some(message)
            })
            .unwrap_or_else(|| panic!("no {message:?} from {source}: {objects:#?}"))
    };
    // (source, message, app, procid, severity, facility)
    type Case<'a> = (&'a str, &'a str, &'a str, Option<&'a str>, u64, u64);
    let cases: [Case; 8] = [
        (
            "lines",
            "logger 5424 newline",
            "app5424",
            Some("4242"),
            3,
            19,
        ),
        ("lines", "logger 3164 newline", "app3164", Some("17"), 4, 1),
        ("counted", "logger 5424 counted", "oc5424", None, 5, 3),
        ("counted", "logger 3164 counted", "oc3164", None, 6, 23),
        (
            "counted",
            "through rsyslog 5424",
            "via5424",
            Some("99"),
            2,
            16,
        ),
        (
            "lines",
            "through rsyslog 5424",
            "via5424",
            Some("99"),
            2,
            16,
        ),
        ("counted", "through rsyslog 3164", "via3164", None, 1, 2),
        ("lines", "through rsyslog 3164", "via3164", None, 1, 2),
    ];
    for (source, message, app, procid, severity, facility) in cases {
        let o = find(source, message);
        assert_eq!(o["host"], host, "{o}");
        assert_eq!(o["app"], app, "{o}");
        assert_eq!(o["procid"].as_str(), procid, "{o}");
        assert_eq!(
            (o["severity"].as_u64(), o["facility"].as_u64()),
            (Some(severity), Some(facility)),
            "{o}"
        );
        // The sender's timestamp (RFC 3339 with a zone, or BSD in UTC).
        let ts = o["timestamp"].as_str().unwrap();
        let secs = days_secs(ts);
        assert!((secs - now).abs() < 300, "{ts} is not about now: {o}");
    }
    assert_eq!(find("lines", "logger 5424 newline")["msgid"], "M1");
    let past = find("lines", "from the past");
    assert_eq!(
        past["timestamp"], "2020-01-02T02:04:05.678000000Z",
        "{past}"
    );
    assert_eq!(
        (&past["host"], &past["app"], &past["msgid"]),
        (&"fixed-host".into(), &"fixed-app".into(), &"ID9".into())
    );
    for s in ["lines", "counted"] {
        assert_eq!(
            u_.metric(&format!(
                r#"updraft_source_decode_errors_total{{source="{s}"}}"#
            )),
            0.0
        );
    }
}

/// Seconds since the epoch of `YYYY-MM-DDThh:mm:ss...Z`.
fn days_secs(ts: &str) -> i64 {
    let n = |r: std::ops::Range<usize>| ts[r].parse::<i64>().unwrap();
    let (y, m, d) = (n(0..4), n(5..7), n(8..10));
    // Days from civil (proleptic Gregorian).
    let y_ = if m <= 2 { y - 1 } else { y };
    let era = y_.div_euclid(400);
    let yoe = y_ - era * 400;
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + d - 1;
    let days = era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468;
    days * 86_400 + n(11..13) * 3600 + n(14..16) * 60 + n(17..19)
}
