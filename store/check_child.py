"""``verify``/``check`` of a store in a child process at low CPU priority (the store service runs
them this way).

A full check re-hashes every blob: seconds to minutes of one core, and in the service's own process
it would also hold Python's lock between blobs. LMDB lets another process read the same file in its
own snapshot, so the service asks a child to do it (``nice`` 10) and keeps its threads for heartbeats
and reads. The answer is exactly ``Store.check()``'s, through a pipe as JSON.

  python -m store.check_child STORE_DIR      # prints the VerifyResult as JSON
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys

from store.errors import StoreError
from store.maintenance import VerifyResult

NICE = 10


def check_in_child(path: str, nice: int = NICE) -> VerifyResult:
    """``Store.open(path, readonly=True).check()`` run by a child process at ``nice``."""
    # `nice` as a command, not a preexec_fn: that keeps Python's vfork path (no copy of the
    # service's memory map while it holds its lock)
    prefix = ["nice", "-n", str(nice)] if nice and shutil.which("nice") else []
    proc = subprocess.run([*prefix, sys.executable, "-m", "store.check_child", path],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise StoreError(f"the store check process failed (exit {proc.returncode}): {last}")
    return VerifyResult(**json.loads(proc.stdout))


def main() -> int:
    from store.store import Store

    with Store.open(sys.argv[1], readonly=True) as store:
        print(json.dumps(dataclasses.asdict(store.check())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
