//! The log's state machine, free of I/O: it is told about appends, completed
//! syncs and acknowledgements, and says where to write, what is durable, what
//! checkpoint to persist and which segments to delete. The driver does the
//! writing, syncing and deleting and reports back.
//!
//! Positions are [`BatchId`]s, (segment, frame offset), ordered as the log
//! is. Every appended batch moves through three states: *written* (in a
//! segment, not yet synced), *durable* (a sync covering it completed; the
//! sender may read it), *acknowledged* (the sink delivered it). The
//! checkpoint is the highest acknowledged id with every id before it
//! acknowledged too. A segment other than the head is deleted once all of it
//! is acknowledged, before the checkpoint reaches it or not: nothing in it
//! is replayed either way.
//!
//! Bounds: the bytes on disk never pass `max_bytes` (an append that would is
//! refused with [`Full`]); the bookkeeping is one entry per unacknowledged
//! batch, so it is bounded by `max_bytes` over the smallest frame.

use super::format::{frame_bytes, CheckpointSlot, SEGMENT_HEADER_BYTES};
use std::collections::VecDeque;

/// Where a batch lies in the log, and its stable id.
pub use crate::pipeline::BatchId;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogConfig {
    /// A segment is closed once it holds this many bytes.
    pub segment_bytes: u64,
    /// The most bytes all segments may hold.
    pub max_bytes: u64,
    /// Written-but-unsynced bytes that make a sync due at once.
    pub sync_bytes: u64,
}

/// The log refused an append: it would pass `max_bytes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Full;

/// Where to write an appended frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Append {
    pub id: BatchId,
    /// Bytes of the whole frame (header, archive, padding).
    pub frame_bytes: u64,
    /// A new segment to create (with its header) before writing the frame.
    pub create_segment: Option<u64>,
}

/// A sync the driver is to perform: `fdatasync` each of `segments`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncPlan {
    pub segments: Vec<u64>,
    written: usize,
}

/// What an acknowledgement makes due.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AckOutcome {
    /// The checkpoint moved: persist it.
    pub checkpoint: Option<CheckpointSlot>,
    /// Segments now wholly acknowledged: delete them (after the checkpoint
    /// is persisted).
    pub delete: Vec<u64>,
    /// The bytes those segments held.
    pub freed: u64,
}

#[derive(Debug, Clone)]
struct Segment {
    id: u64,
    /// Bytes in the file, header included.
    bytes: u64,
    /// Frames not yet acknowledged.
    unacked: u32,
    /// A sync covered a frame in it (or recovery found it): its file and
    /// header are on disk, so the next start numbers new segments after it.
    durable: bool,
}

/// A segment as recovery found it.
#[derive(Debug, Clone)]
pub struct Recovered {
    pub id: u64,
    /// Where its valid data ends (the file is truncated there).
    pub end: u64,
    /// Offsets of its valid frames, in order.
    pub frames: Vec<u64>,
}

#[derive(Debug)]
pub struct Log {
    cfg: LogConfig,
    /// Oldest first; the back is the head being written.
    segments: VecDeque<Segment>,
    /// Whether the head may take more frames (false after recovery: new
    /// data goes to a fresh segment).
    head_open: bool,
    next_segment: u64,
    total_bytes: u64,
    /// Appended, not yet covered by a sync, in order.
    written: VecDeque<BatchId>,
    unsynced_bytes: u64,
    /// Segments written since the last sync began.
    dirty: Vec<u64>,
    /// Durable and not yet acknowledged, in log order, with an acked flag
    /// for acknowledgements that came out of order.
    outstanding: VecDeque<(BatchId, bool)>,
    checkpoint: Option<BatchId>,
    checkpoint_seq: u64,
}

