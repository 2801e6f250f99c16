"""``run_swarm.py --launcher ray``: one long-lived Ray actor per agent.

Ray places each actor on a node with the GPUs and CPUs asked for (``--gpus-per-agent``,
``--cpus-per-agent``) and narrows ``CUDA_VISIBLE_DEVICES`` to its GPU, so the agent runs on
``cuda:0`` of its own view (``device=auto``). Failures:
- the actor's process dies (kill -9, OOM, segfault) or its node is lost: Ray restarts the actor,
  on another node if need be, and reruns the ``run`` call in flight (``max_task_retries=-1``); the
  new agent waits for its old lease to run out and resumes from the store;
- ``run`` returns 0 (finished or stopped), 2 (user error) or 3 (superseded): final, never retried;
- ``run`` returns 1, 75 or 143 (a crash inside Python, the store service unreachable, SIGTERM):
  the launcher calls ``run`` again, up to ``--max-restarts`` times.
The store stays outside Ray (a store service on a stable host, or a directory when the whole Ray
cluster is this host): losing Ray's head ends the Ray cluster, never the swarm's state.
"""
from __future__ import annotations

import hashlib
import os
import time

import ray

from launch.common import EXIT_FAILED, UserError
from launch.engines import Restarts
from launch.engines.entry import engine_options, run_engine_agent


def normal_priority() -> str | None:
    """Ray starts its workers at nice 15 (``RAY_worker_niceness``) so its own daemons win the CPU;
    an agent *is* the node's workload, so every thread of its process goes back to nice 0 where
    allowed (root or CAP_SYS_NICE). Returns a note for the log when it could not."""
    try:
        if os.getpriority(os.PRIO_PROCESS, 0) <= 0:
            return None
        for tid in os.listdir("/proc/self/task"):  # Linux: niceness is per thread
            os.setpriority(os.PRIO_PROCESS, int(tid), 0)
        return None
    except (PermissionError, OSError) as exc:
        return (f"running at Ray's worker niceness {os.getpriority(os.PRIO_PROCESS, 0)} ({exc}); "
                f"start Ray nodes with RAY_worker_niceness=0 to give agents normal priority")


class AgentActor:
    """The agent's process. ``run`` blocks in the default concurrency group; ``stop`` and ``where``
    answer from the ``control`` group's thread meanwhile."""

    def __init__(self, opts, log_path: str, gpus: float, cpus: float) -> None:
        self.opts, self.log_path, self.gpus, self.cpus = opts, log_path, gpus, cpus
        self.agent = None
        self.runs = 0

    def run(self) -> int:
        self.runs += 1
        opts = engine_options(self.opts, gpus=self.gpus, threads=max(1, int(self.cpus)),
                              bind_host=self.opts.bind_host or ray.util.get_node_ip_address())
        notes = [normal_priority()]
        if self.runs > 1 or ray.get_runtime_context().was_current_actor_reconstructed:
            notes.append(f"restarted by Ray (run {self.runs} of this process)")
        note = "; ".join(f"[{opts.task}] {n}" for n in notes if n) or None
        return run_engine_agent(opts, self.log_path, on_agent=self._hold, note=note)

    def _hold(self, agent) -> None:
        self.agent = agent

    @ray.method(concurrency_group="control")
    def stop(self) -> bool:
        if self.agent is not None:
            self.agent.stop_requested = True
        return self.agent is not None

    @ray.method(concurrency_group="control")
    def where(self) -> dict:
        return {"node_ip": ray.util.get_node_ip_address(), "pid": os.getpid(),
                "gpu_ids": [str(g) for g in ray.get_gpu_ids()]}


