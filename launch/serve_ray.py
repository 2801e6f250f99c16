#!/usr/bin/env python3
"""serve-models as a Ray Serve application: the same engine and endpoints, N replicas behind Ray's proxy.

    python launch/serve_ray.py --store tcp://store-host:5555 --keys keys/ --replicas 4 --port 8000
    python launch/serve_ray.py --store swarm-store --replicas 2 --ray-address local     # one machine

Each replica is ``launch/serve_models.py``'s engine: it opens the store read-only, builds the prefix
tree of the served tasks, batches concurrent requests and follows the store itself (bus and polling),
so every replica swaps a task's model within one poll of its publication. Ray's HTTP proxy spreads
requests over the replicas. Needs ``pip install 'munet-swarm[ray-serve]'`` (``make install-cluster``).
Prints ``serving N tasks with R Ray Serve replicas on http://HOST:PORT`` once every replica is ready;
Ctrl-C or SIGTERM shut the application down. Exit codes: 0 stopped; 2 user error; 1 internal failure.
"""
from __future__ import annotations

import argparse
import signal
import sys
import threading

from launch.common import OneLineParser, UserError, add_store_flags, run_main


def build_parser() -> argparse.ArgumentParser:
    from launch.serve_models import add_engine_flags

    p = OneLineParser(prog="serve_ray.py", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    add_store_flags(p, required=True)
    p.add_argument("--replicas", type=int, default=2, metavar="N", help="Ray Serve replicas (default 2)")
    p.add_argument("--cpus-per-replica", type=float, default=1.0, metavar="N")
    p.add_argument("--gpus-per-replica", type=float, default=0.0, metavar="N")
    p.add_argument("--host", default="127.0.0.1", help="the proxy's address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="the proxy's port (default 8000)")
    p.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="a running cluster (auto, HOST:PORT); 'local' or none starts a private Ray")
    add_engine_flags(p)
    return p


def make_deployment():
    """The deployment class (imports Ray Serve only when called)."""
    from ray import serve

    @serve.deployment
    @serve.ingress()
    class Models:
        def __init__(self, store: str, keys: str | None, tasks: list[str] | None, options: dict,
                     token: str | None) -> None:
            from agents.placement import resolve_device
            from agents.serving.server import MicroBatcher, ModelServer

            self.server = ModelServer(store, keys=keys, device=resolve_device("auto"), tasks=tasks,
                                      poll_s=options["poll"]).start()
            self.batcher = MicroBatcher(self.server, max_batch=options["max_batch"],
                                        max_wait_s=options["max_wait_ms"] / 1000,
                                        max_queue=options["max_queue"])
            self.token = token

        def __serve_build_asgi_app__(self):  # called on each replica after __init__
            from launch.serve_app import create_app

            return create_app(self.server, self.batcher, token=self.token)

    return Models


def main(argv: list[str] | None = None) -> int:
    from launch.serve_models import is_loopback, read_token

    args = build_parser().parse_args(argv)
    if args.replicas < 1 or args.cpus_per_replica <= 0 or args.gpus_per_replica < 0:
        raise UserError("--replicas must be >= 1, --cpus-per-replica > 0 and --gpus-per-replica >= 0")
    if not is_loopback(args.host) and not args.token_file:
        raise UserError(f"--host {args.host}: serving beyond loopback needs --token-file")
    token = read_token(args.token_file)
    try:
        import ray
        from ray import serve
    except ImportError:
        raise UserError("Ray Serve is not installed: pip install 'munet-swarm[ray-serve]'") from None
    from store import open_store

    with open_store(args.store, readonly=True, keys=args.keys) as st:  # a bad store: exit 2 here
        served = len([t for t in st.tasks() if not args.tasks or t.task in args.tasks.split(",")])
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None
    ray.init(address=None if args.ray_address in (None, "local") else args.ray_address,
             namespace="munet-serve", include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": args.host, "port": args.port})
    options = {"poll": args.poll, "max_batch": args.max_batch, "max_wait_ms": args.max_wait_ms,
               "max_queue": args.max_queue}
    app = make_deployment().options(
        num_replicas=args.replicas,
        ray_actor_options={"num_cpus": args.cpus_per_replica, "num_gpus": args.gpus_per_replica},
    ).bind(args.store, args.keys, tasks, options, token)
    serve.run(app, name="munet-models", route_prefix="/")
    print(f"serving {served} tasks with {args.replicas} Ray Serve replicas on "
          f"http://{args.host}:{args.port}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    serve.shutdown()
    ray.shutdown()
    return 0


if __name__ == "__main__":
    run_main(main, "serve_ray.py")
