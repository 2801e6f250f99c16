"""Bad input on every entry point: one line on stderr, exit 2, no traceback, nothing created.

Each case was a traceback, a usage block or a wrong message before (issue: what a new user trips on)."""
from __future__ import annotations

import os

import pytest

from helpers.swarm import run_cli

SCRIPTS = ["launch/run_swarm.py", "launch/attach.py", "launch/query.py", "launch/serve_store.py",
           "launch/make_root.py", "launch/serve_models.py"]


def one_line(r, *words: str) -> str:
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert len(lines) == 1 and "Traceback" not in r.stderr and "usage:" not in r.stderr, r.stderr
    assert all(w in lines[0] for w in words), lines[0]
    return lines[0]


@pytest.mark.parametrize("script", SCRIPTS)
def test_an_unknown_flag_is_one_line_not_the_usage_block(script, tmp_path):
    # the required flags given where a script has them, so the unknown one is what it complains about
    given = {"launch/attach.py": ["--store", str(tmp_path), "--task", "t"],
             "launch/serve_models.py": ["--store", str(tmp_path)],
             "launch/query.py": ["leaderboard"]}.get(script, [])
    one_line(run_cli(script, *given, "--no-such-flag"), "--no-such-flag")


@pytest.mark.parametrize("args, words", [
    (["--threads", "-2"], ["--threads"]),
    (["--refresh", "-1"], ["--refresh"]),
    (["--bind-host", "999.1.1.1"], ["--bind-host"]),
    (["--bind-host", "192.0.2.1"], ["not an address of this machine"]),  # TEST-NET: never local
    (["--keys", "KEYFILE"], ["--keys", "is a file"]),
])
def test_run_swarm_refuses_bad_flags_before_creating_anything(tmp_path, args, words):
    keyfile = tmp_path / "keyfile"
    keyfile.write_text("x")
    args = [str(keyfile) if a == "KEYFILE" else a for a in args]
    store = tmp_path / "store"
    one_line(run_cli("launch/run_swarm.py", "--store", str(store), "--tasks", "uci_digits", "--preset", "test",
                     *args), *words)
    assert not store.exists()


