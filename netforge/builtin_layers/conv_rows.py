"""Stride-1 2-D convolution as one GEMM per kernel row over shared window rows.

im2col copies each input element prod(kernel) times. A stride-1 2-D convolution can skip
most of that copy. Lay the padded input channels-last and copy each *window row* once,
into a matrix ``rows`` with one row per (padded input row y', item n, output column x)
and one column per (kernel column j, channel c). The im2col matrix of kernel row i is then
the block of ``rows`` that starts at y' = i·dh: a contiguous slice, with no copy. So the
convolution is a sum over i of kh GEMMs, (Ho·n·Wo, kw·C) · (kw·C, O), and the output
comes out channels-last.

The copy is kw·Hp/Ho times the input where im2col's is kh·kw times. The GEMMs have a long
M and a short N, a shape OpenBLAS runs faster than im2col's (O, K) · (K, n·pixels). One
forward chunk of CIFAR-10 quick's conv2 (5 items, 1 core) takes 0.44 ms this way and
0.73 ms with im2col + GEMM. The data gradient is either the same computation run on the
top gradient (a "full" correlation with the flipped, channel-transposed filters:
``data_gradient_conv``) or the adjoint of the forward GEMMs (``data_gradient``); the layer
picks whichever moves less data for its shapes.

Groups are the leading axis of every operand, so each GEMM is one batched ``matmul``.
Everything here is plain xp code, but the layer uses it only on numpy: on a GPU, im2col
and one large GEMM suit cuBLAS better.
"""

from __future__ import annotations

from typing import Any, ClassVar

from netforge.backend import get_array_module
from netforge.builtin_layers.conv_ops import Geometry, Workspace


