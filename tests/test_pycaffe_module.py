"""pycaffe's module functions and its additions to Net, Blob and Solver, with the intent of
BVLC's python/caffe/test (test_net, test_solver, test_layer_type_list, test_nccl), and
Caffe's mode semantics: a net follows set_mode_gpu/set_mode_cpu, moving once, lazily."""

from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

import netforge
import netforge as caffe
from netforge import backend as nb
from netforge.errors import DataError, DeviceError, ShapeError
from tests.conftest import GPU_AVAILABLE

SIMPLE_NET = """name: 'testnet' force_backward: true
layer { type: 'DummyData' name: 'data' top: 'data' top: 'label'
  dummy_data_param { num: 5 channels: 2 height: 3 width: 4
    num: 5 channels: 1 height: 1 width: 1
    data_filler { type: 'gaussian' std: 1 } data_filler { type: 'constant' } } }
layer { type: 'Convolution' name: 'conv' bottom: 'data' top: 'conv'
  convolution_param { num_output: 11 kernel_size: 2 pad: 3
    weight_filler { type: 'gaussian' std: 1 } bias_filler { type: 'constant' value: 2 } }
  param { decay_mult: 1 } param { decay_mult: 0 } }
layer { type: 'InnerProduct' name: 'ip' bottom: 'conv' top: 'ip_blob'
  inner_product_param { num_output: 13
    weight_filler { type: 'gaussian' std: 2.5 } bias_filler { type: 'constant' value: -3 } } }
layer { type: 'SoftmaxWithLoss' name: 'loss' bottom: 'ip_blob' bottom: 'label' top: 'loss'
  loss_weight: 2 }
"""

AFFINE_NET = """name: 'affine' force_backward: true
layer { type: 'Input' name: 'x' top: 'x' input_param { shape { dim: 4 dim: 3 } } }
layer { type: 'InnerProduct' name: 'ip' bottom: 'x' top: 'y'
  inner_product_param { num_output: 2 weight_filler { type: 'gaussian' std: 1 }
    bias_filler { type: 'gaussian' std: 1 } } }
"""


IN_PLACE_NET = """name: 'in_place' force_backward: true
layer { type: 'Input' name: 'x' top: 'x' input_param { shape { dim: 2 dim: 3 } } }
layer { type: 'ReLU' name: 'relu' bottom: 'x' top: 'x' }
layer { type: 'Power' name: 'y' bottom: 'x' top: 'y' }
"""


@pytest.fixture(autouse=True)
def _cpu_mode_after():
    yield
    caffe.set_mode_cpu()
    caffe.process._seeded["rng"] = None


def _write(tmp_path: Path, text: str, name: str = "net.prototxt") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def _simple(tmp_path: Path) -> caffe.Net:
    net = caffe.Net(_write(tmp_path, SIMPLE_NET), caffe.TRAIN)
    net.blobs["label"].data[...] = np.random.default_rng(0).integers(13, size=(5, 1, 1, 1))
    return net


# -- module functions ---------------------------------------------------------------------
def test_layer_type_list_names_every_buildable_type() -> None:
    types = caffe.layer_type_list()
    for name in ("Data", "Convolution", "InnerProduct", "Python", "LSTM"):
        assert name in types
    assert types == sorted(types)


def test_set_random_seed_repeats_fillers(tmp_path: Path) -> None:
    path = _write(tmp_path, AFFINE_NET)
    caffe.set_random_seed(7)
    first = caffe.Net(path, caffe.TEST).params["ip"][0].data.copy()
    second = caffe.Net(path, caffe.TEST).params["ip"][0].data.copy()
    caffe.set_random_seed(7)
    again = caffe.Net(path, caffe.TEST).params["ip"][0].data.copy()
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, second)  # one generator, drawn on (Caffe's global RNG)
    # numpy's Generator seeded 7 draws the same gaussian weights (std 1), independently
    expected = np.random.default_rng(7).standard_normal((2, 3)).astype(np.float32)
    np.testing.assert_array_equal(first, expected)


def test_timer_measures_between_start_and_stop() -> None:
    timer = caffe.Timer()
    assert timer.ms == 0
    timer.start()
    sum(range(10000))
    running = timer.ms
    timer.stop()
    stopped = timer.ms
    assert 0 < running <= stopped
    assert timer.ms == stopped  # frozen once stopped


