//! A decoded record's fields, kept beside it: where its source's decoding
//! found them, as offsets into the record's bytes. The source parses a
//! record once, on the shard that read it; when a sink names a destination
//! by a field (`{host}`, `{tag.device}`) or encodes the fields
//! (`encoding = "ndjson"`), the source writes this fixed-size index into the
//! record's meta (item [`FIELDS`](crate::record::meta::FIELDS)), where it
//! travels with the record through the disk buffer and the native protocol.
//! Nothing of the record is copied.
//!
//! The index, after its meta item header:
//!
//! ```text
//! size  field
//!    1  form     1 syslog, 2 influx, 3 json; +0x80 when spans are wide
//! syslog:
//!    1  facility
//!    1  severity
//!    1  version  1 (RFC 5424) or 0 (RFC 3164)
//!    8  ts_ns    the record's own time, ns since the epoch, LE; all ones: none
//!    7  spans    timestamp, host, app, procid, msgid, structured data, msg
//! influx:
//!    8  ts_ns
//!    4  spans    measurement, tags, fields, timestamp
//! json:          (nothing: keys are looked up in the record when asked for)
//! ```
//!
//! A span is `start, len` as two u16 (LE), or two u32 when wide (a record
//! of 64 KiB or more); all ones is a field the record does not have. An
//! index read back is never trusted: a span past the record's end gives no
//! bytes, a short or unknown index gives nothing (a native peer may send
//! anything that passes the frame's checks).

use super::influx::{self, Line};
use super::json;
use super::syslog::{self, Span, Syslog};
use crate::config::FieldRef;

/// A record as its source's decoding read it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsed {
    Raw,
    Syslog(Syslog),
    Influx(Line),
    /// Checked to be one object; keys are looked up when asked for.
    Json,
}

const SYSLOG: u8 = 1;
const INFLUX: u8 = 2;
const JSON: u8 = 3;
const WIDE: u8 = 0x80;
const NO_TS: u64 = u64::MAX;

/// The most bytes an index takes (a wide syslog one).
pub const MAX_BYTES: usize = 1 + 3 + 8 + 7 * 8;

impl Parsed {
    /// Calls `f` with field `field`'s value in `record` (`None`: it has
    /// none; syslog's severity and facility as decimal digits).
    #[inline]
    pub fn value<T>(
        &self,
        record: &[u8],
        field: &FieldRef,
        f: impl FnOnce(Option<&[u8]>) -> T,
    ) -> T {
        let span = match (self, field) {
            (Parsed::Syslog(m), FieldRef::Severity | FieldRef::Facility) => {
                let n = if *field == FieldRef::Severity {
                    m.severity
                } else {
                    m.facility
                };
                let digits = [b'0' + n / 100, b'0' + n / 10 % 10, b'0' + n % 10];
                let skip = if n >= 100 {
                    0
                } else if n >= 10 {
                    1
                } else {
                    2
                };
                return f(Some(&digits[skip..]));
            }
            (Parsed::Syslog(m), FieldRef::Host) => m.host,
            (Parsed::Syslog(m), FieldRef::App) => m.app,
            (Parsed::Syslog(m), FieldRef::ProcId) => m.procid,
            (Parsed::Syslog(m), FieldRef::MsgId) => m.msgid,
            (Parsed::Influx(l), FieldRef::Measurement) => Some(l.measurement),
            (Parsed::Influx(l), FieldRef::Tag(t)) => influx::tag(record, l, t),
            (Parsed::Json, FieldRef::Key(k)) => json::parse(record, Some(k)).ok().flatten(),
            _ => None,
        };
        f(span.map(|s| s.of(record)))
    }

    /// The record's own time, when it has one.
    pub fn ts_ns(&self) -> Option<u64> {
        match self {
            Parsed::Syslog(m) => m.ts_ns,
            Parsed::Influx(l) => l.ts_ns,
            Parsed::Raw | Parsed::Json => None,
        }
    }

