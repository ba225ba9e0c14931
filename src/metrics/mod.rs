//! Per-shard counters and the Prometheus endpoint that sums them.
//!
//! Each shard owns its [`ShardMetrics`] and is the only writer of it: a counter
//! is a relaxed load and store, not a locked read-modify-write, and shards
//! never touch each other's cache lines. The exporter thread reads every
//! shard's counters on a scrape, sums them per source and sink, and renders
//! Prometheus text with `prometheus-client`. It serves `/metrics`, `/health`
//! and `/ready` from one thread of its own, off the hot path, with bounded
//! connections, request size and time ([`server`]).

mod server;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

/// A monotonic counter with one writer (its shard).
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds `n`. Only the owning shard calls this, so a plain load and store
    /// suffice (no `lock` prefix on the hot path).
    #[inline]
    pub fn add(&self, n: u64) {
        self.0.store(self.0.load(Relaxed).wrapping_add(n), Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
}

/// A value that goes up and down, with one writer.
#[derive(Debug, Default)]
pub struct Gauge(AtomicI64);

impl Gauge {
    #[inline]
    pub fn set(&self, v: i64) {
        self.0.store(v, Relaxed);
    }

    #[inline]
    pub fn add(&self, n: i64) {
        self.0.store(self.0.load(Relaxed) + n, Relaxed);
    }

    pub fn get(&self) -> i64 {
        self.0.load(Relaxed)
    }
}

/// Why a source dropped a record. Each reason is a label value of
/// `updraft_source_dropped_records_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// Longer than `max_record_bytes`.
    Oversize,
    /// Bytes that are not a frame of the source's framing (connection closed).
    Framing,
    /// Not valid UTF-8 (with `utf8 = "drop"`).
    InvalidUtf8,
    /// An empty line or zero-length frame.
    Empty,
    /// A UDP datagram arrived while its sink's buffer was full.
    SinkFull,
    /// Dropped by the kernel: the UDP socket's receive buffer was full.
    ReceiveBuffer,
    /// No sink takes the source's records.
    NoSink,
    /// Over the source's `rate_limit` (with `when_exceeded = "drop"`, or UDP).
    RateLimit,
    /// A counted frame (octet counting, length prefix) cut short by the end
    /// of its connection.
    Truncated,
    /// Not readable by the source's decoding (with `on_error = "drop"`).
    Decode,
}

impl DropReason {
    pub const ALL: [DropReason; 10] = [
        DropReason::Oversize,
        DropReason::Framing,
        DropReason::InvalidUtf8,
        DropReason::Empty,
        DropReason::SinkFull,
        DropReason::ReceiveBuffer,
        DropReason::NoSink,
        DropReason::RateLimit,
        DropReason::Truncated,
        DropReason::Decode,
    ];

    pub fn label(self) -> &'static str {
        match self {
            DropReason::Oversize => "oversize",
            DropReason::Framing => "framing",
            DropReason::InvalidUtf8 => "invalid_utf8",
            DropReason::Empty => "empty",
            DropReason::SinkFull => "sink_full",
            DropReason::ReceiveBuffer => "receive_buffer",
            DropReason::NoSink => "no_sink",
            DropReason::RateLimit => "rate_limit",
            DropReason::Truncated => "truncated",
            DropReason::Decode => "decode",
        }
    }
}

#[derive(Debug, Default)]
pub struct SourceCounters {
    pub records: Counter,
    pub bytes: Counter,
    dropped: [Counter; DropReason::ALL.len()],
    /// The kernel's drop count of this shard's UDP socket (SO_MEMINFO), set.
    pub kernel_drops: Gauge,
    pub connections_accepted: Counter,
    pub connections_rejected: Counter,
    pub connections_open: Gauge,
    /// Connections closed because they sent nothing for `idle_timeout_ms`.
    pub connections_idle_closed: Counter,
    /// Idle connections closed to make room for a new one at
    /// `max_connections`.
    pub connections_evicted: Counter,
    /// Records the source's decoding could not read (passed on or dropped,
    /// as `on_error` says).
    pub decode_errors: Counter,
    /// updraft source: batch frames taken from senders.
    pub frames: Counter,
    /// updraft source: frames sent again that were taken before,
    /// acknowledged without taking their records twice.
    pub frames_duplicate: Counter,
    /// updraft source: connections closed for a protocol error (a bad
    /// greeting, tag, CRC or archive), by the peer's fault.
    pub protocol_errors: Counter,
    /// file source: files read again from their start because they
    /// shrank below where they were read to or their first bytes changed.
    pub files_restarted: Counter,
}

