"""pycaffe's ``caffe.draw``: a NetParameter as a graph (BVLC ``python/caffe/draw.py``).

Layers are record boxes coloured by type (convolutions red, pooling orange, inner products
purple, others blue; in-place neuron layers green), blobs are grey octagons, edges carry a
layer's output count. The graph is written as DOT text here, with no dependency, so
``.dot``/``.gv`` output always works; images (PNG, SVG, PDF...) and :func:`get_pydot_graph`
need pydot and graphviz's ``dot`` (``pip install 'netforge[draw]'`` plus the graphviz
system package), as pycaffe's do. Every name is quoted in the DOT text, so layer and blob
names with ``:``, ``/`` or ``-`` draw as they are.
"""

from __future__ import annotations

import contextlib
import io
import os
from dataclasses import dataclass, field
from typing import Any

from netforge.atomic import atomic_write
from netforge.errors import ConfigError, DataError
from netforge.proto import pb

# pycaffe's styles.
LAYER_STYLE_DEFAULT = {"shape": "record", "fillcolor": "#6495ED", "style": "filled"}
NEURON_LAYER_STYLE = {"shape": "record", "fillcolor": "#90EE90", "style": "filled"}
BLOB_STYLE = {"shape": "octagon", "fillcolor": "#E0E0E0", "style": "filled"}

#: Extensions written as DOT text, without graphviz (``.raw`` is pycaffe's name for it).
TEXT_FORMATS = ("dot", "gv", "raw")

INSTALL_HINT = (
    "install pydot and graphviz (pip install 'netforge[draw]', and graphviz's dot: "
    "apt install graphviz / brew install graphviz), or write DOT text to a .dot file"
)


class DrawError(ConfigError, ValueError):
    """A net pycaffe's draw rejects with ``ValueError`` (both types catch it)."""


def get_pooling_types_dict() -> dict[int, str]:
    """Pooling method number -> name (0 -> "MAX", ...)."""
    desc = pb.PoolingParameter.PoolMethod.DESCRIPTOR
    return {v.number: name for name, v in desc.values_by_name.items()}


def get_edge_label(layer: pb.LayerParameter) -> str:
    """The label of a layer's output edges: the batch size of Data layers, the output count
    of convolutions and inner products, else empty."""
    if layer.type == "Data":
        return f"Batch {layer.data_param.batch_size}"
    if layer.type in ("Convolution", "Deconvolution"):
        return str(layer.convolution_param.num_output)
    if layer.type == "InnerProduct":
        return str(layer.inner_product_param.num_output)
    return '""'


def get_layer_lr_mult(layer: pb.LayerParameter) -> tuple[float, float]:
    """The (weights, bias) learning rate multipliers of a Convolution, Deconvolution or
    InnerProduct layer (1.0 where no ``param`` gives one)."""
    if layer.type not in ("Convolution", "Deconvolution", "InnerProduct"):
        raise DrawError(f"{layer.type} layers do not have a learning rate multiplier")
    params = layer.param
    if len(params) > 2:
        raise DrawError(f"layer {layer.name!r}: could not parse the learning rate multiplier")
    lrm = [p.lr_mult for p in params] + [1.0] * (2 - len(params))
    return lrm[0], lrm[1]


def get_layer_label(layer: pb.LayerParameter, rankdir: str, display_lrm: bool = False) -> str:
    """A layer's node label (quoted, as DOT wants it): name, type (with the pooling method),
    kernel size, stride and pad of spatial layers, and with ``display_lrm`` the non-zero
    learning rate multipliers. Parts are separated by spaces when the graph runs vertically
    (``rankdir`` TB or BT), by line breaks otherwise."""
    separator = " " if rankdir in ("TB", "BT") else r"\n"
    # Braces, bars and angle brackets structure a record label: escape them in the name.
    parts = [layer.name.translate({ord(c): "\\" + c for c in "{}|<>"})]
    if layer.type == "Pooling":
        parts.append(f"({layer.type} {get_pooling_types_dict()[layer.pooling_param.pool]})")
    else:
        parts.append(f"({layer.type})")
    if layer.type in ("Convolution", "Deconvolution", "Pooling"):
        if layer.type == "Pooling":
            pool = layer.pooling_param
            kernel, stride, pad = pool.kernel_size, pool.stride, pool.pad
        else:
            conv = layer.convolution_param
            kernel = conv.kernel_size[0] if len(conv.kernel_size) else 1
            stride = conv.stride[0] if len(conv.stride) else 1
            pad = conv.pad[0] if len(conv.pad) else 0
        parts.append(separator.join([f"kernel size: {kernel}", f"stride: {stride}", f"pad: {pad}"]))
    if display_lrm and layer.type in ("Convolution", "Deconvolution", "InnerProduct"):
        lrm0, lrm1 = get_layer_lr_mult(layer)
        if lrm0 or lrm1:
            parts.append(f"lr mult: {lrm0:.1f}, {lrm1:.1f}")
    return _quote(separator.join(parts))


