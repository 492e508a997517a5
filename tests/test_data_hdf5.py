"""HDF5Data, HDF5Output and MemoryData: Caffe's order, shuffling, chunked reads, resuming."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from netforge.backend import to_numpy
from netforge.data import hdf5 as nf_hdf5
from netforge.errors import ConfigError, DataError
from tests.conftest import FIXTURES, shared_path
from tests.harness import assert_state_repeats_batch, build


def hdf5_layer(source, batch, tops=("data", "label"), shuffle=False, seed=1, extra=""):
    text = (
        'type: "HDF5Data" '
        + " ".join(f'top: "{t}"' for t in tops)
        + f' hdf5_data_param {{ source: "{source}" batch_size: {batch} '
        + f"shuffle: {'true' if shuffle else 'false'} }} {extra}"
    )
    layer, bottom, top = build(text, [], num_tops=len(tops), dtype=np.float32, seed=seed)
    return layer, top


def batches(layer, top, count):
    out = []
    for _ in range(count):
        layer.forward([], top)
        out.append([t.data.copy() for t in top])
    return out


def write_files(tmp_path, rows_per_file, feature=(3,)):
    """Files whose data row r of file f holds 1000 f + r, and label = the same number."""
    paths = []
    for f, rows in enumerate(rows_per_file):
        ids = 1000.0 * f + np.arange(rows)
        data = np.broadcast_to(ids.reshape(-1, *[1] * len(feature)), (rows, *feature))
        path = tmp_path / f"part{f}.h5"
        with h5py.File(path, "w") as out:
            out["data"] = data.astype(np.float32)
            out["label"] = ids.astype(np.int32)
        paths.append(str(path))
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(paths) + "\n")
    return str(listing)


@pytest.mark.parametrize("where", ["shared", "fixtures"])
def test_caffe_sample_files_read_in_order_and_wrap(tmp_path, where):
    if where == "shared":
        first = shared_path("caffe-data", "test_data", "sample_data.h5")
        second = shared_path("caffe-data", "test_data", "sample_data_2_gzip.h5")
    else:
        first = FIXTURES / "data" / "sample_data.h5"
        second = FIXTURES / "data" / "sample_data_2_gzip.h5"
    listing = tmp_path / "list.txt"
    listing.write_text(f"{first}\n{second}\n")
    layer, top = hdf5_layer(listing, 5, tops=("data", "label", "label2"))
    assert [t.shape for t in top] == [(5, 8, 6, 5), (5, 1), (5, 1)]
    expected = {}
    for path in (first, second):
        with h5py.File(path) as f:
            for name in ("data", "label", "label2"):
                expected.setdefault(name, []).append(f[name][()].astype(np.float64))
    full = {k: np.concatenate(v) for k, v in expected.items()}
    got = batches(layer, top, 5)
    for i, batch in enumerate(got[:4]):
        rows = slice(5 * i, 5 * i + 5)
        for array, name in zip(batch, ("data", "label", "label2")):
            np.testing.assert_array_equal(array, full[name][rows])
    # Caffe's fixture: file 2 data continues the count; labels restart at 1.
    assert got[2][0].ravel()[0] == 2400 and got[2][1].ravel()[0] == 1
    np.testing.assert_array_equal(got[4][0], got[0][0])  # wrapped to the first file


def test_batches_span_files_and_wrap(tmp_path):
    listing = write_files(tmp_path, [5, 3])
    layer, top = hdf5_layer(listing, 3)
    labels = [b[1] for b in batches(layer, top, 4)]
    order = [0, 1, 2, 3, 4, 1000, 1001, 1002, 0, 1, 2, 3]
    np.testing.assert_array_equal(np.concatenate(labels), order)
    assert top[0].shape == (3, 3)


def test_shuffle_permutes_files_and_rows_without_mixing(tmp_path):
    listing = write_files(tmp_path, [4, 4, 4])
    layer, top = hdf5_layer(listing, 4, shuffle=True)
    got = batches(layer, top, 9)
    passes = [sorted(int(b[1][0]) // 1000 for b in got[k : k + 3]) for k in (0, 3, 6)]
    assert passes == [[0, 1, 2]] * 3  # each pass visits every file once
    for batch in got:
        ids = batch[1].astype(int)
        assert len(set(ids // 1000)) == 1  # a batch comes from one file
        assert sorted(ids % 1000) == [0, 1, 2, 3]
        np.testing.assert_array_equal(batch[0][:, 0], ids)  # rows stay aligned across tops
    orders = [tuple(b[1].astype(int)) for b in got]
    assert len(set(orders)) > 3  # rows are really shuffled, differently per load


def test_chunked_reading_matches_loading_whole_files(tmp_path, monkeypatch):
    listing = write_files(tmp_path, [7, 5])
    whole_layer, whole_top = hdf5_layer(listing, 4, shuffle=True, seed=3)
    whole = batches(whole_layer, whole_top, 6)
    monkeypatch.setattr(nf_hdf5, "MEMORY_LIMIT", 0)
    sliced_layer, sliced_top = hdf5_layer(listing, 4, shuffle=True, seed=3)
    assert not isinstance(sliced_layer.source.current.sets[0], np.ndarray)
    for a, b in zip(whole, batches(sliced_layer, sliced_top, 6)):
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])


@pytest.mark.parametrize("shuffle", [False, True])
def test_state_resumes_the_exact_batch_sequence(tmp_path, shuffle):
    listing = write_files(tmp_path, [5, 6, 4])
    layer, top = hdf5_layer(listing, 4, shuffle=shuffle, seed=5)
    batches(layer, top, 3)
    state = layer.get_state()
    expected = batches(layer, top, 8)
    other, other_top = hdf5_layer(listing, 4, shuffle=shuffle, seed=99)
    other.set_state(state)
    for a, b in zip(expected, batches(other, other_top, 8)):
        np.testing.assert_array_equal(a[1], b[1])
    assert other.wait_seconds >= 0


def test_errors_name_the_file_and_dataset(tmp_path):
    listing = write_files(tmp_path, [4])
    with pytest.raises(DataError, match="no dataset 'target'"):
        hdf5_layer(listing, 2, tops=("data", "target"))
    with pytest.raises(DataError, match="cannot read HDF5 list file"):
        hdf5_layer(tmp_path / "missing.txt", 2)
    bad = tmp_path / "bad.txt"
    bad.write_text(str(tmp_path / "nothing.h5"))
    with pytest.raises(DataError, match="cannot open HDF5 file"):
        hdf5_layer(bad, 2)
    with pytest.raises(ConfigError, match="does not transform"):
        hdf5_layer(listing, 2, extra="transform_param { scale: 2 }")


def test_shape_change_between_files_is_an_error(tmp_path):
    listing = write_files(tmp_path, [2])
    with h5py.File(tmp_path / "wide.h5", "w") as out:
        out["data"] = np.zeros((2, 4), np.float32)
        out["label"] = np.zeros(2, np.float32)
    (tmp_path / "list.txt").write_text(f"{tmp_path / 'part0.h5'}\n{tmp_path / 'wide.h5'}\n")
    layer, top = hdf5_layer(listing, 2)
    layer.forward([], top)
    with pytest.raises(DataError, match="wide.h5"):
        layer.forward([], top)


def test_hdf5_output_appends_every_batch(tmp_path):
    path = tmp_path / "out.h5"
    data = np.arange(12.0).reshape(2, 3, 2)
    labels = np.array([1.0, 2.0])
    layer, bottom, top = build(
        f'type: "HDF5Output" hdf5_output_param {{ file_name: "{path}" }}',
        [data, labels],
        num_tops=0,
    )
    layer.forward(bottom, top)
    bottom[0].data = bottom[0].data + 100
    layer.forward(bottom, top)
    with h5py.File(path) as f:
        np.testing.assert_array_equal(f["data"][()], np.concatenate([data, data + 100]))
        np.testing.assert_array_equal(f["label"][()], np.concatenate([labels, labels]))


def test_memory_data_serves_slices_cyclically(backend):
    """On a GPU this also runs the pinned, stream-ordered batch upload."""
    layer, _, top = build(
        'type: "MemoryData" memory_data_param { batch_size: 2 channels: 1 height: 2 width: 3 }',
        [],
        num_tops=2,
        backend=backend,
    )
    data = np.arange(36.0).reshape(6, 1, 2, 3)
    labels = np.array([5, 6, 7, 8, 9, 10])
    with pytest.raises(DataError, match="set_input_arrays"):
        layer.forward([], top)
    layer.set_input_arrays(data, labels)
    seen = []
    for _ in range(4):
        layer.forward([], top)
        seen.append((np.array(to_numpy(top[0].data)), np.array(to_numpy(top[1].data))))
    for i, (d, lab) in enumerate(seen):
        rows = slice(2 * (i % 3), 2 * (i % 3) + 2)
        np.testing.assert_array_equal(d, data[rows])
        np.testing.assert_array_equal(lab, labels[rows])
    assert_state_repeats_batch(layer, top)
    with pytest.raises(Exception, match="multiple of batch_size"):
        layer.reset(data[:5], labels[:5])
