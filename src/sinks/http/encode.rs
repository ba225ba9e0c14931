//! Request bodies: a batch encoded, then compressed, into a reused buffer.
//!
//! Encodings (config `encoding`), one line per record:
//!
//! - `raw`: the records as they came, each followed by `\n` (the batch's
//!   payload as it lies: one copy per batch, none per record);
//! - `ndjson`: `{"timestamp":"<RFC 3339, ns, UTC>","source":"<name>","message":"<record>"}`,
//!   the record JSON-escaped; bytes that are not UTF-8 become U+FFFD;
//! - `influx`: InfluxDB line protocol. A record that already ends in a
//!   timestamp is sent as it is; one without gets the collector's receive
//!   time (ns) appended, so a replay after a crash writes the same point
//!   again rather than a new one. A record that is not line protocol (no
//!   field set) is dropped and counted (`reason="encode"`).
//!
//! Compression (config `compression`): `none`, `gzip` (RFC 1952 around a
//! reused raw-deflate stream, level 1: an edge box's CPU is the scarce
//! resource) or `zstd` (a reused context, level 1). The compressors are made
//! once per sink and shard and reset per batch: nothing is allocated per
//! record, and per batch only when a buffer must grow past its largest size
//! so far.

use super::config::{Compression, Encoding};
use crate::codec::index::Parsed;
use crate::codec::influx::{self, Line};
use crate::codec::syslog::Syslog;
use crate::record::{meta, BatchView};

/// What encoding one batch did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Encoded {
    /// Records in the body.
    pub records: usize,
    /// Records left out (not valid for the encoding).
    pub dropped: usize,
    /// Bytes before compression.
    pub plain_bytes: usize,
}

/// One sink's encoder on one shard.
pub struct Encoder {
    encoding: Encoding,
    compression: Compression,
    /// Encoded, not yet compressed (unused for raw, which reads the payload).
    scratch: Vec<u8>,
    zstd: Option<zstd::bulk::Compressor<'static>>,
    deflate: Option<flate2::Compress>,
    /// Source names by index (ndjson's `source`).
    sources: Vec<String>,
    /// A line protocol key or value without its escapes (reused).
    unescaped: Vec<u8>,
}

impl Encoder {
    /// How many source names it labels records with.
    pub fn sources(&self) -> usize {
        self.sources.len()
    }

    /// The names records are labelled with, by source id (a reload added some).
    pub fn set_sources(&mut self, sources: Vec<String>) {
        self.sources = sources;
    }

    pub fn new(encoding: Encoding, compression: Compression, sources: Vec<String>) -> Encoder {
        Encoder {
            encoding,
            compression,
            scratch: Vec::new(),
            zstd: match compression {
                Compression::Zstd => {
                    Some(zstd::bulk::Compressor::new(1).expect("zstd level 1 is valid"))
                }
                _ => None,
            },
            deflate: match compression {
                Compression::Gzip => {
                    Some(flate2::Compress::new(flate2::Compression::fast(), false))
                }
                _ => None,
            },
            sources,
            unescaped: Vec::new(),
        }
    }

