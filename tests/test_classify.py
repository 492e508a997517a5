"""classify: pycaffe's classify.py preprocessing against a float64 reference, the CLI with
explicit files and with a zoo model served over loopback, and the Python-layer guard."""

from __future__ import annotations

import hashlib
import http.server
import json
import threading

import numpy as np
import pytest
from PIL import Image

from netforge.cli.main import main
from netforge.zoo import classify as zc
from netforge.zoo import download as dl
from tests.test_pycaffe_io import reference_resize

DEPLOY = """
name: "tiny"
layer { name: "data" type: "Input" top: "data"
        input_param { shape { dim: 1 dim: 3 dim: 4 dim: 4 } } }
layer { name: "fc" type: "InnerProduct" bottom: "data" top: "fc"
        inner_product_param { num_output: 3 } }
layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }
"""


def test_mean_file_and_labels(tmp_path):
    mean = np.arange(3 * 2 * 2, dtype=np.float32).reshape(3, 2, 2)
    np.save(tmp_path / "mean.npy", mean)
    np.testing.assert_array_equal(zc.load_mean(tmp_path / "mean.npy"), mean)
    (tmp_path / "labels.txt").write_text("'n01 tench, Tinca'\nplain\n\n\"q\"\n")
    assert zc.read_labels(tmp_path / "labels.txt") == ["n01 tench, Tinca", "plain", "q"]


def test_top_predictions_orders_scores_and_names_them():
    scores = np.array([[0.1, 0.7, 0.2], [0.5, 0.25, 0.25]])
    got = zc.top_predictions(scores, ["a", "b", "c"], top_k=2)
    assert [[(p.label, p.score) for p in row] for row in got] == [
        [("b", 0.7), ("c", 0.2)],
        [("a", 0.5), ("b", 0.25)],  # a tie keeps the lower index first
    ]


@pytest.fixture
def tiny_model(tmp_path):
    """A deploy prototxt, its weights, an image and the expected softmax (float64)."""
    from netforge.net import Net

    deploy = tmp_path / "deploy.prototxt"
    deploy.write_text(DEPLOY)
    net = Net(str(deploy))
    rng = np.random.default_rng(2)
    weight = rng.standard_normal((3, 48)).astype(np.float32) * 0.01
    bias = np.array([0.1, -0.2, 0.05], dtype=np.float32)
    net.params["fc"][0].data = weight
    net.params["fc"][1].data = bias
    net.save(str(tmp_path / "tiny.caffemodel"))
    pixels = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "image.png")
    mean = np.array([100.0, 110.0, 120.0])
    resized = reference_resize(pixels / 255.0, 6, 6)  # images_dim 6,6
    return tmp_path, mean, expected_probabilities(resized, mean, weight, bias)


def expected_probabilities(resized, mean, weight, bias):
    """classify.py on a tiny model in float64: the 4x4 crops of a 6x6 image, BGR, *255,
    -mean, then the InnerProduct and softmax; returns (centre-crop, ten-crop average)."""

    def prob(crop):
        x = crop.transpose(2, 0, 1)[[2, 1, 0]] * 255 - mean[:, None, None]
        logits = weight.astype(np.float64) @ x.ravel() + bias
        e = np.exp(logits - logits.max())
        return e / e.sum()

    corners = [resized[t : t + 4, x : x + 4] for t, x in ((0, 0), (0, 2), (2, 0), (2, 2), (1, 1))]
    crops = corners + [c[:, ::-1] for c in corners]
    return prob(resized[1:5, 1:5]), np.mean([prob(c) for c in crops], axis=0)


def parse_output(text):
    lines = text.strip().splitlines()
    return [(line.split()[1], float(line.split()[0])) for line in lines[1:]]


def test_classify_cli_with_explicit_files(tiny_model, capsys):
    folder, mean, (prob, _) = tiny_model
    (folder / "labels.txt").write_text("cat\ndog\nfish\n")
    status = main(
        [
            "classify",
            "--model", str(folder / "deploy.prototxt"),
            "--weights", str(folder / "tiny.caffemodel"),
            "--labels", str(folder / "labels.txt"),
            "--mean-values", ",".join(str(v) for v in mean),
            "--images-dim", "6,6",
            "--top-k", "2",
            "--center_only",
            str(folder / "image.png"),
        ]
    )  # fmt: skip
    assert status == 0
    got = parse_output(capsys.readouterr().out)
    names = ["cat", "dog", "fish"]
    order = np.argsort(-prob)[:2]
    assert [g[0] for g in got] == [names[i] for i in order]
    np.testing.assert_allclose([g[1] for g in got], prob[order], atol=1e-4)


