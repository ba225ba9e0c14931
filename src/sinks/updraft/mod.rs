//! `updraft`: batches forwarded to another updraft (an aggregator's
//! `updraft` source) over the native protocol ([`crate::native`]), one
//! connection per shard, each batch acknowledged once it is durable there.
//!
//! A [`Publisher`] (window, acknowledgements, resends after a reconnect)
//! whose messages are whole batches: a batch read back from the disk buffer
//! is sent as the log holds it (its archive, never re-encoded); a batch of a
//! memory buffer is archived once. A batch's frame id is its stable id in
//! the log, so a batch sent again (after a reconnect, or replayed after a
//! crash) is recognised by the aggregator, which acknowledges it without
//! taking its records twice. The aggregator tells this shard apart from
//! others by the sender id (random, kept in the shard's log directory
//! `data_dir/<sink>/<shard>/sender-id` with a disk buffer, so that it
//! survives a restart; new at every start with a memory buffer, which has
//! nothing to replay) and the shard's number.

use super::util::publisher::{Answer, Opened, Protocol, Publisher};
use super::{Kind, PlanCx};
use crate::config::{invalid, ConfigError};
use crate::native::{self as wire, Hello, Welcome};
use crate::pipeline::{Ack, BatchId, SinkCtx};
use crate::record::BatchView;
use crate::tls::Link;
use serde::Deserialize;
use std::cell::Cell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

pub struct Sink;

/// Batches a connection keeps unacknowledged by default, and at most. A
/// shard holds a copy of each until acknowledged (up to `inflight` ×
/// `batch.max_bytes`); an aggregator with a disk buffer acknowledges once
/// its log is synced, so the window must carry more than a sync's worth.
pub const INFLIGHT_DEFAULT: u32 = 16;
const INFLIGHT_MAX: u32 = 256;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const KEEP_ALIVE_S_DEFAULT: u16 = 30;
/// The default port of the native protocol (`updraft://` and `updrafts://`).
pub const PORT_DEFAULT: u16 = 9800;

pub const SCHEMES: crate::tls::Schemes = crate::tls::Schemes {
    plain: ("updraft", PORT_DEFAULT),
    tls: ("updrafts", PORT_DEFAULT),
    peer: "aggregator",
};

/// The keys of an updraft sink.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `updraft://HOST[:9800]` or `updrafts://HOST[:9800]` (TLS).
    pub url: Option<String>,
    pub inflight: Option<u32>,
    pub keep_alive_s: Option<u16>,
    pub tls: Option<crate::tls::TlsConfig>,
}

/// An updraft sink as planned.
#[derive(Debug, Clone)]
pub struct Target {
    /// The url as configured (for logs).
    pub url: String,
    pub address: SocketAddr,
    pub tls: Option<crate::tls::ClientTls>,
    pub inflight: u32,
    pub keep_alive_s: u16,
}

impl Kind for Sink {
    const NAME: &'static str = "updraft";
    // The aggregator drops a frame at or below the highest id it took.
    const IN_ID_ORDER: bool = true;
    type Config = Config;
    type Target = Target;
    type Output = Publisher<Session>;

    fn plan(c: Config, cx: &PlanCx<'_>) -> Result<Target, ConfigError> {
        let url = c.url.ok_or_else(|| {
            invalid(
                cx.key("url"),
                format!("an updraft sink needs a url (updraft://HOST:{PORT_DEFAULT})"),
            )
        })?;
        let e = crate::tls::endpoint(&url, &SCHEMES).map_err(|m| invalid(cx.key("url"), m))?;
        let tls = crate::tls::for_endpoint(&cx.key("tls"), &e, c.tls.as_ref(), &SCHEMES)?;
        let inflight = c.inflight.unwrap_or(INFLIGHT_DEFAULT);
        if inflight == 0 || inflight > INFLIGHT_MAX {
            return Err(invalid(
                cx.key("inflight"),
                format!("between 1 and {INFLIGHT_MAX} batches"),
            ));
        }
        let keep_alive_s = c.keep_alive_s.unwrap_or(KEEP_ALIVE_S_DEFAULT);
        if keep_alive_s == 0 {
            return Err(invalid(cx.key("keep_alive_s"), "at least 1"));
        }
        Ok(Target {
            url,
            address: e.address,
            tls,
            inflight,
            keep_alive_s,
        })
    }

    fn output(cx: &Rc<SinkCtx>, sink: usize, t: &Target, ack: Option<Ack>) -> Publisher<Session> {
        let plan = &cx.plan.sinks[sink];
        let sender = match plan.buffer.kind {
            crate::config::BufferKind::Disk => {
                sender_id(&plan.buffer.dir.join(cx.id.to_string()).join("sender-id"))
            }
            crate::config::BufferKind::Memory => fastrand::u64(1..),
        };
        let s = Session {
            t: t.clone(),
            sender,
            stream: cx.id as u32,
            max_frame: Cell::new(u32::MAX),
        };
        Publisher::new(cx, sink, s, ack)
    }
}

