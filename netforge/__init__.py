"""netforge: Caffe, reborn in pure Python.

Nets and solvers are Caffe prototxt files; layers run on numpy or, on a GPU, on cupy. The
Python API follows pycaffe, so ``import netforge as caffe`` ports most pycaffe scripts.
"""

__version__ = "0.1.0"

from netforge._blas import configure_openblas

configure_openblas()  # must run before numpy is imported (see netforge/_blas.py)

from netforge import io, process, solvers  # noqa: E402
from netforge.backend import set_device, set_mode_cpu, set_mode_gpu  # noqa: E402
from netforge.blob import Blob  # noqa: E402
from netforge.classifier import Classifier  # noqa: E402
from netforge.detector import Detector  # noqa: E402
from netforge.errors import NetforgeError  # noqa: E402
from netforge.layer import Layer, register  # noqa: E402
from netforge.net import Net  # noqa: E402
from netforge.net_spec import NetSpec, layers, params, to_proto  # noqa: E402
from netforge.process import *  # noqa: E402,F403  (layer_type_list, set_random_seed, Timer, ...)
from netforge.proto import pb  # noqa: E402
from netforge.solvers import *  # noqa: E402,F403  (pycaffe's SGDSolver, get_solver, ...)

TRAIN = pb.TRAIN
TEST = pb.TEST

__all__ = [
    *solvers.__all__,
    *process.__all__,
    "TRAIN",
    "TEST",
    "Blob",
    "Classifier",
    "Detector",
    "Layer",
    "Net",
    "NetSpec",
    "NetforgeError",
    "layers",
    "params",
    "register",
    "set_device",
    "set_mode_cpu",
    "set_mode_gpu",
    "to_proto",
    "__version__",
    "io",
]
