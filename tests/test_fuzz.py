"""Mutation fuzzing of every file format netforge reads (issue 19).

Each case mutates a valid seed file (bytes flipped, set to extreme values, inserted, deleted,
truncated; in text formats also numbers swapped for extremes such as 2^31 - 1, -1e38 or
nan, and lines dropped or repeated), then reads it the way netforge does. Every case must
either succeed or raise a NetforgeError: any other exception is a traceback a user would see.
Each case runs under a time bound (a hang fails it) and the whole run under an address-space
limit (a memory blow-up fails it, unless netforge's own size checks refuse it first).

The seeds are fixed and the cases seeded, so a failure reproduces: ``CASES`` gives the count
per format. ``python tests/test_fuzz.py`` prints the outcomes per format.
"""

from __future__ import annotations

import contextlib
import json
import re
import resource
import shutil
import signal
import sys
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import lmdb
import numpy as np
import pytest

from netforge.errors import NetforgeError
from netforge.proto import pb

FIXTURES = Path(__file__).resolve().parent / "fixtures"
#: Cases per format; 3,650 in all, under a minute on 2 workers.
CASES = {
    "net_prototxt": 400,
    "solver_prototxt": 300,
    "solverstate": 300,
    "solverstate_h5": 150,
    "caffemodel": 300,
    "caffemodel_h5": 150,
    "mean_binaryproto": 300,
    "lmdb_datum": 400,
    "hdf5_data_list": 150,
    "image_list": 300,
    "zoo_manifest": 300,
    "png_image": 150,
    "jpeg_image": 150,
    "window_file": 150,
    "caffe_readme": 150,
}
#: Seconds one case may take before it counts as a hang.
TIME_BOUND = 20.0
#: Address space a worker may add during the fuzz run before an allocation fails.
MEMORY_HEADROOM = 2 << 30

NET = """
name: "fuzz"
layer { name: "data" type: "Input" top: "data" top: "label"
        input_param { shape { dim: 2 dim: 1 dim: 6 dim: 6 } shape { dim: 2 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 3 kernel_size: 3 pad: 1 stride: 1
                            weight_filler { type: "xavier" } } }
layer { name: "pool" type: "Pooling" bottom: "conv" top: "pool"
        pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "relu" type: "ReLU" bottom: "pool" top: "pool" }
layer { name: "ip" type: "InnerProduct" bottom: "pool" top: "ip"
        inner_product_param { num_output: 4 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
"""

TRAIN_NET = """
name: "fuzz_train"
layer {{ name: "data" type: "HDF5Data" top: "data" top: "targets"
        hdf5_data_param {{ source: "{source}" batch_size: 2 shuffle: true }} }}
layer {{ name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
        inner_product_param {{ num_output: 1 weight_filler {{ type: "gaussian" std: 0.1 }} }} }}
layer {{ name: "loss" type: "EuclideanLoss" bottom: "ip" bottom: "targets" top: "loss" }}
"""

SOLVER = """
net: "{net}"
type: "Adam"
base_lr: 0.01
momentum: 0.9
momentum2: 0.999
delta: 1e-8
lr_policy: "inv"
gamma: 0.0001
power: 0.75
weight_decay: 0.0005
max_iter: 2
display: 1
snapshot: 0
snapshot_prefix: "{prefix}"
random_seed: 3
average_loss: 2
iter_size: 1
clip_gradients: 10
"""

#: 100000 rather than 10^6: a conv with 10^6 outputs is legal and takes seconds, not a hang.
EXTREMES = (
    "0", "-1", "1", "2147483647", "-2147483648", "4294967295", "9223372036854775807",
    "1e38", "-1e38", "1e-45", "nan", "inf", "-inf", "65536", "100000",
)  # fmt: skip
BYTE_EXTREMES = (0x00, 0xFF, 0x7F, 0x80, 0x01)
NUMBER = re.compile(rb"-?\d+(\.\d+)?(e-?\d+)?")


# -- mutations -------------------------------------------------------------------------------
def mutate_bytes(data: bytes, rng: np.random.Generator) -> bytes:
    """One to four random byte-level edits."""
    out = bytearray(data)
    for _ in range(int(rng.integers(1, 5))):
        op = int(rng.integers(0, 7))
        at = int(rng.integers(0, max(len(out), 1)))
        if op == 0 and out:
            out[at % len(out)] ^= 1 << int(rng.integers(0, 8))
        elif op == 1 and out:
            out[at % len(out)] = int(rng.choice(BYTE_EXTREMES))
        elif op == 2:
            out[at:at] = rng.integers(0, 256, int(rng.integers(1, 9)), dtype=np.uint8).tobytes()
        elif op == 3:
            del out[at : at + int(rng.integers(1, 17))]
        elif op == 4:
            del out[at:]
        elif op == 5:
            size = int(rng.integers(1, 33))
            out[at:at] = out[at : at + size]
        elif out:
            # a varint of an extreme value: a length or count that lies
            out[at : at + 1] = bytes([0xFF, 0xFF, 0xFF, 0xFF, 0x07])
    return bytes(out)


