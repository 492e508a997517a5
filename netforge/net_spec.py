"""Nets written in Python: pycaffe's NetSpec (``caffe.NetSpec``, ``caffe.layers`` as ``L``,
``caffe.params`` as ``P``, ``caffe.to_proto``).

``L.Convolution(bottom, kernel_size=3, num_output=8)`` describes a layer and returns its top;
keywords are fields of the layer's own parameter message (``convolution_param`` here) or,
failing that, of ``LayerParameter`` (``loss_weight``, ``param``, ``include``...), and keywords
ending in ``param`` always go to ``LayerParameter``. Dicts become messages, lists repeated
fields, and a single value given to a repeated field is a one-element list. ``ntop=`` sets
the number of tops (0 returns the layer itself), ``in_place=True`` writes the top over the
bottom. Tops assigned to a ``NetSpec``'s attributes take those names; other layers and tops
are named automatically (type and a counter: ``Convolution1``), as pycaffe does.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from google.protobuf.message import Message

from netforge.errors import ConfigError
from netforge.proto import pb


def _param_field_names() -> dict[str, str]:
    """Layer type -> its parameter field: ``InnerProduct`` -> ``inner_product_param``.

    As pycaffe, the type is read off the message type's name (``InnerProductParameter``), so
    every ``*_param`` field of LayerParameter, netforge's additions included, is found."""
    fields = {}
    for field in pb.LayerParameter.DESCRIPTOR.fields:
        if field.name.endswith("_param") and field.message_type is not None:
            fields[field.message_type.name.removesuffix("Parameter")] = field.name
    return fields


_PARAM_FIELDS = _param_field_names()


def _is_repeated(proto: Message, name: str) -> bool:
    return hasattr(getattr(proto, name), "extend")  # repeated containers, of any protobuf


def assign_proto(proto: Message, name: str, value: Any) -> None:
    """Set field ``name`` of ``proto`` from a Python value, recursively (pycaffe's
    ``assign_proto``): dicts fill messages, lists fill repeated fields, a lone value given to a
    repeated field is a one-element list."""
    where = f"{proto.DESCRIPTOR.name}.{name}"
    if name not in proto.DESCRIPTOR.fields_by_name:
        raise ConfigError(f"{proto.DESCRIPTOR.name} has no field {name!r}")
    if _is_repeated(proto, name) and not isinstance(value, (list, tuple)):
        value = [value]
    try:
        if isinstance(value, (list, tuple)):
            field = getattr(proto, name)
            for item in value:
                if isinstance(item, dict):
                    message = field.add()
                    for key, sub in item.items():
                        assign_proto(message, key, sub)
                else:
                    field.append(item)
        elif isinstance(value, dict):
            message = getattr(proto, name)
            for key, sub in value.items():
                assign_proto(message, key, sub)
        else:
            setattr(proto, name, value)
    except (TypeError, ValueError, AttributeError) as exc:
        raise ConfigError(f"{where}: cannot take {value!r}: {exc}") from None


class Top:
    """One output blob of a layer description (``fn``), the ``n``-th of its tops."""

    def __init__(self, fn: Function, n: int) -> None:
        self.fn = fn
        self.n = n

    def to_proto(self) -> pb.NetParameter:
        """A NetParameter with every layer needed to compute this top."""
        return to_proto(self)

    def _to_proto(self, layers: dict, names: dict, autonames: Counter) -> None:
        self.fn._to_proto(layers, names, autonames)


