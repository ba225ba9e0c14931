//! `nats`: each record published as one message to a NATS server, into
//! JetStream (acknowledged, deduplicated) or core NATS (fire and forget),
//! one connection per shard.
//!
//! A [`Publisher`] (the pipelining, window, acknowledgements and resends
//! every broker output shares) with the NATS [`Protocol`]:
//! - JetStream (`jetstream = true`, the default): each message is an HPUB
//!   with the header `Nats-Msg-Id: <sink>-<shard>-<batch segment>-<batch
//!   offset>-<index>`, the same when a batch is sent again (after a
//!   reconnect, or replayed from the disk buffer after a crash), so the
//!   stream's duplicate window drops a resend. It names a reply subject in
//!   the shard's own inbox, `_INBOX.<random>.<sequence>`, on which the
//!   server answers with a PubAck; a batch is delivered when every message
//!   in it was stored. A PubAck error with code 503 (JetStream unavailable,
//!   the stream full) ends the connection, which is opened again after a
//!   backoff and everything unacknowledged sent again; any other error, and
//!   a subject that no stream captures ("no responders"), refuses the
//!   message for good: a dead letter with the server's reason. "No
//!   responders" within JETSTREAM_READY_MS of connecting, before anything
//!   was stored, is taken for a JetStream still loading its streams after a
//!   restart and handled like a 503 PubAck (the reconnects this causes go
//!   on with the same wait, so a subject no stream captures is refused
//!   once it is over).
//! - Core NATS (`jetstream = false`): a PUB per message, delivered once
//!   written. The server acknowledges nothing: what it had not taken when a
//!   connection broke, or what no subscriber was there for, is gone.
//!
//! The handshake: the server's INFO, then (for `tls://` or a server that
//! requires it) TLS, then CONNECT and a PING whose PONG says the server
//! took the login (an `-ERR` before it says why not: logged, retried after
//! a backoff), and the inbox's SUB. The server's PINGs are answered.

use super::util::publisher::{Answer, Opened, Protocol, Publisher};
use super::util::template::Template;
use super::{Kind, PlanCx};
use crate::config::{expand_env, invalid, ConfigError, Redacted};
use crate::nats::{self as wire, Auth, Op, PubAck};
use crate::pipeline::{Ack, BatchId, SinkCtx};
use crate::record::meta::Field;
use crate::tls::Link;
use serde::Deserialize;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::io::Write;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

pub struct Sink;

/// The most messages a connection keeps unacknowledged by default.
pub const INFLIGHT_DEFAULT: u32 = 1000;
const INFLIGHT_MAX: u32 = 65_536;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const KEEP_ALIVE_S_DEFAULT: u16 = 30;
/// The server's largest message until its INFO says (nats-server's default).
const MAX_PAYLOAD_DEFAULT: usize = 1024 * 1024;

/// The keys of a nats sink.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `nats://HOST[:4222]` or `tls://HOST[:4222]`.
    pub url: Option<String>,
    pub subject: Option<String>,
    pub jetstream: Option<bool>,
    pub token: Option<String>,
    pub username: Option<String>,
    pub password: Option<String>,
    /// The connection's name in the server's monitoring (`-<shard>` added).
    pub name: Option<String>,
    pub inflight: Option<u32>,
    pub keep_alive_s: Option<u16>,
    pub tls: Option<crate::tls::TlsConfig>,
}

/// A nats sink as planned.
#[derive(Debug, Clone)]
pub struct Target {
    /// The url as configured (for logs).
    pub url: String,
    pub address: SocketAddr,
    pub subject: Template,
    pub jetstream: bool,
    pub auth: Login,
    pub name: String,
    pub inflight: u32,
    pub keep_alive_s: u16,
    /// TLS settings; `tls_always` for a `tls://` url (else TLS only when
    /// the server requires it, which needs these settings too).
    pub tls: Option<crate::tls::ClientTls>,
    pub tls_always: bool,
    /// The sink's name, which message ids start with.
    pub sink: String,
    /// Set per shard when the output is made: the shard (in message ids)
    /// and its reply inbox.
    pub shard: usize,
    pub inbox: String,
    /// The server's max_payload (from its INFO; shared by the shards).
    pub max_payload: Arc<AtomicUsize>,
    /// Whether this shard's connection has proved JetStream ready.
    pub ready: Arc<JetStreamWait>,
}