def test_init_log_and_log_write_glog_lines(capsys: pytest.CaptureFixture) -> None:
    logger = logging.getLogger("netforge")
    before = (logger.level, logger.propagate, list(logger.handlers))
    try:
        caffe.init_log()
        caffe.log("first message")
        caffe.init_log(1)
        caffe.log("hidden message")
        err = capsys.readouterr().err
    finally:
        for handler in [h for h in logger.handlers if h not in before[2]]:
            logger.removeHandler(handler)
        logger.setLevel(before[0])
        logger.propagate = before[1]
    assert "first message" in err and err.startswith("I")
    assert "hidden message" not in err


def test_solver_count_rank_and_nccl() -> None:
    assert caffe.solver_count() == 1 and caffe.solver_rank() == 0
    try:
        caffe.set_solver_count(4)
        caffe.set_solver_rank(3)
        caffe.set_multiprocess(True)
        assert (caffe.solver_count(), caffe.solver_rank()) == (4, 3)
        # The world the data layers of nets built now shard their records by.
        assert tuple(netforge.parallel.world.world()) == (3, 4)
    finally:
        caffe.set_solver_count(1)
        caffe.set_solver_rank(0)
        caffe.set_multiprocess(False)
    if caffe.has_nccl():
        assert len(caffe.NCCL.new_uid()) == 128  # ncclUniqueId's bytes
    else:
        with pytest.raises(DeviceError, match="NCCL through cupy"):
            caffe.NCCL.new_uid()
    with pytest.raises(DeviceError, match="this solver is on the CPU"):
        caffe.NCCL(SimpleNamespace(backend=netforge.backend.CPU), b"")


# -- Net ----------------------------------------------------------------------------------
def test_top_bottom_names_and_loss_weights(tmp_path: Path) -> None:
    net = _simple(tmp_path)
    assert net.top_names == OrderedDict(
        [("data", ["data", "label"]), ("conv", ["conv"]), ("ip", ["ip_blob"]), ("loss", ["loss"])]
    )
    assert net.bottom_names == OrderedDict(
        [("data", []), ("conv", ["data"]), ("ip", ["conv"]), ("loss", ["ip_blob", "label"])]
    )
    assert net.blob_loss_weights == OrderedDict(
        [("data", 0), ("label", 0), ("conv", 0), ("ip_blob", 0), ("loss", 2)]
    )
    assert list(net.layer_dict) == list(net._layer_names)
    assert net.inputs == [] and net.outputs == ["loss"]


def test_index_based_names_of_caffe_cpp(tmp_path: Path) -> None:
    """pycaffe's ``_blobs``, ``_inputs``/``_outputs``, ``_top_ids``/``_bottom_ids``,
    ``_blob_loss_weights`` and ``_forward``/``_backward`` (what its pycaffe.py is built on)."""
    net = _simple(tmp_path)
    names = list(net.blobs)
    assert names == ["data", "label", "conv", "ip_blob", "loss"]
    assert [b.shape for b in net._blobs] == [net.blobs[n].shape for n in names]
    assert net._inputs == [] and net._outputs == [4]
    assert [names[i] for i in net._bottom_ids(3)] == ["ip_blob", "label"]
    assert net._top_ids(0) == [0, 1] and net._top_ids(1) == [2]
    assert net._blob_loss_weights == [0.0, 0.0, 0.0, 0.0, 2.0]
    affine, weight, bias = _affine(tmp_path)
    x = np.random.default_rng(5).standard_normal((4, 3))
    affine.blobs["x"].data[...] = x
    assert affine._inputs == [0] and affine._outputs == [1]
    assert affine._forward(0, 1) == 0.0
    np.testing.assert_allclose(affine.blobs["y"].data, x @ weight.T + bias, rtol=1e-5, atol=1e-6)
    affine.blobs["y"].diff[...] = 1.0
    affine._backward(1, 0)
    np.testing.assert_allclose(affine.blobs["x"].diff, np.ones((4, 2)) @ weight, rtol=1e-5)


def test_clear_param_diffs(tmp_path: Path) -> None:
    net = _simple(tmp_path)
    net.forward()
    net.backward()
    diff = net.params["conv"][0].diff
    assert np.abs(diff).max() > 0
    net.clear_param_diffs()
    assert not diff.any() and not net.params["ip"][1].diff.any()


def _affine(tmp_path: Path) -> tuple[caffe.Net, np.ndarray, np.ndarray]:
    net = caffe.Net(_write(tmp_path, AFFINE_NET), caffe.TEST)
    weight, bias = (p.data.astype(np.float64) for p in net.params["ip"])
    return net, weight, bias


