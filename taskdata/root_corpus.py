"""The built-in root-pretraining corpus: rendered CJK ideographs, Hangul syllables and kana.

Why this corpus: the method shares frozen pretrained knowledge, and no pretrained weights or natural
image sets can be had offline. Glyphs of scripts the benchmark does not use can: Debian ships dozens of
CJK and Korean typefaces. The corpus is disjoint from every benchmark task by construction (other code
points) and by a measured check (no class may look like a benchmark digit or letter, see
``disjointness``).

Pipeline (deterministic for a seed, the font packages and the library versions):

1. ``fetch_fonts``: ``apt-get download`` the packages in ``FONT_PACKAGES`` into the cache and unpack them
   with ``dpkg-deb -x`` (no root needed); their versions are recorded, they pin what the corpus is.
2. ``usable_faces``: load every face; drop ones that fail to load or draw nothing. Near-duplicate faces
   (IPA Gothic vs its proportional twin) are removed by comparing renders of probe characters.
3. Coverage per face and code point: a glyph counts only if it is not the .notdef box, not empty, and
   not a placeholder that the face maps to more than two code points.
4. Consensus (Han only): a face whose render of an ideograph correlates poorly with the mean render over
   all faces draws something else (a font that maps hanja to their Hangul readings); that render is
   dropped.
5. Classes: a seeded sample of each group among code points with enough styles left, then the
   disjointness filter against benchmark-style templates.
6. Images: a seeded quarter of the faces is held out for the test split (generalisation to unseen
   typefaces); train and validation draw from the rest, with the same random affine, blur, contrast and
   noise as the ``glyphs_*`` tasks (``glyphs._distortions`` / ``glyphs._synthesize``).
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from taskdata import glyphs
from taskdata.cache import TaskDataError, exclusive, load_splits, progress, save_splits_atomic

CORPUS_VERSION = 1
CORPUS_NAME = "glyphs_cjk"

# About 105 MB of .deb files, fetched once per machine. Chosen for style variety per group (Chinese,
# Japanese and Korean faces; gothic, mincho/batang, kai, pen and brush styles). Deliberately absent:
# fonts-alee (maps hanja to Hangul readings), fonts-smiley-sans (placeholders), fonts-kanjistrokeorders
# (draws stroke-order digits, which would leak digits into the corpus).
FONT_PACKAGES = (
    "fonts-wqy-microhei", "fonts-wqy-zenhei", "fonts-arphic-ukai", "fonts-arphic-uming",
    "fonts-arphic-gkai00mp", "fonts-ipafont-gothic", "fonts-ipafont-mincho", "fonts-vlgothic",
    "fonts-sawarabi-gothic", "fonts-sawarabi-mincho", "fonts-motoya-l-cedar", "fonts-konatu",
    "fonts-unfonts-core", "fonts-unfonts-extra", "fonts-nanum", "fonts-nanum-extra", "fonts-baekmuk",
)

# Small kana are the big ones at another size (label noise after scale jitter); these katakana are
# drawn like a Han character or like their hiragana twin.
_SMALL_KANA = set("ぁぃぅぇぉっゃゅょゎゕゖァィゥェォッャュョヮヵヶ")
_KANA_LOOKALIKES = set("ヘロエカタトニハーオ")


@dataclass(frozen=True)
class CorpusConfig:
    """Everything that determines the corpus arrays (hashed into the cache key)."""

    han_classes: int = 720
    hangul_classes: int = 240
    kana_classes: int = 64
    train_per_class: int = 240
    val_per_class: int = 8
    test_per_class: int = 16
    min_train_styles: int = 3
    disjoint_max_corr: float = 0.85
    seed: int = 0

    def key(self, packages: dict[str, str]) -> str:
        desc = {"version": CORPUS_VERSION, "config": asdict(self), "packages": packages}
        return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:12]


# ---------------------------------------------------------------------------------- class sets

def _decode_range(codec: str, lead: range, trail: range) -> list[str]:
    out = []
    for a in lead:
        for b in trail:
            try:
                ch = bytes([a, b]).decode(codec)
            except UnicodeDecodeError:
                continue
            if len(ch) == 1:
                out.append(ch)
    return out


def han_candidates() -> list[str]:
    """Ideographs in both GB2312 level 1 and JIS X 0208 level 1 (drawn by Chinese and Japanese faces)."""
    gb = set(_decode_range("gb2312", range(0xB0, 0xD8), range(0xA1, 0xFF)))
    jis = set(_decode_range("euc_jp", range(0xB0, 0xD0), range(0xA1, 0xFF)))
    return sorted(ch for ch in gb & jis if 0x4E00 <= ord(ch) <= 0x9FFF)


def hangul_candidates() -> list[str]:
    """KS X 1001's 2,350 common Hangul syllables."""
    return [ch for ch in _decode_range("euc_kr", range(0xB0, 0xC9), range(0xA1, 0xFF))
            if 0xAC00 <= ord(ch) <= 0xD7A3]