def choose_color_by_layertype(layertype: str) -> str:
    """A layer node's fill colour by type."""
    return {
        "Convolution": "#FF5050",
        "Deconvolution": "#FF5050",
        "Pooling": "#FF9900",
        "InnerProduct": "#CC33FF",
    }.get(layertype, "#6495ED")


def _quote(text: str) -> str:
    """A DOT ID: quoted, with inner quotes escaped (already quoted labels stay as they are;
    backslashes stay, so ``\\n`` remains graphviz's line break)."""
    if len(text) >= 2 and text[0] == text[-1] == '"':
        return text
    return '"' + text.replace('"', r"\"") + '"'


@dataclass
class NetGraph:
    """A net's drawing: nodes (DOT ID -> attributes) and edges (source, target, label)."""

    name: str
    rankdir: str
    nodes: dict[str, dict[str, str]] = field(default_factory=dict)
    edges: list[tuple[str, str, str]] = field(default_factory=list)

    def to_dot(self) -> str:
        """The graph as DOT text, as pydot writes it."""

        def attrs(values: dict[str, str]) -> str:
            return ", ".join(f"{k}={_quote(v)}" for k, v in values.items())

        lines = [f"digraph {_quote(self.name)} {{", f"rankdir={self.rankdir};"]
        for node, style in self.nodes.items():
            lines.append(f"{node} [{attrs(style)}];" if style else f"{node};")
        for src, dst, label in self.edges:
            lines.append(f"{src} -> {dst} [label={_quote(label)}];")
        lines.append("}")
        return "\n".join(lines) + "\n"


def _included(layer: pb.LayerParameter, phase: int) -> bool:
    """pycaffe's phase rule for drawing: include/exclude rules on the phase alone."""
    if len(layer.include) and len(layer.exclude):
        raise DrawError(f"layer {layer.name!r} has both include and exclude specified")
    included = not len(layer.include)
    for rule in layer.include:
        included = included or rule.phase == phase
    for rule in layer.exclude:
        included = included and rule.phase != phase
    return included


def net_graph(
    caffe_net: pb.NetParameter,
    rankdir: str = "LR",
    label_edges: bool = True,
    phase: int | None = None,
    display_lrm: bool = False,
) -> NetGraph:
    """The nodes and edges pycaffe's ``get_pydot_graph`` builds, without pydot.

    ``phase`` (``netforge.TRAIN``/``TEST``) keeps only that phase's layers; None keeps all.
    """
    graph = NetGraph(caffe_net.name or "Net", rankdir)
    nodes: dict[str, tuple[str, dict[str, str]]] = {}  # pycaffe's key -> (ID, style)
    edges: list[tuple[str, str, str]] = []
    for layer in caffe_net.layer:
        if phase is not None and not _included(layer, phase):
            continue
        label = get_layer_label(layer, rankdir, display_lrm=display_lrm)
        key = f"{layer.name}_{layer.type}"
        in_place = (
            len(layer.bottom) == 1 and len(layer.top) == 1 and layer.bottom[0] == layer.top[0]
        )
        if in_place:
            style = dict(NEURON_LAYER_STYLE)
        else:
            style = dict(LAYER_STYLE_DEFAULT, fillcolor=choose_color_by_layertype(layer.type))
        nodes[key] = (label, style)
        for bottom in layer.bottom:
            nodes[bottom + "_blob"] = (_quote(bottom), dict(BLOB_STYLE))
            edges.append((bottom + "_blob", key, ""))
        for top in layer.top:
            # pycaffe styles a blob only where it is some layer's bottom.
            nodes[top + "_blob"] = (_quote(top), {})
            edge_label = get_edge_label(layer) if label_edges else '""'
            edges.append((key, top + "_blob", edge_label.strip('"')))
    for node_id, style in nodes.values():
        graph.nodes[node_id] = style
    graph.edges = [(nodes[src][0], nodes[dst][0], label) for src, dst, label in edges]
    return graph


