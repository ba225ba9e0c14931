//! Sinks: where batches leave the collector.
//!
//! Every sink kind is one folder here and one line in the [`sinks!`]
//! registration at the bottom of this file. A folder provides a type that
//! implements [`Kind`]: its own keys (`Config`, with unknown keys refused),
//! what they become once resolved and checked at start (`Target`), and its
//! per-shard `Output`, which implements [`Deliver`] (the contract in
//! [`crate::pipeline`]). The registration turns that into the closed set the
//! rest of the collector sees: [`Target`] (inside each
//! [`SinkPlan`](crate::config::SinkPlan)), [`plan`] (the config asks it to
//! resolve a `[sinks.X]` table by its `type`) and [`Output`] (one enum, so
//! the per-batch call is a static match, never a virtual call).
//!
//! Around the outputs, written once: the sink queue and batching
//! ([`crate::pipeline::SinkQueue`]), the memory buffer's sender
//! ([`run_memory`]), the disk buffer ([`crate::wal::driver`], which knows
//! only [`Deliver`]), the connect–write–retry loop of stream outputs
//! ([`util::stream`]) and retry timing ([`util::Backoff`]).

pub mod util;

use crate::config::{ConfigError, SinkPlan};
use crate::io::BoundedBuf;
use crate::pipeline::{Ack, BatchId, Deliver, SinkCtx, SinkQueue};
use crate::record::meta::Field;
use crate::record::{BatchView, FrameBuf, Payload, HEADROOM};
use std::path::Path;
use std::rc::Rc;

/// What a sink kind's folder provides.
pub trait Kind {
    /// The value of `type` that picks this kind.
    const NAME: &'static str;
    /// The kind's own keys of a `[sinks.X]` table (beside `type`, `inputs`,
    /// `batch`, `buffer` and `retry`, which every sink takes); unknown keys
    /// are refused (`#[serde(deny_unknown_fields)]`).
    type Config: serde::de::DeserializeOwned;
    /// The keys resolved and checked, once, at start.
    type Target: std::fmt::Debug + Clone + Send + Sync;
    /// One shard's output.
    type Output: Deliver;

    fn plan(config: Self::Config, cx: &PlanCx<'_>) -> Result<Self::Target, ConfigError>;
    /// Builds a shard's output; `ack` is given to batch outputs under a
    /// disk buffer (called with each batch's id once delivered).
    fn output(
        cx: &Rc<SinkCtx>,
        sink: usize,
        target: &Self::Target,
        ack: Option<Ack>,
    ) -> Self::Output;
    /// Whether the sink writes under `data_dir` (then the collector locks it).
    fn uses_data_dir(_target: &Self::Target) -> bool {
        false
    }
    /// Checks what can be checked before start on this machine (paths).
    fn check(_target: &Self::Target, _cx: &PlanCx<'_>) -> Result<(), ConfigError> {
        Ok(())
    }
    /// The record fields (meta) the sink uses, each with the key that uses
    /// it (`topic` for `topic = "gw/{topic}"`): config refuses an input that
    /// cannot supply one, and tells the others to attach it.
    fn fields(_target: &Self::Target) -> Vec<(&'static str, Field)> {
        Vec::new()
    }
    /// Whether the sink writes records' decoded fields (an ndjson object
    /// per record): then decoded inputs keep each record's field index.
    fn encodes_fields(_target: &Self::Target) -> bool {
        false
    }
    /// Whether the far end takes batches only in the order of their ids (it
    /// drops one at or below the highest it took as a duplicate): then a
    /// disk buffer must send them in that order, never live batches before
    /// a backlog nor from memory beside the log.
    const IN_ID_ORDER: bool = false;
}

/// What a sink's plan may know of the rest of the config.
pub struct PlanCx<'a> {
    /// The sink's name (`[sinks.<name>]`).
    pub name: &'a str,
    pub data_dir: &'a Path,
}

impl PlanCx<'_> {
    /// The full name of one of the sink's keys, for error messages.
    pub fn key(&self, key: &str) -> String {
        format!("sinks.{}.{key}", self.name)
    }
}

