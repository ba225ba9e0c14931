//! `send --proto nats`: one client per connection publishing its stream to
//! a NATS server: into JetStream (HPUB with a message id, a reply subject,
//! at most a window of PubAcks outstanding; a refusal ends the run) or, with
//! `--nats-core`, as plain PUBs (flushed with a PING at the end).

use super::{pace, unix_ns, Block, Framing};
use anyhow::{bail, Context, Result};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use updraft::nats::{self as wire, Auth, Op, PubAck};

pub struct Publisher {
    pub subject: String,
    pub jetstream: bool,
}

/// PubAcks a publisher waits for at most.
const SEND_WINDOW: u64 = 1000;

impl Publisher {
    pub fn send(
        &self,
        server: SocketAddr,
        stream: u64,
        count: u64,
        size: usize,
        rate: Option<f64>,
        progress: &AtomicU64,
    ) -> Result<()> {
        let mut s = TcpStream::connect(server).with_context(|| format!("connect {server}"))?;
        s.set_nodelay(true)?;
        let mut buf = vec![0u8; 1 << 16];
        let mut have = 0;
        // INFO, then CONNECT (+ the inbox's SUB) and a PING whose PONG says
        // the server took them.
        let inbox = format!("_INBOX.loadgen{stream}.{:x}.", std::process::id());
        let mut hello = wire::connect(&format!("updraft-loadgen-{stream}"), false, &Auth::None);
        if self.jetstream {
            hello.extend_from_slice(&wire::sub(&format!("{inbox}*"), 1));
            hello.extend_from_slice(wire::PING);
        }
        let mut pongs = if self.jetstream { 2 } else { 1 };
        let mut greeted = false;
        while pongs > 0 {
            let n = s.read(&mut buf[have..])?;
            if n == 0 {
                bail!("{server} closed the connection during the handshake");
            }
            have += n;
            let mut at = 0;
            while let Some((op, used)) = wire::next(&buf[at..have], 1 << 20)? {
                match op {
                    Op::Info(_) if !greeted => {
                        s.write_all(&hello)?;
                        greeted = true;
                    }
                    Op::Pong => pongs -= 1,
                    Op::Err(why) => bail!("{server}: {}", String::from_utf8_lossy(why)),
                    _ => {}
                }
                at += used;
            }
            buf.copy_within(at..have, 0);
            have -= at;
        }
        let acked = Arc::new(AtomicU64::new(0));
        let refused: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(None));
        let reader = {
            let (mut r, acked, refused) = (s.try_clone()?, acked.clone(), refused.clone());
            let mut pong = s.try_clone()?;
            // What came after the handshake's PONG is the reader's.
            let mut buf = buf[..have].to_vec();
            buf.resize(1 << 16, 0);
            std::thread::spawn(move || loop {
                match r.read(&mut buf[have..]) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => have += n,
                }
                let mut at = 0;
                while let Ok(Some((op, used))) = wire::next(&buf[at..have], 1 << 20) {
                    match op {
                        Op::Msg {
                            headers, payload, ..
                        } => {
                            let why = match (wire::status(headers), wire::pub_ack(payload)) {
                                (Some(code), _) => Some(format!("status {code}")),
                                (None, Ok(PubAck::Stored { .. })) => None,
                                (None, Ok(PubAck::Refused { description, .. })) => {
                                    Some(description)
                                }
                                (None, Err(e)) => Some(e.to_string()),
                            };
                            match why {
                                None => {
                                    acked.fetch_add(1, Relaxed);
                                }
                                Some(w) => {
                                    *refused.lock().expect("refused") = Some(w);
                                    return;
                                }
                            }
                        }
                        Op::Ping => {
                            let _ = pong.write_all(wire::PONG);
                        }
                        Op::Pong => {
                            acked.store(u64::MAX / 2, Relaxed);
                        }
                        Op::Err(why) => {
                            *refused.lock().expect("refused") =
                                Some(String::from_utf8_lossy(why).into_owned());
                            return;
                        }
                        _ => {}
                    }
                    at += used;
                }
                buf.copy_within(at..have, 0);
                have -= at;
            })
        };
        let per_block = match rate {
            Some(r) => ((r / 1000.0) as usize).clamp(1, 256),
            None => 256,
        };
        let mut block = Block::new(stream, size, Framing::Newline, per_block)?;
        let mut out = Vec::new();
        let mut ids = Vec::new();
        let start = quanta::Instant::now();
        let mut sent = 0u64;
        let failed = |refused: &Mutex<Option<String>>| refused.lock().expect("refused").clone();
        while sent < count {
            if let Some(r) = rate {
                pace(start, sent, r);
            }
            let n = ((count - sent) as usize).min(per_block);
            if self.jetstream {
                while sent + n as u64 - acked.load(Relaxed).min(sent) > SEND_WINDOW {
                    if let Some(why) = failed(&refused) {
                        bail!("{server} refused a message: {why}");
                    }
                    if reader.is_finished() {
                        bail!("{server} closed the connection");
                    }
                    std::thread::sleep(Duration::from_micros(200));
                }
            }
            let frame = block.frame;
            let bytes = block.fill(sent, n, unix_ns());
            out.clear();
            for i in 0..n {
                let record = &bytes[i * frame..(i + 1) * frame - 1];
                let seq = sent + i as u64;
                if self.jetstream {
                    ids.clear();
                    let _ = write!(ids, "{inbox}{seq}");
                    let reply_end = ids.len();
                    let _ = write!(ids, "loadgen-{stream}-{seq}");
                    let (reply, id) = ids.split_at(reply_end);
                    wire::put_hpub(&mut out, self.subject.as_bytes(), reply, id, record);
                } else {
                    wire::put_pub(&mut out, self.subject.as_bytes(), record);
                }
            }
            s.write_all(&out)
                .with_context(|| format!("write to {server}"))?;
            sent += n as u64;
            progress.fetch_add(n as u64, Relaxed);
        }
        if !self.jetstream {
            // The PONG comes after everything before it was processed.
            s.write_all(wire::PING)?;
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while acked.load(Relaxed) < count {
            if let Some(why) = failed(&refused) {
                bail!("{server} refused a message: {why}");
            }
            if reader.is_finished() || std::time::Instant::now() > deadline {
                bail!("{server} acknowledged {} of {count}", acked.load(Relaxed));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let _ = s.shutdown(std::net::Shutdown::Both);
        Ok(())
    }
}
