//! `updraft-loadgen`: the yardstick every throughput, loss and latency claim
//! about updraft is measured with.
//!
//! `send` writes records over TCP or UDP, flat out or paced (quanta), over N
//! connections; every record carries its stream id, a sequence number and a
//! send timestamp in plain text:
//!
//! ```text
//! stream=3 seq=000000012345 ts=1732240000123456789 xxxxxxxx…\n
//! ```
//!
//! Payloads are built once per connection into a large block; only the
//! sequence numbers and timestamps are patched in place before each write, so
//! the generator is not what it measures. UDP goes out with `sendmmsg`.
//!
//! `receive` is a TCP (or UDP) sink that counts records, checks per stream
//! that every sequence number arrived exactly once (lost, duplicated,
//! reordered) and records end-to-end latency in an HDR histogram. It can
//! also play an upstream that restarts gracefully (`--pause-after`), closing
//! its side, draining what was sent, refusing connections for a while.
//! With `--proto http` it is an ingest endpoint (see [`http`]): the same
//! verification, plus the latency, capacity, failures and outages of a real
//! one.

mod http;
mod mqtt;
mod nats;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use hdrhistogram::Histogram;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "updraft-loadgen",
    version,
    about = "Load generator and verifying receiver for updraft"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum, Debug)]
enum Proto {
    Tcp,
    Udp,
    /// `receive` only: an HTTP(S) ingest endpoint.
    Http,
    /// `send`: publish to the broker at `--target`; `receive`: subscribe
    /// at the broker at `--listen`.
    Mqtt,
    /// `send` only: publish to the NATS server at `--target` (JetStream
    /// unless `--nats-core`).
    Nats,
}

/// The shape of a record around its `stream=S seq=N ts=T` (which the
/// receiver finds wherever it is).
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum, Debug)]
enum RecordFormat {
    /// `stream=S seq=N ts=T xxx…`
    Raw,
    /// An RFC 5424 message: `<PRI>1 TIMESTAMP gwS appS - - - stream=S …`,
    /// facility 2, severity the sequence number modulo 8 (PRI 16..=23).
    Syslog,
    /// InfluxDB line protocol: `lg,device=dNNNNNN stream=NNNNNN,seq=N,ts=T,pad="xxx…"`.
    Influx,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum, Debug)]
enum Framing {
    Newline,
    OctetCounting,
    LengthPrefixed,
}

#[derive(Subcommand)]
enum Command {
    /// Send records to a collector.
    Send(SendArgs),
    /// Receive records, verify them and measure latency.
    Receive(Box<ReceiveArgs>),
    /// The simplest forwarder, the ceiling a collector is measured against:
    /// each TCP connection's bytes copied to its own upstream connection with
    /// large buffers (or, with --proto udp, datagrams appended as lines to
    /// one upstream connection). No framing, no batching.
    Relay(RelayArgs),
}

#[derive(clap::Args)]
struct RelayArgs {
    /// Address to listen on (IP:PORT).
    #[arg(long)]
    listen: SocketAddr,
    /// Upstream TCP address (IP:PORT).
    #[arg(long)]
    target: SocketAddr,
    /// What to listen for.
    #[arg(long, value_enum, default_value = "tcp")]
    proto: Proto,
}

#[derive(clap::Args)]
struct SendArgs {
    /// Address to send to (IP:PORT).
    #[arg(long)]
    target: SocketAddr,
    #[arg(long, value_enum, default_value = "tcp")]
    proto: Proto,
    /// Connections (TCP) or sockets (UDP), each its own stream and thread.
    #[arg(long, default_value_t = 1)]
    connections: usize,
    /// Records in total over all connections.
    #[arg(long)]
    count: u64,
    /// Bytes per record, newline included.
    #[arg(long, default_value_t = 256)]
    size: usize,
    /// Records per second in total; flat out without it.
    #[arg(long)]
    rate: Option<u64>,
    /// How TCP records are framed.
    #[arg(long, value_enum, default_value = "newline")]
    framing: Framing,
    /// Id of the first connection's stream (the next get the following ids).
    #[arg(long, default_value_t = 0)]
    stream_base: u64,
    /// What a record looks like around its stream, seq and ts (tcp, udp).
    #[arg(long, value_enum, default_value = "raw")]
    format: RecordFormat,
    /// `--format influx`: records of this many devices, each its own
    /// stream (its id is the device number, in the `device` tag): connection
    /// c sends for devices c, c + connections, ..., in turn, so that each
    /// device's records go over one connection, in order.
    #[arg(long)]
    devices: Option<u64>,
    /// `--proto mqtt`: the topic each connection publishes to (`{stream}`
    /// is its stream id).
    #[arg(long, default_value = "sensors/{stream}")]
    topic: String,
    /// `--proto mqtt`: QoS 0 or 1.
    #[arg(long, default_value_t = 1)]
    qos: u8,
    /// `--proto mqtt`: "3.1.1" or "5".
    #[arg(long, default_value = "3.1.1")]
    mqtt_version: String,
    /// `--proto nats`: core NATS (plain PUB, no acknowledgements) instead
    /// of JetStream.
    #[arg(long)]
    nats_core: bool,
    /// Print a JSON summary on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct ReceiveArgs {
    /// Address to listen on (IP:PORT).
    #[arg(long)]
    listen: SocketAddr,
    #[arg(long, value_enum, default_value = "tcp")]
    proto: Proto,
    /// Stop once this many distinct records arrived; exit non-zero if they
    /// did not within the timeout.
    #[arg(long)]
    expect: Option<u64>,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 60.0)]
    timeout_s: f64,
    /// Stop once records arrived and then none for this many seconds (for
    /// a sender whose count that arrives is not known: drops upstream).
    #[arg(long)]
    idle_s: Option<f64>,
    /// After --expect is met, wait this long for late duplicates.
    #[arg(long, default_value_t = 200)]
    linger_ms: u64,
    /// Play a graceful upstream restart once this many records arrived:
    /// close our side of every connection, drain them, refuse new ones.
    #[arg(long)]
    pause_after: Option<u64>,
    /// How long the restart refuses connections.
    #[arg(long, default_value_t = 3.0)]
    pause_s: f64,
    /// Play a slow upstream: read at most this many bytes per second per
    /// connection.
    #[arg(long)]
    read_bytes_per_sec: Option<u64>,
    /// Play an upstream that stalls once: every connection stops reading
    /// for --stall-s once this many records arrived (TCP).
    #[arg(long)]
    stall_after: Option<u64>,
    /// How long the stall lasts.
    #[arg(long, default_value_t = 2.0)]
    stall_s: f64,
    #[command(flatten)]
    http: http::HttpArgs,
    #[command(flatten)]
    mqtt: mqtt::MqttArgs,
    /// Print a JSON summary on stdout.
    #[arg(long)]
    json: bool,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Send(a) => send(a),
        Command::Relay(a) => relay(a),
        Command::Receive(a) => {
            let ok = receive(*a)?;
            if !ok {
                std::process::exit(1);
            }
            Ok(())
        }
    }
}

fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------
// Record layout.

const SEQ_DIGITS: usize = 12;
const TS_DIGITS: usize = 19;

/// Writes `v` as exactly `out.len()` decimal digits, zero-padded.
#[inline]
fn put_digits(out: &mut [u8], mut v: u64) {
    for b in out.iter_mut().rev() {
        *b = b'0' + (v % 10) as u8;
        v /= 10;
    }
}

/// One connection's records, built once and patched in place.
struct Block {
    bytes: Vec<u8>,
    frame: usize,
    seq_at: usize,
    ts_at: usize,
    records: usize,
    /// `--devices`: where the device number is written (twice: the tag and
    /// the stream), and which devices this connection sends for.
    devices: Option<Devices>,
    /// `--format syslog`: where the PRI's two digits are.
    pri_at: Option<usize>,
}

/// The devices one connection sends for: `first`, `first + step`, … (`count`
/// of them), in turn.
#[derive(Clone, Copy, Debug)]
struct Devices {
    first: u64,
    step: u64,
    count: u64,
    tag_at: usize,
    stream_at: usize,
}

const DEVICE_DIGITS: usize = 6;

impl Block {
    fn new(stream: u64, size: usize, framing: Framing, records: usize) -> Result<Block> {
        Block::shaped(stream, size, framing, records, RecordFormat::Raw, None)
    }

    /// `devices`: (first, step, count) of this connection's devices.
    fn shaped(
        stream: u64,
        size: usize,
        framing: Framing,
        records: usize,
        format: RecordFormat,
        devices: Option<(u64, u64, u64)>,
    ) -> Result<Block> {
        let seq = "0".repeat(SEQ_DIGITS);
        let ts = "0".repeat(TS_DIGITS);
        let dev = "0".repeat(DEVICE_DIGITS);
        let (head, tail) = match format {
            RecordFormat::Raw => (format!("stream={stream} seq={seq} ts={ts} "), ""),
            RecordFormat::Syslog => (
                format!("<16>1 2026-12-03T12:00:00.000Z gw{stream} app{stream} - - - stream={stream} seq={seq} ts={ts} "),
                "",
            ),
            RecordFormat::Influx if devices.is_some() => (
                format!("lg,device=d{dev} stream={dev},seq={seq},ts={ts},pad=\""),
                "\"",
            ),
            RecordFormat::Influx => (
                format!("lg,device=d{stream} stream={stream},seq={seq},ts={ts},pad=\""),
                "\"",
            ),
        };
        if size < head.len() + tail.len() + 1 {
            bail!(
                "--size {size} is too small: a record needs at least {} bytes",
                head.len() + tail.len() + 1
            );
        }
        // The record without its newline, then the frame around it.
        let mut record = head.clone().into_bytes();
        record.resize(size - 1 - tail.len(), b'x');
        record.extend_from_slice(tail.as_bytes());
        let (prefix, suffix): (Vec<u8>, &[u8]) = match framing {
            Framing::Newline => (Vec::new(), b"\n"),
            Framing::OctetCounting => (format!("{} ", record.len()).into_bytes(), b""),
            Framing::LengthPrefixed => ((record.len() as u32).to_be_bytes().to_vec(), b""),
        };
        let frame = prefix.len() + record.len() + suffix.len();
        let mut bytes = Vec::with_capacity(frame * records);
        for _ in 0..records {
            bytes.extend_from_slice(&prefix);
            bytes.extend_from_slice(&record);
            bytes.extend_from_slice(suffix);
        }
        let after = |pat: &str| prefix.len() + head.find(pat).expect("in head") + pat.len();
        let (seq_at, ts_at) = match format {
            RecordFormat::Influx => (after(",seq="), after(",ts=")),
            _ => (after(" seq="), after(" ts=")),
        };
        let devices = devices.map(|(first, step, count)| Devices {
            first,
            step,
            count: count.max(1),
            tag_at: after("device=d"),
            stream_at: after(" stream="),
        });
        let pri_at = (format == RecordFormat::Syslog).then_some(prefix.len() + 1);
        Ok(Block {
            bytes,
            frame,
            seq_at,
            ts_at,
            records,
            devices,
            pri_at,
        })
    }

