"""Root pretraining (launch/make_root.py, agents.pretrain) and ``--root`` as users type it.

The fast tests pretrain on a tiny user corpus (``npz:``) in a temporary data cache: the recipe is
deterministic for a seed, the card says what was built, the checkpoint is timm-named, and a swarm
started with ``--root NAME`` holds exactly those tensors. The slow test renders the built-in CJK corpus
from the real Debian font packages (a download of ~105 MB) and re-checks its disjointness from the
benchmark on what it built.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.swarm import read, run_cli

from agents.roots import CheckpointError
from agents.vit import vit_config

VIT = vit_config("ti", depth=3)


def _tiny_corpus(path: Path, seed: int = 0) -> str:
    """Six classes of bars at different positions and angles, with noise (learnable in seconds)."""
    rng = np.random.default_rng(seed)

    def draw(label: int, n: int) -> np.ndarray:
        x = rng.integers(0, 40, (n, 28, 28, 1)).astype(np.uint8)
        if label < 3:
            x[:, 4 + 8 * label:8 + 8 * label, :, 0] = 220
        else:
            x[:, :, 4 + 8 * (label - 3):8 + 8 * (label - 3), 0] = 220
        return x

    arrays = {}
    for split, n in (("train", 40), ("val", 8), ("test", 8)):
        xs = [draw(c, n) for c in range(6)]
        arrays[f"x_{split}"] = np.concatenate(xs)
        arrays[f"y_{split}"] = np.repeat(np.arange(6), n).astype(np.int64)
    np.savez(path, **arrays)
    return f"npz:{path}"


def _make_root(data_dir: Path, corpus: str, *extra: str):
    return run_cli("launch/make_root.py", "--name", "tiny", "--corpus", corpus, "--images", "1536",
                   "--batch-size", "64", "--data-dir", str(data_dir), "--print", *extra, timeout=240)


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    base = tmp_path_factory.mktemp("root")
    corpus = _tiny_corpus(base / "corpus.npz")
    r = _make_root(base / "cache", corpus)
    assert r.returncode == 0, r.stderr[-2000:]
    return base, corpus, json.loads(r.stdout)


def test_make_root_writes_a_timm_checkpoint_and_a_card(tiny_root):
    from safetensors.torch import load_file

    base, corpus, card = tiny_root
    for key in ("name", "key", "recipe", "corpus", "num_classes", "images_seen", "steps",
                "val_accuracy", "heldout_test_accuracy", "wall_seconds", "versions", "file_sha256",
                "timm_model", "built_at"):
        assert key in card, key
    assert card["name"] == "tiny" and card["num_classes"] == 6
    assert card["recipe"]["seed"] == 0 and card["recipe"]["corpus"] == corpus
    assert card["images_seen"] == 1536 and card["steps"] == 24
    assert set(card["versions"]) >= {"torch", "timm", "numpy", "pillow", "python"}
    assert card["heldout_test_accuracy"] > 1 / 6 + 0.1  # it learned the corpus, not chance
    path = Path(card["path"])
    assert path.parent.parent == base / "cache" / "roots" and path.name == "root.safetensors"
    state = load_file(str(path))
    assert {"cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.2.mlp.fc1.weight", "norm.weight",
            "head.weight"} <= set(state)
    assert not any(k.startswith("blocks.3.") for k in state)
    assert state["pos_embed"].shape == (1, 5, 192) and state["head.weight"].shape == (6, 192)
    import hashlib

    assert hashlib.sha256(path.read_bytes()).hexdigest() == card["file_sha256"]
    # timm's own VisionTransformer takes the checkpoint as is (the card says how to build it).
    import timm

    tm = card["timm_model"]
    model = timm.create_model(tm["name"], pretrained=False, num_classes=6, img_size=tm["img_size"],
                              depth=tm["depth"], act_layer=tm["act_layer"])
    model.load_state_dict(state, strict=True)  # raises on any missing or unexpected key


def test_same_recipe_is_cached_and_deterministic_for_a_seed(tiny_root, tmp_path):
    base, corpus, card = tiny_root
    again = _make_root(base / "cache", corpus)  # cached: same directory, not retrained
    assert again.returncode == 0 and json.loads(again.stdout)["built_at"] == card["built_at"]
    other = _make_root(tmp_path / "cache2", corpus)  # another machine's cache, same recipe
    assert other.returncode == 0, other.stderr[-2000:]
    assert json.loads(other.stdout)["file_sha256"] == card["file_sha256"]
    seed1 = _make_root(tmp_path / "cache3", corpus, "--seed", "1")
    assert seed1.returncode == 0 and json.loads(seed1.stdout)["file_sha256"] != card["file_sha256"]


def test_root_spec_forms(tiny_root, tmp_path):
    from agents.root_source import resolve_root

    base, corpus, card = tiny_root
    cache = base / "cache"
    assert resolve_root("random", VIT, 32, cache_dir=cache).kind == "random"
    by_name = resolve_root("tiny", VIT, 32, cache_dir=cache)
    assert by_name.kind == "built" and str(by_name.path) == card["path"]
    assert by_name.provenance()["root_file_sha256"] == card["file_sha256"]
    by_file = resolve_root(card["path"], VIT, 32, cache_dir=cache)
    assert by_file.kind == "file" and by_file.provenance()["root_file_sha256"] == card["file_sha256"]
    cases = {
        "": "--root is empty",
        str(tmp_path / "nope.safetensors"): "no such checkpoint file",
        "./nope": "no such checkpoint file",
        "no_such_root": "unknown root 'no_such_root'",
        "timm:": "needs a model name",
        "timm:not_a_model_at_all": "timm has no model",
    }
    for spec, words in cases.items():
        with pytest.raises(CheckpointError, match=words):
            resolve_root(spec, VIT, 32, cache_dir=cache)
    with pytest.raises(CheckpointError, match="unknown root 'tiny'.*built here: tiny"):
        resolve_root("tiny", vit_config("ti", depth=4), 32, cache_dir=cache)  # too shallow for depth 4
    # the shipped glyphs_cjk fits 32 px only: at 48 px nothing is built yet
    with pytest.raises(CheckpointError, match="not built yet"):
        resolve_root("glyphs_cjk", VIT, 48, cache_dir=tmp_path / "empty", build=False)
    shipped = resolve_root("glyphs_cjk", VIT, 32, cache_dir=tmp_path / "empty", build=False)
    assert shipped.kind == "built" and "shipped_roots" in str(shipped.path)


def test_timm_root_offline_fails_at_once_with_one_line(tmp_path):
    store = tmp_path / "store"
    r = run_cli("launch/run_swarm.py", "--store", str(store), "--tasks", "uci_digits", "--preset", "test",
                "--root", "timm:vit_tiny_patch16_224.augreg_in21k", timeout=120,
                env={"HF_HUB_OFFLINE": "1", "MUNET_DATA_DIR": str(tmp_path / "cache")})
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "HF_HUB_OFFLINE" in lines[0] and "Traceback" not in r.stderr
    assert not store.exists()  # nothing created for a root that cannot be had


def test_swarm_on_a_built_root_holds_its_tensors(tiny_root, tmp_path):
    from safetensors.torch import load_file

    from agents.view import from_raw

    base, corpus, card = tiny_root
    store = str(tmp_path / "store")
    r = run_cli("launch/run_swarm.py", "--store", store, "--tasks", "uci_digits", "--preset", "test",
                "--cycles", "1", "--root", "tiny", timeout=240,
                env={"MUNET_DATA_DIR": str(base / "cache")})
    assert r.returncode == 0, r.stderr[-2000:]
    root = read(store, lambda s: s.get_model(s.root_model_id()))
    m = root.metrics
    assert m["root_spec"] == "tiny" and m["root_kind"] == "built"
    assert m["root_file_sha256"] == card["file_sha256"] and m["root_corpus"] == corpus
    names = read(store, lambda s: {s.get_component(c).name: c for c in root.components})
    state = load_file(card["path"])
    block, _ = read(store, lambda s: s.load_component_tensors(names["encoderblock_1"]))
    assert torch.equal(from_raw(block["attn.qkv.weight"], torch.device("cpu")), state["blocks.1.attn.qkv.weight"])
    assert "head" not in names  # the pretraining head is not part of the root


def test_make_root_bad_input_is_one_line_and_exit_2(tmp_path):
    cases = [
        ["--corpus", "imagenet"],
        ["--corpus", "npz:" + str(tmp_path / "missing.npz"), "--name", "x"],
        ["--corpus", "npz:" + str(tmp_path / "missing.npz")],   # a user corpus needs --name
        ["--classes", "1,2"],
        ["--image-size", "30"],
        ["--vit", "huge"],
        ["--name", "bad name"],
    ]
    for args in cases:
        r = run_cli("launch/make_root.py", "--data-dir", str(tmp_path / "cache"), *args)
        assert r.returncode == 2, (args, r.stderr[-1000:])
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, (args, r.stderr)
    assert not (tmp_path / "cache" / "roots").exists()


# ---------------------------------------------------------------------------------- built-in corpus

def test_corpus_code_points_are_outside_every_benchmark_script():
    from taskdata import glyphs
    from taskdata.root_corpus import han_candidates, hangul_candidates, kana_candidates

    benchmark = {form for cls in glyphs.SCRIPTS.values() for forms in cls for form in forms} | set("0123456789")
    corpus = set(han_candidates()) | set(hangul_candidates()) | set(kana_candidates())
    assert len(han_candidates()) > 1500 and len(hangul_candidates()) == 2350 and len(kana_candidates()) > 100
    assert not corpus & benchmark
    assert not set("ぁっゃヘロエカ") & corpus  # small kana and Han/hiragana look-alikes are left out


@pytest.mark.slow
def test_builtin_corpus_is_deterministic_and_disjoint_from_the_benchmark(tmp_path):
    from taskdata import load_task
    from taskdata.root_corpus import CorpusConfig, build_corpus, fetch_fonts

    font_dir, packages = fetch_fonts(tmp_path)
    assert len(packages) >= 15 and all(packages.values())
    cfg = CorpusConfig(han_classes=24, hangul_classes=12, kana_classes=6, train_per_class=12,
                       val_per_class=2, test_per_class=4)
    a = build_corpus(cfg, font_dir, packages)
    b = build_corpus(cfg, font_dir, packages)
    assert a.classes == b.classes and len(a.classes) == 42
    for k in a.arrays:
        assert np.array_equal(a.arrays[k], b.arrays[k]), k
    info = a.info
    assert info["classes_per_group"] == {"han": 24, "hangul": 12, "kana": 6}
    assert info["disjointness"]["max_corr_kept"] <= 0.85 and info["held_out_faces"]
    assert not set(info["held_out_faces"]) - set(info["faces"])
    # An independent re-check on what was built: the corpus's class means, against the class means of
    # the real benchmark tasks' training images (28x28, as the model sees them).
    def means(x, y, n):
        x = x[..., 0].astype(np.float64)
        return np.stack([x[y == c].mean(0).ravel() for c in range(n)])

    def corr(p, q):
        p = p - p.mean(1, keepdims=True); q = q - q.mean(1, keepdims=True)
        p /= np.linalg.norm(p, axis=1, keepdims=True); q /= np.linalg.norm(q, axis=1, keepdims=True)
        return p @ q.T

    corpus_means = means(a.arrays["train_x"], a.arrays["train_y"], len(a.classes))
    closest_within = []
    for task in ("glyphs_latin", "glyphs_greek", "glyphs_cyrillic", "glyphs_hebrew", "mnist5k"):
        d = load_task(task, tmp_path / "data")
        bench = means(d.train_x, d.train_y, d.num_classes)
        within = corr(bench, bench)
        np.fill_diagonal(within, -1)
        closest_within.append(within.max())
        cross = corr(corpus_means, bench)
        # No corpus class is closer to a benchmark class than that benchmark's most similar pair
        # of its own classes (which the benchmark itself asks the model to tell apart).
        assert cross.max() < within.max(), (task, float(cross.max()), float(within.max()))
    # And the rendered images are real glyphs: ink on dark background, varied.
    x = a.arrays["train_x"]
    assert x.mean() < 100 and x.std() > 30


def test_the_shipped_root_matches_its_card_and_is_used_without_building(tmp_path):
    import hashlib

    from agents import pretrain
    from agents.config import resolve_preset
    from agents.root_source import resolve_root
    from agents.vit import preset_vit

    folder = pretrain.SHIPPED_ROOTS / pretrain.BUILTIN_ROOT
    card = json.loads((folder / "card.json").read_text())
    digest = hashlib.sha256((folder / "root.safetensors").read_bytes()).hexdigest()
    assert digest == card["file_sha256"]
    assert card["recipe"] == json.loads(json.dumps(pretrain.RootRecipe().to_dict()))
    preset = resolve_preset("cpu")
    # an empty data cache: the shipped file is the root at once, nothing is rendered or trained
    src = resolve_root(pretrain.BUILTIN_ROOT, preset_vit(preset), preset.budget.image_size,
                       cache_dir=tmp_path / "empty", log=lambda m: pytest.fail(f"built: {m}"))
    assert src.path == folder / "root.safetensors" and src.card["file_sha256"] == digest
    assert not (tmp_path / "empty" / "roots").exists()
