//! The write-ahead log on disk. This comment is the specification.
//!
//! A sink's log on one shard lives in `data_dir/<sink>/<shard>/`: segment files
//! named by their id (`00000000000000000007.wal`, 20 decimal digits, ids
//! increase by one) and one `checkpoint` file. All integers are little-endian.
//!
//! ## Segment
//!
//! ```text
//! offset size field
//!      0    8 magic      b"UPDRWAL\0"
//!      8    4 version    3 (2 is read too)
//!     12    4 flags      bit 0: written over a retired segment's file
//!     16    8 segment    the id in the file name
//!     24    4 nonce      random, new for every segment (and every reuse)
//!     28    4 crc32c     of bytes 0..28
//!     32      zeros up to 4096
//!   4096      frames, each starting at a multiple of FRAME_ALIGN (4096)
//! ```
//!
//! Frames and the header are whole 4096-byte blocks so that they can be
//! written with `O_DIRECT` (no page-cache copy, no writeback later); a batch
//! smaller than a block is padded to one.
//!
//! ## Frame
//!
//! ```text
//! offset size field
//!      0    4 len        bytes of the archive, 1..=FRAME_BYTES_MAX
//!      4    4 crc32c     of the archive
//!      8    4 segment    low 32 bits of the segment's id
//!     12    4 hcrc       crc32c of bytes 0..12 followed by the segment's nonce
//!     16   48 reserved   0
//!     64  len archive    the rkyv archive of one `record::Batch`
//!         pad up to the next multiple of 4096
//! ```
//!
//! The archive starts with the batch's payload (the records, newline
//! delimited), so the payload starts on a 64-byte boundary: it is handed to
//! sinks as it lies in the frame, and copying it into a socket is much
//! slower from memory that is not cache-line aligned (measured: the same
//! tcp→tcp run spent 26% of its time in the kernel's copy with the payload
//! 16 bytes off a line, and disk mode went 20% faster once aligned).
//!
//! A batch's stable id is (segment, frame offset). Frames are only appended;
//! a segment is retired whole once every frame in it is acknowledged.
//!
//! A retired segment file may be *reused*: given a new header (with the
//! reused flag and a new nonce), renamed to a later id and written over
//! from its start (writes that overwrite allocated blocks need no
//! file-system metadata change, so they and the syncs after them are cheaper
//! than writes that extend a file). Past the new data such a file still
//! holds bytes from its previous use — old frames, or the middle of one.
//! No old header passes the check of the new nonce (and record bytes cannot
//! forge one: the nonce is never shown), so in a reused segment a header
//! that fails its check is the end of the data. The price: in a reused
//! segment a damaged frame header cannot be told from that end, so the
//! frames after it are not replayed (a damaged *archive* still costs only
//! its own frame). (Version 1 segments, with 16-byte frame headers, are not
//! read: a pre-release format, set aside like a damaged segment.)
//!
//! Version 3 changed only the archive: a batch carries a third array, the
//! records' meta (`record::Batch`). Version 2 segments have the same framing
//! and are still replayed after an upgrade, their archives read as
//! `record::BatchV2`; new segments are always written as version 3.
//!
//! ## Reading back
//!
//! [`scan`] walks a segment's bytes and classifies what it finds:
//! - a frame header of zeros, or a frame that runs past the end of the file,
//!   is the end of the written data (a crash mid-write leaves a *torn tail*):
//!   the segment is truncated there;
//! - a frame whose archive fails its CRC (a flipped bit) is counted and
//!   skipped: its length field is still believed because its header is
//!   plausible;
//! - a header that is not plausible (its check fails, it names another
//!   segment, or the length is over the maximum): in a reused segment, the
//!   end of the written data; in a fresh one the framing is lost: the frames
//!   before it are kept, the rest of the segment is set aside (renamed
//!   `.damaged`) and counted;
//! - a bad segment header sets the whole file aside.
//!
//! ## Checkpoint
//!
//! Two 32-byte slots; a write goes to slot `seq % 2`, then fdatasync, so one
//! slot always holds a whole earlier checkpoint:
//!
//! ```text
//! offset size field
//!      0    8 seq        increases with every write
//!      8    8 segment    of the highest batch acknowledged with all before it
//!     16    8 offset     of that batch's frame
//!     24    4 crc32c     of bytes 0..24
//!     28    4 reserved   0
//! ```
//!
//! On start the valid slot with the higher `seq` wins. No valid slot means
//! replay from the oldest segment: duplicates, never loss.

