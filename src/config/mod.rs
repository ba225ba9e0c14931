//! Configuration: the TOML a user writes ([`ConfigFile`]) and the validated
//! [`Plan`] the runtime starts from, with every default and bound resolved.
//!
//! Parsing rejects unknown keys; validation rejects bad addresses, inputs that
//! name no source and keys that do not belong to a component's type. Every
//! error names the key it is about (`sinks.up.batch.max_records`), because a
//! user fixing a config file needs nothing else.
//!
//! The keys every sink takes (`type`, `inputs`, `batch`, `buffer`, `retry`)
//! are read here; the rest of a `[sinks.X]` table belongs to its kind and is
//! handed to [`crate::sinks::plan`], which finds the kind in the sinks'
//! registration (the one place config knows of sink kinds; each kind reads
//! and checks its own keys in its folder). Beyond reading the file, the I/O
//! here is what a plan must check before it can work: the http sink
//! resolves its host and reads its CA file, and the directories and files
//! the collector will write are checked to exist (or be creatable) and be
//! writable ([`Plan::check_paths`]).

use crate::record::meta::Field;
use crate::sinks::{PlanCx, Target};
use serde::Deserialize;
use std::collections::BTreeMap;

pub mod reload;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Largest record updraft accepts by default (`max_record_bytes`).
pub const MAX_RECORD_BYTES_DEFAULT: usize = 64 * 1024;
/// No record may be larger than this, whatever the config says: a frame is
/// held whole in a connection's read buffer.
pub const MAX_RECORD_BYTES_LIMIT: usize = 16 * 1024 * 1024;
/// The most a UDP datagram (over IPv4) carries.
pub const UDP_PAYLOAD_BYTES_MAX: usize = 65_507;
pub const MAX_CONNECTIONS_DEFAULT: usize = 256;
/// More connections than file descriptors a process can usually get.
pub const MAX_CONNECTIONS_LIMIT: usize = 1 << 20;
/// A tcp connection that sends nothing for this long is closed.
pub const IDLE_TIMEOUT_MS_DEFAULT: u64 = 5 * 60 * 1000;
pub const IDLE_TIMEOUT_MS_LIMIT: u64 = 24 * 3600 * 1000;
pub const BATCH_MAX_RECORDS_DEFAULT: usize = 4096;
pub const BATCH_MAX_BYTES_DEFAULT: usize = 1024 * 1024;
pub const BATCH_LINGER_MS_DEFAULT: u64 = 5;
/// A batch waits at most this long for more records.
pub const BATCH_LINGER_MS_LIMIT: u64 = 10 * 60 * 1000;
/// What a sink may hold in memory, over all shards, by default.
pub const BUFFER_MAX_BYTES_DEFAULT: usize = 64 * 1024 * 1024;
/// The most a memory buffer may hold, over all shards.
pub const MEMORY_BUFFER_MAX_BYTES_LIMIT: usize = 64 << 30;
/// The most a disk buffer may hold, over all shards.
pub const DISK_BUFFER_MAX_BYTES_LIMIT: usize = 64 << 40;
pub const SYNC_INTERVAL_MS_LIMIT: u64 = 60_000;
/// The share of a sink's queue that only sources that cannot wait (udp) may
/// fill: tcp senders are held back before the queue is full.
pub const HEADROOM_PERCENT_DEFAULT: u64 = 25;
pub const HEADROOM_PERCENT_LIMIT: u64 = 90;
/// A disk buffer's `memory_bytes` (`write_when = "behind"`) when it sets
/// none (raised to two batches per shard).
pub const MEMORY_BYTES_DEFAULT: usize = 8 * 1024 * 1024;
pub const MEMORY_BYTES_LIMIT: usize = 64 * 1024 * 1024 * 1024;
/// A disk buffer's `replay_share` when it sets none: after an outage, the
/// backlog and live batches get the sink half and half.
pub const REPLAY_SHARE_DEFAULT: f64 = 0.5;
/// A source's `priority` when it sets none.
pub const PRIORITY_DEFAULT: u8 = 0;
pub const RETRY_BACKOFF_MS_LIMIT: u64 = 3_600_000;
pub const SHUTDOWN_TIMEOUT_MS_LIMIT: u64 = 3_600_000;
pub const RETRY_INITIAL_BACKOFF_MS_DEFAULT: u64 = 50;
pub const RETRY_MAX_BACKOFF_MS_DEFAULT: u64 = 2_000;
pub const SHUTDOWN_TIMEOUT_MS_DEFAULT: u64 = 5_000;
pub const SYNC_INTERVAL_MS_DEFAULT: u64 = 100;
/// Unsynced bytes that trigger a group commit before the interval ends.
pub const SYNC_BYTES: u64 = 8 * 1024 * 1024;
/// Largest segment file of a disk buffer.
pub const SEGMENT_BYTES_MAX: u64 = 64 * 1024 * 1024;
/// A disk buffer's segments hold at least this many full batches.
const SEGMENT_BATCHES_MIN: u64 = 2;
pub const SHARDS_MAX: usize = 256;
/// A sink's name is a directory name (`data_dir/<sink>`, the dead-letter
/// directory) and part of every idempotency key.
pub const SINK_NAME_BYTES_MAX: usize = 40;

const _: () = assert!(MAX_RECORD_BYTES_DEFAULT <= MAX_RECORD_BYTES_LIMIT);
const _: () = assert!(RETRY_INITIAL_BACKOFF_MS_DEFAULT <= RETRY_MAX_BACKOFF_MS_DEFAULT);

/// An error in a config file. The message names the file and the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file is not valid TOML or a key is unknown or of the wrong type.
    #[error("{key}: {message}")]
    Parse { key: String, message: String },
    /// A key has a value that cannot work.
    #[error("{key}: {message}")]
    Invalid { key: String, message: String },
}

/// An error in the value of `key`.
pub fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

// ---------------------------------------------------------------------------
// What the user writes.

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    pub shards: Option<usize>,
    /// The I/O backend: auto (io_uring where it can be set up, else
    /// epoll), uring or epoll.
    pub io: Option<crate::io::Choice>,
    pub data_dir: Option<PathBuf>,
    pub shutdown_timeout_ms: Option<u64>,
    pub metrics: Option<MetricsConfig>,
    #[serde(default)]
    pub sources: BTreeMap<String, SourceConfig>,
    #[serde(default)]
    pub sinks: BTreeMap<String, SinkConfig>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    pub address: String,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SourceKind {
    Tcp,
    Udp,
    /// Subscribes at a broker (no socket of its own to bind).
    Mqtt,
    /// Takes batches from other updrafts (the native protocol).
    Updraft,
    /// Tails files (no socket of its own to bind).
    File,
}

impl SourceKind {
    pub fn name(self) -> &'static str {
        match self {
            SourceKind::Tcp => "tcp",
            SourceKind::Udp => "udp",
            SourceKind::Mqtt => "mqtt",
            SourceKind::Updraft => "updraft",
            SourceKind::File => "file",
        }
    }
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Framing {
    Newline,
    OctetCounting,
    LengthPrefixed,
    Datagram,
}

/// `partition_by` as written: `"none"`, `"peer"` or `{ field = "…" }`.
#[derive(Debug, Deserialize, Clone, PartialEq, Eq)]
#[serde(untagged)]
pub enum PartitionByConfig {
    Named(PartitionNamed),
    Field { field: String },
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum PartitionNamed {
    None,
    Peer,
}

/// Which shard owns a source's records.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum PartitionBy {
    /// The shard that received it.
    #[default]
    None,
    /// A hash of the sender's address.
    Peer,
    /// A hash of a field's value (the source's `decoding` locates it); a
    /// record without the field stays on the shard that received it.
    Field(FieldRef),
}

/// A field of a decoded record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FieldRef {
    /// syslog
    Host,
    App,
    ProcId,
    MsgId,
    Severity,
    Facility,
    /// influx
    Measurement,
    Tag(Box<[u8]>),
    /// json: a top-level key
    Key(Box<[u8]>),
}

impl FieldRef {
    /// The field `name` means under `decoding`, or why it means none.
    pub fn parse(decoding: Decoding, name: &str) -> Result<FieldRef, String> {
        let f = match (decoding, name) {
            (Decoding::Raw, _) => {
                return Err(
                    "a field needs a decoding on the source (syslog, influx or json)".into(),
                )
            }
            (Decoding::Syslog, "host") => FieldRef::Host,
            (Decoding::Syslog, "app") => FieldRef::App,
            (Decoding::Syslog, "procid") => FieldRef::ProcId,
            (Decoding::Syslog, "msgid") => FieldRef::MsgId,
            (Decoding::Syslog, "severity") => FieldRef::Severity,
            (Decoding::Syslog, "facility") => FieldRef::Facility,
            (Decoding::Syslog, _) => {
                return Err(format!(
                    "{name:?} is not a syslog field (host, app, procid, msgid, severity, facility)"
                ))
            }
            (Decoding::Influx, "measurement") => FieldRef::Measurement,
            (Decoding::Influx, n) => match n.strip_prefix("tag.") {
                Some(t) if !t.is_empty() => FieldRef::Tag(t.as_bytes().into()),
                _ => {
                    return Err(format!(
                        "{name:?} is not a line protocol field (measurement, or tag.<key>)"
                    ))
                }
            },
            (Decoding::Json, n) if !n.is_empty() => FieldRef::Key(n.as_bytes().into()),
            (Decoding::Json, _) => return Err("a JSON key is not empty".into()),
        };
        Ok(f)
    }
}

