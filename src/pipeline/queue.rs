//! One sink's queue on one shard: the open batch and the sealed batches
//! waiting for the sink's sender (memory buffer) or the write-ahead log's
//! writer (disk buffer). Sources and the shard's inbound rings append
//! records; the sender takes sealed batches; a linger task seals a batch
//! that has waited `batch.linger_ms`. When the queue is full, appends are
//! refused and the caller waits on [`SinkQueue::space`] (TCP) or counts a
//! drop (UDP): memory stays bounded by `queue_batches` batches per sink and
//! shard. A batch is sealed part-full by its linger only when nothing is
//! queued before it, so a queue that backs up holds full batches and
//! `buffer.max_bytes` is the budget a user gets. Sources that can wait,
//! and those of lower priority, are held back (or dropped) before the queue
//! is full (`buffer.headroom_percent`, `priority`).

use crate::config::SinkPlan;
use crate::metrics::SinkCounters;
use crate::record::{Batch, BatchBuilder, BatchPool};
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::sync::Arc;
use tokio::sync::Notify;

/// One sink's batches on one shard.
pub struct SinkQueue {
    pub sink: usize,
    state: RefCell<QueueState>,
    /// Signalled when a batch is sealed or the queue closes (the sender waits).
    work: Notify,
    /// Signalled when a sealed batch leaves the queue (sources wait).
    pub space: Notify,
    /// Signalled when a record opens a batch (the linger task waits).
    opened: Notify,
    capacity: usize,
    /// Indexed by source id: sealed batches past which that source's
    /// records are refused (it is held back, or its records dropped): its
    /// rank's admission mark (`config::admission_marks`).
    marks: RefCell<Vec<usize>>,
    counters: Arc<crate::metrics::ShardMetrics>,
    /// A memory buffer with `when_full = "drop_newest"`: a record that finds
    /// the queue full is dropped and counted instead of waiting.
    pub drops_when_full: bool,
    /// A memory buffer with `when_full = "drop_oldest"`: a record that
    /// finds the queue full makes room by dropping the oldest sealed batch
    /// (counted); nobody waits either.
    pub evicts_when_full: bool,
    /// A disk buffer: payloads are checksummed as they fill, while the
    /// records just appended are still in the cache (the log frames them).
    checksum: bool,
    /// Records appended since start, and of those, how many are settled: in
    /// a disk buffer, durable (or dropped and counted). Records settle in the
    /// order they were appended, so a source that noted `appended()` after
    /// offering a record knows it is durable once `settled()` reaches that
    /// mark (the mqtt source acknowledges QoS 1 messages then).
    appended: Cell<u64>,
    settled: Cell<u64>,
    /// Signalled when `settled` moves.
    pub settled_changed: Notify,
    /// The queue of the sink a reload changed this one into (memory buffers
    /// both): it took what was queued here, and takes what the sender here
    /// could not send.
    successor: RefCell<Option<std::rc::Rc<SinkQueue>>>,
}

struct QueueState {
    builder: BatchBuilder,
    sealed: VecDeque<Batch>,
    closed: bool,
}

impl SinkQueue {
    pub fn new(
        plan: &SinkPlan,
        sink: usize,
        counters: Arc<crate::metrics::ShardMetrics>,
    ) -> SinkQueue {
        SinkQueue {
            sink,
            state: RefCell::new(QueueState {
                builder: BatchBuilder::new(plan.batch),
                sealed: VecDeque::with_capacity(plan.queue_batches),
                closed: false,
            }),
            work: Notify::new(),
            space: Notify::new(),
            opened: Notify::new(),
            capacity: plan.queue_batches,
            marks: RefCell::new(plan.marks.clone()),
            counters,
            drops_when_full: plan.buffer.kind == crate::config::BufferKind::Memory
                && matches!(
                    plan.buffer.when_full,
                    crate::config::WhenFull::DropNewest | crate::config::WhenFull::DropOldest
                ),
            evicts_when_full: plan.buffer.kind == crate::config::BufferKind::Memory
                && plan.buffer.when_full == crate::config::WhenFull::DropOldest,
            checksum: plan.buffer.kind == crate::config::BufferKind::Disk,
            appended: Cell::new(0),
            settled: Cell::new(0),
            settled_changed: Notify::new(),
            successor: RefCell::new(None),
        }
    }