    /// Patches the first `n` records with sequence numbers from `first` and
    /// the send time `ts`; returns the bytes to write. With devices, record
    /// `first + i` is for device `(first + i) % count` of this connection's,
    /// and its sequence number is that device's (`(first + i) / count`).
    fn fill(&mut self, first: u64, n: usize, ts: u64) -> &[u8] {
        debug_assert!(n <= self.records);
        let mut ts_digits = [0u8; TS_DIGITS];
        put_digits(&mut ts_digits, ts);
        for i in 0..n {
            let base = i * self.frame;
            let k = first + i as u64;
            let seq = match self.devices {
                None => k,
                Some(d) => {
                    let device = d.first + (k % d.count) * d.step;
                    for at in [d.tag_at, d.stream_at] {
                        put_digits(
                            &mut self.bytes[base + at..base + at + DEVICE_DIGITS],
                            device,
                        );
                    }
                    k / d.count
                }
            };
            put_digits(
                &mut self.bytes[base + self.seq_at..base + self.seq_at + SEQ_DIGITS],
                seq,
            );
            if let Some(at) = self.pri_at {
                put_digits(&mut self.bytes[base + at..base + at + 2], 16 + seq % 8);
            }
            self.bytes[base + self.ts_at..base + self.ts_at + TS_DIGITS]
                .copy_from_slice(&ts_digits);
        }
        &self.bytes[..n * self.frame]
    }
}

/// Parses `stream=S seq=N ts=T ...` (or `stream=S,seq=N,ts=T`), at the
/// start of the record or after other fields (`--format`).
fn parse_record(line: &[u8]) -> Option<(u64, u64, u64)> {
    fn digits(b: &[u8]) -> Option<(u64, &[u8])> {
        let n = b.iter().take_while(|c| c.is_ascii_digit()).count();
        if n == 0 || n > 19 {
            return None;
        }
        let mut v: u64 = 0;
        for &c in &b[..n] {
            v = v * 10 + (c - b'0') as u64;
        }
        Some((v, &b[n..]))
    }
    let rest = match line.strip_prefix(b"stream=") {
        Some(r) => r,
        None => {
            let at = line
                .windows(8)
                .position(|w| &w[1..] == b"stream=" && (w[0] == b' ' || w[0] == b','))?;
            &line[at + 8..]
        }
    };
    let (stream, rest) = digits(rest)?;
    let rest = rest
        .strip_prefix(b" seq=")
        .or_else(|| rest.strip_prefix(b",seq="))?;
    let (seq, rest) = digits(rest)?;
    let rest = rest
        .strip_prefix(b" ts=")
        .or_else(|| rest.strip_prefix(b",ts="))?;
    let (ts, _) = digits(rest)?;
    Some((stream, seq, ts))
}

// ---------------------------------------------------------------------------
// send

#[derive(Serialize)]
struct SendSummary {
    sent: u64,
    seconds: f64,
    records_per_sec: f64,
    mib_per_sec: f64,
}

/// Bytes written per call when flat out.
const SEND_BLOCK_BYTES: usize = 256 * 1024;
/// Datagrams per sendmmsg call.
const UDP_BATCH: usize = 64;

/// Waits until `done` records may have been sent at `rate` per second.
fn pace(start: quanta::Instant, done: u64, rate: f64) {
    let due = Duration::from_secs_f64(done as f64 / rate);
    loop {
        let elapsed = quanta::Instant::now().duration_since(start);
        if elapsed >= due {
            return;
        }
        let left = due - elapsed;
        if left > Duration::from_micros(500) {
            std::thread::sleep(left - Duration::from_micros(200));
        } else {
            std::hint::spin_loop();
        }
    }
}