def test_a_store_path_that_is_a_file_is_named_as_such(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    one_line(run_cli("launch/run_swarm.py", "--store", str(f), "--tasks", "uci_digits", "--preset", "test"),
             "is a file")
    one_line(run_cli("launch/attach.py", "--store", str(f), "--task", "uci_digits", "--threads", "-1"), "--threads")


def test_query_refuses_a_folder_as_export_file_and_a_negative_event_number(tmp_path):
    from helpers.swarm import make_store

    store = str(tmp_path / "store")
    make_store(store)
    one_line(run_cli("launch/query.py", "--store", store, "events", "--after", "-5"), "--after")
    out = tmp_path / "out"
    out.mkdir()
    one_line(run_cli("launch/query.py", "--store", store, "export", "uci_digits", "--out", str(out)),
             "is a folder")
    assert os.listdir(out) == []


def _npz(path, *, x=None, y_train=None, y_test=None) -> str:
    import numpy as np

    x = np.zeros((4, 8, 8), np.uint8) if x is None else x
    np.savez(path, x_train=x, y_train=np.array([0, 1, 0, 1]) if y_train is None else y_train,
             x_test=x, y_test=np.array([0, 1, 1, 0]) if y_test is None else y_test)
    return f"npz:{path}"


@pytest.mark.parametrize("case, words", [
    ("huge_label", ["the limit is 10,000"]),
    ("zero_size", ["0x0 images"]),
    ("unseen_test", ["never occur in y_train"]),
    ("lying_header", ["says shape", "holds"]),
])
def test_bad_npz_tasks_are_one_line_before_anything_is_written(tmp_path, case, words):
    import io
    import zipfile

    import numpy as np

    path = tmp_path / "data.npz"
    if case == "huge_label":
        spec = _npz(path, y_train=np.array([0, 1, 0, 10**6]))
    elif case == "zero_size":
        spec = _npz(path, x=np.zeros((4, 0, 0), np.uint8))
    elif case == "unseen_test":
        spec = _npz(path, y_test=np.array([0, 1, 2, 0]))
    else:  # a member whose header claims 64 TiB in a few bytes
        spec = _npz(path)
        head = io.BytesIO()
        np.lib.format.write_array_header_1_0(head, {"descr": "|u1", "fortran_order": False,
                                                    "shape": (2**23, 2**23, 2**20)})
        with zipfile.ZipFile(path, "a") as z:
            z.writestr("x_val.npy", head.getvalue() + b"xx")
            z.writestr("y_val.npy", head.getvalue() + b"xx")
    store = tmp_path / "store"
    one_line(run_cli("launch/run_swarm.py", "--store", str(store), "--tasks", f"mine={spec}", "--preset", "test"),
             *words)
    assert not store.exists()


def test_bad_folder_tasks_are_one_line(tmp_path):
    from PIL import Image

    root = tmp_path / "shapes"
    for split in ("train", "test"):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            Image.new("L", (8, 8), 10).save(root / split / cls / "1.png")
    (root / "test" / "c").mkdir()
    Image.new("L", (8, 8), 10).save(root / "test" / "c" / "1.png")
    store = tmp_path / "store"
    one_line(run_cli("launch/run_swarm.py", "--store", str(store), "--tasks", f"shapes=folder:{root}",
                     "--preset", "test"), "test class(es) c have no training images")
    (root / "train" / "c").mkdir()  # now c has a training folder, but an empty one
    one_line(run_cli("launch/run_swarm.py", "--store", str(store), "--tasks", f"shapes=folder:{root}",
                     "--preset", "test"), "hold no images")
    Image.new("L", (8, 8), 10).save(root / "train" / "c" / "1.png")
    Image.new("L", (5000, 3), 0).save(root / "train" / "c" / "2.png")  # over the side limit
    one_line(run_cli("launch/run_swarm.py", "--store", str(store), "--tasks", f"shapes=folder:{root}",
                     "--preset", "test"), "5000x3")
    assert not store.exists()


def test_a_task_name_with_a_trailing_newline_is_refused():
    from taskdata import TaskDataError, parse_task_spec

    with pytest.raises(TaskDataError, match="bad task name"):
        parse_task_spec("mine\n=npz:/x.npz")


def test_unnamed_tasks_that_map_to_one_agent_id_get_the_true_reason(tmp_path):
    """npz:/d/a b.npz and npz:/d/a:b.npz both become agent~npz~~d~a~b.npz: the second is refused
    because of the id, not as 'grown on other data'."""
    import numpy as np

    from helpers.swarm import make_store

    store = str(tmp_path / "store")
    make_store(store)
    first = _npz(tmp_path / "a b.npz")
    second = _npz(tmp_path / "a:b.npz", y_train=np.array([1, 0, 1, 0]))
    r = run_cli("launch/attach.py", "--store", store, "--task", first, "--preset", "test", "--cycles", "1",
                timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    for cmd in (["launch/attach.py", "--store", store, "--task", second],
                ["launch/run_swarm.py", "--store", store, "--tasks", second]):
        line = one_line(run_cli(*cmd, "--preset", "test", "--cycles", "1", timeout=300), "maps to agent id")
        assert "other data" not in line


def test_refusals_that_used_to_leave_a_new_store_behind(tmp_path):
    import socket

    store = tmp_path / "new"
    one_line(run_cli("launch/run_swarm.py", "--store", str(store), "--kinds", "multipath", "--tasks", "uci_digits",
                     "--preset", "test"), "no single-path model")
    assert not store.exists()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        one_line(run_cli("launch/serve_store.py", "--store", str(store), "--bind",
                         f"tcp://127.0.0.1:{taken.getsockname()[1]}"), "cannot bind")
    assert not store.exists()


def test_a_wait_on_another_process_s_lock_says_what_it_waits_for(tmp_path):
    """make_root.py --print waited 10 minutes in silence behind another process's build; a waiter now
    says what it waits for, then goes on once the lock is free."""
    import fcntl
    import threading

    from taskdata.cache import exclusive

    said: list[str] = []
    path = tmp_path / ".x.lock"
    with open(path, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        waiter = threading.Thread(target=lambda: exclusive(path, "building the root x", said.append).__enter__())
        waiter.start()
        waiter.join(1.0)
        assert waiter.is_alive() and said == [f"waiting for another process that is building the root x (lock {path})"]
    waiter.join(10)
    assert not waiter.is_alive()


def test_a_full_disk_is_one_line_naming_the_store_and_the_store_verifies_afterwards(tmp_path):
    """The disk refuses the agent's first commit (a file-size limit stands in for a full disk: LMDB
    reports both as the same I/O error): one line and exit 1, and nothing stored is damaged."""
    import resource
    import signal
    import subprocess
    import sys

    from helpers.swarm import ENV, REPO, make_store

    from taskdata import fetch_all

    store = str(tmp_path / "store")
    make_store(store)  # a store with its root
    fetch_all(["uci_digits"])  # the data cache is written before the disk is made small
    limit = os.path.getsize(os.path.join(store, "data.mdb")) + (64 << 10)

    def small_disk():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    r = subprocess.run([sys.executable, "launch/attach.py", "--store", store, "--task", "uci_digits",
                        "--preset", "test", "--cycles", "1", "--threads", "1"], cwd=REPO, env=ENV,
                       capture_output=True, text=True, timeout=300, preexec_fn=small_disk)
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert "refused a write" in last and os.path.abspath(store) in last and "free" in last, last
    check = run_cli("launch/query.py", "--store", store, "verify")
    assert check.returncode == 0, check.stdout + check.stderr