use crate::record::{crc32c, crc32c_append};

/// Segment magic.
pub const MAGIC: [u8; 8] = *b"UPDRWAL\0";
pub const VERSION: u32 = 3;
/// The oldest version still read: its archives lack the records' meta.
pub const VERSION_NO_META: u32 = 2;
/// The segment header's block; its first 32 bytes are the header proper.
pub const SEGMENT_HEADER_BYTES: usize = 4096;
pub const FRAME_HEADER_BYTES: usize = 64;
/// Frames start on this boundary and are padded to it: the block size that
/// `O_DIRECT` needs on common file systems and devices.
pub const FRAME_ALIGN: usize = 4096;
/// An archive starts FRAME_HEADER_BYTES into its frame: rkyv needs 16, a
/// cache line 64.
const _: () = assert!(FRAME_HEADER_BYTES.is_multiple_of(64));
/// A batch is archived in place behind room for exactly one frame header,
/// in a buffer aligned as a frame must be.
const _: () = assert!(crate::record::HEADROOM == FRAME_HEADER_BYTES);
const _: () = assert!(crate::record::PAYLOAD_ALIGN == FRAME_ALIGN);
/// The largest archive a frame may carry.
pub const FRAME_BYTES_MAX: usize = 512 * 1024 * 1024;
pub const CHECKPOINT_SLOT_BYTES: usize = 32;
pub const CHECKPOINT_BYTES: usize = 2 * CHECKPOINT_SLOT_BYTES;

const _: () = assert!(SEGMENT_HEADER_BYTES.is_multiple_of(FRAME_ALIGN));

/// Bytes a frame takes for an archive of `len` bytes, padding included.
pub const fn frame_bytes(len: usize) -> usize {
    (FRAME_HEADER_BYTES + len).div_ceil(FRAME_ALIGN) * FRAME_ALIGN
}

/// Retired segment files kept for reuse at most, per sink and shard.
pub const SPARE_SEGMENTS: usize = 2;

/// The file name of segment `id`.
pub fn segment_file_name(id: u64) -> String {
    format!("{id:020}.wal")
}

/// The file name of a retired segment kept for reuse (it was segment `id`).
pub fn spare_file_name(id: u64) -> String {
    format!("{id:020}.spare")
}

/// Whether `name` is a spare segment's file name.
pub fn is_spare_file_name(name: &str) -> bool {
    name.strip_suffix(".spare")
        .is_some_and(|d| d.len() == 20 && d.bytes().all(|b| b.is_ascii_digit()))
}

/// The id in a segment file name, if it is one.
pub fn parse_segment_file_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".wal")?;
    (digits.len() == 20 && digits.bytes().all(|b| b.is_ascii_digit()))
        .then(|| digits.parse().ok())
        .flatten()
}

/// The segment header block.
pub fn segment_header(id: u64, nonce: u32, reused: bool) -> [u8; SEGMENT_HEADER_BYTES] {
    let mut h = [0u8; SEGMENT_HEADER_BYTES];
    h[0..8].copy_from_slice(&MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&(reused as u32).to_le_bytes());
    h[16..24].copy_from_slice(&id.to_le_bytes());
    h[24..28].copy_from_slice(&nonce.to_le_bytes());
    let crc = crc32c(&h[0..28]);
    h[28..32].copy_from_slice(&crc.to_le_bytes());
    h
}

/// The frame header for `archive` in segment `segment` (with `nonce`).
pub fn frame_header(segment: u64, nonce: u32, archive: &[u8]) -> [u8; FRAME_HEADER_BYTES] {
    let mut h = [0u8; FRAME_HEADER_BYTES];
    h[0..4].copy_from_slice(&(archive.len() as u32).to_le_bytes());
    h[4..8].copy_from_slice(&crc32c(archive).to_le_bytes());
    place_frame_header(&mut h, segment, nonce);
    h
}