    /// The `Content-Encoding` header value, if any.
    pub fn content_encoding(&self) -> Option<&'static str> {
        match self.compression {
            Compression::None => None,
            Compression::Gzip => Some("gzip"),
            Compression::Zstd => Some("zstd"),
        }
    }

    /// The `Content-Type` header value.
    pub fn content_type(&self) -> &'static str {
        match self.encoding {
            Encoding::Raw | Encoding::Influx => "text/plain; charset=utf-8",
            Encoding::Ndjson => "application/x-ndjson",
        }
    }

    /// Appends the body for `batch` to `out` (whatever `out` holds already,
    /// such as room for the request head, stays in front).
    pub fn encode(&mut self, batch: BatchView<'_>, out: &mut Vec<u8>) -> Encoded {
        self.encode_some(batch, out, None)
    }

    /// As [`encode`](Self::encode), with `only = Some((groups, g))` only the
    /// records `i` with `groups[i] == g` (one request of a batch split by
    /// destination).
    pub fn encode_some(
        &mut self,
        batch: BatchView<'_>,
        out: &mut Vec<u8>,
        only: Option<(&[u16], u16)>,
    ) -> Encoded {
        let mut done = Encoded::default();
        let mut i = 0usize;
        let mut take = move || {
            i += 1;
            only.is_none_or(|(groups, g)| groups.get(i - 1) == Some(&g))
        };
        let plain: &[u8] = if self.encoding == Encoding::Raw && only.is_none() {
            done.records = batch.len();
            batch.payload()
        } else {
            let target = if self.compression == Compression::None {
                &mut *out
            } else {
                self.scratch.clear();
                &mut self.scratch
            };
            let before = target.len();
            match self.encoding {
                Encoding::Raw => batch.for_each(|_, _, r, _| {
                    if take() {
                        target.extend_from_slice(r);
                        target.push(b'\n');
                        done.records += 1;
                    }
                }),
                Encoding::Ndjson => {
                    let mut second = SecondPrefix::default();
                    let unescaped = &mut self.unescaped;
                    batch.for_each(|ts, source, r, meta| {
                        if !take() {
                            return;
                        }
                        let name = self.sources.get(source as usize).map_or("", String::as_str);
                        match fields(meta) {
                            Some(Parsed::Syslog(m)) => {
                                syslog_ndjson(target, ts, name, r, &m, &mut second)
                            }
                            Some(Parsed::Influx(l)) => {
                                influx_ndjson(target, ts, name, r, &l, &mut second, unescaped)
                            }
                            Some(Parsed::Json) => {
                                target.extend_from_slice(r);
                                target.push(b'\n');
                            }
                            Some(Parsed::Raw) | None => {
                                ndjson_line(target, ts, name, r, &mut second)
                            }
                        }
                        done.records += 1;
                    })
                }
                Encoding::Influx => batch.for_each(|ts, _, r, meta| {
                    if !take() {
                        return;
                    }
                    let ok = match fields(meta) {
                        Some(Parsed::Syslog(m)) => {
                            syslog_influx(target, ts, r, &m);
                            true
                        }
                        _ => influx_line(target, ts, r),
                    };
                    if ok {
                        done.records += 1;
                    } else {
                        done.dropped += 1;
                    }
                }),
            }
            done.plain_bytes = target.len() - before;
            if self.compression == Compression::None {
                return done;
            }
            &self.scratch
        };
        done.plain_bytes = plain.len();
        match self.compression {
            Compression::None => out.extend_from_slice(plain),
            Compression::Zstd => {
                let z = self.zstd.as_mut().expect("made for zstd");
                let start = out.len();
                out.resize(start + zstd::zstd_safe::compress_bound(plain.len()), 0);
                let n = z
                    .compress_to_buffer(plain, &mut out[start..])
                    .expect("the destination holds the compress bound");
                out.truncate(start + n);
            }
            Compression::Gzip => {
                let d = self.deflate.as_mut().expect("made for gzip");
                d.reset();
                out.extend_from_slice(&[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff]);
                // Stored blocks at worst: 5 bytes per 16 KiB beyond the input.
                out.reserve(plain.len() + plain.len() / 16_000 * 5 + 64);
                loop {
                    let consumed = d.total_in() as usize;
                    let status = d
                        .compress_vec(&plain[consumed..], out, flate2::FlushCompress::Finish)
                        .expect("deflate into a growing buffer");
                    if status == flate2::Status::StreamEnd {
                        break;
                    }
                    out.reserve(64 * 1024);
                }
                let mut crc = flate2::Crc::new();
                crc.update(plain);
                out.extend_from_slice(&crc.sum().to_le_bytes());
                out.extend_from_slice(&(plain.len() as u32).to_le_bytes());
            }
        }
        done
    }
}

/// A record's field index, when its source's decoding wrote one.
#[inline]
fn fields(record_meta: &[u8]) -> Option<Parsed> {
    if record_meta.is_empty() {
        return None;
    }
    meta::find(record_meta, meta::FIELDS).and_then(Parsed::read)
}