/// How a source's records are read (`decoding`).
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Decoding {
    /// Opaque bytes (the default).
    #[default]
    Raw,
    /// RFC 5424 or RFC 3164.
    Syslog,
    /// InfluxDB line protocol.
    Influx,
    /// One JSON object per record.
    Json,
}

/// What a source does with a record its decoding cannot read.
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum OnError {
    /// Counted, and passed on as it came (the default).
    #[default]
    Pass,
    /// Counted, and dropped (`reason="decode"`).
    Drop,
}

/// What a source does with a record that is not valid UTF-8.
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Utf8Policy {
    /// Count it as dropped (reason `invalid_utf8`) and skip it.
    #[default]
    Drop,
    /// Forward bytes as they are, unchecked (binary payloads).
    Pass,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    #[serde(rename = "type")]
    pub kind: SourceKind,
    /// tcp, udp: where to listen.
    pub address: Option<String>,
    pub framing: Option<Framing>,
    pub partition_by: Option<PartitionByConfig>,
    pub decoding: Option<Decoding>,
    pub on_error: Option<OnError>,
    pub max_record_bytes: Option<usize>,
    pub max_connections: Option<usize>,
    pub receive_buffer_bytes: Option<usize>,
    pub utf8: Option<Utf8Policy>,
    pub rate_limit: Option<RateLimitConfig>,
    pub priority: Option<u8>,
    pub idle_timeout_ms: Option<u64>,
    /// mqtt: the broker, `mqtt://HOST:PORT`.
    pub url: Option<String>,
    /// mqtt: topic filters to subscribe to (wildcards allowed).
    pub topics: Option<Vec<String>>,
    pub qos: Option<u8>,
    pub protocol: Option<String>,
    pub client_id: Option<String>,
    pub clean_session: Option<bool>,
    pub username: Option<String>,
    pub password: Option<String>,
    pub keep_alive_s: Option<u16>,
    /// mqtt (mqtts://): trusted CAs, a client certificate; updraft: the
    /// server's certificate and key, and the CA clients must show a
    /// certificate of.
    pub tls: Option<crate::tls::TlsConfig>,
    /// updraft: the longest batch frame taken from a sender.
    pub max_frame_bytes: Option<usize>,
    /// file: globs of the files to tail.
    pub include: Option<Vec<String>>,
    /// file: globs of files not to tail, though `include` matches them.
    pub exclude: Option<Vec<String>>,
    /// file: where to begin a file seen the first time.
    pub read_from: Option<ReadFrom>,
}

/// Where a file source begins a file it has no checkpoint for.
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum ReadFrom {
    #[default]
    Beginning,
    /// The end, for the files found at start; files that appear later are
    /// read from their beginning (they are new).
    End,
}

/// A file source's keys, resolved.
#[derive(Debug, Clone)]
pub struct FileSourcePlan {
    pub include: Vec<String>,
    pub exclude: Vec<glob::Pattern>,
    pub read_from: ReadFrom,
    /// Where the source keeps each file's checkpoint.
    pub checkpoints: PathBuf,
}

/// Names of compressed files a file source never reads, though `include`
/// matches them (rotated logs compressed by logrotate).
pub const COMPRESSED_SUFFIXES: [&str; 5] = [".gz", ".zst", ".xz", ".bz2", ".lz4"];

/// Resolves a file source's own keys.
fn file_source(
    name: &str,
    s: &SourceConfig,
    data_dir: &Path,
) -> Result<FileSourcePlan, ConfigError> {
    let key = |k: &str| format!("sources.{name}.{k}");
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return Err(invalid(
            format!("sources.{name}"),
            "a file source's name names its checkpoint file: use letters, digits, _ and -",
        ));
    }
    // Relative globs are taken from the directory updraft starts in.
    let cwd = std::env::current_dir().unwrap_or_default();
    let include: Vec<String> = s
        .include
        .iter()
        .flatten()
        .map(|g| cwd.join(g).to_string_lossy().into_owned())
        .collect();
    if include.is_empty() {
        return Err(invalid(
            key("include"),
            "a file source needs at least one path or glob to tail",
        ));
    }
    for (i, g) in include.iter().enumerate() {
        if let Err(e) = glob::Pattern::new(g) {
            return Err(invalid(
                format!("sources.{name}.include[{i}]"),
                format!("{g:?} is not a glob: {e}"),
            ));
        }
    }
    let mut exclude = Vec::new();
    for (i, g) in s.exclude.iter().flatten().enumerate() {
        match glob::Pattern::new(g) {
            Ok(p) => exclude.push(p),
            Err(e) => {
                return Err(invalid(
                    format!("sources.{name}.exclude[{i}]"),
                    format!("{g:?} is not a glob: {e}"),
                ))
            }
        }
    }
    Ok(FileSourcePlan {
        include,
        exclude,
        read_from: s.read_from.unwrap_or_default(),
        checkpoints: data_dir.join("file_source").join(format!("{name}.json")),
    })
}

/// An updraft source's keys, resolved.
#[derive(Debug, Clone)]
pub struct NativeSourcePlan {
    pub tls: Option<std::sync::Arc<rustls::ServerConfig>>,
    pub max_frame_bytes: u32,
}

/// The longest frame an updraft source takes by default, and at most.
pub const MAX_FRAME_BYTES_DEFAULT: usize = 64 * 1024 * 1024;
pub const MAX_FRAME_BYTES_LIMIT: usize = 512 * 1024 * 1024;

/// An mqtt source's subscription, resolved.
#[derive(Debug, Clone)]
pub struct MqttSourcePlan {
    /// The url as configured (for logs).
    pub url: String,
    pub address: SocketAddr,
    pub topics: Vec<String>,
    pub qos: u8,
    pub version: crate::mqtt::Version,
    pub client_id: String,
    /// false (default): a persistent session, so the broker keeps QoS 1
    /// messages for us while we are away.
    pub clean_session: bool,
    pub login: Option<(Redacted, Redacted)>,
    pub keep_alive_s: u16,
    pub tls: Option<crate::tls::ClientTls>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    pub records_per_sec: u64,
    pub when_exceeded: Option<WhenExceeded>,
}

/// What a source does with records over its `rate_limit`.
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum WhenExceeded {
    /// Drop and count (`reason="rate_limit"`).
    #[default]
    Drop,
    /// Stop reading until the rate allows more (TCP; a UDP source drops).
    Block,
}

/// A source's rate limit, per shard (the configured rate split evenly).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimitPlan {
    pub per_shard_per_sec: u64,
    pub when_exceeded: WhenExceeded,
}

/// A `[sinks.X]` table: the keys every sink takes, and the kind's own
/// (`options`, read by the kind: unknown ones are refused there).
#[derive(Debug, Deserialize)]
pub struct SinkConfig {
    #[serde(rename = "type")]
    pub kind: String,
    pub inputs: Vec<String>,
    pub batch: Option<BatchConfig>,
    pub buffer: Option<BufferConfig>,
    pub retry: Option<RetryConfig>,
    /// A byte budget on what the sink writes (all shards together).
    pub rate_limit: Option<SinkRateConfig>,
    /// Takes only the records whose field matches (`where = { field, in }`).
    #[serde(rename = "where")]
    pub filter: Option<WhereConfig>,
    #[serde(flatten)]
    pub options: toml::Table,
}

/// `where = { field = "severity", in = ["0", "1"] }` (or `not_in`, or
/// `prefix`): one of the three.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WhereConfig {
    pub field: String,
    #[serde(rename = "in")]
    pub is_in: Option<Vec<String>>,
    pub not_in: Option<Vec<String>>,
    pub prefix: Option<Vec<String>>,
}

/// How a field's value is matched (`where`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Matcher {
    In(Vec<Box<[u8]>>),
    NotIn(Vec<Box<[u8]>>),
    Prefix(Vec<Box<[u8]>>),
}

impl Matcher {
    /// Whether a record whose field is `value` (`None`: it has none) is
    /// taken. A record without the field matches only `not_in`.
    #[inline]
    pub fn takes(&self, value: Option<&[u8]>) -> bool {
        match (self, value) {
            (Matcher::In(vs), Some(v)) => vs.iter().any(|x| **x == *v),
            (Matcher::NotIn(vs), Some(v)) => !vs.iter().any(|x| **x == *v),
            (Matcher::Prefix(ps), Some(v)) => ps.iter().any(|p| v.starts_with(p)),
            (Matcher::NotIn(_), None) => true,
            (_, None) => false,
        }
    }
}

