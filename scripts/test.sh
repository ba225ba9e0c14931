#!/usr/bin/env bash
# The whole test suite, as CI runs it: installs what the tests need, checks
# formatting and lints, then runs unit and end-to-end tests (release build:
# the end-to-end tests push millions of records through the real binaries).
set -euo pipefail
cd "$(dirname "$0")/.."

# What the end-to-end tests talk to, from Debian's packages:
# - logger (util-linux's bsdutils) sends RFC 6587 octet-counted frames;
# - victoria-metrics is the time-series database the http sink writes to;
# - mosquitto is the MQTT broker the mqtt sink publishes to (mosquitto-clients
#   for mosquitto_passwd's sibling tools; mosquitto_passwd is in mosquitto);
# - nats-server (with JetStream) is what the nats sink publishes to;
# - rsyslog forwards syslog to a tcp source with omfwd (records decoded as syslog).
need=()
command -v logger >/dev/null 2>&1 || need+=(bsdutils)
[ -x /usr/bin/victoria-metrics ] || need+=(victoria-metrics)
[ -x /usr/sbin/mosquitto ] || need+=(mosquitto)
command -v mosquitto_sub >/dev/null 2>&1 || need+=(mosquitto-clients)
[ -x /usr/sbin/nats-server ] || need+=(nats-server)
[ -x /usr/sbin/rsyslogd ] || need+=(rsyslog)
if [ "${#need[@]}" -gt 0 ]; then
    sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo"
    # The package's service must not start on its own (the tests start it).
    $sudo apt-get update -qq
    RUNLEVEL=1 DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}"
fi

cargo fmt --all -- --check
cargo clippy --all-targets -- -D warnings
# One test at a time: each pushes load through two cores.
cargo test --release -- --test-threads=1
# The end-to-end tests again with every collector on the epoll backend
# (io = "epoll"; the run above used io_uring): both backends must pass.
UPDRAFT_TEST_IO=epoll cargo test --release --test it -- --test-threads=1
# Allocations per record, counted on the shard threads of a binary built with
# the counting allocator.
cargo test --release --features count-alloc --test it alloc
