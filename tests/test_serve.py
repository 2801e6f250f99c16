"""serve-models: a real uvicorn on a free port, a real HTTP client, a real grown store.

The store is grown once for the module: two tasks' single-path agents ran one cycle of the test
preset, then a multipath agent for one of them (which then serves it: a better validation score), so
the served system holds a single-path model, a multipath model, and a path the two share.
"""
from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
import torch

from agents.api import load_model
from agents.serving.loader import ModelLoader
from agents.serving.plan import Plan
from agents.serving.server import MicroBatcher, ModelServer
from benchmarks.serve_bench import republish
from helpers import REPO
from helpers.serving import MULTI_TASK, SINGLE_TASK, grow_serving_store, images, npy, probs_of
from helpers.swarm import ENV, wait_for
from store import Store

TOKEN = "s3cret-token-for-tests-0123"


@pytest.fixture(scope="module")
def grown(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("serve") / "store")
    grow_serving_store(path)
    return path


@pytest.fixture()
def store_path(grown, tmp_path):
    path = str(tmp_path / "store")
    shutil.copytree(grown, path)
    return path


class Served:
    def __init__(self, store: str, *flags: str, log: str) -> None:
        self.proc = subprocess.Popen([sys.executable, os.path.join(REPO, "launch", "serve_models.py"),
                                      "--store", store, "--port", "0", "--threads", "1", *flags],
                                     cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=open(log, "w"),
                                     text=True)
        self.line = self.proc.stdout.readline()
        m = re.search(r"http://([^ ]+):(\d+)", self.line)
        assert m, (self.line, open(log).read())
        self.url = f"http://127.0.0.1:{m.group(2)}"
        self.client = httpx.Client(base_url=self.url, timeout=60)

    def stop(self) -> int:
        self.client.close()
        self.proc.terminate()
        return self.proc.wait(30)


@pytest.fixture()
def serve(tmp_path):
    started: list[Served] = []

    def start(store: str, *flags: str) -> Served:
        s = Served(store, *flags, log=str(tmp_path / f"serve{len(started)}.log"))
        started.append(s)
        return s

    yield start
    for s in started:
        if s.proc.poll() is None:
            s.stop()


def png(a: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a).save(buf, format="PNG")
    return buf.getvalue()


# ---- the engine, in process ---------------------------------------------------------------------

def test_the_prefix_tree_runs_a_shared_path_once_and_matches_per_task_forwards(grown):
    x = images(12, seed=3)
    with Store.open(grown, readonly=True) as st:
        loader = ModelLoader(st, torch.device("cpu"))
        served = {p.task: loader.load(p) for p in st.tasks()}
    plan = Plan(served)
    multi = served[MULTI_TASK]
    # the multipath model's borrowed path is the other task's served model: one set of nodes
    own = sum(len(p.stage_keys) for m in served.values() for p in m.paths)
    assert len(plan.nodes()) < own
    flops = plan.flops()
    assert flops["bound"] > 1.0 and flops["separate"] == pytest.approx(
        sum(m.info.flops_per_image for m in served.values()))
    # each task on a different subset of the batch, one of them with an odd image size
    mixed = list(x) + [images(1, size=17, seed=9)[0]]
    rows = {SINGLE_TASK: np.array([0, 2, 3, 12]), MULTI_TASK: np.arange(0, 13, 3)}
    got = plan.run(mixed, rows, torch.device("cpu"))
    for task, want in rows.items():
        ref = load_model(grown, task)
        assert ref.model_id == served[task].info.model_id
        expect = torch.cat([ref.logits(mixed[i][None]) for i in want])
        assert torch.allclose(got[task], expect, atol=1e-5), task
    assert multi.info.kind == "multipath" and multi.info.borrows


