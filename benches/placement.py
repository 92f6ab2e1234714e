#!/usr/bin/env python3
"""Placement counts work, not wall-clock throughput (every node shares one
machine here). For N nodes and a replication factor RF it loads C
collections of K keys of D bytes (dhrt-bench, through every node in turn),
then reports:

- bytes stored per node: the busiest and the average, against the ideal
  data x RF / N;
- replicated mutations per client write (each acknowledged by a peer),
  against RF - 1 (a write sent to an owner) and the expectation for writes
  sent to any node, RF/N x (RF-1) + (N-RF)/N x RF;
- bytes moved when one more node joins (dhrt_moved_bytes_total over every
  node), against the ideal data x RF / (N+1) (a whole copy with `all`),
  and the time until no copy is
  left to hand over, with the pace it implies.

Usage: python3 benches/placement.py [--nodes 3,6,12] [--rf 2,3,all]
       [--collections 24] [--keys 1000] [--size 1024]
(release builds of dhrtd and dhrt-bench; ports from 7700; data in a
temporary directory). Prints one Markdown table row per configuration.
"""

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DHRTD = os.path.join(ROOT, "target/release/dhrtd")
BENCH = os.path.join(ROOT, "target/release/dhrt-bench")


def get(port, path="/"):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
        return r.read().decode()


def stats(port):
    return json.loads(get(port))


def metric(port, name):
    total = 0
    for line in get(port, "/metrics").splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += int(float(line.rsplit(" ", 1)[1]))
    return total


def wait(what, f, within=600):
    deadline = time.time() + within
    while not f():
        if time.time() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.1)


class Cluster:
    def __init__(self, rf, base):
        self.rf = rf
        self.dir = tempfile.mkdtemp(prefix="dhrt-placement-")
        self.base = base
        self.procs = []

    def start(self, i):
        port = self.base + i
        args = [DHRTD, "--listen", f"127.0.0.1:{port}",
                "--data-dir", os.path.join(self.dir, str(i)),
                "--replicas", self.rf]
        if i > 0:
            args += ["--node", f"127.0.0.1:{self.base}"]
        env = dict(os.environ, DHRT_LOG="warn")
        self.procs.append(subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL))
        wait("the node to serve", lambda: self._up(port), 30)
        return port

    @staticmethod
    def _up(port):
        try:
            stats(port)
            return True
        except OSError:
            return False

    def ports(self):
        return [self.base + i for i in range(len(self.procs))]

    def healthy(self):
        n = len(self.procs)
        for p in self.ports():
            ms = stats(p)["members"]
            if len(ms) != n or any(m["state"] != "healthy" for m in ms):
                return False
        return True

    def settled(self, names):
        """Every collection held by exactly its owners, no move left."""
        held = {}
        for p in self.ports():
            s = stats(p)
            for c in s["collections"]:
                if c["moving"] is not None:
                    return False
                held.setdefault(c["name"], set()).add(s["node"]["id"])
        for c in names:
            owners = set(json.loads(get(self.base, f"/{c}?replicas"))["Owners"])
            if held.get(c) != owners:
                return False
        return True

    def stop(self):
        for p in self.procs:
            p.kill()
        for p in self.procs:
            p.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def run(n, rf, args, base):
    c = Cluster(rf, base)
    try:
        for i in range(n):
            c.start(i)
        wait("healthy members", c.healthy, 60)
        names = [f"p{i}" for i in range(args.collections)]
        acked0 = sum(metric(p, "dhrt_replication_acked_total") for p in c.ports())
        for i, name in enumerate(names):
            port = c.base + i % n
            subprocess.run([BENCH, "--addr", f"127.0.0.1:{port}", "-t", "set",
                            "-n", str(args.keys), "-r", str(args.keys), "--sequential",
                            "-d", str(args.size), "-c", "4", "-P", "32",
                            "--collection", name, "--csv"],
                           check=True, stdout=subprocess.DEVNULL)
        writes = args.collections * args.keys
        wait("every write replicated", lambda: c.settled(names), 300)
        acked = sum(metric(p, "dhrt_replication_acked_total") for p in c.ports()) - acked0
        per_node = []
        one_copy = {}
        for p in c.ports():
            s = stats(p)
            per_node.append(sum(x["bytes"] for x in s["collections"] if x["name"] in names))
            for x in s["collections"]:
                one_copy[x["name"]] = x["bytes"]
        data = sum(one_copy.get(x, 0) for x in names)
        r = n if rf == "all" else int(rf)
        ideal_store = data * r / n
        busiest, average = max(per_node), sum(per_node) / n

        moved0 = sum(metric(p, "dhrt_moved_bytes_total") for p in c.ports())
        t0 = time.time()
        c.start(n)
        wait("healthy members after the join", c.healthy, 120)
        wait("the join's moves", lambda: c.settled(names), 600)
        took = time.time() - t0
        moved = sum(metric(p, "dhrt_moved_bytes_total") for p in c.ports()) - moved0
        # What the newcomer owns (and holds, once settled): the move's
        # target, whatever the hash gave it.
        newcomer = sum(x["bytes"] for x in stats(c.base + n)["collections"]
                       if x["name"] in names)
        # With `all` the newcomer gets a whole copy; else it takes RF/(N+1)
        # of the owner slots, each one copy of a collection.
        ideal_move = data if rf == "all" else data * r / (n + 1)
        any_node = r / n * (r - 1) + (n - r) / n * r
        mib = 1 << 20
        print(f"| {n} | {rf} | {data / mib:.1f} | {busiest / mib:.1f} / {average / mib:.1f} "
              f"(ideal {ideal_store / mib:.1f}) | {busiest / average:.2f} "
              f"| {acked / writes:.2f} (owner {r - 1}, any node {any_node:.2f}) "
              f"| {moved / mib:.1f} (ideal {ideal_move / mib:.1f}, newcomer holds "
              f"{newcomer / mib:.1f}) | {took:.1f} s "
              f"({moved / mib / took:.1f} MiB/s) |", flush=True)
    finally:
        c.stop()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--nodes", default="3,6,12")
    ap.add_argument("--rf", default="2,3,all")
    ap.add_argument("--collections", type=int, default=24)
    ap.add_argument("--keys", type=int, default=1000)
    ap.add_argument("--size", type=int, default=1024)
    args = ap.parse_args()
    subprocess.run(["cargo", "build", "--release", "-q", "-p", "dhrtd", "-p", "dhrt-bench"],
                   cwd=ROOT, check=True)
    print(f"{args.collections} collections x {args.keys} keys x {args.size} B, "
          "written through every node in turn\n")
    print("| nodes | RF | data (one copy, MiB) | stored per node, busiest / average (MiB) "
          "| busiest / average | replicated mutations per write "
          "| moved when one joins (MiB) | move time (pace) |")
    print("|---|---|---|---|---|---|---|---|")
    base = 7700
    for n in [int(x) for x in args.nodes.split(",")]:
        for rf in args.rf.split(","):
            if rf != "all" and int(rf) > n:
                continue
            run(n, rf, args, base)
            base += 20


if __name__ == "__main__":
    main()
