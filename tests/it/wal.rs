//! The disk buffer: what is durable survives `kill -9`, full buffers and
//! full disks are survived, damage costs only the damaged batches.

use crate::harness::*;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

const DURABLE: &str = r#"updraft_sink_durable_records_total{sink="up",type="tcp"}"#;
const DROPPED: &str = r#"updraft_sink_buffer_dropped_records_total{sink="up",type="tcp"}"#;

fn disk_config(
    src: SocketAddr,
    sink: SocketAddr,
    shards: usize,
    buffer: &str,
    batch: &str,
) -> String {
    format!(
        r#"
shards = {shards}
[sources.app]
type = "tcp"
address = "{src}"
[sinks.up]
type = "tcp"
inputs = ["app"]
address = "{sink}"
[sinks.up.retry]
initial_backoff_ms = 20
max_backoff_ms = 200
[sinks.up.batch]
{batch}
[sinks.up.buffer]
type = "disk"
{buffer}
"#
    )
}

#[test]
fn durable_records_survive_kill_9_and_arrive_once_after_restart() {
    let (src, sink) = (free_addr(), free_addr());
    // 1M records of 128 B take about 153 MB of frames; the kernel spreads
    // the 4 connections over the shards at random (SO_REUSEPORT), so one
    // shard may get all of them: its half of the cap must hold everything.
    let mut u_ = Updraft::start(&disk_config(src, sink, 2, "max_bytes = 536870912", ""));
    // The sink is down: everything waits in the disk buffer.
    send(
        src,
        &["--connections", "4", "--count", "1000000", "--size", "128"],
    );
    u_.wait_metric(DURABLE, 1_000_000.0, Duration::from_secs(30));
    u_.kill9();
    let rx = Receiver::start(sink, 1_000_000, 60, &["--linger-ms", "1000"]);
    u_.restart();
    let (r, ok) = rx.finish();
    assert!(ok, "{r}\n{}", u_.log_text());
    assert_eq!(u(&r, "unique"), 1_000_000, "{r}");
    assert_eq!(u(&r, "duplicates"), 0, "{r}");
    assert_eq!(u(&r, "lost"), 0, "{r}");
}

