"""Datum records, LMDB, the Data and ImageData layers, converters and compute-mean."""

from __future__ import annotations

import io

import lmdb
import numpy as np
import pytest
from PIL import Image

from netforge.cli.main import main as cli_main
from netforge.data import convert as conv
from netforge.data import db as nfdb
from netforge.data.datum import make_datum
from netforge.errors import DataError
from netforge.proto import pb
from netforge.weights import read_mean
from tests.harness import assert_state_repeats_batch, build


def varint(n: int) -> bytes:
    out = b""
    while True:
        byte, n = n & 0x7F, n >> 7
        out += bytes([byte | (0x80 if n else 0)])
        if not n:
            return out


def caffe_raw_datum(pixels: bytes, c: int, h: int, w: int, label: int) -> bytes:
    """CVMatToDatum + set_label, serialized: fields 1,2,3,4,5 and encoded=false (7)."""
    return (
        b"\x08"
        + varint(c)
        + b"\x10"
        + varint(h)
        + b"\x18"
        + varint(w)
        + b"\x22"
        + varint(len(pixels))
        + pixels
        + b"\x28"
        + varint(label)
        + b"\x38\x00"
    )


def caffe_encoded_datum(data: bytes, label: int) -> bytes:
    """ReadFileToDatum: data (4), label (5), encoded=true (7)."""
    return b"\x22" + varint(len(data)) + data + b"\x28" + varint(label) + b"\x38\x01"


