//! The nats sink against a real server: Debian's nats-server with JetStream
//! (`-js`), started by each test on loopback with its own config, port and
//! store directory; the streams are made and counted over the server's own
//! JetStream API by a small client here.

use crate::harness::{free_addr, pki, send, spawn_send, Daemon, Updraft};
use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

const NATS_SERVER: &str = "/usr/sbin/nats-server";

/// A nats-server with JetStream on loopback, its store in its directory
/// (kept across a restart).
pub struct Server {
    d: Daemon,
    pub addr: SocketAddr,
    /// How the test's own client speaks TLS to a server that requires it.
    tls: Option<std::sync::Arc<rustls::ClientConfig>>,
}

trait Rw: Read + Write {}
impl<T: Read + Write> Rw for T {}

impl Server {
    /// `extra` is appended to the config (e.g. an `authorization` block).
    pub fn start(extra: &str) -> Server {
        let addr = free_addr();
        let d = Daemon::start(NATS_SERVER, "nats", addr, |dir| {
            format!(
                "listen: {addr}\njetstream {{ store_dir: \"{}\" }}\n{extra}\n",
                dir.join("js").display()
            )
        });
        Server { d, addr, tls: None }
    }

    /// The test's client speaks TLS with `config` to this server.
    pub fn with_client_tls(mut self, config: std::sync::Arc<rustls::ClientConfig>) -> Server {
        self.tls = Some(config);
        self
    }

    /// Stops the server gracefully (its stream store stays).
    pub fn stop(&mut self) {
        self.d.stop();
    }

    pub fn run(&mut self) {
        self.d.run();
    }

    pub fn url(&self) -> String {
        format!("nats://{}", self.addr)
    }

