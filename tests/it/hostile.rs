//! Issue 18: what hostile and careless use broke. One regression test per
//! item, named after it; the disk-buffer items (12, 13) are in `wal.rs` and
//! the validation gaps (10) in `config.rs`.

use crate::harness::*;
use std::ffi::OsStr;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

fn source_metric(name: &str, source: &str) -> String {
    format!("updraft_source_{name}{{source=\"{source}\"}}")
}

fn dropped(source: &str, reason: &str) -> String {
    format!("updraft_source_dropped_records_total{{source=\"{source}\",reason=\"{reason}\"}}")
}

fn write_config(dir: &std::path::Path, text: &str) -> std::path::PathBuf {
    let path = dir.join("second.toml");
    std::fs::write(&path, format!("{}{text}", io_line(text))).unwrap();
    path
}

fn run_config(path: &std::path::Path) -> (Option<i32>, String) {
    run_to_end(&[OsStr::new("run"), OsStr::new("--config"), path.as_os_str()])
}

fn validate_config(path: &std::path::Path) -> (Option<i32>, String) {
    run_to_end(&[
        OsStr::new("validate"),
        OsStr::new("--config"),
        path.as_os_str(),
    ])
}

fn disk_tcp(
    data_dir: &std::path::Path,
    src: SocketAddr,
    sink: SocketAddr,
    metrics: &str,
) -> String {
    format!(
        r#"
shards = 2
data_dir = "{}"
{metrics}
[sources.app]
type = "tcp"
address = "{src}"
[sinks.up]
type = "tcp"
inputs = ["app"]
address = "{sink}"
[sinks.up.buffer]
type = "disk"
"#,
        data_dir.display()
    )
}

#[test]
fn issue18_1_a_second_instance_on_the_same_data_dir_is_refused() {
    let data = tempfile::tempdir().unwrap();
    let (src, sink) = (free_addr(), free_addr());
    let first = Updraft::start_raw(&disk_tcp(data.path(), src, sink, ""));
    // Differs in its ports only: the shared data_dir must stop it.
    let dir = tempfile::tempdir().unwrap();
    let metrics = format!("[metrics]\naddress = \"{}\"", free_addr());
    let cfg = disk_tcp(data.path(), free_addr(), sink, "")
        .replace("[sources.app]", &format!("{metrics}\n[sources.app]"));
    let (code, err) = run_config(&write_config(dir.path(), &cfg));
    assert_eq!(code, Some(2), "the second collector must not start: {err}");
    assert!(
        err.contains(&format!("pid {}", first.pid())) && err.contains("data_dir"),
        "the error names data_dir and the holder's pid: {err}"
    );
}

#[test]
fn issue18_1_a_source_port_another_process_listens_on_is_refused() {
    let (tcp, udp) = (free_addr(), free_addr());
    let _first = Updraft::start(&format!(
        r#"
shards = 2
[sources.app]
type = "tcp"
address = "{tcp}"
[sources.dgrams]
type = "udp"
address = "{udp}"
[sinks.up]
type = "blackhole"
inputs = ["app", "dgrams"]
"#
    ));
    for (kind, address) in [("tcp", tcp), ("udp", udp)] {
        let dir = tempfile::tempdir().unwrap();
        let cfg = format!(
            "shards = 2\ndata_dir = \"{}\"\n[sources.again]\ntype = \"{kind}\"\naddress = \"{address}\"\n[sinks.up]\ntype = \"blackhole\"\ninputs = [\"again\"]\n",
            dir.path().join("data").display()
        );
        let (code, err) = run_config(&write_config(dir.path(), &cfg));
        assert_eq!(
            code,
            Some(2),
            "{kind}: a shared port must fail the start: {err}"
        );
        assert!(
            err.contains("sources.again.address") && err.contains("already in use"),
            "{kind}: {err}"
        );
    }
}

