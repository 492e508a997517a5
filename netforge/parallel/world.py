"""This process's place among the solvers of a data-parallel run: its rank and their count.

Caffe keeps these as globals (``Caffe::solver_rank``, ``Caffe::solver_count``) that its data
layers read to take their share of the records; netforge keeps them here, as a thin default
(STYLE rule 6), set by ``netforge train`` under ``mpiexec`` or ``--gpu 0,1``, by
``DataParallel``, or by pycaffe's ``set_solver_rank``/``set_solver_count``. Nets built while
the count is above 1 shard their TRAIN data layers (Data, ImageData, HDF5Data): rank r keeps
record k of the stream when ``k % count == r``.
"""

from __future__ import annotations

from typing import NamedTuple


class World(NamedTuple):
    """A rank and the number of ranks (``rank < count``)."""

    rank: int
    count: int


_state = {"rank": 0, "count": 1}


def world() -> World:
    """The rank and solver count that nets built now shard their training data by."""
    return World(_state["rank"], _state["count"])


def set_world(rank: int, count: int) -> None:
    """Set both the rank and the solver count (``set_solver_rank`` + ``set_solver_count``)."""
    _state["rank"], _state["count"] = int(rank), int(count)


def set_rank(rank: int) -> None:
    """Set this process's rank (Caffe's ``Caffe::set_solver_rank``)."""
    _state["rank"] = int(rank)


def set_count(count: int) -> None:
    """Set the number of solvers training together (Caffe's ``Caffe::set_solver_count``)."""
    _state["count"] = int(count)
