//! Records and batches: the unit everything after the codec moves.
//!
//! A [`Batch`] is two reused buffers: `payload`, the records' bytes back to
//! back, each followed by one `\n`; and `entries`, one fixed-size [`Entry`] per
//! record (receive time, payload offset and length, partition key hash, source
//! id). The trailing newline is stored so that newline-delimited sinks (TCP,
//! file) write the whole payload in one call; an entry's length excludes it.
//!
//! Batches come from a per-shard [`BatchPool`] and go back to it: once the
//! pool is warm, filling and sending a batch allocates nothing.
//!
//! On disk (the write-ahead log) and on the wire a batch is the rkyv archive of
//! exactly these two arrays ([`ArchivedBatch`]), read in place after
//! bytecheck validation, never deserialised record by record.

use rkyv::{Archive, Deserialize, Serialize};

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
    /// Reserved; zero.
    pub flags: u16,
}

const _: () = assert!(std::mem::size_of::<Entry>() == 24);

/// Records back to back plus one [`Entry`] each.
///
/// The payload is the first field so that it is the first thing in the
/// batch's archive: an archive placed on a 64-byte boundary (as the
/// write-ahead log places it) has its payload cache-line aligned too.
#[derive(Archive, Serialize, Deserialize, Debug, Default, PartialEq, Eq)]
pub struct Batch {
    pub payload: Vec<u8>,
    pub entries: Vec<Entry>,
}

impl Batch {
    pub fn with_capacity(records: usize, bytes: usize) -> Batch {
        Batch {
            entries: Vec::with_capacity(records),
            payload: Vec::with_capacity(bytes),
        }
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

    /// Whether a record of `len` bytes can join without passing the limits.
    /// An empty batch takes any record, so an oversized one still travels.
    #[inline]
    pub fn fits(&self, len: usize, max_records: usize, max_bytes: usize) -> bool {
        self.entries.is_empty()
            || (self.entries.len() < max_records && self.payload.len() + len < max_bytes)
    }

    /// Whether the batch has reached one of its limits.
    #[inline]
    pub fn is_full(&self, max_records: usize, max_bytes: usize) -> bool {
        self.entries.len() >= max_records || self.payload.len() >= max_bytes
    }

    /// Appends a record. Allocates only if the buffers must grow, which a
    /// pooled batch sized for its limits does not.
    #[inline]
    pub fn push(&mut self, ts_ns: u64, key_hash: u32, source: u16, record: &[u8]) {
        let offset = self.payload.len();
        debug_assert!(offset + record.len() < u32::MAX as usize);
        self.payload.extend_from_slice(record);
        self.payload.push(b'\n');
        self.entries.push(Entry {
            ts_ns,
            offset: offset as u32,
            len: record.len() as u32,
            key_hash,
            source,
            flags: 0,
        });
    }

    /// The bytes of record `i`, without the trailing newline.
    #[inline]
    pub fn record(&self, i: usize) -> &[u8] {
        let e = &self.entries[i];
        &self.payload[e.offset as usize..(e.offset + e.len) as usize]
    }

    /// Each record with its entry, in order.
    pub fn iter(&self) -> impl Iterator<Item = (&Entry, &[u8])> {
        self.entries.iter().map(move |e| {
            (
                e,
                &self.payload[e.offset as usize..(e.offset + e.len) as usize],
            )
        })
    }

    /// Empties the batch, keeping its buffers.
    pub fn clear(&mut self) {
        self.entries.clear();
        self.payload.clear();
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

/// A batch to read: in memory, or archived in place in a read buffer.
#[derive(Clone, Copy)]
pub enum BatchView<'a> {
    Native(&'a Batch),
    Archived(&'a ArchivedBatch),
}

impl<'a> BatchView<'a> {
    /// Number of records.
    pub fn len(&self) -> usize {
        match self {
            BatchView::Native(b) => b.entries.len(),
            BatchView::Archived(a) => a.entries.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The records back to back, each followed by `\n`.
    pub fn payload(&self) -> &'a [u8] {
        match self {
            BatchView::Native(b) => &b.payload,
            BatchView::Archived(a) => a.payload.as_slice(),
        }
    }

    /// Calls `f(ts_ns, source, record)` for each record in order.
    #[inline]
    pub fn for_each(&self, mut f: impl FnMut(u64, u16, &'a [u8])) {
        match *self {
            BatchView::Native(b) => {
                for e in &b.entries {
                    let r = &b.payload[e.offset as usize..(e.offset + e.len) as usize];
                    f(e.ts_ns, e.source, r);
                }
            }
            BatchView::Archived(a) => {
                let p = a.payload.as_slice();
                for e in a.entries.iter() {
                    let start = e.offset.to_native() as usize;
                    let r = &p[start..start + e.len.to_native() as usize];
                    f(e.ts_ns.to_native(), e.source.to_native(), r);
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
        b.push(1, 7, 0, b"alpha");
        b.push(2, 8, 1, b"");
        b.push(3, 9, 2, "ünïcode line".as_bytes());
        b
    }

    #[test]
    fn payload_is_newline_delimited() {
        let b = sample();
        assert_eq!(b.payload, "alpha\n\nünïcode line\n".as_bytes());
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
        let back: Batch = rkyv::deserialize::<Batch, rkyv::rancor::Error>(archived).unwrap();
        assert_eq!(back, b);
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
        b.push(0, 0, 0, &[b'x'; 100]);
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
pub use builder::BatchBuilder;
