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
from netforge.zoo.manifest import Preprocessing

DEPLOY = """
name: "tiny"
layer { name: "data" type: "Input" top: "data"
        input_param { shape { dim: 1 dim: 3 dim: 4 dim: 4 } } }
layer { name: "fc" type: "InnerProduct" bottom: "data" top: "fc"
        inner_product_param { num_output: 3 } }
layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }
"""


def reference_resize(image, out_h, out_w):
    """Bilinear resize written pixel by pixel in float64 (half-pixel centres, clamped)."""
    h, w, c = image.shape
    out = np.zeros((out_h, out_w, c))
    for i in range(out_h):
        y = min(max((i + 0.5) * h / out_h - 0.5, 0), h - 1)
        y0 = int(np.floor(y))
        y1 = min(y0 + 1, h - 1)
        for j in range(out_w):
            x = min(max((j + 0.5) * w / out_w - 0.5, 0), w - 1)
            x0 = int(np.floor(x))
            x1 = min(x0 + 1, w - 1)
            fy, fx = y - y0, x - x0
            out[i, j] = (
                image[y0, x0] * (1 - fy) * (1 - fx)
                + image[y0, x1] * (1 - fy) * fx
                + image[y1, x0] * fy * (1 - fx)
                + image[y1, x1] * fy * fx
            )
    return out


@pytest.mark.parametrize("size", [(3, 5), (7, 4), (5, 6)])
def test_resize_matches_the_bilinear_formula(size):
    image = np.random.default_rng(0).random((5, 6, 3))
    got = zc.resize_image(image.astype(np.float32), size)
    np.testing.assert_allclose(got, reference_resize(image, *size), rtol=1e-5, atol=1e-6)


def test_preprocess_is_classify_py_centre_only():
    rng = np.random.default_rng(1)
    images = [rng.random((9, 7, 3)), rng.random((6, 6, 3))]
    pre = Preprocessing(resize=(6, 5), mean_values=(10.0, 20.0, 30.0), raw_scale=255, scale=0.5)
    got = zc.preprocess([im.astype(np.float32) for im in images], pre, (3, 3))
    expected = []
    for im in images:
        resized = reference_resize(im, 6, 5)
        top, left = int(6 / 2 - 3 / 2), int(5 / 2 - 3 / 2)  # 1, 1 (rounded down)
        crop = resized[top : top + 3, left : left + 3]
        chw = crop.transpose(2, 0, 1)[[2, 1, 0]] * 255
        expected.append((chw - np.array([10.0, 20.0, 30.0])[:, None, None]) * 0.5)
    np.testing.assert_allclose(got, np.stack(expected), rtol=1e-5, atol=1e-3)


def test_channel_mean_and_labels(tmp_path):
    mean = np.arange(3 * 2 * 2, dtype=np.float32).reshape(3, 2, 2)
    np.save(tmp_path / "mean.npy", mean)
    np.testing.assert_allclose(zc.channel_mean(tmp_path / "mean.npy"), [1.5, 5.5, 9.5])
    (tmp_path / "labels.txt").write_text("'n01 tench, Tinca'\nplain\n\n\"q\"\n")
    assert zc.read_labels(tmp_path / "labels.txt") == ["n01 tench, Tinca", "plain", "q"]


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
    # classify.py: resize 6x8 -> 6x6 (images_dim), centre crop 4x4, BGR, *255, -mean.
    resized = reference_resize(pixels / 255.0, 6, 6)[1:5, 1:5]
    x = resized.transpose(2, 0, 1)[[2, 1, 0]] * 255 - mean[:, None, None]
    logits = weight.astype(np.float64) @ x.ravel() + bias
    prob = np.exp(logits - logits.max())
    return tmp_path, mean, prob / prob.sum()


def parse_output(text):
    lines = text.strip().splitlines()
    return [(line.split()[1], float(line.split()[0])) for line in lines[1:]]


def test_classify_cli_with_explicit_files(tiny_model, capsys):
    folder, mean, prob = tiny_model
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
    folder, mean, prob = tiny_model
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
