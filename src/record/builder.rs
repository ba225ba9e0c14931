//! [`BatchBuilder`]: the batch being filled for one destination, and when it
//! must be sealed (record count, bytes, or linger time, whichever first).

use super::{Batch, BatchPool};
use crate::config::BatchLimits;
use std::time::Duration;
use tokio::time::Instant;

/// The open batch of one destination (a sink on this shard, or a ring to
/// another shard). Batches come from the shard's pool, which allocates only
/// when it is empty (at start, until it holds what its consumers keep).
#[derive(Debug)]
pub struct BatchBuilder {
    open: Option<Batch>,
    opened_at: Instant,
    limits: BatchLimits,
}

impl BatchBuilder {
    pub fn new(limits: BatchLimits) -> BatchBuilder {
        BatchBuilder {
            open: None,
            opened_at: Instant::now(),
            limits,
        }
    }

    pub fn limits(&self) -> BatchLimits {
        self.limits
    }

    /// Whether a record of `len` bytes (with its meta) joins the open batch
    /// (or starts one) without sealing first.
    #[inline]
    pub fn fits(&self, len: usize) -> bool {
        self.open
            .as_ref()
            .is_none_or(|b| b.fits(len + 1, self.limits.max_records, self.limits.max_bytes))
    }

    /// Appends a record, opening a batch from `pool` if none is open.
    /// Returns true when this record opened the batch (its linger starts).
    #[inline]
    pub fn push(
        &mut self,
        pool: &mut BatchPool,
        ts_ns: u64,
        key_hash: u32,
        source: u16,
        record: &[u8],
        meta: &[u8],
    ) -> bool {
        let opened = self.open.is_none();
        let batch = self.open.get_or_insert_with(|| pool.take());
        if opened {
            self.opened_at = Instant::now();
        }
        batch.push(ts_ns, key_hash, source, record, meta);
        opened
    }

    /// Checksums the open batch's newest records if enough have gathered
    /// (see [`super::Payload::checksum_ahead`]).
    #[inline]
    pub fn checksum_ahead(&mut self) {
        if let Some(b) = &mut self.open {
            b.payload.checksum_ahead();
        }
    }

    /// Whether the open batch has reached its record or byte limit.
    #[inline]
    pub fn is_full(&self) -> bool {
        self.open
            .as_ref()
            .is_some_and(|b| b.is_full(self.limits.max_records, self.limits.max_bytes))
    }

    /// When the open batch must be sealed even if not full.
    pub fn deadline(&self) -> Option<Instant> {
        self.open
            .as_ref()
            .map(|_| self.opened_at + Duration::from_millis(self.limits.linger_ms))
    }

    pub fn is_open(&self) -> bool {
        self.open.is_some()
    }

    /// Seals the open batch and hands it out.
    pub fn seal(&mut self) -> Option<Batch> {
        self.open.take()
    }
}
