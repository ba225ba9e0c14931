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

use super::util::Backoff;
use crate::logging::LogEvery;
use crate::pipeline::SinkCtx;
use std::cell::Cell;
use std::net::{Shutdown, SocketAddr};
use std::rc::Rc;
use std::time::Duration;
use tokio_uring::buf::BoundedBuf;
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

/// A sink's connection on one shard.
pub struct TcpOutput {
    sink: usize,
    shard: usize,
    address: SocketAddr,
    conn: Option<Conn>,
    backoff: Backoff,
    log: LogEvery,
    down_since: Option<std::time::Instant>,
}

impl TcpOutput {
    pub fn new(shard: &SinkCtx, sink: usize, address: SocketAddr) -> TcpOutput {
        TcpOutput {
            sink,
            shard: shard.id,
            address,
            conn: None,
            backoff: Backoff::new(shard.plan.sinks[sink].retry),
            log: LogEvery::new(Duration::from_secs(10)),
            down_since: None,
        }
    }

    /// Writes `buf` whole, connecting and retrying until it is written;
    /// gives the buffer back (`Ok`). With `give_up` (shutdown), no connect
    /// or write starts after that instant and the buffer comes back as
    /// `Err`, unsent; a write that has started is never cut off, so the
    /// peer never sees a torn batch.
    pub async fn deliver<B: BoundedBuf>(
        &mut self,
        shard: &SinkCtx,
        mut buf: B,
        give_up: Option<tokio::time::Instant>,
    ) -> Result<B, B> {
        let name = shard.plan.sinks[self.sink].name.as_str();
        let counters = &shard.metrics.sinks[self.sink];
        let address = self.address;
        let past =
            |t: Option<tokio::time::Instant>| t.is_some_and(|t| tokio::time::Instant::now() >= t);
        loop {
            if past(give_up) {
                return Err(buf);
            }
            if self.conn.as_ref().is_some_and(|c| c.peer_closed.get()) {
                tracing::info!(sink = name, peer = %address, shard = self.shard, "peer closed the connection; reconnecting");
                self.conn.take().expect("checked above").close(true);
                counters.connected.set(0);
            }
            let Some(c) = self.conn.as_ref() else {
                let connect = TcpStream::connect(address);
                let connected = match give_up {
                    Some(t) => match tokio::time::timeout_at(t, connect).await {
                        Ok(r) => r,
                        Err(_) => return Err(buf),
                    },
                    None => connect.await,
                };
                match connected {
                    Ok(stream) => {
                        let _ = stream.set_nodelay(true);
                        if let Some(t) = self.down_since.take() {
                            tracing::info!(sink = name, peer = %address, shard = self.shard,
                                down_ms = t.elapsed().as_millis() as u64, "connected");
                        }
                        self.conn = Some(Conn::new(stream));
                        counters.connected.set(1);
                    }
                    Err(e) => {
                        counters.send_errors.add(1);
                        self.down_since.get_or_insert_with(std::time::Instant::now);
                        if let Some(held) = self.log.ready() {
                            tracing::warn!(sink = name, peer = %address, shard = self.shard, error = %e,
                                suppressed = held, "cannot connect; batches wait in the sink's buffer");
                        }
                        let delay = self.backoff.next_delay();
                        counters.retry_backoff_ms.set(delay.as_millis() as i64);
                        super::util::pause(delay, give_up).await;
                        counters.retries.add(1);
                    }
                }
                continue;
            };
            let (res, b) = c.stream.write_all(buf).await;
            buf = b;
            match res {
                Ok(()) => {
                    self.backoff.reset();
                    counters.retry_backoff_ms.set(0);
                    return Ok(buf);
                }
                Err(e) => {
                    counters.send_errors.add(1);
                    counters.connected.set(0);
                    self.down_since.get_or_insert_with(std::time::Instant::now);
                    if let Some(held) = self.log.ready() {
                        tracing::warn!(sink = name, peer = %address, shard = self.shard, error = %e,
                            suppressed = held, "write failed; the batch will be sent again");
                    }
                    self.conn.take().expect("in use above").close(false);
                    let delay = self.backoff.next_delay();
                    counters.retry_backoff_ms.set(delay.as_millis() as i64);
                    super::util::pause(delay, give_up).await;
                    counters.retries.add(1);
                }
            }
        }
    }

    /// Closes the connection so that the peer reads all that was written.
    pub fn close(&mut self, shard: &SinkCtx) {
        if let Some(c) = self.conn.take() {
            c.close(true);
        }
        shard.metrics.sinks[self.sink].connected.set(0);
    }
}
