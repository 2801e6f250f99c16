"""Root pretraining: turn a corpus into a knowledge-bearing root checkpoint, once per machine.

    recipe -> corpus (built-in rendered CJK glyphs, or the user's folder:/npz:) -> a ViT of the preset's
    architecture trained on it (every block, plus a throw-away head) -> ``root.safetensors`` (timm
    names) + ``card.json`` in ``<data cache>/roots/<name>-<key>/``

``key`` hashes the recipe and the corpus identity (the built-in corpus's key, or a user corpus's data
fingerprint), so a recipe is trained once per machine and reused; a changed recipe gets a new directory.
The optimiser is AdamW with warm-up and cosine decay and label smoothing: this is how ViTs are
pretrained; the agents' own method (SGD, docs/method.md) starts from the result.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import platform
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from taskdata import TaskData, load_task
from taskdata.augment import augment_train
from taskdata.cache import TaskDataError, exclusive, resolve_cache_dir
from taskdata.root_corpus import CORPUS_NAME, CorpusConfig, fetch_fonts, load_corpus
from agents.roots import root_component_names, timm_state_dict
from agents.training import TaskTensors, accuracy, test_accuracy
from agents.vit import PathModel, VitConfig, init_component, vit_config

RECIPE_VERSION = 1
BUILTIN_ROOT = CORPUS_NAME  # `--root glyphs_cjk`: the offline pretrained root
# Roots committed with the repository (NAME/root.safetensors + NAME/card.json): every machine starts
# from the same tensors (a root trained on another CPU kind differs in its last bits, and its accuracy
# with them), and no fresh start waits for pretraining. ``make_root.py --rebuild`` trains one anew.
SHIPPED_ROOTS = Path(__file__).resolve().parent / "shipped_roots"


@dataclass(frozen=True)
class RootRecipe:
    """Everything that determines a pretrained root."""

    name: str = BUILTIN_ROOT
    corpus: str = CORPUS_NAME                # the built-in corpus, or folder:PATH / npz:PATH
    vit: str = "ti"
    depth: int = 3
    image_size: int = 32
    train_images: int = 256_000              # images seen (the budget), not corpus size
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_ratio: float = 0.05
    label_smoothing: float = 0.1
    seed: int = 0
    corpus_config: CorpusConfig = field(default_factory=CorpusConfig)

    def vit_config(self) -> VitConfig:
        return vit_config(self.vit, depth=self.depth)

    def to_dict(self) -> dict:
        d = asdict(self)
        if self.corpus != CORPUS_NAME:
            d.pop("corpus_config")  # only the built-in corpus is rendered from a config
        return d


@dataclass
class BuiltRoot:
    path: Path          # root.safetensors
    card: dict


def _key(recipe: RootRecipe, corpus_id: str) -> str:
    desc = {"version": RECIPE_VERSION, "recipe": recipe.to_dict(), "corpus": corpus_id}
    return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:12]


def roots_dir(cache_dir=None) -> Path:
    return resolve_cache_dir(cache_dir) / "roots"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _corpus(recipe: RootRecipe, cache: Path) -> tuple[TaskData, str, dict]:
    """(task data, identity for the key, what the card says about the corpus)."""
    if recipe.corpus == CORPUS_NAME:
        c = load_corpus(cache, recipe.corpus_config)
        data = TaskData(CORPUS_NAME, len(c.classes), **c.arrays,
                        source="rendered CJK/Hangul/kana glyphs from Debian font packages",
                        license="synthetic; glyph shapes from the fonts under their own licenses",
                        synthetic=True, class_names=list(c.classes))
        return data, c.info["key"], c.info
    if not recipe.corpus.startswith(("folder:", "npz:")):
        raise TaskDataError(f"unknown root corpus {recipe.corpus!r}: use {CORPUS_NAME}, folder:PATH or npz:PATH")
    data = load_task(recipe.corpus, cache)
    return data, data.fingerprint(), {"name": recipe.corpus, "source": data.source,
                                      "fingerprint": data.fingerprint()}


def _corpus_id(recipe: RootRecipe, cache: Path) -> str:
    """The corpus part of the key; for the built-in corpus without reading its 200 MB of arrays."""
    if recipe.corpus == CORPUS_NAME:
        _, packages = fetch_fonts(cache)  # a manifest read once the fonts are on this machine
        return recipe.corpus_config.key(packages)
    return _corpus(recipe, cache)[1]


def shipped_root(name: str, recipe: RootRecipe | None = None) -> BuiltRoot | None:
    """The root committed with the repository under ``name`` (for ``recipe``, when given: the same
    recipe, or None), after checking its file against its card's sha256."""
    card_path = SHIPPED_ROOTS / name / "card.json"
    if not card_path.is_file():
        return None
    card = json.loads(card_path.read_text())
    if recipe is not None and card.get("recipe") != json.loads(json.dumps(recipe.to_dict())):
        return None
    path = card_path.parent / "root.safetensors"
    if not path.is_file() or file_sha256(path) != card.get("file_sha256"):
        raise TaskDataError(f"the shipped root {path} does not match its card's sha256 (a partial "
                            f"checkout or a Git LFS pointer?): restore it with git, or build one with "
                            f"launch/make_root.py --rebuild")
    return BuiltRoot(path, card)


