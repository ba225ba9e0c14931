//! Opening a disk buffer at start: read every segment and the checkpoint,
//! mend what a crash or a bad disk left, and say what to replay.
//!
//! This runs once per sink and shard before the shard serves anything, with
//! plain blocking file calls (the shard has nothing else to do yet). What it
//! does to the files:
//! - a torn tail is truncated away;
//! - frames whose archive fails its CRC are counted and left in place (the
//!   scanner and the sender skip them);
//! - where the framing is lost, the rest of the segment is copied to
//!   `<segment>.wal.damaged-tail` and the segment truncated before it;
//! - a segment with a bad header is renamed `<segment>.wal.damaged`;
//! - segments with nothing after the checkpoint are deleted;
//! - the checkpoint file is given both its slots up front.

use super::format::{self, decode_checkpoint, parse_segment_file_name, scan};
use super::machine::{BatchId, Log, LogConfig, Recovered};
use std::collections::HashMap;
use std::path::Path;

/// What recovery found and the log it rebuilt.
pub struct Recovery {
    pub log: Log,
    /// Batches to send before new data: id and archive length.
    pub replay: Vec<(BatchId, u32)>,
    /// Segments kept (to open for reading).
    pub segments: Vec<u64>,
    pub bad_frames: u64,
    pub damaged_segments: u64,
}

/// Gives the checkpoint file its two slots in real (not sparse) blocks now,
/// so that writing a checkpoint later never needs new space: on a full disk
/// the checkpoint must still move, or no segment could ever be freed.
fn preallocate_checkpoint(path: &Path, len: usize) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    if len >= format::CHECKPOINT_BYTES {
        return Ok(());
    }
    let f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(false)
        .open(path)?;
    f.write_all_at(&[0u8; format::CHECKPOINT_BYTES][len..], len as u64)?;
    f.sync_all()
}

pub fn recover(dir: &Path, cfg: LogConfig, sink: &str, shard: usize) -> std::io::Result<Recovery> {
    std::fs::create_dir_all(dir)?;
    let checkpoint_bytes = std::fs::read(dir.join("checkpoint")).unwrap_or_default();
    preallocate_checkpoint(&dir.join("checkpoint"), checkpoint_bytes.len())?;
    let checkpoint = decode_checkpoint(&checkpoint_bytes);
    let never_acked = checkpoint_bytes.iter().all(|&b| b == 0);
    let mut ids: Vec<u64> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .filter_map(|e| parse_segment_file_name(&e.file_name().to_string_lossy()))
        .collect();
    ids.sort_unstable();
    if !ids.is_empty() && checkpoint.is_none() && !never_acked {
        tracing::warn!(sink, shard, dir = %dir.display(),
            "the checkpoint is damaged: replaying the whole disk buffer (the sink may see duplicates)");
    }
    let mut found = Vec::new();
    let mut lens: HashMap<BatchId, u32> = HashMap::new();
    let (mut bad_frames, mut damaged_segments) = (0u64, 0u64);
    for id in ids {
        let path = dir.join(format::segment_file_name(id));
        let bytes = std::fs::read(&path)?;
        let s = match scan(id, &bytes) {
            Ok(s) => s,
            Err(e) => {
                damaged_segments += 1;
                let aside = path.with_extension("wal.damaged");
                tracing::error!(sink, shard, path = %path.display(), error = %e,
                    "segment unreadable: set aside as {}", aside.display());
                std::fs::rename(&path, &aside)?;
                continue;
            }
        };
        if s.bad_frames > 0 {
            bad_frames += s.bad_frames;
            tracing::error!(sink, shard, path = %path.display(), frames = s.bad_frames,
                "frames failed their checksum: skipped (their records are lost)");
        }
        if let Some(at) = s.lost_at {
            damaged_segments += 1;
            let aside = path.with_extension("wal.damaged-tail");
            tracing::error!(sink, shard, path = %path.display(), offset = at,
                "framing lost: the rest of the segment is set aside as {}", aside.display());
            std::fs::write(&aside, &bytes[at as usize..])?;
        }
        if s.end < bytes.len() as u64 {
            if s.lost_at.is_none() {
                tracing::warn!(sink, shard, path = %path.display(), bytes = s.torn_bytes,
                    "torn tail (a write cut short by a crash): truncated");
            }
            let f = std::fs::OpenOptions::new().write(true).open(&path)?;
            f.set_len(s.end)?;
            f.sync_all()?;
        }
        for fr in &s.frames {
            lens.insert(
                BatchId {
                    segment: id,
                    offset: fr.offset,
                },
                fr.len as u32,
            );
        }
        found.push(Recovered {
            id,
            end: s.end,
            frames: s.frames.iter().map(|f| f.offset).collect(),
        });
    }
    let (log, replay, delete) = Log::recover(cfg, found, checkpoint);
    for id in &delete {
        std::fs::remove_file(dir.join(format::segment_file_name(*id)))?;
    }
    let mut segments: Vec<u64> = replay.iter().map(|b| b.segment).collect();
    segments.dedup();
    Ok(Recovery {
        log,
        replay: replay.into_iter().map(|id| (id, lens[&id])).collect(),
        segments,
        bad_frames,
        damaged_segments,
    })
}