/// A shard's wait for JetStream after a connection opens: "no responders"
/// until JETSTREAM_READY_MS after it, with nothing stored since, means the
/// server's JetStream is still loading its streams (after a restart), not
/// that no stream captures the subject.
#[derive(Debug, Default)]
pub struct JetStreamWait {
    /// When (ms on [`clock_ms`]) the wait began; 0: a message was stored.
    since_ms: AtomicU64,
    /// A connection was ended here for an early "no responders", and
    /// since then nothing was stored, no connect failed and the wait did
    /// not end: the next connection goes on with the same wait rather than
    /// a new one (whatever ended the one before), so a subject no stream
    /// captures is refused once the wait is over.
    retrying: AtomicBool,
}

impl JetStreamWait {
    /// A connection opened. Any open but one while retrying for an early
    /// "no responders" starts a new wait: a CI run had a shard whose wait
    /// began at its first connection (nothing stored on that shard before
    /// the server stopped) expire by the time the server came back, and 39
    /// records were dead-lettered 50 ms after reconnecting.
    fn opened(&self) {
        if !self.retrying.load(Relaxed) || self.since_ms.load(Relaxed) == 0 {
            self.since_ms.store(clock_ms(), Relaxed);
        }
    }

    /// A connect failed: the server went away (restarting, perhaps), so
    /// the next connection waits anew.
    fn unreachable(&self) {
        self.retrying.store(false, Relaxed);
    }

    /// A message was stored: JetStream is ready on this connection.
    fn stored(&self) {
        if self.since_ms.load(Relaxed) != 0 {
            self.since_ms.store(0, Relaxed);
        }
        self.retrying.store(false, Relaxed);
    }

    /// "No responders": true if it is early (the connection is ended and
    /// everything sent again after a backoff), false if the subject is
    /// refused for good.
    fn early_no_responders(&self) -> bool {
        let since = self.since_ms.load(Relaxed);
        let early = since != 0 && clock_ms() < since + JETSTREAM_READY_MS;
        self.retrying.store(early, Relaxed);
        early
    }
}

/// How long after a connection opens, with nothing stored on it yet, a
/// "no responders" answer is taken for a JetStream still starting (the
/// connection is opened again after a backoff and everything sent again)
/// rather than for a subject no stream captures (a dead letter).
const JETSTREAM_READY_MS: u64 = 5_000;

/// Milliseconds since the first call (never 0).
fn clock_ms() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_millis() as u64
        + 1
}

/// How the sink logs in; secrets never printed.
#[derive(Debug, Clone)]
pub enum Login {
    None,
    Token(Redacted),
    User(Redacted, Redacted),
}

impl Login {
    fn auth(&self) -> Auth {
        match self {
            Login::None => Auth::None,
            Login::Token(t) => Auth::Token(t.0.clone()),
            Login::User(u, p) => Auth::User(u.0.clone(), p.0.clone()),
        }
    }
}

impl Kind for Sink {
    const NAME: &'static str = "nats";
    type Config = Config;
    type Target = Target;
    type Output = Publisher<Target>;

