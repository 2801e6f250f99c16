"""The continual-development report (`query.py report --out FILE.html` + FILE.json).

Fast tests use a store built through the Store API with trials whose numbers are known, and run
the report command as a user does (a subprocess). The slow test grows a real swarm (run_swarm.py
with the `test` preset, then attach.py with `test@base`) and checks that the report's numbers are
the store's.
The browser check runs only where Debian's chromium is installed.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from store import Store, TrialRecord
from report.build import action_family, build_report, parse_preset_name
from report.html import render_html
from helpers.store_records import lease, make_root, publish_next

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONDONTWRITEBYTECODE": "1"}
# Until launch/query.py lists the report subcommand, run it through the same parser and main().
_HARNESS = ("import sys; sys.path.insert(0, sys.argv[1]); from launch import query; "
            "from launch.report_cmd import register_report, cmd_report; "
            "names = [c.__name__ for _, c in query.SUBCOMMANDS]; "
            "'cmd_report' in names or query.SUBCOMMANDS.append((register_report, cmd_report)); "
            "sys.exit(query.main(sys.argv[2:]))")
ODD_TASK = "b<e&ta"  # a task name that must come out escaped in the HTML


def run_query(store: Path | str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", _HARNESS, str(REPO), "--store", str(store), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env=ENV)


def _trial(agent: str, task: str, tid: str, parent: str, *, score: float | None, quality: float,
           accepted: bool, mutations: list[str], images: int, seconds: float,
           flops: dict[str, int] | None = None) -> TrialRecord:
    return TrialRecord(id=f"{agent}:{tid}", agent=agent, task=task, cycle=2, generation=0,
                       parent=parent, model_id=None, mutations=mutations, hparams_diff={},
                       quality=quality, score=score, accepted=accepted, seconds=seconds,
                       train_images=images, preset="test+penalty", preset_hash="h1",
                       created_at=time.time(), **({"flops": flops} if flops is not None else {}))


def _tally(train: int, validation: int, cache_fill: int = 0) -> dict[str, int]:
    return {"train": train, "validation": validation, "cache_fill": cache_fill,
            "total": train + validation + cache_fill}


@pytest.fixture(scope="module")
def known_store(tmp_path_factory) -> Path:
    """alpha: root -> m0 -> m1 (preset test) plus three test+penalty trials on its models;
    beta (named ODD_TASK): m0 grown from alpha's m1 (a foreign parent)."""
    path = tmp_path_factory.mktemp("report") / "store"
    rng = np.random.default_rng(0)
    with Store.open(path, create=True) as st:
        root = make_root(st)
        alpha = "agent~alpha"
        token = lease(st, alpha, "alpha")
        publish_next(st, alpha, token, "alpha", 0, root, rng)
        publish_next(st, alpha, token, "alpha", 1, root, rng, parent=f"{alpha}:m0")
        st.commit(alpha, token, trials=[  # parents' recorded scores: m0 0.500, m1 0.501
            _trial(alpha, "alpha", "x0", f"{alpha}:m1", score=0.601, quality=0.7, accepted=True,
                   mutations=["add:residual_adapter_0", "hp:opt_lr"], images=100, seconds=1.0),
            _trial(alpha, "alpha", "x1", f"{alpha}:m1", score=None, quality=0.4, accepted=False,
                   mutations=["add:residual_adapter_1"], images=200, seconds=2.0),
            _trial(alpha, "alpha", "x2", f"{alpha}:m0", score=0.55, quality=0.55, accepted=True,
                   mutations=[], images=50, seconds=1.5)])
        beta = "agent~beta"
        token = lease(st, beta, ODD_TASK)
        publish_next(st, beta, token, ODD_TASK, 0, root, rng, parent=f"{alpha}:m1")
    return path


def recount(trials: list[TrialRecord]) -> tuple[dict, dict]:
    """Per preset and per (action family, preset): the counts the report must show."""
    per_preset: dict = defaultdict(lambda: {"trials": 0, "accepted": 0, "train_images": 0})
    per_action: dict = defaultdict(lambda: {"trials": 0, "accepted": 0, "train_images": 0})
    for t in trials:
        families = {a if a.startswith("hp:") else re.sub(r"_\d+$", "", a) for a in t.mutations}
        keys = [(t.preset, t.preset_hash, per_preset)] + \
            [(f, t.preset, t.preset_hash, per_action) for f in (families or {"(none)"})]
        for *key, table in keys:
            row = table[tuple(key)]
            row["trials"] += 1
            row["accepted"] += int(t.accepted)
            row["train_images"] += t.train_images
    return dict(per_preset), dict(per_action)