def find_built(name: str, cache_dir=None) -> list[BuiltRoot]:
    """The shipped root of that name first, then roots built under ``name`` on this machine,
    newest first."""
    shipped = shipped_root(name)
    base = roots_dir(cache_dir)
    found = []
    for card_path in base.glob(f"{name}-*/card.json") if base.is_dir() else []:
        try:
            card = json.loads(card_path.read_text())
        except (OSError, ValueError):
            continue
        if card.get("name") == name and (card_path.parent / "root.safetensors").is_file():
            found.append(BuiltRoot(card_path.parent / "root.safetensors", card))
    found = sorted(found, key=lambda r: r.card.get("built_at", 0), reverse=True)
    return ([shipped] if shipped is not None else []) + found


def built_names(cache_dir=None) -> list[str]:
    base = roots_dir(cache_dir)
    names = set()
    for card_path in base.glob("*/card.json") if base.is_dir() else []:
        try:
            names.add(json.loads(card_path.read_text())["name"])
        except (OSError, ValueError, KeyError):
            continue
    return sorted(names)


def build_root(recipe: RootRecipe, cache_dir=None, log=print, threads: int | None = None,
               rebuild: bool = False) -> BuiltRoot:
    """The root of ``recipe``: the shipped one when the recipe is its recipe, else read from the
    cache, else trained now (one process at a time builds). ``rebuild``: skip the shipped root (train
    it on this machine, or read this machine's earlier build)."""
    if not rebuild:
        shipped = shipped_root(recipe.name, recipe)
        if shipped is not None:
            return shipped
    cache = resolve_cache_dir(cache_dir)
    if threads:
        torch.set_num_threads(threads)
    key = _key(recipe, _corpus_id(recipe, cache))
    out = roots_dir(cache) / f"{recipe.name}-{key}"
    if (out / "card.json").is_file():
        return BuiltRoot(out / "root.safetensors", json.loads((out / "card.json").read_text()))
    out.parent.mkdir(parents=True, exist_ok=True)
    with exclusive(out.parent / f".{recipe.name}-{key}.lock", f"building the root {recipe.name}", log):
        if (out / "card.json").is_file():  # another process built it while we waited
            return BuiltRoot(out / "root.safetensors", json.loads((out / "card.json").read_text()))
        data, corpus_id, corpus_info = _corpus(recipe, cache)  # only now: a cached root needs none
        params, stats = _train(recipe, data, log)
        card = _card(recipe, key, corpus_info, data, stats)
        tmp = Path(tempfile.mkdtemp(prefix=f".{recipe.name}-", dir=out.parent))
        try:
            from safetensors.torch import save_file

            hparams = _hparams(recipe, data.num_classes)
            save_file({k: v.contiguous() for k, v in timm_state_dict(params, hparams).items()},
                      str(tmp / "root.safetensors"),
                      # Only what the recipe determines: the same recipe gives the same bytes.
                      metadata={"munet_root": json.dumps({"name": recipe.name, "key": key,
                                                          "recipe": recipe.to_dict()})})
            card["file_sha256"] = file_sha256(tmp / "root.safetensors")
            (tmp / "card.json").write_text(json.dumps(card, indent=2, ensure_ascii=False) + "\n")
            os.replace(tmp, out)  # a reader sees a complete root directory or none
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    log(f"root {recipe.name}: wrote {out / 'root.safetensors'} (held-out accuracy "
        f"{card['heldout_test_accuracy']:.4f}, {card['wall_seconds']:.0f} s)")
    return BuiltRoot(out / "root.safetensors", card)


def _hparams(recipe: RootRecipe, num_classes: int) -> dict:
    return {"num_layers": recipe.depth, "adapter_layers": "", "adapter_dim": 32,
            "num_classes": num_classes, "ds_image_size": recipe.image_size}


