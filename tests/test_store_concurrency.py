"""Several spawned writer and reader processes on one store.

Writers (different agents, different tasks) contend for LMDB's single write lock while readers load
the published models continuously: every load must re-hash to its blob keys, pointers must never go
backwards, and at the end every publish is in the store and verify() finds nothing.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import time

import pytest

from store import Store
from helpers.store_procs import reader_main, root_racer_main, slow_writer_main, writer_main
from helpers.store_records import check_model_integrity, make_root

JOIN_TIMEOUT = 120


def _reap(procs: list) -> None:
    """Make sure no child outlives the test, whatever happened."""
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
        proc.join(timeout=5)
        if proc.is_alive():
            proc.kill()
            proc.join()


def _run_swarm(path: str, tmp_path, writers: int, models_each: int, readers: int) -> list[dict]:
    ctx = mp.get_context("spawn")
    stop, go = ctx.Event(), ctx.Event()
    ready = [ctx.Event() for _ in range(readers)]
    writer_procs = [ctx.Process(target=writer_main, name=f"writer{i}",
                                args=(path, f"agent{i}", f"task{i}", models_each, 100 + i, go))
                    for i in range(writers)]
    reader_files = [tmp_path / f"reader{i}.json" for i in range(readers)]
    reader_procs = [ctx.Process(target=reader_main, name=f"reader{i}",
                                args=(path, ready[i], stop, str(f)))
                    for i, f in enumerate(reader_files)]
    procs = reader_procs + writer_procs
    try:
        for proc in procs:
            proc.start()
        deadline = time.monotonic() + JOIN_TIMEOUT
        for event in ready:  # writers start only once every reader is reading
            assert event.wait(timeout=JOIN_TIMEOUT), "a reader did not start"
        go.set()
        for proc in writer_procs:
            proc.join(timeout=max(0.0, deadline - time.monotonic()))
        stop.set()
        for proc in reader_procs:
            proc.join(timeout=max(0.0, deadline - time.monotonic()))
        codes = {p.name: p.exitcode for p in procs}
        assert all(code == 0 for code in codes.values()), f"child exit codes: {codes}"
    finally:
        _reap(procs)
    return [json.loads(f.read_text()) for f in reader_files]


def _check_final_store(path: str, writers: int, models_each: int, reports: list[dict]) -> None:
    with Store.open(path, readonly=True) as st:
        published = st.published_models()
        assert sorted(published) == [f"task{i}" for i in range(writers)]
        for i in range(writers):
            assert published[f"task{i}"].id == f"agent{i}:m{models_each - 1}"
            for n in range(models_each):
                assert st.get_model(f"agent{i}:m{n}") is not None
            check_model_integrity(st, published[f"task{i}"].id)
        events = st.events()
        assert [e.seq for e in events] == list(range(1, 1 + 1 + writers * models_each))
        per_task = {}
        for event in events[1:]:  # after the root event: each task's publishes in order
            per_task.setdefault(event.task, []).append(event.model_id)
        for i in range(writers):
            assert per_task[f"task{i}"] == [f"agent{i}:m{n}" for n in range(models_each)]
        assert len(st.trials()) == writers * models_each
        assert st.verify() == []
    for report in reports:
        assert report["loads"] > 0 and report["tensors"] > 0
        assert report["last_event"] == 1 + writers * models_each  # saw the final state


def test_three_writers_two_readers(tmp_path):
    path = str(tmp_path / "store")
    with Store.open(path, create=True) as st:
        make_root(st)
    reports = _run_swarm(path, tmp_path, writers=3, models_each=12, readers=2)
    _check_final_store(path, 3, 12, reports)


@pytest.mark.slow
def test_four_writers_three_readers_many_publishes(tmp_path):
    path = str(tmp_path / "store")
    with Store.open(path, create=True) as st:
        make_root(st)
    reports = _run_swarm(path, tmp_path, writers=4, models_each=100, readers=3)
    _check_final_store(path, 4, 100, reports)


def test_readonly_open_while_another_process_writes(tmp_path):
    path = str(tmp_path / "store")
    with Store.open(path, create=True) as st:
        make_root(st)
    ctx = mp.get_context("spawn")
    writer = ctx.Process(target=slow_writer_main, args=(path, "w", "t", 8, 0.02))
    writer.start()
    seen: list[str] = []
    try:
        with Store.open(path, readonly=True) as ro:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                model = ro.published_models().get("t")
                if model is not None:
                    if not seen or seen[-1] != model.id:
                        seen.append(model.id)
                    check_model_integrity(ro, model.id)
                    if model.id == "w:m7":
                        break
                time.sleep(0.005)  # polling cadence only; nothing is asserted about speed
        writer.join(timeout=60)
    finally:
        _reap([writer])
    assert writer.exitcode == 0 and seen and seen[-1] == "w:m7"
    assert seen == sorted(seen, key=lambda mid: int(mid.split(":m")[1]))  # never backwards


def test_racing_root_creation_writes_exactly_one_root(tmp_path):
    path = str(tmp_path / "store")
    Store.open(path, create=True).close()
    ctx = mp.get_context("spawn")
    go = ctx.Event()
    ready = [ctx.Event() for _ in range(3)]
    outs = [tmp_path / f"racer{i}.json" for i in range(3)]
    procs = [ctx.Process(target=root_racer_main, args=(path, i + 1, ready[i], go, str(out)))
             for i, out in enumerate(outs)]
    try:
        for proc in procs:
            proc.start()
        for event in ready:  # every racer has the store open: released together, they race
            assert event.wait(timeout=JOIN_TIMEOUT), "a racer did not start"
        go.set()
        for proc in procs:
            proc.join(timeout=JOIN_TIMEOUT)
        assert [p.exitcode for p in procs] == [0, 0, 0]
    finally:
        _reap(procs)
    results = [json.loads(out.read_text()) for out in outs]
    winners = {r["root"] for r in results}
    assert len(winners) == 1
    with Store.open(path, readonly=True) as st:
        assert st.root_model_id() in winners
        assert [m.id for m in st.models()] == list(winners)  # the losers wrote nothing
        assert [e.kind for e in st.events()] == ["root"]
        assert st.verify() == []