impl Log {
    pub fn new(cfg: LogConfig) -> Log {
        Log {
            cfg,
            segments: VecDeque::new(),
            head_open: false,
            next_segment: 0,
            total_bytes: 0,
            written: VecDeque::new(),
            unsynced_bytes: 0,
            dirty: Vec::new(),
            outstanding: VecDeque::new(),
            checkpoint: None,
            checkpoint_seq: 0,
        }
    }

    /// Rebuilds the log from what recovery found; returns it and the
    /// batches to replay (everything after the checkpoint), in order.
    /// Segments with nothing to replay are listed in `delete` of the outcome.
    pub fn recover(
        cfg: LogConfig,
        mut found: Vec<Recovered>,
        checkpoint: Option<CheckpointSlot>,
    ) -> (Log, Vec<BatchId>, Vec<u64>) {
        found.sort_by_key(|s| s.id);
        let mut log = Log::new(cfg);
        let after = checkpoint.map(|c| BatchId {
            segment: c.segment,
            offset: c.offset,
        });
        log.checkpoint = after;
        log.checkpoint_seq = checkpoint.map_or(0, |c| c.seq);
        // New segments number after the checkpoint even when every segment
        // was deleted: an id at or before it would be skipped by the next
        // replay (and would repeat an idempotency key already delivered).
        log.next_segment = after.map_or(0, |a| a.segment + 1);
        let mut replay = Vec::new();
        let mut delete = Vec::new();
        for s in &found {
            let ids: Vec<BatchId> = s
                .frames
                .iter()
                .map(|&offset| BatchId {
                    segment: s.id,
                    offset,
                })
                .filter(|id| after.is_none_or(|a| *id > a))
                .collect();
            log.next_segment = log.next_segment.max(s.id + 1);
            if ids.is_empty() {
                delete.push(s.id);
                continue;
            }
            log.segments.push_back(Segment {
                id: s.id,
                bytes: s.end,
                unacked: ids.len() as u32,
                durable: true,
            });
            log.total_bytes += s.end;
            for id in ids {
                log.outstanding.push_back((id, false));
                replay.push(id);
            }
        }
        (log, replay, delete)
    }

    /// New segments get ids above `id` (a spare's old id: a reused file
    /// must never hold frames that look like its new segment's).
    pub fn number_after(&mut self, id: u64) {
        self.next_segment = self.next_segment.max(id + 1);
    }

    /// Bytes the segments hold.
    pub fn bytes(&self) -> u64 {
        self.total_bytes
    }

    pub fn checkpoint(&self) -> Option<BatchId> {
        self.checkpoint
    }

    /// Batches appended or replayed but not yet acknowledged.
    pub fn unacknowledged(&self) -> usize {
        self.outstanding.iter().filter(|(_, a)| !a).count() + self.written.len()
    }

    /// Durable batches not yet acknowledged: those the sender has still to
    /// deliver (what is written and waits for a sync is not counted).
    pub fn durable_unacknowledged(&self) -> usize {
        self.outstanding.iter().filter(|(_, a)| !a).count()
    }

    /// Places a frame for an archive of `archive_len` bytes.
    pub fn append(&mut self, archive_len: usize) -> Result<Append, Full> {
        let frame = frame_bytes(archive_len) as u64;
        let roll = match self.segments.back() {
            Some(head) => {
                !self.head_open
                    || (head.bytes + frame > self.cfg.segment_bytes
                        && head.bytes > SEGMENT_HEADER_BYTES as u64)
            }
            None => true,
        };
        let new_bytes = frame + if roll { SEGMENT_HEADER_BYTES as u64 } else { 0 };
        if self.total_bytes + new_bytes > self.cfg.max_bytes {
            return Err(Full);
        }
        let create_segment = if roll {
            let id = self.next_segment;
            self.next_segment += 1;
            self.segments.push_back(Segment {
                id,
                bytes: SEGMENT_HEADER_BYTES as u64,
                unacked: 0,
                durable: false,
            });
            self.head_open = true;
            self.total_bytes += SEGMENT_HEADER_BYTES as u64;
            Some(id)
        } else {
            None
        };
        let head = self.segments.back_mut().expect("a head segment");
        let id = BatchId {
            segment: head.id,
            offset: head.bytes,
        };
        head.bytes += frame;
        head.unacked += 1;
        self.total_bytes += frame;
        Ok(Append {
            id,
            frame_bytes: frame,
            create_segment,
        })
    }