def check_counts_match_store(report: dict, store_path: Path) -> None:
    with Store.open(store_path, readonly=True) as st:
        trials = st.trials()
    per_preset, per_action = recount(trials)
    got = {(p["name"], p["hash"]): {k: p[k] for k in ("trials", "accepted", "train_images")}
           for p in report["presets"]}
    assert got == per_preset
    got = {(a["action"], a["preset"], a["hash"]): {"trials": a["children"], "accepted":
                                                   a["accepted"], "train_images": a["train_images"]}
           for a in report["actions"]}
    assert got == per_action
    assert report["summary"]["trials"] == len(trials)
    for p in report["presets"]:
        seconds = sum(t.seconds for t in trials if (t.preset, t.preset_hash) == (p["name"],
                                                                                 p["hash"]))
        assert math.isclose(p["seconds"], seconds, abs_tol=1e-3)


def check_self_contained(html: str) -> None:
    assert html.startswith("<!DOCTYPE html>") and html.rstrip().endswith("</html>")
    assert "<svg" in html
    lowered = html.lower()
    for forbidden in ("http://", "https://", "<script", "<link", "<img", "<iframe", "@import"):
        assert forbidden not in lowered, f"page refers to an outside resource ({forbidden})"


# ---- pure helpers -------------------------------------------------------------------------------

def test_action_families_and_preset_names():
    assert action_family("clone:encoderblock_11") == "clone:encoderblock"
    assert action_family("add:residual_adapter_0") == "add:residual_adapter"
    assert action_family("hp:ds_image_size") == "hp:ds_image_size"  # hparam names keep digits
    assert action_family("new:head") == "new:head"
    assert parse_preset_name("demo") == {"budget": "demo", "method": "default", "extensions": []}
    assert parse_preset_name("demo@base+autotune+penalty") == {
        "budget": "demo", "method": "base", "extensions": ["autotune", "penalty"]}


# ---- a store with known numbers -----------------------------------------------------------------

def test_report_numbers_of_a_known_store(known_store):
    with Store.open(known_store, readonly=True) as st:
        report = build_report(st)
    presets = {p["name"]: p for p in report["presets"]}
    base, pen = presets["test"], presets["test+penalty"]
    # test: alpha m0 (root parent), alpha m1 (gain 0.500 - 0.500), beta m0 (alpha's parent)
    assert (base["trials"], base["accepted"], base["accepted_foreign"], base["gain_n"]) == \
        (3, 3, 2, 1)
    assert base["mean_score_gain"] == pytest.approx(0.0)
    assert (base["train_images"], base["published"]) == (3 * 64, 3)
    assert base["method"] == "default" and base["extensions"] == []
    # test+penalty: +0.100 over m1 and +0.050 over m0; one child rejected
    assert (pen["trials"], pen["accepted"], pen["accepted_foreign"], pen["gain_n"]) == (3, 2, 0, 2)
    assert pen["acceptance_rate"] == pytest.approx(2 / 3)
    assert pen["mean_score_gain"] == pytest.approx(0.075)
    assert pen["mean_quality_gain"] == pytest.approx(((0.7 - 0.501) + (0.55 - 0.5)) / 2)
    assert (pen["train_images"], pen["seconds"], pen["published"]) == (350, 4.5, 0)
    assert pen["extensions"] == ["penalty"] and pen["best_score"] == {"alpha": 0.601}
    actions = {(a["action"], a["preset"]): a for a in report["actions"]}
    adapter = actions[("add:residual_adapter", "test+penalty")]
    assert (adapter["children"], adapter["accepted"], adapter["train_images"]) == (2, 1, 300)
    assert adapter["mean_score_gain"] == pytest.approx(0.1)
    assert actions[("(none)", "test+penalty")]["mean_score_gain"] == pytest.approx(0.05)
    assert actions[("clone:head", "test")]["children"] == 3

    tasks = {t["task"]: t for t in report["tasks"]}
    assert [n["model_id"] for n in tasks[ODD_TASK]["lineage"]] == \
        ["agent~beta:m0", "agent~alpha:m1", "agent~alpha:m0", "root:m0"]
    assert tasks["alpha"]["own_params"] + tasks["alpha"]["reused_params"] == \
        sum(c["params"] for c in report["sharing"]["components"] if "alpha" in c["used_by"])
    sharing = report["sharing"]
    shared = {c["id"] for c in sharing["components"] if len(c["used_by"]) == 2}
    assert shared == {"root:0", "root:1", "root:2"}  # the root layers both models reference
    assert [c["creator"] for c in sharing["components"]][:3] == ["root"] * 3
    for i, task in enumerate(sharing["tasks"]):
        assert sharing["matrix"][i] == [task in c["used_by"] for c in sharing["components"]]
    published = [e for e in report["timeline"]["alpha"] if e["kind"] == "published"]
    assert [e["score"] for e in published] == [0.5, 0.501]
    assert len(report["children"]["alpha"]) == 5


