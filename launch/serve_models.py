#!/usr/bin/env python3
"""Serve every task of a grown store over HTTP, following the store as agents publish (docs/serving.md).

    python launch/serve_models.py --store swarm-store                       # http://127.0.0.1:8080
    python launch/serve_models.py --store swarm-store --port 0 --tasks mnist5k,uci_digits
    python launch/serve_models.py --store tcp://10.0.0.5:5555 --keys keys/ \\
        --host 0.0.0.0 --token-file token.txt --replicas 4                  # beyond loopback
    curl -F image=@digit.png http://127.0.0.1:8080/v1/tasks/mnist5k/predict

One process answers for every task: a batch asked of several tasks runs each frozen prefix the tasks'
models share once. Concurrent requests are batched together (--max-batch, --max-wait-ms); a full queue
(--max-queue) answers 503 with Retry-After. The server re-reads the store's serving pointers every
--poll seconds and on every ``published`` announcement from the agents, and swaps a task's model in
atomically: a request finishes on the model it started with, and every answer names it. It never writes
to the store. Prints ``serving N tasks on http://HOST:PORT`` once ready; Ctrl-C or SIGTERM stop it.
Exit codes: 0 stopped; 2 user error (one line on stderr); 1 internal failure.
"""
from __future__ import annotations

import argparse
import contextlib
import ipaddress
import logging
import os
import signal
import socket
import subprocess
import sys

from launch.common import OneLineParser, UserError, add_store_flags, check_devices, parse_devices, run_main

LISTEN_BACKLOG = 2048  # uvicorn's default


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="serve_models.py", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    add_store_flags(p, required=True)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1; anything else needs --token-file)")
    p.add_argument("--port", type=int, default=8080, help="port (0: any free port, printed; default 8080)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda:N (default auto)")
    add_engine_flags(p)
    p.add_argument("--max-body-mb", type=float, default=32.0, metavar="MB", help="request body limit (default 32)")
    p.add_argument("--max-images", type=int, default=256, metavar="N", help="images per request (default 256)")
    p.add_argument("--max-side", type=int, default=2048, metavar="PX",
                   help="pixels on either side of one image (default 2048)")
    p.add_argument("--max-pixels", type=int, default=4096 * 4096, metavar="N",
                   help="pixels in one request, all images together, checked from the image headers "
                        "before any is decoded (default 16777216)")
    p.add_argument("--top-k", type=int, default=5, metavar="K", help="labels per image by default (default 5)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch threads for the model (default: torch's choice)")
    p.add_argument("--replicas", type=int, default=1, metavar="N",
                   help="N server processes behind the one address (the kernel spreads connections; "
                        "each follows the store itself; default 1)")
    p.add_argument("--reuse-port", action="store_true",
                   help="listen with SO_REUSEPORT, so several servers can share one port")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def add_engine_flags(p: argparse.ArgumentParser) -> None:
    """What every replica's engine takes (also ``launch/serve_ray.py``'s)."""
    p.add_argument("--tasks", default=None, metavar="T1,T2",
                   help="serve only these tasks (default: every task, including tasks published later)")
    p.add_argument("--token-file", default=None, metavar="FILE",
                   help="file holding a bearer token every request must send (Authorization: Bearer)")
    p.add_argument("--max-batch", type=int, default=64, metavar="N",
                   help="images per batch across concurrent requests (default 64; 1 turns batching off)")
    p.add_argument("--max-wait-ms", type=float, default=5.0, metavar="MS",
                   help="how long a batch waits for more requests after its first (default 5)")
    p.add_argument("--max-queue", type=int, default=256, metavar="N",
                   help="requests waiting at most; more get 503 + Retry-After (default 256)")
    p.add_argument("--poll", type=float, default=2.0, metavar="SECONDS",
                   help="re-read the store's pointers at least this often (default 2)")