def test_a_swap_leaves_a_running_batch_on_its_plan_and_names_the_new_model_after(store_path):
    # the writable store first: one process may not open a store read-only and then writable
    with Store.open(store_path) as st:
        server = ModelServer(store_path, poll_s=0.1, use_bus=False).start()
        batcher = MicroBatcher(server, max_batch=8, max_wait_s=0.0)
        try:
            before = server.plan
            first = batcher.submit(list(images(2)), [SINGLE_TASK]).result(30)[SINGLE_TASK]
            new_id, _ = republish(st, SINGLE_TASK, 1)
            wait_for(lambda: server.plan.models[SINGLE_TASK].info.model_id == new_id, 30, "the swap")
            assert server.swaps == 1 and server.plan.version == before.version + 1
            after = batcher.submit(list(images(2)), [SINGLE_TASK]).result(30)[SINGLE_TASK]
            assert first.model_id == before.models[SINGLE_TASK].info.model_id and after.model_id == new_id
            assert not np.allclose(first.probs, after.probs)  # the new head really answers
            # the old plan still answers for its own model (a batch that started on it ends on it)
            old = before.run(list(images(2)), {SINGLE_TASK: np.arange(2)}, torch.device("cpu"))
            assert torch.allclose(torch.softmax(old[SINGLE_TASK], -1), torch.from_numpy(first.probs), atol=1e-6)
            # unchanged tasks keep their loaded model (no reload, same tensors)
            assert server.plan.models[MULTI_TASK] is before.models[MULTI_TASK]
        finally:
            batcher.close()
            server.close()


# ---- over HTTP ------------------------------------------------------------------------------------

def test_tasks_and_predictions_over_http_equal_the_python_api(grown, serve):
    s = serve(grown)
    assert re.match(r"serving 2 tasks on http://127\.0\.0\.1:\d+ \(device cpu\)", s.line)
    listed = s.client.get("/v1/tasks").json()["tasks"]
    by_task = {t["task"]: t for t in listed}
    with Store.open(grown, readonly=True) as st:
        assert {t: p.model_id for t, p in ((p.task, p) for p in st.tasks())} == \
            {t: v["model_id"] for t, v in by_task.items()}
    assert by_task[MULTI_TASK]["kind"] == "multipath" and by_task[SINGLE_TASK]["kind"] == "single"
    assert s.client.get(f"/v1/tasks/{SINGLE_TASK}").json() == by_task[SINGLE_TASK]
    for task, info in by_task.items():  # the agents recorded their tasks' class names
        assert len(info["labels"]) == info["num_classes"], task
    x = images(5, seed=7)
    for task in (SINGLE_TASK, MULTI_TASK):
        ref = load_model(grown, task)
        k = ref.num_classes
        want = ref.predict_proba(x)
        by_npy = s.client.post(f"/v1/tasks/{task}/predict?top_k={k}", content=npy(x),
                               headers={"content-type": "application/x-npy"}).json()
        files = [("image", (f"{i}.png", png(a), "image/png")) for i, a in enumerate(x)]
        by_png = s.client.post(f"/v1/tasks/{task}/predict", files=files, data={"top_k": str(k)}).json()
        by_json = s.client.post(f"/v1/tasks/{task}/predict", json={
            "images": [base64.b64encode(png(a)).decode() for a in x], "top_k": k}).json()
        for answer in (by_npy, by_png, by_json):
            assert answer["model_id"] == ref.model_id
            assert np.allclose(probs_of(answer), want, atol=1e-5)
            assert [p["label"] for p in answer["predictions"]] == list(want.argmax(1))
            assert [p["name"] for p in answer["predictions"]] == [by_task[task]["labels"][i] for i in want.argmax(1)]
    # all tasks at once: each answer is what the task's own endpoint gives
    both = s.client.post("/v1/predict?top_k=3", content=npy(x), headers={"content-type": "application/x-npy"}).json()
    assert set(both["tasks"]) == {SINGLE_TASK, MULTI_TASK} and both["images"] == 5
    for task, answer in both["tasks"].items():
        alone = s.client.post(f"/v1/tasks/{task}/predict?top_k=3", content=npy(x),
                              headers={"content-type": "application/x-npy"}).json()
        for a, b in zip(answer["predictions"], alone["predictions"]):
            assert [e["label"] for e in a["top"]] == [e["label"] for e in b["top"]]
            assert [e["prob"] for e in a["top"]] == pytest.approx([e["prob"] for e in b["top"]], abs=1e-5)
    metrics = s.client.get("/metrics").text
    assert 'munet_serve_requests_total{endpoint="predict_task",status="200"} 8.0' in metrics
    assert f'munet_serve_model_published_timestamp_seconds{{kind="multipath",model_id="{by_task[MULTI_TASK]["model_id"]}"' in metrics
    assert s.client.get("/readyz").json()["ready"] is True


