//! The one handle every source offers its records through, per shard.
//!
//! An [`Ingest`] holds the shard's batch pool (through its [`SinkCtx`]), one
//! [`SinkQueue`] per sink, one outbound lane (a [`BatchBuilder`] and a ring
//! producer) per other shard, and the inbound ring consumers. A source checks
//! a record with [`Ingest::refuse`] (the admission every source shares),
//! picks its owner with [`Ingest::owner`], and calls [`Ingest::try_offer`]
//! ("taken", or [`Blocked`]: a source that cannot wait drops and counts it)
//! or [`Ingest::offer`] (waits while the destination is full). The record is
//! appended to the owning shard's sink queues (here) or to the lane toward
//! the owner (there). Nothing in it is shared with another thread except the
//! ring ends, the wake-ups and the counters, so all of it lives in
//! `Rc`/`RefCell` and never locks. The runtime's shard owns one and drives
//! its lifecycle; sources see nothing of the runtime.

use super::{PlanCell, SinkCtx, SinkQueue};
use crate::codec::index;
use crate::config::{BatchLimits, FieldRef, PartitionBy, Plan, Utf8Policy};
use crate::metrics::DropReason;
use crate::metrics::ShardMetrics;
use crate::record::{meta, Batch, BatchBuilder, BatchPool};
use crate::route::{Crossing, ShardEnds, ShardWake};
use rtrb::{Consumer, Producer};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::os::fd::RawFd;
use std::rc::Rc;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;

/// Limits of the batches that cross from one shard to another. Small enough
/// that a crossing adds little latency, large enough to pay per batch.
pub const CROSSING_BATCH: BatchLimits = BatchLimits {
    max_records: 1024,
    max_bytes: 256 * 1024,
    linger_ms: 1,
};

/// Where [`Ingest::route`] sends a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Routed {
    /// To this (key, shard), except to the sinks whose bits are set in the
    /// mask (their `where` does not take it); with why it did not decode,
    /// when it did not.
    To((u32, usize), Option<&'static str>, u64),
    /// Dropped (counted): why it did not decode.
    Dropped(&'static str),
}

/// Why a record could not be taken now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Blocked {
    /// The queue of this sink (on this shard) is full.
    Sink(usize),
    /// The ring to this shard is full.
    Ring(usize),
}

/// The batch being filled for another shard and the ring that carries it.
struct OutLane {
    state: RefCell<(BatchBuilder, Producer<Crossing>)>,
    opened: Notify,
    /// The plan generation the open batch's records were routed by (a
    /// batch holds one generation's records only).
    generation: Cell<u32>,
}

pub struct Ingest {
    pub id: usize,
    pub shards: usize,
    /// The plan run now (a reload replaces it; see [`Ingest::reload`]).
    pub plan: Rc<PlanCell>,
    pub metrics: Arc<ShardMetrics>,
    /// Open connections per source, over all shards (`max_connections`).
    pub connections: Arc<Vec<AtomicUsize>>,
    /// Each source's ingress rate on this shard (`rate_limit`), if set.
    rates: RefCell<Vec<Option<crate::limiter::IngressRate>>>,
    /// Indexed by sink id (a removed sink's closed queue stays).
    pub sinks: RefCell<Vec<Rc<SinkQueue>>>,
    /// What the shard's sinks may use of it (plan, counters, clock, pool).
    pub ctx: Rc<SinkCtx>,
    out: Vec<Option<OutLane>>,
    inbound: RefCell<Vec<Option<Consumer<Crossing>>>>,
    returns_out: RefCell<Vec<Option<Producer<Batch>>>>,
    returns_in: RefCell<Vec<Option<Consumer<Batch>>>>,
    wakes: Arc<Vec<ShardWake>>,
    inbound_busy: Cell<bool>,
    /// Set when the shard begins to stop; sources finish their reads.
    pub stopping: Rc<Cell<bool>>,
    /// Sockets to shut down for reading when the shard stops (or a reload
    /// removes their source), with their source.
    open_fds: RefCell<HashMap<u64, (usize, RawFd)>>,
    next_fd_key: Cell<u64>,
    /// Source tasks (listeners, connections, datagram loops) still running.
    active_sources: Cell<usize>,
    sources_changed: Notify,
    /// Per source id: signalled when the shard begins to stop, or a reload
    /// removes the source.
    stop_signals: RefCell<Vec<Rc<Notify>>>,
}

