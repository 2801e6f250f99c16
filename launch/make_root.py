#!/usr/bin/env python3
"""Pretrain a root model on a corpus: a timm-named .safetensors checkpoint plus a JSON card.

The result lives in the data cache (``$MUNET_DATA_DIR/roots/NAME-KEY/``), keyed by a hash of the whole
recipe, so it is built once per machine; run_swarm.py --root NAME uses it. The built-in offline root
(``glyphs_cjk``: rendered CJK ideographs, Hangul and kana, disjoint from every benchmark task, for the
demo/cpu/vit-t3 architecture: ViT-Ti/16, 3 blocks, 32 px) ships with the repository
(``agents/shipped_roots/``), so every machine starts from the same tensors; ``--rebuild`` trains it
on this machine and compares the result with the shipped card. This command is for that check,
changing the recipe, or pretraining on your own corpus.

  python launch/make_root.py                                     # glyphs_cjk: the shipped root
  python launch/make_root.py --rebuild                           # glyphs_cjk trained here, ~3-5 min
  python launch/make_root.py --name mine --corpus folder:/data/imgs --images 2000000
  python launch/make_root.py --print                             # the card of the built root
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from launch.common import OneLineParser, UserError, run_main


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="make_root.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", default=None, help="root name for --root NAME (default: the corpus name, "
                                                "glyphs_cjk for the built-in corpus)")
    p.add_argument("--corpus", default="glyphs_cjk",
                   help="glyphs_cjk (built-in, rendered from Debian font packages), folder:PATH or npz:PATH")
    p.add_argument("--vit", default="ti", help="ViT config: ti, b, l (default ti)")
    p.add_argument("--depth", type=int, default=3, help="blocks to pretrain (default 3)")
    p.add_argument("--image-size", type=int, default=32, help="pretraining image size (default 32)")
    p.add_argument("--images", type=int, default=None, help="training images seen (default 256,000)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None, help="AdamW peak learning rate (default 2e-3)")
    p.add_argument("--classes", default=None,
                   help="built-in corpus only: HAN,HANGUL,KANA class counts (default 720,240,64)")
    p.add_argument("--per-class", type=int, default=None,
                   help="built-in corpus only: rendered training images per class (default 240)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--data-dir", default=None, help="data cache (default $MUNET_DATA_DIR or ~/.cache/munet-swarm)")
    p.add_argument("--rebuild", action="store_true",
                   help="train the root on this machine even where the repository ships it "
                        "(agents/shipped_roots/), and compare the result with the shipped card")
    p.add_argument("--print", action="store_true", dest="print_card",
                   help="print the card of the root this recipe names (build it if missing) as JSON")
    return p


def recipe_from_args(args):
    from taskdata.root_corpus import CORPUS_NAME, CorpusConfig
    from agents.pretrain import RootRecipe

    if args.corpus != CORPUS_NAME and not args.corpus.startswith(("folder:", "npz:")):
        raise UserError(f"--corpus {args.corpus!r}: use {CORPUS_NAME}, folder:PATH or npz:PATH")
    if args.corpus != CORPUS_NAME and (args.classes or args.per_class):
        raise UserError("--classes and --per-class only apply to the built-in corpus")
    for flag in ("depth", "image_size", "images", "batch_size", "per_class"):
        value = getattr(args, flag)
        if value is not None and value < (0 if flag == "depth" else 1):
            raise UserError(f"--{flag.replace('_', '-')} must be positive")
    if args.image_size % 16:
        raise UserError("--image-size must be a multiple of the patch size 16")
    corpus_cfg = CorpusConfig(seed=args.seed)
    if args.classes:
        try:
            han, hangul, kana = (int(x) for x in args.classes.split(","))
        except ValueError:
            raise UserError("--classes must be three integers HAN,HANGUL,KANA, e.g. 720,240,64") from None
        if min(han, hangul, kana) < 0 or han + hangul + kana < 2:
            raise UserError("--classes: counts must be >= 0 and name at least 2 classes")
        corpus_cfg = dataclasses.replace(corpus_cfg, han_classes=han, hangul_classes=hangul, kana_classes=kana)
    if args.per_class:
        corpus_cfg = dataclasses.replace(corpus_cfg, train_per_class=args.per_class)
    changes = {k: v for k, v in {"train_images": args.images, "batch_size": args.batch_size,
                                 "lr": args.lr}.items() if v is not None}
    name = args.name or (CORPUS_NAME if args.corpus == CORPUS_NAME else None)
    if not name:
        raise UserError("--name is required for a user corpus (it is what --root NAME refers to)")
    if not all(ch.isalnum() or ch in "-_." for ch in name):
        raise UserError(f"--name {name!r}: use letters, digits, '-', '_' and '.' only")
    return RootRecipe(name=name, corpus=args.corpus, vit=args.vit, depth=args.depth,
                      image_size=args.image_size, seed=args.seed, corpus_config=corpus_cfg, **changes)


def main() -> int:
    args = build_parser().parse_args()
    from agents.vit import VIT_CONFIGS

    if args.vit not in VIT_CONFIGS:
        raise UserError(f"--vit {args.vit!r}: choose one of {', '.join(VIT_CONFIGS)}")
    recipe = recipe_from_args(args)
    from agents.pretrain import build_root, shipped_root

    built = build_root(recipe, args.data_dir, log=lambda m: print(m, file=sys.stderr, flush=True),
                       threads=args.threads, rebuild=args.rebuild)
    shipped = shipped_root(recipe.name, recipe) if args.rebuild else None
    if args.print_card:
        card = {k: v for k, v in built.card.items() if k != "class_names"}
        print(json.dumps({"path": str(built.path), **card}, indent=2, ensure_ascii=False))
    else:
        c = built.card
        print(f"root {c['name']}: {built.path}")
        print(f"  corpus {c['corpus'].get('name')}: {c['num_classes']} classes, {c['images_seen']:,} images "
              f"seen; held-out accuracy {c['heldout_test_accuracy']:.4f}; built in {c['wall_seconds']:.0f} s")
        print(f"  file sha256 {c.get('file_sha256', '?')}; built on {c.get('machine', {}).get('cpu', '?')} "
              f"(repeatable bit for bit on the same CPU kind; compare with "
              f"benchmarks/results/root-card.json)")
        if shipped is not None:
            s = shipped.card
            same = "the same bytes" if s["file_sha256"] == c.get("file_sha256") else "different bytes"
            print(f"  against the shipped root: {same}; held-out accuracy {c['heldout_test_accuracy']:.4f} "
                  f"here vs {s['heldout_test_accuracy']:.4f} shipped "
                  f"({100 * (c['heldout_test_accuracy'] - s['heldout_test_accuracy']):+.2f} points)")
        print(f"  use it: python launch/run_swarm.py --root {c['name']}")
    return 0


if __name__ == "__main__":
    run_main(main, "make_root.py")
