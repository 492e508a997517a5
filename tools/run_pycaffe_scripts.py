"""Run BVLC Caffe's pycaffe command-line scripts end to end on netforge, with local data.

    python tools/run_pycaffe_scripts.py /path/to/caffe [--python PY] [--keep DIR]

From a Caffe checkout (nothing is fetched) it copies ``python/classify.py``,
``python/detect.py`` and ``python/draw_net.py`` into a work folder with the same layout,
applies ``tools/pycaffe_rewrite.py``'s import rewrite (``import caffe`` -> ``import netforge
as caffe``...), and runs them with the checkout's own CaffeNet deploy prototxt, its ImageNet
mean (``python/caffe/imagenet/ilsvrc_2012_mean.npy``) and example images, and CaffeNet
weights drawn at random (He-scaled Gaussians, seed 0) where classify.py looks for the trained ones:

- classify.py on the images folder (ten crops averaged), with ``--center_only``, on an
  ``.npy`` of images, and on one image file; each ``.npy`` output is checked (shape,
  probabilities summing to 1) and the folder run is compared with ``netforge classify``;
- detect.py on a window CSV (``--crop_mode list``, context padding 16) to HDF5, read back;
- draw_net.py of CaffeNet's train_val to PNG (and TB / TRAIN / --display_lrm to SVG).

detect.py needs pandas and PyTables in the Python that runs the scripts (``--python``, by
default this one); netforge is put on its path. Prints one line per run and the totals;
the exit status is 1 when any run failed.
"""

from __future__ import annotations

import argparse
import glob
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from pycaffe_rewrite import rewrite_source

REPO = Path(__file__).resolve().parents[1]
CAFFENET = Path("models") / "bvlc_reference_caffenet"
SCRIPTS = ("classify.py", "detect.py", "draw_net.py")