def kana_candidates() -> list[str]:
    hira = [chr(c) for c in range(0x3041, 0x3097)]
    kata = [chr(c) for c in range(0x30A1, 0x30F7)]
    return [ch for ch in hira + kata if ch not in _SMALL_KANA and ch not in _KANA_LOOKALIKES]


# ---------------------------------------------------------------------------------- fonts

def _run(cmd: list[str], cwd: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)


def fetch_fonts(cache: Path) -> tuple[Path, dict[str, str]]:
    """Download and unpack ``FONT_PACKAGES`` once; returns (font dir, package -> version)."""
    target = cache / "root-fonts"
    manifest = target / "packages.json"
    if manifest.is_file():
        return target, json.loads(manifest.read_text())
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise TaskDataError(f"the {CORPUS_NAME} corpus needs Debian font packages and {tool} is not "
                                "available; pretrain on your own corpus with --corpus folder:PATH or npz:PATH")
    cache.mkdir(parents=True, exist_ok=True)
    with exclusive(cache / ".root-fonts.lock", "fetching the root corpus's font packages", progress):
        if manifest.is_file():
            return target, json.loads(manifest.read_text())
        progress(f"fetching {len(FONT_PACKAGES)} Debian font packages (~105 MB) for the root corpus")
        with tempfile.TemporaryDirectory(prefix="munet-fonts-", dir=cache) as tmp:
            done = _run(["apt-get", "download", *FONT_PACKAGES], cwd=tmp)
            debs = sorted(Path(tmp).glob("*.deb"))
            if done.returncode != 0 or len(debs) != len(FONT_PACKAGES):
                last = (done.stderr.strip().splitlines() or ["no package downloaded"])[-1]
                raise TaskDataError(f"cannot download the root corpus font packages ({last}); run "
                                    "`apt-get update` and try again")
            unpacked = Path(tmp) / "root"
            versions = {}
            for deb in debs:
                info = _run(["dpkg-deb", "-f", str(deb), "Package", "Version"])
                x = _run(["dpkg-deb", "-x", str(deb), str(unpacked)])
                if info.returncode != 0 or x.returncode != 0:
                    raise TaskDataError(f"cannot unpack {deb.name}: {(info.stderr or x.stderr).strip()[:200]}")
                fields = dict(line.split(": ", 1) for line in info.stdout.strip().splitlines())
                versions[fields["Package"]] = fields["Version"]
            fonts = unpacked / "usr" / "share" / "fonts"
            (fonts / "packages.json").write_text(json.dumps(versions, indent=1, sort_keys=True))
            if target.exists():
                shutil.rmtree(target)
            os.replace(fonts, target)
    return target, versions


def _font_files(font_dir: Path) -> list[Path]:
    files = [p for p in font_dir.rglob("*") if p.suffix.lower() in (".ttf", ".otf", ".ttc")]
    return sorted(files, key=lambda p: (p.name, str(p)))


def _render(font, ch: str, stroke: int = 0) -> np.ndarray:
    from PIL import Image, ImageDraw

    img = Image.new("L", (glyphs.CANVAS, glyphs.CANVAS), 0)
    draw = ImageDraw.Draw(img)
    left, top, right, bottom = draw.textbbox((0, 0), ch, font=font, stroke_width=stroke)
    origin = ((glyphs.CANVAS - (right - left)) / 2 - left, (glyphs.CANVAS - (bottom - top)) / 2 - top)
    draw.text(origin, ch, fill=255, font=font, stroke_width=stroke, stroke_fill=255)
    return np.asarray(img)


_PROBES = "永国語한글あア"


def usable_faces(font_dir: Path) -> list[tuple[str, object]]:
    """(file name, loaded face) for every face that loads and is not a near-duplicate of an earlier one."""
    from PIL import ImageFont

    faces, probes = [], []
    for path in _font_files(font_dir):
        try:
            font = ImageFont.truetype(str(path), glyphs.FONT_PX, layout_engine=ImageFont.Layout.BASIC)
            probe = np.stack([_render(font, ch) for ch in _PROBES]).astype(np.float32)
        except OSError:  # bitmap-only faces, faces that raise on every glyph
            continue
        if probe.max() == 0:
            continue
        if any(np.abs(probe - other).mean() < 2.0 for other in probes):
            continue  # same outlines under another name (proportional twins, re-packaged faces)
        faces.append((path.name, font))
        probes.append(probe)
    return faces


