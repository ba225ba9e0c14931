//! The native protocol between two updrafts (an edge's `updraft` sink and an
//! aggregator's `updraft` source). This comment is the specification.
//!
//! The wire unit is a batch as the write-ahead log frames it: the rkyv
//! archive of one `record::Batch` ([`crate::wal::format`]), sent as it lies
//! in the sender's log, checked by the receiver (CRC-32C, then bytecheck and
//! the bounds of every record, never trusting the peer) and acknowledged
//! once the records are durable in the receiver's disk buffers (or taken by
//! its memory buffers). All integers are little-endian.
//!
//! ## Connection
//!
//! The sender connects over TCP (TLS first, when configured) and sends a
//! HELLO; the receiver answers with a WELCOME. A receiver that does not
//! speak the sender's version answers with its own version and status 1,
//! and closes; each side logs both versions.
//!
//! ```text
//! HELLO (sender → receiver), 32 bytes
//! offset size field
//!      0    8 magic     b"UPDRHELO"
//!      8    2 version   1
//!     10    2 flags     0
//!     12    4 window    frames the sender keeps unacknowledged at most
//!     16    8 sender    the sender's id: random, kept in its data_dir
//!     24    4 stream    the sender's shard (one connection each)
//!     28    4 reserved  0
//!
//! WELCOME (receiver → sender), 24 bytes
//!      0    8 magic     b"UPDRWELC"
//!      8    2 version   the receiver's
//!     10    2 status    0: go on; 1: version not spoken (then closed)
//!     12    4 window    frames the receiver takes unacknowledged at most
//!     16    4 max_frame the longest archive it takes, in bytes
//!     20    4 reserved  0
//! ```
//!
//! ## Messages
//!
//! After the greeting, each message starts with a 4-byte tag.
//!
//! ```text
//! FRAME (sender → receiver): a 48-byte header, the archive, zeros up to a
//! multiple of 16 (so that every archive lies 16-byte aligned in the
//! receiver's buffer)
//!      0    4 tag       b"FRAM"
//!      4    4 len       bytes of the archive, 1..=max_frame
//!      8    4 crc32c    of the archive
//!     12    4 records   how many records the archive holds
//!     16    8 seq       the sender's number for this message (echoed by ACK)
//!     24    8 segment   } the batch's stable id in the sender's log: the
//!     32    8 offset    } same when the batch is sent again
//!     40    4 hcrc      crc32c of bytes 0..40
//!     44    4 reserved  0
//!     48  len archive
//!
//! PING (sender → receiver), 16 bytes: b"PING", 12 zero bytes. Sent when
//! idle; not answered.
//!
//! ACK (receiver → sender), 16 bytes
//!      0    4 tag       b"ACKD"
//!      4    4 status    0: taken; 1: a duplicate, taken before
//!      8    8 seq       of the FRAME acknowledged
//!
//! ERROR (receiver → sender): b"ERRO", len u32 (at most 1024), that many
//! bytes of UTF-8 reason; the receiver then closes the connection.
//! ```
//!
//! ## Guarantees
//!
//! The receiver acknowledges frames in the order they came. A frame is
//! acknowledged once every record of it is durable in each disk buffer the
//! source feeds (or queued, where a sink has a memory buffer). The sender
//! keeps each frame until acknowledged and sends the unacknowledged ones
//! again, in order, on its next connection (and after a restart, from its
//! disk buffer). Frame ids of one (sender, stream) increase; the receiver
//! remembers the highest id it acknowledged per (sender, stream) and
//! acknowledges a frame at or below it as a duplicate without taking its
//! records again (while it runs: after the receiver's restart, a resent
//! window may be taken twice, and is counted).
//!
//! A receiver closes a connection, counting it, on a bad magic or tag, a
//! length over its `max_frame`, a header or archive that fails its CRC, an
//! archive that fails validation, or a record count that does not match;
//! the sender logs the ERROR's reason and connects again.

/// The protocol version this build speaks.
pub const VERSION: u16 = 1;
pub const HELLO_MAGIC: &[u8; 8] = b"UPDRHELO";
pub const WELCOME_MAGIC: &[u8; 8] = b"UPDRWELC";
pub const HELLO_BYTES: usize = 32;
pub const WELCOME_BYTES: usize = 24;
pub const FRAME_TAG: &[u8; 4] = b"FRAM";
pub const PING_TAG: &[u8; 4] = b"PING";
pub const ACK_TAG: &[u8; 4] = b"ACKD";
pub const ERROR_TAG: &[u8; 4] = b"ERRO";
pub const FRAME_HEADER_BYTES: usize = 48;
pub const PING_BYTES: usize = 16;
pub const ACK_BYTES: usize = 16;
/// The longest reason an ERROR carries.
pub const ERROR_REASON_MAX: usize = 1024;
/// Frames are padded to a multiple of this.
pub const FRAME_ALIGN: usize = 16;

