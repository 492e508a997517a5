"""Run BVLC Caffe's own pycaffe unit tests (``python/caffe/test/*.py``) against netforge.

    python tools/run_pycaffe_tests.py /path/to/caffe [pytest args...]

The tests are copied from the Caffe checkout (nothing is fetched) into a temporary folder
with ``tools/pycaffe_rewrite.py``'s import rewrite applied, run there with pytest (they are
unittest test cases; some write files into the working directory), and the counts are
printed per module and in total. Tests that need a GPU or NCCL skip themselves, as in Caffe.
The exit status is pytest's.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

from pycaffe_rewrite import rewrite_source


def copy_tests(caffe_root: Path, target: Path) -> Path:
    """Copy the pycaffe tests of ``caffe_root`` into ``target/python/caffe/test``, rewritten,
    beside links to the checkout's ``models`` and ``examples`` (test_draw finds the
    prototxts it draws three folders up from itself). Returns the tests' folder."""
    source = caffe_root / "python" / "caffe" / "test"
    if not source.is_dir():
        raise SystemExit(f"{caffe_root}: no python/caffe/test folder; point at a Caffe checkout")
    tests = target / "python" / "caffe" / "test"
    tests.mkdir(parents=True)
    for folder in ("models", "examples"):
        (target / folder).symlink_to(caffe_root / folder, target_is_directory=True)
    for path in sorted(source.glob("*.py")):
        (tests / path.name).write_text(rewrite_source(path.read_text()))
    return tests


def outcome_counts(report: Path) -> dict[str, Counter]:
    """Per test module: passed, failed, error and skipped counts from a JUnit XML report."""
    counts: dict[str, Counter] = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        module = (case.get("classname") or case.get("name", "?")).split(".")[0]
        kinds = {child.tag for child in case}
        outcome = next((k for k in ("error", "failure", "skipped") if k in kinds), "passed")
        counts.setdefault(module, Counter())[outcome] += 1
    return counts


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    caffe_root = Path(argv[0]).resolve()
    with tempfile.TemporaryDirectory(prefix="pycaffe_tests_") as folder:
        work = copy_tests(caffe_root, Path(folder))
        report = Path(folder) / "report.xml"
        command = [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-rfEs",
            "--continue-on-collection-errors",
            "-p",
            "no:cacheprovider",
            "-o",
            "addopts=",
            f"--rootdir={work}",
            f"--junitxml={report}",
            *argv[1:],
            ".",
        ]
        status = subprocess.call(command, cwd=work)
        if not report.exists():
            return status
        counts = outcome_counts(report)
        total: Counter = Counter()
        print("\npycaffe test modules (passed / failed / errors / skipped):")
        for module, count in sorted(counts.items()):
            total.update(count)
            print(
                f"  {module:40s} {count['passed']:3d} / {count['failure']:3d} / "
                f"{count['error']:3d} / {count['skipped']:3d}"
            )
        print(
            f"  {'total':40s} {total['passed']:3d} / {total['failure']:3d} / "
            f"{total['error']:3d} / {total['skipped']:3d}"
        )
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
