"""A store through the store service vs the same store on local disk, measured in one run.

- model load: ``load_model_tensors`` of a ViT-Ti/16 (3 blocks, 32 px; ~5.9 MB in 8 components)
  through the service with a cold blob cache (fresh folder: every blob crosses the socket) and a warm
  one (every blob from this host's cache), vs the local ``Store``;
- publish commit latency: one commit of fresh bytes for all of that model (upload + one write txn)
  vs a local commit;
- blob throughput: fetching one 64 MiB blob through the service (hash-checked, in memory; and also
  written into a cold cache) vs a raw ZeroMQ transfer of the same bytes (a ROUTER process answering
  chunk requests with the same chunk size and credit), both on loopback;
- children per minute of an agent (``attach.py``, preset ``test``) through the service vs one on
  the directory (target >= 0.95), runs interleaved.

Medians over repeats; ratios < 1 mean the service is slower. The service runs as its own process
(``launch/serve_store.py``) on 127.0.0.1 without keys (CURVE costs are measured with ``--keys``).

    python benchmarks/remote_bench.py [--quick] [--repeats N] [--keys]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import numpy as np  # noqa: E402

from benchmarks.store_bench import machine_info, make_arrays, median_seconds, variant  # noqa: E402
from protocol.tensors import RawTensor  # noqa: E402
from store import ComponentWrite, ModelRecord, Publication, Store, component_id  # noqa: E402
from store.service import wire  # noqa: E402
from store.service.blobcache import BlobCache, content_key  # noqa: E402
from store.service.client import RemoteStore  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "remote.json"
BIG_BLOB = 64 * 2**20

RAW_PEER = r"""
import sys, zmq
ctx = zmq.Context()
s = ctx.socket(zmq.ROUTER)
port = s.bind_to_random_port("tcp://127.0.0.1")
print(port, flush=True)
data = bytes(int(sys.argv[1]))
while True:
    ident, _, req = s.recv_multipart()
    if req == b"stop":
        break
    off, n = map(int, req.split(b":"))
    s.send_multipart([ident, b"", memoryview(data)[off:off + n]], copy=False)