    /// Whether an archive of `archive_len` bytes would be placed right after
    /// the last append, in the same segment, without passing `max_bytes`:
    /// frames that do can be written together with it in one write.
    pub fn fits_head(&self, archive_len: usize) -> bool {
        let frame = frame_bytes(archive_len) as u64;
        match self.segments.back() {
            Some(head) => {
                self.head_open
                    && head.bytes + frame <= self.cfg.segment_bytes
                    && self.total_bytes + frame <= self.cfg.max_bytes
            }
            None => false,
        }
    }

    /// The frame of `a` is written (not yet synced): the next sync covers it.
    pub fn wrote(&mut self, a: Append) {
        debug_assert!(self.written.back().is_none_or(|w| *w < a.id));
        self.unsynced_bytes += a.frame_bytes;
        self.written.push_back(a.id);
        if self.dirty.last() != Some(&a.id.segment) {
            self.dirty.push(a.id.segment);
        }
    }

    /// Takes back the last append, whose write failed: its bytes are free
    /// and the next append goes to the same place.
    pub fn abandon(&mut self, a: Append) {
        let head = self.segments.back_mut().expect("a head segment");
        assert_eq!(
            (head.id, head.bytes),
            (a.id.segment, a.id.offset + a.frame_bytes),
            "only the last append can be abandoned"
        );
        head.bytes -= a.frame_bytes;
        head.unacked -= 1;
        self.total_bytes -= a.frame_bytes;
    }

    /// Closes the head segment (after a failed write, so that a full disk
    /// can be freed): the next append starts a new segment, and the head is
    /// deleted as soon as it is wholly acknowledged; returned at once if it
    /// already is.
    ///
    /// A head with no frame in it stays open: the next append goes to that
    /// same segment (its file is reused), so retrying on a full disk does
    /// not leave a new empty segment behind each time.
    pub fn seal_head(&mut self) -> Vec<u64> {
        if self
            .segments
            .back()
            .is_some_and(|head| head.bytes == SEGMENT_HEADER_BYTES as u64)
        {
            return Vec::new();
        }
        self.head_open = false;
        match self.segments.back() {
            Some(head) if self.segments.len() == 1 && head.unacked == 0 => {
                let s = self.segments.pop_back().expect("checked");
                self.total_bytes -= s.bytes;
                vec![s.id]
            }
            _ => Vec::new(),
        }
    }

    /// Deletes the head segment if it is the only one and wholly
    /// acknowledged (the writer being idle): on a disk shared with other
    /// logs, an idle log should not hold space it no longer needs. The next
    /// append starts a new segment.
    pub fn release_idle_head(&mut self) -> Vec<u64> {
        match self.segments.back() {
            Some(head)
                if self.segments.len() == 1
                    && head.unacked == 0
                    && head.bytes > SEGMENT_HEADER_BYTES as u64 =>
            {
                self.head_open = false;
                let s = self.segments.pop_back().expect("checked");
                self.total_bytes -= s.bytes;
                vec![s.id]
            }
            _ => Vec::new(),
        }
    }

    /// Whether enough is written that a sync should run now.
    pub fn sync_due(&self) -> bool {
        self.unsynced_bytes >= self.cfg.sync_bytes
    }

    /// Whether anything waits for a sync.
    pub fn has_unsynced(&self) -> bool {
        !self.written.is_empty()
    }

    /// Starts a sync of everything written so far.
    pub fn begin_sync(&mut self) -> SyncPlan {
        self.unsynced_bytes = 0;
        SyncPlan {
            segments: std::mem::take(&mut self.dirty),
            written: self.written.len(),
        }
    }

