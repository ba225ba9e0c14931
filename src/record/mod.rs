//! Records and batches: the unit everything after the codec moves.
//!
//! A [`Batch`] is three reused buffers: `payload`, the records' bytes back to
//! back, each followed by one `\n`; `entries`, one fixed-size [`Entry`] per
//! record (receive time, payload offset and length, partition key hash, source
//! id, length of its meta); and `meta`, what sources attached to records (an
//! MQTT message's topic: see [`meta`]), back to back in record order. The
//! trailing newline is stored so that newline-delimited sinks (TCP, file)
//! write the whole payload in one call; an entry's length excludes it.
//!
//! Batches come from a per-shard [`BatchPool`] and go back to it: once the
//! pool is warm, filling and sending a batch allocates nothing.
//!
//! On disk (the write-ahead log) and on the wire a batch is the rkyv archive of
//! exactly these three arrays ([`ArchivedBatch`]), read in place after
//! bytecheck validation, never deserialised record by record. Frames written
//! before records carried meta (two arrays, log version 2) are read as
//! [`ArchivedBatchV2`].
//!
//! The payload buffer is block-aligned and keeps [`HEADROOM`] bytes free in
//! front of the records, with room behind them for the entries: the
//! write-ahead log archives a batch in its own buffer ([`archive_in_place`])
//! and writes that buffer as the frame, without copying the records.

use rkyv::rancor::Fallible;
use rkyv::ser::{Allocator, Positional, Writer};
use rkyv::util::AlignedVec;
use rkyv::vec::{ArchivedVec, VecResolver};
use rkyv::{Archive, Deserialize, Place, Serialize};

/// One record's place in a batch. 24 bytes, no padding.
#[derive(Archive, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[rkyv(derive(Debug))]
#[repr(C)]
pub struct Entry {
    /// Receive time, nanoseconds since the Unix epoch (see `Shard::now_ns`).
    pub ts_ns: u64,
    /// Offset of the record's first byte in the payload.
    pub offset: u32,
    /// Length of the record, without the stored trailing newline.
    pub len: u32,
    /// Hash of the partition key (0 when `partition_by = "none"`).
    pub key_hash: u32,
    /// Index of the source in the plan.
    pub source: u16,
    /// Bytes of the record's meta: the record's meta starts where the
    /// previous records' metas end (log version 2 wrote zero here).
    pub meta_len: u16,
}

const _: () = assert!(std::mem::size_of::<Entry>() == 24);

/// Records back to back plus one [`Entry`] each.
///
/// The payload is the first field so that it is the first thing in the
/// batch's archive: an archive placed on a 64-byte boundary (as the
/// write-ahead log places it) has its payload cache-line aligned too.
#[derive(Archive, Serialize, Debug, Default, PartialEq, Eq)]
pub struct Batch {
    pub payload: Payload,
    pub entries: Vec<Entry>,
    pub meta: Vec<u8>,
}

/// A batch as log version 2 archived it: no meta. Only read, from segments
/// written before the upgrade.
#[derive(Archive, Serialize)]
pub struct BatchV2 {
    pub payload: Vec<u8>,
    pub entries: Vec<Entry>,
}

/// Bytes kept free in front of a payload's records: the write-ahead log puts
/// its frame header there (and the archive then starts on a cache line).
pub const HEADROOM: usize = 64;

/// Payload buffers are aligned to this, the block size `O_DIRECT` needs, so
/// that the buffer itself can be written as a frame.
pub const PAYLOAD_ALIGN: usize = 4096;

/// The records of a batch back to back, behind [`HEADROOM`] free bytes, in a
/// block-aligned buffer. Reads as the records' bytes (`Deref<[u8]>`);
/// archived as a plain byte vector.
#[derive(Default)]
pub struct Payload {
    buf: AlignedVec<PAYLOAD_ALIGN>,
    /// CRC-32C of the first `crc_len` bytes of records (see `checksum_ahead`).
    crc: u32,
    crc_len: usize,
}

/// Record bytes checksummed at a time by [`Payload::checksum_ahead`]: small
/// enough to be still in the cache when checksummed, large enough for the
/// CRC's parallel loop.
const CRC_CHUNK: usize = 16 * 1024;

