"""Zoo manifests: what a model is made of, where its files live, and how to feed it.

A manifest is one JSON file in the repository's ``zoo/`` folder (``zoo/<name>.json``)::

    {"name": "bvlc_alexnet", "title": "...", "licence": "unrestricted", "source": "...",
     "prototxts": {"deploy": "models/bvlc_alexnet/deploy.prototxt", ...},
     "files": [{"role": "weights", "name": "bvlc_alexnet.caffemodel",
                "urls": ["http://...", "https://..."], "sha1": "...", "sha256": "...",
                "size": 243862414}, ...],
     "preprocessing": {"resize": [256, 256], "mean_file": "mean", "raw_scale": 255,
                       "channel_swap": [2, 1, 0], "labels": "labels"},
     "notes": "..."}

``prototxts`` paths are relative to the repository root (the folder that holds ``zoo/``).
Preprocessing names files by their role (``"mean_file": "mean"``).

Caffe's own model folders work too: their ``readme.md`` front matter (the ``key: value``
lines between two ``---`` lines, read as Caffe's ``download_model_binary.py`` reads them)
gives the name, the ``caffemodel`` file, its ``caffemodel_url`` and ``sha1``, and the
licence; the folder's ``*.prototxt`` files are its prototxts.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from netforge.errors import ConfigError, DataError


def _data_root() -> Path:
    """The folder holding ``zoo/`` and ``models/``: ``netforge/_data`` in an installed wheel
    (setup.py copies them there), else the source tree beside the package (a checkout or an
    editable install)."""
    package = Path(__file__).resolve().parents[1]
    installed = package / "_data"
    return installed if (installed / "zoo").is_dir() else package.parent


#: The manifest folder (the repository's top-level ``zoo/``, or the installed copy).
ZOO_DIR = _data_root() / "zoo"
#: Caffe's model folders the manifests' prototxts live in (``models/`` beside ``zoo/``).
MODELS_DIR = ZOO_DIR.parent / "models"

_HEX = re.compile(r"[0-9a-f]+")
_DIGEST_LENGTHS = {"sha1": 40, "sha256": 64}
# A file or model name is one plain path component: no separators, no drive, no dot-names.
_SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*")


def check_safe_name(name: str, what: str, where: str) -> str:
    """Return ``name`` if it is one plain file name; a manifest may not name anything else.

    Rejects separators (``/``, ``\\``), ``..``, absolute paths, drive letters and empty or
    hidden names, so that no manifest can make netforge write outside its folder.
    """
    if not isinstance(name, str) or not _SAFE_NAME.fullmatch(name) or ".." in name:
        raise ConfigError(
            f"{where}: {what} {name!r} is not a plain file name (letters, digits, '_', '.', "
            "'+', '-'; no path separators or '..'); a manifest may only name files inside "
            "its own folder"
        )
    return name


@dataclass(frozen=True)
class ZooFile:
    """One downloadable file of a model: its role, file name, mirrors and checksums."""

    role: str
    name: str
    urls: tuple[str, ...]
    sha1: str | None = None
    sha256: str | None = None
    size: int | None = None

    @property
    def has_checksum(self) -> bool:
        return self.sha1 is not None or self.sha256 is not None


@dataclass(frozen=True)
class Preprocessing:
    """How pycaffe's ``classify.py`` / ``caffe.io.Transformer`` prepare an image for the net.

    ``resize`` is the (H, W) the image is resized to before the centre crop to the net's
    input (``classify.py --images_dim``); ``None`` resizes straight to the net's input.
    ``mean_file`` names the role of a mean file (``.npy`` or ``.binaryproto``) whose
    per-channel mean is subtracted, ``mean_values`` gives that mean directly (in the
    net's channel order, as Caffe's ``transform_param.mean_value``). ``raw_scale``
    multiplies the [0, 1] image before the mean is subtracted, ``scale`` multiplies after
    (``input_scale``), ``channel_swap`` reorders RGB into the net's order.
    """

    input_size: tuple[int, int] | None = None
    resize: tuple[int, int] | None = None
    mean_file: str | None = None
    mean_values: tuple[float, ...] | None = None
    raw_scale: float = 255.0
    scale: float = 1.0
    channel_swap: tuple[int, ...] = (2, 1, 0)
    labels: str | None = None


@dataclass(frozen=True)
class Manifest:
    """A zoo model: its files, prototxts (absolute paths), licence and preprocessing."""

    name: str
    title: str
    licence: str
    files: tuple[ZooFile, ...]
    prototxts: dict[str, Path] = field(default_factory=dict)
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    source: str = ""
    notes: str = ""
    path: Path | None = None

    def file(self, role: str) -> ZooFile:
        """The file with this role; a ConfigError if the manifest has none."""
        for entry in self.files:
            if entry.role == role:
                return entry
        raise ConfigError(f"zoo model {self.name!r} has no {role!r} file")

    def has_file(self, role: str) -> bool:
        return any(entry.role == role for entry in self.files)


# -- JSON manifests ----------------------------------------------------------------------
def _get(data: dict, key: str, kind: type | tuple[type, ...], where: str, default: Any = ...):
    if key not in data:
        if default is ...:
            raise ConfigError(f"{where}: missing required key {key!r}")
        return default
    value = data[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise ConfigError(f"{where}: {key!r} has the wrong type ({type(value).__name__})")
    return value


def _digest(data: dict, key: str, where: str) -> str | None:
    value = _get(data, key, str, where, None)
    if value is None:
        return None
    value = value.lower()
    if len(value) != _DIGEST_LENGTHS[key] or not _HEX.fullmatch(value):
        raise ConfigError(f"{where}: {key} {value!r} is not a hex {key.upper()} digest")
    return value


def _zoo_file(data: Any, where: str) -> ZooFile:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: each entry of 'files' must be an object")
    name = check_safe_name(_get(data, "name", str, where), "file name", where)
    where = f"{where} (file {name!r})"
    urls = _get(data, "urls", list, where)
    if not urls or not all(isinstance(u, str) for u in urls):
        raise ConfigError(f"{where}: 'urls' must be a non-empty list of strings")
    entry = ZooFile(
        role=_get(data, "role", str, where),
        name=name,
        urls=tuple(urls),
        sha1=_digest(data, "sha1", where),
        sha256=_digest(data, "sha256", where),
        size=_get(data, "size", int, where, None),
    )
    if entry.size is not None and entry.size < 0:
        raise ConfigError(f"{where}: 'size' is {entry.size}; it must be >= 0 (bytes)")
    for url in entry.urls:
        scheme = url.split(":", 1)[0].lower()
        if scheme == "http" and not entry.has_checksum:
            raise ConfigError(
                f"{where}: plain http URL {url!r} without a checksum; a file fetched over "
                "http can only be trusted through a sha1/sha256 in the manifest"
            )
        if scheme not in ("http", "https"):
            raise ConfigError(f"{where}: URL {url!r} is not http(s)")
    return entry


def _pair(value: Any, key: str, where: str) -> tuple[int, int] | None:
    if value is None:
        return None
    if (
        not isinstance(value, list)
        or len(value) != 2
        or not all(isinstance(v, int) and v > 0 for v in value)
    ):
        raise ConfigError(f"{where}: preprocessing {key!r} must be [height, width]")
    return (value[0], value[1])


def _preprocessing(data: Any, roles: set[str], where: str) -> Preprocessing:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: 'preprocessing' must be an object")
    where = f"{where} (preprocessing)"
    known = {f for f in Preprocessing.__dataclass_fields__}
    unknown = set(data) - known
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)}; known: {sorted(known)}")
    for key in ("mean_file", "labels"):
        role = data.get(key)
        if role is not None and role not in roles:
            raise ConfigError(f"{where}: {key} names role {role!r}, which no file has")
    mean_values = data.get("mean_values")
    if mean_values is not None:
        if not isinstance(mean_values, list) or not all(
            isinstance(v, (int, float)) for v in mean_values
        ):
            raise ConfigError(f"{where}: 'mean_values' must be a list of numbers")
        mean_values = tuple(float(v) for v in mean_values)
    if mean_values is not None and data.get("mean_file") is not None:
        raise ConfigError(f"{where}: give either 'mean_file' or 'mean_values', not both")
    swap = data.get("channel_swap", [2, 1, 0])
    if not isinstance(swap, list) or sorted(swap) != list(range(len(swap))):
        raise ConfigError(f"{where}: 'channel_swap' must be a permutation such as [2, 1, 0]")
    return Preprocessing(
        input_size=_pair(data.get("input_size"), "input_size", where),
        resize=_pair(data.get("resize"), "resize", where),
        mean_file=data.get("mean_file"),
        mean_values=mean_values,
        raw_scale=float(_get(data, "raw_scale", (int, float), where, 255.0)),
        scale=float(_get(data, "scale", (int, float), where, 1.0)),
        channel_swap=tuple(swap),
        labels=data.get("labels"),
    )


def parse_manifest(data: Any, path: Path | None = None, root: Path | None = None) -> Manifest:
    """Validate a manifest's JSON object; prototxt paths are resolved against ``root``."""
    where = str(path) if path else "zoo manifest"
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: a manifest is a JSON object")
    name = check_safe_name(_get(data, "name", str, where), "model name", where)
    files = tuple(_zoo_file(f, where) for f in _get(data, "files", list, where))
    names = [f.name for f in files]
    if len(set(names)) != len(names):
        raise ConfigError(f"{where}: two files have the same name")
    root = root if root is not None else ZOO_DIR.parent
    prototxts = {}
    for role, rel in _get(data, "prototxts", dict, where, {}).items():
        if not isinstance(rel, str) or Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise ConfigError(f"{where}: prototxt {role!r} must be a path inside the repository")
        prototxts[role] = root / rel
    return Manifest(
        name=name,
        title=_get(data, "title", str, where, name),
        licence=_get(data, "licence", str, where),
        files=files,
        prototxts=prototxts,
        preprocessing=_preprocessing(data.get("preprocessing", {}), {f.role for f in files}, where),
        source=_get(data, "source", str, where, ""),
        notes=_get(data, "notes", str, where, ""),
        path=path,
    )