fn header_check(h: &[u8], nonce: u32) -> u32 {
    crc32c_append(crc32c(&h[0..12]), &nonce.to_le_bytes())
}

/// Completes a header whose length and archive CRC are written (the
/// expensive part, done before the frame's place is known) with the segment
/// it goes to and the header's own CRC.
pub fn place_frame_header(h: &mut [u8], segment: u64, nonce: u32) {
    h[8..12].copy_from_slice(&(segment as u32).to_le_bytes());
    let check = header_check(h, nonce);
    h[12..16].copy_from_slice(&check.to_le_bytes());
}

/// Whether `header` is the header of `archive` in segment `segment`.
pub fn frame_header_matches(header: &[u8], segment: u64, nonce: u32, archive: &[u8]) -> bool {
    header == frame_header(segment, nonce, archive)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// A frame found by [`scan`]: where its archive lies in the segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameRef {
    /// Offset of the frame (its id within the segment).
    pub offset: u64,
    /// Offset of the archive.
    pub archive_at: usize,
    pub len: usize,
}

/// What [`scan`] found in a segment.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Scan {
    pub frames: Vec<FrameRef>,
    /// Where the written data ends; the file is truncated here.
    pub end: u64,
    /// Frames skipped because their archive failed its CRC.
    pub bad_frames: u64,
    /// The framing was lost at this offset; what follows is set aside.
    pub lost_at: Option<u64>,
    /// Bytes past `end` that were a torn write.
    pub torn_bytes: u64,
    /// Bytes past `end` left from the file's previous use.
    pub stale_bytes: u64,
    /// The segment's nonce (frame headers are checked with it).
    pub nonce: u32,
    /// The segment's format version ([`VERSION`] or [`VERSION_NO_META`]).
    pub version: u32,
}

/// Why a segment cannot be read at all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SegmentError {
    #[error("segment header is short or damaged")]
    BadHeader,
    #[error("segment header names id {found}, the file name {expected}")]
    WrongId { expected: u64, found: u64 },
    #[error("segment version {0} is not supported")]
    Version(u32),
}

/// Walks a segment's bytes. Never panics on any input.
pub fn scan(id: u64, bytes: &[u8]) -> Result<Scan, SegmentError> {
    if bytes.len() < SEGMENT_HEADER_BYTES || bytes[0..8] != MAGIC {
        return Err(SegmentError::BadHeader);
    }
    let version = u32_at(bytes, 8);
    if version != VERSION && version != VERSION_NO_META {
        return Err(SegmentError::Version(version));
    }
    if crc32c(&bytes[0..28]) != u32_at(bytes, 28) {
        return Err(SegmentError::BadHeader);
    }
    let reused = u32_at(bytes, 12) & 1 == 1;
    let nonce = u32_at(bytes, 24);
    let found = u64_at(bytes, 16);
    if found != id {
        return Err(SegmentError::WrongId {
            expected: id,
            found,
        });
    }
    let mut scan = Scan {
        nonce,
        version,
        ..Scan::default()
    };
    let mut at = SEGMENT_HEADER_BYTES;
    loop {
        let rest = bytes.len() - at;
        if rest < FRAME_HEADER_BYTES {
            scan.torn_bytes = rest as u64;
            break;
        }
        let len = u32_at(bytes, at) as usize;
        let crc = u32_at(bytes, at + 4);
        let tail = u64_at(bytes, at + 8);
        if len == 0 && crc == 0 && tail == 0 {
            // Zeros: nothing was written here (or the write was torn before
            // its header reached the disk).
            scan.torn_bytes = rest as u64;
            break;
        }
        let plausible = header_check(&bytes[at..], nonce) == u32_at(bytes, at + 12)
            && u32_at(bytes, at + 8) == id as u32
            && len != 0
            && len <= FRAME_BYTES_MAX;
        if !plausible {
            if reused {
                // Bytes from the file's previous use: the data written
                // since ends here.
                scan.stale_bytes = rest as u64;
            } else {
                scan.lost_at = Some(at as u64);
            }
            break;
        }
        let size = frame_bytes(len);
        if size > rest {
            scan.torn_bytes = rest as u64;
            break;
        }
        let archive_at = at + FRAME_HEADER_BYTES;
        if crc32c(&bytes[archive_at..archive_at + len]) == crc {
            scan.frames.push(FrameRef {
                offset: at as u64,
                archive_at,
                len,
            });
        } else {
            scan.bad_frames += 1;
        }
        at += size;
    }
    scan.end = at as u64;
    Ok(scan)
}

