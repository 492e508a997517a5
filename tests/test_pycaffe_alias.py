"""Unmodified pycaffe scripts: ``netforge pycaffe script.py`` (the opt-in ``caffe`` alias)
and the mechanical import rewrite of tools/pycaffe_rewrite.py."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import netforge
from netforge.errors import ConfigError
from netforge.prototxt import read_net
from netforge.pycaffe_alias import CHILD_PATH, caffe_alias, run_script

REPO = Path(__file__).resolve().parent.parent

SCRIPT = """\
import sys
import caffe
import caffe.io
from caffe import layers as L, params as P
from caffe.proto import caffe_pb2
import numpy as np

caffe.set_mode_cpu()
n = caffe.NetSpec()
n.data = L.Input(shape=dict(dim=[2, 3]))
n.loss = L.Python(n.data, module="pyloss_mod", layer="SumSquares", loss_weight=1)
with open(sys.argv[1], "w") as f:
    f.write(str(n.to_proto()))
net = caffe.Net(sys.argv[1], caffe.TRAIN)
net.blobs["data"].data[...] = np.arange(6).reshape(2, 3)
print("loss", float(net.forward()["loss"]))
print("pooling", P.Pooling.AVE, isinstance(caffe_pb2.NetParameter(), caffe.proto.pb.NetParameter))
print("args", sys.argv[2:])
print("io", caffe.io.__name__)
"""

# A Python layer module as pycaffe users write them: it imports caffe too.
PYLOSS = """\
import caffe


class SumSquares(caffe.Layer):
    def reshape(self, bottom, top):
        top[0].reshape()

    def forward(self, bottom, top):
        top[0].data[...] = (bottom[0].data ** 2).sum() / 2

    def backward(self, top, propagate_down, bottom):
        bottom[0].diff[...] = bottom[0].data * top[0].diff
"""


@pytest.fixture
def script(tmp_path: Path) -> Path:
    (tmp_path / "pyloss_mod.py").write_text(PYLOSS)
    path = tmp_path / "script.py"
    path.write_text(SCRIPT)
    return path


def test_netforge_pycaffe_runs_an_unmodified_script(script: Path, tmp_path: Path) -> None:
    if importlib.util.find_spec("netforge.io") is None:
        script.write_text(SCRIPT.replace("import caffe.io\n", "").replace('print("io"', "0 and (0"))
    result = subprocess.run(
        [sys.executable, "-m", "netforge", "pycaffe", str(script), str(tmp_path / "n.prototxt"),
         "--center_only", "-x"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"loss {sum(i * i for i in range(6)) / 2}"  # 0+1+4+9+16+25 = 55, halved
    assert lines[1] == "pooling 1 True"
    assert lines[2] == "args ['--center_only', '-x']"
    if len(lines) > 3:
        assert lines[3] == "io netforge.io"


# A script that starts one worker per "GPU" as BVLC python/train.py does, with the spawn
# method (forkserver, Python 3.14's Linux default, starts its workers the same way).
SPAWNING_SCRIPT = """\
import multiprocessing as mp


def worker():
    import caffe

    print("child", caffe.io.__name__, caffe.__name__, flush=True)


if __name__ == "__main__":
    process = mp.get_context("spawn").Process(target=worker)
    process.start()
    process.join()
    print("exit", process.exitcode)