class _Files(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        data = self.server.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def test_classify_cli_with_a_zoo_model(tiny_model, capsys, monkeypatch):
    folder, mean, (_, prob) = tiny_model
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Files)
    np.save(folder / "mean.npy", np.broadcast_to(mean[:, None, None], (3, 5, 5)).copy())
    httpd.files = {
        "/w": (folder / "tiny.caffemodel").read_bytes(),
        "/m": (folder / "mean.npy").read_bytes(),
        "/l": b"'cat'\n'dog'\n'fish'\n",
    }
    thread = threading.Thread(target=httpd.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}"

    def entry(role, name, path):
        return {
            "role": role,
            "name": name,
            "urls": [url + path],
            "sha256": hashlib.sha256(httpd.files[path]).hexdigest(),
        }

    repo = folder / "repo"
    (repo / "zoo").mkdir(parents=True)
    (repo / "models" / "tiny").mkdir(parents=True)
    (repo / "models" / "tiny" / "deploy.prototxt").write_text(DEPLOY)
    manifest = {
        "name": "tiny",
        "licence": "test",
        "prototxts": {"deploy": "models/tiny/deploy.prototxt"},
        "files": [
            entry("weights", "tiny.caffemodel", "/w"),
            entry("mean", "mean.npy", "/m"),
            entry("labels", "labels.txt", "/l"),
        ],
        "preprocessing": {"resize": [6, 6], "mean_file": "mean", "labels": "labels"},
    }
    (repo / "zoo" / "tiny.json").write_text(json.dumps(manifest))
    monkeypatch.setattr("netforge.zoo.manifest.ZOO_DIR", repo / "zoo")
    monkeypatch.setenv(dl.HOME_ENV, str(folder / "cache"))
    monkeypatch.delenv(dl.MIRROR_ENV, raising=False)
    try:
        status = main(["classify", "--weights", "zoo:tiny", str(folder / "image.png")])
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert status == 0
    got = parse_output(capsys.readouterr().out)
    order = np.argsort(-prob)
    assert [g[0] for g in got] == [["cat", "dog", "fish"][i] for i in order]
    np.testing.assert_allclose([g[1] for g in got], prob[order], atol=1e-4)
    assert (folder / "cache" / "zoo" / "tiny" / "tiny.caffemodel").is_file()


def test_classify_refuses_python_layers_unless_allowed(tiny_model, capsys):
    folder, _, _ = tiny_model
    deploy = folder / "python.prototxt"
    deploy.write_text(
        DEPLOY.replace(
            'layer { name: "prob"',
            'layer { name: "py" type: "Python" bottom: "fc" top: "fc2"\n'
            '        python_param { module: "os" layer: "system" } }\nlayer { name: "prob"',
        )
    )
    status = main(
        ["classify", "--model", str(deploy), "--weights", str(folder / "tiny.caffemodel"),
         str(folder / "image.png")]
    )  # fmt: skip
    assert status == 2
    assert "Python layer" in capsys.readouterr().err


def test_classify_cli_folder_and_npy_inputs_and_npy_output(tiny_model, capsys):
    """classify.py's forms: a folder of *.ext images, an .npy of images, and the positional
    OUTPUT.npy; ten crops averaged by default."""
    folder, mean, (centre, ten) = tiny_model
    images = folder / "images"
    images.mkdir()
    (folder / "image.png").rename(images / "a.png")
    (images / "skipped.jpg").write_bytes(b"not read: --ext png")
    common = ["--model", str(folder / "deploy.prototxt"), "--weights",
              str(folder / "tiny.caffemodel"), "--mean-values", ",".join(map(str, mean)),
              "--images_dim", "6,6", "--ext", "png"]  # fmt: skip
    assert main(["classify", *common, str(images), str(folder / "out.npy")]) == 0
    np.testing.assert_allclose(np.load(folder / "out.npy"), [ten], atol=1e-5)

    pixels = np.asarray(Image.open(images / "a.png"), dtype=np.float64) / 255.0
    np.save(folder / "in.npy", np.stack([pixels, pixels[:, ::-1]]).astype(np.float32))
    mirrored = expected_probabilities(
        reference_resize(pixels[:, ::-1], 6, 6), mean, *tiny_weights(folder)
    )
    argv = ["classify", *common, "--center_only", str(folder / "in.npy"), "-o",
            str(folder / "in_out.npy")]  # fmt: skip
    assert main(argv) == 0
    np.testing.assert_allclose(np.load(folder / "in_out.npy"), [centre, mirrored[0]], atol=1e-5)
    out = capsys.readouterr().out
    assert f"{folder / 'in.npy'}[1]" in out and "Saved 2x3 probabilities" in out