class RayHandle:
    """One agent's actor and its ``run`` call, as the launcher's progress loop sees it."""

    def __init__(self, actor, name: str, max_restarts: int) -> None:
        self.actor, self.name = actor, name
        self.policy = Restarts(max_restarts)
        self.exitcode: int | None = None
        self._ref = actor.run.remote()
        self._resume_at = 0.0

    @property
    def restarts(self) -> int:
        return self.policy.done

    def is_alive(self) -> bool:
        if self.exitcode is not None:
            return False
        if self._ref is None:  # pausing before the next run
            if time.monotonic() >= self._resume_at:
                self._ref = self.actor.run.remote()
            return True
        ready, _ = ray.wait([self._ref], timeout=0)
        if not ready:
            return True
        try:
            code = int(ray.get(self._ref))
        except ray.exceptions.RayError:  # e.g. the actor is gone for good: its restarts ran out
            code = EXIT_FAILED
        pause = self.policy.after(code)
        if pause is None:
            self.exitcode = code
            ray.kill(self.actor, no_restart=True)  # frees its GPU and CPUs
            return False
        self._ref, self._resume_at = None, time.monotonic() + pause
        return True

    def stop(self) -> None:
        if self.exitcode is None:
            try:
                self.actor.stop.remote()
            except ray.exceptions.RayError:
                pass

    def kill(self) -> None:
        if self.exitcode is None:
            ray.kill(self.actor, no_restart=True)
            self.exitcode = EXIT_FAILED

    def where(self) -> str:
        try:
            w = ray.get(self.actor.where.remote(), timeout=60)
        except ray.exceptions.RayError as exc:
            return f"unknown ({type(exc).__name__})"
        gpus = ",".join(w["gpu_ids"]) or "none"
        return f"node {w['node_ip']} pid {w['pid']} gpu {gpus}"


def namespace(store: str) -> str:
    """One Ray namespace per store: the actors are named after their agents, unique per swarm."""
    return "munet-" + hashlib.sha1(store.encode()).hexdigest()[:10]


def connect(address: str | None, store: str, temp_dir: str | None = None) -> None:
    """Join the Ray cluster at ``address`` (``auto``: the one this node belongs to), or start a
    private one on this machine for ``local``. None behaves as ``ray.init()``: RAY_ADDRESS, else the
    cluster this node runs, else a private one (saying which). Output of the actors stays in their
    log files."""
    kwargs = dict(namespace=namespace(store), log_to_driver=False, configure_logging=False)
    if address is None:
        address = os.environ.get("RAY_ADDRESS") or "auto"
        try:
            ray.init(address=address, **kwargs)
            print(f"swarm: joined the Ray cluster at {address}", flush=True)
            return
        except ConnectionError:
            if os.environ.get("RAY_ADDRESS"):
                raise UserError(f"RAY_ADDRESS={address}: no Ray cluster there; start one or unset "
                                f"it to run a private Ray on this machine") from None
            print("swarm: no Ray cluster on this node: starting a private one on this machine",
                  flush=True)
            address = "local"
    if address == "local":
        kwargs.update(include_dashboard=False, object_store_memory=128 * 2**20)
        if temp_dir:
            kwargs["_temp_dir"] = temp_dir
        ray.init(**kwargs)
        return
    try:
        ray.init(address=address, **kwargs)
    except ConnectionError as exc:
        raise UserError(f"--ray-address {address}: no Ray cluster there ({str(exc).splitlines()[0]}); "
                        f"start one (ray start --head) or use --ray-address local") from None


def start(agents: list[tuple[str, str, object, str]], *, gpus_per_agent: float,
          cpus_per_agent: float, max_restarts: int, address: str | None, store: str) -> dict:
    """One actor per (task, kind, AgentOptions, log path); returns their handles."""
    connect(address, store)
    cls = ray.remote(concurrency_groups={"control": 1})(AgentActor)
    handles = {}
    for task, kind, opts, log in agents:
        try:
            ray.get_actor(f"{kind}~{task}")
        except ValueError:
            pass
        else:
            raise UserError(f"a {kind} agent for {task} already runs on this Ray cluster for this "
                            f"store (another launcher): stop it or leave {task} out")
        actor = cls.options(
            name=f"{kind}~{task}", num_gpus=gpus_per_agent,
            num_cpus=cpus_per_agent, max_restarts=max_restarts, max_task_retries=-1,
        ).remote(opts, log, gpus_per_agent, cpus_per_agent)
        handles[(task, kind)] = RayHandle(actor, f"{kind}~{task}", max_restarts)
    return handles


def shutdown() -> None:
    ray.shutdown()
