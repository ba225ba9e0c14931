//! The connect–write–retry loop every stream output shares.
//!
//! A stream output (tcp, file, later others that write bytes to a byte
//! stream) is a [`Transport`]: how to open its stream, write a buffer whole,
//! and tell that an open stream has gone stale. [`StreamOutput`] wraps it
//! into a [`Deliver`]: it keeps a batch until its write completes; on a
//! failed open or write it counts the error, waits (exponential backoff,
//! full jitter), opens again and writes the batch again, so a broken stream
//! can repeat a batch but never loses one while the collector runs. With
//! `give_up` (shutdown), no open or write starts after that instant and the
//! batch comes back unsent; a write that has started is never cut off, so
//! the far end never sees a torn batch. Log lines are rate-limited and name
//! the sink, the far end and the shard.

use super::{pause, Backoff};
use crate::logging::LogEvery;
use crate::pipeline::{BatchId, Deliver, SinkCtx};
use crate::record::BatchView;
use std::future::Future;
use std::time::{Duration, Instant};

/// How a stream output reaches its far end.
pub trait Transport {
    /// One open stream.
    type Conn;
    /// The far end, for log lines (an address, a path).
    fn far_end(&self) -> &str;
    fn open(&self) -> impl Future<Output = std::io::Result<Self::Conn>>;
    /// Writes `buf` whole.
    fn write<B: crate::io::Buf>(
        &self,
        conn: &Self::Conn,
        buf: B,
    ) -> impl Future<Output = (std::io::Result<()>, B)>;
    /// Why an open stream must be replaced before the next write (the peer
    /// closed it), if it must.
    fn stale(&self, _conn: &Self::Conn) -> Option<&'static str> {
        None
    }
    /// Ends a stream; `graceful` lets the far end take all that was written.
    fn close(&self, conn: Self::Conn, graceful: bool) -> impl Future<Output = ()>;
}

/// A stream output on one shard.
pub struct StreamOutput<T: Transport> {
    sink: usize,
    shard: usize,
    transport: T,
    conn: Option<T::Conn>,
    backoff: Backoff,
    log: LogEvery,
    down_since: Option<Instant>,
    /// When a reload removed the sink: the instant it gives up.
    removed_give_up: Option<tokio::time::Instant>,
}

impl<T: Transport> StreamOutput<T> {
    pub fn new(cx: &SinkCtx, sink: usize, transport: T) -> StreamOutput<T> {
        StreamOutput {
            sink,
            shard: cx.id,
            transport,
            conn: None,
            backoff: Backoff::new(cx.plan.sinks[sink].retry),
            log: LogEvery::ten_seconds(),
            down_since: None,
            removed_give_up: None,
        }
    }

    /// Counts a failure and waits for the retry's turn.
    async fn failed(&mut self, cx: &SinkCtx, give_up: Option<tokio::time::Instant>) {
        let counters = &cx.metrics.sinks[self.sink];
        counters.send_errors.add(1);
        counters.connected.set(0);
        self.down_since.get_or_insert_with(Instant::now);
        let delay = self.backoff.next_delay();
        counters.retry_backoff_ms.set(delay.as_millis() as i64);
        pause(delay, give_up).await;
        counters.retries.add(1);
    }
}

impl<T: Transport> Deliver for StreamOutput<T> {
    fn takes_batches(&self) -> bool {
        false
    }

    async fn deliver<B: crate::io::Buf>(
        &mut self,
        cx: &SinkCtx,
        mut buf: B,
        give_up: Option<tokio::time::Instant>,
    ) -> Result<B, B> {
        let name = cx.plan.sinks[self.sink].name.as_str();
        let counters = &cx.metrics.sinks[self.sink];
        let past =
            |t: Option<tokio::time::Instant>| t.is_some_and(|t| tokio::time::Instant::now() >= t);
        let mut give_up = give_up;
        loop {
            if give_up.is_none() && cx.plan.sinks[self.sink].removed {
                // A reload removed the sink: it has what a stop gives it,
                // counted from the first batch that found it removed.
                let grace = Duration::from_millis(cx.plan.shutdown_timeout_ms / 2);
                give_up = Some(
                    *self
                        .removed_give_up
                        .get_or_insert_with(|| tokio::time::Instant::now() + grace),
                );
            }
            if past(give_up) {
                return Err(buf);
            }
            if let Some(why) = self.conn.as_ref().and_then(|c| self.transport.stale(c)) {
                tracing::info!(
                    sink = name,
                    peer = self.transport.far_end(),
                    shard = self.shard,
                    "{why}; opening it again"
                );
                let c = self.conn.take().expect("checked above");
                self.transport.close(c, true).await;
                counters.connected.set(0);
            }
            let Some(c) = self.conn.as_ref() else {
                let open = self.transport.open();
                let opened = match give_up {
                    Some(t) => match tokio::time::timeout_at(t, open).await {
                        Ok(r) => r,
                        Err(_) => return Err(buf),
                    },
                    None => open.await,
                };
                match opened {
                    Ok(c) => {
                        if let Some(t) = self.down_since.take() {
                            tracing::info!(
                                sink = name,
                                peer = self.transport.far_end(),
                                shard = self.shard,
                                down_ms = t.elapsed().as_millis() as u64,
                                "reached again"
                            );
                        }
                        self.conn = Some(c);
                        counters.connected.set(1);
                    }
                    Err(e) => {
                        if let Some(held) = self.log.ready() {
                            tracing::warn!(sink = name, peer = self.transport.far_end(), shard = self.shard,
                                error = %e, suppressed = held, "cannot reach the sink's far end; batches wait in its buffer");
                        }
                        self.failed(cx, give_up).await;
                    }
                }
                continue;
            };
            cx.rate_take(self.sink, buf.bytes_init()).await;
            let (res, b) = self.transport.write(c, buf).await;
            buf = b;
            match res {
                Ok(()) => {
                    self.backoff.reset();
                    counters.retry_backoff_ms.set(0);
                    return Ok(buf);
                }
                Err(e) => {
                    if let Some(held) = self.log.ready() {
                        tracing::warn!(sink = name, peer = self.transport.far_end(), shard = self.shard,
                            error = %e, suppressed = held, "write failed; the batch will be written again");
                    }
                    // Open again: the connection broke, or the file was
                    // rotated or removed.
                    let c = self.conn.take().expect("in use above");
                    self.transport.close(c, false).await;
                    self.failed(cx, give_up).await;
                }
            }
        }
    }

    async fn submit(&mut self, _batch: BatchView<'_>, _id: BatchId) {
        unreachable!("a stream output takes payloads through deliver")
    }

    async fn close(&mut self, cx: &SinkCtx) {
        if let Some(c) = self.conn.take() {
            self.transport.close(c, true).await;
        }
        cx.metrics.sinks[self.sink].connected.set(0);
    }
}
