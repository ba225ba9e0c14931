//! `updraft validate` and `run` refuse a bad config, naming the key.

use crate::harness::updraft;
use std::process::Command;

const GOOD: &str = r#"
shards = 1
[sources.app]
type = "tcp"
address = "127.0.0.1:5140"
[sinks.up]
type = "tcp"
inputs = ["app"]
address = "127.0.0.1:16000"
[sinks.up.batch]
max_records = 1000
"#;

fn check(subcommand: &str, text: &str) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(&path, text).unwrap();
    let out = Command::new(updraft())
        .args([subcommand, "--config"])
        .arg(&path)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_good_config_validates() {
    let (ok, err) = check("validate", GOOD);
    assert!(ok, "{err}");
}

#[test]
fn bad_keys_are_named_by_validate_and_run() {
    let cases = [
        (GOOD.replace("max_records", "max_recordz"), "sinks.up.batch"),
        (
            GOOD.replace("127.0.0.1:5140", "127.0.0.1"),
            "sources.app.address",
        ),
        (GOOD.replace("[\"app\"]", "[\"nope\"]"), "sinks.up.inputs"),
        (
            GOOD.replace("type = \"tcp\"\ninputs", "type = \"kafka\"\ninputs"),
            "sinks.up.type",
        ),
    ];
    for (text, key) in cases {
        for sub in ["validate", "run"] {
            let (ok, err) = check(sub, &text);
            assert!(!ok, "{sub} accepted a config that names {key} wrongly");
            assert!(err.contains(key), "{sub}: {err:?} should name {key}");
        }
    }
}

