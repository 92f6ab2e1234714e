#!/usr/bin/env python3
"""What listings whose clients read nothing cost a node in memory.

Usage: python3 benches/stalled-listings.py DHRTD PORT [N]

Starts DHRTD alone on 127.0.0.1:PORT (a fresh data directory under /tmp),
writes 500 values of 64 KiB to collection `wf`, then opens N (100)
connections that each send `GET /wf` and read nothing (a 4 KiB receive
buffer). Prints the node's anonymous memory before, with them, and once
they closed, and the growth per connection.
"""
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request


def main():
    binary, port = sys.argv[1], int(sys.argv[2])
    n = int(sys.argv[3]) if len(sys.argv) > 3 else 100
    data = tempfile.mkdtemp(prefix="dhrt-stalled-")
    node = subprocess.Popen(
        [binary, "--listen", f"127.0.0.1:{port}", "--data-dir", data],
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port)).close()
                break
            except OSError:
                time.sleep(0.1)
        value = b"x" * 65536
        for j in range(500):
            url = f"http://127.0.0.1:{port}/wf/k{j}"
            urllib.request.urlopen(urllib.request.Request(url, data=value, method="PUT")).read()

        def anon_kib():
            with open(f"/proc/{node.pid}/status") as f:
                for line in f:
                    if line.startswith("RssAnon"):
                        return int(line.split()[1])
            return 0

        time.sleep(1)
        before = anon_kib()
        clients = []
        for _ in range(n):
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.connect(("127.0.0.1", port))
            s.sendall(b"GET /wf HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            clients.append(s)
        time.sleep(6)
        held = anon_kib()
        for s in clients:
            s.close()
        time.sleep(2)
        after = anon_kib()
        print(
            f"RssAnon KiB: before {before}, with {n} stalled listings {held}, "
            f"after {after}; per listing {(held - before) / n:.0f} KiB"
        )
    finally:
        node.kill()
        node.wait()
        shutil.rmtree(data, ignore_errors=True)


if __name__ == "__main__":
    main()