impl SourceCounters {
    #[inline]
    pub fn drop(&self, reason: DropReason, n: u64) {
        self.dropped[reason as usize].add(n);
    }

    pub fn dropped(&self, reason: DropReason) -> u64 {
        match reason {
            DropReason::ReceiveBuffer => {
                self.dropped[reason as usize].get() + self.kernel_drops.get().max(0) as u64
            }
            _ => self.dropped[reason as usize].get(),
        }
    }
}

/// Reads one counter of a sink's counters.
type SinkField = fn(&SinkCounters) -> i64;

#[derive(Debug, Default)]
pub struct SinkCounters {
    pub records: Counter,
    pub bytes: Counter,
    pub batches: Counter,
    pub send_errors: Counter,
    pub retries: Counter,
    pub queued_batches: Gauge,
    /// Times a source waited because this sink's queue was full.
    pub backpressure_waits: Counter,
    pub connected: Gauge,
    /// The wait of the current retry (drawn with full jitter below the
    /// backoff ceiling), 0 when the sink is healthy.
    pub retry_backoff_ms: Gauge,
    /// Records dropped by the sink's buffer (full, or a failing disk, with
    /// `when_full = "drop_newest"`).
    pub buffer_dropped: Counter,
    /// Of those, records of the oldest batches (`when_full = "drop_oldest"`).
    pub buffer_dropped_oldest: Counter,
    /// Time writes waited for the sink's `rate_limit`, in ms.
    pub rate_limited_ms: Counter,
    /// Bytes put on the wire under the sink's `rate_limit`.
    pub rate_limited_bytes: Counter,
    /// Disk buffer: records in batches whose sync completed.
    pub durable_records: Counter,
    pub wal_bytes_written: Counter,
    pub wal_syncs: Counter,
    /// Disk buffer: segments written over a retired segment's file.
    pub wal_recycled_segments: Counter,
    /// Disk buffer: write operations (each carries one or more frames).
    pub wal_writes: Counter,
    pub wal_write_errors: Counter,
    pub wal_damaged_frames: Counter,
    pub wal_damaged_segments: Counter,
    /// Disk buffer: segments whose torn tail (a write cut short) was
    /// truncated at start, and the bytes cut.
    pub wal_torn_tails: Counter,
    pub wal_torn_bytes: Counter,
    pub wal_replayed_batches: Counter,
    /// Disk buffer: batches the sender read back from a segment (the rest
    /// were sent from the frame the writer kept in memory).
    pub wal_read_batches: Counter,
    /// Bytes the disk buffer holds now.
    pub wal_bytes: Gauge,
    /// Disk buffer, `write_when = "behind"`: batches handed to the sender
    /// from memory without being written, times the buffer began writing
    /// to its log because the sink fell behind, and bytes of unwritten
    /// batches held now.
    pub wal_memory_batches: Counter,
    pub wal_spills: Counter,
    pub wal_memory_bytes: Gauge,
    /// HTTP: request bodies sent (after encoding and compression).
    pub body_bytes: Counter,
    /// HTTP: answers by class.
    pub responses_2xx: Counter,
    pub responses_throttled: Counter,
    pub responses_4xx: Counter,
    pub responses_5xx: Counter,
    pub timeouts: Counter,
    /// HTTP: requests in flight now, and the concurrency limit.
    pub in_flight: Gauge,
    pub concurrency_limit: Gauge,
    /// HTTP: batches (and their records) written to the dead-letter file.
    pub dead_letter_batches: Counter,
    pub dead_letter_records: Counter,
    /// Records the encoding could not express (e.g. not line protocol).
    pub encode_dropped: Counter,
}

/// Everything one shard counts. Written by that shard only.
#[derive(Debug)]
pub struct ShardMetrics {
    pub sources: Vec<SourceCounters>,
    pub sinks: Vec<SinkCounters>,
    /// Batches waiting in the rings that lead into this shard.
    pub ring_batches: Gauge,
    /// Batches this shard's pool has allocated since start.
    pub pool_batches_made: Gauge,
    /// Records this shard sent to another over the mesh (`partition_by`).
    pub crossed_records: Counter,
}