pub const PING: [u8; PING_BYTES] = *b"PING\0\0\0\0\0\0\0\0\0\0\0\0";

/// The sender's greeting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello {
    pub version: u16,
    pub window: u32,
    pub sender: u64,
    pub stream: u32,
}

/// The receiver's answer to a HELLO.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Welcome {
    pub version: u16,
    /// false: the receiver does not speak the sender's version.
    pub accepted: bool,
    pub window: u32,
    pub max_frame: u32,
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

impl Hello {
    pub fn encode(&self) -> [u8; HELLO_BYTES] {
        let mut b = [0u8; HELLO_BYTES];
        b[0..8].copy_from_slice(HELLO_MAGIC);
        b[8..10].copy_from_slice(&self.version.to_le_bytes());
        b[12..16].copy_from_slice(&self.window.to_le_bytes());
        b[16..24].copy_from_slice(&self.sender.to_le_bytes());
        b[24..28].copy_from_slice(&self.stream.to_le_bytes());
        b
    }

    /// Reads a HELLO from the front of `b`: `Ok(None)` when more bytes are
    /// needed.
    pub fn decode(b: &[u8]) -> Result<Option<Hello>, String> {
        if b.len() >= 8 && &b[..8] != HELLO_MAGIC {
            return Err("not an updraft sender (bad greeting)".into());
        }
        if b.len() < HELLO_BYTES {
            return Ok(None);
        }
        Ok(Some(Hello {
            version: u16_at(b, 8),
            window: u32_at(b, 12),
            sender: u64_at(b, 16),
            stream: u32_at(b, 24),
        }))
    }
}

impl Welcome {
    pub fn encode(&self) -> [u8; WELCOME_BYTES] {
        let mut b = [0u8; WELCOME_BYTES];
        b[0..8].copy_from_slice(WELCOME_MAGIC);
        b[8..10].copy_from_slice(&self.version.to_le_bytes());
        b[10..12].copy_from_slice(&u16::from(!self.accepted).to_le_bytes());
        b[12..16].copy_from_slice(&self.window.to_le_bytes());
        b[16..20].copy_from_slice(&self.max_frame.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<Option<Welcome>, String> {
        if b.len() >= 8 && &b[..8] != WELCOME_MAGIC {
            return Err("the peer is not an updraft receiver (bad greeting)".into());
        }
        if b.len() < WELCOME_BYTES {
            return Ok(None);
        }
        Ok(Some(Welcome {
            version: u16_at(b, 8),
            accepted: u16_at(b, 10) == 0,
            window: u32_at(b, 12),
            max_frame: u32_at(b, 16),
        }))
    }
}

/// A FRAME's header, read and checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub len: u32,
    pub crc: u32,
    pub records: u32,
    pub seq: u64,
    pub segment: u64,
    pub offset: u64,
}

impl FrameHeader {
    /// Bytes of the whole message: header, archive, padding.
    pub fn message_bytes(&self) -> usize {
        frame_bytes(self.len as usize)
    }
}

/// Bytes a FRAME with an archive of `len` bytes takes on the wire.
pub fn frame_bytes(len: usize) -> usize {
    (FRAME_HEADER_BYTES + len).div_ceil(FRAME_ALIGN) * FRAME_ALIGN
}

/// Appends a FRAME carrying `archive` to `out`.
pub fn put_frame(
    out: &mut Vec<u8>,
    seq: u64,
    segment: u64,
    offset: u64,
    records: u32,
    archive: &[u8],
) {
    let at = begin_frame(out);
    out.extend_from_slice(archive);
    finish_frame(out, at, seq, segment, offset, records);
}

/// Starts a FRAME at the end of `out` (which must end on a multiple of
/// [`FRAME_ALIGN`], as frames do): room for its header. The archive is then
/// appended (or serialised in place: its alignment inside `out` is the one
/// it has on the receiver's side), and [`finish_frame`] seals it. Returns
/// where the frame starts.
pub fn begin_frame(out: &mut Vec<u8>) -> usize {
    debug_assert!(out.len().is_multiple_of(FRAME_ALIGN));
    let at = out.len();
    out.extend_from_slice(&[0u8; FRAME_HEADER_BYTES]);
    at
}

/// Seals the FRAME begun at `at`: everything after its header is the
/// archive; writes the header and pads the frame.
pub fn finish_frame(
    out: &mut Vec<u8>,
    at: usize,
    seq: u64,
    segment: u64,
    offset: u64,
    records: u32,
) {
    let len = out.len() - at - FRAME_HEADER_BYTES;
    let crc = crate::record::crc32c(&out[at + FRAME_HEADER_BYTES..]);
    let h = &mut out[at..at + FRAME_HEADER_BYTES];
    h[0..4].copy_from_slice(FRAME_TAG);
    h[4..8].copy_from_slice(&(len as u32).to_le_bytes());
    h[8..12].copy_from_slice(&crc.to_le_bytes());
    h[12..16].copy_from_slice(&records.to_le_bytes());
    h[16..24].copy_from_slice(&seq.to_le_bytes());
    h[24..32].copy_from_slice(&segment.to_le_bytes());
    h[32..40].copy_from_slice(&offset.to_le_bytes());
    let hcrc = crate::record::crc32c(&h[..40]);
    h[40..44].copy_from_slice(&hcrc.to_le_bytes());
    let pad = frame_bytes(len) - FRAME_HEADER_BYTES - len;
    out.extend_from_slice(&[0u8; FRAME_ALIGN][..pad]);
}

/// What the receiver reads from the front of its buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inbound {
    Frame(FrameHeader),
    Ping,
}

