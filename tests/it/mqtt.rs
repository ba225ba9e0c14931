//! The mqtt sink against a real broker: Debian's mosquitto, started by each
//! test on loopback with its own config, port and persistence directory.

use crate::harness::{
    assert_devices_once, device_args, free_addr, pki, send, spawn_send, u, wait_listening, Daemon,
    Receiver, Updraft,
};
use std::net::SocketAddr;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

const MOSQUITTO: &str = "/usr/sbin/mosquitto";

/// A mosquitto broker on loopback that keeps its state on disk (so a
/// graceful restart keeps what it acknowledged and queued).
pub struct Broker {
    d: Daemon,
    pub addr: SocketAddr,
}

impl Broker {
    /// `extra` is appended to the config (e.g. a password file).
    pub fn start(extra: &str) -> Broker {
        let addr = free_addr();
        let anonymous = if extra.contains("password_file") {
            "false"
        } else {
            "true"
        };
        let d = Daemon::start(MOSQUITTO, "mosquitto", addr, |dir| {
            // mosquitto started as root drops to its own user: it must be
            // able to write its database here.
            let data = dir.join("data");
            std::fs::create_dir(&data).unwrap();
            std::fs::set_permissions(&data, std::os::unix::fs::PermissionsExt::from_mode(0o777))
                .unwrap();
            format!(
                "listener {} 127.0.0.1\nallow_anonymous {anonymous}\npersistence true\npersistence_location {}/\nautosave_interval 0\nmax_queued_messages 0\nmax_inflight_messages 100\nlog_dest stderr\n{extra}\n",
                addr.port(),
                data.display()
            )
        });
        let b = Broker { d, addr };
        b.wait_extra_listeners(extra);
        b
    }

    /// Mosquitto opens its listeners one after another: a second
    /// `listener` in `extra` may not accept yet when the first does.
    fn wait_extra_listeners(&self, extra: &str) {
        for port in extra
            .lines()
            .filter_map(|l| l.strip_prefix("listener "))
            .filter_map(|l| l.split_whitespace().next()?.parse::<u16>().ok())
        {
            wait_listening(SocketAddr::from(([127, 0, 0, 1], port)), "mosquitto");
        }
    }

    /// Stops the broker gracefully (it saves its database).
    pub fn stop(&mut self) {
        self.d.stop();
    }

    pub fn restart(&mut self) {
        self.d.stop();
        self.d.run();
    }

    pub fn log_text(&self) -> String {
        self.d.log_text()
    }

    pub fn url(&self) -> String {
        format!("mqtt://{}", self.addr)
    }
}

fn config(src: SocketAddr, broker: &Broker, sink_extra: &str) -> String {
    format!(
        r#"shards = 2
[sources.app]
type = "tcp"
address = "{src}"
[sinks.cloud]
type = "mqtt"
inputs = ["app"]
url = "{}"
topic = "site-7/app"
{sink_extra}
"#,
        broker.url()
    )
}

const SENT: &str = r#"updraft_sink_sent_records_total{sink="cloud",type="mqtt"}"#;

#[test]
fn tcp_to_mqtt_carries_every_record_once_over_3_1_1_and_5() {
    for version in ["3.1.1", "5"] {
        let broker = Broker::start("");
        let rx = Receiver::start_mqtt(
            broker.addr,
            100_000,
            60,
            &["--topic", "site-7/app", "--mqtt-version", version],
        );
        let src = free_addr();
        let u_ = Updraft::start(&config(
            src,
            &broker,
            &format!("protocol = \"{version}\"\nqos = 1"),
        ));
        send(
            src,
            &["--connections", "4", "--count", "100000", "--size", "200"],
        );
        let (r, ok) = rx.finish();
        assert!(ok, "MQTT {version}: {r}\n{}", u_.log_text());
        assert_eq!(u(&r, "unique"), 100_000, "MQTT {version}: {r}");
        assert_eq!(u(&r, "duplicates"), 0, "MQTT {version}: {r}");
        assert_eq!(
            u_.wait_metric(SENT, 100_000.0, Duration::from_secs(10)),
            100_000.0
        );
    }
}

