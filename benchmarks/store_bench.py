"""Store publish/load vs torch.save/torch.load of the same tensors, measured in one run.

The model is the parameter state of a ViT-Ti/16 with 3 blocks at 32 px (44 float32 tensors in 8
components, ~5.9 MB), built with numpy in the real shapes. Each repeat publishes fresh bytes (one
element changed per tensor) so content addressing cannot skip the writes. torch.save/torch.load use
a file in the same directory as the store. Medians over repeats; ratios > 1 mean the store is faster.

    python benchmarks/store_bench.py [--quick] [--repeats N] [--dir DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np


from protocol.tensors import RawTensor, blob_key
from store import ComponentWrite, ModelRecord, Publication, Store, component_id

RESULTS = Path(__file__).resolve().parent / "results" / "store_bench.json"
HIDDEN, MLP, PATCH, BLOCKS, IMAGE, CLASSES = 192, 768, 16, 3, 32, 10


def vit_ti3_shapes() -> dict[str, dict[str, tuple[int, ...]]]:
    """Component -> tensor -> shape for ViT-Ti/16 with 3 blocks at 32 px (the vit-t3 root)."""
    grid = IMAGE // PATCH
    block = {"norm1.weight": (HIDDEN,), "norm1.bias": (HIDDEN,),
             "attn.qkv.weight": (3 * HIDDEN, HIDDEN), "attn.qkv.bias": (3 * HIDDEN,),
             "attn.proj.weight": (HIDDEN, HIDDEN), "attn.proj.bias": (HIDDEN,),
             "norm2.weight": (HIDDEN,), "norm2.bias": (HIDDEN,),
             "mlp.fc1.weight": (MLP, HIDDEN), "mlp.fc1.bias": (MLP,),
             "mlp.fc2.weight": (HIDDEN, MLP), "mlp.fc2.bias": (HIDDEN,)}
    shapes = {"cls": {"token": (1, 1, HIDDEN)},
              "embedding": {"weight": (HIDDEN, 3, PATCH, PATCH), "bias": (HIDDEN,)},
              "posembed_input": {"pos_embedding": (1, 1 + grid * grid, HIDDEN)}}
    shapes.update({f"encoderblock_{i}": dict(block) for i in range(BLOCKS)})
    shapes["encoder_norm"] = {"weight": (HIDDEN,), "bias": (HIDDEN,)}
    shapes["head"] = {"weight": (CLASSES, HIDDEN), "bias": (CLASSES,)}
    return shapes


def make_arrays(seed: int) -> dict[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return {comp: {name: rng.standard_normal(shape, dtype=np.float32)
                   for name, shape in tensors.items()}
            for comp, tensors in vit_ti3_shapes().items()}


def variant(base: dict[str, dict[str, np.ndarray]], i: int) -> dict[str, dict[str, np.ndarray]]:
    """A copy with one element per tensor changed, so every repeat writes new blobs."""
    out = {}
    for comp, tensors in base.items():
        out[comp] = {}
        for name, array in tensors.items():
            copy = array.copy()
            copy.flat[0] = float(i + 1)
            out[comp][name] = copy
    return out


def median_seconds(fn: Callable[[int], None], repeats: int, warmup: int = 1) -> float:
    for i in range(warmup):
        fn(-1 - i)
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def machine_info() -> dict:
    import lmdb
    import torch
    return {"platform": platform.platform(), "machine": platform.machine(),
            "processor": platform.processor(), "cpu_count": os.cpu_count(),
            "python": platform.python_version(), "numpy": np.__version__,
            "torch": torch.__version__, "lmdb": lmdb.__version__,
            "torch_threads": torch.get_num_threads()}


def run(repeats: int, workdir: str) -> dict:
    import torch

    base = make_arrays(0)
    nbytes = sum(a.nbytes for t in base.values() for a in t.values())
    ntensors = sum(len(t) for t in base.values())
    # inputs for every repeat, built outside the timings (both sides start from in-memory tensors)
    total = repeats + 1
    raw_inputs = [{c: {n: RawTensor.from_numpy(a) for n, a in t.items()}
                   for c, t in variant(base, i).items()} for i in range(total)]
    torch_inputs = [{f"{c}.{n}": torch.from_numpy(a) for c, t in variant(base, i).items()
                     for n, a in t.items()} for i in range(total)]

    root = tempfile.mkdtemp(prefix="store_bench_", dir=workdir)
    try:
        st = Store.open(os.path.join(root, "store"), create=True)
        token = st.acquire_lease("bench", "bench_task", ttl=3600, host=platform.node(),
                                 pid=os.getpid(), device="cpu", endpoint="", preset="bench")
        published: list[str] = []

        def store_publish(i: int) -> None:
            k = i % total
            n = len(published)
            writes = [ComponentWrite.build(component_id("bench", n * 100 + j), comp, "bench",
                                           tensors)
                      for j, (comp, tensors) in enumerate(raw_inputs[k].items())]
            model = ModelRecord(id=f"bench:m{n}", task="bench_task", agent="bench",
                                components=[w.record.id for w in writes],
                                hparams={"num_classes": CLASSES, "ds_image_size": IMAGE},
                                metrics={}, parent=None, preset="bench", preset_hash="-",
                                created_at=time.time())
            st.commit("bench", token, components=writes, models=[model], publish=Publication(model.id, int(model.hparams["num_classes"]), {k: v for k, v in model.hparams.items() if k.startswith("ds_")}))
            published.append(model.id)

        torch_file = os.path.join(root, "model.pt")

        def torch_save(i: int) -> None:
            torch.save(torch_inputs[i % total], torch_file)

        def torch_save_fsync(i: int) -> None:
            with open(torch_file, "wb") as f:
                torch.save(torch_inputs[i % total], f)
                f.flush()
                os.fsync(f.fileno())

        def store_load(_: int) -> None:
            st.load_model_tensors(published[-1])

        def store_load_as_torch(_: int) -> None:
            for params, _momentum in st.load_model_tensors(published[-1]).values():
                for t in params.values():
                    torch.frombuffer(t.data, dtype=torch.float32).reshape(t.shape)

        def torch_load(_: int) -> None:
            torch.load(torch_file)

        def content_hash(i: int) -> None:  # the part of a publish spent on content addresses
            for tensors in raw_inputs[i % total].values():
                for tensor in tensors.values():
                    blob_key(tensor)

        t = {"store_publish_s": median_seconds(store_publish, repeats),
             "store_publish_hashing_part_s": median_seconds(content_hash, repeats),
             "torch_save_s": median_seconds(torch_save, repeats),
             "torch_save_fsync_s": median_seconds(torch_save_fsync, repeats)}
        loaded = st.load_model_tensors(published[-1])
        assert sum(len(p) for p, _ in loaded.values()) == ntensors
        t.update({"store_load_s": median_seconds(store_load, repeats),
                  "store_load_as_torch_s": median_seconds(store_load_as_torch, repeats),
                  "torch_load_s": median_seconds(torch_load, repeats)})
        stats = st.stats()
        assert st.verify() == []
        st.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    ratios = {
        "store_load_vs_torch_load_speed": t["torch_load_s"] / t["store_load_s"],
        "store_load_as_torch_vs_torch_load_speed": t["torch_load_s"] / t["store_load_as_torch_s"],
        "store_publish_vs_torch_save_speed": t["torch_save_s"] / t["store_publish_s"],
        "store_publish_vs_torch_save_fsync_speed": t["torch_save_fsync_s"] / t["store_publish_s"],
    }
    return {"model": {"name": "vit-ti16-3blocks-32px", "tensors": ntensors,
                      "components": len(base), "bytes": nbytes},
            "repeats": repeats, "timings_median": t, "ratios": ratios,
            "store_file_bytes_after_run": stats["file_bytes"]}


def markdown(result: dict) -> str:
    t, r = result["timings_median"], result["ratios"]
    m = result["model"]
    rows = [("store publish (hash + commit + fsync)", t["store_publish_s"]),
            ("  of which blake2b content hashing", t["store_publish_hashing_part_s"]),
            ("torch.save", t["torch_save_s"]), ("torch.save + fsync", t["torch_save_fsync_s"]),
            ("store load (RawTensor copies)", t["store_load_s"]),
            ("store load + torch.frombuffer", t["store_load_as_torch_s"]),
            ("torch.load", t["torch_load_s"])]
    lines = [f"{m['name']}: {m['tensors']} tensors, {m['bytes'] / 1e6:.2f} MB, "
             f"median of {result['repeats']} repeats", "",
             "| operation | median ms |", "|---|---:|"]
    lines += [f"| {name} | {seconds * 1e3:.2f} |" for name, seconds in rows]
    lines += ["", "| ratio (> 1: store faster) | value |", "|---|---:|"]
    lines += [f"| {name} | {value:.2f} |" for name, value in r.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few repeats (smoke run)")
    parser.add_argument("--repeats", type=int, default=None, help="repeats per measurement")
    parser.add_argument("--dir", default=None, help="directory for the store and the .pt file")
    parser.add_argument("--out", default=str(RESULTS), help="JSON result file")
    args = parser.parse_args(argv)
    repeats = args.repeats or (5 if args.quick else 30)
    result = run(repeats, args.dir or tempfile.gettempdir())
    result["machine"] = machine_info()
    result["command"] = " ".join([Path(sys.executable).name, *sys.argv])
    result["quick"] = args.quick
    result["workdir"] = args.dir or tempfile.gettempdir()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    from launch.common import run_main

    run_main(main, "store_bench.py")