/// Reads the next message's header from the front of `b` (`Ok(None)`: more
/// bytes are needed). An error says what is wrong; the connection is then
/// closed.
pub fn read_inbound(b: &[u8], max_frame: u32) -> Result<Option<Inbound>, &'static str> {
    if b.len() < 4 {
        return Ok(None);
    }
    match &b[..4] {
        t if t == PING_TAG => {
            if b.len() < PING_BYTES {
                return Ok(None);
            }
            Ok(Some(Inbound::Ping))
        }
        t if t == FRAME_TAG => {
            if b.len() < FRAME_HEADER_BYTES {
                return Ok(None);
            }
            if crate::record::crc32c(&b[..40]) != u32_at(b, 40) {
                return Err("a frame header failed its CRC");
            }
            let h = FrameHeader {
                len: u32_at(b, 4),
                crc: u32_at(b, 8),
                records: u32_at(b, 12),
                seq: u64_at(b, 16),
                segment: u64_at(b, 24),
                offset: u64_at(b, 32),
            };
            if h.len == 0 {
                return Err("an empty frame");
            }
            if h.len > max_frame {
                return Err("a frame longer than max_frame_bytes");
            }
            Ok(Some(Inbound::Frame(h)))
        }
        _ => Err("not a message of the updraft protocol (bad tag)"),
    }
}

/// Checks a FRAME's archive (which must lie 16-byte aligned) and gives
/// access to it in place: its CRC, rkyv's validation, the record count and
/// the bounds of every record and its meta, so nothing read from it later
/// can go out of bounds.
pub fn check_frame<'a>(
    h: &FrameHeader,
    archive: &'a [u8],
) -> Result<&'a crate::record::ArchivedBatch, &'static str> {
    if archive.len() != h.len as usize {
        return Err("a frame of the wrong length");
    }
    if crate::record::crc32c(archive) != h.crc {
        return Err("a frame failed its CRC");
    }
    let a = crate::record::access(archive).map_err(|_| "a frame's archive failed validation")?;
    if a.entries.len() != h.records as usize {
        return Err("a frame's record count does not match its archive");
    }
    let payload = a.payload.len() as u64;
    let mut meta = 0u64;
    for e in a.entries.iter() {
        let end = u64::from(e.offset.to_native()) + u64::from(e.len.to_native());
        if end > payload {
            return Err("a record lies outside its frame's payload");
        }
        meta += u64::from(e.meta_len.to_native());
    }
    if meta > a.meta.len() as u64 {
        return Err("a record's meta lies outside its frame");
    }
    Ok(a)
}

/// An ACK of message `seq` (`duplicate`: it was taken before).
pub fn ack(seq: u64, duplicate: bool) -> [u8; ACK_BYTES] {
    let mut b = [0u8; ACK_BYTES];
    b[0..4].copy_from_slice(ACK_TAG);
    b[4..8].copy_from_slice(&u32::from(duplicate).to_le_bytes());
    b[8..16].copy_from_slice(&seq.to_le_bytes());
    b
}