#[test]
fn a_broker_stopped_for_ten_seconds_mid_stream_loses_nothing() {
    let mut broker = Broker::start("");
    let rx = Receiver::start_mqtt(broker.addr, 200_000, 90, &["--topic", "site-7/#"]);
    let src = free_addr();
    let u_ = Updraft::start(&config(
        src,
        &broker,
        "[sinks.cloud.buffer]\ntype = \"disk\"",
    ));
    let sender = spawn_send(
        src,
        &[
            "--connections",
            "4",
            "--count",
            "200000",
            "--size",
            "200",
            "--rate",
            "20000",
        ],
    );
    u_.wait_metric(SENT, 20_000.0, Duration::from_secs(20));
    broker.stop();
    std::thread::sleep(Duration::from_secs(10));
    broker.restart();
    let out = sender.wait_with_output().unwrap();
    assert!(out.status.success());
    let (r, ok) = rx.finish();
    assert!(ok, "{r}\n{}\n{}", u_.log_text(), broker.log_text());
    assert_eq!(u(&r, "lost"), 0, "{r}");
    assert_eq!(u(&r, "unique"), 200_000, "{r}");
    assert!(
        u(&r["mqtt"], "connects") >= 2,
        "the receiver saw the outage: {r}"
    );
    // Resent messages are the ones unacknowledged when a connection broke:
    // at most the in-flight window per shard each time a shard connected
    // again (a connection taken while the broker restarts can break too),
    // and the receiver's own window, which the broker sends it again.
    let log = u_.log_text();
    let reconnects = log.matches("connected to the broker again").count() as u64;
    assert!(reconnects >= 1, "{log}");
    assert!(
        u(&r, "duplicates") <= reconnects * 1000 + 100,
        "{reconnects} reconnects: {r}"
    );
    assert!(u_.metric(r#"updraft_sink_send_errors_total{sink="cloud",type="mqtt"}"#) > 0.0);
}

#[test]
fn a_wrong_password_is_refused_naming_the_broker_and_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("passwd");
    let made = Command::new("mosquitto_passwd")
        .args(["-b", "-c"])
        .arg(&pw)
        .args(["gateway", "right-secret"])
        .status()
        .unwrap();
    assert!(made.success());
    std::fs::set_permissions(&pw, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let broker = Broker::start(&format!("password_file {}", pw.display()));
    std::env::set_var("UPDRAFT_TEST_MQTT_PASSWORD", "wrong-secret-value");
    let src = free_addr();
    let u_ = Updraft::start(&config(
        src,
        &broker,
        "username = \"gateway\"\npassword = \"${UPDRAFT_TEST_MQTT_PASSWORD}\"",
    ));
    send(
        src,
        &["--connections", "1", "--count", "100", "--size", "100"],
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !u_.log_text().contains("refused the connection") {
        assert!(Instant::now() < deadline, "{}", u_.log_text());
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = u_.log_text();
    assert!(
        log.contains(&broker.url()),
        "the log names the broker: {log}"
    );
    assert!(
        log.contains("NotAuthorized") || log.contains("BadUserNamePassword"),
        "the log names the CONNACK reason: {log}"
    );
    assert!(
        !log.contains("wrong-secret-value"),
        "the password never shows: {log}"
    );
    assert_eq!(u_.metric(SENT), 0.0);
    let metrics = crate::harness::http_get(u_.metrics, "/metrics").unwrap();
    assert!(!metrics.contains("wrong-secret-value"));
}

/// `updraft-loadgen send --proto mqtt` to `broker` (QoS 1, topic
/// `sensors/<stream>`), in the background.
fn publish(broker: &Broker, args: &[&str]) -> Child {
    let mut all = vec!["--proto", "mqtt"];
    all.extend_from_slice(args);
    spawn_send(broker.addr, &all)
}

/// An mqtt source on `a` (topics `sensors/#`, a persistent session) and an
/// mqtt sink to `b` (topic `gw/{topic}`: `sensors/3` goes to `gw/sensors/3`).
fn bridge(a: &Broker, b: &Broker, extra: &str) -> String {
    format!(
        r#"shards = 2
[sources.sensors]
type = "mqtt"
url = "{}"
topics = ["sensors/#"]
client_id = "gw-bridge"
[sinks.cloud]
type = "mqtt"
inputs = ["sensors"]
url = "{}"
topic = "gw/{{topic}}"
{extra}
"#,
        a.url(),
        b.url()
    )
}

#[test]
fn mqtt_to_mqtt_bridges_200k_qos1_messages_exactly_once() {
    let (a, b) = (Broker::start(""), Broker::start(""));
    let rx = Receiver::start_mqtt(
        b.addr,
        200_000,
        90,
        &["--topic", "gw/#", "--expect-topic", "gw/sensors/{stream}"],
    );
    let u_ = Updraft::start(&bridge(&a, &b, ""));
    u_.wait_metric(
        r#"updraft_source_connections_open{source="sensors"}"#,
        1.0,
        Duration::from_secs(10),
    );
    let out = publish(
        &a,
        &["--connections", "4", "--count", "200000", "--size", "256"],
    )
    .wait_with_output()
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (r, ok) = rx.finish();
    assert!(ok, "{r}\n{}", u_.log_text());
    assert_eq!((u(&r, "unique"), u(&r, "duplicates")), (200_000, 0), "{r}");
    assert_eq!(u(&r, "streams"), 4, "{r}");
    // Each on the topic it came on, under gw/.
    assert_eq!(u(&r["mqtt"], "wrong_topic"), 0, "{r}");
}

#[test]
fn mqtt_with_a_disk_buffer_survives_two_kill_9s_losing_nothing() {
    let (a, b) = (Broker::start(""), Broker::start(""));
    let rx = Receiver::start_mqtt(
        b.addr,
        200_000,
        120,
        &[
            "--topic",
            "gw/#",
            "--linger-ms",
            "1000",
            "--expect-topic",
            "gw/sensors/{stream}",
        ],
    );
    let mut u_ = Updraft::start(&bridge(&a, &b, "[sinks.cloud.buffer]\ntype = \"disk\""));
    u_.wait_metric(
        r#"updraft_source_connections_open{source="sensors"}"#,
        1.0,
        Duration::from_secs(10),
    );
    let sender = publish(
        &a,
        &[
            "--connections",
            "4",
            "--count",
            "200000",
            "--size",
            "256",
            "--rate",
            // Half of what the two brokers and updraft carry on 2 cores, so
            // no backlog builds: what a kill repeats grows with the backlog
            // (the batches sent but not yet covered by a checkpoint).
            "10000",
        ],
    );
    for _ in 0..2 {
        std::thread::sleep(Duration::from_secs(3));
        u_.kill9();
        std::thread::sleep(Duration::from_millis(500));
        u_.restart();
    }
    let out = sender.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (r, ok) = rx.finish();
    assert!(ok, "{r}\n{}", u_.log_text());
    assert_eq!(u(&r, "lost"), 0, "{r}");
    assert_eq!(u(&r, "unique"), 200_000, "{r}");
    // The topic travels through the disk buffer and its replay.
    assert_eq!(u(&r["mqtt"], "wrong_topic"), 0, "{r}");
    // Each kill repeats at most what was taken but not yet acknowledged
    // upstream or downstream: bounded by the windows, not the stream.
    let dup = u(&r, "duplicates");
    eprintln!("duplicates after two kill -9: {dup}");
    assert!(dup <= 20_000, "{r}");
}

#[test]
fn mqtt_to_http_and_tcp_to_mqtt_each_carry_100k_exactly_once() {
    // mqtt source -> http sink.
    let a = Broker::start("");
    let sink = free_addr();
    let rx = Receiver::start(sink, 100_000, 60, &["--proto", "http"]);
    let u_ = Updraft::start(&format!(
        r#"shards = 2
[sources.sensors]
type = "mqtt"
url = "{}"
topics = ["sensors/+"]
protocol = "5"
[sinks.cloud]
type = "http"
inputs = ["sensors"]
uri = "http://{sink}/ingest"
"#,
        a.url()
    ));
    u_.wait_metric(
        r#"updraft_source_connections_open{source="sensors"}"#,
        1.0,
        Duration::from_secs(10),
    );
    let out = publish(
        &a,
        &[
            "--connections",
            "2",
            "--count",
            "100000",
            "--size",
            "200",
            "--mqtt-version",
            "5",
        ],
    )
    .wait_with_output()
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (r, ok) = rx.finish();
    assert!(ok, "{r}\n{}", u_.log_text());
    assert_eq!((u(&r, "unique"), u(&r, "duplicates")), (100_000, 0), "{r}");
    drop(u_);
    // tcp source -> mqtt sink is tcp_to_mqtt_carries_every_record_once_over_3_1_1_and_5.
}

#[test]
fn mqtts_with_a_client_certificate_delivers_and_a_wrong_ca_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let [ca, cert, key, client_cert, client_key] = pki(dir.path(), "right");
    let [other_ca, ..] = pki(dir.path(), "other");
    // A TLS listener that requires a client certificate, and a plain one
    // for the subscriber.
    let plain = free_addr();
    let broker = Broker::start(&format!(
        "cafile {ca}\ncertfile {cert}\nkeyfile {key}\nrequire_certificate true\nlistener {} 127.0.0.1",
        plain.port()
    ));
    let rx = Receiver::start_mqtt(plain, 20_000, 60, &["--topic", "site-7/#"]);
    let tls_url = format!("mqtts://{}", broker.addr);
    let sink = |ca: &str| {
        format!(
            r#"shards = 2
[sources.app]
type = "tcp"
address = "{}"
[sinks.cloud]
type = "mqtt"
inputs = ["app"]
url = "{tls_url}"
topic = "site-7/app"
[sinks.cloud.tls]
ca_file = "{ca}"
cert_file = "{client_cert}"
key_file = "{client_key}"
"#,
            free_addr()
        )
    };
    let text = sink(&ca);
    let src: SocketAddr = text
        .lines()
        .find_map(|l| l.strip_prefix("address = \""))
        .unwrap()
        .trim_end_matches('"')
        .parse()
        .unwrap();
    let u_ = Updraft::start(&text);
    send(
        src,
        &["--connections", "2", "--count", "20000", "--size", "200"],
    );
    let (r, ok) = rx.finish();
    assert!(ok, "{r}\n{}\n{}", u_.log_text(), broker.log_text());
    assert_eq!((u(&r, "unique"), u(&r, "duplicates")), (20_000, 0), "{r}");

    // The wrong CA: the broker's certificate is refused, clearly.
    let text = sink(&other_ca);
    let src: SocketAddr = text
        .lines()
        .find_map(|l| l.strip_prefix("address = \""))
        .unwrap()
        .trim_end_matches('"')
        .parse()
        .unwrap();
    let bad = Updraft::start(&text);
    send(
        src,
        &["--connections", "1", "--count", "100", "--size", "100"],
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !bad.log_text().contains("invalid peer certificate") {
        assert!(Instant::now() < deadline, "{}", bad.log_text());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(bad.log_text().contains(&tls_url), "{}", bad.log_text());
    assert_eq!(bad.metric(SENT), 0.0);

    // No client certificate: the broker requires one and refuses.
    let text = sink(&ca)
        .replace(&format!("cert_file = \"{client_cert}\"\n"), "")
        .replace(&format!("key_file = \"{client_key}\"\n"), "");
    assert!(!text.contains("cert_file"));
    let src: SocketAddr = text
        .lines()
        .find_map(|l| l.strip_prefix("address = \""))
        .unwrap()
        .trim_end_matches('"')
        .parse()
        .unwrap();
    let anonymous = Updraft::start(&text);
    send(
        src,
        &["--connections", "1", "--count", "100", "--size", "100"],
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !anonymous.log_text().contains("TLS") {
        assert!(Instant::now() < deadline, "{}", anonymous.log_text());
        std::thread::sleep(Duration::from_millis(50));
    }
    let line = anonymous.log_text();
    let line = line
        .lines()
        .find(|l| l.contains("TLS"))
        .unwrap_or_default()
        .to_string();
    eprintln!("without a client certificate: {line}");
    assert!(line.contains(&tls_url), "{line}");
    assert_eq!(anonymous.metric(SENT), 0.0, "{}", anonymous.log_text());
}

#[test]
fn an_mqtt_source_subscribes_over_mqtts_with_a_client_certificate() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let [ca, cert, key, client_cert, client_key] = pki(dir.path(), "src");
    let plain = free_addr();
    let broker = Broker::start(&format!(
        "cafile {ca}\ncertfile {cert}\nkeyfile {key}\nrequire_certificate true\nlistener {} 127.0.0.1",
        plain.port()
    ));
    let sink = free_addr();
    let rx = Receiver::start(sink, 20_000, 60, &[]);
    let u_ = Updraft::start(&format!(
        r#"shards = 2
[sources.sensors]
type = "mqtt"
url = "mqtts://{}"
topics = ["sensors/#"]
protocol = "5"
[sources.sensors.tls]
ca_file = "{ca}"
cert_file = "{client_cert}"
key_file = "{client_key}"
[sinks.out]
type = "tcp"
inputs = ["sensors"]
address = "{sink}"
"#,
        broker.addr
    ));
    u_.wait_metric(
        r#"updraft_source_connections_open{source="sensors"}"#,
        1.0,
        Duration::from_secs(10),
    );
    let out = spawn_send(
        plain,
        &[
            "--proto",
            "mqtt",
            "--mqtt-version",
            "5",
            "--connections",
            "2",
            "--count",
            "20000",
            "--size",
            "200",
        ],
    )
    .wait_with_output()
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (r, ok) = rx.finish();
    assert!(ok, "{r}\n{}\n{}", u_.log_text(), broker.log_text());
    assert_eq!((u(&r, "unique"), u(&r, "duplicates")), (20_000, 0), "{r}");
}

#[test]
fn an_mqtt_message_longer_than_max_record_bytes_is_counted_and_the_rest_flows() {
    let a = Broker::start("message_size_limit 0");
    let sink = free_addr();
    let rx = Receiver::start(sink, 1_000, 60, &[]);
    let u_ = Updraft::start(&format!(
        r#"shards = 1
[sources.sensors]
type = "mqtt"
url = "{}"
topics = ["sensors/#"]
max_record_bytes = 1024
[sinks.out]
type = "tcp"
inputs = ["sensors"]
address = "{sink}"
"#,
        a.url()
    ));
    u_.wait_metric(
        r#"updraft_source_connections_open{source="sensors"}"#,
        1.0,
        Duration::from_secs(10),
    );
    // 2 MiB in one QoS 1 message: far past the record limit and past the
    // source's usual read buffer.
    let big = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(big.path(), vec![b'z'; 2 << 20]).unwrap();
    let status = Command::new("mosquitto_pub")
        .args([
            "-p",
            &a.addr.port().to_string(),
            "-h",
            "127.0.0.1",
            "-q",
            "1",
            "-t",
            "sensors/big",
            "-f",
        ])
        .arg(big.path())
        .status()
        .unwrap();
    assert!(status.success());
    let out = publish(
        &a,
        &["--connections", "1", "--count", "1000", "--size", "200"],
    )
    .wait_with_output()
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (r, ok) = rx.finish();
    assert!(ok, "{r}\n{}", u_.log_text());
    assert_eq!((u(&r, "unique"), u(&r, "malformed")), (1_000, 0), "{r}");
    assert_eq!(
        u_.metric(r#"updraft_source_dropped_records_total{source="sensors",reason="oversize"}"#),
        1.0
    );
    // Acknowledged: not sent again after a restart of the session.
    assert_eq!(
        u_.metric(r#"updraft_source_connections_accepted_total{source="sensors"}"#),
        1.0
    );
}

#[test]
fn a_topic_named_by_a_line_protocol_tag_puts_each_devices_records_on_its_own_topic() {
    const N: u64 = 50_000;
    let broker = Broker::start("");
    let rx = Receiver::start_mqtt(
        broker.addr,
        N,
        60,
        &[
            "--topic",
            "site-7/#",
            "--expect-topic",
            "site-7/d{stream}/lg",
        ],
    );
    let src = free_addr();
    let u_ = Updraft::start(&format!(
        r#"shards = 2
[sources.app]
type = "tcp"
address = "{src}"
decoding = "influx"
partition_by = {{ field = "tag.device" }}
[sinks.cloud]
type = "mqtt"
inputs = ["app"]
url = "{}"
topic = "site-7/{{tag.device}}/{{measurement}}"
qos = 1
"#,
        broker.url()
    ));
    // A tag the sender chose that would be a wildcard in a topic: that
    // record is dropped and counted, the session goes on.
    let mut s = std::net::TcpStream::connect(src).unwrap();
    std::io::Write::write_all(&mut s, b"lg,device=d+1 v=1\nlg,device=d# v=2\n").unwrap();
    drop(s);
    let args = device_args(2, N, 120, 50);
    send(src, &args.iter().map(String::as_str).collect::<Vec<_>>());
    let (r, ok) = rx.finish();
    assert_devices_once(&r, ok, N, 50, &u_.log_text());
    assert_eq!(
        u(&r["mqtt"], "wrong_topic"),
        0,
        "each on its device's topic: {r}"
    );
    let dropped = r#"updraft_sink_buffer_dropped_records_total{sink="cloud",type="mqtt"}"#;
    assert_eq!(u_.wait_metric(dropped, 2.0, Duration::from_secs(5)), 2.0);
    assert!(u_.log_text().contains("wildcard"), "{}", u_.log_text());
}

#[test]
fn an_mqtt_source_decodes_line_protocol_and_names_each_devices_topic_by_its_tag() {
    const N: u64 = 20_000;
    let broker = Broker::start("");
    let rx = Receiver::start_mqtt(
        broker.addr,
        N,
        60,
        &["--topic", "gw/#", "--expect-topic", "gw/d{stream}"],
    );
    let u_ = Updraft::start(&format!(
        r#"shards = 2
[sources.sensors]
type = "mqtt"
url = "{url}"
topics = ["sensors/#"]
decoding = "influx"
on_error = "drop"
[sinks.cloud]
type = "mqtt"
inputs = ["sensors"]
url = "{url}"
topic = "gw/{{tag.device}}"
qos = 1
"#,
        url = broker.url()
    ));
    u_.wait_metric(
        r#"updraft_source_connections_open{source="sensors"}"#,
        1.0,
        Duration::from_secs(10),
    );
    // A message that is not line protocol: counted, dropped, acknowledged.
    let out = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &broker.addr.port().to_string()])
        .args(["-t", "sensors/odd", "-q", "1", "-m", "not line protocol"])
        .output()
        .expect("mosquitto_pub (mosquitto-clients) is installed");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let p = publish(
        &broker,
        &[
            &["--topic", "sensors/{stream}"][..],
            &device_args(2, N, 120, 20)
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>(),
        ]
        .concat(),
    );
    let out = p.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (r, ok) = rx.finish();
    assert_devices_once(&r, ok, N, 20, &u_.log_text());
    assert_eq!(u(&r["mqtt"], "wrong_topic"), 0, "{r}");
    assert_eq!(
        u_.metric(r#"updraft_source_decode_errors_total{source="sensors"}"#),
        1.0
    );
    assert_eq!(
        u_.metric(r#"updraft_source_dropped_records_total{source="sensors",reason="decode"}"#),
        1.0
    );
    assert!(
        u_.log_text().contains("not line protocol"),
        "{}",
        u_.log_text()
    );
}
