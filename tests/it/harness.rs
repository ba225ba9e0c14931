//! Starts the real `updraft` and `updraft-loadgen` binaries on loopback, each
//! with its own ports and temporary directory, and reads `/metrics`.

use serde_json::Value;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

pub const UPDRAFT: &str = env!("CARGO_BIN_EXE_updraft");

/// The collector under test: `UPDRAFT_BIN` when set (to check that a
/// regression test fails on an older build), else the one cargo built.
pub fn updraft() -> std::ffi::OsString {
    std::env::var_os("UPDRAFT_BIN").unwrap_or_else(|| UPDRAFT.into())
}
pub const LOADGEN: &str = env!("CARGO_BIN_EXE_updraft-loadgen");

/// A loopback address with a port nobody listens on right now.
pub fn free_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    // The same port must be free for UDP too.
    let a = l.local_addr().unwrap();
    match std::net::UdpSocket::bind(a) {
        Ok(_) => a,
        Err(_) => free_addr(),
    }
}

pub struct Updraft {
    child: Option<Child>,
    pub metrics: SocketAddr,
    /// Holds the config, the log and `data_dir` until the test ends.
    dir: tempfile::TempDir,
    log: PathBuf,
    config: PathBuf,
    /// Start with stderr a pipe whose reader is gone.
    stderr_closed: bool,
}

/// `UPDRAFT_TEST_IO=epoll` (or `uring`) runs every collector the suite
/// starts on that I/O backend, unless its config names one: the whole suite
/// passes on both.
pub fn io_line(config: &str) -> String {
    match std::env::var("UPDRAFT_TEST_IO") {
        Ok(io) if !io.is_empty() && !config.trim_start().starts_with("io =") => {
            format!("io = \"{io}\"\n")
        }
        _ => String::new(),
    }
}

impl Updraft {
    /// Starts `updraft run` on `config` (a `[metrics]` table is added) and
    /// waits until it answers on `/health`.
    pub fn start(config: &str) -> Updraft {
        Updraft::start_with(config, true, false)
    }

    /// Like [`start`](Self::start), but the config sets `data_dir` itself.
    pub fn start_raw(config: &str) -> Updraft {
        Updraft::start_with(config, false, false)
    }

    fn start_with(config: &str, set_data_dir: bool, stderr_closed: bool) -> Updraft {
        let dir = tempfile::tempdir().unwrap();
        let metrics = free_addr();
        let path = dir.path().join("updraft.toml");
        let data_dir = if set_data_dir {
            format!("data_dir = \"{}\"\n", dir.path().join("data").display())
        } else {
            String::new()
        };
        let text = format!(
            "{}{data_dir}{config}\n[metrics]\naddress = \"{metrics}\"\n",
            io_line(config)
        );
        std::fs::write(&path, text).unwrap();
        let log = dir.path().join("updraft.log");
        let mut u = Updraft {
            child: None,
            metrics,
            dir,
            log,
            config: path,
            stderr_closed,
        };
        u.spawn();
        u
    }

    /// Like [`start`](Self::start), with stderr a pipe whose reader has
    /// gone away (every log line fails with EPIPE).
    pub fn start_stderr_closed(config: &str) -> Updraft {
        Updraft::start_with(config, true, true)
    }

    /// Writes a new config in place of the one it started on (with the
    /// same `data_dir`, metrics address and I/O backend), for a SIGHUP.
    pub fn rewrite_config(&self, config: &str) {
        let text = format!(
            "{}data_dir = \"{}\"\n{config}\n[metrics]\naddress = \"{}\"\n",
            io_line(config),
            self.data_dir().display(),
            self.metrics
        );
        std::fs::write(&self.config, text).unwrap();
    }

