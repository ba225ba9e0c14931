//! `receive --proto http`: an ingest endpoint that verifies what it is sent
//! and can behave like a real one under load.
//!
//! Every `POST` body (identity, gzip or zstd by `Content-Encoding`) is split
//! into lines; a line is a loadgen record, or an NDJSON object whose
//! `message` is one. The knobs of an overloaded endpoint:
//!
//! - `--latency-ms`: each request is held this long before its answer;
//! - `--capacity N`: at most N requests are served at once; one more gets
//!   429 at once (`--over-capacity reject`, with `Retry-After` when
//!   `--retry-after-s` is set) or waits for a free slot (`queue`, so latency
//!   grows with the load);
//! - `--fail-rate F`: that share of requests gets 500 (records not counted);
//! - `--outage-after-s S --outage-s D`: from S seconds after the first
//!   request, for D seconds, connections are closed without an answer;
//! - `--bad-request-at K`: the K-th request is answered 400 (not counted),
//!   to exercise dead letters;
//! - `--dedup-header NAME`: a request whose NAME value was already answered
//!   2xx is answered 200 and its records are not counted again;
//! - `--require-header "NAME: VALUE"`: a request without it gets 401;
//! - `--save FILE`: every accepted body, decompressed, is appended to FILE;
//! - `--expect-path /x/{stream}`: records that came in a request to another
//!   path than their stream's are counted (`wrong_path`).
//!
//! With `--tls-cert` and `--tls-key` (PEM) it serves HTTPS (rustls).

use crate::Tracker;
use anyhow::{Context, Result};
use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum, Debug)]
pub enum OverCapacity {
    Reject,
    Queue,
}

#[derive(clap::Args, Clone, Debug)]
pub struct HttpArgs {
    /// HTTP: hold each request this long before answering.
    #[arg(long, default_value_t = 0)]
    pub latency_ms: u64,
    /// HTTP: requests served at once (0 = no limit).
    #[arg(long, default_value_t = 0)]
    pub capacity: usize,
    /// HTTP: what a request beyond --capacity gets.
    #[arg(long, value_enum, default_value = "reject")]
    pub over_capacity: OverCapacity,
    /// HTTP: Retry-After (seconds) sent with 429.
    #[arg(long)]
    pub retry_after_s: Option<u64>,
    /// HTTP: share of requests answered 500.
    #[arg(long, default_value_t = 0.0)]
    pub fail_rate: f64,
    /// HTTP: start of an outage, seconds after the first request.
    #[arg(long)]
    pub outage_after_s: Option<f64>,
    /// HTTP: length of the outage.
    #[arg(long, default_value_t = 10.0)]
    pub outage_s: f64,
    /// HTTP: answer the K-th request (1-based) with 400.
    #[arg(long)]
    pub bad_request_at: Option<u64>,
    /// HTTP: skip the records of a request whose value of this header was
    /// already answered 2xx.
    #[arg(long)]
    pub dedup_header: Option<String>,
    /// HTTP: answer 401 to a request that lacks this header ("Name: value").
    #[arg(long)]
    pub require_header: Option<String>,
    /// HTTP: append every accepted body, decompressed, to this file (to
    /// look at what a sink sent: its encoding, its fields).
    #[arg(long)]
    pub save: Option<std::path::PathBuf>,
    /// HTTP: the request path each record must come in (`{stream}` is its
    /// stream: `/ingest/d{stream}`); others are counted as `wrong_path`.
    #[arg(long)]
    pub expect_path: Option<String>,
    /// HTTPS: certificate chain (PEM).
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<std::path::PathBuf>,
    /// HTTPS: private key (PEM).
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<std::path::PathBuf>,
}

/// What the endpoint answered, for the summary.
#[derive(Default, Debug, serde::Serialize)]
pub struct HttpStats {
    pub requests: u64,
    pub ok: u64,
    pub throttled: u64,
    pub failed: u64,
    pub bad_requests: u64,
    pub unauthorized: u64,
    pub deduplicated: u64,
    pub dropped_in_outage: u64,
    pub max_concurrent: u64,
    pub body_bytes: u64,
    pub plain_bytes: u64,
    pub wrong_path: u64,
}