    /// Appends the index of a `record_len`-byte record (nothing for `Raw`).
    pub fn write(&self, record_len: usize, out: &mut Vec<u8>) {
        let wide = record_len >= u16::MAX as usize;
        let flag = if wide { WIDE } else { 0 };
        let span = |out: &mut Vec<u8>, s: Option<Span>| match (s, wide) {
            (Some(s), true) => {
                out.extend_from_slice(&s.start.to_le_bytes());
                out.extend_from_slice(&s.len.to_le_bytes());
            }
            (Some(s), false) => {
                out.extend_from_slice(&(s.start as u16).to_le_bytes());
                out.extend_from_slice(&(s.len as u16).to_le_bytes());
            }
            (None, true) => out.extend_from_slice(&[0xff; 8]),
            (None, false) => out.extend_from_slice(&[0xff; 4]),
        };
        match self {
            Parsed::Raw => {}
            Parsed::Syslog(m) => {
                out.extend_from_slice(&[SYSLOG | flag, m.facility, m.severity, m.version]);
                out.extend_from_slice(&m.ts_ns.unwrap_or(NO_TS).to_le_bytes());
                for s in m.spans() {
                    span(out, s);
                }
            }
            Parsed::Influx(l) => {
                out.push(INFLUX | flag);
                out.extend_from_slice(&l.ts_ns.unwrap_or(NO_TS).to_le_bytes());
                for s in [Some(l.measurement), l.tags, Some(l.fields), l.timestamp] {
                    span(out, s);
                }
            }
            Parsed::Json => out.push(JSON | flag),
        }
    }

    /// Reads an index back (see the module's doc: never trusted).
    pub fn read(index: &[u8]) -> Option<Parsed> {
        let (&form, rest) = index.split_first()?;
        let wide = form & WIDE != 0;
        let mut spans = Spans { rest, wide };
        Some(match form & !WIDE {
            SYSLOG => {
                let [facility, severity, version] = *spans.take::<3>()?;
                let ts = u64::from_le_bytes(*spans.take::<8>()?);
                Parsed::Syslog(Syslog {
                    facility,
                    severity,
                    version,
                    ts_ns: (ts != NO_TS).then_some(ts),
                    timestamp: spans.span()?,
                    host: spans.span()?,
                    app: spans.span()?,
                    procid: spans.span()?,
                    msgid: spans.span()?,
                    structured_data: spans.span()?,
                    msg: spans.span()?.unwrap_or_default(),
                })
            }
            INFLUX => {
                let ts = u64::from_le_bytes(*spans.take::<8>()?);
                Parsed::Influx(Line {
                    ts_ns: (ts != NO_TS).then_some(ts),
                    measurement: spans.span()?.unwrap_or_default(),
                    tags: spans.span()?,
                    fields: spans.span()?.unwrap_or_default(),
                    timestamp: spans.span()?,
                })
            }
            JSON => Parsed::Json,
            _ => return None,
        })
    }
}

/// The index's bytes being read.
struct Spans<'a> {
    rest: &'a [u8],
    wide: bool,
}

impl<'a> Spans<'a> {
    fn take<const N: usize>(&mut self) -> Option<&'a [u8; N]> {
        let (head, rest) = self.rest.split_first_chunk::<N>()?;
        self.rest = rest;
        Some(head)
    }

    /// `Some(None)`: a field the record does not have.
    fn span(&mut self) -> Option<Option<Span>> {
        let (start, len) = if self.wide {
            let b = self.take::<8>()?;
            let s = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            let l = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
            if s == u32::MAX && l == u32::MAX {
                return Some(None);
            }
            (s, l)
        } else {
            let b = self.take::<4>()?;
            let s = u16::from_le_bytes([b[0], b[1]]);
            let l = u16::from_le_bytes([b[2], b[3]]);
            if s == u16::MAX && l == u16::MAX {
                return Some(None);
            }
            (u32::from(s), u32::from(l))
        };
        Some(Some(Span { start, len }))
    }
}

