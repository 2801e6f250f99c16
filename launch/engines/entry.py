"""The agent as an engine runs it: in a process the engine started (a Ray actor, a Slurm job),
restartable, with the engine owning the signals.

Differences from a local agent (``launch.common.agent_process_main``):
- no signal handlers: Ray's workers and submitit's jobs handle SIGTERM/SIGUSR2 themselves (submitit
  requeues a timed-out or preempted job); the engine stops an agent through ``stop``;
- ``device`` and ``bind_host`` default to ``auto`` (the GPU the engine left visible; the address
  that routes to the store's host), since nobody knows them before placement;
- a restarted agent waits for its previous process's lease to run out (``wait_lease``);
- the task's data is fetched here, on the agent's node (one fetch per node: ``taskdata`` locks it);
- it returns its exit code (``launch.common``) instead of exiting, so the engine decides what is
  final: 0, 2 and 3 are; 1, 75 and 143 ask for a restart.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from typing import Callable

from launch.common import agent_exit_code, run

RESTART_WAIT_TTLS = 2.0  # a restarted agent waits this many lease TTLs (plus a margin) for its old lease


def engine_options(opts, *, gpus: float = 0.0, threads: int | None = None,
                   bind_host: str = "auto"):
    """``opts`` for an agent an engine places: devices and addresses resolved on its node, the lease
    wait of a restartable agent. A CPU agent names the CPU explicitly: an agent given no GPU may still
    see every GPU of its node (Ray leaves ``CUDA_VISIBLE_DEVICES`` alone for 0-GPU actors)."""
    return dataclasses.replace(
        opts, device="auto" if gpus > 0 else "cpu", bind_host=bind_host,
        threads=threads or opts.threads,
        wait_lease=max(opts.wait_lease, RESTART_WAIT_TTLS * opts.lease_ttl + 5.0))


def run_engine_agent(opts, log_path: str | None, on_agent: Callable | None = None,
                     note: str | None = None) -> int:
    """Run one agent to its end in this process; its output goes to ``log_path`` (appended, so a
    restarted agent continues the same log), starting with ``note``. Returns the exit code."""
    if log_path:
        os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
        log = open(log_path, "a", buffering=1)
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        sys.stdout = sys.stderr = log
    if note:
        print(note, flush=True)

    def main() -> int:
        from agents.agent import Agent

        agent = Agent(opts)
        agent.verbose = True
        if on_agent is not None:
            on_agent(agent)
        agent.run()
        return agent_exit_code(agent)

    code = run(main, f"agent[{opts.task}]")
    sys.stdout.flush()
    return code
