"""Zoo downloads against concurrent runs and hostile servers or caches (issue 19): one
download per target at a time, no writing through a planted link, no file larger than the
manifest says."""

from __future__ import annotations

import contextlib
import http.server
import threading
import time
from collections.abc import Iterator

import pytest
from test_zoo_download import PAYLOAD, QuietServer, entry_for, no_mirror, server  # noqa: F401

from netforge.errors import ChecksumError, ConfigError
from netforge.zoo import download as dl


@contextlib.contextmanager
def serving(handler: type[http.server.BaseHTTPRequestHandler]) -> Iterator[str]:
    """A loopback server answering every request with ``handler``; yields a file's URL."""
    httpd = QuietServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, args=(0.01,), daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/m"
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_concurrent_downloads_of_one_file_wait_for_each_other(server, tmp_path):  # noqa: F811
    server.files["/m"] = PAYLOAD
    server.modes["/m"] = "slow"  # the first response waits for server.release
    entry = entry_for(server.url + "/m")
    results, errors = [], []

    def client():
        try:
            results.append(dl.download_file(entry, tmp_path))
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=client) for _ in range(2)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 5
    while not server.requests and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)  # the second client is now waiting on the lock, not downloading
    assert len(server.requests) == 1
    server.release.set()
    for thread in threads:
        thread.join(10)
    assert not errors and len(results) == 2 and results[0] == results[1]
    assert results[0].read_bytes() == PAYLOAD
    assert len(server.requests) == 1  # the second found the first's verified file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.caffemodel"]


def test_a_link_at_the_part_file_is_not_followed(server, tmp_path):  # noqa: F811
    server.files["/m"] = PAYLOAD
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"keep me")
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "model.caffemodel.part").symlink_to(outside)
    with pytest.raises(ConfigError, match="model.caffemodel.part is a symbolic link"):
        dl.download_file(entry_for(server.url + "/m"), cache)
    assert outside.read_bytes() == b"keep me"


class Endless(http.server.BaseHTTPRequestHandler):
    """The right bytes, then zeros for ever, with no Content-Length."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.send_response(200)
        self.end_headers()
        self.wfile.write(PAYLOAD)
        try:
            while True:
                self.wfile.write(bytes(1 << 16))
        except (BrokenPipeError, ConnectionResetError):
            pass


def test_an_endless_server_is_read_only_up_to_the_manifests_size(tmp_path):
    with serving(Endless) as url:
        path = dl.download_file(entry_for(url), tmp_path, timeout=10)
    assert path.read_bytes() == PAYLOAD


def test_an_endless_server_stops_at_the_largest_file_caffe_reads_when_no_size_is_known(
    tmp_path, monkeypatch
):
    # A Caffe model folder's readme gives a sha1 but no size: the bound is then protobuf's
    # 2 GiB (no zoo file, a caffemodel or a prototxt, can be larger); 1 MiB here.
    monkeypatch.setattr(dl, "MAX_FILE_BYTES", 1 << 20)
    with serving(Endless) as url:
        with pytest.raises(ChecksumError):
            dl.download_file(entry_for(url, size=None), tmp_path, timeout=10)
    assert not any(tmp_path.iterdir())


class LyingLength(http.server.BaseHTTPRequestHandler):
    """The right bytes under a Content-Length that is not a number."""

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "lots")
        self.end_headers()
        self.wfile.write(PAYLOAD)

    def log_message(self, *args):
        pass


def test_a_content_length_that_is_not_a_number_is_ignored(tmp_path):
    with serving(LyingLength) as url:
        path = dl.download_file(entry_for(url), tmp_path, timeout=10)
    assert path.read_bytes() == PAYLOAD
