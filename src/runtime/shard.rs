//! One shard's life: what a thread starts and how it drains when told to stop.
//!
//! The records' path through the shard (sink queues, lanes, rings) is the
//! shard's [`Ingest`](crate::pipeline::ingest::Ingest); the runtime adds the
//! sinks' senders (each fed by its memory or disk buffer), the sources, and
//! the stop order.

use crate::config::Plan;
use crate::metrics::ShardMetrics;
use crate::pipeline::ingest::Ingest;
use crate::route::ShardEnds;
use crate::runtime::Lifecycle;
use std::cell::RefCell;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

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
        let mut senders = Vec::new();
        for q in &ingest.sinks {
            let rec = self
                .recovered
                .borrow_mut()
                .get_mut(q.sink)
                .and_then(Option::take);
            senders.push(crate::sinks::spawn_sender(
                ingest.ctx.clone(),
                q.clone(),
                rec,
            ));
        }
        ingest.start();
        start_sources(ingest);

        // Wait to be told to stop.
        loop {
            let wait = self.life.stop[self.id].notified();
            tokio::pin!(wait);
            wait.as_mut().enable();
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
        for q in &ingest.sinks {
            q.close();
        }
        for s in senders {
            let _ = s.await;
        }
        debug_assert!(ingest.sinks.iter().all(|q| q.is_idle()));
    }
}
