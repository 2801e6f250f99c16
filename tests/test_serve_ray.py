"""serve-models as a Ray Serve application (slow suite; `make test-slow` installs the ray-serve extra):
a private local Ray, two replicas behind Ray's proxy, each following the same store."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys

import httpx
import numpy as np
import pytest

from helpers import REPO
from helpers.serving import MULTI_TASK, SINGLE_TASK, grow_serving_store, images, npy, probs_of
from helpers.service_procs import free_port
from helpers.swarm import ENV, wait_for

pytestmark = pytest.mark.slow
pytest.importorskip("ray.serve")

from agents.api import load_model  # noqa: E402
from benchmarks.serve_bench import republish  # noqa: E402
from store import Store  # noqa: E402


def test_two_ray_serve_replicas_answer_as_the_api_and_both_follow_the_store(tmp_path):
    store = str(tmp_path / "store")
    grow_serving_store(store)
    port = free_port()
    log = open(tmp_path / "serve_ray.log", "w")
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, "launch", "serve_ray.py"), "--store", store,
                             "--replicas", "2", "--port", str(port), "--poll", "0.5", "--ray-address", "local"],
                            cwd=REPO, env=ENV,
                            stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        line = proc.stdout.readline()
        assert re.search(rf"serving 2 tasks with 2 Ray Serve replicas on http://127\.0\.0\.1:{port}", line), \
            (line, open(tmp_path / "serve_ray.log").read()[-3000:])
        url = f"http://127.0.0.1:{port}"
        x = images(4, seed=5)
        for task in (SINGLE_TASK, MULTI_TASK):
            ref = load_model(store, task)
            r = httpx.post(f"{url}/v1/tasks/{task}/predict?top_k={ref.num_classes}", content=npy(x),
                           headers={"content-type": "application/x-npy"}, timeout=60)
            assert r.status_code == 200, r.text
            assert r.json()["model_id"] == ref.model_id
            assert np.allclose(probs_of(r.json()), ref.predict_proba(x), atol=1e-5)
        with Store.open(store) as st:
            new_id, _ = republish(st, SINGLE_TASK, 1)
        seen: dict[str, str] = {}

        def both_replicas_swapped() -> bool:
            r = httpx.post(f"{url}/v1/tasks/{SINGLE_TASK}/predict", content=npy(x[:1]),
                           headers={"content-type": "application/x-npy"}, timeout=60)
            seen[r.headers["x-served-by"]] = r.json()["model_id"]
            return len(seen) == 2 and set(seen.values()) == {new_id}

        wait_for(both_replicas_swapped, 120, "both Ray Serve replicas answering with the new model", every=0.05)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert code == 0, open(tmp_path / "serve_ray.log").read()[-3000:]