/// Reads a kind's keys from what the `[sinks.X]` table holds beyond the
/// common ones, naming the key that is wrong.
fn config_of<C: serde::de::DeserializeOwned>(
    cx: &PlanCx<'_>,
    options: toml::Table,
) -> Result<C, ConfigError> {
    serde_path_to_error::deserialize(toml::Value::Table(options)).map_err(|e| {
        let path = e.path().to_string();
        let key = if path == "." {
            format!("sinks.{}", cx.name)
        } else {
            cx.key(&path)
        };
        ConfigError::Parse {
            key,
            message: e.into_inner().message().trim_end().to_string(),
        }
    })
}

/// Generates, from one line per sink kind, the closed set the collector
/// sees: [`Target`], [`KINDS`], [`plan`] and [`Output`] with its
/// [`Deliver`] (a static match per batch).
macro_rules! sinks {
    ($($variant:ident => $module:ident),* $(,)?) => {
        $(pub mod $module;)*

        /// A sink's resolved keys, by kind.
        #[derive(Debug, Clone)]
        pub enum Target {
            $($variant(<$module::Sink as Kind>::Target),)*
        }

        /// The values `type` may take.
        pub const KINDS: &[&str] = &[$(<$module::Sink as Kind>::NAME,)*];

        impl Target {
            pub fn kind(&self) -> &'static str {
                match self {
                    $(Target::$variant(_) => <$module::Sink as Kind>::NAME,)*
                }
            }

            /// Whether the sink writes under `data_dir`.
            pub fn uses_data_dir(&self) -> bool {
                match self {
                    $(Target::$variant(t) => <$module::Sink as Kind>::uses_data_dir(t),)*
                }
            }

            /// Checks the sink's paths on this machine before start.
            pub fn check(&self, cx: &PlanCx<'_>) -> Result<(), ConfigError> {
                match self {
                    $(Target::$variant(t) => <$module::Sink as Kind>::check(t, cx),)*
                }
            }

            /// The record fields the sink uses, each with the key that uses it.
            pub fn fields(&self) -> Vec<(&'static str, Field)> {
                match self {
                    $(Target::$variant(t) => <$module::Sink as Kind>::fields(t),)*
                }
            }

            /// Whether the sink writes records' decoded fields.
            pub fn encodes_fields(&self) -> bool {
                match self {
                    $(Target::$variant(t) => <$module::Sink as Kind>::encodes_fields(t),)*
                }
            }

            /// Whether the far end takes batches only in id order.
            pub fn in_id_order(&self) -> bool {
                match self {
                    $(Target::$variant(_) => <$module::Sink as Kind>::IN_ID_ORDER,)*
                }
            }
        }

        /// Resolves a `[sinks.X]` table's own keys (`options`) for its
        /// `type` (`kind`).
        pub fn plan(kind: &str, options: toml::Table, cx: &PlanCx<'_>) -> Result<Target, ConfigError> {
            $(
                if kind == <$module::Sink as Kind>::NAME {
                    let c = config_of(cx, options)?;
                    return Ok(Target::$variant(<$module::Sink as Kind>::plan(c, cx)?));
                }
            )*
            Err(ConfigError::Invalid {
                key: cx.key("type"),
                message: format!("unknown sink type {kind:?} (types: {})", KINDS.join(", ")),
            })
        }

        /// One sink's output on one shard.
        pub enum Output {
            $($variant(<$module::Sink as Kind>::Output),)*
        }

        impl Output {
            pub fn new(cx: &Rc<SinkCtx>, sink: usize, ack: Option<Ack>) -> Output {
                match &cx.plan.sinks[sink].target {
                    $(Target::$variant(t) => Output::$variant(<$module::Sink as Kind>::output(cx, sink, t, ack)),)*
                }
            }
        }

        impl Deliver for Output {
            fn takes_batches(&self) -> bool {
                match self {
                    $(Output::$variant(o) => o.takes_batches(),)*
                }
            }

            async fn deliver<B: crate::io::Buf>(
                &mut self,
                cx: &SinkCtx,
                buf: B,
                give_up: Option<tokio::time::Instant>,
            ) -> Result<B, B> {
                match self {
                    $(Output::$variant(o) => o.deliver(cx, buf, give_up).await,)*
                }
            }

            async fn submit(&mut self, batch: BatchView<'_>, id: BatchId) {
                match self {
                    $(Output::$variant(o) => o.submit(batch, id).await,)*
                }
            }

            async fn close(&mut self, cx: &SinkCtx) {
                match self {
                    $(Output::$variant(o) => o.close(cx).await,)*
                }
            }
        }
    };
}

