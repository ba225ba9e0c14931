//! `file`: newline-delimited records appended to `path` through io_uring.
//!
//! The file is opened with `O_APPEND`, so every shard's sender appends whole
//! batches to the same file without interleaving inside a write. A failed
//! open or write (a missing directory, a full disk) is retried with backoff;
//! the batch is kept until it is written.

use super::util::{Backoff, LogEvery};
use super::SinkQueue;
use crate::runtime::shard::Shard;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::Duration;
use tokio_uring::fs::{File, OpenOptions};

async fn open(path: &PathBuf) -> std::io::Result<File> {
    OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)
        .await
}

pub async fn run(shard: Rc<Shard>, queue: Rc<SinkQueue>, path: PathBuf) {
    let plan = &shard.plan.sinks[queue.sink];
    let name = plan.name.as_str();
    let counters = &shard.metrics.sinks[queue.sink];
    let mut backoff = Backoff::new(plan.retry);
    let mut log = LogEvery::new(Duration::from_secs(10));
    let mut file: Option<File> = None;

    while let Some(mut batch) = queue.next().await {
        loop {
            let Some(f) = file.as_ref() else {
                match open(&path).await {
                    Ok(f) => {
                        file = Some(f);
                        counters.connected.set(1);
                    }
                    Err(e) => {
                        counters.send_errors.add(1);
                        if let Some(held) = log.ready() {
                            tracing::warn!(sink = name, path = %path.display(), error = %e,
                                suppressed = held, "cannot open the sink's file; batches wait");
                        }
                        tokio::time::sleep(backoff.next_delay()).await;
                        counters.retries.add(1);
                    }
                }
                continue;
            };
            let payload = std::mem::take(&mut batch.payload);
            // O_APPEND: the kernel writes at the end whatever the offset.
            let (res, payload) = f.write_all_at(payload, 0).await;
            batch.payload = payload;
            match res {
                Ok(()) => {
                    backoff.reset();
                    counters.records.add(batch.len() as u64);
                    counters.bytes.add(batch.payload_bytes() as u64);
                    counters.batches.add(1);
                    break;
                }
                Err(e) => {
                    counters.send_errors.add(1);
                    if let Some(held) = log.ready() {
                        tracing::warn!(sink = name, path = %path.display(), error = %e,
                            suppressed = held, "write failed; the batch will be written again");
                    }
                    // Reopen: the file may have been rotated or removed.
                    file = None;
                    counters.connected.set(0);
                    tokio::time::sleep(backoff.next_delay()).await;
                    counters.retries.add(1);
                }
            }
        }
        shard.recycle(batch);
    }
    if let Some(f) = file.take() {
        let _ = f.close().await;
    }
    counters.connected.set(0);
}