fn send(a: SendArgs) -> Result<()> {
    if a.connections == 0 {
        bail!("--connections must be at least 1");
    }
    if a.devices.is_some() && a.format != RecordFormat::Influx {
        bail!("--devices needs --format influx");
    }
    if a.devices
        .is_some_and(|d| d < a.connections as u64 || d > 999_999)
    {
        bail!("--devices must be at least --connections and at most 999999");
    }
    let progress = Arc::new(AtomicU64::new(0));
    let bar = indicatif::ProgressBar::new(a.count);
    bar.set_style(
        indicatif::ProgressStyle::with_template("send {bar:40} {pos}/{len} {per_sec} {elapsed}")
            .expect("valid template"),
    );
    let start = Instant::now();
    let mut threads = Vec::new();
    for c in 0..a.connections {
        let count =
            a.count / a.connections as u64 + u64::from((c as u64) < a.count % a.connections as u64);
        let rate = a.rate.map(|r| r as f64 / a.connections as f64);
        let stream = a.stream_base + c as u64;
        let (target, size, framing, proto) = (a.target, a.size, a.framing, a.proto);
        let conns = a.connections as u64;
        let shape = Shape {
            format: a.format,
            // Connection c: devices c, c + conns, ... below the total.
            devices: a.devices.map(|d| {
                (
                    c as u64,
                    conns,
                    d / conns + u64::from((c as u64) < d % conns),
                )
            }),
        };
        let progress = progress.clone();
        let pubs = mqtt::Publisher {
            topic: a.topic.replace("{stream}", &stream.to_string()),
            qos: a.qos,
            version: a.mqtt_version.clone(),
            shape,
        };
        let nats_pub = nats::Publisher {
            subject: a.topic.replace("{stream}", &stream.to_string()),
            jetstream: !a.nats_core,
        };
        threads.push(std::thread::spawn(move || -> Result<()> {
            match proto {
                Proto::Tcp => {
                    send_tcp(target, stream, count, size, framing, shape, rate, &progress)
                }
                Proto::Udp => send_udp(target, stream, count, size, shape, rate, &progress),
                Proto::Mqtt => pubs.send(target, stream, count, size, rate, &progress),
                Proto::Nats => nats_pub.send(target, stream, count, size, rate, &progress),
                Proto::Http => bail!("send speaks tcp, udp, mqtt or nats; http is for receive"),
            }
        }));
    }
    let mut failed = None;
    loop {
        let done = threads.iter().all(|t| t.is_finished());
        bar.set_position(progress.load(Relaxed));
        if done {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    for t in threads {
        if let Err(e) = t.join().expect("sender thread panicked") {
            failed.get_or_insert(e);
        }
    }
    bar.finish_and_clear();
    let seconds = start.elapsed().as_secs_f64();
    let sent = progress.load(Relaxed);
    let summary = SendSummary {
        sent,
        seconds,
        records_per_sec: sent as f64 / seconds,
        mib_per_sec: (sent as f64 * a.size as f64) / seconds / (1024.0 * 1024.0),
    };
    if a.json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        eprintln!(
            "sent {} records in {:.3} s: {:.0} records/s, {:.1} MiB/s",
            summary.sent, summary.seconds, summary.records_per_sec, summary.mib_per_sec
        );
    }
    if let Some(e) = failed {
        return Err(e);
    }
    Ok(())
}

/// What a connection's records look like (`--format`, `--devices`).
#[derive(Clone, Copy)]
pub struct Shape {
    format: RecordFormat,
    devices: Option<(u64, u64, u64)>,
}

#[allow(clippy::too_many_arguments)]
fn send_tcp(
    target: SocketAddr,
    stream_id: u64,
    count: u64,
    size: usize,
    framing: Framing,
    shape: Shape,
    rate: Option<f64>,
    progress: &AtomicU64,
) -> Result<()> {
    let per_block = match rate {
        // About a millisecond of records per write when paced.
        Some(r) => ((r / 1000.0) as usize).clamp(1, (SEND_BLOCK_BYTES / size).max(1)),
        None => (SEND_BLOCK_BYTES / size).max(1),
    };
    let mut block = Block::shaped(
        stream_id,
        size,
        framing,
        per_block,
        shape.format,
        shape.devices,
    )?;
    let mut conn = TcpStream::connect(target).with_context(|| format!("connect to {target}"))?;
    let start = quanta::Instant::now();
    let mut sent = 0u64;
    while sent < count {
        if let Some(r) = rate {
            pace(start, sent, r);
        }
        let n = ((count - sent) as usize).min(per_block);
        let bytes = block.fill(sent, n, unix_ns());
        conn.write_all(bytes)
            .with_context(|| format!("write to {target}"))?;
        sent += n as u64;
        progress.fetch_add(n as u64, Relaxed);
    }
    conn.flush()?;
    conn.shutdown(Shutdown::Write)?;
    Ok(())
}

fn send_udp(
    target: SocketAddr,
    stream_id: u64,
    count: u64,
    size: usize,
    shape: Shape,
    rate: Option<f64>,
    progress: &AtomicU64,
) -> Result<()> {
    use std::os::fd::AsRawFd;
    let bind: SocketAddr = if target.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    }
    .parse()?;
    let sock = UdpSocket::bind(bind)?;
    sock.connect(target)?;
    let per_call = match rate {
        Some(r) => ((r / 1000.0) as usize).clamp(1, UDP_BATCH),
        None => UDP_BATCH,
    };
    let mut block = Block::shaped(
        stream_id,
        size,
        Framing::Newline,
        UDP_BATCH,
        shape.format,
        shape.devices,
    )?;
    let frame = block.frame;
    let start = quanta::Instant::now();
    let mut sent = 0u64;
    while sent < count {
        if let Some(r) = rate {
            pace(start, sent, r);
        }
        let n = ((count - sent) as usize).min(per_call);
        let bytes = block.fill(sent, n, unix_ns());
        let mut iov: [libc::iovec; UDP_BATCH] = unsafe { std::mem::zeroed() };
        let mut msgs: [libc::mmsghdr; UDP_BATCH] = unsafe { std::mem::zeroed() };
        for i in 0..n {
            iov[i].iov_base = bytes[i * frame..].as_ptr() as *mut libc::c_void;
            iov[i].iov_len = frame;
            msgs[i].msg_hdr.msg_iov = &mut iov[i];
            msgs[i].msg_hdr.msg_iovlen = 1;
        }
        let mut done = 0usize;
        while done < n {
            // SAFETY: msgs[done..n] point at iovecs into `bytes`, alive here.
            let rc = unsafe {
                libc::sendmmsg(
                    sock.as_raw_fd(),
                    msgs[done..].as_mut_ptr(),
                    (n - done) as u32,
                    0,
                )
            };
            if rc < 0 {
                let e = std::io::Error::last_os_error();
                match e.kind() {
                    // An ICMP error from an earlier datagram: keep sending.
                    ErrorKind::ConnectionRefused | ErrorKind::Interrupted => continue,
                    ErrorKind::WouldBlock => {
                        std::thread::yield_now();
                        continue;
                    }
                    _ => return Err(e).context("sendmmsg"),
                }
            }
            done += rc as usize;
        }
        sent += n as u64;
        progress.fetch_add(n as u64, Relaxed);
    }
    Ok(())
}

/// Datagrams received a batch per `recvmmsg` call into one reused buffer.
struct Datagrams {
    bufs: Vec<u8>,
    lens: Vec<usize>,
}

impl Datagrams {
    const N: usize = 256;
    const SLOT: usize = 65536;

    fn new() -> Datagrams {
        Datagrams {
            bufs: vec![0u8; Self::N * Self::SLOT],
            lens: Vec::with_capacity(Self::N),
        }
    }