#[test]
fn issue18_2_a_closed_stderr_neither_panics_nor_stops_delivery() {
    let (src, sink) = (free_addr(), free_addr());
    let mut u_ = Updraft::start_stderr_closed(&tcp_to_tcp(src, sink, 2, ""));
    // The sink is down at first: its task logs (into the closed pipe).
    send(
        src,
        &["--connections", "2", "--count", "20000", "--size", "128"],
    );
    std::thread::sleep(Duration::from_millis(500));
    let rx = Receiver::start(sink, 20_000, 30, &[]);
    let (r, ok) = rx.finish();
    assert!(ok, "every record arrives with stderr closed: {r}");
    assert_eq!(u(&r, "lost"), 0, "{r}");
    assert_eq!(http_status(u_.metrics, "/ready"), Some(200));
    let (status, _) = u_.terminate();
    assert!(
        status.success(),
        "SIGTERM exits 0 with stderr closed: {status}"
    );
}

#[test]
fn issue18_3_stray_signals_neither_kill_nor_lose_batched_records() {
    let (src, sink) = (free_addr(), free_addr());
    // One long-lingering batch: records wait in memory until a stop flushes.
    let cfg = tcp_to_tcp(src, sink, 1, "")
        + "[sinks.up.batch]\nmax_records = 100000\nlinger_ms = 600000\n";
    let mut u_ = Updraft::start(&cfg);
    let rx = Receiver::start(sink, 1_000, 30, &[]);
    send(
        src,
        &["--connections", "1", "--count", "1000", "--size", "64"],
    );
    u_.wait_metric(
        &source_metric("received_records_total", "app"),
        1000.0,
        Duration::from_secs(10),
    );
    for sig in [
        libc::SIGHUP,
        libc::SIGUSR1,
        libc::SIGUSR2,
        libc::SIGALRM,
        libc::SIGPROF,
        libc::SIGVTALRM,
    ] {
        u_.signal(sig);
        std::thread::sleep(Duration::from_millis(100));
        assert!(u_.exited().is_none(), "signal {sig} killed updraft");
    }
    // SIGHUP reloads the (same) config: the batch held in memory stays.
    assert!(
        u_.log_text().contains("config reloaded from"),
        "{}",
        u_.log_text()
    );
    // SIGQUIT stops it like SIGTERM: what is batched is sent.
    u_.signal(libc::SIGQUIT);
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(s) = u_.exited() {
            break s;
        }
        assert!(Instant::now() < deadline, "no exit after SIGQUIT");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status}\n{}", u_.log_text());
    let (r, ok) = rx.finish();
    assert!(ok, "{r}");
    assert_eq!(u(&r, "unique"), 1000, "{r}");
}

#[test]
fn issue18_4_idle_connections_are_closed_and_cannot_lock_senders_out() {
    let (src, sink) = (free_addr(), free_addr());
    let u_ = Updraft::start(&tcp_to_tcp(
        src,
        sink,
        2,
        "max_connections = 16\nidle_timeout_ms = 3000",
    ));
    let mut idle: Vec<TcpStream> = (0..16).map(|_| TcpStream::connect(src).unwrap()).collect();
    u_.wait_metric(
        &source_metric("connections_open", "app"),
        16.0,
        Duration::from_secs(10),
    );
    // Every slot is held by a connection idle for over a second: a real
    // sender still gets in (the longest-idle one makes room).
    std::thread::sleep(Duration::from_millis(1300));
    let rx = Receiver::start(sink, 1_000, 20, &[]);
    send(
        src,
        &["--connections", "1", "--count", "1000", "--size", "64"],
    );
    let (r, ok) = rx.finish();
    assert!(ok, "a sender got in past idle connections: {r}");
    assert_eq!(
        u_.metric(&source_metric("connections_evicted_total", "app")),
        1.0
    );
    // The rest are closed once idle_timeout_ms passes.
    u_.wait_metric(
        &source_metric("connections_idle_closed_total", "app"),
        15.0,
        Duration::from_secs(10),
    );
    let mut closed = 0;
    for s in &mut idle {
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut b = [0u8; 16];
        if matches!(s.read(&mut b), Ok(0) | Err(_)) {
            closed += 1;
        }
    }
    assert_eq!(closed, 16, "every idle connection was closed by updraft");
    assert_eq!(u_.metric(&source_metric("connections_open", "app")), 0.0);
}

