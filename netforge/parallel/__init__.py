"""Data-parallel training across processes: MPI (mpi4py) for CPU processes and nodes, NCCL
(cupy) for the GPUs of a node; Caffe's multi-GPU semantics on both.

- ``world``: this process's rank and the solver count (data layers shard by them);
- ``comm``: the communicators (``MPICommunicator``, ``NCCLCommunicator``);
- ``data_parallel``: ``DataParallel``, the flat gradient buffer and its bucketed,
  backward-overlapped all-reduce (Caffe's ``NCCL`` class);
- ``launch``: how ``netforge train`` starts and prepares the ranks.

Nothing here imports mpi4py or cupy until a communicator is opened.
"""

from netforge.parallel.comm import Communicator, MPICommunicator, NCCLCommunicator
from netforge.parallel.data_parallel import DataParallel

__all__ = ["Communicator", "DataParallel", "MPICommunicator", "NCCLCommunicator"]