class RowShiftConv:
    """A stride-1 2-D convolution of ``channels`` → ``num_output`` channels in ``group``
    groups, on inputs of spatial size ``spatial``, computed by kernel-row shifts."""

    #: Whether the adjoint of forward (``data_gradient``) computes the bottom gradient faster
    #: than the full correlation (``data_gradient_conv``) where the top has at least twice
    #: the bottom's channels: the correlation's GEMMs then have the bottom's few channels as
    #: their short side (CIFAR-10 quick's conv3: 5.5 ms against 6.4 ms).
    adjoint_for_wide_tops: ClassVar[bool] = True

    def __init__(
        self,
        channels: int,
        num_output: int,
        group: int,
        geom: Geometry,
        spatial: tuple,
        name: str = "rowshift",
    ) -> None:
        #: Prefix of this convolution's own workspace buffers (its zero-padded input copy).
        self.name = name
        self.group = group
        self.in_group = channels // group
        self.out_group = num_output // group
        self.kernel, self.dilation, self.pad = geom.kernel, geom.dilation, geom.pad
        self.spatial = tuple(spatial)
        self.padded = tuple(h + 2 * p for h, p in zip(spatial, geom.pad))
        self.out = tuple(
            hp - d * (k - 1) for hp, k, d in zip(self.padded, geom.kernel, geom.dilation)
        )

    @property
    def depth(self) -> int:
        """The GEMMs' inner dimension, kw · channels per group."""
        return self.kernel[1] * self.in_group

    @property
    def stack_shape(self) -> tuple[int, int, int, int]:
        """The shape ``weights`` gives the filters: (kh, group, kw·in_group, out_group)."""
        return (self.kernel[0], self.group, self.depth, self.out_group)

    @property
    def filters_shape(self) -> tuple[int, ...]:
        """The shape of ``filters`` and of the filter gradients ``add_weight_gradient`` sums:
        here ``stack_shape``."""
        return self.stack_shape

    def items_size(self, n: int) -> int:
        """Elements of the ``rows`` matrix for ``n`` items."""
        return self.group * self.padded[0] * n * self.out[1] * self.depth

    def weights(self, w: Any) -> Any:
        """Filters ``(group·out_group, in_group, kh, kw)`` as the contiguous
        ``(kh, group, kw·in_group, out_group)`` stack of GEMM operands."""
        g, kh, kw = self.group, *self.kernel
        stack = w.reshape(g, self.out_group, self.in_group, kh, kw).transpose(3, 0, 4, 2, 1)
        xp = get_array_module(w)
        return xp.ascontiguousarray(stack).reshape(self.stack_shape)

    def filters(self, w: Any) -> Any:
        """The filters ``(group·out_group, in_group, kh, kw)`` as ``apply`` takes them, shaped
        ``filters_shape``: here the ``weights`` stack."""
        return self.weights(w)

    def weight_diff(self, stack: Any) -> Any:
        """The inverse of ``filters``: a filter gradient that ``add_weight_gradient`` summed
        (shaped ``filters_shape``) as filters (num_output, in_group, kh, kw), here a view."""
        g, kh, kw = self.group, *self.kernel
        view = stack.reshape(kh, g, kw, self.in_group, self.out_group).transpose(1, 4, 3, 0, 2)
        return view.reshape(g * self.out_group, self.in_group, kh, kw)

    def rows_buffer(self, ws: Workspace, key: str, n: int, dtype: Any, xp: Any) -> Any:
        """The workspace buffer ``key`` that ``rows`` fills for ``n`` items."""
        return self._window_rows_buffer(ws, key, n, dtype, xp)

    def _window_rows_buffer(self, ws: Workspace, key: str, n: int, dtype: Any, xp: Any) -> Any:
        """The workspace buffer ``key`` holding the window rows of ``n`` items, as the
        ``(group, Hp·n·Wo, kw·in_group)`` matrix."""
        shape = (self.group, self.padded[0], n, self.out[1], self.kernel[1], self.in_group)
        return ws.get(key, shape, dtype, xp).reshape(self.group, -1, self.depth)

    def rows(self, x: Any, ws: Workspace, key: str, scratch: bool = False) -> Any:
        """Fill ``rows_buffer(key)`` with the window rows of the chunk ``x`` (n, C, H, W);
        of ``ws.scratch`` when ``scratch`` (rows that do not outlive the layer's call)."""
        xp = get_array_module(x)
        n, c = x.shape[:2]
        (ph, pw), (hp, wp) = self.pad, self.padded
        channels_last = ws.get(self.name + "_nhwc", (n, hp, wp, c), x.dtype, xp, fill=0)
        xp.copyto(
            channels_last[:, ph : ph + x.shape[2], pw : pw + x.shape[3]], x.transpose(0, 2, 3, 1)
        )
        s_n, s_y, s_x, s_c = channels_last.strides
        g, kw, wo = self.group, self.kernel[1], self.out[1]
        window = xp.lib.stride_tricks.as_strided(
            channels_last,
            (g, hp, n, wo, kw, self.in_group),
            (self.in_group * s_c, s_y, s_n, s_x, self.dilation[1] * s_x, s_c),
        )
        rows = self._window_rows_buffer(ws.scratch if scratch else ws, key, n, x.dtype, xp)
        xp.copyto(rows.reshape(window.shape), window)
        return rows

    def _shifted(self, rows: Any, i: int, n: int) -> Any:
        """The im2col matrix of kernel row ``i``: (group, Ho·n·Wo, kw·in_group), a view."""
        step = n * self.out[1]
        start = i * self.dilation[0] * step
        return rows[:, start : start + self.out[0] * step]

    def apply(self, rows: Any, weights: Any, y: Any, bias: Any, ws: Workspace) -> None:
        """Write the convolution of the items behind ``rows`` with the filters ``weights``
        (from ``filters``) into ``y`` (n, num_output, Ho, Wo), adding ``bias`` (num_output)
        unless it is None."""
        xp, ws = get_array_module(rows), ws.scratch
        n = y.shape[0]
        shape = (self.group, self.out[0] * n * self.out[1], self.out_group)
        acc = ws.get("rowshift_acc", shape, rows.dtype, xp)
        xp.matmul(self._shifted(rows, 0, n), weights[0], out=acc)
        if len(weights) > 1:
            term = ws.get("rowshift_term", shape, rows.dtype, xp)
            for i in range(1, len(weights)):
                xp.add(acc, xp.matmul(self._shifted(rows, i, n), weights[i], out=term), out=acc)
        self._store(acc.reshape(self.group, self.out[0], n, self.out[1], self.out_group), y, bias)

    def _store(self, out_rows: Any, y: Any, bias: Any) -> None:
        """Copy the output rows ``(group, Ho, n, Wo, out_group)`` into ``y`` (n, num_output,
        Ho, Wo), adding ``bias`` (num_output) unless it is None."""
        xp = get_array_module(y)
        (ho, wo), g, n = self.out, self.group, y.shape[0]
        view = out_rows.transpose(2, 0, 4, 1, 3)
        target = y.reshape(n, g, self.out_group, ho, wo)
        if bias is None:
            xp.copyto(target, view)
        else:
            xp.add(view, bias.reshape(1, g, self.out_group, 1, 1), out=target)

    def channels_last(self, dy: Any, ws: Workspace) -> Any:
        """The top gradient chunk ``dy`` (n, num_output, Ho, Wo) in the layout ``apply``
        writes, ``(group, Ho·n·Wo, out_group)``, in a workspace buffer."""
        xp = get_array_module(dy)
        n, (ho, wo), g = dy.shape[0], self.out, self.group
        dy_last = ws.scratch.get("rowshift_dy", (g, ho * n * wo, self.out_group), dy.dtype, xp)
        xp.copyto(
            dy_last.reshape(g, ho, n, wo, self.out_group),
            dy.reshape(n, g, self.out_group, ho, wo).transpose(1, 3, 0, 4, 2),
        )
        return dy_last

    def add_weight_gradient(self, rows: Any, dy_last: Any, stack: Any, ws: Workspace) -> None:
        """Add the filter gradient of one chunk, in the ``filters`` layout, to ``stack``:
        for each kernel row i, (im2col matrix i)ᵀ · dy, with dy from ``channels_last``."""
        xp = get_array_module(rows)
        n = dy_last.shape[1] // (self.out[0] * self.out[1])
        term = ws.scratch.get("rowshift_dw", stack.shape[1:], dy_last.dtype, xp)
        for i in range(len(stack)):
            shifted = self._shifted(rows, i, n).transpose(0, 2, 1)
            xp.add(stack[i], xp.matmul(shifted, dy_last, out=term), out=stack[i])

    def data_gradient(self, dy_last: Any, stack: Any, dx: Any, ws: Workspace) -> None:
        """Write the bottom gradient ``dx`` (n, C, H, W) of one chunk: the adjoint of
        ``apply``. Kernel row i's share of the window rows, dy · W_iᵀ, is added into the
        block of rows it was read from; then each window row's kernel columns are added
        back onto the padded pixels they copied, and the padding is cropped off.
        ``dy_last`` may go on past the output's rows (a tiled layout pads them); they are
        not read."""
        xp, ws = get_array_module(dx), ws.scratch
        n, c = dx.shape[:2]
        (ph, pw), (hp, wp), (kh, kw) = self.pad, self.padded, self.kernel
        g, block = self.group, self.out[0] * n * self.out[1]
        dy_last = dy_last[:, :block]
        d_rows = self._window_rows_buffer(ws, self.name + "_drows", n, dx.dtype, xp)
        xp.matmul(dy_last, stack[0].transpose(0, 2, 1), out=d_rows[:, :block])
        d_rows[:, block:] = 0
        term = ws.get("rowshift_dterm", (g, block, self.depth), dx.dtype, xp)
        for i in range(1, kh):
            rows_i = self._shifted(d_rows, i, n)
            xp.add(rows_i, xp.matmul(dy_last, stack[i].transpose(0, 2, 1), out=term), out=rows_i)
        grad = ws.get(self.name + "_dnhwc", (n, hp, wp, c), dx.dtype, xp)
        grad.fill(0)
        s_n, s_y, s_x, s_c = grad.strides
        shape = (g, hp, n, self.out[1], self.in_group)
        strides = (self.in_group * s_c, s_y, s_n, s_x, s_c)
        d_rows = d_rows.reshape(g, hp, n, self.out[1], kw, self.in_group)
        for j in range(kw):
            pixels = xp.lib.stride_tricks.as_strided(
                grad[:, :, j * self.dilation[1] :], shape, strides
            )
            xp.add(pixels, d_rows[:, :, :, :, j], out=pixels)
        xp.copyto(dx, grad[:, ph : ph + dx.shape[2], pw : pw + dx.shape[3]].transpose(0, 3, 1, 2))

    def data_gradient_conv(self) -> RowShiftConv | None:
        """The convolution that maps the top gradient to the bottom gradient: output
        channels and input channels swapped, padded by d(k − 1) − p (None where that is
        negative, i.e. the padding exceeds the dilated kernel)."""
        pad = tuple(d * (k - 1) - p for k, d, p in zip(self.kernel, self.dilation, self.pad))
        if min(pad) < 0:
            return None
        geom = Geometry(self.kernel, (1, 1), pad, self.dilation)
        channels, num_output = self.group * self.out_group, self.group * self.in_group
        return type(self)(channels, num_output, self.group, geom, self.out, self.name + "_dx")

    def transposed_filters(self, w: Any) -> Any:
        """The filters of ``data_gradient_conv``, as a view of this convolution's filters
        ``w``: each group's input and output channels swapped, both kernel axes flipped."""
        g, kh, kw = self.group, *self.kernel
        view = w.reshape(g, self.out_group, self.in_group, kh, kw)[:, :, :, ::-1, ::-1]
        return view.swapaxes(1, 2)