def test_a_swap_under_a_stream_of_requests_loses_no_request(store_path, serve):
    s = serve(store_path, "--poll", "0.2", "--max-wait-ms", "2")
    body = npy(images(1))
    answers: list[tuple[int, str | None]] = []
    stop = threading.Event()

    def stream() -> None:
        with httpx.Client(base_url=s.url, timeout=60) as c:
            while not stop.is_set():
                r = c.post(f"/v1/tasks/{SINGLE_TASK}/predict", content=body,
                           headers={"content-type": "application/x-npy"})
                answers.append((r.status_code, r.json().get("model_id")))

    threads = [threading.Thread(target=stream) for _ in range(4)]
    for t in threads:
        t.start()
    published = []
    try:
        with Store.open(store_path) as st:
            token = None
            for n in range(1, 6):
                time.sleep(0.4)
                model_id, token = republish(st, SINGLE_TASK, n, token)
                published.append(model_id)
        wait_for(lambda: any(mid == published[-1] for _, mid in answers[-20:]), 30, "the last model answering")
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert answers and all(status == 200 for status, _ in answers)
    with Store.open(store_path, readonly=True) as st:
        known = {m.id for m in st.models()}
    assert {mid for _, mid in answers} <= known
    assert answers[-1][1] == published[-1]
    assert s.client.get("/readyz").json()["swaps"] >= 1


def test_bad_requests_get_one_clear_4xx_json_error_and_never_touch_the_store(store_path, serve):
    with Store.open(store_path, readonly=True) as st:
        before = (st.last_event_seq(), st.stats())
    s = serve(store_path, "--max-images", "4", "--max-side", "64", "--max-body-mb", "1", "--max-pixels", "10000")
    c = s.client
    npy_h = {"content-type": "application/x-npy"}

    def err(r: httpx.Response, status: int, *words: str) -> None:
        assert r.status_code == status, (r.status_code, r.text)
        msg = r.json()["error"]
        assert "\n" not in msg and all(w in msg for w in words), msg

    err(c.post("/v1/tasks/nope/predict", content=npy(images(1)), headers=npy_h), 404, "nope")
    err(c.post("/v1/predict?tasks=nope", content=npy(images(1)), headers=npy_h), 404, "nope")
    err(c.get("/v1/tasks/nope"), 404, "nope")
    err(c.post("/v1/predict", content=b"hello", headers={"content-type": "text/plain"}), 415, "content type")
    err(c.post("/v1/predict", content=b"{not json", headers={"content-type": "application/json"}), 400, "JSON")
    err(c.post("/v1/predict", json={"images": ["%%%"]}), 400, "base64")
    err(c.post("/v1/predict", json={"images": [base64.b64encode(b"GIF89a....").decode()]}), 400, "PNG or JPEG")
    err(c.post("/v1/predict", json={"images": []}), 400, "no image")
    err(c.post("/v1/predict", content=npy(images(5)), headers=npy_h), 413, "limit is 4")
    err(c.post("/v1/predict", content=npy(images(1, size=65)), headers=npy_h), 413, "limit is 64")
    err(c.post("/v1/predict", content=npy(images(1).astype(np.float32)), headers=npy_h), 400, "uint8")
    err(c.post("/v1/predict", content=npy(np.zeros((1, 0, 5, 1), np.uint8)), headers=npy_h), 400, "empty")
    # an .npy header claiming 64 TiB, a body of a few bytes
    huge = io.BytesIO()
    np.lib.format.write_array_header_1_0(huge, {"descr": "|u1", "fortran_order": False,
                                                "shape": (8388608, 4096, 2048, 1)})
    err(c.post("/v1/predict", content=huge.getvalue() + b"xx", headers=npy_h), 400, "header says", "2 bytes")
    err(c.post("/v1/predict", content=b"x" * (1024 * 1024 + 1), headers=npy_h), 413, "body")
    err(c.post("/v1/predict?top_k=0", content=npy(images(1)), headers=npy_h), 400, "top_k")
    # a decompression bomb: a 20000 x 20000 PNG of a few KB is refused from its header
    from PIL import Image
    buf = io.BytesIO()
    Image.new("L", (20000, 20000)).save(buf, format="PNG")
    err(c.post("/v1/predict", content=buf.getvalue(), headers={"content-type": "image/png"}), 413, "limit is 64")
    buf = io.BytesIO()
    Image.new("L", (100, 30)).save(buf, format="PNG")  # under Pillow's bound, over ours: the header says so
    err(c.post("/v1/predict", content=buf.getvalue(), headers={"content-type": "image/png"}), 413, "100x30")
    err(c.get("/nothing"), 404, "not found")
    # three 64x64 images: 12,288 pixels over 10,000, refused from their headers (multipart and JSON)
    pngs = [png(images(1, size=64, seed=i)[0]) for i in range(3)]
    err(c.post("/v1/predict", files=[("image", (f"{i}.png", b, "image/png")) for i, b in enumerate(pngs)]),
        413, "12288 pixels")
    err(c.post("/v1/predict", json={"images": [base64.b64encode(b).decode() for b in pngs]}), 413, "12288")
    err(c.post("/v1/predict", content=npy(images(3, size=64)), headers=npy_h), 413, "12288")
    # five files over the four allowed: 413, like every other limit
    err(c.post("/v1/predict", files=[("image", (f"{i}.png", pngs[0], "image/png")) for i in range(5)]),
        413, "limit is 4")
    # a negative dimension in an .npy header
    neg = io.BytesIO()
    np.lib.format.write_array_header_1_0(neg, {"descr": "|u1", "fortran_order": False, "shape": (-1, -1, 1, 3)})
    err(c.post("/v1/predict", content=neg.getvalue() + b"abc", headers=npy_h), 400, "negative")
    assert c.post("/v1/predict", content=npy(images(1)), headers=npy_h).status_code == 200
    with Store.open(store_path, readonly=True) as st:
        assert (st.last_event_seq(), st.stats()) == before and st.verify() == []


