"""Shared bits of the entry points: the store flags, user-error handling, exit codes.

Exit codes (docs/design.md section 6), also what a supervisor (Ray, Slurm, a shell loop) acts on:
0 success (an agent: finished, or stopped as asked with Ctrl-C): do not restart;
1 internal failure or an inconsistent store: restart;
2 user error (one line on stderr, no traceback): do not restart;
3 superseded (an agent whose lease another process took over): do not restart;
75 the store service stayed unreachable past its give-up bound: restart after a pause;
143 an agent stopped by SIGTERM before its cycles were done (preemption): restart. ``run_main`` is the one place that decides them, for
every script in launch/ and benchmarks/ and for spawned agent processes. Keep torch out of this
module: query.py imports it too. The scripts import the installed packages (``make install`` or
``pip install -e .``), so none of them edits ``sys.path``.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never wait on a model hub for weights


EXIT_OK, EXIT_FAILED, EXIT_USER_ERROR, EXIT_SUPERSEDED = 0, 1, 2, 3
EXIT_STORE_UNAVAILABLE = 75   # EX_TEMPFAIL
EXIT_TERMINATED = 143         # 128 + SIGTERM, what a shell reports for a process SIGTERM ended
FINAL_EXIT_CODES = frozenset({EXIT_OK, EXIT_USER_ERROR, EXIT_SUPERSEDED})  # never restart these


class UserError(ValueError):
    """A bad flag or argument combination found by an entry point itself."""


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line on stderr and exit 2, not the whole usage block (every
    entry point's contract); ``--help`` still prints everything."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


# Errors of the agent stack that mean "the user asked for something impossible", looked up only in
# modules already loaded: an error path must never import torch (query.py runs without it).
_AGENT_USER_ERRORS = (("agents.config", "PresetError"), ("agents.bootstrap", "RootMismatch"),
                      ("agents.roots", "CheckpointError"), ("taskdata.cache", "TaskDataError"),
                      ("agents.agent", "NoSinglePathModel"), ("agents.placement", "PlacementError"))


def user_error_types() -> tuple[type[BaseException], ...]:
    """Exceptions that mean 'the user asked for something impossible' (exit 2): not a store (a
    wrong path, a service that refuses our keys), a task another live agent holds, bad flags,
    presets, tasks, roots. Other store errors are failures (exit 1)."""
    from store import LeaseHeld, NotAStore

    types: list[type[BaseException]] = [NotAStore, LeaseHeld, UserError]
    for module, name in _AGENT_USER_ERRORS:
        loaded = sys.modules.get(module)
        if loaded is not None:
            types.append(getattr(loaded, name))
    return tuple(types)


def exit_code(exc: BaseException, prog: str,
              user_errors: tuple[type[BaseException], ...] = ()) -> int:
    """Report ``exc`` the way every entry point does, and return its exit code."""
    from store import MissingReference, StoreCorrupt, StoreDiskError, StoreUnavailable

    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    if isinstance(exc, StoreDiskError):  # not the user's input, and not a crash of ours: one line, 1
        print(f"{prog}: error: {first}", file=sys.stderr)
        return 1
    if isinstance(exc, StoreUnavailable):
        print(f"{prog}: error: {first}", file=sys.stderr)
        return EXIT_STORE_UNAVAILABLE
    if isinstance(exc, (StoreCorrupt, MissingReference)):
        print(f"{prog}: error: store is inconsistent: {first} (run `query.py verify`)",
              file=sys.stderr)
        return 1
    if isinstance(exc, user_error_types() + tuple(user_errors)):
        print(f"{prog}: error: {first}", file=sys.stderr)
        return 2
    import traceback

    traceback.print_exc()
    print(f"{prog}: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
    return 1


def run(main: Callable[[], int | None], prog: str,
        user_errors: tuple[type[BaseException], ...] = ()) -> int:
    """Call ``main`` and return its exit code: user errors become one stderr line + 2, crashes 1."""
    try:
        return main() or 0
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except SystemExit:
        raise
    except BrokenPipeError:  # e.g. `query.py events | head`
        sys.stderr.close()
        return 0
    except Exception as exc:  # noqa: BLE001 - the one place that decides exit codes
        return exit_code(exc, prog, user_errors)


def run_main(main: Callable[[], int | None], prog: str,
             user_errors: tuple[type[BaseException], ...] = ()) -> None:
    """The ``if __name__ == "__main__"`` of every script: ``run`` it, then exit with its code."""
    sys.exit(run(main, prog, user_errors))


def add_prefix_cache_flag(p: argparse.ArgumentParser) -> None:
    """``--prefix-cache-mb``, the same on every command that starts agents."""
    from agents.config import DEFAULT_PREFIX_CACHE_MB  # torch-free

    p.add_argument("--prefix-cache-mb", type=int, default=DEFAULT_PREFIX_CACHE_MB, metavar="MB",
                   help="per-agent cache of frozen-prefix activations (exact: a child that trains only "
                        "its top layers runs only those on cached inputs); 0 turns it off "
                        f"(default {DEFAULT_PREFIX_CACHE_MB})")


def check_prefix_cache_flag(args: argparse.Namespace) -> None:
    if args.prefix_cache_mb < 0:
        raise UserError("--prefix-cache-mb must be >= 0 (0 turns the cache off)")


def add_restart_flags(p: argparse.ArgumentParser) -> None:
    """``--wait-lease``: what an agent a supervisor restarts needs (its old lease may still run)."""
    p.add_argument("--wait-lease", type=float, default=0.0, metavar="SECONDS",
                   help="wait up to SECONDS for a previous holder's lease to run out (a restarted "
                        "agent whose old process died holding it) instead of exiting 2; a holder "
                        "still heartbeating is refused all the same (default 0: refuse at once)")


def check_lease_ttl(value: float, flag: str = "--lease-ttl") -> None:
    """The store's lease bound as a flag check: one line and exit 2 for nan, inf, 0 or a negative."""
    from store.leases import MAX_TTL_S, MIN_TTL_S

    if not MIN_TTL_S <= value <= MAX_TTL_S:  # False for nan too
        raise UserError(f"{flag} must be a number of seconds from {MIN_TTL_S:g} to {MAX_TTL_S:g}, "
                        f"got {value}")