/// Appends a syslog record as an object of its fields: `timestamp` (the
/// record's own, else its receive time), `source`, then `host`, `app`,
/// `procid`, `msgid` when present, `severity` and `facility` as numbers,
/// `structured_data` (as written) when present, and `message`.
fn syslog_ndjson(
    out: &mut Vec<u8>,
    ts_ns: u64,
    source: &str,
    r: &[u8],
    m: &Syslog,
    second: &mut SecondPrefix,
) {
    ndjson_head(out, m.ts_ns.unwrap_or(ts_ns), source, second);
    for (key, span) in [
        (&b",\"host\":"[..], m.host),
        (b",\"app\":", m.app),
        (b",\"procid\":", m.procid),
        (b",\"msgid\":", m.msgid),
    ] {
        if let Some(s) = span {
            out.extend_from_slice(key);
            json_string(out, s.of(r));
        }
    }
    let mut digits = [0u8; 20];
    out.extend_from_slice(b",\"severity\":");
    out.extend_from_slice(decimal(u64::from(m.severity), &mut digits));
    out.extend_from_slice(b",\"facility\":");
    out.extend_from_slice(decimal(u64::from(m.facility), &mut digits));
    if let Some(sd) = m.structured_data {
        out.extend_from_slice(b",\"structured_data\":");
        json_string(out, sd.of(r));
    }
    out.extend_from_slice(b",\"message\":");
    json_string(out, m.msg.of(r));
    out.extend_from_slice(b"}\n");
}

/// Appends a line-protocol record as an object: `timestamp` (the line's,
/// else its receive time), `source`, `measurement`, `tags` (an object of
/// strings) and `fields` (numbers, booleans and strings by their type).
fn influx_ndjson(
    out: &mut Vec<u8>,
    ts_ns: u64,
    source: &str,
    r: &[u8],
    l: &Line,
    second: &mut SecondPrefix,
    scratch: &mut Vec<u8>,
) {
    let mut string = |out: &mut Vec<u8>, escaped: &[u8]| {
        scratch.clear();
        influx::unescape(escaped, scratch);
        json_string(out, scratch);
    };
    ndjson_head(out, l.ts_ns.unwrap_or(ts_ns), source, second);
    out.extend_from_slice(b",\"measurement\":");
    string(out, l.measurement.of(r));
    out.extend_from_slice(b",\"tags\":{");
    let mut first = true;
    if let Some(tags) = l.tags {
        influx::pairs(tags.of(r), false, |k, v| {
            if !std::mem::take(&mut first) {
                out.push(b',');
            }
            string(out, k);
            out.push(b':');
            string(out, v);
        });
    }
    out.extend_from_slice(b"},\"fields\":{");
    first = true;
    influx::pairs(l.fields.of(r), true, |k, v| {
        if !std::mem::take(&mut first) {
            out.push(b',');
        }
        string(out, k);
        out.push(b':');
        field_value(out, v, &mut string);
    });
    out.extend_from_slice(b"}}\n");
}

/// A line-protocol field value as JSON: a string (quoted), an integer
/// (`12i`, `12u`), a boolean, or a float; what is none of those (`.5`,
/// `NaN`) as a string of its text.
fn field_value(out: &mut Vec<u8>, v: &[u8], string: &mut impl FnMut(&mut Vec<u8>, &[u8])) {
    if let Some(s) = v.strip_prefix(b"\"").and_then(|s| s.strip_suffix(b"\"")) {
        return string(out, s);
    }
    match v {
        b"t" | b"T" | b"true" | b"True" | b"TRUE" => return out.extend_from_slice(b"true"),
        b"f" | b"F" | b"false" | b"False" | b"FALSE" => return out.extend_from_slice(b"false"),
        _ => {}
    }
    let n = v.strip_suffix(b"i").or_else(|| v.strip_suffix(b"u")).unwrap_or(v);
    if json_number(n) {
        out.extend_from_slice(n);
    } else {
        string(out, v);
    }
}