    /// A sync completed: what it covered is durable. Returns the ids that
    /// became durable, in order.
    pub fn synced(&mut self, plan: SyncPlan) -> Vec<BatchId> {
        let now: Vec<BatchId> = self.written.drain(..plan.written).collect();
        self.outstanding.extend(now.iter().map(|&id| (id, false)));
        let mut last = None;
        for id in &now {
            if last != Some(id.segment) {
                last = Some(id.segment);
                if let Some(s) = self.segments.iter_mut().find(|s| s.id == id.segment) {
                    s.durable = true;
                }
            }
        }
        now
    }

    /// A sink delivered batch `id` (durable). Acknowledgements may come in
    /// any order; the checkpoint moves over the contiguous prefix.
    pub fn ack(&mut self, id: BatchId) -> AckOutcome {
        let mut out = AckOutcome::default();
        let Ok(i) = self.outstanding.binary_search_by(|(x, _)| x.cmp(&id)) else {
            return out; // unknown or already acknowledged: nothing to do
        };
        if self.outstanding[i].1 {
            return out;
        }
        self.outstanding[i].1 = true;
        if let Some(s) = self.segments.iter_mut().find(|s| s.id == id.segment) {
            s.unacked -= 1;
        }
        let mut moved = None;
        while let Some(&(front, true)) = self.outstanding.front() {
            self.outstanding.pop_front();
            moved = Some(front);
        }
        if let Some(c) = moved {
            self.checkpoint = Some(c);
            self.checkpoint_seq += 1;
            out.checkpoint = Some(CheckpointSlot {
                seq: self.checkpoint_seq,
                segment: c.segment,
                offset: c.offset,
            });
        }
        let bounds = self.deletion_bounds();
        let (freed, delete) = (&mut out.freed, &mut out.delete);
        self.segments.retain(|s| {
            let gone = s.unacked == 0 && bounds.allow(s.id);
            if gone {
                *freed += s.bytes;
                delete.push(s.id);
            }
            !gone
        });
        self.total_bytes -= out.freed;
        out
    }

    fn deletion_bounds(&self) -> DeletionBounds {
        DeletionBounds {
            open_head: self
                .segments
                .back()
                .filter(|_| self.head_open)
                .map(|h| h.id),
            checkpoint: self.checkpoint.map(|c| c.segment),
            last_durable: self.segments.iter().rev().find(|s| s.durable).map(|s| s.id),
        }
    }

    /// If acknowledging `waiting` more batches of segment `id` would leave
    /// none in it unacknowledged and let it be deleted: the bytes it frees.
    pub fn would_free(&self, id: u64, waiting: u32) -> Option<u64> {
        let s = self.segments.iter().find(|s| s.id == id)?;
        let b = self.deletion_bounds();
        // The front is covered by the checkpoint once all of it is acked.
        let front = self.segments.front().is_some_and(|f| f.id == id);
        let allowed = b.allow(id) || (front && b.open_head != Some(id));
        (s.unacked == waiting && allowed).then_some(s.bytes)
    }
}

/// What decides whether a wholly acknowledged segment may be deleted.
struct DeletionBounds {
    open_head: Option<u64>,
    checkpoint: Option<u64>,
    last_durable: Option<u64>,
}

