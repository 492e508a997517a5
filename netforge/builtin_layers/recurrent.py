"""Recurrent layers: RNN, LSTM and LSTMUnit, with Caffe's semantics.

Caffe builds RNN and LSTM by unrolling an internal net over the T time steps; netforge
computes the same functions directly, one matrix product per time step, with exact
backpropagation through time. What carries over from Caffe's RecurrentLayer:

* bottoms ``x`` (T, N, ...), ``cont`` (T, N), optionally ``x_static`` (N, ...), then with
  ``expose_hidden`` the initial state (RNN: h0; LSTM: h0, c0), each (1, N, num_output); tops
  the output (T, N, num_output), then with ``expose_hidden`` the final state (hT [, cT]).
* ``cont[t, n]`` multiplies the previous hidden state (0 at a sequence start resets it); the
  LSTM cell's forget gate is ``cont · σ(·)`` (0 where cont is 0), as Caffe's LSTMUnit.
* Without ``expose_hidden`` the state at the start of a forward pass is the final state of
  the previous pass (zeros at first), so a sequence can continue across batches; no gradient
  crosses batches. The state is reset to zeros when the number of streams N changes.
* T is fixed at setup; parameters are in Caffe's order and shapes, filled in that order with
  ``recurrent_param.weight_filler`` / ``bias_filler``.

Deliberate difference: Caffe shares only the data of the exposed state blobs with its
unrolled net, so there h0/c0 never receive a gradient and the diffs of hT/cT are ignored;
netforge backpropagates through them (h0/c0 get their true gradient, hT/cT diffs flow back).
"""

from __future__ import annotations

from collections.abc import Sequence
from math import prod
from typing import Any

from netforge.blob import Blob
from netforge.layer import Layer, register


def _sigmoid(xp: Any, x: Any) -> Any:
    """σ(x) in the overflow-free form Caffe's Sigmoid layer uses."""
    return 0.5 * xp.tanh(0.5 * x) + 0.5


def lstm_unit_forward(xp: Any, c_prev: Any, gates: Any, cont: Any) -> tuple[Any, Any, Any]:
    """One LSTM cell step (Caffe's LSTMUnit) for (..., D) states and (..., 4D) gate inputs
    in the order i, f, o, g: ``c = f·c_prev + i·g``, ``h = o·tanh(c)``, with the forget
    gate ``f = cont · σ(x_f)`` forced to 0 where ``cont == 0``. Returns c, h and the
    activations (i, f, o, g stacked as gates are) that the backward step needs."""
    d = c_prev.shape[-1]
    sig = _sigmoid(xp, gates[..., : 3 * d])
    cont = cont[..., None]
    forget = xp.where(cont == 0, 0, cont * sig[..., d : 2 * d])
    acts = xp.concatenate(
        [sig[..., :d], forget, sig[..., 2 * d :], xp.tanh(gates[..., 3 * d :])], axis=-1
    )
    i, f, o, g = (acts[..., k * d : (k + 1) * d] for k in range(4))
    c = f * c_prev + i * g
    return c, o * xp.tanh(c), acts


def lstm_unit_backward(
    xp: Any, acts: Any, c_prev: Any, c: Any, c_diff: Any, h_diff: Any
) -> tuple[Any, Any]:
    """Gradients of one LSTMUnit step: (d gates (..., 4D), d c_prev (..., D)).

    Matches Caffe exactly, including the forget gate's ``f·(1 − f)`` derivative (which is
    σ' only when cont is 0 or 1, the values Caffe's nets use)."""
    d = c_prev.shape[-1]
    i, f, o, g = (acts[..., k * d : (k + 1) * d] for k in range(4))
    tanh_c = xp.tanh(c)
    c_term = c_diff + h_diff * o * (1 - tanh_c * tanh_c)
    gates_diff = xp.concatenate(
        [
            c_term * g * i * (1 - i),
            c_term * c_prev * f * (1 - f),
            h_diff * tanh_c * o * (1 - o),
            c_term * i * (1 - g * g),
        ],
        axis=-1,
    )
    return gates_diff, c_term * f