#[derive(Default)]
struct Counters {
    unauthorized: AtomicU64,
    requests: AtomicU64,
    ok: AtomicU64,
    throttled: AtomicU64,
    failed: AtomicU64,
    bad_requests: AtomicU64,
    deduplicated: AtomicU64,
    dropped_in_outage: AtomicU64,
    max_concurrent: AtomicU64,
    body_bytes: AtomicU64,
    plain_bytes: AtomicU64,
    wrong_path: AtomicU64,
}

pub struct Endpoint {
    args: HttpArgs,
    tracker: Arc<Mutex<Tracker>>,
    counters: Counters,
    active: AtomicUsize,
    /// Queue mode: the number of requests being served, and a wake-up.
    slots: (Mutex<usize>, Condvar),
    first_request: Mutex<Option<Instant>>,
    seen_keys: Mutex<HashSet<Vec<u8>>>,
    tls: Option<Arc<rustls::ServerConfig>>,
}

impl Endpoint {
    pub fn new(args: HttpArgs, tracker: Arc<Mutex<Tracker>>) -> Result<Endpoint> {
        let tls = match (&args.tls_cert, &args.tls_key) {
            (Some(c), Some(k)) => Some(server_config(c, k)?),
            _ => None,
        };
        Ok(Endpoint {
            args,
            tracker,
            counters: Counters::default(),
            active: AtomicUsize::new(0),
            slots: (Mutex::new(0), Condvar::new()),
            first_request: Mutex::new(None),
            seen_keys: Mutex::new(HashSet::new()),
            tls,
        })
    }

    pub fn stats(&self) -> HttpStats {
        let c = &self.counters;
        HttpStats {
            requests: c.requests.load(Relaxed),
            ok: c.ok.load(Relaxed),
            throttled: c.throttled.load(Relaxed),
            failed: c.failed.load(Relaxed),
            bad_requests: c.bad_requests.load(Relaxed),
            unauthorized: c.unauthorized.load(Relaxed),
            deduplicated: c.deduplicated.load(Relaxed),
            dropped_in_outage: c.dropped_in_outage.load(Relaxed),
            max_concurrent: c.max_concurrent.load(Relaxed),
            body_bytes: c.body_bytes.load(Relaxed),
            plain_bytes: c.plain_bytes.load(Relaxed),
            wrong_path: c.wrong_path.load(Relaxed),
        }
    }

    fn in_outage(&self) -> bool {
        let Some(after) = self.args.outage_after_s else {
            return false;
        };
        let Some(first) = *self.first_request.lock().expect("lock") else {
            return false;
        };
        let t = first.elapsed().as_secs_f64();
        t >= after && t < after + self.args.outage_s
    }

