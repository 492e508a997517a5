"""The wheel carries the zoo: built from this checkout, unpacked away from it, its netforge
finds every manifest and every prototxt they name; an empty zoo is an error, not silence."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from netforge.cli.main import main
from netforge.errors import DataError

REPO = Path(__file__).resolve().parent.parent


#: what a wheel is built from (a copy: an in-tree build would reuse a stale build/ folder
#: and race with anyone else building in the same checkout)
SOURCES = ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "LICENSE")
TREES = ("netforge", "zoo", "models")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel of this checkout (setuptools from the test extra, no network)."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "src"
    source.mkdir()
    for name in SOURCES:
        shutil.copy2(REPO / name, source / name)
    junk = shutil.ignore_patterns("__pycache__", "*.pyc", "*.caffemodel", "*.solverstate")
    for name in TREES:
        shutil.copytree(REPO / name, source / name, ignore=junk)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
        + ["-w", str(work / "dist"), str(source)],
        check=True,
        capture_output=True,
    )
    (path,) = (work / "dist").glob("netforge-*.whl")
    return path


def test_wheel_carries_every_manifest_and_prototxt(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    manifests = sorted((REPO / "zoo").glob("*.json"))
    assert manifests
    for manifest in manifests:
        assert f"netforge/_data/zoo/{manifest.name}" in names
        for rel in json.loads(manifest.read_text()).get("prototxts", {}).values():
            assert f"netforge/_data/{rel}" in names, rel
    for rel in ("solver.prototxt", "train_val.prototxt", "data/train.h5", "data/test.txt"):
        assert f"netforge/_data/models/digits/{rel}" in names
    # training outputs in the checkout never travel
    assert not [n for n in names if n.endswith((".caffemodel", ".solverstate", ".jsonl"))]


def test_unpacked_wheel_finds_its_zoo_outside_the_checkout(wheel: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    script = (
        "import netforge.zoo as z\n"
        "from netforge.cli.main import main\n"
        "print(z.ZOO_DIR)\n"
        "raise SystemExit(main(['zoo', 'info', 'bvlc_alexnet']))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == str(site / "netforge" / "_data" / "zoo")
    deploy = next(line for line in lines if "prototxt deploy:" in line).split(": ", 1)[1]
    assert Path(deploy) == site / "netforge/_data/models/bvlc_alexnet/deploy.prototxt"
    assert Path(deploy).is_file()


def test_empty_zoo_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setattr("netforge.zoo.manifest.ZOO_DIR", tmp_path)
    assert main(["zoo", "list"]) == DataError.exit_code
    err = capsys.readouterr().err
    assert "the zoo is empty" in err and str(tmp_path) in err
    assert main(["zoo", "info", "bvlc_alexnet"]) == DataError.exit_code
    assert "the zoo is empty" in capsys.readouterr().err
