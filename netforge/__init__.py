"""netforge: Caffe, reborn in pure Python.

Nets and solvers are Caffe prototxt files; layers run on numpy or, on a GPU, on cupy. The
Python API follows pycaffe, so ``import netforge as caffe`` ports most pycaffe scripts.
"""

__version__ = "0.1.0"

from netforge._blas import configure_openblas

configure_openblas()  # must run before numpy is imported (see netforge/_blas.py)

from netforge import solvers  # noqa: E402
from netforge.backend import set_device, set_mode_cpu, set_mode_gpu  # noqa: E402
from netforge.blob import Blob  # noqa: E402
from netforge.errors import NetforgeError  # noqa: E402
from netforge.layer import Layer, register  # noqa: E402
from netforge.net import Net  # noqa: E402
from netforge.proto import pb  # noqa: E402
from netforge.solvers import *  # noqa: E402,F403  (pycaffe's SGDSolver, get_solver, ...)

TRAIN = pb.TRAIN
TEST = pb.TEST

__all__ = [
    *solvers.__all__,
    "TRAIN",
    "TEST",
    "Blob",
    "Layer",
    "Net",
    "NetforgeError",
    "register",
    "set_device",
    "set_mode_cpu",
    "set_mode_gpu",
    "__version__",
]