    /// Closes the queue and moves what it holds (sealed, and the open batch)
    /// to `next`, the queue of the sink a reload changed this one into; the
    /// sender here ends once it has sent the batch it holds, or handed it
    /// to `next` (see [`successor`](Self::successor)).
    pub fn hand_over(&self, next: std::rc::Rc<SinkQueue>) {
        self.close();
        let moved: Vec<Batch> = self.state.borrow_mut().sealed.drain(..).collect();
        self.counters().queued_batches.set(0);
        for b in moved {
            next.adopt(b, false);
        }
        *self.successor.borrow_mut() = Some(next);
    }

    /// The queue that takes this one's batches after a reload changed its
    /// sink: the first along the chain of changes that is still open (one
    /// changed again has handed its own on); `None` when there is none, or
    /// it has closed too (the collector stops).
    pub fn successor(&self) -> Option<std::rc::Rc<SinkQueue>> {
        let mut next = self.successor.borrow().clone();
        while let Some(q) = next {
            if !q.state.borrow().closed {
                return Some(q);
            }
            next = q.successor.borrow().clone();
        }
        None
    }

    /// Takes a sealed batch from the queue a reload changed into this one
    /// (past the capacity, for a moment: the budget was the other queue's),
    /// at the front when it is older than what is queued.
    pub fn adopt(&self, batch: Batch, front: bool) {
        let mut st = self.state.borrow_mut();
        if front {
            st.sealed.push_front(batch);
        } else {
            st.sealed.push_back(batch);
        }
        self.counters().queued_batches.set(st.sealed.len() as i64);
        drop(st);
        self.work.notify_one();
    }

    fn counters(&self) -> &SinkCounters {
        &self.counters.sinks[self.sink]
    }

    /// Whether a record of `len` bytes from `source` can be appended now.
    /// A source below the top rank is refused once its mark of batches is
    /// sealed, even with room in the open batch, so that what it adds per
    /// batch sent is one batch at most and the queue above its mark stays
    /// headroom for the ranks above it (udp, higher priorities); the top
    /// rank may fill it all.
    #[inline]
    pub fn has_room(&self, len: usize, source: usize) -> bool {
        let st = self.state.borrow();
        let mark = self.mark(source);
        if mark < self.capacity {
            st.sealed.len() < mark
        } else {
            st.builder.fits(len) || st.sealed.len() < self.capacity
        }
    }

    /// Whether `source` is of the queue's top rank (it may fill it all).
    pub fn is_top(&self, source: usize) -> bool {
        self.mark(source) >= self.capacity
    }

    /// `source`'s admission mark (a source the sink does not take, added
    /// since the marks were set, is of the top rank: it sends nothing here).
    #[inline]
    fn mark(&self, source: usize) -> usize {
        self.marks
            .borrow()
            .get(source)
            .copied()
            .unwrap_or(self.capacity)
    }

    /// The admission marks of a reloaded plan (sources were added).
    pub fn set_marks(&self, marks: Vec<usize>) {
        *self.marks.borrow_mut() = marks;
    }

    /// Appends a record; the caller checked [`has_room`](Self::has_room).
    #[inline]
    pub fn append(
        &self,
        pool: &mut BatchPool,
        ts_ns: u64,
        key_hash: u32,
        source: u16,
        record: &[u8],
        meta: &[u8],
    ) {
        self.appended.set(self.appended.get() + 1);
        let mut st = self.state.borrow_mut();
        if !st.builder.fits(record.len() + meta.len()) {
            self.seal(&mut st);
        }
        if st.builder.push(pool, ts_ns, key_hash, source, record, meta) {
            self.opened.notify_one();
        }
        if self.checksum {
            st.builder.checksum_ahead();
        }
        if st.builder.is_full() && st.sealed.len() < self.capacity {
            self.seal(&mut st);
        }
    }

    /// `when_full = "drop_oldest"`: drops the oldest sealed batch (one the
    /// sender has not taken) to make room; returns its records (0: none was
    /// queued).
    pub fn evict_oldest(&self, pool: &mut BatchPool) -> usize {
        let mut st = self.state.borrow_mut();
        let Some(b) = st.sealed.pop_front() else {
            return 0;
        };
        self.counters().queued_batches.set(st.sealed.len() as i64);
        let n = b.len();
        pool.give(b);
        n
    }

