#!/usr/bin/env python3
"""What strangers' unfinished HTTP request heads cost a node in memory.

Starts one node (BIN/dhrtd, default target/release), opens N connections
that each send a request line and BYTES of headers and never end the head,
then prints the node's RSS each second for 6 s, how many of the connections
it still holds, and whether a client is still served meanwhile.

    cargo build --release -p dhrtd
    python3 benches/header-flood.py 3000 90000     # N connections, BYTES each
"""
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

n, per = int(sys.argv[1]), int(sys.argv[2])
bin_dir = os.environ.get("BIN", "target/release")
port = int(os.environ.get("PORT", "27801"))
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, n + 256)), hard))
data = tempfile.mkdtemp()
node = subprocess.Popen(
    [f"{bin_dir}/dhrtd", "--listen", f"127.0.0.1:{port}", "--data-dir", data + "/d"],
    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
try:
    time.sleep(1)

    def rss_mib():
        for line in open(f"/proc/{node.pid}/status"):
            if line.startswith("VmRSS"):
                return int(line.split()[1]) // 1024

    def held():
        return len(os.listdir(f"/proc/{node.pid}/fd"))

    before, fds_before = rss_mib(), held()
    line = b"X-A: " + b"a" * 3990 + b"\r\n"
    head = b"GET /x HTTP/1.1\r\nHost: a\r\n" + line * (per // len(line))
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        s.connect(("127.0.0.1", port))
        s.setblocking(False)
        try:
            s.send(head)
        except (BlockingIOError, ConnectionError):
            pass
        socks.append(s)
    print(f"before: {before} MiB; {n} connections x {len(head)} bytes of head sent")
    for t in range(6):
        time.sleep(1)
        print(f"t={t + 1}s rss={rss_mib()} MiB connections held={held() - fds_before}")
    req = urllib.request.Request(f"http://127.0.0.1:{port}/c/k", data=b"v", method="PUT")
    started = time.time()
    with urllib.request.urlopen(req) as r:
        print(f"a client's PUT meanwhile: {r.status} in {(time.time() - started) * 1000:.1f} ms")
finally:
    node.kill()
    node.wait()