def test_report_command_writes_a_self_contained_page_and_its_json(known_store, tmp_path):
    out = tmp_path / "report.html"
    result = run_query(known_store, "report", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert result.stderr == "" and "report.json" in result.stdout
    html = out.read_text(encoding="utf-8")
    check_self_contained(html)
    assert html.count("<svg") >= 6  # overview, 2 task charts, grid, 2 lineages, bars
    assert "b&lt;e&amp;ta" in html and ODD_TASK not in html
    report = json.loads((tmp_path / "report.json").read_text())
    check_counts_match_store(report, known_store)
    assert {t["task"] for t in report["tasks"]} == {"alpha", ODD_TASK}


def test_report_command_user_errors_exit_2_with_one_line(known_store, tmp_path):
    cases = [("report", "--out", str(tmp_path / "missing" / "r.html")),
             ("report", "--out", str(tmp_path / "r.json")),
             ("report", "--out", str(tmp_path))]
    for args in cases:
        result = run_query(known_store, *args)
        assert result.returncode == 2, (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
        assert result.stderr.startswith("query.py: error: ")  # every entry point names itself
    result = run_query(tmp_path / "nostore", "report", "--out", str(tmp_path / "r.html"))
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "nostore").exists() and not list(tmp_path.glob("r.*"))


def test_report_of_an_empty_store(tmp_path):
    path = tmp_path / "empty"
    Store.open(path, create=True).close()
    result = run_query(path, "report", "--out", str(tmp_path / "e.html"))
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "e.json").read_text())
    assert report["tasks"] == [] and report["presets"] == [] and report["actions"] == []
    assert "No task has a published model yet" in (tmp_path / "e.html").read_text()