def png_bytes(rgb: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(rgb).save(out, format="PNG")
    return out.getvalue()


def write_lmdb(path, records):
    env = lmdb.open(str(path), map_size=1 << 24)
    with env.begin(write=True) as txn:
        for key, value in records:
            txn.put(key.encode(), value)
    env.close()


def data_layer(source, batch, *, phase=pb.TRAIN, seed=1, transform="", tops=2, backend="LMDB"):
    text = (
        f'type: "Data" data_param {{ source: "{source}" batch_size: {batch} backend: {backend} }}'
        + (f" transform_param {{ {transform} }}" if transform else "")
    )
    layer, _, top = build(text, [], num_tops=tops, phase=phase, dtype=np.float32, seed=seed)
    return layer, top


def forward(layer, top, count=1):
    out = []
    for _ in range(count):
        layer.forward([], top)
        out.append([t.data.copy() for t in top])
    return out


def test_make_datum_bytes_equal_caffes():
    pixels = np.arange(12, dtype=np.uint8).reshape(3, 2, 2)
    assert make_datum(pixels, 7).SerializeToString() == caffe_raw_datum(
        pixels.tobytes(), 3, 2, 2, 7
    )
    assert make_datum(b"\xff\xd8jpeg", 300).SerializeToString() == caffe_encoded_datum(
        b"\xff\xd8jpeg", 300
    )


def test_caffe_built_records_read_through_the_data_layer(tmp_path):
    rng = np.random.default_rng(0)
    bgr = [rng.integers(0, 256, (3, 4, 5), dtype=np.uint8) for _ in range(3)]
    records = [
        ("00000000_a.png", caffe_raw_datum(bgr[0].tobytes(), 3, 4, 5, 4)),
        # an encoded PNG: Pillow's RGB file must come back as the BGR planes
        ("00000001_b.png", caffe_encoded_datum(png_bytes(bgr[1][::-1].transpose(1, 2, 0)), 2)),
        ("00000002_c.png", caffe_raw_datum(bgr[2].tobytes(), 3, 4, 5, 9)),
    ]
    write_lmdb(tmp_path / "db", records)
    layer, top = data_layer(tmp_path / "db", 2)
    assert top[0].shape == (2, 3, 4, 5) and top[1].shape == (2,)
    (d1, l1), (d2, l2) = forward(layer, top, 2)
    np.testing.assert_array_equal(d1, np.stack(bgr[:2]))
    np.testing.assert_array_equal(l1, [4, 2])
    np.testing.assert_array_equal(d2, np.stack([bgr[2], bgr[0]]))  # wraps in key order
    np.testing.assert_array_equal(l2, [9, 4])


def test_targets_give_a_2d_label_top(tmp_path):
    images = np.arange(2 * 1 * 2 * 2, dtype=np.uint8).reshape(2, 1, 2, 2)
    records = [
        (f"{i:08d}", make_datum(images[i], 0, [i, 0.5, -1]).SerializeToString()) for i in range(2)
    ]
    write_lmdb(tmp_path / "db", records)
    layer, top = data_layer(tmp_path / "db", 2, transform="scale: 0.5")
    ((data, labels),) = forward(layer, top)
    assert top[1].shape == (2, 3)
    np.testing.assert_allclose(labels, [[0, 0.5, -1], [1, 0.5, -1]])
    np.testing.assert_allclose(data, images * 0.5)


def test_float_data_records(tmp_path):
    values = np.linspace(-1, 1, 8, dtype=np.float32).reshape(2, 2, 2)
    write_lmdb(tmp_path / "db", [("k", make_datum(values, 3).SerializeToString())])
    layer, top = data_layer(tmp_path / "db", 1, tops=1)
    np.testing.assert_allclose(forward(layer, top)[0][0][0], values)


def test_corrupt_records_and_shape_changes_name_the_key(tmp_path):
    good = make_datum(np.zeros((1, 2, 2), np.uint8), 1).SerializeToString()
    write_lmdb(tmp_path / "a", [("00000000_x", good), ("00000001_bad", b"\xff\xff\xff")])
    layer, top = data_layer(tmp_path / "a", 2)
    with pytest.raises(DataError, match="key '00000001_bad'"):
        layer.forward([], top)
    truncated = make_datum(np.zeros((1, 2, 2), np.uint8)).SerializeToString()[:-6]
    write_lmdb(tmp_path / "b", [("0", good), ("1", truncated)])
    layer, top = data_layer(tmp_path / "b", 2)
    with pytest.raises(DataError, match="key '1'"):
        layer.forward([], top)
    junk_image = make_datum(b"not an image", 1).SerializeToString()
    write_lmdb(tmp_path / "c", [("0", good), ("1", junk_image)])
    layer, top = data_layer(tmp_path / "c", 2)
    with pytest.raises(DataError, match="key '1'.*cannot decode"):
        layer.forward([], top)
    bigger = make_datum(np.zeros((1, 3, 3), np.uint8), 1).SerializeToString()
    write_lmdb(tmp_path / "d", [("0", good), ("1", bigger)])
    layer, top = data_layer(tmp_path / "d", 2)
    with pytest.raises(DataError, match="record '1' has shape"):
        layer.forward([], top)


def test_unopenable_database_and_leveldb_without_plyvel(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="cannot open LMDB database .*missing"):
        data_layer(tmp_path / "missing", 2)
    real = nfdb.importlib.util.find_spec
    monkeypatch.setattr(
        nfdb.importlib.util, "find_spec", lambda name: None if name == "plyvel" else real(name)
    )
    with pytest.raises(DataError, match="LevelDB needs the plyvel package.*convert"):
        data_layer(tmp_path / "missing", 2, backend="LEVELDB")


def test_leveldb_backend(tmp_path):
    pytest.importorskip("plyvel")
    rgbs = make_images(tmp_path, count=3)
    conv.convert_imageset(tmp_path, tmp_path / "list.txt", tmp_path / "db", backend="leveldb")
    layer, top = data_layer(tmp_path / "db", 2, backend="LEVELDB")
    (d1, l1), (d2, l2) = forward(layer, top, 2)
    np.testing.assert_array_equal(d1, np.stack([bgr(r) for r in rgbs[:2]]))
    np.testing.assert_array_equal(d2, np.stack([bgr(rgbs[2]), bgr(rgbs[0])]))
    np.testing.assert_array_equal(np.concatenate([l1, l2]), [0, 1, 2, 0])
    assert_state_repeats_batch(layer, top)
    mean, count = conv.compute_mean(tmp_path / "db", "leveldb")
    assert count == 3
    np.testing.assert_allclose(mean, np.mean([bgr(r) for r in rgbs], axis=0, dtype=np.float64))
    with pytest.raises(DataError, match="cannot open LevelDB"):
        data_layer(tmp_path / "missing", 2, backend="LEVELDB")


def make_images(root, count=7, size=(6, 8)):
    rng = np.random.default_rng(11)
    lines, rgbs = [], []
    for i in range(count):
        rgb = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
        Image.fromarray(rgb).save(root / f"img {i}.png")
        lines.append(f"img {i}.png {i % 3}")
        rgbs.append(rgb)
    (root / "list.txt").write_text("\n".join(lines) + "\n")
    return rgbs


def bgr(rgb):
    return rgb[:, :, ::-1].transpose(2, 0, 1)


def test_convert_imageset_writes_caffes_keys_and_records(tmp_path):
    rgbs = make_images(tmp_path)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG broken")
    with open(tmp_path / "list.txt", "a") as f:
        f.write("broken.png 1\nmissing.png 2\n")
    summary = conv.convert_imageset(tmp_path, tmp_path / "list.txt", tmp_path / "db")
    assert summary.written == 7 and [p for p, _ in summary.skipped] == ["broken.png", "missing.png"]
    env = lmdb.open(str(tmp_path / "db"), readonly=True)
    with env.begin() as txn:
        items = list(txn.cursor())
    env.close()
    assert [k.decode() for k, _ in items] == [f"{i:08d}_img {i}.png" for i in range(7)]
    assert items[3][1] == caffe_raw_datum(bgr(rgbs[3]).tobytes(), 3, 6, 8, 0)


def test_convert_encoded_keeps_file_bytes_and_reads_back(tmp_path):
    rgbs = make_images(tmp_path, count=3)
    conv.convert_imageset(tmp_path, tmp_path / "list.txt", tmp_path / "db", encoded=True)
    env = lmdb.open(str(tmp_path / "db"), readonly=True)
    with env.begin() as txn:
        value = txn.get(b"00000001_img 1.png")
    env.close()
    raw = (tmp_path / "img 1.png").read_bytes()
    assert value == caffe_encoded_datum(raw, 1)
    layer, top = data_layer(tmp_path / "db", 3, phase=pb.TEST)
    ((data, labels),) = forward(layer, top)
    np.testing.assert_array_equal(data, np.stack([bgr(r) for r in rgbs]))
    layer, top = data_layer(tmp_path / "db", 3, transform="force_gray: true")
    assert top[0].shape == (3, 1, 6, 8)


def test_convert_resize_gray_and_check_size(tmp_path):
    make_images(tmp_path, count=2)
    Image.fromarray(np.zeros((3, 3, 3), np.uint8)).save(tmp_path / "small.png")
    with open(tmp_path / "list.txt", "a") as f:
        f.write("small.png 0\n")
    conv.convert_imageset(
        tmp_path,
        tmp_path / "list.txt",
        tmp_path / "db",
        gray=True,
        resize_height=4,
        resize_width=5,
        check_size=True,
    )
    layer, top = data_layer(tmp_path / "db", 3, tops=1)
    assert top[0].shape == (3, 1, 4, 5)
    with pytest.raises(DataError, match="check-size"):
        conv.convert_imageset(tmp_path, tmp_path / "list.txt", tmp_path / "db2", check_size=True)


def test_interrupted_conversion_leaves_the_committed_records(tmp_path, monkeypatch):
    make_images(tmp_path, count=7)
    monkeypatch.setattr(conv, "COMMIT_EVERY", 3)
    monkeypatch.setattr(conv, "CHUNK", 1)
    calls = []

    def interrupt(n):
        calls.append(n)
        if len(calls) == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        conv.convert_imageset(tmp_path, tmp_path / "list.txt", tmp_path / "db", progress=interrupt)
    # nothing under the final name (issue 19); the first commit survived in the staging
    # database, the half-done batch did not
    assert not (tmp_path / "db").exists()
    staged = lmdb.open(str(nfdb.staging_path(tmp_path / "db")), readonly=True, lock=False)
    with staged.begin() as txn:
        assert [k for k, _ in txn.cursor()] == [f"{i:08d}_img {i}.png".encode() for i in range(3)]
    staged.close()


def test_lmdb_map_grows_when_full(tmp_path, monkeypatch):
    monkeypatch.setattr(nfdb, "INITIAL_MAP_SIZE", 1 << 15)
    with nfdb.Writer(tmp_path / "db", batch=50) as writer:
        for i in range(200):
            writer.put(f"{i:08d}", bytes(1000))
    reader = nfdb.Reader(tmp_path / "db")
    assert reader.size == 200
    with pytest.raises(DataError, match="already exists"):
        nfdb.Writer(tmp_path / "db")


def test_missing_list_and_root_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="root folder"):
        conv.convert_imageset(tmp_path / "nope", tmp_path / "list.txt", tmp_path / "db")
    with pytest.raises(DataError, match="cannot read list file"):
        conv.convert_imageset(tmp_path, tmp_path / "list.txt", tmp_path / "db")


