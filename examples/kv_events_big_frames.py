#!/usr/bin/env python3
"""Peak memory of a router fed oversized KV-event messages (issue 16, item 7).

Starts ROUTER_BINARY (`switchyard`) following one PUB socket (`--static-kv-events`), waits for
its subscription (an XPUB socket sees it), publishes COUNT messages [topic, seq, FRAME_MB MiB
of zeros], waits until the router has counted them all (malformed or oversized), and prints the
router's peak and current resident memory (VmHWM, VmRSS). Needs pyzmq.

    python3 examples/kv_events_big_frames.py target/release/switchyard [COUNT] [FRAME_MB]
"""

import re
import socket
import subprocess
import sys
import time
import urllib.request

import zmq


def status_kib(pid, field):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def counted(page):
    total = 0.0
    for name in ("switchyard_kv_events_malformed_total", "switchyard_kv_events_oversized_total"):
        for m in re.finditer(rf"^{name}{{[^}}]*}} (\S+)$", page, re.M):
            total += float(m.group(1))
    return total


def main():
    binary = sys.argv[1]
    count = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    frame_mb = int(sys.argv[3]) if len(sys.argv) > 3 else 200
    ctx = zmq.Context.instance()
    pub = ctx.socket(zmq.XPUB)
    pub.setsockopt(zmq.SNDHWM, 0)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    backend = f"http://127.0.0.1:{dead.getsockname()[1]}"
    router = subprocess.Popen(
        [binary, "serve", "--port", "0", "--log-level", "error",
         "--static-backends", backend, "--static-models", "m",
         "--static-kv-events", f"tcp://127.0.0.1:{port}"],
        stdout=subprocess.PIPE, text=True)
    try:
        url = None
        for line in router.stdout:
            if line.startswith("Switchyard is routing on "):
                url = line.split()[-1]
                break
        assert pub.recv() == b"\x01", "the router subscribes to everything"
        base_hwm = status_kib(router.pid, "VmHWM")
        payload = bytes(frame_mb << 20)
        for seq in range(count):
            pub.send_multipart([b"", seq.to_bytes(8, "big"), payload], copy=False)
        deadline = time.time() + 300
        while time.time() < deadline:
            page = urllib.request.urlopen(url + "/metrics").read().decode()
            if counted(page) >= count:
                break
            time.sleep(0.2)
        else:
            print("the router did not count every message", file=sys.stderr)
        print(f"{count} x {frame_mb} MiB frames: router VmHWM before {base_hwm // 1024} MiB, "
              f"peak {status_kib(router.pid, 'VmHWM') // 1024} MiB, "
              f"resident after {status_kib(router.pid, 'VmRSS') // 1024} MiB")
    finally:
        router.kill()
        router.wait()


if __name__ == "__main__":
    main()