/// A checkpoint: the highest batch acknowledged with every batch before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckpointSlot {
    pub seq: u64,
    pub segment: u64,
    pub offset: u64,
}

pub fn encode_checkpoint(c: CheckpointSlot) -> [u8; CHECKPOINT_SLOT_BYTES] {
    let mut s = [0u8; CHECKPOINT_SLOT_BYTES];
    s[0..8].copy_from_slice(&c.seq.to_le_bytes());
    s[8..16].copy_from_slice(&c.segment.to_le_bytes());
    s[16..24].copy_from_slice(&c.offset.to_le_bytes());
    let crc = crc32c(&s[0..24]);
    s[24..28].copy_from_slice(&crc.to_le_bytes());
    s
}

/// Where slot `seq` is written in the checkpoint file.
pub fn checkpoint_slot_offset(seq: u64) -> u64 {
    (seq % 2) * CHECKPOINT_SLOT_BYTES as u64
}

/// The newest valid slot of a checkpoint file, if any.
pub fn decode_checkpoint(bytes: &[u8]) -> Option<CheckpointSlot> {
    (0..2)
        .filter_map(|i| {
            let s = bytes.get(i * CHECKPOINT_SLOT_BYTES..(i + 1) * CHECKPOINT_SLOT_BYTES)?;
            if crc32c(&s[0..24]) != u32_at(s, 24) || s.iter().all(|&b| b == 0) {
                return None;
            }
            Some(CheckpointSlot {
                seq: u64_at(s, 0),
                segment: u64_at(s, 8),
                offset: u64_at(s, 16),
            })
        })
        .max_by_key(|c| c.seq)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_is_castagnoli_and_appends() {
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
        assert_eq!(crc32c(b""), 0);
        let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
        for cut in [0, 1, 15, 16 * 1024, 99_999, 100_000] {
            let (a, b) = data.split_at(cut);
            assert_eq!(crc32c_append(crc32c(a), b), crc32c(&data));
        }
        // The same function as the crc32c crate's (the format's first writer).
        assert_eq!(crc32c(&data), ::crc32c::crc32c(&data));
    }

    fn nonce_of(id: u64) -> u32 {
        (id as u32).wrapping_mul(2_654_435_761) ^ 0x5bd1_e995
    }

    fn segment_with(id: u64, archives: &[&[u8]]) -> Vec<u8> {
        written(id, false, archives)
    }

    fn written(id: u64, reused: bool, archives: &[&[u8]]) -> Vec<u8> {
        let mut b = segment_header(id, nonce_of(id), reused).to_vec();
        for a in archives {
            let at = b.len();
            b.extend_from_slice(&frame_header(id, nonce_of(id), a));
            b.extend_from_slice(a);
            b.resize(at + frame_bytes(a.len()), 0);
        }
        b
    }

    #[test]
    fn frames_are_found_in_order() {
        let seg = segment_with(3, &[b"one", b"second frame", b"3"]);
        let s = scan(3, &seg).unwrap();
        assert_eq!(s.frames.len(), 3);
        assert_eq!(
            &seg[s.frames[1].archive_at..][..s.frames[1].len],
            b"second frame"
        );
        assert_eq!(s.end as usize, seg.len());
        assert_eq!((s.bad_frames, s.lost_at, s.torn_bytes), (0, None, 0));
        assert!(s.frames.iter().all(|f| f.archive_at.is_multiple_of(16)));
        assert!(s
            .frames
            .iter()
            .all(|f| (f.offset as usize).is_multiple_of(FRAME_ALIGN)));
    }

    #[test]
    fn torn_tail_ends_the_data() {
        let seg = segment_with(1, &[b"kept", b"torn away"]);
        let cut = &seg[..seg.len() - 5];
        let s = scan(1, cut).unwrap();
        assert_eq!(s.frames.len(), 1);
        assert_eq!(s.end, frame_bytes(4) as u64 + SEGMENT_HEADER_BYTES as u64);
        assert!(s.torn_bytes > 0);
        // Zeros after the data (preallocation, or a header that never landed).
        let mut zeros = seg.clone();
        zeros.extend_from_slice(&[0u8; 64]);
        assert_eq!(scan(1, &zeros).unwrap().frames.len(), 2);
    }

    #[test]
    fn a_flipped_bit_skips_one_frame() {
        let mut seg = segment_with(1, &[b"aaaa", b"bbbb", b"cccc"]);
        let second_archive = SEGMENT_HEADER_BYTES + frame_bytes(4) + FRAME_HEADER_BYTES;
        seg[second_archive + 1] ^= 0x10;
        let s = scan(1, &seg).unwrap();
        assert_eq!(s.frames.len(), 2);
        assert_eq!(s.bad_frames, 1);
        assert_eq!(&seg[s.frames[1].archive_at..][..4], b"cccc");
    }

    #[test]
    fn lost_framing_keeps_what_came_before() {
        let mut seg = segment_with(1, &[b"aaaa", b"bbbb", b"cccc"]);
        let second = SEGMENT_HEADER_BYTES + frame_bytes(4);
        seg[second + 3] = 0xff; // length now far over the maximum
        let s = scan(1, &seg).unwrap();
        assert_eq!(s.frames.len(), 1);
        assert_eq!(s.lost_at, Some(second as u64));
    }

    #[test]
    fn a_reused_file_ends_where_its_new_data_ends() {
        // Segment 4 held frames of several sizes; reused as segment 9, one
        // small frame is written over its start, so the new data ends in
        // the middle of an old frame's archive.
        let big = vec![b'x'; 9000];
        let old = segment_with(4, &[&big, b"old two", b"old three"]);
        let new = written(9, true, &[b"new"]);
        let mut file = old.clone();
        file[..new.len()].copy_from_slice(&new);
        let s = scan(9, &file).unwrap();
        assert_eq!(s.frames.len(), 1);
        assert_eq!(&file[s.frames[0].archive_at..][..3], b"new");
        assert_eq!(s.end as usize, new.len());
        assert_eq!((s.bad_frames, s.lost_at), (0, None));
        assert_eq!(s.stale_bytes as usize, old.len() - new.len());
        // The new data ending where an old frame begins: the same.
        let new = written(9, true, &[&big]);
        let mut file = old.clone();
        file[..new.len()].copy_from_slice(&new);
        let s = scan(9, &file).unwrap();
        assert_eq!((s.frames.len(), s.lost_at), (1, None));
        // Nothing written yet over the old frames: an empty segment.
        let mut fresh = old.clone();
        fresh[..SEGMENT_HEADER_BYTES].copy_from_slice(&segment_header(9, nonce_of(9), true));
        assert!(scan(9, &fresh).unwrap().frames.is_empty());
        // Records cannot forge a frame: a header made without the nonce
        // fails, even with the right segment.
        let mut forged = new.clone();
        let end = forged.len();
        forged.extend_from_slice(&frame_header(9, 0, b"forged"));
        forged.extend_from_slice(b"forged");
        forged.resize(end + frame_bytes(6), 0);
        assert_eq!(scan(9, &forged).unwrap().frames.len(), 1);
    }

    #[test]
    fn in_a_fresh_segment_an_old_or_foreign_header_is_damage() {
        let mut seg = segment_with(2, &[b"aaaa"]);
        let end = seg.len();
        seg.extend_from_slice(&frame_header(1, nonce_of(1), b"bbbb"));
        seg.extend_from_slice(b"bbbb");
        seg.resize(end + frame_bytes(4), 0);
        let s = scan(2, &seg).unwrap();
        assert_eq!(s.frames.len(), 1);
        assert_eq!(s.lost_at, Some(end as u64));
    }

    #[test]
    fn a_damaged_frame_header_loses_the_framing() {
        let mut seg = segment_with(1, &[b"aaaa", b"bbbb", b"cccc"]);
        let second = SEGMENT_HEADER_BYTES + frame_bytes(4);
        seg[second + 8] ^= 0x04; // the segment field: caught by the header CRC
        let s = scan(1, &seg).unwrap();
        assert_eq!(s.frames.len(), 1);
        assert_eq!(s.lost_at, Some(second as u64));
    }

    #[test]
    fn version_1_segments_are_refused() {
        let mut seg = segment_with(5, &[b"first"]);
        seg[8..12].copy_from_slice(&1u32.to_le_bytes());
        let crc = crc32c(&seg[0..24]);
        seg[24..28].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(scan(5, &seg), Err(SegmentError::Version(1)));
    }

    #[test]
    fn version_2_segments_are_read_and_say_so() {
        let mut seg = segment_with(5, &[b"first"]);
        assert_eq!(scan(5, &seg).unwrap().version, VERSION);
        seg[8..12].copy_from_slice(&VERSION_NO_META.to_le_bytes());
        let crc = crc32c(&seg[0..28]);
        seg[28..32].copy_from_slice(&crc.to_le_bytes());
        let s = scan(5, &seg).unwrap();
        assert_eq!((s.version, s.frames.len()), (VERSION_NO_META, 1));
    }

    #[test]
    fn bad_headers_are_refused() {
        let seg = segment_with(1, &[b"x"]);
        assert_eq!(
            scan(2, &seg),
            Err(SegmentError::WrongId {
                expected: 2,
                found: 1
            })
        );
        let mut bad = seg.clone();
        bad[17] ^= 1;
        assert_eq!(scan(1, &bad), Err(SegmentError::BadHeader));
        assert_eq!(scan(1, &seg[..10]), Err(SegmentError::BadHeader));
    }

    #[test]
    fn checkpoint_keeps_the_newer_valid_slot() {
        let mut file = vec![0u8; CHECKPOINT_BYTES];
        assert_eq!(decode_checkpoint(&file), None);
        for seq in 1..=3u64 {
            let c = CheckpointSlot {
                seq,
                segment: seq * 10,
                offset: 32,
            };
            let at = checkpoint_slot_offset(seq) as usize;
            file[at..at + CHECKPOINT_SLOT_BYTES].copy_from_slice(&encode_checkpoint(c));
        }
        assert_eq!(decode_checkpoint(&file).unwrap().seq, 3);
        // A torn write of slot 3 leaves slot 2.
        let at = checkpoint_slot_offset(3) as usize;
        file[at + 9] ^= 0xff;
        assert_eq!(decode_checkpoint(&file).unwrap().segment, 20);
    }

    /// Damage anywhere: the scanner never panics, and every frame it keeps
    /// passes its checksum and lies inside the file.
    #[test]
    fn arbitrary_damage_never_panics() {
        let mut rng = fastrand::Rng::with_seed(32);
        let archives: Vec<Vec<u8>> = (0..6)
            .map(|i| vec![b'a' + i; 100 + 700 * i as usize])
            .collect();
        let refs: Vec<&[u8]> = archives.iter().map(|a| a.as_slice()).collect();
        let clean = segment_with(9, &refs);
        for _ in 0..500 {
            let mut seg = clean.clone();
            for _ in 0..rng.usize(1..4) {
                let at = rng.usize(0..seg.len());
                seg[at] = rng.u8(..);
            }
            seg.truncate(rng.usize(0..=seg.len()));
            if let Ok(s) = scan(9, &seg) {
                assert!(s.end as usize <= seg.len());
                for f in &s.frames {
                    let a = &seg[f.archive_at..f.archive_at + f.len];
                    assert!(
                        archives.iter().any(|x| x.as_slice() == a),
                        "a kept frame is intact"
                    );
                }
            }
        }
    }

    #[test]
    fn segment_names_round_trip() {
        assert_eq!(parse_segment_file_name(&segment_file_name(42)), Some(42));
        assert_eq!(parse_segment_file_name("42.wal"), None);
        assert_eq!(parse_segment_file_name("checkpoint"), None);
        assert!(is_spare_file_name(&spare_file_name(7)));
        assert_eq!(parse_segment_file_name(&spare_file_name(7)), None);
        assert!(!is_spare_file_name(&segment_file_name(7)));
    }
}
