#!/usr/bin/env bash
# The whole test suite, as CI runs it: installs what the tests need, checks
# formatting and lints, then runs unit and end-to-end tests (release build:
# the end-to-end tests push millions of records through the real binaries).
set -euo pipefail
cd "$(dirname "$0")/.."

# logger (util-linux's bsdutils) sends RFC 6587 octet-counted frames in a test.
if ! command -v logger >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then
        apt-get update -qq && apt-get install -y -qq bsdutils
    else
        sudo apt-get update -qq && sudo apt-get install -y -qq bsdutils
    fi
fi

cargo fmt --all -- --check
cargo clippy --all-targets -- -D warnings
# One test at a time: each pushes load through two cores.
cargo test --release -- --test-threads=1
# Allocations per record, counted on the shard threads of a binary built with
# the counting allocator.
cargo test --release --features count-alloc --test it alloc
