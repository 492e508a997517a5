"""Throughput of the data pipeline for CaffeNet-sized input, in images per second.

Builds an LMDB of encoded 256×256 JPEGs (as ``netforge convert imageset --encoded``), then
pulls batches from a Data layer in TRAIN phase (random 227 crops, mirror, mean_value) as
fast as the pipeline delivers them, with no net consuming the time in between::

    PYTHONPATH=. python tools/bench_data.py [--images 512] [--batch 256] [--batches 8]

With ``--train lenet`` or ``--train cifar10_quick`` it instead trains that model (from
``models/``, on the CPU) for ``--iterations`` on a synthetic database of the real record
shape (28×28 gray / 32×32 colour, raw Datums as Caffe's converters write them) and prints
the share of the training time the net spent waiting for data (the layers' wait_seconds).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from google.protobuf import text_format

from netforge.blob import Blob
from netforge.data.datum import encode_image, make_datum
from netforge.data.db import Writer
from netforge.layer import create_layer
from netforge.proto import pb


def natural_image(rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth image with some texture, so JPEG sizes resemble photos' (~20-40 KB)."""
    y, x = np.mgrid[0:size, 0:size] / size
    base = np.stack([np.sin(6 * x + k) * np.cos(4 * y - k) for k in range(3)])
    noise = rng.normal(0, 0.15, (3, size, size))
    return np.clip((base + noise + 1) * 127.5, 0, 255).astype(np.uint8)


def build_db(path: Path, images: int, size: int) -> float:
    rng = np.random.default_rng(0)
    pool = [encode_image(natural_image(rng, size), "jpg") for _ in range(16)]
    with Writer(path) as writer:
        for i in range(images):
            writer.put(f"{i:08d}", make_datum(pool[i % len(pool)], i % 1000).SerializeToString())
    return float(np.mean([len(p) for p in pool]))


TRAIN_MODELS = {
    # name: (solver, net, record (C, H, W), database directories, mean file or None)
    "lenet": (
        "models/mnist/lenet_solver.prototxt",
        "models/mnist/lenet_train_test.prototxt",
        (1, 28, 28),
        ("data/mnist/mnist_train_lmdb", "data/mnist/mnist_test_lmdb"),
        None,
    ),
    "cifar10_quick": (
        "models/cifar10/cifar10_quick_solver.prototxt",
        "models/cifar10/cifar10_quick_train_test.prototxt",
        (3, 32, 32),
        ("data/cifar10/cifar10_train_lmdb", "data/cifar10/cifar10_test_lmdb"),
        "data/cifar10/mean.binaryproto",
    ),
}


def wait_share(model: str, iterations: int, records: int) -> None:
    """Train ``model`` in a scratch directory and print the data-wait share."""
    import os
    import shutil

    from netforge.data.convert import compute_mean
    from netforge.solvers import get_solver
    from netforge.weights import write_mean

    solver_path, net_path, shape, dbs, mean_path = TRAIN_MODELS[model]
    repo = Path(__file__).resolve().parent.parent
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for db in dbs:
            (work / db).parent.mkdir(parents=True, exist_ok=True)
            with Writer(work / db) as writer:
                for i in range(records):
                    image = rng.integers(0, 256, shape, dtype=np.uint8)
                    writer.put(f"{i:08d}", make_datum(image, i % 10).SerializeToString())
        if mean_path:
            write_mean(work / mean_path, compute_mean(work / dbs[0])[0])
        for path in (solver_path, net_path):
            (work / path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(repo / path, work / path)
        param = text_format.Parse((work / solver_path).read_text(), pb.SolverParameter())
        param.solver_mode = pb.SolverParameter.CPU
        param.test_interval = iterations + 1  # time the training iterations only
        param.display = 0
        param.snapshot = 0
        param.snapshot_after_train = False
        param.random_seed = 1
        cwd = os.getcwd()
        os.chdir(work)
        try:
            solver = get_solver(param)
            solver.step(2)  # warm up: threads started, buffers allocated
            layers = [layer for layer in solver.net.layers if hasattr(layer, "wait_seconds")]
            waited = sum(layer.wait_seconds for layer in layers)
            start = time.perf_counter()
            solver.step(iterations)
            elapsed = time.perf_counter() - start
            waited = sum(layer.wait_seconds for layer in layers) - waited
        finally:
            os.chdir(cwd)
    print(
        f"{model}: {iterations} iterations in {elapsed:.1f} s "
        f"({elapsed / iterations * 1000:.0f} ms each), waiting for data {waited:.3f} s "
        f"= {100 * waited / elapsed:.2f}% of training time"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--crop", type=int, default=227)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--train", choices=sorted(TRAIN_MODELS))
    parser.add_argument("--iterations", type=int, default=100)
    args = parser.parse_args()
    if args.train:
        wait_share(args.train, args.iterations, records=2000)
        return
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "db"
        jpeg_bytes = build_db(db, args.images, args.size)
        text = f"""name: "data" type: "Data" top: "data" top: "label"
            data_param {{ source: "{db}" batch_size: {args.batch} backend: LMDB }}
            transform_param {{ crop_size: {args.crop} mirror: true
                               mean_value: 104 mean_value: 117 mean_value: 123 }}"""
        param = text_format.Parse(text, pb.LayerParameter())
        layer = create_layer(param, phase=pb.TRAIN, rng=np.random.default_rng(1))
        top = [Blob(name="data"), Blob(name="label")]
        layer.setup([], top)
        layer.forward([], top)  # warm up: threads, pools, first allocations
        start = time.perf_counter()
        for _ in range(args.batches):
            layer.forward([], top)
        elapsed = time.perf_counter() - start
        layer.close()
    images = args.batches * args.batch
    print(
        f"{images / elapsed:.0f} images/s ({elapsed / args.batches * 1000:.0f} ms per batch of "
        f"{args.batch}; {args.size}x{args.size} JPEGs of {jpeg_bytes / 1024:.0f} KiB, "
        f"random {args.crop} crops + mirror + mean_value, top {top[0].shape})"
    )


if __name__ == "__main__":
    main()
