//! updraft: a Linux-native edge collector.
//!
//! The data path, one shard (thread, core, io_uring) at a time:
//!
//! 1. [`sources`] read datagrams and streams from sockets bound with
//!    `SO_REUSEPORT`, so the kernel spreads peers over shards.
//! 2. [`codec`] cuts the bytes into records (newline, octet counting,
//!    length-prefixed, one per datagram) without copying or allocating.
//! 3. [`route`] picks the shard that owns each record (`partition_by`); records
//!    for another shard travel in whole batches through an `rtrb` SPSC ring of
//!    the N×N mesh.
//! 4. [`record`] holds them in a [`record::Batch`]: one payload buffer and one
//!    fixed-size [`record::Entry`] per record, taken from and returned to a
//!    per-shard pool; its rkyv archive is the unit the write-ahead log stores.
//! 5. [`sinks`] accumulate batches per sink (count, bytes, linger), hold them in
//!    a bounded queue and write them out (TCP, file, HTTP, blackhole). A full queue
//!    stops TCP sources reading and makes UDP sources count drops.
//!    With `buffer.type = "disk"`, sealed batches pass through the [`wal`]
//!    (write-ahead log, group-committed) first and are sent once durable.
//! 6. [`metrics`] sums per-shard counters into Prometheus text, off the hot path.
//!
//! [`config`] turns the user's TOML into a validated [`config::Plan`] and
//! [`runtime`] starts one shard per core and stops them on a signal;
//! [`logging`] keeps log output from ever taking the collector down.

pub mod codec;
pub mod config;
pub mod limiter;
pub mod logging;
pub mod metrics;
pub mod pipeline;
pub mod record;
pub mod route;
pub mod runtime;
pub mod sinks;
pub mod sources;
pub mod wal;

#[cfg(feature = "count-alloc")]
pub mod alloc_count;