def test_compute_mean_cli(tmp_path, capsys):
    rgbs = make_images(tmp_path, count=4)
    assert (
        cli_main(
            ["convert", "imageset", str(tmp_path), str(tmp_path / "list.txt"), str(tmp_path / "db")]
        )
        == 0
    )
    assert cli_main(["compute-mean", str(tmp_path / "db"), str(tmp_path / "mean.bp")]) == 0
    expected = np.mean([bgr(r).astype(np.float64) for r in rgbs], axis=0)
    np.testing.assert_allclose(read_mean(tmp_path / "mean.bp"), expected, rtol=1e-6)
    out = capsys.readouterr().out
    assert f"mean_value channel [0]: {expected[0].mean():g}" in out
    assert "wrote 4 records" in out
    assert cli_main(["compute-mean", str(tmp_path / "nodb")]) == 4


def image_layer(tmp_path, batch, extra="", seed=1, phase=pb.TRAIN, transform=""):
    text = (
        f'type: "ImageData" image_data_param {{ source: "{tmp_path / "list.txt"}" '
        f'root_folder: "{tmp_path}/" batch_size: {batch} {extra} }}'
        + (f" transform_param {{ {transform} }}" if transform else "")
    )
    layer, _, top = build(text, [], num_tops=2, phase=phase, dtype=np.float32, seed=seed)
    return layer, top