def read_json_manifest(path: str | Path) -> Manifest:
    """Load and validate one ``zoo/<name>.json`` file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read zoo manifest {path}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}); not a manifest") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}") from exc
    return parse_manifest(data, path, path.resolve().parent.parent)


# -- Caffe readme.md front matter ------------------------------------------------------------
def _scalar(text: str) -> Any:
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    return text


def parse_front_matter(text: str, where: str = "readme.md") -> dict[str, Any]:
    """The YAML front matter of a Caffe model ``readme.md``, as a dict.

    Like Caffe's ``download_model_binary.py``: strip each line, take the lines between the
    first ``---`` and the next. Only the YAML subset Caffe's readmes use is read: ``key:
    value`` scalars (optionally quoted), inline lists ``[a, b]``, and block lists of
    ``- item`` lines under a ``key:`` with no value. Values stay strings (a SHA-1 of all
    digits must not become a number), and ``#`` starts a comment only at a line's start.
    """
    lines = [line.strip() for line in text.splitlines()]
    try:
        start = lines.index("---")
        end = lines.index("---", start + 1)
    except ValueError:
        raise ConfigError(f"{where}: no front matter (lines between two '---' lines)") from None
    result: dict[str, Any] = {}
    current_list: list | None = None
    for number, line in enumerate(lines[start + 1 : end], start=start + 2):
        if not line or line.startswith("#"):
            continue
        if line.startswith("- ") or line == "-":
            if current_list is None:
                raise ConfigError(f"{where}:{number}: list item outside a list")
            current_list.append(_scalar(line[1:]))
            continue
        key, sep, value = line.partition(":")
        if not sep or not key.strip():
            raise ConfigError(f"{where}:{number}: expected 'key: value', got {line!r}")
        key, value = key.strip(), value.strip()
        current_list = None
        if not value:
            current_list = result[key] = []
        elif value.startswith("[") and value.endswith("]"):
            inner = value[1:-1].strip()
            result[key] = [_scalar(v) for v in inner.split(",")] if inner else []
        else:
            result[key] = _scalar(value)
    return result


def read_caffe_model_dir(folder: str | Path) -> Manifest:
    """A manifest from a Caffe model folder (``readme.md`` front matter + its prototxts).

    Requires the keys ``download_model_binary.py`` requires: ``caffemodel``,
    ``caffemodel_url`` and ``sha1``. The model's name is the folder's name, as Caffe's
    scripts address models by folder.
    """
    folder = Path(folder)
    readme = folder / "readme.md"
    try:
        text = readme.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read {readme}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{readme}: not UTF-8 text (byte {exc.start})") from None
    front = parse_front_matter(text, str(readme))
    missing = [k for k in ("caffemodel", "caffemodel_url", "sha1") if k not in front]
    if missing:
        raise ConfigError(f"{readme}: front matter lacks {', '.join(missing)}")
    urls = front["caffemodel_url"]
    data = {
        "name": folder.resolve().name,
        "title": front.get("name", folder.name),
        "licence": front.get("license", "unknown (not stated in readme.md)"),
        "files": [
            {
                "role": "weights",
                "name": front["caffemodel"],
                "urls": urls if isinstance(urls, list) else [urls],
                "sha1": front["sha1"],
            }
        ],
        "source": str(folder),
    }
    manifest = parse_manifest(data, readme, folder)
    prototxts = {p.stem: p for p in sorted(folder.glob("*.prototxt"))}
    return Manifest(**{**manifest.__dict__, "prototxts": prototxts})


# -- lookup --------------------------------------------------------------------------------
def _manifest_paths(folder: Path) -> list[Path]:
    """The zoo's manifest files, sorted; an install without them must not look like a zoo
    with no models, so none at all is an error."""
    paths = sorted(folder.glob("*.json"))
    if not paths:
        raise DataError(
            f"the zoo is empty: no manifests (*.json) in {folder}; this netforge was installed "
            "without its zoo: reinstall it from a wheel or a source checkout"
        )
    return paths


def list_manifests(zoo_dir: Path | None = None) -> list[Manifest]:
    """Every manifest in the zoo folder, sorted by name."""
    return [read_json_manifest(p) for p in _manifest_paths(zoo_dir or ZOO_DIR)]


def load_manifest(name: str | Path, zoo_dir: Path | None = None) -> Manifest:
    """Find a model by zoo name, by a path to a manifest ``.json``, or by a Caffe model
    folder (one with a ``readme.md``)."""
    folder = zoo_dir or ZOO_DIR
    path = Path(name)
    # os.path, not pathlib: a name too long for the file system is False, not an OSError.
    if path.suffix == ".json" and os.path.isfile(path):
        return read_json_manifest(path)
    if os.path.isdir(path) and os.path.isfile(path / "readme.md"):
        return read_caffe_model_dir(path)
    if _SAFE_NAME.fullmatch(str(name)):
        candidate = folder / f"{name}.json"
        if os.path.isfile(candidate):
            return read_json_manifest(candidate)
    known = ", ".join(p.stem for p in _manifest_paths(folder))
    raise ConfigError(
        f"no zoo model {str(name)!r}: not in {folder} (known: {known}), "
        "not a manifest .json, and not a Caffe model folder with a readme.md"
    )