impl DeletionBounds {
    /// Whether segment `id`, once wholly acknowledged, may be deleted: not
    /// the open head (it is being written), and either the checkpoint has
    /// reached it, or it lies before a segment on disk that stays (acks out
    /// of order, batches dropped by `when_full = "drop_oldest"` around one
    /// in flight). Either way nothing in it is replayed, and the next start
    /// numbers new segments after it: a reused number would repeat batch
    /// ids a sink has seen (idempotency keys, message ids).
    fn allow(&self, id: u64) -> bool {
        self.open_head != Some(id)
            && (self.checkpoint.is_some_and(|c| id <= c)
                || self.last_durable.is_some_and(|d| id < d))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: u64 = SEGMENT_HEADER_BYTES as u64;

    fn cfg() -> LogConfig {
        LogConfig {
            segment_bytes: H + 3 * frame_bytes(100) as u64,
            max_bytes: 100_000,
            sync_bytes: 2 * frame_bytes(100) as u64,
        }
    }

    /// Appends and reports the write done, as the driver does.
    fn put(log: &mut Log, len: usize) -> Result<Append, Full> {
        let a = log.append(len)?;
        log.wrote(a);
        Ok(a)
    }

    fn sync_all(log: &mut Log) -> Vec<BatchId> {
        let plan = log.begin_sync();
        log.synced(plan)
    }

    #[test]
    fn append_places_frames_and_rolls_over() {
        let mut log = Log::new(cfg());
        let a = put(&mut log, 100).unwrap();
        assert_eq!(a.create_segment, Some(0));
        assert_eq!(
            a.id,
            BatchId {
                segment: 0,
                offset: H
            }
        );
        let b = put(&mut log, 100).unwrap();
        assert_eq!(b.id.offset, H + frame_bytes(100) as u64);
        assert_eq!(b.create_segment, None);
        put(&mut log, 100).unwrap();
        let d = put(&mut log, 100).unwrap();
        assert_eq!(
            d.create_segment,
            Some(1),
            "the fourth frame does not fit segment 0"
        );
        assert_eq!(
            d.id,
            BatchId {
                segment: 1,
                offset: H
            }
        );
    }

    #[test]
    fn fits_head_says_which_appends_follow_the_last_one_in_its_segment() {
        let mut log = Log::new(cfg());
        assert!(
            !log.fits_head(100),
            "no segment yet: the next append creates one"
        );
        let a = log.append(100).unwrap();
        assert!(log.fits_head(100));
        assert!(
            !log.fits_head(4 * frame_bytes(100)),
            "too big for the rest of the segment"
        );
        let b = log.append(100).unwrap();
        assert_eq!(b.id.offset, a.id.offset + a.frame_bytes, "contiguous");
        log.append(100).unwrap();
        assert!(
            !log.fits_head(100),
            "segment 0 is full: the next append rolls"
        );
        let d = log.append(100).unwrap();
        assert_eq!(d.create_segment, Some(1));
        // Abandoned in reverse order, as a failed group write does.
        log.abandon(d);
        assert!(log.fits_head(100), "the abandoned place is free again");
        assert_eq!(log.append(100).unwrap().id, d.id);
        let mut small = Log::new(LogConfig {
            max_bytes: H + frame_bytes(100) as u64,
            ..cfg()
        });
        small.append(100).unwrap();
        assert!(!small.fits_head(100), "the cap is reached");
    }

    #[test]
    fn group_commit_makes_batches_durable_together() {
        let mut log = Log::new(cfg());
        let a = put(&mut log, 100).unwrap();
        assert!(!log.sync_due());
        let b = put(&mut log, 100).unwrap();
        assert!(log.sync_due(), "two frames reach sync_bytes");
        let plan = log.begin_sync();
        assert_eq!(plan.segments, vec![0]);
        // Written while the sync runs: not covered by it.
        let c = put(&mut log, 100).unwrap();
        assert_eq!(log.synced(plan), vec![a.id, b.id]);
        assert!(log.has_unsynced());
        assert_eq!(sync_all(&mut log), vec![c.id]);
    }

    #[test]
    fn out_of_order_acks_move_the_checkpoint_over_the_contiguous_prefix() {
        let mut log = Log::new(cfg());
        let ids: Vec<BatchId> = (0..3).map(|_| put(&mut log, 100).unwrap().id).collect();
        sync_all(&mut log);
        let o = log.ack(ids[1]);
        assert_eq!(o.checkpoint, None, "batch 0 is still out");
        let o = log.ack(ids[0]);
        let c = o.checkpoint.unwrap();
        assert_eq!((c.segment, c.offset), (ids[1].segment, ids[1].offset));
        assert_eq!(
            log.ack(ids[0]),
            AckOutcome::default(),
            "a repeated ack changes nothing"
        );
        assert_eq!(log.ack(ids[2]).checkpoint.unwrap().seq, 2);
    }

    #[test]
    fn acknowledged_segments_are_deleted_but_not_the_head() {
        let mut log = Log::new(cfg());
        let ids: Vec<BatchId> = (0..4).map(|_| put(&mut log, 100).unwrap().id).collect();
        sync_all(&mut log);
        let before = log.bytes();
        let mut deleted = Vec::new();
        for id in &ids[..3] {
            deleted.extend(log.ack(*id).delete);
        }
        assert_eq!(deleted, vec![0]);
        assert_eq!(log.bytes(), before - (H + 3 * frame_bytes(100) as u64));
        assert!(log.ack(ids[3]).delete.is_empty(), "segment 1 is the head");
    }

    #[test]
    fn a_wholly_acknowledged_segment_goes_before_the_checkpoint_reaches_it() {
        let mut log = Log::new(cfg());
        // Three segments of three frames; the head is the third, and its
        // one frame is not durable yet.
        let ids: Vec<BatchId> = (0..6).map(|_| put(&mut log, 100).unwrap().id).collect();
        sync_all(&mut log);
        let last = put(&mut log, 100).unwrap().id;
        let seg = H + 3 * frame_bytes(100) as u64;
        let before = log.bytes();
        // Batch 0 is out (with a sink); segment 1 is acknowledged whole.
        assert_eq!(log.would_free(0, 2), None, "batch 0 is out");
        assert_eq!(log.would_free(1, 3), None, "no segment after it is on disk");
        for id in &ids[3..6] {
            let o = log.ack(*id);
            assert_eq!(o.checkpoint, None, "batch 0 is still out");
            assert!(
                o.delete.is_empty(),
                "nothing after segment 1 is on disk for sure: a crash now \
                 would number new segments from 1 again"
            );
        }
        // The head's frame is synced: segment 1 can go (at the next ack).
        sync_all(&mut log);
        assert_eq!(log.would_free(1, 0), Some(seg));
        assert_eq!(log.would_free(0, 1), None, "one would be left");
        let o = log.ack(ids[1]);
        assert_eq!((o.delete, o.freed), (vec![1], seg));
        assert_eq!(log.bytes(), before - seg);
        // The open head stays however much of it is acknowledged.
        assert!(log.ack(last).delete.is_empty());
        assert_eq!(log.would_free(2, 0), None);
        // The rest of segment 0 delivered: it goes, the checkpoint jumps
        // over segment 1 to the head's frame, and the head still stays.
        log.ack(ids[2]);
        let o = log.ack(ids[0]);
        assert_eq!(o.delete, vec![0]);
        let c = o.checkpoint.unwrap();
        assert_eq!((c.segment, c.offset), (last.segment, last.offset));
        assert_eq!(log.bytes(), H + frame_bytes(100) as u64);
    }

    #[test]
    fn the_cap_refuses_appends_until_acks_free_space() {
        let mut log = Log::new(LogConfig {
            segment_bytes: H + frame_bytes(100) as u64,
            max_bytes: 2 * (H + frame_bytes(100) as u64),
            sync_bytes: 1,
        });
        let a = put(&mut log, 100).unwrap();
        put(&mut log, 100).unwrap();
        assert_eq!(put(&mut log, 100), Err(Full));
        sync_all(&mut log);
        assert_eq!(log.ack(a.id).delete, vec![0]);
        assert!(put(&mut log, 100).is_ok());
    }

    #[test]
    fn a_sealed_head_is_deleted_once_acknowledged_and_the_next_append_rolls() {
        let mut log = Log::new(cfg());
        let a = put(&mut log, 100).unwrap();
        assert!(
            log.seal_head().is_empty(),
            "batch a is not acknowledged yet"
        );
        sync_all(&mut log);
        assert_eq!(log.ack(a.id).delete, vec![0]);
        assert_eq!(log.bytes(), 0);
        assert_eq!(put(&mut log, 100).unwrap().create_segment, Some(1));
        // Sealing a wholly acknowledged head deletes it at once.
        let b = log.bytes();
        sync_all(&mut log);
        log.ack(BatchId {
            segment: 1,
            offset: H,
        });
        assert_eq!(log.bytes(), b);
        assert_eq!(log.seal_head(), vec![1]);
        assert_eq!(log.bytes(), 0);
    }

    #[test]
    fn a_failed_first_write_keeps_its_empty_segment_for_the_retry() {
        let mut log = Log::new(cfg());
        let a = log.append(100).unwrap();
        assert_eq!(a.create_segment, Some(0));
        log.abandon(a);
        assert!(log.seal_head().is_empty());
        let again = log.append(100).unwrap();
        assert_eq!((again.id, again.create_segment), (a.id, None));
    }

    #[test]
    fn an_idle_acknowledged_head_is_released() {
        let mut log = Log::new(cfg());
        let a = put(&mut log, 100).unwrap();
        assert!(log.release_idle_head().is_empty(), "not acknowledged yet");
        sync_all(&mut log);
        log.ack(a.id);
        assert_eq!(log.release_idle_head(), vec![0]);
        assert_eq!(log.bytes(), 0);
        assert_eq!(put(&mut log, 100).unwrap().create_segment, Some(1));
    }

    #[test]
    fn an_abandoned_append_is_written_again_in_the_same_place() {
        let mut log = Log::new(cfg());
        put(&mut log, 100).unwrap();
        let b = log.append(100).unwrap();
        let bytes = log.bytes();
        log.abandon(b);
        assert_eq!(log.bytes(), bytes - b.frame_bytes);
        assert_eq!(put(&mut log, 100).unwrap().id, b.id);
    }

    #[test]
    fn recovery_replays_after_the_checkpoint_and_drops_finished_segments() {
        let found = vec![
            Recovered {
                id: 4,
                end: 500,
                frames: vec![32, 160, 288],
            },
            Recovered {
                id: 3,
                end: 300,
                frames: vec![32, 160],
            },
        ];
        let cp = CheckpointSlot {
            seq: 9,
            segment: 4,
            offset: 32,
        };
        let (mut log, replay, delete) = Log::recover(cfg(), found.clone(), Some(cp));
        assert_eq!(delete, vec![3]);
        assert_eq!(
            replay,
            vec![
                BatchId {
                    segment: 4,
                    offset: 160
                },
                BatchId {
                    segment: 4,
                    offset: 288
                }
            ]
        );
        // New data goes to a new segment, after the recovered ones.
        assert_eq!(put(&mut log, 100).unwrap().create_segment, Some(5));
        // Acks of the replay finish segment 4, which is then deleted.
        log.ack(replay[0]);
        let o = log.ack(replay[1]);
        assert_eq!(o.checkpoint.unwrap().seq, 11);
        assert_eq!(o.delete, vec![4]);

        // Every segment deleted, the checkpoint kept: new ids come after it,
        // so the next replay does not skip them.
        let (mut empty, replay, _) = Log::recover(cfg(), Vec::new(), Some(cp));
        assert!(replay.is_empty());
        assert_eq!(put(&mut empty, 100).unwrap().create_segment, Some(5));

        // No checkpoint (missing or damaged): everything replays.
        let (_, replay, delete) = Log::recover(cfg(), found, None);
        assert_eq!(replay.len(), 5);
        assert!(delete.is_empty());
    }
}