/// An ERROR carrying `why` (cut to [`ERROR_REASON_MAX`] bytes).
pub fn error(why: &str) -> Vec<u8> {
    let mut end = why.len().min(ERROR_REASON_MAX);
    while !why.is_char_boundary(end) {
        end -= 1;
    }
    let mut b = Vec::with_capacity(8 + end);
    b.extend_from_slice(ERROR_TAG);
    b.extend_from_slice(&(end as u32).to_le_bytes());
    b.extend_from_slice(&why.as_bytes()[..end]);
    b
}

/// What the sender reads from the receiver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    Ack { seq: u64, duplicate: bool },
    Error(String),
}

/// Reads the receiver's next message from the front of `b`: the answer and
/// its length, `Ok(None)` when more bytes are needed.
pub fn read_answer(b: &[u8]) -> Result<Option<(Answer, usize)>, String> {
    if b.len() < 4 {
        return Ok(None);
    }
    match &b[..4] {
        t if t == ACK_TAG => {
            if b.len() < ACK_BYTES {
                return Ok(None);
            }
            Ok(Some((
                Answer::Ack {
                    seq: u64_at(b, 8),
                    duplicate: u32_at(b, 4) == 1,
                },
                ACK_BYTES,
            )))
        }
        t if t == ERROR_TAG => {
            if b.len() < 8 {
                return Ok(None);
            }
            let n = u32_at(b, 4) as usize;
            if n > ERROR_REASON_MAX {
                return Err("the receiver sent an ERROR longer than the protocol allows".into());
            }
            if b.len() < 8 + n {
                return Ok(None);
            }
            let why = String::from_utf8_lossy(&b[8..8 + n]).into_owned();
            Ok(Some((Answer::Error(why), 8 + n)))
        }
        _ => Err("the receiver sent something that is not of the updraft protocol".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{archive_into, Batch};

    fn batch(n: usize) -> Batch {
        let mut b = Batch::with_capacity(n, n * 32);
        for i in 0..n {
            let meta = if i % 3 == 0 {
                &b"\x01\x02\x00ab"[..]
            } else {
                &[][..]
            };
            b.push(i as u64, 7, 1, format!("record {i}").as_bytes(), meta);
        }
        b
    }

    /// One FRAME message of `b`, as a sender writes it.
    fn message(b: &Batch, seq: u64) -> Vec<u8> {
        let a = archive_into(b, rkyv::util::AlignedVec::new()).expect("archive");
        let mut out = Vec::new();
        put_frame(&mut out, seq, 3, 4096, b.len() as u32, &a);
        out
    }

    /// Decodes one FRAME message as the receiver does (copying the archive
    /// to an aligned buffer).
    fn receive(m: &[u8], max: u32) -> Result<Option<Vec<Vec<u8>>>, &'static str> {
        let Some(Inbound::Frame(h)) = read_inbound(m, max)? else {
            return Ok(None);
        };
        if m.len() < h.message_bytes() {
            return Ok(None);
        }
        let mut al = rkyv::util::AlignedVec::<16>::new();
        al.extend_from_slice(&m[FRAME_HEADER_BYTES..FRAME_HEADER_BYTES + h.len as usize]);
        let a = check_frame(&h, &al)?;
        let mut out = Vec::new();
        crate::record::BatchView::Archived(a).for_each(|_, _, r, _| out.push(r.to_vec()));
        Ok(Some(out))
    }

    #[test]
    fn a_frame_goes_through_whole_and_padded() {
        let b = batch(10);
        let m = message(&b, 9);
        assert_eq!(m.len() % FRAME_ALIGN, 0);
        let Some(Inbound::Frame(h)) = read_inbound(&m, 1 << 20).unwrap() else {
            panic!("a frame")
        };
        assert_eq!((h.seq, h.segment, h.offset, h.records), (9, 3, 4096, 10));
        let got = receive(&m, 1 << 20).unwrap().unwrap();
        assert_eq!(got.len(), 10);
        assert_eq!(got[4], b"record 4");
        // Short reads ask for more.
        for cut in [0, 3, 20, FRAME_HEADER_BYTES - 1] {
            assert_eq!(read_inbound(&m[..cut], 1 << 20), Ok(None));
        }
    }

    #[test]
    fn greetings_and_answers_round_trip() {
        let h = Hello {
            version: VERSION,
            window: 8,
            sender: 0xdead_beef,
            stream: 1,
        };
        assert_eq!(Hello::decode(&h.encode()).unwrap(), Some(h));
        assert!(Hello::decode(b"GET / HTTP/1.1\r\n").is_err());
        let w = Welcome {
            version: 2,
            accepted: false,
            window: 8,
            max_frame: 1 << 20,
        };
        assert_eq!(Welcome::decode(&w.encode()).unwrap(), Some(w));
        let mut b = ack(5, true).to_vec();
        b.extend_from_slice(&error("no room"));
        let (a, n) = read_answer(&b).unwrap().unwrap();
        assert_eq!(
            a,
            Answer::Ack {
                seq: 5,
                duplicate: true
            }
        );
        let (e, m) = read_answer(&b[n..]).unwrap().unwrap();
        assert_eq!(e, Answer::Error("no room".into()));
        assert_eq!(n + m, b.len());
        assert_eq!(read_answer(&b[..3]), Ok(None));
    }

    #[test]
    fn damaged_frames_are_refused_with_a_reason() {
        let b = batch(20);
        let m = message(&b, 1);
        // A bit flipped in the archive: its CRC.
        let mut x = m.clone();
        x[FRAME_HEADER_BYTES + 5] ^= 1;
        assert_eq!(receive(&x, 1 << 20), Err("a frame failed its CRC"));
        // In the header: the header's CRC.
        let mut x = m.clone();
        x[5] ^= 1;
        assert_eq!(
            read_inbound(&x, 1 << 20),
            Err("a frame header failed its CRC")
        );
        // Longer than the receiver takes.
        assert_eq!(
            read_inbound(&m, 16),
            Err("a frame longer than max_frame_bytes")
        );
        assert!(read_inbound(b"GARBAGE!", 1 << 20).is_err());
    }

    /// A header re-sealed around `archive` (a hostile peer computes CRCs).
    fn forge(archive: &[u8], records: u32) -> Vec<u8> {
        let mut out = Vec::new();
        put_frame(&mut out, 1, 1, 1, records, archive);
        out
    }

    #[test]
    fn a_forged_archive_with_records_out_of_bounds_is_refused() {
        let mut b = batch(4);
        b.entries[2].len = 10_000;
        let a = archive_into(&b, rkyv::util::AlignedVec::new()).unwrap();
        assert_eq!(
            receive(&forge(&a, 4), 1 << 20),
            Err("a record lies outside its frame's payload")
        );
        let mut b = batch(4);
        b.entries[1].meta_len = 900;
        let a = archive_into(&b, rkyv::util::AlignedVec::new()).unwrap();
        assert_eq!(
            receive(&forge(&a, 4), 1 << 20),
            Err("a record's meta lies outside its frame")
        );
        let b = batch(4);
        let a = archive_into(&b, rkyv::util::AlignedVec::new()).unwrap();
        assert_eq!(
            receive(&forge(&a, 5), 1 << 20),
            Err("a frame's record count does not match its archive")
        );
    }

    /// Randomized: damaged and hostile frames (flipped bits, cut short,
    /// random bytes, and random archives under valid CRCs) never panic and
    /// are either refused or decoded within the frame's bounds.
    #[test]
    fn randomized_hostile_frames_never_panic() {
        let mut rng = fastrand::Rng::with_seed(0x5eed);
        let good = message(&batch(50), 1);
        for round in 0..20_000 {
            let mut m = match round % 4 {
                0 => {
                    let mut m = good.clone();
                    for _ in 0..rng.usize(1..8) {
                        let i = rng.usize(..m.len());
                        m[i] ^= 1 << rng.u8(..8);
                    }
                    m
                }
                1 => good[..rng.usize(..good.len())].to_vec(),
                2 => {
                    let n = rng.usize(..600);
                    (0..n).map(|_| rng.u8(..)).collect()
                }
                _ => {
                    // Valid CRCs around an archive with random bytes in it.
                    let a = &good[FRAME_HEADER_BYTES..];
                    let mut a = a[..u32_at(&good, 4) as usize].to_vec();
                    for _ in 0..rng.usize(1..16) {
                        let i = rng.usize(..a.len());
                        a[i] = rng.u8(..);
                    }
                    forge(&a, rng.u32(..60))
                }
            };
            if round % 7 == 0 && m.len() > 4 {
                m[..4].copy_from_slice(FRAME_TAG);
            }
            if let Ok(Some(records)) = receive(&m, 1 << 20) {
                assert!(records.iter().all(|r| r.len() <= m.len()));
            }
            let _ = read_answer(&m);
            let _ = Hello::decode(&m);
        }
    }
}