def prepare(caffe_root: Path, work: Path) -> None:
    """The work folder: rewritten scripts, the deploy and train_val prototxts, the mean,
    the example images, and random CaffeNet weights where classify.py's default points."""
    for name in SCRIPTS:
        source = caffe_root / "python" / name
        if not source.is_file():
            raise SystemExit(f"{caffe_root}: no python/{name}; point at a Caffe checkout")
        (work / "python").mkdir(parents=True, exist_ok=True)
        (work / "python" / name).write_text(rewrite_source(source.read_text()))
    mean = Path("python") / "caffe" / "imagenet" / "ilsvrc_2012_mean.npy"
    for relative in (
        CAFFENET / "deploy.prototxt",
        CAFFENET / "train_val.prototxt",
        mean,
    ):
        (work / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(caffe_root / relative, work / relative)
    shutil.copytree(caffe_root / "examples" / "images", work / "images")

    sys.path.insert(0, str(REPO))
    import netforge

    # The deploy prototxt has no fillers (its weights would all be zero): draw He-scaled
    # Gaussian weights and small biases, so that the classes get different probabilities.
    net = netforge.Net(str(work / CAFFENET / "deploy.prototxt"))
    rng = np.random.default_rng(0)
    for blobs in net.params.values():
        weights = blobs[0].data
        fan_in = weights[0].size
        weights[...] = rng.standard_normal(weights.shape, np.float32) * np.sqrt(2.0 / fan_in)
        blobs[1].data[...] = rng.standard_normal(blobs[1].shape, np.float32) * 0.1
    net.save(str(work / CAFFENET / "bvlc_reference_caffenet.caffemodel"))


class Runs:
    """Runs scripts in the work folder and keeps one result line each."""

    def __init__(self, python: str, work: Path) -> None:
        self.python, self.work, self.lines, self.failed = python, work, [], 0
        self.env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin:/usr/local/bin"}

    def run(self, title: str, argv: list[str], check=None) -> bool:
        start = time.perf_counter()
        proc = subprocess.run(
            argv, cwd=self.work, env=self.env, capture_output=True, text=True, check=False
        )
        seconds = time.perf_counter() - start
        ok, note = proc.returncode == 0, ""
        if ok and check is not None:
            try:
                note = check()
            except (AssertionError, OSError, ValueError, KeyError) as exc:
                ok, note = False, f"check failed: {exc}"
        if not ok and not note:
            note = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        self.failed += not ok
        self.lines.append(f"{'ok  ' if ok else 'FAIL'} {title} ({seconds:.1f} s): {note}")
        print(self.lines[-1], flush=True)
        return ok

    def script(self, title: str, name: str, args: list[str], check=None) -> bool:
        return self.run(title, [self.python, str(self.work / "python" / name), *args], check)


def probabilities(path: Path, rows: int) -> str:
    out = np.load(path)
    assert out.shape == (rows, 1000), f"{path.name} has shape {out.shape}, not ({rows}, 1000)"
    sums = out.sum(axis=1)
    assert np.allclose(sums, 1.0, atol=1e-4), f"rows sum to {sums}"
    return f"{path.name} {out.shape}, rows sum to 1, top classes {out.argmax(1).tolist()}"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("caffe_root", type=Path)
    parser.add_argument("--python", default=sys.executable, help="Python to run the scripts")
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it")
    args = parser.parse_args(argv)
    work = args.keep or Path(tempfile.mkdtemp(prefix="pycaffe_scripts_"))
    work.mkdir(parents=True, exist_ok=True)
    prepare(args.caffe_root.resolve(), work)
    runs = Runs(args.python, work)
    images = sorted((work / "images").glob("*.jpg"))

    runs.script(
        "classify.py folder, ten crops",
        "classify.py",
        ["images", "folder.npy"],
        lambda: probabilities(work / "folder.npy", len(images)),
    )
    runs.script(
        "classify.py folder --center_only",
        "classify.py",
        ["images", "centre.npy", "--center_only"],
        lambda: probabilities(work / "centre.npy", len(images)),
    )
    sys.path.insert(0, str(REPO))
    import netforge

    batch = np.stack(
        [netforge.io.resize_image(netforge.io.load_image(p), (300, 300)) for p in images]
    )
    np.save(work / "inputs.npy", batch)
    runs.script(
        "classify.py .npy in and out",
        "classify.py",
        ["inputs.npy", "from_npy.npy"],
        lambda: probabilities(work / "from_npy.npy", len(images)),
    )
    runs.script(
        "classify.py one image",
        "classify.py",
        [str(Path("images") / "cat.jpg"), "one.npy", "--images_dim", "240,260"],
        lambda: probabilities(work / "one.npy", 1),
    )

    def same_as_classify_py() -> str:
        # classify.py takes a folder's images in glob's (directory) order, netforge by name.
        listed = [Path(p).name for p in glob.glob(str(work / "images") + "/*.jpg")]
        order = [sorted(listed).index(name) for name in listed]
        ours, theirs = np.load(work / "cli.npy")[order], np.load(work / "folder.npy")
        gap = float(np.abs(ours - theirs).max())
        assert gap < 1e-5, f"netforge classify differs from classify.py by {gap}"
        return f"cli.npy {ours.shape} matches classify.py's (max difference {gap:.1e})"

    netforge_cli = [sys.executable, "-m", "netforge", "classify"]
    runs.run(
        "netforge classify = classify.py",
        [
            *netforge_cli,
            "--model",
            str(CAFFENET / "deploy.prototxt"),
            "--weights",
            str(CAFFENET / "bvlc_reference_caffenet.caffemodel"),
            "--mean_file",
            "python/caffe/imagenet/ilsvrc_2012_mean.npy",
            "--images_dim",
            "256,256",
            "--top-k",
            "1",
            "images",
            "-o",
            "cli.npy",
        ],  # fmt: skip
        same_as_classify_py,
    )

    windows = [
        ("cat.jpg", (0, 0, 200, 200)),
        ("cat.jpg", (100, 150, 360, 480)),
        ("fish-bike.jpg", (20, 30, 180, 250)),
        ("fish-bike.jpg", (0, 0, 50, 60)),
        ("fish-bike.jpg", (150, 200, 322, 481)),
    ]
    with open(work / "windows.csv", "w") as csv:
        csv.write("filename,ymin,xmin,ymax,xmax\n")
        csv.writelines(f"images/{f},{','.join(map(str, w))}\n" for f, w in windows)

    def detections() -> str:
        code = (
            "import pandas as pd; df = pd.read_hdf('detections.h5', 'df'); "
            "import numpy as np; p = np.vstack(df['prediction']); "
            "print(len(df), p.shape[1], bool(np.allclose(p.sum(1), 1, atol=1e-4)))"
        )
        out = subprocess.run(
            [runs.python, "-c", code], cwd=work, env=runs.env, capture_output=True, text=True
        ).stdout.split()
        assert out == [str(len(windows)), "1000", "True"], f"detections.h5 read back as {out}"
        return f"detections.h5: {len(windows)} windows x 1000 probabilities, rows sum to 1"

    runs.script(
        "detect.py window CSV -> HDF5",
        "detect.py",
        ["--crop_mode", "list", "windows.csv", "detections.h5"],
        detections,
    )

    def image(name: str, magic: bytes):
        def check() -> str:
            data = (work / name).read_bytes()
            assert data.startswith(magic), f"{name} is not the expected format"
            return f"{name}: {len(data)} bytes"

        return check

    train_val = str(CAFFENET / "train_val.prototxt")
    runs.script(
        "draw_net.py CaffeNet to PNG",
        "draw_net.py",
        [train_val, "caffenet.png"],
        image("caffenet.png", b"\x89PNG"),
    )
    runs.script(
        "draw_net.py TB, TRAIN, --display_lrm to SVG",
        "draw_net.py",
        [train_val, "caffenet.svg", "--rankdir", "TB", "--phase", "TRAIN", "--display_lrm"],
        image("caffenet.svg", b"<?xml"),
    )
    total = len(runs.lines)
    print(f"{total - runs.failed} of {total} runs passed; work folder {work}")
    if args.keep is None and not runs.failed:
        shutil.rmtree(work)
    return 1 if runs.failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