/// Whether `n` is a number as JSON writes one.
fn json_number(n: &[u8]) -> bool {
    let n = n.strip_prefix(b"-").unwrap_or(n);
    let int = n.iter().take_while(|c| c.is_ascii_digit()).count();
    if int == 0 || (int > 1 && n[0] == b'0') {
        return false;
    }
    let mut rest = &n[int..];
    if let Some(f) = rest.strip_prefix(b".") {
        let d = f.iter().take_while(|c| c.is_ascii_digit()).count();
        if d == 0 {
            return false;
        }
        rest = &f[d..];
    }
    if let Some(e) = rest.strip_prefix(b"e").or_else(|| rest.strip_prefix(b"E")) {
        let e = e.strip_prefix(b"+").or_else(|| e.strip_prefix(b"-")).unwrap_or(e);
        let d = e.iter().take_while(|c| c.is_ascii_digit()).count();
        if d == 0 {
            return false;
        }
        rest = &e[d..];
    }
    rest.is_empty()
}

/// Appends a syslog record as a line of line protocol: measurement
/// `syslog`; tags `appname`, `facility`, `hostname`, `severity` (names, as
/// Telegraf's syslog input writes them; an absent one left out); fields
/// `facility_code`, `severity_code` (integers), `message`, and `procid`,
/// `msgid` when present (strings); the record's own time, else its receive
/// time. Line breaks in a value become spaces (line protocol has none).
fn syslog_influx(out: &mut Vec<u8>, ts_ns: u64, r: &[u8], m: &Syslog) {
    const FACILITIES: [&str; 24] = [
        "kern", "user", "mail", "daemon", "auth", "syslog", "lpr", "news", "uucp", "cron",
        "authpriv", "ftp", "ntp", "security", "console", "solaris-cron", "local0", "local1",
        "local2", "local3", "local4", "local5", "local6", "local7",
    ];
    const SEVERITIES: [&str; 8] = [
        "emerg", "alert", "crit", "err", "warning", "notice", "info", "debug",
    ];
    let tag = |out: &mut Vec<u8>, key: &[u8], v: &[u8]| {
        if v.is_empty() {
            return;
        }
        out.push(b',');
        out.extend_from_slice(key);
        out.push(b'=');
        for &c in v {
            match c {
                b',' | b'=' | b' ' | b'\\' => out.extend_from_slice(&[b'\\', c]),
                b'\n' | b'\r' => out.extend_from_slice(b"\\ "),
                _ => out.push(c),
            }
        }
    };
    let string = |out: &mut Vec<u8>, v: &[u8]| {
        out.push(b'"');
        for &c in v {
            match c {
                b'"' | b'\\' => out.extend_from_slice(&[b'\\', c]),
                b'\n' | b'\r' => out.push(b' '),
                _ => out.push(c),
            }
        }
        out.push(b'"');
    };
    out.extend_from_slice(b"syslog");
    tag(out, b"appname", m.app.map_or(&[][..], |s| s.of(r)));
    let facility = FACILITIES.get(m.facility as usize).copied().unwrap_or("");
    tag(out, b"facility", facility.as_bytes());
    tag(out, b"hostname", m.host.map_or(&[][..], |s| s.of(r)));
    let severity = SEVERITIES.get(m.severity as usize).copied().unwrap_or("");
    tag(out, b"severity", severity.as_bytes());
    let mut digits = [0u8; 20];
    out.extend_from_slice(b" facility_code=");
    out.extend_from_slice(decimal(u64::from(m.facility), &mut digits));
    out.extend_from_slice(b"i,severity_code=");
    out.extend_from_slice(decimal(u64::from(m.severity), &mut digits));
    out.extend_from_slice(b"i,message=");
    string(out, m.msg.of(r));
    if let Some(p) = m.procid {
        out.extend_from_slice(b",procid=");
        string(out, p.of(r));
    }
    if let Some(p) = m.msgid {
        out.extend_from_slice(b",msgid=");
        string(out, p.of(r));
    }
    out.push(b' ');
    out.extend_from_slice(decimal(m.ts_ns.unwrap_or(ts_ns), &mut digits));
    out.push(b'\n');
}

/// Appends the start every ndjson object has:
/// `{"timestamp":"<RFC 3339, ns>","source":"<name>"`.
fn ndjson_head(out: &mut Vec<u8>, ts_ns: u64, source: &str, second: &mut SecondPrefix) {
    out.extend_from_slice(b"{\"timestamp\":\"");
    rfc3339_ns(out, ts_ns, second);
    out.extend_from_slice(b"\",\"source\":");
    json_string(out, source.as_bytes());
}

