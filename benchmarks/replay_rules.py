#!/usr/bin/env python3
"""Replay early-rejection rules on a swarm's recorded learning curves, without training anything.

    python benchmarks/replay_rules.py STORE [STORE ...] [--out DIR]

Every trial record holds the child's validation accuracies in order (``evals``), the score it had to
reach (``threshold``) and its images. For each candidate ``agents.hurdle.HurdleRule`` (a margin below
the threshold at validation 1, optionally at 2 and 3) this asks what would have happened had the rule
run live, child by child:

* ``images_saved_fraction``: images the stopped children would not have trained, over all images
  (a child stopped after validation r of V trains r/V of its images);
* ``accepted_stopped_fraction``: accepted children the rule would have stopped, over accepted children
  (a stopped child keeps a snapshot it already took, so one accepted at validation <= r is not lost);
* ``lineage_stopped_fraction``: the same over the children on the current model's own lineage (the
  models each task's published model descends from), the children that mattered most.

The replay cannot know what the freed images would have bought (more children); the live run measures
that (benchmarks/results/quality.md). Scores are rebuilt from accuracies with the trial's own
score/quality ratio (exact for every preset: the size penalty multiplies the accuracy). Trials
recorded before learning curves were stored (no ``evals``) are skipped. The default rule is the one that
saves the most images with at most 5% of accepted children stopped. Torch-free.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from agents.hurdle import HurdleRule
from benchmarks import common
from benchmarks.common import BenchmarkError, fmt, md_table

MAX_ACCEPTED_STOPPED = 0.05


@dataclass(frozen=True)
class Child:
    evals: tuple[float, ...]
    threshold: float | None
    ratio: float            # score / quality (1.0 without a size penalty)
    images: int
    accepted: bool
    first_keep: int | None  # 1-based validation of the first snapshot (None: never reached)
    loose: bool             # the rule's looser bar applies (raised opt_lr or changed image size)
    on_lineage: bool


def _loose(hparams_diff: dict) -> bool:
    lr = hparams_diff.get("opt_lr")
    size = hparams_diff.get("ds_image_size")
    return bool(size) or bool(lr and lr[0] is not None and lr[1] is not None and lr[1] > lr[0])


def children_of(store) -> list[Child]:
    """Completed children with learning curves (children stopped live are replayed as they ran)."""
    lineage: set[str] = set()
    for pointer in store.tasks():
        task, model_id = pointer.task, pointer.model_id
        while model_id:
            m = store.get_model(model_id)
            if m is None or m.task != task:
                break
            lineage.add(m.id)
            model_id = m.parent
    out = []
    for t in store.trials():
        if not t.evals or t.stopped:
            continue
        ratio = (t.score / t.quality) if t.score is not None and t.quality else 1.0
        first_keep, bar = None, t.threshold
        for i, q in enumerate(t.evals, 1):
            if bar is None or q * ratio >= bar:
                first_keep = i
                break
        out.append(Child(tuple(t.evals), t.threshold, ratio, t.train_images, t.accepted, first_keep,
                         _loose(t.hparams_diff), t.id in lineage))
    return out


def replay(rule: HurdleRule, children: list[Child]) -> dict:
    saved = stopped = acc_stopped = line_stopped = 0
    total = sum(c.images for c in children)
    for c in children:
        v = len(c.evals)
        rung = next((i for i in range(1, v) if rule.stops(i, c.evals[i - 1] * c.ratio, c.threshold, c.loose)),
                    None)
        if rung is None:
            continue
        stopped += 1
        saved += c.images * (v - rung) // v
        kept_anyway = c.first_keep is not None and c.first_keep <= rung
        acc_stopped += int(c.accepted and not kept_anyway)
        line_stopped += int(c.on_lineage and not kept_anyway)
    accepted = sum(c.accepted for c in children)
    on_line = sum(c.on_lineage for c in children)
    return {"rule": rule.to_dict(), "children": len(children), "stopped": stopped,
            "images_saved_fraction": saved / total if total else 0.0,
            "accepted_stopped_fraction": acc_stopped / accepted if accepted else 0.0,
            "lineage_stopped_fraction": line_stopped / on_line if on_line else 0.0,
            "accepted": accepted, "lineage_children": on_line}


def candidate_rules() -> list[HurdleRule]:
    """One, two and three rungs; margins in accuracy points; the looser bar 0, +0.02 or +0.05."""
    firsts = (0.0, 0.01, 0.02, 0.03, 0.04, 0.06, 0.1)
    margin_sets = [(m,) for m in firsts]
    margin_sets += [(m1, m2) for m1 in firsts[1:5] for m2 in (0.0, 0.01, 0.02) if m2 <= m1]
    margin_sets += [(m1, m2, m3) for m1 in (0.02, 0.03, 0.04) for m2 in (0.01, 0.02) for m3 in (0.0, 0.01)
                    if m3 <= m2 <= m1]
    return [HurdleRule(margins=m, loose_extra=x) for m in margin_sets for x in (0.0, 0.02, 0.05)]


def choose(results: list[dict]) -> int:
    """Index of the default: the most images saved with <= 5% of accepted children stopped (ties:
    fewer accepted, then fewer lineage children stopped)."""
    ok = [i for i, r in enumerate(results) if r["accepted_stopped_fraction"] <= MAX_ACCEPTED_STOPPED]
    if not ok:
        raise BenchmarkError("no candidate rule stops <= 5% of accepted children")
    return max(ok, key=lambda i: (results[i]["images_saved_fraction"], -results[i]["accepted_stopped_fraction"],
                                  -results[i]["lineage_stopped_fraction"]))


def main() -> int:
    p = argparse.ArgumentParser(prog="replay_rules.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stores", nargs="+", help="store directories of finished swarm runs")
    p.add_argument("--out", default=str(common.RESULTS_DIR), help="result directory")
    args = p.parse_args()
    from store import open_store

    children: list[Child] = []
    for path in args.stores:
        with open_store(path, readonly=True) as store:
            children += children_of(store)
    if not children:
        raise BenchmarkError("no trial with a learning curve in these stores (record them with this "
                             "version of the agent)")
    results = [replay(rule, children) for rule in candidate_rules()]
    best = choose(results)
    # Short-horizon bias: do children that raised their learning rate or changed image size need the
    # looser bar? Compare the default rule with the same margins and no loosening, on those children.
    default = HurdleRule(**{**results[best]["rule"], "margins": tuple(results[best]["rule"]["margins"])})
    loose = [c for c in children if c.loose]
    strict = HurdleRule(margins=default.margins, loose_extra=0.0)
    bias = {"children": len(loose), "accepted": sum(c.accepted for c in loose),
            "with_loose_bar": replay(default, loose), "with_strict_bar": replay(strict, loose)}
    doc = {"stores": list(args.stores), "children": len(children), "short_horizon": bias,
           "max_accepted_stopped_fraction": MAX_ACCEPTED_STOPPED,
           "rules": results, "default": results[best]["rule"],
           "default_result": results[best]}
    out = Path(args.out)
    common.write_json(out / "replay.json", doc)
    rows = [[" / ".join(fmt(m, 3) for m in r["rule"]["margins"]), fmt(r["rule"]["loose_extra"], 3),
             r["stopped"], fmt(r["images_saved_fraction"], 3), fmt(r["accepted_stopped_fraction"], 3),
             fmt(r["lineage_stopped_fraction"], 3)] for r in results]
    text = (f"# Early-rejection rules replayed\n\nCommand: `python benchmarks/replay_rules.py "
            f"{' '.join(args.stores)}`\n\n{len(children)} children with learning curves. Default: "
            f"{results[best]['rule']}.\n\n"
            + md_table(["margins at validations 1, 2, ...", "looser by", "stopped", "images saved", "accepted stopped",
                        "lineage stopped"], rows) + "\n")
    text += (f"\nShort-horizon bias: {bias['children']} children raised their learning rate or changed "
             f"image size ({bias['accepted']} accepted). The default's margins with no looser bar would "
             f"stop {bias['with_strict_bar']['stopped']} of them "
             f"({fmt(bias['with_strict_bar']['accepted_stopped_fraction'], 3)} of their accepted); with "
             f"the looser bar {bias['with_loose_bar']['stopped']} "
             f"({fmt(bias['with_loose_bar']['accepted_stopped_fraction'], 3)}).\n")
    common.write_text(out / "replay.md", text)
    r = results[best]
    print(f"default rule {r['rule']}: saves {r['images_saved_fraction']:.3f} of images, stops "
          f"{r['accepted_stopped_fraction']:.3f} of accepted and {r['lineage_stopped_fraction']:.3f} "
          f"of lineage children")
    return 0


if __name__ == "__main__":
    from launch.common import run_main

    run_main(main, "replay_rules.py", user_errors=(BenchmarkError,))
