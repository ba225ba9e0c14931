//! The collector as a process: idle cost, connection limits, UDP overflow,
//! and the io_uring refusal message.

use crate::harness::*;
use std::io::Read;
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

/// CPU time (user + system) of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after_comm = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after_comm.split(' ').collect();
    // Fields 14 and 15 of stat(5): utime, stime (after the comm, from index 11).
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

#[test]
fn an_idle_collector_sleeps() {
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
partition_by = "peer"
[sinks.up]
type = "tcp"
inputs = ["app", "sensors"]
address = "{sink}"
"#
    ));
    // Some traffic first, so every timer and connection has been used.
    let rx = Receiver::start(sink, 1000, 30, &[]);
    send(tcp, &["--count", "1000", "--size", "100"]);
    let (r, ok) = rx.finish();
    assert!(ok, "{r}");
    std::thread::sleep(Duration::from_millis(500));
    let before = cpu_ticks(u_.pid());
    std::thread::sleep(Duration::from_secs(4));
    let used = cpu_ticks(u_.pid()) - before;
    // 1% of 4 s is 40 ms: 4 ticks at the usual 100 Hz.
    assert!(used <= 4, "{used} ticks of CPU in 4 idle seconds");
}

#[test]
fn connections_past_max_connections_are_refused_and_counted() {
    let src = free_addr();
    let u_ = Updraft::start(&format!(
        r#"
shards = 1
[sources.app]
type = "tcp"
address = "{src}"
max_connections = 2
[sinks.null]
type = "blackhole"
inputs = ["app"]
"#
    ));
    let a = TcpStream::connect(src).unwrap();
    let b = TcpStream::connect(src).unwrap();
    u_.wait_metric(
        r#"updraft_source_connections_open{source="app"}"#,
        2.0,
        Duration::from_secs(5),
    );
    let mut c = TcpStream::connect(src).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 1];
    assert_eq!(
        c.read(&mut buf).unwrap_or(0),
        0,
        "the third connection is closed"
    );
    u_.wait_metric(
        r#"updraft_source_connections_rejected_total{source="app"}"#,
        1.0,
        Duration::from_secs(5),
    );
    drop((a, b));
}

#[test]
fn udp_datagrams_the_kernel_dropped_are_counted_not_silent() {
    let (src, sink) = (free_addr(), free_addr());
    let u_ = Updraft::start(&format!(
        r#"
shards = 1
[sources.sensors]
type = "udp"
address = "{src}"
receive_buffer_bytes = 4096
[sinks.up]
type = "tcp"
inputs = ["sensors"]
address = "{sink}"
"#
    ));
    let rx = Receiver::start(sink, 200_000, 8, &[]);
    let s = send(
        src,
        &[
            "--proto",
            "udp",
            "--connections",
            "2",
            "--count",
            "200000",
            "--size",
            "512",
        ],
    );
    let (r, _) = rx.finish();
    std::thread::sleep(Duration::from_millis(1500)); // the drop counter is read each second
    let sent = u(&s, "sent") as f64;
    let received = u_.metric(r#"updraft_source_received_records_total{source="sensors"}"#);
    let dropped = u_.metric(
        r#"updraft_source_dropped_records_total{source="sensors",reason="receive_buffer"}"#,
    ) + u_
        .metric(r#"updraft_source_dropped_records_total{source="sensors",reason="sink_full"}"#);
    assert!(
        dropped > 0.0,
        "a 4 KiB buffer flooded by two senders drops: {r}"
    );
    assert_eq!(received, u(&r, "unique") as f64, "{r}");
    // Loopback can also drop before the socket (the backlog queue), which no
    // socket counts; allow 1% for it.
    assert!(
        received + dropped >= 0.99 * sent,
        "sent {sent}, received {received}, dropped {dropped}"
    );
}

/// Restores `kernel.io_uring_disabled` when the test ends, even by panic.
struct Sysctl(String);
impl Drop for Sysctl {
    fn drop(&mut self) {
        let _ = std::fs::write("/proc/sys/kernel/io_uring_disabled", &self.0);
    }
}

/// Sets `kernel.io_uring_disabled = 2` until the guard drops; None (the
/// test is skipped, saying why) where the kernel or the user cannot.
fn disable_io_uring() -> Option<Sysctl> {
    let path = "/proc/sys/kernel/io_uring_disabled";
    let Ok(old) = std::fs::read_to_string(path) else {
        eprintln!("skipped: this kernel has no kernel.io_uring_disabled (before 6.6)");
        return None;
    };
    if std::fs::write(path, "2").is_err() {
        eprintln!("skipped: changing kernel.io_uring_disabled needs root");
        return None;
    }
    Some(Sysctl(old))
}

#[test]
fn with_io_uring_disabled_auto_runs_on_epoll_and_delivers_a_million_records_once() {
    let Some(restore) = disable_io_uring() else {
        return;
    };
    let (src, sink) = (free_addr(), free_addr());
    let u_ = Updraft::start(&format!("io = \"auto\"\n{}", tcp_to_tcp(src, sink, 2, "")));
    // Chosen once at start: io_uring may come back now.
    drop(restore);
    let log = u_.log_text();
    let lines: Vec<&str> = log.lines().filter(|l| l.contains("io_uring")).collect();
    assert_eq!(lines.len(), 1, "one line says why: {log}");
    assert!(
        lines[0].contains("epoll") && lines[0].contains("kernel.io_uring_disabled"),
        "{log}"
    );
    for shard in 0..2 {
        let series = format!(r#"updraft_shard_io_backend{{shard="{shard}",backend="epoll"}}"#);
        assert_eq!(u_.metric(&series), 1.0);
    }
    a_million_over_four_connections_arrive_once(src, sink);
}

#[test]
fn io_uring_refused_is_one_clear_line_and_a_non_zero_exit() {
    let Some(_restore) = disable_io_uring() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("c.toml");
    std::fs::write(
        &config,
        format!(
            "io = \"uring\"\nshards = 1\n[sources.a]\ntype = \"tcp\"\naddress = \"{}\"\n[sinks.b]\ntype = \"blackhole\"\ninputs = [\"a\"]\n",
            free_addr()
        ),
    )
    .unwrap();
    let out = Command::new(updraft())
        .args(["run", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    drop(_restore);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    let lines: Vec<&str> = err.lines().filter(|l| l.contains("io_uring")).collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(lines[0].contains("kernel.io_uring_disabled"), "{err}");
}
