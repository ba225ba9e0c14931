//! What a sink's sender (and the disk buffer in front of it) may use of the
//! shard it runs on: the narrow handle [`SinkCtx`].
//!
//! A sink knows nothing of the shard's sources, lanes, rings or lifecycle;
//! it gets the plan, its shard's counters, the shard's clock, whether the
//! shard is stopping, and the batch pool to borrow buffers from and give
//! batches back to. The shard's [`ingest::Ingest`] owns one `SinkCtx` and
//! the runtime shares it with every sink it runs, so the dependency points
//! one way: runtime → sinks, wal → pipeline, never back into the runtime.
//! Sources offer records through [`ingest::Ingest`] and know no sink.
//!
//! Around it, what the shard, the sinks and the disk buffer share without
//! depending on each other: the per-sink [`SinkQueue`] ([`queue`]), a
//! batch's stable [`BatchId`], the [`Ack`] an acknowledging output calls,
//! and [`Deliver`], the contract by which a buffer hands batches to an
//! output. (The first steps of the output boundary, issue 11: the generic
//! retry, dead-letter and metrics layer is still to come.)

mod backoff;
pub mod ingest;
pub mod queue;

pub use backoff::Backoff;
pub use queue::SinkQueue;

use crate::config::Plan;
use crate::metrics::ShardMetrics;
use crate::record::{Batch, BatchPool, BatchView, Payload};
use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Arc;

/// The plan a shard runs, replaced whole by a reload
/// ([`crate::config::reload`]). Every plan it held stays alive as long as
/// it does, so a `&Plan` read from it stays valid across awaits: a task that
/// read its source's or sink's entry before a reload goes on with that
/// entry, which a reload does not change for what it keeps.
pub struct PlanCell {
    current: Cell<*const Plan>,
    held: RefCell<Vec<Arc<Plan>>>,
    generation: Cell<usize>,
}

impl PlanCell {
    pub fn new(plan: Arc<Plan>) -> PlanCell {
        PlanCell {
            current: Cell::new(Arc::as_ptr(&plan)),
            held: RefCell::new(vec![plan]),
            generation: Cell::new(1),
        }
    }

    /// Runs `plan` from now on.
    pub fn set(&self, plan: Arc<Plan>) {
        self.current.set(Arc::as_ptr(&plan));
        self.held.borrow_mut().push(plan);
        self.generation.set(self.generation.get() + 1);
    }

    /// How many plans it has run (1, and one more per reload): what a task
    /// that keeps something derived from the plan compares to know it is
    /// stale.
    #[inline]
    pub fn generation(&self) -> usize {
        self.generation.get()
    }
}

impl std::ops::Deref for PlanCell {
    type Target = Plan;
    #[inline]
    fn deref(&self) -> &Plan {
        // SAFETY: `current` points into an `Arc<Plan>` that `held` keeps
        // until this cell is dropped (plans are only ever added), so the
        // plan outlives the borrow of `self`.
        unsafe { &*self.current.get() }
    }
}

/// One shard's handle for its sinks. Lives on the shard's thread.
pub struct SinkCtx {
    /// The shard's id.
    pub id: usize,
    /// How many shards run.
    pub shards: usize,
    pub plan: Rc<PlanCell>,
    /// The shard's counters (each sink writes its own `sinks[sink]`).
    pub metrics: Arc<ShardMetrics>,
    /// Set when the shard begins to stop.
    pub stopping: Rc<Cell<bool>>,
    /// The shard's cheap monotonic clock.
    pub clock: quanta::Clock,
    /// A raw reading of `clock` and the Unix time it stood for.
    clock_base: Cell<Option<(u64, u64)>>,
    /// The shard's batch pool (the shard's sources fill batches from it).
    pub(crate) pool: RefCell<BatchPool>,
}

impl SinkCtx {
    pub fn new(
        id: usize,
        plan: Rc<PlanCell>,
        metrics: Arc<ShardMetrics>,
        stopping: Rc<Cell<bool>>,
        pool: BatchPool,
    ) -> SinkCtx {
        SinkCtx {
            id,
            shards: plan.shards,
            plan,
            metrics,
            stopping,
            clock: quanta::Clock::new(),
            clock_base: Cell::new(None),
            pool: RefCell::new(pool),
        }
    }