    /// Serves connections from `listener` until `stop`.
    pub fn serve(
        self: Arc<Self>,
        listener: std::net::TcpListener,
        stop: Arc<AtomicBool>,
    ) -> Result<()> {
        while !stop.load(Relaxed) {
            match listener.accept() {
                Ok((conn, _)) => {
                    if self.in_outage() {
                        self.counters.dropped_in_outage.fetch_add(1, Relaxed);
                        drop(conn);
                        continue;
                    }
                    conn.set_nonblocking(false)?;
                    let _ = conn.set_nodelay(true);
                    let me = self.clone();
                    std::thread::spawn(move || me.connection(conn));
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(2))
                }
                Err(e) => return Err(e).context("accept"),
            }
        }
        Ok(())
    }

    fn connection(&self, conn: TcpStream) {
        let _ = conn.set_read_timeout(Some(Duration::from_secs(60)));
        match &self.tls {
            Some(cfg) => {
                let Ok(tls) = rustls::ServerConnection::new(cfg.clone()) else {
                    return;
                };
                let mut s = rustls::StreamOwned::new(tls, conn);
                let _ = self.requests(&mut s);
            }
            None => {
                let mut s = conn;
                let _ = self.requests(&mut s);
            }
        }
    }

    /// Reads requests off one connection and answers them.
    fn requests<S: Read + Write>(&self, s: &mut S) -> std::io::Result<()> {
        let mut buf = vec![0u8; 64 * 1024];
        let mut filled = 0;
        let mut plain = Vec::new();
        loop {
            // The head.
            let (head_len, content_length, encoding, key, authorized, path) = loop {
                let mut headers = [httparse::EMPTY_HEADER; 64];
                let mut req = httparse::Request::new(&mut headers);
                match req.parse(&buf[..filled]) {
                    Ok(httparse::Status::Complete(n)) => {
                        let mut len = 0usize;
                        let mut enc = String::new();
                        let mut key = None;
                        let required = self
                            .args
                            .require_header
                            .as_deref()
                            .and_then(|r| r.split_once(':'));
                        let mut authorized = required.is_none();
                        for h in req.headers.iter() {
                            if let Some((name, value)) = required {
                                if h.name.eq_ignore_ascii_case(name.trim())
                                    && h.value == value.trim().as_bytes()
                                {
                                    authorized = true;
                                }
                            }
                            if h.name.eq_ignore_ascii_case("content-length") {
                                len = std::str::from_utf8(h.value)
                                    .ok()
                                    .and_then(|v| v.trim().parse().ok())
                                    .unwrap_or(0);
                            } else if h.name.eq_ignore_ascii_case("content-encoding") {
                                enc = String::from_utf8_lossy(h.value).to_ascii_lowercase();
                            } else if self
                                .args
                                .dedup_header
                                .as_deref()
                                .is_some_and(|d| h.name.eq_ignore_ascii_case(d))
                            {
                                key = Some(h.value.to_vec());
                            }
                        }
                        let path = req.path.unwrap_or("").to_string();
                        break (n, len, enc, key, authorized, path);
                    }
                    Ok(httparse::Status::Partial) => {
                        if filled == buf.len() {
                            buf.resize(buf.len() * 2, 0);
                        }
                        let n = s.read(&mut buf[filled..])?;
                        if n == 0 {
                            return Ok(());
                        }
                        filled += n;
                    }
                    Err(_) => {
                        s.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 11\r\nConnection: close\r\n\r\nbad request")?;
                        return Ok(());
                    }
                }
            };
            // The body.
            let total = head_len + content_length;
            if buf.len() < total {
                buf.resize(total, 0);
            }
            while filled < total {
                let n = s.read(&mut buf[filled..total])?;
                if n == 0 {
                    return Ok(());
                }
                filled += n;
            }
            self.first_request
                .lock()
                .expect("lock")
                .get_or_insert_with(Instant::now);
            if self.in_outage() {
                self.counters.dropped_in_outage.fetch_add(1, Relaxed);
                return Ok(()); // closed without an answer
            }
            let n = self.counters.requests.fetch_add(1, Relaxed) + 1;
            self.counters
                .body_bytes
                .fetch_add(content_length as u64, Relaxed);
            let answer = if authorized {
                self.handle(n, &buf[head_len..total], &encoding, key, &mut plain, &path)
            } else {
                self.counters.unauthorized.fetch_add(1, Relaxed);
                "HTTP/1.1 401 Unauthorized\r\nContent-Length: 12\r\n\r\nunauthorized".to_string()
            };
            s.write_all(answer.as_bytes())?;
            s.flush()?;
            buf.copy_within(total..filled, 0);
            filled -= total;
        }
    }

    fn handle(
        &self,
        n: u64,
        body: &[u8],
        encoding: &str,
        key: Option<Vec<u8>>,
        plain: &mut Vec<u8>,
        path: &str,
    ) -> String {
        let a = &self.args;
        // Capacity.
        let active = self.active.fetch_add(1, Relaxed) + 1;
        self.counters
            .max_concurrent
            .fetch_max(active as u64, Relaxed);
        let answer = (|| {
            if a.capacity > 0 && active > a.capacity && a.over_capacity == OverCapacity::Reject {
                self.counters.throttled.fetch_add(1, Relaxed);
                return match a.retry_after_s {
                    Some(s) => format!("HTTP/1.1 429 Too Many Requests\r\nRetry-After: {s}\r\nContent-Length: 4\r\n\r\nbusy"),
                    None => "HTTP/1.1 429 Too Many Requests\r\nContent-Length: 4\r\n\r\nbusy".to_string(),
                };
            }
            let queued = a.capacity > 0 && a.over_capacity == OverCapacity::Queue;
            if queued {
                let (m, cv) = &self.slots;
                let mut busy = m.lock().expect("lock");
                while *busy >= a.capacity {
                    busy = cv.wait(busy).expect("lock");
                }
                *busy += 1;
            }
            if a.latency_ms > 0 {
                std::thread::sleep(Duration::from_millis(a.latency_ms));
            }
            let answer = self.accept(n, body, encoding, key, plain, path);
            if queued {
                let (m, cv) = &self.slots;
                *m.lock().expect("lock") -= 1;
                cv.notify_one();
            }
            answer
        })();
        self.active.fetch_sub(1, Relaxed);
        answer
    }

    fn accept(
        &self,
        n: u64,
        body: &[u8],
        encoding: &str,
        key: Option<Vec<u8>>,
        plain: &mut Vec<u8>,
        path: &str,
    ) -> String {
        let a = &self.args;
        if a.bad_request_at == Some(n) {
            self.counters.bad_requests.fetch_add(1, Relaxed);
            return "HTTP/1.1 400 Bad Request\r\nContent-Length: 25\r\n\r\nrejected by --bad-request".to_string();
        }
        if a.fail_rate > 0.0 && fastrand::f64() < a.fail_rate {
            self.counters.failed.fetch_add(1, Relaxed);
            return "HTTP/1.1 500 Internal Server Error\r\nContent-Length: 4\r\n\r\noops"
                .to_string();
        }
        plain.clear();
        let decoded: &[u8] = match encoding {
            "" | "identity" => body,
            "gzip" => {
                if flate2::read::GzDecoder::new(body)
                    .read_to_end(plain)
                    .is_err()
                {
                    return "HTTP/1.1 400 Bad Request\r\nContent-Length: 8\r\n\r\nbad gzip"
                        .to_string();
                }
                plain
            }
            "zstd" => match zstd::stream::read::Decoder::new(body)
                .and_then(|mut d| d.read_to_end(plain))
            {
                Ok(_) => plain,
                Err(_) => {
                    return "HTTP/1.1 400 Bad Request\r\nContent-Length: 8\r\n\r\nbad zstd"
                        .to_string()
                }
            },
            _ => {
                return "HTTP/1.1 415 Unsupported Media Type\r\nContent-Length: 0\r\n\r\n"
                    .to_string()
            }
        };
        self.counters
            .plain_bytes
            .fetch_add(decoded.len() as u64, Relaxed);
        if let Some(k) = key {
            let mut seen = self.seen_keys.lock().expect("lock");
            if seen.contains(&k) {
                self.counters.deduplicated.fetch_add(1, Relaxed);
                self.counters.ok.fetch_add(1, Relaxed);
                return "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n".to_string();
            }
            seen.insert(k);
        }
        if let Some(path) = &a.save {
            let saved = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .and_then(|mut f| f.write_all(decoded));
            if let Err(e) = saved {
                eprintln!("cannot append to {}: {e}", path.display());
            }
        }
        let mut parsed = Vec::new();
        let mut malformed = 0;
        for line in decoded.split(|&b| b == b'\n') {
            if line.is_empty() {
                continue;
            }
            let record = if line.starts_with(b"{") {
                message_of(line)
            } else {
                Some(line)
            };
            match record.and_then(crate::parse_record) {
                Some(r) => parsed.push(r),
                None => malformed += 1,
            }
        }
        if let Some(e) = a.expect_path.as_deref() {
            let e = crate::mqtt::ExpectTopic::new(e);
            let wrong = parsed
                .iter()
                .filter(|r| !e.matches(path.as_bytes(), r.0))
                .count();
            self.counters.wrong_path.fetch_add(wrong as u64, Relaxed);
        }
        self.tracker
            .lock()
            .expect("tracker")
            .apply(&parsed, malformed, decoded.len() as u64);
        self.counters.ok.fetch_add(1, Relaxed);
        "HTTP/1.1 204 No Content\r\n\r\n".to_string()
    }
}

/// The `message` string of an NDJSON line (loadgen records need no
/// unescaping).
fn message_of(line: &[u8]) -> Option<&[u8]> {
    let key = b"\"message\":\"";
    let at = memchr::memmem::find(line, key)? + key.len();
    let end = memchr::memchr(b'"', &line[at..])?;
    Some(&line[at..at + end])
}

fn server_config(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<Arc<rustls::ServerConfig>> {
    use rustls_pki_types::pem::PemObject;
    let certs = rustls_pki_types::CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("read {}", cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parse {}", cert.display()))?;
    let key = rustls_pki_types::PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("read {}", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    Ok(Arc::new(cfg))
}
