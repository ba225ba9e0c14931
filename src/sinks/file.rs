//! `file`: newline-delimited records appended to `path` through io_uring.
//!
//! The file is opened with `O_APPEND`, so every shard's sender appends whole
//! batches to the same file without interleaving inside a write. A failed
//! open or write (a missing directory, a full disk) is retried with backoff;
//! the batch is kept until it is written.

use super::util::Backoff;
use crate::logging::LogEvery;
use crate::pipeline::SinkCtx;
use std::path::PathBuf;
use std::time::Duration;
use tokio_uring::buf::BoundedBuf;
use tokio_uring::fs::{File, OpenOptions};

async fn open(path: &PathBuf) -> std::io::Result<File> {
    OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)
        .await
}

/// A sink's file on one shard.
pub struct FileOutput {
    sink: usize,
    path: PathBuf,
    file: Option<File>,
    backoff: Backoff,
    log: LogEvery,
}

impl FileOutput {
    pub fn new(shard: &SinkCtx, sink: usize, path: PathBuf) -> FileOutput {
        FileOutput {
            sink,
            path,
            file: None,
            backoff: Backoff::new(shard.plan.sinks[sink].retry),
            log: LogEvery::new(Duration::from_secs(10)),
        }
    }

    /// Appends `buf` whole, opening and retrying until it is written; gives
    /// the buffer back (`Ok`). With `give_up` (shutdown), no open or write
    /// starts after that instant (`Err`, unsent); one that started finishes.
    pub async fn deliver<B: BoundedBuf>(
        &mut self,
        shard: &SinkCtx,
        mut buf: B,
        give_up: Option<tokio::time::Instant>,
    ) -> Result<B, B> {
        let name = shard.plan.sinks[self.sink].name.as_str();
        let counters = &shard.metrics.sinks[self.sink];
        loop {
            if give_up.is_some_and(|t| tokio::time::Instant::now() >= t) {
                return Err(buf);
            }
            let Some(f) = self.file.as_ref() else {
                match open(&self.path).await {
                    Ok(f) => {
                        self.file = Some(f);
                        counters.connected.set(1);
                    }
                    Err(e) => {
                        counters.send_errors.add(1);
                        if let Some(held) = self.log.ready() {
                            tracing::warn!(sink = name, path = %self.path.display(), error = %e,
                                suppressed = held, "cannot open the sink's file; batches wait");
                        }
                        let delay = self.backoff.next_delay();
                        counters.retry_backoff_ms.set(delay.as_millis() as i64);
                        super::util::pause(delay, give_up).await;
                        counters.retries.add(1);
                    }
                }
                continue;
            };
            // O_APPEND: the kernel writes at the end whatever the offset.
            let (res, b) = f.write_all_at(buf, 0).await;
            buf = b;
            match res {
                Ok(()) => {
                    self.backoff.reset();
                    counters.retry_backoff_ms.set(0);
                    return Ok(buf);
                }
                Err(e) => {
                    counters.send_errors.add(1);
                    if let Some(held) = self.log.ready() {
                        tracing::warn!(sink = name, path = %self.path.display(), error = %e,
                            suppressed = held, "write failed; the batch will be written again");
                    }
                    // Reopen: the file may have been rotated or removed.
                    self.file = None;
                    counters.connected.set(0);
                    let delay = self.backoff.next_delay();
                    counters.retry_backoff_ms.set(delay.as_millis() as i64);
                    super::util::pause(delay, give_up).await;
                    counters.retries.add(1);
                }
            }
        }
    }

    pub async fn close(&mut self, shard: &SinkCtx) {
        if let Some(f) = self.file.take() {
            let _ = f.close().await;
        }
        shard.metrics.sinks[self.sink].connected.set(0);
    }
}
