"""The suite's own caches live in a session temporary directory, never under the user's home."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import conftest
from helpers import REPO

import agents  # noqa: F401  (before anything that could import timm)
from taskdata import default_cache_dir, load_task

HOME = Path.home().resolve()
SESSION = Path(conftest.SESSION_CACHE).resolve()


def _under(path: Path, base: Path) -> bool:
    return path == base or base in path.parents


def _child_cache_dir() -> Path:
    """What an agent or launcher started by a test sees (the environment the drivers pass on)."""
    code = "import agents; from taskdata import default_cache_dir; print(default_cache_dir())"
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=dict(os.environ),
                       capture_output=True, text=True, timeout=120, check=True)
    return Path(r.stdout.strip()).resolve()


def test_the_session_data_cache_is_a_temporary_directory_outside_home():
    here = default_cache_dir().resolve()
    assert here == Path(os.environ["MUNET_DATA_DIR"]).resolve()
    assert _under(here, SESSION) and not _under(SESSION, HOME), (here, HOME)
    assert not _under(here, HOME / ".cache")
    assert _child_cache_dir() == here  # children inherit it
    xdg = Path(os.environ["XDG_CACHE_HOME"]).resolve()  # pip, torch and the hub follow XDG
    assert _under(xdg, SESSION) and not _under(xdg, HOME)


def test_loading_a_task_writes_the_session_cache_and_leaves_home_alone():
    home_entry = HOME / ".cache" / "munet-swarm" / "uci_digits-v1.npz"
    before = home_entry.stat().st_mtime_ns if home_entry.exists() else None
    data = load_task("uci_digits")
    assert data.num_classes == 10
    assert (default_cache_dir() / "uci_digits-v1.npz").is_file()
    after = home_entry.stat().st_mtime_ns if home_entry.exists() else None
    assert after == before  # not created, not rewritten