/// Appends `{"timestamp":…,"source":…,"message":…}\n`.
fn ndjson_line(
    out: &mut Vec<u8>,
    ts_ns: u64,
    source: &str,
    record: &[u8],
    second: &mut SecondPrefix,
) {
    ndjson_head(out, ts_ns, source, second);
    out.extend_from_slice(b",\"message\":");
    json_string(out, record);
    out.extend_from_slice(b"}\n");
}

/// Appends `bytes` as a JSON string; invalid UTF-8 becomes U+FFFD.
fn json_string(out: &mut Vec<u8>, bytes: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push(b'"');
    // The common case: printable UTF-8 with nothing to escape, copied whole
    // (the check is one pass the compiler vectorises).
    // (No early exit: a fold without one is what vectorises.)
    let special = bytes.iter().fold(false, |acc, &b| {
        acc | (b < 0x20) | (b == b'"') | (b == b'\\')
    });
    if !special && std::str::from_utf8(bytes).is_ok() {
        out.extend_from_slice(bytes);
        out.push(b'"');
        return;
    }
    for chunk in bytes.utf8_chunks() {
        let valid = chunk.valid().as_bytes();
        let mut from = 0;
        for (i, &b) in valid.iter().enumerate() {
            let esc: &[u8] = match b {
                b'"' => b"\\\"",
                b'\\' => b"\\\\",
                b'\n' => b"\\n",
                b'\r' => b"\\r",
                b'\t' => b"\\t",
                0..=0x1f => b"",
                _ => continue,
            };
            out.extend_from_slice(&valid[from..i]);
            if esc.is_empty() {
                out.extend_from_slice(&[
                    b'\\',
                    b'u',
                    b'0',
                    b'0',
                    HEX[(b >> 4) as usize],
                    HEX[(b & 15) as usize],
                ]);
            } else {
                out.extend_from_slice(esc);
            }
            from = i + 1;
        }
        out.extend_from_slice(&valid[from..]);
        if !chunk.invalid().is_empty() {
            out.extend_from_slice("\u{fffd}".as_bytes());
        }
    }
    out.push(b'"');
}

/// Appends Unix nanoseconds as `YYYY-MM-DDThh:mm:ss.nnnnnnnnnZ`.
fn rfc3339_ns(out: &mut Vec<u8>, ts_ns: u64, cache: &mut SecondPrefix) {
    let secs = ts_ns / 1_000_000_000;
    let nanos = ts_ns % 1_000_000_000;
    if cache.secs != secs {
        // Records of one batch mostly share their second: its
        // `YYYY-MM-DDThh:mm:ss.` is formatted once.
        let days = (secs / 86_400) as i64;
        let rem = secs % 86_400;
        let (y, m, d) = civil_from_days(days);
        let p = &mut cache.prefix;
        put_digits(&mut p[0..4], y as u64);
        p[4] = b'-';
        put_digits(&mut p[5..7], m);
        p[7] = b'-';
        put_digits(&mut p[8..10], d);
        p[10] = b'T';
        put_digits(&mut p[11..13], rem / 3600);
        p[13] = b':';
        put_digits(&mut p[14..16], rem / 60 % 60);
        p[16] = b':';
        put_digits(&mut p[17..19], rem % 60);
        p[19] = b'.';
        cache.secs = secs;
    }
    out.extend_from_slice(&cache.prefix);
    let mut n = [0u8; 9];
    put_digits(&mut n, nanos);
    out.extend_from_slice(&n);
    out.push(b'Z');
}

/// The formatted second of the last timestamp written.
pub struct SecondPrefix {
    secs: u64,
    prefix: [u8; 20],
}

impl Default for SecondPrefix {
    fn default() -> Self {
        SecondPrefix {
            secs: u64::MAX,
            prefix: [0; 20],
        }
    }
}

/// Writes `v` as decimal digits filling `out` (zero-padded on the left).
fn put_digits(out: &mut [u8], mut v: u64) {
    for b in out.iter_mut().rev() {
        *b = b'0' + (v % 10) as u8;
        v /= 10;
    }
}