    /// Waits for at least one datagram (or the socket's read timeout) and
    /// takes what is queued; returns how many arrived.
    fn receive(&mut self, sock: &UdpSocket) -> usize {
        use std::os::fd::AsRawFd;
        let mut iov: [libc::iovec; Self::N] = std::array::from_fn(|i| libc::iovec {
            iov_base: self.bufs[i * Self::SLOT..].as_mut_ptr() as *mut libc::c_void,
            iov_len: Self::SLOT,
        });
        // SAFETY: an all-zero mmsghdr is valid.
        let mut msgs: [libc::mmsghdr; Self::N] = unsafe { std::mem::zeroed() };
        for (m, v) in msgs.iter_mut().zip(iov.iter_mut()) {
            m.msg_hdr.msg_iov = v;
            m.msg_hdr.msg_iovlen = 1;
        }
        // SAFETY: msgs point at iovecs into `bufs`, all alive for the call.
        let rc = unsafe {
            libc::recvmmsg(
                sock.as_raw_fd(),
                msgs.as_mut_ptr(),
                Self::N as u32,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        self.lens.clear();
        let n = rc.max(0) as usize;
        self.lens
            .extend(msgs[..n].iter().map(|m| m.msg_len as usize));
        n
    }

    /// The datagrams of the last receive.
    fn iter(&self) -> impl Iterator<Item = &[u8]> {
        self.lens
            .iter()
            .enumerate()
            .map(|(i, &len)| &self.bufs[i * Self::SLOT..i * Self::SLOT + len])
    }
}

// ---------------------------------------------------------------------------
// relay

/// Bytes copied per read and write.
const RELAY_BUFFER_BYTES: usize = 1 << 20;

fn relay(a: RelayArgs) -> Result<()> {
    match a.proto {
        Proto::Http | Proto::Mqtt | Proto::Nats => bail!("relay speaks tcp or udp"),
        Proto::Tcp => {
            let listener = bind_tcp(a.listen)?;
            listener.set_nonblocking(false)?;
            for conn in listener.incoming() {
                let mut conn = conn?;
                let target = a.target;
                std::thread::spawn(move || -> Result<()> {
                    let mut up = TcpStream::connect(target)?;
                    let mut buf = vec![0u8; RELAY_BUFFER_BYTES];
                    loop {
                        let n = conn.read(&mut buf)?;
                        if n == 0 {
                            break;
                        }
                        up.write_all(&buf[..n])?;
                    }
                    up.shutdown(Shutdown::Write)?;
                    Ok(())
                });
            }
            Ok(())
        }
        Proto::Udp => {
            let sock = bind_udp(a.listen)?;
            sock.set_read_timeout(None)?;
            let mut up = TcpStream::connect(a.target)?;
            let mut batch = Datagrams::new();
            let mut out = Vec::with_capacity(RELAY_BUFFER_BYTES);
            loop {
                if batch.receive(&sock) == 0 {
                    continue;
                }
                out.clear();
                for d in batch.iter() {
                    out.extend_from_slice(d);
                    if d.last() != Some(&b'\n') {
                        out.push(b'\n');
                    }
                }
                up.write_all(&out)?;
            }
        }
    }
}

// ---------------------------------------------------------------------------
// receive

#[derive(Default)]
struct StreamState {
    seen: Vec<u64>,
    unique: u64,
    duplicates: u64,
    reordered: u64,
    max_seq: Option<u64>,
    /// The first PER_STREAM_MAX streams: their own latencies, and when
    /// their last new record came.
    latency_us: Option<Histogram<u64>>,
    last: Option<Instant>,
}

impl StreamState {
    /// See `StreamSummary::newest_run`.
    fn newest_run(&self) -> u64 {
        let Some(max) = self.max_seq else { return 0 };
        let seen = |seq: u64| self.seen[(seq / 64) as usize] & (1u64 << (seq % 64)) != 0;
        (0..=max).rev().take_while(|&q| seen(q)).count() as u64
    }
}

/// Streams up to which the summary lists each one's distinct records.
const PER_STREAM_MAX: usize = 64;

/// The most sequence numbers tracked per stream (a bitmap of 2^32 bits,
/// 512 MiB, is the ceiling; a larger number is counted as malformed).
const SEQ_MAX: u64 = 1 << 32;

struct Tracker {
    streams: HashMap<u64, StreamState>,
    received: u64,
    malformed: u64,
    bytes: u64,
    first: Option<Instant>,
    last: Option<Instant>,
    latency_us: Histogram<u64>,
}

impl Tracker {
    fn new() -> Tracker {
        Tracker {
            streams: HashMap::new(),
            received: 0,
            malformed: 0,
            bytes: 0,
            first: None,
            last: None,
            latency_us: Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid bounds"),
        }
    }

    fn unique(&self) -> u64 {
        self.streams.values().map(|s| s.unique).sum()
    }

    fn apply(&mut self, parsed: &[(u64, u64, u64)], malformed: u64, bytes: u64) {
        let now = Instant::now();
        self.first.get_or_insert(now);
        self.last = Some(now);
        self.malformed += malformed;
        self.bytes += bytes;
        let now_ns = unix_ns();
        for &(stream, seq, ts) in parsed {
            self.received += 1;
            if seq >= SEQ_MAX {
                self.malformed += 1;
                continue;
            }
            let few = self.streams.len() < PER_STREAM_MAX;
            let s = self.streams.entry(stream).or_insert_with(|| StreamState {
                latency_us: few.then(|| {
                    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid bounds")
                }),
                ..StreamState::default()
            });
            let word = (seq / 64) as usize;
            if s.seen.len() <= word {
                s.seen.resize((word + 1).next_power_of_two(), 0);
            }
            let bit = 1u64 << (seq % 64);
            if s.seen[word] & bit != 0 {
                s.duplicates += 1;
                continue;
            }
            s.seen[word] |= bit;
            s.unique += 1;
            match s.max_seq {
                Some(m) if seq < m => s.reordered += 1,
                Some(m) if seq == m => {}
                _ => s.max_seq = Some(seq),
            }
            let lat = now_ns.saturating_sub(ts) / 1000;
            let _ = self.latency_us.record(lat.max(1));
            if let Some(h) = s.latency_us.as_mut() {
                let _ = h.record(lat.max(1));
                s.last = Some(Instant::now());
            }
        }
    }
}

#[derive(Serialize)]
struct Latency {
    p50: f64,
    p99: f64,
    p999: f64,
    max: f64,
}

#[derive(Serialize)]
struct ReceiveSummary {
    received: u64,
    unique: u64,
    lost: u64,
    duplicates: u64,
    reordered: u64,
    malformed: u64,
    streams: usize,
    /// Per stream id, when there are few streams.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    per_stream: BTreeMap<u64, StreamSummary>,
    seconds: f64,
    records_per_sec: f64,
    mib_per_sec: f64,
    latency_us: Latency,
    #[serde(skip_serializing_if = "Option::is_none")]
    http: Option<http::HttpStats>,
    #[serde(skip_serializing_if = "Option::is_none")]
    mqtt: Option<MqttSummary>,
}

#[derive(Serialize)]
struct StreamSummary {
    unique: u64,
    latency_p99_us: f64,
    /// When its last new record came, seconds after the first record of
    /// all.
    last_s: f64,
    /// Distinct records in the unbroken run of sequence numbers that ends
    /// at the stream's highest (all of them when nothing is missing): how
    /// much of the newest data arrived.
    newest_run: u64,
}

#[derive(Serialize)]
struct MqttSummary {
    /// Sessions opened (more than one: the broker went away and came back).
    connects: u64,
    messages: u64,
    /// Records on another topic than `--expect-topic` names.
    wrong_topic: u64,
}

/// Parses whole lines of `buf`; returns the bytes used.
fn parse_lines(buf: &[u8], out: &mut Vec<(u64, u64, u64)>, malformed: &mut u64) -> usize {
    let mut used = 0;
    while let Some(i) = memchr::memchr(b'\n', &buf[used..]) {
        match parse_record(&buf[used..used + i]) {
            Some(r) => out.push(r),
            None => *malformed += 1,
        }
        used += i + 1;
    }
    used
}

fn tcp_connection(
    mut conn: TcpStream,
    tracker: Arc<Mutex<Tracker>>,
    read_rate: Option<u64>,
    stall: Option<((u64, Duration), Arc<Stall>)>,
) {
    let mut buf = vec![
        0u8;
        if read_rate.is_some() {
            64 * 1024
        } else {
            1 << 20
        }
    ];
    let mut filled = 0;
    let mut parsed = Vec::with_capacity(8192);
    loop {
        let n = match conn.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        if let Some(rate) = read_rate {
            std::thread::sleep(Duration::from_secs_f64(n as f64 / rate.max(1) as f64));
        }
        filled += n;
        let mut malformed = 0;
        parsed.clear();
        let used = parse_lines(&buf[..filled], &mut parsed, &mut malformed);
        buf.copy_within(used..filled, 0);
        filled -= used;
        if filled == buf.len() {
            // A line longer than the buffer: count it and start over.
            malformed += 1;
            filled = 0;
        }
        let received = {
            let mut t = tracker.lock().expect("tracker");
            t.apply(&parsed, malformed, n as u64);
            t.received
        };
        if let Some((plan, stall)) = &stall {
            stall.wait(*plan, received);
        }
    }
}

fn bind_tcp(addr: SocketAddr) -> Result<TcpListener> {
    let s = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    s.set_reuse_address(true)?;
    s.bind(&addr.into())
        .with_context(|| format!("bind {addr}"))?;
    s.listen(1024)?;
    let l: TcpListener = s.into();
    l.set_nonblocking(true)?;
    Ok(l)
}

/// How a TCP receiver behaves as an upstream.
#[derive(Clone, Copy)]
struct Upstream {
    listen: SocketAddr,
    /// Restart gracefully once this many records arrived...
    pause_after: Option<u64>,
    /// ...refusing connections this long.
    pause: Duration,
    /// Read at most this many bytes per second per connection.
    read_rate: Option<u64>,
    /// Stop reading once, this long, after this many records.
    stall: Option<(u64, Duration)>,
}

/// A stall the connections of one receiver share: when it ends, once begun.
#[derive(Default)]
struct Stall {
    until: Mutex<Option<Instant>>,
}

impl Stall {
    /// Sleeps while the stall lasts, beginning it once `received` reaches
    /// `after`.
    fn wait(&self, plan: (u64, Duration), received: u64) {
        let (after, length) = plan;
        let end = {
            let mut until = self.until.lock().expect("stall");
            if until.is_none() && received >= after {
                *until = Some(Instant::now() + length);
                eprintln!("receive: stalling for {:.1} s", length.as_secs_f64());
            }
            *until
        };
        if let Some(end) = end {
            let now = Instant::now();
            if now < end {
                std::thread::sleep(end - now);
            }
        }
    }
}

/// Accepts connections until `stop`; plays the graceful restart.
fn tcp_acceptor(
    first: TcpListener,
    up: Upstream,
    tracker: Arc<Mutex<Tracker>>,
    stop: Arc<AtomicBool>,
    received: Arc<AtomicU64>,
) -> Result<()> {
    let Upstream {
        listen,
        pause_after,
        pause,
        read_rate,
        stall,
    } = up;
    let shared_stall = Arc::new(Stall::default());
    let mut listener = Some(first);
    let mut open: Vec<TcpStream> = Vec::new();
    let mut paused_until: Option<Instant> = None;
    let mut pause_pending = pause_after;
    while !stop.load(Relaxed) {
        if let Some(after) = pause_pending {
            if received.load(Relaxed) >= after {
                pause_pending = None;
                listener = None;
                for c in open.drain(..) {
                    let _ = c.shutdown(Shutdown::Write);
                }
                paused_until = Some(Instant::now() + pause);
                eprintln!(
                    "receive: pausing for {:.1} s (graceful restart)",
                    pause.as_secs_f64()
                );
            }
        }
        if let Some(t) = paused_until {
            if Instant::now() >= t {
                paused_until = None;
                listener = Some(bind_tcp(listen)?);
                eprintln!("receive: listening again");
            }
        }
        let Some(l) = listener.as_ref() else {
            std::thread::sleep(Duration::from_millis(10));
            continue;
        };
        match l.accept() {
            Ok((conn, _)) => {
                conn.set_nonblocking(false)?;
                if let Ok(c) = conn.try_clone() {
                    open.push(c);
                }
                let t = tracker.clone();
                let stall = stall.map(|plan| (plan, shared_stall.clone()));
                std::thread::spawn(move || tcp_connection(conn, t, read_rate, stall));
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5))
            }
            Err(e) => return Err(e).context("accept"),
        }
    }
    Ok(())
}

