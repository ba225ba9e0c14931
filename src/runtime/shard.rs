//! One shard's life: what a thread starts and how it drains when told to stop.
//!
//! The records' path through the shard (sink queues, lanes, rings) is the
//! shard's [`Ingest`](crate::pipeline::ingest::Ingest); the runtime adds the
//! sinks' senders (each fed by its memory or disk buffer), the sources, and
//! the stop order.

use crate::config::{BufferKind, Plan};
use crate::metrics::ShardMetrics;
use crate::pipeline::ingest::Ingest;
use crate::pipeline::SinkQueue;
use crate::route::ShardEnds;
use crate::runtime::Lifecycle;
use crate::sources::BoundSocket;
use std::cell::RefCell;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

/// What one shard is to apply of a reload (see `Running::reload`).
#[derive(Debug)]
pub struct ShardReload {
    /// The merged plan ([`crate::config::reload`]).
    pub plan: Arc<Plan>,
    pub added_sinks: Vec<usize>,
    pub removed_sinks: Vec<usize>,
    /// This shard's sockets for the sources added.
    pub sockets: Vec<BoundSocket>,
    /// Told this shard's id once the shard runs the plan.
    pub done: mpsc::Sender<usize>,
}

/// The shard's sink senders (each with its sink's id), awaited at the end.
type Senders = Rc<RefCell<Vec<(usize, tokio::task::JoinHandle<()>)>>>;

/// How long a disk buffer that cannot be opened after a reload waits
/// before it is tried again.
const REOPEN_WAIT: Duration = Duration::from_secs(5);

pub struct Shard {
    pub id: usize,
    pub ingest: Rc<Ingest>,
    life: Arc<Lifecycle>,
    /// Each disk buffer's log as recovered at start, until its sender takes it.
    recovered: RefCell<Vec<Option<crate::wal::recovery::Recovery>>>,
}

impl Shard {
    pub fn new(
        plan: Arc<Plan>,
        ends: ShardEnds,
        metrics: Arc<ShardMetrics>,
        life: Arc<Lifecycle>,
        connections: Arc<Vec<AtomicUsize>>,
        recovered: Vec<Option<crate::wal::recovery::Recovery>>,
    ) -> Shard {
        let ingest = Rc::new(Ingest::new(plan, ends, metrics, connections));
        Shard {
            id: ingest.id,
            ingest,
            life,
            recovered: RefCell::new(recovered),
        }
    }

    /// Runs the shard until it is told to stop, then drains it: sources end
    /// their reads, lanes cross, rings empty, sinks send what they hold.
    pub async fn run(self, start_sources: impl FnOnce(&Rc<Ingest>)) {
        let ingest = &self.ingest;
        let senders: Senders = Rc::default();
        for q in ingest.sinks.borrow().iter() {
            let rec = self
                .recovered
                .borrow_mut()
                .get_mut(q.sink)
                .and_then(Option::take);
            let sender = crate::sinks::spawn_sender(ingest.ctx.clone(), q.clone(), rec);
            senders.borrow_mut().push((q.sink, sender));
        }
        ingest.start();
        start_sources(ingest);

        // Wait to be told to stop, applying reloads meanwhile.
        loop {
            let wait = self.life.stop[self.id].notified();
            tokio::pin!(wait);
            wait.as_mut().enable();
            // A reload handed over is applied even when the stop follows
            // at once: the other shards may run it already.
            let reload = self.life.reload[self.id]
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take();
            if let Some(r) = reload {
                self.apply(r, &senders);
                continue;
            }
            if self.life.stopping.load(Ordering::Acquire) {
                break;
            }
            wait.await;
        }

        // 1. Sources: no new connections; every read in flight completes.
        ingest.stop_sources().await;
        // 2. Lanes: what is batched for other shards crosses.
        ingest.flush_lanes().await;
        self.life.sources_done.fetch_add(1, Ordering::AcqRel);

        // 3. Rings: take everything the other shards send until they are done.
        loop {
            let all_done = self.life.sources_done.load(Ordering::Acquire) == ingest.shards;
            if all_done && ingest.inbound_idle() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }

        // 4. Sinks: seal and send what they hold, then stop.
        for q in ingest.sinks.borrow().iter() {
            q.close();
        }
        loop {
            let next = senders.borrow_mut().pop();
            let Some((_, s)) = next else { break };
            let _ = s.await;
        }
        debug_assert!(ingest.sinks.borrow().iter().all(|q| q.is_idle()));
    }

