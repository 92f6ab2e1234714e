#!/usr/bin/env python3
"""What watchers that read nothing cost a node: N HTTP NDJSON watches of
collection `w`, each with a 4 KiB receive buffer and never read, then W
writes of 4,000-byte values through HTTP; the node's anonymous RSS is
sampled for 6 s and its growth reported.

    dhrtd --listen 127.0.0.1:7690 --data-dir DIR --sync never &
    python3 benches/watchers-reading-nothing.py 7690 $! 200 5000
"""
import http.client
import socket
import sys
import time

port, pid, n, writes = (int(a) for a in sys.argv[1:5])


def rss_mib():
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) // 1024


base = rss_mib()
socks = []
for _ in range(n):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", port))
    s.sendall(b"GET /w HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: application/x-ndjson\r\n\r\n")
    socks.append(s)
time.sleep(1)
c = http.client.HTTPConnection("127.0.0.1", port)
value = b"x" * 4000
for i in range(writes):
    c.request("PUT", f"/w/k{i % 500}", body=value)
    c.getresponse().read()
most = 0
for _ in range(30):
    most = max(most, rss_mib())
    time.sleep(0.2)
grew = most - base
print(f"watchers={n} writes={writes} anonymous RSS +{grew} MiB, {grew * 1024 / n:.0f} KiB a watcher")
