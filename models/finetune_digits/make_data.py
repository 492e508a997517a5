"""Split the bundled digits (models/digits/data) into the fine-tuning example's two tasks.

The *source* task is digits 0-4 (every training image of them), the *target* task digits 5-9
with only ``PER_CLASS`` training images per digit, as fine-tuning is for a new task with few
labels (Caffe's finetune_flickr_style). Target labels are renumbered 0-4 (digit - 5) because
the new classifier layer has five outputs. Run from the repository root; the output is the
same every time (rows keep their order in the bundled files)::

    python models/finetune_digits/make_data.py
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

SOURCE = Path("models/digits/data")
OUT = Path("models/finetune_digits/data")
PER_CLASS = 10


def read(name: str) -> tuple[np.ndarray, np.ndarray]:
    with h5py.File(SOURCE / name, "r") as f:
        return f["data"][:], f["label"][:]


def write(name: str, data: np.ndarray, label: np.ndarray) -> None:
    with h5py.File(OUT / f"{name}.h5", "w") as f:
        f.create_dataset("data", data=data, compression="gzip", compression_opts=9, shuffle=True)
        f.create_dataset("label", data=label, compression="gzip", compression_opts=9)
    (OUT / f"{name}.txt").write_text(f"{OUT / name}.h5\n")


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    train, train_label = read("train.h5")
    test, test_label = read("test.h5")
    low = train_label < 5
    write("source_train", train[low], train_label[low])
    write("source_test", test[test_label < 5], test_label[test_label < 5])
    # The first PER_CLASS training images of each of 5..9, in file order.
    rank = np.zeros_like(train_label)
    for digit in range(5, 10):
        rank[train_label == digit] = np.arange((train_label == digit).sum())
    few = (train_label >= 5) & (rank < PER_CLASS)
    write("target_train", train[few], train_label[few] - 5)
    high = test_label >= 5
    write("target_test", test[high], test_label[high] - 5)


if __name__ == "__main__":
    main()
