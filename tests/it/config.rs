//! `updraft validate` and `run` refuse a bad config, naming the key.

use crate::harness::UPDRAFT;
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
    let out = Command::new(UPDRAFT)
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
        let out = Command::new(UPDRAFT)
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
