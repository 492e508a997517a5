"""Export every real model to ONNX and compare ONNX Runtime with netforge; print a table.

Models: each folder of ../shared/conformance (its prototxt and trained weights, at the
stored input's shape) and every deploy prototxt under models/ (an Input layer, no data
layer; random weights from ``netforge.export.onnx_check.random_weights``, as none ship).
Each is exported with a dynamic batch and run at batch 1 and 3; a model matches when every
output is within 1e-4 of the largest output (at least 1). Then both are timed at
``--time-batch`` (the best of ``--repeats`` runs) and the table gives milliseconds per image.
Two more columns say how far each float32 forward is from netforge's float64 forward of
the same weights: the float32 rounding both share in deep nets.

    python tools/onnx_table.py                      # everything (minutes)
    python tools/onnx_table.py --only caffenet,googlenet   # the two timed in the notes
    python tools/onnx_table.py --only digits --repeats 1   # a quick check

Needs the ``test`` extra (onnx, onnxruntime). Exits 1 if any model fails to match.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from netforge.backend import to_numpy  # noqa: E402
from netforge.errors import NetforgeError  # noqa: E402
from netforge.export import net_to_onnx  # noqa: E402
from netforge.export.onnx_check import compare, random_weights, session  # noqa: E402
from netforge.graph import filter_net  # noqa: E402
from netforge.net import Net  # noqa: E402
from netforge.proto import pb  # noqa: E402
from netforge.prototxt import read_net  # noqa: E402

TOLERANCE = 1e-4
CONFORMANCE = REPO.parent / "shared" / "conformance"


def _is_deploy(path: Path) -> bool:
    """A net prototxt whose TEST net declares its inputs and reads no database."""
    try:
        param = read_net(path)
    except NetforgeError:
        return False  # a solver, not a net
    if not param.layer:
        return False
    param.state.phase = pb.TEST
    types = [layer.type for layer in filter_net(param, param.state).layer]
    return "Input" in types and not any(t.endswith("Data") for t in types)


def models(only: str | None) -> list[tuple[str, Path, Path | None, Path | None]]:
    """(name, prototxt, weights or None, input.npy or None) of every model to run."""
    found = []
    for folder in sorted(CONFORMANCE.glob("*")) if CONFORMANCE.is_dir() else []:
        if folder.is_dir():
            found.append(
                (
                    f"conformance/{folder.name}",
                    next(folder.glob("*.prototxt")),
                    next(folder.glob("*.caffemodel")),
                    folder / "input.npy",
                )
            )
    for path in sorted((REPO / "models").rglob("*.prototxt")):
        if _is_deploy(path):
            found.append((str(path.relative_to(REPO / "models")), path, None, None))
    wanted = only.split(",") if only else None
    return [m for m in found if wanted is None or any(w in m[0] for w in wanted)]


def float64_errors(net: Net, prototxt: Path, model, threads: int | None) -> tuple[float, float]:
    """How far ONNX Runtime and netforge's float32 forward each are from netforge's float64
    forward of the same weights on one standard normal batch-1 input (relative to the
    largest output, at least 1): the size of float32 rounding in this model."""
    exact = Net(prototxt, phase=pb.TEST, dtype=np.float64)
    inputs = {}
    rng = np.random.default_rng(11)
    for twin in (net, exact):
        for name in twin.inputs:
            twin.blobs[name].reshape((1, *net.blobs[name].shape[1:]))
        twin.reshape()
    for mine, theirs in zip(net.layers, exact.layers):
        for blob, twin in zip(mine.blobs, theirs.blobs):
            twin.data[...] = to_numpy(blob.data)
    for name in net.inputs:
        inputs[name] = rng.standard_normal(net.blobs[name].shape).astype(np.float32)
        net.blobs[name].data[...] = inputs[name]
        exact.blobs[name].data[...] = inputs[name]
    net.forward()
    exact.forward()
    sess = session(model, threads)
    names = [o.name for o in sess.get_outputs()]
    got = dict(zip(names, sess.run(names, inputs)))
    peak = max(1.0, max(float(np.abs(exact.blobs[n].data).max()) for n in names))

    def worst(values) -> float:
        return max(float(np.abs(values[n] - exact.blobs[n].data).max()) for n in names) / peak

    return worst(got), worst({n: to_numpy(net.blobs[n].data) for n in names})


def run(name, prototxt, weights, image, args) -> dict:
    """Export and compare one model; returns its table row."""
    net = Net(prototxt, phase=pb.TEST, weights=weights)
    if weights is None:
        random_weights(net, seed=0)
    if image is not None:
        net.blobs[net.inputs[0]].reshape(np.load(image).shape)
        net.reshape()
    start = time.perf_counter()
    model = net_to_onnx(net, dynamic_batch=True, fold_batchnorm=args.fold_batchnorm)
    export_s = time.perf_counter() - start
    results = compare(net, model, (1, 3), threads=args.threads)
    timed = compare(net, model, (args.time_batch,), repeats=args.repeats, threads=args.threads)
    worst = max(r.relative for r in results)
    ort_f64 = net_f64 = float("nan")
    if args.float64:
        ort_f64, net_f64 = float64_errors(net, prototxt, model, args.threads)
    ops = sorted({node.op_type for node in model.graph.node})
    return {
        "model": name,
        "weights": "trained" if weights else "random",
        "ops": " ".join(ops),
        "diff": worst,
        "ok": worst <= TOLERANCE,
        "ort_f64": ort_f64,
        "net_f64": net_f64,
        "onnx_ms": timed[0].onnx_seconds * 1e3,
        "netforge_ms": timed[0].netforge_seconds * 1e3,
        "export_s": export_s,
    }


def main() -> int:
    """Run the models and print the table (Markdown)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--only", help="run only models whose name contains one of these (comma-separated)"
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed runs (best is kept)")
    parser.add_argument("--time-batch", type=int, default=8, help="batch size for timing")
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads")
    parser.add_argument("--fold-batchnorm", action="store_true", help="export folded")
    parser.add_argument(
        "--float64",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also measure both against netforge's float64 forward (batch 1)",
    )
    args = parser.parse_args()
    rows, failures = [], 0
    print(
        "| model | weights | ONNX operators | max diff / max output (batch 1, 3) | "
        "ORT vs float64 | netforge vs float64 | "
        f"ORT ms/image | netforge ms/image | netforge/ORT | export s |\n|{'---|' * 10}",
        flush=True,
    )
    for name, prototxt, weights, image in models(args.only):
        try:
            row = run(name, prototxt, weights, image, args)
        except Exception as exc:  # noqa: BLE001  (an export refused or a model ONNX Runtime
            # rejects is one failed row of the table, not the end of the run)
            print(f"| {name} | | FAILED: {type(exc).__name__}: {exc} | | | | | | | |", flush=True)
            failures += 1
            continue
        rows.append(row)
        failures += not row["ok"]
        print(
            f"| {row['model']} | {row['weights']} | {row['ops']} | {row['diff']:.1e}"
            f"{'' if row['ok'] else ' MISMATCH'} | {row['ort_f64']:.1e} | {row['net_f64']:.1e} | "
            f"{row['onnx_ms']:.2f} | "
            f"{row['netforge_ms']:.2f} | {row['netforge_ms'] / row['onnx_ms']:.2f} | "
            f"{row['export_s']:.1f} |",
            flush=True,
        )
    print(f"\n{len(rows)} models exported, {failures} failed or mismatched (tolerance {TOLERANCE})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