def check_args(args: argparse.Namespace) -> None:
    for flag, value, low in (("--max-batch", args.max_batch, 1), ("--max-queue", args.max_queue, 1),
                             ("--max-images", args.max_images, 1), ("--max-side", args.max_side, 1),
                             ("--top-k", args.top_k, 1), ("--replicas", args.replicas, 1),
                             ("--max-pixels", args.max_pixels, 1)):
        if value < low:
            raise UserError(f"{flag} must be >= {low}, got {value}")
    for flag, value in (("--max-wait-ms", args.max_wait_ms), ("--max-body-mb", args.max_body_mb),
                        ("--poll", args.poll)):
        if not (value == value and 0 <= value < float("inf")) or (flag != "--max-wait-ms" and value == 0):
            raise UserError(f"{flag} must be a finite number > 0, got {value}")
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads must be >= 1, got {args.threads}")
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port must be from 0 to 65535, got {args.port}")
    if args.store and os.path.isfile(args.store):
        raise UserError(f"--store {args.store!r} is a file: give the store's directory or tcp://HOST:PORT")
    if not is_loopback(args.host) and not args.token_file:
        raise UserError(f"--host {args.host}: serving beyond loopback needs --token-file (a bearer "
                        "token every request must send)")


def is_loopback(host: str) -> bool:
    try:
        infos = socket.getaddrinfo(host, None)
    except (socket.gaierror, UnicodeError):
        raise UserError(f"--host {host!r}: not an address of this machine") from None
    return all(ipaddress.ip_address(i[4][0].split("%")[0]).is_loopback for i in infos)


def read_token(path: str | None) -> str | None:
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"--token-file {path}: {exc.strerror if isinstance(exc, OSError) else exc}") from None
    if len(token) < 16 or any(c.isspace() for c in token):
        raise UserError(f"--token-file {path}: the token must be one word of at least 16 characters")
    return token


def bind(host: str, port: int, reuse_port: bool) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say they are TCP, and
    # without it a keep-alive client waits 40 ms (delayed ACK) for every response's second segment
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    return sock


def run_replicas(args: argparse.Namespace, argv: list[str]) -> int:
    """Hold the port (SO_REUSEPORT) and run ``--replicas`` servers on it; stop them all on a signal."""
    holder = bind(args.host, args.port, reuse_port=True)
    port = holder.getsockname()[1]
    child_argv = [a for a in argv]
    child_argv += ["--port", str(port), "--replicas", "1", "--reuse-port"]
    procs = [subprocess.Popen([sys.executable, "-m", "launch.serve_models", *child_argv])
             for _ in range(args.replicas)]
    print(f"serving with {args.replicas} replicas on http://{args.host}:{port}", flush=True)

    def forward(signum, frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    codes = [p.wait() for p in procs]
    holder.close()
    codes = [128 - c if c < 0 else c for c in codes]  # killed by a signal: the shell's 128 + N
    return max(codes)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    check_args(args)
    token = read_token(args.token_file)
    if args.replicas > 1:
        return run_replicas(args, argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(message)s", stream=sys.stderr)
    sock = bind(args.host, args.port, args.reuse_port)  # before anything else: a port in use changes nothing
    sock.listen(LISTEN_BACKLOG)  # connections made once "serving" is printed wait here, never refused

    import torch
    import uvicorn

    from agents.placement import resolve_device
    from agents.serving.server import MicroBatcher, ModelServer
    from launch.serve_app import create_app
    from launch.serve_inputs import Limits

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    check_devices(parse_devices(device))  # a typo or a missing GPU: exit 2, not a crash mid-load
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None
    try:
        server = ModelServer(args.store, keys=args.keys, device=device, tasks=tasks, poll_s=args.poll).start()
    except LookupError as exc:  # a store with no root yet
        raise UserError(str(exc)) from None
    batcher = MicroBatcher(server, max_batch=args.max_batch, max_wait_s=args.max_wait_ms / 1000,
                           max_queue=args.max_queue)
    limits = Limits(max_body_bytes=int(args.max_body_mb * 1024 * 1024), max_images=args.max_images,
                    max_side=args.max_side, max_pixels=args.max_pixels)
    app = create_app(server, batcher, limits=limits, token=token, default_top_k=args.top_k)
    missing = sorted(set(tasks or ()) - set(server.plan.models))
    host, port = sock.getsockname()[:2]
    print(f"serving {len(server.plan.models)} tasks on http://{args.host}:{port} (device {device}"
          + (f"; not published yet, served once they are: {', '.join(missing)}" if missing else "") + ")",
          flush=True)
    class Uvicorn(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            with super().capture_signals():
                try:
                    yield
                finally:  # uvicorn re-raises a captured SIGTERM after the graceful stop: that stop
                    self._captured_signals.clear()  # is a clean one here, exit 0

    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=10)
    try:
        Uvicorn(config).run(sockets=[sock])
    finally:
        batcher.close()
        server.close()
    return 0


if __name__ == "__main__":
    run_main(main, "serve_models.py")