/// A sink's `where` as one of its input sources applies it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceFilter {
    pub sink: usize,
    pub field: FieldRef,
    pub matcher: Matcher,
}

/// Sinks with a `where` are told apart by a bit each.
pub const FILTERED_SINKS_MAX: usize = 64;

/// Ids a running collector can give sources and sinks, over its whole life:
/// a reload gives an added or changed source or sink a new id (the old one's
/// tasks may still hold theirs), so reloads that change many are refused
/// past these, asking for a restart.
pub const SOURCE_SLOTS_MAX: usize = 128;
pub const SINK_SLOTS_MAX: usize = FILTERED_SINKS_MAX;

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct BatchConfig {
    pub max_records: Option<usize>,
    pub max_bytes: Option<usize>,
    pub linger_ms: Option<u64>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct BufferConfig {
    #[serde(rename = "type")]
    pub kind: Option<BufferKind>,
    pub max_bytes: Option<usize>,
    pub when_full: Option<WhenFull>,
    pub sync_interval_ms: Option<u64>,
    pub headroom_percent: Option<u64>,
    pub write_when: Option<WriteWhen>,
    pub memory_bytes: Option<usize>,
    pub replay_share: Option<f64>,
}

/// When a disk buffer writes a batch to its log.
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum WriteWhen {
    /// Every batch, before it is sent.
    #[default]
    Always,
    /// Only when the sink is behind: batches are sent from memory while
    /// the sink keeps up, and written once `memory_bytes` are waiting.
    Behind,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum BufferKind {
    /// A bounded queue in memory.
    #[default]
    Memory,
    /// A write-ahead log per shard under `data_dir/<sink>/<shard>/`.
    Disk,
}

/// What a sink does with new records when its buffer is full.
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum WhenFull {
    /// Wait: TCP sources stop reading, UDP sources count drops.
    #[default]
    Block,
    /// Drop the newest records and count them.
    DropNewest,
    /// Drop the oldest batches not yet sent (whole) to make room, and count
    /// their records: the newest stay (memory buffers).
    DropOldest,
}

/// `rate_limit = { bytes_per_sec = N, burst_bytes = B }` on a sink.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SinkRateConfig {
    pub bytes_per_sec: Option<u64>,
    pub burst_bytes: Option<u64>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    pub initial_backoff_ms: Option<u64>,
    pub max_backoff_ms: Option<u64>,
}

/// A sink's `rate_limit.bytes_per_sec`: from 1 KiB/s to 100 GiB/s.
const SINK_RATE_MIN: u64 = 1024;
const SINK_RATE_MAX: u64 = 100 << 30;

// ---------------------------------------------------------------------------
// What the runtime starts from.

/// A validated configuration: every default applied, every bound checked.
#[derive(Debug, Clone)]
pub struct Plan {
    pub shards: usize,
    pub io: crate::io::Choice,
    pub data_dir: PathBuf,
    pub shutdown_timeout_ms: u64,
    pub metrics_address: Option<SocketAddr>,
    /// Sources in name order; a source's id is its index here.
    pub sources: Vec<SourcePlan>,
    /// Sinks in name order; a sink's id is its index here.
    pub sinks: Vec<SinkPlan>,
}

#[derive(Debug, Clone)]
pub struct SourcePlan {
    pub name: String,
    pub kind: SourceKind,
    pub address: SocketAddr,
    pub framing: Framing,
    pub partition_by: PartitionBy,
    pub decoding: Decoding,
    pub on_error: OnError,
    pub max_record_bytes: usize,
    pub max_connections: usize,
    pub receive_buffer_bytes: Option<usize>,
    pub utf8: Utf8Policy,
    pub rate_limit: Option<RateLimitPlan>,
    /// Whether the source can be held back (tcp: it stops reading) rather
    /// than drop what it cannot hand on (udp).
    pub can_wait: bool,
    /// `priority`: when a sink is behind, sources of lower priority are
    /// held back (or dropped) first (see `admission_marks`).
    pub priority: u8,
    /// tcp: a connection that sends nothing for this long is closed.
    pub idle_timeout_ms: u64,
    /// mqtt: the broker and the subscription (`address` is the broker's).
    pub mqtt: Option<MqttSourcePlan>,
    /// updraft: TLS and the frame bound.
    pub native: Option<NativeSourcePlan>,
    /// file: what to tail and where the checkpoints go.
    pub file: Option<FileSourcePlan>,
    /// Ids of the sinks that list this source in `inputs`.
    pub sinks: Vec<usize>,
    /// What the source attaches to its records as meta because a sink of
    /// it uses it (a `{topic}` template).
    pub fields: Vec<Field>,
    /// Whether the source keeps each decoded record's field index as meta
    /// (a sink of it names destinations by a field or encodes the fields).
    pub index: bool,
    /// The `where` of each sink of it that has one.
    pub filters: Vec<SourceFilter>,
    /// A reload removed it (or changed it: the new one has a new id). Its
    /// id is kept, never reused, so what its tasks still hold stays
    /// meaningful while they end.
    pub removed: bool,
}

#[derive(Debug, Clone)]
pub struct SinkPlan {
    pub name: String,
    /// The kind and its resolved keys.
    pub target: Target,
    /// Ids of the sources this sink takes.
    pub inputs: Vec<usize>,
    pub batch: BatchLimits,
    /// Sealed batches a sink may queue on one shard before sources wait
    /// (for a disk buffer: before the log's writer takes them).
    pub queue_batches: usize,
    /// Indexed by source id: how many sealed batches that source's records
    /// may find queued and still be admitted (`admission_marks`).
    pub marks: Vec<usize>,
    pub buffer: BufferPlan,
    pub retry: RetryPlan,
    /// `rate_limit`: the sink's byte budget, shared by its shards.
    pub rate: Option<Arc<crate::limiter::ByteRate>>,
    /// A reload removed it (or changed it: the new one has a new id): its
    /// queue is closed and its sender ends once it has sent (memory) or
    /// kept (disk buffer) what it held.
    pub removed: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BufferPlan {
    pub kind: BufferKind,
    pub when_full: WhenFull,
    /// Over all shards.
    pub max_bytes: usize,
    /// Disk: group commit at least this often.
    pub sync_interval_ms: u64,
    /// Disk: a sync is due at once when this much is unsynced.
    pub sync_bytes: u64,
    /// Disk: a segment file is closed at this size.
    pub segment_bytes: u64,
    /// Disk: this sink's log directory on each shard is `<dir>/<shard>`.
    pub dir: PathBuf,
    /// Disk: whether a batch is written before it is sent, or only once
    /// the sink falls behind.
    pub write_when: WriteWhen,
    /// Disk, `write_when = "behind"`: bytes of batches that may wait in
    /// memory, unwritten, over all shards.
    pub memory_bytes: usize,
    /// Disk: the backlog's share of the sink, per mille, while live batches
    /// are interleaved with it (1000: the backlog first, in order).
    pub replay_share: u16,
}

/// When a batch is sealed: whichever comes first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLimits {
    pub max_records: usize,
    pub max_bytes: usize,
    pub linger_ms: u64,
}

#[derive(Debug, Clone, Copy)]
pub struct RetryPlan {
    pub initial_backoff_ms: u64,
    pub max_backoff_ms: u64,
}

/// A value that may hold a secret (a header, a password): never shown by `Debug`.
#[derive(Clone)]
pub struct Redacted(pub String);

impl std::fmt::Debug for Redacted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Expands `${VAR}` from the environment (`$$` is a literal `$`). The error
/// names the variable, never a value.
pub fn expand_env(v: &str) -> Result<String, String> {
    let mut out = String::with_capacity(v.len());
    let mut rest = v;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(r) = after.strip_prefix('$') {
            out.push('$');
            rest = r;
        } else if let Some(r) = after.strip_prefix('{') {
            let end = r
                .find('}')
                .ok_or("unterminated ${ (write $$ for a literal $)")?;
            let var = &r[..end];
            if var.is_empty() || !var.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                return Err(format!("${{{var}}} is not a valid variable name"));
            }
            let val =
                std::env::var(var).map_err(|_| format!("environment variable {var} is not set"))?;
            out.push_str(&val);
            rest = &r[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// The first key set in `s` that only an mqtt source takes.
fn mqtt_only_key(s: &SourceConfig) -> Option<&'static str> {
    [
        ("url", s.url.is_some()),
        ("topics", s.topics.is_some()),
        ("qos", s.qos.is_some()),
        ("protocol", s.protocol.is_some()),
        ("client_id", s.client_id.is_some()),
        ("clean_session", s.clean_session.is_some()),
        ("username", s.username.is_some()),
        ("password", s.password.is_some()),
        ("keep_alive_s", s.keep_alive_s.is_some()),
    ]
    .into_iter()
    .find(|(_, set)| *set)
    .map(|(k, _)| k)
}

/// Resolves an updraft source's own keys.
fn native_source(name: &str, s: &SourceConfig) -> Result<NativeSourcePlan, ConfigError> {
    let key = |k: &str| format!("sources.{name}.{k}");
    if let Some(k) = mqtt_only_key(s) {
        return Err(invalid(key(k), "only an mqtt source takes this key"));
    }
    let max_frame_bytes = s.max_frame_bytes.unwrap_or(MAX_FRAME_BYTES_DEFAULT);
    if !(4096..=MAX_FRAME_BYTES_LIMIT).contains(&max_frame_bytes) {
        return Err(invalid(
            key("max_frame_bytes"),
            format!("must be between 4096 and {MAX_FRAME_BYTES_LIMIT}, got {max_frame_bytes}"),
        ));
    }
    let tls = match &s.tls {
        None => None,
        Some(t) => Some(crate::tls::server_config(&key("tls"), t)?),
    };
    Ok(NativeSourcePlan {
        tls,
        max_frame_bytes: max_frame_bytes as u32,
    })
}

/// Checks and resolves an mqtt source's keys.
fn mqtt_source(name: &str, s: &SourceConfig) -> Result<MqttSourcePlan, ConfigError> {
    let key = |k: &str| format!("sources.{name}.{k}");
    let url = s
        .url
        .clone()
        .ok_or_else(|| invalid(key("url"), "an mqtt source needs a url (mqtt://HOST:PORT)"))?;
    let broker = crate::mqtt::broker(&url).map_err(|m| invalid(key("url"), m))?;
    let tls = crate::mqtt::tls_for(&key("tls"), &broker, s.tls.as_ref())?;
    let address = broker.address;
    let topics = s.topics.clone().unwrap_or_default();
    if topics.is_empty() {
        return Err(invalid(key("topics"), "list at least one topic filter"));
    }
    for t in &topics {
        let bad_wildcard = t.split('/').any(|level| {
            (level.contains('#') && level != "#") || (level.contains('+') && level != "+")
        }) || t.find('#').is_some_and(|i| i + 1 != t.len());
        if t.is_empty() || t.len() > 65_535 || bad_wildcard {
            return Err(invalid(
                key("topics"),
                format!("{t:?} is not a topic filter (+ stands for one whole level, # for the rest, last)"),
            ));
        }
    }
    let qos = s.qos.unwrap_or(1);
    if qos > 1 {
        return Err(invalid(key("qos"), "0 or 1"));
    }
    let version = match s.protocol.as_deref() {
        None | Some("3.1.1") => crate::mqtt::Version::V311,
        Some("5") => crate::mqtt::Version::V5,
        Some(p) => {
            return Err(invalid(
                key("protocol"),
                format!("{p:?}: \"3.1.1\" or \"5\""),
            ))
        }
    };
    let client_id = s
        .client_id
        .clone()
        .unwrap_or_else(|| format!("updraft-{name}"));
    if client_id.is_empty() || client_id.len() > 64 {
        return Err(invalid(key("client_id"), "1 to 64 bytes"));
    }
    let login = match (&s.username, &s.password) {
        (None, None) => None,
        (Some(u), p) => Some((
            Redacted(expand_env(u).map_err(|m| invalid(key("username"), m))?),
            Redacted(match p {
                Some(p) => expand_env(p).map_err(|m| invalid(key("password"), m))?,
                None => String::new(),
            }),
        )),
        (None, Some(_)) => return Err(invalid(key("password"), "a password needs a username")),
    };
    let keep_alive_s = s.keep_alive_s.unwrap_or(30);
    if keep_alive_s == 0 {
        return Err(invalid(key("keep_alive_s"), "at least 1"));
    }
    Ok(MqttSourcePlan {
        url,
        address,
        topics,
        qos,
        version,
        client_id,
        clean_session: s.clean_session.unwrap_or(false),
        login,
        keep_alive_s,
        tls,
    })
}

/// An `IP:PORT` address, or an error naming `key`.
pub fn parse_addr(key: &str, value: &str) -> Result<SocketAddr, ConfigError> {
    value.parse().map_err(|_| {
        invalid(
            key,
            format!("invalid address {value:?}: expected IP:PORT such as \"127.0.0.1:5140\""),
        )
    })
}

impl Plan {
    /// Reads, parses and validates a config file.
    pub fn from_path(path: &Path) -> Result<Plan, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Plan::from_toml(&text)
    }

    /// Parses and validates the text of a config file.
    pub fn from_toml(text: &str) -> Result<Plan, ConfigError> {
        let de = toml::Deserializer::new(text);
        let file: ConfigFile = serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            let inner = e.into_inner();
            let message = inner.message().to_string();
            let key = if key == "." {
                "config".to_string()
            } else {
                key
            };
            let location = inner
                .span()
                .map(|s| {
                    let line = text[..s.start].matches('\n').count() + 1;
                    format!(" (line {line})")
                })
                .unwrap_or_default();
            ConfigError::Parse {
                key,
                message: format!("{}{location}", message.trim_end()),
            }
        })?;
        Plan::validate(file)
    }

    fn validate(file: ConfigFile) -> Result<Plan, ConfigError> {
        let cpus = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        let shards = file.shards.unwrap_or(cpus);
        if shards == 0 || shards > SHARDS_MAX {
            return Err(invalid(
                "shards",
                format!("must be between 1 and {SHARDS_MAX}, got {shards}"),
            ));
        }
        let metrics_address = match &file.metrics {
            Some(m) => Some(parse_addr("metrics.address", &m.address)?),
            None => None,
        };
        if file.sources.is_empty() {
            return Err(invalid("sources", "at least one source is required"));
        }
        if file.sinks.is_empty() {
            return Err(invalid("sinks", "at least one sink is required"));
        }
        let data_dir = file
            .data_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from("./data"));
        let source_ids: BTreeMap<&str, usize> = file
            .sources
            .keys()
            .enumerate()
            .map(|(i, k)| (k.as_str(), i))
            .collect();

        let mut sources = Vec::with_capacity(file.sources.len());
        for (name, s) in &file.sources {
            let key = |k: &str| format!("sources.{name}.{k}");
            let mut native = None;
            let mut file_plan = None;
            if s.kind != SourceKind::File {
                let set = [
                    ("include", s.include.is_some()),
                    ("exclude", s.exclude.is_some()),
                    ("read_from", s.read_from.is_some()),
                ];
                if let Some((k, _)) = set.iter().find(|(_, on)| *on) {
                    return Err(invalid(key(k), "only a file source takes this key"));
                }
            }
            let mqtt = match s.kind {
                SourceKind::Mqtt => {
                    if s.max_frame_bytes.is_some() {
                        return Err(invalid(
                            key("max_frame_bytes"),
                            "only an updraft source takes this key",
                        ));
                    }
                    Some(mqtt_source(name, s)?)
                }
                SourceKind::Updraft => {
                    native = Some(native_source(name, s)?);
                    None
                }
                SourceKind::File => {
                    if let Some(k) = mqtt_only_key(s) {
                        return Err(invalid(key(k), "only an mqtt source takes this key"));
                    }
                    for (k, set) in [
                        ("tls", s.tls.is_some()),
                        ("max_frame_bytes", s.max_frame_bytes.is_some()),
                        ("receive_buffer_bytes", s.receive_buffer_bytes.is_some()),
                    ] {
                        if set {
                            return Err(invalid(key(k), "a file source reads files, not a socket"));
                        }
                    }
                    file_plan = Some(file_source(name, s, &data_dir)?);
                    None
                }
                _ => {
                    if let Some(k) = mqtt_only_key(s) {
                        return Err(invalid(key(k), "only an mqtt source takes this key"));
                    }
                    if s.tls.is_some() {
                        return Err(invalid(
                            key("tls"),
                            "only an mqtt or updraft source takes this key",
                        ));
                    }
                    if s.max_frame_bytes.is_some() {
                        return Err(invalid(
                            key("max_frame_bytes"),
                            "only an updraft source takes this key",
                        ));
                    }
                    None
                }
            };
            let address = match (&mqtt, &s.address) {
                _ if s.kind == SourceKind::File => match s.address {
                    Some(_) => {
                        return Err(invalid(
                            key("address"),
                            "a file source tails its include paths; it listens on no address",
                        ))
                    }
                    None => SocketAddr::from(([0, 0, 0, 0], 0)),
                },
                (Some(m), None) => m.address,
                (Some(_), Some(_)) => {
                    return Err(invalid(
                        key("address"),
                        "an mqtt source subscribes at its url; it listens on no address",
                    ))
                }
                (None, Some(a)) => parse_addr(&key("address"), a)?,
                (None, None) => {
                    return Err(invalid(
                        key("address"),
                        "a tcp, udp or updraft source needs an address (IP:PORT)",
                    ))
                }
            };
            let framing = match (s.kind, s.framing) {
                (SourceKind::Mqtt, None | Some(Framing::Datagram)) => Framing::Datagram,
                (SourceKind::Mqtt, Some(_)) => {
                    return Err(invalid(
                        key("framing"),
                        "an mqtt source takes one record per message",
                    ))
                }
                (SourceKind::Updraft, None) => Framing::Datagram,
                (SourceKind::Updraft, Some(_)) => {
                    return Err(invalid(
                        key("framing"),
                        "an updraft source takes batches as senders framed them",
                    ))
                }
                (SourceKind::Udp, None | Some(Framing::Datagram)) => Framing::Datagram,
                (SourceKind::Udp, Some(f)) => {
                    return Err(invalid(
                        key("framing"),
                        format!("a udp source takes one record per datagram (\"datagram\"), not {f:?}"),
                    ))
                }
                (SourceKind::Tcp, None) => Framing::Newline,
                (SourceKind::Tcp, Some(Framing::Datagram)) => {
                    return Err(invalid(
                        key("framing"),
                        "\"datagram\" is for udp sources; a tcp source takes newline, octet_counting or length_prefixed",
                    ))
                }
                (SourceKind::Tcp, Some(f)) => f,
                (SourceKind::File, None | Some(Framing::Newline)) => Framing::Newline,
                (SourceKind::File, Some(_)) => {
                    return Err(invalid(
                        key("framing"),
                        "a file source takes one record per line (\"newline\")",
                    ))
                }
            };
            let decoding = s.decoding.unwrap_or_default();
            if decoding != Decoding::Raw && s.kind == SourceKind::Updraft {
                return Err(invalid(
                    key("decoding"),
                    "an updraft source takes records as the sender decoded them (\"raw\"; their fields come with them)",
                ));
            }
            if s.on_error.is_some() && decoding == Decoding::Raw {
                return Err(invalid(
                    key("on_error"),
                    "on_error needs a decoding (syslog, influx or json)",
                ));
            }
            let partition_by = match &s.partition_by {
                None | Some(PartitionByConfig::Named(PartitionNamed::None)) => PartitionBy::None,
                Some(PartitionByConfig::Named(PartitionNamed::Peer)) => PartitionBy::Peer,
                Some(PartitionByConfig::Field { field }) => PartitionBy::Field(
                    FieldRef::parse(decoding, field)
                        .map_err(|m| invalid(key("partition_by.field"), m))?,
                ),
            };
            let max_record_bytes = match (s.kind, s.max_record_bytes) {
                (_, Some(m)) => m,
                (SourceKind::Udp, None) => MAX_RECORD_BYTES_DEFAULT.min(UDP_PAYLOAD_BYTES_MAX),
                (
                    SourceKind::Tcp | SourceKind::Mqtt | SourceKind::Updraft | SourceKind::File,
                    None,
                ) => MAX_RECORD_BYTES_DEFAULT,
            };
            if max_record_bytes == 0 || max_record_bytes > MAX_RECORD_BYTES_LIMIT {
                return Err(invalid(
                    key("max_record_bytes"),
                    format!(
                        "must be between 1 and {MAX_RECORD_BYTES_LIMIT}, got {max_record_bytes}"
                    ),
                ));
            }
            if s.kind == SourceKind::Udp && max_record_bytes > UDP_PAYLOAD_BYTES_MAX {
                return Err(invalid(
                    key("max_record_bytes"),
                    format!("a UDP datagram carries at most {UDP_PAYLOAD_BYTES_MAX} bytes"),
                ));
            }
            let max_connections = match (s.kind, s.max_connections) {
                (SourceKind::Udp | SourceKind::Mqtt | SourceKind::File, Some(_)) => {
                    return Err(invalid(
                        key("max_connections"),
                        "only tcp sources have connections",
                    ))
                }
                (_, Some(m)) if m == 0 || m > MAX_CONNECTIONS_LIMIT => {
                    return Err(invalid(
                        key("max_connections"),
                        format!("must be between 1 and {MAX_CONNECTIONS_LIMIT}, got {m}"),
                    ))
                }
                (_, m) => m.unwrap_or(MAX_CONNECTIONS_DEFAULT),
            };
            let sinks = file
                .sinks
                .iter()
                .enumerate()
                .filter(|(_, (_, k))| k.inputs.iter().any(|i| i == name))
                .map(|(i, _)| i)
                .collect();
            let rate_limit = match &s.rate_limit {
                None => None,
                Some(r) if r.records_per_sec == 0 => {
                    return Err(invalid(
                        key("rate_limit.records_per_sec"),
                        "must be at least 1",
                    ))
                }
                Some(r) => Some(RateLimitPlan {
                    // An mqtt or file source runs on one shard: all of it there.
                    per_shard_per_sec: match s.kind {
                        SourceKind::Mqtt | SourceKind::File => r.records_per_sec,
                        _ => r.records_per_sec.div_ceil(shards as u64),
                    },
                    when_exceeded: r.when_exceeded.unwrap_or_default(),
                }),
            };
            let idle_timeout_ms = match (s.kind, s.idle_timeout_ms) {
                (SourceKind::Udp | SourceKind::Mqtt | SourceKind::File, Some(_)) => {
                    return Err(invalid(
                        key("idle_timeout_ms"),
                        "only tcp sources have connections",
                    ))
                }
                (_, Some(t)) if t == 0 || t > IDLE_TIMEOUT_MS_LIMIT => {
                    return Err(invalid(
                        key("idle_timeout_ms"),
                        format!("must be between 1 and {IDLE_TIMEOUT_MS_LIMIT} (24 h), got {t}"),
                    ))
                }
                (_, t) => t.unwrap_or(IDLE_TIMEOUT_MS_DEFAULT),
            };
            let partitioned = partition_by != PartitionBy::None;
            if s.kind == SourceKind::Updraft && (partitioned || s.rate_limit.is_some()) {
                let k = if s.rate_limit.is_some() {
                    "rate_limit"
                } else {
                    "partition_by"
                };
                return Err(invalid(
                    key(k),
                    "an updraft source keeps each batch on the shard it came to, whole (senders are held back when its sinks are full)",
                ));
            }
            if matches!(s.kind, SourceKind::Mqtt | SourceKind::File) && partitioned {
                return Err(invalid(
                    key("partition_by"),
                    format!(
                        "{} source runs on one shard and keeps its records there (\"none\")",
                        if s.kind == SourceKind::File {
                            "a file"
                        } else {
                            "an mqtt"
                        }
                    ),
                ));
            }
            if let Some(other) = sources.iter().find(|o: &&SourcePlan| {
                let stream = |k| matches!(k, SourceKind::Tcp | SourceKind::Updraft);
                (o.kind == s.kind || (stream(o.kind) && stream(s.kind)))
                    && !matches!(o.kind, SourceKind::Mqtt | SourceKind::File)
                    && o.address == address
            }) {
                return Err(invalid(
                    key("address"),
                    format!(
                        "{address} is also the address of sources.{} (two sources cannot share a port)",
                        other.name
                    ),
                ));
            }
            sources.push(SourcePlan {
                name: name.clone(),
                kind: s.kind,
                address,
                framing,
                partition_by,
                decoding,
                on_error: s.on_error.unwrap_or_default(),
                max_record_bytes,
                max_connections,
                receive_buffer_bytes: s.receive_buffer_bytes,
                // An updraft source's records were checked by their sender.
                utf8: s.utf8.unwrap_or(match s.kind {
                    SourceKind::Updraft => Utf8Policy::Pass,
                    _ => Utf8Policy::default(),
                }),
                rate_limit,
                // An mqtt source stops reading and the broker queues.
                can_wait: s.kind != SourceKind::Udp,
                priority: s.priority.unwrap_or(PRIORITY_DEFAULT),
                idle_timeout_ms,
                mqtt,
                native,
                file: file_plan,
                sinks,
                fields: Vec::new(),
                index: false,
                filters: Vec::new(),
                removed: false,
            });
        }

        let mut sinks = Vec::with_capacity(file.sinks.len());
        for (name, k) in &file.sinks {
            let key = |x: &str| format!("sinks.{name}.{x}");
            if name.is_empty()
                || name.len() > SINK_NAME_BYTES_MAX
                || name.starts_with('.')
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b))
            {
                return Err(invalid(
                    format!("sinks.{name}"),
                    format!("a sink's name is 1 to {SINK_NAME_BYTES_MAX} letters, digits, '_', '-' or '.', not starting with '.' (it names a directory)"),
                ));
            }
            let target = crate::sinks::plan(
                &k.kind,
                k.options.clone(),
                &PlanCx {
                    name,
                    data_dir: &data_dir,
                },
            )?;
            if k.inputs.is_empty() {
                return Err(invalid(key("inputs"), "list at least one source"));
            }
            let mut inputs = Vec::with_capacity(k.inputs.len());
            for input in &k.inputs {
                let id = source_ids.get(input.as_str()).ok_or_else(|| {
                    invalid(
                        key("inputs"),
                        format!(
                            "{input:?} names no source (sources: {})",
                            source_ids.keys().copied().collect::<Vec<_>>().join(", ")
                        ),
                    )
                })?;
                inputs.push(*id);
            }
            // What the sink names destinations by must come with every
            // record it takes.
            for (k_, field) in target.fields() {
                for &i in &inputs {
                    let src = &mut sources[i];
                    match &field {
                        Field::Topic => {
                            if !matches!(src.kind, SourceKind::Mqtt | SourceKind::Updraft) {
                                return Err(invalid(
                                    key(k_),
                                    format!(
                                        "{{topic}} needs every input to supply it, and sources.{} ({}) does not: only mqtt sources have a topic",
                                        src.name,
                                        src.kind.name()
                                    ),
                                ));
                            }
                            if !src.fields.contains(&field) {
                                src.fields.push(field.clone());
                            }
                        }
                        // An updraft source's records keep the index the
                        // sender's decoding wrote.
                        Field::Named(_) if src.kind == SourceKind::Updraft => src.index = true,
                        Field::Named(name) => {
                            FieldRef::parse(src.decoding, name).map_err(|m| {
                                invalid(
                                    key(k_),
                                    format!(
                                        "{{{name}}} needs every input to supply it, and sources.{} does not: {m}",
                                        src.name
                                    ),
                                )
                            })?;
                            src.index = true;
                        }
                    }
                }
            }
            // A sink that encodes records' fields (ndjson, influx) gets the
            // index of every decoded record.
            if target.encodes_fields() {
                for &i in &inputs {
                    let src = &mut sources[i];
                    if src.decoding != Decoding::Raw || src.kind == SourceKind::Updraft {
                        src.index = true;
                    }
                }
            }
            if let Some(w) = &k.filter {
                let sink_id = sinks.len();
                if sink_id >= FILTERED_SINKS_MAX {
                    return Err(invalid(
                        key("where"),
                        format!("only the first {FILTERED_SINKS_MAX} sinks (in name order) may have a where"),
                    ));
                }
                let values = |v: &Vec<String>| -> Vec<Box<[u8]>> {
                    v.iter().map(|x| x.as_bytes().into()).collect()
                };
                let matcher = match (&w.is_in, &w.not_in, &w.prefix) {
                    (Some(v), None, None) => Matcher::In(values(v)),
                    (None, Some(v), None) => Matcher::NotIn(values(v)),
                    (None, None, Some(v)) => Matcher::Prefix(values(v)),
                    _ => {
                        return Err(invalid(
                            key("where"),
                            "one of in, not_in or prefix (a list of values)",
                        ))
                    }
                };
                for &i in &inputs {
                    let src = &mut sources[i];
                    let field = FieldRef::parse(src.decoding, &w.field).map_err(|m| {
                        invalid(key("where.field"), format!("sources.{}: {m}", src.name))
                    })?;
                    src.filters.push(SourceFilter {
                        sink: sink_id,
                        field,
                        matcher: matcher.clone(),
                    });
                }
            }
            let b = k.batch.as_ref();
            let batch = BatchLimits {
                max_records: b
                    .and_then(|b| b.max_records)
                    .unwrap_or(BATCH_MAX_RECORDS_DEFAULT),
                max_bytes: b
                    .and_then(|b| b.max_bytes)
                    .unwrap_or(BATCH_MAX_BYTES_DEFAULT),
                linger_ms: b
                    .and_then(|b| b.linger_ms)
                    .unwrap_or(BATCH_LINGER_MS_DEFAULT),
            };
            if batch.max_records == 0 || batch.max_records > u32::MAX as usize {
                return Err(invalid(
                    key("batch.max_records"),
                    format!("must be between 1 and {}", u32::MAX),
                ));
            }
            if batch.linger_ms > BATCH_LINGER_MS_LIMIT {
                return Err(invalid(
                    key("batch.linger_ms"),
                    format!(
                        "must be at most {BATCH_LINGER_MS_LIMIT} (10 minutes), got {}",
                        batch.linger_ms
                    ),
                ));
            }
            if batch.max_bytes < 64 || batch.max_bytes > 256 * 1024 * 1024 {
                return Err(invalid(
                    key("batch.max_bytes"),
                    "must be between 64 bytes and 256 MiB",
                ));
            }
            let buf = k.buffer.as_ref();
            let kind = buf.and_then(|b| b.kind).unwrap_or_default();
            let buffer_max_bytes = buf.and_then(|b| b.max_bytes).unwrap_or(match kind {
                BufferKind::Memory => BUFFER_MAX_BYTES_DEFAULT,
                BufferKind::Disk => 4 * BUFFER_MAX_BYTES_DEFAULT,
            });
            let buffer_limit = match kind {
                BufferKind::Memory => MEMORY_BUFFER_MAX_BYTES_LIMIT,
                BufferKind::Disk => DISK_BUFFER_MAX_BYTES_LIMIT,
            };
            if buffer_max_bytes == 0 || buffer_max_bytes > buffer_limit {
                return Err(invalid(
                    key("buffer.max_bytes"),
                    format!(
                        "must be between 1 and {buffer_limit} ({} GiB) for a {} buffer, got {buffer_max_bytes}",
                        buffer_limit >> 30,
                        if kind == BufferKind::Memory { "memory" } else { "disk" }
                    ),
                ));
            }
            let sync_interval_ms = buf
                .and_then(|b| b.sync_interval_ms)
                .unwrap_or(SYNC_INTERVAL_MS_DEFAULT);
            if kind == BufferKind::Memory && buf.is_some_and(|b| b.sync_interval_ms.is_some()) {
                return Err(invalid(
                    key("buffer.sync_interval_ms"),
                    "only a disk buffer syncs; set buffer.type = \"disk\"",
                ));
            }
            if sync_interval_ms == 0 || sync_interval_ms > SYNC_INTERVAL_MS_LIMIT {
                return Err(invalid(
                    key("buffer.sync_interval_ms"),
                    format!(
                        "must be between 1 and {SYNC_INTERVAL_MS_LIMIT}, got {sync_interval_ms}"
                    ),
                ));
            }
            let per_shard = (buffer_max_bytes / shards) as u64;
            // A segment takes a few full batches and is a fraction of the cap,
            // so acknowledged segments can be deleted while new ones fill.
            let segment_bytes = (per_shard / 4).min(SEGMENT_BYTES_MAX);
            let frame_max = crate::wal::format::frame_bytes(batch.max_bytes * 2) as u64;
            if kind == BufferKind::Disk && segment_bytes < SEGMENT_BATCHES_MIN * frame_max {
                return Err(invalid(
                    key("buffer.max_bytes"),
                    format!(
                        "a disk buffer needs at least {} bytes for {shards} shard(s) and batch.max_bytes = {} (8 full batches per shard)",
                        4 * SEGMENT_BATCHES_MIN * frame_max * shards as u64,
                        batch.max_bytes
                    ),
                ));
            }
            // A memory buffer is split evenly over the shards and counted in
            // whole batches; at least two per shard so one can fill while one
            // is sent. A disk buffer's queue only feeds its writer.
            let queue_batches = match kind {
                BufferKind::Memory => (buffer_max_bytes / shards / batch.max_bytes).max(2),
                BufferKind::Disk => 4,
            };
            let headroom_percent = buf
                .and_then(|b| b.headroom_percent)
                .unwrap_or(HEADROOM_PERCENT_DEFAULT);
            if headroom_percent > HEADROOM_PERCENT_LIMIT {
                return Err(invalid(
                    key("buffer.headroom_percent"),
                    format!(
                        "must be between 0 and {HEADROOM_PERCENT_LIMIT}, got {headroom_percent}"
                    ),
                ));
            }
            // At least one batch of headroom when any is asked for, and at
            // least one batch that waiting sources may fill.
            let headroom = match headroom_percent {
                0 => 0,
                p => ((queue_batches as u64 * p / 100) as usize).max(1),
            };
            let write_when = buf.and_then(|b| b.write_when).unwrap_or_default();
            if kind == BufferKind::Memory && buf.is_some_and(|b| b.write_when.is_some()) {
                return Err(invalid(
                    key("buffer.write_when"),
                    "is for disk buffers (buffer.type = \"disk\")",
                ));
            }
            if write_when != WriteWhen::Behind && buf.is_some_and(|b| b.memory_bytes.is_some()) {
                return Err(invalid(
                    key("buffer.memory_bytes"),
                    "is for disk buffers with write_when = \"behind\"",
                ));
            }
            // Two full batches' frames per shard at least, so one can wait
            // while one is sent.
            let memory_min = 2 * crate::wal::format::frame_bytes(batch.max_bytes * 2) * shards;
            let memory_bytes = buf
                .and_then(|b| b.memory_bytes)
                .unwrap_or(MEMORY_BYTES_DEFAULT.max(memory_min));
            if write_when == WriteWhen::Behind
                && (memory_bytes < memory_min || memory_bytes > MEMORY_BYTES_LIMIT)
            {
                return Err(invalid(
                    key("buffer.memory_bytes"),
                    format!(
                        "must be between {memory_min} (two full batches per shard) and {MEMORY_BYTES_LIMIT}, got {memory_bytes}"
                    ),
                ));
            }
            if kind == BufferKind::Memory && buf.is_some_and(|b| b.replay_share.is_some()) {
                return Err(invalid(
                    key("buffer.replay_share"),
                    "is for disk buffers (a memory buffer has no backlog to replay)",
                ));
            }
            // A far end that takes batches only in id order gets them so.
            let in_order = target.in_id_order();
            if in_order && buf.is_some_and(|b| b.replay_share.is_some_and(|s| s != 1.0)) {
                return Err(invalid(
                    key("buffer.replay_share"),
                    format!(
                        "a {} sink takes batches in order only (its far end drops one older than the last it took): leave it at 1",
                        target.kind()
                    ),
                ));
            }
            if in_order && write_when == WriteWhen::Behind {
                return Err(invalid(
                    key("buffer.write_when"),
                    format!(
                        "a {} sink takes batches in order only, so its disk buffer writes always",
                        target.kind()
                    ),
                ));
            }
            let share = buf.and_then(|b| b.replay_share).unwrap_or(if in_order {
                1.0
            } else {
                REPLAY_SHARE_DEFAULT
            });
            if !(share > 0.0 && share <= 1.0) {
                return Err(invalid(
                    key("buffer.replay_share"),
                    format!("must be more than 0 and at most 1, got {share}"),
                ));
            }
            let replay_share = ((share * 1000.0).round() as u16).max(1);
            let buffer = BufferPlan {
                kind,
                when_full: buf.and_then(|b| b.when_full).unwrap_or_default(),
                max_bytes: buffer_max_bytes,
                sync_interval_ms,
                sync_bytes: SYNC_BYTES,
                segment_bytes,
                dir: data_dir.join(name),
                write_when,
                memory_bytes,
                replay_share,
            };
            let r = k.retry.as_ref();
            let retry = RetryPlan {
                initial_backoff_ms: r
                    .and_then(|r| r.initial_backoff_ms)
                    .unwrap_or(RETRY_INITIAL_BACKOFF_MS_DEFAULT)
                    .max(1),
                max_backoff_ms: r
                    .and_then(|r| r.max_backoff_ms)
                    .unwrap_or(RETRY_MAX_BACKOFF_MS_DEFAULT),
            };
            if retry.max_backoff_ms > RETRY_BACKOFF_MS_LIMIT {
                return Err(invalid(
                    key("retry.max_backoff_ms"),
                    format!("must be at most {RETRY_BACKOFF_MS_LIMIT} (1 h)"),
                ));
            }
            if retry.max_backoff_ms < retry.initial_backoff_ms {
                return Err(invalid(
                    key("retry.max_backoff_ms"),
                    "must be at least retry.initial_backoff_ms",
                ));
            }
            let rate = match &k.rate_limit {
                None => None,
                Some(r) => {
                    let per_sec = r.bytes_per_sec.ok_or_else(|| {
                        invalid(
                            key("rate_limit.bytes_per_sec"),
                            "a sink's rate_limit needs bytes_per_sec",
                        )
                    })?;
                    if !(SINK_RATE_MIN..=SINK_RATE_MAX).contains(&per_sec) {
                        return Err(invalid(
                            key("rate_limit.bytes_per_sec"),
                            format!("must be between {SINK_RATE_MIN} and {SINK_RATE_MAX}, got {per_sec}"),
                        ));
                    }
                    // 100 ms worth by default.
                    let burst = r.burst_bytes.unwrap_or(per_sec / 10);
                    if burst > per_sec.saturating_mul(60) {
                        return Err(invalid(
                            key("rate_limit.burst_bytes"),
                            format!(
                                "must be at most a minute's worth ({}), got {burst}",
                                per_sec.saturating_mul(60)
                            ),
                        ));
                    }
                    Some(Arc::new(crate::limiter::ByteRate::new(per_sec, burst)))
                }
            };
            // drop_newest, drop_oldest: nobody waits, so no headroom is kept
            // for those that cannot.
            let nobody_waits = kind == BufferKind::Memory && buffer.when_full != WhenFull::Block;
            let marks = admission_marks(&sources, &inputs, queue_batches, headroom, nobody_waits);
            sinks.push(SinkPlan {
                name: name.clone(),
                target,
                inputs,
                batch,
                queue_batches,
                marks,
                buffer,
                retry,
                rate,
                removed: false,
            });
        }
        for s in &sources {
            if s.sinks.is_empty() {
                tracing::warn!(source = %s.name, "no sink lists this source in its inputs; its records are counted and dropped");
            }
        }

        let shutdown_timeout_ms = file
            .shutdown_timeout_ms
            .unwrap_or(SHUTDOWN_TIMEOUT_MS_DEFAULT);
        if shutdown_timeout_ms > SHUTDOWN_TIMEOUT_MS_LIMIT {
            return Err(invalid(
                "shutdown_timeout_ms",
                format!("must be at most {SHUTDOWN_TIMEOUT_MS_LIMIT} (1 h)"),
            ));
        }
        let plan = Plan {
            shards,
            io: file.io.unwrap_or_default(),
            data_dir,
            shutdown_timeout_ms,
            metrics_address,
            sources,
            sinks,
        };
        plan.check_paths()?;
        Ok(plan)
    }

    /// Whether anything writes under `data_dir` (a disk buffer, the http
    /// sink's dead letters): then one collector locks it at start.
    pub fn uses_data_dir(&self) -> bool {
        self.sinks
            .iter()
            .any(|s| s.buffer.kind == BufferKind::Disk || s.target.uses_data_dir())
            || self.sources.iter().any(|s| s.kind == SourceKind::File)
    }

    /// Checks what can be checked before start of the paths the collector
    /// writes: `data_dir` (when used) and each disk buffer's directories
    /// exist as writable directories or can be created, and each file
    /// sink's path is a writable file or can be created in a writable
    /// directory (a directory that does not exist yet is allowed: the file
    /// sink retries until it appears, and says so).
    pub fn check_paths(&self) -> Result<(), ConfigError> {
        if self.uses_data_dir() {
            writable_dir("data_dir", &self.data_dir)?;
        }
        for s in &self.sinks {
            let key = |x: &str| format!("sinks.{}.{x}", s.name);
            if s.buffer.kind == BufferKind::Disk {
                writable_dir(&key("buffer"), &s.buffer.dir)?;
                for k in 0..self.shards {
                    writable_dir(&key("buffer"), &s.buffer.dir.join(k.to_string()))?;
                }
            }
            s.target.check(&PlanCx {
                name: &s.name,
                data_dir: &self.data_dir,
            })?;
        }
        Ok(())
    }

    /// The largest record any source accepts: the size a batch's payload must
    /// be able to take in one piece.
    pub fn max_record_bytes(&self) -> usize {
        self.sources
            .iter()
            .map(|s| s.max_record_bytes)
            .max()
            .unwrap_or(MAX_RECORD_BYTES_DEFAULT)
    }
}