/// The sender id kept at `path`, made (and kept) the first time. Read once
/// at start, before the shard takes records. If the file cannot be kept, a
/// new id serves this run: the aggregator may then take what is replayed
/// after a restart twice.
fn sender_id(path: &std::path::Path) -> u64 {
    if let Some(id) = std::fs::read_to_string(path)
        .ok()
        .and_then(|s| u64::from_str_radix(s.trim(), 16).ok())
        .filter(|&id| id != 0)
    {
        return id;
    }
    let id = fastrand::u64(1..);
    let tmp = path.with_extension("tmp");
    let kept = std::fs::write(&tmp, format!("{id:016x}\n"))
        .and_then(|()| std::fs::File::open(&tmp)?.sync_all())
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = kept {
        tracing::warn!(path = %path.display(), error = %e,
            "cannot keep the sender id; the aggregator may take batches replayed after a restart twice");
    }
    id
}

/// One shard's side of the protocol.
pub struct Session {
    t: Target,
    sender: u64,
    stream: u32,
    /// The longest archive the aggregator takes (from its WELCOME).
    max_frame: Cell<u32>,
}

impl Protocol for Session {
    const PEER: &'static str = "aggregator";

    fn url(&self) -> &str {
        &self.t.url
    }

    fn window(&self) -> u32 {
        self.t.inflight
    }

    fn acknowledged(&self) -> bool {
        true
    }

    fn keep_alive(&self) -> Duration {
        Duration::from_secs(u64::from(self.t.keep_alive_s))
    }

    fn seq_span(&self) -> u64 {
        u64::MAX
    }

    fn ping(&self) -> &'static [u8] {
        &wire::PING
    }

    fn goodbye(&self) -> &'static [u8] {
        &[]
    }

    async fn open(&self, _cx: &SinkCtx, _epoch: u64) -> Result<Opened, String> {
        let deadline = tokio::time::Instant::now() + CONNECT_TIMEOUT;
        let connect = Link::connect(self.t.address, self.t.tls.as_ref());
        let link = match tokio::time::timeout_at(deadline, connect).await {
            Ok(l) => l?,
            Err(_) => return Err("connect timed out".into()),
        };
        let hello = Hello {
            version: wire::VERSION,
            window: self.t.inflight,
            sender: self.sender,
            stream: self.stream,
        }
        .encode()
        .to_vec();
        let (res, _) = link.write(hello, 0..wire::HELLO_BYTES).await;
        res.map_err(|e| format!("cannot send the greeting: {e}"))?;
        let mut buf = vec![0u8; 4096];
        let mut have = 0;
        let welcome = loop {
            if let Some(w) = Welcome::decode(&buf[..have])? {
                break w;
            }
            let read = link.read(std::mem::take(&mut buf), have);
            let (res, b) = match tokio::time::timeout_at(deadline, read).await {
                Ok(r) => r,
                Err(_) => return Err("no greeting from the aggregator within 10 s".into()),
            };
            buf = b;
            match res {
                Ok(0) => return Err("the aggregator closed the connection before its greeting".into()),
                Ok(n) => have += n,
                Err(e) => return Err(e),
            }
        };
        if !welcome.accepted {
            return Err(format!(
                "the aggregator speaks version {} of the updraft protocol and refused ours ({})",
                welcome.version,
                wire::VERSION
            ));
        }
        self.max_frame.set(welcome.max_frame);
        buf.truncate(have);
        buf.drain(..wire::WELCOME_BYTES);
        Ok(Opened {
            link,
            rest: buf,
            window: Some(welcome.window.max(1)),
        })
    }

    fn encode(
        &self,
        _scratch: &mut Vec<u8>,
        _body: &mut Vec<u8>,
        _seq: u64,
        _id: BatchId,
        _index: u32,
        _record: &[u8],
        _meta: &[u8],
    ) -> bool {
        unreachable!("the updraft protocol sends whole batches")
    }

    fn why_unsendable(&self) -> &'static str {
        "a batch longer than the aggregator's max_frame_bytes"
    }

    fn mark_resend(&self, _body: &mut [u8], _at: usize) {}

    fn frames(&self) -> bool {
        true
    }

    fn encode_frame(&self, body: &mut Vec<u8>, seq: u64, id: BatchId, batch: &BatchView<'_>) -> bool {
        let records = batch.len() as u32;
        let fits = |len: usize| len <= self.max_frame.get() as usize;
        match *batch {
            BatchView::Framed { archive, .. } => {
                if !fits(archive.len()) {
                    return false;
                }
                wire::put_frame(body, seq, id.segment, id.offset, records, archive);
            }
            BatchView::Native(b) => {
                // Archived straight into the message, behind its header.
                let at = wire::begin_frame(body);
                match rkyv::api::high::to_bytes_in::<_, rkyv::rancor::Error>(b, std::mem::take(body)) {
                    Ok(v) => *body = v,
                    Err(_) => return false,
                }
                if !fits(body.len() - at - wire::FRAME_HEADER_BYTES) {
                    body.truncate(at);
                    return false;
                }
                wire::finish_frame(body, at, seq, id.segment, id.offset, records);
            }
            // Only the disk buffer reads archives, and it hands their bytes.
            BatchView::Archived(_) => return false,
        }
        true
    }

    fn read(
        &self,
        buf: &[u8],
        _oldest: Option<u64>,
        _epoch: u64,
    ) -> Result<Option<(Answer, usize)>, String> {
        match wire::read_answer(buf)? {
            None => Ok(None),
            Some((wire::Answer::Ack { seq, .. }, n)) => Ok(Some((Answer::Acked(seq), n))),
            Some((wire::Answer::Error(why), _)) => Err(format!("the aggregator refused: {why}")),
        }
    }
}
