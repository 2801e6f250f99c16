"""Shared bits of the entry points: import path, user-error handling, exit codes.

Exit codes (DESIGN.md section 6): 0 success; 2 user error (one line on stderr, no traceback);
1 internal failure. Keep torch out of this module: query.py imports it too.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # `python launch/x.py` from a checkout without installing
    sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never wait on a model hub for weights


def user_error_types() -> tuple[type[BaseException], ...]:
    """Exceptions that mean 'the user asked for something impossible' (exit 2)."""
    from store import LeaseHeld, NotAStore

    types: list[type[BaseException]] = [NotAStore, LeaseHeld, UserError]
    if "agents" in sys.modules:  # only when the agent stack is loaded (query.py never loads it)
        from agents.bootstrap import RootMismatch
        from agents.config import PresetError
        from taskdata import TaskDataError
        from agents.roots import CheckpointError

        types += [PresetError, TaskDataError, RootMismatch, CheckpointError]
    return tuple(types)


class UserError(ValueError):
    """A bad flag or argument combination found by an entry point itself."""


def run_main(main: Callable[[], int | None], prog: str) -> None:
    """Run ``main`` and turn user errors into one stderr line + exit 2, crashes into exit 1."""
    try:
        code = main()
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        code = 130
    except SystemExit:
        raise
    except Exception as exc:  # noqa: BLE001 - the one place that decides exit codes
        if isinstance(exc, user_error_types()):
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            print(f"{prog}: error: {first}", file=sys.stderr)
            code = 2
        else:
            import traceback

            traceback.print_exc()
            print(f"{prog}: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
            code = 1
    sys.exit(code or 0)


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