/// Checks the sink is still behind with `total` records durable, kills the
/// collector with `kill -9`, restarts it and waits for the receiver: no
/// record may be lost. Returns the receiver's summary.
fn kill_9_while_behind(u_: &mut Updraft, rx: Receiver, total: f64) -> serde_json::Value {
    let sent_before = u_.metric(r#"updraft_sink_sent_records_total{sink="up",type="tcp"}"#);
    assert!(
        sent_before < total,
        "the sink should still be behind ({sent_before})"
    );
    u_.kill9();
    u_.restart();
    let (r, ok) = rx.finish();
    assert!(ok, "{r}\n{}", u_.log_text());
    assert_eq!(u(&r, "lost"), 0, "{r}");
    r
}

#[test]
fn kill_9_while_forwarding_to_a_slow_sink_loses_nothing() {
    let (src, sink) = (free_addr(), free_addr());
    let batch = "max_records = 1000";
    let mut u_ = Updraft::start(&disk_config(src, sink, 2, "sync_interval_ms = 20", batch));
    // 38 MB at 5 MB/s per connection (one per shard): seconds of forwarding
    // to interrupt.
    let rx = Receiver::start(
        sink,
        300_000,
        90,
        &["--read-bytes-per-sec", "5000000", "--linger-ms", "1000"],
    );
    send(
        src,
        &["--connections", "4", "--count", "300000", "--size", "128"],
    );
    u_.wait_metric(DURABLE, 300_000.0, Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(300));
    let r = kill_9_while_behind(&mut u_, rx, 300_000.0);
    // Duplicates are the batches in flight when the collector died: sent (or
    // partly sent) but not yet covered by a persisted checkpoint, which moves
    // every 20 ms here. Batches hold at most 1000 records; allow 8 per shard.
    let dups = u(&r, "duplicates");
    eprintln!("duplicates after kill -9: {dups}");
    assert!(dups <= 2 * 8 * 1000, "{dups} duplicates: {r}");
}

#[test]
fn kill_9_with_recycled_segments_replays_only_their_new_frames() {
    let (src, sink) = (free_addr(), free_addr());
    // 4 MiB segments of 64 KiB batches (about 25,000 records each). The
    // sender (12.8 MB/s) outpaces the sink (10 MB/s) a little, so segments
    // are retired and their files reused while a backlog builds.
    let cfg = disk_config(
        src,
        sink,
        1,
        "max_bytes = 16777216\nsync_interval_ms = 20",
        SMALL_BATCH,
    );
    let mut u_ = Updraft::start(&cfg);
    let rx = Receiver::start(
        sink,
        300_000,
        90,
        &["--read-bytes-per-sec", "10000000", "--linger-ms", "1000"],
    );
    send(
        src,
        &[
            "--connections",
            "1",
            "--count",
            "300000",
            "--size",
            "128",
            "--rate",
            "100000",
        ],
    );
    u_.wait_metric(DURABLE, 300_000.0, Duration::from_secs(30));
    let recycled = u_.metric(r#"updraft_sink_wal_recycled_segments_total{sink="up",type="tcp"}"#);
    assert!(recycled >= 2.0, "segment files were reused ({recycled})");
    // The head is a reused file: its old frames lie past the new ones.
    let r = kill_9_while_behind(&mut u_, rx, 300_000.0);
    // Duplicates are what was acknowledged but not yet under a persisted
    // checkpoint (usually a few hundred records here; a slow checkpoint
    // sync under load can make it a few thousand). Replaying old frames of
    // reused files would repeat whole earlier segments on top. The exact
    // replay of a reused file is unit-tested in src/wal/recovery.rs.
    let dups = u(&r, "duplicates");
    eprintln!("duplicates after kill -9 with recycled segments: {dups}");
    assert!(dups <= 20_000, "{dups} duplicates: {r}");
    assert_eq!(
        u_.metric(r#"updraft_sink_wal_damaged_frames_total{sink="up",type="tcp"}"#),
        0.0,
        "old frames are not damage"
    );
    assert_eq!(
        u_.metric(r#"updraft_sink_wal_damaged_segments_total{sink="up",type="tcp"}"#),
        0.0,
        "a reused file's old bytes are the end of its data, not lost framing"
    );
}

/// The smallest disk buffer two shards accept with 64 KiB batches.
const SMALL: &str = "max_bytes = 2200000";
const SMALL_BATCH: &str = "max_bytes = 65536\nmax_records = 500";

#[test]
fn a_full_disk_buffer_blocks_senders_and_loses_nothing() {
    let (src, sink) = (free_addr(), free_addr());
    let u_ = Updraft::start(&disk_config(src, sink, 2, SMALL, SMALL_BATCH));
    let mut sender = spawn_send(
        src,
        &["--connections", "2", "--count", "200000", "--size", "128"],
    );
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        sender.try_wait().unwrap().is_none(),
        "25 MB cannot fit a 2 MB buffer: the sender must be held back"
    );
    let bytes = u_.metric(r#"updraft_sink_wal_bytes{sink="up",type="tcp"}"#);
    assert!(bytes <= 2_200_000.0, "the buffer holds {bytes} bytes");
    let rx = Receiver::start(sink, 200_000, 60, &[]);
    assert!(sender.wait().unwrap().success());
    let (r, ok) = rx.finish();
    assert!(ok, "{r}\n{}", u_.log_text());
    assert_eq!(u(&r, "lost"), 0, "{r}");
    assert_eq!(u(&r, "duplicates"), 0, "{r}");
    assert_eq!(u_.metric(DROPPED), 0.0);
}

#[test]
fn drop_newest_accounts_for_every_record() {
    let (src, sink) = (free_addr(), free_addr());
    let cfg = disk_config(
        src,
        sink,
        2,
        &format!("{SMALL}\nwhen_full = \"drop_newest\""),
        SMALL_BATCH,
    );
    let u_ = Updraft::start(&cfg);
    let n = 200_000u64;
    send(
        src,
        &[
            "--connections",
            "2",
            "--count",
            &n.to_string(),
            "--size",
            "128",
        ],
    );
    u_.wait_metric(
        r#"updraft_source_received_records_total{source="app"}"#,
        n as f64,
        Duration::from_secs(20),
    );
    // Everything was either written or dropped once the writers are idle.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while u_.metric(DURABLE) + u_.metric(DROPPED) < n as f64 {
        assert!(
            std::time::Instant::now() < deadline,
            "records unaccounted for"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let dropped = u_.metric(DROPPED) as u64;
    assert!(dropped > 0, "a 2 MB buffer cannot take 25 MB");
    let kept = n - dropped;
    let rx = Receiver::start(sink, kept, 30, &["--linger-ms", "1000"]);
    let (r, ok) = rx.finish();
    assert!(ok, "{r}\n{}", u_.log_text());
    assert_eq!(
        u(&r, "unique") + dropped,
        n,
        "sent = delivered + dropped: {r}"
    );
    assert_eq!(u(&r, "duplicates"), 0, "{r}");
}

/// Unmounts a tmpfs when the test ends.
struct Mount(std::path::PathBuf);
impl Drop for Mount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_full_disk_is_survived_and_writing_resumes_when_space_returns() {
    let mnt = tempfile::tempdir().unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=3m", "tmpfs"])
        .arg(mnt.path())
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!("skipped: mounting a tmpfs needs root");
        return;
    }
    let _unmount = Mount(mnt.path().to_owned());
    let (src, sink) = (free_addr(), free_addr());
    // The buffer may hold 64 MB, the disk only 3 MB.
    let cfg = disk_config(src, sink, 2, "max_bytes = 67108864", SMALL_BATCH).replace(
        "shards = 2",
        &format!(
            "shards = 2\ndata_dir = \"{}\"",
            mnt.path().join("data").display()
        ),
    );
    let u_ = Updraft::start_raw(&cfg);
    let mut sender = spawn_send(
        src,
        &["--connections", "2", "--count", "200000", "--size", "128"],
    );
    u_.wait_metric(
        r#"updraft_sink_wal_write_errors_total{sink="up",type="tcp"}"#,
        1.0,
        Duration::from_secs(20),
    );
    assert!(
        sender.try_wait().unwrap().is_none(),
        "the sender must be held back while the disk is full"
    );
    assert!(
        u_.log_text().contains("cannot write the disk buffer"),
        "{}",
        u_.log_text()
    );
    let rx = Receiver::start(sink, 200_000, 60, &[]);
    assert!(sender.wait().unwrap().success());
    let (r, ok) = rx.finish();
    assert!(ok, "{r}\n{}", u_.log_text());
    assert_eq!(u(&r, "lost"), 0, "{r}");
}

/// Offsets of the frames of a segment file, per the format in src/wal/format.rs:
/// a 4096-byte header block, then frames of a 64-byte header and an archive,
/// each padded to a multiple of 4096.
fn frames(seg: &[u8]) -> Vec<(usize, usize)> {
    const BLOCK: usize = 4096;
    const HEADER: usize = 64;
    let mut at = BLOCK;
    let mut out = Vec::new();
    while at + HEADER <= seg.len() {
        let len = u32::from_le_bytes(seg[at..at + 4].try_into().unwrap()) as usize;
        if len == 0 {
            break;
        }
        out.push((at, len));
        at += (HEADER + len).div_ceil(BLOCK) * BLOCK;
    }
    out
}

/// One shard's disk buffer holding `records` durable records in batches of
/// 1000, killed with -9: the collector (stopped), its sink's address and the
/// path of its one segment.
fn durable_then_killed(records: u64) -> (Updraft, SocketAddr, std::path::PathBuf) {
    let (src, sink) = (free_addr(), free_addr());
    let mut u_ = Updraft::start(&disk_config(
        src,
        sink,
        1,
        "",
        "max_records = 1000\nlinger_ms = 1000",
    ));
    send(
        src,
        &[
            "--connections",
            "1",
            "--count",
            &records.to_string(),
            "--size",
            "128",
        ],
    );
    u_.wait_metric(DURABLE, records as f64, Duration::from_secs(30));
    u_.kill9();
    let seg_path = u_
        .data_dir()
        .join("up")
        .join("0")
        .join("00000000000000000000.wal");
    (u_, sink, seg_path)
}

#[test]
fn a_flipped_byte_and_a_torn_tail_cost_only_their_batches() {
    let (mut u_, sink, seg_path) = durable_then_killed(100_000);
    let mut seg = std::fs::read(&seg_path).unwrap();
    let fr = frames(&seg);
    assert_eq!(fr.len(), 100, "100 batches of 1000 records");
    // Flip a byte inside the 50th batch's archive; tear the last frame.
    let (at, _) = fr[49];
    seg[at + 64 + 200] ^= 0x40;
    let (last, _) = fr[99];
    seg.truncate(last + 100);
    std::fs::write(&seg_path, &seg).unwrap();

    let rx = Receiver::start(sink, 98_000, 30, &["--linger-ms", "1000"]);
    u_.restart();
    let (r, ok) = rx.finish();
    assert!(ok, "{r}\n{}", u_.log_text());
    assert_eq!(
        u(&r, "unique"),
        98_000,
        "everything but the two damaged batches: {r}"
    );
    assert_eq!(u(&r, "duplicates"), 0, "{r}");
    assert_eq!(
        u_.metric(r#"updraft_sink_wal_damaged_frames_total{sink="up",type="tcp"}"#),
        1.0
    );
    let log = u_.log_text();
    assert!(log.contains("torn tail"), "{log}");
    assert!(log.contains("failed their checksum"), "{log}");
}

#[test]
fn issue18_12_a_torn_tail_truncated_at_start_is_counted() {
    let (mut u_, sink, seg_path) = durable_then_killed(10_000);
    let mut seg = std::fs::read(&seg_path).unwrap();
    let fr = frames(&seg);
    assert_eq!(fr.len(), 10);
    let (last, _) = fr[9];
    seg.truncate(last + 100);
    std::fs::write(&seg_path, &seg).unwrap();

    let rx = Receiver::start(sink, 9_000, 30, &["--linger-ms", "500"]);
    u_.restart();
    let (r, ok) = rx.finish();
    assert!(ok, "{r}\n{}", u_.log_text());
    assert_eq!(u(&r, "unique"), 9_000, "{r}");
    assert_eq!(
        u_.metric(r#"updraft_sink_wal_torn_tails_total{sink="up",type="tcp"}"#),
        1.0,
        "monitoring sees the truncation, not only a WARN line"
    );
    assert!(u_.metric(r#"updraft_sink_wal_torn_bytes_total{sink="up",type="tcp"}"#) >= 100.0);
}

#[test]
fn issue18_13_retries_on_a_full_disk_reuse_one_segment_file() {
    let mnt = tempfile::tempdir().unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=3m", "tmpfs"])
        .arg(mnt.path())
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!("SKIPPED issue18_13: mounting a tmpfs needs root (CI runs as root)");
        return;
    }
    let _unmount = Mount(mnt.path().to_owned());
    let (src, sink) = (free_addr(), free_addr());
    let data = mnt.path().join("data");
    let cfg = disk_config(src, sink, 2, "max_bytes = 67108864", SMALL_BATCH).replace(
        "shards = 2",
        &format!("shards = 2\ndata_dir = \"{}\"", data.display()),
    );
    let u_ = Updraft::start_raw(&cfg);
    let mut sender = spawn_send(
        src,
        &["--connections", "2", "--count", "200000", "--size", "128"],
    );
    u_.wait_metric(
        r#"updraft_sink_wal_write_errors_total{sink="up",type="tcp"}"#,
        1.0,
        Duration::from_secs(20),
    );
    // Many retries later (backoff 20-200 ms), still at most the segment
    // that filled the disk and the one being retried, per shard.
    std::thread::sleep(Duration::from_secs(3));
    for shard in ["0", "1"] {
        let segments = std::fs::read_dir(data.join("up").join(shard))
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .ends_with(".wal")
            })
            .count();
        assert!(segments <= 2, "shard {shard}: {segments} segment files");
    }
    let rx = Receiver::start(sink, 200_000, 60, &[]);
    assert!(sender.wait().unwrap().success());
    let (r, ok) = rx.finish();
    assert!(ok, "{r}\n{}", u_.log_text());
    assert_eq!(u(&r, "lost"), 0, "{r}");
}

const WRITTEN: &str = r#"updraft_sink_wal_written_bytes_total{sink="up",type="tcp"}"#;
const SENT_BYTES: &str = r#"updraft_sink_sent_bytes_total{sink="up",type="tcp"}"#;
const SPILLS: &str = r#"updraft_sink_wal_spills_total{sink="up",type="tcp"}"#;

/// Issue 14: `write_when = "behind"` with a sink that keeps up sends from
/// memory: the disk is written less than once per hundred bytes delivered.
#[test]
fn write_when_behind_with_a_healthy_sink_leaves_the_disk_alone() {
    let (src, sink) = (free_addr(), free_addr());
    let rx = Receiver::start(sink, 1_000_000, 60, &[]);
    let u_ = Updraft::start(&disk_config(
        src,
        sink,
        2,
        // 4 MiB of memory per shard is about 330 ms of this stream. With
        // 20 ms and 40 ms of it (1 and 2 MiB per shard at 200,000/s),
        // fresh-clone CI runs saw the sender stall past it and spill (72
        // and 66 times; never here). What a stall costs since is tested by
        // write_when_behind_comes_back_to_memory_after_the_sink_stalls_once.
        "write_when = \"behind\"\nmax_bytes = 16777216\nmemory_bytes = 8388608",
        "max_bytes = 131072",
    ));
    // What a healthy uplink carries: 100,000 lines/s, not a flood.
    send(
        src,
        &[
            "--connections",
            "4",
            "--count",
            "1000000",
            "--size",
            "256",
            "--rate",
            "100000",
        ],
    );
    let (r, ok) = rx.finish();
    assert!(ok, "{r}\n{}", u_.log_text());
    assert_eq!(u(&r, "unique"), 1_000_000, "{r}");
    assert_eq!(u(&r, "duplicates"), 0, "{r}");
    let (written, sent) = (u_.metric(WRITTEN), u_.metric(SENT_BYTES));
    eprintln!(
        "disk bytes written {written}, bytes delivered {sent}, ratio {:.5}, spills {}",
        written / sent,
        u_.metric(SPILLS)
    );
    assert!(sent >= 256e6, "{sent}");
    assert!(
        written / sent < 0.01,
        "{written} written for {sent} delivered"
    );
    assert!(
        u_.metric(r#"updraft_sink_wal_memory_batches_total{sink="up",type="tcp"}"#) > 0.0,
        "batches were sent from memory"
    );
}

/// Issue 14: a sink that stalls once (the receiver stops reading for 2 s,
/// what a congested uplink does) makes `write_when = "behind"` spill; once
/// the backlog is delivered the buffer comes back to memory while the
/// stream goes on: over its last 4 s the disk is written less than once
/// per hundred bytes delivered, and every record arrives once. At 50,000
/// records/s: a fresh-clone CI run on epoll at 100,000/s drained the
/// backlog only 3 MB/s faster than the stream came (the machine's two
/// cores shared by sender, receiver and both shards writing and reading
/// the log), so it was still draining it in the last 4 s.
#[test]
fn write_when_behind_comes_back_to_memory_after_the_sink_stalls_once() {
    let (src, sink) = (free_addr(), free_addr());
    let rx = Receiver::start(
        sink,
        750_000,
        60,
        &["--stall-after", "100000", "--stall-s", "2"],
    );
    let u_ = Updraft::start(&disk_config(
        src,
        sink,
        2,
        "write_when = \"behind\"\nmax_bytes = 268435456\nmemory_bytes = 8388608",
        // Small batches (about 3,000 a second per shard): no gap between
        // them in which the log could be wholly delivered, which is what
        // the buffer once waited for before it came back to memory (it
        // stayed spilled for the rest of the stream).
        "max_bytes = 8192",
    ));
    // 15 s of 50,000 lines/s; the stall begins about 2 s in.
    let mut sender = spawn_send(
        src,
        &[
            "--connections",
            "4",
            "--count",
            "750000",
            "--size",
            "256",
            "--rate",
            "50000",
        ],
    );
    assert!(
        u_.wait_metric(SPILLS, 1.0, Duration::from_secs(20)) >= 1.0,
        "the stall made it spill: {}",
        u_.log_text()
    );
    // After the stall the sender, held back meanwhile, catches up with its
    // schedule at full speed (which may spill again: a CI run on epoll
    // still did 5 s after the first spill). The window is the last 4 s of
    // the stream, well after that.
    let mut samples = Vec::new();
    let status = loop {
        samples.push((Instant::now(), u_.metric(WRITTEN), u_.metric(SENT_BYTES)));
        if let Some(status) = sender.try_wait().expect("loadgen send") {
            break status;
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    assert!(status.success());
    let end = samples.last().expect("sampled").0;
    let &(_, written0, sent0) = samples
        .iter()
        .rev()
        .find(|(t, _, _)| end.duration_since(*t) >= Duration::from_secs(4))
        .expect("the stream ran past 4 s after the spill");
    let (r, ok) = rx.finish();
    assert!(ok, "{r}\n{}", u_.log_text());
    assert_eq!(u(&r, "unique"), 750_000, "{r}");
    assert_eq!(u(&r, "duplicates"), 0, "{r}");
    let (written, sent) = (u_.metric(WRITTEN) - written0, u_.metric(SENT_BYTES) - sent0);
    eprintln!(
        "after the stall: disk bytes written {written}, bytes delivered {sent}, spills {}",
        u_.metric(SPILLS)
    );
    // The window holds about 4 s of the stream (51 MB).
    assert!(sent >= 30e6, "{sent} bytes delivered after the stall");
    assert!(
        written / sent < 0.01,
        "{written} written for {sent} delivered after the stall: still spilled"
    );
}

/// Issue 14: a sink that goes away in the middle of a slow stream (2,000
/// records/s): `write_when = "behind"` spills within about a second and
/// stays on the disk while the sink is down, holding nothing in memory
/// that a `kill -9` would lose (a review found it going back to memory
/// right after the spill, before the spilled batches were synced).
#[test]
fn write_when_behind_stays_on_the_disk_while_a_sink_that_went_away_is_down() {
    let (src, sink) = (free_addr(), free_addr());
    // The receiver leaves after 3 s.
    let rx = Receiver::start(sink, 1_000_000, 3, &[]);
    let u_ = Updraft::start(&disk_config(
        src,
        sink,
        2,
        "write_when = \"behind\"\nmax_bytes = 268435456",
        "linger_ms = 20",
    ));
    let mut sender = spawn_send(
        src,
        &[
            "--connections",
            "2",
            "--count",
            "20000",
            "--size",
            "128",
            "--rate",
            "2000",
        ],
    );
    let _ = rx.finish();
    u_.wait_metric(SPILLS, 1.0, Duration::from_secs(10));
    // Records keep coming for about 5 s more.
    for _ in 0..8 {
        std::thread::sleep(Duration::from_millis(500));
        assert_eq!(
            u_.metric(r#"updraft_sink_wal_memory_bytes{sink="up",type="tcp"}"#),
            0.0,
            "batches held in memory while the sink is down\n{}",
            u_.log_text()
        );
    }
    assert!(sender.wait().expect("loadgen send").success());
    assert!(u_.metric(WRITTEN) > 0.0);
}

/// Issue 14: with the sink down, `write_when = "behind"` spills what it
/// holds to the log within about a second, so kill -9 after the spill loses
/// nothing; restarted, everything arrives once.
#[test]
fn write_when_behind_spills_for_a_down_sink_and_kill_9_after_the_spill_loses_nothing() {
    let (src, sink) = (free_addr(), free_addr());
    let mut u_ = Updraft::start(&disk_config(
        src,
        sink,
        2,
        "write_when = \"behind\"\nmax_bytes = 268435456",
        "",
    ));
    // Less than the memory share: only the failing sink makes it spill.
    send(
        src,
        &["--connections", "4", "--count", "40000", "--size", "128"],
    );
    u_.wait_metric(DURABLE, 40_000.0, Duration::from_secs(20));
    assert!(u_.metric(SPILLS) >= 1.0);
    assert_eq!(
        u_.metric(r#"updraft_sink_wal_memory_bytes{sink="up",type="tcp"}"#),
        0.0
    );
    u_.kill9();
    restart_delivers_all_once(&mut u_, sink, 40_000);
}

/// Restarts the stopped collector with a receiver up at `sink`: all `n`
/// records arrive, none twice.
fn restart_delivers_all_once(u_: &mut Updraft, sink: SocketAddr, n: u64) {
    let rx = Receiver::start(sink, n, 60, &["--linger-ms", "1000"]);
    u_.restart();
    let (r, ok) = rx.finish();
    assert!(ok, "{r}\n{}", u_.log_text());
    assert_eq!(u(&r, "unique"), n, "{r}");
    assert_eq!(u(&r, "duplicates"), 0, "{r}");
}

/// Issue 14: on SIGTERM, what `write_when = "behind"` holds in memory for a
/// sink that does not take it is written to the log, and sent after the
/// restart.
#[test]
fn write_when_behind_writes_what_memory_holds_at_sigterm() {
    let (src, sink) = (free_addr(), free_addr());
    let mut u_ = Updraft::start(&disk_config(
        src,
        sink,
        1,
        "write_when = \"behind\"\nmax_bytes = 268435456",
        "",
    ));
    send(
        src,
        &["--connections", "1", "--count", "20000", "--size", "128"],
    );
    // The sender is done once its bytes are in the socket: SIGTERM only
    // once updraft has read them (a CI run signalled 130 ms after start,
    // before the records were in, and memory held nothing to write).
    u_.wait_metric(
        r#"updraft_source_received_records_total{source="app"}"#,
        20_000.0,
        Duration::from_secs(10),
    );
    let (status, _) = u_.terminate();
    assert!(status.success());
    assert!(
        u_.log_text()
            .contains("held in memory to the disk buffer before stopping"),
        "{}",
        u_.log_text()
    );
    restart_delivers_all_once(&mut u_, sink, 20_000);
}

/// Issue 14 (backlog pacing): the sink is down for 20 s under a live
/// stream of 5,000 records/s. When it comes back, read at three times the
/// live rate, live records are interleaved with the backlog
/// (`replay_share`, default 0.5): their p99 latency stays under 3 s while
/// the backlog drains (about 10 s), and every record arrives once.
#[test]
fn after_an_outage_live_records_are_interleaved_with_the_backlog() {
    let (src, sink) = (free_addr(), free_addr());
    // (With replay_share = 1, the backlog first, the live p99 was 6.7 s.)
    let u_ = Updraft::start(&disk_config(src, sink, 1, "", ""));
    let paced = |count: &str, base: &str| {
        vec![
            "--count".to_string(),
            count.into(),
            "--size".into(),
            "256".into(),
            "--rate".into(),
            "5000".into(),
            "--stream-base".into(),
            base.into(),
        ]
    };
    let outage = paced("100000", "100");
    send(src, &outage.iter().map(String::as_str).collect::<Vec<_>>());
    u_.wait_metric(DURABLE, 100_000.0, Duration::from_secs(10));
    // 15,000 lines/s.
    let rx = Receiver::start(
        sink,
        175_000,
        120,
        &["--read-bytes-per-sec", "3840000", "--linger-ms", "500"],
    );
    let live = paced("75000", "200");
    send(src, &live.iter().map(String::as_str).collect::<Vec<_>>());
    let (r, ok) = rx.finish();
    assert!(ok, "{r}\n{}", u_.log_text());
    assert_eq!(u(&r, "unique"), 175_000, "{r}");
    assert_eq!(u(&r, "duplicates"), 0, "{r}");
    let backlog = &r["per_stream"]["100"];
    let live = &r["per_stream"]["200"];
    eprintln!("backlog {backlog}, live {live}");
    assert!(
        backlog["last_s"].as_f64().unwrap() > 5.0,
        "the backlog drained while live records flowed: {r}"
    );
    assert!(
        live["latency_p99_us"].as_f64().unwrap() < 3e6,
        "live records waited behind the backlog: {r}"
    );
}

#[test]
fn drop_oldest_on_a_full_disk_buffer_keeps_the_newest_and_counts_the_rest() {
    const N: u64 = 300_000;
    const SEGMENT_RECORDS: u64 = (8 << 20) / 4 / 128;
    let (src, sink) = (free_addr(), free_addr());
    // The sink is down while 300,000 records of 128 B (about 40 MB framed)
    // come into a log of 8 MB: it overflows and drops its oldest batches.
    let u_ = Updraft::start(&disk_config(
        src,
        sink,
        1,
        "max_bytes = 8388608\nwhen_full = \"drop_oldest\"",
        SMALL_BATCH,
    ));
    send(
        src,
        &[
            "--count",
            &N.to_string(),
            "--size",
            "128",
            "--stream-base",
            "100",
        ],
    );
    u_.wait_metric(
        r#"updraft_source_received_records_total{source="app"}"#,
        N as f64,
        Duration::from_secs(20),
    );
    let oldest = r#"updraft_sink_buffer_dropped_oldest_records_total{sink="up",type="tcp"}"#;
    assert!(u_.metric(oldest) > 0.0, "{}", u_.log_text());
    // The sink comes up: what the log kept is delivered.
    let rx = Receiver::start(sink, 1, 60, &["--idle-s", "3"]);
    let sent = r#"updraft_sink_sent_records_total{sink="up",type="tcp"}"#;
    let deadline = std::time::Instant::now() + Duration::from_secs(40);
    while u_.metric(sent) + u_.metric(DROPPED) < N as f64 {
        assert!(
            std::time::Instant::now() < deadline,
            "records unaccounted for: {} sent, {} dropped\n{}",
            u_.metric(sent),
            u_.metric(DROPPED),
            u_.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let (r, _) = rx.finish();
    let (delivered, dropped) = (u(&r, "unique"), u_.metric(DROPPED) as u64);
    eprintln!("delivered {delivered}, dropped {dropped}: {r}");
    assert_eq!(u(&r, "duplicates"), 0, "{r}");
    assert_eq!(delivered + dropped, N, "sent = delivered + dropped: {r}");
    assert_eq!(u_.metric(oldest) as u64, dropped, "all of them the oldest");
    assert!(dropped > N / 2, "8 MB cannot hold 40 MB: {r}");
    // The newest records all arrived: one unbroken run up to the last
    // record sent, and before it only what shared a segment (2 MiB, fewer
    // than 2 MiB / 128 B records) with the batch the sender held (retried)
    // when the sink was down.
    let stream = &r["per_stream"]["100"];
    assert_eq!(stream["unique"].as_u64(), Some(delivered), "{r}");
    let run = stream["newest_run"].as_u64().unwrap();
    assert!(
        delivered - run <= SEGMENT_RECORDS,
        "{} delivered outside the newest run of {run}: {r}",
        delivered - run
    );
    assert_eq!(
        u(&r, "lost"),
        dropped,
        "the last record sent arrived (the gaps are what was dropped): {r}"
    );
}