#[test]
fn issue18_5_an_unusable_disk_buffer_directory_is_refused_with_its_path() {
    let (src, sink) = (free_addr(), free_addr());
    // data_dir is a regular file: validate and run both refuse it.
    let t = tempfile::tempdir().unwrap();
    let file = t.path().join("not-a-dir");
    std::fs::write(&file, b"x").unwrap();
    let cfg = write_config(t.path(), &disk_tcp(&file, src, sink, ""));
    for (what, (code, err)) in [
        ("validate", validate_config(&cfg)),
        ("run", run_config(&cfg)),
    ] {
        assert_eq!(code, Some(1), "{what}: {err}");
        assert!(
            err.contains("data_dir") && err.contains("not a directory"),
            "{what}: {err}"
        );
    }
    // A shard's directory replaced by a file.
    let t = tempfile::tempdir().unwrap();
    let data = t.path().join("data");
    std::fs::create_dir_all(data.join("up")).unwrap();
    std::fs::write(data.join("up").join("1"), b"x").unwrap();
    let cfg = write_config(t.path(), &disk_tcp(&data, src, sink, ""));
    let (code, err) = validate_config(&cfg);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("sinks.up.buffer") && err.contains("up/1"),
        "{err}"
    );
    // A directory where a segment should be: start fails naming it, rather
    // than a shard retrying it every second with /ready answering 200.
    let t = tempfile::tempdir().unwrap();
    let data = t.path().join("data");
    let bad = data.join("up").join("0").join("00000000000000000000.wal");
    std::fs::create_dir_all(&bad).unwrap();
    let cfg = write_config(t.path(), &disk_tcp(&data, src, sink, ""));
    let (code, err) = run_config(&cfg);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains(&bad.display().to_string()), "{err}");
}

#[test]
fn issue18_6_the_metrics_endpoint_bounds_connections_and_requests() {
    let (src, sink) = (free_addr(), free_addr());
    let u_ = Updraft::start(&tcp_to_tcp(src, sink, 1, ""));
    let threads_before = u_.proc_status("Threads");
    let idle: Vec<TcpStream> = (0..500)
        .filter_map(|_| TcpStream::connect(u_.metrics).ok())
        .collect();
    assert_eq!(idle.len(), 500);
    std::thread::sleep(Duration::from_millis(500));
    // A scrape still gets in, and no thread was started per connection.
    let t = Instant::now();
    assert!(http_get(u_.metrics, "/metrics").is_some());
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    let threads = u_.proc_status("Threads");
    assert!(
        threads <= threads_before + 2,
        "threads: {threads_before} before, {threads} with 500 connections"
    );
    drop(idle);
    // A 1 MiB header is refused, not read.
    let mut s = TcpStream::connect(u_.metrics).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut req = b"GET /metrics HTTP/1.1\r\nX-Big: ".to_vec();
    req.resize(req.len() + (1 << 20), b'a');
    let _ = s.write_all(&req);
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    let head = String::from_utf8_lossy(&answer[..answer.len().min(64)]).into_owned();
    assert!(head.starts_with("HTTP/1.1 431"), "{head:?}");
    assert!(http_get(u_.metrics, "/health").is_some());
}

