"""Is a lease holder on this host still running? Lets a re-run right after a crash take over at once.

A lease outlives its process by up to its TTL: after a kill -9 the store still calls it live. When
the holder ran on this very host, the host can answer better than the clock: the holder is gone when
its pid no longer runs, or when the process now holding that pid started after the holder's last
heartbeat (the pid was reused: the holder heartbeated before this process existed), and in either
case its bus socket (recorded with the lease) no longer accepts connections. Start times come
from ``/proc`` (Linux); elsewhere only "no such pid" counts as gone. Anything uncertain counts as
alive, so the caller falls back to waiting the lease out. Torch-free, like all of ``store``.
"""
from __future__ import annotations

import os
import socket

# The start time read from /proc is exact to a clock tick, but the boot time it is added to is whole
# seconds: a process that started within this margin after the last heartbeat still counts as the holder.
START_SLACK_S = 2.0


def this_host() -> str:
    """The name agents record as their lease's host."""
    return socket.gethostname()


def _boot_time() -> float | None:
    try:
        with open("/proc/stat") as f:
            for line in f:
                if line.startswith("btime "):
                    return float(line.split()[1])
    except OSError:
        return None
    return None


def process_start(pid: int) -> float | None:
    """Wall-clock start of ``pid`` (seconds since the epoch); None when no such process runs (or only a
    zombie is left); NaN when this platform cannot tell."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    except OSError:
        return float("nan")
    fields = data.rsplit(")", 1)[1].split()  # the command name may hold spaces and parentheses
    if fields[0] in ("Z", "X"):
        return None
    boot = _boot_time()
    if boot is None:
        return float("nan")
    return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _endpoint_answers(endpoint: str) -> bool:
    """The holder's bus socket (``tcp://HOST:PORT``, bound by the holder while it lives) accepts a
    connection here. Containers that share this host's name and network but not its pid namespace
    see no pid of each other's agents, but do see their sockets."""
    if not endpoint.startswith("tcp://"):
        return False
    host, _, port = endpoint[len("tcp://"):].rpartition(":")
    if not host or not port.isdigit():
        return False
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=0.5):
            return True
    except OSError:
        return False


def holder_gone(host: str, pid: int, heartbeat_at: float, endpoint: str = "") -> bool:
    """True only when the holder ran on this host and certainly no longer runs: its pid is gone (or
    reused since its last heartbeat) and its bus socket no longer answers."""
    if host != this_host() or pid <= 0 or pid == os.getpid():
        return False
    if _endpoint_answers(endpoint):
        return False
    if os.path.isdir("/proc/self"):
        started = process_start(pid)
        if started is None:
            return True
        if started != started:  # NaN: cannot tell
            return not _pid_exists(pid)
        return started > heartbeat_at + START_SLACK_S
    return not _pid_exists(pid)