    /// Records appended since start (see `settled`).
    pub fn appended(&self) -> u64 {
        self.appended.get()
    }

    /// Records settled since start: a disk buffer made them durable (or
    /// dropped them, counted).
    pub fn settled(&self) -> u64 {
        self.settled.get()
    }

    /// The disk buffer settled `records` more (in append order).
    pub fn settle(&self, records: u64) {
        if records > 0 {
            self.settled.set(self.settled.get() + records);
            self.settled_changed.notify_waiters();
        }
    }

    fn seal(&self, st: &mut QueueState) {
        debug_assert!(st.sealed.len() < self.capacity || st.closed);
        if let Some(b) = st.builder.seal() {
            st.sealed.push_back(b);
            self.counters().queued_batches.set(st.sealed.len() as i64);
            self.work.notify_one();
        }
    }

    /// Seals the open batch if the queue has room; false if it had to wait.
    pub fn seal_open(&self) -> bool {
        let mut st = self.state.borrow_mut();
        if !st.builder.is_open() {
            return true;
        }
        if st.sealed.len() < self.capacity {
            self.seal(&mut st);
            return true;
        }
        false
    }

    /// Closes the queue: the open batch is sealed and the sender drains what
    /// is queued, then stops.
    pub fn close(&self) {
        let mut st = self.state.borrow_mut();
        st.closed = true;
        self.seal(&mut st);
        self.work.notify_one();
        // The linger task, waiting for a batch to open, ends.
        self.opened.notify_one();
    }

    pub fn is_idle(&self) -> bool {
        let st = self.state.borrow();
        st.sealed.is_empty() && !st.builder.is_open()
    }

    /// Seals the open batch if it has lingered and nothing is queued: the
    /// sender asks for work, and that batch is due. (While batches are
    /// queued, a lingered batch goes on filling instead of being sealed
    /// part-full: it could not leave sooner, and the queue's budget, counted
    /// in batches, stays a budget of full batches.)
    fn seal_lingered(&self, st: &mut QueueState) {
        if st.sealed.is_empty()
            && st
                .builder
                .deadline()
                .is_some_and(|d| tokio::time::Instant::now() >= d)
        {
            self.seal(st);
        }
    }

    /// The next sealed batch, waiting for one; `None` once closed and empty.
    pub async fn next(&self) -> Option<Batch> {
        loop {
            {
                let mut st = self.state.borrow_mut();
                self.seal_lingered(&mut st);
                if let Some(b) = st.sealed.pop_front() {
                    self.counters().queued_batches.set(st.sealed.len() as i64);
                    drop(st);
                    self.space.notify_waiters();
                    return Some(b);
                }
                if st.closed {
                    return None;
                }
            }
            self.work.notified().await;
        }
    }

    /// The next sealed batch if one is queued, without waiting.
    pub fn try_next(&self) -> Option<Batch> {
        let mut st = self.state.borrow_mut();
        self.seal_lingered(&mut st);
        let b = st.sealed.pop_front()?;
        self.counters().queued_batches.set(st.sealed.len() as i64);
        drop(st);
        self.space.notify_waiters();
        Some(b)
    }

    /// Seals each batch once it has lingered `batch.linger_ms`, unless
    /// sealed batches are waiting (the sender is behind: the open batch goes
    /// on filling and the sender seals it when it asks for the next one).
    /// Runs until the queue closes.
    pub async fn linger(&self) {
        loop {
            let (deadline, queued) = {
                let st = self.state.borrow();
                if st.closed {
                    return;
                }
                (st.builder.deadline(), !st.sealed.is_empty())
            };
            match deadline {
                None => self.opened.notified().await,
                Some(d) if queued && tokio::time::Instant::now() >= d => {
                    let left = self.space.notified();
                    tokio::pin!(left);
                    left.as_mut().enable();
                    if !self.state.borrow().sealed.is_empty() {
                        left.await;
                    }
                }
                Some(d) if tokio::time::Instant::now() >= d => {
                    if !self.seal_open() {
                        // The queue is full: try again a linger later.
                        let linger = self.state.borrow().builder.limits().linger_ms;
                        tokio::time::sleep(std::time::Duration::from_millis(linger.max(1))).await;
                    }
                }
                Some(d) => tokio::time::sleep_until(d).await,
            }
        }
    }
}