def check_agent_flags(args: argparse.Namespace) -> None:
    """Flags the agent-starting commands share, checked before anything is fetched or created."""
    if getattr(args, "threads", None) is not None and args.threads < 1:
        raise UserError(f"--threads must be >= 1, got {args.threads}")
    store = getattr(args, "store", None)
    if store and not store.startswith("tcp://") and os.path.exists(store) and not os.path.isdir(store):
        raise UserError(f"--store {store} is a file: give a store directory (or tcp://HOST:PORT)")
    keys = getattr(args, "keys", None)
    if keys and os.path.exists(keys) and not os.path.isdir(keys):
        raise UserError(f"--keys {keys} is a file: give the key folder")
    host = getattr(args, "bind_host", None)
    if host and host != "auto":
        check_bind_host(host)


def check_bind_host(host: str) -> None:
    """``host`` must be an address of this machine that a socket can bind (the bus binds it later)."""
    import socket

    try:
        infos = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise UserError(f"--bind-host {host!r}: not a host name or address") from None
    family, kind, proto, _, addr = infos[0]
    with socket.socket(family, kind, proto) as probe:
        try:
            probe.bind(addr)
        except OSError as exc:
            raise UserError(f"--bind-host {host}: not an address of this machine ({exc.strerror})") from None


def add_store_flags(p: argparse.ArgumentParser, *, required: bool = False,
                    default: str | None = None, help: str | None = None) -> None:
    """``--store DIR|tcp://HOST:PORT`` and ``--keys KEYDIR``, the same on every entry point;
    ``$MUNET_STORE`` stands in for ``--store`` (a job spec sets it once for every agent)."""
    env = os.environ.get("MUNET_STORE")
    p.add_argument("--store", required=required and not env, default=env or default,
                   metavar="DIR|tcp://HOST:PORT",
                   help=(help or "store directory on this host, or a store service "
                                 "(launch/serve_store.py) at tcp://HOST:PORT") + " ($MUNET_STORE)")
    p.add_argument("--keys", default=os.environ.get("MUNET_STORE_KEYS"), metavar="KEYDIR",
                   help="CURVE key folder for a store service beyond loopback (server.key plus "
                        "this host's client pair; default $MUNET_STORE_KEYS)")


def agent_process_main(opts, log_path: str) -> None:
    """Entry of a ``spawn``ed agent process: log to a file, exit codes as ``run_main`` decides."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    log = open(log_path, "a", buffering=1)
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    sys.stdout = sys.stderr = log

    def main() -> int:
        from agents.agent import run_agent

        return agent_exit_code(run_agent(opts))

    run_main(main, f"agent[{opts.task}]")


def agent_exit_code(agent) -> int:
    """The exit code of an agent whose ``run`` returned (see the module docstring)."""
    return {"finished": EXIT_OK, "stopped": EXIT_OK, "superseded": EXIT_SUPERSEDED,
            "terminated": EXIT_TERMINATED}[agent.outcome]


def parse_devices(text: str) -> list[str]:
    """'cpu' or 'cuda:0,cuda:1' -> list; validated here so a typo is a user error, not a crash."""
    devices = [d.strip() for d in text.split(",") if d.strip()]
    if not devices:
        raise UserError("--devices is empty: use cpu or cuda:0,cuda:1,...")
    for d in devices:
        if d != "cpu" and not (d.startswith("cuda:") and d[5:].isdigit()) and d != "cuda":
            raise UserError(f"bad device {d!r}: use cpu, cuda or cuda:N")
    return devices


def check_devices(devices: list[str]) -> None:
    """Fail early (exit 2) when a CUDA device is asked for and this machine has none."""
    if all(d == "cpu" for d in devices):
        return
    import torch

    n = torch.cuda.device_count()
    for d in devices:
        if d.startswith("cuda"):
            idx = int(d[5:]) if ":" in d else 0
            if idx >= n:
                raise UserError(f"device {d} requested but this machine has {n} CUDA device(s)")