INT_EXTREMES = (0, -1, 1, 2**31 - 1, -(2**31), 65536)
FLOAT_EXTREMES = (0.0, -1.0, float("nan"), float("inf"), -1e38, 1e38, 1e-45)
STRING_EXTREMES = ("", "#test:x", "#test7", "a" * 5000, "a\0b", "../../x", "\u00e9")


def _fields(message, found: list) -> list:
    """(message, field) for every field set in ``message`` and its sub-messages."""
    for descriptor, value in message.ListFields():
        found.append((message, descriptor))
        if descriptor.type == descriptor.TYPE_MESSAGE:
            for child in value if descriptor.is_repeated else [value]:
                _fields(child, found)
    return found


def mutate_message(message, rng: np.random.Generator) -> None:
    """Set one field somewhere in ``message`` to an extreme value of its type, or clear it."""
    fields = _fields(message, [])
    if not fields:
        return
    owner, field = fields[int(rng.integers(0, len(fields)))]
    pick = lambda values: values[int(rng.integers(0, len(values)))]  # noqa: E731
    kind = field.cpp_type
    if kind == field.CPPTYPE_MESSAGE or rng.integers(0, 6) == 0:
        owner.ClearField(field.name)
        return
    if kind in (field.CPPTYPE_INT32, field.CPPTYPE_INT64, field.CPPTYPE_UINT32,
                field.CPPTYPE_UINT64, field.CPPTYPE_ENUM):  # fmt: skip
        unsigned = kind in (field.CPPTYPE_UINT32, field.CPPTYPE_UINT64)
        value = pick([v for v in INT_EXTREMES if v >= 0] if unsigned else INT_EXTREMES)
        if kind == field.CPPTYPE_ENUM:
            value = pick([v.number for v in field.enum_type.values] + [99])
    elif kind in (field.CPPTYPE_FLOAT, field.CPPTYPE_DOUBLE):
        value = pick(FLOAT_EXTREMES)
    elif kind == field.CPPTYPE_BOOL:
        value = bool(rng.integers(0, 2))
    elif field.type == field.TYPE_BYTES:
        value = pick([b"", b"{}", b'{"pos": -5}', b"\xff\xfe", b"[1, 2]", b'{"state": 1}'])
    else:
        value = pick(STRING_EXTREMES)
    try:
        if field.is_repeated:
            values = getattr(owner, field.name)
            if len(values) and field.cpp_type != field.CPPTYPE_MESSAGE:
                values[int(rng.integers(0, len(values)))] = value
        else:
            setattr(owner, field.name, value)
    except (ValueError, TypeError):
        pass  # an enum closed to the value: leave the field as it was


def proto_mutator(cls):
    """Half the cases byte-level edits, half one field set to an extreme (a hand-edited or
    hostile file that still parses)."""

    def mutate(data: bytes, rng: np.random.Generator) -> bytes:
        if rng.integers(0, 2):
            return mutate_bytes(data, rng)
        message = cls.FromString(data)
        for _ in range(int(rng.integers(1, 3))):
            mutate_message(message, rng)
        return message.SerializeToString()

    return staticmethod(mutate)


def mutate_text(data: bytes, rng: np.random.Generator) -> bytes:
    """Numbers swapped for extremes, lines dropped or repeated, or byte-level edits."""
    kind = (0, 0, 0, 1, 2, 3)[int(rng.integers(0, 6))]  # numbers half the time
    if kind == 0:
        numbers = list(NUMBER.finditer(data))
        if numbers:
            for _ in range(int(rng.integers(1, 3))):
                found = numbers[int(rng.integers(0, len(numbers)))]
                value = EXTREMES[int(rng.integers(0, len(EXTREMES)))].encode()
                data = data[: found.start()] + value + data[found.end() :]
                numbers = list(NUMBER.finditer(data))
            return data
    if kind == 1:
        lines = data.split(b"\n")
        at = int(rng.integers(0, len(lines)))
        if rng.integers(0, 2):
            del lines[at]
        else:
            lines.insert(at, lines[int(rng.integers(0, len(lines)))])
        return b"\n".join(lines)
    return mutate_bytes(data, rng)


