//! `tcp`: newline-delimited records to `address`, one connection per shard.
//!
//! A batch's payload is already newline-delimited, so a batch is one
//! `write_all` through io_uring. A batch is kept until its write completes;
//! on a failed connect or write the sender waits (exponential backoff, full
//! jitter), reconnects and writes the batch again, so a broken connection can
//! repeat a batch but never loses one while the collector runs. Meanwhile the
//! queue fills and TCP sources stop reading.
//!
//! A watcher reads the connection: when the peer closes its side (a graceful
//! restart of the upstream), the sender stops writing, closes its side after
//! the write in progress, and reconnects for the next batch. What the peer had
//! not read when it *crashed* is lost with it: plain TCP carries no
//! acknowledgement (the write-ahead log and acknowledged sinks address that).

use super::util::{Backoff, LogEvery};
use super::SinkQueue;
use crate::runtime::shard::Shard;
use std::cell::Cell;
use std::net::{Shutdown, SocketAddr};
use std::rc::Rc;
use std::time::Duration;
use tokio_uring::net::TcpStream;

/// One connection and whether its peer has closed it.
struct Conn {
    stream: Rc<TcpStream>,
    peer_closed: Rc<Cell<bool>>,
}

impl Conn {
    fn new(stream: TcpStream) -> Conn {
        let stream = Rc::new(stream);
        let peer_closed = Rc::new(Cell::new(false));
        let (s, closed) = (stream.clone(), peer_closed.clone());
        tokio_uring::spawn(async move {
            let mut buf = vec![0u8; 512];
            loop {
                let (res, b) = s.read(buf).await;
                buf = b;
                match res {
                    Ok(0) | Err(_) => break,
                    Ok(_) => continue, // the peer has nothing to say; ignore it
                }
            }
            closed.set(true);
        });
        Conn {
            stream,
            peer_closed,
        }
    }

    /// Ends the connection. `graceful` lets the peer read all we wrote.
    fn close(self, graceful: bool) {
        let how = if graceful && !self.peer_closed.get() {
            Shutdown::Write
        } else {
            Shutdown::Both
        };
        let _ = self.stream.shutdown(how);
        if self.peer_closed.get() {
            let _ = self.stream.shutdown(Shutdown::Both);
        }
    }
}

pub async fn run(shard: Rc<Shard>, queue: Rc<SinkQueue>, address: SocketAddr) {
    let plan = &shard.plan.sinks[queue.sink];
    let name = plan.name.as_str();
    let counters = &shard.metrics.sinks[queue.sink];
    let mut backoff = Backoff::new(plan.retry);
    let mut log = LogEvery::new(Duration::from_secs(10));
    let mut conn: Option<Conn> = None;
    let mut down_since: Option<std::time::Instant> = None;

    while let Some(mut batch) = queue.next().await {
        loop {
            if conn.as_ref().is_some_and(|c| c.peer_closed.get()) {
                tracing::info!(sink = name, peer = %address, shard = shard.id, "peer closed the connection; reconnecting");
                conn.take().expect("checked above").close(true);
                counters.connected.set(0);
            }
            let Some(c) = conn.as_ref() else {
                match TcpStream::connect(address).await {
                    Ok(stream) => {
                        let _ = stream.set_nodelay(true);
                        if let Some(t) = down_since.take() {
                            tracing::info!(sink = name, peer = %address, shard = shard.id,
                                down_ms = t.elapsed().as_millis() as u64, "connected");
                        }
                        conn = Some(Conn::new(stream));
                        counters.connected.set(1);
                    }
                    Err(e) => {
                        counters.send_errors.add(1);
                        down_since.get_or_insert_with(std::time::Instant::now);
                        if let Some(held) = log.ready() {
                            tracing::warn!(sink = name, peer = %address, shard = shard.id, error = %e,
                                suppressed = held, "cannot connect; batches wait in the sink's buffer");
                        }
                        tokio::time::sleep(backoff.next_delay()).await;
                        counters.retries.add(1);
                    }
                }
                continue;
            };
            let payload = std::mem::take(&mut batch.payload);
            let (res, payload) = c.stream.write_all(payload).await;
            batch.payload = payload;
            match res {
                Ok(()) => {
                    backoff.reset();
                    counters.records.add(batch.len() as u64);
                    counters.bytes.add(batch.payload_bytes() as u64);
                    counters.batches.add(1);
                    break;
                }
                Err(e) => {
                    counters.send_errors.add(1);
                    counters.connected.set(0);
                    down_since.get_or_insert_with(std::time::Instant::now);
                    if let Some(held) = log.ready() {
                        tracing::warn!(sink = name, peer = %address, shard = shard.id, error = %e,
                            suppressed = held, "write failed; the batch will be sent again");
                    }
                    conn.take().expect("in use above").close(false);
                    tokio::time::sleep(backoff.next_delay()).await;
                    counters.retries.add(1);
                }
            }
        }
        shard.recycle(batch);
    }
    if let Some(c) = conn.take() {
        c.close(true);
    }
    counters.connected.set(0);
}