#[test]
fn issue18_7_idle_connections_cost_little_memory_and_give_it_back() {
    let src = free_addr();
    let u_ = Updraft::start(&format!(
        "shards = 2\n[sources.app]\ntype = \"tcp\"\naddress = \"{src}\"\nmax_connections = 4096\n[sinks.out]\ntype = \"blackhole\"\ninputs = [\"app\"]\n"
    ));
    std::thread::sleep(Duration::from_millis(300));
    let base_kb = u_.proc_status("VmRSS");
    let mut conns: Vec<TcpStream> = (0..2000)
        .map(|_| TcpStream::connect(src).unwrap())
        .collect();
    for c in &mut conns {
        c.write_all(b"x\n").unwrap();
    }
    u_.wait_metric(
        &source_metric("connections_open", "app"),
        2000.0,
        Duration::from_secs(30),
    );
    u_.wait_metric(
        &source_metric("received_records_total", "app"),
        2000.0,
        Duration::from_secs(30),
    );
    let busy_kb = u_.proc_status("VmRSS");
    drop(conns);
    let deadline = Instant::now() + Duration::from_secs(20);
    while u_.metric(&source_metric("connections_open", "app")) > 0.0 {
        assert!(Instant::now() < deadline, "connections did not close");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Freed memory goes back within a few seconds (the shard collects about
    // once a second after connections end).
    let deadline = Instant::now() + Duration::from_secs(10);
    let after_kb = loop {
        let rss = u_.proc_status("VmRSS");
        if rss < base_kb + 16 * 1024 || Instant::now() > deadline {
            break rss;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    eprintln!("VmRSS: {base_kb} kB idle, {busy_kb} kB with 2000 connections, {after_kb} kB after");
    assert!(
        busy_kb < base_kb + 48 * 1024,
        "2000 idle connections cost {} MiB",
        (busy_kb - base_kb) / 1024
    );
    assert!(
        after_kb < base_kb + 16 * 1024,
        "{} MiB kept after the connections closed",
        after_kb.saturating_sub(base_kb) / 1024
    );
}

#[test]
fn issue18_8_a_connection_flood_is_logged_a_few_times_not_per_connection() {
    let (src, sink) = (free_addr(), free_addr());
    let u_ = Updraft::start(&tcp_to_tcp(src, sink, 1, "max_connections = 4"));
    // Four busy senders hold every slot (none idle, so none is made room of).
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let holders: Vec<_> = (0..4)
        .map(|_| {
            let stop = stop.clone();
            let mut s = TcpStream::connect(src).unwrap();
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let _ = s.write_all(b"busy\n");
                    std::thread::sleep(Duration::from_millis(50));
                }
            })
        })
        .collect();
    u_.wait_metric(
        &source_metric("connections_open", "app"),
        4.0,
        Duration::from_secs(10),
    );
    for _ in 0..2000 {
        if let Ok(s) = TcpStream::connect(src) {
            drop(s);
        }
    }
    u_.wait_metric(
        &source_metric("connections_rejected_total", "app"),
        1900.0,
        Duration::from_secs(20),
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for h in holders {
        h.join().unwrap();
    }
    let lines = u_
        .log_text()
        .lines()
        .filter(|l| l.contains("max_connections"))
        .count();
    assert!(
        lines <= 3,
        "{lines} log lines for one flood:\n{}",
        u_.log_text()
    );
}

#[test]
fn issue18_9_what_a_connection_leaves_at_its_end_is_counted() {
    let (nl, oc, lp) = (free_addr(), free_addr(), free_addr());
    let u_ = Updraft::start(&format!(
        r#"
shards = 1
[sources.nl]
type = "tcp"
address = "{nl}"
[sources.oc]
type = "tcp"
address = "{oc}"
framing = "octet_counting"
[sources.lp]
type = "tcp"
address = "{lp}"
framing = "length_prefixed"
[sinks.out]
type = "blackhole"
inputs = ["nl", "oc", "lp"]
"#
    ));
    let mut lp_bytes = vec![0, 0, 0, 3];
    lp_bytes.extend_from_slice(b"abc");
    lp_bytes.extend_from_slice(&[0, 0, 0, 9]);
    lp_bytes.extend_from_slice(b"ab");
    for (addr, bytes) in [
        (nl, b"good\n\xff\xfe\xfd".to_vec()),
        (oc, b"5 hello10 abc".to_vec()),
        (lp, lp_bytes),
    ] {
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(&bytes).unwrap();
    }
    for src in ["nl", "oc", "lp"] {
        u_.wait_metric(
            &source_metric("received_records_total", src),
            1.0,
            Duration::from_secs(10),
        );
    }
    u_.wait_metric(&dropped("nl", "invalid_utf8"), 1.0, Duration::from_secs(10));
    u_.wait_metric(&dropped("oc", "truncated"), 1.0, Duration::from_secs(10));
    u_.wait_metric(&dropped("lp", "truncated"), 1.0, Duration::from_secs(10));
}

#[test]
fn issue18_11_a_memory_buffer_holds_its_max_bytes_while_the_sink_is_down() {
    let (src, sink) = (free_addr(), free_addr());
    // 8 MiB per shard; the sensor stream (5 MB) fits while the sink is down.
    let u_ = Updraft::start(&format!(
        r#"
shards = 2
[sources.sensors]
type = "udp"
address = "{src}"
[sinks.up]
type = "tcp"
inputs = ["sensors"]
address = "{sink}"
[sinks.up.buffer]
max_bytes = 16777216
[sinks.up.retry]
initial_backoff_ms = 20
max_backoff_ms = 200
"#
    ));
    send(
        src,
        &[
            "--proto",
            "udp",
            "--connections",
            "1",
            "--count",
            "20000",
            "--size",
            "256",
            "--rate",
            "10000",
        ],
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        u_.metric(&dropped("sensors", "sink_full")),
        0.0,
        "the buffer dropped datagrams far below its max_bytes"
    );
    let rx = Receiver::start(sink, 20_000, 30, &[]);
    let (r, ok) = rx.finish();
    assert!(ok, "{r}");
    assert_eq!(u(&r, "unique"), 20_000, "{r}");
}

#[test]
fn issue18_14_shutdown_never_tears_a_stream_write() {
    let src = free_addr();
    // An upstream that accepts but does not read yet: the write blocks.
    let upstream = TcpListener::bind("127.0.0.1:0").unwrap();
    let sink = upstream.local_addr().unwrap();
    let cfg = tcp_to_tcp(src, sink, 1, "")
        .replace("shards = 1", "shards = 1\nshutdown_timeout_ms = 4000")
        + "[sinks.up.buffer]\ntype = \"disk\"\n";
    let mut u_ = Updraft::start(&cfg);
    send(
        src,
        &["--connections", "1", "--count", "200000", "--size", "256"],
    );
    u_.wait_metric(
        r#"updraft_sink_durable_records_total{sink="up",type="tcp"}"#,
        200_000.0,
        Duration::from_secs(30),
    );
    let (mut conn, _) = upstream.accept().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    // Stop while a write is blocked, then read slowly (about 6 MB/s), so
    // that at the give-up time (half of shutdown_timeout_ms) a write is
    // under way: it must be finished, not cut off.
    u_.signal(libc::SIGTERM);
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut got = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    let reading = Instant::now();
    while let Ok(n) = conn.read(&mut chunk) {
        if n == 0 || reading.elapsed() > Duration::from_secs(20) {
            break;
        }
        got.extend_from_slice(&chunk[..n]);
        std::thread::sleep(Duration::from_millis(10));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = u_.exited() {
            break s;
        }
        assert!(Instant::now() < deadline, "no exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(!got.is_empty());
    assert_eq!(got.last(), Some(&b'\n'), "the last write was cut off");
    let torn = got
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty() && l.len() != 255)
        .count();
    assert_eq!(torn, 0, "every line arrives whole");
    assert!(status.success(), "{status}\n{}", u_.log_text());
}