impl Payload {
    /// A payload for up to `records` records of `bytes` in all, with room to
    /// be archived in place and padded to whole blocks without growing.
    pub fn with_capacity(records: usize, bytes: usize) -> Payload {
        Payload::from_buffer(AlignedVec::with_capacity(in_place_bytes(records, bytes)))
    }

    /// Takes a buffer (of any content) as an empty payload.
    pub fn from_buffer(mut buf: AlignedVec<PAYLOAD_ALIGN>) -> Payload {
        buf.clear();
        buf.resize(HEADROOM, 0);
        Payload {
            buf,
            crc: 0,
            crc_len: 0,
        }
    }

    /// The whole buffer: headroom, records, and whatever was written behind
    /// them (an archive's entries and root after [`archive_in_place`]).
    /// A payload whose buffer (from [`into_buffer`](Self::into_buffer))
    /// still holds its records: a batch given back unsent. Its checksum is
    /// not kept (only a disk buffer's payloads carry one).
    pub fn with_records(buf: AlignedVec<PAYLOAD_ALIGN>) -> Payload {
        debug_assert!(buf.len() >= HEADROOM);
        Payload {
            buf,
            crc: 0,
            crc_len: 0,
        }
    }

    pub fn into_buffer(self) -> AlignedVec<PAYLOAD_ALIGN> {
        self.buf
    }

    /// Bytes of records.
    #[inline]
    pub fn len(&self) -> usize {
        self.buf.len().saturating_sub(HEADROOM)
    }

    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn capacity(&self) -> usize {
        self.buf.capacity().saturating_sub(HEADROOM)
    }

    #[inline]
    pub fn as_slice(&self) -> &[u8] {
        self.buf.as_slice().get(HEADROOM..).unwrap_or(&[])
    }

    /// Appends `record` and a newline.
    #[inline]
    pub fn push_line(&mut self, record: &[u8]) {
        if self.buf.len() < HEADROOM {
            self.buf.resize(HEADROOM, 0);
        }
        self.buf.extend_from_slice(record);
        self.buf.push(b'\n');
    }

    /// Extends the running CRC-32C over the records appended since it was
    /// last extended, once they make a chunk: done as the batch fills, it
    /// reads records still in the cache, where checksumming the whole
    /// payload at the end would read most of it from memory again.
    #[inline]
    pub fn checksum_ahead(&mut self) {
        if self.len() - self.crc_len >= CRC_CHUNK {
            self.checksum_rest();
        }
    }

    fn checksum_rest(&mut self) {
        let rest = &self.as_slice()[self.crc_len..];
        self.crc = crc32c_append(self.crc, rest);
        self.crc_len = self.len();
    }

    /// The running CRC-32C and how many bytes of records it covers (a
    /// prefix of the records; zero bytes unless `checksum_ahead` was used).
    pub fn checksum_so_far(&self) -> (u32, usize) {
        (self.crc, self.crc_len)
    }

    pub fn clear(&mut self) {
        self.buf.resize(HEADROOM, 0);
        self.crc = 0;
        self.crc_len = 0;
    }
}

impl std::ops::Deref for Payload {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl std::fmt::Debug for Payload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Payload({} bytes)", self.len())
    }
}

impl PartialEq for Payload {
    fn eq(&self, other: &Payload) -> bool {
        self.as_slice() == other.as_slice()
    }
}

impl Eq for Payload {}

impl Archive for Payload {
    type Archived = ArchivedVec<u8>;
    type Resolver = VecResolver;
    fn resolve(&self, resolver: VecResolver, out: Place<ArchivedVec<u8>>) {
        ArchivedVec::resolve_from_len(self.len(), resolver, out);
    }
}

impl<S: Fallible + Allocator + Writer + ?Sized> Serialize<S> for Payload {
    fn serialize(&self, s: &mut S) -> Result<VecResolver, S::Error> {
        ArchivedVec::serialize_from_slice(self.as_slice(), s)
    }
}

/// Buffer bytes a batch of `records` records and `bytes` payload needs to be
/// archived in place and padded to whole blocks: headroom, payload, entries,
/// the root and alignment padding.
///
/// `bytes` counts the records' meta too (see [`Batch::fits`]).
pub fn in_place_bytes(records: usize, bytes: usize) -> usize {
    let archive = bytes + 16 + records * std::mem::size_of::<ArchivedEntry>() + 96;
    (HEADROOM + archive).div_ceil(PAYLOAD_ALIGN) * PAYLOAD_ALIGN
}

