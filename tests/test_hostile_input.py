"""Regression tests of issue 19's classes of hostile input: each damaged or out-of-range file
or field gives one NetforgeError naming the file (and the field, layer or bytes), and a
refused file leaves the solver as it was."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from harness import run
from test_fuzz import bounded_memory
from test_solver import make_solver, solver_param

import netforge.reading
from netforge.data.datum import read_image
from netforge.data.hdf5 import read_file_list
from netforge.data.listfile import read_list
from netforge.data.window import read_window_file
from netforge.errors import ConfigError, DataError, ShapeError
from netforge.memory import available_bytes
from netforge.net import Net
from netforge.proto import pb
from netforge.prototxt import parse_text
from netforge.solvers import get_solver
from netforge.weights import read_mean, write_hdf5_weights


# -- solverstate -----------------------------------------------------------------------------
def _damaged_state(tmp_path: Path, edit) -> tuple[object, Path]:
    solver = make_solver(tmp_path, "SGD")
    solver.step(1)
    message = pb.SolverState.FromString(solver.snapshot().read_bytes())
    edit(message)
    path = tmp_path / "damaged.solverstate"
    path.write_bytes(message.SerializeToString())
    return make_solver(tmp_path, "SGD"), path


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda m: setattr(m, "iter", -3), "iter -3 and current_step 0 must be >= 0"),
        (lambda m: setattr(m, "learned_net", "x" * 5000), "learned_net is not a usable path"),
        (lambda m: setattr(m, "learned_net", "a\0b"), "learned_net is not a usable path"),
        (lambda m: setattr(m, "learned_net", "a" * 300), "its weights file a+ .*does not exist"),
        (lambda m: setattr(m, "rng_state", b'{"state": '), "random generator state is corrupt"),
        (lambda m: setattr(m, "rng_state", b"[1, 2]"), "random generator state is corrupt"),
        (lambda m: m.layer_state[0].__setattr__("state", b"{}"), "data-layer state is corrupt"),
        (lambda m: m.layer_state[0].__setattr__("state", b"\xff"), "data-layer state is corrupt"),
        (lambda m: m.layer_state[0].__setattr__("layer", "#test:data"), "name '#test:data'"),
    ],
)
def test_corrupt_solverstate_fields_are_data_errors_naming_the_file(tmp_path, edit, match):
    solver, path = _damaged_state(tmp_path, edit)
    weights = solver.net.params["innerprod"][0].data.copy()
    cursor = solver.net.layer_states()
    with pytest.raises(DataError, match=match) as info:
        solver.restore(path)
    assert str(path) in str(info.value)
    # nothing was half-restored
    assert solver.iter == 0
    np.testing.assert_array_equal(solver.net.params["innerprod"][0].data, weights)
    assert solver.net.layer_states() == cursor


def test_non_utf8_text_in_binary_files_is_a_data_error(tmp_path):
    state = pb.SolverState(iter=1, learned_net="abc").SerializeToString()
    path = tmp_path / "bad.solverstate"
    path.write_bytes(state.replace(b"abc", b"a\xffc"))
    with pytest.raises(DataError, match="'learned_net' is not UTF-8"):
        make_solver(tmp_path, "SGD").restore(path)
    net = pb.NetParameter()
    net.layer.add(name="ipx", type="InnerProduct")
    model = tmp_path / "bad.caffemodel"
    model.write_bytes(net.SerializeToString().replace(b"ipx", b"i\xfex"))
    with pytest.raises(DataError, match=f"{model}: field 'name' is not UTF-8"):
        make_solver(tmp_path, "SGD").net.copy_from(str(model))


# -- caffemodel.h5 ---------------------------------------------------------------------------
def _h5_model(tmp_path: Path, name: str = "m.caffemodel.h5") -> Path:
    path = tmp_path / name
    write_hdf5_weights(path, [("innerprod", [(0, np.zeros((1, 300)), None)])])
    return path


def test_hdf5_external_and_dangling_links_are_refused(tmp_path):
    outside = _h5_model(tmp_path, "outside.h5")
    path = _h5_model(tmp_path)
    with h5py.File(path, "a") as handle:
        handle["data/innerprod/1"] = h5py.ExternalLink(str(outside), "/data/innerprod/0")
    net = make_solver(tmp_path, "SGD").net
    with pytest.raises(DataError, match="is a link to another file"):
        net.copy_from(str(path))
    with h5py.File(path, "a") as handle:
        del handle["data/innerprod/1"]
        handle["data/innerprod/1"] = h5py.SoftLink("/nowhere")
    with pytest.raises(DataError, match="'/nowhere', which does not exist"):
        net.copy_from(str(path))


@pytest.mark.parametrize(
    "damage, match",
    [
        (lambda h: h["data"].create_dataset("conv", data=[1.0]), "'conv' is not a group"),
        (lambda h: h["data/innerprod"].create_dataset("w", data=[1.0]), "'w' is not a blob"),
        (lambda h: h["data/innerprod"].create_dataset("1", data=[b"x"]), "array of numbers"),
    ],
)
def test_malformed_hdf5_weights_are_data_errors(tmp_path, damage, match):
    path = _h5_model(tmp_path)
    with h5py.File(path, "a") as handle:
        damage(handle)
    with pytest.raises(DataError, match=match):
        make_solver(tmp_path, "SGD").net.copy_from(str(path))


def test_damaged_hdf5_file_is_a_data_error(tmp_path):
    path = _h5_model(tmp_path)
    data = bytearray(path.read_bytes())
    # the B-tree and heap signatures hold the group structure: damage them
    for signature in (b"TREE", b"HEAP", b"SNOD"):
        at = data.find(signature)
        if at >= 0:
            data[at : at + 4] = b"XXXX"
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=str(path)):
        make_solver(tmp_path, "SGD").net.copy_from(str(path))


# -- mean ------------------------------------------------------------------------------------
def test_mean_with_no_image_is_a_shape_error(tmp_path):
    blob = pb.BlobProto(num=0, channels=3, height=2, width=2)
    path = tmp_path / "empty.binaryproto"
    path.write_bytes(blob.SerializeToString())
    with pytest.raises(ShapeError, match=f"{path}: a mean must be a non-empty"):
        read_mean(path)


# -- solver fields ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "solver_type, settings, match",
    [
        ("SGD", 'snapshot_prefix: "a\\000b" snapshot: 1', "snapshot_prefix .* without NUL"),
        ("SGD", 'lr_policy: "inv" gamma: 0.1 power: -1e38', "no finite learning rate"),
        ("SGD", "base_lr: nan", "base_lr is nan; it must be a finite number"),
        ("SGD", "weight_decay: -1", "weight_decay is -1.0; it must be >= 0"),
        ("SGD", "max_iter: -5", "max_iter is -5"),
        ("SGD", "stepvalue: 5 stepvalue: 2", "stepvalue #1 is 2"),
        ("Adam", "momentum2: 2", "momentum2 is 2.0; it must be in \\[0, 1\\) for Adam"),
        ("Adam", "momentum: 1", "momentum is 1.0; it must be in \\[0, 1\\) for Adam"),
        ("AdaDelta", "momentum: 1.5", "momentum is 1.5; it must be in \\[0, 1\\] for AdaDelta"),
        ("RMSProp", "delta: 0", "delta is 0.0; it must be > 0 for RMSProp"),
    ],
)
def test_out_of_range_solver_fields_name_the_file_and_field(tmp_path, solver_type, settings, match):
    param = solver_param(tmp_path, solver_type, settings)
    with pytest.raises(ConfigError, match=match) as info:
        solver = get_solver(param, source="my_solver.prototxt")
        solver.step(2)
    assert str(info.value).startswith("my_solver.prototxt: ")


def test_poly_past_max_iter_is_a_config_error_not_a_complex_rate(tmp_path):
    param = solver_param(tmp_path, "SGD", 'lr_policy: "poly" power: 0.5 max_iter: 1')
    solver = get_solver(param, source="s.prototxt")
    solver.step(2)  # iterations 0 and 1: rates 0.01 and 0
    with pytest.raises(ConfigError, match="s.prototxt: lr_policy 'poly' gives no finite"):
        solver.step(1)


# -- sizes -----------------------------------------------------------------------------------
def test_pooling_stride_near_2_31_is_fast_and_equals_any_stride_past_the_plane():
    x = np.random.default_rng(0).normal(size=(2, 3, 7, 9))
    layer = 'name: "p" type: "Pooling" pooling_param {{ pool: {} kernel_size: 3 stride: {} }}'
    for pool in ("MAX", "AVE"):
        # First, so that the time below is the stride's alone: on a fresh clone this call
        # compiles the pooling kernels (the jit extra), 4 s or more on a loaded machine.
        reference = run(layer.format(pool, 10), [x])
        start = time.perf_counter()
        huge = run(layer.format(pool, 2**31 - 1), [x])
        assert time.perf_counter() - start < 5
        for a, b in zip(huge, reference, strict=True):
            np.testing.assert_array_equal(a, b)
        assert huge[0].shape == (2, 3, 2, 2)  # CEIL: a second, empty window per axis


@pytest.mark.parametrize(
    "layer",
    [
        'layer { name: "big" type: "InnerProduct" bottom: "data" top: "ip" '
        "inner_product_param { num_output: 2147483647 } }",
        'layer { name: "big" type: "Convolution" bottom: "data" top: "c" '
        "convolution_param { num_output: 65536 kernel_size: 1 } }",
    ],
)
def test_a_net_larger_than_memory_names_the_layer_and_bytes(layer):
    text = (
        'layer { name: "data" type: "Input" top: "data" '
        "input_param { shape { dim: 64 dim: 3 dim: 512 dim: 512 } } }" + layer
    )
    with pytest.raises(ShapeError, match=r"layer 'big' .*would need [\d,]+ bytes") as info:
        Net(parse_text(text, pb.NetParameter), pb.TEST)
    needed = int(str(info.value).split("would need ")[1].split(" bytes")[0].replace(",", ""))
    assert needed > available_bytes()


def test_gradients_that_do_not_fit_are_one_error_before_the_first_backward(monkeypatch):
    # 128 MiB of data per blob: the net fits in 400 MiB for inference (256 MiB), but
    # backward adds a diff beside both blobs (512 MiB in all).
    import netforge.memory

    text = (
        'force_backward: true layer { name: "data" type: "Input" top: "data" '
        "input_param { shape { dim: 1 dim: 32 dim: 1024 dim: 1024 } } }"
        'layer { name: "twice" type: "Power" bottom: "data" top: "twice" '
        "power_param { scale: 2 } }"
    )
    monkeypatch.setattr(netforge.memory, "available_bytes", lambda: 400 << 20)
    net = Net(parse_text(text, pb.NetParameter), pb.TRAIN)
    with pytest.raises(ShapeError, match=r"layer 'twice'.* would need 536,870,912 bytes"):
        net.backward()
    assert net.blobs["data"]._diff is None  # refused before anything was allocated


def test_out_of_memory_inside_a_backward_names_the_layer():
    text = (
        'force_backward: true layer { name: "data" type: "Input" top: "data" '
        "input_param { shape { dim: 2 dim: 3 } } }"
        'layer { name: "twice" type: "Power" bottom: "data" top: "twice" }'
    )
    net = Net(parse_text(text, pb.NetParameter), pb.TRAIN)
    net.forward()

    def workspace_too_big(*args):
        raise MemoryError  # what numpy raises for a layer's own buffer

    net.layers[1].backward = workspace_too_big
    with pytest.raises(ShapeError, match=r"layer 'twice' \(Power\): out of memory"):
        net.backward()


def test_input_dims_near_2_31_are_a_shape_error_before_allocation():
    text = (
        'layer { name: "data" type: "Input" top: "data" '
        "input_param { shape { dim: 2147483647 dim: 2147483647 } } }"
    )
    with pytest.raises(ShapeError, match="layer 'data' .*would need 18,446,744,") as info:
        Net(parse_text(text, pb.NetParameter), pb.TEST)
    assert "MiB" in str(info.value) or "TiB" in str(info.value)


def test_solver_state_json_fields_round_trip(tmp_path):
    # the checks accept what netforge writes
    solver = make_solver(tmp_path, "SGD")
    solver.step(2)
    path = solver.snapshot()
    resumed = make_solver(tmp_path, "SGD")
    resumed.restore(path)
    assert resumed.iter == 2
    assert json.loads(pb.SolverState.FromString(path.read_bytes()).rng_state)


# -- training that goes wrong ----------------------------------------------------------------
REPO = Path(__file__).resolve().parent.parent
TINY = """
layer {{ name: "data" type: "HDF5Data" top: "data" top: "label"
        hdf5_data_param {{ source: "{source}" batch_size: 32 }} }}
