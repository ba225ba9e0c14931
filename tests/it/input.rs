//! Framings as real senders produce them, and bad input counted without
//! harming other connections.

use crate::harness::*;
use std::io::Write;
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

#[test]
fn logger_octet_counted_frames_arrive_as_whole_records() {
    let src = free_addr();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out.log");
    let mut u_ = Updraft::start(&format!(
        r#"
shards = 1
[sources.syslog]
type = "tcp"
address = "{src}"
framing = "octet_counting"
[sinks.disk]
type = "file"
inputs = ["syslog"]
path = "{}"
"#,
        path.display()
    ));
    let messages = ["first message with spaces", "second: 12 34 five", "third"];
    // logger sends each line of its input as one message.
    let mut logger = Command::new("logger")
        .args([
            "--tcp",
            "--octet-count",
            "-n",
            "127.0.0.1",
            "-P",
            &src.port().to_string(),
            "-t",
            "updraft-it",
        ])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("logger (util-linux) is installed");
    let mut stdin = logger.stdin.take().unwrap();
    for m in messages {
        writeln!(stdin, "{m}").unwrap();
    }
    drop(stdin);
    assert!(logger.wait().unwrap().success());
    u_.wait_metric(
        r#"updraft_sink_sent_records_total{sink="disk",type="file"}"#,
        3.0,
        Duration::from_secs(10),
    );
    assert_eq!(
        u_.metric(r#"updraft_source_dropped_records_total{source="syslog",reason="framing"}"#),
        0.0
    );
    let (status, _) = u_.terminate();
    assert!(status.success());
    let text = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    for (line, msg) in lines.iter().zip(messages) {
        assert!(line.starts_with('<'), "a syslog record: {line}");
        assert!(line.contains("updraft-it"), "{line}");
        assert!(line.ends_with(msg), "{line} should end with {msg}");
    }
}

#[test]
fn garbage_oversize_and_invalid_utf8_are_counted_while_other_connections_carry_on() {
    let (lines_src, counted_src, sink) = (free_addr(), free_addr(), free_addr());
    let u_ = Updraft::start(&format!(
        r#"
shards = 2
[sources.lines]
type = "tcp"
address = "{lines_src}"
max_record_bytes = 1024
[sources.counted]
type = "tcp"
address = "{counted_src}"
framing = "octet_counting"
max_record_bytes = 1024
[sinks.up]
type = "tcp"
inputs = ["lines", "counted"]
address = "{sink}"
"#
    ));
    let rx = Receiver::start(sink, 200_000, 60, &[]);
    let mut good = spawn_send(
        lines_src,
        &[
            "--connections",
            "2",
            "--count",
            "200000",
            "--size",
            "128",
            "--rate",
            "100000",
        ],
    );

    // Bad peers on the newline source: invalid UTF-8, then a 5000-byte line,
    // then a good line on the same connection (it resynchronises).
    let mut bad = TcpStream::connect(lines_src).unwrap();
    bad.write_all(b"\xff\xfe not utf-8\n").unwrap();
    bad.write_all(&vec![b'a'; 5000]).unwrap();
    bad.write_all(b"\nstill-connected\n").unwrap();
    // Garbage on the octet-counting source closes only that connection.
    let mut garbage = TcpStream::connect(counted_src).unwrap();
    garbage.write_all(b"5 hello this is not a frame").unwrap();
    // Oversize frame on a second counted connection.
    let mut big = TcpStream::connect(counted_src).unwrap();
    big.write_all(b"999999 xxxx").unwrap();

    let dropped = |reason: &str, source: &str| {
        format!(r#"updraft_source_dropped_records_total{{source="{source}",reason="{reason}"}}"#)
    };
    let t = Duration::from_secs(10);
    u_.wait_metric(&dropped("invalid_utf8", "lines"), 1.0, t);
    u_.wait_metric(&dropped("oversize", "lines"), 1.0, t);
    u_.wait_metric(&dropped("framing", "counted"), 1.0, t);
    u_.wait_metric(&dropped("oversize", "counted"), 1.0, t);
    // The good line after the oversized one came through on the same connection.
    u_.wait_metric(
        r#"updraft_source_received_records_total{source="counted"}"#,
        1.0,
        t,
    );
    u_.wait_metric(
        r#"updraft_source_received_records_total{source="lines"}"#,
        200_001.0,
        Duration::from_secs(30),
    );

    assert!(good.wait().unwrap().success());
    let (r, ok) = rx.finish();
    assert!(ok, "{r}");
    assert_eq!(u(&r, "lost"), 0, "{r}");
    let log = u_.log_text();
    assert!(log.contains("not valid UTF-8"), "{log}");
    assert!(log.contains("framing lost"), "{log}");
    drop((bad, garbage, big));
}
