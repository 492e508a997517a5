"""``netforge device-query``: the CPU's BLAS with a measured GEMM rate, and any GPUs."""

from __future__ import annotations

import json

import click

from netforge.backend import parse_gpu_ids
from netforge.device import query
from netforge.errors import DeviceError


@click.command("device-query")
@click.option("--gpu", "gpu_ids", default="", help="Require these GPU ids (comma list or 'all').")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def device_query(gpu_ids: str, as_json: bool) -> None:
    """Report numpy's BLAS (library, kernels, float32 GEMM GFLOP/s) and CUDA GPUs."""
    named: set[int] = set()
    if gpu_ids and gpu_ids != "all":
        named = set(parse_gpu_ids(gpu_ids))
    report = query()
    if gpu_ids:
        present = {g["id"] for g in report["gpus"]}
        wanted = present if gpu_ids == "all" else named
        missing = sorted(wanted - present) if present else sorted(wanted) or ["any"]
        if missing or not present:
            raise DeviceError(
                f"GPU {', '.join(map(str, missing))} not available: "
                + (
                    "no CUDA GPU usable through cupy"
                    if not present
                    else f"present: {sorted(present)}"
                )
            )
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    blas = report["blas"]
    click.echo(f"Python {report['python']} on {report['machine']}, {report['cpu_count']} CPU(s)")
    click.echo(f"numpy {report['numpy']} with {blas['library']} {blas['version']}")
    if blas.get("core_type"):
        click.echo(f"  OpenBLAS kernels in use: {blas['core_type']}")
    if blas["adjusted_from"] is not None:
        click.echo(
            f"  OPENBLAS_CORETYPE raised from {blas['adjusted_from'] or '(unset)'} to "
            f"{blas['OPENBLAS_CORETYPE']} by netforge (NETFORGE_BLAS_CORETYPE=keep to stop)"
        )
    elif blas["OPENBLAS_CORETYPE"]:
        click.echo(f"  OPENBLAS_CORETYPE={blas['OPENBLAS_CORETYPE']}")
    if blas["thread_timeout_set_by_netforge"]:
        click.echo(
            f"  OPENBLAS_THREAD_TIMEOUT={blas['OPENBLAS_THREAD_TIMEOUT']} set by netforge "
            "(idle BLAS threads sleep instead of spinning)"
        )
    click.echo(f"  float32 GEMM (1024^3): {report['gemm_gflops_float32']:.1f} GFLOP/s")
    jit = report["jit"]
    if jit["enabled"]:
        click.echo(f"compiled CPU kernels: numba {jit['numba']} ({_jit_note(jit)})")
    else:
        click.echo(f"compiled CPU kernels: off ({jit.get('reason') or _jit_note(jit)})")
    if not report["gpus"]:
        click.echo("GPU: none (cupy not installed or no CUDA device)")
    for gpu in report["gpus"]:
        click.echo(
            f"GPU {gpu['id']}: {gpu['name']}, compute capability {gpu['compute_capability']}, "
            f"{gpu['memory_total_gib']:.1f} GiB ({gpu['memory_free_gib']:.1f} free), "
            f"driver {gpu['driver_version']}, CUDA runtime {gpu['runtime_version']}, "
            f"cupy {gpu['cupy_version']}"
        )


def _jit_note(jit: dict) -> str:
    """Why the compiled kernels are on or off, for ``device-query``'s line."""
    if jit["enabled"]:
        return f"NETFORGE_JIT={jit['setting']}; 0 turns them off"
    if jit["numba"] is None and jit["setting"].lower() not in ("0", "off", "false", "no"):
        return "numba is not installed: pip install 'netforge[jit]'"
    return f"NETFORGE_JIT={jit['setting']}"
