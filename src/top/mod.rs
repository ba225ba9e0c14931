//! `updraft top`: a live view of a running collector, read from its metrics
//! endpoint (Prometheus text), once a second.
//!
//! Sans-I/O at the core: [`parse`] turns exposition text into samples,
//! [`View::from`] turns two snapshots into the table (totals from the newer,
//! rates from the difference) and [`View::text`] renders it as plain text
//! (`--once`). [`fetch`] is the one blocking HTTP GET; [`tui`] draws the
//! same view in a terminal with ratatui until `q`.
//!
//! Runs in the `top` command's own process, never on a shard.

pub mod tui;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::Duration;

/// One line of exposition text: `name{label="value",...} value`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Sample {
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// Parses Prometheus exposition text; comments and lines it cannot read are
/// skipped.
pub fn parse(text: &str) -> Vec<Sample> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<Sample> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let name_end = line.find(['{', ' '])?;
    let name = &line[..name_end];
    let valid = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    if name.is_empty() || name.starts_with(|c: char| c.is_ascii_digit()) || !name.chars().all(valid)
    {
        return None;
    }
    let name = name.to_string();
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(body) = rest.strip_prefix('{') {
        let mut chars = body.char_indices();
        let mut key = String::new();
        let end = loop {
            let (i, c) = chars.next()?;
            match c {
                '}' => break i,
                ',' | ' ' => {}
                '=' => {
                    if chars.next()?.1 != '"' {
                        return None;
                    }
                    let mut value = String::new();
                    loop {
                        match chars.next()?.1 {
                            '"' => break,
                            '\\' => match chars.next()?.1 {
                                'n' => value.push('\n'),
                                c => value.push(c),
                            },
                            c => value.push(c),
                        }
                    }
                    labels.push((std::mem::take(&mut key), value));
                }
                c => key.push(c),
            }
        };
        rest = &body[end + 1..];
    }
    let value = rest.split_whitespace().next()?.parse().ok()?;
    Some(Sample {
        name,
        labels,
        value,
    })
}

/// What one scrape found, and when (seconds on any steady clock).
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub at_s: f64,
    pub samples: Vec<Sample>,
}

impl Snapshot {
    /// The sum of `name`'s samples whose `key` label is `value`.
    fn sum(&self, name: &str, key: &str, value: &str) -> f64 {
        self.samples
            .iter()
            .filter(|s| s.name == name && s.label(key) == Some(value))
            .map(|s| s.value)
            .sum()
    }
}

/// A source's line.
#[derive(Debug, Clone, PartialEq)]
pub struct SourceRow {
    pub name: String,
    pub records: f64,
    pub records_per_s: f64,
    pub bytes_per_s: f64,
    pub connections: f64,
    /// Records dropped, by reason (total since start).
    pub dropped: BTreeMap<String, f64>,
}

/// A sink's line.
#[derive(Debug, Clone, PartialEq)]
pub struct SinkRow {
    pub name: String,
    pub kind: String,
    pub records: f64,
    pub records_per_s: f64,
    pub bytes_per_s: f64,
    /// Records the buffer dropped (full), those encoding dropped, and those
    /// sent to dead letters (totals).
    pub buffer_dropped: f64,
    pub encode_dropped: f64,
    pub dead_letters: f64,
    /// Batches waiting in the sink's queues.
    pub queued_batches: f64,
    pub retries: f64,
    pub in_flight: f64,
    pub concurrency_limit: f64,
    /// Bytes the disk buffer holds.
    pub wal_bytes: f64,
}

/// The whole table.
#[derive(Debug, Clone, PartialEq)]
pub struct View {
    pub backend: String,
    pub shards: usize,
    pub sources: Vec<SourceRow>,
    pub sinks: Vec<SinkRow>,
}

