"""``netforge extract-features``: Caffe's records (Datum, legacy dims, float_data, %010d
keys) in LMDB, the HDF5 output, several blobs at once, and the error paths."""

from __future__ import annotations

from pathlib import Path

import h5py
import lmdb
import numpy as np
import pytest

from netforge.cli.main import main
from netforge.errors import ConfigError, DataError, ShapeError
from netforge.features import feature_datums, legacy_dims
from netforge.net import Net
from netforge.proto import pb

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "solver_data.h5"

NET = """name: "features"
layer {{ name: "data" type: "HDF5Data" top: "data" top: "targets"
        hdf5_data_param {{ source: "{source}" batch_size: 4 }} }}
layer {{ name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
        inner_product_param {{ num_output: 2 weight_filler {{ type: "gaussian" std: 0.1 }}
                               bias_filler {{ type: "gaussian" std: 1.0 }} }} }}
layer {{ name: "sum" type: "Reduction" bottom: "ip" top: "total" }}
"""


def _caffe_datum(row: np.ndarray, dims: tuple[int, int, int]) -> bytes:
    """The record Caffe's extract_features builds, through protobuf itself."""
    datum = pb.Datum()
    datum.channels, datum.height, datum.width = dims
    datum.float_data.extend(row.ravel().tolist())
    return datum.SerializeToString()