def test_forward_all_batches_and_unpads(tmp_path: Path) -> None:
    net, weight, bias = _affine(tmp_path)
    x = np.random.default_rng(1).standard_normal((10, 3))
    out = net.forward_all(x=x)
    assert set(out) == {"y"} and out["y"].shape == (10, 2)
    np.testing.assert_allclose(out["y"], x @ weight.T + bias, rtol=1e-5, atol=1e-6)
    with_blobs = net.forward_all(blobs=["x"], x=x)
    np.testing.assert_allclose(with_blobs["x"], x, rtol=1e-6)


def test_forward_and_backward_copy_the_callers_arrays(tmp_path: Path) -> None:
    """pycaffe writes inputs into the blobs (``data[...] = x``): an in-place layer on the
    input leaves the caller's array alone, and a view of the blob taken before stays live."""
    net = caffe.Net(_write(tmp_path, IN_PLACE_NET), caffe.TEST)
    held = net.blobs["x"].data
    x = np.array([[-1.0, 2.0, -3.0], [4.0, -5.0, 6.0]], np.float32)
    net.forward(x=x)
    np.testing.assert_array_equal(x, [[-1, 2, -3], [4, -5, 6]])
    np.testing.assert_array_equal(held, np.maximum(x, 0))
    batch = -np.ones((3, 3), np.float32)
    net.forward_all(x=batch)
    np.testing.assert_array_equal(batch, -1)
    dy = np.ones((2, 3), np.float32)
    diffs = net.backward(y=dy)
    np.testing.assert_array_equal(dy, 1)  # the in-place ReLU's backward wrote elsewhere
    np.testing.assert_array_equal(diffs["x"], [[0, 0, 0], [0, 0, 0]])  # all inputs were < 0
    with pytest.raises(ShapeError, match="'y'"):
        net.backward(y=np.ones((2, 4), np.float32))


def test_batch_pads_the_last_batch_with_zeros(tmp_path: Path) -> None:
    net, _, _ = _affine(tmp_path)
    x = np.arange(30.0).reshape(10, 3)
    batches = list(net._batch({"x": x}))
    assert [b["x"].shape for b in batches] == [(4, 3)] * 3
    np.testing.assert_array_equal(batches[1]["x"], x[4:8])
    np.testing.assert_array_equal(batches[2]["x"], np.concatenate([x[8:], np.zeros((2, 3))]))