def _train(recipe: RootRecipe, data: TaskData, log) -> tuple[dict, dict]:
    cfg = recipe.vit_config()
    h = _hparams(recipe, data.num_classes)
    gen = torch.Generator().manual_seed(recipe.seed)
    names = root_component_names(cfg) + ["head"]
    params = {n: init_component(n, cfg, h, gen) for n in names}
    # A zero head makes every early gradient of the body zero but the head's: start it small instead.
    params["head"]["weight"].normal_(0.0, 0.01, generator=gen)
    model = PathModel(cfg, h, params, names)
    tensors = list(model.trainable_tensors().values())
    decay = [p for p in tensors if p.ndim >= 2]
    no_decay = [p for p in tensors if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=recipe.lr, betas=(0.9, 0.999))
    data_t = TaskTensors(data, torch.device("cpu"), validation_examples=len(data.val_y))
    total = max(1, recipe.train_images // recipe.batch_size)
    warm = max(1, int(recipe.warmup_ratio * total))
    batches = data_t.batch_indices(recipe.batch_size, gen)
    log(f"root {recipe.name}: pretraining ViT-{recipe.vit} x{recipe.depth} at {recipe.image_size} px on "
        f"{data.num_classes} classes ({data_t.n_train:,} images), {total:,} steps of {recipe.batch_size}")
    t0 = time.perf_counter()
    next_report, loss_avg, correct, seen = t0 + 15.0, None, 0, 0
    model.train()
    for step in range(total):
        lr = recipe.lr * (step + 1) / warm if step < warm else \
            0.5 * recipe.lr * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))
        for g in opt.param_groups:
            g["lr"] = lr
        idx = next(batches)
        x = augment_train(data_t.train_x[idx], {}, recipe.image_size, gen)
        y = data_t.train_y[idx]
        logits = model(x)
        loss = F.cross_entropy(logits, y, label_smoothing=recipe.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(tensors, 1.0)
        opt.step()
        loss_avg = loss.item() if loss_avg is None else 0.98 * loss_avg + 0.02 * loss.item()
        correct += int((logits.argmax(-1) == y).sum())
        seen += len(y)
        now = time.perf_counter()
        if now >= next_report or step == total - 1:
            rate = (step + 1) * recipe.batch_size / (now - t0)
            eta = (total - step - 1) * recipe.batch_size / rate
            log(f"root {recipe.name}: step {step + 1:,}/{total:,} loss {loss_avg:.3f} train acc "
                f"{correct / max(1, seen):.3f} {rate:,.0f} img/s, eta {eta:.0f} s")
            next_report, correct, seen = now + 15.0, 0, 0
    model.eval()
    val = accuracy(model, data_t.val_inputs(recipe.image_size), data_t.val_y)
    test = test_accuracy(model, data_t, recipe.image_size)
    out = {n: {k: v.detach().clone() for k, v in comp.items()} for n, comp in params.items()}
    return out, {"steps": total, "images_seen": total * recipe.batch_size, "val_accuracy": val,
                 "heldout_test_accuracy": test, "wall_seconds": time.perf_counter() - t0,
                 "torch_threads": torch.get_num_threads()}


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _card(recipe: RootRecipe, key: str, corpus_info: dict, data: TaskData, stats: dict) -> dict:
    import numpy
    import timm

    try:
        import PIL
        pil = PIL.__version__
    except ImportError:  # pragma: no cover - Pillow comes with timm
        pil = None
    return {"name": recipe.name, "key": key, "recipe": recipe.to_dict(), "corpus": corpus_info,
            "num_classes": data.num_classes, "class_names": data.class_names,
            "corpus_sizes": data.sizes(), **stats,
            "versions": {"torch": torch.__version__, "timm": timm.__version__, "numpy": numpy.__version__,
                         "pillow": pil, "python": platform.python_version()},
            # the build is bit-for-bit repeatable only on the same kind of CPU (and versions, threads):
            # float reductions are ordered by the kernels the CPU's instruction set selects
            "machine": {"cpu": cpu_model(), "machine": platform.machine()},
            "timm_model": {"name": recipe.vit_config().timm_name, "depth": recipe.depth,
                           "img_size": recipe.image_size, "act_layer": "gelu_tanh",
                           "note": "blocks, cls token, pos embed, patch embed, final norm; head is the "
                                   "pretraining head (discarded by agents)"},
            "built_at": time.time()}


def recipe_for(name: str, vit: VitConfig, image_size: int) -> RootRecipe:
    """The built-in recipe for a preset's architecture (``--root glyphs_cjk``)."""
    return dataclasses.replace(RootRecipe(), name=name, vit=vit.name, depth=vit.depth, image_size=image_size)