@register("LSTMUnit")
class LSTMUnitLayer(Layer):
    """One LSTM step (Caffe's LSTMUnit): bottoms c_prev (1, N, D), gates (1, N, 4D) in the
    order i, f, o, g, cont (1, N); tops c (1, N, D) and h (1, N, D). No gradient reaches
    cont."""

    bottoms = (3, 3)
    tops = (2, 2)

    def allow_force_backward(self, bottom_index: int) -> bool:
        return bottom_index != 2

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        c_prev, gates, cont = bottom
        n = c_prev.shape[1] if c_prev.num_axes > 1 else -1
        for i, (blob, axes) in enumerate(((c_prev, 3), (gates, 3), (cont, 2))):
            if blob.num_axes != axes or blob.shape[0] != 1 or blob.shape[1] != n:
                want = "(1, N)" if axes == 2 else "(1, N, D)" if i == 0 else "(1, N, 4D)"
                raise self.shape_error(
                    f"bottom {i} must be {want} with N = {n} from bottom 0; got {blob.shape}"
                )
        if gates.shape[2] != 4 * c_prev.shape[2]:
            raise self.shape_error(
                f"bottom 1 (gate inputs) must have 4 x {c_prev.shape[2]} channels; got "
                f"{gates.shape}"
            )
        top[0].reshape(c_prev.shape)
        top[1].reshape(c_prev.shape)

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        c, h, _ = lstm_unit_forward(self.xp, bottom[0].data, bottom[1].data, bottom[2].data)
        top[0].data = c.astype(self.dtype, copy=False)
        top[1].data = h.astype(self.dtype, copy=False)

    def backward(
        self, top: Sequence[Blob], propagate_down: Sequence[bool], bottom: Sequence[Blob]
    ) -> None:
        if propagate_down[2]:
            raise self.config_error("cannot backpropagate to bottom 2 (sequence indicators)")
        if not (propagate_down[0] or propagate_down[1]):
            return
        c_prev = bottom[0].data
        _, _, acts = lstm_unit_forward(self.xp, c_prev, bottom[1].data, bottom[2].data)
        gates_diff, c_prev_diff = lstm_unit_backward(
            self.xp, acts, c_prev, top[0].data, top[0].diff, top[1].diff
        )
        if propagate_down[0]:
            bottom[0].diff = c_prev_diff.astype(self.dtype, copy=False)
        if propagate_down[1]:
            bottom[1].diff = gates_diff.astype(self.dtype, copy=False)