def test_forward_backward_all(tmp_path: Path) -> None:
    net, weight, bias = _affine(tmp_path)
    rng = np.random.default_rng(2)
    x, dy = rng.standard_normal((6, 3)), rng.standard_normal((6, 2))
    outs, diffs = net.forward_backward_all(x=x, y=dy)
    np.testing.assert_allclose(outs["y"], x @ weight.T + bias, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(diffs["x"], dy @ weight, rtol=1e-5, atol=1e-6)
    assert diffs["x"].shape == (6, 3)


def test_share_with_shares_parameter_memory(tmp_path: Path) -> None:
    first, _, _ = _affine(tmp_path)
    second, _, _ = _affine(tmp_path)
    second.share_with(first)
    assert np.shares_memory(second.params["ip"][0].data, first.params["ip"][0].data)
    first.params["ip"][1].data[...] = 5
    np.testing.assert_array_equal(second.params["ip"][1].data, [5, 5])
    other = caffe.Net(_write(tmp_path, AFFINE_NET.replace("num_output: 2", "num_output: 3"), "o"))
    with pytest.raises(ShapeError, match="cannot share param 0 weights from layer 'ip'"):
        other.share_with(first)


def test_load_hdf5_round_trip(tmp_path: Path) -> None:
    net = _simple(tmp_path)
    net.save_hdf5(str(tmp_path / "w.h5"))
    other = caffe.Net(_write(tmp_path, SIMPLE_NET), caffe.TRAIN)
    other.load_hdf5(str(tmp_path / "w.h5"))
    for name, blobs in net.params.items():
        for mine, theirs in zip(blobs, other.params[name]):
            np.testing.assert_array_equal(mine.data, theirs.data)
    net.save(str(tmp_path / "w.caffemodel"))
    with pytest.raises(DataError, match="not an HDF5 file"):
        other.load_hdf5(str(tmp_path / "w.caffemodel"))


# -- Blob ---------------------------------------------------------------------------------
def test_blob_legacy_accessors() -> None:
    blob = caffe.Blob((2, 3))
    assert (blob.num, blob.channels, blob.height, blob.width) == (2, 3, 1, 1)
    four = caffe.Blob((2, 3, 4, 5))
    assert (four.num, four.channels, four.height, four.width) == (2, 3, 4, 5)
    assert four.legacy_shape(-1) == 5 and blob.legacy_shape(-4) == 1
    scalar = caffe.Blob(())
    assert (scalar.num, scalar.width) == (1, 1)
    with pytest.raises(ShapeError, match="legacy accessors .* 5 > 4 axes"):
        caffe.Blob((1, 2, 3, 4, 5)).num  # noqa: B018
    with pytest.raises(ShapeError, match=r"outside \[-4, 3\]"):
        four.legacy_shape(4)


# -- Solver -------------------------------------------------------------------------------
def _solver(tmp_path: Path) -> caffe.SGDSolver:
    net = _write(tmp_path, SIMPLE_NET)
    solver = _write(
        tmp_path,
        f"net: '{net}' test_iter: 1 test_interval: 10 base_lr: 0.01 momentum: 0.9 "
        f"lr_policy: 'fixed' max_iter: 10 snapshot_prefix: '{tmp_path}/model' random_seed: 3",
        "solver.prototxt",
    )
    return caffe.SGDSolver(solver)


def test_solver_share_weights_snapshot_restore(tmp_path: Path) -> None:
    solver = _solver(tmp_path)
    assert len(solver.test_nets) == 1
    deploy = caffe.Net(_write(tmp_path, SIMPLE_NET, "deploy.prototxt"), caffe.TEST)
    solver.share_weights(deploy)
    assert np.shares_memory(deploy.params["ip"][0].data, solver.net.params["ip"][0].data)
    solver.step(2)
    state = solver.snapshot()
    assert state == tmp_path / "model_iter_2.solverstate"
    weights = solver.net.params["conv"][0].data.copy()
    solver.step(1)
    restored = _solver(tmp_path)
    restored.restore(str(state))
    assert restored.iter == 2
    np.testing.assert_array_equal(restored.net.params["conv"][0].data, weights)


# -- mode semantics -----------------------------------------------------------------------
class CountingDevice(nb.Backend):
    """A stand-in for a GPU backend: numpy arrays, every array moved onto it counted."""

    moves: list[int] = []

    def asarray(self, array: Any, dtype: Any = None) -> Any:
        CountingDevice.moves.append(id(array))
        return np.array(array, dtype=dtype, copy=True)


@pytest.fixture
def fake_gpu(monkeypatch: pytest.MonkeyPatch) -> CountingDevice:
    device = CountingDevice(np, -1)
    CountingDevice.moves = []
    monkeypatch.setattr(nb, "gpu", lambda device_id=0: device)
    return device


def test_set_mode_gpu_moves_an_existing_net_once_on_its_next_forward(
    tmp_path: Path, fake_gpu: CountingDevice
) -> None:
    net = _simple(tmp_path)
    net.forward()
    arrays = [a for b in net.blobs.values() for a in (b.data, b.diff)]
    buffers = {id(a if a.base is None else a.base) for a in arrays}
    weight = net.params["conv"][0].data
    caffe.set_mode_gpu()
    assert net.backend == nb.CPU  # nothing moves before the next pass
    assert not CountingDevice.moves
    net.follow_mode()  # what the next forward or backward does first
    assert net.backend is fake_gpu
    assert all(blob.backend is fake_gpu for blob in net.blobs.values())
    assert all(b.backend is fake_gpu for layer in net.layers for b in layer.blobs)
    assert len(CountingDevice.moves) == len(set(CountingDevice.moves))  # each buffer once
    assert buffers <= set(CountingDevice.moves)
    assert net.params["conv"][0].data is not weight
    np.testing.assert_array_equal(net.params["conv"][0].data, weight)
    counts = []
    for _ in range(3):
        CountingDevice.moves = []
        out = net.forward()
        net.backward()
        counts.append(len(CountingDevice.moves))
    assert counts[0] == counts[1] == counts[2]  # no pass after the move moves anything
    assert np.isfinite(out["loss"])
    lazy = _simple(tmp_path)
    caffe.set_mode_gpu()
    lazy.forward()
    assert lazy.backend is fake_gpu and lazy.blobs["conv"].backend is fake_gpu
    caffe.set_mode_cpu()
    net.forward()
    assert net.backend == nb.CPU and net.blobs["conv"].backend == nb.CPU


def test_moving_keeps_shared_parameters_shared(tmp_path: Path, fake_gpu: CountingDevice) -> None:
    shared = AFFINE_NET.replace("top: 'y'", "top: 'y' param { name: 'w' } param { name: 'b' }") + (
        "layer { type: 'InnerProduct' name: 'ip2' bottom: 'x' top: 'z' "
        "param { name: 'w' } param { name: 'b' } inner_product_param { num_output: 2 } }"
    )
    net = caffe.Net(_write(tmp_path, shared), caffe.TEST)
    weight, bias = (p.data.astype(np.float64) for p in net.params["ip"])
    x = np.random.default_rng(3).standard_normal((4, 3))
    caffe.set_mode_gpu()
    net.forward(x=x)
    assert net.backend is fake_gpu
    assert net.layer_dict["ip2"].blobs[0] is net.layer_dict["ip"].blobs[0]
    np.testing.assert_allclose(net.blobs["y"].data, x @ weight.T + bias, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(net.blobs["y"].data, net.blobs["z"].data)


def test_a_net_with_an_explicit_backend_stays_there(tmp_path: Path, fake_gpu: Any) -> None:
    net = caffe.Net(_write(tmp_path, AFFINE_NET), caffe.TEST, backend=nb.CPU)
    caffe.set_mode_gpu()
    net.forward()
    assert net.backend == nb.CPU and not CountingDevice.moves


def test_a_solver_follows_the_mode_with_its_nets_and_history(
    tmp_path: Path, fake_gpu: CountingDevice
) -> None:
    solver = _solver(tmp_path)
    solver.step(1)
    history = solver.history[0].copy()
    caffe.set_mode_gpu()
    solver.follow_mode()  # what the next step does first
    assert solver.backend is fake_gpu and solver.net.backend is fake_gpu
    assert solver.test_nets[0].backend is fake_gpu
    assert len(CountingDevice.moves) == len(set(CountingDevice.moves))
    np.testing.assert_array_equal(solver.history[0], history)
    solver.step(1)
    assert solver.iter == 2
    caffe.set_mode_cpu()
    solver.step(1)
    assert solver.backend == nb.CPU and solver.net.blobs["conv"].backend == nb.CPU


@pytest.mark.skipif(GPU_AVAILABLE, reason="checks the error given without a GPU")
def test_gpu_mode_without_a_gpu_is_a_device_error(tmp_path: Path) -> None:
    net, _, _ = _affine(tmp_path)
    caffe.set_mode_gpu()
    with pytest.raises(DeviceError, match="cupy|GPU"):
        net.forward()


@pytest.mark.gpu
def test_set_mode_gpu_runs_an_existing_net_on_the_gpu(tmp_path: Path) -> None:
    net, weight, bias = _affine(tmp_path)
    x = np.random.default_rng(4).standard_normal((4, 3))
    caffe.set_mode_gpu()
    out = net.forward(x=x)["y"]
    assert type(out).__module__.startswith("cupy")
    assert type(net.params["ip"][0].data).__module__.startswith("cupy")
    np.testing.assert_allclose(nb.to_numpy(out), x @ weight.T + bias, rtol=1e-5, atol=1e-6)
    caffe.set_mode_cpu()
    assert isinstance(net.forward(x=x)["y"], np.ndarray)


def test_nets_moved_together_keep_sharing_memory(tmp_path: Path, fake_gpu: CountingDevice) -> None:
    first, _, _ = _affine(tmp_path)
    second, _, _ = _affine(tmp_path)
    second.share_with(first)
    moved: dict = {}
    first.to(fake_gpu, moved)
    second.to(fake_gpu, moved)
    assert np.shares_memory(second.params["ip"][0].data, first.params["ip"][0].data)
    assert second.params["ip"][0].data is not first.params["ip"][0].data  # views, as before
    alone, _, _ = _affine(tmp_path)
    alone.share_with(first)
    alone.to(fake_gpu)  # moved by itself: its copy no longer follows the other net
    assert not np.shares_memory(alone.params["ip"][0].data, first.params["ip"][0].data)


def test_a_layer_that_refers_back_to_its_net_moves_once(
    tmp_path: Path, fake_gpu: CountingDevice
) -> None:
    net, weight, bias = _affine(tmp_path)
    net.layer_dict["ip"].owner = net  # e.g. a Python layer keeping its net
    kept = np.ones(3)
    net.layer_dict["ip"].cache = [kept, {"scale": np.full(2, 2.0)}]
    net.to(fake_gpu)
    assert net.backend is fake_gpu and net.layer_dict["ip"].backend is fake_gpu
    assert len(CountingDevice.moves) == len(set(CountingDevice.moves))
    cache = net.layer_dict["ip"].cache
    assert id(kept) in CountingDevice.moves and cache[0] is not kept  # moved, inside a list
    np.testing.assert_array_equal(cache[1]["scale"], [2.0, 2.0])
    x = np.random.default_rng(5).standard_normal((4, 3))
    np.testing.assert_allclose(net.forward(x=x)["y"], x @ weight.T + bias, rtol=1e-5, atol=1e-6)