impl Ingest {
    pub fn new(
        plan: Arc<Plan>,
        ends: ShardEnds,
        metrics: Arc<ShardMetrics>,
        connections: Arc<Vec<AtomicUsize>>,
    ) -> Ingest {
        let id = ends.shard;
        let shards = plan.shards;
        let sinks: Vec<Rc<SinkQueue>> = plan
            .sinks
            .iter()
            .enumerate()
            .map(|(i, s)| Rc::new(SinkQueue::new(s, i, metrics.clone())))
            .collect();
        let (batch_records, batch_bytes, keep) = pool_sizes(&plan);
        let out = ends
            .out
            .into_iter()
            .map(|p| {
                p.map(|p| OutLane {
                    state: RefCell::new((BatchBuilder::new(CROSSING_BATCH), p)),
                    opened: Notify::new(),
                    generation: Cell::new(1),
                })
            })
            .collect();
        let stopping = Rc::new(Cell::new(false));
        let plan = Rc::new(PlanCell::new(plan));
        let ctx = Rc::new(SinkCtx::new(
            id,
            plan.clone(),
            metrics.clone(),
            stopping.clone(),
            BatchPool::new(batch_records, batch_bytes, keep),
        ));
        Ingest {
            ctx,
            id,
            shards,
            sinks: RefCell::new(sinks),
            out,
            inbound: RefCell::new(ends.inbound),
            returns_out: RefCell::new(ends.returns_out),
            returns_in: RefCell::new(ends.returns_in),
            wakes: ends.wakes,
            inbound_busy: Cell::new(false),
            stopping: stopping.clone(),
            open_fds: RefCell::new(HashMap::new()),
            next_fd_key: Cell::new(0),
            active_sources: Cell::new(0),
            sources_changed: Notify::new(),
            stop_signals: RefCell::new(
                (0..plan.sources.len())
                    .map(|_| Rc::new(Notify::new()))
                    .collect(),
            ),
            rates: RefCell::new(plan.sources.iter().map(ingress_rate).collect()),
            plan,
            metrics,
            connections,
        }
    }

    /// Wall-clock time, nanoseconds since the Unix epoch ([`SinkCtx::now_ns`](SinkCtx::now_ns)).
    #[inline]
    pub fn now_ns(&self) -> u64 {
        self.ctx.now_ns()
    }

    /// Whether `source`'s rate limit admits one more record now (always,
    /// without a limit).
    #[inline]
    pub fn rate_admit(&self, source: usize) -> bool {
        match &mut self.rates.borrow_mut()[source] {
            None => true,
            Some(r) => r.try_take(self.ctx.clock.delta_as_nanos(0, self.ctx.clock.raw())),
        }
    }

    /// Waits until `source`'s rate limit admits a record, then takes it
    /// (`when_exceeded = "block"`: the connection is not read meanwhile).
    pub async fn rate_wait(&self, source: usize) {
        loop {
            let wait = match &mut self.rates.borrow_mut()[source] {
                None => return,
                Some(r) => {
                    let now = self.ctx.clock.delta_as_nanos(0, self.ctx.clock.raw());
                    if r.try_take(now) {
                        return;
                    }
                    r.wait_ns(now)
                }
            };
            tokio::time::sleep(std::time::Duration::from_nanos(wait.max(1_000_000))).await;
        }
    }

