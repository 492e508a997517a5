"""Upgrades of legacy Caffe files, applied on every read as Caffe's upgrade_proto.cpp does.

Order: V0 layers → V1 (folding "padding" layers into the next layer), old transformation
fields of V1 data layers → ``transform_param``, V1 ``layers`` → ``layer``, the net-level
``input``/``input_dim``/``input_shape`` fields → an Input layer, BatchNorm's three param
specs → lr_mult/decay_mult 0; for solvers the ``solver_type`` enum → the ``type`` string.
"""

from __future__ import annotations

import logging

from netforge.errors import ConfigError
from netforge.proto import pb

log = logging.getLogger("netforge")

V1 = pb.V1LayerParameter

#: V1 LayerType enum name -> current type string
V1_TYPE_NAMES = {
    "NONE": "",
    "ABSVAL": "AbsVal",
    "ACCURACY": "Accuracy",
    "ARGMAX": "ArgMax",
    "BNLL": "BNLL",
    "CONCAT": "Concat",
    "CONTRASTIVE_LOSS": "ContrastiveLoss",
    "CONVOLUTION": "Convolution",
    "DATA": "Data",
    "DECONVOLUTION": "Deconvolution",
    "DROPOUT": "Dropout",
    "DUMMY_DATA": "DummyData",
    "EUCLIDEAN_LOSS": "EuclideanLoss",
    "ELTWISE": "Eltwise",
    "EXP": "Exp",
    "FLATTEN": "Flatten",
    "HDF5_DATA": "HDF5Data",
    "HDF5_OUTPUT": "HDF5Output",
    "HINGE_LOSS": "HingeLoss",
    "IM2COL": "Im2col",
    "IMAGE_DATA": "ImageData",
    "INFOGAIN_LOSS": "InfogainLoss",
    "INNER_PRODUCT": "InnerProduct",
    "LRN": "LRN",
    "MEMORY_DATA": "MemoryData",
    "MULTINOMIAL_LOGISTIC_LOSS": "MultinomialLogisticLoss",
    "MVN": "MVN",
    "POOLING": "Pooling",
    "POWER": "Power",
    "RELU": "ReLU",
    "SIGMOID": "Sigmoid",
    "SIGMOID_CROSS_ENTROPY_LOSS": "SigmoidCrossEntropyLoss",
    "SILENCE": "Silence",
    "SOFTMAX": "Softmax",
    "SOFTMAX_LOSS": "SoftmaxWithLoss",
    "SPLIT": "Split",
    "SLICE": "Slice",
    "TANH": "TanH",
    "WINDOW_DATA": "WindowData",
    "THRESHOLD": "Threshold",
}

#: V0 type string -> V1 LayerType enum name
V0_TYPES = {
    "accuracy": "ACCURACY",
    "bnll": "BNLL",
    "concat": "CONCAT",
    "conv": "CONVOLUTION",
    "data": "DATA",
    "dropout": "DROPOUT",
    "euclidean_loss": "EUCLIDEAN_LOSS",
    "flatten": "FLATTEN",
    "hdf5_data": "HDF5_DATA",
    "hdf5_output": "HDF5_OUTPUT",
    "im2col": "IM2COL",
    "images": "IMAGE_DATA",
    "infogain_loss": "INFOGAIN_LOSS",
    "innerproduct": "INNER_PRODUCT",
    "lrn": "LRN",
    "multinomial_logistic_loss": "MULTINOMIAL_LOGISTIC_LOSS",
    "pool": "POOLING",
    "relu": "RELU",
    "sigmoid": "SIGMOID",
    "softmax": "SOFTMAX",
    "softmax_loss": "SOFTMAX_LOSS",
    "split": "SPLIT",
    "tanh": "TANH",
    "window_data": "WINDOW_DATA",
}

_SOURCE_PARAMS = {  # V1 type -> the typed param that holds `source` (and batch settings)
    "DATA": "data_param",
    "HDF5_DATA": "hdf5_data_param",
    "IMAGE_DATA": "image_data_param",
    "WINDOW_DATA": "window_data_param",
    "INFOGAIN_LOSS": "infogain_loss_param",
}
_TRANSFORM_FIELDS = ("scale", "mean_file", "crop_size", "mirror")


