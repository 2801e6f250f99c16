#!/usr/bin/env python3
"""Start one more agent for a task on an existing store, while a swarm runs or none does.

The agent takes its task's lease (refused, exit 2, while another live agent holds it), announces itself
to the running agents, and draws its first parents from what the others have published: a new task
starts from the system's knowledge. Re-attaching a task whose agent died resumes it from the store.

  python launch/attach.py --store swarm-store --task glyphs_arabic
  python launch/attach.py --store swarm-store --task mydigits=npz:/data/mydigits.npz
  python launch/attach.py --store swarm-store --task mydigits --cycles 4   # again: the store knows its data
  python launch/attach.py --store swarm-store --task mnist5k --preset demo+penalty --cycles 6
  python launch/attach.py --store tcp://10.0.0.5:5710 --keys keys/ --task uci_digits --bind-host 10.0.0.7
  python launch/attach.py --store swarm-store --task glyphs_greek --kind multipath --cycles 1

--kind multipath starts the task's second agent (µ4Net) beside its single-path one: it joins the task's
current single-path model with one or two other tasks' frozen models through a per-sample router and
connectors, and trains only those. It needs the task's single-path model to exist. The task is then
served by whichever of its two agents' models scores best (query.py leaderboard shows the kind).
"""
from __future__ import annotations

import argparse
import sys

from launch.common import (OneLineParser, UserError, add_prefix_cache_flag, add_restart_flags,
                           add_store_flags, agent_exit_code, check_agent_flags, check_devices,
                           check_lease_ttl, check_prefix_cache_flag, parse_devices, run_main)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="attach.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_store_flags(p, required=True, help="existing store directory (made by run_swarm.py), or a "
                                           "store service at tcp://HOST:PORT")
    p.add_argument("--bind-host", default="127.0.0.1", metavar="HOST|auto",
                   help="interface the agent's announcement socket binds (default 127.0.0.1; give "
                        "this host's address when the other agents run elsewhere, or auto: the "
                        "address that routes to the store's host)")
    p.add_argument("--task", required=True,
                   help="task: a built-in (mnist5k, uci_digits, fashion_mnist, animal_mnist, "
                        "glyphs_<script>), NAME=npz:PATH or NAME=folder:PATH (your data under a name "
                        "of yours: move the file and it resumes), or unnamed npz:PATH / folder:PATH")
    p.add_argument("--kind", default="single", choices=("single", "multipath"),
                   help="agent kind: single (grows the task's ViT) or multipath (borrows other "
                        "tasks' frozen models; needs the task's single-path model) (default single)")
    p.add_argument("--device", default="cpu",
                   help="cpu, cuda, cuda:N, or auto: the GPU a scheduler left visible, else cpu "
                        "(default cpu)")
    p.add_argument("--preset", default="demo",
                   help="BUDGET[@base][+ext...], e.g. demo, demo+penalty, test (default demo)")
    p.add_argument("--cycles", type=int, default=None, help="cycles to reach (default: the preset's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    add_prefix_cache_flag(p)
    p.add_argument("--lease-ttl", type=float, default=15.0,
                   help="seconds without heartbeat after which another agent may take over (1 to "
                        "3600; a holder killed on this host is taken over at once)")
    add_restart_flags(p)
    return p


def main() -> int:
    args = build_parser().parse_args()
    if args.cycles is not None and args.cycles < 0:
        raise UserError("--cycles must be >= 0")
    check_prefix_cache_flag(args)
    if args.device != "auto":
        check_devices(parse_devices(args.device))
    if args.wait_lease < 0:
        raise UserError("--wait-lease must be >= 0")
    check_lease_ttl(args.lease_ttl)
    check_agent_flags(args)
    from store import open_store

    store = open_store(args.store, readonly=True, keys=args.keys)  # NotAStore -> exit 2
    try:
        from agents.agent import AgentOptions, agent_id_for, run_agent
        from agents.config import resolve_preset
        from taskdata import check_same_task, parse_task_spec

        target = args.cycles if args.cycles is not None else resolve_preset(args.preset).budget.cycles
        task = parse_task_spec(args.task)[0]  # NAME=npz:PATH: the name is the task (bad name: exit 2)
        aid = agent_id_for(task, args.kind)
        state = store.get_agent_state(aid)
        check_same_task(state.task if state else None, args.task, aid)  # two paths, one id: say so
        args.task = _recorded_spec(args.task, task, state)
        held = any(a.agent_id == aid for a in store.live_agents())  # by the store's clock
        if args.kind == "multipath" and task not in store.published_models(kind="single"):
            raise UserError(f"task {task!r} has no single-path model in {args.store} yet: a "
                            f"multipath agent builds on it (attach the task without --kind first)")
    finally:
        store.close()
    if state is not None and state.cycle >= target and not held:  # a held lease is refused below
        # Nothing to do is still an answer: say it, and how to get more.
        print(f"attach.py: task {task} is already at cycle {state.cycle} of {target}; nothing "
              f"to do (raise --cycles above {state.cycle} to continue it)", file=sys.stderr)
        return 0

    opts = AgentOptions(store=args.store, task=args.task, preset=args.preset, device=args.device,
                        cycles=args.cycles, seed=args.seed, threads=args.threads,
                        lease_ttl=args.lease_ttl, keys=args.keys, bind_host=args.bind_host,
                        cache_mb=args.prefix_cache_mb, kind=args.kind, wait_lease=args.wait_lease)
    return agent_exit_code(run_agent(opts, verbose=True))


def _recorded_spec(spec: str, task: str, state) -> str:
    """A named task given by its name alone (``--task mydigits``) takes its data from where the
    store's record says it was last read (``mydigits=folder:PATH``); anything else is as given."""
    from taskdata import known_task_names

    recorded = (state.source or {}).get("spec") if state is not None else None
    if spec != task or "=" in spec or task in known_task_names() or not recorded or recorded == task:
        return spec
    print(f"attach.py: task {task}: its data from the store's record, {recorded}", file=sys.stderr)
    return f"{task}={recorded}"


if __name__ == "__main__":
    run_main(main, "attach.py")