def _pydot() -> Any:
    try:
        import pydot
    except ImportError:
        raise ConfigError(f"drawing a net as an image needs pydot: {INSTALL_HINT}") from None
    return pydot


def get_pydot_graph(
    caffe_net: pb.NetParameter,
    rankdir: str,
    label_edges: bool = True,
    phase: int | None = None,
    display_lrm: bool = False,
) -> Any:
    """The net as a ``pydot.Dot`` graph, as pycaffe's (needs pydot)."""
    pydot = _pydot()
    graph = net_graph(caffe_net, rankdir, label_edges, phase, display_lrm)
    dot = pydot.Dot(_quote(graph.name), graph_type="digraph", rankdir=rankdir)
    made = {}
    for node_id, style in graph.nodes.items():
        made[node_id] = pydot.Node(node_id, **style)
        dot.add_node(made[node_id])
    for src, dst, label in graph.edges:
        dot.add_edge(pydot.Edge(made[src], made[dst], label=_quote(label)))
    return dot


def draw_net(
    caffe_net: pb.NetParameter,
    rankdir: str,
    ext: str = "png",
    phase: int | None = None,
    display_lrm: bool = False,
) -> bytes:
    """The drawing of a net in format ``ext``: DOT text for ``dot``/``gv``/``raw`` (no
    graphviz needed), else what graphviz's ``dot -T<ext>`` renders (png, svg, pdf...)."""
    if ext in TEXT_FORMATS:
        return net_graph(caffe_net, rankdir, phase=phase, display_lrm=display_lrm).to_dot().encode()
    graph = get_pydot_graph(caffe_net, rankdir, phase=phase, display_lrm=display_lrm)
    printed = io.StringIO()
    try:
        # pydot prints dot's output to stdout when dot fails, then raises a bare Exception:
        # keep the print off the terminal and put dot's own complaint in the one error line.
        with contextlib.redirect_stdout(printed):
            return graph.create(format=ext)
    except OSError:  # pydot found no dot program to run
        raise ConfigError(
            f"drawing a net as .{ext} needs graphviz's dot program: {INSTALL_HINT}"
        ) from None
    except Exception:
        complaint = _dot_complaint(printed.getvalue())
        raise ConfigError(f"graphviz could not draw the net as .{ext}: {complaint}") from None


def _dot_complaint(printed: str) -> str:
    """dot's stderr from what pydot printed on its failure (the last line, a bytes repr)."""
    import ast

    lines = [line for line in printed.splitlines() if line.strip()]
    try:
        text = ast.literal_eval(lines[-1].strip())
    except (IndexError, ValueError, SyntaxError):
        return "dot failed"
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return " ".join(str(text).split()) or "dot failed"


def draw_net_to_file(
    caffe_net: pb.NetParameter,
    filename: str | os.PathLike,
    rankdir: str = "LR",
    phase: int | None = None,
    display_lrm: bool = False,
) -> None:
    """Draw a net to ``filename`` in the format its extension names (``.dot``/``.gv``/
    ``.raw``: DOT text). The file is replaced whole or not at all (temp file + rename)."""
    name = os.fspath(filename)
    ext = name[name.rfind(".") + 1 :] if "." in os.path.basename(name) else ""
    if not ext:
        raise ConfigError(f"{name}: give the file an extension (.png, .svg, .pdf, .dot...)")
    data = draw_net(caffe_net, rankdir, ext, phase, display_lrm)
    try:
        with atomic_write(name, "wb") as out:
            out.write(data)
    except OSError as exc:
        raise DataError(f"{name}: cannot write the drawing: {exc.strerror or exc}") from None
