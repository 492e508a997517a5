"""Converters of Caffe's recurrent layers (LSTMUnit, RNN, LSTM) to ONNX operators.

T, the number of time steps, is fixed when the net is set up (as Caffe's unrolled net), so
RNN and LSTM unroll into one group of standard operators per step, gating the previous
state with ``cont`` exactly as ``netforge/builtin_layers/recurrent.py`` does.

An ONNX model has no state between runs: where the layer does not expose its state
(``expose_hidden: false``), the exported model starts every run from zeros, as the net does
on its first forward and as every sequence does whose first ``cont`` is 0. A net that
continues sequences across forward calls exposes h0/c0 and hT/cT instead.
"""

from __future__ import annotations

import numpy as np

from netforge.export.onnx_graph import OnnxGraph
from netforge.export.onnx_layers import Site, converts


def _lstm_step(g: OnnxGraph, hint: str, c_prev: str, gates: str, cont: str, d: int) -> list[str]:
    """Caffe's LSTMUnit on (..., 4D) gate inputs ordered i, f, o, g and ``cont`` broadcast
    to (..., 1): ``c = cont·σ(f)·c_prev + σ(i)·tanh(g)``, ``h = σ(o)·tanh(c)``; returns
    [c, h]. A cont of 0 zeroes the forget gate, so the step starts a new sequence."""
    part = [g.slice(gates, [k * d], [(k + 1) * d], [-1], f"{hint}/gate{k}") for k in range(4)]
    i, f, o = (g.node("Sigmoid", [p], f"{hint}/sigmoid") for p in part[:3])
    candidate = g.node("Tanh", [part[3]], f"{hint}/candidate")
    forget = g.node("Mul", [cont, f], f"{hint}/forget")
    kept = g.node("Mul", [forget, c_prev], f"{hint}/kept")
    c = g.node("Add", [kept, g.node("Mul", [i, candidate], f"{hint}/new")], f"{hint}/c")
    h = g.node("Mul", [o, g.node("Tanh", [c], f"{hint}/tanh_c")], f"{hint}/h")
    return [c, h]


@converts("LSTMUnit")
def lstm_unit(g: OnnxGraph, site: Site) -> list[str]:
    """One step: bottoms c_prev (1, N, D), gates (1, N, 4D), cont (1, N); tops c and h."""
    c_prev, gates, cont = site.inputs
    column = g.node("Unsqueeze", [cont, g.ints([2], f"{site.hint}/axis")], f"{site.hint}/cont")
    return _lstm_step(g, site.hint, c_prev, gates, column, site.bottom_shapes[0][2])


@converts("RNN", "LSTM")
def recurrent(g: OnnxGraph, site: Site) -> list[str]:
    """The T steps unrolled: the input (and static input) projections for every step at
    once, then per step the recurrent product of ``cont_t · h_{t−1}`` and the RNN's tanh
    or the LSTM cell; the tops are the stacked outputs and, exposed, hT (and cT)."""
    layer, hint = site.layer, site.hint
    if g.dynamic_batch:
        raise site.refuse(
            f"axis 0 of its input is time, fixed at T = {layer.steps}; export without "
            "--dynamic-batch"
        )
    steps, streams = site.bottom_shapes[0][:2]
    d = layer.num_output
    x = g.reshape(site.inputs[0], [steps, streams, -1], f"{hint}/x")
    projected = g.node("MatMul", [x, g.const(site.blob(0).T, f"{hint}/w_x")], f"{hint}/proj")
    projected = g.node("Add", [projected, g.const(site.blob(1), f"{hint}/b")], f"{hint}/proj")
    if layer.static_input:
        static = g.reshape(site.inputs[2], [streams, -1], f"{hint}/x_static")
        w_static = g.const(site.blob(2).T, f"{hint}/w_static")
        static = g.node("MatMul", [static, w_static], f"{hint}/static")
        projected = g.node("Add", [projected, static], f"{hint}/proj")
    w_recurrent = g.const(site.blob(3 if layer.static_input else 2).T, f"{hint}/w_h")
    # states, gathered steps and cont keep a time axis of 1: (1, N, ...), as Caffe's
    # exposed h0/c0 and hT/cT are
    if layer.expose_hidden:
        state = list(site.inputs[3 if layer.static_input else 2 :])
    else:
        state = [g.const(np.zeros((1, streams, d)), f"{hint}/zeros")] * len(layer.state_names)
    hidden = []
    for t in range(steps):
        step = f"{hint}/t{t}"
        at = g.ints([t], f"{step}/index")
        p_t = g.node("Gather", [projected, at], f"{step}/proj", axis=0)
        cont = g.node("Gather", [site.inputs[1], at], f"{step}/cont", axis=0)
        cont = g.node("Unsqueeze", [cont, g.ints([2], f"{step}/axis")], f"{step}/cont")
        gated = g.node("Mul", [state[0], cont], f"{step}/gated")
        pre = g.node(
            "Add",
            [g.node("MatMul", [gated, w_recurrent], f"{step}/recurrent"), p_t],
            f"{step}/pre",
        )
        if layer.type == "LSTM":
            c, h = _lstm_step(g, step, state[1], pre, cont, d)
            state = [h, c]
        else:
            state = [g.node("Tanh", [pre], f"{step}/h")]
        hidden.append(state[0])
    output = hidden[0] if steps == 1 else g.node("Concat", hidden, f"{hint}/hidden", axis=0)
    if layer.type == "RNN":
        output = g.node("MatMul", [output, g.const(site.blob(-2).T, f"{hint}/w_o")], hint)
        output = g.node("Add", [output, g.const(site.blob(-1), f"{hint}/b_o")], hint)
        output = g.node("Tanh", [output], hint)
    return [output, *state] if layer.expose_hidden else [output]
