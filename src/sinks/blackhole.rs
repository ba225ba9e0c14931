//! `blackhole`: counts batches and gives them back. For benchmarks and for
//! sources whose records are only to be counted.

use super::SinkQueue;
use crate::runtime::shard::Shard;
use std::rc::Rc;

pub async fn run(shard: Rc<Shard>, queue: Rc<SinkQueue>) {
    let counters = &shard.metrics.sinks[queue.sink];
    while let Some(batch) = queue.next().await {
        counters.records.add(batch.len() as u64);
        counters.bytes.add(batch.payload_bytes() as u64);
        counters.batches.add(1);
        shard.recycle(batch);
    }
}
