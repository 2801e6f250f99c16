#!/usr/bin/env python3
"""How good a root's frozen features are for the benchmark: a linear probe and adapters on it.

    python benchmarks/root_probe.py                              # the preset's root (glyphs_cjk)
    python benchmarks/root_probe.py --root mine --out /tmp/probe

Per benchmark task, on its validation split (the whole split, up to 5,120 images):
- ``linear_probe_accuracy``: a closed-form ridge probe on the root's class-token features of up to
  ``--probe-train`` training images (``agents.probe.ridge_probe_accuracy``);
- ``adapter_probe_accuracy``: adapters before every block, the final norm and a head trained on the
  frozen root (the quality benchmark's ``adapters`` baseline) for ``--adapter-images`` images, best
  validation accuracy of its checkpoints.

Both means are written into the root's card copy ``OUT/root-card.json`` (with ``sha256``), which is
what the issue's result keys name.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import common
from benchmarks.common import BenchmarkError, log


DECISION_EXAMPLES = 5_120


def _say(message: str) -> None:
    log("root_probe", message)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="root_probe.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cpu", help="preset whose architecture and root to probe (default cpu)")
    p.add_argument("--root", default=None, help="--root spec (default: the preset's)")
    p.add_argument("--tasks", default=None, help="comma-separated tasks (default: the 8 benchmark tasks)")
    p.add_argument("--probe-train", type=int, default=4_000, help="training images for the linear probe")
    p.add_argument("--adapter-images", type=int, default=6_144, help="training images per adapter probe")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(common.RESULTS_DIR), help="result directory")
    return p


def linear_probe(root, vit, data, n_train: int) -> float:
    from agents.probe import ridge_probe_accuracy

    n = min(n_train, data.n_train)
    return ridge_probe_accuracy(root, vit, data.train_x[:n], data.train_y[:n], data.decision_x,
                                data.decision_y, data.num_classes)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from agents.training import TaskTensors
    from agents.probe import RIDGE
    from benchmarks.baselines import run_adapters
    from store import Store
    from taskdata import benchmark_tasks, load_task

    tasks = ([t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks
             else list(benchmark_tasks("mccb-offline")))
    if args.probe_train < 16 or args.adapter_images < 32:
        raise BenchmarkError("--probe-train must be >= 16 and --adapter-images >= 32")
    preset, vit = common.vit_for(args.preset, args.root)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="root_probe_") as work:
        path = str(Path(work) / "store")
        common.ensure_store_with_root(path, args.preset, args.seed, args.root)
        with Store.open(path, readonly=True) as store:
            view = common.load_root(store)
    root, provenance = view.root, common.root_provenance(view)
    torch.manual_seed(args.seed)
    tensors = {t: TaskTensors(load_task(t), torch.device("cpu"), DECISION_EXAMPLES,
                              decision_examples=DECISION_EXAMPLES) for t in tasks}
    linear = {}
    for t, data in tensors.items():
        linear[t] = linear_probe(root, vit, data, args.probe_train)
        _say(f"{t}: linear probe {linear[t]:.4f}")
    adapters = run_adapters(root, vit, preset, tensors, {t: args.adapter_images for t in tasks},
                            args.seed, log=_say)
    adapter = {t: o.best_val_accuracy for t, o in adapters.per_task.items()}
    out = Path(args.out)
    card_path = out / "root-card.json"
    card = {}
    if provenance.get("file_sha256"):
        from agents.pretrain import find_built

        match = [r.card for r in find_built(provenance["name"] or "") if
                 r.card.get("file_sha256") == provenance["file_sha256"]]
        card = {k: v for k, v in (match[0] if match else {}).items() if k != "class_names"}
    card.update({"sha256": provenance.get("file_sha256"), "root": provenance,
                 "probe_tasks": tasks, "probe_split": f"validation, up to {DECISION_EXAMPLES} images",
                 "linear_probe_per_task": linear, "adapter_probe_per_task": adapter,
                 "linear_probe_accuracy": statistics.mean(linear.values()),
                 "adapter_probe_accuracy": statistics.mean(adapter.values()),
                 "probe_settings": {"probe_train": args.probe_train, "ridge": RIDGE,
                                    "adapter_images": args.adapter_images, "preset": args.preset,
                                    "seed": args.seed},
                 "probe_command": " ".join([Path(sys.executable).name, *sys.argv]),
                 "probe_seconds": time.perf_counter() - start})
    common.write_json(card_path, card)
    print(f"root {provenance.get('name')} (sha256 {str(provenance.get('file_sha256'))[:12]}...): linear probe "
          f"{card['linear_probe_accuracy']:.4f}, adapters {card['adapter_probe_accuracy']:.4f} "
          f"(means over {len(tasks)} tasks); wrote {card_path}")
    return 0


if __name__ == "__main__":
    from launch.common import run_main

    run_main(main, "root_probe.py", user_errors=(BenchmarkError,))
