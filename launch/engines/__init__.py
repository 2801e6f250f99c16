"""Where a swarm's agents run: the engines behind ``run_swarm.py --launcher``.

Every engine runs the same agent (``entry.run_engine_agent``) and differs only in placement and
restart. ``start`` returns one handle per (task, kind), the thin face the launcher's progress loop
and Ctrl-C handling use, whatever runs the agent:

    handle.is_alive() -> bool     # polls; a handle may restart its agent inside this call
    handle.exitcode -> int | None # None while alive; launch.common's exit codes after
    handle.stop()                 # ask the agent to finish its child and release its lease
    handle.kill()                 # end it now (the store loses nothing: kill -9 safe)
    handle.where() -> str         # where it runs, for the launcher's log (host, GPU)

``local`` is ``multiprocessing`` on this host (today's launcher, the default); ``ray`` places one
actor per agent on a Ray cluster (``ray_engine``); ``slurm`` submits a job array through submitit
(``slurm_engine``). The optional engines import their library only when chosen.
"""
from __future__ import annotations

from launch.common import EXIT_STORE_UNAVAILABLE, FINAL_EXIT_CODES

LAUNCHERS = ("local", "ray", "slurm")
UNAVAILABLE_PAUSE_SECONDS = 10.0  # before running again an agent that found the store service gone


class Restarts:
    """When an engine runs an agent again after it ended with ``code`` (launch.common's codes)."""

    def __init__(self, limit: int) -> None:
        self.left, self.done = limit, 0

    def after(self, code: int) -> float | None:
        """Seconds to wait before the next run, or None: ``code`` is final, or no restart is left."""
        if code in FINAL_EXIT_CODES or self.left <= 0:
            return None
        self.left -= 1
        self.done += 1
        return UNAVAILABLE_PAUSE_SECONDS if code == EXIT_STORE_UNAVAILABLE else 1.0
