#!/usr/bin/env python3
"""Serve a store to agents and tools on other hosts (docs/remote.md).

    python launch/serve_store.py --store swarm-store --bind tcp://127.0.0.1:5555
    python launch/serve_store.py --store swarm-store --bind tcp://0.0.0.0:5555 --keys keys/
    python launch/serve_store.py --keys keys/ --add-client gpu-box-2     # one more client key

Owns the store's LMDB environment (LMDB must stay on this host's local disk) and answers requests on
a ROUTER socket; rings a doorbell (new event sequence numbers, and a heartbeat) on a PUB socket at
the next port up unless --pub says otherwise. Prints ``serving DIR on tcp://HOST:PORT`` once ready;
SIGINT/SIGTERM stop it cleanly. Agents on this host may keep using the directory directly.

A bind beyond loopback needs --keys (CURVE encryption and authentication): the service makes the
missing key files on first use; copy ``server.key``, ``client.key`` and ``client.key_secret`` to
another host's KEYDIR and pass ``--store tcp://HOST:PORT --keys KEYDIR`` there.
Exit codes: 0 stopped cleanly; 2 user error (one line on stderr); 1 internal failure.
"""
from __future__ import annotations

import argparse
import ipaddress
import signal
import socket
import sys

from launch.common import OneLineParser, UserError, run_main


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="serve_store.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", help="store directory to serve (created if missing)")
    p.add_argument("--bind", default="tcp://127.0.0.1:5555",
                   help="request endpoint tcp://HOST:PORT (port 0: any free port; default "
                        "tcp://127.0.0.1:5555)")
    p.add_argument("--pub", default=None,
                   help="doorbell endpoint tcp://HOST:PORT (default: the --bind port + 1)")
    p.add_argument("--keys", default=None, metavar="KEYDIR",
                   help="CURVE key folder (required for any bind beyond loopback)")
    p.add_argument("--add-client", default=None, metavar="NAME",
                   help="with --keys: make one more authorised client key folder and exit")
    p.add_argument("--staging-mib", type=int, default=2048,
                   help="disk (or memory) for uploads in progress (default 2048 MiB)")
    p.add_argument("--staging-dir", default=None, metavar="DIR",
                   help="folder for uploads in progress, kept across restarts (default "
                        "STORE/service-staging); 'memory' keeps them in memory instead")
    p.add_argument("--read-workers", type=int, default=None, metavar="N",
                   help="threads serving reads concurrently (default $MUNET_STORE_READ_WORKERS "
                        "or 4; 0: one thread answers everything in arrival order)")
    return p


def split_endpoint(text: str, flag: str) -> tuple[str, str]:
    if not text.startswith("tcp://") or ":" not in text[6:]:
        raise UserError(f"{flag} {text!r}: use tcp://HOST:PORT")
    host, _, port = text[6:].rpartition(":")
    if not host or not (port == "*" or port.isdigit() and int(port) < 65536):
        raise UserError(f"{flag} {text!r}: use tcp://HOST:PORT with a port from 0 to 65535")
    return host, port


def is_loopback(host: str) -> bool:
    if host in ("*", ""):
        return False
    try:
        addrs = {info[4][0] for info in socket.getaddrinfo(host.strip("[]"), None)}
    except socket.gaierror:
        raise UserError(f"--bind host {host!r} does not resolve") from None
    return all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addrs)


def main() -> int:
    args = build_parser().parse_args()
    from store.service.keys import add_client, ensure_server_keys, require_curve

    if args.add_client:
        if not args.keys:
            raise UserError("--add-client needs --keys KEYDIR")
        folder = add_client(args.keys, args.add_client)
        print(f"client {args.add_client}: copy {folder}/ to that host and pass it as --keys there")
        return 0
    if not args.store:
        raise UserError("--store DIR is required")
    host, port = split_endpoint(args.bind, "--bind")
    if args.pub:
        split_endpoint(args.pub, "--pub")
    if not args.keys and not is_loopback(host) or args.pub and not args.keys \
            and not is_loopback(split_endpoint(args.pub, "--pub")[0]):
        raise UserError(f"refusing to serve {args.bind} beyond loopback without --keys KEYDIR "
                        f"(CURVE encryption and authentication); bind tcp://127.0.0.1:PORT or "
                        f"pass --keys")
    if args.staging_mib < 16:
        raise UserError("--staging-mib must be at least 16")
    if args.read_workers is not None and not 0 <= args.read_workers <= 64:
        raise UserError("--read-workers must be from 0 to 64")
    keys = None
    if args.keys:
        require_curve()
        keys = ensure_server_keys(args.keys)
    import zmq

    from store import Store
    from store.service.server import StoreServer
    from store.service.staging import Staging

    bind = f"tcp://{host}:{'*' if port in ('0', '*') else port}"
    stop = {"now": False}

    def _stop(signum, frame):
        stop["now"] = True

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    import os

    from store.service.server import default_read_workers

    read_workers = args.read_workers if args.read_workers is not None else default_read_workers()
    created = not os.path.exists(args.store)  # a refusal below removes what this run made
    store = Store.open(args.store, create=True)
    staging_dir = None if args.staging_dir == "memory" else \
        args.staging_dir or os.path.join(args.store, "service-staging")
    try:
        staging = Staging(max_bytes=args.staging_mib * 2**20, folder=staging_dir)
    except OSError as exc:
        store.close()
        raise UserError(f"--staging-dir {staging_dir}: {exc.strerror or exc}") from None
    server = StoreServer(store, bind, pub=args.pub, keys=keys, staging=staging,
                         read_workers=read_workers)
    try:
        try:
            server.start()
        except zmq.ZMQError as exc:
            server.close()
            store.close()
            if created:  # nothing was ever served from it: leave no empty store behind
                import shutil
                shutil.rmtree(args.store, ignore_errors=True)
            raise UserError(f"cannot bind {args.bind} (or its doorbell {args.pub or 'port + 1'}): "
                            f"{exc}") from None
        print(f"serving {args.store} on {server.endpoint}", flush=True)
        print(f"serve_store.py: doorbell on {server.pub_endpoint}; "
              f"{'CURVE keys from ' + args.keys if keys else 'loopback only, no keys'}; "
              f"{read_workers} read threads; staging in {staging_dir or 'memory'}",
              file=sys.stderr, flush=True)
        server.serve(lambda: stop["now"])
    finally:
        server.close()
        store.close()
    print("serve_store.py: stopped", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    run_main(main, "serve_store.py")
