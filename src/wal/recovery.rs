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
//! - spare segments (retired files kept for reuse) are kept, up to
//!   `SPARE_SEGMENTS`; their contents are never read;
//! - the checkpoint file is given both its slots up front.

use super::format::{self, decode_checkpoint, parse_segment_file_name, scan};
use super::machine::{BatchId, Log, LogConfig, Recovered};
use std::collections::HashMap;
use std::path::Path;

/// An I/O error with the path it happened on, so the message names it.
fn at(path: &Path) -> impl Fn(std::io::Error) -> std::io::Error + '_ {
    move |e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

/// What recovery found and the log it rebuilt.
pub struct Recovery {
    pub log: Log,
    /// Batches to send before new data: id, archive length and records
    /// (0 if the archive does not validate: the sender skips it, counted).
    pub replay: Vec<(BatchId, u32, u32)>,
    /// Segments kept (to open for reading).
    pub segments: Vec<u64>,
    pub bad_frames: u64,
    pub damaged_segments: u64,
    /// Segments whose tail was a write cut short (truncated), and the bytes
    /// cut: their records are lost (a torn frame cannot say how many).
    pub torn_tails: u64,
    pub torn_bytes: u64,
    /// Retired segment files kept for reuse (at most `SPARE_SEGMENTS`).
    pub spares: Vec<std::path::PathBuf>,
    /// The nonce of each kept segment (frame headers are checked with it).
    pub nonces: HashMap<u64, u32>,
    /// The format version of each kept segment (version 2 archives lack
    /// the records' meta).
    pub versions: HashMap<u64, u32>,
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
    std::fs::create_dir_all(dir).map_err(at(dir))?;
    let checkpoint_path = dir.join("checkpoint");
    let checkpoint_bytes = match std::fs::read(&checkpoint_path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(at(&checkpoint_path)(e)),
    };
    preallocate_checkpoint(&checkpoint_path, checkpoint_bytes.len())
        .map_err(at(&checkpoint_path))?;
    let checkpoint = decode_checkpoint(&checkpoint_bytes);
    let never_acked = checkpoint_bytes.iter().all(|&b| b == 0);
    let names: Vec<String> = std::fs::read_dir(dir)
        .map_err(at(dir))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    let mut ids: Vec<u64> = names
        .iter()
        .filter_map(|n| parse_segment_file_name(n))
        .collect();
    let mut spares = Vec::new();
    let mut spare_ids = Vec::new();
    for name in names.iter().filter(|n| format::is_spare_file_name(n)) {
        spare_ids.extend(name.split('.').next().and_then(|d| d.parse::<u64>().ok()));
        let path = dir.join(name);
        if spares.len() < format::SPARE_SEGMENTS && path.is_file() {
            spares.push(path);
        } else {
            std::fs::remove_file(&path).map_err(at(&path))?;
        }
    }
    ids.sort_unstable();
    if !ids.is_empty() && checkpoint.is_none() && !never_acked {
        tracing::warn!(sink, shard, dir = %dir.display(),
            "the checkpoint is damaged: replaying the whole disk buffer (the sink may see duplicates)");
    }
    let mut found = Vec::new();
    let mut set_aside: Vec<u64> = Vec::new();
    let mut lens: HashMap<BatchId, (u32, u32)> = HashMap::new();
    // Archives are validated in an aligned copy (rkyv needs the alignment a
    // file read into a plain vector does not promise) to learn how many
    // records each holds: a batch dropped unsent (`when_full =
    // "drop_oldest"`) is counted by its records.
    let mut aligned = rkyv::util::AlignedVec::<16>::new();
    let mut nonces: HashMap<u64, u32> = HashMap::new();
    let mut versions: HashMap<u64, u32> = HashMap::new();
    let (mut bad_frames, mut damaged_segments) = (0u64, 0u64);
    let (mut torn_tails, mut torn_bytes) = (0u64, 0u64);
    for id in ids {
        let path = dir.join(format::segment_file_name(id));
        let bytes = std::fs::read(&path).map_err(at(&path))?;
        let s = match scan(id, &bytes) {
            Ok(s) => s,
            Err(e) => {
                damaged_segments += 1;
                let aside = path.with_extension("wal.damaged");
                tracing::error!(sink, shard, path = %path.display(), error = %e,
                    "segment unreadable: set aside as {}", aside.display());
                std::fs::rename(&path, &aside).map_err(at(&path))?;
                set_aside.push(id);
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
            std::fs::write(&aside, &bytes[at as usize..]).map_err(self::at(&aside))?;
        }
        if s.end < bytes.len() as u64 {
            if s.stale_bytes > 0 {
                tracing::debug!(sink, shard, path = %path.display(), bytes = s.stale_bytes,
                    "reused segment: frames from its previous use cut off");
            } else if s.lost_at.is_none() {
                tracing::warn!(sink, shard, path = %path.display(), bytes = s.torn_bytes,
                    "torn tail (a write cut short by a crash): truncated; the records in it are lost (counted in updraft_sink_wal_torn_tails_total)");
                torn_tails += 1;
                torn_bytes += s.torn_bytes;
            }
            let cut = || {
                let f = std::fs::OpenOptions::new().write(true).open(&path)?;
                f.set_len(s.end)?;
                f.sync_all()
            };
            cut().map_err(self::at(&path))?;
        }
        nonces.insert(id, s.nonce);
        versions.insert(id, s.version);
        for fr in &s.frames {
            aligned.clear();
            aligned.extend_from_slice(&bytes[fr.archive_at..fr.archive_at + fr.len]);
            let records = if s.version == format::VERSION_NO_META {
                crate::record::access_v2(&aligned).map(|a| a.entries.len())
            } else {
                crate::record::access(&aligned).map(|a| a.entries.len())
            };
            lens.insert(
                BatchId {
                    segment: id,
                    offset: fr.offset,
                },
                (fr.len as u32, records.unwrap_or(0) as u32),
            );
        }
        found.push(Recovered {
            id,
            end: s.end,
            frames: s.frames.iter().map(|f| f.offset).collect(),
        });
    }
    let (mut log, replay, delete) = Log::recover(cfg, found, checkpoint);
    // New segments number after the spares' old ids too, and after
    // segments set aside as damaged (now or at an earlier start): their
    // batch ids may have reached a sink.
    let damaged = names.iter().filter_map(|n| {
        let stem = n
            .strip_suffix(".damaged")
            .or_else(|| n.strip_suffix(".damaged-tail"))?;
        parse_segment_file_name(stem)
    });
    if let Some(max) = spare_ids
        .iter()
        .copied()
        .chain(damaged)
        .chain(set_aside.iter().copied())
        .max()
    {
        log.number_after(max);
    }
    for id in &delete {
        let path = dir.join(format::segment_file_name(*id));
        std::fs::remove_file(&path).map_err(at(&path))?;
    }
    let mut segments: Vec<u64> = replay.iter().map(|b| b.segment).collect();
    segments.dedup();
    Ok(Recovery {
        log,
        replay: replay
            .into_iter()
            .map(|id| (id, lens[&id].0, lens[&id].1))
            .collect(),
        segments,
        bad_frames,
        damaged_segments,
        torn_tails,
        torn_bytes,
        spares,
        nonces,
        versions,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal::format::{frame_bytes, frame_header, segment_header, SEGMENT_HEADER_BYTES};

    fn frames(id: u64, reused: bool, archives: &[&[u8]]) -> Vec<u8> {
        let nonce = 1000 + id as u32;
        let mut b = segment_header(id, nonce, reused).to_vec();
        for a in archives {
            let at = b.len();
            b.extend_from_slice(&frame_header(id, nonce, a));
            b.extend_from_slice(a);
            b.resize(at + frame_bytes(a.len()), 0);
        }
        b
    }

    #[test]
    fn a_reused_segment_replays_only_what_was_written_since() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = LogConfig {
            segment_bytes: 1 << 20,
            max_bytes: 16 << 20,
            sync_bytes: 1 << 20,
        };
        // Segment 3 was retired and its file reused as segment 7, of which
        // two frames were written before the crash; segment 3's last two
        // frames still lie past them. A spare waits too.
        let old = frames(3, false, &[b"a3", &[b'x'; 9000], b"c3", b"d3"]);
        let new = frames(7, true, &[b"a7", b"b7"]);
        let mut file = old.clone();
        file[..new.len()].copy_from_slice(&new);
        std::fs::write(dir.path().join(format::segment_file_name(7)), &file).unwrap();
        std::fs::write(dir.path().join(format::spare_file_name(8)), &old).unwrap();
        let r = recover(dir.path(), cfg, "up", 0).unwrap();
        let replayed: Vec<u64> = r.replay.iter().map(|(id, ..)| id.offset).collect();
        let h = SEGMENT_HEADER_BYTES as u64;
        assert_eq!(replayed, vec![h, h + frame_bytes(2) as u64]);
        assert!(
            r.replay
                .iter()
                .all(|(id, len, records)| id.segment == 7 && *len == 2 && *records == 0),
            "(these archives are not batches: no records counted)"
        );
        assert_eq!((r.bad_frames, r.damaged_segments), (0, 0));
        assert_eq!(r.spares, vec![dir.path().join(format::spare_file_name(8))]);
        assert_eq!(r.nonces[&7], 1007);
        // The old frames are cut off, so the next append goes right after.
        let len = std::fs::metadata(dir.path().join(format::segment_file_name(7)))
            .unwrap()
            .len();
        assert_eq!(len, new.len() as u64);
        // New segments number after the spare's old id (8), not after 7.
        let mut log = r.log;
        assert_eq!(log.append(10).unwrap().create_segment, Some(9));
    }
}