    /// Sends SIGHUP and waits for the log line that answers it (reloaded or
    /// refused); returns that line.
    pub fn reload(&self) -> String {
        let count = |t: &str| t.matches("config reload").count();
        let before = count(&self.log_text());
        self.signal(libc::SIGHUP);
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let log = self.log_text();
            if count(&log) > before {
                return log
                    .lines()
                    .filter(|l| l.contains("config reload"))
                    .nth(before)
                    .unwrap_or_default()
                    .to_string();
            }
            assert!(Instant::now() < deadline, "no answer to SIGHUP:\n{log}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `data_dir` of this collector.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut cmd = Command::new(updraft());
        cmd.args(["run", "--config"])
            .arg(&self.config)
            .env("UPDRAFT_LOG", "info")
            .stdout(Stdio::null());
        let child = if self.stderr_closed {
            let mut c = cmd.stderr(Stdio::piped()).spawn().unwrap();
            drop(c.stderr.take());
            c
        } else {
            cmd.stderr(log).spawn().unwrap()
        };
        self.child = Some(child);
        let metrics = self.metrics;
        let u = self;
        let deadline = Instant::now() + Duration::from_secs(10);
        while http_get(metrics, "/health").is_none() {
            if let Some(status) = u.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("updraft exited with {status} at start:\n{}", u.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "updraft did not start:\n{}",
                u.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `kill -9`: no flush, no shutdown.
    pub fn kill9(&mut self) {
        let mut c = self.child.take().expect("running");
        c.kill().unwrap();
        c.wait().unwrap();
    }

    /// Starts again on the same config and `data_dir`.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "stop it first");
        self.spawn();
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The value of one metric line, e.g.
    /// `updraft_source_dropped_records_total{source="app",reason="oversize"}`.
    pub fn metric(&self, series: &str) -> f64 {
        let text = http_get(self.metrics, "/metrics").expect("metrics endpoint answers");
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .find_map(|l| {
                let (name, value) = l.rsplit_once(' ')?;
                (name == series).then(|| value.parse::<f64>().unwrap())
            })
            .unwrap_or_else(|| panic!("no series {series} in:\n{text}"))
    }

    /// Waits until `series` reaches at least `at_least`.
    pub fn wait_metric(&self, series: &str, at_least: f64, timeout: Duration) -> f64 {
        let deadline = Instant::now() + timeout;
        loop {
            let v = self.metric(series);
            if v >= at_least {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "{series} = {v}, expected at least {at_least}\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends SIGTERM and waits; returns the exit status and how long it took.
    pub fn terminate(&mut self) -> (ExitStatus, Duration) {
        let child = self.child.as_mut().unwrap();
        let t = Instant::now();
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = t + Duration::from_secs(15);
        loop {
            if let Some(s) = child.try_wait().unwrap() {
                self.child = None;
                return (s, t.elapsed());
            }
            assert!(
                Instant::now() < deadline,
                "updraft did not exit after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Sends `signal` to the collector.
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.pid() as i32, signal) };
    }

    /// Whether the collector has exited (and how).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.as_mut().unwrap().try_wait().unwrap()
    }

    /// A line of `/proc/<pid>/status`, e.g. `VmRSS` or `Threads`, as its
    /// number (kB for sizes).
    pub fn proc_status(&self, field: &str) -> u64 {
        let text = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or_else(|| panic!("no {field} in /proc status"))
    }
}

/// Runs `updraft <args>` to its end (at most 20 s): exit code and stderr.
pub fn run_to_end(args: &[&std::ffi::OsStr]) -> (Option<i32>, String) {
    let mut child = Command::new(updraft())
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The status code of a GET of `path`, if it answered.
pub fn http_status(addr: SocketAddr, path: &str) -> Option<u16> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    text.split(' ').nth(1)?.parse().ok()
}

impl Drop for Updraft {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// GET `path`, returning the body of a 200 answer.
pub fn http_get(addr: SocketAddr, path: &str) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.split(' ').nth(1)?;
    (status == "200").then(|| body.to_string())
}

/// A running `updraft-loadgen receive`.
pub struct Receiver {
    child: Child,
}

impl Receiver {
    /// Starts a TCP receiver expecting `expect` records; `extra` adds flags.
    pub fn start(listen: SocketAddr, expect: u64, timeout_s: u64, extra: &[&str]) -> Receiver {
        let child = Command::new(LOADGEN)
            .args(["receive", "--listen", &listen.to_string(), "--json"])
            .args([
                "--expect",
                &expect.to_string(),
                "--timeout-s",
                &timeout_s.to_string(),
            ])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // It binds before anything else; give it a moment to get there.
        let deadline = Instant::now() + Duration::from_secs(5);
        if !extra.contains(&"udp") {
            while TcpStream::connect(listen).is_err() {
                assert!(
                    Instant::now() < deadline,
                    "receiver did not listen on {listen}"
                );
                std::thread::sleep(Duration::from_millis(10));
            }
        } else {
            std::thread::sleep(Duration::from_millis(200));
        }
        Receiver { child }
    }

    /// Starts an MQTT receiver subscribed at `broker` (`extra`: `--topic`,
    /// `--mqtt-version`, ...); returns once the subscription is acknowledged.
    pub fn start_mqtt(broker: SocketAddr, expect: u64, timeout_s: u64, extra: &[&str]) -> Receiver {
        use std::io::BufRead;
        let mut child = Command::new(LOADGEN)
            .args([
                "receive",
                "--proto",
                "mqtt",
                "--listen",
                &broker.to_string(),
                "--json",
            ])
            .args([
                "--expect",
                &expect.to_string(),
                "--timeout-s",
                &timeout_s.to_string(),
            ])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut err = std::io::BufReader::new(child.stderr.take().unwrap());
        let mut line = String::new();
        let n = err.read_line(&mut line).unwrap();
        assert!(
            n > 0 && line.starts_with("subscribed"),
            "the mqtt receiver did not subscribe at {broker}: {line}"
        );
        // Keep draining its stderr so it never blocks on a full pipe.
        std::thread::spawn(move || std::io::copy(&mut err, &mut std::io::sink()));
        Receiver { child }
    }

    /// Ends the receiver now (a test that looks at what it saved).
    pub fn stop(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits for the summary; returns it and whether the exit code was 0.
    pub fn finish(self) -> (Value, bool) {
        let out = self.child.wait_with_output().unwrap();
        let json = parse_json(&out);
        (json, out.status.success())
    }
}

fn parse_json(out: &Output) -> Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .unwrap_or_else(|| {
            panic!(
                "no JSON in output (status {}):\n{stdout}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )
        });
    serde_json::from_str(line).unwrap()
}

/// The load generator's flags for `count` line-protocol records of
/// `size` bytes from `devices` devices (each its own stream) over
/// `connections`.
pub fn device_args(connections: u32, count: u64, size: u32, devices: u32) -> Vec<String> {
    [
        "--connections",
        &connections.to_string(),
        "--count",
        &count.to_string(),
        "--size",
        &size.to_string(),
        "--format",
        "influx",
        "--devices",
        &devices.to_string(),
    ]
    .map(String::from)
    .to_vec()
}

/// Asserts a receiver's summary holds `count` records of `devices`
/// streams, each once.
pub fn assert_devices_once(r: &Value, ok: bool, count: u64, devices: u64, log: &str) {
    assert!(ok, "{r}\n{log}");
    assert_eq!(u(r, "unique"), count, "{r}");
    assert_eq!(u(r, "streams"), devices, "one stream per device: {r}");
    assert_eq!(u(r, "duplicates"), 0, "{r}");
}

/// Runs `updraft-loadgen send` to completion and returns its summary.
pub fn send(target: SocketAddr, args: &[&str]) -> Value {
    let out = Command::new(LOADGEN)
        .args(["send", "--target", &target.to_string(), "--json"])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "loadgen send failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    parse_json(&out)
}

/// Starts `updraft-loadgen send` in the background.
pub fn spawn_send(target: SocketAddr, args: &[&str]) -> Child {
    Command::new(LOADGEN)
        .args(["send", "--target", &target.to_string(), "--json"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

pub fn u(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} missing in {v}"))
}

/// A tcp source `app` forwarding to a tcp sink `up`, retrying quickly;
/// `extra` adds keys to the source.
pub fn tcp_to_tcp(
    src: std::net::SocketAddr,
    sink: std::net::SocketAddr,
    shards: usize,
    extra: &str,
) -> String {
    format!(
        r#"
shards = {shards}
[sources.app]
type = "tcp"
address = "{src}"
{extra}
[sinks.up]
type = "tcp"
inputs = ["app"]
address = "{sink}"
[sinks.up.retry]
initial_backoff_ms = 20
max_backoff_ms = 200
"#
    )
}

/// A server the test starts on loopback from a distribution package (a
/// broker, a database): `program -c <config>` with its own directory, its
/// stderr in `<name>.log` there. Stopped gracefully by [`stop`](Self::stop)
/// (so it keeps what it stored), killed when dropped.
/// Waits (at most 10 s) until `addr` accepts a TCP connection.
pub fn wait_listening(addr: SocketAddr, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "{what} did not listen on {addr}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub struct Daemon {
    child: Option<Child>,
    pub addr: SocketAddr,
    pub dir: tempfile::TempDir,
    program: &'static str,
    name: &'static str,
}

impl Daemon {
    /// Writes `config(dir)` to `<dir>/<name>.conf` and starts the server on it.
    pub fn start(
        program: &'static str,
        name: &'static str,
        addr: SocketAddr,
        config: impl FnOnce(&std::path::Path) -> String,
    ) -> Daemon {
        assert!(
            std::path::Path::new(program).exists(),
            "{program} is installed (scripts/test.sh installs the Debian package)"
        );
        let dir = tempfile::tempdir().unwrap();
        let text = config(dir.path());
        std::fs::write(dir.path().join(format!("{name}.conf")), text).unwrap();
        let mut d = Daemon {
            child: None,
            addr,
            dir,
            program,
            name,
        };
        d.run();
        d
    }

    /// Starts the server (again) and waits until it listens.
    pub fn run(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("{}.log", self.name)))
            .unwrap();
        self.child = Some(
            Command::new(self.program)
                .arg("-c")
                .arg(self.dir.path().join(format!("{}.conf", self.name)))
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap(),
        );
        wait_listening(self.addr, self.program);
    }

    /// Stops the server gracefully (SIGTERM; it keeps what it stored).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let _ = c.wait();
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{}.log", self.name)))
            .unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A CA and, signed by it, a certificate for 127.0.0.1 and a client
/// certificate: (ca, cert, key, client cert, client key) files in `dir`.
pub fn pki(dir: &std::path::Path, name: &str) -> [String; 5] {
    let write = |file: &str, pem: &str| {
        let p = dir.join(format!("{name}-{file}"));
        std::fs::write(&p, pem).unwrap();
        std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
        p.display().to_string()
    };
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, format!("updraft test CA {name}"));
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let server = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
    let server_key = rcgen::KeyPair::generate().unwrap();
    let server_cert = server.signed_by(&server_key, &ca_cert, &ca_key).unwrap();
    let mut client = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    client
        .distinguished_name
        .push(rcgen::DnType::CommonName, "gateway-7");
    let client_key = rcgen::KeyPair::generate().unwrap();
    let client_cert = client.signed_by(&client_key, &ca_cert, &ca_key).unwrap();
    [
        write("ca.pem", &ca_cert.pem()),
        write("cert.pem", &server_cert.pem()),
        write("key.pem", &server_key.serialize_pem()),
        write("client-cert.pem", &client_cert.pem()),
        write("client-key.pem", &client_key.serialize_pem()),
    ]
}

/// Sends 1,000,000 records of 200 B over 4 connections to a collector on
/// `src` that forwards them to `sink`, and checks that each arrived once,
/// in order per connection.
pub fn a_million_over_four_connections_arrive_once(src: SocketAddr, sink: SocketAddr) {
    let rx = Receiver::start(sink, 1_000_000, 60, &[]);
    let sent = send(
        src,
        &["--connections", "4", "--count", "1000000", "--size", "200"],
    );
    assert_eq!(u(&sent, "sent"), 1_000_000);
    let (r, ok) = rx.finish();
    assert!(ok, "{r}");
    assert_eq!(u(&r, "unique"), 1_000_000, "{r}");
    assert_eq!(u(&r, "lost"), 0, "{r}");
    assert_eq!(u(&r, "duplicates"), 0, "{r}");
    assert_eq!(u(&r, "reordered"), 0, "{r}");
}