    fn plan(c: Config, cx: &PlanCx<'_>) -> Result<Target, ConfigError> {
        let url = c.url.ok_or_else(|| {
            invalid(cx.key("url"), "a nats sink needs a url (nats://HOST:4222)")
        })?;
        let server = crate::tls::endpoint(&url, &wire::SCHEMES).map_err(|m| invalid(cx.key("url"), m))?;
        let tls_always = server.tls;
        // A nats:// server may still require TLS: settings given for it are
        // kept for that case.
        let tls = match (&c.tls, tls_always) {
            (None, false) => None,
            (t, _) => {
                let e = crate::tls::Endpoint {
                    tls: true,
                    address: server.address,
                    host: server.host.clone(),
                };
                crate::tls::for_endpoint(&cx.key("tls"), &e, t.as_ref(), &wire::SCHEMES)?
            }
        };
        let subject = c
            .subject
            .ok_or_else(|| invalid(cx.key("subject"), "a nats sink needs a subject"))?;
        let subject = Template::parse(&subject).map_err(|m| invalid(cx.key("subject"), m))?;
        let text = subject.literal_text();
        if subject.fixed() == Some("") || text.len() > 4096 {
            return Err(invalid(cx.key("subject"), "1 to 4096 bytes"));
        }
        if text.contains(['*', '>']) || text.contains(char::is_whitespace) {
            return Err(invalid(
                cx.key("subject"),
                "a subject to publish to may not hold the wildcards * or >, or spaces",
            ));
        }
        if subject.fixed().is_some_and(|f| !tokens_ok(f.as_bytes())) || text.contains("..") {
            return Err(invalid(
                cx.key("subject"),
                "a subject's tokens may not be empty (a leading, trailing or double '.')",
            ));
        }
        let secret = |k: &str, v: &str| expand_env(v).map_err(|m| invalid(cx.key(k), m));
        let auth = match (c.token, c.username, c.password) {
            (None, None, None) => Login::None,
            (Some(t), None, None) => Login::Token(Redacted(secret("token", &t)?)),
            (None, Some(u), p) => Login::User(
                Redacted(secret("username", &u)?),
                Redacted(match p {
                    Some(p) => secret("password", &p)?,
                    None => String::new(),
                }),
            ),
            (None, None, Some(_)) => {
                return Err(invalid(cx.key("password"), "a password needs a username"))
            }
            (Some(_), _, _) => {
                return Err(invalid(
                    cx.key("token"),
                    "a token or a username and password, not both",
                ))
            }
        };
        let inflight = c.inflight.unwrap_or(INFLIGHT_DEFAULT);
        if inflight == 0 || inflight > INFLIGHT_MAX {
            return Err(invalid(
                cx.key("inflight"),
                format!("between 1 and {INFLIGHT_MAX}"),
            ));
        }
        let keep_alive_s = c.keep_alive_s.unwrap_or(KEEP_ALIVE_S_DEFAULT);
        if keep_alive_s == 0 {
            return Err(invalid(cx.key("keep_alive_s"), "at least 1"));
        }
        Ok(Target {
            url,
            address: server.address,
            subject,
            jetstream: c.jetstream.unwrap_or(true),
            auth,
            name: c.name.unwrap_or_else(|| format!("updraft-{}", cx.name)),
            inflight,
            keep_alive_s,
            tls,
            tls_always,
            sink: cx.name.to_string(),
            shard: 0,
            inbox: String::new(),
            max_payload: Arc::new(AtomicUsize::new(MAX_PAYLOAD_DEFAULT)),
            ready: Arc::default(),
        })
    }

    fn output(cx: &Rc<SinkCtx>, sink: usize, t: &Target, ack: Option<Ack>) -> Publisher<Target> {
        let mut t = t.clone();
        t.shard = cx.id;
        t.inbox = format!("_INBOX.{:016x}{:04x}.", fastrand::u64(..), cx.id);
        // Each shard's connection proves JetStream ready for itself: a
        // CI run saw one shard's message stored while another's, sent
        // before JetStream had loaded the stream, still got "no
        // responders" 110 ms after reconnecting (86 records dead-lettered).
        t.ready = Arc::default();
        Publisher::new(cx, sink, t, ack)
    }

    fn fields(t: &Target) -> Vec<(&'static str, Field)> {
        t.subject.fields().into_iter().map(|f| ("subject", f)).collect()
    }
}

/// Whether a subject to publish to is well formed: not empty, no empty
/// token (a leading, trailing or double '.'), no spaces, wildcards or NULs
/// (a server ends the connection over a malformed one, and refuses a
/// publish to a wildcard).
fn tokens_ok(subject: &[u8]) -> bool {
    !subject.is_empty()
        && subject.split(|c| *c == b'.').all(|t| !t.is_empty())
        && !subject
            .iter()
            .any(|&c| c.is_ascii_whitespace() || matches!(c, b'*' | b'>' | 0))
}

/// Reads from the connection until `done` finds what it waits for in the
/// bytes so far; returns them.
async fn read_until(
    link: &Link,
    mut buf: Vec<u8>,
    mut have: usize,
    deadline: tokio::time::Instant,
    what: &str,
    mut done: impl FnMut(&[u8]) -> Result<Option<usize>, String>,
) -> Result<(Vec<u8>, usize, usize), String> {
    loop {
        if let Some(used) = done(&buf[..have])? {
            return Ok((buf, have, used));
        }
        if have == buf.len() {
            if buf.len() > wire::MAX_LINE * 2 {
                return Err(format!("no {what} in the server's first {} bytes", buf.len()));
            }
            buf.resize(buf.len() * 2, 0);
        }
        let read = link.read(std::mem::take(&mut buf), have);
        let (res, b) = match tokio::time::timeout_at(deadline, read).await {
            Ok(r) => r,
            Err(_) => return Err(format!("no {what} within 10 s")),
        };
        buf = b;
        match res {
            Ok(0) => return Err(format!("the server closed the connection before {what}")),
            Ok(n) => have += n,
            Err(e) => return Err(e),
        }
    }
}

