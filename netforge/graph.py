"""Static graph transforms applied before a Net is built, as Caffe's Net::Init does:
NetState filtering (include/exclude rules) and automatic Split insertion."""

from __future__ import annotations

from collections import defaultdict

from netforge.errors import ConfigError
from netforge.proto import pb


def state_meets_rule(state: pb.NetState, rule: pb.NetStateRule) -> bool:
    """Caffe's StateMeetsRule: phase, level range, required stages and forbidden stages."""
    if rule.HasField("phase") and rule.phase != state.phase:
        return False
    if rule.HasField("min_level") and state.level < rule.min_level:
        return False
    if rule.HasField("max_level") and state.level > rule.max_level:
        return False
    stages = set(state.stage)
    if any(stage not in stages for stage in rule.stage):
        return False
    return not any(stage in stages for stage in rule.not_stage)


def filter_net(net: pb.NetParameter, state: pb.NetState) -> pb.NetParameter:
    """A copy of ``net`` keeping only the layers whose include/exclude rules admit ``state``."""
    filtered = pb.NetParameter()
    filtered.CopyFrom(net)
    del filtered.layer[:]
    for layer in net.layer:
        if layer.include and layer.exclude:
            raise ConfigError(
                f"layer {layer.name!r}: give either include or exclude rules, not both"
            )
        if layer.include:
            keep = any(state_meets_rule(state, rule) for rule in layer.include)
        else:
            keep = not any(state_meets_rule(state, rule) for rule in layer.exclude)
        if keep:
            filtered.layer.add().CopyFrom(layer)
    return filtered


def split_layer_name(blob: str, layer: str, top_index: int) -> str:
    return f"{blob}_{layer}_{top_index}_split"


def split_blob_name(blob: str, layer: str, top_index: int, split_index: int) -> str:
    return f"{blob}_{layer}_{top_index}_split_{split_index}"


def insert_splits(net: pb.NetParameter) -> pb.NetParameter:
    """A copy of ``net`` with a Split layer after every top read by more than one bottom.

    A top that carries a loss weight counts as one more reader, and its weight moves to the
    first split output. Names follow Caffe's insert_splits.cpp, so caffemodels match.
    """
    producer: dict[str, tuple[int, int]] = {}  # blob -> (layer index, top index) last writer
    readers: dict[tuple[int, int], int] = defaultdict(int)
    reader_of: dict[tuple[int, int], tuple[int, int]] = {}  # (layer, bottom) -> producer
    for i, layer in enumerate(net.layer):
        for j, blob in enumerate(layer.bottom):
            if blob not in producer:
                raise ConfigError(
                    f"layer {layer.name!r} ({layer.type}): unknown bottom blob {blob!r}: "
                    "no earlier layer produces it (check the name and the layer order)"
                )
            readers[producer[blob]] += 1
            reader_of[(i, j)] = producer[blob]
        for j, blob in enumerate(layer.top):
            producer[blob] = (i, j)
        for j in range(min(len(layer.loss_weight), len(layer.top))):
            if layer.loss_weight[j] != 0:
                readers[(i, j)] += 1

    split = pb.NetParameter()
    split.CopyFrom(net)
    del split.layer[:]
    used: dict[tuple[int, int], int] = defaultdict(int)
    for i, layer in enumerate(net.layer):
        new = split.layer.add()
        new.CopyFrom(layer)
        for j, blob in enumerate(layer.bottom):
            source = reader_of[(i, j)]
            if readers[source] > 1:
                src_layer = net.layer[source[0]]
                new.bottom[j] = split_blob_name(blob, src_layer.name, source[1], used[source])
                used[source] += 1
        for j, blob in enumerate(layer.top):
            count = readers.get((i, j), 0)
            if count <= 1:
                continue
            splitter = split.layer.add()
            splitter.name = split_layer_name(blob, layer.name, j)
            splitter.type = "Split"
            splitter.bottom.append(blob)
            for k in range(count):
                splitter.top.append(split_blob_name(blob, layer.name, j, k))
            if j < len(layer.loss_weight) and layer.loss_weight[j] != 0:
                splitter.loss_weight.append(layer.loss_weight[j])
                splitter.loss_weight.extend([0.0] * (count - 1))
                del new.loss_weight[:]  # Caffe clears all of the producer's weights
                used[(i, j)] += 1  # split output 0 carries the loss, not a reader
    return split


#: data layers that read a source, and the parameter message holding their batch size
DATA_LAYER_PARAMS = {
    "Data": "data_param",
    "ImageData": "image_data_param",
    "HDF5Data": "hdf5_data_param",
    "WindowData": "window_data_param",
    "MemoryData": "memory_data_param",
}


def replace_data_layers(
    net: pb.NetParameter,
    item_shape: tuple[int, ...],
    *,
    batch: int | None = None,
    kind: str = "Input",
) -> tuple[pb.NetParameter, list[str]]:
    """A copy of ``net`` whose data layers are ``Input`` (or constant ``DummyData``) layers
    with the same name, phase rules and tops: top 0 of shape (batch, *item_shape), the others
    (batch,). ``batch`` defaults to each layer's own batch_size. For timing, benchmarks and
    shape checks of nets whose data is not at hand. Returns the copy and the replaced names.
    """
    if kind not in ("Input", "DummyData"):
        raise ConfigError(f"data layers can be replaced by Input or DummyData, not {kind!r}")
    out = pb.NetParameter()
    out.CopyFrom(net)
    replaced = []
    for layer in out.layer:
        field = DATA_LAYER_PARAMS.get(layer.type)
        if field is None:
            continue
        size = batch or getattr(layer, field).batch_size
        if size <= 0:
            raise ConfigError(f"data layer {layer.name!r} has no positive batch_size")
        shapes = [(size, *item_shape)] + [(size,)] * (len(layer.top) - 1)
        for name in (*DATA_LAYER_PARAMS.values(), "transform_param"):
            layer.ClearField(name)
        layer.type = kind
        for i, shape in enumerate(shapes):
            if kind == "Input":
                layer.input_param.shape.add().dim.extend(shape)
            else:
                # constant fillers run once at setup, so the stand-in costs nothing per
                # forward; labels of 0 are a valid class for any classifier
                layer.dummy_data_param.shape.add().dim.extend(shape)
                layer.dummy_data_param.data_filler.add(type="constant", value=0.0 if i else 0.5)
        replaced.append(layer.name)
    return out, replaced