impl View {
    /// The table of `now`, with rates over the time since `before` (none:
    /// rates are 0).
    pub fn from(before: Option<&Snapshot>, now: &Snapshot) -> View {
        let seconds = before.map_or(0.0, |b| now.at_s - b.at_s);
        let rate = |name: &str, key: &str, value: &str| match before {
            Some(b) if seconds > 0.0 => {
                ((now.sum(name, key, value) - b.sum(name, key, value)) / seconds).max(0.0)
            }
            _ => 0.0,
        };
        let names = |metric: &str, key: &str| {
            let mut v: Vec<String> = now
                .samples
                .iter()
                .filter(|s| s.name == metric)
                .filter_map(|s| s.label(key).map(str::to_string))
                .collect();
            v.sort();
            v.dedup();
            v
        };
        let sources = names("updraft_source_received_records_total", "source")
            .into_iter()
            .map(|n| {
                let mut dropped = BTreeMap::new();
                for s in &now.samples {
                    if s.name == "updraft_source_dropped_records_total"
                        && s.label("source") == Some(&n)
                        && s.value > 0.0
                    {
                        let reason = s.label("reason").unwrap_or("?").to_string();
                        *dropped.entry(reason).or_insert(0.0) += s.value;
                    }
                }
                SourceRow {
                    records: now.sum("updraft_source_received_records_total", "source", &n),
                    records_per_s: rate("updraft_source_received_records_total", "source", &n),
                    bytes_per_s: rate("updraft_source_received_bytes_total", "source", &n),
                    connections: now.sum("updraft_source_connections_open", "source", &n),
                    dropped,
                    name: n,
                }
            })
            .collect();
        let sinks = names("updraft_sink_sent_records_total", "sink")
            .into_iter()
            .map(|n| {
                let g = |metric: &str| now.sum(metric, "sink", &n);
                SinkRow {
                    kind: now
                        .samples
                        .iter()
                        .find(|s| {
                            s.name == "updraft_sink_sent_records_total"
                                && s.label("sink") == Some(&n)
                        })
                        .and_then(|s| s.label("type"))
                        .unwrap_or("")
                        .to_string(),
                    records: g("updraft_sink_sent_records_total"),
                    records_per_s: rate("updraft_sink_sent_records_total", "sink", &n),
                    bytes_per_s: rate("updraft_sink_sent_bytes_total", "sink", &n),
                    buffer_dropped: g("updraft_sink_buffer_dropped_records_total"),
                    encode_dropped: g("updraft_sink_encode_dropped_records_total"),
                    dead_letters: g("updraft_sink_dead_letter_records_total"),
                    queued_batches: g("updraft_sink_queued_batches"),
                    retries: g("updraft_sink_retries_total"),
                    in_flight: g("updraft_sink_in_flight_requests"),
                    concurrency_limit: g("updraft_sink_concurrency_limit"),
                    wal_bytes: g("updraft_sink_wal_bytes"),
                    name: n,
                }
            })
            .collect();
        let backends = now
            .samples
            .iter()
            .filter(|s| s.name == "updraft_shard_io_backend");
        View {
            backend: backends
                .clone()
                .find_map(|s| s.label("backend"))
                .unwrap_or("?")
                .to_string(),
            shards: backends.count(),
            sources,
            sinks,
        }
    }