"""


class _HashOnly(BlobCache):
    """A cache that checks what arrives but keeps nothing: the transfer without the disk write."""

    def get(self, key: str):
        return None

    def put(self, key: str, blob) -> None:
        if content_key(blob) != key:
            raise RuntimeError(f"blob {key} arrived damaged")


def model_writes(agent: str, arrays: dict, base: int) -> tuple[list[ComponentWrite], list[str]]:
    writes = [ComponentWrite.build(component_id(agent, base + i), comp, agent,
                                   {n: RawTensor.from_numpy(a) for n, a in tensors.items()})
              for i, (comp, tensors) in enumerate(arrays.items())]
    return writes, [w.record.id for w in writes]


def publish(st, token: str, arrays: dict, i: int) -> None:
    writes, cids = model_writes("bench", arrays, 100 * (i + 10))
    model = ModelRecord(id=f"bench:m{i + 10}", task="bench_task", agent="bench", components=cids,
                        hparams={"num_classes": 10}, metrics={}, parent=None, preset="bench",
                        preset_hash="b", created_at=time.time())
    st.commit("bench", token, components=writes, models=[model], publish=Publication(model.id, 10))


def start_service(store: str, keys: str | None) -> tuple[subprocess.Popen, str]:
    args = [sys.executable, str(ROOT / "launch" / "serve_store.py"), "--store", store,
            "--bind", "tcp://127.0.0.1:0"] + (["--keys", keys] if keys else [])
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline()
    if not line.startswith("serving "):
        proc.kill()
        raise RuntimeError(f"service did not start: {line!r}")
    return proc, line.split(" on ", 1)[1].strip()


def raw_transfer_seconds(nbytes: int, repeats: int) -> float:
    proc = subprocess.Popen([sys.executable, "-c", RAW_PEER, str(nbytes)], stdout=subprocess.PIPE,
                            text=True)
    port = int(proc.stdout.readline())
    import zmq

    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.connect(f"tcp://127.0.0.1:{port}")

    def fetch(_: int) -> None:  # the same chunking and credit as the service's client
        buf = bytearray(nbytes)
        offsets = list(range(0, nbytes, wire.CHUNK_BYTES))
        sent = got = 0
        while got < len(offsets):
            while sent < len(offsets) and sent - got < wire.CREDIT:
                sock.send_multipart([b"", f"{offsets[sent]}:{wire.CHUNK_BYTES}".encode()])
                sent += 1
            _, frame = sock.recv_multipart(copy=False)
            off = offsets[got]
            buf[off:off + len(frame)] = frame.buffer
            got += 1

    try:
        return median_seconds(fetch, repeats)
    finally:
        sock.send_multipart([b"", b"stop"])
        sock.close()
        proc.wait(10)


def children_per_minute(spec: str, keys: str | None, work: str, tag: str, cycles: int) -> float:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               MUNET_BLOB_CACHE=os.path.join(work, f"cache-{tag}"))
    args = [sys.executable, str(ROOT / "launch" / "attach.py"), "--store", spec, "--task",
            "uci_digits", "--preset", "test", "--cycles", str(cycles), "--threads", "1"]
    if keys:
        args += ["--keys", keys]
    subprocess.run(args, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def agent_rate(store_dir: str) -> tuple[float, float]:
    """(the agent's own children per minute, start-up included; the steady rate between its
    first and last trained child, from the trials' commit times)."""
    with Store.open(store_dir, readonly=True) as st:
        overall = float(st.get_agent("agent~uci_digits").progress["children_per_min"])
        times = sorted(t.created_at for t in st.trials(agent="agent~uci_digits"))
    steady = 60.0 * (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else 0.0
    return overall, steady


def run(repeats: int, agent_repeats: int, cycles: int, workdir: str, use_keys: bool) -> dict:
    root = tempfile.mkdtemp(prefix="remote_bench_", dir=workdir)
    keys = os.path.join(root, "keys") if use_keys else None
    procs = []
    try:
        store_dir = os.path.join(root, "store")
        st = Store.open(store_dir, create=True)
        token = st.acquire_lease("bench", "bench_task", ttl=3600, host="bench", pid=os.getpid(),
                                 device="cpu", endpoint="", preset="bench")
        base = make_arrays(0)
        nbytes = sum(a.nbytes for t in base.values() for a in t.values())
        publish(st, token, base, -1)
        big = ComponentWrite.build(component_id("bench", 99999), "big", "bench",
                                   {"w": RawTensor("uint8", (BIG_BLOB,), np.random.default_rng(1)
                                                   .integers(0, 255, BIG_BLOB, dtype=np.uint8)
                                                   .tobytes())})
        st.commit("bench", token, components=[big])
        st.release_lease("bench", token)
        proc, endpoint = start_service(store_dir, keys)
        procs.append(proc)
        key_arg = keys
        remote = RemoteStore.connect(endpoint, keys=key_arg, cache_dir=os.path.join(root, "warm"))
        model_id = "bench:m9"
        caches = iter(range(10**6))

        def cold(_: int) -> None:  # the same connected client, a fresh (empty) cache each time
            remote.cache = BlobCache(os.path.join(root, f"cold{next(caches)}"))
            remote.load_model_tensors(model_id)

        remote.load_model_tensors(model_id)  # fills the warm cache
        warm_cache = remote.cache
        load = {"local": median_seconds(lambda _: st.load_model_tensors(model_id), repeats),
                "remote_warm": median_seconds(lambda _: remote.load_model_tensors(model_id),
                                              repeats),
                "remote_cold": median_seconds(cold, repeats)}
        remote.cache = warm_cache
        # publish latency: a fresh lease on each side, fresh bytes every repeat
        ltoken = st.acquire_lease("bench", "bench_task", ttl=3600, host="b", pid=1, device="cpu",
                                  endpoint="", preset="bench")
        variants = [variant(base, i) for i in range(2 * repeats + 4)]
        commit_local = median_seconds(lambda i: publish(st, ltoken, variants[i % len(variants)],
                                                        1000 + i), repeats)
        st.release_lease("bench", ltoken)
        rtoken = remote.acquire_lease("bench", "bench_task", ttl=3600, host="b", pid=1,
                                      device="cpu", endpoint="", preset="bench")
        commit_remote = median_seconds(
            lambda i: publish(remote, rtoken, variants[(i + repeats + 2) % len(variants)],
                              2000 + i), repeats)
        remote.release_lease("bench", rtoken)

        def big_cold(_: int) -> None:
            remote.cache = BlobCache(os.path.join(root, f"big{next(caches)}"))
            remote.load_component_tensors(component_id("bench", 99999))
            shutil.rmtree(remote.cache.root, ignore_errors=True)

        def big_transfer(_: int) -> None:
            remote.cache = _HashOnly(os.path.join(root, "nocache"))
            remote.load_component_tensors(component_id("bench", 99999))

        big_remote = median_seconds(big_cold, repeats)
        big_transfer_s = median_seconds(big_transfer, repeats)
        big_raw = raw_transfer_seconds(BIG_BLOB + 64, repeats)
        remote.close()
        st.close()
        # children per minute: the same agent on a copy of one store with a root, local vs
        # through a service
        from helpers.swarm import make_store

        agent_store = os.path.join(root, "agent-store")
        make_store(agent_store, "test")
        rates: dict[str, list[float]] = {"local": [], "remote": []}
        steady: dict[str, list[float]] = {"local": [], "remote": []}
        for r in range(agent_repeats):
            for side in ("local", "remote") if r % 2 == 0 else ("remote", "local"):
                d = os.path.join(root, f"agent-{side}-{r}")
                shutil.copytree(agent_store, d)
                if side == "local":
                    children_per_minute(d, None, root, f"{side}{r}", cycles)
                else:
                    p, ep = start_service(d, keys)
                    try:
                        children_per_minute(ep, keys, root, f"{side}{r}", cycles)
                    finally:
                        p.terminate()
                        p.wait(30)
                overall, steady_rate = agent_rate(d)
                rates[side].append(overall)
                steady[side].append(round(steady_rate, 2))
                shutil.rmtree(d, ignore_errors=True)
        cpm = {k: statistics.median(v) for k, v in rates.items()}
        cpm_steady = {k: statistics.median(v) for k, v in steady.items()}
        return {
            "model_bytes": nbytes, "big_blob_bytes": BIG_BLOB, "repeats": repeats,
            "chunk_bytes": wire.CHUNK_BYTES, "credit": wire.CREDIT, "curve": use_keys,
            "seconds": {"load_local": load["local"], "load_remote_warm": load["remote_warm"],
                        "load_remote_cold": load["remote_cold"], "commit_local": commit_local,
                        "commit_remote": commit_remote, "big_blob_remote": big_remote,
                        "big_blob_remote_transfer_only": big_transfer_s,
                        "big_blob_raw_zmq": big_raw},
            "ratios": {
                "load_local_over_remote_warm": load["local"] / load["remote_warm"],
                "load_local_over_remote_cold": load["local"] / load["remote_cold"],
                "commit_local_over_remote": commit_local / commit_remote,
                "blob_throughput_fraction_of_raw_zmq": big_raw / big_transfer_s,
                "blob_throughput_with_cache_write_fraction_of_raw_zmq": big_raw / big_remote,
                "children_per_min_remote_over_local": cpm["remote"] / cpm["local"],
                "steady_children_per_min_remote_over_local":
                    cpm_steady["remote"] / cpm_steady["local"]},
            "throughput_mib_s": {"remote_into_cache": BIG_BLOB / 2**20 / big_remote,
                                 "remote_transfer_and_hash": BIG_BLOB / 2**20 / big_transfer_s,
                                 "raw_zmq": BIG_BLOB / 2**20 / big_raw},
            "children_per_min": {"local": rates["local"], "remote": rates["remote"],
                                 "steady_local": steady["local"],
                                 "steady_remote": steady["remote"],
                                 "cycles": cycles, "preset": "test",
                                 "note": "the agent's own number counts from its start (data, "
                                         "root load); steady is first to last child"},
        }
    finally:
        for p in procs:
            p.terminate()
            p.wait(30)
        shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few repeats (smoke run)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--keys", action="store_true", help="serve with CURVE keys")
    parser.add_argument("--dir", default=None)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    repeats = args.repeats or (3 if args.quick else 15)
    result = run(repeats, 1 if args.quick else 4, 1 if args.quick else 6,
                 args.dir or tempfile.gettempdir(), args.keys)
    result["machine"] = machine_info()
    result["command"] = " ".join([Path(sys.executable).name, *sys.argv])
    result["quick"] = args.quick
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"ratios": result["ratios"], "seconds": result["seconds"]}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    from launch.common import run_main

    run_main(main, "remote_bench.py")