    /// Whether sink `sink` is to stop: the shard stops, or a reload removed
    /// the sink (its sender keeps, in a disk buffer, or sends, from memory,
    /// what it holds, and ends).
    #[inline]
    pub fn sink_stopping(&self, sink: usize) -> bool {
        self.stopping.get() || self.plan.sinks[sink].removed
    }

    /// Wall-clock time, nanoseconds since the Unix epoch: read once from
    /// the system clock, then advanced by the shard's cheap monotonic clock
    /// (quanta), so records' times stay meaningful after a restart (the
    /// write-ahead log replays them) and never go backwards on a shard.
    #[inline]
    pub fn now_ns(&self) -> u64 {
        let raw = self.clock.raw();
        let (raw0, unix0) = match self.clock_base.get() {
            Some(b) => b,
            None => {
                let unix = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos() as u64);
                self.clock_base.set(Some((raw, unix)));
                (raw, unix)
            }
        };
        unix0 + self.clock.delta_as_nanos(raw0, raw)
    }

    /// An empty payload buffer sized like the pool's batches (for the
    /// write-ahead log, which swaps one into each batch it keeps the buffer of).
    pub fn new_payload(&self) -> Payload {
        self.pool.borrow().new_payload()
    }

    /// Bytes of each buffer `new_payload` gives.
    pub fn payload_buffer_bytes(&self) -> usize {
        self.pool.borrow().buffer_bytes()
    }

    /// Waits until sink `sink`'s `rate_limit` lets `bytes` go on the wire,
    /// and charges them (nothing without a rate_limit).
    pub async fn rate_take(&self, sink: usize, bytes: usize) {
        self.rate_wait(sink).await;
        self.rate_charge(sink, bytes);
    }

    /// Waits until sink `sink`'s `rate_limit` lets a write go.
    pub async fn rate_wait(&self, sink: usize) {
        if let Some(r) = &self.plan.sinks[sink].rate {
            let waited = r.wait().await;
            if !waited.is_zero() {
                self.metrics.sinks[sink]
                    .rate_limited_ms
                    .add(waited.as_millis() as u64);
            }
        }
    }

    /// Charges `bytes` written to sink `sink`'s `rate_limit`.
    pub fn rate_charge(&self, sink: usize, bytes: usize) {
        if let Some(r) = &self.plan.sinks[sink].rate {
            r.charge_now(bytes as u64);
            self.metrics.sinks[sink]
                .rate_limited_bytes
                .add(bytes as u64);
        }
    }

    /// Gives a sent batch back to the pool.
    pub fn recycle(&self, batch: Batch) {
        let mut pool = self.pool.borrow_mut();
        pool.give(batch);
        self.metrics.pool_batches_made.set(pool.made() as i64);
    }
}

/// A batch's stable id, unique per sink and shard: where it lies in the
/// sink's log (a disk buffer; the same after a replay, so a receiver can drop
/// a resend), or, with a memory buffer, the sender's start time in ns
/// (`segment`) and the batch's sequence number since (`offset`). Outputs use
/// it for idempotency keys and message ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BatchId {
    pub segment: u64,
    pub offset: u64,
}

/// Called with a batch's id once an acknowledging output delivered it.
pub type Ack = Rc<dyn Fn(BatchId)>;

/// An output as a buffer sees it: stream outputs take a batch's
/// newline-delimited payload ([`deliver`](Deliver::deliver)) and are done
/// with it when that returns; batch outputs ([`takes_batches`](Deliver::takes_batches))
/// take the batch itself ([`submit`](Deliver::submit)), keep several in
/// flight and acknowledge each through the [`Ack`] they were built with.
pub trait Deliver {
    fn takes_batches(&self) -> bool;
    /// Writes `buf` whole, retrying; `Err` (unsent) only past `give_up`.
    fn deliver<B: crate::io::Buf>(
        &mut self,
        cx: &SinkCtx,
        buf: B,
        give_up: Option<tokio::time::Instant>,
    ) -> impl std::future::Future<Output = Result<B, B>>;
    /// Takes a batch (a batch output only).
    fn submit(
        &mut self,
        batch: BatchView<'_>,
        id: BatchId,
    ) -> impl std::future::Future<Output = ()>;
    fn close(&mut self, cx: &SinkCtx) -> impl std::future::Future<Output = ()>;
}