/// `path` is a directory this process may write in, or does not exist and
/// its nearest existing ancestor is one (so it can be created).
/// Admission by priority: for each source (by id), how many sealed batches
/// of a sink's queue (`capacity` of them) it may find waiting and still add
/// records. A source ranks by its `priority`, then, at equal priority, those
/// that cannot wait (udp) above those that can (tcp, mqtt, updraft); when
/// nobody waits (`drop_newest`, `drop_oldest`) by priority alone. The top
/// rank may fill the whole queue; each rank below is held back (or, if it
/// cannot wait, dropped) one `headroom` earlier than the rank above it, and
/// sources that can wait never take the top priority's last `headroom`
/// (kept for a source that cannot wait at that priority). Strict priority,
/// then: while a sink is behind, a lower rank gets only what the higher
/// ones leave. Marks stop at one batch, so a queue of few batches, or no
/// headroom at all, tells fewer ranks apart.
fn admission_marks(
    sources: &[SourcePlan],
    inputs: &[usize],
    capacity: usize,
    headroom: usize,
    nobody_waits: bool,
) -> Vec<usize> {
    let rank = |s: &SourcePlan| (s.priority, nobody_waits || !s.can_wait);
    let mut ranks: Vec<(u8, bool)> = inputs.iter().map(|&i| rank(&sources[i])).collect();
    if let Some(top) = inputs.iter().map(|&i| sources[i].priority).max() {
        ranks.push((top, true));
    }
    ranks.sort_unstable();
    ranks.dedup();
    sources
        .iter()
        .map(|s| {
            let r = rank(s);
            let above = ranks.iter().filter(|&&x| x > r).count();
            capacity.saturating_sub(headroom * above).max(1)
        })
        .collect()
}

