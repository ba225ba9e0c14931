//! The file source (issue 17): lines tailed through rotations, once.

use crate::harness::*;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const READ: &str = r#"updraft_source_received_records_total{source="logs"}"#;

fn file_config(dir: &Path, sink: SocketAddr, buffer: &str) -> String {
    format!(
        r#"
shards = 2
[sources.logs]
type = "file"
include = ["{}/*.log"]
[sinks.up]
type = "tcp"
inputs = ["logs"]
address = "{sink}"
[sinks.up.buffer]
{buffer}
"#,
        dir.display()
    )
}

/// Appends loadgen-shaped lines (`stream=K seq=N ts=T`, padded to about
/// 120 bytes) to one of three files, rotating them as logrotate does.
struct Writer {
    dir: PathBuf,
    files: Vec<std::io::BufWriter<std::fs::File>>,
    seq: [u64; 3],
    rotations: u64,
}

impl Writer {
    fn new(dir: &Path) -> Writer {
        let files = (0..3).map(|k| open(dir, k)).collect();
        Writer {
            dir: dir.to_owned(),
            files,
            seq: [0; 3],
            rotations: 0,
        }
    }

    fn path(dir: &Path, k: usize) -> PathBuf {
        dir.join(format!("app{k}.log"))
    }

    fn line(&mut self, k: usize) {
        let ts = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        writeln!(
            self.files[k],
            "stream={k} seq={} ts={ts} {:x<64}",
            self.seq[k], ""
        )
        .unwrap();
        self.seq[k] += 1;
    }

    /// logrotate's default: rename the file away, write to a new one.
    fn rotate_by_rename(&mut self, k: usize) {
        self.files[k].flush().unwrap();
        self.rotations += 1;
        std::fs::rename(
            Writer::path(&self.dir, k),
            self.dir.join(format!("app{k}.log.{}", self.rotations)),
        )
        .unwrap();
        self.files[k] = open(&self.dir, k);
    }

    /// `copytruncate`: copy the file away, then cut it to nothing and go on
    /// writing to it.
    fn copytruncate(&mut self, k: usize) {
        self.files[k].flush().unwrap();
        let p = Writer::path(&self.dir, k);
        std::fs::copy(&p, self.dir.join(format!("app{k}.log.copied"))).unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .unwrap()
            .set_len(0)
            .unwrap();
    }

    fn flush(&mut self) {
        for f in &mut self.files {
            f.flush().unwrap();
        }
    }

    fn written(&self) -> u64 {
        self.seq.iter().sum()
    }
}

fn open(dir: &Path, k: usize) -> std::io::BufWriter<std::fs::File> {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(Writer::path(dir, k))
        .unwrap();
    std::io::BufWriter::with_capacity(64 * 1024, f)
}

/// Waits until the collector has read `n` lines.
fn wait_read(u_: &Updraft, n: u64) {
    u_.wait_metric(READ, n as f64, Duration::from_secs(60));
}

#[test]
fn a_million_lines_through_renames_and_a_copytruncate_arrive_exactly_once() {
    let (sink, logs) = (free_addr(), tempfile::tempdir().unwrap());
    let total = 1_000_000u64;
    let rx = Receiver::start(sink, total, 120, &["--linger-ms", "1000"]);
    let mut w = Writer::new(logs.path());
    let u_ = Updraft::start(&file_config(logs.path(), sink, "type = \"memory\""));
    let started = Instant::now();
    let mut n = 0u64;
    while n < total {
        w.line((n % 3) as usize);
        n += 1;
        if n.is_multiple_of(100_000) && n < total {
            let k = ((n / 100_000) % 3) as usize;
            if n == 500_000 {
                // What copytruncate cuts before it was read is gone (the
                // copy is not matched): let the tailer catch up first.
                w.flush();
                wait_read(&u_, n);
                w.copytruncate(k);
            } else {
                w.rotate_by_rename(k);
            }
        }
        if n.is_multiple_of(20_000) {
            w.flush();
        }
    }
    w.flush();
    assert_eq!(w.written(), total);
    let (r, ok) = rx.finish();
    eprintln!(
        "{total} lines in {:.1} s, {} rotations by rename",
        started.elapsed().as_secs_f64(),
        w.rotations
    );
    assert!(ok, "{r}\n{}", u_.log_text());
    assert_eq!(u(&r, "unique"), total, "{r}");
    assert_eq!(u(&r, "duplicates"), 0, "{r}");
    assert_eq!(u_.metric(READ), total as f64);
    assert!(
        u_.log_text().contains("truncated"),
        "the copytruncate was noticed:\n{}",
        u_.log_text()
    );
}