@pytest.mark.parametrize("shape", [(3, 2, 4, 5), (2, 7), (4, 3, 1), (1, 300, 2, 2)])
def test_feature_datums_are_caffes_bytes(shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(0)
    features = rng.standard_normal(shape).astype(np.float32)
    dims = legacy_dims(shape)
    assert dims == (*shape[1:], 1, 1, 1)[:3]
    assert feature_datums(features) == [_caffe_datum(row, dims) for row in features]


def test_five_axes_do_not_fit_a_datum() -> None:
    with pytest.raises(ShapeError, match="at most 4-D"):
        legacy_dims((1, 2, 3, 4, 5))


@pytest.fixture
def model(tmp_path: Path) -> tuple[Path, Path]:
    (tmp_path / "list.txt").write_text(f"{FIXTURE}\n")
    prototxt = tmp_path / "net.prototxt"
    prototxt.write_text(NET.format(source=tmp_path / "list.txt"))
    net = Net(str(prototxt), phase=pb.TEST, rng=np.random.default_rng(5))
    weights = tmp_path / "w.caffemodel"
    net.save(weights)
    return prototxt, weights


def _expected(weights: Path, batches: int) -> tuple[np.ndarray, np.ndarray]:
    """The data rows HDF5Data gives in order (wrapping the 8-row file) and the inner
    product of each in float64, from the saved weights."""
    with h5py.File(FIXTURE) as f:
        data = np.asarray(f["data"], np.float64)
    rows = data[np.arange(4 * batches) % len(data)]
    saved = pb.NetParameter()
    saved.ParseFromString(weights.read_bytes())
    (layer,) = [layer for layer in saved.layer if layer.name == "ip"]
    weight, bias = (np.asarray(blob.data, np.float64) for blob in layer.blobs)
    ip = rows.reshape(len(rows), -1) @ weight.reshape(2, -1).T + bias.reshape(-1)
    return rows, ip


def _records(path: Path) -> list[tuple[bytes, pb.Datum]]:
    env = lmdb.open(str(path), readonly=True, lock=False)
    with env.begin() as txn:
        out = []
        for key, value in txn.cursor():
            datum = pb.Datum()
            datum.ParseFromString(value)
            out.append((key, datum))
    env.close()
    return out


def test_extract_two_blobs_to_lmdb(
    model: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    prototxt, weights = model
    out_data, out_ip = tmp_path / "data_db", tmp_path / "ip_db"
    argv = ["extract-features", str(weights), str(prototxt), "data,ip"]
    argv += [f"{out_data},{out_ip}", "3", "lmdb"]
    assert main(argv) == 0
    rows, ip = _expected(weights, 3)
    data_records, ip_records = _records(out_data), _records(out_ip)
    assert [key for key, _ in data_records] == [f"{i:010d}".encode() for i in range(12)]
    for (_, datum), row in zip(data_records, rows):
        assert (datum.channels, datum.height, datum.width) == (3, 10, 10)
        assert not datum.HasField("label") and not datum.data
        np.testing.assert_allclose(datum.float_data, row.ravel(), rtol=1e-6)
    got = np.array([list(d.float_data) for _, d in ip_records])
    assert [(d.channels, d.height, d.width) for _, d in ip_records] == [(2, 1, 1)] * 12
    np.testing.assert_allclose(got, ip, rtol=1e-5, atol=1e-5)
    out = capsys.readouterr().out.splitlines()
    assert out == [
        f"data: 12 records of 3x10x10 floats to {out_data} (lmdb)",
        f"ip: 12 records of 2 floats to {out_ip} (lmdb)",
    ]


def test_extract_to_hdf5_caffe_positional_gpu_arguments_absent(
    model: tuple[Path, Path], tmp_path: Path
) -> None:
    prototxt, weights = model
    target = tmp_path / "ip.h5"
    argv = ["extract-features", str(weights), str(prototxt), "ip", str(target), "2", "hdf5"]
    assert main([*argv, "CPU"]) == 0
    _, ip = _expected(weights, 2)
    with h5py.File(target) as f:
        assert f["ip"].shape == (8, 2) and f["ip"].dtype == np.float32
        np.testing.assert_allclose(f["ip"][...], ip, rtol=1e-5, atol=1e-5)
    # a scalar blob is one record per batch (Caffe's num() of a 0-axis blob is 1)
    total = tmp_path / "total_db"
    argv_total = ["extract-features", str(weights), str(prototxt), "total", str(total), "2"]
    assert main(argv_total) == 0
    sums = [list(d.float_data) for _, d in _records(total)]
    np.testing.assert_allclose(sums, ip.reshape(2, -1).sum(axis=1, keepdims=True), rtol=1e-5)
    assert [(d.channels, d.height, d.width) for _, d in _records(total)] == [(1, 1, 1)] * 2
    # an existing output is never overwritten
    assert main([*argv, "CPU"]) == DataError.exit_code


def test_extract_to_leveldb_writes_the_lmdb_records(
    model: tuple[Path, Path], tmp_path: Path
) -> None:
    """Caffe's other backend holds the same keys and Datum bytes as the LMDB output."""
    plyvel = pytest.importorskip("plyvel")
    prototxt, weights = model
    argv = ["extract-features", str(weights), str(prototxt), "ip"]
    assert main([*argv, str(tmp_path / "ip_lmdb"), "2", "lmdb"]) == 0
    assert main([*argv, str(tmp_path / "ip_leveldb"), "2", "leveldb"]) == 0
    db = plyvel.DB(str(tmp_path / "ip_leveldb"))
    stored = list(db.iterator())
    db.close()
    expected = [(key, datum.SerializeToString()) for key, datum in _records(tmp_path / "ip_lmdb")]
    assert len(stored) == 8 and stored == expected


def test_extract_errors_are_one_line(
    model: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    prototxt, weights = model
    base = ["extract-features", str(weights), str(prototxt)]
    assert main([*base, "fc7", str(tmp_path / "x"), "1"]) == ConfigError.exit_code
    err = capsys.readouterr().err
    assert "unknown feature blob name 'fc7'" in err and "ip" in err
    assert not (tmp_path / "x").exists()
    assert main([*base, "data,ip", str(tmp_path / "y"), "1"]) == ConfigError.exit_code
    assert "give one output per blob" in capsys.readouterr().err
    assert main([*base, "ip", str(tmp_path / "z"), "0"]) == ConfigError.exit_code
    assert "must be positive" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["lmdb", "hdf5"])
def test_interrupted_extraction_leaves_no_output(model: tuple[Path, Path], tmp_path: Path, kind):
    """Outputs are written under <name>.incomplete and renamed when whole: an interrupted run
    leaves neither name, and a rerun replaces what a killed one left staged."""
    from netforge.features import extract_features

    prototxt, weights = model
    net = Net(str(prototxt), phase=pb.TEST)
    net.copy_from(str(weights))
    target = tmp_path / "ip_out"

    def interrupt(_: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        extract_features(net, ["ip"], [target], 3, kind, progress=interrupt)
    assert sorted(tmp_path.iterdir()) == sorted([prototxt, weights, tmp_path / "list.txt"])
    (tmp_path / "ip_out.incomplete").mkdir()  # as a kill -9 leaves it
    (tmp_path / "ip_out.incomplete" / "data.mdb").write_bytes(b"partial")
    (output,) = extract_features(net, ["ip"], [target], 2, kind)
    assert output.records == 8 and not (tmp_path / "ip_out.incomplete").exists()
    if kind == "lmdb":
        assert len(_records(target)) == 8
    else:
        with h5py.File(target) as f:
            assert f["ip"].shape == (8, 2)


def test_existing_or_repeated_outputs_are_refused_before_extracting(
    model: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    prototxt, weights = model
    base = ["extract-features", str(weights), str(prototxt)]
    (tmp_path / "taken").write_text("keep me")
    assert main([*base, "ip", str(tmp_path / "taken"), "1", "hdf5"]) == DataError.exit_code
    assert "taken already exists" in capsys.readouterr().err
    assert (tmp_path / "taken").read_text() == "keep me"
    twice = f"{tmp_path / 'same'},{tmp_path / 'same'}"
    assert main([*base, "data,ip", twice, "1"]) == ConfigError.exit_code
    assert "named twice" in capsys.readouterr().err
    assert not (tmp_path / "same").exists()


@pytest.mark.parametrize("kind", ["lmdb", "hdf5"])
def test_output_folder_is_made_or_refused_in_one_line(
    model: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture, kind: str
) -> None:
    prototxt, weights = model
    base = ["extract-features", str(weights), str(prototxt), "ip"]
    target = tmp_path / "features" / "run1" / "ip"
    assert main([*base, str(target), "1", kind]) == 0
    assert f"ip: 4 records of 2 floats to {target} ({kind})" in capsys.readouterr().out
    (tmp_path / "a_file").write_text("")
    assert main([*base, str(tmp_path / "a_file" / "ip"), "1", kind]) == DataError.exit_code
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == f"netforge: error: cannot create the folder {tmp_path / 'a_file'}: File exists"
