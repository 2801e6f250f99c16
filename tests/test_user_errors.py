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
