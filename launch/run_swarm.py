#!/usr/bin/env python3
"""Launch a swarm: one agent process per task growing one shared multitask ViT.

With no arguments it runs the built-in offline benchmark (mccb-offline, eight tasks) with the `demo`
preset on this machine in minutes, shows live progress, and ends with the leaderboard. Re-running the
same command resumes from the store; Ctrl-C stops every agent cleanly (nothing published is lost).
The launcher is only a launcher: agents keep working if it dies, and more can be attached at any time
with launch/attach.py. A new store grows from the preset's default root: for demo, cpu and vit-t3 the
offline pretrained root glyphs_cjk, shipped with the repository (launch/make_root.py --rebuild trains
it anew); --root random for a random initialisation.

  python launch/run_swarm.py
  python launch/run_swarm.py --store runs/s1 --tasks mnist5k,uci_digits --preset test --cycles 2
  python launch/run_swarm.py --devices cuda:0,cuda:1 --preset vit-t3
  python launch/run_swarm.py --store tcp://10.0.0.5:5710 --keys keys/ --tasks mnist5k --bind-host 10.0.0.7

On a cluster (docs/cluster.md): --launcher ray places one Ray actor per agent (run it on a node of the
Ray cluster, or through `ray job submit`); --launcher slurm submits a Slurm job array through submitit.
Both restart agents that crash or lose their node, and each agent fetches its data on its node:

  python launch/run_swarm.py --launcher ray --store tcp://storehost:5710 --keys /shared/keys \
      --gpus-per-agent 1 --cpus-per-agent 2 --logs /shared/munet-logs
  python launch/run_swarm.py --launcher slurm --slurm-partition gpu --store tcp://storehost:5710 \
      --keys ~/keys --gpus-per-agent 1 --cpus-per-agent 2 --logs ~/munet-logs
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import signal
import sys
import time

from launch.common import (OneLineParser, UserError, add_prefix_cache_flag, add_store_flags,
                           agent_process_main, check_agent_flags, check_devices, check_lease_ttl,
                           check_prefix_cache_flag, parse_devices, run_main)
from launch.engines import LAUNCHERS

DEFAULT_STORE = "swarm-store"


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="run_swarm.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_store_flags(p, default=DEFAULT_STORE,
                    help=f"store directory (default {DEFAULT_STORE}), or a store service at "
                         f"tcp://HOST:PORT (launch/serve_store.py)")
    p.add_argument("--logs", default=None, metavar="DIR",
                   help="agent log folder (default STORE/logs, or swarm-logs for a store service)")
    p.add_argument("--bind-host", default=None, metavar="HOST|auto",
                   help="interface the agents' announcement sockets bind (default 127.0.0.1 with "
                        "--launcher local; give this host's address when agents on other hosts share "
                        "the store. auto: the address that routes to the store's host, the default "
                        "with ray (the node's Ray address) and slurm)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--benchmark", default=None, help="built-in task set (default mccb-offline)")
    g.add_argument("--tasks", default=None,
                   help="comma-separated tasks: built-ins, glyphs_<script>, NAME=npz:PATH or "
                        "NAME=folder:PATH (your data under your name), npz:PATH, folder:PATH")
    p.add_argument("--preset", default="demo",
                   help="BUDGET[@base][+ext...]: budgets vit-t3, vit-b, vit-l, cpu, demo, test; extensions "
                        "autotune, adapters, layers, imagesize, continue, hurdle (these six are the default "
                        "method), penalty, clock, probe, guard, anneal, fullval (default demo)")
    p.add_argument("--kinds", default="single",
                   help="agent kinds per task, comma-separated: single (grows the task's ViT), "
                        "multipath (joins the task's model with other tasks' frozen models; starts "
                        "once the task's single-path model exists) (default single)")
    p.add_argument("--devices", default=None,
                   help="--launcher local: cpu or cuda:0,cuda:1,...; assigned to agents round-robin "
                        "(default cpu). Cluster launchers place GPUs themselves: --gpus-per-agent")
    p.add_argument("--cycles", type=int, default=None, help="cycles per agent (default: the preset's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--root", default=None,
                   help="where a new store's root comes from (ignored when the store has one): "
                        "glyphs_cjk (offline pretrained, built on first use; the default of the demo, "
                        "cpu and vit-t3 budgets), random (the test budget's default), a checkpoint file, "
                        "a root built with make_root.py --name NAME, or timm:MODEL_NAME")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per CPU agent (default: cores divided among CPU agents)")
    add_prefix_cache_flag(p)
    p.add_argument("--lease-ttl", type=float, default=15.0, metavar="S",
                   help="seconds without a heartbeat after which an agent's task may be taken over; "
                        "a restarted agent waits about twice this for its old lease; 1 to 3600 "
                        "(default 15)")
    p.add_argument("--refresh", type=float, default=1.0, help="progress refresh period in seconds")
    p.add_argument("--print-config", action="store_true", help="print the resolved preset and exit")
    c = p.add_argument_group("cluster launchers (docs/cluster.md)")
    c.add_argument("--launcher", default="local", choices=LAUNCHERS,
                   help="local: processes on this host (default); ray: one Ray actor per agent; "
                        "slurm: a Slurm job array through submitit")
    c.add_argument("--gpus-per-agent", type=float, default=0.0, metavar="N",
                   help="GPUs per agent (ray: may be fractional; slurm: whole). 0 runs agents on CPUs "
                        "(default 0)")
    c.add_argument("--cpus-per-agent", type=float, default=1.0, metavar="N",
                   help="CPU cores per agent; also its torch threads (default 1)")
    c.add_argument("--max-restarts", type=int, default=20, metavar="N",
                   help="restarts per agent after a crash, a lost node or an unreachable store "
                        "before the launcher gives it up (default 20)")
    c.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="Ray cluster to join: auto (the one this node belongs to; fails if none), "
                        "HOST:PORT, or local (start a private Ray on this machine). Default, as "
                        "ray.init(): RAY_ADDRESS if set, else the cluster this node runs, else a "
                        "private one on this machine")
    c.add_argument("--slurm-partition", default=None, metavar="NAME", help="Slurm partition")
    c.add_argument("--slurm-time", type=int, default=1440, metavar="MIN",
                   help="time limit per job in minutes; a job that reaches it is requeued and "
                        "resumes (default 1440)")
    c.add_argument("--slurm-signal-delay", type=int, default=90, metavar="S",
                   help="seconds before the time limit at which Slurm warns the job (default 90)")
    c.add_argument("--slurm-mem-gb", type=float, default=None, metavar="GB", help="memory per job")
    c.add_argument("--slurm-folder", default=None, metavar="DIR",
                   help="submitit's folder of job pickles and logs, on storage every node sees "
                        "(default LOGS/submitit)")
    c.add_argument("--slurm-executor", default="slurm", choices=("slurm", "local"),
                   help="slurm (sbatch), or local: the same jobs as processes of this host, with "
                        "timeouts and requeue, to try a set-up (default slurm)")
    return p


def resolve_tasks(args) -> list[str]:
    """Task specs (a built-in, NAME=npz:PATH, NAME=folder:PATH, npz:PATH, folder:PATH)."""
    from taskdata import benchmark_tasks, parse_task_spec

    if args.tasks:
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        if not tasks:
            raise UserError("--tasks is empty")
        names = [parse_task_spec(t)[0] for t in tasks]  # a bad name: one line, exit 2
        if len(set(names)) != len(names):
            raise UserError("--tasks names a task twice (one agent per task)")
        return tasks
    return list(benchmark_tasks(args.benchmark or "mccb-offline"))


def resolve_kinds(args) -> list[str]:
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    bad = [k for k in kinds if k not in ("single", "multipath")]
    if bad or not kinds or len(set(kinds)) != len(kinds):
        raise UserError(f"--kinds {args.kinds!r}: give single, multipath or single,multipath")
    return kinds


def spawn_agents(args, agents: list[tuple[str, str]], devices: list[str]
                 ) -> dict[tuple[str, str], mp.Process]:
    """One process per (task, kind); a multipath agent started with its single-path sibling waits
    for that agent's first model."""
    from agents.agent import AgentOptions, agent_id_for

    ctx = mp.get_context("spawn")  # never fork with an open LMDB env or zmq context
    n_cpu = sum(1 for i in range(len(agents)) if devices[i % len(devices)] == "cpu")
    threads = args.threads or max(1, (os.cpu_count() or 1) // max(1, n_cpu))
    procs = {}
    from taskdata import parse_task_spec

    for i, (spec, kind) in enumerate(agents):
        task = parse_task_spec(spec)[0]
        dev = devices[i % len(devices)]
        opts = AgentOptions(store=args.store, task=spec, preset=args.preset, device=dev,
                            cycles=args.cycles, seed=args.seed, root=args.root,
                            threads=threads if dev == "cpu" else None, keys=args.keys,
                            bind_host=args.bind_host, cache_mb=args.prefix_cache_mb, kind=kind,
                            wait_for_model=kind == "multipath", lease_ttl=args.lease_ttl)
        log = os.path.join(args.logs, agent_id_for(task, kind) + ".log")
        proc = ctx.Process(target=agent_process_main, args=(opts, log), name=f"{kind}-{task}")
        proc.start()
        procs[(task, kind)] = proc
    return procs


def _check_sources(args, agents: list[tuple[str, str]]) -> None:
    """A task (NAME=npz:PATH) already grown on other data is refused (TaskDataError: exit 2)."""
    from agents.agent import agent_id_for
    from store import NotAStore, is_remote, open_store
    from taskdata import check_same_task, check_source, load_task, parse_task_spec

    if not is_remote(args.store) and not os.path.isdir(args.store):
        return
    try:
        store = open_store(args.store, readonly=True, keys=args.keys)
    except NotAStore:
        return
    try:
        for spec, kind in agents:
            aid = agent_id_for(parse_task_spec(spec)[0], kind)
            state = store.get_agent_state(aid)
            if state is not None:
                check_same_task(state.task, spec, aid)
            if state is not None and state.source.get("fingerprint"):
                check_source(state.source, spec, load_task(spec).fingerprint())
    finally:
        store.close()


def _check_single_path_models(args, names: list[str]) -> None:
    """``--kinds multipath`` alone: every task needs a single-path model in the store already."""
    from store import NotAStore, is_remote, open_store
    from store.records import SINGLE

    singles: dict = {}
    if is_remote(args.store) or os.path.isdir(args.store):
        try:
            with open_store(args.store, readonly=True, keys=args.keys) as st:
                singles = st.published_models(kind=SINGLE)
        except NotAStore:
            singles = {}
    missing = [t for t in names if t not in singles]
    if missing:
        raise UserError(f"--kinds multipath: {', '.join(missing)} ha{'s' if len(missing) == 1 else 've'} "
                        f"no single-path model yet; use --kinds single,multipath")


def _has_root(spec: str, keys: str | None) -> bool:
    from store import NotAStore, is_remote, open_store

    if not is_remote(spec) and not os.path.isdir(spec):
        return False
    try:
        store = open_store(spec, readonly=True, keys=keys)
    except NotAStore:
        return False
    try:
        return store.root_model_id() is not None
    finally:
        store.close()


def check_launcher(args) -> None:
    """Flags that belong to one launcher are refused with another (one line, exit 2)."""
    cluster = args.launcher != "local"
    if cluster and args.devices is not None:
        raise UserError(f"--devices is the local launcher's flag; with --launcher {args.launcher} "
                        f"the engine places GPUs: use --gpus-per-agent")
    if args.gpus_per_agent < 0 or args.cpus_per_agent <= 0 or args.max_restarts < 0:
        raise UserError("--gpus-per-agent must be >= 0, --cpus-per-agent > 0, --max-restarts >= 0")
    if args.launcher == "slurm" and args.gpus_per_agent != int(args.gpus_per_agent):
        raise UserError("--launcher slurm takes whole --gpus-per-agent (Slurm binds whole GPUs)")
    if args.slurm_time < 1 or args.slurm_signal_delay < 0:
        raise UserError("--slurm-time must be >= 1 minute and --slurm-signal-delay >= 0")
    args.bind_host = args.bind_host or ("auto" if cluster else "127.0.0.1")
    if cluster and not args.store.startswith("tcp://"):
        # an engine's workers start elsewhere than this shell: a store directory must be absolute
        # (and on this host only: LMDB never on a network filesystem; docs/cluster.md)
        args.store = os.path.abspath(args.store)
    if cluster:
        import importlib.util

        module = {"ray": "ray", "slurm": "submitit"}[args.launcher]
        if importlib.util.find_spec(module) is None:
            raise UserError(f"--launcher {args.launcher} needs {module}: pip install "
                            f"'munet-swarm[{args.launcher}]' (pinned in constraints.txt)")


def start_agents(args, agents: list[tuple[str, str]], devices: list[str]) -> dict:
    """One running agent per (spec, kind), by the chosen launcher; returns handles keyed by
    (task, kind) that the progress loop polls (``launch.engines``)."""
    if args.launcher == "local":
        return spawn_agents(args, agents, devices)
    from agents.agent import AgentOptions, agent_id_for
    from taskdata import parse_task_spec

    placed = []
    for spec, kind in agents:
        task = parse_task_spec(spec)[0]
        opts = AgentOptions(store=args.store, task=spec, preset=args.preset, cycles=args.cycles,
                            seed=args.seed, root=args.root, keys=args.keys,
                            bind_host=None if args.bind_host == "auto" and args.launcher == "ray"
                            else args.bind_host,
                            cache_mb=args.prefix_cache_mb, kind=kind,
                            wait_for_model=kind == "multipath", lease_ttl=args.lease_ttl)
        placed.append((task, kind, opts, os.path.abspath(os.path.join(args.logs, agent_id_for(task, kind) + ".log"))))
    common = dict(gpus_per_agent=args.gpus_per_agent, cpus_per_agent=args.cpus_per_agent,
                  max_restarts=args.max_restarts)
    if args.launcher == "ray":
        from launch.engines import ray_engine

        return ray_engine.start(placed, address=args.ray_address, store=args.store, **common)
    from launch.engines import slurm_engine

    return slurm_engine.start(placed, folder=args.slurm_folder or os.path.join(args.logs, "submitit"),
                              executor=args.slurm_executor, partition=args.slurm_partition,
                              time_min=args.slurm_time, mem_gb=args.slurm_mem_gb,
                              signal_delay_s=args.slurm_signal_delay, **common)


def stop_engine(args) -> None:
    if args.launcher == "ray":
        from launch.engines import ray_engine

        ray_engine.shutdown()


def main() -> int:
    # Ctrl-C stops the swarm cleanly even when this process inherited SIGINT as ignored (a shell starts
    # background jobs that way): the agents install their own handler, the launcher needs Python's.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    args = build_parser().parse_args()
    from store import is_remote, open_store
    from store.records import SINGLE

    remote = is_remote(args.store)
    args.logs = args.logs or ("swarm-logs" if remote else os.path.join(args.store, "logs"))
    check_launcher(args)
    cluster = args.launcher != "local"
    devices = parse_devices(args.devices or "cpu")
    if args.cycles is not None and args.cycles < 0:
        raise UserError("--cycles must be >= 0")
    check_lease_ttl(args.lease_ttl)
    check_prefix_cache_flag(args)
    check_agent_flags(args)
    if not args.refresh > 0:
        raise UserError(f"--refresh must be a number of seconds > 0, got {args.refresh}")
    from agents.config import format_preset, resolve_preset

    preset = resolve_preset(args.preset, root=args.root)
    if args.print_config:
        print(format_preset(preset))
        return 0
    if not cluster:  # a cluster's login or head node may have no GPU: the engine places them
        check_devices(devices)
    tasks = resolve_tasks(args)
    kinds = resolve_kinds(args)
    agents = [(t, k) for t in tasks for k in kinds]  # (spec, kind)
    from taskdata import parse_task_spec

    names = [parse_task_spec(t)[0] for t in tasks]
    if "single" not in kinds:  # multipath agents alone build on models that must exist: checked
        _check_single_path_models(args, names)  # before data is fetched or a store is created
    from agents.agent import agent_id_for
    from agents.bootstrap import ensure_root
    from store.holders import holder_gone
    from taskdata import fetch_all
    from agents.vit import preset_vit

    vit = preset_vit(preset)
    source, needs_root = None, not _has_root(args.store, args.keys)
    from agents.pretrain import BUILTIN_ROOT
    from agents.root_source import resolve_root
    from agents.roots import root_from_timm_checkpoint

    if needs_root and preset.root != BUILTIN_ROOT:
        # A bad root must fail at once, before any data is fetched and before anything is created.
        source = resolve_root(preset.root, vit, preset.budget.image_size, build=False)
        if source.path is not None:
            root_from_timm_checkpoint(source.path, vit, preset.default_hparams(None))
    if not cluster:
        # On a cluster each agent fetches (and checks) its own task's data on its node.
        _check_sources(args, agents)  # other data under a task's name: one line, before anything else
        fetch_all(tasks)  # every task's data is there (or one clear line says what is missing)
    if needs_root and source is None:  # the built-in pretrained root: built here once, then cached
        source = resolve_root(preset.root, vit, preset.budget.image_size,
                              log=lambda m: print(m, flush=True))
    if not remote:
        os.makedirs(args.store, exist_ok=True)
    store = open_store(args.store, create=True, keys=args.keys)
    try:
        ensure_root(store, preset, vit, seed=args.seed, source=source)
        live = {a.agent_id: a for a in store.live_agents()}
        for spec, k in agents:
            t = parse_task_spec(spec)[0]
            if agent_id_for(t, k) in live:
                a = live[agent_id_for(t, k)]
                if holder_gone(a.host, a.pid, a.heartbeat_at, a.endpoint):  # killed on this host: resume at once
                    print(f"swarm: {t}'s previous {k} agent (pid {a.pid} on this host) is gone; its "
                          f"agent takes the lease over", flush=True)
                    continue
                if cluster:  # after a cluster restart: its new agent waits for the old lease
                    print(f"swarm: {t}'s previous {k} agent (pid {a.pid} on {a.host}) still holds its "
                          f"lease; the new one waits for it to run out", flush=True)
                    continue
                raise UserError(f"task {t} already has a live {k} agent (pid {a.pid} on {a.host}); "
                                f"stop it or leave {t} out")
        target = args.cycles if args.cycles is not None else preset.budget.cycles
        finished = [(spec, k) for spec, k in agents if _finished(store, agent_id_for(parse_task_spec(spec)[0], k),
                                                                 target)]
    finally:
        store.close()
    if finished:
        what = ", ".join(parse_task_spec(spec)[0] + ("" if k == SINGLE else f" [{k}]") for spec, k in finished)
        if len(finished) == len(agents):
            print(f"swarm: nothing to do: every agent in {args.store} has finished its {target} cycle(s) "
                  f"({what}); raise --cycles to grow them further", flush=True)
            from launch.query import main as query_main

            query_main(["--store", args.store, *(["--keys", args.keys] if args.keys else []), "leaderboard"])
            return 0
        print(f"swarm: already finished their {target} cycle(s), not started: {what}", flush=True)
        agents = [a for a in agents if a not in finished]
    where = (f"devices {','.join(devices)}" if not cluster else
             f"launcher {args.launcher}, {args.gpus_per_agent:g} GPU and {args.cpus_per_agent:g} CPU per agent")
    print(f"swarm: {len(agents)} agents, preset {preset.name} [{preset.hash}], store {args.store}, "
          f"{where}; logs in {args.logs}", flush=True)
    try:
        procs = start_agents(args, agents, devices)
        if cluster:
            for (t, k), h in procs.items():
                print(f"swarm: {k} agent for {t}: {h.where()}", flush=True)
        code = supervise(args, procs, [(parse_task_spec(t)[0], k) for t, k in agents])
    finally:
        stop_engine(args)
    return code


def _finished(store, agent_id: str, target: int) -> bool:
    """The agent's resumable state says it has run ``target`` cycles (its run would end at once)."""
    state = store.get_agent_state(agent_id)
    return state is not None and state.cycle >= target


def supervise(args, procs: dict, agents: list[tuple[str, str]]) -> int:
    """Show progress until every agent ended; Ctrl-C stops them (twice: kills them); then the
    leaderboard and the exit code (launch.common's, from the agents')."""
    from agents.agent import agent_id_for
    from launch.progress import ProgressView

    view = ProgressView(args.store, agents, sys.stdout, keys=args.keys)
    interrupted = False
    try:
        while any(p.is_alive() for p in procs.values()):
            view.update(procs)
            time.sleep(args.refresh)
    except KeyboardInterrupt:
        interrupted = True  # local agents got the same SIGINT; engine-run ones are asked to stop
        print("\nswarm: stopping agents (Ctrl-C again to force)...", flush=True)
        try:
            for p in procs.values():
                if hasattr(p, "stop"):
                    p.stop()
            while any(p.is_alive() for p in procs.values()):
                time.sleep(0.2)
        except KeyboardInterrupt:
            for p in procs.values():
                p.kill() if hasattr(p, "stop") else p.terminate()
    for p in procs.values():
        if hasattr(p, "join"):
            p.join()
    view.update(procs, final=True)
    view.close()
    from launch.query import main as query_main

    print()
    query_main(["--store", args.store, *(["--keys", args.keys] if args.keys else []), "leaderboard"])
    restarts = {a: p.restarts for a, p in procs.items() if getattr(p, "restarts", 0)}
    for (t, k), n in restarts.items():
        print(f"swarm: {k} agent for {t} was restarted {n} time(s)", file=sys.stderr)
    failed = {a: p.exitcode for a, p in procs.items() if p.exitcode not in (0, None)}
    if failed and not interrupted:
        for (t, k), code in failed.items():
            print(f"swarm: {k} agent for {t} exited with code {code}: see "
                  f"{os.path.join(args.logs, agent_id_for(t, k) + '.log')}", file=sys.stderr)
        return 2 if all(c == 2 for c in failed.values()) else 1
    if interrupted:
        print("swarm: stopped; run the same command again to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    run_main(main, "run_swarm.py")