fn bind_udp(listen: SocketAddr) -> Result<UdpSocket> {
    use std::os::fd::AsRawFd;
    let s = socket2::Socket::new(
        socket2::Domain::for_address(listen),
        socket2::Type::DGRAM,
        None,
    )?;
    let want: libc::c_int = 64 << 20;
    // SAFETY: setsockopt with a pointer to a c_int that outlives the call.
    let forced = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            &want as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if forced != 0 {
        let _ = s.set_recv_buffer_size(want as usize);
    }
    s.bind(&listen.into())
        .with_context(|| format!("bind {listen}"))?;
    s.set_read_timeout(Some(Duration::from_millis(50)))?;
    Ok(s.into())
}

fn udp_receiver(
    sock: UdpSocket,
    tracker: Arc<Mutex<Tracker>>,
    stop: Arc<AtomicBool>,
) -> Result<()> {
    let mut batch = Datagrams::new();
    let mut parsed = Vec::with_capacity(Datagrams::N);
    while !stop.load(Relaxed) {
        if batch.receive(&sock) == 0 {
            continue;
        }
        parsed.clear();
        let mut malformed = 0;
        let mut bytes = 0u64;
        for d in batch.iter() {
            bytes += d.len() as u64;
            let d = d.strip_suffix(b"\n").unwrap_or(d);
            match parse_record(d) {
                Some(r) => parsed.push(r),
                None => malformed += 1,
            }
        }
        tracker
            .lock()
            .expect("tracker")
            .apply(&parsed, malformed, bytes);
    }
    Ok(())
}

