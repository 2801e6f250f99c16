"""The suite's own caches: a data cache kept across sessions (keyed, verified) and a session
temporary directory for everything else; never the user's caches."""
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
DATA = Path(conftest.DATA_CACHE).resolve()


def _under(path: Path, base: Path) -> bool:
    return path == base or base in path.parents


def _child_cache_dir() -> Path:
    """What an agent or launcher started by a test sees (the environment the drivers pass on)."""
    code = "import agents; from taskdata import default_cache_dir; print(default_cache_dir())"
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=dict(os.environ),
                       capture_output=True, text=True, timeout=120, check=True)
    return Path(r.stdout.strip()).resolve()


def test_the_suite_data_cache_is_its_own_and_the_rest_a_session_directory():
    here = default_cache_dir().resolve()
    assert here == Path(os.environ["MUNET_DATA_DIR"]).resolve() == DATA
    assert not _under(here, HOME / ".cache") and not _under(HOME / ".cache" / "munet-swarm", here)
    assert _child_cache_dir() == here  # children inherit it
    xdg = Path(os.environ["XDG_CACHE_HOME"]).resolve()  # pip, torch and the hub follow XDG
    assert _under(xdg, SESSION) and not _under(xdg, HOME / ".cache")


def test_loading_a_task_writes_the_suite_cache_and_leaves_home_alone():
    home_entry = HOME / ".cache" / "munet-swarm" / "uci_digits-v1.npz"
    before = home_entry.stat().st_mtime_ns if home_entry.exists() else None
    data = load_task("uci_digits")
    assert data.num_classes == 10
    assert (default_cache_dir() / "uci_digits-v1.npz").is_file()
    after = home_entry.stat().st_mtime_ns if home_entry.exists() else None
    assert after == before  # not created, not rewritten


def test_a_cached_task_is_reused_and_a_damaged_entry_is_rebuilt_not_served(tmp_path):
    """Keyed and verified: a second load reads the entry as it is; a changed byte is caught by the
    checksum and the entry is rebuilt with the right data."""
    import numpy as np

    cache = tmp_path / "cache"
    first = load_task("uci_digits", cache_dir=str(cache))
    entry = cache / "uci_digits-v1.npz"
    sidecar = cache / "uci_digits-v1.npz.sha256"
    assert entry.is_file() and sidecar.is_file()
    stamp = entry.stat().st_mtime_ns
    again = load_task("uci_digits", cache_dir=str(cache))
    assert entry.stat().st_mtime_ns == stamp  # reused, not rebuilt
    assert np.array_equal(first.train_x, again.train_x)
    raw = bytearray(entry.read_bytes())
    raw[-100] ^= 0xFF  # damage one byte of array data
    entry.write_bytes(bytes(raw))
    rebuilt = load_task("uci_digits", cache_dir=str(cache))
    assert np.array_equal(first.test_x, rebuilt.test_x) and np.array_equal(first.test_y, rebuilt.test_y)
    assert entry.read_bytes() != bytes(raw)  # the damaged file was replaced
    sidecar.unlink()  # an entry whose checksum is unknown is not trusted either
    load_task("uci_digits", cache_dir=str(cache))
    assert sidecar.is_file()