def test_a_full_queue_answers_503_with_retry_after(grown, serve):
    s = serve(grown, "--max-queue", "1", "--max-batch", "1", "--max-wait-ms", "0")
    body = npy(images(64))
    statuses: list[tuple[int, str | None]] = []

    def hit() -> None:
        with httpx.Client(base_url=s.url, timeout=60) as c:
            r = c.post("/v1/predict", content=body, headers={"content-type": "application/x-npy"})
            statuses.append((r.status_code, r.headers.get("retry-after")))

    threads = [threading.Thread(target=hit) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert {code for code, _ in statuses} == {200, 503}, statuses
    assert all(ra == "1" for code, ra in statuses if code == 503)
    assert 'status="503"' in s.client.get("/metrics").text


def test_a_token_guards_every_endpoint_but_health(grown, serve, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    s = serve(grown, "--token-file", str(token_file))
    assert s.client.get("/healthz").status_code == 200 and s.client.get("/readyz").status_code == 200
    for bad in ({}, {"authorization": "Bearer wrong"}, {"authorization": TOKEN}):
        r = s.client.get("/v1/tasks", headers=bad)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer" and "token" in r.json()["error"]
        assert s.client.get("/metrics", headers=bad).status_code == 401
    ok = {"authorization": f"Bearer {TOKEN}"}
    assert s.client.get("/v1/tasks", headers=ok).status_code == 200
    assert s.client.post(f"/v1/tasks/{SINGLE_TASK}/predict", content=npy(images(1)), headers={
        **ok, "content-type": "application/x-npy"}).status_code == 200


def run_serve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, os.path.join(REPO, "launch", "serve_models.py"), *args],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)