/// Reads `record` with `decoding`; `now_ns` (the receive time) gives an RFC
/// 3164 timestamp its year, `json_key` is the key JSON is checked for first.
#[inline]
pub fn parse(
    decoding: crate::config::Decoding,
    record: &[u8],
    now_ns: u64,
    json_key: Option<&[u8]>,
) -> Result<Parsed, &'static str> {
    use crate::config::Decoding;
    Ok(match decoding {
        Decoding::Raw => Parsed::Raw,
        Decoding::Syslog => Parsed::Syslog(syslog::parse(record, now_ns).map_err(|e| e.reason())?),
        Decoding::Influx => Parsed::Influx(influx::parse(record).map_err(|e| e.reason())?),
        Decoding::Json => {
            json::parse(record, json_key).map_err(|e| e.reason())?;
            Parsed::Json
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Decoding;

    fn round_trip(decoding: Decoding, r: &[u8]) -> (Parsed, Parsed) {
        let p = parse(decoding, r, 1_796_299_200_000_000_000, None).unwrap();
        let mut out = Vec::new();
        p.write(r.len(), &mut out);
        assert!(out.len() <= MAX_BYTES);
        (p, Parsed::read(&out).unwrap())
    }

    #[test]
    fn an_index_reads_back_as_it_was_written() {
        for (d, r) in [
            (
                Decoding::Syslog,
                &b"<165>1 2026-12-03T12:00:00.5Z gw-1 sensord 42 ID7 [a b=\"c\"] hot"[..],
            ),
            (Decoding::Syslog, b"<13>Dec  3 12:00:00 gw-2 app[7]: hello"),
            (Decoding::Syslog, b"<13>just a message"),
            (
                Decoding::Influx,
                b"weather,device=d-1 temp=1 1796299200000000000",
            ),
            (Decoding::Influx, b"cpu usage=1i"),
            (Decoding::Json, b"{\"a\":1}"),
        ] {
            let (p, back) = round_trip(d, r);
            assert_eq!(p, back, "{}", String::from_utf8_lossy(r));
        }
        let mut long = b"<14>1 - big app - - - ".to_vec();
        long.resize(70_000, b'x');
        let (p, back) = round_trip(Decoding::Syslog, &long);
        assert_eq!(p, back);
        let Parsed::Syslog(m) = back else { panic!() };
        assert_eq!(m.msg.of(&long).len(), 70_000 - 22);
    }

    #[test]
    fn values_come_from_the_index_as_from_the_parse() {
        let r = b"<165>1 2026-12-03T12:00:00Z gw-1 sensord - - - hot";
        let (_, back) = round_trip(Decoding::Syslog, r);
        let get = |f: FieldRef| back.value(r, &f, |v| v.map(<[u8]>::to_vec));
        assert_eq!(get(FieldRef::Host).unwrap(), b"gw-1");
        assert_eq!(get(FieldRef::App).unwrap(), b"sensord");
        assert_eq!(get(FieldRef::Severity).unwrap(), b"5");
        assert_eq!(get(FieldRef::Facility).unwrap(), b"20");
        assert_eq!(get(FieldRef::ProcId), None);
        let r = b"m,device=d-9,site=x f=1";
        let (_, back) = round_trip(Decoding::Influx, r);
        let v = back.value(r, &FieldRef::Tag(b"device"[..].into()), |v| {
            v.map(<[u8]>::to_vec)
        });
        assert_eq!(v.unwrap(), b"d-9");
    }

    #[test]
    fn a_damaged_or_hostile_index_gives_nothing_or_empty_values_never_a_panic() {
        let r = b"<165>1 2026-12-03T12:00:00Z gw-1 sensord - - - hot";
        let (_, _) = round_trip(Decoding::Syslog, r);
        let p = parse(Decoding::Syslog, r, 0, None).unwrap();
        let mut good = Vec::new();
        p.write(r.len(), &mut good);
        for cut in 0..good.len() {
            assert_eq!(Parsed::read(&good[..cut]), None, "cut at {cut}");
        }
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..20_000 {
            let mut bytes = good.clone();
            for _ in 0..4 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let i = (x % bytes.len() as u64) as usize;
                bytes[i] = (x >> 32) as u8;
            }
            if let Some(p) = Parsed::read(&bytes) {
                for f in [FieldRef::Host, FieldRef::Severity, FieldRef::Measurement] {
                    p.value(r, &f, |v| assert!(v.is_none_or(|v| v.len() <= r.len())));
                }
                p.value(r, &FieldRef::Tag(b"a"[..].into()), |_| ());
            }
        }
    }
}