/// Days since 1970-01-01 to a proleptic Gregorian (year, month, day)
/// (the well-known era-based conversion: 400-year eras of 146 097 days).
fn civil_from_days(z: i64) -> (i64, u64, u64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u64;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u64;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// `v` in decimal digits, written at the end of `out`.
pub(crate) fn decimal(mut v: u64, out: &mut [u8; 20]) -> &[u8] {
    let mut k = out.len();
    loop {
        k -= 1;
        out[k] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    &out[k..]
}

/// Appends a line-protocol record (adding `ts_ns` when it has no
/// timestamp) and `\n`; false, appending nothing, if it is not line protocol.
fn influx_line(out: &mut Vec<u8>, ts_ns: u64, record: &[u8]) -> bool {
    let line = record.strip_suffix(b"\r").unwrap_or(record);
    // Sections are separated by spaces that are neither escaped nor inside
    // a quoted field value (quotes count only after the first section).
    let mut spaces = [0usize; 2];
    let mut n = 0;
    let (mut i, mut quoted) = (0, false);
    // Jump from one byte that matters to the next.
    while let Some(k) = memchr::memchr3(b'\\', b'"', b' ', &line[i..]) {
        i += k;
        match line[i] {
            b'\\' => i += 1,
            b'"' if n > 0 => quoted = !quoted,
            b' ' if !quoted => {
                if n == 2 {
                    return false;
                }
                spaces[n] = i;
                n += 1;
            }
            _ => {}
        }
        i += 1;
        if i >= line.len() {
            break;
        }
    }
    let valid = match n {
        1 => spaces[0] > 0 && spaces[0] + 1 < line.len() && !quoted,
        2 => {
            let ts = &line[spaces[1] + 1..];
            let digits = ts.strip_prefix(b"-").unwrap_or(ts);
            spaces[0] > 0
                && spaces[1] > spaces[0] + 1
                && !digits.is_empty()
                && digits.iter().all(u8::is_ascii_digit)
        }
        _ => false,
    };
    if !valid || line.starts_with(b"#") {
        return false;
    }
    out.extend_from_slice(line);
    if n == 1 {
        out.push(b' ');
        out.extend_from_slice(decimal(ts_ns, &mut [0u8; 20]));
    }
    out.push(b'\n');
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Batch;
    use std::io::Read;

    const TS: u64 = 1_764_072_000_123_456_789; // 2025-11-25T12:00:00.123456789Z

    fn batch(lines: &[&[u8]]) -> Batch {
        let mut b = Batch::default();
        for (i, l) in lines.iter().enumerate() {
            b.push(TS + i as u64, 0, (i % 2) as u16, l, &[]);
        }
        b
    }

    /// Records decoded with `decoding`, each with its field index.
    fn decoded(decoding: crate::config::Decoding, lines: &[&[u8]]) -> Batch {
        let mut b = Batch::default();
        for l in lines {
            let mut m = Vec::new();
            let p = crate::codec::index::parse(decoding, l, TS, None).unwrap();
            meta::put_with(&mut m, meta::FIELDS, |o| p.write(l.len(), o));
            b.push(TS, 0, 0, l, &m);
        }
        b
    }

    #[test]
    fn decoded_records_become_objects_of_their_fields() {
        use crate::config::Decoding;
        let b = decoded(
            Decoding::Syslog,
            &[
                b"<165>1 2026-12-03T12:00:00.5Z gw-1 sensord 42 ID7 [x a=\"1\"] too \"hot\"",
                b"<13>Nov 25 11:59:58 gw-2 app[7]: hello",
            ],
        );
        let (body, done) = encode(Encoding::Ndjson, Compression::None, &b);
        assert_eq!(done.records, 2);
        let text = String::from_utf8(body).unwrap();
        let v: Vec<serde_json::Value> =
            text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(v[0]["timestamp"], "2026-12-03T12:00:00.500000000Z");
        assert_eq!(v[0]["host"], "gw-1");
        assert_eq!(v[0]["app"], "sensord");
        assert_eq!(v[0]["procid"], "42");
        assert_eq!(v[0]["msgid"], "ID7");
        assert_eq!(v[0]["severity"], 5);
        assert_eq!(v[0]["facility"], 20);
        assert_eq!(v[0]["structured_data"], "[x a=\"1\"]");
        assert_eq!(v[0]["message"], "too \"hot\"");
        assert_eq!(v[1]["timestamp"], "2025-11-25T11:59:58.000000000Z");
        assert_eq!(v[1]["app"], "app");
        assert_eq!(v[1]["procid"], "7");
        assert_eq!(v[1]["message"], "hello");
        assert!(v[1].get("msgid").is_none());

        let b = decoded(
            Decoding::Influx,
            &[b"weather,device=d\\,1,site=north\\ yard t=21.5,n=-3i,ok=T,s=\"a \\\"b\\\"\",odd=.5 1796299200000000000"],
        );
        let (body, _) = encode(Encoding::Ndjson, Compression::None, &b);
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["timestamp"], "2026-12-03T12:00:00.000000000Z");
        assert_eq!(v["measurement"], "weather");
        assert_eq!(v["tags"]["device"], "d,1");
        assert_eq!(v["tags"]["site"], "north yard");
        assert_eq!(v["fields"]["t"], 21.5);
        assert_eq!(v["fields"]["n"], -3);
        assert_eq!(v["fields"]["ok"], true);
        assert_eq!(v["fields"]["s"], "a \"b\"");
        assert_eq!(v["fields"]["odd"], ".5");

        let b = decoded(Decoding::Json, &[b"{\"a\": [1, 2]}"]);
        let (body, _) = encode(Encoding::Ndjson, Compression::None, &b);
        assert_eq!(body, b"{\"a\": [1, 2]}\n");
    }

    #[test]
    fn syslog_records_become_line_protocol() {
        use crate::config::Decoding;
        let b = decoded(
            Decoding::Syslog,
            &[b"<11>1 2026-12-03T12:00:00Z gw a, - - - disk \"sda\" failed\\"],
        );
        let (body, done) = encode(Encoding::Influx, Compression::None, &b);
        assert_eq!(done.records, 1);
        assert_eq!(
            String::from_utf8(body).unwrap(),
            "syslog,appname=a\\,,facility=user,hostname=gw,severity=err facility_code=1i,severity_code=3i,message=\"disk \\\"sda\\\" failed\\\\\" 1796299200000000000\n"
        );
    }

    fn encode(enc: Encoding, comp: Compression, b: &Batch) -> (Vec<u8>, Encoded) {
        let mut e = Encoder::new(enc, comp, vec!["tcp_in".into(), "udp_in".into()]);
        let mut out = b"HEAD".to_vec();
        let done = e.encode(BatchView::Native(b), &mut out);
        assert_eq!(&out[..4], b"HEAD", "what was in front stays");
        (out[4..].to_vec(), done)
    }

    #[test]
    fn raw_is_the_payload() {
        let b = batch(&[b"a b c", b"", b"x\ty"]);
        let (body, done) = encode(Encoding::Raw, Compression::None, &b);
        assert_eq!(body, b"a b c\n\nx\ty\n");
        assert_eq!(done.records, 3);
    }

    #[test]
    fn ndjson_escapes_and_stamps_each_record() {
        let b = batch(&[b"say \"hi\"\\ok", b"ctl\x01\n\xffend"]);
        let (body, done) = encode(Encoding::Ndjson, Compression::None, &b);
        let expected = concat!(
            r#"{"timestamp":"2025-11-25T12:00:00.123456789Z","source":"tcp_in","message":"say \"hi\"\\ok"}"#,
            "\n",
            r#"{"timestamp":"2025-11-25T12:00:00.123456790Z","source":"udp_in","message":"ctl\u0001\n�end"}"#,
            "\n"
        );
        assert_eq!(String::from_utf8(body).unwrap(), expected);
        assert_eq!(done.records, 2);
    }

    #[test]
    fn calendar_dates_match_known_days() {
        let mut out = Vec::new();
        rfc3339_ns(&mut out, 0, &mut SecondPrefix::default());
        assert_eq!(out, b"1970-01-01T00:00:00.000000000Z");
        out.clear();
        rfc3339_ns(
            &mut out,
            951_782_400_000_000_001,
            &mut SecondPrefix::default(),
        ); // leap day 2000
        assert_eq!(out, b"2000-02-29T00:00:00.000000001Z");
        out.clear();
        rfc3339_ns(
            &mut out,
            4_107_542_399_999_999_999,
            &mut SecondPrefix::default(),
        );
        assert_eq!(out, b"2100-02-28T23:59:59.999999999Z");
    }

    #[test]
    fn the_cached_second_is_the_same_as_formatting_afresh() {
        let mut cache = SecondPrefix::default();
        let mut t = 951_868_799_999_999_990u64; // 2000-02-29T23:59:59.99999999
        for _ in 0..2000 {
            t += fastrand::u64(1..2_000_000_000);
            let (mut a, mut b) = (Vec::new(), Vec::new());
            rfc3339_ns(&mut a, t, &mut cache);
            rfc3339_ns(&mut b, t, &mut SecondPrefix::default());
            assert_eq!(a, b, "at {t}");
        }
    }

    #[test]
    fn influx_keeps_timestamps_adds_missing_ones_and_drops_non_line_protocol() {
        let b = batch(&[
            b"cpu,host=a usage=1.5 1700000000000000000",
            b"cpu,host=a usage=2",
            br#"log,host=b msg="two words \" here" 17"#,
            br#"esc\ aped,t=x\ y f=1i"#,
            b"no_fields_here",
            b"too many sections 1 2",
            b"cpu usage=1 notanumber",
            b"# a comment",
        ]);
        let (body, done) = encode(Encoding::Influx, Compression::None, &b);
        let expected = format!(
            "cpu,host=a usage=1.5 1700000000000000000\ncpu,host=a usage=2 {}\nlog,host=b msg=\"two words \\\" here\" 17\nesc\\ aped,t=x\\ y f=1i {}\n",
            TS + 1,
            TS + 3
        );
        assert_eq!(String::from_utf8(body).unwrap(), expected);
        assert_eq!((done.records, done.dropped), (4, 4));
    }

    #[test]
    fn gzip_and_zstd_bodies_decode_to_the_plain_body_with_reused_contexts() {
        let lines: Vec<Vec<u8>> = (0..5000)
            .map(|i| format!("stream=1 seq={i:012} value={}", i * 7).into_bytes())
            .collect();
        let refs: Vec<&[u8]> = lines.iter().map(|l| l.as_slice()).collect();
        let b = batch(&refs);
        let (plain, _) = encode(Encoding::Raw, Compression::None, &b);
        for comp in [Compression::Gzip, Compression::Zstd] {
            let mut e = Encoder::new(Encoding::Raw, comp, vec![]);
            for round in 0..3 {
                let mut out = Vec::new();
                let done = e.encode(BatchView::Native(&b), &mut out);
                assert_eq!(done.plain_bytes, plain.len());
                assert!(
                    out.len() * 4 < plain.len(),
                    "{comp:?} round {round}: {} of {}",
                    out.len(),
                    plain.len()
                );
                let decoded = match comp {
                    Compression::Gzip => {
                        let mut d = Vec::new();
                        flate2::read::GzDecoder::new(&out[..])
                            .read_to_end(&mut d)
                            .unwrap();
                        d
                    }
                    _ => zstd::stream::decode_all(&out[..]).unwrap(),
                };
                assert_eq!(decoded, plain, "{comp:?} round {round}");
            }
        }
    }

    #[test]
    fn encodes_an_archived_batch_like_the_batch() {
        let b = batch(&[b"m f=1", b"m f=2 5"]);
        let bytes = crate::record::archive_into(&b, rkyv::util::AlignedVec::new()).unwrap();
        let a = crate::record::access(&bytes).unwrap();
        for enc in [Encoding::Raw, Encoding::Ndjson, Encoding::Influx] {
            let mut e = Encoder::new(enc, Compression::None, vec!["s".into(), "t".into()]);
            let (mut x, mut y) = (Vec::new(), Vec::new());
            e.encode(BatchView::Native(&b), &mut x);
            e.encode(BatchView::Archived(a), &mut y);
            assert_eq!(x, y, "{enc:?}");
        }
    }
}