const _: () = assert!(std::mem::size_of::<ArchivedEntry>() == std::mem::size_of::<Entry>());

/// A batch whose records already lie in its payload buffer at [`HEADROOM`]:
/// serialising it writes only the entries and the root behind them, giving
/// the same archive as serialising the [`Batch`].
struct InPlace<'a> {
    payload_len: usize,
    entries: &'a [Entry],
    meta: &'a [u8],
}

impl Archive for InPlace<'_> {
    type Archived = ArchivedBatch;
    type Resolver = (VecResolver, VecResolver, VecResolver);
    fn resolve(&self, (p, e, m): Self::Resolver, out: Place<ArchivedBatch>) {
        rkyv::munge::munge!(let ArchivedBatch { payload, entries, meta } = out);
        ArchivedVec::resolve_from_len(self.payload_len, p, payload);
        ArchivedVec::resolve_from_len(self.entries.len(), e, entries);
        ArchivedVec::resolve_from_len(self.meta.len(), m, meta);
    }
}

impl<S: Fallible + Allocator + Writer + ?Sized> Serialize<S> for InPlace<'_> {
    fn serialize(&self, s: &mut S) -> Result<Self::Resolver, S::Error> {
        debug_assert_eq!(s.pos(), HEADROOM + self.payload_len);
        let entries = ArchivedVec::serialize_from_slice(self.entries, s)?;
        let meta = ArchivedVec::serialize_from_slice(self.meta, s)?;
        Ok((VecResolver::from_pos(HEADROOM), entries, meta))
    }
}

/// Archives `batch` in its own payload buffer: the entries and the root are
/// written behind the records, which stay where they are. Returns that
/// buffer (`HEADROOM` free bytes, then the archive) and the archive's
/// length; the batch gets `spare` as its new, empty payload buffer, also
/// when archiving fails.
pub fn archive_in_place(
    batch: &mut Batch,
    spare: AlignedVec<PAYLOAD_ALIGN>,
) -> Result<(AlignedVec<PAYLOAD_ALIGN>, usize), rkyv::rancor::Error> {
    let mut buf = std::mem::replace(&mut batch.payload, Payload::from_buffer(spare)).buf;
    if buf.len() < HEADROOM {
        buf.resize(HEADROOM, 0);
    }
    let value = InPlace {
        payload_len: buf.len() - HEADROOM,
        entries: &batch.entries,
        meta: &batch.meta,
    };
    let buf = rkyv::api::high::to_bytes_in::<_, rkyv::rancor::Error>(&value, buf)?;
    let len = buf.len() - HEADROOM;
    Ok((buf, len))
}

/// CRC-32C (Castagnoli, the checksum of iSCSI and ext4) of `data`: the
/// write-ahead log's check on segment headers, frames and checkpoints.
pub fn crc32c(data: &[u8]) -> u32 {
    crc32c_append(0, data)
}

/// CRC-32C of the bytes `crc` was computed over followed by `data`.
/// crc-fast folds with carry-less multiplies where the CPU has them: about
/// twice the speed of the `crc32` instruction alone, which matters at a
/// gigabyte of frames per second.
pub fn crc32c_append(crc: u32, data: &[u8]) -> u32 {
    let mut d =
        crc_fast::Digest::new_with_init_state(crc_fast::CrcAlgorithm::Crc32Iscsi, u64::from(!crc));
    d.update(data);
    d.finalize() as u32
}

/// A block-aligned buffer that io_uring may own while an operation runs: a
/// batch's payload buffer sent or written as it is, or a frame read back
/// (archives are then accessed in place, at the alignment rkyv needs).
pub struct FrameBuf(pub AlignedVec<PAYLOAD_ALIGN>);

impl FrameBuf {
    pub fn with_capacity(bytes: usize) -> FrameBuf {
        FrameBuf(AlignedVec::with_capacity(bytes))
    }
}

// SAFETY: AlignedVec's heap pointer does not move while the value is owned
// by the operation (it is neither grown nor dropped until handed back).
unsafe impl crate::io::IoBuf for FrameBuf {
    fn stable_ptr(&self) -> *const u8 {
        self.0.as_ptr()
    }
    fn bytes_init(&self) -> usize {
        self.0.len()
    }
    fn bytes_total(&self) -> usize {
        self.0.capacity()
    }
}

