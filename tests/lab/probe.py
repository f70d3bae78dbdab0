"""PYTEST_DONT_REWRITE
Traffic for the lab's own tests, run inside an endpoint's namespace:

    probe.py echo PORT                 UDP and TCP echo on PORT (until killed)
    probe.py udp HOST PORT COUNT GAP_MS SIZE
        COUNT numbered datagrams of SIZE bytes every GAP_MS; prints JSON: sent, returned
        (sequence numbers in the order they came back), round-trip times in ms
    probe.py tcp HOST PORT             prints JSON: whether a TCP echo came back"""

from __future__ import annotations

import json
import socket
import struct
import sys
import threading
import time


def echo(port: int) -> None:
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("0.0.0.0", port))
    tcp = socket.socket()
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    tcp.bind(("0.0.0.0", port))
    tcp.listen()

    def serve_tcp() -> None:
        while True:
            connection, _ = tcp.accept()
            with connection:
                connection.sendall(connection.recv(65536))

    threading.Thread(target=serve_tcp, daemon=True).start()
    print("ready", flush=True)
    while True:
        data, peer = udp.recvfrom(65536)
        udp.sendto(data, peer)


def udp(host: str, port: int, count: int, gap_ms: float, size: int) -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.connect((host, port))
    sent_at: dict[int, float] = {}
    returned: list[int] = []
    rtts: list[float] = []

    def receive() -> None:
        s.settimeout(3.0)
        while True:
            try:
                data = s.recv(65536)
            except TimeoutError:
                return
            seq = struct.unpack("!I", data[:4])[0]
            returned.append(seq)
            rtts.append((time.monotonic() - sent_at[seq]) * 1000.0)

    receiver = threading.Thread(target=receive)
    receiver.start()
    start = time.monotonic()
    for seq in range(count):
        while time.monotonic() < start + seq * gap_ms / 1000.0:
            time.sleep(0.0002)
        sent_at[seq] = time.monotonic()
        s.send(struct.pack("!I", seq) + b"x" * (size - 4))
    receiver.join()
    print(json.dumps({"sent": count, "returned": returned, "rtt_ms": rtts}))


def tcp(host: str, port: int) -> None:
    try:
        with socket.create_connection((host, port), timeout=5) as s:
            s.sendall(b"hello")
            print(json.dumps({"echoed": s.recv(16) == b"hello"}))
    except OSError as exc:
        print(json.dumps({"echoed": False, "error": str(exc)}))


if __name__ == "__main__":
    mode, *args = sys.argv[1:]
    if mode == "echo":
        echo(int(args[0]))
    elif mode == "udp":
        udp(args[0], int(args[1]), int(args[2]), float(args[3]), int(args[4]))
    else:
        tcp(args[0], int(args[1]))
