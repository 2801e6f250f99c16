"""Serving the grown system over HTTP: shared prefixes, dynamic batching, live swaps, memory.

Every number is measured on this machine in one run, on loopback only, with bounded client loops.

* ``shared_prefix``: all 8 tasks of a grown store asked about the same batch of images, once through
  the prefix tree and once as 8 separate forwards (one plan per task), interleaved; the measured
  speed-up against the bound the FLOPs count predicts (separate FLOPs / FLOPs with shared prefixes).
  ``shared_prefix_multipath``: the same on the store after one multipath cycle per task (each task
  served by a model that runs other tasks' whole paths, so more of the tree is shared).
* ``batching``: 64 concurrent clients, each sending one image per request to ``/v1/predict`` (all
  tasks), against the server with dynamic batching (``--max-batch 64``) and with batch-1 serving
  (``--max-batch 1``): requests per second, p50/p99 latency, failed requests.
* ``swaps``: the same load on a copy of the store while one task's model is republished 20 times (a
  new head each time, as an agent would publish): failed requests, responses naming a model that was
  not yet published (``stale_responses``), and the lag from a publish to the first answer from it.
* ``memory``: the server's peak RSS serving 8 tasks of a ViT-B store of 8 tasks and of 124 tasks (the
  synthetic stores of ``benchmarks/scale.py``).

    python benchmarks/serve_bench.py [--store swarm-store] [--multipath-store DIR] [--seconds 15]
                                     [--clients 64] [--memory-tasks 124] [--skip-memory]
                                     [--out benchmarks/results/serve.json]
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results" / "serve.json"


# ---- a publisher, as an agent would publish --------------------------------------------------------

def republish(st, task: str, n: int, token: str | None = None, bus=None) -> tuple[str, str]:
    """Publish a new model for ``task``'s single-path agent: its current model with a new head (the
    old head's weights scaled by 1 + n/100). Returns (model id, lease token): pass the token back to
    publish again under the same lease. With ``bus`` (a ``PeerBus``), the lease records its endpoint
    and the publication is announced on it after the commit, as an agent does."""
    import platform as _platform

    from store import ComponentWrite, ModelRecord, Publication
    from store.records import SINGLE

    pointer = next(p for p in st.pointers() if p.task == task and p.kind == SINGLE)
    model = st.get_model(pointer.model_id)
    if token is None:
        token = st.acquire_lease(model.agent, task, ttl=600, host=_platform.node(), pid=os.getpid(),
                                 device="cpu", endpoint=bus.endpoint if bus else "", preset=model.preset)
    names = {cid: st.get_component(cid).name for cid in model.components}
    head = next(cid for cid, name in names.items() if name == "head")
    params, _ = st.load_component_tensors(head, momentum=False)
    from protocol.tensors import RawTensor
    scaled = {k: RawTensor(v.dtype, v.shape, memoryview(
        (np.frombuffer(v.data, np.float32) * (1 + n / 100)).astype(np.float32)).cast("B"))
        for k, v in params.items()}
    cid = f"{model.agent}:{900_000 + n}"
    write = ComponentWrite.build(cid, "head", model.agent, scaled, {}, cloned_from=head)
    new = ModelRecord(id=f"{model.agent}:m{900_000 + n}", task=task, agent=model.agent,
                      components=[cid if c == head else c for c in model.components],
                      hparams=dict(model.hparams), metrics=dict(model.metrics), parent=model.id,
                      preset=model.preset, preset_hash=model.preset_hash, created_at=time.time())
    seq = st.commit(model.agent, token, components=[write], models=[new],
                    publish=Publication(new.id, int(new.hparams["num_classes"]),
                                        {k: v for k, v in new.hparams.items() if k.startswith("ds_")},
                                        score=pointer.score))
    if bus is not None:
        from protocol.messages import Published
        bus.send(Published(agent_id=model.agent, task=task, model_id=new.id, seq=seq, score=pointer.score))
    return new.id, token


# ---- the server and its clients ------------------------------------------------------------------

class ServerProc:
    def __init__(self, store: str, *extra: str, log: str) -> None:
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, str(REPO / "launch" / "serve_models.py"), "--store", store, "--port", "0",
             "--log-level", "warning", *extra], stdout=subprocess.PIPE, stderr=open(log, "w"), text=True,
            env=dict(os.environ, HF_HUB_OFFLINE="1"))
        line = self.proc.stdout.readline()
        m = re.search(r"http://[^ ]+:(\d+)", line)
        if not m:
            self.proc.kill()
            raise RuntimeError(f"server did not start: {line!r}; log: {Path(log).read_text()[-2000:]}")
        self.url = f"http://127.0.0.1:{m.group(1)}"

    def peak_rss(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def npy_body(images: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, images)
    return buf.getvalue()


async def _post(reader, writer, head: bytes, body: bytes) -> tuple[int, bytes]:
    """One HTTP/1.1 request on a keep-alive connection; (status, body)."""
    writer.write(head + body)
    status_line = await reader.readline()
    length = 0
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b""):
            break
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    if not status_line:
        raise ConnectionError("connection closed")
    return int(status_line.split()[1]), await reader.readexactly(length)


def load(url: str, body: bytes, clients: int, seconds: float, max_requests: int) -> dict:
    """``clients`` concurrent keep-alive connections post ``body`` until ``seconds`` pass (or
    ``max_requests`` are sent); every answer is recorded (sent, received, status, model ids). The
    client is a few lines of asyncio (not an HTTP library) so that it takes little of the CPU the
    server needs: both run on this machine's 2 cores."""
    host_port, _, path = url.removeprefix("http://").partition("/")
    host, _, port = host_port.partition(":")
    head = (f"POST /{path} HTTP/1.1\r\nHost: {host_port}\r\nContent-Type: application/x-npy\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    records: list[tuple[float, float, int, dict]] = []
    errors: dict[str, int] = {}

    async def run() -> None:
        end = time.monotonic() + seconds
        budget = [max_requests]

        async def one() -> None:
            reader = writer = None
            while time.monotonic() < end and budget[0] > 0:
                budget[0] -= 1
                t0 = time.perf_counter()
                try:
                    if writer is None:
                        reader, writer = await asyncio.open_connection(host, int(port))
                    status, payload = await asyncio.wait_for(_post(reader, writer, head, body), 60)
                    ids = json.loads(payload).get("model_ids", {}) if status == 200 else {}
                    records.append((t0, time.perf_counter(), status, ids))
                except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
                    records.append((t0, time.perf_counter(), 0, {}))
                    errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                    if writer is not None:
                        writer.close()
                    reader = writer = None
            if writer is not None:
                writer.close()

        await asyncio.gather(*(one() for _ in range(clients)))

    started = time.perf_counter()
    cpu = time.process_time()
    asyncio.run(run())
    wall = time.perf_counter() - started
    ok = [r for r in records if r[2] == 200]
    lat = sorted((r[1] - r[0]) * 1000 for r in ok)
    return {"requests": len(records), "ok": len(ok), "failed": len(records) - len(ok),
            "errors": dict(errors, **{f"http_{c}": sum(1 for r in records if r[2] == c)
                                      for c in {r[2] for r in records} - {0, 200}}),
            "seconds": wall, "throughput_rps": len(ok) / wall, "client_cpu_seconds": time.process_time() - cpu,
            "p50_ms": lat[len(lat) // 2] if lat else None,
            "p99_ms": lat[min(len(lat) - 1, int(len(lat) * 0.99))] if lat else None,
            "records": records}


# ---- the measurements ------------------------------------------------------------------------------

def measure_shared_prefix(store: str, images: np.ndarray, reps: int) -> dict:
    import torch

    from agents.serving.plan import Plan
    from agents.serving.server import ModelServer

    server = ModelServer(store, use_bus=False).start()
    try:
        plan = server.plan
        tasks = sorted(plan.models)
        singles = [Plan({t: plan.models[t]}) for t in tasks]
        imgs = list(images)
        rows = {t: np.arange(len(imgs)) for t in tasks}
        cpu = torch.device("cpu")
        shared_t, separate_t = [], []
        plan.run(imgs, rows, cpu)  # warm-up
        for _ in range(reps):
            t0 = time.perf_counter()
            plan.run(imgs, rows, cpu)
            t1 = time.perf_counter()
            for p, t in zip(singles, tasks):
                p.run(imgs, {t: rows[t]}, cpu)
            t2 = time.perf_counter()
            shared_t.append(t1 - t0)
            separate_t.append(t2 - t1)
        flops = plan.flops()
        measured = statistics.median(separate_t) / statistics.median(shared_t)
        return {"tasks": tasks, "batch_images": len(imgs), "reps": reps,
                "flops_separate_per_image": flops["separate"], "flops_shared_per_image": flops["shared"],
                "flops_bound": flops["bound"], "measured_ratio": measured,
                "fraction_of_bound": measured / flops["bound"],
                "shared_seconds_median": statistics.median(shared_t),
                "separate_seconds_median": statistics.median(separate_t),
                "nodes": len(plan.nodes()),
                "stages_separate": sum(len(p.stage_keys) for m in plan.models.values() for p in m.paths)}
    finally:
        server.close()


def measure_batching(store: str, body: bytes, clients: int, seconds: float, workdir: str) -> dict:
    out = {}
    for name, batch in (("batch1", "1"), ("dynamic", "64")):
        srv = ServerProc(store, "--max-batch", batch, "--max-queue", "1024", log=os.path.join(workdir, f"{name}.log"))
        try:
            load(f"{srv.url}/v1/predict?top_k=1", body, clients, 2.0, 10_000)  # warm-up
            r = load(f"{srv.url}/v1/predict?top_k=1", body, clients, seconds, 1_000_000)
            r.pop("records")
            out[name] = r
        finally:
            srv.stop()
    return {"clients": clients, "seconds": seconds, **out,
            "throughput_ratio": out["dynamic"]["throughput_rps"] / out["batch1"]["throughput_rps"],
            "p50_ms": out["dynamic"]["p50_ms"], "p99_ms": out["dynamic"]["p99_ms"],
            "failed": out["dynamic"]["failed"] + out["batch1"]["failed"]}


def measure_swaps(store: str, body: bytes, clients: int, count: int, workdir: str, poll: float,
                  announce: bool) -> dict:
    from store import Store
    from store.records import SINGLE

    copy = os.path.join(workdir, "swap-store")
    shutil.copytree(store, copy)
    with Store.open(copy, readonly=True) as st:
        task = sorted(p.task for p in st.tasks() if p.kind == SINGLE)[0]
        published = {st.get_task(t.task).model_id: 0.0 for t in st.tasks()}
    srv = ServerProc(copy, "--poll", str(poll), log=os.path.join(workdir, "swaps.log"))
    seconds = count * 0.5 + poll + 4
    times: dict[str, float] = {}

    def publisher() -> None:
        from protocol.bus import PeerBus

        bus = PeerBus("serve-bench-publisher") if announce else None
        try:
            with Store.open(copy) as st:
                token = None
                for n in range(1, count + 1):
                    time.sleep(0.5 if n > 1 else poll + 1.5)  # first: the server has seen the lease
                    t0 = time.perf_counter()
                    model_id, token = republish(st, task, n, token, bus)
                    times[model_id] = t0  # before the commit: a response cannot name it earlier
        finally:
            if bus is not None:
                bus.close()

    try:
        thread = threading.Thread(target=publisher)
        thread.start()
        r = load(f"{srv.url}/v1/predict?top_k=1", body, clients, seconds, 1_000_000)
        thread.join()
    finally:
        srv.stop()
    known = dict(published, **times)
    stale = sum(1 for t0, t1, status, ids in r["records"] if status == 200
                for mid in ids.values() if mid not in known or known[mid] > t1)
    firsts = {mid: min((t1 for _, t1, s, ids in r["records"] if ids.get(task) == mid), default=None)
              for mid in times}
    lags = [firsts[m] - times[m] for m in times if firsts[m] is not None]
    seen = sorted({ids.get(task) for *_, ids in r["records"] if ids.get(task) in times})
    return {"count": len(times), "task": task, "poll_seconds": poll, "announced_on_bus": announce,
            "requests": r["requests"],
            "failed": r["failed"], "errors": r["errors"], "stale_responses": stale, "models_seen": len(seen),
            "swap_lag_ms_median": statistics.median(lags) * 1000 if lags else None,
            "swap_lag_ms_max": max(lags) * 1000 if lags else None,
            "throughput_rps": r["throughput_rps"], "p99_ms": r["p99_ms"]}


def measure_memory(tasks_small: int, tasks_large: int, workdir: str) -> dict:
    import random

    from agents.config import resolve_preset
    from agents.vit import preset_vit
    from benchmarks.scale import Weights, fill_root, publish_task
    from store import Store

    class SmallWeights(Weights):
        """scale.py's synthetic weights at the scale of a trained ViT's (N(0, 0.02^2)), each tensor made
        distinct by small values rather than by raw tag bytes: N(0, 1) weights and tag bytes read as
        floats (up to 1e11) overflow a ViT-B forward into NaN, which no client can be answered with."""

        def array(self, shape, dtype, tag):
            if dtype != "float32":  # momentum: never in a forward, keep scale.py's tags
                return super().array(shape, dtype, tag)
            a = super().array(shape, dtype, 0)
            a = (a * np.float32(0.02)).astype(np.float32)
            flat = a.reshape(-1)
            flat[0] = np.float32((tag % 1_000_003) * 1e-9)
            if flat.size > 1:
                flat[1] = np.float32((tag // 1_000_003) * 1e-9)
            return a

    preset = resolve_preset("vit-b", root="random")
    vit = preset_vit(preset)
    path = os.path.join(workdir, "vitb-store")
    w, rng = SmallWeights(seed=0), random.Random(0)
    with Store.open(path, create=True) as st:
        fill_root(st, preset, vit, w)
    out: dict = {"preset": preset.name, "image_size": preset.budget.image_size}
    serve = ",".join(f"task{i:03d}" for i in range(tasks_small))
    image = np.random.default_rng(0).integers(0, 256, (1, preset.budget.image_size, preset.budget.image_size, 3),
                                              dtype=np.uint8)
    prev: dict[str, str] = {}
    done = 0
    for n in (tasks_small, tasks_large):
        t0 = time.perf_counter()
        with Store.open(path) as st:
            for i in range(done, n):
                blocks = rng.sample(range(vit.depth), rng.randint(2, 4))
                prev = publish_task(st, preset, vit, w, i, blocks, dict(list(prev.items())[:1]))
        done = n
        srv = ServerProc(path, "--tasks", serve, log=os.path.join(workdir, f"mem{n}.log"))
        try:
            r = load(f"{srv.url}/v1/predict?top_k=1", npy_body(image), 1, 60, 3)
            out[f"rss_{n}"] = srv.peak_rss()
            out[f"requests_{n}"] = {"ok": r["ok"], "failed": r["failed"], "errors": r["errors"]}
        finally:
            srv.stop()
        out[f"fill_seconds_{n}"] = time.perf_counter() - t0
    out["rss_8"], out["rss_124"] = out[f"rss_{tasks_small}"], out[f"rss_{tasks_large}"]
    out["ratio"] = out["rss_124"] / out["rss_8"]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", default=str(REPO / "swarm-store"), help="a grown 8-task store (make demo)")
    p.add_argument("--seconds", type=float, default=15.0, help="load per batching measurement")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--swaps", type=int, default=20)
    p.add_argument("--poll", type=float, default=1.0, help="the server's --poll in the swap run")
    p.add_argument("--reps", type=int, default=20, help="interleaved repeats of the prefix measurement")
    p.add_argument("--multipath-store", default=None, metavar="DIR",
                   help="also measure the prefix tree on this store: a copy of --store after "
                        "`run_swarm.py --store COPY --kinds multipath --cycles 1 --preset demo`")
    p.add_argument("--memory-tasks", type=int, default=124)
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--dir", default=None, help="scratch folder (default: a temporary one)")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    if not os.path.isdir(args.store):
        print(f"serve_bench.py: error: no store at {args.store}: run `make demo` first", file=sys.stderr)
        return 2
    workdir = tempfile.mkdtemp(prefix="serve_bench_", dir=args.dir)
    rng = np.random.default_rng(0)
    one = rng.integers(0, 256, (1, 28, 28, 1), dtype=np.uint8)
    result: dict = {"config": {"store": os.path.basename(os.path.abspath(args.store)), "clients": args.clients,
                               "seconds": args.seconds, "machine": {"platform": platform.platform(),
                                                                    "cpu_count": os.cpu_count()},
                               "request": "one 28x28 greyscale image as .npy to /v1/predict (all tasks)"}}
    t0 = time.perf_counter()
    try:
        result["shared_prefix"] = measure_shared_prefix(
            args.store, rng.integers(0, 256, (64, 28, 28, 1), dtype=np.uint8), args.reps)
        print("shared_prefix", {k: v for k, v in result["shared_prefix"].items() if k != "tasks"}, flush=True)
        if args.multipath_store:
            result["shared_prefix_multipath"] = measure_shared_prefix(
                args.multipath_store, rng.integers(0, 256, (64, 28, 28, 1), dtype=np.uint8), args.reps)
            print("shared_prefix_multipath", {k: v for k, v in result["shared_prefix_multipath"].items()
                                              if k != "tasks"}, flush=True)
        result["batching"] = measure_batching(args.store, npy_body(one), args.clients, args.seconds, workdir)
        print("batching", {k: result["batching"][k] for k in ("throughput_ratio", "p50_ms", "p99_ms", "failed")},
              flush=True)
        # the bus (as agents announce) with a slow poll, then the poll alone (announcements lost)
        result["swaps"] = measure_swaps(args.store, npy_body(one), args.clients, args.swaps, workdir,
                                        poll=5.0, announce=True)
        print("swaps", result["swaps"], flush=True)
        shutil.rmtree(os.path.join(workdir, "swap-store"))
        result["swaps_polling_only"] = measure_swaps(args.store, npy_body(one), args.clients, args.swaps,
                                                     workdir, poll=args.poll, announce=False)
        print("swaps_polling_only", result["swaps_polling_only"], flush=True)
        if not args.skip_memory:
            result["memory"] = measure_memory(8, args.memory_tasks, workdir)
            print("memory", result["memory"], flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    result["total_seconds"] = time.perf_counter() - t0
    result["targets"] = {
        "shared_prefix_at_least_0.8_of_bound": all(result[k]["fraction_of_bound"] >= 0.8 for k in
                                                   ("shared_prefix", "shared_prefix_multipath") if k in result),
        "batching_at_least_3x": result["batching"]["throughput_ratio"] >= 3.0,
        "batching_no_failed": result["batching"]["failed"] == 0,
        "swaps_no_failed_no_stale": all(result[k]["failed"] == 0 and result[k]["stale_responses"] == 0
                                        for k in ("swaps", "swaps_polling_only")),
        **({"memory_at_most_1.5x": result["memory"]["ratio"] <= 1.5} if "memory" in result else {}),
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}: {result['targets']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