def test_report_shows_training_flops_and_dashes_where_unknown(tmp_path):
    """gamma: every child recorded its FLOPs; delta: its one child did not (an older store)."""
    path = tmp_path / "store"
    rng = np.random.default_rng(0)
    with Store.open(path, create=True) as st:
        root = make_root(st)
        gamma = "agent~gamma"
        token = lease(st, gamma, "gamma")
        publish_next(st, gamma, token, "gamma", 0, root, rng, flops=_tally(3 * 10**9, 10**9))
        st.commit(gamma, token, trials=[
            _trial(gamma, "gamma", "x0", f"{gamma}:m0", score=0.6, quality=0.6, accepted=True,
                   mutations=["hp:opt_lr"], images=100, seconds=1.0,
                   flops=_tally(2 * 10**9, 5 * 10**8, 5 * 10**8)),
            _trial(gamma, "gamma", "x1", f"{gamma}:m0", score=None, quality=0.4, accepted=False,
                   mutations=["hp:opt_lr"], images=100, seconds=1.0, flops=_tally(10**9, 0))])
        delta = "agent~delta"
        publish_next(st, delta, lease(st, delta, "delta"), "delta", 0, root, rng)
        report = build_report(st)
    tasks = {t["task"]: t for t in report["tasks"]}
    assert (tasks["gamma"]["children"], tasks["gamma"]["accepted"], tasks["gamma"]["train_images"]) == \
        (3, 2, 264)
    assert tasks["gamma"]["train_flops"] == 8 * 10**9
    assert tasks["gamma"]["flops_per_accepted_child"] == pytest.approx(4e9)
    assert tasks["delta"]["train_flops"] is None and tasks["delta"]["flops_per_accepted_child"] is None
    presets = {p["name"]: p for p in report["presets"]}
    assert presets["test"]["train_flops"] is None  # delta's child recorded none
    assert presets["test+penalty"]["train_flops"] == 4 * 10**9
    assert presets["test+penalty"]["flops_per_accepted_child"] == pytest.approx(4e9)
    actions = {(a["action"], a["preset"]): a for a in report["actions"]}
    assert actions[("hp:opt_lr", "test+penalty")]["train_flops"] == 4 * 10**9
    html = render_html(report)
    check_self_contained(html)
    assert "train FLOPs" in html and "FLOPs / accepted" in html
    assert "<td class='n'>8G</td><td class='n'>4G</td>" in html          # gamma's leaderboard row
    assert "<td class='n'>–</td><td class='n'>–</td>" in html            # delta's: unknown
    assert "train FLOPs per accepted child" in html


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed")
def test_page_renders_in_headless_chromium(known_store, tmp_path):
    out = tmp_path / "page.html"
    assert run_query(known_store, "report", "--out", str(out)).returncode == 0
    png = tmp_path / "page.png"
    result = subprocess.run([str(REPO / "scripts" / "screenshot_report.sh"), str(out), str(png),
                             "1000", "1600"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    data = png.read_bytes()
    assert _png_size(data) == (1000, 1600)
    assert len(data) > 40_000  # a blank page of this size compresses to a few kB


# ---- a real swarm -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def swarm_store(tmp_path_factory) -> Path:
    """Two tasks grown by run_swarm.py (test preset), then a third attached with test@base."""
    path = tmp_path_factory.mktemp("swarm") / "store"
    for script, *args in (("run_swarm.py", "--tasks", "uci_digits,glyphs_latin", "--preset",
                           "test", "--cycles", "1", "--refresh", "5"),
                          ("attach.py", "--task", "glyphs_greek", "--preset", "test@base",
                           "--cycles", "1")):
        result = subprocess.run([sys.executable, str(REPO / "launch" / script), "--store",
                                 str(path), *args], capture_output=True, text=True, timeout=240,
                                cwd=REPO, env=ENV)
        assert result.returncode == 0, f"{script} failed:\n{result.stdout[-2000:]}" \
                                       f"\n{result.stderr[-2000:]}"
    return path


@pytest.mark.slow
def test_report_of_a_real_swarm(swarm_store, tmp_path):
    out = tmp_path / "swarm.html"
    result = run_query(swarm_store, "report", "--out", str(out))
    assert result.returncode == 0, result.stderr
    check_self_contained(out.read_text(encoding="utf-8"))
    report = json.loads((tmp_path / "swarm.json").read_text())
    check_counts_match_store(report, swarm_store)
    assert {p["name"] for p in report["presets"]} == {"test", "test@base"}
    assert {p["name"]: p["method"] for p in report["presets"]} == {"test": "default",
                                                                    "test@base": "base"}
    with Store.open(swarm_store, readonly=True) as st:
        published = st.published_models()
        root_id = st.root_model_id()
        store_trials = st.trials()
    rows = {t["task"]: t for t in report["tasks"]}
    assert set(rows) == set(published) == {"uci_digits", "glyphs_latin", "glyphs_greek"}
    for task, model in published.items():
        row = rows[task]
        assert (row["model_id"], row["score"], row["preset"]) == \
            (model.id, model.metrics["score"], model.preset)
        lineage = [n["model_id"] for n in row["lineage"]]
        assert lineage[0] == model.id and lineage[-1] == root_id
        assert row["own_params"] + row["reused_params"] == model.metrics["params"]
        # every child of a real swarm records its FLOPs; the row sums them
        trials = [t for t in store_trials if t.task == task]
        assert row["train_flops"] == sum(t.flops["total"] for t in trials) > 0
        assert row["train_images"] == sum(t.train_images for t in trials)
        used = {c["id"] for c in report["sharing"]["components"] if task in c["used_by"]}
        assert used == set(model.components)
    # the attached task starts from the system: its first parent is another model
    assert len(rows["glyphs_greek"]["lineage"]) >= 2


def test_one_low_outlier_does_not_flatten_a_chart():
    from report.svg import robust_range

    scores = [0.90 + 0.002 * i for i in range(40)] + [0.05]  # one child near chance
    lo, hi = robust_range(scores)
    assert 0.85 < lo < 0.90 and hi > 0.978  # the axis follows the 40, not the outlier
    lo, hi = robust_range([0.05, 0.5, 0.9])  # too few points to call anything an outlier
    assert lo < 0.05 and hi > 0.9
    lo, hi = robust_range([0.2 + 0.02 * i for i in range(30)])  # a spread, no outlier: all of it
    assert lo < 0.2