fn receive(a: ReceiveArgs) -> Result<bool> {
    let tracker = Arc::new(Mutex::new(Tracker::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let received = Arc::new(AtomicU64::new(0));
    let mut endpoint = None;
    let mut mqtt_stats = None;
    let worker = {
        let (tracker, stop, received) = (tracker.clone(), stop.clone(), received.clone());
        let pause = Duration::from_secs_f64(a.pause_s);
        let (listen, proto, pause_after, read_rate) =
            (a.listen, a.proto, a.pause_after, a.read_bytes_per_sec);
        let stall = a
            .stall_after
            .map(|n| (n, Duration::from_secs_f64(a.stall_s)));
        // Bind before anything else, so a sender started right after us connects.
        match proto {
            Proto::Tcp => {
                let l = bind_tcp(listen)?;
                std::thread::spawn(move || {
                    let up = Upstream {
                        listen,
                        pause_after,
                        pause,
                        read_rate,
                        stall,
                    };
                    tcp_acceptor(l, up, tracker, stop, received)
                })
            }
            Proto::Udp => {
                let sock = bind_udp(listen)?;
                std::thread::spawn(move || udp_receiver(sock, tracker, stop))
            }
            Proto::Mqtt => {
                let stats = Arc::new(mqtt::MqttStats::default());
                mqtt_stats = Some(stats.clone());
                mqtt::start(listen, a.mqtt.clone(), tracker, stop, stats)?
            }
            Proto::Nats => bail!("receive speaks tcp, udp, http or mqtt; nats is for send"),
            Proto::Http => {
                let l = bind_tcp(listen)?;
                let ep = Arc::new(http::Endpoint::new(a.http.clone(), tracker)?);
                endpoint = Some(ep.clone());
                std::thread::spawn(move || ep.serve(l, stop))
            }
        }
    };
    let bar = indicatif::ProgressBar::new(a.expect.unwrap_or(0));
    bar.set_style(
        indicatif::ProgressStyle::with_template("receive {bar:40} {pos}/{len} {per_sec} {elapsed}")
            .expect("valid template"),
    );
    let start = Instant::now();
    let timeout = Duration::from_secs_f64(a.timeout_s);
    let mut met_at: Option<Instant> = None;
    let mut moved = (0, Instant::now());
    loop {
        std::thread::sleep(Duration::from_millis(20));
        if worker.is_finished() {
            break;
        }
        let (unique, total) = {
            let t = tracker.lock().expect("tracker");
            (t.unique(), t.received)
        };
        received.store(total, Relaxed);
        if total != moved.0 {
            moved = (total, Instant::now());
        }
        if a.idle_s
            .is_some_and(|s| total > 0 && moved.1.elapsed().as_secs_f64() >= s)
        {
            break;
        }
        bar.set_position(unique);
        if let Some(e) = a.expect {
            if unique >= e && met_at.is_none() {
                met_at = Some(Instant::now());
            }
        }
        if met_at.is_some_and(|t| t.elapsed() >= Duration::from_millis(a.linger_ms)) {
            break;
        }
        if start.elapsed() >= timeout {
            break;
        }
    }
    stop.store(true, Relaxed);
    bar.finish_and_clear();
    if worker.is_finished() {
        worker.join().expect("receiver thread panicked")?;
    }
    let t = tracker.lock().expect("tracker");
    let unique = t.unique();
    let gaps: u64 = t
        .streams
        .values()
        .map(|s| s.max_seq.map_or(0, |m| m + 1 - s.unique))
        .sum();
    let lost = match a.expect {
        Some(e) => gaps.max(e.saturating_sub(unique)),
        None => gaps,
    };
    let seconds = match (t.first, t.last) {
        (Some(f), Some(l)) => l.duration_since(f).as_secs_f64().max(1e-9),
        _ => 0.0,
    };
    let per_sec = |x: f64| if seconds > 0.0 { x / seconds } else { 0.0 };
    let h = &t.latency_us;
    let summary = ReceiveSummary {
        received: t.received,
        unique,
        lost,
        duplicates: t.streams.values().map(|s| s.duplicates).sum(),
        reordered: t.streams.values().map(|s| s.reordered).sum(),
        malformed: t.malformed,
        streams: t.streams.len(),
        per_stream: if t.streams.len() <= PER_STREAM_MAX {
            t.streams
                .iter()
                .filter_map(|(&k, s)| {
                    let h = s.latency_us.as_ref()?;
                    Some((
                        k,
                        StreamSummary {
                            unique: s.unique,
                            latency_p99_us: h.value_at_quantile(0.99) as f64,
                            last_s: match (t.first, s.last) {
                                (Some(f), Some(l)) => l.duration_since(f).as_secs_f64(),
                                _ => 0.0,
                            },
                            newest_run: s.newest_run(),
                        },
                    ))
                })
                .collect()
        } else {
            BTreeMap::new()
        },
        seconds,
        records_per_sec: per_sec(unique as f64),
        mib_per_sec: per_sec(t.bytes as f64) / (1024.0 * 1024.0),
        latency_us: Latency {
            p50: h.value_at_quantile(0.5) as f64,
            p99: h.value_at_quantile(0.99) as f64,
            p999: h.value_at_quantile(0.999) as f64,
            max: h.max() as f64,
        },
        http: endpoint.map(|e| e.stats()),
        mqtt: mqtt_stats.map(|m| MqttSummary {
            connects: m.connects.load(Relaxed),
            messages: m.messages.load(Relaxed),
            wrong_topic: m.wrong_topic.load(Relaxed),
        }),
    };
    let table = format!(
        "received   {:>12}\nunique     {:>12}\nlost       {:>12}\nduplicates {:>12}\nreordered  {:>12}\nmalformed  {:>12}\nstreams    {:>12}\nseconds    {:>12.3}\nrecords/s  {:>12.0}\nMiB/s      {:>12.1}\nlatency µs p50 {:.0}  p99 {:.0}  p99.9 {:.0}  max {:.0}",
        summary.received, summary.unique, summary.lost, summary.duplicates, summary.reordered,
        summary.malformed, summary.streams, summary.seconds, summary.records_per_sec,
        summary.mib_per_sec, summary.latency_us.p50, summary.latency_us.p99,
        summary.latency_us.p999, summary.latency_us.max
    );
    let table = match &summary.http {
        Some(h) => format!(
            "{table}\nhttp       requests {} ok {} throttled {} failed {} bad {} dedup {} outage-drops {} max-concurrent {}",
            h.requests, h.ok, h.throttled, h.failed, h.bad_requests, h.deduplicated, h.dropped_in_outage, h.max_concurrent
        ),
        None => table,
    };
    let table = match &summary.mqtt {
        Some(m) => format!(
            "{table}\nmqtt       connects {} messages {} wrong-topic {}",
            m.connects, m.messages, m.wrong_topic
        ),
        None => table,
    };
    if a.json {
        eprintln!("{table}");
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        println!("{table}");
    }
    Ok(a.expect.is_none_or(|e| unique >= e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_records_parse_back() {
        let mut b = Block::new(7, 128, Framing::Newline, 3).unwrap();
        let bytes = b.fill(41, 3, 1_732_240_000_123_456_789).to_vec();
        let lines: Vec<&[u8]> = bytes
            .split(|&c| c == b'\n')
            .filter(|l| !l.is_empty())
            .collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[0].len(), 127);
        assert_eq!(
            parse_record(lines[2]),
            Some((7, 43, 1_732_240_000_123_456_789))
        );
    }

    #[test]
    fn shaped_records_parse_back() {
        let mut b = Block::shaped(3, 200, Framing::Newline, 4, RecordFormat::Syslog, None).unwrap();
        let bytes = b.fill(10, 4, 5).to_vec();
        let line = bytes.split(|&c| c == b'\n').nth(1).unwrap();
        assert!(line.starts_with(b"<19>1 "), "severity 11 % 8: {line:?}");
        assert_eq!(parse_record(line), Some((3, 11, 5)));
        // Devices 1, 5, 9 on connection 1 of 4: record k is for device
        // 1 + (k % 3) * 4, its sequence number k / 3.
        let mut b = Block::shaped(
            1,
            200,
            Framing::Newline,
            6,
            RecordFormat::Influx,
            Some((1, 4, 3)),
        )
        .unwrap();
        let bytes = b.fill(6, 6, 5).to_vec();
        let got: Vec<_> = bytes
            .split(|&c| c == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| {
                assert!(l.starts_with(b"lg,device=d") && l.ends_with(b"\""), "{l:?}");
                parse_record(l).unwrap()
            })
            .collect();
        let want: Vec<_> = (6..12u64).map(|k| (1 + (k % 3) * 4, k / 3, 5)).collect();
        assert_eq!(got, want);
        assert_eq!(&bytes[..24], b"lg,device=d000001 stream");
    }

    #[test]
    fn tracker_counts_loss_duplicates_and_order() {
        let mut t = Tracker::new();
        t.apply(&[(1, 0, 0), (1, 2, 0), (1, 1, 0), (1, 2, 0)], 0, 0);
        let s = &t.streams[&1];
        assert_eq!((s.unique, s.duplicates, s.reordered), (3, 1, 1));
        assert_eq!(s.newest_run(), 3);
        t.apply(
            &[(2, 1, 0), (2, 3, 0), (2, 4, 0), (2, 200, 0), (2, 199, 0)],
            0,
            0,
        );
        assert_eq!(t.streams[&2].newest_run(), 2, "199 and 200");
    }
}