#[test]
fn kill_9_three_times_with_a_disk_buffer_repeats_little_and_loses_nothing() {
    let (sink, logs) = (free_addr(), tempfile::tempdir().unwrap());
    let total = 600_000u64;
    let rx = Receiver::start(sink, total, 120, &["--linger-ms", "2000"]);
    let mut w = Writer::new(logs.path());
    let mut u_ = Updraft::start(&file_config(
        logs.path(),
        sink,
        "type = \"disk\"\nmax_bytes = 268435456",
    ));
    let mut n = 0u64;
    let mut kills = 0;
    // About 100,000 lines/s, a kill every 1.5 s, each just after a rename
    // (the renamed file is found again by its inode after the restart).
    while n < total {
        w.line((n % 3) as usize);
        n += 1;
        if n.is_multiple_of(10_000) {
            w.flush();
            std::thread::sleep(Duration::from_millis(100));
        }
        if n.is_multiple_of(150_000) && n < total {
            w.rotate_by_rename(((n / 150_000) % 3) as usize);
            w.flush();
            u_.kill9();
            kills += 1;
            u_.restart();
        }
    }
    w.flush();
    assert_eq!(kills, 3);
    let (r, ok) = rx.finish();
    assert!(ok, "{r}\n{}", u_.log_text());
    assert_eq!(u(&r, "unique"), total, "{r}");
    let dups = u(&r, "duplicates");
    eprintln!("duplicates after 3 kills: {dups}");
    // At most what was read since the last checkpoint (written once a
    // second) per kill, at 100,000 lines/s, with room for a slow restart.
    assert!(dups <= 3 * 150_000, "{r}");
}

#[test]
fn an_idle_file_source_uses_no_cpu() {
    let (sink, logs) = (free_addr(), tempfile::tempdir().unwrap());
    let rx = Receiver::start(sink, 10, 30, &[]);
    let mut w = Writer::new(logs.path());
    for _ in 0..10 {
        w.line(0);
    }
    w.flush();
    // And a tail longer than max_record_bytes with no newline yet (a
    // writer that died mid-line): skipped, and not looked at again and again.
    std::fs::OpenOptions::new()
        .append(true)
        .open(Writer::path(logs.path(), 1))
        .unwrap()
        .write_all(&[b'z'; 200_000])
        .unwrap();
    let config = file_config(logs.path(), sink, "type = \"memory\"")
        .replace("include = [", "max_record_bytes = 65536\ninclude = [");
    let u_ = Updraft::start(&config);
    let (r, ok) = rx.finish();
    assert!(ok, "{r}");
    let cpu = |pid: u32| -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let f: Vec<&str> = stat
            .rsplit(')')
            .next()
            .unwrap()
            .split_whitespace()
            .collect();
        // utime and stime, fields 14 and 15 (counted from the state field).
        (f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap()) / 100.0
    };
    let before = cpu(u_.pid());
    std::thread::sleep(Duration::from_secs(10));
    let used = cpu(u_.pid()) - before;
    eprintln!("CPU over 10 s idle: {used:.2} s");
    assert!(used < 0.1, "{used} s of CPU in 10 s idle");
}

/// The peak resident memory of a process, in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    kb * 1024
}

#[test]
fn a_100_mb_line_a_binary_file_and_a_deleted_file_are_counted_and_the_rest_flows() {
    let (sink, logs) = (free_addr(), tempfile::tempdir().unwrap());
    let n = 50_000u64;
    let rx = Receiver::start(sink, 2 * n, 60, &["--linger-ms", "500"]);
    let config = file_config(logs.path(), sink, "type = \"memory\"").replace(
        "include = [",
        "utf8 = \"drop\"\nmax_record_bytes = 65536\ninclude = [",
    );
    let u_ = Updraft::start(&config);
    let mut w = Writer::new(logs.path());
    // app0.log: lines, a line of 100 MB, lines.
    for _ in 0..n / 2 {
        w.line(0);
    }
    w.flush();
    {
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(Writer::path(logs.path(), 0))
            .unwrap();
        let chunk = vec![b'y'; 1 << 20];
        for _ in 0..100 {
            f.write_all(&chunk).unwrap();
        }
        f.write_all(b"\n").unwrap();
    }
    for _ in 0..n / 2 {
        w.line(0);
    }
    // app1.log: lines, then more, and deleted at once.
    for _ in 0..n / 2 {
        w.line(1);
    }
    w.flush();
    wait_read(&u_, n);
    for _ in 0..n / 2 {
        w.line(1);
    }
    w.flush();
    std::fs::remove_file(Writer::path(logs.path(), 1)).unwrap();
    // binary.log: bytes that are not text, with newlines among them.
    let mut noise = Vec::with_capacity(1 << 20);
    let mut x: u32 = 12345;
    for _ in 0..(1 << 20) {
        x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        noise.push((x >> 16) as u8);
    }
    std::fs::write(logs.path().join("binary.log"), &noise).unwrap();
    let (r, ok) = rx.finish();
    assert!(ok, "{r}\n{}", u_.log_text());
    assert_eq!(u(&r, "unique"), 2 * n, "{r}");
    assert_eq!(u(&r, "duplicates"), 0, "{r}");
    let dropped = |reason: &str| {
        u_.metric(&format!(
            r#"updraft_source_dropped_records_total{{source="logs",reason="{reason}"}}"#
        ))
    };
    assert_eq!(dropped("oversize"), 1.0, "the 100 MB line");
    assert!(dropped("invalid_utf8") > 100.0, "the binary file's lines");
    let peak = peak_rss(u_.pid());
    eprintln!("peak RSS {} MiB", peak >> 20);
    assert!(peak < 80 << 20, "peak RSS {peak}: the long line was held");
}