def test_image_data_reads_the_list_in_order(tmp_path):
    rgbs = make_images(tmp_path, count=3)
    layer, top = image_layer(tmp_path, 2, transform="crop_size: 4", phase=pb.TEST)
    (d1, l1), (d2, l2) = forward(layer, top, 2)
    expected = [bgr(r)[:, 1:5, 2:6] for r in rgbs]
    np.testing.assert_array_equal(d1, np.stack(expected[:2]))
    np.testing.assert_array_equal(d2, np.stack([expected[2], expected[0]]))
    np.testing.assert_array_equal(np.concatenate([l1, l2]), [0, 1, 2, 0])


def test_image_data_resize_gray_and_targets(tmp_path):
    make_images(tmp_path, count=2)
    (tmp_path / "list.txt").write_text("img 0.png 0.5 1 0\nimg 1.png 1 0 2.5\n")
    layer, top = image_layer(tmp_path, 2, "new_height: 3 new_width: 4 is_color: false")
    ((data, labels),) = forward(layer, top)
    assert data.shape == (2, 1, 3, 4)
    np.testing.assert_allclose(labels, [[0.5, 1, 0], [1, 0, 2.5]])
    (tmp_path / "list.txt").write_text("img 0.png 1\nnothere.png 2\n")
    layer, top = image_layer(tmp_path, 2)
    with pytest.raises(DataError, match="nothere.png"):
        layer.forward([], top)


@pytest.mark.parametrize("kind", ["image", "lmdb"])
def test_shuffled_cropped_mirrored_runs_resume_exactly(tmp_path, kind):
    make_images(tmp_path, count=5)
    transform = "crop_size: 3 mirror: true"
    if kind == "image":

        def make(seed):
            return image_layer(tmp_path, 2, "shuffle: true", seed=seed, transform=transform)
    else:
        conv.convert_imageset(tmp_path, tmp_path / "list.txt", tmp_path / "db")

        def make(seed):
            return data_layer(tmp_path / "db", 2, seed=seed, transform=transform)

    first, top = make(4)
    again, again_top = make(4)
    run = forward(first, top, 9)
    for a, b in zip(run, forward(again, again_top, 9)):  # same seed, same batches
        np.testing.assert_array_equal(a[0], b[0])
    resumed, resumed_top = make(123)
    first2, top2 = make(4)
    forward(first2, top2, 4)
    resumed.set_state(first2.get_state())
    for a, b in zip(run[4:], forward(resumed, resumed_top, 5)):
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
    assert resumed.wait_seconds > 0


def test_convert_imageset_cli_takes_caffes_flag_spellings(tmp_path):
    from netforge.cli.main import main

    make_images(tmp_path, count=2)
    args = ["convert", "imageset", str(tmp_path) + "/", str(tmp_path / "list.txt")]
    assert main([*args, str(tmp_path / "a"), "--resize_height", "4", "--resize_width", "5",
                 "--gray", "--check_size"]) == 0  # fmt: skip
    assert main([*args, str(tmp_path / "b"), "--resize-height", "4", "--resize-width", "5",
                 "--gray", "--check-size"]) == 0  # fmt: skip
    for db in ("a", "b"):
        _, top = data_layer(tmp_path / db, 2, tops=1)
        assert top[0].shape == (2, 1, 4, 5)


def test_targets_after_a_first_record_without_them_are_refused(tmp_path):
    # issue 19: a record with targets was accepted silently when the first had none
    image = np.zeros((1, 2, 2), np.uint8)
    records = [
        ("00000000", make_datum(image, 3).SerializeToString()),
        ("00000001", make_datum(image, 0, [0.5, 1.0]).SerializeToString()),
    ]
    write_lmdb(tmp_path / "db", records)
    layer, top = data_layer(tmp_path / "db", 2)
    with pytest.raises(DataError, match="record '00000001' has 2 targets, the first record had 0"):
        layer.forward([], top)