def _coverage(font, chars: list[str]) -> set[str]:
    """Code points this face really draws (not .notdef, not empty, not a shared placeholder)."""
    notdef = font.getmask("\U0010fffd")
    notdef_key = (notdef.size, bytes(notdef))
    seen: dict[tuple, list[str]] = {}
    for ch in chars:
        mask = font.getmask(ch)
        if mask.size[0] == 0 or mask.size[1] == 0:
            continue
        raw = bytes(mask)
        if (mask.size, raw) == notdef_key or not any(raw):
            continue
        seen.setdefault((mask.size, hashlib.blake2b(raw, digest_size=8).digest()), []).append(ch)
    return {ch for group in seen.values() if len(group) <= 2 for ch in group}


def _corr_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of every row of a (N, P) with every row of b (M, P)."""
    a = a - a.mean(1, keepdims=True)
    b = b - b.mean(1, keepdims=True)
    a /= np.linalg.norm(a, axis=1, keepdims=True) + 1e-9
    b /= np.linalg.norm(b, axis=1, keepdims=True) + 1e-9
    return a @ b.T


def _blurred(images: np.ndarray, sigma: float = 2.0) -> np.ndarray:
    """Gaussian blur of (N, 64, 64) renders, flattened (sigma in bank pixels, ~1 output pixel)."""
    import torch

    k = glyphs._gaussian_kernels(torch.full((1,), sigma), 6)[0]
    x = torch.from_numpy(images.astype(np.float32))[:, None]
    x = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (6, 6, 6, 6)), k[None, None, :, None])
    x = torch.nn.functional.conv2d(x, k[None, None, None, :])
    return x.reshape(len(images), -1).numpy()


def benchmark_templates() -> np.ndarray:
    """Blurred renders of every benchmark-style character (digits and the glyph scripts) in DejaVu."""
    from PIL import ImageFont

    chars = sorted({form for cls in glyphs.SCRIPTS.values() for forms in cls for form in forms}
                   | set("0123456789"))
    renders = []
    for path in sorted(p for pat in glyphs.FONT_GLOBS for p in glob.glob(pat)):
        font = ImageFont.truetype(path, glyphs.FONT_PX, layout_engine=ImageFont.Layout.BASIC)
        if glyphs._has_all_glyphs(font, chars):
            renders.append(np.stack([_render(font, ch) for ch in chars]))
        if len(renders) == 4:
            break
    if not renders:
        raise TaskDataError("no DejaVu font draws every benchmark character: cannot check disjointness")
    return _blurred(np.mean(renders, axis=0))


def disjointness(class_means: np.ndarray, templates: np.ndarray) -> np.ndarray:
    """Highest correlation of each class's blurred mean render with any benchmark template."""
    return _corr_rows(_blurred(class_means), templates).max(axis=1)


# ---------------------------------------------------------------------------------- the corpus

@dataclass
class Corpus:
    arrays: dict[str, np.ndarray]
    classes: list[str]
    info: dict  # what a root card records about its corpus


def _bank(faces, chars: list[str], group: dict[str, str]):
    """Renders per (class, face) of every covered char, Han renders checked by consensus."""
    covered = [_coverage(font, chars) for _, font in faces]
    rows: dict[str, list[tuple[int, np.ndarray]]] = {}
    for fi, (_, font) in enumerate(faces):
        for ch in chars:
            if ch in covered[fi]:
                rows.setdefault(ch, []).append((fi, _render(font, ch)))
    dropped = 0
    for ch, items in rows.items():
        if group[ch] != "han" or len(items) < 3:
            continue
        stack = np.stack([img for _, img in items]).astype(np.float32)
        corr = _corr_rows(_blurred(stack), _blurred(stack.mean(0, keepdims=True)))[:, 0]
        keep = [item for item, c in zip(items, corr) if c >= 0.5]
        dropped += len(items) - len(keep)
        rows[ch] = keep
    return rows, dropped