impl Target {
    async fn handshake(&self) -> Result<Opened, String> {
        let deadline = tokio::time::Instant::now() + CONNECT_TIMEOUT;
        let link = match tokio::time::timeout_at(deadline, Link::connect_plain(self.address)).await {
            Ok(l) => l?,
            Err(_) => return Err("connect timed out".into()),
        };
        // INFO, in the clear.
        let mut info = None;
        let (buf, have, used) = read_until(&link, vec![0u8; 4096], 0, deadline, "INFO", |b| {
            match wire::next(b, 0).map_err(|e| format!("{e} from the server"))? {
                Some((Op::Info(json), n)) => {
                    info = Some(wire::info(json).map_err(|e| e.to_string())?);
                    Ok(Some(n))
                }
                Some(_) => Err("the server did not begin with INFO".into()),
                None => Ok(None),
            }
        })
        .await?;
        let info = info.expect("read_until returned after INFO");
        if have > used {
            return Err("the server sent more than INFO before CONNECT".into());
        }
        drop(buf);
        if info.max_payload > 0 {
            self.max_payload.store(info.max_payload, Relaxed);
        }
        if self.jetstream && !info.headers {
            return Err(format!(
                "the server ({}) does not support headers, which JetStream publishing needs",
                info.version
            ));
        }
        let tls = self.tls_always || info.tls_required;
        let link = match (tls, &self.tls) {
            (false, _) => link,
            (true, Some(t)) => link.start_tls(t).await?,
            (true, None) => {
                return Err("the server requires TLS: use a tls:// url (and a tls table for its CA)".into())
            }
        };
        if info.auth_required && matches!(self.auth, Login::None) {
            tracing::warn!(url = %self.url, "the server asks for authentication and none is configured (token, or username and password)");
        }
        let mut hello = wire::connect(&format!("{}-{}", self.name, self.shard), tls, &self.auth.auth());
        if self.jetstream {
            hello.extend_from_slice(&wire::sub(&format!("{}*", self.inbox), 1));
            hello.extend_from_slice(wire::PING);
        }
        let n = hello.len();
        let (res, _) = link.write(hello, 0..n).await;
        res.map_err(|e| format!("cannot send CONNECT: {e}"))?;
        // PONG (or two, when the SUB was followed by its own PING): the
        // server took CONNECT (and the SUB). An -ERR says why not.
        let mut pongs = if self.jetstream { 2 } else { 1 };
        let (mut buf, have, used) = read_until(&link, vec![0u8; 4096], 0, deadline, "PONG", |b| {
            let mut at = 0;
            loop {
                match wire::next(&b[at..], MAX_PAYLOAD_DEFAULT)
                    .map_err(|e| format!("{e} from the server"))?
                {
                    Some((Op::Pong, n)) => {
                        at += n;
                        pongs -= 1;
                        if pongs == 0 {
                            return Ok(Some(at));
                        }
                    }
                    Some((Op::Err(why), _)) => {
                        return Err(format!(
                            "the server refused the connection: {}",
                            String::from_utf8_lossy(why)
                        ))
                    }
                    Some((_, n)) => at += n,
                    None => return Ok(None),
                }
            }
        })
        .await?;
        buf.copy_within(used..have, 0);
        buf.truncate(have - used);
        Ok(Opened {
            link,
            rest: buf,
            window: None,
        })
    }
}

impl Protocol for Target {
    const PEER: &'static str = "server";

    fn url(&self) -> &str {
        &self.url
    }

    fn window(&self) -> u32 {
        self.inflight
    }

    fn acknowledged(&self) -> bool {
        self.jetstream
    }

    fn keep_alive(&self) -> Duration {
        Duration::from_secs(u64::from(self.keep_alive_s))
    }

    fn seq_span(&self) -> u64 {
        u64::MAX / 2
    }

