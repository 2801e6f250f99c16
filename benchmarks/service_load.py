"""The store service under load: many simulated agents against a real ``serve_store.py``.

A store is built with the store API (``--models`` published models of ``--components`` synthetic
components of ``--component-mb`` MB each), then served by ``launch/serve_store.py`` in a subprocess
on loopback. One driver process plays ``--agents`` agents, multiplexing two DEALER sockets per agent
(the heartbeat thread's and the main loop's, as a real agent's client has) on one poller, with the
request mix of an agent:

- ``heartbeat`` every 2 s (its own socket);
- ``last_event_seq`` every 2 s, then ``events`` after the last one seen when it moved;
- a view refresh every ``--refresh`` s: ``published_models``, ``get_model`` of one published model,
  ``get_component`` of each of its components;
- a component tensor load every ``--load`` s: ``manifest`` of one component, then its blobs with
  ``blob_read`` (no client cache: every download hits the service);
- and, from one publisher thread with its own ``RemoteStore``, an MB-size publish (two new
  components, a model, its publication) every ``--publish-every`` s (``publish``: upload + commit).

Each configuration runs twice for ``--seconds``: without, then with a concurrent ``verify`` loop
(one client calling ``verify`` back to back; the service runs each in a low-priority child process,
store/check_child.py, or in its own process with ``--check-in-process``). Everything repeats
``--repeats`` times, interleaved, and each phase's latencies are pooled over its repeats: a p99 of
one 15 s run rests on about ten heartbeats, and swings with whatever else the 2 cores do. It is measured for the service as built
(``--read-workers``, default 4: reads on a thread pool, writes on one writer thread) and, unless
``--no-baseline``, for the single-threaded service (``--read-workers 0``: everything on one thread
in arrival order, the service before this change), on the same store, in the same run.

Reports per request kind p50/p99 latency (ms, client-side: send to reply), requests per second,
failed requests (error replies, or no reply within 30 s) and the service's CPU seconds (from
/proc/PID/stat). Targets: no failed request, heartbeat p99 <= 50 ms, and a concurrent verify at most
doubles the heartbeat p99. Writes ``benchmarks/results/service_load.json``.

    python benchmarks/service_load.py [--agents 128] [--seconds 15] [--no-baseline] [--out FILE]
"""
from __future__ import annotations

import argparse
import heapq
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import zmq

from protocol.tensors import RawTensor
from store import (AgentState, ComponentWrite, ModelRecord, Publication, Store, TrialRecord,
                   component_id)
from store.service import wire

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results" / "service_load.json"
HEARTBEAT_SECONDS = 2.0
REPLY_TIMEOUT = 30.0
TARGET_HEARTBEAT_P99_MS = 50.0
TARGET_VERIFY_RATIO = 2.0


# ---- the store ----------------------------------------------------------------------------------

