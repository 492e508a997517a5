"""Every manifest in zoo/ loads, names prototxts that exist and parse, and agrees with Caffe's
own readme front matter; the front-matter reader handles the YAML subset Caffe uses."""

from __future__ import annotations

import json

import pytest
from conftest import shared_path

from netforge.errors import ConfigError
from netforge.zoo import manifest as zm

MANIFESTS = sorted(zm.ZOO_DIR.glob("*.json"))
# Caffe's published table (inventory §6): folder -> (caffemodel, sha1, license).
BVLC = {
    "bvlc_alexnet": ("9116a64c0fbe4459d18f4bb6b56d647b63920377", "unrestricted"),
    "bvlc_googlenet": ("405fc5acd08a3bb12de8ee5e23a96bec22f08204", "unrestricted"),
    "bvlc_reference_caffenet": ("4c8d77deb20ea792f84eb5e6d0a11ca0a8660a46", "unrestricted"),
    "bvlc_reference_rcnn_ilsvrc13": ("bdd8abb885819cba5e2fe1eb36235f2319477e64", "unrestricted"),
    "finetune_flickr_style": ("b61b5cef7d771b53b0c488e78d35ccadc073e9cf", "non-commercial"),
}
# The models the issue asks for.
REQUIRED = {
    *BVLC,
    "squeezenet_v1.0",
    "squeezenet_v1.1",
    "vgg16",
    "vgg19",
    "resnet50",
    "resnet101",
    "resnet152",
    "mobilenet_v1",
    "mobilenet_v2",
    "densenet121",
}


def test_the_zoo_has_every_required_model():
    assert REQUIRED <= {p.stem for p in MANIFESTS}


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.stem)
def test_manifest_is_complete_and_safe(path):
    m = zm.read_json_manifest(path)
    assert m.name == path.stem
    assert m.licence
    assert m.has_file("weights")
    for entry in m.files:
        # Every file is verifiable; plain http only where a checksum protects it.
        assert entry.sha1 or entry.sha256, entry.name
        assert all(u.startswith(("https://", "http://")) for u in entry.urls)
    assert "deploy" in m.prototxts or m.has_file("deploy")
    for prototxt in m.prototxts.values():
        assert prototxt.is_file(), prototxt
        assert prototxt.resolve().is_relative_to(zm.ZOO_DIR.parent.resolve())
    pre = m.preprocessing
    if pre.mean_file:
        assert m.has_file(pre.mean_file)
    if pre.labels:
        assert m.has_file(pre.labels)


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.stem)
def test_manifest_prototxts_parse(path):
    from netforge.prototxt import read_net, read_solver

    for role, prototxt in zm.read_json_manifest(path).prototxts.items():
        if "solver" in role:
            assert read_solver(prototxt).base_lr > 0
        else:
            assert len(read_net(prototxt).layer) > 0


@pytest.mark.parametrize("folder", sorted(BVLC))
def test_caffe_model_folder_works_as_a_manifest(folder):
    m = zm.read_caffe_model_dir(shared_path("caffe-models", "models", folder))
    sha1, licence = BVLC[folder]
    weights = m.file("weights")
    assert m.name == folder
    assert weights.name == f"{folder}.caffemodel"
    assert weights.urls == (f"http://dl.caffe.berkeleyvision.org/{folder}.caffemodel",)
    assert weights.sha1 == sha1
    assert m.licence == licence
    assert m.prototxts["deploy"] == shared_path("caffe-models", "models", folder, "deploy.prototxt")
    # The zoo's own manifest carries the same published SHA-1 and licence.
    ours = zm.load_manifest(folder)
    assert ours.file("weights").sha1 == sha1
    assert ours.licence == licence


def test_front_matter_subset():
    text = """Some preamble
    ---
    name: "Quoted: name"
    sha1: 0123456789012345678901234567890123456789
    # a comment
    caffemodel_url: [http://a/x, 'http://b/x']
    tags:
      - one
      - 'two'
    empty_list: []
    ---
    body: not front matter
    """
    front = zm.parse_front_matter(text)
    assert front == {
        "name": "Quoted: name",
        "sha1": "0123456789012345678901234567890123456789",
        "caffemodel_url": ["http://a/x", "http://b/x"],
        "tags": ["one", "two"],
        "empty_list": [],
    }
    with pytest.raises(ConfigError, match="no front matter"):
        zm.parse_front_matter("no dashes here")
    with pytest.raises(ConfigError, match=r"readme.md:3"):
        zm.parse_front_matter("---\nname: x\nnot a pair\n---\n")


def test_front_matter_without_required_keys(tmp_path):
    (tmp_path / "readme.md").write_text("---\nname: x\ncaffemodel: x.caffemodel\n---\n")
    with pytest.raises(ConfigError, match="caffemodel_url, sha1"):
        zm.read_caffe_model_dir(tmp_path)


def test_load_manifest_by_path_and_unknown_name(tmp_path):
    data = json.loads((zm.ZOO_DIR / "bvlc_alexnet.json").read_text())
    data["prototxts"] = {}
    (tmp_path / "zoo").mkdir()
    (tmp_path / "zoo" / "mine.json").write_text(json.dumps({**data, "name": "mine"}))
    assert zm.load_manifest(tmp_path / "zoo" / "mine.json").name == "mine"
    with pytest.raises(ConfigError, match="no zoo model 'nope'.*bvlc_alexnet"):
        zm.load_manifest("nope")


@pytest.mark.parametrize(
    "change, message",
    [
        (
            {"files": [{"role": "weights", "name": "w", "urls": ["ftp://x/w"], "sha1": "a" * 40}]},
            "not http",
        ),
        (
            {"files": [{"role": "weights", "name": "w", "urls": ["https://x/w"], "sha1": "abc"}]},
            "not a hex SHA1",
        ),
        ({"files": [{"role": "weights", "name": "w", "urls": []}]}, "non-empty list"),
        # a negative size read the whole response, however long (read(-n) is read-all)
        (
            {"files": [{"role": "w", "name": "w", "urls": ["https://x/w"], "size": -1}]},
            "'size' is -1; it must be >= 0",
        ),
        ({"prototxts": {"deploy": "../outside.prototxt"}}, "inside the repository"),
        ({"prototxts": {"deploy": "/etc/deploy.prototxt"}}, "inside the repository"),
        ({"preprocessing": {"mean_file": "nothing"}}, "no file has"),
        ({"preprocessing": {"channel_swap": [0, 0, 1]}}, "permutation"),
        ({"preprocessing": {"crop": 3}}, "unknown keys"),
        ({"licence": 3}, "wrong type"),
    ],
)
def test_invalid_manifests_are_rejected(change, message):
    data = {
        "name": "m",
        "licence": "l",
        "files": [{"role": "weights", "name": "w", "urls": ["https://x/w"], "sha256": "0" * 64}],
        **change,
    }
    with pytest.raises(ConfigError, match=message):
        zm.parse_manifest(data)