    /// Why `source` cannot take `record` whatever the sinks' state (the
    /// admission every source shares): empty, not UTF-8 when the source
    /// drops such records, or no sink reads the source.
    #[inline]
    pub fn refuse(&self, source: usize, record: &[u8]) -> Option<DropReason> {
        let plan = &self.plan.sources[source];
        if record.is_empty() {
            Some(DropReason::Empty)
        } else if plan.utf8 == Utf8Policy::Drop && std::str::from_utf8(record).is_err() {
            Some(DropReason::InvalidUtf8)
        } else if plan.sinks.is_empty() {
            Some(DropReason::NoSink)
        } else {
            None
        }
    }

    /// The partition key of records from `peer` and the shard that owns
    /// them (`partition_by`).
    #[inline]
    pub fn owner(&self, source: usize, peer: &std::net::SocketAddr) -> (u32, usize) {
        match self.plan.sources[source].partition_by {
            // A field's owner comes from `decode`, record by record.
            PartitionBy::None | PartitionBy::Field(_) => (0, self.id),
            PartitionBy::Peer => {
                let k = crate::route::peer_key(peer);
                (k, crate::route::owner(k, self.shards))
            }
        }
    }

    /// Where a record goes, its source's decoding applied (`now_ns` dates
    /// an RFC 3164 timestamp): `routed` is the owner without it. With
    /// `partition_by = { field }`, the key of the field's value and the
    /// shard that owns it (a record without the field keeps `routed`); the
    /// sinks whose `where` does not take it, as a mask. A record that does
    /// not decode is counted (`decode_errors`), and passed on where `routed`
    /// says (to the sinks whose `where` takes a record without the field)
    /// or dropped (counted, `reason="decode"`) as the source's `on_error`
    /// says; the reason comes back for the log. When the source keeps an
    /// `index`, the record's field index is appended to `record_meta`.
    #[inline]
    pub fn route(
        &self,
        source: usize,
        record: &[u8],
        now_ns: u64,
        routed: (u32, usize),
        record_meta: &mut Vec<u8>,
    ) -> Routed {
        let plan = &self.plan.sources[source];
        // JSON is checked while looking up the partition key, the key most
        // often asked for.
        let json_key = match &plan.partition_by {
            PartitionBy::Field(FieldRef::Key(k)) => Some(&**k),
            _ => None,
        };
        let parsed = match index::parse(plan.decoding, record, now_ns, json_key) {
            Ok(p) => p,
            Err(why) => {
                let c = &self.metrics.sources[source];
                c.decode_errors.add(1);
                if plan.on_error == crate::config::OnError::Drop {
                    c.drop(DropReason::Decode, 1);
                    return Routed::Dropped(why);
                }
                let skip = plan
                    .filters
                    .iter()
                    .filter(|f| !f.matcher.takes(None))
                    .fold(0u64, |m, f| m | 1 << f.sink);
                return Routed::To(routed, Some(why), skip);
            }
        };
        let to = match &plan.partition_by {
            PartitionBy::Field(f) => parsed
                .value(record, f, |v| v.map(|v| self.keyed(v)))
                .unwrap_or(routed),
            _ => routed,
        };
        let mut skip = 0u64;
        for f in &plan.filters {
            if !parsed.value(record, &f.field, |v| f.matcher.takes(v)) {
                skip |= 1 << f.sink;
            }
        }
        if plan.index {
            // Too much meta already (a long topic): the fields render empty.
            meta::put_with(record_meta, meta::FIELDS, |o| parsed.write(record.len(), o));
        }
        Routed::To(to, None, skip)
    }

    /// The `where` mask of `record` under the plan run now (a record
    /// routed by an earlier one: a reload came between).
    fn skip_mask(&self, source: usize, record: &[u8], now_ns: u64) -> u64 {
        let plan = &self.plan.sources[source];
        if plan.filters.is_empty() {
            return 0;
        }
        let parsed = index::parse(plan.decoding, record, now_ns, None);
        plan.filters
            .iter()
            .filter(|f| match &parsed {
                Ok(p) => !p.value(record, &f.field, |v| f.matcher.takes(v)),
                Err(_) => !f.matcher.takes(None),
            })
            .fold(0u64, |m, f| m | 1 << f.sink)
    }

