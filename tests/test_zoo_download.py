"""Zoo downloads against a loopback HTTP server: good, resumed, corrupt, 404, dropped, slow,
and manifests that try to write outside their folder. No real URL is ever fetched."""

from __future__ import annotations

import hashlib
import http.server
import json
import sys
import threading
from pathlib import Path

import pytest

from netforge.errors import ChecksumError, ConfigError, NetworkError
from netforge.zoo import download as dl
from netforge.zoo.manifest import ZooFile, parse_manifest

PAYLOAD = bytes(range(256)) * 400  # 102400 bytes, not a multiple of the read chunk


class Handler(http.server.BaseHTTPRequestHandler):
    """Serves ``server.files[path]`` with the behaviour ``server.modes[path]``."""

    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_GET(self):
        server = self.server
        server.requests.append((self.path, self.headers.get("Range")))
        if self.path not in server.files:
            self.send_error(404, "Not Found")
            return
        data = server.files[self.path]
        mode = server.modes.get(self.path, "range")
        if mode == "slow":
            server.release.wait(5)
        start = 0
        ranged = self.headers.get("Range")
        if ranged and mode in ("range", "drop_once"):
            start = int(ranged.split("=")[1].rstrip("-"))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if mode == "drop" or (mode == "drop_once" and not server.dropped):
            server.dropped = True
            self.wfile.write(body[: len(body) // 3])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)


class QuietServer(http.server.ThreadingHTTPServer):
    """The loopback server, silent when a client hangs up mid-response: the timeout and
    dropped-connection tests do that on purpose, and socketserver would print a
    BrokenPipeError or ConnectionResetError traceback into the test output."""

    def handle_error(self, request, client_address):
        if isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            return
        super().handle_error(request, client_address)


def test_server_is_quiet_on_hang_ups_only(capsys):
    httpd = QuietServer(("127.0.0.1", 0), Handler)
    try:
        for error in (BrokenPipeError, ConnectionResetError, ValueError):
            try:
                raise error("client went away")
            except error:
                httpd.handle_error(None, ("127.0.0.1", 1))
    finally:
        httpd.server_close()
    err = capsys.readouterr().err
    assert "ValueError" in err and "BrokenPipeError" not in err and "ConnectionReset" not in err


@pytest.fixture
def server():
    httpd = QuietServer(("127.0.0.1", 0), Handler)
    httpd.files, httpd.modes, httpd.requests = {}, {}, []
    httpd.dropped = False
    httpd.release = threading.Event()
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield httpd
    httpd.release.set()
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(autouse=True)
def no_mirror(monkeypatch):
    monkeypatch.delenv(dl.MIRROR_ENV, raising=False)


def entry_for(url: str, data: bytes = PAYLOAD, **overrides) -> ZooFile:
    fields = dict(
        role="weights",
        name="model.caffemodel",
        urls=(url,),
        sha1=hashlib.sha1(data).hexdigest(),
        sha256=hashlib.sha256(data).hexdigest(),
        size=len(data),
    )
    fields.update(overrides)
    return ZooFile(**fields)


def test_good_download_is_verified_and_named(server, tmp_path):
    server.files["/m"] = PAYLOAD
    seen = []
    path = dl.download_file(
        entry_for(server.url + "/m"), tmp_path, progress=lambda d, t: seen.append((d, t))
    )
    assert path == (tmp_path / "model.caffemodel").resolve()
    assert path.read_bytes() == PAYLOAD
    assert not (tmp_path / "model.caffemodel.part").exists()
    assert seen[-1] == (len(PAYLOAD), len(PAYLOAD))
    # A second call finds the verified file and sends no request.
    server.requests.clear()
    assert dl.download_file(entry_for(server.url + "/m"), tmp_path) == path
    assert server.requests == []


def test_partial_file_resumes_with_range(server, tmp_path):
    server.files["/m"] = PAYLOAD
    (tmp_path / "model.caffemodel.part").write_bytes(PAYLOAD[:1000])
    path = dl.download_file(entry_for(server.url + "/m"), tmp_path)
    assert path.read_bytes() == PAYLOAD
    assert server.requests == [("/m", "bytes=1000-")]


def test_server_ignoring_range_restarts_from_zero(server, tmp_path):
    server.files["/m"] = PAYLOAD
    server.modes["/m"] = "norange"
    (tmp_path / "model.caffemodel.part").write_bytes(b"garbage that is not a prefix")
    assert dl.download_file(entry_for(server.url + "/m"), tmp_path).read_bytes() == PAYLOAD


def test_complete_part_file_is_verified_after_416(server, tmp_path):
    server.files["/m"] = PAYLOAD
    (tmp_path / "model.caffemodel.part").write_bytes(PAYLOAD)
    assert dl.download_file(entry_for(server.url + "/m"), tmp_path).read_bytes() == PAYLOAD


def test_wrong_checksum_deletes_the_file(server, tmp_path):
    server.files["/m"] = PAYLOAD
    bad = entry_for(server.url + "/m", sha256="0" * 64)
    with pytest.raises(ChecksumError, match="SHA-256"):
        dl.download_file(bad, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_wrong_sha1_alone_is_caught(server, tmp_path):
    server.files["/m"] = PAYLOAD
    bad = entry_for(server.url + "/m", sha256=None, size=None, sha1="f" * 40)
    with pytest.raises(ChecksumError, match="SHA-1"):
        dl.download_file(bad, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_corrupt_mirror_falls_back_to_the_next(server, tmp_path):
    server.files["/bad"] = PAYLOAD[::-1]
    server.files["/good"] = PAYLOAD
    entry = entry_for(server.url + "/bad", urls=(server.url + "/bad", server.url + "/good"))
    assert dl.download_file(entry, tmp_path).read_bytes() == PAYLOAD


def test_existing_wrong_file_is_replaced(server, tmp_path):
    server.files["/m"] = PAYLOAD
    (tmp_path / "model.caffemodel").write_bytes(b"truncated")
    assert dl.download_file(entry_for(server.url + "/m"), tmp_path).read_bytes() == PAYLOAD


def test_404_is_a_network_error_naming_the_status(server, tmp_path):
    with pytest.raises(NetworkError, match="HTTP 404"):
        dl.download_file(entry_for(server.url + "/missing"), tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_failed_download_leaves_no_empty_folder(server, tmp_path):
    (tmp_path / "cache").mkdir()
    with pytest.raises(NetworkError):
        dl.download_file(entry_for(server.url + "/missing"), tmp_path / "cache/zoo/model")
    assert list(tmp_path.iterdir()) == [tmp_path / "cache"]
    assert list((tmp_path / "cache").iterdir()) == []
    # a partial download is kept for the next attempt to resume, and its folder with it
    server.files["/m"] = PAYLOAD
    server.modes["/m"] = "drop"
    with pytest.raises(NetworkError, match="dropped"):
        dl.download_file(entry_for(server.url + "/m"), tmp_path / "cache/zoo/model")
    assert (tmp_path / "cache/zoo/model/model.caffemodel.part").stat().st_size > 0


def test_dropped_connection_resumes_automatically(server, tmp_path):
    server.files["/m"] = PAYLOAD
    server.modes["/m"] = "drop_once"
    assert dl.download_file(entry_for(server.url + "/m"), tmp_path).read_bytes() == PAYLOAD
    assert server.requests[1] == ("/m", f"bytes={len(PAYLOAD) // 3}-")


def test_connection_always_dropped_is_a_network_error(server, tmp_path):
    server.files["/m"] = PAYLOAD
    server.modes["/m"] = "drop"
    with pytest.raises(NetworkError, match="dropped"):
        dl.download_file(entry_for(server.url + "/m"), tmp_path)
    assert not (tmp_path / "model.caffemodel").exists()


def test_slow_server_times_out(server, tmp_path):
    server.files["/m"] = PAYLOAD
    server.modes["/m"] = "slow"
    with pytest.raises(NetworkError, match="timed out"):
        dl.download_file(entry_for(server.url + "/m"), tmp_path, timeout=0.2)


def test_no_server_is_a_network_error(tmp_path):
    with pytest.raises(NetworkError, match="refused|network"):
        dl.download_file(entry_for("http://127.0.0.1:9/m"), tmp_path, timeout=1)


def test_mirror_env_is_tried_first(server, tmp_path, monkeypatch):
    server.files["/mirror/model.caffemodel"] = PAYLOAD
    monkeypatch.setenv(dl.MIRROR_ENV, server.url + "/mirror/")
    entry = entry_for(server.url + "/never-asked")
    assert dl.download_file(entry, tmp_path).read_bytes() == PAYLOAD
    assert [r[0] for r in server.requests] == ["/mirror/model.caffemodel"]


def test_plain_http_needs_a_checksum(tmp_path):
    entry = entry_for("http://127.0.0.1:9/m", sha1=None, sha256=None)
    with pytest.raises(ConfigError, match="http"):
        dl.download_file(entry, tmp_path)
    data = {
        "name": "x",
        "licence": "l",
        "files": [{"role": "weights", "name": "w", "urls": ["http://example.org/w"]}],
    }
    with pytest.raises(ConfigError, match="checksum"):
        parse_manifest(data)


@pytest.mark.parametrize(
    "name", ["../evil", "..", "/etc/passwd", "sub/file", "sub\\file", "C:evil", ".hidden", ""]
)
def test_manifest_cannot_escape_its_folder(name, tmp_path):
    data = {
        "name": "x",
        "licence": "l",
        "files": [{"role": "weights", "name": name, "urls": ["https://example.org/w"]}],
    }
    with pytest.raises(ConfigError, match="plain file name"):
        parse_manifest(data)
    # The downloader checks again, for entries built without a manifest.
    with pytest.raises(ConfigError):
        dl.download_file(entry_for("https://127.0.0.1:9/w", name=name), tmp_path / "dest")
    assert not (tmp_path / "dest").exists() or list((tmp_path / "dest").iterdir()) == []


def test_model_name_cannot_escape_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(dl.HOME_ENV, str(tmp_path))
    data = {"name": "../../outside", "licence": "l", "files": []}
    with pytest.raises(ConfigError, match="model name"):
        parse_manifest(data)


def test_cache_dir_honours_netforge_home_then_xdg(tmp_path, monkeypatch):
    monkeypatch.setenv(dl.HOME_ENV, str(tmp_path / "home"))
    assert dl.cache_dir() == tmp_path / "home"
    monkeypatch.delenv(dl.HOME_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    if dl.sys.platform.startswith("linux"):
        assert dl.cache_dir() == tmp_path / "xdg" / "netforge"


def test_download_model_into_the_cache(server, tmp_path, monkeypatch):
    from netforge import zoo

    server.files["/w"] = PAYLOAD
    server.files["/labels.txt"] = b"cat\ndog\n"
    manifest = {
        "name": "tiny",
        "licence": "test",
        "files": [
            {
                "role": "weights",
                "name": "tiny.caffemodel",
                "urls": [server.url + "/w"],
                "sha256": hashlib.sha256(PAYLOAD).hexdigest(),
            },
            {
                "role": "labels",
                "name": "labels.txt",
                "urls": [server.url + "/labels.txt"],
                "sha1": hashlib.sha1(b"cat\ndog\n").hexdigest(),
            },
        ],
    }
    zoo_dir = tmp_path / "repo" / "zoo"
    zoo_dir.mkdir(parents=True)
    (zoo_dir / "tiny.json").write_text(json.dumps(manifest))
    monkeypatch.setattr("netforge.zoo.manifest.ZOO_DIR", zoo_dir)
    monkeypatch.setenv(dl.HOME_ENV, str(tmp_path / "cache"))
    path = zoo.fetch_weights("tiny")
    assert path == (tmp_path / "cache" / "zoo" / "tiny" / "tiny.caffemodel").resolve()
    assert path.read_bytes() == PAYLOAD
    paths = zoo.download_model(zoo.load_manifest("tiny"), tmp_path / "given")
    assert Path(paths["labels"]).read_bytes() == b"cat\ndog\n"
    assert sorted(p.name for p in (tmp_path / "given").iterdir()) == [
        "labels.txt",
        "tiny.caffemodel",
    ]