# -- the bounds ------------------------------------------------------------------------------
class Hang(Exception):
    """A case ran past TIME_BOUND."""


def _alarm(signum, frame):
    raise Hang(f"no result after {TIME_BOUND} s")


@contextlib.contextmanager
def bounded_memory() -> Iterator[None]:
    """Cap the address space at what the process maps now plus MEMORY_HEADROOM."""
    with open("/proc/self/statm") as statm:
        mapped = int(statm.read().split()[0]) * resource.getpagesize()
    old = resource.getrlimit(resource.RLIMIT_AS)
    limit = mapped + MEMORY_HEADROOM
    if old[1] != resource.RLIM_INFINITY:
        limit = min(limit, old[1])
    resource.setrlimit(resource.RLIMIT_AS, (limit, old[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, old)


#: One message per kind of finding, for the report.
EXAMPLES: dict[str, str] = {}


def run_case(read: Callable[[], object]) -> str:
    """The outcome: "ok", "error" (a NetforgeError) or a description of anything else."""
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, TIME_BOUND)
    try:
        read()
        return "ok"
    except NetforgeError:
        return "error"
    except Exception as exc:  # what the fuzz looks for: anything else is a finding
        # the deepest frame outside this file: where a hang was stuck
        frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename != __file__]
        where = (frames or traceback.extract_tb(exc.__traceback__))[-1]
        outcome = f"{type(exc).__name__} at {where.filename}:{where.lineno}"
        EXAMPLES.setdefault(outcome, str(exc)[:200])
        return outcome
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# -- the formats: a seed and how netforge reads it ----------------------------------------------
class Format:
    """Seed bytes, a mutation, and a reader of the mutated file written to ``path``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.path = folder / "case"

    mutate = staticmethod(mutate_bytes)

    def seed(self) -> bytes:
        raise NotImplementedError

    def read(self) -> object:
        raise NotImplementedError


def _net_file(folder: Path) -> Path:
    path = folder / "net.prototxt"
    path.write_text(NET)
    return path


def _train_net_file(folder: Path) -> Path:
    listing = folder / "train_list.txt"
    listing.write_text(f"{FIXTURES / 'solver_data.h5'}\n")
    path = folder / "train.prototxt"
    path.write_text(TRAIN_NET.format(source=listing))
    return path


class NetPrototxt(Format):
    mutate = staticmethod(mutate_text)

    def seed(self) -> bytes:
        return NET.encode()

    def read(self) -> object:
        from netforge.net import Net

        net = Net(str(self.path), pb.TEST)
        return net.forward()


class SolverPrototxt(Format):
    mutate = staticmethod(mutate_text)

    def seed(self) -> bytes:
        net = _train_net_file(self.folder)
        return SOLVER.format(net=net, prefix=self.folder / "snap").encode()

    def read(self) -> object:
        from netforge.solvers import get_solver

        solver = get_solver(str(self.path))
        # A huge iter_size asks for long work: that is training, not a hang.
        solver.step(2 if solver.param.iter_size <= 16 else 0)
        return solver


class SolverState(Format):
    suffix = ""
    mutate = proto_mutator(pb.SolverState)

    def __init__(self, folder: Path) -> None:
        super().__init__(folder)
        self.path = folder / f"case.solverstate{self.suffix}"
        self.solver = None

    def _solver(self):
        from netforge.solvers import get_solver

        param = pb.SolverParameter()
        from netforge.prototxt import parse_text

        param.CopyFrom(
            parse_text(
                SOLVER.format(net=_train_net_file(self.folder), prefix=self.folder / "snap"),
                pb.SolverParameter,
            )
        )
        param.snapshot_format = (
            pb.SolverParameter.HDF5 if self.suffix else pb.SolverParameter.BINARYPROTO
        )
        return get_solver(param)

    def seed(self) -> bytes:
        solver = self._solver()
        solver.step(1)
        return Path(solver.snapshot()).read_bytes()

    def read(self) -> object:
        solver = self._solver()
        solver.restore(self.path)
        solver.step(1)
        return solver


class SolverStateH5(SolverState):
    suffix = ".h5"
    mutate = staticmethod(mutate_bytes)


class Caffemodel(Format):
    h5 = False
    mutate = proto_mutator(pb.NetParameter)

    def seed(self) -> bytes:
        from netforge.net import Net

        net = Net(str(_net_file(self.folder)), pb.TEST)
        seed = self.folder / ("seed.caffemodel.h5" if self.h5 else "seed.caffemodel")
        net.save_hdf5(seed) if self.h5 else net.save(seed)
        self.net = net
        return seed.read_bytes()

    def read(self) -> object:
        self.net.copy_from(str(self.path))
        return self.net.forward()


class CaffemodelH5(Caffemodel):
    h5 = True
    mutate = staticmethod(mutate_bytes)


class MeanBinaryproto(Format):
    mutate = proto_mutator(pb.BlobProto)

    def seed(self) -> bytes:
        from netforge.weights import write_mean

        seed = self.folder / "seed.binaryproto"
        write_mean(seed, np.arange(3 * 4 * 5, dtype=np.float32).reshape(3, 4, 5))
        return seed.read_bytes()

    def read(self) -> object:
        from netforge.weights import read_mean

        return read_mean(self.path)


class LmdbDatum(Format):
    """The mutated bytes are the second record of an LMDB that the Data layer reads."""

    mutate = proto_mutator(pb.Datum)

    def seed(self) -> bytes:
        from netforge.data.datum import make_datum

        self.first = make_datum(np.zeros((1, 3, 3), np.uint8), 1).SerializeToString()
        self.cases = 0
        return make_datum(np.arange(9, dtype=np.uint8).reshape(1, 3, 3), 2).SerializeToString()

    def read(self) -> object:
        from netforge.net import Net

        # A database per case: readers keep their environment open per path.
        self.cases += 1
        db = self.folder / f"db{self.cases}"
        env = lmdb.open(str(db), map_size=1 << 20)
        with env.begin(write=True) as txn:
            txn.put(b"00000000", self.first)
            txn.put(b"00000001", self.path.read_bytes())
        env.close()
        net_file = self.folder / "data_net.prototxt"
        net_file.write_text(
            f'layer {{ name: "d" type: "Data" top: "data" top: "label" data_param {{ '
            f'source: "{db}" backend: LMDB batch_size: 2 }} }}'
        )
        net = Net(str(net_file), pb.TRAIN)
        try:
            return net.forward()
        finally:
            for layer in net.layers:
                getattr(layer, "close", lambda: None)()
                # Readers keep their LMDB environment for the process (data/db.py): release
                # it, or hundreds of databases exhaust the address-space cap.
                reader = getattr(getattr(layer, "source", None), "reader", None)
                if reader is not None:
                    reader.close()
            shutil.rmtree(db)


class Hdf5DataList(Format):
    def seed(self) -> bytes:
        listing = self.folder / "list.txt"
        listing.write_text(f"{self.path}\n")
        self.net = self.folder / "h5_net.prototxt"
        self.net.write_text(
            f'layer {{ name: "d" type: "HDF5Data" top: "data" top: "targets" '
            f'hdf5_data_param {{ source: "{listing}" batch_size: 3 }} }}'
        )
        return (FIXTURES / "solver_data.h5").read_bytes()

    def read(self) -> object:
        from netforge.net import Net

        net = Net(str(self.net), pb.TRAIN)
        net.forward()
        return net.forward()


class ImageList(Format):
    mutate = staticmethod(mutate_text)

    def seed(self) -> bytes:
        return b"a.jpg 0\nsub/b.png 3\n# a comment\nc.jpg 12\n"

    def read(self) -> object:
        from netforge.data.listfile import read_list

        return read_list(self.path)


class ZooManifest(Format):
    mutate = staticmethod(mutate_text)

    def __init__(self, folder: Path) -> None:
        super().__init__(folder)
        self.path = folder / "case.json"

    def seed(self) -> bytes:
        repo = Path(__file__).resolve().parent.parent
        return (repo / "zoo" / "bvlc_alexnet.json").read_bytes()

    def read(self) -> object:
        from netforge.zoo.manifest import read_json_manifest

        return read_json_manifest(self.path)


class PngImage(Format):
    """An image file as the Data and ImageData layers decode it (Datum.encoded, list files)."""

    kind = "PNG"

    def seed(self) -> bytes:
        import io

        from PIL import Image

        pixels = np.random.default_rng(0).integers(0, 256, (6, 5, 3), dtype=np.uint8)
        out = io.BytesIO()
        Image.fromarray(pixels).save(out, self.kind)
        return out.getvalue()

    def read(self) -> object:
        from netforge.data.datum import decode_image, resize

        return resize(decode_image(self.path.read_bytes(), True, str(self.path)), 4, 4)


class JpegImage(PngImage):
    kind = "JPEG"


class WindowFile(Format):
    """A WindowData source (R-CNN's window file), as the layer reads it."""

    mutate = staticmethod(mutate_text)

    def seed(self) -> bytes:
        return (
            b"# 0\nimg/a.jpg\n3\n32\n48\n2\n1 0.8 0 0 20 30\n0 0.1 5 5 10 10\n"
            b"# 1\nimg/b.jpg\n3\n16\n16\n1\n2 0.6 1 1 8 8\n"
        )

    def read(self) -> object:
        from netforge.data.window import read_window_file

        return read_window_file(str(self.path), "", 0.5, 0.3)


class CaffeReadme(Format):
    """A Caffe model folder's readme.md front matter (``netforge zoo`` on Caffe's folders)."""

    mutate = staticmethod(mutate_text)

    def __init__(self, folder: Path) -> None:
        super().__init__(folder)
        self.path = folder / "model" / "readme.md"
        self.path.parent.mkdir()

    def seed(self) -> bytes:
        return (
            b"---\nname: BAIR/BVLC AlexNet Model\ncaffemodel: bvlc_alexnet.caffemodel\n"
            b"caffemodel_url: http://dl.caffe.berkeleyvision.org/bvlc_alexnet.caffemodel\n"
            b"license: unrestricted\nsha1: 9116a64c0fbe4459d18f4bb6b56d647b63920377\n"
            b"caffe_commit: 709dc15af4a06bebda027c1eb2b3f3e3375d5077\n---\n\nAlexNet.\n"
        )

    def read(self) -> object:
        from netforge.zoo.manifest import read_caffe_model_dir

        return read_caffe_model_dir(self.path.parent)


FORMATS: dict[str, type[Format]] = {
    "net_prototxt": NetPrototxt,
    "solver_prototxt": SolverPrototxt,
    "solverstate": SolverState,
    "solverstate_h5": SolverStateH5,
    "caffemodel": Caffemodel,
    "caffemodel_h5": CaffemodelH5,
    "mean_binaryproto": MeanBinaryproto,
    "lmdb_datum": LmdbDatum,
    "hdf5_data_list": Hdf5DataList,
    "image_list": ImageList,
    "zoo_manifest": ZooManifest,
    "png_image": PngImage,
    "jpeg_image": JpegImage,
    "window_file": WindowFile,
    "caffe_readme": CaffeReadme,
}


def fuzz(name: str, folder: Path, cases: int, seed: int = 19) -> Counter:
    """Run ``cases`` mutations of format ``name``; outcome -> count."""
    import logging

    logging.getLogger("netforge").setLevel(logging.ERROR)
    fmt = FORMATS[name](folder)
    original = fmt.seed()
    rng = np.random.default_rng([seed, sorted(FORMATS).index(name)])
    outcomes: Counter = Counter()
    with bounded_memory(), np.errstate(all="ignore"):
        for _ in range(cases):
            fmt.path.write_bytes(fmt.mutate(original, rng))
            outcomes[run_case(fmt.read)] += 1
    return outcomes


@pytest.mark.parametrize("name", sorted(CASES))
def test_fuzz_gives_results_or_netforge_errors(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    outcomes = fuzz(name, tmp_path, CASES[name])
    findings = {k: v for k, v in outcomes.items() if k not in ("ok", "error")}
    shown = {f"{k} ({EXAMPLES.get(k)})": v for k, v in findings.items()}
    assert not findings, f"{name}: {json.dumps(shown, indent=1)}"
    assert sum(outcomes.values()) == CASES[name]


if __name__ == "__main__":
    import tempfile

    total: Counter = Counter()
    for format_name in sys.argv[1:] or sorted(CASES):
        with tempfile.TemporaryDirectory() as temp:
            counts = fuzz(format_name, Path(temp), CASES[format_name])
        others = sum(v for k, v in counts.items() if k not in ("ok", "error"))
        print(
            f"{format_name:18} cases {sum(counts.values()):5}  ok {counts['ok']:5}  "
            f"NetforgeError {counts['error']:5}  other {others}"
        )
        for outcome, count in counts.items():
            if outcome not in ("ok", "error"):
                print(f"    {count:4} x {outcome}: {EXAMPLES.get(outcome)}")
        total += counts
    print(
        f"{'all':18} cases {sum(total.values()):5}  ok {total['ok']:5}  "
        f"NetforgeError {total['error']:5}"
    )
    sys.exit(1 if set(total) - {"ok", "error"} else 0)
