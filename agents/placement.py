"""Where an agent runs when an engine (Ray, Slurm, a shell loop) placed it: its device and the address
its announcement socket binds.

An engine narrows ``CUDA_VISIBLE_DEVICES`` to the GPU(s) it gave the agent, so inside an engine a
physical index is always wrong: ``auto`` takes the first visible GPU (``cuda:0``), else the CPU. The
bus must bind an address peers on other hosts can reach, never a wildcard: ``auto`` picks the local
interface that routes to the store's host (a connected UDP socket's own address; no packet is sent).
"""
from __future__ import annotations

import os
import socket

AUTO = "auto"


class PlacementError(ValueError):
    """``auto`` could not be resolved here (a user error: give the value by hand)."""


def resolve_device(spec: str) -> str:
    """``auto`` -> ``cuda:0`` when torch sees a GPU (the one the engine left visible), else ``cpu``."""
    if spec != AUTO:
        return spec
    import torch

    return "cuda:0" if torch.cuda.is_available() else "cpu"


def store_host(store: str) -> str | None:
    """The host of a ``tcp://HOST:PORT`` store; None for a store directory (agents on this host)."""
    if not store.startswith("tcp://"):
        return None
    from store.service.client import parse_endpoint

    return parse_endpoint(store)[0]


def local_address_toward(host: str, port: int = 9) -> str:
    """This host's address on the interface that routes to ``host`` (a UDP connect sends nothing)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((socket.gethostbyname(host), port))
        return s.getsockname()[0]


def resolve_bind_host(spec: str, store: str) -> str:
    """``auto`` -> ``$MUNET_BIND_HOST``, else the address toward the store's host, else loopback
    (a store directory: every agent shares this host)."""
    if spec != AUTO:
        return spec
    if os.environ.get("MUNET_BIND_HOST"):
        return os.environ["MUNET_BIND_HOST"]
    host = store_host(store)
    if host is None:
        return "127.0.0.1"
    try:
        return local_address_toward(host)
    except OSError as exc:
        raise PlacementError(f"--bind-host auto: no route to the store host {host} ({exc}); "
                         f"give --bind-host this host's address") from None
