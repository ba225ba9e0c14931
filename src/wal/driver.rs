//! The thin io_uring driver that runs a [`Log`] for one sink on one shard.
//!
//! Four tasks share the log (all on the shard's thread, so a `RefCell`):
//!
//! - the **writer** takes sealed batches from the sink's queue, archives each
//!   (rkyv) in its own aligned payload buffer, behind the room kept there for
//!   the frame header (the records are not copied; the batch gets an empty
//!   buffer in exchange), asks the log where it goes and writes it there —
//!   every batch that queued while the
//!   previous write ran goes in the same write (one `writev`), so a disk
//!   whose writes cost a fixed latency each keeps up by writing more at once;
//!   the frames stay in memory for the sender (up to a budget) so a sink
//!   that keeps up is not fed by reading back; a full log or a failing disk either
//!   holds the batch (`when_full = "block"`: the queue backs up and TCP sources
//!   stop reading), drops and counts it (`"drop_newest"`), or drops and
//!   counts the oldest batches waiting for the sender until a segment is
//!   freed (`"drop_oldest"`);
//! - the **syncer** group-commits: `fdatasync` of the segments written since
//!   the last sync, every `sync_interval_ms` or at once past `sync_bytes`;
//!   batches it covers become durable and go to the sender;
//! - the **keeper** persists the checkpoint (two slots, then `fdatasync`) at
//!   most once per `sync_interval_ms` and only then deletes segments that
//!   are wholly acknowledged — apart from the syncer, so that a checkpoint
//!   and an unlink never hold up the syncs that make batches sendable;
//! - the **sender** reads each durable frame back into an aligned buffer,
//!   validates the archive in place and hands the payload — already
//!   newline-delimited — to the sink's output as a slice of that buffer: no
//!   record is copied. A delivered batch is acknowledged to the log.
//!
//! Replay after a restart is the same path: recovery puts every frame after
//! the checkpoint in front of the sender before new data.
//!
//! With `write_when = "behind"` the writer hands each framed batch straight
//! to the sender, unwritten (an id of `Wal::memory_epoch`, acknowledged to
//! no log), while the log holds nothing unsent and `memory_bytes` are not
//! exceeded; once they are, or the sender finds the sink failing, what
//! memory holds is put in front of the writer's pending frames and written,
//! and so is every batch after it until the sender has delivered every
//! durable batch of the log; batches kept in memory after that wait behind
//! those still waiting for their sync (`keep_in_memory`, `spill`). At the end the writer waits for the sender
//! and writes what memory still holds.

use super::format::{self, frame_bytes, CheckpointSlot, FRAME_HEADER_BYTES};
use super::machine::{Append, BatchId, Full, Log, LogConfig};
use super::recovery;
use crate::config::WhenFull;
use crate::io::BoundedBuf;
use crate::io::{File, OpenOptions};
use crate::logging::LogEvery;
use crate::metrics::SinkCounters;
use crate::pipeline::SinkCtx;
use crate::pipeline::{Ack, Backoff, Deliver, SinkQueue};
use crate::record::FrameBuf;
use rkyv::util::AlignedVec;
use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::rc::Rc;
use std::time::Duration;
use tokio::sync::Notify;

/// Asks the kernel to write and read a segment without the page cache
/// (`O_DIRECT`): the log's bytes are not copied into it, and are not
/// written back again later. Where the file system refuses, the page cache
/// is used; both are correct, since durability comes from `fdatasync`.
fn direct_io(file: &File) {
    use std::os::fd::AsRawFd;
    let fd = file.as_raw_fd();
    // SAFETY: fcntl on a descriptor this File owns.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags >= 0 && libc::fcntl(fd, libc::F_SETFL, flags | libc::O_DIRECT) != 0 {
            tracing::debug!("O_DIRECT refused; the disk buffer goes through the page cache");
        }
    }
}

/// Bytes of frames the writer may keep in memory for the sender per sink and
/// shard, so that a sink that keeps up is sent from memory, not read back:
/// enough for what one sync covers (`SYNC_BYTES`) plus what is written
/// while that sync runs. Past it, frames are read back from their segment.
pub const FRAMES_IN_MEMORY_BYTES: usize = 32 * 1024 * 1024;

/// The most bytes one write carries: batches that queued while the previous
/// write ran are written together, one io_uring operation for all of them.
pub const WRITE_BYTES_MAX: usize = 8 * 1024 * 1024;

/// A durable batch waiting for the sender, with its frame when the writer
/// kept it in memory (otherwise the sender reads it from the segment). With
/// `write_when = "behind"`, also a batch never written (`Wal::is_memory`),
/// whose frame is always here.
struct Durable {
    id: BatchId,
    archive_len: u32,
    frame: Option<FrameBuf>,
    /// Its records (0 for a batch that will not validate when read back).
    records: u32,
    /// When it became durable (or was kept in memory).
    at: tokio::time::Instant,
}

/// How far behind the sender must be (the age of the oldest batch waiting
/// for it) before what waits is a backlog that live batches are interleaved
/// with (`buffer.replay_share`).
const PACE_AFTER: Duration = Duration::from_secs(1);

/// `write_when = "behind"`: how long a stream output may fail to take a
/// batch kept in memory before the buffer writes what it holds to the log.
const SPILL_AFTER_FAILING: Duration = Duration::from_secs(1);

/// An open segment and the nonce its frame headers are checked with.
#[derive(Clone)]
struct Seg {
    file: Rc<File>,
    nonce: u32,
    /// Written by a version before records carried meta: archives are
    /// read as `BatchV2`.
    no_meta: bool,
}

/// What the tasks share.
struct Wal {
    sink: usize,
    dir: PathBuf,
    log: RefCell<Log>,
    files: RefCell<HashMap<u64, Seg>>,
    /// The log's directory, to sync after a segment is created or renamed.
    dir_file: File,
    /// A write failed (a full or failing disk) and none has succeeded
    /// since: retired segments are deleted, not kept as spares.
    disk_trouble: Cell<bool>,
    checkpoint_file: File,
    /// Written, waiting for a sync, in log order. With `write_when =
    /// "behind"`, batches kept in memory once the sender caught up wait at
    /// its tail, behind the log's batches sent before them (never in front
    /// of one), and settle when those are durable.
    written: RefCell<VecDeque<Written>>,
    /// Durable, waiting for the sender (while `pacing`: the backlog).
    to_send: RefCell<VecDeque<Durable>>,
    /// Backlog pacing (`buffer.replay_share`): once the oldest batch waiting
    /// for the sender is older than PACE_AFTER (the sink was down, or a
    /// restart replays the log), what waits is the backlog and what becomes
    /// durable after it is live (`live`); the sender takes from both, the
    /// backlog getting `replay_share` (per mille) of the bytes, until it is
    /// drained.
    live: RefCell<VecDeque<Durable>>,
    pacing: Cell<bool>,
    /// Bytes sent from the backlog, and in all, since pacing began.
    paced: Cell<(u64, u64)>,
    replay_share: u64,
    pending_checkpoint: Cell<Option<CheckpointSlot>>,
    pending_delete: RefCell<Vec<u64>>,
    /// Something for the syncer: a write, a due sync, an ack, the end.
    wake_syncer: Notify,
    /// A checkpoint to persist or segments to delete.
    wake_keeper: Notify,
    /// The writer waits for space: the keeper should not wait out its
    /// interval before deleting what is acknowledged.
    space_wanted: Notify,
    sync_now: Notify,
    /// The sender has durable batches.
    durable: Notify,
    /// Segments were deleted: the writer may append again.
    space: Notify,
    writer_done: Cell<bool>,
    sender_done: Cell<bool>,
    syncer_idle: Cell<bool>,
    /// The writer is between an append and the end of its write.
    writing: Cell<bool>,
    /// Empty buffers (sent frames, the sender's read buffer): the writer
    /// swaps one into each batch whose own buffer it takes as a frame.
    free_frames: RefCell<Vec<FrameBuf>>,
    /// Frames attached to batches not yet sent (at most `frames_in_memory`).
    held_frames: Cell<usize>,
    /// FRAMES_IN_MEMORY_BYTES in the shard's batch buffers (what every
    /// frame is: the buffer a batch was filled in).
    frames_in_memory: usize,
    /// Frame buffers kept for reuse, held ones included: those in memory,
    /// one write's worth and one more. Buffers are kept rather than freed
    /// and allocated again (fresh pages cost a fault and zeroing each).
    frames_kept: usize,
    /// Retired segment files to reuse for new segments.
    spares: RefCell<Vec<PathBuf>>,
    segment_bytes: u64,
    max_bytes: u64,
    /// The writer's queue closed: the sender sends what it has and stops.
    closing: Cell<bool>,
    /// Once the collector stops and the writer is done: until when the
    /// sink may take what is left (`shutdown_timeout_ms / 2`); the rest of
    /// the budget is for writing down what memory holds.
    stop_at: Cell<Option<tokio::time::Instant>>,
    /// Signalled when the sender has stopped (`sender_done`).
    sender_exited: Notify,
    /// `write_when = "behind"`: batches go to the sender from memory,
    /// unwritten, while fewer than `memory_bytes` wait there and the log
    /// holds nothing unsent; otherwise (`spilling`) through the log.
    behind: bool,
    memory_bytes: usize,
    spilling: Cell<bool>,
    /// The sender asks the writer to write what memory holds to the log
    /// (the sink is failing).
    spill_wanted: Cell<bool>,
    spill_notify: Notify,
    /// Ids of batches kept in memory: this `segment` (far past any log
    /// segment's number: its top bit is set), then a sequence number.
    memory_epoch: u64,
    memory_seq: Cell<u64>,
    /// Frame bytes of batches kept in memory and waiting in `to_send`.
    memory_held: Cell<usize>,
    /// Batch outputs: batches kept in memory, taken by the output and not
    /// yet acknowledged, by sequence number (written to the log at
    /// shutdown if they still are not).
    memory_in_flight: RefCell<std::collections::BTreeMap<u64, Durable>>,
    /// A batch kept in memory that its output acknowledged before it was
    /// put in `memory_in_flight` (within `submit`).
    memory_acked_early: Cell<Option<u64>>,
}