class Function:
    """One layer description: its type, its inputs (Tops) and its parameters (keywords)."""

    def __init__(self, type_name: str, inputs: tuple, params: dict[str, Any]) -> None:
        self.type_name = type_name
        for index, value in enumerate(inputs):
            if not isinstance(value, Top):
                raise TypeError(f"{type_name} input {index} is not a Top (type is {type(value)})")
        self.inputs = inputs
        self.params = params
        self.ntop = self.params.pop("ntop", 1)
        self.in_place = self.params.pop("in_place", False)
        self.tops = tuple(Top(self, n) for n in range(self.ntop))

    def _get_name(self, names: dict, autonames: Counter) -> str:
        """The layer's name: the name of its first top, or ``<type><count>`` without tops."""
        if self not in names and self.ntop > 0:
            names[self] = self._get_top_name(self.tops[0], names, autonames)
        elif self not in names:
            autonames[self.type_name] += 1
            names[self] = self.type_name + str(autonames[self.type_name])
        return names[self]

    def _get_top_name(self, top: Top, names: dict, autonames: Counter) -> str:
        if top not in names:
            autonames[top.fn.type_name] += 1
            names[top] = top.fn.type_name + str(autonames[top.fn.type_name])
        return names[top]

    def _to_proto(self, layers: dict, names: dict, autonames: Counter) -> None:
        if self in layers:
            return
        bottom_names = []
        for value in self.inputs:
            value._to_proto(layers, names, autonames)
            bottom_names.append(layers[value.fn].top[value.n])
        layer = pb.LayerParameter(type=self.type_name)
        layer.bottom.extend(bottom_names)
        if self.in_place:
            layer.top.extend(layer.bottom)
        else:
            layer.top.extend(self._get_top_name(top, names, autonames) for top in self.tops)
        layer.name = self._get_name(names, autonames)
        own = _PARAM_FIELDS.get(self.type_name)
        for key, value in self.params.items():
            target: Message = layer
            if not key.endswith("param") and own is not None:
                message = getattr(layer, own)
                if key in message.DESCRIPTOR.fields_by_name:
                    target = message
            if key not in target.DESCRIPTOR.fields_by_name:
                where = f"{own} or LayerParameter" if own and target is layer else "LayerParameter"
                raise ConfigError(
                    f"layer {layer.name!r} ({self.type_name}): no parameter {key!r} in {where}"
                )
            try:
                assign_proto(target, key, value)
            except ConfigError as exc:  # a nested field: say which layer it was given to
                raise ConfigError(f"layer {layer.name!r} ({self.type_name}): {exc}") from None
        layers[self] = layer


def to_proto(*tops: Top) -> pb.NetParameter:
    """A NetParameter with every layer needed to compute ``tops``, all named automatically."""
    layers: dict = {}
    autonames: Counter = Counter()
    for top in tops:
        top.fn._to_proto(layers, {}, autonames)
    net = pb.NetParameter()
    net.layer.extend(layers.values())
    return net


class NetSpec:
    """Named tops: ``n.conv1 = L.Convolution(n.data, ...)`` names the top (and its layer)
    ``conv1``; ``n.to_proto()`` gives the NetParameter with every assigned top's layers, in
    assignment order. Item access (``n["conv1"]``) works as attribute access."""

    def __init__(self) -> None:
        super().__setattr__("tops", {})

    def __setattr__(self, name: str, value: Top | Function) -> None:
        self.tops[name] = value

    def __getattr__(self, name: str) -> Top | Function:
        try:
            return self.tops[name]
        except KeyError:
            raise AttributeError(f"this NetSpec has no top named {name!r}") from None

    def __setitem__(self, key: str, value: Top | Function) -> None:
        self.tops[key] = value

    def __getitem__(self, item: str) -> Top | Function:
        return self.tops[item]

    def to_proto(self) -> pb.NetParameter:
        """The NetParameter of every assigned top, named as assigned."""
        names = {value: key for key, value in self.tops.items()}
        autonames: Counter = Counter()
        layers: dict = {}
        for top in self.tops.values():
            top._to_proto(layers, names, autonames)
        net = pb.NetParameter()
        net.layer.extend(layers.values())
        return net


class Layers:
    """pycaffe's ``caffe.layers`` (``L``): ``L.<Type>(*bottoms, **params)`` describes a layer
    of any type (``Python`` and plugin types too); it returns the top, a tuple of tops when
    ``ntop`` > 1, or the layer itself when ``ntop`` is 0."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)

        def layer_fn(*args: Top, **kwargs: Any) -> Top | tuple[Top, ...] | Function:
            fn = Function(name, args, kwargs)
            if fn.ntop == 0:
                return fn
            if fn.ntop == 1:
                return fn.tops[0]
            return fn.tops

        layer_fn.__name__ = name
        return layer_fn


class _MessageEnums:
    """The enum values of one parameter message: ``P.Pooling.MAX``."""

    def __init__(self, message: type[Message]) -> None:
        self._message = message

    def __getattr__(self, name: str) -> Any:
        try:
            return getattr(self._message, name)
        except AttributeError:
            raise AttributeError(f"{self._message.DESCRIPTOR.name} has no value {name!r}") from None


class Parameters:
    """pycaffe's ``caffe.params`` (``P``): ``P.<Type>.<VALUE>`` is an enum value of
    ``<Type>Parameter`` (``P.Pooling.MAX``, ``P.Eltwise.SUM``, ``P.Loss.VALID``)."""

    def __getattr__(self, name: str) -> _MessageEnums:
        message = getattr(pb, name + "Parameter", None)
        if message is None:
            raise AttributeError(f"netforge.params: no message {name}Parameter")
        return _MessageEnums(message)


layers = Layers()
params = Parameters()

__all__ = ["Function", "Layers", "NetSpec", "Parameters", "Top", "layers", "params", "to_proto"]