def _tensor(rng: np.random.Generator, nbytes: int) -> RawTensor:
    cols = 256
    rows = max(1, nbytes // (4 * cols))
    return RawTensor.from_numpy(rng.standard_normal((rows, cols), dtype=np.float32))


def _model_parts(agent: str, task: str, n: int, first_component: int, components: int,
                 nbytes: int, rng: np.random.Generator, base: list[str]
                 ) -> tuple[list[ComponentWrite], ModelRecord, AgentState, TrialRecord]:
    writes = [ComponentWrite.build(component_id(agent, first_component + i),
                                   f"encoderblock_{i}" if i < components - 1 else "head", agent,
                                   {"weight": _tensor(rng, nbytes)})
              for i in range(components)]
    now = time.time()
    model = ModelRecord(id=f"{agent}:m{n}", task=task, agent=agent,
                        components=[*base, *[w.record.id for w in writes]],
                        hparams={"num_classes": 10, "ds_image_size": 32, "num_layers": components},
                        metrics={"score": 0.5, "quality": 0.5, "params": 1}, parent=None,
                        preset="test", preset_hash="h0", created_at=now)
    state = AgentState(agent_id=agent, task=task, cycle=n, generation=0, population=[model.id],
                       best_model_id=model.id, next_component_id=first_component + components,
                       next_model_id=n + 1, offsprings={model.id: 0}, updated_at=now)
    trial = TrialRecord(id=f"{agent}:t{n}", agent=agent, task=task, cycle=n, generation=0,
                        parent=None, model_id=model.id, mutations=[], hparams_diff={},
                        quality=0.5, score=0.5, accepted=True, seconds=0.1, train_images=1,
                        preset="test", preset_hash="h0", created_at=now)
    return writes, model, state, trial


def _lease(st: Any, agent: str, task: str, ttl: float = 600.0) -> str:
    return st.acquire_lease(agent, task, ttl=ttl, host="bench", pid=os.getpid(), device="cpu",
                            endpoint="tcp://127.0.0.1:1", preset="test")


def build_store(path: str, models: int, components: int, component_mb: float) -> int:
    """``models`` published models (one task each) of ``components`` fresh components; returns
    the bytes of blob data written."""
    rng = np.random.default_rng(0)
    nbytes = int(component_mb * 2**20)
    total = 0
    with Store.open(path, create=True) as st:
        for m in range(models):
            agent, task = f"seed{m}", f"task{m}"
            token = _lease(st, agent, task)
            writes, model, state, trial = _model_parts(agent, task, 0, 0, components, nbytes, rng,
                                                       [])
            st.commit(agent, token, components=writes, models=[model], state=state,
                      publish=Publication(model.id, 10, {"ds_image_size": 32}), trials=[trial])
            st.release_lease(agent, token)
            total += components * nbytes
    return total


# ---- the service --------------------------------------------------------------------------------

def start_service(store: str, read_workers: int, log: str,
                  check_in_process: bool = False) -> tuple[subprocess.Popen, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    if check_in_process:  # verify in the service's own process, as before store/check_child.py
        env["MUNET_STORE_CHECK_IN_PROCESS"] = "1"
    proc = subprocess.Popen([sys.executable, str(REPO / "launch" / "serve_store.py"), "--store",
                             store, "--bind", "tcp://127.0.0.1:0", "--read-workers",
                             str(read_workers)], cwd=str(REPO), env=env, stdout=subprocess.PIPE,
                            stderr=open(log, "w"), text=True)
    line = proc.stdout.readline()
    if not line.startswith("serving "):
        proc.kill()
        raise RuntimeError(f"the service did not start: {line!r}; see {log}")
    return proc, line.split(" on ", 1)[1].strip()


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process and of its ended children (the service's verify processes), from
    /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")


# ---- the simulated agents -----------------------------------------------------------------------

class Recorder:
    def __init__(self) -> None:
        self.latency: dict[str, list[float]] = defaultdict(list)
        self.failed: dict[str, int] = defaultdict(int)
        self.errors: list[str] = []
        self.lock = threading.Lock()

    def ok(self, kind: str, seconds: float) -> None:
        with self.lock:
            self.latency[kind].append(seconds)

    def fail(self, kind: str, why: str) -> None:
        with self.lock:
            self.failed[kind] += 1
            if len(self.errors) < 20:
                self.errors.append(f"{kind}: {why}"[:300])


Req = tuple[str, dict, list]


def heartbeat_loop(agent: str, token: str) -> Iterator[Any]:
    yield ("sleep", random.uniform(0, HEARTBEAT_SECONDS))
    n = 0
    while True:
        n += 1
        yield ("req", "heartbeat", {"agent_id": agent, "token": token, "ttl": 600.0,
                                    "state": "training", "progress": {"cycle": n, "step": n * 7},
                                    "endpoint": None}, [])
        yield ("sleep", HEARTBEAT_SECONDS)


def main_loop(refresh: float, load: float, rng: random.Random) -> Iterator[Any]:
    """An agent's main thread: poll the event log, refresh its view, load components."""
    seen = 0
    next_refresh = time.monotonic() + rng.uniform(0, refresh)
    next_load = time.monotonic() + rng.uniform(0, load)
    yield ("sleep", rng.uniform(0, 2.0))
    while True:
        ok, seq, _ = yield ("req", "last_event_seq", {}, [])
        if ok and seq > seen:
            ok, events, _ = yield ("req", "events", {"after": seen, "limit": None}, [])
            if ok and events:
                seen = events[-1]["seq"]
        now = time.monotonic()
        if now >= next_refresh:
            next_refresh = now + refresh
            ok, published, _ = yield ("req", "published_models", {"kind": None}, [])
            if ok and published:
                model = published[rng.choice(sorted(published))]
                ok, rec, _ = yield ("req", "get_model", {"model_id": model["id"]}, [])
                for cid in (rec or {}).get("components", []):
                    yield ("req", "get_component", {"component_id": cid}, [])
        if now >= next_load:
            next_load = now + load
            ok, published, _ = yield ("req", "published_models", {"kind": None}, [])
            if ok and published:
                model = published[rng.choice(sorted(published))]
                cid = rng.choice(model["components"])
                ok, man, _ = yield ("req", "manifest", {"model_id": None,
                                                        "component_ids": [cid]}, [])
                if ok:
                    for key, size in sorted(man["sizes"].items()):
                        offset = 0
                        while offset < size:
                            n = min(wire.CHUNK_BYTES, size - offset)
                            ok, res, frames = yield ("req", "blob_read",
                                                     {"reads": [[key, offset, n]]}, [])
                            if not ok or sum(len(f) for f in frames) != n:
                                break
                            offset += n
        yield ("sleep", HEARTBEAT_SECONDS)


class Stream:
    """One DEALER socket running one request coroutine, one request at a time."""

    def __init__(self, ctx: zmq.Context, endpoint: str, gen: Iterator[Any]) -> None:
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.connect(endpoint)
        self.gen = gen
        self.pending: tuple[str, str, float] | None = None  # (id, kind, sent)

    def advance(self, reply: Any, rec: Recorder, wake: list, stop_at: float) -> None:
        step = self.gen.send(reply) if reply is not None else next(self.gen)
        while True:
            if step[0] == "sleep":
                heapq.heappush(wake, (time.monotonic() + step[1], id(self), self))
                return
            _, kind, args, frames = step
            if time.monotonic() >= stop_at:
                return
            rid = wire.new_request_id()
            self.sock.send_multipart([wire.encode_request(kind, rid, args), *frames])
            self.pending = (rid, kind, time.perf_counter())
            return


def drive(endpoint: str, agents: int, seconds: float, refresh: float, load: float,
          rec: Recorder, tokens: list[tuple[str, str]]) -> int:
    """Run the agents' request streams for ``seconds``; returns the number of requests answered."""
    ctx = zmq.Context.instance()
    rng = random.Random(1)
    streams: list[Stream] = []
    for i, (agent, token) in enumerate(tokens[:agents]):
        streams.append(Stream(ctx, endpoint, heartbeat_loop(agent, token)))
        streams.append(Stream(ctx, endpoint, main_loop(refresh, load, random.Random(rng.random()))))
    by_sock = {s.sock: s for s in streams}
    poller = zmq.Poller()
    for s in streams:
        poller.register(s.sock, zmq.POLLIN)
    wake: list = []
    start = time.monotonic()
    stop_at = start + seconds
    for s in streams:
        s.advance(None, rec, wake, stop_at)
    answered = 0
    while True:
        now = time.monotonic()
        outstanding = [s for s in streams if s.pending is not None]
        if now >= stop_at and not outstanding:
            break
        if now >= stop_at + REPLY_TIMEOUT:
            for s in outstanding:
                rec.fail(s.pending[1], "no reply")
            break
        while wake and wake[0][0] <= now:
            _, _, s = heapq.heappop(wake)
            if now < stop_at:
                s.advance(None, rec, wake, stop_at) if s.pending is None else None
        timeout = 50 if not wake else max(0, min(50, int((wake[0][0] - now) * 1000) + 1))
        for sock, _ in poller.poll(timeout):
            s = by_sock[sock]
            frames = sock.recv_multipart(copy=False)
            got = time.perf_counter()
            rid, ok, result = wire.decode_reply(frames[0].buffer)
            if s.pending is None or rid != s.pending[0]:
                continue
            _, kind, sent = s.pending
            s.pending = None
            answered += 1
            if ok:
                rec.ok(kind, got - sent)
            else:
                rec.fail(kind, f"{result.get('type')}: {result.get('message')}")
            if time.monotonic() < stop_at:
                s.advance((ok, result, [f.buffer for f in frames[1:]]), rec, wake, stop_at)
        for s in outstanding:
            if s.pending is not None and time.perf_counter() - s.pending[2] > REPLY_TIMEOUT:
                rec.fail(s.pending[1], "no reply within 30 s")
                s.pending = None
    for s in streams:
        s.sock.close()
    return answered


def publisher(endpoint: str, every: float, components: int, nbytes: int, stop: threading.Event,
              rec: Recorder, tag: str, cache: str) -> None:
    from store.service.client import RemoteStore

    agent, task = f"pub-{tag}", f"pubtask-{tag}"
    rng = np.random.default_rng(abs(hash(tag)) % 2**32)
    with RemoteStore.connect(endpoint, cache_dir=cache) as st:
        token = _lease(st, agent, task)
        n = 0
        while not stop.wait(every if n else 0.5):
            writes, model, state, trial = _model_parts(agent, task, n, 2 * n, 2, nbytes, rng, [])
            t0 = time.perf_counter()
            try:
                st.commit(agent, token, components=writes, models=[model], state=state,
                          publish=Publication(model.id, 10, {"ds_image_size": 32}),
                          trials=[trial])
                rec.ok("publish", time.perf_counter() - t0)
            except Exception as exc:  # noqa: BLE001 - counted as a failed request
                rec.fail("publish", f"{type(exc).__name__}: {exc}")
            n += 1
        st.release_lease(agent, token)


def verifier(endpoint: str, stop: threading.Event, rec: Recorder, cache: str) -> None:
    from store.service.client import RemoteStore

    with RemoteStore.connect(endpoint, cache_dir=cache) as st:
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                problems = st.verify()
                rec.ok("verify", time.perf_counter() - t0)
                if problems:
                    rec.fail("verify", f"problems: {problems[:3]}")
            except Exception as exc:  # noqa: BLE001
                rec.fail("verify", f"{type(exc).__name__}: {exc}")


def take_leases(endpoint: str, agents: int, tag: str, cache: str) -> list[tuple[str, str]]:
    from store.service.client import RemoteStore

    with RemoteStore.connect(endpoint, cache_dir=cache) as st:
        return [(f"sim-{tag}-{i}", _lease(st, f"sim-{tag}-{i}", f"simtask-{tag}-{i}"))
                for i in range(agents)]


def percentiles(values: list[float]) -> dict:
    if not values:
        return {"p50": None, "p99": None, "n": 0}
    arr = np.asarray(values) * 1000.0
    return {"p50": round(float(np.percentile(arr, 50)), 3),
            "p99": round(float(np.percentile(arr, 99)), 3), "n": int(arr.size)}


def run_phase(store: str, workdir: str, read_workers: int, with_verify: bool, args: Any,
              tag: str) -> dict:
    log = os.path.join(workdir, f"service-{tag}.log")
    proc, endpoint = start_service(store, read_workers, log, args.check_in_process)
    rec = Recorder()
    stop = threading.Event()
    try:
        tokens = take_leases(endpoint, args.agents, tag, os.path.join(workdir, "cache-lease"))
        threads = [threading.Thread(target=publisher, args=(
            endpoint, args.publish_every, args.components, int(args.component_mb * 2**20), stop,
            rec, tag, os.path.join(workdir, f"cache-pub-{tag}")), daemon=True)]
        if with_verify:
            threads.append(threading.Thread(target=verifier, args=(
                endpoint, stop, rec, os.path.join(workdir, "cache-verify")), daemon=True))
        cpu0, t0 = cpu_seconds(proc.pid), time.monotonic()
        for t in threads:
            t.start()
        answered = drive(endpoint, args.agents, args.seconds, args.refresh, args.load, rec,
                         tokens)
        stop.set()
        for t in threads:
            t.join(60)
        elapsed = time.monotonic() - t0
        cpu = cpu_seconds(proc.pid) - cpu0
    finally:
        stop.set()
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    answered += sum(len(rec.latency[k]) for k in ("publish", "verify"))
    return {"read_workers": read_workers, "with_verify": with_verify,
            "seconds": round(elapsed, 2), "requests": answered,
            "requests_per_second": round(answered / elapsed, 1),
            "failed_requests": sum(rec.failed.values()),
            "failed_by_kind": dict(rec.failed), "errors": rec.errors,
            "service_cpu_seconds": round(cpu, 2),
            "latency_ms": {k: percentiles(v) for k, v in sorted(rec.latency.items()) if v},
            "raw": {k: list(v) for k, v in rec.latency.items() if v}}


def pooled(runs: list[dict]) -> dict:
    """One configuration's repeats as one phase: latencies pooled (a p99 of all samples, steadier
    than any one run's), counts and seconds summed; each run's heartbeat p99 kept beside."""
    raw: dict[str, list[float]] = {}
    for r in runs:
        for k, v in r["raw"].items():
            raw.setdefault(k, []).extend(v)
    seconds = sum(r["seconds"] for r in runs)
    requests = sum(r["requests"] for r in runs)
    return {"read_workers": runs[0]["read_workers"], "with_verify": runs[0]["with_verify"],
            "repeats": len(runs), "seconds": round(seconds, 2), "requests": requests,
            "requests_per_second": round(requests / seconds, 1),
            "failed_requests": sum(r["failed_requests"] for r in runs),
            "errors": [e for r in runs for e in r["errors"]],
            "service_cpu_seconds": round(sum(r["service_cpu_seconds"] for r in runs), 2),
            "heartbeat_p99_ms_per_run": [r["latency_ms"].get("heartbeat", {}).get("p99")
                                         for r in runs],
            "latency_ms": {k: percentiles(v) for k, v in sorted(raw.items())}}


def summary(plain: dict, verify: dict) -> dict:
    hb = plain["latency_ms"].get("heartbeat", {}).get("p99")
    hbv = verify["latency_ms"].get("heartbeat", {}).get("p99")
    ratio = round(hbv / hb, 2) if hb and hbv else None
    return {"failed_requests": plain["failed_requests"],
            "failed_requests_with_verify": verify["failed_requests"],
            "latency_ms": plain["latency_ms"], "latency_ms_with_verify": verify["latency_ms"],
            "requests_per_second": plain["requests_per_second"],
            "requests_per_second_with_verify": verify["requests_per_second"],
            "service_cpu_seconds": plain["service_cpu_seconds"],
            "service_cpu_seconds_with_verify": verify["service_cpu_seconds"],
            "heartbeat_p99_ms": hb, "heartbeat_p99_ms_with_verify": hbv,
            "verify_ratio": ratio,
            "verifies_completed": verify["latency_ms"].get("verify", {}).get("n", 0),
            "heartbeat_p99_ms_per_run": plain["heartbeat_p99_ms_per_run"],
            "heartbeat_p99_ms_with_verify_per_run": verify["heartbeat_p99_ms_per_run"],
            "errors": plain["errors"] + verify["errors"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="service_load.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--agents", type=int, default=128)
    p.add_argument("--seconds", type=float, default=15.0, help="each phase (default 15; four "
                   "phases with the baseline, two without)")
    p.add_argument("--read-workers", type=int, default=4)
    p.add_argument("--no-baseline", action="store_true",
                   help="skip the single-threaded service (--read-workers 0)")
    p.add_argument("--models", type=int, default=4)
    p.add_argument("--components", type=int, default=8)
    p.add_argument("--component-mb", type=float, default=1.0)
    p.add_argument("--refresh", type=float, default=10.0, help="view refresh period per agent (s)")
    p.add_argument("--load", type=float, default=20.0, help="component load period per agent (s)")
    p.add_argument("--publish-every", type=float, default=2.0)
    p.add_argument("--repeats", type=int, default=3,
                   help="runs of every phase, interleaved; latencies are pooled (default 3)")
    p.add_argument("--check-in-process", action="store_true",
                   help="run verify inside the service's process (the default is a low-priority "
                        "child process, store/check_child.py), for comparison")
    p.add_argument("--dir", default=None, help="work folder (default: a temporary one)")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    for name in ("agents", "models", "components", "repeats"):
        if getattr(args, name) < 1:
            print(f"service_load.py: --{name} must be at least 1", file=sys.stderr)
            return 2
    if not 1 <= args.read_workers <= 64 or args.seconds <= 0 or args.component_mb <= 0 \
            or min(args.refresh, args.load, args.publish_every) <= 0:
        print("service_load.py: --read-workers is 1..64; --seconds, --component-mb, --refresh, "
              "--load and --publish-every must be positive", file=sys.stderr)
        return 2
    workdir = args.dir or tempfile.mkdtemp(prefix="service-load-")
    os.makedirs(workdir, exist_ok=True)
    store = os.path.join(workdir, "store")
    os.environ.setdefault("MUNET_BLOB_CACHE_MB", "256")
    t0 = time.monotonic()
    try:
        blob_bytes = build_store(store, args.models, args.components, args.component_mb)
        print(f"store: {args.models} models x {args.components} components of "
              f"{args.component_mb} MB ({blob_bytes / 2**20:.0f} MB of blobs)", flush=True)
        runs: dict[str, list[dict]] = {}
        configs = [("lanes", args.read_workers)]
        if not args.no_baseline:
            configs.append(("single", 0))
        for r in range(args.repeats):  # repeats interleaved: slow drift hits every configuration
            for name, workers in configs:
                for with_verify in (False, True):
                    tag = f"{name}{'-verify' if with_verify else ''}"
                    ph = run_phase(store, workdir, workers, with_verify, args, f"{tag}-{r}")
                    runs.setdefault(tag, []).append(ph)
                    hb = ph["latency_ms"].get("heartbeat", {})
                    print(f"{tag:>14} run {r + 1}: {ph['requests_per_second']:7.1f} req/s, heartbeat "
                          f"p50 {hb.get('p50')} ms p99 {hb.get('p99')} ms, failed "
                          f"{ph['failed_requests']}, service CPU {ph['service_cpu_seconds']} s",
                          flush=True)
        phases = {tag: pooled(rs) for tag, rs in runs.items()}
    finally:
        if not args.dir:
            shutil.rmtree(workdir, ignore_errors=True)
    lanes = summary(phases["lanes"], phases["lanes-verify"])
    result: dict[str, Any] = {
        "agents": args.agents, "seconds_per_phase": args.seconds, "repeats": args.repeats,
        "read_workers": args.read_workers, "verify_in": "service" if args.check_in_process else "child",
        "store": {"models": args.models, "components": args.components,
                  "component_mb": args.component_mb, "blob_mb": round(blob_bytes / 2**20, 1)},
        "mix": {"heartbeat_every_s": HEARTBEAT_SECONDS, "last_event_seq_every_s": 2.0,
                "view_refresh_every_s": args.refresh, "component_load_every_s": args.load,
                "publish_every_s": args.publish_every},
        **{k: v for k, v in lanes.items() if k != "errors"},
        "targets": {
            "no_failed_requests": lanes["failed_requests"] == 0
            and lanes["failed_requests_with_verify"] == 0,
            "heartbeat_p99_ms<=50": lanes["heartbeat_p99_ms"] is not None
            and lanes["heartbeat_p99_ms"] <= TARGET_HEARTBEAT_P99_MS
            and (lanes["heartbeat_p99_ms_with_verify"] or 1e9) <= TARGET_HEARTBEAT_P99_MS,
            "verify_ratio<=2": lanes["verify_ratio"] is not None
            and lanes["verify_ratio"] <= TARGET_VERIFY_RATIO},
        "errors": lanes["errors"],
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                    "python": platform.python_version(), "pyzmq": zmq.__version__,
                    "libzmq": zmq.zmq_version()},
        "total_seconds": round(time.monotonic() - t0, 1),
    }
    if "single" in phases:
        base = summary(phases["single"], phases["single-verify"])
        result["baseline_single_thread"] = base
        hbv, bhbv = lanes["heartbeat_p99_ms_with_verify"], base["heartbeat_p99_ms_with_verify"]
        result["before_after"] = {
            "heartbeat_p99_ms_with_verify": {"before": bhbv, "after": hbv,
                                             "ratio": round(bhbv / hbv, 2) if hbv and bhbv
                                             else None},
            "heartbeat_p99_ms": {"before": base["heartbeat_p99_ms"],
                                 "after": lanes["heartbeat_p99_ms"]},
            "requests_per_second_with_verify": {
                "before": base["requests_per_second_with_verify"],
                "after": lanes["requests_per_second_with_verify"]}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}: targets {result['targets']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