// SAFETY: as above; set_init only grows the length over bytes the kernel wrote.
unsafe impl crate::io::IoBufMut for FrameBuf {
    fn stable_mut_ptr(&mut self) -> *mut u8 {
        self.0.as_mut_ptr()
    }
    unsafe fn set_init(&mut self, pos: usize) {
        if self.0.len() < pos {
            unsafe { self.0.set_len(pos) };
        }
    }
}

impl Batch {
    pub fn with_capacity(records: usize, bytes: usize) -> Batch {
        Batch {
            entries: Vec::with_capacity(records),
            payload: Payload::with_capacity(records, bytes),
            meta: Vec::new(),
        }
    }

    /// Copies a batch of log version 2 (records without meta).
    pub fn from_v2(a: &ArchivedBatchV2) -> Batch {
        let mut b = Batch::with_capacity(a.entries.len(), a.payload.len());
        let p = a.payload.as_slice();
        for e in a.entries.iter() {
            let start = e.offset.to_native() as usize;
            let r = p
                .get(start..start + e.len.to_native() as usize)
                .unwrap_or(&[]);
            b.push(
                e.ts_ns.to_native(),
                e.key_hash.to_native(),
                e.source.to_native(),
                r,
                &[],
            );
        }
        b
    }

    /// Number of records.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Bytes in the payload, newlines included.
    pub fn payload_bytes(&self) -> usize {
        self.payload.len()
    }

    /// Whether a record of `len` bytes (with its meta) can join without
    /// passing the limits, which count meta as bytes. An empty batch takes
    /// any record, so an oversized one still travels.
    #[inline]
    pub fn fits(&self, len: usize, max_records: usize, max_bytes: usize) -> bool {
        self.entries.is_empty()
            || (self.entries.len() < max_records
                && self.payload.len() + self.meta.len() + len < max_bytes)
    }

    /// Whether the batch has reached one of its limits.
    #[inline]
    pub fn is_full(&self, max_records: usize, max_bytes: usize) -> bool {
        self.entries.len() >= max_records || self.payload.len() + self.meta.len() >= max_bytes
    }

    /// Appends a record and its meta (at most [`meta::MAX_BYTES`]; empty for
    /// none). Allocates only if the buffers must grow, which a pooled batch
    /// sized for its limits does not (the meta buffer grows to what its
    /// records bring, once).
    #[inline]
    pub fn push(&mut self, ts_ns: u64, key_hash: u32, source: u16, record: &[u8], meta: &[u8]) {
        let offset = self.payload.len();
        debug_assert!(offset + record.len() < u32::MAX as usize);
        let meta = if meta.len() <= meta::MAX_BYTES {
            meta
        } else {
            &[]
        };
        self.payload.push_line(record);
        self.meta.extend_from_slice(meta);
        self.entries.push(Entry {
            ts_ns,
            offset: offset as u32,
            len: record.len() as u32,
            key_hash,
            source,
            meta_len: meta.len() as u16,
        });
    }

    /// The bytes of record `i`, without the trailing newline.
    #[inline]
    pub fn record(&self, i: usize) -> &[u8] {
        let e = &self.entries[i];
        &self.payload[e.offset as usize..(e.offset + e.len) as usize]
    }

    /// Each record with its entry and its meta, in order.
    pub fn iter(&self) -> impl Iterator<Item = (&Entry, &[u8], &[u8])> {
        let mut at = 0usize;
        self.entries.iter().map(move |e| {
            let m = meta::slice(&self.meta, &mut at, e.meta_len);
            (
                e,
                &self.payload[e.offset as usize..(e.offset + e.len) as usize],
                m,
            )
        })
    }

    /// Empties the batch, keeping its buffers.
    pub fn clear(&mut self) {
        self.entries.clear();
        self.payload.clear();
        self.meta.clear();
    }
}

impl ArchivedBatch {
    /// The bytes of archived record `i`, read in place.
    pub fn record(&self, i: usize) -> &[u8] {
        let e = &self.entries[i];
        let start = e.offset.to_native() as usize;
        &self.payload[start..start + e.len.to_native() as usize]
    }
}