def upgrade_net(net: pb.NetParameter, source: str = "<net>") -> list[str]:
    """Upgrade ``net`` in place; returns a description of each step applied."""
    steps = []
    if net.layers and any(layer.HasField("layer") for layer in net.layers):
        _v0_to_v1(net, source)
        steps.append("V0 layers → V1")
    if any(_has_old_transform(layer) for layer in net.layers):
        for layer in net.layers:
            _move_transform_fields(layer)
        steps.append("data layer transformation fields → transform_param")
    if net.layers:
        if net.layer:
            raise ConfigError(f"{source}: uses both 'layer' and the legacy 'layers'; use one")
        _v1_to_current(net, source)
        steps.append("V1 layers → current")
    if net.input:
        _inputs_to_layer(net, source)
        steps.append("input fields → Input layer")
    for layer in net.layer:
        if layer.type == "BatchNorm" and len(layer.param) == 3:
            for spec in layer.param:
                spec.lr_mult = 0
                spec.decay_mult = 0
            if "BatchNorm param specs" not in steps:
                steps.append("BatchNorm param specs → lr_mult 0")
    for step in steps:
        log.info("%s: upgraded (%s)", source, step)
    return steps


def _v0_to_v1(net: pb.NetParameter, source: str) -> None:
    """Caffe's UpgradeV0Net: fold padding layers, then map each V0 layer's flat fields."""
    old = list(net.layers)
    del net.layers[:]
    producer_pad: dict[str, tuple[int, str]] = {}  # padding top -> (pad, padding bottom)
    for wrapper in old:
        v0 = wrapper.layer
        if v0.type == "padding":
            if len(wrapper.bottom) != 1 or len(wrapper.top) != 1:
                raise ConfigError(f"{source}: padding layer {v0.name!r} needs one bottom and top")
            producer_pad[wrapper.top[0]] = (v0.pad, wrapper.bottom[0])
            continue
        layer = net.layers.add()
        for bottom in wrapper.bottom:
            if bottom in producer_pad:
                pad, real_bottom = producer_pad[bottom]
                if v0.type not in ("conv", "pool"):
                    raise ConfigError(
                        f"{source}: padding feeds layer {v0.name!r} of type {v0.type!r}; only "
                        "conv and pool layers can absorb padding"
                    )
                v0.pad = pad
                bottom = real_bottom
            layer.bottom.append(bottom)
        layer.top.extend(wrapper.top)
        _v0_layer_to_v1(v0, layer, source)


