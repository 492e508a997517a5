"""``--weights zoo:NAME`` end to end: a loopback server plays the model zoo, and the weights
download once, verified, into train, test and the Python API."""

from __future__ import annotations

import hashlib
import http.server
import json
import re
import threading

import numpy as np
import pytest

from netforge.cli.main import main
from netforge.net import Net
from netforge.proto import pb
from netforge.prototxt import parse_text
from netforge.zoo import download as dl

NET = """
name: "tiny"
layer { name: "data" type: "DummyData" top: "x" top: "y"
        dummy_data_param { shape { dim: 4 dim: 3 } shape { dim: 4 dim: 2 }
                           data_filler { type: "constant" value: 1 } } }
layer { name: "ip" type: "InnerProduct" bottom: "x" top: "out"
        inner_product_param { num_output: 2 } }
layer { name: "loss" type: "EuclideanLoss" bottom: "out" bottom: "y" top: "loss" }
"""


@pytest.fixture
def zoo_with_tiny_model(tmp_path, monkeypatch):
    """Manifest "tiny" whose weights (ip = 0.5 everywhere) a loopback server serves."""
    trained = Net(parse_text(NET, pb.NetParameter), pb.TEST)
    for blob in trained.params["ip"]:
        blob.data[...] = 0.5
    trained.save(tmp_path / "served.caffemodel")
    payload = (tmp_path / "served.caffemodel").read_bytes()
    requests = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            requests.append(self.path)
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            """Keep the test output quiet."""

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    zoo_dir = tmp_path / "repo" / "zoo"
    zoo_dir.mkdir(parents=True)
    manifest = {
        "name": "tiny",
        "title": "A tiny test model",
        "licence": "test",
        "files": [{
            "role": "weights", "name": "tiny.caffemodel",
            "urls": [f"http://127.0.0.1:{server.server_address[1]}/tiny.caffemodel"],
            "sha256": hashlib.sha256(payload).hexdigest(), "size": len(payload),
        }],
    }  # fmt: skip
    (zoo_dir / "tiny.json").write_text(json.dumps(manifest))
    monkeypatch.setattr("netforge.zoo.manifest.ZOO_DIR", zoo_dir)
    monkeypatch.setenv(dl.HOME_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(dl.MIRROR_ENV, raising=False)
    (tmp_path / "net.prototxt").write_text(NET)
    yield tmp_path, requests
    server.shutdown()
    server.server_close()


def test_python_api_and_cli_take_zoo_weights(zoo_with_tiny_model, capsys):
    folder, requests = zoo_with_tiny_model
    net = Net(str(folder / "net.prototxt"), pb.TEST, weights="zoo:tiny")
    np.testing.assert_array_equal(net.params["ip"][0].data, np.full((2, 3), 0.5))
    assert len(requests) == 1

    status = main(["test", "--model", str(folder / "net.prototxt"), "--weights", "zoo:tiny",
                   "--iterations", "2"])  # fmt: skip
    assert status == 0
    # x = y = 1; out = 3 * 0.5 + 0.5 = 2 per element; Euclidean: 8 * (2 - 1)^2 / (2 * 4) = 1
    assert "] loss = 1 (* 1 = 1 loss)" in capsys.readouterr().err
    assert len(requests) == 1  # the cached, verified file is reused

    solver = folder / "solver.prototxt"
    solver.write_text(
        f'net: "{folder / "net.prototxt"}" base_lr: 0.01 lr_policy: "fixed" max_iter: 1 display: 1 '
        f'snapshot_after_train: false snapshot_prefix: "{folder / "snap"}"'
    )
    status = main(["train", "--solver", str(solver), "--weights", "zoo:tiny"])
    log = capsys.readouterr().err
    assert status == 0
    assert "Copied layers: ip" in log
    assert re.search(r"Iteration 0 \(.*\), loss = 1\n", log)