    /// Applies a reload: the plan is swapped, removed sinks' queues close
    /// and removed sources stop (in [`Ingest::reload`]), added sinks'
    /// senders start, then added sources'.
    fn apply(&self, r: ShardReload, senders: &Senders) {
        let ingest = &self.ingest;
        let added = ingest.reload(r.plan.clone(), &r.added_sinks, &r.removed_sinks);
        for q in added {
            let sink = q.sink;
            let sender = if r.plan.sinks[sink].buffer.kind == BufferKind::Disk {
                crate::io::spawn(open_disk_buffer(
                    ingest.clone(),
                    q,
                    r.plan.clone(),
                    senders.clone(),
                ))
            } else {
                crate::sinks::spawn_sender(ingest.ctx.clone(), q, None)
            };
            senders.borrow_mut().push((sink, sender));
        }
        crate::sources::start(ingest, r.sockets);
        let _ = r.done.send(self.id);
    }
}

/// Starts the sender of a disk buffer a reload added: once the senders of
/// removed sinks that used the same log have ended (a changed sink: the
/// old one keeps what it held in the log, the new one sends it), the log is
/// recovered (off the shard) and its sender runs until it ends.
async fn open_disk_buffer(
    ingest: Rc<Ingest>,
    queue: Rc<SinkQueue>,
    plan: Arc<Plan>,
    senders: Senders,
) {
    let sink = &plan.sinks[queue.sink];
    let before: Vec<usize> = plan
        .sinks
        .iter()
        .enumerate()
        .filter(|(_, s)| {
            s.removed && s.buffer.kind == BufferKind::Disk && s.buffer.dir == sink.buffer.dir
        })
        .map(|(i, _)| i)
        .collect();
    while senders
        .borrow()
        .iter()
        .any(|(s, h)| before.contains(s) && !h.is_finished())
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let shard = ingest.id;
    let dir = sink.buffer.dir.join(shard.to_string());
    let rec = loop {
        let (path, cfg, name) = (
            dir.clone(),
            crate::wal::driver::log_config(sink, plan.shards),
            sink.name.clone(),
        );
        let opened =
            crate::io::blocking(move || crate::wal::recovery::recover(&path, cfg, &name, shard))
                .await;
        match opened {
            Ok(rec) => break rec,
            Err(e) if ingest.ctx.sink_stopping(queue.sink) => {
                // Stopping (or removed again) and its log cannot be opened:
                // what waits for it is lost, and counted.
                tracing::error!(sink = %sink.name, shard, path = %dir.display(), error = %e,
                    "cannot open the disk buffer while stopping: the records waiting for it are lost (counted)");
                let counters = &ingest.metrics.sinks[queue.sink];
                while let Some(b) = queue.next().await {
                    counters.buffer_dropped.add(b.len() as u64);
                    ingest.ctx.recycle(b);
                }
                return;
            }
            Err(e) => {
                tracing::error!(sink = %sink.name, shard, path = %dir.display(), error = %e,
                    "cannot open the disk buffer after a reload; its records wait in memory, trying again in 5 s");
                tokio::time::sleep(REOPEN_WAIT).await;
            }
        }
    };
    let sender = crate::sinks::spawn_sender(ingest.ctx.clone(), queue, Some(rec));
    let _ = sender.await;
}
