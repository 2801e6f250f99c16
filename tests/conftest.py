"""Shared set-up: an offline hub, the suite's own data cache, and a reaper for every child a test leaves.

Caches. The suite never reads or writes the user's caches (``~/.cache/munet-swarm``, pip's, torch's,
the model hub's). Before any test module is imported (so before any test, fixture or child process
runs) ``MUNET_DATA_DIR`` is pointed at the suite's data cache, ``.test-cache/data`` in the repository
(git-ignored; ``MUNET_TEST_DATA_CACHE`` moves it), kept across sessions so a second ``make test``
downloads and renders nothing; ``XDG_CACHE_HOME`` is pointed at a temporary directory removed when the
session ends. Every child inherits both through the environment (the drivers in ``helpers.swarm``
pass ``os.environ`` on). Data cache entries are keyed (task, format version, font set) and verified on
every load (a sha256 sidecar; see taskdata/cache.py), so a stale or damaged file is rebuilt, never
served. Building them is paid once per machine, on first use by whichever test loads a task first:
about 15 s of CPU in all plus the downloads (uci_digits 0.6 s, mnist5k 1 s, fashion_mnist 1.6 s,
animal_mnist 1 s, each glyphs script 1-2 s), so nothing is pre-built. No test needs the pretrained ``glyphs_cjk`` root (minutes to build): the
``test`` preset's root is random, and the slow corpus test in test_root.py fetches its fonts into its
own ``tmp_path``. A test that wants another cache passes ``cache_dir=`` or its own
``MUNET_DATA_DIR``; ``test_suite_caches.py`` proves the session's is not under the home directory.

Imports. ``tests/`` is on ``sys.path`` (pytest's ``prepend`` import mode puts it there; it is also
inserted here), so test modules import shared code as ``helpers.<module>``; the repository root is
there too, for the project's packages.
"""
from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)
for _path in (TESTS, REPO):
    if _path not in sys.path:
        sys.path.insert(0, _path)

SESSION_CACHE = tempfile.mkdtemp(prefix="munet-test-cache-")
DATA_CACHE = os.environ.get("MUNET_TEST_DATA_CACHE") or os.path.join(REPO, ".test-cache", "data")
os.makedirs(DATA_CACHE, exist_ok=True)
os.environ["MUNET_DATA_DIR"] = DATA_CACHE  # taskdata's cache (and roots/), kept across sessions
os.environ["XDG_CACHE_HOME"] = os.path.join(SESSION_CACHE, "xdg")  # pip, torch hub, HF hub, fontconfig


def pytest_unconfigure(config) -> None:
    shutil.rmtree(SESSION_CACHE, ignore_errors=True)


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc; children of children too)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _is_helper(pid: int) -> bool:
    """multiprocessing's long-lived resource tracker is shared by all tests: leave it alone."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"resource_tracker" in f.read()
    except OSError:
        return False


@pytest.fixture(autouse=True)
def reap_children():
    """Kill every process a test started and left running (agents, launchers, store writers)."""
    before = set(_descendants(os.getpid()))
    yield
    leftover = [p for p in _descendants(os.getpid()) if p not in before and not _is_helper(p)]
    for pid in leftover:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for pid in leftover:
        try:
            os.waitpid(pid, 0)
        except (ChildProcessError, OSError):
            pass