layer {{ name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
        inner_product_param {{ num_output: 10 weight_filler {{ type: "gaussian" std: 0.01 }} }} }}
layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }}
"""


@pytest.mark.parametrize("base_lr, warns", [(1e6, True), (1e-2, False)])
def test_loss_at_chance_or_climbing_is_warned_about(tmp_path, caplog, base_lr, warns):
    # the repository's digits (CC BY 4.0) through one InnerProduct: Adam at 1e6 stays far
    # above the first loss, as LeNet does in the issue; at 1e-2 it learns
    (tmp_path / "list.txt").write_text(f"{REPO / 'models/digits/data/train.h5'}\n")
    param = parse_text(
        'type: "Adam" momentum: 0.9 momentum2: 0.999 delta: 1e-8 lr_policy: "fixed" '
        f"base_lr: {base_lr} max_iter: 100 display: 0 snapshot: 0 random_seed: 1",
        pb.SolverParameter,
    )
    net = TINY.format(source=tmp_path / "list.txt")
    param.net_param.CopyFrom(parse_text(net, pb.NetParameter))
    solver = get_solver(param, allow_nonfinite=True)
    with caplog.at_level(logging.WARNING, logger="netforge"):
        solver.step(100)
    warned = "the net is not learning; lower base_lr" in caplog.text
    assert warned == warns, caplog.text


def test_loss_watch_names_chance_for_a_softmax_over_c_classes(tmp_path, caplog):
    from netforge.solvers.guard import LossWatch

    (tmp_path / "list.txt").write_text(f"{REPO / 'models/digits/data/train.h5'}\n")
    net = Net(parse_text(TINY.format(source=tmp_path / "list.txt"), pb.NetParameter), pb.TRAIN)
    watch = LossWatch(net, max_iter=100)
    assert watch.window == 20 and watch.chance == pytest.approx(np.log(10))
    losses = np.log(10) + np.random.default_rng(0).uniform(-0.1, 0.05, 200)
    losses[0] = 2.5  # it fell from its first value, to chance, and stayed there
    with caplog.at_level(logging.WARNING, logger="netforge"):
        for i, loss in enumerate(losses):
            watch.add(i, float(loss))
    assert "stayed at chance level (ln 10 = 2.303) for the last 60 iterations" in caplog.text
    assert caplog.text.count("not learning") == 1


B = 2**31 - 1
IN = (
    'layer { name: "in" type: "Input" top: "x" '
    "input_param { shape { dim: 2 dim: 3 dim: 8 dim: 8 } } } "
)
SEQ = (
    'layer { name: "in" type: "Input" top: "x" top: "c" '
    "input_param { shape { dim: 2 dim: 1 dim: 3 } shape { dim: 2 dim: 1 } } } "
)
SIZES = {
    "conv kernel": IN + f'layer {{ name: "L" type: "Convolution" bottom: "x" top: "y" '
    f"convolution_param {{ num_output: 2 kernel_size: {B} }} }}",
    "conv pad": IN + f'layer {{ name: "L" type: "Convolution" bottom: "x" top: "y" '
    f"convolution_param {{ num_output: 2 kernel_size: 3 pad: {B} }} }}",
    "conv num_output": IN + f'layer {{ name: "L" type: "Convolution" bottom: "x" top: "y" '
    f"convolution_param {{ num_output: {B} kernel_size: 3 }} }}",
    "deconv stride": IN + f'layer {{ name: "L" type: "Deconvolution" bottom: "x" top: "y" '
    f"convolution_param {{ num_output: 2 kernel_size: 3 stride: {B} }} }}",
    "pool pad": IN + f'layer {{ name: "L" type: "Pooling" bottom: "x" top: "y" '
    f"pooling_param {{ kernel_size: {B} pad: {B - 1} }} }}",
    "spp height": IN + f'layer {{ name: "L" type: "SPP" bottom: "x" top: "y" '
    f"spp_param {{ pyramid_height: {B} }} }}",
    "lrn size": IN + f'layer {{ name: "L" type: "LRN" bottom: "x" top: "y" '
    f"lrn_param {{ local_size: {B} }} }}",
    "ip num_output": IN + f'layer {{ name: "L" type: "InnerProduct" bottom: "x" top: "y" '
    f"inner_product_param {{ num_output: {B} }} }}",
    "embed input_dim": IN + f'layer {{ name: "L" type: "Embed" bottom: "x" top: "y" '
    f"embed_param {{ num_output: 4 input_dim: {B} }} }}",
    "tile": IN
    + f'layer {{ name: "L" type: "Tile" bottom: "x" top: "y" tile_param {{ tiles: {B} }} }}',
    "upsample": IN + f'layer {{ name: "L" type: "Upsample" bottom: "x" top: "y" '
    f"upsample_param {{ scale: {B} }} }}",
    "im2col pad": IN + f'layer {{ name: "L" type: "Im2col" bottom: "x" top: "y" '
    f"convolution_param {{ kernel_size: 3 pad: {B} }} }}",
    "rnn num_output": SEQ + f'layer {{ name: "L" type: "RNN" bottom: "x" bottom: "c" top: "y" '
    f"recurrent_param {{ num_output: {B} }} }}",
    "dummy dims": f'layer {{ name: "L" type: "DummyData" top: "y" '
    f"dummy_data_param {{ shape {{ dim: {B} dim: {B} }} }} }}",
    "hdf5 batch_size": f'layer {{ name: "L" type: "HDF5Data" top: "data" top: "label" '
    f'hdf5_data_param {{ source: "list.txt" batch_size: {B} }} }}',
    "image batch_size": f'layer {{ name: "L" type: "ImageData" top: "data" top: "label" '
    f'image_data_param {{ source: "images.txt" batch_size: {B} }} }}',
    "image new size": f'layer {{ name: "L" type: "ImageData" top: "data" top: "label" '
    f'image_data_param {{ source: "images.txt" batch_size: 1 new_height: {B} new_width: {B} }} }}',
    "memory data": f'layer {{ name: "L" type: "MemoryData" top: "data" top: "label" '
    f"memory_data_param {{ batch_size: {B} channels: {B} height: 2 width: 2 }} }}",
}


@pytest.mark.parametrize("case", sorted(SIZES))
def test_sizes_near_2_31_are_one_error_naming_the_layer(tmp_path, monkeypatch, case):
    monkeypatch.chdir(tmp_path)
    with h5py.File("d.h5", "w") as f:
        f["data"], f["label"] = np.zeros((4, 6), np.float32), np.zeros(4, np.float32)
    Path("list.txt").write_text("d.h5\n")
    from PIL import Image

    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save("a.png")
    Path("images.txt").write_text("a.png 0\n")
    start = time.perf_counter()
    # The address-space cap keeps a missed check from exhausting the machine: it then fails
    # here as a MemoryError instead of raising a NetforgeError.
    with bounded_memory(), pytest.raises((ShapeError, ConfigError, DataError), match="'L'"):
        Net(parse_text(SIZES[case], pb.NetParameter), pb.TRAIN).forward()
    assert time.perf_counter() - start < 5


@pytest.mark.gpu
def test_a_gpu_blob_is_checked_against_the_devices_memory():
    from netforge import backend as nb
    from netforge.blob import Blob

    with pytest.raises(ShapeError, match=r"blob 'huge' .*4\.0 TiB.*of GPU 0 memory available"):
        Blob((1 << 20, 1 << 20), np.float32, nb.gpu(0), name="huge")


def test_hdf5_data_is_not_loaded_whole_beyond_half_the_available_memory(tmp_path, monkeypatch):
    from netforge.data import hdf5 as nh

    path = tmp_path / "big.h5"
    with h5py.File(path, "w") as f:
        # declared 4 MiB, written nowhere: the file stays small, a load would not
        f.create_dataset("data", shape=(1 << 20,), dtype=np.float32, chunks=(1024,))
    assert path.stat().st_size < 1 << 16
    monkeypatch.setattr(nh, "available_bytes", lambda: 4 << 20)
    rows = nh._Rows(str(path), ["data"], nh.MEMORY_LIMIT)
    assert isinstance(rows.sets[0], h5py.Dataset)  # read in slices
    np.testing.assert_array_equal(rows.take(np.array([5, 6]))[0], [0, 0])
    monkeypatch.setattr(nh, "available_bytes", lambda: 64 << 20)
    assert isinstance(nh._Rows(str(path), ["data"], nh.MEMORY_LIMIT).sets[0], np.ndarray)


def test_a_window_file_cut_short_is_a_data_error(tmp_path):
    from netforge.data.window import read_window_file

    path = tmp_path / "windows.txt"
    path.write_text("# 0\nimg/a.jpg\n3\n32\n48\n1\n1 0.8 0 0")  # the box lacks two numbers
    with pytest.raises(DataError, match=f"window file {path} is malformed: .*cut short"):
        read_window_file(str(path), "", 0.5, 0.3)


@pytest.mark.parametrize("filler", ["xavier", "msra"])
def test_fan_fillers_on_an_empty_blob_fill_nothing(filler):
    from netforge.filler import fill

    param = pb.FillerParameter(type=filler)
    assert fill(param, (0, 6), np.random.default_rng(0)).shape == (0, 6)


def test_names_too_long_for_the_file_system_are_one_error(tmp_path, capsys):
    from netforge.cli.main import main

    long = str(tmp_path / ("a" * 300))  # ENAMETOOLONG: pathlib's probes raise OSError
    for args in (
        ["compute-mean", long, str(tmp_path / "m.binaryproto")],
        ["test", "--model", str(REPO / "models/digits/deploy.prototxt"), "--weights", long],
        ["convert", "imageset", str(tmp_path), long, str(tmp_path / "db")],
        ["zoo", "info", long],
    ):
        assert main(args) in (DataError.exit_code, ConfigError.exit_code), args
        err = capsys.readouterr().err
        assert "Traceback" not in err and err.count("netforge: error:") == 1
    with pytest.raises(DataError, match="no such solver state file"):
        make_solver(tmp_path, "SGD").restore(long + ".solverstate")


INFOGAIN = """
layer {{ name: "d" type: "Input" top: "x" top: "l"
        input_param {{ shape {{ dim: 2 dim: 3 }} shape {{ dim: 2 }} }} }}
layer {{ name: "ig" type: "InfogainLoss" bottom: "x" bottom: "l" top: "loss"
        infogain_loss_param {{ source: "{}" }} }}
"""


@pytest.mark.parametrize(
    "read",
    [
        read_mean,
        get_solver,
        lambda path: Net(path, pb.TEST),
        read_list,
        read_file_list,
        lambda path: read_window_file(path, "", 0.5, 0.3),
        read_image,
        lambda path: Net(parse_text(INFOGAIN.format(path), pb.NetParameter), pb.TEST),
    ],
    ids=["mean", "solver", "net", "image list", "hdf5 list", "window file", "image", "infogain"],
)
def test_a_path_naming_an_endless_device_is_a_data_error(monkeypatch, read):
    # /dev/zero in a prototxt's mean_file or source, or a solverstate's learned_net, never
    # ends: it is read only up to half the available memory (8 MiB here: 4 MiB).
    monkeypatch.setattr(netforge.reading, "available_bytes", lambda: 8 << 20)
    with pytest.raises(DataError, match=r"/dev/zero: not a regular file, and more than 4,194,304"):
        read("/dev/zero")
