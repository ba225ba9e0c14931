#!/usr/bin/env bash
# End-to-end benchmark: updraft next to its ceiling and its peers in the same
# run: rsyslog (installed when missing), and Fluent Bit and Vector when
# `fluent-bit` / `vector` are on PATH (each skipped with a line saying so when
# not). `scripts/bench.sh --quick` takes about a minute; without it, about ten;
# `--only http` or `--only disk`: 256 B x 4 connections, ceilings, memory mode
# and that scenario, full length (a few minutes; disk beside memory as 3
# alternating pairs, rows the median run). `--against OLD_BIN [--pairs N]`:
# this build against another, tcp->tcp and tcp->http, memory and disk, in
# alternating pairs (bench-results/against.md). `--only mqtt`: the MQTT
# ceiling, mosquitto's bridge and updraft between two brokers, QoS 0 and 1.
# `--only nats`: tcp -> nats (JetStream) beside the load generator publishing
# to the same server. `--only io`: tcp->tcp (memory, disk) and udp on the
# io_uring and the epoll backend, beside the ceilings (3 alternating pairs).
# `--only file`: the file source reading a file beside `cat file > /dev/tcp`
# into the same receiver (3 alternating pairs).
# Results: bench-results/{results.json,results.md,throughput.png,latency.png}.
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
if ! command -v rsyslogd >/dev/null 2>&1; then
    as_root apt-get update -qq && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rsyslog
fi
if [ ! -x /usr/sbin/mosquitto ]; then
    # --only mqtt: two brokers, mosquitto's bridge beside updraft's.
    as_root apt-get update -qq && as_root env RUNLEVEL=1 DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends mosquitto
fi
if ! python3 -c 'import matplotlib' 2>/dev/null; then
    python3 -m pip install --quiet matplotlib
fi
if [ ! -x /usr/sbin/nats-server ]; then
    # --only nats: JetStream.
    as_root apt-get update -qq && as_root env RUNLEVEL=1 DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nats-server
fi
cargo build --release --bins
exec python3 scripts/bench.py "$@"