    /// The source table: a header and one line per source.
    pub fn source_lines(&self) -> Vec<[String; 5]> {
        let mut out = vec![[
            "SOURCE".into(),
            "RECORDS/S".into(),
            "BYTES/S".into(),
            "CONNS".into(),
            "DROPPED (BY REASON)".into(),
        ]];
        for s in &self.sources {
            let dropped = if s.dropped.is_empty() {
                "0".to_string()
            } else {
                s.dropped
                    .iter()
                    .map(|(r, n)| format!("{r} {}", count(*n)))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            out.push([
                s.name.clone(),
                count(s.records_per_s),
                bytes(s.bytes_per_s),
                count(s.connections),
                dropped,
            ]);
        }
        out
    }

    /// The sink table: a header and one line per sink.
    pub fn sink_lines(&self) -> Vec<[String; 9]> {
        let mut out = vec![[
            "SINK".into(),
            "TYPE".into(),
            "RECORDS/S".into(),
            "BYTES/S".into(),
            "DROPPED".into(),
            "QUEUED".into(),
            "RETRIES".into(),
            "IN FLIGHT/LIMIT".into(),
            "WAL".into(),
        ]];
        for s in &self.sinks {
            let mut dropped = vec![format!("full {}", count(s.buffer_dropped))];
            if s.encode_dropped > 0.0 {
                dropped.push(format!("encode {}", count(s.encode_dropped)));
            }
            if s.dead_letters > 0.0 {
                dropped.push(format!("dead {}", count(s.dead_letters)));
            }
            out.push([
                s.name.clone(),
                s.kind.clone(),
                count(s.records_per_s),
                bytes(s.bytes_per_s),
                dropped.join(", "),
                count(s.queued_batches),
                count(s.retries),
                if s.concurrency_limit > 0.0 {
                    format!("{}/{}", count(s.in_flight), count(s.concurrency_limit))
                } else {
                    "-".into()
                },
                bytes(s.wal_bytes),
            ]);
        }
        out
    }

    /// The header line: backend, shards and totals.
    pub fn title(&self, address: &str) -> String {
        let received: f64 = self.sources.iter().map(|s| s.records).sum();
        let sent: f64 = self.sinks.iter().map(|s| s.records).sum();
        format!(
            "updraft at {address}: {} shards on {}; since start: {} records received, {} sent",
            self.shards,
            self.backend,
            count(received),
            count(sent)
        )
    }

    /// The view as plain text (`--once`).
    pub fn text(&self, address: &str) -> String {
        let mut out = self.title(address);
        out.push_str("\n\n");
        out.push_str(&columns(&self.source_lines()));
        out.push('\n');
        out.push_str(&columns(&self.sink_lines()));
        out
    }
}

/// Lines of cells, each column padded to its widest cell.
fn columns<const N: usize>(lines: &[[String; N]]) -> String {
    let mut width = [0usize; N];
    for l in lines {
        for (w, c) in width.iter_mut().zip(l) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    for l in lines {
        let cells: Vec<String> = l
            .iter()
            .zip(width)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// A count, exact below a million (so totals can be checked), then with
/// a unit.
pub fn count(n: f64) -> String {
    if n < 1e6 {
        format!("{:.0}", n)
    } else if n < 1e9 {
        format!("{:.2}M", n / 1e6)
    } else {
        format!("{:.2}G", n / 1e9)
    }
}

/// Bytes with a binary unit.
pub fn bytes(n: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{v:.0} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// GETs `/metrics` from `address` (a plain, blocking HTTP/1.1 request with a
/// timeout).
pub fn fetch(address: SocketAddr, timeout: Duration) -> std::io::Result<String> {
    let mut s = std::net::TcpStream::connect_timeout(&address, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
    )?;
    let mut body = Vec::new();
    s.take(64 << 20).read_to_end(&mut body)?;
    let text = String::from_utf8_lossy(&body);
    let Some((head, rest)) = text.split_once("\r\n\r\n") else {
        return Err(std::io::Error::other("no HTTP response"));
    };
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        let status = head.lines().next().unwrap_or("").to_string();
        return Err(std::io::Error::other(format!("answered {status}")));
    }
    Ok(rest.to_string())
}

/// Takes a snapshot from `address`, timed on `clock`.
pub fn snapshot(address: SocketAddr, clock: std::time::Instant) -> std::io::Result<Snapshot> {
    let text = fetch(address, Duration::from_secs(2))?;
    Ok(Snapshot {
        at_s: clock.elapsed().as_secs_f64(),
        samples: parse(&text),
    })
}

/// `--once`: two snapshots `interval` apart, the table as text.
pub fn once(address: SocketAddr, interval: Duration) -> std::io::Result<String> {
    let clock = std::time::Instant::now();
    let before = snapshot(address, clock)?;
    std::thread::sleep(interval);
    let now = snapshot(address, clock)?;
    Ok(View::from(Some(&before), &now).text(&address.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP updraft_source_received_records Records.
# TYPE updraft_source_received_records counter
updraft_source_received_records_total{source="app"} 1500
updraft_source_received_bytes_total{source="app"} 30000
updraft_source_dropped_records_total{source="app",reason="too_long"} 3
updraft_source_dropped_records_total{source="app",reason="sink_full"} 0
updraft_source_connections_open{source="app"} 2
updraft_sink_sent_records_total{sink="up",type="http"} 1400
updraft_sink_sent_bytes_total{sink="up",type="http"} 28000
updraft_sink_buffer_dropped_records_total{sink="up",type="http"} 7
updraft_sink_queued_batches{sink="up",type="http"} 4
updraft_sink_in_flight_requests{sink="up",type="http"} 3
updraft_sink_concurrency_limit{sink="up",type="http"} 8
updraft_sink_wal_bytes{sink="up",type="http"} 2097152
updraft_shard_io_backend{shard="0",backend="epoll"} 1
updraft_shard_io_backend{shard="1",backend="epoll"} 1
odd{label="a \"quoted\" one"} 2.5
"#;

    #[test]
    fn exposition_text_parses_with_labels_and_escapes() {
        let s = parse(TEXT);
        assert_eq!(s.len(), 15);
        assert_eq!(s[0].name, "updraft_source_received_records_total");
        assert_eq!(s[0].label("source"), Some("app"));
        assert_eq!(s[0].value, 1500.0);
        assert_eq!(s[14].label("label"), Some("a \"quoted\" one"));
        assert!(parse("garbage{\nnot=\"closed 1\n").is_empty());
    }

    #[test]
    fn the_view_has_totals_from_now_and_rates_from_the_difference() {
        let before = Snapshot {
            at_s: 1.0,
            samples: parse(
                &TEXT
                    .replace("} 1500", "} 500")
                    .replace("} 30000", "} 10000"),
            ),
        };
        let now = Snapshot {
            at_s: 3.0,
            samples: parse(TEXT),
        };
        let v = View::from(Some(&before), &now);
        assert_eq!((v.backend.as_str(), v.shards), ("epoll", 2));
        let app = &v.sources[0];
        assert_eq!(
            (app.records, app.records_per_s, app.bytes_per_s),
            (1500.0, 500.0, 10000.0)
        );
        assert_eq!(app.dropped.len(), 1, "zero counts are left out");
        assert_eq!(app.dropped["too_long"], 3.0);
        let up = &v.sinks[0];
        assert_eq!(
            (up.kind.as_str(), up.records, up.buffer_dropped),
            ("http", 1400.0, 7.0)
        );
        let text = v.text("127.0.0.1:9598");
        assert!(text.contains("too_long 3"), "{text}");
        assert!(text.contains("3/8"), "{text}");
        assert!(text.contains("2.0 MiB"), "{text}");
        // One snapshot: no rates.
        assert_eq!(View::from(None, &now).sources[0].records_per_s, 0.0);
    }
}