    #[inline]
    fn keyed(&self, value: &[u8]) -> (u32, usize) {
        let k = crate::route::value_key(value);
        (k, crate::route::owner(k, self.shards))
    }

    /// Starts what moves records on this shard for its life: each sink
    /// queue's linger, each outbound lane's linger, the inbound rings.
    pub fn start(self: &Rc<Self>) {
        for q in self.sinks.borrow().iter() {
            let q = q.clone();
            crate::io::spawn(async move { q.linger().await });
        }
        for dest in 0..self.shards {
            if dest != self.id {
                crate::io::spawn(self.clone().lane_linger(dest));
            }
        }
        crate::io::spawn(self.clone().inbound());
    }

    /// Runs `plan` from now on (a reload, [`crate::config::reload`]): the
    /// sinks `added` (new ids, in order) get queues, with their linger; the
    /// queues of those `removed` close (their senders end once they have
    /// sent or kept what they held); the sources the plan marks removed are
    /// told to stop and their sockets are shut for reading. Returns the new
    /// queues, whose senders the runtime starts.
    pub fn reload(
        self: &Rc<Self>,
        plan: Arc<Plan>,
        added: &[usize],
        removed: &[usize],
    ) -> Vec<Rc<SinkQueue>> {
        self.plan.set(plan.clone());
        {
            let mut rates = self.rates.borrow_mut();
            while rates.len() < plan.sources.len() {
                let next = ingress_rate(&plan.sources[rates.len()]);
                rates.push(next);
            }
        }
        let (records, bytes, keep) = pool_sizes(&plan);
        self.ctx.pool.borrow_mut().grow(records, bytes, keep);
        let mut new = Vec::with_capacity(added.len());
        {
            let mut sinks = self.sinks.borrow_mut();
            for (s, q) in sinks.iter().enumerate() {
                if !plan.sinks[s].removed {
                    q.set_marks(plan.sinks[s].marks.clone());
                }
            }
            for &s in added {
                assert_eq!(s, sinks.len(), "added sinks take the next ids");
                let q = Rc::new(SinkQueue::new(&plan.sinks[s], s, self.metrics.clone()));
                sinks.push(q.clone());
                new.push(q);
            }
        }
        for q in &new {
            let q = q.clone();
            crate::io::spawn(async move { q.linger().await });
        }
        for &s in removed {
            let old = self.sinks.borrow()[s].clone();
            let memory =
                |p: &crate::config::SinkPlan| p.buffer.kind == crate::config::BufferKind::Memory;
            // A changed sink with a memory buffer (before and after): its
            // batches go on in the new one's queue.
            let changed_into = new
                .iter()
                .find(|q| {
                    let (was, is) = (&plan.sinks[s], &plan.sinks[q.sink]);
                    is.name == was.name && memory(is) && memory(was)
                })
                .cloned();
            match changed_into {
                Some(next) => old.hand_over(next),
                None => old.close(),
            }
        }
        // Sources waiting for room look at the plan again (a sink they
        // waited for may no longer take them, or be gone).
        for q in self.sinks.borrow().iter() {
            q.space.notify_waiters();
        }
        self.wakes[self.id].space.notify_waiters();
        for (source, fd) in self.open_fds.borrow().values() {
            if plan.sources[*source].removed {
                // SAFETY: the fds are open sockets owned by live source tasks.
                unsafe { libc::shutdown(*fd, libc::SHUT_RD) };
            }
        }
        {
            let mut signals = self.stop_signals.borrow_mut();
            while signals.len() < plan.sources.len() {
                signals.push(Rc::new(Notify::new()));
            }
            for (s, n) in signals.iter().enumerate() {
                if plan.sources[s].removed {
                    n.notify_waiters();
                }
            }
        }
        new
    }