/// Sends a memory buffer's batches: each payload is delivered whole (or the
/// batch submitted, for a batch output), then the batch goes back to the
/// pool.
async fn run_memory(cx: Rc<SinkCtx>, queue: Rc<SinkQueue>) {
    let mut out = Output::new(&cx, queue.sink, None);
    let counters = &cx.metrics.sinks[queue.sink];
    let (started_ns, mut seq) = (cx.now_ns(), 0);
    while let Some(mut batch) = queue.next().await {
        if out.takes_batches() {
            seq += 1;
            let id = BatchId {
                segment: started_ns,
                offset: seq,
            };
            // Encoded into the request's own buffer: the batch is free now.
            out.submit(BatchView::Native(&batch), id).await;
            cx.recycle(batch);
            continue;
        }
        let bytes = batch.payload_bytes();
        // The records as they lie in the batch's (aligned) buffer.
        let buf = FrameBuf(std::mem::take(&mut batch.payload).into_buffer());
        let end = HEADROOM + bytes;
        // A memory buffer holds nothing after the process: keep trying until
        // the shutdown timeout ends the process (or, for a sink a reload
        // removed, until what a stop would give it has passed).
        let sent = out.deliver(&cx, buf.slice(HEADROOM..end), None).await;
        let (ok, buf) = match sent {
            Ok(b) => (true, b),
            Err(b) => (false, b),
        };
        let buf = buf.into_inner().0;
        if !ok {
            if let Some(next) = queue.successor() {
                // The sink a reload changed this one into sends it.
                batch.payload = Payload::with_records(buf);
                next.adopt(batch, true);
                continue;
            }
        }
        batch.payload = Payload::from_buffer(buf);
        if ok {
            counters.records.add(batch.len() as u64);
            counters.bytes.add(bytes as u64);
            counters.batches.add(1);
        } else {
            counters.buffer_dropped.add(batch.len() as u64);
            tracing::warn!(sink = %cx.plan.sinks[queue.sink].name, shard = cx.id, records = batch.len(),
                "the sink a reload removed could not send what it held in memory: lost");
        }
        cx.recycle(batch);
    }
    out.close(&cx).await;
}

/// Starts the sender of one sink on a shard; a disk buffer starts from what
/// recovery found in its log (`rec`).
pub fn spawn_sender(
    cx: Rc<SinkCtx>,
    queue: Rc<SinkQueue>,
    rec: Option<crate::wal::recovery::Recovery>,
) -> tokio::task::JoinHandle<()> {
    let plan: &SinkPlan = &cx.plan.sinks[queue.sink];
    match (plan.buffer.kind, rec) {
        (crate::config::BufferKind::Disk, Some(rec)) => {
            let sink = queue.sink;
            let out_cx = cx.clone();
            crate::io::spawn(crate::wal::driver::run(cx, queue, rec, move |ack| {
                Output::new(&out_cx, sink, Some(ack))
            }))
        }
        (crate::config::BufferKind::Disk, None) => {
            unreachable!("a disk buffer is recovered before its shard starts")
        }
        (crate::config::BufferKind::Memory, _) => crate::io::spawn(run_memory(cx, queue)),
    }
}

// The sink kinds: one line each (the folder's `Sink` implements `Kind`).
sinks! {
    Blackhole => blackhole,
    File => file,
    Http => http,
    Mqtt => mqtt,
    Nats => nats,
    Tcp => tcp,
    Updraft => updraft,
}