def _v0_layer_to_v1(v0: pb.V0LayerParameter, layer: pb.V1LayerParameter, source: str) -> None:
    if v0.type not in V0_TYPES:
        raise ConfigError(f"{source}: V0 layer {v0.name!r} has unknown type {v0.type!r}")
    kind = V0_TYPES[v0.type]
    layer.name = v0.name
    layer.type = V1.LayerType.Value(kind)
    layer.blobs.extend(v0.blobs)
    layer.blobs_lr.extend(v0.blobs_lr)
    layer.weight_decay.extend(v0.weight_decay)
    conv, ip, pool = layer.convolution_param, layer.inner_product_param, layer.pooling_param

    def needs(kinds: tuple[str, ...], field: str) -> None:
        if kind not in kinds:
            raise ConfigError(f"{source}: V0 layer {v0.name!r} ({v0.type}) cannot have {field!r}")

    if v0.HasField("num_output"):
        needs(("CONVOLUTION", "INNER_PRODUCT"), "num_output")
        (conv if kind == "CONVOLUTION" else ip).num_output = v0.num_output
    if v0.HasField("biasterm"):
        needs(("CONVOLUTION", "INNER_PRODUCT"), "biasterm")
        (conv if kind == "CONVOLUTION" else ip).bias_term = v0.biasterm
    for field in ("weight_filler", "bias_filler"):
        if v0.HasField(field):
            needs(("CONVOLUTION", "INNER_PRODUCT"), field)
            getattr(conv if kind == "CONVOLUTION" else ip, field).CopyFrom(getattr(v0, field))
    for v0_field, name in (("pad", "pad"), ("kernelsize", "kernel_size"), ("stride", "stride")):
        if v0.HasField(v0_field):
            needs(("CONVOLUTION", "POOLING"), v0_field)
            value = getattr(v0, v0_field)
            if kind == "CONVOLUTION":
                getattr(conv, name).append(value)
            else:
                setattr(pool, name, value)
    if v0.HasField("group"):
        needs(("CONVOLUTION",), "group")
        conv.group = v0.group
    if v0.HasField("pool"):
        needs(("POOLING",), "pool")
        pool.pool = v0.pool
    if v0.HasField("dropout_ratio"):
        needs(("DROPOUT",), "dropout_ratio")
        layer.dropout_param.dropout_ratio = v0.dropout_ratio
    for field in ("local_size", "alpha", "beta", "k"):
        if v0.HasField(field):
            needs(("LRN",), field)
            setattr(layer.lrn_param, field, getattr(v0, field))
    if v0.HasField("source"):
        needs(tuple(_SOURCE_PARAMS), "source")
        getattr(layer, _SOURCE_PARAMS[kind]).source = v0.source
    data_kinds = ("DATA", "IMAGE_DATA", "WINDOW_DATA")
    for v0_field, name in (
        ("scale", "scale"),
        ("meanfile", "mean_file"),
        ("cropsize", "crop_size"),
        ("mirror", "mirror"),
    ):
        if v0.HasField(v0_field):
            needs(data_kinds, v0_field)
            setattr(getattr(layer, _SOURCE_PARAMS[kind]), name, getattr(v0, v0_field))
    if v0.HasField("batchsize"):
        needs(("DATA", "HDF5_DATA", "IMAGE_DATA", "WINDOW_DATA"), "batchsize")
        getattr(layer, _SOURCE_PARAMS[kind]).batch_size = v0.batchsize
    if v0.HasField("rand_skip"):
        needs(("DATA", "IMAGE_DATA"), "rand_skip")
        getattr(layer, _SOURCE_PARAMS[kind]).rand_skip = v0.rand_skip
    if v0.HasField("shuffle_images"):
        needs(("IMAGE_DATA",), "shuffle_images")
        layer.image_data_param.shuffle = v0.shuffle_images
    for field in ("new_height", "new_width"):
        if v0.HasField(field):
            needs(("IMAGE_DATA",), field)
            setattr(layer.image_data_param, field, getattr(v0, field))
    if v0.HasField("concat_dim"):
        needs(("CONCAT",), "concat_dim")
        layer.concat_param.concat_dim = v0.concat_dim
    for v0_field, name in (
        ("det_fg_threshold", "fg_threshold"),
        ("det_bg_threshold", "bg_threshold"),
        ("det_fg_fraction", "fg_fraction"),
        ("det_context_pad", "context_pad"),
        ("det_crop_mode", "crop_mode"),
    ):
        if v0.HasField(v0_field):
            needs(("WINDOW_DATA",), v0_field)
            setattr(layer.window_data_param, name, getattr(v0, v0_field))
    if v0.HasField("hdf5_output_param"):
        needs(("HDF5_OUTPUT",), "hdf5_output_param")
        layer.hdf5_output_param.CopyFrom(v0.hdf5_output_param)


def _data_param(layer: pb.V1LayerParameter):
    kind = V1.LayerType.Name(layer.type)
    if kind in ("DATA", "IMAGE_DATA", "WINDOW_DATA"):
        return getattr(layer, _SOURCE_PARAMS[kind])
    return None


def _has_old_transform(layer: pb.V1LayerParameter) -> bool:
    param = _data_param(layer)
    return param is not None and any(param.HasField(f) for f in _TRANSFORM_FIELDS)


def _move_transform_fields(layer: pb.V1LayerParameter) -> None:
    """Caffe's UpgradeNetDataTransformation: scale/mean_file/crop_size/mirror move out."""
    param = _data_param(layer)
    if param is None:
        return
    for field in _TRANSFORM_FIELDS:
        if param.HasField(field):
            setattr(layer.transform_param, field, getattr(param, field))
            param.ClearField(field)


_V1_COPIED = ("bottom", "top", "blobs", "include", "exclude", "loss_weight")