class RecurrentLayer(Layer):
    """What RNN and LSTM share (Caffe's RecurrentLayer): bottoms, tops, state carry-over,
    parameter creation and the input/static projections and their gradients."""

    bottoms = (2, None)
    tops = (1, None)
    #: names of the recurrent state blobs (h0, c0 ...), Caffe's RecurrentInputBlobNames.
    state_names: tuple[str, ...] = ()
    #: how many gate rows per output unit the input projection has (RNN 1, LSTM 4).
    gate_factor = 1

    def allow_force_backward(self, bottom_index: int) -> bool:
        return bottom_index != 1

    # -- set-up and shapes -----------------------------------------------------------------
    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        param = self.layer_param.recurrent_param
        self.num_output = param.num_output
        if self.num_output <= 0:
            raise self.config_error("recurrent_param.num_output must be positive")
        self.expose_hidden = param.expose_hidden
        exposed = len(self.state_names) if self.expose_hidden else 0
        if not 2 + exposed <= len(bottom) <= 3 + exposed:
            raise self.config_error(
                f"takes x, cont, an optional x_static and {exposed} exposed state bottom(s); "
                f"got {len(bottom)} bottoms"
            )
        if len(top) != 1 + exposed:
            raise self.config_error(f"takes {1 + exposed} top(s) here; got {len(top)}")
        self.static_input = len(bottom) > 2 + exposed
        self.check_sequence_shapes(bottom)
        self.steps = bottom[0].shape[0]
        shapes = self.param_shapes(bottom)
        if self.blobs:
            got = [tuple(b.shape) for b in self.blobs]
            if got != [s for s, _ in shapes]:
                raise self.shape_error(
                    f"parameter shapes {got} do not match the expected {[s for s, _ in shapes]}"
                )
        else:
            for shape, filler in shapes:
                self.blobs.append(self.make_blob(shape, filler))
        self._state: list[Any] = []

    def param_shapes(self, bottom: Sequence[Blob]) -> list[tuple[tuple[int, ...], Any]]:
        """The parameters in Caffe's order with their fillers."""
        param = self.layer_param.recurrent_param
        rows = self.gate_factor * self.num_output
        shapes = [
            ((rows, bottom[0].count // max(prod(bottom[0].shape[:2]), 1)), param.weight_filler),
            ((rows,), param.bias_filler),
        ]
        if self.static_input:
            static = bottom[2]
            shapes.append(((rows, static.count // max(static.shape[0], 1)), param.weight_filler))
        shapes.append(((rows, self.num_output), param.weight_filler))
        return shapes

    def check_sequence_shapes(self, bottom: Sequence[Blob]) -> None:
        x, cont = bottom[0], bottom[1]
        if x.num_axes < 2:
            raise self.shape_error(
                f"bottom 0 must have at least 2 axes (timesteps, streams, ...); got {x.shape}"
            )
        if cont.shape != x.shape[:2]:
            raise self.shape_error(
                f"bottom 1 (cont) must be (timesteps, streams) = {x.shape[:2]}; got {cont.shape}"
            )
        if self.static_input:
            static = bottom[2]
            if static.num_axes < 1 or static.shape[0] != x.shape[1]:
                raise self.shape_error(
                    f"bottom 2 (x_static) must be (streams={x.shape[1]}, ...); got {static.shape}"
                )

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        self.check_sequence_shapes(bottom)
        steps, streams = bottom[0].shape[:2]
        if steps != self.steps:
            raise self.shape_error(
                f"the number of timesteps changed from {self.steps} to {steps}; a recurrent "
                "layer keeps the T it was set up with"
            )
        inputs = bottom[0].count // max(steps * streams, 1)
        if inputs != self.blobs[0].shape[1]:
            raise self.shape_error(
                f"bottom 0 has {inputs} values per step and stream; the weights expect "
                f"{self.blobs[0].shape[1]}"
            )
        state_shape = (1, streams, self.num_output)
        if self.expose_hidden:
            first = 3 if self.static_input else 2
            for name, blob in zip(self.state_names, bottom[first:]):
                if blob.shape != state_shape:
                    raise self.shape_error(f"bottom {name} must be {state_shape}; got {blob.shape}")
            for blob in top[1:]:
                blob.reshape(state_shape)
        top[0].reshape((steps, streams, self.num_output))

    # -- shared pieces of forward/backward -------------------------------------------------
    def initial_state(self, bottom: Sequence[Blob]) -> list[Any]:
        """h0 (and c0) as (N, D) arrays: exposed bottoms, or the previous pass's final state."""
        streams = bottom[0].shape[1]
        if self.expose_hidden:
            first = 3 if self.static_input else 2
            return [blob.data.reshape(streams, self.num_output) for blob in bottom[first:]]
        if not self._state or self._state[0].shape[0] != streams:
            zeros = self.xp.zeros((streams, self.num_output), dtype=self.dtype)
            self._state = [zeros] * len(self.state_names)
        return self._state

    def input_projection(self, bottom: Sequence[Blob]) -> Any:
        """``W_x·x_t + b`` for every step (T, N, rows), plus ``W_static·x_static``."""
        steps, streams = bottom[0].shape[:2]
        x = bottom[0].data.reshape(steps, streams, -1)
        projected = x @ self.blobs[0].data.T + self.blobs[1].data
        if self.static_input:
            static = bottom[2].data.reshape(streams, -1)
            projected = projected + (static @ self.blobs[2].data.T)[None]
        return projected

    def recurrent_weight(self) -> Blob:
        return self.blobs[3 if self.static_input else 2]

    def finish_forward(self, top: Sequence[Blob], output: Any, final: list[Any]) -> None:
        top[0].data = output.astype(self.dtype, copy=False)
        if self.expose_hidden:
            for blob, state in zip(top[1:], final):
                blob.data = state[None].astype(self.dtype, copy=False)
        else:
            self._state = [state.astype(self.dtype) for state in final]

    def finish_backward(
        self,
        propagate_down: Sequence[bool],
        bottom: Sequence[Blob],
        pre_diff: Any,
        h_conted: Any,
        state_diffs: list[Any],
    ) -> None:
        """Parameter and bottom gradients from d(pre-activation) (T, N, rows) of all steps;
        ``h_conted`` (T, N, D) is ``cont_t · h_{t−1}``, the recurrent product's input."""
        steps, streams = bottom[0].shape[:2]
        rows = pre_diff.shape[-1]
        flat = pre_diff.reshape(-1, rows)
        x = bottom[0].data.reshape(steps * streams, -1)
        wants = self.param_propagate_down
        if wants[0]:
            self.blobs[0].diff += (flat.T @ x).astype(self.dtype, copy=False)
        if wants[1]:
            self.blobs[1].diff += flat.sum(axis=0).astype(self.dtype, copy=False)
        recurrent = 3 if self.static_input else 2
        if wants[recurrent]:
            hc = h_conted.reshape(-1, self.num_output)
            self.blobs[recurrent].diff += (flat.T @ hc).astype(self.dtype, copy=False)
        if propagate_down[0]:
            grad = pre_diff @ self.blobs[0].data
            bottom[0].diff = grad.astype(self.dtype, copy=False).reshape(bottom[0].shape)
        if self.static_input:
            summed = pre_diff.sum(axis=0)
            if wants[2]:
                static = bottom[2].data.reshape(streams, -1)
                self.blobs[2].diff += (summed.T @ static).astype(self.dtype, copy=False)
            if propagate_down[2]:
                grad = (summed @ self.blobs[2].data).astype(self.dtype, copy=False)
                bottom[2].diff = grad.reshape(bottom[2].shape)
        if self.expose_hidden:
            first = 3 if self.static_input else 2
            for i, diff in enumerate(state_diffs, start=first):
                if propagate_down[i]:
                    bottom[i].diff = diff[None].astype(self.dtype, copy=False)

    def exposed_top_diffs(self, top: Sequence[Blob], streams: int) -> list[Any]:
        """Diffs arriving at hT (and cT), or zeros: the gradient flowing into the last step."""
        if self.expose_hidden:
            return [blob.diff.reshape(streams, self.num_output) for blob in top[1:]]
        zeros = self.xp.zeros((streams, self.num_output), dtype=self.dtype)
        return [zeros] * len(self.state_names)

    def refuse_cont_gradient(self, propagate_down: Sequence[bool]) -> None:
        if propagate_down[1]:
            raise self.config_error("cannot backpropagate to bottom 1 (sequence indicators)")


@register("RNN")
class RNNLayer(RecurrentLayer):
    """Elman RNN (Caffe's RNN): ``h_t = tanh(W_hh·(cont_t·h_{t−1}) + W_xh·x_t + b_h
    [+ W_xh_static·x_static])``, output ``o_t = tanh(W_ho·h_t + b_o)``.

    Parameters, in Caffe's order: W_xh (D, I), b_h (D), [W_xh_static (D, I_static)],
    W_hh (D, D), W_ho (D, D), b_o (D), with D = num_output.
    """

    state_names = ("h0",)

    def param_shapes(self, bottom: Sequence[Blob]) -> list[tuple[tuple[int, ...], Any]]:
        param = self.layer_param.recurrent_param
        d = self.num_output
        return super().param_shapes(bottom) + [
            ((d, d), param.weight_filler),
            ((d,), param.bias_filler),
        ]

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        xp = self.xp
        steps, streams = bottom[0].shape[:2]
        cont = bottom[1].data[..., None]
        projected = self.input_projection(bottom)
        w_hh = self.recurrent_weight().data
        w_ho, b_o = self.blobs[-2].data, self.blobs[-1].data
        # hidden[0] is h0; hidden[t + 1] is h_t.
        hidden = xp.empty((steps + 1, streams, self.num_output), dtype=projected.dtype)
        hidden[0] = self.initial_state(bottom)[0]
        for t in range(steps):
            hidden[t + 1] = xp.tanh((cont[t] * hidden[t]) @ w_hh.T + projected[t])
        output = xp.tanh(hidden[1:] @ w_ho.T + b_o)
        self._saved = (hidden, output)
        self.finish_forward(top, output, [hidden[steps]])

    def backward(
        self, top: Sequence[Blob], propagate_down: Sequence[bool], bottom: Sequence[Blob]
    ) -> None:
        self.refuse_cont_gradient(propagate_down)
        xp = self.xp
        steps, streams = bottom[0].shape[:2]
        cont = bottom[1].data[..., None]
        hidden, output = self._saved
        w_hh = self.recurrent_weight().data
        w_ho = self.blobs[-2].data
        out_diff = top[0].diff * (1 - output * output)
        if self.param_propagate_down[-2]:
            flat = out_diff.reshape(-1, self.num_output)
            h = hidden[1:].reshape(-1, self.num_output)
            self.blobs[-2].diff += (flat.T @ h).astype(self.dtype, copy=False)
        if self.param_propagate_down[-1]:
            self.blobs[-1].diff += out_diff.sum(axis=(0, 1)).astype(self.dtype, copy=False)
        h_diff = out_diff @ w_ho
        pre_diff = xp.empty_like(h_diff)
        (carry,) = self.exposed_top_diffs(top, streams)
        for t in range(steps - 1, -1, -1):
            pre_diff[t] = (h_diff[t] + carry) * (1 - hidden[t + 1] * hidden[t + 1])
            carry = cont[t] * (pre_diff[t] @ w_hh)
        self.finish_backward(propagate_down, bottom, pre_diff, cont * hidden[:-1], [carry])


@register("LSTM")
class LSTMLayer(RecurrentLayer):
    """Long short-term memory (Caffe's LSTM): gate inputs ``W_hc·(cont_t·h_{t−1}) + W_xc·x_t
    + b_c [+ W_xc_static·x_static]`` (4D, order i, f, o, g) feed an LSTMUnit step; the output
    is h_t for every step.

    Parameters, in Caffe's order: W_xc (4D, I), b_c (4D), [W_xc_static (4D, I_static)],
    W_hc (4D, D), with D = num_output.
    """

    state_names = ("h0", "c0")
    gate_factor = 4

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        xp = self.xp
        steps, streams = bottom[0].shape[:2]
        cont = bottom[1].data
        projected = self.input_projection(bottom)
        w_hc = self.recurrent_weight().data
        shape = (steps + 1, streams, self.num_output)
        # hidden[0], cell[0] are h0, c0; index t + 1 holds step t.
        hidden = xp.empty(shape, dtype=projected.dtype)
        cell = xp.empty(shape, dtype=projected.dtype)
        hidden[0], cell[0] = self.initial_state(bottom)
        acts = xp.empty_like(projected)
        for t in range(steps):
            gates = (cont[t][:, None] * hidden[t]) @ w_hc.T + projected[t]
            cell[t + 1], hidden[t + 1], acts[t] = lstm_unit_forward(xp, cell[t], gates, cont[t])
        self._saved = (hidden, cell, acts)
        self.finish_forward(top, hidden[1:], [hidden[steps], cell[steps]])

    def backward(
        self, top: Sequence[Blob], propagate_down: Sequence[bool], bottom: Sequence[Blob]
    ) -> None:
        self.refuse_cont_gradient(propagate_down)
        xp = self.xp
        steps, streams = bottom[0].shape[:2]
        cont = bottom[1].data[..., None]
        hidden, cell, acts = self._saved
        w_hc = self.recurrent_weight().data
        h_out_diff = top[0].diff
        pre_diff = xp.empty_like(acts)
        h_carry, c_carry = self.exposed_top_diffs(top, streams)
        for t in range(steps - 1, -1, -1):
            pre_diff[t], c_carry = lstm_unit_backward(
                xp, acts[t], cell[t], cell[t + 1], c_carry, h_out_diff[t] + h_carry
            )
            h_carry = cont[t] * (pre_diff[t] @ w_hc)
        self.finish_backward(
            propagate_down, bottom, pre_diff, cont * hidden[:-1], [h_carry, c_carry]
        )
