#!/usr/bin/env python3
"""Launch a swarm: one agent process per task growing one shared multitask ViT.

With no arguments it runs the built-in offline benchmark (mccb-offline, eight tasks) with the `demo`
preset on this machine in minutes, shows live progress, and ends with the leaderboard. Re-running the
same command resumes from the store; Ctrl-C stops every agent cleanly (nothing published is lost).
The launcher is only a launcher: agents keep working if it dies, and more can be attached at any time
with launch/attach.py. A new store grows from the preset's default root: for demo, cpu and vit-t3 the
offline pretrained root glyphs_cjk, built on first use (about 5 minutes on 2 cores, then cached;
launch/make_root.py builds it ahead); --root random for a random initialisation.

  python launch/run_swarm.py
  python launch/run_swarm.py --store runs/s1 --tasks mnist5k,uci_digits --preset test --cycles 2
  python launch/run_swarm.py --devices cuda:0,cuda:1 --preset vit-t3
  python launch/run_swarm.py --store tcp://10.0.0.5:5710 --keys keys/ --tasks mnist5k --bind-host 10.0.0.7
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import signal
import sys
import time

from launch.common import (UserError, add_prefix_cache_flag, add_store_flags, agent_process_main,
                           check_devices, check_prefix_cache_flag, parse_devices, run_main)

DEFAULT_STORE = "swarm-store"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="run_swarm.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_store_flags(p, default=DEFAULT_STORE,
                    help=f"store directory (default {DEFAULT_STORE}), or a store service at "
                         f"tcp://HOST:PORT (launch/serve_store.py)")
    p.add_argument("--logs", default=None, metavar="DIR",
                   help="agent log folder (default STORE/logs, or swarm-logs for a store service)")
    p.add_argument("--bind-host", default="127.0.0.1", metavar="HOST",
                   help="interface the agents' announcement sockets bind (default 127.0.0.1; give "
                        "this host's address when agents on other hosts share the store)")
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
    p.add_argument("--devices", default="cpu",
                   help="cpu or cuda:0,cuda:1,...; assigned to agents round-robin (default cpu)")
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
    p.add_argument("--refresh", type=float, default=1.0, help="progress refresh period in seconds")
    p.add_argument("--print-config", action="store_true", help="print the resolved preset and exit")
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
                            wait_for_model=kind == "multipath")
        log = os.path.join(args.logs, agent_id_for(task, kind) + ".log")
        proc = ctx.Process(target=agent_process_main, args=(opts, log), name=f"{kind}-{task}")
        proc.start()
        procs[(task, kind)] = proc
    return procs


def _check_sources(args, agents: list[tuple[str, str]]) -> None:
    """A task (NAME=npz:PATH) already grown on other data is refused (TaskDataError: exit 2)."""
    from agents.agent import agent_id_for
    from store import NotAStore, is_remote, open_store
    from taskdata import check_source, load_task, parse_task_spec

    if not is_remote(args.store) and not os.path.isdir(args.store):
        return
    try:
        store = open_store(args.store, readonly=True, keys=args.keys)
    except NotAStore:
        return
    try:
        for spec, kind in agents:
            state = store.get_agent_state(agent_id_for(parse_task_spec(spec)[0], kind))
            if state is not None and state.source.get("fingerprint"):
                check_source(state.source, spec, load_task(spec).fingerprint())
    finally:
        store.close()


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


def main() -> int:
    # Ctrl-C stops the swarm cleanly even when this process inherited SIGINT as ignored (a shell starts
    # background jobs that way): the agents install their own handler, the launcher needs Python's.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    args = build_parser().parse_args()
    from store import is_remote, open_store

    remote = is_remote(args.store)
    args.logs = args.logs or ("swarm-logs" if remote else os.path.join(args.store, "logs"))
    devices = parse_devices(args.devices)
    if args.cycles is not None and args.cycles < 0:
        raise UserError("--cycles must be >= 0")
    check_prefix_cache_flag(args)
    from agents.config import format_preset, resolve_preset

    preset = resolve_preset(args.preset, root=args.root)
    if args.print_config:
        print(format_preset(preset))
        return 0
    check_devices(devices)
    tasks = resolve_tasks(args)
    kinds = resolve_kinds(args)
    agents = [(t, k) for t in tasks for k in kinds]  # (spec, kind)
    from taskdata import parse_task_spec

    names = [parse_task_spec(t)[0] for t in tasks]
    from agents.agent import agent_id_for
    from agents.bootstrap import ensure_root
    from taskdata import fetch_all
    from agents.vit import preset_vit
    from launch.progress import ProgressView

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
                raise UserError(f"task {t} already has a live {k} agent (pid {a.pid} on {a.host}); "
                                f"stop it or leave {t} out")
        if "single" not in kinds:  # multipath agents alone build on models that must exist
            singles = store.published_models(kind="single")
            missing = [t for t in names if t not in singles]
            if missing:
                raise UserError(f"--kinds multipath: {', '.join(missing)} ha{'s' if len(missing) == 1 else 've'} "
                                f"no single-path model yet; use --kinds single,multipath")
    finally:
        store.close()
    print(f"swarm: {len(agents)} agents, preset {preset.name} [{preset.hash}], store {args.store}, "
          f"devices {','.join(devices)}; logs in {args.logs}", flush=True)
    procs = spawn_agents(args, agents, devices)
    view = ProgressView(args.store, [(parse_task_spec(t)[0], k) for t, k in agents], sys.stdout,
                        keys=args.keys)
    interrupted = False
    try:
        while any(p.is_alive() for p in procs.values()):
            view.update(procs)
            time.sleep(args.refresh)
    except KeyboardInterrupt:
        interrupted = True  # the agents got the same SIGINT: they finish or abandon their child
        print("\nswarm: stopping agents (Ctrl-C again to force)...", flush=True)
        try:
            for p in procs.values():
                p.join()
        except KeyboardInterrupt:
            for p in procs.values():
                p.terminate()
    for p in procs.values():
        p.join()
    view.update(procs, final=True)
    view.close()
    from launch.query import main as query_main

    print()
    query_main(["--store", args.store, *(["--keys", args.keys] if args.keys else []), "leaderboard"])
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
