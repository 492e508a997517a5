"""Run BVLC Caffe's pycaffe examples and notebooks on netforge, on small local data.

    python tools/run_pycaffe_notebooks.py /path/to/caffe [--only NAME ...] [--keep DIR]

From a Caffe checkout (nothing is fetched) it builds a work folder with the checkout's
layout and stand-ins for what the examples download, then runs, each in a fresh process:

- ``examples/pycaffe/caffenet.py`` (writes CaffeNet's train and test prototxts with NetSpec;
  both are parsed back), ``examples/pycaffe/tools.py`` (SimpleTransformer round trip,
  CaffeSolver's solver file read by netforge) and the Python loss layer
  ``examples/pycaffe/layers/pyloss.py`` training ``examples/pycaffe/linreg.prototxt``;
- the code cells of the notebooks 00-classification, 01-learning-lenet, 02-fine-tuning,
  net_surgery, brewing-logreg and pascal-multilabel-with-datalayer, extracted with json.

Every source gets ``tools/pycaffe_rewrite.py``'s import rewrite. The notebooks are Python 2,
so their cells (and the Python 2 modules they import) also go through lib2to3 (fissix on
Python 3.13 and later). IPython's ``%matplotlib``/``%%time`` lines are dropped, ``%timeit X``
and ``%%timeit`` cells run once (the latter as a function body, as IPython runs it), and
``!`` shell lines are skipped (downloads, data scripts), except ``!./build/tools/caffe train
...``, which runs ``netforge train`` with the same flags.
matplotlib draws off screen (Agg). The other substitutions (paths to the stand-in data,
fewer iterations on 2 CPU cores, APIs removed from numpy, scipy and scikit-learn since) are
listed per notebook in ``SUBSTITUTIONS`` and printed, with each notebook's cells run / total
and the first error of every failed cell. Without a GPU, ``set_mode_gpu`` becomes
``set_mode_cpu`` (printed as a substitution).

Stand-in data (in the work folder): CaffeNet weights drawn at random (He-scaled, seed 0);
1000 made-up ImageNet label lines; ``imagenet_mean.binaryproto`` from the checkout's
``ilsvrc_2012_mean.npy``; "MNIST" LMDBs of netforge's bundled 8x8 digits (models/digits,
UCI, CC BY 4.0) scaled up to 28x28; a 5-style Flickr list and a 20-class PASCAL VOC tree of
the checkout's example images, flipped and tinted, with generated labels.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

TOOLS = Path(__file__).resolve().parent
REPO = TOOLS.parent
sys.path.insert(0, str(TOOLS))

from pycaffe_rewrite import rewrite_source  # noqa: E402

NOTEBOOKS = (
    "00-classification",
    "01-learning-lenet",
    "02-fine-tuning",
    "net_surgery",
    "brewing-logreg",
    "pascal-multilabel-with-datalayer",
)
CAFFENET = Path("models") / "bvlc_reference_caffenet"
GPU_LINES = ("caffe.set_mode_gpu()",)

# notebook -> (cell index, text, replacement, why); every one must apply.
SUBSTITUTIONS: dict[str, list[tuple[int, str, str, str]]] = {
    "00-classification": [
        (
            8,
            "labels_file = caffe_root + 'data/ilsvrc12/synset_words.txt'",
            "labels_file = caffe_root + 'data/ilsvrc12/synset_words.txt'",
            "synset_words.txt is a stand-in of 1000 made-up labels (get_ilsvrc_aux.sh downloads)",
        ),
        (
            20,
            'my_image_url = "..."',
            "my_image_url = None",
            "no download: the cell classifies the checkout's examples/images/fish-bike.jpg",
        ),
        (
            20,
            "caffe.io.load_image('image.jpg')",
            "caffe.io.load_image(caffe_root + 'examples/images/fish-bike.jpg')",
            "the downloaded image.jpg is the checkout's fish-bike.jpg",
        ),
    ],
    "01-learning-lenet": [
        (14, "niter = 200", "niter = 50", "50 training iterations instead of 200 (2 CPU cores)"),
        (
            14,
            "for test_it in range(100):",
            "for test_it in range(4):",
            "4 test batches of 100 instead of 100 (the stand-in test set has 360 digits)",
        ),
        (14, "correct / 1e4", "correct / 4e2", "accuracy over the 4 test batches run"),
        (18, "niter = 250", "niter = 50", "50 training iterations instead of 250"),
        (
            18,
            "test_interval = niter / 10",
            "test_interval = niter // 10",
            "Python 2's integer division (a float index fails in Python 3)",
        ),
        (18, "for test_it in range(100):", "for test_it in range(4):", "4 test batches"),
        (18, "correct / 1e4", "correct / 4e2", "accuracy over the 4 test batches run"),
    ],
    "02-fine-tuning": [
        (
            3,
            "delimiter='\\n'",
            "delimiter='\\t'",
            "numpy 1.23 refuses a newline delimiter; a tab keeps each line one field",
        ),
        (
            4,
            "tempfile.NamedTemporaryFile(delete=False)",
            "tempfile.NamedTemporaryFile(mode='w', delete=False)",
            "Python 3: the prototxt is text (Python 2's files took str)",
        ),
        (6, "batch_size=50", "batch_size=10", "batches of 10 images instead of 50 (2 CPU cores)"),
        (
            14,
            "tempfile.NamedTemporaryFile(delete=False)",
            "tempfile.NamedTemporaryFile(mode='w', delete=False)",
            "Python 3 text mode",
        ),
        (16, "niter = 200", "niter = 2", "2 iterations per solver, not 200 (CaffeNet on CPU)"),
        (
            12,
            "assert error < 1e-8",
            "assert error < 1e-10 * (imagenet_net.blobs['fc7'].data[0] ** 2).sum()",
            "fc7 equal to float32 rounding, relative to its size: netforge's batched GEMMs round "
            "differently at batch 10 and 1 (docs/compatibility.md), and the random stand-in "
            "weights give fc7 values near 300 (sum of squared differences 1.3e-5 measured)",
        ),
        (19, "test_iters=10", "test_iters=2", "2 test batches instead of 10"),
    ],
    "net_surgery": [],
    "brewing-logreg": [
        (
            2,
            "loss='log', n_iter=1000",
            "loss='log_loss', max_iter=1000",
            "scikit-learn renamed loss 'log' and n_iter (0.19 / 1.1)",
        ),
        (5, "s.max_iter = 10000", "s.max_iter = 1000", "1000 iterations instead of 10000"),
        (5, "s.test_interval = 1000", "s.test_interval = 500", "a test every 500 iterations"),
        (5, "s.snapshot = 10000", "s.snapshot = 1000", "the snapshot at the (shorter) end"),
    ],
    "pascal-multilabel-with-datalayer": [
        (
            3,
            "batch_size = 128, im_shape",
            "batch_size = 8, im_shape",
            "batches of 8 instead of 128 (CaffeNet on 2 CPU cores)",
        ),
        (3, "batch_size = 128, im_shape", "batch_size = 8, im_shape", "(the validation net too)"),
        (5, "astype(np.int)", "astype(int)", "np.int was removed from numpy (1.24)"),
        (6, "batch_size = 128", "batch_size = 8", "the batch size above"),
        (7, "solver.step(100)", "solver.step(1)", "1 iteration per round instead of 100"),
        (
            7,
            "check_accuracy(solver.test_nets[0], 50)",
            "check_accuracy(solver.test_nets[0], 2)",
            "2 validation batches instead of 50",
        ),
        (8, "batch_size = 128", "batch_size = 8", "the batch size above"),
        (8, "5823/128", "2", "2 validation batches instead of 5823/128"),
        (9, "astype(np.int)", "astype(int)", "np.int was removed from numpy (1.24)"),
    ],
}

# notebook -> what the runner prints of its results: (cell, expression) pairs evaluated after
# that cell, and a pattern for lines the notebook printed.
SUMMARIES: dict[str, tuple[list[tuple[int, str]], str | None]] = {
    "00-classification": ([(7, "f'cat.jpg: class {output_prob.argmax()}'")], None),
    "01-learning-lenet": (
        [
            (
                14,
                "f'LeNet: train loss {train_loss[0]:.2f} -> {train_loss[-1]:.2f}, "
                "test accuracy {test_acc[-1]:.3f}'",
            ),
            (
                18,
                "f'custom net: train loss {train_loss[0]:.2f} -> {train_loss[-1]:.2f}, "
                "test accuracy {test_acc[-1]:.3f}'",
            ),
        ],
        None,
    ),
    "02-fine-tuning": ([], r"^Accuracy, "),
    "net_surgery": ([(10, "f'fully convolutional prob map {out[\"prob\"].shape}'")], None),
    "brewing-logreg": ([], r"^Accuracy: "),
    "pascal-multilabel-with-datalayer": ([], r"accuracy:"),
}

# Python 2 modules the notebooks import, with the same kind of substitutions.
MODULE_SUBSTITUTIONS = {
    "pycaffe/layers/pascal_multilabel_datalayers.py": [
        (
            "import scipy.misc\n",
            "import scipy.sparse\n",
            "scipy.misc.imresize was removed from scipy (1.3): PIL resizes instead",
        ),
        ("import skimage.io\n", "", "skimage.io is imported but never used"),
        (
            "im = scipy.misc.imresize(im, self.im_shape)  # resize",
            "im = np.asarray(Image.fromarray(im).resize(tuple(self.im_shape[::-1]), "
            "Image.BILINEAR))  # resize",
            "imresize's bilinear resize, through PIL",
        ),
    ],
}


# -- conversion of notebook code ---------------------------------------------------------
def python3(source: str) -> str:
    """Python 2 source in Python 3 (lib2to3's fixers); Python 3 source is left as is."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            from lib2to3.refactor import RefactoringTool, get_fixers_from_package

            fixers = "lib2to3.fixes"
        except ImportError:  # Python 3.13 removed lib2to3; fissix is its maintained copy
            from fissix.refactor import RefactoringTool, get_fixers_from_package

            fixers = "fissix.fixes"
        tool = RefactoringTool(get_fixers_from_package(fixers))
    return str(tool.refactor_string(source if source.endswith("\n") else source + "\n", "<cell>"))


_CAFFE_TOOL = re.compile(r"^!\s*\./build/tools/caffe\s+(.*)$")


def strip_magics(source: str, notes: list[str]) -> str:
    """IPython lines as plain Python: see the module docstring."""
    lines = []
    timeit = source.lstrip().startswith("%%timeit")
    continued = False  # inside a shell line continued with a backslash
    for line in source.splitlines():
        stripped = line.strip()
        if continued:
            continued = stripped.endswith("\\")
            continue
        continued = stripped.startswith("!") and stripped.endswith("\\")
        tool = _CAFFE_TOOL.match(stripped)
        if tool:
            args = tool.group(1).split()
            lines.append(f"_run_netforge({args!r})")
            notes.append(f"`{stripped}` runs `netforge {' '.join(args)}`")
        elif stripped.startswith("!"):
            lines.append(line[: len(line) - len(line.lstrip())] + "pass")
            notes.append(f"shell line skipped: `{stripped}`")
        elif stripped.startswith("%%time") or re.match(r"^%\s*matplotlib", stripped):
            continue
        elif stripped.startswith("%timeit"):
            lines.append(line.replace("%timeit", "", 1).strip())
        else:
            lines.append(line)
    if timeit:
        # IPython's %%timeit runs the cell as a function body: its names stay local to it.
        body = "".join(f"    {line}\n" for line in lines)
        return f"def _timeit_cell():\n{body}    pass\n\n\n_timeit_cell()\n"
    return "\n".join(lines) + "\n"


def notebook_cells(path: Path, name: str, gpu: bool) -> tuple[list[str], list[str]]:
    """The notebook's code cells as Python 3 with the rewrite and substitutions applied,
    and the notes saying what was substituted."""
    cells = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
    notes: list[str] = []
    sources = [strip_magics("".join(c["source"]), notes) for c in cells]
    sources = [rewrite_source(python3(s)) for s in sources]
    for index, old, new, why in SUBSTITUTIONS[name]:
        if old not in sources[index]:
            raise SystemExit(f"{name}: cell {index} has no {old!r}; the substitution is stale")
        sources[index] = sources[index].replace(old, new, 1)
        if old != new:
            notes.append(f"cell {index}: `{old}` -> `{new}` ({why})")
        else:
            notes.append(f"cell {index}: {why}")
    if not gpu:
        for index, source in enumerate(sources):
            if any(line in source for line in GPU_LINES):
                sources[index] = source.replace("caffe.set_mode_gpu()", "caffe.set_mode_cpu()")
                notes.append(f"cell {index}: set_mode_gpu() -> set_mode_cpu() (no GPU here)")
    return sources, notes


# -- stand-in data -----------------------------------------------------------------------
def prepare(caffe_root: Path, work: Path) -> None:
    """The work folder: the checkout's files the examples read, and the stand-ins."""
    import netforge
    from netforge.data.db import open_writer

    for relative in (
        CAFFENET / "deploy.prototxt",
        CAFFENET / "train_val.prototxt",
        Path("python/caffe/imagenet/ilsvrc_2012_mean.npy"),
    ):
        (work / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(caffe_root / relative, work / relative)
    for folder in ("images", "net_surgery", "mnist", "pycaffe", "finetune_flickr_style"):
        shutil.copytree(caffe_root / "examples" / folder, work / "examples" / folder)
    for name in NOTEBOOKS:
        shutil.copy(caffe_root / "examples" / f"{name}.ipynb", work / "examples")
    for relative, replacements in MODULE_SUBSTITUTIONS.items():
        path = work / "examples" / relative
        source = python3(path.read_text())
        for old, new, _ in replacements:
            if old not in source:
                raise SystemExit(f"{relative}: no {old!r}; the substitution is stale")
            source = source.replace(old, new, 1)
        path.write_text(source)
    for path in (work / "examples" / "pycaffe").rglob("*.py"):
        path.write_text(rewrite_source(path.read_text()))

    rng = np.random.default_rng(0)
    net = netforge.Net(str(work / CAFFENET / "deploy.prototxt"), netforge.TEST)
    for blobs in net.params.values():
        weights = blobs[0].data
        weights[...] = rng.standard_normal(weights.shape, np.float32) * np.sqrt(
            2.0 / weights[0].size
        )
        blobs[1].data[...] = rng.standard_normal(blobs[1].shape, np.float32) * 0.1
    net.save(str(work / CAFFENET / "bvlc_reference_caffenet.caffemodel"))

    ilsvrc = work / "data" / "ilsvrc12"
    ilsvrc.mkdir(parents=True)
    (ilsvrc / "synset_words.txt").write_text(
        "".join(f"n{i:08d} stand-in class {i}\n" for i in range(1000))
    )
    mean = np.load(work / "python/caffe/imagenet/ilsvrc_2012_mean.npy")
    blob = netforge.io.array_to_blobproto(mean[np.newaxis])
    (ilsvrc / "imagenet_mean.binaryproto").write_bytes(blob.SerializeToString())

    _mnist(work / "examples" / "mnist")
    images = _example_images(caffe_root)
    _flickr(work / "data" / "flickr_style", images, rng)
    _pascal(work / "data" / "pascal" / "VOC2012", images, rng)
    del open_writer


def _mnist(folder: Path) -> None:
    """LMDBs of the bundled 8x8 digits, each pixel 3x3 and a 2-pixel border: 28x28 uint8."""
    import h5py

    import netforge
    from netforge.data.db import open_writer

    for split, source in (("train", "train.h5"), ("test", "test.h5")):
        with h5py.File(REPO / "models" / "digits" / "data" / source, "r") as handle:
            data, labels = handle["data"][...], handle["label"][...]
        big = np.kron(data, np.ones((3, 3), np.float32))
        big = np.pad(big, ((0, 0), (0, 0), (2, 2), (2, 2)))
        pixels = np.round(big * 255).astype(np.uint8)
        with open_writer(folder / f"mnist_{split}_lmdb") as writer:
            for i, (image, label) in enumerate(zip(pixels, labels)):
                datum = netforge.io.array_to_datum(image, int(label))
                writer.put(f"{i:08d}", datum.SerializeToString())


def _example_images(caffe_root: Path) -> list[np.ndarray]:
    from PIL import Image

    images = []
    for path in sorted((caffe_root / "examples" / "images").glob("*.jpg")):
        image = np.asarray(Image.open(path).convert("RGB").resize((256, 256)))
        images += [image, image[:, ::-1]]
    return images


def _variant(images: list[np.ndarray], i: int, rng: np.random.Generator) -> np.ndarray:
    tint = rng.uniform(0.7, 1.3, size=3)
    return np.clip(images[i % len(images)] * tint, 0, 255).astype(np.uint8)


def _flickr(folder: Path, images: list[np.ndarray], rng: np.random.Generator) -> None:
    """40 images in 5 styles (labels cycle), listed in train.txt and test.txt."""
    from PIL import Image

    (folder / "images").mkdir(parents=True)
    lines = []
    for i in range(40):
        path = folder / "images" / f"{i:03d}.jpg"
        Image.fromarray(_variant(images, i, rng)).save(path)
        lines.append(f"{path} {i % 5}\n")
    (folder / "train.txt").write_text("".join(lines[:30]))
    (folder / "test.txt").write_text("".join(lines[30:]))


PASCAL_CLASSES = (
    "aeroplane bicycle bird boat bottle bus car cat chair cow diningtable dog horse "
    "motorbike person pottedplant sheep sofa train tvmonitor"
).split()


def _pascal(root: Path, images: list[np.ndarray], rng: np.random.Generator) -> None:
    """24 JPEG images with VOC XML annotations of 1-3 random classes; train and val lists."""
    from PIL import Image

    for folder in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (root / folder).mkdir(parents=True)
    names = []
    for i in range(24):
        name = f"2012_{i:06d}"
        names.append(name)
        Image.fromarray(_variant(images, i, rng)).save(root / "JPEGImages" / f"{name}.jpg")
        objects = "".join(
            f"<object><name>{PASCAL_CLASSES[c]}</name><bndbox><xmin>1</xmin><ymin>1</ymin>"
            "<xmax>100</xmax><ymax>100</ymax></bndbox></object>"
            for c in rng.choice(20, size=rng.integers(1, 4), replace=False)
        )
        (root / "Annotations" / f"{name}.xml").write_text(
            f"<annotation><filename>{name}.jpg</filename>{objects}</annotation>"
        )
    (root / "ImageSets/Main/train.txt").write_text("".join(n + "\n" for n in names[:16]))
    (root / "ImageSets/Main/val.txt").write_text("".join(n + "\n" for n in names[16:]))


# -- the examples ------------------------------------------------------------------------
EXAMPLES = {
    "caffenet.py": """
import runpy
from netforge.prototxt import read_net
runpy.run_path('caffenet.py', run_name='__main__')
train, test = read_net('train.prototxt'), read_net('test.prototxt')
assert [l.type for l in train.layer][:2] == ['Data', 'Convolution'] and len(train.layer) == 24
assert train.layer[0].data_param.batch_size == 256 and test.layer[0].data_param.batch_size == 50
assert test.layer[-1].type == 'Accuracy'
print('caffenet.py: train', len(train.layer), 'layers, test', len(test.layer), 'layers')
""",
    "tools.py": """
import numpy as np
import tools
from netforge.prototxt import read_solver
t = tools.SimpleTransformer()
image = np.random.default_rng(0).integers(0, 256, (5, 7, 3)).astype(np.uint8)
back = t.deprocess(t.preprocess(image))
assert (back == image).all(), 'SimpleTransformer round trip'
s = tools.CaffeSolver(debug=True)
s.sp['base_lr'] = '0.01'
s.write('solver.prototxt')
p = read_solver('solver.prototxt')
assert p.base_lr == np.float32(0.01) and p.max_iter == 12 and p.test_interval == 4
print('tools.py: transformer round trip exact; CaffeSolver file read, max_iter', p.max_iter)
""",
    "pyloss.py + linreg.prototxt": """
import sys
sys.path.insert(0, 'layers')
import numpy as np
import caffe
from caffe.proto import caffe_pb2
s = caffe_pb2.SolverParameter(train_net='linreg.prototxt', base_lr=0.01, momentum=0.9,
                              lr_policy='fixed', max_iter=100, random_seed=1, display=0)
with open('linreg_solver.prototxt', 'w') as f:
    f.write(str(s))
solver = caffe.get_solver('linreg_solver.prototxt')
net = solver.net
net.forward()
x, y = net.blobs['ipx'].data.astype(np.float64), net.blobs['ipy'].data.astype(np.float64)
expected = ((x - y) ** 2).sum() / x.shape[0] / 2  # the Euclidean loss, in float64
assert np.isclose(net.blobs['loss'].data.item(), expected, rtol=1e-5), 'pyloss forward'
net.backward()
assert np.allclose(net.blobs['ipx'].diff, (x - y) / x.shape[0], rtol=1e-5), 'pyloss backward'
first = net.blobs['loss'].data.item()
solver.step(100)
last = net.blobs['loss'].data.item()
assert last < first / 2, (first, last)
print(f'pyloss: forward and backward match the float64 formula; loss {first:.3f} -> {last:.3f}')
""",
}


def run_examples(work: Path, timeout: float) -> list[dict]:
    """Each example in a fresh process in examples/pycaffe; a result per example."""
    results = []
    for name, code in EXAMPLES.items():
        started = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-c", rewrite_source(code)],
            cwd=work / "examples" / "pycaffe",
            capture_output=True,
            text=True,
            timeout=timeout,
            env=_env(),
        )
        lines = (proc.stdout + proc.stderr).strip().splitlines()
        results.append(
            {
                "name": name,
                "ok": proc.returncode == 0,
                "seconds": time.perf_counter() - started,
                "message": lines[-1] if lines else "",
            }
        )
    return results


def _env() -> dict[str, str]:
    env = dict(os.environ, MPLBACKEND="Agg")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def run_notebook(work: Path, name: str, gpu: bool, timeout: float) -> dict:
    """Run one notebook's cells in a worker process; its result (cells run, errors)."""
    cells, notes = notebook_cells(work / "examples" / f"{name}.ipynb", name, gpu)
    spec = work / f"{name}.cells.json"
    expressions, pattern = SUMMARIES[name]
    spec.write_text(json.dumps({"cells": cells, "summaries": dict(expressions)}))
    started = time.perf_counter()
    try:
        proc = subprocess.run(
            [sys.executable, __file__, "--worker", str(spec)],
            cwd=work / "examples",
            capture_output=True,
            text=True,
            timeout=timeout,
            env=_env(),
        )
        output = proc.stdout
    except subprocess.TimeoutExpired as exc:
        output = exc.stdout.decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
    (work / f"{name}.log").write_text(output)  # the cells' printed output, for reading
    report = [json.loads(line[7:]) for line in output.splitlines() if line.startswith("RESULT ")]
    summary = [line[8:] for line in output.splitlines() if line.startswith("SUMMARY ")]
    if pattern:
        summary += [line.strip() for line in output.splitlines() if re.search(pattern, line)]
    errors = [r for r in report if not r["ok"]]
    return {
        "name": name,
        "total": len(cells),
        "run": len(report) - len(errors),
        "errors": errors,
        "notes": notes,
        "seconds": time.perf_counter() - started,
        "timed_out": len(report) < len(cells),
        "summary": summary,
    }


def worker(spec: Path) -> None:
    """Run the cells of ``spec`` in one namespace, as a notebook kernel would; one RESULT
    line per cell. A failed cell is reported and the next cells still run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def run_netforge(args: list[str]) -> None:
        status = subprocess.call([sys.executable, "-m", "netforge", *args], env=_env())
        if status:
            raise RuntimeError(f"netforge {' '.join(args)} exited with status {status}")

    namespace: dict = {"__name__": "__main__", "_run_netforge": run_netforge}
    notebook = json.loads(spec.read_text())
    for index, source in enumerate(notebook["cells"]):
        started = time.perf_counter()
        try:
            exec(compile(source, f"<cell {index}>", "exec"), namespace)
            result = {"cell": index, "ok": True}
        except BaseException as exc:  # a notebook shows the error and goes on
            where = traceback.extract_tb(exc.__traceback__)[-1]
            result = {
                "cell": index,
                "ok": False,
                "error": f"{type(exc).__name__}: {exc}"[:300],
                "at": f"{Path(where.filename).name}:{where.lineno}",
            }
        result["seconds"] = round(time.perf_counter() - started, 2)
        plt.close("all")
        print("RESULT " + json.dumps(result), flush=True)
        expression = notebook["summaries"].get(str(index))
        if expression and result["ok"]:
            print("SUMMARY " + str(eval(expression, namespace)), flush=True)


def _has_gpu() -> bool:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # no cupy, no driver or no device all mean no GPU
        return False


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("caffe_root", type=Path, nargs="?")
    parser.add_argument("--only", nargs="*", help="notebooks or examples to run (default all)")
    parser.add_argument("--keep", type=Path, help="work folder to create and keep")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per notebook")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker)
        return 0
    if args.caffe_root is None or not (args.caffe_root / "examples").is_dir():
        parser.error("point at a Caffe checkout (its examples/ folder)")
    if args.keep and args.keep.exists():
        parser.error(f"{args.keep} exists; --keep names a folder to create")
    work = args.keep or Path(tempfile.mkdtemp(prefix="pycaffe_notebooks_"))
    work.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(REPO))
    prepare(args.caffe_root.resolve(), work)
    wanted = set(args.only or [*EXAMPLES, *NOTEBOOKS])
    failed = 0
    print(f"work folder: {work}")
    for result in run_examples(work, args.timeout):
        if result["name"] not in wanted:
            continue
        failed += not result["ok"]
        status = "ok" if result["ok"] else "FAILED"
        print(f"{result['name']:34s} {status:6s} {result['seconds']:6.1f} s  {result['message']}")
    gpu = _has_gpu()
    for name in NOTEBOOKS:
        if name not in wanted:
            continue
        result = run_notebook(work, name, gpu, args.timeout)
        failed += result["run"] != result["total"]
        print(
            f"{name:34s} cells {result['run']:2d} / {result['total']:2d}  "
            f"{result['seconds']:6.1f} s{'  (timed out)' if result['timed_out'] else ''}"
        )
        for error in result["errors"]:
            print(f"    cell {error['cell']}: {error['error']} ({error['at']})")
        for line in result["summary"]:
            print(f"    result: {line}")
        for note in result["notes"]:
            print(f"    substituted: {note}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
