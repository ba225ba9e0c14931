//! updraft: a Linux-native edge collector.
//!
//! The data path, one shard (thread, core, I/O runtime) at a time; every
//! socket and file operation goes through [`io`], on io_uring or epoll
//! (chosen once at start):
//!
//! 1. [`sources`] read datagrams and streams from sockets bound with
//!    `SO_REUSEPORT`, so the kernel spreads peers over shards.
//! 2. [`codec`] cuts the bytes into records (newline, octet counting,
//!    length-prefixed, one per datagram) without copying or allocating.
//! 3. Every source offers its records through one handle, the shard's
//!    [`pipeline::ingest::Ingest`]: the shared admission checks, the owner
//!    shard ([`route`], `partition_by`), and the offer — taken, or blocked
//!    (a source that can wait is held back; one that cannot counts a drop).
//!    Records for another shard travel in whole batches through an `rtrb`
//!    SPSC ring of the N×N mesh.
//! 4. [`record`] holds them in a [`record::Batch`]: one payload buffer and one
//!    fixed-size [`record::Entry`] per record, taken from and returned to a
//!    per-shard pool; its rkyv archive is the unit the write-ahead log stores.
//! 5. Each sink accumulates batches per shard in a bounded
//!    [`pipeline::SinkQueue`] (count, bytes, linger; headroom kept for sources
//!    that cannot wait). A memory buffer hands sealed batches straight to the
//!    sink's output; with `buffer.type = "disk"` they pass through the [`wal`]
//!    (write-ahead log, group-committed) first and are sent once durable.
//!    Either buffer sees an output only through [`pipeline::Deliver`]; the
//!    outputs ([`sinks`]: TCP, file, HTTP, MQTT, NATS, blackhole) are one folder per kind,
//!    registered in one line each.
//! 6. [`metrics`] sums per-shard counters into Prometheus text, off the hot path.
//!
//! [`config`] turns the user's TOML into a validated [`config::Plan`] (each
//! sink kind reads its own keys) and [`runtime`] starts one shard per core,
//! runs its sinks' senders and sources, and stops them in order on a signal;
//! [`logging`] keeps log output from ever taking the collector down.
//!
//! Layering (kept by `tests/it/layout.rs`): sources and sinks meet only in
//! [`pipeline`]; neither they nor the [`wal`] import the [`runtime`]; the
//! [`wal`] imports no sink; [`pipeline`] imports none of them.

pub mod codec;
pub mod config;
pub mod io;
pub mod limiter;
pub mod logging;
pub mod metrics;
pub mod mqtt;
pub mod native;
pub mod nats;
pub mod pipeline;
pub mod record;
pub mod route;
pub mod runtime;
pub mod sinks;
pub mod sources;
pub mod tls;
pub mod top;
pub mod wal;

#[cfg(feature = "count-alloc")]
pub mod alloc_count;