def test_refusals_are_one_line_exit_2_and_create_nothing(grown, tmp_path):
    import socket

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    missing = str(tmp_path / "no-store")
    cases = [
        (["--store", grown, "--host", "0.0.0.0"], "needs --token-file"),
        (["--store", grown, "--token-file", str(tmp_path / "absent")], "--token-file"),
        (["--store", grown, "--port", str(taken.getsockname()[1])], "cannot listen"),
        (["--store", missing, "--port", "0"], "store"),
        (["--store", grown, "--max-batch", "0"], "--max-batch"),
        (["--store", grown, "--poll", "nan"], "--poll"),
        (["--store", grown, "--bogus"], "unrecognized"),
        (["--store", grown, "--device", "cuda:7"], "CUDA device"),
        (["--store", grown, "--device", "gpu"], "bad device"),
        (["--store", str(tmp_path / "store-file.txt")], "is a file"),
    ]
    (tmp_path / "store-file.txt").write_text("x")
    for args, words in cases:
        r = run_serve(*args)
        assert r.returncode == 2, (args, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and words in lines[0] and "Traceback" not in r.stderr, (args, r.stderr)
    assert not os.path.exists(missing)
    taken.close()


def test_replicas_share_one_address_and_each_follows_the_store(store_path, tmp_path):
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, "launch", "serve_models.py"), "--store",
                             store_path, "--port", "0", "--replicas", "2", "--threads", "1", "--poll", "0.2"],
                            cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = proc.stdout.readline()
        port = re.search(r"with 2 replicas on http://127\.0\.0\.1:(\d+)", line).group(1)
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: _ready(url), 60, "a replica")
        pids: set[str] = set()

        def answer() -> httpx.Response:
            with httpx.Client(base_url=url, timeout=30) as c:  # a new connection each time
                return c.post(f"/v1/tasks/{SINGLE_TASK}/predict", content=npy(images(1)),
                              headers={"content-type": "application/x-npy"})

        wait_for(lambda: pids.add(answer().headers["x-served-by"]) or len(pids) == 2, 60, "both replicas")
        with Store.open(store_path) as st:
            new_id, _ = republish(st, SINGLE_TASK, 1)
        got: dict[str, str] = {}

        def both_swapped() -> bool:
            r = answer()
            got[r.headers["x-served-by"]] = r.json()["model_id"]
            return len(got) == 2 and set(got.values()) == {new_id}

        wait_for(both_swapped, 60, "both replicas serving the new model")
    finally:
        proc.terminate()
        assert proc.wait(30) == 0


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def test_an_announced_publication_swaps_at_once_whatever_the_poll(store_path):
    """The bus path: the server polls every 60 s, yet swaps within seconds of an announcement from a
    publisher whose lease appeared after the server started (as an attaching agent's does)."""
    import platform

    from protocol.bus import PeerBus

    with Store.open(store_path) as st, PeerBus("publisher") as bus:
        server = ModelServer(store_path, poll_s=60.0, use_bus=True).start()
        try:
            pointer = next(p for p in st.pointers() if p.task == SINGLE_TASK and p.kind == "single")
            token = st.acquire_lease(st.get_model(pointer.model_id).agent, SINGLE_TASK, ttl=600,
                                     host=platform.node(), pid=os.getpid(), device="cpu",
                                     endpoint=bus.endpoint, preset="test")
            time.sleep(2 * 2.0 + 0.5)  # the server re-reads its peers every 2 s and connects to us
            started = time.monotonic()
            new_id, _ = republish(st, SINGLE_TASK, 1, token, bus=bus)
            wait_for(lambda: server.plan.models[SINGLE_TASK].info.model_id == new_id, 20, "the announced swap")
            assert time.monotonic() - started < 10 and server.checks == 2  # the start, then the announcement
        finally:
            server.close()


def test_a_store_service_is_served_as_a_directory_is(store_path, serve):
    """--store tcp://HOST:PORT: the same answers, and a publication through the service swaps."""
    from helpers.service_procs import start_service
    from store import open_store

    service = start_service(store_path)
    try:
        s = serve(f"tcp://{service.endpoint.removeprefix('tcp://')}", "--poll", "0.3")
        x = images(3, seed=11)
        ref = load_model(store_path, SINGLE_TASK)
        r = s.client.post(f"/v1/tasks/{SINGLE_TASK}/predict?top_k={ref.num_classes}", content=npy(x),
                          headers={"content-type": "application/x-npy"}).json()
        assert r["model_id"] == ref.model_id and np.allclose(probs_of(r), ref.predict_proba(x), atol=1e-5)
        with open_store(service.endpoint) as st:
            new_id, _ = republish(st, SINGLE_TASK, 1)
        wait_for(lambda: s.client.get(f"/v1/tasks/{SINGLE_TASK}").json()["model_id"] == new_id, 30,
                 "the swap through the service")
    finally:
        service.stop()


def test_a_request_cancelled_before_its_batch_runs_is_skipped_and_the_batcher_lives_on(grown):
    """A client that goes away cancels its future (asyncio.wrap_future does); the batcher skips it
    instead of dying on setting a cancelled future's result."""
    server = ModelServer(grown, use_bus=False).start()
    batcher = MicroBatcher(server, max_batch=64, max_wait_s=0.5)
    try:
        gone = batcher.submit(list(images(1)), [SINGLE_TASK])
        assert gone.cancel()
        kept = batcher.submit(list(images(1)), [SINGLE_TASK])  # the same batch
        assert SINGLE_TASK in kept.result(30)
        later = batcher.submit(list(images(2)), [SINGLE_TASK, MULTI_TASK])
        assert set(later.result(30)) == {SINGLE_TASK, MULTI_TASK}
    finally:
        batcher.close()
        server.close()
