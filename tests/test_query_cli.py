"""launch/query.py as a user runs it: real subprocesses on stores built through the Store API."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import lmdb
import numpy as np
import pytest

from helpers.store_records import lease, make_root, publish_next
from store import Store

REPO = Path(__file__).resolve().parent.parent
QUERY = REPO / "launch" / "query.py"
LEADERBOARD_KEYS = {"task", "model_id", "agent_id", "score", "quality", "test_quality", "params",
                    "accounted_params", "flops", "num_layers", "adapter_layers", "image_size",
                    "cycles", "parent_id", "updated_at"}


def run_query(store: Path | str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run([sys.executable, str(QUERY), "--store", str(store), *args],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env)


@pytest.fixture(scope="module")
def two_tasks(tmp_path_factory) -> Path:
    """A store with a root and two published tasks (alpha: 2 publishes, beta: 1)."""
    path = tmp_path_factory.mktemp("cli") / "store"
    with Store.open(path, create=True) as st:
        root = make_root(st)
        rng = np.random.default_rng(0)
        token = lease(st, "agent_alpha", "alpha")
        publish_next(st, "agent_alpha", token, "alpha", 0, root, rng)
        publish_next(st, "agent_alpha", token, "alpha", 1, root, rng, parent="agent_alpha:m0")
        token = lease(st, "agent_beta", "beta")
        publish_next(st, "agent_beta", token, "beta", 0, root, rng)
    return path


@pytest.fixture
def empty_store(tmp_path) -> Path:
    path = tmp_path / "empty"
    Store.open(path, create=True).close()
    return path


def test_leaderboard_of_an_empty_store(empty_store):
    result = run_query(empty_store, "leaderboard", "--json")
    assert result.returncode == 0 and json.loads(result.stdout) == []
    result = run_query(empty_store, "leaderboard")
    assert result.returncode == 0 and result.stdout.splitlines()[0].split()[0] == "task"
    assert result.stderr == ""


def test_leaderboard_json_and_table(two_tasks):
    rows = json.loads(run_query(two_tasks, "leaderboard", "--json").stdout)
    assert [r["task"] for r in rows] == ["alpha", "beta"]
    assert all(LEADERBOARD_KEYS <= set(r) for r in rows)
    alpha = rows[0]
    assert alpha["model_id"] == "agent_alpha:m1" and alpha["agent_id"] == "agent_alpha"
    assert alpha["parent_id"] == "agent_alpha:m0" and alpha["image_size"] == 32
    assert alpha["cycles"] == 1 and alpha["num_layers"] == 2 and alpha["params"] == 1234
    assert alpha["score"] == pytest.approx(0.501) and alpha["test_quality"] is None
    assert alpha["flops"] is None and isinstance(alpha["updated_at"], float)

    lines = run_query(two_tasks, "leaderboard").stdout.splitlines()
    assert lines[0].split()[:4] == ["task", "model", "kind", "score"]
    assert alpha["kind"] == "single" and alpha["borrows"] == [] and set(alpha["kinds"]) == {"single"}
    assert [line.split()[0] for line in lines[2:]] == ["alpha", "beta"]
    assert lines[2].index(" agent_alpha:m1 ") == lines[0].index(" model ")  # aligned
    # sharing columns: both tasks use the root's first three components, nobody reuses a task's own
    assert alpha["shared_components"] == 3 and alpha["foreign_components"] == 0


def test_show_lists_components_and_their_sharing(two_tasks):
    info = json.loads(run_query(two_tasks, "show", "alpha", "--json").stdout)
    assert info["model"]["id"] == "agent_alpha:m1" and info["task"]["num_classes"] == 3
    comps = info["components"]
    assert [c["id"] for c in comps] == ["root:0", "root:1", "root:2", "agent_alpha:3",
                                        "agent_alpha:2"]
    assert comps[0]["shared_with"] == ["beta"] and comps[-1]["shared_with"] == []
    assert comps[0]["agent"] == "root" and comps[0]["params"] == 16 * 16 + 16
    assert comps[-1]["params"] == 3 * 64 + 3 and comps[-1]["has_momentum"]

    text = run_query(two_tasks, "show", "beta").stdout
    assert "agent_beta:m0" in text and "ds_image_size" in text and "root:0" in text
    assert "alpha" in text  # the shared root components are also used by alpha


def test_unknown_task_is_a_user_error(two_tasks):
    result = run_query(two_tasks, "show", "gamma")
    assert result.returncode == 2 and result.stdout == ""
    assert len(result.stderr.splitlines()) == 1 and "gamma" in result.stderr
    assert "alpha, beta" in result.stderr


def test_not_a_store_is_one_line_and_creates_nothing(tmp_path):
    missing = tmp_path / "nothing-here"
    for command in (["leaderboard"], ["gc"]):  # read-only and writable opens
        result = run_query(missing, *command)
        assert result.returncode == 2, command
        assert len(result.stderr.splitlines()) == 1 and "not a munet-swarm store" in result.stderr
        assert "Traceback" not in result.stderr
    assert not missing.exists()


def test_bad_flag_exits_2(two_tasks):
    result = run_query(two_tasks, "leaderboard", "--nope")
    assert result.returncode == 2 and "Traceback" not in result.stderr


def test_verify_ok_then_corrupted(tmp_path, two_tasks):
    result = run_query(two_tasks, "verify")
    assert result.returncode == 0
    assert result.stdout.strip() == "ok: 16 blobs, 11 components, 4 models verified"

    path = tmp_path / "corrupt"
    with Store.open(path, create=True) as st:
        root = make_root(st)
        key = st.get_component(root.components[1]).tensors["weight"]
    env = lmdb.open(str(path), max_dbs=16, map_size=2**30)
    blobs = env.open_db(b"blobs")
    with env.begin(write=True) as txn:
        value = bytes(txn.get(key.encode(), db=blobs))
        txn.put(key.encode(), value[:-4] + b"\0\0\0\1", db=blobs)
    env.close()
    result = run_query(path, "verify")
    assert result.returncode == 1 and key in result.stdout and "FAILED" in result.stderr


def test_events_and_after(two_tasks):
    lines = run_query(two_tasks, "events").stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["1", "2", "3", "4"]
    assert lines[0].split()[3] == "root" and lines[3].split()[3:] == ["published", "beta",
                                                                     "agent_beta", "agent_beta:m0"]
    events = [json.loads(x) for x in run_query(two_tasks, "events", "--after", "2",
                                               "--json").stdout.splitlines()]
    assert [e["seq"] for e in events] == [3, 4] and events[0]["model_id"] == "agent_alpha:m1"


def test_events_follow_prints_new_events_and_stops_cleanly_on_ctrl_c(tmp_path):
    path = tmp_path / "store"
    with Store.open(path, create=True) as st:
        root = make_root(st)
    proc = subprocess.Popen([sys.executable, str(QUERY), "--store", str(path), "events",
                             "--follow"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=REPO)
    try:
        first = proc.stdout.readline().split()
        assert first[0] == "1" and first[3] == "root", first
        with Store.open(path) as st:  # a real publish while the follower runs
            publish_next(st, "a", lease(st, "a", "t"), "t", 0, root, np.random.default_rng(0))
        second = proc.stdout.readline().split()  # blocks until the poll picks it up
        assert second[0] == "2" and second[3:] == ["published", "t", "a", "a:m0"], second
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert proc.returncode == 0 and "Traceback" not in err


def test_stats_and_gc(tmp_path):
    path = tmp_path / "store"
    with Store.open(path, create=True) as st:
        make_root(st)
    info = json.loads(run_query(path, "stats", "--json").stdout)
    assert info["counts"]["models"] == 1 and info["counts"]["events"] == 1
    assert "models" in run_query(path, "stats").stdout
    counts = json.loads(run_query(path, "gc", "--grace", "0", "--json").stdout)
    assert counts == {"models": 0, "components": 0, "blobs": 0, "bytes_freed": 0}
    result = run_query(path, "gc")
    assert result.returncode == 0 and result.stdout.startswith("gc: removed 0 models")


def _query_in_fresh_interpreter(*args: str) -> tuple[object, str, str]:
    """(exit code, 'torch? timm?' line, stderr) of query.py run in a fresh interpreter."""
    code = ("import runpy, sys\n"
            f"sys.argv = ['query.py', *{list(args)!r}]\n"
            "try:\n"
            f"    runpy.run_path({str(QUERY)!r}, run_name='__main__')\n"
            "except SystemExit as exc:\n"
            "    print(exc.code)\n"
            "print('torch' in sys.modules, 'timm' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60, cwd=REPO)
    lines = result.stdout.splitlines()
    return (lines[-2] if len(lines) >= 2 else None), (lines[-1] if lines else ""), result.stderr


def test_query_does_not_import_torch(two_tasks):
    code, imported, err = _query_in_fresh_interpreter("--store", str(two_tasks), "leaderboard")
    assert (code, imported) == ("0", "False False"), err


def test_query_errors_do_not_import_torch_either(two_tasks, tmp_path):
    """The error path is the one that must stay light: a host with only the store client reports a
    wrong path in one line, without loading the agent stack (the report imports agents.registry)."""
    for args in (["--store", str(tmp_path / "nowhere"), "agents"],
                 ["--store", str(two_tasks), "show", "no_such_task"],
                 ["--store", str(two_tasks), "report", "--out", str(tmp_path / "x" / "r.html")]):
        code, imported, err = _query_in_fresh_interpreter(*args)
        assert (code, imported) == ("2", "False False"), (args, err)
        assert len(err.strip().splitlines()) == 1, err


def test_cycles_is_how_far_the_task_came_model_cycle_is_the_models_age(tmp_path):
    """An agent that ran 4 cycles without beating its cycle-1 model: cycles 4, model_cycle 1."""
    import time

    from store import AgentState

    path = tmp_path / "store"
    with Store.open(path, create=True) as st:
        root = make_root(st)
        token = lease(st, "agent_gamma", "gamma")
        publish_next(st, "agent_gamma", token, "gamma", 0, root, np.random.default_rng(0))
        for cycle in (2, 3, 4):  # later cycles end without a better model: only the state moves
            st.commit("agent_gamma", token, state=AgentState(
                agent_id="agent_gamma", task="gamma", cycle=cycle, generation=0,
                population=["agent_gamma:m0"], best_model_id="agent_gamma:m0", next_component_id=9,
                next_model_id=5, offsprings={"agent_gamma:m0": 3}, updated_at=time.time()),
                      event_kind="cycle_end", event_data={"cycle": cycle})
    row = json.loads(run_query(path, "leaderboard", "--json").stdout)[0]
    assert row["cycles"] == 4 and row["model_cycle"] == 1
    table = run_query(path, "leaderboard").stdout.splitlines()
    header, line = table[0].split(), table[2].split()
    assert line[header.index("cycles")] == "4" and line[header.index("model_cycle")] == "1"
    shown = json.loads(run_query(path, "show", "gamma", "--json").stdout)
    assert shown["cycles"] == 4 and shown["model_cycle"] == 1
    assert "completed 4 cycle(s); this model was made in cycle 1" in run_query(path, "show", "gamma").stdout


def test_agents_and_trials_views(two_tasks):
    rows = json.loads(run_query(two_tasks, "agents", "--json").stdout)
    assert [r["task"] for r in rows] == ["alpha", "beta"]
    for key in ("agent_id", "state", "host", "pid", "device", "heartbeat_age_s", "lease_expires_in_s",
                "cycle", "generation", "children", "accepted", "children_per_min", "preset"):
        assert key in rows[0], key
    assert rows[0]["cycle"] == 1 and rows[1]["cycle"] == 0
    trials = json.loads(run_query(two_tasks, "trials", "--json").stdout)
    assert [t["id"] for t in trials] == ["agent_alpha:t0", "agent_alpha:t1", "agent_beta:t0"]
    last = json.loads(run_query(two_tasks, "trials", "alpha", "--last", "1", "--json").stdout)
    assert [t["id"] for t in last] == ["agent_alpha:t1"] and last[0]["parent"] == "agent_alpha:m0"
    assert {"parent", "mutations", "quality", "score", "accepted", "seconds", "train_images",
            "preset"} <= set(last[0])
    assert last[0]["evals"] == [0.25, 0.5] and last[0]["parent_quality"] == 0.4
    table = run_query(two_tasks, "trials", "alpha").stdout
    assert "_# 0.500" in table and "parent_q" in table  # the learning curve, and the re-scored parent
    bad = run_query(two_tasks, "trials", "nope")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
    assert run_query(two_tasks, "trials", "alpha", "--last", "0").stdout.startswith("(no trials yet)")


def test_show_on_a_store_missing_a_component_says_so_in_one_line(two_tasks, tmp_path):
    """A damaged store (a component deleted under a published model): one line and exit 1."""
    import shutil

    damaged = tmp_path / "damaged"
    shutil.copytree(two_tasks, damaged)
    with Store.open(damaged) as st:
        cid = st.get_model(st.get_task("beta").model_id).components[-1]
        with st._write() as txn:  # the damage a disk fault or a foreign writer could do
            txn.delete(cid.encode(), db=st._dbs.components)
    result = run_query(damaged, "show", "beta")
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and cid in lines[0] and "verify" in lines[0] and "Traceback" not in result.stderr

