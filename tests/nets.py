"""Small nets and solvers that several test files share: one definition each.

- ``TYPE_SETTINGS``: each solver type's own fields, as the solver tests and the
  data-parallel worker (``tests/parallel_worker.py``) train them;
- ``write_least_squares_net`` / ``write_least_squares_solver``: HDF5Data(solver_data.h5,
  BVLC's fixture, see fixtures/solver_data.LICENSE.md) → InnerProduct(1) → EuclideanLoss,
  the quick trainable net of the CLI, log and TensorBoard tests.
"""

from __future__ import annotations

from pathlib import Path

#: BVLC's test_gradient_based_solver data: 8 rows of (3, 10, 10) data and a target.
SOLVER_DATA = Path(__file__).resolve().parent / "fixtures" / "solver_data.h5"

#: The fields each solver type is trained with (beside base_lr and the rest).
TYPE_SETTINGS = {
    "SGD": "momentum: 0.9",
    "Nesterov": "momentum: 0.9",
    "AdaGrad": "delta: 1e-6",
    "RMSProp": "rms_decay: 0.95 delta: 1e-6",
    "AdaDelta": "momentum: 0.95 delta: 1e-6",
    "Adam": "momentum: 0.9 momentum2: 0.999 delta: 1e-6",
}

LEAST_SQUARES_NET = """name: "ls"
layer {{ name: "data" type: "HDF5Data" top: "data" top: "targets"
        hdf5_data_param {{ source: "{source}" batch_size: 4 }} }}
layer {{ name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
        inner_product_param {{ num_output: 1 weight_filler {{ type: "gaussian" std: {std} }} }} }}
{relu}layer {{ name: "loss" type: "EuclideanLoss" bottom: "ip" bottom: "targets" top: "loss"
        {loss_weight}}}
"""

RELU = 'layer { name: "relu" type: "ReLU" bottom: "ip" top: "ip" }\n'


def write_least_squares_net(
    folder: Path, std: float = 0.1, relu: bool = False, loss_weight: float | None = None
) -> Path:
    """Write ``folder/list.txt`` (naming ``SOLVER_DATA``) and ``folder/net.prototxt``, the
    least-squares net with its weights drawn at ``std``, a ReLU after the InnerProduct with
    ``relu``, and the loss's ``loss_weight`` when given; return the net's path."""
    listing = folder / "list.txt"
    listing.write_text(f"{SOLVER_DATA}\n")
    net = folder / "net.prototxt"
    weight = "" if loss_weight is None else f"loss_weight: {loss_weight} "
    net.write_text(
        LEAST_SQUARES_NET.format(
            source=listing, std=std, relu=RELU if relu else "", loss_weight=weight
        )
    )
    return net


def write_least_squares_solver(folder: Path, fields: str, **net: object) -> Path:
    """Write ``folder/solver.prototxt``: the solver ``fields`` (prototxt text) training the
    net of ``write_least_squares_net(folder, **net)``, snapshots to ``folder/ls_*``; return
    its path."""
    solver = folder / "solver.prototxt"
    path = write_least_squares_net(folder, **net)
    solver.write_text(f'net: "{path}"\nsnapshot_prefix: "{folder / "ls"}"\n{fields}')
    return solver