def test_classify_output_that_cannot_be_written_is_one_error_line(tiny_model, capsys):
    folder = tiny_model[0]
    common = ["--model", str(folder / "deploy.prototxt"), "--weights",
              str(folder / "tiny.caffemodel"), "--center_only",
              str(folder / "image.png")]  # fmt: skip
    assert main(["classify", *common, "-o", str(folder / "missing" / "out.npy")]) == 4
    err = capsys.readouterr().err
    assert "netforge: error:" in err and "missing" in err and "Traceback" not in err
    assert main(["classify", *common, "-o", str(folder / "scores")]) == 0  # np.save adds .npy
    assert np.load(folder / "scores.npy").shape == (1, 3)
    shown = capsys.readouterr()
    assert "to " + str(folder / "scores.npy") in shown.out
    assert shown.err.startswith("Classifying 1 inputs (the centre crop).\nDone in ")
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) == []


def tiny_weights(folder):
    from netforge.net import Net

    net = Net(str(folder / "deploy.prototxt"), weights=str(folder / "tiny.caffemodel"))
    return net.params["fc"][0].data.astype(np.float64), net.params["fc"][1].data.astype(np.float64)


def test_classify_rerun_replaces_its_own_npy_output(tiny_model, capsys):
    """classify.py's INPUT OUTPUT.npy run twice: the second run's OUTPUT.npy exists (the
    first run's scores, two axes) and is still the output, not read as images."""
    folder, mean, (_, ten) = tiny_model
    common = ["--model", str(folder / "deploy.prototxt"), "--weights",
              str(folder / "tiny.caffemodel"), "--mean-values", ",".join(map(str, mean)),
              "--images_dim", "6,6", str(folder / "image.png"),
              str(folder / "out.npy")]  # fmt: skip
    assert main(["classify", *common]) == 0
    np.save(folder / "out.npy", np.zeros((5, 3)))  # stale scores of another run
    assert main(["classify", *common]) == 0
    np.testing.assert_allclose(np.load(folder / "out.npy"), [ten], atol=1e-5)


def test_classify_grey_net_reads_grey_images(tmp_path, capsys):
    """A net with one input channel (the digits model) classifies image files read as
    intensity (scikit-image's rgb2gray weights), with no RGB-to-BGR swap."""
    from netforge.net import Net

    deploy = tmp_path / "deploy.prototxt"
    deploy.write_text(DEPLOY.replace("dim: 1 dim: 3 dim: 4", "dim: 1 dim: 1 dim: 4"))
    net = Net(str(deploy))
    rng = np.random.default_rng(3)
    weight = rng.standard_normal((3, 16)) * 0.01
    net.params["fc"][0].data = weight.astype(np.float32)
    net.params["fc"][1].data = np.zeros(3, np.float32)
    net.save(str(tmp_path / "grey.caffemodel"))
    pixels = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "rgb.png")
    argv = ["classify", "--model", str(deploy), "--weights", str(tmp_path / "grey.caffemodel"),
            "--center_only", str(tmp_path / "rgb.png"), "-o", str(tmp_path / "p.npy")]  # fmt: skip
    assert main(argv) == 0
    grey = pixels / 255.0 @ np.array([0.2125, 0.7154, 0.0721]) * 255
    logits = weight @ grey.ravel()
    expected = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    np.testing.assert_allclose(np.load(tmp_path / "p.npy"), [expected], atol=1e-5)


def test_classify_caffe_style_gpu_id_is_one_clear_error(tiny_model, capsys):
    """Caffe's tools take -gpu 0; classify.py's --gpu is a switch, so the 0 would be read as
    an image: the error says to give the id with --device."""
    folder = tiny_model[0]
    argv = ["classify", "--model", str(folder / "deploy.prototxt"), "--weights",
            str(folder / "tiny.caffemodel"), "-gpu", "0", str(folder / "image.png")]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("netforge: error: '0' is not an input") and "--device 0" in err