impl ShardMetrics {
    pub fn new(sources: usize, sinks: usize) -> ShardMetrics {
        ShardMetrics {
            sources: (0..sources).map(|_| SourceCounters::default()).collect(),
            sinks: (0..sinks).map(|_| SinkCounters::default()).collect(),
            ring_batches: Gauge::default(),
            pool_batches_made: Gauge::default(),
            crossed_records: Counter::default(),
        }
    }
}

/// All shards' counters with the names to label them by.
#[derive(Debug)]
pub struct Metrics {
    /// Indexed by source id; `None` for a source a reload removed (its
    /// counters are no longer shown).
    names: std::sync::RwLock<Names>,
    pub shards: Vec<Arc<ShardMetrics>>,
    pub ready: AtomicBool,
}

/// The names the counters are labelled by, indexed by id.
#[derive(Debug, Clone, Default)]
pub struct Names {
    pub sources: Vec<Option<String>>,
    pub sinks: Vec<Option<(String, &'static str)>>,
}

/// Counter slots each shard keeps for sources and sinks: ids are never
/// reused while the process runs, so a reload that adds (or changes) a
/// source or sink takes a new slot (`config::reload`).
pub const SOURCE_SLOTS: usize = crate::config::SOURCE_SLOTS_MAX;
pub const SINK_SLOTS: usize = crate::config::SINK_SLOTS_MAX;

impl Metrics {
    pub fn new(
        source_names: Vec<String>,
        sink_names: Vec<(String, &'static str)>,
        shards: usize,
    ) -> Metrics {
        let (n_sources, n_sinks) = (
            SOURCE_SLOTS.max(source_names.len()),
            SINK_SLOTS.max(sink_names.len()),
        );
        let shards = (0..shards)
            .map(|_| Arc::new(ShardMetrics::new(n_sources, n_sinks)))
            .collect();
        Metrics {
            names: std::sync::RwLock::new(Names {
                sources: source_names.into_iter().map(Some).collect(),
                sinks: sink_names.into_iter().map(Some).collect(),
            }),
            shards,
            ready: AtomicBool::new(false),
        }
    }

    /// The names shown now (a reload changes them).
    pub fn names(&self) -> Names {
        self.names.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Shows the counters of the sources and sinks `names` has (a reload).
    pub fn set_names(&self, names: Names) {
        *self.names.write().unwrap_or_else(|e| e.into_inner()) = names;
    }

    /// Sum over shards of one source counter.
    pub fn source_sum(&self, source: usize, f: impl Fn(&SourceCounters) -> u64) -> u64 {
        self.shards.iter().map(|s| f(&s.sources[source])).sum()
    }

    /// Sum over shards of one sink counter.
    pub fn sink_sum(&self, sink: usize, f: impl Fn(&SinkCounters) -> i64) -> i64 {
        self.shards.iter().map(|s| f(&s.sinks[sink])).sum()
    }

    /// Renders Prometheus text.
    pub fn render(self: &Arc<Self>) -> String {
        let mut registry = Registry::with_prefix("updraft");
        registry.register_collector(Box::new(Exposition(self.clone())));
        let mut out = String::with_capacity(8 * 1024);
        prometheus_client::encoding::text::encode(&mut out, &registry)
            .expect("writing to a String cannot fail");
        out
    }
}

#[derive(Debug)]
struct Exposition(Arc<Metrics>);

fn family<'a, M: EncodeMetric>(
    enc: &mut DescriptorEncoder<'a>,
    name: &str,
    help: &str,
    kind: MetricType,
    rows: impl IntoIterator<Item = (Vec<(&'static str, String)>, M)>,
) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_descriptor(name, help, None, kind)?;
    for (labels, value) in rows {
        value.encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

/// A metric family with one unlabelled value.
#[cfg(feature = "count-alloc")]
fn single<M: EncodeMetric>(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    kind: MetricType,
    value: M,
) -> Result<(), std::fmt::Error> {
    value.encode(enc.encode_descriptor(name, help, None, kind)?)
}

impl Collector for Exposition {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let m = &self.0;
        let names = m.names();
        let name_of = |n: &Option<String>| n.clone().unwrap_or_default();
        let src = |i: usize| vec![("source", name_of(&names.sources[i]))];
        let sink = |i: usize| {
            let (name, kind) = names.sinks[i].clone().unwrap_or_default();
            vec![("sink", name), ("type", kind.to_string())]
        };
        // The ids shown: a source or sink a reload removed is not.
        let live_src: Vec<usize> = (0..names.sources.len())
            .filter(|&i| names.sources[i].is_some())
            .collect();
        let live_sink: Vec<usize> = (0..names.sinks.len())
            .filter(|&i| names.sinks[i].is_some())
            .collect();
        let n_src = live_src.iter().copied();
        let n_sink = live_sink.iter().copied();
        let source_counter = |f: fn(&SourceCounters) -> u64| {
            n_src
                .clone()
                .map(move |i| (src(i), ConstCounter::new(m.source_sum(i, f))))
        };
        family(
            &mut enc,
            "source_received_records",
            "Records a source accepted.",
            MetricType::Counter,
            source_counter(|c| c.records.get()),
        )?;
        family(
            &mut enc,
            "source_received_bytes",
            "Bytes a source read from its sockets.",
            MetricType::Counter,
            source_counter(|c| c.bytes.get()),
        )?;
        family(
            &mut enc,
            "source_dropped_records",
            "Records a source dropped, by reason.",
            MetricType::Counter,
            n_src.clone().flat_map(|i| {
                DropReason::ALL.iter().map(move |r| {
                    let mut l = src(i);
                    l.push(("reason", r.label().to_string()));
                    (l, ConstCounter::new(m.source_sum(i, |c| c.dropped(*r))))
                })
            }),
        )?;
        family(
            &mut enc,
            "source_connections_accepted",
            "TCP connections a source accepted.",
            MetricType::Counter,
            source_counter(|c| c.connections_accepted.get()),
        )?;
        family(
            &mut enc,
            "source_connections_rejected",
            "TCP connections closed at once because max_connections was reached.",
            MetricType::Counter,
            source_counter(|c| c.connections_rejected.get()),
        )?;
        family(
            &mut enc,
            "source_connections_idle_closed",
            "TCP connections closed because they sent nothing for idle_timeout_ms.",
            MetricType::Counter,
            source_counter(|c| c.connections_idle_closed.get()),
        )?;
        family(
            &mut enc,
            "source_connections_evicted",
            "Idle TCP connections closed to make room for a new one at max_connections.",
            MetricType::Counter,
            source_counter(|c| c.connections_evicted.get()),
        )?;
        family(
            &mut enc,
            "source_decode_errors",
            "Records a source's decoding could not read (passed on raw, or dropped with on_error = \"drop\").",
            MetricType::Counter,
            source_counter(|c| c.decode_errors.get()),
        )?;
        family(
            &mut enc,
            "source_frames",
            "Batch frames an updraft source took from senders.",
            MetricType::Counter,
            source_counter(|c| c.frames.get()),
        )?;
        family(
            &mut enc,
            "source_duplicate_frames",
            "Frames sent again that an updraft source had taken before: acknowledged, their records not taken twice.",
            MetricType::Counter,
            source_counter(|c| c.frames_duplicate.get()),
        )?;
        family(
            &mut enc,
            "source_protocol_errors",
            "Connections an updraft source closed because the peer broke the protocol (bad greeting, tag, CRC or archive).",
            MetricType::Counter,
            source_counter(|c| c.protocol_errors.get()),
        )?;
        family(
            &mut enc,
            "source_files_restarted",
            "Files a file source read again from their start: they shrank below where they were read to (truncated), or their first bytes changed.",
            MetricType::Counter,
            source_counter(|c| c.files_restarted.get()),
        )?;
        family(
            &mut enc,
            "source_connections_open",
            "TCP connections open now.",
            MetricType::Gauge,
            n_src.clone().map(|i| {
                (
                    src(i),
                    ConstGauge::new(m.source_sum(i, |c| c.connections_open.get() as u64) as i64),
                )
            }),
        )?;
        let sink_counter = |f: fn(&SinkCounters) -> i64| {
            n_sink
                .clone()
                .map(move |i| (sink(i), ConstCounter::new(m.sink_sum(i, f) as u64)))
        };
        family(
            &mut enc,
            "sink_sent_records",
            "Records a sink delivered.",
            MetricType::Counter,
            sink_counter(|c| c.records.get() as i64),
        )?;
        family(
            &mut enc,
            "sink_sent_bytes",
            "Bytes a sink delivered.",
            MetricType::Counter,
            sink_counter(|c| c.bytes.get() as i64),
        )?;
        family(
            &mut enc,
            "sink_sent_batches",
            "Batches a sink delivered.",
            MetricType::Counter,
            sink_counter(|c| c.batches.get() as i64),
        )?;
        family(
            &mut enc,
            "sink_send_errors",
            "Failed connects and writes; the batch is kept and retried.",
            MetricType::Counter,
            sink_counter(|c| c.send_errors.get() as i64),
        )?;
        family(
            &mut enc,
            "sink_retries",
            "Attempts to send a batch again after an error.",
            MetricType::Counter,
            sink_counter(|c| c.retries.get() as i64),
        )?;
        family(
            &mut enc,
            "sink_retry_backoff_ms",
            "The wait of the current retry (drawn with full jitter below the backoff ceiling), the longest over shards; 0 when healthy.",
            MetricType::Gauge,
            n_sink.clone().map(|i| {
                let longest = m.shards.iter().map(|s| s.sinks[i].retry_backoff_ms.get()).max().unwrap_or(0);
                (sink(i), ConstGauge::new(longest))
            }),
        )?;
        family(
            &mut enc,
            "sink_queued_batches",
            "Sealed batches waiting for the sink.",
            MetricType::Gauge,
            n_sink.clone().map(|i| {
                (
                    sink(i),
                    ConstGauge::new(m.sink_sum(i, |c| c.queued_batches.get())),
                )
            }),
        )?;
        family(
            &mut enc,
            "sink_connected",
            "Shards whose connection to the sink is up.",
            MetricType::Gauge,
            n_sink.clone().map(|i| {
                (
                    sink(i),
                    ConstGauge::new(m.sink_sum(i, |c| c.connected.get())),
                )
            }),
        )?;
        family(
            &mut enc,
            "sink_buffer_dropped_records",
            "Records the sink's buffer dropped (when_full = drop_newest or drop_oldest).",
            MetricType::Counter,
            sink_counter(|c| c.buffer_dropped.get() as i64),
        )?;
        family(
            &mut enc,
            "sink_buffer_dropped_oldest_records",
            "Of those, records of the oldest queued batches, dropped to make room for new ones (when_full = drop_oldest).",
            MetricType::Counter,
            sink_counter(|c| c.buffer_dropped_oldest.get() as i64),
        )?;
        family(
            &mut enc,
            "sink_rate_limit_wait_ms",
            "Milliseconds the sink's writes waited for its rate_limit (bytes_per_sec).",
            MetricType::Counter,
            sink_counter(|c| c.rate_limited_ms.get() as i64),
        )?;
        family(
            &mut enc,
            "sink_rate_limit_bytes",
            "Bytes the sink wrote under its rate_limit (what the budget was charged).",
            MetricType::Counter,
            sink_counter(|c| c.rate_limited_bytes.get() as i64),
        )?;
        family(
            &mut enc,
            "sink_backpressure_waits",
            "Times a source stopped reading because this sink's queue was full (backpressure).",
            MetricType::Counter,
            sink_counter(|c| c.backpressure_waits.get() as i64),
        )?;
        family(
            &mut enc,
            "sink_durable_records",
            "Disk buffer: records in batches that reached the disk (synced).",
            MetricType::Counter,
            sink_counter(|c| c.durable_records.get() as i64),
        )?;
        family(
            &mut enc,
            "sink_wal_written_bytes",
            "Disk buffer: bytes written to segments (frames, headers included).",
            MetricType::Counter,
            sink_counter(|c| c.wal_bytes_written.get() as i64),
        )?;
        family(
            &mut enc,
            "sink_wal_recycled_segments",
            "Disk buffer: new segments written over a retired segment's file (no file-system allocation).",
            MetricType::Counter,
            sink_counter(|c| c.wal_recycled_segments.get() as i64),
        )?;
        family(
            &mut enc,
            "sink_wal_writes",
            "Disk buffer: write operations; several queued batches go in one.",
            MetricType::Counter,
            sink_counter(|c| c.wal_writes.get() as i64),
        )?;
        family(
            &mut enc,
            "sink_wal_syncs",
            "Disk buffer: group commits (fdatasync rounds).",
            MetricType::Counter,
            sink_counter(|c| c.wal_syncs.get() as i64),
        )?;
        family(
            &mut enc,
            "sink_wal_write_errors",
            "Disk buffer: failed writes (full disk, I/O errors).",
            MetricType::Counter,
            sink_counter(|c| c.wal_write_errors.get() as i64),
        )?;
        family(
            &mut enc,
            "sink_wal_damaged_frames",
            "Disk buffer: frames skipped because they failed their checksum.",
            MetricType::Counter,
            sink_counter(|c| c.wal_damaged_frames.get() as i64),
        )?;
        family(
            &mut enc,
            "sink_wal_damaged_segments",
            "Disk buffer: segments (or their tails) set aside because their framing was lost.",
            MetricType::Counter,
            sink_counter(|c| c.wal_damaged_segments.get() as i64),
        )?;
        family(
            &mut enc,
            "sink_wal_torn_tails",
            "Disk buffer: segments whose torn tail (a write cut short by a crash) was truncated at start; the records in it are lost.",
            MetricType::Counter,
            sink_counter(|c| c.wal_torn_tails.get() as i64),
        )?;
        family(
            &mut enc,
            "sink_wal_torn_bytes",
            "Disk buffer: bytes of torn tails truncated at start.",
            MetricType::Counter,
            sink_counter(|c| c.wal_torn_bytes.get() as i64),
        )?;
        family(
            &mut enc,
            "sink_wal_replayed_batches",
            "Disk buffer: batches found after the checkpoint at start.",
            MetricType::Counter,
            sink_counter(|c| c.wal_replayed_batches.get() as i64),
        )?;
        family(
            &mut enc,
            "sink_wal_read_batches",
            "Disk buffer: batches read back from segments to be sent (the rest went from memory).",
            MetricType::Counter,
            sink_counter(|c| c.wal_read_batches.get() as i64),
        )?;
        family(
            &mut enc,
            "sink_wal_bytes",
            "Disk buffer: bytes held in segments now.",
            MetricType::Gauge,
            n_sink.clone().map(|i| {
                (
                    sink(i),
                    ConstGauge::new(m.sink_sum(i, |c| c.wal_bytes.get())),
                )
            }),
        )?;
        family(
            &mut enc,
            "sink_wal_memory_batches",
            "Disk buffer (write_when = behind): batches sent from memory, never written to the disk.",
            MetricType::Counter,
            sink_counter(|c| c.wal_memory_batches.get() as i64),
        )?;
        family(
            &mut enc,
            "sink_wal_spills",
            "Disk buffer (write_when = behind): times the sink fell behind and batches began going to the disk.",
            MetricType::Counter,
            sink_counter(|c| c.wal_spills.get() as i64),
        )?;
        family(
            &mut enc,
            "sink_wal_memory_bytes",
            "Disk buffer (write_when = behind): bytes of batches held in memory only, now.",
            MetricType::Gauge,
            n_sink.clone().map(|i| {
                (
                    sink(i),
                    ConstGauge::new(m.sink_sum(i, |c| c.wal_memory_bytes.get())),
                )
            }),
        )?;
        family(
            &mut enc,
            "sink_body_bytes",
            "HTTP: request body bytes sent, after encoding and compression.",
            MetricType::Counter,
            sink_counter(|c| c.body_bytes.get() as i64),
        )?;
        {
            let classes: [(&str, SinkField); 5] = [
                ("2xx", |c| c.responses_2xx.get() as i64),
                ("throttled", |c| c.responses_throttled.get() as i64),
                ("4xx", |c| c.responses_4xx.get() as i64),
                ("5xx", |c| c.responses_5xx.get() as i64),
                ("timeout", |c| c.timeouts.get() as i64),
            ];
            family(
                &mut enc,
                "sink_http_responses",
                "HTTP: answers by class (throttled = 429 and 503; timeout = no answer in request.timeout_ms).",
                MetricType::Counter,
                n_sink.clone().flat_map(|i| {
                    classes.iter().map(move |(class, f)| {
                        let mut labels = sink(i);
                        labels.push(("class", class.to_string()));
                        (labels, ConstCounter::new(m.sink_sum(i, *f) as u64))
                    })
                }),
            )?;
        }
        family(
            &mut enc,
            "sink_in_flight_requests",
            "HTTP: requests in flight now (all shards).",
            MetricType::Gauge,
            n_sink.clone().map(|i| {
                (
                    sink(i),
                    ConstGauge::new(m.sink_sum(i, |c| c.in_flight.get())),
                )
            }),
        )?;
        family(
            &mut enc,
            "sink_concurrency_limit",
            "HTTP: the concurrency limit, summed over shards (adaptive or fixed).",
            MetricType::Gauge,
            n_sink.clone().map(|i| {
                (
                    sink(i),
                    ConstGauge::new(m.sink_sum(i, |c| c.concurrency_limit.get())),
                )
            }),
        )?;
        family(
            &mut enc,
            "sink_dead_letter_batches",
            "HTTP: batches the endpoint refused for good (4xx), written to the dead-letter file.",
            MetricType::Counter,
            sink_counter(|c| c.dead_letter_batches.get() as i64),
        )?;
        family(
            &mut enc,
            "sink_dead_letter_records",
            "HTTP: records in dead-lettered batches.",
            MetricType::Counter,
            sink_counter(|c| c.dead_letter_records.get() as i64),
        )?;
        family(
            &mut enc,
            "sink_encode_dropped_records",
            "Records the sink's encoding cannot express (e.g. not InfluxDB line protocol), dropped.",
            MetricType::Counter,
            sink_counter(|c| c.encode_dropped.get() as i64),
        )?;
        family(
            &mut enc,
            "shard_crossed_records",
            "Records a shard handed to another over the mesh (partition_by peer or a field).",
            MetricType::Counter,
            m.shards.iter().enumerate().map(|(k, s)| {
                (
                    vec![("shard", k.to_string())],
                    ConstCounter::new(s.crossed_records.get()),
                )
            }),
        )?;
        family(
            &mut enc,
            "shard_ring_batches",
            "Batches waiting in the rings that lead into a shard.",
            MetricType::Gauge,
            m.shards.iter().enumerate().map(|(k, s)| {
                (
                    vec![("shard", k.to_string())],
                    ConstGauge::new(s.ring_batches.get()),
                )
            }),
        )?;
        family(
            &mut enc,
            "shard_pool_batches",
            "Batches a shard's pool has allocated since start.",
            MetricType::Gauge,
            m.shards.iter().enumerate().map(|(k, s)| {
                (
                    vec![("shard", k.to_string())],
                    ConstGauge::new(s.pool_batches_made.get()),
                )
            }),
        )?;
        family(
            &mut enc,
            "shard_io_backend",
            "The I/O backend each shard runs (uring or epoll: config key io), as a label; always 1.",
            MetricType::Gauge,
            (0..m.shards.len()).map(|k| {
                (
                    vec![
                        ("shard", k.to_string()),
                        ("backend", crate::io::backend().name().to_string()),
                    ],
                    ConstGauge::new(1i64),
                )
            }),
        )?;
        family(
            &mut enc,
            "task_failures",
            "Tasks that died (a panic) since start; /ready answers 503 once one has.",
            MetricType::Counter,
            [(Vec::new(), ConstCounter::new(crate::logging::panics()))],
        )?;
        #[cfg(feature = "count-alloc")]
        {
            let (allocations, bytes) = crate::alloc_count::totals();
            single(
                &mut enc,
                "shard_allocations",
                "Heap allocations made on shard threads (feature count-alloc).",
                MetricType::Counter,
                ConstCounter::new(allocations),
            )?;
            single(
                &mut enc,
                "shard_allocated_bytes",
                "Bytes allocated on shard threads (feature count-alloc).",
                MetricType::Counter,
                ConstCounter::new(bytes),
            )?;
        }
        Ok(())
    }
}

/// Serves `/metrics`, `/health` and `/ready` on `address` from one thread
/// ([`server`]). Binding happens before this returns, so a bad address fails
/// start.
pub fn serve(address: SocketAddr, metrics: Arc<Metrics>) -> std::io::Result<()> {
    let listener = std::net::TcpListener::bind(address)?;
    std::thread::Builder::new()
        .name("updraft-metrics".into())
        .spawn(move || server::run(listener, |path| answer(&metrics, path)))?;
    Ok(())
}

/// The answer to a GET of `path`: status, content type, body.
fn answer(metrics: &Arc<Metrics>, path: &str) -> (u16, &'static str, String) {
    let text = "text/plain";
    match path {
        "/metrics" => (200, "text/plain; version=0.0.4", metrics.render()),
        "/health" => (200, text, "ok\n".to_string()),
        "/ready" => {
            let died = crate::logging::panics();
            if died > 0 {
                (
                    503,
                    text,
                    format!("failed: {died} task(s) died; see the log\n"),
                )
            } else if metrics.ready.load(Relaxed) {
                (200, text, "ready\n".to_string())
            } else {
                (503, text, "starting\n".to_string())
            }
        }
        _ => (404, text, "not found\n".to_string()),
    }
}
