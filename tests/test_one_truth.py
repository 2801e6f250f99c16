"""One store, every view: the leaderboard (table and --json), the agents view, the live table and the
report (JSON and HTML) use the same names and the same numbers for the same thing."""
from __future__ import annotations

import io
import json
import re

import pytest
from helpers.swarm import run_cli

from launch.progress import ProgressView
from report.leaderboard import EXTRA_KEYS, LEADERBOARD_KEYS

TASKS = ("uci_digits", "glyphs_greek")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("truth") / "store")
    r = run_cli("launch/run_swarm.py", "--store", path, "--tasks", ",".join(TASKS), "--preset", "test",
                "--cycles", "2", "--refresh", "0.5", timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return path


def _json(store: str, *args: str):
    r = run_cli("launch/query.py", "--store", store, *args)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_every_view_of_one_store_agrees_field_by_field(store, tmp_path):
    board = {row["task"]: row for row in _json(store, "leaderboard", "--json")}
    assert sorted(board) == sorted(TASKS)

    # the report's JSON: the leaderboard's fields, same names, same values
    html = tmp_path / "report.html"
    assert run_cli("launch/query.py", "--store", store, "report", "--out", str(html)).returncode == 0
    report = {t["task"]: t for t in json.loads((tmp_path / "report.json").read_text())["tasks"]}
    for task, row in board.items():
        for key in (*LEADERBOARD_KEYS, *EXTRA_KEYS):
            assert report[task][key] == row[key], (task, key)

    # the leaderboard table: the same numbers, as printed
    lines = run_cli("launch/query.py", "--store", store, "leaderboard").stdout.splitlines()
    head = lines[0].split()
    for line in lines[2:]:
        cells = dict(zip(head, line.split()))
        row = board[cells["task"]]
        assert cells["model"] == row["model_id"] and cells["kind"] == row["kind"]
        assert cells["score"] == f"{row['score']:.4f}" and cells["test_q"] == f"{row['test_quality']:.4f}"
        assert int(cells["cycles"]) == row["cycles"] and int(cells["model_cycle"]) == row["model_cycle"]

    # the report's HTML leaderboard: the same cells, in the same order
    text = html.read_text()
    for task, row in board.items():
        cells = re.search(rf"<tr><td[^>]*>(?:(?!</tr>).)*?<b>{task}</b>.*?</tr>", text, re.S).group(0)
        values = [re.sub("<[^>]+>", "", c).strip() for c in re.findall(r"<td[^>]*>(.*?)</td>", cells, re.S)]
        assert values[0] == task and values[2] == row["kind"]
        assert f"title='{row['model_id']}'" in cells  # the model cell: short text, full id on hover
        assert values[4:7] == [f"{row['score']:.4f}", f"{row['quality']:.4f}", f"{row['test_quality']:.4f}"]
        assert values[14:16] == [str(row["cycles"]), str(row["model_cycle"])]

    # the agents view and the live table read the same heartbeats and states
    agents = {a["task"]: a for a in _json(store, "agents", "--json")}
    view = ProgressView(store, [(t, "single") for t in TASKS], io.StringIO())
    try:
        live = {r[0]: r for r in view.rows({})}
    finally:
        view.close()
    for task, row in board.items():
        a = agents[task]
        assert a["agent_id"] == row["agent_id"] and a["cycle"] == row["cycles"]
        assert live[task][2] == f"{a['cycle']}/{a['cycles']}"  # the live table's cycle column
        assert live[task][4] == f"{row['score']:.4f}" and live[task][6] == f"{row['test_quality']:.4f}"