#[test]
fn every_example_validates() {
    for e in std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/examples")).unwrap() {
        let path = e.unwrap().path();
        let out = Command::new(updraft())
            .args(["validate", "--config"])
            .arg(&path)
            .env("CLOUD_TOKEN", "example-token")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn issue18_10_validation_gaps_are_closed() {
    let two_sources = GOOD.replace(
        "[sinks.up]",
        "[sources.again]\ntype = \"tcp\"\naddress = \"127.0.0.1:5140\"\n[sinks.up]",
    );
    let cases = [
        (two_sources, "sources.app.address", "also the address"),
        (
            GOOD.replace(
                "max_records = 1000",
                "max_records = 1000\nlinger_ms = 100000000000000",
            ),
            "sinks.up.batch.linger_ms",
            "at most",
        ),
        (
            GOOD.replace(
                "[sinks.up.batch]",
                "[sinks.up.buffer]\nmax_bytes = 1000000000000000\n[sinks.up.batch]",
            ),
            "sinks.up.buffer.max_bytes",
            "between",
        ),
        (
            GOOD.replace(
                "address = \"127.0.0.1:5140\"",
                "address = \"127.0.0.1:5140\"\nmax_connections = 1000000000000",
            ),
            "sources.app.max_connections",
            "between",
        ),
        (
            GOOD.replace(
                "type = \"tcp\"\ninputs = [\"app\"]\naddress = \"127.0.0.1:16000\"",
                "type = \"file\"\ninputs = [\"app\"]\npath = \"/dev/null/out.log\"",
            ),
            "sinks.up.path",
            "not a directory",
        ),
        (
            GOOD.replace(
                "type = \"tcp\"\ninputs = [\"app\"]\naddress = \"127.0.0.1:16000\"",
                "type = \"file\"\ninputs = [\"app\"]\npath = \"/tmp\"",
            ),
            "sinks.up.path",
            "is a directory",
        ),
        (
            GOOD.replace(
                "type = \"tcp\"\ninputs = [\"app\"]\naddress = \"127.0.0.1:16000\"",
                "type = \"http\"\ninputs = [\"app\"]\nuri = \"http://127.0.0.1:16000/in/{host}\"",
            ),
            "sinks.up.uri",
            "{host} needs every input to supply it",
        ),
        (
            GOOD.replace(
                "type = \"tcp\"\ninputs = [\"app\"]\naddress = \"127.0.0.1:16000\"",
                "type = \"http\"\ninputs = [\"app\"]\nuri = \"http://127.0.0.1:16000/\"\nheaders = { X-App = \"{app}\" }",
            ),
            "sinks.up.headers",
            "{app} needs every input to supply it",
        ),
        (
            GOOD.replace(
                "address = \"127.0.0.1:16000\"",
                "address = \"127.0.0.1:16000\"\nrate_limit = { burst_bytes = 10 }",
            ),
            "sinks.up.rate_limit.bytes_per_sec",
            "needs bytes_per_sec",
        ),
        (
            GOOD.replace(
                "address = \"127.0.0.1:16000\"",
                "address = \"127.0.0.1:16000\"\nrate_limit = { bytes_per_sec = 10 }",
            ),
            "sinks.up.rate_limit.bytes_per_sec",
            "between 1024",
        ),
        (
            GOOD.replace(
                "address = \"127.0.0.1:16000\"",
                "address = \"127.0.0.1:16000\"\nrate_limit = { bytes_per_sec = 2048, burst_bytes = 999999999 }",
            ),
            "sinks.up.rate_limit.burst_bytes",
            "a minute's worth",
        ),
    ];
    for (text, key, why) in cases {
        let (ok, err) = check("validate", &text);
        assert!(
            !ok,
            "validate accepted a config it must refuse ({key}):\n{text}"
        );
        assert!(
            err.contains(key) && err.contains(why),
            "{err:?} should name {key} ({why})"
        );
    }
}

#[test]
fn an_mqtt_sink_refuses_what_it_cannot_do_naming_the_key() {
    let mqtt = |keys: &str| {
        GOOD.replace(
            "type = \"tcp\"\ninputs = [\"app\"]\naddress = \"127.0.0.1:16000\"",
            &format!("type = \"mqtt\"\ninputs = [\"app\"]\n{keys}"),
        )
    };
    let (ok, err) = check(
        "validate",
        &mqtt("url = \"mqtt://127.0.0.1:1883\"\ntopic = \"gw/app\""),
    );
    assert!(ok, "{err}");
    let cases = [
        (
            // The input is a tcp source: its records have no topic.
            mqtt("url = \"mqtt://127.0.0.1:1883\"\ntopic = \"gw/{topic}\""),
            "sinks.up.topic",
            "sources.app (tcp)",
        ),
        (
            mqtt("url = \"mqtt://127.0.0.1:1883\"\ntopic = \"gw/{host}\""),
            "sinks.up.topic",
            "{host} needs every input to supply it, and sources.app does not: a field needs a decoding",
        ),
        (
            mqtt("url = \"mqtt://127.0.0.1:1883\"\ntopic = \"gw/{tag.device}\"").replace(
                "address = \"127.0.0.1:5140\"",
                "address = \"127.0.0.1:5140\"\ndecoding = \"syslog\"",
            ),
            "sinks.up.topic",
            "not a syslog field",
        ),
        (
            mqtt("url = \"mqtt://127.0.0.1:1883\"\ntopic = \"gw/{}\""),
            "sinks.up.topic",
            "{} is not a field",
        ),
        (
            mqtt("url = \"mqtt://127.0.0.1:1883\"\ntopic = \"gw/#\""),
            "sinks.up.topic",
            "wildcards",
        ),
        (
            mqtt("url = \"http://127.0.0.1:1883\"\ntopic = \"gw\""),
            "sinks.up.url",
            "mqtt://",
        ),
        (
            mqtt("url = \"mqtt://127.0.0.1:1883\"\ntopic = \"gw\"\nqos = 2"),
            "sinks.up.qos",
            "0 or 1",
        ),
        (
            mqtt("url = \"mqtt://127.0.0.1:1883\"\ntopic = \"gw\"\npassword = \"${UPDRAFT_NOT_SET_ANYWHERE}\""),
            "sinks.up.password",
            "username",
        ),
        (
            mqtt("url = \"mqtt://127.0.0.1:1883\"\ntopic = \"gw\"\nprotocol = \"4\""),
            "sinks.up.protocol",
            "3.1.1",
        ),
    ];
    assert_refused(cases);
}

#[test]
fn a_nats_sink_refuses_what_it_cannot_do_naming_the_key() {
    let nats = |keys: &str| {
        GOOD.replace(
            "type = \"tcp\"\ninputs = [\"app\"]\naddress = \"127.0.0.1:16000\"",
            &format!(
                "type = \"nats\"\ninputs = [\"app\"]\nurl = \"nats://127.0.0.1:4222\"\n{keys}"
            ),
        )
    };
    let (ok, err) = check("validate", &nats("subject = \"gw.app\""));
    assert!(ok, "{err}");
    let cases = [
        (nats("subject = \"gw.*\""), "sinks.up.subject", "wildcards"),
        (nats("subject = \"gw..app\""), "sinks.up.subject", "empty"),
        (
            nats("subject = \"gw.{topic}\""),
            "sinks.up.subject",
            "sources.app (tcp)",
        ),
        (nats(""), "sinks.up.subject", "needs a subject"),
        (
            nats("subject = \"gw\"\ntoken = \"t\"\nusername = \"u\""),
            "sinks.up.token",
            "not both",
        ),
        (
            nats("subject = \"gw\"\ninflight = 0"),
            "sinks.up.inflight",
            "between",
        ),
        (
            nats("subject = \"gw\"\ntoken = \"${UPDRAFT_NOT_SET_ANYWHERE}\""),
            "sinks.up.token",
            "UPDRAFT_NOT_SET_ANYWHERE",
        ),
    ];
    assert_refused(cases);
    let bad_url =
        nats("subject = \"gw\"").replace("nats://127.0.0.1:4222", "http://127.0.0.1:4222");
    let (ok, err) = check("validate", &bad_url);
    assert!(
        !ok && err.contains("sinks.up.url") && err.contains("nats://"),
        "{err}"
    );
}

#[test]
fn updraft_decoding_and_where_keys_refuse_what_they_cannot_do_naming_the_key() {
    let source = |keys: &str| {
        GOOD.replace(
            "type = \"tcp\"\naddress = \"127.0.0.1:5140\"",
            &format!("type = \"updraft\"\naddress = \"127.0.0.1:9800\"\n{keys}"),
        )
    };
    let sink = |keys: &str| {
        GOOD.replace(
            "type = \"tcp\"\ninputs = [\"app\"]\naddress = \"127.0.0.1:16000\"",
            &format!("type = \"updraft\"\ninputs = [\"app\"]\n{keys}"),
        )
    };
    for good in [source(""), sink("url = \"updraft://127.0.0.1\"")] {
        let (ok, err) = check("validate", &good);
        assert!(ok, "{err}\n{good}");
    }
    let cases = [
        (
            source("partition_by = \"peer\""),
            "sources.app.partition_by",
            "keeps each batch",
        ),
        (
            source("framing = \"newline\""),
            "sources.app.framing",
            "as senders framed them",
        ),
        (
            source("max_frame_bytes = 10"),
            "sources.app.max_frame_bytes",
            "between 4096",
        ),
        (
            source("topics = [\"a\"]"),
            "sources.app.topics",
            "only an mqtt source",
        ),
        (
            source("[sources.app.tls]\nca_file = \"/etc/ssl/ca.pem\""),
            "sources.app.tls.cert_file",
            "needs its cert_file and key_file",
        ),
        (sink(""), "sinks.up.url", "needs a url"),
        (
            GOOD.replace(
                "[sinks.up.batch]",
                "where = { field = \"host\", in = [\"a\"] }\n[sinks.up.batch]",
            ),
            "sinks.up.where.field",
            "needs a decoding",
        ),
        (
            GOOD.replace(
                "address = \"127.0.0.1:5140\"",
                "address = \"127.0.0.1:5140\"\ndecoding = \"syslog\"",
            )
            .replace(
                "[sinks.up.batch]",
                "where = { field = \"tag.x\", in = [\"a\"] }\n[sinks.up.batch]",
            ),
            "sinks.up.where.field",
            "not a syslog field",
        ),
        (
            GOOD.replace(
                "address = \"127.0.0.1:5140\"",
                "address = \"127.0.0.1:5140\"\ndecoding = \"syslog\"",
            )
            .replace(
                "[sinks.up.batch]",
                "where = { field = \"host\" }\n[sinks.up.batch]",
            ),
            "sinks.up.where",
            "one of in, not_in or prefix",
        ),
        (
            GOOD.replace(
                "address = \"127.0.0.1:5140\"",
                "address = \"127.0.0.1:5140\"\npartition_by = { field = \"host\" }",
            ),
            "sources.app.partition_by.field",
            "needs a decoding",
        ),
        (
            sink("url = \"tcp://127.0.0.1:9800\""),
            "sinks.up.url",
            "updraft://",
        ),
        (
            sink("url = \"updraft://127.0.0.1\"\ninflight = 0"),
            "sinks.up.inflight",
            "between 1 and 256",
        ),
    ];
    assert_refused(cases);
}

/// Each config is refused by `validate` with an error naming its key and
/// saying why.
fn assert_refused<const N: usize>(cases: [(String, &str, &str); N]) {
    for (text, key, why) in cases {
        let (ok, err) = check("validate", &text);
        assert!(!ok, "validate accepted {key}:\n{text}");
        assert!(
            err.contains(key) && err.contains(why),
            "{err:?} should name {key} ({why})"
        );
    }
}
