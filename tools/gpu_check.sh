#!/usr/bin/env bash
# The one script a session with a GPU runs to verify issue 7: netforge's GPU test subset, the
# device query, and the CaffeNet/GoogLeNet training benchmark against PyTorch.
#
# Usage, from anywhere in a plain checkout (no install, no network):
#   tools/gpu_check.sh [STAGES] [-- BENCH_ARGS...]
# STAGES is a comma list of deps, tests, query, bench (default: all four, in that order).
# BENCH_ARGS go to tools/bench_gpu.py (e.g. --rounds 5 --seconds 10).
#
# Environment:
#   PYTHON            the interpreter (default: python3, the one that holds cupy and PyTorch)
#   NETFORGE_WHEELS   a folder of wheels for what the interpreter lacks (default: .whl); they are
#                     installed with --no-index into $NETFORGE_SITE (default: /tmp/netforge-site)
#   OUT               where logs and bench_gpu.json go (the device tool's output folder);
#                     default: runs/gpu_check
#
# On the lent H200 the image lacks lmdb and has an older protobuf; make the wheels once on a
# machine with pip and network, in the repository root:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux2014_x86_64 -d .whl protobuf==7.36.2 lmdb==3.0.0
# then carry .whl with the command. A 10-minute call fits "deps,tests,query" or "deps,bench"
# comfortably; run the two as separate calls if the tests are slow on a cold kernel cache.
#
# Exit status: 0 when every stage run passed; otherwise that of the first stage that failed
# (3: imports missing, as printed).

set -u -o pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
WHEELS=${NETFORGE_WHEELS:-$ROOT/.whl}
SITE=${NETFORGE_SITE:-/tmp/netforge-site}
OUT=${OUT:-$ROOT/runs/gpu_check}
STAGES=deps,tests,query,bench
if [[ $# -gt 0 && $1 != -- ]]; then
    STAGES=$1
    shift
fi
[[ ${1:-} == -- ]] && shift
mkdir -p "$OUT"
# cupy turns TF32 on only when CUPY_TF32=1; pin it off so the float32 figures are float32.
export CUPY_TF32=0 PYTHONUNBUFFERED=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
[[ -d $SITE ]] && export PYTHONPATH="$SITE:$PYTHONPATH"
status=0

note() { printf '\n=== %s ===\n' "$*"; }

# Prints "module pip-requirement" for each import netforge's GPU check needs and lacks
# (a version too old counts as missing).
missing_imports() {
    "$PY" - <<'EOF'
import importlib
import importlib.metadata

NEEDED = [
    # module, distribution, pip requirement, minimum version (None: any)
    ("numpy", "numpy", "numpy>=2", (2,)),
    ("google.protobuf", "protobuf", "protobuf>=7.35,<8", (7, 35)),
    ("h5py", "h5py", "h5py>=3.10", (3, 10)),
    ("lmdb", "lmdb", "lmdb>=1.4", (1, 4)),
    ("click", "click", "click>=8.1", (8, 1)),
    ("PIL", "pillow", "Pillow>=10", (10,)),
    ("pytest", "pytest", "pytest>=8", (8,)),
    ("cupy", None, "cupy-cuda13x>=14 (or cupy-cuda12x)", (13,)),
]
OPTIONAL = [("torch", "torch", "torch (the bench compares with it; --no-torch without)", None)]


def version_tuple(text):
    parts = []
    for piece in text.split("+")[0].split(".")[:2]:
        digits = "".join(c for c in piece if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


for entry in NEEDED + OPTIONAL:
    module, dist, requirement, minimum = entry
    prefix = "optional " if entry in OPTIONAL else ""
    try:
        found = importlib.import_module(module)
    except Exception as exc:  # ImportError, or a broken binary extension
        print(f"{prefix}{module} {requirement}: not importable ({type(exc).__name__}: {exc})")
        continue
    try:
        # cupy's distribution name depends on the CUDA version; it states its own.
        version = found.__version__ if dist is None else importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        version = "0"
    if minimum is not None and version_tuple(version) < minimum:
        print(f"{prefix}{module} {requirement}: found {version}")
EOF
}

stage_deps() {
    note "deps: $("$PY" --version 2>&1) at $(command -v "$PY")"
    local missing
    missing=$(missing_imports | grep -v '^optional')
    if [[ -n $missing && -d $WHEELS ]] && compgen -G "$WHEELS/*.whl" >/dev/null; then
        echo "missing:"
        echo "$missing" | sed 's/^/  /'
        echo "installing the wheels of $WHEELS into $SITE (--no-index --no-deps)"
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$SITE" "$WHEELS"/*.whl || return 3
        export PYTHONPATH="$SITE:$PYTHONPATH"
        missing=$(missing_imports | grep -v '^optional')
    fi
    if [[ -n $missing ]]; then
        echo "missing (netforge cannot be checked until these import):"
        echo "$missing" | sed 's/^/  /'
        echo "carry wheels for them in $WHEELS (see the header of tools/gpu_check.sh)"
        return 3
    fi
    missing_imports | grep '^optional' | sed 's/^/  /'
    "$PY" -c 'import cupy; cupy.cuda.runtime.getDeviceCount()' || {
        echo "cupy imports but sees no CUDA device"
        return 3
    }
    echo "all imports present"
}

stage_tests() {
    # -m gpu selects every test that runs on cupy: the layer tests through the backend fixture,
    # the conformance models on the cupy backend, and tests/test_gpu_*.py.
    note "tests: pytest -m gpu"
    local workers=()
    "$PY" -c 'import xdist' 2>/dev/null && workers=(-n 4)
    "$PY" -m pytest -m gpu -q -rfEs -p no:cacheprovider "${workers[@]}" tests \
        2>&1 | tee "$OUT/gpu_tests.log"
}

stage_query() {
    note "query: netforge device-query --gpu 0"
    "$PY" -m netforge device-query --gpu 0 2>&1 | tee "$OUT/device_query.log"
}

stage_bench() {
    note "bench: tools/bench_gpu.py $*"
    "$PY" tools/bench_gpu.py --json "$OUT/bench_gpu.json" "$@" 2>&1 | tee "$OUT/bench_gpu.log"
}

IFS=, read -r -a wanted <<<"$STAGES"
for stage in "${wanted[@]}"; do
    case $stage in
    deps) stage_deps ;;
    tests) stage_tests ;;
    query) stage_query ;;
    bench) stage_bench "$@" ;;
    *)
        echo "gpu_check: unknown stage '$stage' (use deps, tests, query, bench)" >&2
        exit 2
        ;;
    esac
    rc=$?
    echo "--- $stage: exit $rc"
    if [[ $rc -ne 0 && $status -eq 0 ]]; then
        status=$rc
    fi
    # Nothing else can run without the imports.
    [[ $stage == deps && $rc -ne 0 ]] && break
done
exit $status