impl Wal {
    fn segment_path(&self, id: u64) -> PathBuf {
        self.dir.join(format::segment_file_name(id))
    }

    /// The stop deadline (`stop_at`), set the first time it is asked for
    /// once the collector stops and the writer is done.
    fn stop_deadline(&self, stopping: bool, give_up: Duration) -> Option<tokio::time::Instant> {
        if self.stop_at.get().is_none() && stopping && self.closing.get() {
            self.stop_at
                .set(Some(tokio::time::Instant::now() + give_up));
        }
        self.stop_at.get()
    }

    /// Whether `id` is a batch kept in memory, never written to the log.
    fn is_memory(&self, id: BatchId) -> bool {
        self.behind && id.segment == self.memory_epoch
    }

    fn nothing_to_send(&self) -> bool {
        self.to_send.borrow().is_empty() && self.live.borrow().is_empty()
    }

    /// When the oldest batch kept in memory and not yet taken by the sender
    /// was kept.
    fn oldest_memory_waiting(&self) -> Option<tokio::time::Instant> {
        let first = |q: &VecDeque<Durable>| q.iter().find(|d| self.is_memory(d.id)).map(|d| d.at);
        let written = self
            .written
            .borrow()
            .iter()
            .find(|w| self.is_memory(w.d.id))
            .map(|w| w.d.at);
        [
            first(&self.to_send.borrow()),
            first(&self.live.borrow()),
            written,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Nothing waits for the sender but batches kept in memory.
    fn nothing_in_the_log_to_send(&self) -> bool {
        self.live.borrow().is_empty() && self.to_send.borrow().iter().all(|d| self.is_memory(d.id))
    }

    /// A batch made durable goes to the sender: behind the backlog while
    /// one is paced.
    fn push_durable(&self, d: Durable) {
        if self.pacing.get() {
            self.live.borrow_mut().push_back(d);
        } else {
            self.to_send.borrow_mut().push_back(d);
        }
    }

    /// The next batch for the sender, and whether it was live (see `live`).
    /// Order holds within the backlog and within what is live; live
    /// batches overtake the backlog.
    fn next_to_send(&self) -> Option<(Durable, bool)> {
        let mut backlog = self.to_send.borrow_mut();
        let mut live = self.live.borrow_mut();
        if self.pacing.get() && backlog.front().is_none_or(|d| self.is_memory(d.id)) {
            // The log's backlog is gone (sent, or dropped by drop_oldest):
            // what is live follows what is left, in order.
            backlog.extend(live.drain(..));
            self.pacing.set(false);
        }
        if !self.pacing.get() {
            let behind = backlog
                .front()
                .is_some_and(|d| !self.is_memory(d.id) && d.at.elapsed() >= PACE_AFTER);
            if self.replay_share >= 1000 || !behind {
                return backlog.pop_front().map(|d| (d, false));
            }
            self.pacing.set(true);
            self.paced.set((0, 0));
        }
        let (old, all) = self.paced.get();
        let take_live =
            !live.is_empty() && (backlog.is_empty() || old * 1000 > all * self.replay_share);
        let (d, is_live) = if take_live {
            (live.pop_front()?, true)
        } else {
            (backlog.pop_front()?, false)
        };
        let n = frame_bytes(d.archive_len as usize) as u64;
        self.paced.set((old + if is_live { 0 } else { n }, all + n));
        if backlog.is_empty() {
            // The backlog is drained: what is live is all that waits.
            self.pacing.set(false);
            std::mem::swap(&mut *backlog, &mut *live);
        }
        Some((d, is_live))
    }
}

async fn wait_until(notify: &Notify, ready: impl Fn() -> bool) {
    loop {
        let n = notify.notified();
        tokio::pin!(n);
        n.as_mut().enable();
        if ready() {
            return;
        }
        n.await;
    }
}

/// Runs the disk buffer of one sink on one shard until its queue closes and
/// what it holds is synced (and, if the sink takes it in time, delivered).
/// `rec` is what [`recovery::recover`] found at start, before the shards ran.
/// `output` builds the sink's output; it is given the [`Ack`] through which
/// a batch output acknowledges what it delivered.
pub async fn run<O: Deliver + 'static>(
    shard: Rc<SinkCtx>,
    queue: Rc<SinkQueue>,
    rec: recovery::Recovery,
    output: impl FnOnce(Ack) -> O,
) {
    let sink = queue.sink;
    let plan = &shard.plan.sinks[sink];
    let dir = plan.buffer.dir.join(shard.id.to_string());
    let cfg = log_config(plan, shard.shards);
    let counters = &shard.metrics.sinks[sink];
    counters.wal_damaged_frames.add(rec.bad_frames);
    counters.wal_damaged_segments.add(rec.damaged_segments);
    counters.wal_torn_tails.add(rec.torn_tails);
    counters.wal_torn_bytes.add(rec.torn_bytes);
    counters.wal_replayed_batches.add(rec.replay.len() as u64);
    let mut files = HashMap::new();
    for id in &rec.segments {
        let path = dir.join(format::segment_file_name(*id));
        match OpenOptions::new().read(true).write(true).open(&path).await {
            Ok(f) => {
                direct_io(&f);
                let nonce = rec.nonces.get(id).copied().unwrap_or(0);
                let no_meta = rec.versions.get(id) == Some(&format::VERSION_NO_META);
                files.insert(
                    *id,
                    Seg {
                        file: Rc::new(f),
                        nonce,
                        no_meta,
                    },
                );
            }
            Err(e) => {
                tracing::error!(path = %path.display(), error = %e, "cannot open a segment to replay")
            }
        }
    }
    let dir_file = loop {
        match OpenOptions::new().read(true).open(&dir).await {
            Ok(f) => break f,
            Err(e) => {
                tracing::error!(dir = %dir.display(), error = %e, "cannot open the disk buffer's directory; retrying in 1 s");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    };
    let checkpoint_file = loop {
        match OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .open(dir.join("checkpoint"))
            .await
        {
            Ok(f) => break f,
            Err(e) => {
                tracing::error!(dir = %dir.display(), error = %e, "cannot open the checkpoint file; retrying in 1 s");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    };
    if !rec.replay.is_empty() {
        tracing::info!(sink = %plan.name, shard = shard.id, batches = rec.replay.len(),
            "replaying the disk buffer before new records");
    }
    let frame_capacity = shard.payload_buffer_bytes();
    let wal = Rc::new(Wal {
        sink,
        dir,
        log: RefCell::new(rec.log),
        files: RefCell::new(files),
        dir_file,
        disk_trouble: Cell::new(false),
        checkpoint_file,
        written: RefCell::new(VecDeque::new()),
        to_send: RefCell::new(
            rec.replay
                .iter()
                .map(|&(id, len, records)| Durable {
                    id,
                    archive_len: len,
                    frame: None,
                    records,
                    // A backlog from the start.
                    at: tokio::time::Instant::now() - PACE_AFTER,
                })
                .collect(),
        ),
        live: RefCell::new(VecDeque::new()),
        pacing: Cell::new(false),
        paced: Cell::new((0, 0)),
        replay_share: u64::from(plan.buffer.replay_share),
        pending_checkpoint: Cell::new(None),
        pending_delete: RefCell::new(Vec::new()),
        wake_syncer: Notify::new(),
        wake_keeper: Notify::new(),
        space_wanted: Notify::new(),
        sync_now: Notify::new(),
        durable: Notify::new(),
        space: Notify::new(),
        writer_done: Cell::new(false),
        sender_done: Cell::new(false),
        syncer_idle: Cell::new(true),
        writing: Cell::new(false),
        free_frames: RefCell::new(Vec::new()),
        held_frames: Cell::new(0),
        frames_in_memory: (FRAMES_IN_MEMORY_BYTES / frame_capacity).max(2),
        frames_kept: (FRAMES_IN_MEMORY_BYTES + WRITE_BYTES_MAX) / frame_capacity + 2,
        spares: RefCell::new(rec.spares),
        segment_bytes: cfg.segment_bytes,
        max_bytes: cfg.max_bytes,
        closing: Cell::new(false),
        stop_at: Cell::new(None),
        sender_exited: Notify::new(),
        behind: plan.buffer.write_when == crate::config::WriteWhen::Behind,
        memory_bytes: plan.buffer.memory_bytes / shard.shards,
        // Until what the log holds (a replay) is delivered.
        spilling: Cell::new(true),
        spill_wanted: Cell::new(false),
        spill_notify: Notify::new(),
        memory_epoch: shard.now_ns() | 1 << 63,
        memory_seq: Cell::new(0),
        memory_held: Cell::new(0),
        memory_in_flight: RefCell::new(std::collections::BTreeMap::new()),
        memory_acked_early: Cell::new(None),
    });
    counters.wal_bytes.set(wal.log.borrow().bytes() as i64);
    let syncer = crate::io::spawn(syncer(shard.clone(), wal.clone(), queue.clone()));
    let keeper = crate::io::spawn(keeper(shard.clone(), wal.clone()));
    let acks = wal.clone();
    let out = output(Rc::new(move |id| {
        ack(&acks, id);
    }));
    let sender = crate::io::spawn(sender(shard.clone(), wal.clone(), out));
    writer(&shard, &wal, &queue).await;
    wal.closing.set(true);
    wal.writer_done.set(true);
    wal.wake_syncer.notify_one();
    wal.durable.notify_one();
    let _ = sender.await;
    wal.wake_keeper.notify_one();
    let _ = syncer.await;
    let _ = keeper.await;
}

/// The log's limits for one sink on one shard.
pub fn log_config(plan: &crate::config::SinkPlan, shards: usize) -> LogConfig {
    LogConfig {
        segment_bytes: plan.buffer.segment_bytes,
        max_bytes: (plan.buffer.max_bytes / shards) as u64,
        sync_bytes: plan.buffer.sync_bytes,
    }
}

/// Opens every disk buffer of `plan` (all sinks, all shards) before the
/// shards start, one thread per shard: what a crash left is mended, and a
/// log that cannot be read fails the start with its path named (rather than
/// a shard retrying it forever while its records wait).
pub fn recover_all(
    plan: &crate::config::Plan,
) -> Result<Vec<Vec<Option<recovery::Recovery>>>, (String, std::io::Error)> {
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..plan.shards)
            .map(|k| {
                scope.spawn(move || {
                    plan.sinks
                        .iter()
                        .map(|s| {
                            if s.buffer.kind != crate::config::BufferKind::Disk {
                                return Ok(None);
                            }
                            let dir = s.buffer.dir.join(k.to_string());
                            recovery::recover(&dir, log_config(s, plan.shards), &s.name, k)
                                .map(Some)
                                .map_err(|e| (s.name.clone(), e))
                        })
                        .collect::<Result<Vec<_>, _>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("recovery does not panic"))
            .collect()
    })
}

/// A batch archived in its frame, waiting to be written.
struct Framed {
    buf: FrameBuf,
    archive_len: usize,
    records: u32,
    /// Kept in memory first (`write_when = "behind"`): its records were
    /// settled then.
    settled: bool,
    /// Written for a spill (`write_when = "behind"`): what memory held.
    spilled: bool,
}

/// A batch written and waiting for a sync (or, with `write_when =
/// "behind"`, kept in memory behind such batches).
struct Written {
    d: Durable,
    records: u32,
    /// Its records settle when it is durable (not if they settled when it
    /// was kept in memory).
    settles: bool,
    /// Written for a spill: until it is durable and delivered, the sink has
    /// not caught up.
    spilled: bool,
}

/// Archives `batch` in its own payload buffer (the records stay where they
/// are, behind the room kept for the frame header) and takes that buffer as
/// the frame, padded to whole blocks; `spare` becomes the batch's new, empty
/// payload buffer.
fn frame_batch(
    batch: &mut crate::record::Batch,
    spare: FrameBuf,
) -> Result<(FrameBuf, usize), rkyv::rancor::Error> {
    // The queue checksummed most of the records as they came (the archive
    // starts with them); the CRC goes on from there.
    let (crc, done) = batch.payload.checksum_so_far();
    debug_assert!(done <= batch.payload.len());
    let (mut v, archive_len) = crate::record::archive_in_place(batch, spare.0)?;
    // The archive's length and CRC now; the segment once the log places it.
    let crc = crate::record::crc32c_append(crc, &v[FRAME_HEADER_BYTES + done..]);
    v[..FRAME_HEADER_BYTES].fill(0);
    v[0..4].copy_from_slice(&(archive_len as u32).to_le_bytes());
    v[4..8].copy_from_slice(&crc.to_le_bytes());
    v.resize(frame_bytes(archive_len), 0);
    Ok((FrameBuf(v), archive_len))
}

async fn writer(shard: &SinkCtx, wal: &Wal, queue: &SinkQueue) {
    let plan = &shard.plan.sinks[wal.sink];
    let counters = &shard.metrics.sinks[wal.sink];
    // A buffer for the batch whose own buffer becomes a frame; new ones are
    // sized like the shard's batches, since they go on as batch buffers.
    let take_buf = || {
        wal.free_frames
            .borrow_mut()
            .pop()
            .unwrap_or_else(|| FrameBuf(shard.new_payload().into_buffer()))
    };
    // Frames archived and not yet written, in log order; at most one write's
    // worth plus the frame that did not fit in it.
    let mut pending: VecDeque<Framed> = VecDeque::new();
    // Reused for every write: the frames of one write and where they go.
    let mut group: Vec<FrameBuf> = Vec::new();
    let mut appends: Vec<Append> = Vec::new();
    let mut backoff = Backoff::new(plan.retry);
    let mut log_full = LogEvery::new(Duration::from_secs(10));
    let mut log_err = LogEvery::new(Duration::from_secs(10));
    let mut solo = false;
    let frame = |mut batch: crate::record::Batch, buf: FrameBuf| -> Option<Framed> {
        let records = batch.len() as u32;
        let framed = frame_batch(&mut batch, buf);
        shard.recycle(batch);
        match framed {
            Ok((buf, archive_len)) => Some(Framed {
                buf,
                archive_len,
                records,
                settled: false,
                spilled: false,
            }),
            Err(e) => {
                tracing::error!(sink = %plan.name, error = %e, "cannot archive a batch; dropped");
                counters.buffer_dropped.add(records as u64);
                // Settled now, not after the frames before it are durable:
                // a dropped batch never becomes durable, and a source waiting
                // on it must not wait forever (see SinkQueue::settle).
                queue.settle(u64::from(records));
                None
            }
        }
    };
    // write_when = "behind": the queue closed and what memory held was
    // taken to be written.
    let mut last_spill = false;
    // Stopping with a full log: how long the sink has to make room.
    let give_up = Duration::from_millis(shard.plan.shutdown_timeout_ms / 2);
    let mut stop_at: Option<tokio::time::Instant> = None;
    let mut log_lost = LogEvery::new(Duration::from_secs(10));
    loop {
        // Gather: wait for a batch if none is pending, then take every batch
        // that queued meanwhile (up to one write's worth), so that a disk
        // slower than the network gets fewer, larger writes.
        if pending.is_empty() {
            let next = if wal.behind && !last_spill {
                tokio::select! {
                    b = queue.next() => Some(b),
                    _ = wait_until(&wal.spill_notify, || wal.spill_wanted.get()) => None,
                }
            } else {
                Some(queue.next().await)
            };
            match next {
                Some(Some(batch)) => pending.extend(frame(batch, take_buf())),
                Some(None) if wal.behind && !last_spill => {
                    // Stopping: the sender sends what it can, then what
                    // memory still holds is written to the log.
                    last_spill = true;
                    wal.closing.set(true);
                    wal.durable.notify_one();
                    // A sender holding a batch kept in memory lets it go
                    // by the give-up (at most one failing try after it);
                    // one that began a write to a failing sink before the
                    // stop, of a batch in the log, has no deadline: it is
                    // not waited for past that (the log's batches are
                    // safe; what memory holds is written here).
                    let until = wal.stop_deadline(true, give_up).expect("closing")
                        + SPILL_AFTER_FAILING
                        + Duration::from_millis(500);
                    let exited = wait_until(&wal.sender_exited, || wal.sender_done.get());
                    let _ = tokio::time::timeout_at(until, exited).await;
                    let n = spill(shard, wal, &mut pending, true);
                    if n > 0 {
                        tracing::info!(sink = %plan.name, shard = shard.id, batches = n,
                            "writing the batches held in memory to the disk buffer before stopping");
                    }
                    continue;
                }
                Some(None) => break,
                None => {}
            }
        }
        if wal.behind && !last_spill {
            keep_in_memory(shard, wal, queue, &mut pending);
        }
        let mut bytes: usize = pending.iter().map(|f| f.buf.0.len()).sum();
        while bytes < WRITE_BYTES_MAX {
            let Some(batch) = queue.try_next() else { break };
            if let Some(f) = frame(batch, take_buf()) {
                bytes += f.buf.0.len();
                pending.push_back(f);
            }
        }
        if wal.behind && !last_spill {
            keep_in_memory(shard, wal, queue, &mut pending);
        }
        let Some(first) = pending.front() else {
            continue;
        };

        // Place: the first frame wherever the log puts it, the ones after it
        // as long as they follow it in the same segment.
        {
            let mut log = wal.log.borrow_mut();
            appends.clear();
            for f in &pending {
                if !appends.is_empty() && (solo || !log.fits_head(f.archive_len)) {
                    break;
                }
                match log.append(f.archive_len) {
                    Ok(a) => appends.push(a),
                    Err(Full) => break,
                }
            }
        }
        if appends.is_empty() {
            let needed = (first.buf.0.len() + format::SEGMENT_HEADER_BYTES) as u64;
            let lack = (wal.log.borrow().bytes() + needed).saturating_sub(wal.max_bytes);
            let dropped = plan.buffer.when_full == WhenFull::DropOldest
                && drop_oldest(shard, wal, lack.max(1)) > 0;
            match plan.buffer.when_full {
                WhenFull::Block | WhenFull::DropOldest if last_spill && !dropped => {
                    // Nothing will free space now.
                    let f = pending.pop_front().expect("checked");
                    tracing::error!(sink = %plan.name, shard = shard.id, records = f.records,
                        "disk buffer full while stopping: a batch held in memory is lost (counted)");
                    counters.buffer_dropped.add(f.records as u64);
                    if !f.settled {
                        queue.settle(u64::from(f.records));
                    }
                    give_back(wal, f.buf);
                }
                WhenFull::Block | WhenFull::DropOldest => {
                    if let Some(held) = log_full.ready() {
                        let what = match plan.buffer.when_full {
                            WhenFull::Block => "disk buffer full: sources are held back until the sink catches up",
                            _ if dropped => "disk buffer full: dropping the oldest records (counted)",
                            _ => "disk buffer full and what it holds is being sent: sources are held back until the sink takes it",
                        };
                        tracing::warn!(sink = %plan.name, shard = shard.id, max_bytes = plan.buffer.max_bytes,
                            suppressed = held, "{what}");
                    }
                    wal.space_wanted.notify_one();
                    let max = (plan.buffer.max_bytes / shard.shards) as u64;
                    let space = wait_until(&wal.space, || wal.log.borrow().bytes() + needed <= max);
                    if !shard.sink_stopping(wal.sink) {
                        // Looked at again now and then: the collector may
                        // begin to stop meanwhile.
                        let _ = tokio::time::timeout(Duration::from_millis(200), space).await;
                        continue;
                    }
                    // Stopping: the sink has until the give-up to make
                    // room; past it, what waits is lost, and counted (it
                    // is in memory only, and the collector is about to end).
                    let until =
                        *stop_at.get_or_insert_with(|| tokio::time::Instant::now() + give_up);
                    if tokio::time::timeout_at(until, space).await.is_err() {
                        let f = pending.pop_front().expect("checked");
                        if let Some(held) = log_lost.ready() {
                            tracing::error!(sink = %plan.name, shard = shard.id, records = f.records, suppressed = held,
                                "disk buffer full while stopping: records held in memory are lost (counted)");
                        }
                        counters.buffer_dropped.add(f.records as u64);
                        if !f.settled {
                            queue.settle(u64::from(f.records));
                        }
                        give_back(wal, f.buf);
                    }
                }
                WhenFull::DropNewest => {
                    wal.space_wanted.notify_one();
                    if let Some(held) = log_full.ready() {
                        tracing::warn!(sink = %plan.name, shard = shard.id, max_bytes = plan.buffer.max_bytes,
                            suppressed = held, "disk buffer full: dropping the newest records (counted)");
                    }
                    let f = pending.pop_front().expect("checked");
                    counters.buffer_dropped.add(f.records as u64);
                    if !f.settled {
                        queue.settle(u64::from(f.records));
                    }
                    give_back(wal, f.buf);
                }
            }
            continue;
        }

        // Write the placed frames with one operation, into a segment
        // created (or reused) first if they start one.
        let seg = wal.files.borrow().get(&appends[0].id.segment).cloned();
        let seg = match seg {
            Some(seg) => Ok(seg),
            None => create_segment(wal, appends[0].id.segment, counters).await,
        };
        if let Ok(seg) = &seg {
            for (f, a) in pending.iter_mut().zip(&appends) {
                format::place_frame_header(
                    &mut f.buf.0[..FRAME_HEADER_BYTES],
                    a.id.segment,
                    seg.nonce,
                );
            }
        }
        group.extend(
            pending
                .iter_mut()
                .take(appends.len())
                .map(|f| std::mem::replace(&mut f.buf, FrameBuf(AlignedVec::new()))),
        );
        wal.writing.set(true);
        let (done, failed, bufs) = match seg {
            Ok(seg) => write_frames(&seg.file, &appends[0], std::mem::take(&mut group)).await,
            Err(e) => (0, Some(e), std::mem::take(&mut group)),
        };
        group = bufs;
        wal.writing.set(false);
        for (f, buf) in pending.iter_mut().zip(group.drain(..)) {
            f.buf = buf;
        }
        // The frames written whole are in the log, even when a later one
        // failed (so they are not written twice).
        for a in &appends[..done] {
            let f = pending.pop_front().expect("one pending frame per append");
            wal.log.borrow_mut().wrote(*a);
            // Hand the frame itself to the sender while few are held; past
            // that, the sender reads it back.
            let frame = if wal.held_frames.get() < wal.frames_in_memory {
                wal.held_frames.set(wal.held_frames.get() + 1);
                Some(f.buf)
            } else {
                give_back(wal, f.buf);
                None
            };
            wal.written.borrow_mut().push_back(Written {
                d: Durable {
                    id: a.id,
                    archive_len: f.archive_len as u32,
                    frame,
                    records: f.records,
                    at: tokio::time::Instant::now(),
                },
                records: f.records,
                settles: !f.settled,
                spilled: f.spilled,
            });
            counters.wal_bytes_written.add(a.frame_bytes);
        }
        if done > 0 {
            counters.wal_writes.add(1);
            counters.wal_bytes.set(wal.log.borrow().bytes() as i64);
            if wal.log.borrow().sync_due() {
                wal.sync_now.notify_one();
            }
            wal.wake_syncer.notify_one();
        }
        let Some(e) = failed else {
            backoff.reset();
            solo = false;
            wal.disk_trouble.set(false);
            continue;
        };
        wal.disk_trouble.set(true);
        let freed = {
            let mut log = wal.log.borrow_mut();
            for a in appends[done..].iter().rev() {
                log.abandon(*a);
            }
            // Start a new segment next time, so that a head that fills the
            // disk can be deleted once delivered.
            log.seal_head()
        };
        if !freed.is_empty() {
            wal.pending_delete.borrow_mut().extend(freed);
            wal.wake_keeper.notify_one();
            wal.space_wanted.notify_one();
        }
        counters.wal_write_errors.add(1);
        // Spare segments hold space a full disk needs.
        remove_spares(wal).await;
        // Until a write succeeds again, one frame per write: a nearly full
        // disk may take a frame where it cannot take a group.
        solo = true;
        match plan.buffer.when_full {
            WhenFull::Block if last_spill => {
                // Nothing will be retried after this.
                let f = pending.pop_front().expect("the frame that failed");
                tracing::error!(sink = %plan.name, shard = shard.id, dir = %wal.dir.display(), error = %e,
                    records = f.records, "cannot write the disk buffer while stopping: a batch held in memory is lost (counted)");
                counters.buffer_dropped.add(f.records as u64);
                if !f.settled {
                    queue.settle(u64::from(f.records));
                }
                give_back(wal, f.buf);
            }
            WhenFull::Block => {
                if let Some(held) = log_err.ready() {
                    tracing::warn!(sink = %plan.name, shard = shard.id, dir = %wal.dir.display(), error = %e,
                        suppressed = held, "cannot write the disk buffer; holding records and retrying");
                }
                tokio::time::sleep(backoff.next_delay()).await;
            }
            // A full file system: the oldest batches make room, as for a
            // full log; the frame is written again after the backoff.
            WhenFull::DropOldest
                if e.kind() == std::io::ErrorKind::StorageFull
                    && drop_oldest(
                        shard,
                        wal,
                        (pending[0].buf.0.len() + format::SEGMENT_HEADER_BYTES) as u64,
                    ) > 0 =>
            {
                if let Some(held) = log_err.ready() {
                    tracing::warn!(sink = %plan.name, shard = shard.id, dir = %wal.dir.display(), error = %e,
                        suppressed = held, "the disk is full: dropping the oldest records (counted)");
                }
                tokio::time::sleep(backoff.next_delay()).await;
            }
            // Any other write error drops the newest batch (the one that
            // failed), as with drop_newest.
            WhenFull::DropNewest | WhenFull::DropOldest => {
                if let Some(held) = log_err.ready() {
                    tracing::warn!(sink = %plan.name, shard = shard.id, dir = %wal.dir.display(), error = %e,
                        suppressed = held, "cannot write the disk buffer; dropping the newest records (counted)");
                }
                let f = pending.pop_front().expect("the frame that failed");
                counters.buffer_dropped.add(f.records as u64);
                if !f.settled {
                    queue.settle(u64::from(f.records));
                }
                give_back(wal, f.buf);
            }
        }
    }
}

/// `write_when = "behind"`: hands the pending frames to the sender from
/// memory, unwritten, while the log holds nothing unsent and they fit in
/// `memory_bytes`. Once one does not fit, or the sender asked for it (the
/// sink is failing), everything memory holds goes to the log ahead of the
/// pending frames (`spill`), and so does every batch after it until the
/// sender has delivered every durable batch of the log; batches kept in
/// memory then wait behind those still waiting for their sync: the order of
/// batches holds.
fn keep_in_memory(shard: &SinkCtx, wal: &Wal, queue: &SinkQueue, pending: &mut VecDeque<Framed>) {
    let counters = &shard.metrics.sinks[wal.sink];
    // A batch kept in memory that has waited SPILL_AFTER_FAILING: the sink
    // is failing or stuck, though what the sender holds may be a batch of
    // the log (which has no deadline of its own).
    let stuck = !wal.spilling.get()
        && wal
            .oldest_memory_waiting()
            .is_some_and(|at| at.elapsed() >= SPILL_AFTER_FAILING);
    if wal.spill_wanted.get() || stuck {
        if !wal.spilling.get() {
            counters.wal_spills.add(1);
        }
        wal.spilling.set(true);
        spill(shard, wal, pending, false);
        return;
    }
    if wal.spilling.get() {
        // Every spilled frame written, and every durable batch of the log
        // delivered. Batches written and waiting for a sync may remain:
        // under a steady stream there always are some, and batches kept in
        // memory from now on wait behind them (in `written`), so the order
        // of batches holds without a gap in the stream.
        let caught_up = !pending.iter().any(|f| f.spilled)
            && !wal.written.borrow().iter().any(|w| w.spilled)
            && wal.nothing_in_the_log_to_send()
            && wal.log.borrow().durable_unacknowledged() == 0;
        if !caught_up {
            return;
        }
        wal.spilling.set(false);
        // An idle log gives back its last segment (the keeper).
        wal.wake_keeper.notify_one();
        tracing::debug!(
            sink = wal.sink,
            shard = shard.id,
            "the sink caught up: batches are sent from memory"
        );
    }
    while let Some(f) = pending.front() {
        let len = f.buf.0.len();
        if wal.memory_held.get() + len > wal.memory_bytes {
            tracing::debug!(
                sink = wal.sink,
                shard = shard.id,
                "the sink is behind: batches go to the disk buffer"
            );
            wal.spilling.set(true);
            counters.wal_spills.add(1);
            spill(shard, wal, pending, false);
            return;
        }
        let f = pending.pop_front().expect("checked");
        let seq = wal.memory_seq.get();
        wal.memory_seq.set(seq + 1);
        wal.memory_held.set(wal.memory_held.get() + len);
        counters.wal_memory_bytes.set(wal.memory_held.get() as i64);
        let d = Durable {
            id: BatchId {
                segment: wal.memory_epoch,
                offset: seq,
            },
            archive_len: f.archive_len as u32,
            frame: Some(f.buf),
            records: f.records,
            at: tokio::time::Instant::now(),
        };
        // Behind the log's batches still waiting for their sync, if any:
        // the syncer hands it on after them, and settles it then (records
        // settle in the order they were taken).
        let mut written = wal.written.borrow_mut();
        if written.is_empty() {
            wal.push_durable(d);
            // As a memory buffer does: taken is settled.
            queue.settle(u64::from(f.records));
        } else {
            written.push_back(Written {
                d,
                records: f.records,
                settles: true,
                spilled: false,
            });
        }
        drop(written);
        wal.durable.notify_one();
    }
}

/// Puts what memory holds (batches waiting for the sender, and, when
/// stopping (`all`), those a batch output took and has not acknowledged)
/// in front of `pending`, oldest first, to be written to the log. Returns
/// how many.
fn spill(shard: &SinkCtx, wal: &Wal, pending: &mut VecDeque<Framed>, all: bool) -> usize {
    let counters = &shard.metrics.sinks[wal.sink];
    wal.spill_wanted.set(false);
    let mut taken: Vec<Durable> = Vec::new();
    for q in [&wal.to_send, &wal.live] {
        let mut q = q.borrow_mut();
        let (memory, log): (VecDeque<Durable>, VecDeque<Durable>) =
            q.drain(..).partition(|d| wal.is_memory(d.id));
        *q = log;
        taken.extend(memory);
    }
    // Those waiting behind the log's unsynced batches (always its tail),
    // not settled yet.
    let mut unsettled: Vec<u64> = Vec::new();
    {
        let mut written = wal.written.borrow_mut();
        while written.back().is_some_and(|w| wal.is_memory(w.d.id)) {
            let w = written.pop_back().expect("checked");
            unsettled.push(w.d.id.offset);
            taken.push(w.d);
        }
    }
    let waiting: usize = taken
        .iter()
        .map(|d| frame_bytes(d.archive_len as usize))
        .sum();
    wal.memory_held
        .set(wal.memory_held.get().saturating_sub(waiting));
    if all {
        taken.extend(std::mem::take(&mut *wal.memory_in_flight.borrow_mut()).into_values());
    }
    taken.sort_by_key(|d| d.id.offset);
    let n = taken.len();
    for d in taken.into_iter().rev() {
        let buf = d.frame.expect("a batch kept in memory has its frame");
        pending.push_front(Framed {
            buf,
            archive_len: d.archive_len as usize,
            records: d.records,
            settled: !unsettled.contains(&d.id.offset),
            spilled: true,
        });
    }
    counters.wal_memory_bytes.set(wal.memory_held.get() as i64);
    // The sender waits for this.
    wal.durable.notify_one();
    n
}

/// `when_full = "drop_oldest"`: frees `lack` bytes of the log, or as much
/// of it as it can, by dropping the oldest batches waiting for the sender.
/// Only a segment none of whose batches the sender holds (nor the open
/// head, being written) is freed, so it drops every waiting batch up to
/// the last segment it needs to free, oldest first, and nothing when no
/// segment can be freed. Each dropped batch is acknowledged to the log (the
/// keeper deletes the emptied segments) and its records are counted.
/// Returns how many batches went.
fn drop_oldest(shard: &SinkCtx, wal: &Wal, lack: u64) -> usize {
    let counters = &shard.metrics.sinks[wal.sink];
    // Waiting batches per segment, oldest first.
    let mut waiting: std::collections::BTreeMap<u64, u32> = std::collections::BTreeMap::new();
    for d in wal.to_send.borrow().iter().chain(wal.live.borrow().iter()) {
        if !wal.is_memory(d.id) {
            *waiting.entry(d.id.segment).or_default() += 1;
        }
    }
    let mut upto = None;
    {
        let log = wal.log.borrow();
        let mut freed = 0;
        for (&segment, &n) in &waiting {
            if let Some(bytes) = log.would_free(segment, n) {
                freed += bytes;
                upto = Some(segment);
                if freed >= lack {
                    break;
                }
            }
        }
    }
    let Some(upto) = upto else {
        return 0;
    };
    let goes = |d: &Durable| !wal.is_memory(d.id) && d.id.segment <= upto;
    let mut dropped: Vec<Durable> = Vec::new();
    for q in [&wal.to_send, &wal.live] {
        let mut q = q.borrow_mut();
        let (go, stay): (VecDeque<Durable>, VecDeque<Durable>) = q.drain(..).partition(goes);
        *q = stay;
        dropped.extend(go);
    }
    let mut records = 0u64;
    let batches = dropped.len();
    for d in dropped {
        records += u64::from(d.records);
        if let Some(f) = d.frame {
            wal.held_frames.set(wal.held_frames.get() - 1);
            give_back(wal, f);
        }
        ack(wal, d.id);
    }
    counters.buffer_dropped.add(records);
    counters.buffer_dropped_oldest.add(records);
    batches
}

/// Keeps a frame buffer for the writer to fill again, up to a bound.
fn give_back(wal: &Wal, buf: FrameBuf) {
    let mut free = wal.free_frames.borrow_mut();
    if free.len() + wal.held_frames.get() < wal.frames_kept && buf.0.capacity() > 0 {
        free.push(buf);
    }
}

/// Writes frames that follow each other in one segment, starting where the
/// log placed `first`: one `writev` for
/// several frames (each buffer is block-aligned and whole blocks long, as
/// `O_DIRECT` needs). Returns how many frames were written whole and, if not
/// all were, the error that stopped the rest.
async fn write_frames(
    file: &File,
    first: &Append,
    mut bufs: Vec<FrameBuf>,
) -> (usize, Option<std::io::Error>, Vec<FrameBuf>) {
    let at = first.id.offset;
    if bufs.len() == 1 {
        let buf = bufs.pop().expect("one");
        let len = buf.0.len();
        let (res, slice) = file.write_all_at(buf.slice(0..len), at).await;
        bufs.push(slice.into_inner());
        return match res {
            Ok(()) => (1, None, bufs),
            Err(e) => (0, Some(e), bufs),
        };
    }
    let (res, mut bufs) = file.writev_at(bufs, at).await;
    let mut written = match res {
        Ok(n) => n,
        Err(e) => return (0, Some(e), bufs),
    };
    // A short write (rare: a disk filling up): the rest frame by frame.
    let mut start = 0usize;
    for (i, b) in bufs.iter_mut().enumerate() {
        let len = b.0.len();
        if written < start + len {
            let skip = written - start;
            let buf = std::mem::replace(b, FrameBuf(AlignedVec::new()));
            let (res, slice) = file
                .write_all_at(buf.slice(skip..len), at + written as u64)
                .await;
            *b = slice.into_inner();
            if let Err(e) = res {
                return (i, Some(e), bufs);
            }
            written = start + len;
        }
        start += len;
    }
    let n = bufs.len();
    (n, None, bufs)
}

fn header_block(id: u64, nonce: u32, reused: bool) -> FrameBuf {
    let mut header = FrameBuf::with_capacity(format::SEGMENT_HEADER_BYTES);
    header
        .0
        .extend_from_slice(&format::segment_header(id, nonce, reused));
    header
}

/// Creates segment `id`, from a spare file when there is one, and syncs the
/// directory so that its name survives a power loss before any frame in it
/// is reported durable.
async fn create_segment(wal: &Wal, id: u64, counters: &SinkCounters) -> std::io::Result<Seg> {
    // A new nonce for every segment: no frame header from a file's earlier
    // use (or forged from record bytes) passes the check of this one.
    let nonce = fastrand::u32(..);
    // A spare first: its blocks are allocated and written, so writing over
    // them changes no metadata. The new header goes in before the rename, so
    // a crash leaves either a spare or a segment whose header names it.
    let spare = wal.spares.borrow_mut().pop();
    let mut file = None;
    if let Some(spare) = spare {
        let reused = async {
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&spare)
                .await?;
            direct_io(&f);
            let (res, _) = f.write_all_at(header_block(id, nonce, true), 0).await;
            res?;
            crate::io::rename(&spare, wal.segment_path(id)).await?;
            Ok::<File, std::io::Error>(f)
        }
        .await;
        match reused {
            Ok(f) => {
                counters.wal_recycled_segments.add(1);
                file = Some(f);
            }
            Err(e) => {
                tracing::debug!(path = %spare.display(), error = %e, "cannot reuse a spare segment; removed");
                let _ = crate::io::remove_file(&spare).await;
            }
        }
    }
    let f = match file {
        Some(f) => f,
        None => {
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(wal.segment_path(id))
                .await?;
            direct_io(&f);
            let (res, _) = f.write_all_at(header_block(id, nonce, false), 0).await;
            res?;
            f
        }
    };
    wal.dir_file.sync_all().await?;
    let seg = Seg {
        file: Rc::new(f),
        nonce,
        no_meta: false,
    };
    wal.files.borrow_mut().insert(id, seg.clone());
    Ok(seg)
}

/// Removes the spare segments (the disk is full, or the log is idle and
/// should not hold space it does not need).
async fn remove_spares(wal: &Wal) {
    let spares = std::mem::take(&mut *wal.spares.borrow_mut());
    for path in spares {
        if let Err(e) = crate::io::remove_file(&path).await {
            tracing::warn!(path = %path.display(), error = %e, "cannot delete a spare segment");
        }
    }
}

async fn syncer(shard: Rc<SinkCtx>, wal: Rc<Wal>, queue: Rc<SinkQueue>) {
    let plan = &shard.plan.sinks[wal.sink];
    let counters = &shard.metrics.sinks[wal.sink];
    let interval = Duration::from_millis(plan.buffer.sync_interval_ms);
    let mut log_err = LogEvery::new(Duration::from_secs(10));
    loop {
        wal.syncer_idle.set(true);
        wait_until(&wal.wake_syncer, || {
            wal.log.borrow().has_unsynced() || wal.writer_done.get()
        })
        .await;
        let finishing = wal.writer_done.get();
        if finishing && !wal.log.borrow().has_unsynced() {
            // Nothing more will be written.
            break;
        }
        wal.syncer_idle.set(false);
        if !finishing && !wal.log.borrow().sync_due() {
            // The group-commit window: more writes join this sync.
            let due = wal.sync_now.notified();
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = due => {}
            }
        }
        let plan_sync = wal.log.borrow_mut().begin_sync();
        for seg in &plan_sync.segments {
            let f = wal.files.borrow().get(seg).map(|s| s.file.clone());
            if let Some(f) = f {
                if let Err(e) = f.sync_data().await {
                    if let Some(held) = log_err.ready() {
                        tracing::error!(sink = %plan.name, shard = shard.id, error = %e, suppressed = held,
                            "fdatasync of the disk buffer failed: the last writes may not be durable");
                    }
                }
            }
        }
        counters.wal_syncs.add(1);
        let durable = wal.log.borrow_mut().synced(plan_sync);
        let mut written = wal.written.borrow_mut();
        let (mut records, mut settle) = (0u64, 0u64);
        for id in durable {
            let w = written.pop_front().expect("written in log order");
            debug_assert_eq!(w.d.id, id);
            records += u64::from(w.records);
            if w.settles {
                settle += u64::from(w.records);
            }
            wal.push_durable(w.d);
        }
        // write_when = "behind": batches kept in memory that waited behind
        // the ones just made durable settle now, after them.
        while written.front().is_some_and(|w| wal.is_memory(w.d.id)) {
            let w = written.pop_front().expect("checked");
            settle += u64::from(w.records);
            wal.push_durable(w.d);
        }
        counters.durable_records.add(records);
        queue.settle(settle);
        drop(written);
        wal.durable.notify_one();
    }
    wal.syncer_idle.set(true);
    wal.durable.notify_one();
    wal.wake_keeper.notify_one();
}

/// Persists the checkpoint and deletes wholly acknowledged segments, apart
/// from the syncer so that neither waits for the other: data syncs decide
/// how soon batches are sent, checkpoints only how much is replayed after a
/// crash. A checkpoint is written at most once per `sync_interval_ms`
/// (sooner when the writer waits for space).
async fn keeper(shard: Rc<SinkCtx>, wal: Rc<Wal>) {
    let plan = &shard.plan.sinks[wal.sink];
    let interval = Duration::from_millis(plan.buffer.sync_interval_ms);
    loop {
        let done = || wal.writer_done.get() && wal.sender_done.get() && wal.syncer_idle.get();
        wait_until(&wal.wake_keeper, || {
            wal.pending_checkpoint.get().is_some()
                || !wal.pending_delete.borrow().is_empty()
                || done()
        })
        .await;
        // What this round persists and deletes: segments listed now are
        // covered by the checkpoint taken now (acks arriving meanwhile wait
        // for the next round, so no segment goes before a checkpoint
        // covering it is on disk), or lie between it and the head, kept,
        // which numbers new segments after them across a crash (ones
        // emptied out of order: nothing in them is to be replayed).
        let checkpoint = wal.pending_checkpoint.take();
        let delete = std::mem::take(&mut *wal.pending_delete.borrow_mut());
        if let Some(c) = checkpoint {
            persist_checkpoint(&wal, c).await;
        }
        // Wholly acknowledged segments go even when the checkpoint could
        // not be written: what they hold was delivered, so removing them
        // loses nothing (an older checkpoint only means more duplicates
        // after a crash), and on a full disk they are what frees space.
        delete_segments(&shard, &wal, delete, true).await;
        // An idle log gives back its last segment once all of it is
        // delivered: other logs on the same disk may need the space. Not
        // while a checkpoint is pending: the segment must not go before a
        // checkpoint covering it is on disk, or a crash would number new
        // segments from it again.
        let idle = !wal.writing.get()
            && !wal.log.borrow().has_unsynced()
            && wal.nothing_in_the_log_to_send()
            && wal.pending_checkpoint.get().is_none();
        if idle {
            let freed = wal.log.borrow_mut().release_idle_head();
            if !freed.is_empty() {
                delete_segments(&shard, &wal, freed, false).await;
                remove_spares(&wal).await;
            }
        }
        if done()
            && wal.pending_checkpoint.get().is_none()
            && wal.pending_delete.borrow().is_empty()
        {
            break;
        }
        if checkpoint.is_some() && !wal.writer_done.get() {
            let wanted = wal.space_wanted.notified();
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = wanted => {}
            }
        }
    }
}

/// Writes the checkpoint slot and syncs it.
async fn persist_checkpoint(wal: &Wal, c: CheckpointSlot) {
    let slot = format::encode_checkpoint(c).to_vec();
    let (res, _) = wal
        .checkpoint_file
        .write_all_at(slot, format::checkpoint_slot_offset(c.seq))
        .await;
    let synced = match res {
        Ok(()) => wal.checkpoint_file.sync_data().await,
        Err(e) => Err(e),
    };
    if let Err(e) = synced {
        tracing::warn!(dir = %wal.dir.display(), error = %e, "cannot write the checkpoint; acknowledged batches may be sent again after a restart");
    }
}

/// Retires segments whose batches were all acknowledged: each is kept as a
/// spare for a later segment while fewer than SPARE_SEGMENTS are and the
/// cap leaves room for them (`recycle`), else deleted.
async fn delete_segments(shard: &SinkCtx, wal: &Wal, delete: Vec<u64>, recycle: bool) {
    if delete.is_empty() {
        return;
    }
    for id in delete {
        let file = wal.files.borrow_mut().remove(&id);
        drop(file);
        let path = wal.segment_path(id);
        let spares = wal.spares.borrow().len() as u64;
        let room = wal.log.borrow().bytes() + (spares + 2) * wal.segment_bytes <= wal.max_bytes;
        if recycle && !wal.disk_trouble.get() && spares < format::SPARE_SEGMENTS as u64 && room {
            let spare = wal.dir.join(format::spare_file_name(id));
            match crate::io::rename(&path, &spare).await {
                Ok(()) => {
                    wal.spares.borrow_mut().push(spare);
                    continue;
                }
                Err(e) => {
                    tracing::debug!(path = %path.display(), error = %e, "cannot keep a segment as a spare; deleting it")
                }
            }
        }
        if let Err(e) = crate::io::remove_file(&path).await {
            tracing::warn!(path = %path.display(), error = %e, "cannot delete an acknowledged segment");
        }
    }
    shard.metrics.sinks[wal.sink]
        .wal_bytes
        .set(wal.log.borrow().bytes() as i64);
    wal.space.notify_waiters();
}

async fn sender<O: Deliver>(shard: Rc<SinkCtx>, wal: Rc<Wal>, mut out: O) {
    let plan = &shard.plan.sinks[wal.sink];
    let counters = &shard.metrics.sinks[wal.sink];
    let mut buf = FrameBuf(shard.new_payload().into_buffer());
    let mut backoff = Backoff::new(plan.retry);
    let give_up = Duration::from_millis(shard.plan.shutdown_timeout_ms / 2);
    let stopping_now = || wal.stop_deadline(shard.sink_stopping(wal.sink), give_up);
    let mut give_up_at: Option<tokio::time::Instant> = None;
    let mut log_failing = LogEvery::new(Duration::from_secs(10));
    // The sink did not take what was left by the give-up.
    let mut gave_up = false;
    loop {
        let next = wal.next_to_send();
        let Some((d, live)) = next else {
            if wal.closing.get() && !wal.log.borrow().has_unsynced() && wal.syncer_idle.get() {
                break;
            }
            wait_until(&wal.durable, || {
                !wal.nothing_to_send() || (wal.closing.get() && !wal.log.borrow().has_unsynced())
            })
            .await;
            if wal.nothing_to_send() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            continue;
        };
        let Durable {
            id,
            archive_len,
            frame,
            records: kept_records,
            ..
        } = d;
        // Never written (write_when = "behind"): no log to acknowledge it
        // to, and, while it is sent, no longer waiting in memory.
        let memory_only = wal.is_memory(id);
        if memory_only {
            wal.memory_held.set(
                wal.memory_held
                    .get()
                    .saturating_sub(frame_bytes(archive_len as usize)),
            );
            counters.wal_memory_bytes.set(wal.memory_held.get() as i64);
        }
        // From memory when the writer kept the frame; else read back.
        let from_memory = frame.is_some();
        if let Some(f) = frame {
            if !memory_only {
                wal.held_frames.set(wal.held_frames.get() - 1);
            }
            let old = std::mem::replace(&mut buf, f);
            give_back(&wal, old);
        } else {
            let seg = wal.files.borrow().get(&id.segment).cloned();
            let Some(Seg { file, .. }) = seg else {
                tracing::error!(sink = %plan.name, segment = id.segment, "a durable batch's segment is gone; skipped");
                counters.wal_damaged_frames.add(1);
                ack(&wal, id);
                continue;
            };
            let frame_len = frame_bytes(archive_len as usize);
            if buf.0.capacity() < frame_len {
                buf.0.reserve(frame_len - buf.0.len());
            }
            buf.0.clear();
            let (res, slice) = file.read_exact_at(buf.slice(0..frame_len), id.offset).await;
            buf = slice.into_inner();
            counters.wal_read_batches.add(1);
            if let Err(e) = res {
                tracing::warn!(sink = %plan.name, segment = id.segment, error = %e, "cannot read the disk buffer; retrying");
                let again = Durable {
                    id,
                    archive_len,
                    frame: None,
                    records: kept_records,
                    at: tokio::time::Instant::now() - PACE_AFTER,
                };
                if live && wal.pacing.get() {
                    wal.live.borrow_mut().push_front(again);
                } else {
                    wal.to_send.borrow_mut().push_front(again);
                }
                tokio::time::sleep(backoff.next_delay()).await;
                continue;
            }
        }
        let archive = &buf.0[FRAME_HEADER_BYTES..FRAME_HEADER_BYTES + archive_len as usize];
        // A frame read back is checked against its CRC; one kept in memory
        // is the one just written.
        let header_ok = from_memory
            || wal.files.borrow().get(&id.segment).is_some_and(|s| {
                format::frame_header_matches(
                    &buf.0[..FRAME_HEADER_BYTES],
                    id.segment,
                    s.nonce,
                    archive,
                )
            });
        // A segment written before records carried meta (log version 2)
        // holds archives of the older shape; frames kept in memory are new.
        let no_meta = !from_memory
            && wal
                .files
                .borrow()
                .get(&id.segment)
                .is_some_and(|s| s.no_meta);
        let checked = match (header_ok, no_meta) {
            (false, _) => None,
            (true, false) => crate::record::access(archive).ok().map(Stored::Now),
            (true, true) => crate::record::access_v2(archive).ok().map(Stored::NoMeta),
        };
        let Some(a) = checked else {
            tracing::error!(sink = %plan.name, segment = id.segment, offset = id.offset,
                "a batch in the disk buffer is damaged; skipped (counted)");
            counters.wal_damaged_frames.add(1);
            ack(&wal, id);
            continue;
        };
        if out.takes_batches() {
            // The request encodes the archive in place; the http output
            // acknowledges the batch when its request succeeds. An old
            // archive is copied first (once, after an upgrade).
            let copied;
            let view = match a {
                Stored::Now(a) => crate::record::BatchView::Framed { batch: a, archive },
                Stored::NoMeta(a) => {
                    copied = crate::record::Batch::from_v2(a);
                    crate::record::BatchView::Native(&copied)
                }
            };
            // A submit waits while the output's window is full; once the
            // collector stops, for `give_up` at most (also when it began
            // waiting before).
            let stop = async {
                wait_until(&wal.durable, || stopping_now().is_some()).await;
                tokio::time::sleep_until(stopping_now().expect("stopping")).await;
            };
            let taken = tokio::select! {
                _ = out.submit(view, id) => true,
                _ = stop => false,
            };
            if !taken {
                tracing::warn!(sink = %plan.name, shard = shard.id,
                    "the sink did not take the disk buffer before shutdown; it is kept and replayed at the next start");
                if memory_only {
                    hold_again(&wal, counters, id, archive_len, kept_records, &mut buf);
                }
                gave_up = true;
                break;
            }
            if memory_only {
                counters.wal_memory_batches.add(1);
            }
            if memory_only && wal.memory_acked_early.take() != Some(id.offset) {
                // Kept until the output acknowledges it, to be written to
                // the log if it has not when the collector stops.
                let fresh = wal
                    .free_frames
                    .borrow_mut()
                    .pop()
                    .unwrap_or_else(|| FrameBuf(shard.new_payload().into_buffer()));
                let f = std::mem::replace(&mut buf, fresh);
                wal.memory_in_flight.borrow_mut().insert(
                    id.offset,
                    Durable {
                        id,
                        archive_len,
                        frame: Some(f),
                        records: kept_records,
                        at: tokio::time::Instant::now(),
                    },
                );
            }
            continue;
        }
        let (p, records) = match a {
            Stored::Now(a) => (a.payload.as_slice(), a.entries.len()),
            Stored::NoMeta(a) => (a.payload.as_slice(), a.entries.len()),
        };
        let start = p.as_ptr() as usize - buf.0.as_ptr() as usize;
        let (start, end) = (start, start + p.len());
        // Stopping: no new write starts after the give-up time; one under
        // way finishes (a write cut off would tear the batch upstream).
        if give_up_at.is_none() {
            give_up_at = stopping_now();
        }
        // A batch only in memory goes to the log if the sink fails to
        // take it for a while.
        let spill_at = match (memory_only, give_up_at) {
            (true, None) => Some(tokio::time::Instant::now() + SPILL_AFTER_FAILING),
            _ => give_up_at,
        };
        // The payload is sent as it lies in the read buffer.
        match out.deliver(&shard, buf.slice(start..end), spill_at).await {
            Ok(slice) => buf = slice.into_inner(),
            Err(slice) if memory_only => {
                buf = slice.into_inner();
                hold_again(&wal, counters, id, archive_len, kept_records, &mut buf);
                if give_up_at.is_some() {
                    gave_up = true;
                    break;
                }
                if let Some(held) = log_failing.ready() {
                    tracing::info!(sink = %plan.name, shard = shard.id, suppressed = held,
                        "the sink is failing: what the disk buffer held in memory is written to the disk");
                }
                // The writer takes it (unless it is itself waiting, for
                // space or for the end: then it is tried again meanwhile).
                wal.spill_wanted.set(true);
                wal.spill_notify.notify_one();
                if !wal.closing.get() {
                    let spilled = wait_until(&wal.durable, || !wal.spill_wanted.get());
                    let _ = tokio::time::timeout(SPILL_AFTER_FAILING, spilled).await;
                }
                continue;
            }
            Err(_) => {
                tracing::warn!(sink = %plan.name, shard = shard.id,
                    "the sink did not take the disk buffer before shutdown; it is kept and replayed at the next start");
                buf = FrameBuf(AlignedVec::new());
                gave_up = true;
                break;
            }
        }
        counters.records.add(records as u64);
        counters.bytes.add((end - start) as u64);
        counters.batches.add(1);
        if memory_only {
            counters.wal_memory_batches.add(1);
        } else {
            ack(&wal, id);
        }
    }
    drop(buf);
    // Past the give-up, the output's close (which waits for its requests
    // in flight, then writes its dead letters) gets half of what is left of
    // the budget: what it leaves in flight is for the next start (batches
    // in the log are replayed, those in memory written by the writer).
    if gave_up {
        let _ = tokio::time::timeout(give_up / 2, out.close(&shard)).await;
    } else {
        out.close(&shard).await;
    }
    wal.sender_done.set(true);
    wal.sender_exited.notify_waiters();
}

/// Puts a batch kept in memory that the sink did not take back in front of
/// the sender's queue, its frame taken from `buf` (the sender's buffer).
fn hold_again(
    wal: &Wal,
    counters: &SinkCounters,
    id: BatchId,
    archive_len: u32,
    records: u32,
    buf: &mut FrameBuf,
) {
    let frame = std::mem::replace(buf, FrameBuf(AlignedVec::new()));
    wal.memory_held
        .set(wal.memory_held.get() + frame_bytes(archive_len as usize));
    counters.wal_memory_bytes.set(wal.memory_held.get() as i64);
    wal.to_send.borrow_mut().push_front(Durable {
        id,
        archive_len,
        frame: Some(frame),
        records,
        at: tokio::time::Instant::now(),
    });
}

/// A batch archive read back from the log, in the shape its segment's
/// version wrote.
enum Stored<'a> {
    Now(&'a crate::record::ArchivedBatch),
    NoMeta(&'a crate::record::ArchivedBatchV2),
}

/// Acknowledges a batch to the log and hands the keeper what it made due.
/// Returns the bytes of the segments it emptied (deleted by the keeper).
fn ack(wal: &Wal, id: BatchId) -> u64 {
    if wal.is_memory(id) {
        // Never written: nothing to acknowledge to the log.
        match wal.memory_in_flight.borrow_mut().remove(&id.offset) {
            Some(d) => {
                if let Some(f) = d.frame {
                    give_back(wal, f);
                }
            }
            // Within its submit: it is not kept.
            None => wal.memory_acked_early.set(Some(id.offset)),
        }
        return 0;
    }
    let outcome = wal.log.borrow_mut().ack(id);
    if let Some(c) = outcome.checkpoint {
        wal.pending_checkpoint.set(Some(c));
    }
    wal.pending_delete.borrow_mut().extend(outcome.delete);
    wal.wake_keeper.notify_one();
    outcome.freed
}
