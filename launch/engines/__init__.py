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

LAUNCHERS = ("local", "ray", "slurm")