    fn ping(&self) -> &'static [u8] {
        wire::PING
    }

    fn goodbye(&self) -> &'static [u8] {
        b""
    }

    async fn open(&self, _cx: &SinkCtx, _epoch: u64) -> Result<Opened, String> {
        let opened = match self.handshake().await {
            Ok(o) => o,
            Err(e) => {
                self.ready.unreachable();
                return Err(e);
            }
        };
        self.ready.opened();
        Ok(opened)
    }

    fn encode(
        &self,
        scratch: &mut Vec<u8>,
        body: &mut Vec<u8>,
        seq: u64,
        id: BatchId,
        index: u32,
        record: &[u8],
        meta: &[u8],
    ) -> bool {
        scratch.clear();
        match self.subject.fixed() {
            Some(f) => scratch.extend_from_slice(f.as_bytes()),
            None => self.subject.render(record, meta, scratch),
        }
        let subject_end = scratch.len();
        let subject = &scratch[..subject_end];
        if subject.len() > 4096 || !tokens_ok(subject) {
            return false;
        }
        if !self.jetstream {
            if record.len() > self.max_payload.load(Relaxed) {
                return false;
            }
            wire::put_pub(body, &scratch[..subject_end], record);
            return true;
        }
        // The reply subject, then the message id, behind the subject.
        let _ = write!(scratch, "{}{seq}", self.inbox);
        let reply_end = scratch.len();
        let _ = write!(
            scratch,
            "{}-{}-{}-{}-{index}",
            self.sink, self.shard, id.segment, id.offset
        );
        if record.len() + 64 + scratch.len() > self.max_payload.load(Relaxed) {
            return false;
        }
        let (subject, rest) = scratch.split_at(subject_end);
        let (reply, msg_id) = rest.split_at(reply_end - subject_end);
        wire::put_hpub(body, subject, reply, msg_id, record);
        true
    }

    fn why_unsendable(&self) -> &'static str {
        "records longer than the server's max_payload, or whose subject renders empty, over 4096 bytes, with an empty token or with spaces"
    }

    fn mark_resend(&self, _body: &mut [u8], _at: usize) {}

    fn read(
        &self,
        buf: &[u8],
        _oldest: Option<u64>,
        _epoch: u64,
    ) -> Result<Option<(Answer, usize)>, String> {
        let Some((op, used)) = wire::next(buf, self.max_payload.load(Relaxed).max(MAX_PAYLOAD_DEFAULT))
            .map_err(|e| format!("{e} from the server"))?
        else {
            return Ok(None);
        };
        let answer = match op {
            Op::Ping => Answer::Reply(wire::PONG),
            Op::Err(why) => {
                return Err(format!(
                    "the server said: {}",
                    String::from_utf8_lossy(why)
                ))
            }
            Op::Msg {
                subject,
                headers,
                payload,
                ..
            } => {
                let seq = subject
                    .strip_prefix(self.inbox.as_bytes())
                    .and_then(|s| std::str::from_utf8(s).ok())
                    .and_then(|s| s.parse::<u64>().ok());
                match seq {
                    None => Answer::Nothing,
                    Some(seq) => match wire::status(headers) {
                        Some(503) => {
                            if self.ready.early_no_responders() {
                                return Err("no responders (503) with nothing stored yet since connecting: JetStream may still be loading its streams".into());
                            }
                            Answer::Refused(
                                seq,
                                "no stream captures the subject (503 no responders)".into(),
                            )
                        }
                        Some(code) if payload.is_empty() => {
                            Answer::Refused(seq, format!("status {code}"))
                        }
                        _ => match wire::pub_ack(payload).map_err(|e| format!("{e} from the server"))? {
                            PubAck::Stored { .. } => {
                                self.ready.stored();
                                Answer::Acked(seq)
                            }
                            PubAck::Refused {
                                code: 503,
                                description,
                                ..
                            } => {
                                // JetStream cannot store it now (unavailable,
                                // the stream full): everything unacknowledged
                                // goes again after a backoff.
                                return Err(format!("JetStream: {description} (503)"));
                            }
                            PubAck::Refused {
                                code,
                                err_code,
                                description,
                            } => Answer::Refused(
                                seq,
                                format!("JetStream: {description} ({code}, err_code {err_code})"),
                            ),
                        },
                    },
                }
            }
            Op::Info(_) | Op::Pong | Op::Ok => Answer::Nothing,
        };
        Ok(Some((answer, used)))
    }
}
