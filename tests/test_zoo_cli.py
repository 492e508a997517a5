"""``netforge zoo list|info|download``: output, the --dir folder, and exit codes of failures."""

from __future__ import annotations

import hashlib
import http.server
import json
import threading

import pytest

from netforge.cli.main import main
from netforge.errors import ChecksumError, NetworkError
from netforge.zoo import download as dl

DATA = b"weights bytes " * 100


class _Files(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        if self.path != "/w":
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(DATA)))
        self.end_headers()
        self.wfile.write(DATA)


@pytest.fixture
def fake_zoo(tmp_path, monkeypatch):
    """A zoo folder with models good / corrupt / gone, served by a loopback server."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Files)
    threading.Thread(target=httpd.serve_forever, args=(0.01,), daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}"
    zoo_dir = tmp_path / "repo" / "zoo"
    zoo_dir.mkdir(parents=True)
    for name, path, digest in [
        ("good", "/w", hashlib.sha256(DATA).hexdigest()),
        ("corrupt", "/w", "0" * 64),
        ("gone", "/missing", hashlib.sha256(DATA).hexdigest()),
    ]:
        manifest = {
            "name": name,
            "title": f"The {name} model",
            "licence": "test",
            "files": [
                {"role": "weights", "name": f"{name}.caffemodel", "urls": [url + path],
                 "sha256": digest, "size": len(DATA)}
            ],
        }  # fmt: skip
        (zoo_dir / f"{name}.json").write_text(json.dumps(manifest))
    monkeypatch.setattr("netforge.zoo.manifest.ZOO_DIR", zoo_dir)
    monkeypatch.setenv(dl.HOME_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(dl.MIRROR_ENV, raising=False)
    yield tmp_path
    httpd.shutdown()
    httpd.server_close()


def test_list_and_info(fake_zoo, capsys):
    assert main(["zoo", "list"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in out] == ["corrupt", "gone", "good"]
    assert "The good model" in out[2] and "[test]" in out[2]
    assert main(["zoo", "info", "good"]) == 0
    info = capsys.readouterr().out
    assert f"sha256: {hashlib.sha256(DATA).hexdigest()}" in info
    assert f"good.caffemodel ({len(DATA)} bytes)" in info


def test_download_to_cache_and_to_dir(fake_zoo, capsys):
    assert main(["zoo", "download", "good"]) == 0
    cached = fake_zoo / "cache" / "zoo" / "good" / "good.caffemodel"
    assert cached.read_bytes() == DATA
    assert f"weights: {cached.resolve()}" in capsys.readouterr().out
    assert main(["zoo", "download", "good", "--dir", str(fake_zoo / "here")]) == 0
    assert (fake_zoo / "here" / "good.caffemodel").read_bytes() == DATA


@pytest.mark.parametrize(
    "name, error, text",
    [("corrupt", ChecksumError, "SHA-256"), ("gone", NetworkError, "HTTP 404"),
     ("unknown", None, "no zoo model")],
)  # fmt: skip
def test_failures_exit_non_zero_with_one_message(fake_zoo, capsys, name, error, text):
    status = main(["zoo", "download", name])
    err = capsys.readouterr().err
    assert status == (error.exit_code if error else 2)
    # progress lines may precede it when logging is on; the error is the last message
    assert "netforge: error:" in err and text in err.split("netforge: error:")[-1]
    assert not list((fake_zoo / "cache").rglob("*.caffemodel"))