def build_corpus(cfg: CorpusConfig, font_dir: Path, packages: dict[str, str]) -> Corpus:
    rng = np.random.default_rng(cfg.seed)
    faces = usable_faces(font_dir)
    if len(faces) < 4:
        raise TaskDataError(f"only {len(faces)} usable CJK faces under {font_dir}: need at least 4")
    held = set(glyphs._held_out_ids(rng, len(faces)))
    groups = {"han": han_candidates(), "hangul": hangul_candidates(), "kana": kana_candidates()}
    wanted = {"han": cfg.han_classes, "hangul": cfg.hangul_classes, "kana": cfg.kana_classes}
    # Over-sample candidates (some fail coverage or disjointness), in a seeded order.
    pool, group_of = [], {}
    for name, chars in groups.items():
        order = rng.permutation(len(chars))
        take = [chars[i] for i in order[: min(len(chars), 3 * wanted[name] // 2 + 32)]]
        pool += take
        group_of.update({ch: name for ch in take})
    progress(f"root corpus: {len(faces)} faces, checking {len(pool)} candidate characters")
    rows, consensus_dropped = _bank(faces, pool, group_of)

    templates = benchmark_templates()
    means = {ch: np.mean([img for _, img in items], axis=0) for ch, items in rows.items() if items}
    chars_with_mean = sorted(means)
    max_corr = dict(zip(chars_with_mean, disjointness(np.stack([means[c] for c in chars_with_mean]),
                                                      templates)))
    classes, too_similar = [], 0
    for name in groups:
        picked = 0
        for ch in [c for c in pool if group_of[c] == name]:
            if picked == wanted[name]:
                break
            items = rows.get(ch, [])
            train_faces = [fi for fi, _ in items if fi not in held]
            if len(train_faces) < cfg.min_train_styles or not any(fi in held for fi, _ in items):
                continue
            if max_corr[ch] > cfg.disjoint_max_corr:
                too_similar += 1
                continue
            classes.append(ch)
            picked += 1
        if picked < wanted[name]:
            raise TaskDataError(f"root corpus: only {picked} {name} characters have enough styles "
                                f"(wanted {wanted[name]}); lower the class count")

    bank_images, extents, by_class = [], [], []
    for ch in classes:
        train_rows, test_rows = [], []
        for fi, img in rows[ch]:
            for stroke_img in (img, _dilate(img)):
                (test_rows if fi in held else train_rows).append(len(bank_images))
                bank_images.append(stroke_img)
                ys, xs = np.nonzero(stroke_img > 64)
                extents.append(max(np.ptp(xs) + 1, np.ptp(ys) + 1) if len(xs) else glyphs.CANVAS)
        by_class.append((train_rows, test_rows))
    bank = glyphs._GlyphBank(np.stack(bank_images), np.asarray(extents, np.float64), {}, np.zeros(0))
    arrays: dict[str, np.ndarray] = {}
    for split, per_class, side in (("train", cfg.train_per_class, 0), ("val", cfg.val_per_class, 0),
                                   ("test", cfg.test_per_class, 1)):
        labels = rng.permutation(np.repeat(np.arange(len(classes)), per_class))
        u = rng.random(len(labels))
        bank_idx = np.array([by_class[c][side][int(v * len(by_class[c][side]))]
                             for c, v in zip(labels, u)], dtype=np.int64)
        draws = glyphs._distortions(rng, labels, bank_idx, bank.extent[bank_idx])
        arrays[f"{split}_x"] = glyphs._synthesize(bank, draws, rng)
        arrays[f"{split}_y"] = draws.labels
    counts = {g: sum(group_of[c] == g for c in classes) for g in groups}
    styles = [len(r[0]) // 2 for r in by_class]
    info = {"name": CORPUS_NAME, "version": CORPUS_VERSION, "config": asdict(cfg), "packages": packages,
            "faces": [name for name, _ in faces], "held_out_faces": sorted(faces[i][0] for i in held),
            "classes_per_group": counts, "train_styles_per_class_min_median_max":
            [int(min(styles)), int(np.median(styles)), int(max(styles))],
            "consensus_dropped_renders": int(consensus_dropped),
            "disjointness": {"max_corr_threshold": cfg.disjoint_max_corr,
                             "excluded_classes": int(too_similar),
                             "max_corr_kept": float(max(max_corr[c] for c in classes))}}
    return Corpus(arrays, classes, info)


def _dilate(img: np.ndarray) -> np.ndarray:
    """A heavier stroke of the same glyph (3x3 max filter), the corpus's stroke-width variation."""
    p = np.pad(img, 1)
    return np.max([p[i:i + img.shape[0], j:j + img.shape[1]] for i in range(3) for j in range(3)], axis=0)


def load_corpus(cache: Path, cfg: CorpusConfig = CorpusConfig()) -> Corpus:
    """The built-in corpus, rendered once and cached as .npz (plus its classes and info as JSON)."""
    font_dir, packages = fetch_fonts(cache)
    key = cfg.key(packages)
    npz, meta = cache / f"{CORPUS_NAME}-{key}.npz", cache / f"{CORPUS_NAME}-{key}.json"
    arrays = load_splits(npz)
    if arrays is not None and meta.is_file():
        m = json.loads(meta.read_text())
        return Corpus(arrays, m["classes"], m["info"])
    with exclusive(cache / f".{CORPUS_NAME}-{key}.lock", "rendering the root corpus"):
        arrays = load_splits(npz)
        if arrays is not None and meta.is_file():
            m = json.loads(meta.read_text())
            return Corpus(arrays, m["classes"], m["info"])
        corpus = build_corpus(cfg, font_dir, packages)
        corpus.info["key"] = key
        save_splits_atomic(npz, corpus.arrays)
        tmp = meta.with_suffix(".tmp")
        tmp.write_text(json.dumps({"classes": corpus.classes, "info": corpus.info}, ensure_ascii=False))
        os.replace(tmp, meta)
    return corpus