    /// A JetStream API request (`$JS.API.<api>`) and its JSON answer.
    pub fn api(&self, api: &str, body: &str, token: Option<&str>) -> Value {
        let mut s = TcpStream::connect(self.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        // INFO comes in the clear, byte by byte so as not to read past it.
        let mut info = Vec::new();
        let mut b = [0u8; 1];
        while !info.ends_with(b"\r\n") {
            s.read_exact(&mut b).unwrap();
            info.push(b[0]);
        }
        assert!(info.starts_with(b"INFO"), "{info:?}");
        let stream: Box<dyn Rw> = match &self.tls {
            Some(c) => {
                let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
                let conn = rustls::ClientConnection::new(c.clone(), name).unwrap();
                Box::new(rustls::StreamOwned::new(conn, s))
            }
            None => Box::new(s),
        };
        let mut r = BufReader::new(stream);
        let auth = token.map_or(String::new(), |t| format!(",\"auth_token\":\"{t}\""));
        let tls = self.tls.is_some();
        write!(
            r.get_mut(),
            "CONNECT {{\"verbose\":false,\"headers\":true,\"no_responders\":true,\"tls_required\":{tls}{auth}}}\r\nSUB _INBOX.test.* 1\r\nPUB $JS.API.{api} _INBOX.test.1 {}\r\n{body}\r\n",
            body.len()
        )
        .unwrap();
        r.get_mut().flush().unwrap();
        let mut line = String::new();
        loop {
            line.clear();
            r.read_line(&mut line).unwrap();
            if line.starts_with("PING") {
                r.get_mut().write_all(b"PONG\r\n").unwrap();
                continue;
            }
            assert!(line.starts_with("MSG"), "{line}");
            let n: usize = line.split_whitespace().last().unwrap().parse().unwrap();
            let mut buf = vec![0u8; n + 2];
            r.read_exact(&mut buf).unwrap();
            return serde_json::from_slice(&buf[..n]).unwrap();
        }
    }

    /// Makes stream `name` capturing `subjects` (file storage).
    pub fn create_stream(&self, name: &str, subjects: &[&str]) {
        let v = self.api(
            &format!("STREAM.CREATE.{name}"),
            &serde_json::json!({"name": name, "subjects": subjects, "storage": "file"}).to_string(),
            None,
        );
        assert!(v.get("error").is_none(), "{v}");
    }

    /// Messages the stream holds.
    pub fn stream_messages(&self, name: &str) -> u64 {
        let v = self.api(&format!("STREAM.INFO.{name}"), "", None);
        v["state"]["messages"]
            .as_u64()
            .unwrap_or_else(|| panic!("{v}"))
    }

    /// Waits until the stream holds `n` messages (or the time is up);
    /// returns what it holds.
    pub fn wait_stream(&self, name: &str, n: u64, timeout: Duration) -> u64 {
        let deadline = Instant::now() + timeout;
        loop {
            let have = self.stream_messages(name);
            if have >= n || Instant::now() > deadline {
                // A little longer: more than `n` would be duplicates.
                std::thread::sleep(Duration::from_millis(300));
                return self.stream_messages(name);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn config(src: SocketAddr, server: &Server, sink_extra: &str) -> String {
    format!(
        r#"shards = 2
[sources.app]
type = "tcp"
address = "{src}"
[sinks.cloud]
type = "nats"
inputs = ["app"]
url = "{}"
subject = "gw.app"
{sink_extra}
"#,
        server.url()
    )
}

const SENT: &str = r#"updraft_sink_sent_records_total{sink="cloud",type="nats"}"#;

#[test]
fn tcp_to_jetstream_stores_1m_records_exactly_once() {
    let server = Server::start("");
    server.create_stream("GW", &["gw.>"]);
    let src = free_addr();
    let u_ = Updraft::start(&config(src, &server, ""));
    send(
        src,
        &["--connections", "4", "--count", "1000000", "--size", "200"],
    );
    let n = server.wait_stream("GW", 1_000_000, Duration::from_secs(120));
    assert_eq!(n, 1_000_000, "{}", u_.log_text());
    assert_eq!(
        u_.wait_metric(SENT, 1_000_000.0, Duration::from_secs(10)),
        1_000_000.0
    );
}

#[test]
fn jetstream_with_a_disk_buffer_survives_kill_9_holding_every_record_once() {
    const N: u64 = 100_000;
    let server = Server::start("");
    server.create_stream("GW", &["gw.>"]);
    let src = free_addr();
    // One message in flight: the sink publishes far slower than the disk
    // buffer fills, so it is still at it when killed.
    let mut u_ = Updraft::start(&config(
        src,
        &server,
        "inflight = 1\n[sinks.cloud.buffer]\ntype = \"disk\"",
    ));
    send(
        src,
        &[
            "--connections",
            "2",
            "--count",
            &N.to_string(),
            "--size",
            "200",
        ],
    );
    // Every record is in the disk buffer before the kill (TCP senders get
    // no acknowledgement, so a kill while they send would lose what the
    // kernel had taken: that is not what this test is about).
    u_.wait_metric(
        r#"updraft_sink_durable_records_total{sink="cloud",type="nats"}"#,
        N as f64,
        Duration::from_secs(30),
    );
    u_.kill9();
    let before = server.stream_messages("GW");
    assert!(
        before > 0 && before < N,
        "the kill must come while the sink publishes: the stream held {before} of {N}"
    );
    u_.restart();
    let replayed = u_.wait_metric(
        r#"updraft_sink_wal_replayed_batches_total{sink="cloud",type="nats"}"#,
        1.0,
        Duration::from_secs(10),
    );
    assert!(replayed > 0.0, "{}", u_.log_text());
    // Every record once: the replay starts at the checkpoint, before what
    // the stream already held, and its messages carry the same ids, so the
    // stream's duplicate window drops those.
    let n = server.wait_stream("GW", N, Duration::from_secs(60));
    eprintln!("the stream held {before} at the kill; {replayed} batches replayed");
    assert_eq!(n, N, "{}", u_.log_text());
}

#[test]
fn a_server_stopped_for_ten_seconds_mid_stream_loses_nothing() {
    let mut server = Server::start("");
    server.create_stream("GW", &["gw.>"]);
    let src = free_addr();
    let u_ = Updraft::start(&config(
        src,
        &server,
        "[sinks.cloud.retry]\ninitial_backoff_ms = 50\nmax_backoff_ms = 500",
    ));
    let sender = spawn_send(
        src,
        &[
            "--connections",
            "2",
            "--count",
            "200000",
            "--size",
            "200",
            "--rate",
            "20000",
        ],
    );
    std::thread::sleep(Duration::from_secs(2));
    server.stop();
    std::thread::sleep(Duration::from_secs(10));
    server.run();
    let out = sender.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let n = server.wait_stream("GW", 200_000, Duration::from_secs(60));
    assert_eq!(n, 200_000, "{}", u_.log_text());
    assert!(
        u_.log_text().contains("connected to the server again"),
        "{}",
        u_.log_text()
    );
}

/// A shard whose connection has stored nothing for longer than the
/// JetStream wait loses the server: what it holds when the server comes
/// back, while the stream is not there yet (as while JetStream loads its
/// streams after a restart: "no responders"), is stored once the stream
/// is, not dead-lettered. A CI run dead-lettered 39 records so.
#[test]
fn records_held_through_a_restart_after_an_idle_start_are_stored_not_dead_lettered() {
    let mut server = Server::start("");
    let src = free_addr();
    let u_ = Updraft::start(&config(
        src,
        &server,
        "[sinks.cloud.retry]\ninitial_backoff_ms = 20\nmax_backoff_ms = 100",
    ));
    // No stream yet: one shard connects and, after the wait, refuses
    // these 10 for good; its connection stays, having stored nothing.
    send(
        src,
        &["--connections", "1", "--count", "10", "--size", "100"],
    );
    let dead = r#"updraft_sink_dead_letter_records_total{sink="cloud",type="nats"}"#;
    assert_eq!(
        u_.wait_metric(dead, 10.0, Duration::from_secs(20)),
        10.0,
        "{}",
        u_.log_text()
    );
    server.stop();
    // Back with an empty store and the stream made 1 s later: both
    // shards get "no responders" meanwhile.
    std::fs::remove_dir_all(server.d.dir.path().join("js")).unwrap();
    send(
        src,
        &["--connections", "8", "--count", "8000", "--size", "100"],
    );
    server.run();
    std::thread::sleep(Duration::from_secs(1));
    server.create_stream("GW", &["gw.>"]);
    let n = server.wait_stream("GW", 8_000, Duration::from_secs(30));
    assert_eq!(n, 8_000, "{}", u_.log_text());
    assert_eq!(u_.metric(dead), 10.0, "{}", u_.log_text());
}

#[test]
fn a_subject_no_stream_captures_goes_to_dead_letters_with_the_reason() {
    let server = Server::start("");
    server.create_stream("GW", &["gw.>"]);
    let src = free_addr();
    let u_ = Updraft::start(&config(src, &server, "").replace("gw.app", "elsewhere.app"));
    send(
        src,
        &["--connections", "1", "--count", "1000", "--size", "100"],
    );
    let dead = u_.wait_metric(
        r#"updraft_sink_dead_letter_records_total{sink="cloud",type="nats"}"#,
        1000.0,
        Duration::from_secs(20),
    );
    assert_eq!(dead, 1000.0, "{}", u_.log_text());
    assert_eq!(server.stream_messages("GW"), 0);
    let dlq = u_.data_dir().join("dlq").join("cloud");
    let notes: Vec<String> = std::fs::read_dir(&dlq)
        .unwrap_or_else(|e| panic!("{}: {e}\n{}", dlq.display(), u_.log_text()))
        .filter_map(|e| {
            let p = e.unwrap().path();
            (p.extension()? == "json").then(|| std::fs::read_to_string(p).unwrap())
        })
        .collect();
    assert!(!notes.is_empty());
    assert!(
        notes
            .iter()
            .all(|n| n.contains("no stream captures the subject")),
        "{notes:?}"
    );
    assert!(u_.log_text().contains("dead-letter"), "{}", u_.log_text());
}

#[test]
fn a_bad_token_is_refused_with_a_clear_line_and_never_logged() {
    let server = Server::start("authorization { token: \"right-token\" }");
    std::env::set_var("UPDRAFT_TEST_NATS_TOKEN", "wrong-secret-token");
    let src = free_addr();
    let u_ = Updraft::start(&config(
        src,
        &server,
        "token = \"${UPDRAFT_TEST_NATS_TOKEN}\"\njetstream = false",
    ));
    send(
        src,
        &["--connections", "1", "--count", "10", "--size", "100"],
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !u_.log_text().contains("refused the connection") {
        assert!(Instant::now() < deadline, "{}", u_.log_text());
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = u_.log_text();
    assert!(log.contains("Authorization Violation"), "{log}");
    assert!(log.contains(&server.url()), "{log}");
    assert!(!log.contains("wrong-secret-token"), "{log}");
    let metrics = crate::harness::http_get(u_.metrics, "/metrics").unwrap();
    assert!(!metrics.contains("wrong-secret-token"));
}

#[test]
fn jetstream_over_tls_with_a_client_certificate_the_server_requires() {
    let dir = tempfile::tempdir().unwrap();
    let [ca, cert, key, client_cert, client_key] = pki(dir.path(), "nats");
    let server = Server::start(&format!(
        "tls {{\n  cert_file: \"{cert}\"\n  key_file: \"{key}\"\n  ca_file: \"{ca}\"\n  verify: true\n}}"
    ))
    .with_client_tls(
        updraft::tls::client_config(
            "test",
            Some(std::path::Path::new(&ca)),
            true,
            Some((
                std::path::Path::new(&client_cert),
                std::path::Path::new(&client_key),
            )),
        )
        .unwrap(),
    );
    server.create_stream("GW", &["gw.>"]);
    let tls_table = format!(
        "[sinks.cloud.tls]\nca_file = \"{ca}\"\ncert_file = \"{client_cert}\"\nkey_file = \"{client_key}\""
    );
    // nats:// to a server that requires TLS: the sink starts TLS after the
    // server's INFO.
    let src = free_addr();
    let u_ = Updraft::start(&config(src, &server, &tls_table));
    send(
        src,
        &["--connections", "2", "--count", "50000", "--size", "200"],
    );
    let n = server.wait_stream("GW", 50_000, Duration::from_secs(30));
    assert_eq!(n, 50_000, "{}", u_.log_text());
    drop(u_);
    // Without the client certificate the server refuses the handshake:
    // logged, nothing stored, the sink keeps trying.
    let src = free_addr();
    let bad = Updraft::start(&config(
        src,
        &server,
        &format!("[sinks.cloud.tls]\nca_file = \"{ca}\""),
    ));
    send(
        src,
        &["--connections", "1", "--count", "10", "--size", "100"],
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !bad.log_text().contains("TLS") {
        assert!(Instant::now() < deadline, "{}", bad.log_text());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(bad.log_text().contains(&server.url()), "{}", bad.log_text());
    assert_eq!(server.stream_messages("GW"), 50_000);
}
