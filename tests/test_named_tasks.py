"""Named user tasks: NAME=npz:PATH / NAME=folder:PATH. The name is the task's identity in the store,
the views and the export; the data are recorded by content, so a moved file resumes and other data
under the same name are refused; bad names are one line and exit 2."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from helpers.swarm import read, run_cli

from agents.agent import agent_id_for
from taskdata import TaskDataError, load_task, parse_task_spec


def _npz(path, seed: int) -> str:
    """A small digits-like task of the user's own (uci_digits' images, relabelled by parity)."""
    data = load_task("uci_digits")
    rng = np.random.default_rng(seed)
    keep = rng.permutation(len(data.train_y))[:300]
    np.savez(path, x_train=data.train_x[keep][..., 0], y_train=data.train_y[keep] % 2,
             x_val=data.val_x[:100][..., 0], y_val=data.val_y[:100] % 2,
             x_test=data.test_x[:150][..., 0], y_test=data.test_y[:150] % 2)
    return str(path)


def test_parse_task_spec_names_and_rejects():
    assert parse_task_spec("mine=npz:/d/x.npz") == ("mine", "npz:/d/x.npz")
    assert parse_task_spec("my.set-2=folder:/d") == ("my.set-2", "folder:/d")
    assert parse_task_spec("npz:/d/a=b.npz") == ("npz:/d/a=b.npz", "npz:/d/a=b.npz")  # unnamed, as before
    assert parse_task_spec("mnist5k") == ("mnist5k", "mnist5k")
    for bad in ("bad name=npz:/x", "=npz:/x", "mnist5k=npz:/x", "glyphs_mine=npz:/x", "root=npz:/x",
                "a:b=npz:/x", "x=mnist5k", "x=", "a~b=npz:/x"):
        with pytest.raises(TaskDataError):
            parse_task_spec(bad)


def test_a_named_task_is_its_name_everywhere_resumes_after_a_move_and_refuses_other_data(tmp_path):
    first = _npz(tmp_path / "mine.npz", seed=0)
    store = str(tmp_path / "store")
    r = run_cli("launch/run_swarm.py", "--store", store, "--tasks", f"parity=npz:{first}", "--preset",
                "test", "--cycles", "1", "--refresh", "0.5", timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    aid = agent_id_for("parity")
    assert aid == "agent~parity"
    rows = json.loads(run_cli("launch/query.py", "--store", store, "leaderboard", "--json").stdout)
    assert [row["task"] for row in rows] == ["parity"] and rows[0]["agent_id"] == aid
    state = read(store, lambda s: s.get_agent_state(aid))
    assert state.task == "parity" and state.source["spec"] == f"npz:{first}"
    assert state.source["fingerprint"] == load_task(f"npz:{first}").fingerprint()
    out = str(tmp_path / "m.safetensors")
    assert run_cli("launch/query.py", "--store", store, "export", "parity", "--out", out).returncode == 0
    from safetensors import safe_open

    with safe_open(out, framework="np") as f:
        assert f.metadata()["task"] == "parity"
    # --kind reaches the model that agent kind published (single: also while a multipath one serves)
    r = run_cli("launch/query.py", "--store", store, "export", "parity", "--kind", "single", "--out", out)
    assert r.returncode == 0 and rows[0]["model_id"] in r.stdout, r.stderr
    r = run_cli("launch/query.py", "--store", store, "export", "parity", "--kind", "multipath", "--out", out)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "no published multipath model" in r.stderr

    # the file moves: the same name resumes from the store
    moved = str(tmp_path / "elsewhere" / "renamed.npz")
    os.makedirs(os.path.dirname(moved))
    shutil.move(first, moved)
    r = run_cli("launch/attach.py", "--store", store, "--task", f"parity=npz:{moved}", "--preset", "test",
                "--cycles", "2", "--threads", "1", timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    state = read(store, lambda s: s.get_agent_state(aid))
    assert state.cycle == 2 and state.source["spec"] == f"npz:{moved}"
    assert {t.cycle for t in read(store, lambda s: s.trials(agent=aid))} == {0, 1}
    # by its name alone: the store knows where its data was last read
    r = run_cli("launch/attach.py", "--store", store, "--task", "parity", "--preset", "test",
                "--cycles", "3", "--threads", "1", timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert f"npz:{moved}" in r.stderr
    state = read(store, lambda s: s.get_agent_state(aid))
    assert state.cycle == 3 and state.source["spec"] == f"npz:{moved}"

    # other data under that name: refused in one line, nothing written
    other = _npz(tmp_path / "other.npz", seed=1)
    before = read(store, lambda s: (s.get_agent_state(aid), len(s.trials())))
    for cmd in (["launch/attach.py", "--store", store, "--task", f"parity=npz:{other}", "--preset",
                 "test", "--cycles", "4"],
                ["launch/run_swarm.py", "--store", store, "--tasks", f"parity=npz:{other}", "--preset",
                 "test", "--cycles", "4"]):
        r = run_cli(*cmd, timeout=300)
        assert r.returncode == 2, r.stderr[-2000:]
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "other data" in lines[0] and "another name" in lines[0], r.stderr
    assert read(store, lambda s: (s.get_agent_state(aid), len(s.trials()))) == before


@pytest.mark.parametrize("spec", ["bad name=npz:/x.npz", "mnist5k=npz:/x.npz", "x=uci_digits"])
def test_bad_task_names_are_one_line_and_exit_2(tmp_path, spec):
    store = str(tmp_path / "store")
    for cmd in (["launch/run_swarm.py", "--store", store, "--tasks", spec],
                ["launch/attach.py", "--store", store, "--task", spec]):
        r = run_cli(*cmd, timeout=120)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, (cmd, r.stderr)
        assert "Traceback" not in r.stderr
