"""Build the bundled digits dataset (models/digits/data/) from scikit-learn's copy of it.

The source is ``sklearn/datasets/data/digits.csv.gz``: the test part of the UCI "Optical
Recognition of Handwritten Digits" set (E. Alpaydin, C. Kaynak, 1998; CC BY 4.0), 1797 rows of
64 pixel counts in 0..16 (an 8x8 image, row-major) and the digit. Get it without installing
scikit-learn::

    pip download scikit-learn --no-deps -d /tmp/skl
    python tools/make_digits.py /tmp/skl/scikit_learn-*.whl

(the argument may also be the extracted ``digits.csv.gz``). The split is stratified and fixed:
36 images of each digit go to the test set (360), the other 1437 to the training set, chosen
by a seeded generator, and the training rows are stored shuffled because Caffe's HDF5Data layer
reads rows in file order unless ``shuffle`` is set. Each set is one HDF5 file with Caffe's
HDF5Data datasets, ``data`` (N, 1, 8, 8) float32 scaled to [0, 1] and ``label`` (N,) float32,
and a list file naming it by a path relative to the repository root, where Caffe (and netforge)
resolve it: commands run from the root. Running the tool again writes identical files.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import zipfile
from pathlib import Path

import h5py
import numpy as np

SOURCE_MEMBER = "sklearn/datasets/data/digits.csv.gz"
SOURCE_SHA256 = "09f66e6debdee2cd2b5ae59e0d6abbb73fc2b0e0185d2e1957e9ebb51e23aa22"
TEST_PER_CLASS = 36
SEED = 20240601
OUT_DIR = Path("models/digits/data")


def read_source(path: Path) -> bytes:
    """The gzipped CSV's bytes, from a scikit-learn wheel or the file itself, checksum-checked."""
    if path.suffix == ".whl":
        with zipfile.ZipFile(path) as wheel:
            raw = wheel.read(SOURCE_MEMBER)
    else:
        raw = path.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    if digest != SOURCE_SHA256:
        raise SystemExit(f"{path}: sha256 {digest} is not that of the known digits.csv.gz")
    return raw


def split(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row indices of the training and test sets: TEST_PER_CLASS of each digit for testing."""
    rng = np.random.default_rng(SEED)
    labels = table[:, -1].astype(np.int64)
    test = np.concatenate(
        [rng.permutation(np.flatnonzero(labels == k))[:TEST_PER_CLASS] for k in range(10)]
    )
    train = np.setdiff1d(np.arange(len(table)), test)
    return rng.permutation(train), np.sort(test)


def write_set(table: np.ndarray, rows: np.ndarray, name: str, out_dir: Path) -> None:
    """``<name>.h5`` with ``data`` and ``label``, and ``<name>.txt`` listing it."""
    data = (table[rows, :64] / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    label = table[rows, 64].astype(np.float32)
    h5_path = out_dir / f"{name}.h5"
    # No timestamps and a fixed layout, so the files are byte-for-byte reproducible.
    with h5py.File(h5_path, "w", track_order=False, libver="earliest") as f:
        f.create_dataset("data", data=data, compression="gzip", compression_opts=9, shuffle=True)
        f.create_dataset("label", data=label, compression="gzip", compression_opts=9)
    (out_dir / f"{name}.txt").write_text(f"{h5_path.as_posix()}\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="scikit-learn wheel or digits.csv.gz")
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="output folder")
    args = parser.parse_args()
    text = gzip.decompress(read_source(args.source)).decode("ascii")
    table = np.loadtxt(io.StringIO(text), delimiter=",", dtype=np.float64)
    train, test = split(table)
    args.out.mkdir(parents=True, exist_ok=True)
    write_set(table, train, "train", args.out)
    write_set(table, test, "test", args.out)
    print(f"wrote {len(train)} training and {len(test)} test images to {args.out}")


if __name__ == "__main__":
    main()
