//! Sinks: where batches leave the collector.
//!
//! Each sink has one [`SinkQueue`] per shard (in [`crate::pipeline`]): the
//! batch being filled and a bounded queue of sealed batches. The sink's
//! sender takes sealed batches and hands them to its [`Output`], which
//! implements [`Deliver`]: stream outputs ([`tcp`], [`file`], blackhole)
//! keep a batch until it is written, retrying with [`util::Backoff`]; the
//! [`http`] output takes whole batches and acknowledges each. With a memory
//! buffer a sent batch goes back to the shard's pool; with a disk buffer
//! ([`crate::wal::driver`], which knows only the [`Deliver`] contract)
//! batches pass through the write-ahead log first and the output sends
//! them from there.

pub mod file;
pub mod http;
pub mod tcp;
pub mod util;

use crate::config::SinkTarget;
use crate::pipeline::{BatchId, Deliver, SinkCtx, SinkQueue};
use crate::record::{BatchView, FrameBuf, Payload, HEADROOM};
use std::rc::Rc;
use tokio_uring::buf::BoundedBuf;

/// Where one sink's batches go from one shard.
///
/// Stream outputs (tcp, file, blackhole) take a batch's newline-delimited
/// payload with [`deliver`](Output::deliver) and are done with it when that
/// returns. The http output takes the batch itself ([`http::HttpOutput::submit`])
/// because it encodes it, keeps several requests in flight, and acknowledges
/// each batch (through `ack`) when its request succeeds.
pub enum Output {
    Tcp(tcp::TcpOutput),
    File(file::FileOutput),
    Http(http::HttpOutput),
    Blackhole,
}

impl Output {
    /// `ack` is called with a batch's id once an http request delivered it
    /// (disk buffers); stream outputs are acknowledged by their caller.
    pub fn new(shard: &Rc<SinkCtx>, sink: usize, ack: Option<http::Ack>) -> Output {
        match shard.plan.sinks[sink].target.clone() {
            SinkTarget::Tcp { address } => Output::Tcp(tcp::TcpOutput::new(shard, sink, address)),
            SinkTarget::File { path } => Output::File(file::FileOutput::new(shard, sink, path)),
            SinkTarget::Http(t) => Output::Http(http::HttpOutput::new(shard, sink, *t, ack)),
            SinkTarget::Blackhole => Output::Blackhole,
        }
    }
}

impl Deliver for Output {
    fn takes_batches(&self) -> bool {
        matches!(self, Output::Http(_))
    }

    /// Delivers newline-delimited records, retrying until they are taken;
    /// gives the buffer back (`Ok`). With `give_up`, no attempt starts after
    /// it (`Err`: not delivered); an attempt under way is never cut off.
    async fn deliver<B: tokio_uring::buf::BoundedBuf>(
        &mut self,
        shard: &SinkCtx,
        buf: B,
        give_up: Option<tokio::time::Instant>,
    ) -> Result<B, B> {
        match self {
            Output::Tcp(o) => o.deliver(shard, buf, give_up).await,
            Output::File(o) => o.deliver(shard, buf, give_up).await,
            Output::Http(_) => unreachable!("an http output takes batches through submit"),
            Output::Blackhole => Ok(buf),
        }
    }

    async fn submit(&mut self, batch: BatchView<'_>, id: Option<BatchId>) {
        match self {
            Output::Http(h) => h.submit(batch, id).await,
            _ => unreachable!("stream outputs take payloads through deliver"),
        }
    }

    async fn close(&mut self, shard: &SinkCtx) {
        match self {
            Output::Tcp(o) => o.close(shard),
            Output::File(o) => o.close(shard).await,
            Output::Http(o) => {
                o.close(std::time::Duration::from_millis(
                    shard.plan.shutdown_timeout_ms / 2,
                ))
                .await
            }
            Output::Blackhole => {}
        }
    }
}

/// Sends a memory buffer's batches: each payload is delivered whole, then
/// the batch goes back to the pool.
async fn run_memory(shard: Rc<SinkCtx>, queue: Rc<SinkQueue>) {
    let mut out = Output::new(&shard, queue.sink, None);
    let counters = &shard.metrics.sinks[queue.sink];
    while let Some(mut batch) = queue.next().await {
        if out.takes_batches() {
            // Encoded into the request's own buffer: the batch is free now.
            out.submit(BatchView::Native(&batch), None).await;
            shard.recycle(batch);
            continue;
        }
        let bytes = batch.payload_bytes();
        // The records as they lie in the batch's (aligned) buffer.
        let buf = FrameBuf(std::mem::take(&mut batch.payload).into_buffer());
        let end = HEADROOM + bytes;
        // A memory buffer holds nothing after the process: keep trying until
        // the shutdown timeout ends the process.
        let (Ok(buf) | Err(buf)) = out.deliver(&shard, buf.slice(HEADROOM..end), None).await;
        batch.payload = Payload::from_buffer(buf.into_inner().0);
        counters.records.add(batch.len() as u64);
        counters.bytes.add(bytes as u64);
        counters.batches.add(1);
        shard.recycle(batch);
    }
    out.close(&shard).await;
}

/// Starts the sender of one sink on a shard; a disk buffer starts from what
/// recovery found in its log (`rec`).
pub fn spawn_sender(
    shard: Rc<SinkCtx>,
    queue: Rc<SinkQueue>,
    rec: Option<crate::wal::recovery::Recovery>,
) -> tokio::task::JoinHandle<()> {
    match (shard.plan.sinks[queue.sink].buffer.kind, rec) {
        (crate::config::BufferKind::Disk, Some(rec)) => {
            let sink = queue.sink;
            let cx = shard.clone();
            tokio_uring::spawn(crate::wal::driver::run(shard, queue, rec, move |ack| {
                Output::new(&cx, sink, Some(ack))
            }))
        }
        (crate::config::BufferKind::Disk, None) => {
            unreachable!("a disk buffer is recovered before its shard starts")
        }
        (crate::config::BufferKind::Memory, _) => tokio_uring::spawn(run_memory(shard, queue)),
    }
}