fn writable_dir(key: &str, path: &Path) -> Result<(), ConfigError> {
    let mut p = path;
    loop {
        match std::fs::metadata(p) {
            Ok(m) if m.is_dir() => return may_write(key, p),
            Ok(_) if p == path => {
                return Err(invalid(
                    key,
                    format!("{} exists and is not a directory", p.display()),
                ))
            }
            Ok(_) => {
                return Err(invalid(
                    key,
                    format!(
                        "cannot create {}: {} is not a directory",
                        path.display(),
                        p.display()
                    ),
                ))
            }
            Err(_) => match p.parent() {
                Some(parent) if !parent.as_os_str().is_empty() => p = parent,
                _ => return may_write(key, Path::new(".")),
            },
        }
    }
}

/// `access(2)`: whether this process may write `path` (a read-only file
/// system, a directory or file it has no write permission on).
pub fn may_write(key: &str, path: &Path) -> Result<(), ConfigError> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| invalid(key, format!("{} contains a NUL byte", path.display())))?;
    // SAFETY: access(2) reads a NUL-terminated path that outlives the call.
    if unsafe { libc::access(c.as_ptr(), libc::W_OK) } != 0 {
        let e = std::io::Error::last_os_error();
        return Err(invalid(
            key,
            format!("{} is not writable: {e}", path.display()),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
shards = 2
data_dir = "./data"
[metrics]
address = "127.0.0.1:9598"
[sources.app]
type = "tcp"
address = "127.0.0.1:5140"
framing = "newline"
partition_by = "none"
max_record_bytes = 65536
[sinks.up]
type = "tcp"
inputs = ["app"]
address = "127.0.0.1:16000"
[sinks.up.batch]
max_records = 1000
linger_ms = 5
"#;

    #[test]
    fn priorities_hold_lower_ranks_back_one_headroom_earlier() {
        let cfg = |extra: &str, when_full: &str| {
            format!(
                r#"shards = 1
[sources.alarms]
type = "udp"
address = "127.0.0.1:5141"
priority = 7
[sources.app]
type = "tcp"
address = "127.0.0.1:5140"
[sources.debug]
type = "udp"
address = "127.0.0.1:5142"
{extra}
[sinks.up]
type = "tcp"
inputs = ["alarms", "app", "debug"]
address = "127.0.0.1:16000"
buffer = {{ max_bytes = 16777216, when_full = "{when_full}" }}
batch = {{ max_bytes = 1048576 }}
"#
            )
        };
        // 16 batches, 4 of headroom. Ranks: alarms (7, udp), debug (0, udp),
        // app (0, tcp).
        let plan = Plan::from_toml(&cfg("", "block")).unwrap();
        let by = |plan: &Plan, n: &str| {
            let i = plan.sources.iter().position(|s| s.name == n).unwrap();
            plan.sinks[0].marks[i]
        };
        assert_eq!(plan.sinks[0].queue_batches, 16);
        assert_eq!(
            (by(&plan, "alarms"), by(&plan, "debug"), by(&plan, "app")),
            (16, 12, 8)
        );
        // A top priority that can wait keeps its last headroom for one that
        // cannot: the tcp source first (12 batches), the udp ones below.
        let plan = Plan::from_toml(&cfg("", "block").replace(
            "address = \"127.0.0.1:5140\"",
            "address = \"127.0.0.1:5140\"\npriority = 9",
        ))
        .unwrap();
        assert_eq!(
            (by(&plan, "app"), by(&plan, "alarms"), by(&plan, "debug")),
            (12, 8, 4)
        );
        // Nobody waits: by priority alone.
        let plan = Plan::from_toml(&cfg("", "drop_newest")).unwrap();
        assert_eq!(
            (by(&plan, "alarms"), by(&plan, "debug"), by(&plan, "app")),
            (16, 12, 12)
        );
        // Equal priorities: today's rule (tcp held back one headroom early).
        let plan = Plan::from_toml(&cfg("", "block").replace("priority = 7", "")).unwrap();
        assert_eq!(
            (by(&plan, "alarms"), by(&plan, "debug"), by(&plan, "app")),
            (16, 16, 12)
        );
        let err = Plan::from_toml(&cfg("priority = 300", "block")).unwrap_err();
        assert!(err.to_string().contains("priority"), "{err}");
    }

    #[test]
    fn disk_buffer_keys_for_a_slow_uplink_are_checked() {
        let cfg = |buffer: &str| {
            format!(
                r#"shards = 2
data_dir = "/tmp"
[sources.app]
type = "tcp"
address = "127.0.0.1:5140"
[sinks.up]
type = "tcp"
inputs = ["app"]
address = "127.0.0.1:16000"
[sinks.up.buffer]
{buffer}
"#
            )
        };
        let plan = Plan::from_toml(&cfg("type = \"disk\"\nwrite_when = \"behind\"")).unwrap();
        let b = &plan.sinks[0].buffer;
        assert_eq!(b.write_when, WriteWhen::Behind);
        // Two full batches per shard at least (a batch's frame is a little
        // more than batch.max_bytes).
        assert!(b.memory_bytes >= 8 << 20, "{}", b.memory_bytes);
        assert_eq!(b.replay_share, 500);
        let plan = Plan::from_toml(&cfg("type = \"disk\"\nreplay_share = 1.0")).unwrap();
        assert_eq!(plan.sinks[0].buffer.replay_share, 1000);
        for (buffer, key) in [
            ("write_when = \"behind\"", "sinks.up.buffer.write_when"),
            (
                "type = \"disk\"\nmemory_bytes = 4194304",
                "sinks.up.buffer.memory_bytes",
            ),
            (
                "type = \"disk\"\nwrite_when = \"behind\"\nmemory_bytes = 1024",
                "sinks.up.buffer.memory_bytes",
            ),
            (
                "type = \"disk\"\nreplay_share = 0.0",
                "sinks.up.buffer.replay_share",
            ),
            (
                "type = \"disk\"\nreplay_share = 1.5",
                "sinks.up.buffer.replay_share",
            ),
            ("replay_share = 0.5", "sinks.up.buffer.replay_share"),
        ] {
            let err = Plan::from_toml(&cfg(buffer)).unwrap_err().to_string();
            assert!(err.contains(key), "{buffer}: {err}");
        }
        // An updraft sink's aggregator takes frames in id order only.
        let native = |buffer: &str| {
            cfg(buffer)
                .replace("type = \"tcp\"\ninputs", "type = \"updraft\"\ninputs")
                .replace(
                    "address = \"127.0.0.1:16000\"",
                    "url = \"updraft://127.0.0.1:16000\"",
                )
        };
        let plan = Plan::from_toml(&native("type = \"disk\"")).unwrap();
        assert_eq!(plan.sinks[0].buffer.replay_share, 1000);
        for (buffer, key) in [
            (
                "type = \"disk\"\nreplay_share = 0.5",
                "sinks.up.buffer.replay_share",
            ),
            (
                "type = \"disk\"\nwrite_when = \"behind\"",
                "sinks.up.buffer.write_when",
            ),
        ] {
            let err = Plan::from_toml(&native(buffer)).unwrap_err().to_string();
            assert!(err.contains(key), "{buffer}: {err}");
        }
    }

    #[test]
    fn contract_keys_parse() {
        let plan = Plan::from_toml(GOOD).unwrap();
        assert_eq!(plan.shards, 2);
        assert_eq!(plan.sources[0].sinks, vec![0]);
        assert_eq!(plan.sinks[0].batch.max_records, 1000);
        assert_eq!(plan.sinks[0].inputs, vec![0]);
    }

    #[test]
    fn unknown_key_is_named() {
        let text = GOOD.replace("max_records = 1000", "max_recordz = 1000");
        let err = Plan::from_toml(&text).unwrap_err().to_string();
        assert!(err.contains("sinks.up.batch"), "{err}");
        assert!(err.contains("max_recordz"), "{err}");
    }

    #[test]
    fn bad_address_is_named() {
        let text = GOOD.replace("127.0.0.1:5140", "localhost");
        let err = Plan::from_toml(&text).unwrap_err().to_string();
        assert!(err.starts_with("sources.app.address"), "{err}");
    }

    #[test]
    fn input_naming_no_source_is_named() {
        let text = GOOD.replace("inputs = [\"app\"]", "inputs = [\"nope\"]");
        let err = Plan::from_toml(&text).unwrap_err().to_string();
        assert!(err.starts_with("sinks.up.inputs"), "{err}");
        assert!(err.contains("nope"), "{err}");
    }

    #[test]
    fn udp_takes_only_datagram_framing() {
        let text = GOOD.replace(
            "type = \"tcp\"\naddress = \"127.0.0.1:5140\"",
            "type = \"udp\"\naddress = \"127.0.0.1:5140\"",
        );
        let err = Plan::from_toml(&text).unwrap_err().to_string();
        assert!(err.starts_with("sources.app.framing"), "{err}");
    }
}
