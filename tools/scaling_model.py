"""The data-parallel scaling model of docs/scaling.md: predicted efficiency of N ranks from a
net's compute times and gradient size, and the links' alpha-beta all-reduce costs.

Usage (from the repository root)::

    PYTHONPATH=. python tools/scaling_model.py [--measured bench_parallel.jsonl]
        [--tflops 25] [--ranks 8,64,256]

Per net and rank count N, one iteration of a rank at its own batch (weak scaling: the
effective batch grows with N) costs ``T = T_fwd + T_bwd + T_upd + T_exposed``, and the
efficiency is ``(T_fwd + T_bwd + T_upd) / T``. The gradients, S bytes, are all-reduced in k
buckets of B bytes, each with the cheaper of

    ring:  2 (N - 1) alpha + 2 (N - 1) / N * B / beta
    tree:  2 ceil(log2 N) alpha + 2 B / beta        (pipelined double binary tree)

started as the backward pass completes them (taken as uniform over ``T_bwd``) and run one
after another, so the time left after backward is

    T_exposed = max(t_bucket, k t_bucket - T_bwd (1 - 1/k)).

B is chosen per case from 64 KiB to 256 MiB to minimise ``T_exposed``; each cell also gives
the efficiency at netforge's default bucket (``DEFAULT_BUCKET_BYTES``, 4 MiB). Compute times come
from ``tools/bench_parallel.py --json`` where a net was measured (its ``fwd_ms``, ``bwd_ms``,
``update_ms``, ``grad_bytes``); otherwise from the net's multiply-adds (convolution and
inner product layers, counted on the prototxt here) at ``--tflops`` achieved, backward
twice the forward, and an update streaming 5 arrays of S bytes at ``--memory-gbps``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import netforge  # noqa: F401  (OpenBLAS settings before numpy)

# isort: split
from netforge.net import Net
from netforge.parallel.data_parallel import DEFAULT_BUCKET_BYTES
from netforge.proto import pb
from netforge.prototxt import read_net

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

from bench_layers import DATA_LAYERS  # noqa: E402

#: net -> (prototxt, per-GPU batch in its BVLC solver/train_val, image shape)
NETS = {
    "caffenet": ("models/bvlc_reference_caffenet/train_val.prototxt", 256, (3, 227, 227)),
    "resnet50": ("models/resnet50/deploy.prototxt", 32, (3, 224, 224)),
    "googlenet": ("models/bvlc_googlenet/train_val.prototxt", 32, (3, 224, 224)),
}

#: link -> (alpha seconds, beta bytes/s per rank and direction)
LINKS = {
    "NVLink": (5e-6, 360e9),  # NVLink 4 through NVSwitch: NCCL's measured all-reduce bus rate
    "400 Gb/s": (6e-6, 50e9 * 0.9),  # one 400 Gb/s NIC per GPU, 90% of line rate
    "100 Gb/s": (6e-6, 12.5e9 * 0.9),
}


def profile_from_flops(name: str, tflops: float, memory_gbps: float) -> dict:
    """Compute times of ``name`` at its batch from its multiply-adds (see the docstring)."""
    path, batch, item = NETS[name]
    param = read_net(ROOT / path)
    for layer in param.layer:
        if layer.type in DATA_LAYERS or layer.type == "Input":
            for field in (*DATA_LAYERS.values(), "transform_param", "input_param"):
                layer.ClearField(field)
            layer.type = "Input"
            layer.input_param.shape.add().dim.extend((1, *item))
            if len(layer.top) > 1:
                layer.input_param.shape.add().dim.append(1)
    net = Net(param, phase=pb.TRAIN)
    flops = 0.0
    for layer, tops in zip(net.layers, net.layer_tops):
        if layer.type == "Convolution":
            flops += 2 * net.blobs[tops[0]].count * math.prod(layer.blobs[0].shape[1:])
        elif layer.type == "InnerProduct":
            flops += 2 * layer.blobs[0].count
    grad_bytes = sum(p.count for p in net.learnable_params) * 4
    fwd = flops * batch / (tflops * 1e12)
    return {
        "net": name,
        "batch": batch,
        "fwd_ms": fwd * 1e3,
        "bwd_ms": 2 * fwd * 1e3,
        "update_ms": 5 * grad_bytes / (memory_gbps * 1e9) * 1e3,
        "grad_bytes": grad_bytes,
        "source": f"{flops / 1e9:.2f} GFLOP/image at {tflops:g} TFLOP/s",
    }


def allreduce(size: float, ranks: int, alpha: float, beta: float) -> float:
    """Seconds for one all-reduce of ``size`` bytes: the cheaper of ring and tree."""
    ring = 2 * (ranks - 1) * alpha + 2 * (ranks - 1) / ranks * size / beta
    tree = 2 * math.ceil(math.log2(ranks)) * alpha + 2 * size / beta
    return min(ring, tree)


def left_after_backward(profile: dict, ranks: int, alpha: float, beta: float, bucket: int):
    """Seconds the all-reduce runs on after backward with buckets of ``bucket`` bytes."""
    total, backward = profile["grad_bytes"], profile["bwd_ms"] / 1e3
    bucket = min(bucket, total)
    count = math.ceil(total / bucket)
    each = allreduce(bucket, ranks, alpha, beta)
    return max(each, count * each - backward * (1 - 1 / count))


def exposed(profile: dict, ranks: int, alpha: float, beta: float) -> tuple[float, int]:
    """The least time left after backward over bucket sizes, and the bucket: the largest
    within 1% (or 1 µs) of the least, as fewer messages are cheaper for the rest of the
    machine and the model is no finer than that."""
    options = [
        (left_after_backward(profile, ranks, alpha, beta, 1 << power), 1 << power)
        for power in range(16, 29)
        if 1 << power < 2 * profile["grad_bytes"]
    ]
    least = min(left for left, _ in options)
    return max((o for o in options if o[0] <= least * 1.01 + 1e-6), key=lambda o: o[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--measured", default=None, help="tools/bench_parallel.py --json output")
    parser.add_argument("--tflops", type=float, default=25.0)
    parser.add_argument("--memory-gbps", type=float, default=2500.0)
    parser.add_argument("--ranks", default="8,64,256")
    args = parser.parse_args()
    profiles = {name: profile_from_flops(name, args.tflops, args.memory_gbps) for name in NETS}
    measured: list[dict] = []
    fitted = (0.0, 1.0)
    if args.measured:
        for line in Path(args.measured).read_text().splitlines():
            row = json.loads(line)
            if "net" in row:
                measured.append(row)
            else:
                sweep = row["allreduce_sweep"]
                # Two ranks: ring = 2 alpha + S / beta. The smallest message gives alpha, the
                # largest beta.
                fitted = (sweep[0]["us"] / 2e6, sweep[-1]["bytes"] / (sweep[-1]["us"] / 1e6))
    if measured:
        alpha, beta = fitted
        print(f"2-rank MPI from the sweep: alpha {alpha * 1e6:.1f} us, beta {beta / 1e9:.2f} GB/s")
        print("| net | measured efficiency | model, 4 MiB buckets (as run) | model, best bucket |")
        print("|---|---|---|---|")
        for row in measured:
            compute = (row["fwd_ms"] + row["bwd_ms"] + row["update_ms"]) / 1e3
            whole = left_after_backward(row, 2, alpha, beta, DEFAULT_BUCKET_BYTES)
            left, bucket = exposed(row, 2, alpha, beta)
            print(
                f"| {row['net']} | {row['efficiency']:.0%} | {compute / (compute + whole):.0%} "
                f"| {compute / (compute + left):.0%} ({bucket / 2**20:g} MiB) |"
            )
        print()
    ranks = [int(n) for n in args.ranks.split(",")]
    print("| net | batch/rank | fwd+bwd+upd ms | gradients MB | compute from |")
    print("|---|---|---|---|---|")
    for p in profiles.values():
        compute = p["fwd_ms"] + p["bwd_ms"] + p["update_ms"]
        print(
            f"| {p['net']} | {p['batch']} | {p['fwd_ms']:.1f} + {p['bwd_ms']:.1f} + "
            f"{p['update_ms']:.1f} = {compute:.1f} | {p['grad_bytes'] / 1e6:.1f} | {p['source']} |"
        )
    print()
    print("| net | link | " + " | ".join(f"N = {n}" for n in ranks) + " |")
    print("|---|---|" + "---|" * len(ranks))
    for p in profiles.values():
        compute = (p["fwd_ms"] + p["bwd_ms"] + p["update_ms"]) / 1e3
        for link, (alpha, beta) in LINKS.items():
            cells = []
            for n in ranks:
                left, bucket = exposed(p, n, alpha, beta)
                default = left_after_backward(p, n, alpha, beta, DEFAULT_BUCKET_BYTES)
                cells.append(
                    f"{compute / (compute + left):.0%} ({bucket / 2**20:g} MiB; "
                    f"4 MiB: {compute / (compute + default):.0%})"
                )
            print(f"| {p['net']} | {link} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
