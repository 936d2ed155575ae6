"""TCP throughput and round-trip time against a sink/echo server: on loopback by default, or
against `python -m bench.net --serve` started on another host."""
from __future__ import annotations

import argparse
import socket
import socketserver
import threading
import time
from dataclasses import dataclass

import numpy as np

CHUNK = 1 << 20


ROUNDS = 10


@dataclass(frozen=True)
class NetResult:
    """Throughput and RTT over all rounds; `*_samples` one figure per round, each round on fresh
    connections, so that the spread between rounds shows how much a figure moves on this host
    (None in older baselines)."""
    target: str
    throughput_gbps: float
    rtt_p50_us: float
    rtt_p99_us: float
    seconds: float
    throughput_samples_gbps: list[float] | None = None
    rtt_p50_samples_us: list[float] | None = None


@dataclass(frozen=True)
class Round:
    sent_bytes: int
    seconds: float
    rtts_s: list[float]


class _Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        mode = self.request.recv(1)
        if mode == b"S":
            while self.request.recv(CHUNK):
                pass
            return
        while data := self.request.recv(64):
            self.request.sendall(data)


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


def start_server(host: str = "127.0.0.1", port: int = 0) -> _Server:
    server = _Server((host, port), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def stream_bytes(host: str, port: int, seconds: float) -> tuple[int, float]:
    payload = b"\0" * CHUNK
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(b"S")
        sent, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            sock.sendall(payload)
            sent += CHUNK
        sock.shutdown(socket.SHUT_WR)
        sock.recv(1)
        return sent, time.perf_counter() - started


def ping(host: str, port: int, pings: int) -> list[float]:
    rtts = []
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(b"E")
        for _ in range(pings):
            t = time.perf_counter()
            sock.sendall(b"x")
            sock.recv(64)
            rtts.append(time.perf_counter() - t)
    return rtts


def one_round(host: str, port: int, seconds: float, pings: int) -> Round:
    sent, elapsed = stream_bytes(host, port, seconds)
    return Round(sent, elapsed, ping(host, port, pings))


def measure(host: str, port: int, seconds: float = 2.0, pings: int = 2000, rounds: int = ROUNDS
            ) -> NetResult:
    """`seconds` of streaming and `pings` round trips in all, split over `rounds`."""
    done = [one_round(host, port, seconds / rounds, max(1, pings // rounds)) for _ in range(rounds)]
    us = np.asarray([x for r in done for x in r.rtts_s]) * 1e6
    elapsed = sum(r.seconds for r in done)
    return NetResult(f"{host}:{port}", sum(r.sent_bytes for r in done) * 8 / elapsed / 1e9,
                     float(np.percentile(us, 50)), float(np.percentile(us, 99)), elapsed,
                     [r.sent_bytes * 8 / r.seconds / 1e9 for r in done],
                     [float(np.median(r.rtts_s)) * 1e6 for r in done])


def loopback(seconds: float = 2.0) -> NetResult:
    server = start_server()
    try:
        return measure("127.0.0.1", server.server_address[1], seconds)
    finally:
        server.shutdown()
        server.server_close()


def main() -> None:
    parser = argparse.ArgumentParser(description="network sink/echo server for bench.net")
    parser.add_argument("--serve", action="store_true", help="run the sink/echo server")
    parser.add_argument("--host", default="0.0.0.0", help="address to bind with --serve")
    parser.add_argument("--port", type=int, default=5201, help="port to bind with --serve")
    args = parser.parse_args()
    if args.serve:
        start_server(args.host, args.port)
        threading.Event().wait()
    else:
        print(loopback())


if __name__ == "__main__":
    main()