"""


def test_spawned_child_processes_import_netforge_as_caffe(tmp_path: Path) -> None:
    script = tmp_path / "spawner.py"
    script.write_text(SPAWNING_SCRIPT)
    under = subprocess.run(
        [sys.executable, "-m", "netforge", "pycaffe", str(script)],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert under.returncode == 0, under.stderr
    assert under.stdout.splitlines() == ["child netforge.io netforge", "exit 0"], under.stderr
    outside = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path, timeout=120
    )
    assert outside.stdout.splitlines() == ["exit 1"]
    assert "ModuleNotFoundError: No module named 'caffe'" in outside.stderr


def test_run_script_sets_the_child_path_only_while_it_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    script = tmp_path / "env.py"
    script.write_text("import os, sys\nprint(os.environ['PYTHONPATH'], sys.path[1])\n")
    run_script(script)
    assert capsys.readouterr().out.split() == [
        f"{CHILD_PATH}{os.pathsep}/elsewhere",
        str(CHILD_PATH),
    ]
    assert os.environ["PYTHONPATH"] == "/elsewhere"
    assert str(CHILD_PATH) not in sys.path


def test_importing_netforge_does_not_make_caffe_importable() -> None:
    code = "import netforge, importlib.util; print(importlib.util.find_spec('caffe'))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "None"


def test_the_alias_gives_netforge_modules_and_goes_away(script: Path, tmp_path: Path) -> None:
    with caffe_alias():
        import caffe  # noqa: PLC0415
        import caffe.net_spec  # noqa: PLC0415

        assert caffe is netforge
        assert caffe.net_spec is netforge.net_spec
        assert caffe.__spec__.name == "netforge"  # netforge keeps its own spec
    assert "caffe" not in sys.modules and "caffe.net_spec" not in sys.modules
    assert importlib.util.find_spec("caffe") is None
    saved = sys.modules.get("pyloss_mod")
    try:
        run_script(script, [str(tmp_path / "in_process.prototxt")])
    finally:
        sys.modules.pop("pyloss_mod", None)
        if saved is not None:
            sys.modules["pyloss_mod"] = saved
    written = read_net(str(tmp_path / "in_process.prototxt"))
    assert [layer.python_param.layer for layer in written.layer] == ["", "SumSquares"]
    assert "caffe" not in sys.modules


def test_a_layer_module_importing_caffe_without_the_alias_says_how_to_port_it(
    script: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(tmp_path))
    net = tmp_path / "net.prototxt"
    net.write_text(
        'layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 } } }\n'
        'layer { name: "loss" type: "Python" bottom: "data" top: "loss"\n'
        '  python_param { module: "pyloss_mod" layer: "SumSquares" } }\n'
    )
    with pytest.raises(ConfigError, match=r"'loss'.*imports pycaffe's 'caffe'.*netforge pycaffe"):
        netforge.Net(str(net), netforge.TRAIN)
    try:
        with caffe_alias():  # what netforge pycaffe does: the same module loads
            assert netforge.Net(str(net), netforge.TRAIN).layers[1].type == "Python"
    finally:
        sys.modules.pop("pyloss_mod", None)  # it holds the alias's caffe


def test_a_real_caffe_already_imported_is_not_replaced(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = type(sys)("caffe")
    monkeypatch.setitem(sys.modules, "caffe", fake)
    with pytest.raises(ConfigError, match="real 'caffe' module is already imported"):
        with caffe_alias():
            pass
    assert sys.modules["caffe"] is fake


def test_missing_script_is_one_clear_error(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "netforge", "pycaffe", str(tmp_path / "nope.py")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode != 0
    assert "nope.py" in result.stderr and "Traceback" not in result.stderr


def _rewrite_tool():
    spec = importlib.util.spec_from_file_location(
        "pycaffe_rewrite", REPO / "tools" / "pycaffe_rewrite.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rewrite():
    return _rewrite_tool().rewrite_source


def test_rewrite_tool_ports_a_notebook_and_reports_bad_files(tmp_path: Path, capsys) -> None:
    cells = [
        {"cell_type": "markdown", "metadata": {}, "source": ["import caffe\n"]},
        {"cell_type": "code", "metadata": {}, "execution_count": 1, "outputs": [],
         "source": ["import numpy as np\n", "import caffe\n", "caffe.set_mode_cpu()"]},
        {"cell_type": "code", "metadata": {}, "execution_count": 2, "outputs": [],
         "source": "from caffe import layers as L"},
    ]  # fmt: skip
    notebook = {"cells": cells, "metadata": {}, "nbformat": 4, "nbformat_minor": 0}
    (tmp_path / "nb.ipynb").write_text(json.dumps(notebook))
    tool = _rewrite_tool()
    assert tool.main([str(tmp_path / "nb.ipynb"), str(tmp_path / "ported.ipynb")]) == 0
    ported = json.loads((tmp_path / "ported.ipynb").read_text())
    assert ported["cells"][0] == cells[0]  # markdown stays as written
    assert ported["cells"][1]["source"] == [
        "import numpy as np\n", "import netforge as caffe\n", "caffe.set_mode_cpu()"
    ]  # fmt: skip
    assert ported["cells"][2]["source"] == "from netforge import layers as L"
    assert ported["nbformat"] == 4 and ported["cells"][1]["execution_count"] == 1
    assert tool.main([str(tmp_path / "missing.py")]) == 1
    assert "missing.py: No such file or directory" in capsys.readouterr().err
    (tmp_path / "broken.ipynb").write_text("{not json")
    assert tool.main([str(tmp_path / "broken.ipynb"), str(tmp_path / "out.ipynb")]) == 1
    assert "broken.ipynb" in capsys.readouterr().err and not (tmp_path / "out.ipynb").exists()


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("import caffe\n", "import netforge as caffe\n"),
        ("import caffe as cf\n", "import netforge as cf\n"),
        ("import caffe.io\n", "import netforge.io, netforge as caffe\n"),
        ("import caffe.proto.caffe_pb2 as pb2\n", "import netforge.proto.caffe_pb2 as pb2\n"),
        ("from caffe import layers as L\n", "from netforge import layers as L\n"),
        ("from caffe.proto import caffe_pb2\n", "from netforge.proto import caffe_pb2\n"),
        ("    import numpy, caffe  # a\n", "    import numpy, netforge as caffe  # a\n"),
        ("import sys; import caffe\n", "import sys; import netforge as caffe\n"),
        ("import caffeine\n", "import caffeine\n"),
        ("x = caffe.io.load_image(f)\n", "x = caffe.io.load_image(f)\n"),
        ("from caffe_tools import x\n", "from caffe_tools import x\n"),
    ],
)  # fmt: skip
def test_rewrite_changes_only_the_caffe_imports(line: str, expected: str) -> None:
    assert _rewrite()(line) == expected


def test_rewritten_source_runs(tmp_path: Path) -> None:
    source = _rewrite()("import caffe\nfrom caffe import layers as L\nprint(caffe.TEST, L)\n")
    result = subprocess.run([sys.executable, "-c", source], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("1 <netforge.net_spec.Layers")
    np.testing.assert_equal(netforge.TEST, 1)


def _notebooks():
    path = REPO / "tools" / "run_pycaffe_notebooks.py"
    spec = importlib.util.spec_from_file_location("run_pycaffe_notebooks", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_notebook_cells_become_python_3() -> None:
    tools = _notebooks()
    notes: list[str] = []
    cell = (
        "%matplotlib inline\n"
        "!data/get_mnist.sh \\\n    --quiet\n"
        "!./build/tools/caffe train -solver s.prototxt\n"
        "%timeit net.forward()\n"
        "for k, v in d.iteritems():\n    print k, v\n"
    )
    source = tools.rewrite_source(tools.python3(tools.strip_magics(cell, notes)))
    assert source == (
        "pass\n"
        "_run_netforge(['train', '-solver', 's.prototxt'])\n"
        "net.forward()\n"
        "for k, v in d.items():\n    print(k, v)\n"
    )
    assert notes == [
        "shell line skipped: `!data/get_mnist.sh \\`",
        "`!./build/tools/caffe train -solver s.prototxt` runs `netforge train -solver s.prototxt`",
    ]
    timed = tools.strip_magics("%%timeit\nsolver = make()\nsolver.solve()\n", [])
    namespace: dict = {"make": lambda: type("S", (), {"solve": lambda self: None})()}
    exec(timed, namespace)  # noqa: S102 (IPython runs %%timeit cells as a function body)
    assert "solver" not in namespace


def test_a_script_keeps_its_exit_status_and_traceback(tmp_path: Path) -> None:
    (tmp_path / "exits.py").write_text("import sys\nimport caffe\nsys.exit(3)\n")
    (tmp_path / "fails.py").write_text("import caffe\n\n\nraise ValueError('boom')\n")
    (tmp_path / "bad_net.py").write_text("import caffe\ncaffe.Net('missing.prototxt', 1)\n")

    def run(name: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "netforge", "pycaffe", name]
        return subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)

    assert run("exits.py").returncode == 3
    failed = run("fails.py")
    assert failed.returncode == 1
    assert failed.stderr.splitlines() == [
        "Traceback (most recent call last):",
        '  File "fails.py", line 4, in <module>',
        "    raise ValueError('boom')",
        "ValueError: boom",
    ]  # the script's frames only, as `python fails.py` shows them
    bad = run("bad_net.py")
    assert bad.returncode != 0 and "missing.prototxt" in bad.stderr
    assert "Traceback" not in bad.stderr  # netforge's own errors stay one line
    (tmp_path / "typo.py").write_text("import caffe\nx = (\n")
    typo = run("typo.py")
    assert typo.returncode == 1
    assert typo.stderr.splitlines()[0] == '  File "typo.py", line 2'  # no netforge frames
    assert typo.stderr.splitlines()[-1].startswith("SyntaxError: ")