#[test]
fn read_from_end_skips_what_was_there_only_at_the_very_first_start() {
    let (sink, logs) = (free_addr(), tempfile::tempdir().unwrap());
    let line = |stream: u32, seq: u32| format!("stream={stream} seq={seq} ts=0 {:x<64}\n", "");
    let append = |name: &str, text: String| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(logs.path().join(name))
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap()
    };
    // Old lines (stream 9), there before the first start: not read.
    append("app0.log", (0..1000).map(|i| line(9, i)).collect());
    let rx = Receiver::start(sink, 2000, 60, &["--linger-ms", "1000"]);
    let config = file_config(logs.path(), sink, "type = \"disk\"")
        .replace("include = [", "read_from = \"end\"\ninclude = [");
    let mut u_ = Updraft::start(&config);
    u_.wait_metric(
        r#"updraft_source_connections_open{source="logs"}"#,
        1.0,
        Duration::from_secs(10),
    );
    append("app0.log", (0..1000).map(|i| line(0, i)).collect());
    wait_read(&u_, 1000);
    // A checkpoint is on disk within a second.
    std::thread::sleep(Duration::from_millis(1500));
    u_.kill9();
    // A file created while updraft was down is new: read whole.
    append("app1.log", (0..1000).map(|i| line(1, i)).collect());
    u_.restart();
    let (r, ok) = rx.finish();
    assert!(ok, "{r}\n{}", u_.log_text());
    assert_eq!(u(&r, "unique"), 2000, "{r}");
    assert_eq!(u(&r, "duplicates"), 0, "{r}");
    assert!(
        r["per_stream"].get("9").is_none(),
        "old lines were read: {r}"
    );
}

/// A file cut to a size short of where it was read to (not to nothing)
/// is read again from its start: its first lines come twice, counted as
/// a restart, and what is written after flows.
#[test]
fn a_file_that_shrinks_is_read_again_from_its_start_and_counted() {
    let (sink, logs) = (free_addr(), tempfile::tempdir().unwrap());
    let rx = Receiver::start(sink, 1_500, 60, &["--linger-ms", "1000"]);
    let u_ = Updraft::start(&file_config(logs.path(), sink, "type = \"memory\""));
    let mut w = Writer::new(logs.path());
    for _ in 0..1_000 {
        w.line(0);
    }
    w.flush();
    wait_read(&u_, 1_000);
    // Keep the first 100 lines (each ends in a newline).
    let path = Writer::path(logs.path(), 0);
    let text = std::fs::read(&path).unwrap();
    let cut = text
        .iter()
        .enumerate()
        .filter(|(_, &b)| b == b'\n')
        .nth(99)
        .map(|(i, _)| i + 1)
        .unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(cut as u64)
        .unwrap();
    for _ in 0..500 {
        w.line(0);
    }
    w.flush();
    let (r, ok) = rx.finish();
    assert!(ok, "{r}\n{}", u_.log_text());
    assert_eq!(u(&r, "unique"), 1_500, "{r}");
    assert_eq!(u(&r, "duplicates"), 100, "the kept lines, read again: {r}");
    assert_eq!(
        u_.metric(r#"updraft_source_files_restarted_total{source="logs"}"#),
        1.0,
        "{}",
        u_.log_text()
    );
    assert!(u_.log_text().contains("truncated"), "{}", u_.log_text());
}
