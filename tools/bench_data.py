"""Throughput of the data pipeline for CaffeNet-sized input, in images per second.

Builds an LMDB of encoded 256×256 JPEGs (as ``netforge convert imageset --encoded``), then
pulls batches from a Data layer in TRAIN phase (random 227 crops, mirror, mean_value) as
fast as the pipeline delivers them, with no net consuming the time in between::

    PYTHONPATH=. python tools/bench_data.py [--images 512] [--batch 256] [--batches 8]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--crop", type=int, default=227)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--batches", type=int, default=8)
    args = parser.parse_args()
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
