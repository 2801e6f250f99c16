"""Drivers for the store-service tests: the service as a real process, a TCP relay that can drop
connections mid-transfer, raw ZeroMQ peers, and clients on other loopback addresses."""
from __future__ import annotations

import os
import select
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

from helpers import REPO, TESTS

ENV = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1",
           PYTHONPATH=os.pathsep.join([TESTS, REPO]))


@dataclass
class Service:
    proc: subprocess.Popen
    endpoint: str
    store: str
    log: str

    @property
    def port(self) -> int:
        return int(self.endpoint.rsplit(":", 1)[1])

    def stop(self, timeout: float = 10) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


def start_service(store: str, *, host: str = "127.0.0.1", port: int = 0, keys: str | None = None,
                  pub: str | None = None, log: str | None = None, timeout: float = 30,
                  extra: tuple[str, ...] = ()) -> Service:
    """Run launch/serve_store.py and wait for its ``serving DIR on tcp://HOST:PORT`` line."""
    args = [sys.executable, os.path.join(REPO, "launch", "serve_store.py"), "--store", store,
            "--bind", f"tcp://{host}:{port}", *extra]
    if keys:
        args += ["--keys", keys]
    if pub:
        args += ["--pub", pub]
    log = log or store.rstrip("/") + f".service-{port}-{time.time_ns()}.log"
    err = open(log, "w")
    proc = subprocess.Popen(args, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=err, text=True)
    deadline = time.time() + timeout
    line = ""
    while time.time() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.2)
        if ready:
            line = proc.stdout.readline()
            break
        if proc.poll() is not None:
            break
    if not line.startswith("serving "):
        proc.kill()
        raise AssertionError(f"service did not start: {line!r} {open(log).read()[-2000:]}")
    return Service(proc, line.split(" on ", 1)[1].strip(), store, log)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class Relay:
    """A TCP relay listening on ``listen_host`` and forwarding to ``target``: ``drop()`` cuts every
    connection at once (as a network failure would) while the relay keeps accepting new ones."""

    def __init__(self, target: tuple[str, int], listen_host: str = "127.0.0.1",
                 throttle: float = 0.0) -> None:
        self.target = target
        self.throttle = throttle  # seconds to sleep per 64 KiB forwarded (slows a transfer down)
        self.server = socket.socket()
        self.server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.server.bind((listen_host, 0))
        self.server.listen(16)
        self.port = self.server.getsockname()[1]
        self.host = listen_host
        self.bytes = 0
        self.drops = 0
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"tcp://{self.host}:{self.port}"

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                self.bytes += len(data)
                dst.sendall(data)
                if self.throttle:
                    time.sleep(self.throttle)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def drop(self) -> None:
        with self._lock:
            conns, self._conns = self._conns, []
        self.drops += 1
        for s in conns:
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                s.close()
            except OSError:
                pass

    def close(self) -> None:
        self._closed = True
        self.server.close()
        self.drop()