/// A batch to read: in memory, or archived in place in a read buffer (a
/// frame of log version 2 is first copied into a [`Batch`]).
#[derive(Clone, Copy)]
pub enum BatchView<'a> {
    Native(&'a Batch),
    Archived(&'a ArchivedBatch),
    /// An archive read back from the disk buffer together with its bytes
    /// (an output that forwards frames as they are, the native protocol,
    /// sends the bytes).
    Framed {
        batch: &'a ArchivedBatch,
        archive: &'a [u8],
    },
}

impl<'a> BatchView<'a> {
    /// Number of records.
    pub fn len(&self) -> usize {
        match self {
            BatchView::Native(b) => b.entries.len(),
            BatchView::Archived(a) | BatchView::Framed { batch: a, .. } => a.entries.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The records back to back, each followed by `\n`.
    pub fn payload(&self) -> &'a [u8] {
        match self {
            BatchView::Native(b) => b.payload.as_slice(),
            BatchView::Archived(a) | BatchView::Framed { batch: a, .. } => a.payload.as_slice(),
        }
    }

    /// Calls `f(ts_ns, source, record, meta)` for each record in order.
    #[inline]
    pub fn for_each(&self, mut f: impl FnMut(u64, u16, &'a [u8], &'a [u8])) {
        let mut at = 0usize;
        match *self {
            BatchView::Native(b) => {
                for e in &b.entries {
                    let r = &b.payload[e.offset as usize..(e.offset + e.len) as usize];
                    f(
                        e.ts_ns,
                        e.source,
                        r,
                        meta::slice(&b.meta, &mut at, e.meta_len),
                    );
                }
            }
            BatchView::Archived(a) | BatchView::Framed { batch: a, .. } => {
                let (p, m) = (a.payload.as_slice(), a.meta.as_slice());
                for e in a.entries.iter() {
                    let start = e.offset.to_native() as usize;
                    let r = &p[start..start + e.len.to_native() as usize];
                    let meta = meta::slice(m, &mut at, e.meta_len.to_native());
                    f(e.ts_ns.to_native(), e.source.to_native(), r, meta);
                }
            }
        }
    }
}

/// Archives a batch into `out` (cleared first), reusing its allocation.
pub fn archive_into(
    batch: &Batch,
    out: rkyv::util::AlignedVec,
) -> Result<rkyv::util::AlignedVec, rkyv::rancor::Error> {
    let mut out = out;
    out.clear();
    rkyv::api::high::to_bytes_in::<_, rkyv::rancor::Error>(batch, out)
}

/// Validates an archive (from a file or a peer) and gives access in place.
pub fn access(bytes: &[u8]) -> Result<&ArchivedBatch, rkyv::rancor::Error> {
    rkyv::access::<ArchivedBatch, rkyv::rancor::Error>(bytes)
}

/// Validates an archive of log version 2 and gives access in place.
pub fn access_v2(bytes: &[u8]) -> Result<&ArchivedBatchV2, rkyv::rancor::Error> {
    rkyv::access::<ArchivedBatchV2, rkyv::rancor::Error>(bytes)
}

/// A shard's free batches. Owned by one shard; never shared.
///
/// Batches are made on demand and kept when given back, up to `keep`; in
/// steady state every batch taken is one given back earlier.
#[derive(Debug)]
pub struct BatchPool {
    free: Vec<Batch>,
    keep: usize,
    records: usize,
    bytes: usize,
    made: usize,
}

impl BatchPool {
    /// `records` and `bytes` size a new batch's buffers; `keep` bounds how
    /// many free batches the pool holds (the sum of its consumers' needs).
    pub fn new(records: usize, bytes: usize, keep: usize) -> BatchPool {
        BatchPool {
            free: Vec::with_capacity(keep),
            keep,
            records,
            bytes,
            made: 0,
        }
    }

    pub fn take(&mut self) -> Batch {
        match self.free.pop() {
            Some(b) => b,
            None => {
                self.made += 1;
                Batch::with_capacity(self.records, self.bytes)
            }
        }
    }

    pub fn give(&mut self, mut batch: Batch) {
        if self.free.len() < self.keep {
            batch.clear();
            self.free.push(batch);
        }
    }

    /// Sizes new batches and bounds the free ones anew (a reload): a batch
    /// made before is still taken, smaller or not.
    pub fn grow(&mut self, records: usize, bytes: usize, keep: usize) {
        self.records = self.records.max(records);
        self.bytes = self.bytes.max(bytes);
        self.keep = keep;
        self.free.truncate(keep);
    }

    /// A payload buffer the size of this pool's batches'.
    pub fn new_payload(&self) -> Payload {
        Payload::with_capacity(self.records, self.bytes)
    }

    /// Bytes of each of this pool's payload buffers.
    pub fn buffer_bytes(&self) -> usize {
        in_place_bytes(self.records, self.bytes)
    }

    /// Batches allocated since start (a warm pool stops counting up).
    pub fn made(&self) -> usize {
        self.made
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Batch {
        let mut b = Batch::with_capacity(4, 256);
        let mut m = Vec::new();
        meta::put(&mut m, meta::TOPIC, b"sensors/7");
        b.push(1, 7, 0, b"alpha", &m);
        b.push(2, 8, 1, b"", &[]);
        b.push(3, 9, 2, "ünïcode line".as_bytes(), &m);
        b
    }

    fn topics(v: BatchView<'_>) -> Vec<Option<Vec<u8>>> {
        let mut out = Vec::new();
        v.for_each(|_, _, _, m| out.push(meta::find(m, meta::TOPIC).map(<[u8]>::to_vec)));
        out
    }

    #[test]
    fn each_record_keeps_its_own_meta_through_the_archive() {
        let mut b = sample();
        let t = Some(b"sensors/7".to_vec());
        let want = vec![t.clone(), None, t];
        assert_eq!(topics(BatchView::Native(&b)), want);
        let (buf, len) = archive_in_place(&mut b, AlignedVec::new()).unwrap();
        let a = access(&buf[HEADROOM..HEADROOM + len]).unwrap();
        assert_eq!(topics(BatchView::Archived(a)), want);
        assert_eq!(a.record(2), "ünïcode line".as_bytes());
    }

    #[test]
    fn a_batch_of_log_version_2_is_read_without_meta() {
        let mut v2 = BatchV2 {
            payload: b"one\ntwo\n".to_vec(),
            entries: Vec::new(),
        };
        for (i, (offset, len)) in [(0u32, 3u32), (4, 3)].into_iter().enumerate() {
            v2.entries.push(Entry {
                ts_ns: 10 + i as u64,
                offset,
                len,
                key_hash: 0,
                source: i as u16,
                meta_len: 0,
            });
        }
        let bytes = rkyv::to_bytes::<rkyv::rancor::Error>(&v2).unwrap();
        // The new shape does not pass for the old one.
        assert!(access(&bytes).is_err());
        let b = Batch::from_v2(access_v2(&bytes).unwrap());
        let got: Vec<_> = b
            .iter()
            .map(|(e, r, m)| (e.ts_ns, e.source, r, m))
            .collect();
        assert_eq!(
            got,
            vec![(10, 0, &b"one"[..], &[][..]), (11, 1, b"two", &[])]
        );
    }

    #[test]
    fn meta_counts_toward_the_byte_limit() {
        let mut b = Batch::with_capacity(8, 64);
        b.push(0, 0, 0, b"x", &[0u8; 40]);
        assert!(!b.fits(30, 8, 64));
        assert!(b.fits(10, 8, 64));
        b.push(0, 0, 0, b"y", &[0u8; 70_000]);
        assert_eq!(b.meta.len(), 40, "meta over MAX_BYTES is left off");
    }

    #[test]
    fn payload_is_newline_delimited() {
        let b = sample();
        assert_eq!(&b.payload[..], "alpha\n\nünïcode line\n".as_bytes());
        assert_eq!(b.record(0), b"alpha");
        assert_eq!(b.record(1), b"");
        assert_eq!(b.iter().count(), 3);
    }

    #[test]
    fn archive_round_trip_reads_in_place() {
        let b = sample();
        let bytes = archive_into(&b, rkyv::util::AlignedVec::new()).unwrap();
        let archived = access(&bytes).unwrap();
        assert_eq!(archived.entries.len(), 3);
        for i in 0..b.len() {
            assert_eq!(archived.record(i), b.record(i));
            assert_eq!(archived.entries[i].ts_ns.to_native(), b.entries[i].ts_ns);
            assert_eq!(archived.entries[i].source.to_native(), b.entries[i].source);
        }
        assert_eq!(archived.payload.as_slice(), &b.payload[..]);
    }

    #[test]
    fn archived_in_place_is_the_same_archive() {
        let mut b = sample();
        let copied = archive_into(&b, rkyv::util::AlignedVec::new()).unwrap();
        let (buf, len) = archive_in_place(&mut b, AlignedVec::new()).unwrap();
        assert!(b.payload.is_empty());
        assert_eq!(b.payload.checksum_so_far(), (0, 0));
        assert_eq!(len, copied.len());
        assert_eq!(&buf[HEADROOM..], &copied[..]);
        let a = access(&buf[HEADROOM..]).unwrap();
        assert_eq!(a.record(2), "ünïcode line".as_bytes());
        assert_eq!(a.payload.as_slice().as_ptr(), buf[HEADROOM..].as_ptr());
    }

    #[test]
    fn a_full_batch_archives_in_place_without_growing() {
        let (records, bytes) = (1000, 100 * 1000);
        let mut b = Batch::with_capacity(records, bytes);
        let cap = b.payload.capacity();
        while b.fits(100, records, bytes) {
            b.push(0, 0, 0, &[b'x'; 99], &[]);
        }
        let (mut buf, len) = archive_in_place(&mut b, AlignedVec::new()).unwrap();
        buf.resize((HEADROOM + len).div_ceil(PAYLOAD_ALIGN) * PAYLOAD_ALIGN, 0);
        assert_eq!(buf.capacity() - HEADROOM, cap);
        assert!(access(&buf[HEADROOM..HEADROOM + len]).is_ok());
    }

    #[test]
    fn the_running_checksum_covers_a_prefix_of_the_records() {
        let mut b = Batch::with_capacity(1000, 100_000);
        for i in 0..300u32 {
            b.push(
                0,
                0,
                0,
                format!("record {i} {}", "y".repeat(90)).as_bytes(),
                &[],
            );
            b.payload.checksum_ahead();
        }
        let (crc, n) = b.payload.checksum_so_far();
        assert!(n >= CRC_CHUNK && n <= b.payload.len());
        assert_eq!(crc, crc32c(&b.payload[..n]));
        b.clear();
        assert_eq!(b.payload.checksum_so_far(), (0, 0));
    }

    #[test]
    fn a_payload_from_a_used_buffer_is_empty() {
        let mut b = sample();
        let (buf, _) = archive_in_place(&mut b, AlignedVec::new()).unwrap();
        let p = Payload::from_buffer(buf);
        assert!(p.is_empty());
        assert_eq!(p.as_slice(), b"");
    }

    #[test]
    fn the_payload_opens_the_archive() {
        let b = sample();
        let bytes = archive_into(&b, rkyv::util::AlignedVec::new()).unwrap();
        let a = access(&bytes).unwrap();
        assert_eq!(a.payload.as_slice().as_ptr(), bytes.as_ptr());
    }

    #[test]
    fn damaged_archive_is_rejected() {
        let b = sample();
        let bytes = archive_into(&b, rkyv::util::AlignedVec::new()).unwrap();
        let mut damaged = rkyv::util::AlignedVec::<16>::new();
        damaged.extend_from_slice(&bytes);
        // The root's relative pointers sit at the end; break the entries length.
        let n = damaged.len();
        damaged[n - 12] = 0xff;
        damaged[n - 11] = 0xff;
        assert!(access(&damaged).is_err());
    }

    #[test]
    fn fits_respects_limits_but_takes_one_oversized() {
        let mut b = Batch::with_capacity(2, 16);
        assert!(b.fits(100, 2, 16));
        b.push(0, 0, 0, &[b'x'; 100], &[]);
        assert!(!b.fits(1, 2, 16));
        assert!(b.is_full(2, 16));
    }

    #[test]
    fn pool_recycles() {
        let mut pool = BatchPool::new(4, 64, 2);
        let a = pool.take();
        pool.give(a);
        let _ = pool.take();
        assert_eq!(pool.made(), 1);
    }
}

mod builder;
pub mod meta;
pub use builder::BatchBuilder;
