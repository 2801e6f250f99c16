"""``run_swarm.py --launcher slurm``: a Slurm job array through submitit, one element per agent.

Each element asks for ``--gpus-per-agent`` GPUs (Slurm binds them: the agent runs on ``cuda:0`` of
its own view, ``device=auto``) and ``--cpus-per-agent`` cores, with ``--requeue`` so a failed node's
jobs come back. Failures:
- timeout or preemption: Slurm signals the job; submitit checkpoints the ``AgentJob`` (nothing to
  save: the store is the checkpoint) and requeues it; the agent ended mid-child loses only that
  child, and its next start resumes from the store (its lease was released on the way out, or it
  waits for it to run out);
- the job's process dies (kill -9, a node lost without requeue): the launcher submits the agent
  again, up to ``--max-restarts`` times;
- the agent returns 0, 2 or 3: final; 1, 75 or 143: submitted again (counted the same way).
Our own SIGTERM handler stays off (submitit's requeue needs the signal). ``--slurm-executor local``
runs the same jobs as subprocesses of this host (submitit's local executor: timeouts and requeue
included), to try a set-up before a cluster sees it.
"""
from __future__ import annotations

import time

import submitit

from launch.common import EXIT_FAILED
from launch.engines import Restarts
from launch.engines.entry import engine_options, run_engine_agent


class AgentJob(submitit.helpers.Checkpointable):
    """The callable a job runs. ``checkpoint`` (inherited) resubmits it with the same arguments."""

    def __call__(self, opts, log_path: str, gpus: float, cpus: int) -> int:
        return run_engine_agent(engine_options(opts, gpus=gpus, threads=cpus), log_path)


class SlurmHandle:
    def __init__(self, executor, job, args: tuple, name: str, max_restarts: int) -> None:
        self.executor, self.job, self.args, self.name = executor, job, args, name
        self.policy = Restarts(max_restarts)
        self.exitcode: int | None = None
        self._resume_at: float | None = None

    @property
    def restarts(self) -> int:
        return self.policy.done

    def is_alive(self) -> bool:
        if self.exitcode is not None:
            return False
        if self._resume_at is not None:
            if time.monotonic() >= self._resume_at:
                self.job, self._resume_at = self.executor.submit(AgentJob(), *self.args), None
            return True
        if not self.job.done():
            return True
        try:
            code = int(self.job.result())
        except Exception:  # the job failed: killed, node lost, cancelled (its log says why)
            code = EXIT_FAILED
        pause = self.policy.after(code)
        if pause is None:
            self.exitcode = code
            return False
        self._resume_at = time.monotonic() + pause
        return True

    def stop(self) -> None:
        if self.exitcode is None and self._resume_at is None:
            self.job.cancel(check=False)  # scancel: SIGTERM, then SIGKILL after Slurm's KillWait

    def kill(self) -> None:
        self.stop()
        if self.exitcode is None:
            self.exitcode = EXIT_FAILED

    def where(self) -> str:
        return f"job {self.job.job_id}"


def start(agents: list[tuple[str, str, object, str]], *, gpus_per_agent: float,
          cpus_per_agent: float, max_restarts: int, folder: str, executor: str = "slurm",
          partition: str | None = None, time_min: int = 1440, mem_gb: float | None = None,
          signal_delay_s: int = 90, max_timeouts: int = 1000) -> dict:
    """Submit one array element per (task, kind, AgentOptions, log path); returns their handles.
    ``max_timeouts``: how many times a job may time out and be requeued (submitit's default is 3,
    too few for an agent that runs for days in 24 h slices)."""
    gpus, cpus = int(gpus_per_agent), max(1, int(cpus_per_agent))
    if executor == "local":  # submitit's local executor knows only these
        ex = submitit.LocalExecutor(folder=folder, max_num_timeout=max_timeouts)
        ex.update_parameters(timeout_min=time_min, gpus_per_node=gpus, tasks_per_node=1,
                             signal_delay_s=signal_delay_s)
    else:
        ex = submitit.AutoExecutor(folder=folder, cluster="slurm", slurm_max_num_timeout=max_timeouts)
        params = dict(name="munet-agent", timeout_min=time_min, gpus_per_node=gpus,
                      cpus_per_task=cpus, tasks_per_node=1, nodes=1,
                      slurm_array_parallelism=max(1, len(agents)), slurm_signal_delay_s=signal_delay_s,
                      slurm_additional_parameters={"requeue": True})
        if partition:
            params["slurm_partition"] = partition
        if mem_gb:
            params["mem_gb"] = mem_gb
        ex.update_parameters(**params)
    calls = [(opts, log, gpus, cpus) for _, _, opts, log in agents]
    jobs = ex.map_array(AgentJob(), *zip(*calls)) if calls else []
    return {(task, kind): SlurmHandle(ex, job, call, f"{kind}~{task}", max_restarts)
            for (task, kind, _, _), job, call in zip(agents, jobs, calls)}


def shutdown() -> None:
    pass
