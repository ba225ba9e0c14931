#!/usr/bin/env python3
"""Resident memory of updraft holding many idle TCP connections.

Starts the collector on loopback (2 shards, one tcp source, a blackhole sink),
then samples its VmRSS / VmHWM from /proc/<pid>/status:

  baseline      after /health answers, no connections
  idle          N connections open that have sent nothing, held --hold-s
  after 1 line  1 s after each connection sent one line "x\\n" (read once)
  after close   all closed, connections_open back at 0, then 3 s

Needs nothing but Python 3.11 and a built binary; touches only 127.0.0.1.

  python3 scripts/idle_rss.py [--bin target/release/updraft] \\
      [--connections 2000] [--max-connections 4096] [--hold-s 5] [--json]
"""

import argparse
import json
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KIB_PER_MIB = 1024


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mem_mib(pid):
    """(VmRSS, VmHWM) in MiB."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(rest.split()[0]) / KIB_PER_MIB
    return out["VmRSS"], out["VmHWM"]


def http_get(addr, path):
    with urllib.request.urlopen(f"http://{addr}{path}", timeout=2) as r:
        return r.status, r.read().decode()


def connections_open(addr):
    _, text = http_get(addr, "/metrics")
    m = re.search(r'^updraft_source_connections_open\{[^}]*source="app"[^}]*\}\s+(\S+)',
                  text, re.M)
    if not m:
        raise RuntimeError("updraft_source_connections_open{source=\"app\"} not in /metrics")
    return int(float(m.group(1)))


def wait_for(what, check, timeout, proc, log):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"updraft exited ({proc.returncode}) waiting for {what}; log:\n{tail(log)}")
        try:
            ok, last = check()
            if ok:
                return
        except OSError as e:
            last = e
        time.sleep(0.05)
    raise RuntimeError(f"timed out waiting for {what} (last: {last}); log:\n{tail(log)}")


def tail(path, n=20):
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-n:])


def measure(args):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the child inherits it
    with tempfile.TemporaryDirectory(prefix="idle_rss.") as tmp:
        metrics, source = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
        config, log = os.path.join(tmp, "updraft.toml"), os.path.join(tmp, "updraft.log")
        with open(config, "w") as f:
            f.write(f'shards = 2\ndata_dir = "{tmp}/data"\n'
                    f'[metrics]\naddress = "{metrics}"\n'
                    f'[sources.app]\ntype = "tcp"\naddress = "{source}"\n'
                    f'max_connections = {args.max_connections}\n'
                    f'[sinks.out]\ntype = "blackhole"\ninputs = ["app"]\n')
        with open(log, "w") as err:
            proc = subprocess.Popen([args.bin, "run", "--config", config],
                                    stdout=subprocess.DEVNULL, stderr=err)
        conns = []
        try:
            wait_for("/health 200", lambda: (http_get(metrics, "/health")[0] == 200, None),
                     10, proc, log)
            time.sleep(0.5)
            r = {"connections": args.connections, "nofile": hard}
            r["baseline_rss"], _ = mem_mib(proc.pid)

            host, port = source.rsplit(":", 1)
            for i in range(args.connections):
                try:
                    conns.append(socket.create_connection((host, int(port)), timeout=5))
                except OSError as e:
                    raise RuntimeError(f"connect #{i + 1} failed: {e}; log:\n{tail(log)}")
            n = args.connections
            wait_for(f"connections_open == {n}",
                     lambda: ((c := connections_open(metrics)) == n, c), 30, proc, log)
            time.sleep(args.hold_s)
            r["idle_rss"], _ = mem_mib(proc.pid)

            for s in conns:
                s.sendall(b"x\n")
            time.sleep(1)
            r["one_line_rss"], _ = mem_mib(proc.pid)

            for s in conns:
                s.close()
            conns = []
            wait_for("connections_open == 0",
                     lambda: ((c := connections_open(metrics)) == 0, c), 30, proc, log)
            time.sleep(3)
            r["after_close_rss"], r["peak_hwm"] = mem_mib(proc.pid)
        finally:
            for s in conns:
                s.close()
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        r["exit_code"] = proc.returncode
        return r


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bin", default=os.path.join(ROOT, "target/release/updraft"))
    p.add_argument("--connections", type=int, default=2000)
    p.add_argument("--max-connections", type=int, default=4096)
    p.add_argument("--hold-s", type=float, default=5)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    try:
        r = measure(args)
    except RuntimeError as e:
        sys.exit(f"idle_rss: {e}")
    if args.json:
        print(json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in r.items()}))
        return
    n = r["connections"]
    rows = [("baseline (no connections)", r["baseline_rss"]),
            (f"{n} idle connections", r["idle_rss"]),
            (f"{n} after one line each", r["one_line_rss"]),
            ("after close", r["after_close_rss"]),
            ("peak VmHWM", r["peak_hwm"])]
    print(f"{'state':<28}{'MiB':>8}")
    for name, mib in rows:
        print(f"{name:<28}{mib:>8.1f}")
    print(f"(VmRSS unless noted; RLIMIT_NOFILE {r['nofile']}, exit code {r['exit_code']})")


if __name__ == "__main__":
    main()
