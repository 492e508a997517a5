"""The model zoo: manifests of pretrained Caffe models and verified downloads of their files.

``fetch_weights("bvlc_alexnet")`` is what ``--weights zoo:bvlc_alexnet`` resolves to
(``netforge.weights.resolve_weights``): the model's ``.caffemodel`` in the user's cache,
downloaded and checked on first use. ``preprocessing(name)`` says how to prepare images
for it (pycaffe's ``classify.py`` settings).
"""

from __future__ import annotations

from pathlib import Path

from netforge.zoo.download import (
    cache_dir,
    download_file,
    download_model,
    model_dir,
    terminal_progress,
    verify_file,
)
from netforge.zoo.manifest import (
    MODELS_DIR,
    ZOO_DIR,
    Manifest,
    Preprocessing,
    ZooFile,
    list_manifests,
    load_manifest,
    parse_front_matter,
    read_caffe_model_dir,
)


def fetch_file(name: str, role: str, *, timeout: float = 60.0) -> Path:
    """The cached file of ``role`` for zoo model ``name``, downloaded and verified if needed."""
    manifest = load_manifest(name)
    entry = manifest.file(role)
    with terminal_progress(entry) as report:
        return download_file(entry, model_dir(manifest), timeout=timeout, progress=report)


def fetch_weights(name: str, *, timeout: float = 60.0) -> Path:
    """The cached ``.caffemodel`` of zoo model ``name`` (``--weights zoo:NAME``)."""
    return fetch_file(name, "weights", timeout=timeout)


def preprocessing(name: str) -> Preprocessing:
    """The image preprocessing zoo model ``name`` was trained with."""
    return load_manifest(name).preprocessing


__all__ = [
    "MODELS_DIR",
    "ZOO_DIR",
    "Manifest",
    "Preprocessing",
    "ZooFile",
    "cache_dir",
    "download_file",
    "download_model",
    "fetch_file",
    "fetch_weights",
    "list_manifests",
    "load_manifest",
    "model_dir",
    "parse_front_matter",
    "preprocessing",
    "read_caffe_model_dir",
    "terminal_progress",
    "verify_file",
]