    /// Stops the sources: no new connections; every read in flight
    /// completes. Returns when every source task has ended.
    pub async fn stop_sources(&self) {
        self.stopping.set(true);
        for n in self.stop_signals.borrow().iter() {
            n.notify_waiters();
        }
        for (_, fd) in self.open_fds.borrow().values() {
            // SAFETY: the fds are open sockets owned by live source tasks.
            unsafe { libc::shutdown(*fd, libc::SHUT_RD) };
        }
        while self.active_sources.get() > 0 {
            let wait = self.sources_changed.notified();
            tokio::pin!(wait);
            wait.as_mut().enable();
            if self.active_sources.get() == 0 {
                break;
            }
            wait.await;
        }
    }

    /// Sends every outbound lane's open batch across (waiting for room).
    pub async fn flush_lanes(&self) {
        for dest in 0..self.shards {
            if dest == self.id {
                continue;
            }
            while !self.flush_lane(dest) {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    }

    /// Whether nothing waits in, or is being taken from, the inbound rings.
    pub fn inbound_idle(&self) -> bool {
        !self.inbound_pending() && !self.inbound_busy.get()
    }

    /// Takes back this shard's batches that other shards have emptied.
    fn reclaim(&self) {
        let mut returns = self.returns_in.borrow_mut();
        let mut pool = self.ctx.pool.borrow_mut();
        for c in returns.iter_mut().flatten() {
            while let Ok(b) = c.pop() {
                pool.give(b);
            }
        }
    }

    /// Appends a record and its meta (see [`crate::record::meta`]; empty
    /// for none) bound for shard `dest` without waiting.
    #[inline]
    #[allow(clippy::too_many_arguments)]
    pub fn try_offer(
        &self,
        source: usize,
        dest: usize,
        ts_ns: u64,
        key_hash: u32,
        record: &[u8],
        meta: &[u8],
        skip: u64,
    ) -> Result<(), Blocked> {
        let len = record.len() + meta.len();
        if dest == self.id {
            let src = &self.plan.sources[source];
            let sinks = self.sinks.borrow();
            for &s in &src.sinks {
                let q = &sinks[s];
                if !skipped(skip, s) && !q.drops_when_full && !q.has_room(len, source) {
                    return Err(Blocked::Sink(s));
                }
            }
            let mut pool = self.ctx.pool.borrow_mut();
            for &s in &src.sinks {
                if skipped(skip, s) {
                    continue;
                }
                let q = &sinks[s];
                if q.has_room(len, source) {
                    q.append(&mut pool, ts_ns, key_hash, source as u16, record, meta);
                } else if q.evicts_when_full && q.is_top(source) {
                    // drop_oldest: the oldest queued batch makes room (for
                    // the top priority; a lower one is dropped instead).
                    let n = q.evict_oldest(&mut pool);
                    let c = &self.metrics.sinks[s];
                    c.buffer_dropped.add(n as u64);
                    c.buffer_dropped_oldest.add(n as u64);
                    if q.has_room(len, source) {
                        q.append(&mut pool, ts_ns, key_hash, source as u16, record, meta);
                    } else {
                        c.buffer_dropped.add(1);
                    }
                } else {
                    // when_full = "drop_newest" on a memory buffer.
                    self.metrics.sinks[s].buffer_dropped.add(1);
                }
            }
            return Ok(());
        }
        // The `where` mask crosses in front of the record's meta.
        let mut carried = [0u8; SKIP_ITEM_BYTES];
        let spilled;
        let meta = match (skip, meta.is_empty()) {
            (0, _) => meta,
            (_, true) => {
                carried[0] = SKIP_ITEM;
                carried[1..3].copy_from_slice(&8u16.to_le_bytes());
                carried[3..].copy_from_slice(&skip.to_le_bytes());
                &carried[..]
            }
            (_, false) => {
                // A record with meta of its own and a mask (no source has
                // both today): put together once.
                let mut v = Vec::with_capacity(SKIP_ITEM_BYTES + meta.len());
                v.push(SKIP_ITEM);
                v.extend_from_slice(&8u16.to_le_bytes());
                v.extend_from_slice(&skip.to_le_bytes());
                v.extend_from_slice(meta);
                spilled = v;
                &spilled[..]
            }
        };
        let len = record.len() + meta.len();
        let lane = self.out[dest]
            .as_ref()
            .expect("a lane to every other shard");
        let mut st = lane.state.borrow_mut();
        let (builder, ring) = &mut *st;
        let generation = self.plan.generation() as u32;
        let older = builder.is_open() && lane.generation.get() != generation;
        if older || !builder.fits(len) {
            if ring.is_full() {
                return Err(Blocked::Ring(dest));
            }
            self.cross(builder, ring, dest, lane.generation.get());
        }
        let opened = {
            let mut pool = self.ctx.pool.borrow_mut();
            builder.push(&mut pool, ts_ns, key_hash, source as u16, record, meta)
        };
        if opened {
            lane.generation.set(generation);
            lane.opened.notify_one();
        }
        if builder.is_full() && !ring.is_full() {
            self.cross(builder, ring, dest, generation);
        }
        Ok(())
    }

    /// Seals the lane's open batch into the ring to `dest` (which has room).
    /// `generation`: the plan its records were routed by.
    fn cross(
        &self,
        builder: &mut BatchBuilder,
        ring: &mut Producer<Crossing>,
        dest: usize,
        generation: u32,
    ) {
        if let Some(b) = builder.seal() {
            self.metrics.crossed_records.add(b.len() as u64);
            let c = Crossing {
                batch: b,
                generation,
            };
            if ring.push(c).is_err() {
                unreachable!("the caller checked the ring has room");
            }
            self.wakes[dest].data.notify_one();
            self.reclaim();
        }
    }

    /// Appends a record and its meta bound for shard `dest`, waiting while
    /// it is full.
    #[inline]
    #[allow(clippy::too_many_arguments)]
    pub async fn offer(
        &self,
        source: usize,
        dest: usize,
        ts_ns: u64,
        key_hash: u32,
        record: &[u8],
        meta: &[u8],
        mut skip: u64,
    ) {
        let mut generation = self.plan.generation();
        loop {
            if generation != self.plan.generation() {
                // A reload while it waited: the new plan's `where` decides.
                generation = self.plan.generation();
                skip = self.skip_mask(source, record, ts_ns);
            }
            let blocked = match self.try_offer(source, dest, ts_ns, key_hash, record, meta, skip) {
                Ok(()) => return,
                Err(b) => b,
            };
            let queue;
            let notify = match blocked {
                Blocked::Sink(s) => {
                    self.metrics.sinks[s].backpressure_waits.add(1);
                    queue = self.sinks.borrow()[s].clone();
                    &queue.space
                }
                Blocked::Ring(_) => &self.wakes[self.id].space,
            };
            let wait = notify.notified();
            tokio::pin!(wait);
            wait.as_mut().enable();
            if self
                .try_offer(source, dest, ts_ns, key_hash, record, meta, skip)
                .is_ok()
            {
                return;
            }
            wait.await;
        }
    }

    /// Seals a lane's open batch once it has lingered; runs for the shard's
    /// life.
    async fn lane_linger(self: Rc<Self>, dest: usize) {
        let lane = self.out[dest].as_ref().expect("lane exists");
        loop {
            let deadline = lane.state.borrow().0.deadline();
            match deadline {
                None => lane.opened.notified().await,
                Some(d) if tokio::time::Instant::now() >= d => {
                    if !self.flush_lane(dest) {
                        let wait = self.wakes[self.id].space.notified();
                        tokio::pin!(wait);
                        wait.as_mut().enable();
                        if !self.flush_lane(dest) {
                            wait.await;
                        }
                    }
                }
                Some(d) => tokio::time::sleep_until(d).await,
            }
        }
    }

    /// Sends the lane's open batch if the ring has room; false if full.
    fn flush_lane(&self, dest: usize) -> bool {
        let lane = self.out[dest].as_ref().expect("lane exists");
        let mut st = lane.state.borrow_mut();
        let (builder, ring) = &mut *st;
        if !builder.is_open() {
            return true;
        }
        if ring.is_full() {
            return false;
        }
        self.cross(builder, ring, dest, lane.generation.get());
        true
    }

    fn inbound_pending(&self) -> bool {
        self.inbound
            .borrow()
            .iter()
            .flatten()
            .any(|c| !c.is_empty())
    }

    /// Takes batches from the rings into this shard's sinks; runs for the
    /// shard's life, parked while the rings are empty.
    async fn inbound(self: Rc<Self>) {
        loop {
            let mut got = false;
            for k in 0..self.shards {
                loop {
                    let popped = match self.inbound.borrow_mut()[k].as_mut() {
                        Some(c) => c.pop().ok(),
                        None => None,
                    };
                    let Some(Crossing {
                        mut batch,
                        generation,
                    }) = popped
                    else {
                        break;
                    };
                    got = true;
                    self.inbound_busy.set(true);
                    self.wakes[k].space.notify_waiters();
                    // Routed by a plan a reload gave the sending shard first:
                    // this one takes it in a moment (stopping, it may not:
                    // what it cannot route is counted).
                    let mut unknown = false;
                    while generation as usize > self.plan.generation() {
                        if self.stopping.get() {
                            unknown = true;
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                    for (e, rec, meta) in batch.iter() {
                        // Routed by another plan than this shard's (one
                        // record may wait across a reload): its `where` mask
                        // is looked at again.
                        let stale = generation as usize != self.plan.generation();
                        let source = e.source as usize;
                        if unknown && source >= self.plan.sources.len() {
                            self.metrics.sources[source].drop(DropReason::NoSink, 1);
                            continue;
                        }
                        let (meta, skip) = match meta {
                            [SKIP_ITEM, 8, 0, rest @ ..] if rest.len() >= 8 => (
                                &rest[8..],
                                u64::from_le_bytes(rest[..8].try_into().expect("8 bytes")),
                            ),
                            _ => (meta, 0),
                        };
                        let skip = if stale {
                            self.skip_mask(source, rec, e.ts_ns)
                        } else {
                            skip
                        };
                        self.offer(source, self.id, e.ts_ns, e.key_hash, rec, meta, skip)
                            .await;
                    }
                    batch.clear();
                    if let Some(p) = self.returns_out.borrow_mut()[k].as_mut() {
                        // A full return ring cannot happen (it holds more than
                        // can be in flight); if it did, the batch is freed.
                        let _ = p.push(batch);
                    }
                }
            }
            let waiting: usize = self
                .inbound
                .borrow()
                .iter()
                .flatten()
                .map(|c| c.slots())
                .sum();
            self.metrics.ring_batches.set(waiting as i64);
            if got {
                continue;
            }
            self.inbound_busy.set(false);
            let wait = self.wakes[self.id].data.notified();
            tokio::pin!(wait);
            wait.as_mut().enable();
            if self.inbound_pending() {
                continue;
            }
            wait.await;
        }
    }

    /// The sinks of `source` with a disk buffer: a source that
    /// acknowledges its records (mqtt, updraft) waits for them to settle
    /// there.
    pub fn disk_sinks(&self, source: usize) -> Vec<usize> {
        self.plan.sources[source]
            .sinks
            .iter()
            .copied()
            .filter(|&s| self.plan.sinks[s].buffer.kind == crate::config::BufferKind::Disk)
            .collect()
    }

    /// Each of `sinks`' `appended()` mark now: once all have settled to
    /// them, what was offered so far is durable.
    pub fn marks(&self, sinks: &[usize]) -> Vec<(usize, u64)> {
        let queues = self.sinks.borrow();
        sinks.iter().map(|&s| (s, queues[s].appended())).collect()
    }

    /// The first of `marks` not yet settled.
    pub fn unsettled(&self, marks: &[(usize, u64)]) -> Option<(usize, u64)> {
        let queues = self.sinks.borrow();
        marks
            .iter()
            .find(|&&(s, mark)| queues[s].settled() < mark)
            .copied()
    }

    /// Waits until sink `s` has settled to `mark` (or moved at all: the
    /// caller looks again).
    pub async fn settle_wait(&self, (s, mark): (usize, u64)) {
        let q = self.sinks.borrow()[s].clone();
        let wait = q.settled_changed.notified();
        tokio::pin!(wait);
        wait.as_mut().enable();
        if q.settled() < mark {
            wait.await;
        }
    }

    /// Registers a socket of `source` to shut down when the shard stops (or
    /// a reload removes the source); returns its key.
    pub fn watch_fd(&self, source: usize, fd: RawFd) -> u64 {
        let key = self.next_fd_key.get();
        self.next_fd_key.set(key + 1);
        self.open_fds.borrow_mut().insert(key, (source, fd));
        if self.source_stopping(source) {
            // SAFETY: shutdown(2) on a descriptor the caller owns and keeps open.
            unsafe { libc::shutdown(fd, libc::SHUT_RD) };
        }
        key
    }

    /// What is signalled when `source` is to stop (see [`Ingest::source_stopping`]).
    pub fn stop_signal(&self, source: usize) -> Rc<Notify> {
        self.stop_signals.borrow()[source].clone()
    }

    /// Whether `source` is to stop reading: the shard stops, or a reload
    /// removed it.
    #[inline]
    pub fn source_stopping(&self, source: usize) -> bool {
        self.stopping.get() || self.plan.sources[source].removed
    }

    pub fn unwatch_fd(&self, key: u64) {
        self.open_fds.borrow_mut().remove(&key);
    }

    /// Runs a source task, counting it so that stopping can wait for it.
    pub fn spawn_source<F: std::future::Future<Output = ()> + 'static>(self: &Rc<Self>, task: F) {
        self.active_sources.set(self.active_sources.get() + 1);
        let shard = self.clone();
        crate::io::spawn(async move {
            task.await;
            shard.active_sources.set(shard.active_sources.get() - 1);
            shard.sources_changed.notify_waiters();
        });
    }
}

/// The batch pool's sizes for `plan`: records and bytes of a new batch (a
/// batch must take the largest record in one piece) and how many free
/// batches it keeps: the sum of its consumers, per sink its queue plus the
/// open batch and the one being sent, per outbound lane the open batch plus
/// a full ring.
fn pool_sizes(plan: &Plan) -> (usize, usize, usize) {
    let live = || plan.sinks.iter().filter(|s| !s.removed);
    let record_bytes = plan.max_record_bytes() + 1;
    let batch_bytes = live()
        .map(|s| s.batch.max_bytes)
        .chain([CROSSING_BATCH.max_bytes])
        .max()
        .unwrap_or(0)
        .max(record_bytes);
    let batch_records = live()
        .map(|s| s.batch.max_records)
        .chain([CROSSING_BATCH.max_records])
        .max()
        .unwrap_or(0)
        .min(1 << 16);
    let keep = live().map(|s| s.queue_batches + 2).sum::<usize>()
        + (plan.shards - 1) * (crate::route::RING_BATCHES + 1);
    (batch_records, batch_bytes, keep)
}

fn ingress_rate(s: &crate::config::SourcePlan) -> Option<crate::limiter::IngressRate> {
    s.rate_limit
        .map(|r| crate::limiter::IngressRate::new(r.per_shard_per_sec, 0))
}

/// Whether sink `s`'s bit is set in a `where` mask.
#[inline]
fn skipped(skip: u64, s: usize) -> bool {
    s < 64 && (skip >> s) & 1 == 1
}

/// The meta item that carries a record's `where` mask over the mesh, in
/// front of its own meta (stripped on the other side).
const SKIP_ITEM: u8 = 0xfe;
const SKIP_ITEM_BYTES: usize = 11;
