//! `tcp` source: accept, read through io_uring, frame, offer.
//!
//! Each connection owns one read buffer of `max_record_bytes` plus
//! [`READ_BYTES`], allocated when it is accepted and never grown. The
//! connection reads into the free tail, cuts records with the
//! [`Decoder`](crate::codec::Decoder) and offers each to its shard; when the
//! destination is full, the offer waits and so does the next read: the
//! sender feels TCP backpressure instead of the collector buffering without
//! bound. Bad input is counted and logged once per connection with the peer
//! named; a lost framing closes that connection only.

use crate::codec::{Decoded, Decoder};
use crate::config::{PartitionBy, Utf8Policy, WhenExceeded};
use crate::metrics::DropReason;
use crate::route::{owner, peer_key};
use crate::runtime::shard::Shard;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use tokio_uring::buf::BoundedBuf;
use tokio_uring::net::{TcpListener, TcpStream};

/// Bytes a connection reads at once, beyond room for one whole frame.
pub const READ_BYTES: usize = 64 * 1024;

pub async fn accept_loop(shard: Rc<Shard>, source: usize, listener: TcpListener) {
    let plan = &shard.plan.sources[source];
    let counters = &shard.metrics.sources[source];
    let fd_key = shard.watch_fd(listener.as_raw_fd());
    loop {
        let accepted = listener.accept().await;
        if shard.stopping.get() {
            break;
        }
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and friends: wait a little rather than spin.
                tracing::warn!(source = %plan.name, error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let open = &shard.connections[source];
        if open.fetch_add(1, Ordering::AcqRel) >= plan.max_connections {
            open.fetch_sub(1, Ordering::AcqRel);
            counters.connections_rejected.add(1);
            tracing::warn!(source = %plan.name, %peer, max_connections = plan.max_connections,
                "connection refused: max_connections reached");
            drop(stream);
            continue;
        }
        counters.connections_accepted.add(1);
        counters.connections_open.add(1);
        let s = shard.clone();
        shard.spawn_source(async move {
            connection(&s, source, stream, peer).await;
            s.connections[source].fetch_sub(1, Ordering::AcqRel);
            s.metrics.sources[source].connections_open.add(-1);
        });
    }
    shard.unwatch_fd(fd_key);
}

/// What one connection dropped since the last read, and whether each kind
/// has been logged yet (once per connection).
#[derive(Default)]
struct Dropped {
    oversize: u64,
    invalid_utf8: u64,
    empty: u64,
    logged_oversize: bool,
    logged_utf8: bool,
    logged_rate: bool,
}

impl Dropped {
    /// Moves the counts into the shard's counters (once per read).
    fn flush(&mut self, counters: &crate::metrics::SourceCounters) {
        counters.drop(DropReason::Oversize, std::mem::take(&mut self.oversize));
        counters.drop(
            DropReason::InvalidUtf8,
            std::mem::take(&mut self.invalid_utf8),
        );
        counters.drop(DropReason::Empty, std::mem::take(&mut self.empty));
    }
}

async fn connection(shard: &Rc<Shard>, source: usize, stream: TcpStream, peer: SocketAddr) {
    let plan = &shard.plan.sources[source];
    let counters = &shard.metrics.sources[source];
    let fd_key = shard.watch_fd(stream.as_raw_fd());
    let mut decoder = Decoder::new(plan.framing, plan.max_record_bytes);
    let capacity = decoder.frame_bytes_max() + READ_BYTES;
    let mut buf: Vec<u8> = Vec::with_capacity(capacity);
    let (key, dest) = match plan.partition_by {
        PartitionBy::None => (0, shard.id),
        PartitionBy::Peer => {
            let k = peer_key(&peer);
            (k, owner(k, shard.shards))
        }
    };
    let check_utf8 = plan.utf8 == Utf8Policy::Drop;
    let no_sink = plan.sinks.is_empty();
    let mut dropped = Dropped::default();
    let mut start = 0usize;
    let mut close_reason: Option<String> = None;
    let mut records = 0u64;

    'read: loop {
        if start > 0 {
            buf.copy_within(start.., 0);
            buf.truncate(buf.len() - start);
            start = 0;
        }
        let filled = buf.len();
        let (res, slice) = stream.read(buf.slice(filled..capacity)).await;
        buf = slice.into_inner();
        let n = match res {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) => {
                close_reason = Some(format!("read error: {e}"));
                break;
            }
        };
        counters.bytes.add(n as u64);
        let ts = shard.now_ns();
        loop {
            match decoder.decode(&buf[start..]) {
                Decoded::Record { record, consumed } => {
                    let from = start;
                    start += consumed;
                    if record.is_empty() {
                        dropped.empty += 1;
                        continue;
                    }
                    if check_utf8 && std::str::from_utf8(record).is_err() {
                        if !dropped.logged_utf8 {
                            dropped.logged_utf8 = true;
                            tracing::warn!(source = %plan.name, %peer, offset = from,
                                "record is not valid UTF-8; dropped (set utf8 = \"pass\" for binary records)");
                        }
                        dropped.invalid_utf8 += 1;
                        continue;
                    }
                    if no_sink {
                        counters.drop(DropReason::NoSink, 1);
                        continue;
                    }
                    if let Some(rl) = plan.rate_limit {
                        if !shard.rate_admit(source) {
                            if rl.when_exceeded == WhenExceeded::Drop {
                                counters.drop(DropReason::RateLimit, 1);
                                if !dropped.logged_rate {
                                    dropped.logged_rate = true;
                                    tracing::warn!(source = %plan.name, %peer,
                                        "over the source's rate_limit: records are dropped (counted as rate_limit)");
                                }
                                continue;
                            }
                            shard.rate_wait(source).await;
                        }
                    }
                    records += 1;
                    shard.offer(source, dest, ts, key, record).await;
                }
                Decoded::NeedMore { consumed } => {
                    start += consumed;
                    break;
                }
                Decoded::Oversize { consumed, fatal } => {
                    start += consumed;
                    if !dropped.logged_oversize {
                        dropped.logged_oversize = true;
                        tracing::warn!(source = %plan.name, %peer, max_record_bytes = plan.max_record_bytes,
                            "record longer than max_record_bytes; dropped");
                    }
                    dropped.oversize += 1;
                    if fatal {
                        close_reason = Some("a frame longer than max_record_bytes".into());
                        break 'read;
                    }
                }
                Decoded::Invalid { reason } => {
                    counters.drop(DropReason::Framing, 1);
                    close_reason = Some(format!("framing lost: {reason}"));
                    break 'read;
                }
            }
        }
        counters.records.add(std::mem::take(&mut records));
        dropped.flush(counters);
    }
    if close_reason.is_none() {
        if let Some(record) = decoder.finish(&buf[start..]) {
            let utf8_ok = !check_utf8 || std::str::from_utf8(record).is_ok();
            if utf8_ok && !no_sink {
                let ts = shard.now_ns();
                shard.offer(source, dest, ts, key, record).await;
                counters.records.add(1);
            }
        }
    }
    counters.records.add(records);
    dropped.flush(counters);
    shard.unwatch_fd(fd_key);
    if let Some(reason) = close_reason {
        tracing::warn!(source = %plan.name, %peer, "closing connection: {reason}");
    }
}
