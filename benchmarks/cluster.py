#!/usr/bin/env python3
"""Cluster launchers, measured on this machine: ``--launcher ray`` against ``--launcher local`` on the
same tasks, and how long a swarm takes to train again after a Ray node is lost.

1. Throughput: the same swarm (tasks, preset, cycles, one core per agent) runs under both launchers,
   alternating, ``--repeats`` times each, in fresh stores. Children per minute come from the trials
   (``common.swarm_throughput``: no start-up, no data loading). Ray runs on a one-node Ray cluster
   started here with this machine's cores, so its daemons' CPU is part of what is measured.
2. Node loss: a Ray cluster of a CPU-less head and node A runs one agent (on A, the only place it
   fits); node B joins; A is killed without warning (``remove_node(..., allow_graceful=False)``:
   its raylet and the agent's process die as in a power cut). Ray notices by missed health checks,
   restarts the actor on B, and the new agent waits for A's lease to run out, then resumes. Reported:
   seconds from the kill to the new agent holding the lease and running (training again), to its
   first committed child, and the agent's own start-up time for reference.

  python benchmarks/cluster.py                      # both parts, results/cluster.json
  python benchmarks/cluster.py --part node-loss --lease-ttl 10

Ray's processes are started and stopped by handle (``ray.cluster_utils.Cluster``), never with
``ray stop``, which would end every Ray process of this host.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

from benchmarks.common import (REPO, RESULTS_DIR, BenchmarkError, log, machine_info, run_swarm,
                               swarm_throughput, write_json)

TASKS = ("uci_digits", "glyphs_greek")
NODE_ARGS = dict(object_store_memory=80 * 2**20)


@contextlib.contextmanager
def ray_cluster(head_cpus: float = 0, **head_args) -> Iterator:
    """A Ray cluster on this host (``Cluster``: one head, ``add_node`` for more), in a short temp
    folder (AF_UNIX paths are limited to 107 bytes), token auth off (loopback only), stopped by
    handle on exit. Launchers join it with ``--ray-address cluster.address``."""
    from ray.cluster_utils import Cluster

    temp = tempfile.mkdtemp(prefix="mr", dir="/tmp")
    saved = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"  # children (the launcher) inherit it
    cluster = None
    try:
        cluster = Cluster(initialize_head=True, connect=False,
                          head_node_args=dict(num_cpus=head_cpus, include_dashboard=False,
                                              temp_dir=temp, **NODE_ARGS, **head_args))
        yield cluster
    finally:
        if cluster is not None:
            cluster.shutdown()
        if saved is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = saved
        shutil.rmtree(temp, ignore_errors=True)


def launcher_env() -> dict:
    return dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", RAY_AUTH_MODE="disabled")


def start_launcher(store: str, tasks, *args: str, log_path: str) -> subprocess.Popen:
    cmd = [sys.executable, str(REPO / "launch" / "run_swarm.py"), "--store", store,
           "--tasks", ",".join(tasks), "--refresh", "0.5", *args]
    return subprocess.Popen(cmd, cwd=str(REPO), env=launcher_env(), stdout=open(log_path, "w"),
                            stderr=subprocess.STDOUT)


def agent_record(store: str, agent_id: str):
    from store import NotAStore, Store

    try:
        with Store.open(store, readonly=True) as st:
            return st.get_agent(agent_id), len(st.trials(agent=agent_id))
    except NotAStore:
        return None, 0


def wait(cond, timeout: float, what: str, every: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(every)
    raise BenchmarkError(f"timed out after {timeout:.0f}s waiting for {what}")


# ---- 1. throughput -----------------------------------------------------------------------------

def throughput(work: Path, *, cycles: int, repeats: int, preset: str) -> dict:
    runs: dict[str, list[dict]] = {"local": [], "ray": []}
    with ray_cluster(head_cpus=len(TASKS)) as cluster:
        for r in range(repeats):
            for launcher in ("local", "ray"):
                store = str(work / f"{launcher}-{r}")
                shutil.rmtree(store, ignore_errors=True)
                extra = (["--threads", "1"] if launcher == "local" else
                         ["--launcher", "ray", "--ray-address", cluster.address,
                          "--cpus-per-agent", "1"])
                run = run_swarm(store, list(TASKS), preset, cycles=cycles, prefix="cluster",
                                timeout=900, extra_args=extra)
                t = swarm_throughput(store, list(TASKS))
                runs[launcher].append({"children_per_min": t["children_per_min"],
                                       "children": t["children"], "wall_seconds": run.wall_seconds,
                                       "overlap": t["overlap"]})
                log("cluster", f"{launcher} run {r + 1}: {t['children_per_min']:.1f} children/min "
                               f"({t['children']} children, launcher wall {run.wall_seconds:.0f}s)")
    mean = {k: sum(x["children_per_min"] for x in v) / len(v) for k, v in runs.items()}
    return {"runs": runs, "children_per_min": mean,
            "ray_vs_local_children_per_min": mean["ray"] / mean["local"]}


# ---- 2. node loss ------------------------------------------------------------------------------

def node_loss(work: Path, *, lease_ttl: float, cycles: int, preset: str,
              task: str = "uci_digits") -> dict:
    """Kill the node an agent runs on; time until its restarted agent trains again elsewhere."""
    from agents.agent import agent_id_for
    from store import Store

    aid = agent_id_for(task)
    store = str(work / "node-loss")
    shutil.rmtree(store, ignore_errors=True)
    out = str(work / "node-loss.launcher.log")
    with ray_cluster(head_cpus=0) as cluster:
        node_a = cluster.add_node(num_cpus=1, **NODE_ARGS)
        started = time.monotonic()
        proc = start_launcher(store, [task], "--launcher", "ray", "--ray-address", cluster.address,
                              "--preset", preset, "--cycles", str(cycles),
                              "--lease-ttl", str(lease_ttl), log_path=out)
        try:
            first, _ = wait(lambda: (r := agent_record(store, aid))[0] and r[0].state == "running"
                            and r, 300, "the agent to start on node A")
            startup = time.monotonic() - started
            wait(lambda: agent_record(store, aid)[1] >= 1, 300, "the agent's first child on node A")
            cluster.add_node(num_cpus=1, **NODE_ARGS)
            time.sleep(1.0)  # node B registered
            killed = time.monotonic()
            cluster.remove_node(node_a, allow_graceful=False)
            _, trials_at_kill = agent_record(store, aid)
            again, _ = wait(lambda: (r := agent_record(store, aid))[0] and r[0].pid != first.pid
                            and r[0].state == "running" and r, 600, "the agent to run again")
            recovered = time.monotonic() - killed
            wait(lambda: agent_record(store, aid)[1] > trials_at_kill, 600,
                 "the restarted agent's first child")
            first_child = time.monotonic() - killed
            code = proc.wait(900)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    if code != 0:
        raise BenchmarkError(f"the node-loss swarm exited {code}; see {out}")
    with Store.open(store, readonly=True) as st:
        problems = st.verify()
        state = st.get_agent_state(aid)
        final = st.get_agent(aid)
    return {"node_loss_recovery_seconds": recovered, "node_loss_first_child_seconds": first_child,
            "agent_startup_seconds": startup, "lease_ttl_seconds": lease_ttl,
            "target_seconds": 2 * lease_ttl + startup,
            "moved": {"before": {"pid": first.pid, "endpoint": first.endpoint},
                      "after": {"pid": again.pid, "endpoint": again.endpoint}},
            "finished": final.state == "finished" and state.cycle == cycles,
            "verify_problems": problems, "launcher_log": out}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=("all", "throughput", "node-loss"), default="all")
    p.add_argument("--work", default=None, help="scratch folder (default: a temp folder)")
    p.add_argument("--preset", default="test")
    p.add_argument("--cycles", type=int, default=6, help="cycles per agent in the throughput runs")
    p.add_argument("--repeats", type=int, default=2, help="runs per launcher, alternating")
    p.add_argument("--lease-ttl", type=float, default=15.0)
    p.add_argument("--out", default=str(RESULTS_DIR / "cluster.json"))
    a = p.parse_args(argv)
    work = Path(a.work or tempfile.mkdtemp(prefix="munet-cluster-"))
    work.mkdir(parents=True, exist_ok=True)
    result: dict = {"machine": machine_info(), "tasks": list(TASKS), "preset": a.preset,
                    "command": " ".join(["python benchmarks/cluster.py", *(argv or sys.argv[1:])])}
    if a.part in ("all", "throughput"):
        t = throughput(work, cycles=a.cycles, repeats=a.repeats, preset=a.preset)
        result.update(ray_vs_local_children_per_min=t["ray_vs_local_children_per_min"], throughput=t)
    if a.part in ("all", "node-loss"):
        n = node_loss(work, lease_ttl=a.lease_ttl, cycles=max(a.cycles, 6), preset=a.preset)
        result.update(node_loss_recovery_seconds=n["node_loss_recovery_seconds"],
                      lease_ttl_seconds=n["lease_ttl_seconds"], node_loss=n)
        log("cluster", f"node loss: training again after {n['node_loss_recovery_seconds']:.1f}s "
                       f"(target {n['target_seconds']:.1f}s = 2 x TTL + start-up)")
    targets = {}
    if "ray_vs_local_children_per_min" in result:
        targets["ray_vs_local_ge_0.95"] = result["ray_vs_local_children_per_min"] >= 0.95
    if "node_loss" in result:
        targets["recovery_le_2ttl_plus_startup"] = (result["node_loss_recovery_seconds"]
                                                    <= result["node_loss"]["target_seconds"])
    result["targets"] = targets
    write_json(Path(a.out), result)
    log("cluster", f"wrote {a.out}: {targets}")
    return 0


if __name__ == "__main__":
    from launch.common import run_main

    run_main(main, "cluster.py", user_errors=(BenchmarkError,))