def _v1_to_current(net: pb.NetParameter, source: str) -> None:
    """Caffe's UpgradeV1Net: enum types to strings, blobs_lr/weight_decay/param to ParamSpecs."""
    typed = [
        f.name
        for f in V1.DESCRIPTOR.fields
        if f.name.endswith("_param") and f.message_type is not None
    ]
    for old in net.layers:
        layer = net.layer.add()
        layer.name = old.name
        type_name = V1.LayerType.Name(old.type)
        if type_name not in V1_TYPE_NAMES:
            raise ConfigError(f"{source}: layer {old.name!r} has unknown V1 type {type_name}")
        layer.type = V1_TYPE_NAMES[type_name]
        for field in _V1_COPIED:
            getattr(layer, field).extend(getattr(old, field))
        for field in typed:
            if old.HasField(field):
                getattr(layer, field).CopyFrom(getattr(old, field))
        counts = max(
            len(old.blobs_lr), len(old.weight_decay), len(old.param), len(old.blob_share_mode)
        )
        for i in range(counts):
            spec = layer.param.add()
            if i < len(old.param):
                spec.name = old.param[i]
            if i < len(old.blob_share_mode):
                spec.share_mode = old.blob_share_mode[i]
            if i < len(old.blobs_lr):
                spec.lr_mult = old.blobs_lr[i]
            if i < len(old.weight_decay):
                spec.decay_mult = old.weight_decay[i]
    del net.layers[:]


def _inputs_to_layer(net: pb.NetParameter, source: str) -> None:
    """Caffe's UpgradeNetInput: input + input_shape/input_dim → a leading Input layer."""
    names = list(net.input)
    shapes = [list(s.dim) for s in net.input_shape]
    dims = list(net.input_dim)
    if dims:
        if len(dims) != 4 * len(names):
            raise ConfigError(
                f"{source}: {len(dims)} input_dim values for {len(names)} inputs; give 4 per input"
            )
        shapes = [dims[4 * i : 4 * i + 4] for i in range(len(names))]
    if shapes:
        if len(shapes) != len(names):
            raise ConfigError(f"{source}: {len(shapes)} input shapes for {len(names)} inputs")
        layer = pb.LayerParameter(name="input", type="Input")
        layer.top.extend(names)
        for shape in shapes:
            layer.input_param.shape.add().dim.extend(shape)
        existing = list(net.layer)
        del net.layer[:]
        net.layer.append(layer)
        net.layer.extend(existing)
    net.ClearField("input")
    net.ClearField("input_shape")
    net.ClearField("input_dim")


_SOLVER_TYPES = {
    pb.SolverParameter.SGD: "SGD",
    pb.SolverParameter.NESTEROV: "Nesterov",
    pb.SolverParameter.ADAGRAD: "AdaGrad",
    pb.SolverParameter.RMSPROP: "RMSProp",
    pb.SolverParameter.ADADELTA: "AdaDelta",
    pb.SolverParameter.ADAM: "Adam",
}


def upgrade_solver(solver: pb.SolverParameter, source: str = "<solver>") -> list[str]:
    """Caffe's UpgradeSolverAsNeeded: the ``solver_type`` enum becomes the ``type`` string;
    nets embedded in the solver are upgraded too."""
    steps = []
    if solver.HasField("solver_type"):
        if solver.HasField("type"):
            raise ConfigError(f"{source}: sets both solver_type (legacy) and type; keep type")
        solver.type = _SOLVER_TYPES[solver.solver_type]
        solver.ClearField("solver_type")
        steps.append("solver_type → type")
        log.info("%s: upgraded (solver_type → type)", source)
    # The embedded nets' steps are the solver file's too: a solver whose only legacy part is
    # a V1 net_param is not "already in the latest format".
    embedded = [
        (f, getattr(solver, f)) for f in ("net_param", "train_net_param") if solver.HasField(f)
    ]
    embedded += [("test_net_param", net) for net in solver.test_net_param]
    for field, net in embedded:
        steps += [f"{field}: {step}" for step in upgrade_net(net, f"{source} ({field})")]
    return steps


def check_layer_types(net: pb.NetParameter, source: str = "<net>") -> None:
    """Raise a ConfigError naming the first layer whose type no registered layer builds
    (with the nearest known type), so that an upgraded net that cannot load is caught when
    it is upgraded rather than when it is trained. Caffe's upgrade tools do not check."""
    from netforge.layer import layer_creator

    for layer in net.layer:
        try:
            layer_creator(layer.type, layer.name)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None
