"""Loss layers and Accuracy, with Caffe's semantics.

Every loss layer here derives from ``LossLayer`` (Caffe's LossLayer): top 0 is a scalar
(a 0-axis blob), the Net gives it ``loss_weight: 1`` unless the prototxt says otherwise, and
backward multiplies the gradient by ``top[0].diff`` (where the Net puts the loss weight).
Labels are read as Caffe reads them, ``static_cast<int>`` of the stored float (truncation
toward zero), and no gradient ever flows into a label bottom.

Normalization (SoftmaxWithLoss, SigmoidCrossEntropyLoss, InfogainLoss) follows Caffe's
``get_normalizer``: FULL = outer·inner, VALID = the count of non-ignored labels, BATCH_SIZE =
outer, NONE = 1, always clamped to at least 1 so that a batch whose labels are all ignored
gives a zero loss instead of NaN.
"""

from __future__ import annotations

from collections.abc import Sequence
from math import prod
from typing import Any

import numpy as np

from netforge.blob import Blob
from netforge.errors import DataError
from netforge.layer import Layer, register
from netforge.proto import pb
from netforge.prototxt import parse_binary
from netforge.reading import read_bytes
from netforge.weights import stored_blob

#: Caffe's floor inside log() for SoftmaxWithLoss (``FLT_MIN``, also for double nets).
FLT_MIN = float(np.finfo(np.float32).tiny)
#: Caffe's kLOG_THRESHOLD (loss_layer.hpp): the floor for MultinomialLogistic and Infogain.
LOG_THRESHOLD = 1e-20

_Norm = pb.LossParameter


def _int_labels(xp: Any, data: Any) -> Any:
    """Labels as Caffe reads them: ``static_cast<int>``, i.e. truncation toward zero."""
    return xp.trunc(data).astype(np.int64)


def _legacy_dims(blob: Blob) -> tuple[int, int, int]:
    """Caffe's channels/height/width accessors (1 for an axis the blob does not have)."""
    shape = blob.shape
    return tuple(shape[i] if i < len(shape) else 1 for i in (1, 2, 3))


def _class_axis_dims(layer: Layer, bottom: Sequence[Blob], axis: int) -> tuple[int, int, int]:
    """(outer, channels, inner) of bottom 0 around its class ``axis``; bottom 1 must hold one
    label per (outer, inner) position (SoftmaxWithLoss, InfogainLoss, Accuracy)."""
    shape = bottom[0].shape
    axis = bottom[0].shape_index(axis)
    outer, channels, inner = prod(shape[:axis]), shape[axis], prod(shape[axis + 1 :])
    if outer * inner != bottom[1].count:
        raise layer.shape_error(
            f"number of labels must match number of predictions: with axis {axis} and "
            f"prediction shape {shape}, the label count must be {outer * inner}"
            f" (integers in 0..{channels - 1}); got label shape {bottom[1].shape}"
        )
    return outer, channels, inner


def _check_label_range(layer: Layer, labels: Any, valid: Any, num_labels: int) -> None:
    """Caffe only DCHECKs the label range; an out-of-range label would index garbage (or,
    on the GPU, silently wrap), so netforge names it instead. ``valid``: None (all count) or
    the mask of labels that are not the ignore_label."""
    bad = (labels < 0) | (labels >= num_labels)
    if valid is not None:
        bad &= valid
    if bool(layer.xp.any(bad)):
        value = int(labels[bad].ravel()[0])
        raise DataError(
            f"layer {layer.name!r} ({layer.type}): label {value} is outside [0, {num_labels})"
            "; labels must be class indices (or the ignore_label)"
        )


def _softmax(xp: Any, scores: Any) -> Any:
    """Softmax over axis 1 of an (outer, channels, inner) array, as Caffe's Softmax layer."""
    shifted = scores - scores.max(axis=1, keepdims=True)
    exp = xp.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


class LossLayer(Layer):
    """Caffe's LossLayer: two bottoms (prediction, label) whose first axes agree, a scalar
    top 0, ``loss_weight`` 1 by default, and no gradient into bottom 1 (the labels)."""

    bottoms = (2, 2)
    tops = (1, 1)
    is_loss = True

    def allow_force_backward(self, bottom_index: int) -> bool:
        return bottom_index != 1

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        if bottom[0].shape[:1] != bottom[1].shape[:1]:
            raise self.shape_error(
                f"the data and label should have the same first dimension; got "
                f"{bottom[0].shape} and {bottom[1].shape}"
            )
        top[0].reshape(())

    def refuse_label_gradient(self, propagate_down: Sequence[bool], *labels: int) -> None:
        """Raise when the Net asks for the gradient of a label bottom."""
        for i in labels:
            if i < len(propagate_down) and propagate_down[i]:
                raise self.config_error(
                    f"cannot backpropagate to bottom {i} (labels); set propagate_down: false "
                    "for it or do not force_backward into it"
                )

    def set_loss(self, top: Blob, value: Any) -> None:
        """Write the scalar loss into ``top`` in the layer's dtype."""
        top.data = self.xp.asarray(value, dtype=self.dtype).reshape(())

    def backward(
        self, top: Sequence[Blob], propagate_down: Sequence[bool], bottom: Sequence[Blob]
    ) -> None:
        """No gradient into the labels (bottom 1); bottom 0's diff is
        ``prediction_gradient``. Losses with other bottoms override this."""
        self.refuse_label_gradient(propagate_down, 1)
        if propagate_down[0]:
            self.write_diff(bottom[0], self.prediction_gradient(top[0].diff, bottom))

    def prediction_gradient(self, loss_weight: Any, bottom: Sequence[Blob]) -> Any:
        """d loss / d bottom 0 times ``loss_weight`` (top 0's diff), in any shape of bottom
        0's count."""
        raise NotImplementedError(f"layer type {self.type} does not implement its gradient")

    def write_diff(self, blob: Blob, grad: Any) -> None:
        """Overwrite ``blob``'s diff with ``grad`` (any shape of the same count), casting to
        the blob's dtype in the copy: the buffer sized at reshape is reused, not replaced."""
        blob.diff[...] = grad.reshape(blob.shape)

    def write_pair_diffs(
        self, top: Sequence[Blob], propagate_down: Sequence[bool], bottom: Sequence[Blob], grad: Any
    ) -> None:
        """Losses of a difference a − b (Euclidean, Contrastive): bottom 0 gets
        ``grad · loss_weight / N`` and bottom 1 its negative, each where asked for."""
        for i, sign in ((0, 1.0), (1, -1.0)):
            if propagate_down[i]:
                self.write_diff(bottom[i], grad * (sign * top[0].diff / bottom[i].shape[0]))

    def per_item_labels(self, bottom: Sequence[Blob]) -> tuple[Any, Any]:
        """Bottom 0 as (N, classes) and one checked integer label per item (Hinge,
        MultinomialLogistic)."""
        num = bottom[0].shape[0]
        scores = bottom[0].data.reshape(num, -1)
        labels = _int_labels(self.xp, bottom[1].data.reshape(num))
        _check_label_range(self, labels, None, scores.shape[1])
        return scores, labels


class _NormalizedLoss(LossLayer):
    """A loss over (outer, channels, inner) with ignore_label and a normalization mode."""

    #: The mode used when neither ``normalization`` nor ``normalize`` is set.
    default_normalization = _Norm.VALID
    #: Whether the legacy ``normalize`` field is accepted (InfogainLoss refuses it).
    accepts_normalize = True

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        lp = self.layer_param.loss_param
        self.ignore_label = lp.ignore_label if lp.HasField("ignore_label") else None
        if lp.HasField("normalization"):
            self.normalization = lp.normalization
        elif lp.HasField("normalize"):
            if not self.accepts_normalize:
                raise self.config_error(
                    "loss_param.normalize is deprecated here; use normalization: VALID (or "
                    "FULL, BATCH_SIZE, NONE)"
                )
            self.normalization = _Norm.VALID if lp.normalize else _Norm.BATCH_SIZE
        else:
            self.normalization = self.default_normalization

    def valid_mask(self, labels: Any) -> Any:
        """True where a label counts (None when there is no ignore_label: all count)."""
        return None if self.ignore_label is None else labels != self.ignore_label

    def normalizer(self, outer: int, inner: int, valid: Any) -> Any:
        """Caffe's get_normalizer, clamped to at least 1 (a device scalar for VALID)."""
        mode = self.normalization
        if mode == _Norm.FULL:
            value = outer * inner
        elif mode == _Norm.BATCH_SIZE:
            value = outer
        elif mode == _Norm.NONE:
            value = 1
        elif valid is None:
            value = outer * inner
        else:
            return self.xp.maximum(valid.sum(), 1).astype(self.dtype)
        return float(max(1, value))


class _SoftmaxLossBase(_NormalizedLoss):
    """Shared by SoftmaxWithLoss and InfogainLoss: softmax over ``axis``, labels per
    (outer, inner) position, optional second top = the probabilities."""

    def axis_param(self) -> int:
        raise NotImplementedError

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        super().reshape(bottom, top)
        self.outer, self.channels, self.inner = _class_axis_dims(self, bottom, self.axis_param())
        if len(top) > 1:
            top[1].reshape(bottom[0].shape)

    def probabilities(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> tuple[Any, Any, Any]:
        """Softmax probabilities (outer, C, inner), int labels (outer, inner) with ignored
        ones replaced by 0 (so they index safely), and the valid mask."""
        xp = self.xp
        scores = bottom[0].data.reshape(self.outer, self.channels, self.inner)
        prob = _softmax(xp, scores)
        labels = _int_labels(xp, bottom[1].data.reshape(self.outer, self.inner))
        valid = self.valid_mask(labels)
        _check_label_range(self, labels, valid, self.channels)
        if len(top) > 1:
            top[1].data = prob.reshape(bottom[0].shape)
        safe = labels if valid is None else xp.where(valid, labels, 0)
        return prob, safe, valid

    def masked_gradient(self, grad: Any, valid: Any, loss_weight: Any) -> Any:
        """``grad`` (outer, C, inner), zero where ``valid`` is False, times
        ``loss_weight / normalizer``."""
        if valid is not None:
            grad = grad * valid[:, None, :]
        return grad * (loss_weight / self.normalizer(self.outer, self.inner, valid))


@register("SoftmaxWithLoss")
class SoftmaxWithLossLayer(_SoftmaxLossBase):
    """Multinomial logistic loss of the softmax of the scores (Caffe's SoftmaxWithLoss).

    ``loss = -Σ log(max(p[label], FLT_MIN)) / normalizer`` over non-ignored positions, the
    softmax taken over ``softmax_param.axis``; the optional second top is the softmax.
    The gradient is ``(p - onehot(label)) · loss_weight / normalizer``, zero where ignored.
    """

    tops = (1, 2)

    def axis_param(self) -> int:
        return self.layer_param.softmax_param.axis

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        xp = self.xp
        prob, safe, valid = self.probabilities(bottom, top)
        picked = xp.take_along_axis(prob, safe[:, None, :], axis=1)[:, 0, :]
        log_p = xp.log(xp.maximum(picked, FLT_MIN))
        if valid is not None:
            log_p = xp.where(valid, log_p, 0)
        self._saved = (prob, safe, valid)
        self.set_loss(top[0], -log_p.sum() / self.normalizer(self.outer, self.inner, valid))

    def prediction_gradient(self, loss_weight: Any, bottom: Sequence[Blob]) -> Any:
        prob, labels, valid = self._saved
        onehot = self.xp.arange(self.channels)[None, :, None] == labels[:, None, :]
        return self.masked_gradient(prob - onehot, valid, loss_weight)


@register("InfogainLoss")
class InfogainLossLayer(_SoftmaxLossBase):
    """Infogain loss of the softmax of the scores (Caffe's InfogainLoss, softmax inside).

    ``loss = -Σ_positions Σ_l H[label, l] · log(max(p_l, 1e-20)) / normalizer``; H (C×C) comes
    from ``infogain_loss_param.source`` (a BlobProto file) or from a third bottom; the softmax
    is over ``infogain_loss_param.axis``. The gradient is ``p · ΣH[label, :] − H[label, :]``.
    Caffe refuses the legacy ``normalize`` field here and so does netforge. Unlike Caffe,
    which aborts, force_backward never asks for the gradient of H (bottom 2).
    """

    bottoms = (2, 3)
    tops = (1, 2)
    accepts_normalize = False

    def axis_param(self) -> int:
        return self.layer_param.infogain_loss_param.axis

    def allow_force_backward(self, bottom_index: int) -> bool:
        return bottom_index == 0

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        super().setup(bottom, top)
        self.infogain = None
        if len(bottom) < 3:
            param = self.layer_param.infogain_loss_param
            if not param.HasField("source"):
                raise self.config_error(
                    "the infogain matrix H is missing: set infogain_loss_param.source to a "
                    "BlobProto (.binaryproto) file or give H as a third bottom"
                )
            matrix = read_blob_proto(param.source, self)
            self.infogain = self.backend.asarray(matrix.astype(self.dtype))

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        super().reshape(bottom, top)
        size = self.infogain.size if len(bottom) < 3 else bottom[2].count
        if size != self.channels**2:
            raise self.shape_error(
                f"the infogain matrix H has {size} values; it must be "
                f"{self.channels}x{self.channels} (the number of labels squared)"
            )

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        xp = self.xp
        prob, safe, valid = self.probabilities(bottom, top)
        matrix = self.infogain if len(bottom) < 3 else bottom[2].data
        matrix = matrix.reshape(self.channels, self.channels)
        # Row H[label] for every position, laid out like prob: (outer, C, inner).
        rows = xp.moveaxis(matrix[safe], -1, 1)
        weighted = rows * xp.log(xp.maximum(prob, LOG_THRESHOLD))
        if valid is not None:
            weighted = weighted * valid[:, None, :]
        self._saved = (prob, rows, matrix.sum(axis=1)[safe], valid)
        self.set_loss(top[0], -weighted.sum() / self.normalizer(self.outer, self.inner, valid))

    def backward(
        self, top: Sequence[Blob], propagate_down: Sequence[bool], bottom: Sequence[Blob]
    ) -> None:
        if len(propagate_down) > 2 and propagate_down[2]:
            raise self.config_error("cannot backpropagate to bottom 2 (the infogain matrix)")
        super().backward(top, propagate_down, bottom)

    def prediction_gradient(self, loss_weight: Any, bottom: Sequence[Blob]) -> Any:
        prob, rows, row_sums, valid = self._saved
        return self.masked_gradient(prob * row_sums[:, None, :] - rows, valid, loss_weight)


def read_blob_proto(path: str, layer: Layer) -> np.ndarray:
    """The array stored in a BlobProto file (Caffe's ReadProtoFromBinaryFile + FromProto):
    the legacy num/channels/height/width shape when present, else ``shape.dim``; values
    from ``double_data`` when it is non-empty, else ``data``."""
    where = f"layer {layer.name!r} ({layer.type})"
    try:
        raw = read_bytes(path)
    except OSError as exc:
        raise DataError(f"{where}: cannot read BlobProto file {path!r}: {exc.strerror}") from exc
    return stored_blob(parse_binary(raw, pb.BlobProto, path), f"{where}: {path}").data


@register("EuclideanLoss")
class EuclideanLossLayer(LossLayer):
    """``loss = Σ(a − b)² / (2N)``, N = the first axis; both bottoms get gradients
    (``±(a − b) · loss_weight / N``) and both may be force-backwarded, as in Caffe."""

    def allow_force_backward(self, bottom_index: int) -> bool:
        return True

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        super().reshape(bottom, top)
        if bottom[0].count != bottom[1].count:
            raise self.shape_error(
                f"inputs must have the same dimension; got {bottom[0].shape} and {bottom[1].shape}"
            )

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        self._diff = bottom[0].data - bottom[1].data.reshape(bottom[0].shape)
        self.set_loss(top[0], (self._diff * self._diff).sum() / bottom[0].shape[0] / 2)

    def backward(
        self, top: Sequence[Blob], propagate_down: Sequence[bool], bottom: Sequence[Blob]
    ) -> None:
        self.write_pair_diffs(top, propagate_down, bottom, self._diff)


@register("SigmoidCrossEntropyLoss")
class SigmoidCrossEntropyLossLayer(_NormalizedLoss):
    """Cross-entropy of sigmoid(x) against targets t in [0, 1] (Caffe's
    SigmoidCrossEntropyLoss), with Caffe's overflow-free formula
    ``x·(t − [x ≥ 0]) − log(1 + exp(x − 2x·[x ≥ 0]))`` summed (negated) over positions whose
    ``int(t)`` is not the ignore_label. With neither ``normalization`` nor ``normalize`` set
    the normalizer is the batch size (Caffe's historical default for this layer).
    """

    default_normalization = _Norm.BATCH_SIZE

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        super().reshape(bottom, top)
        if bottom[0].count != bottom[1].count:
            raise self.shape_error(
                f"inputs must have the same count; got {bottom[0].shape} and {bottom[1].shape}"
            )
        self.outer = bottom[0].shape[0]
        self.inner = bottom[0].count // max(self.outer, 1)

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        xp = self.xp
        x = bottom[0].data
        target = bottom[1].data.reshape(x.shape)
        positive = (x >= 0).astype(x.dtype)
        terms = x * (target - positive) - xp.log1p(xp.exp(x - 2 * x * positive))
        valid = self.valid_mask(_int_labels(xp, target))
        if valid is not None:
            terms = xp.where(valid, terms, 0)
        self._valid = valid
        self._normalizer = self.normalizer(self.outer, self.inner, valid)
        self.set_loss(top[0], -terms.sum() / self._normalizer)

    def prediction_gradient(self, loss_weight: Any, bottom: Sequence[Blob]) -> Any:
        x = bottom[0].data
        # Caffe's Sigmoid layer form, which cannot overflow.
        grad = 0.5 * self.xp.tanh(0.5 * x) + 0.5 - bottom[1].data.reshape(x.shape)
        if self._valid is not None:
            grad = grad * self._valid
        return grad * (loss_weight / self._normalizer)


@register("HingeLoss")
class HingeLossLayer(LossLayer):
    """One-vs-all hinge loss (Caffe's HingeLoss): with the label's score negated,
    ``m = max(0, 1 + score)`` per class; L1: ``Σm / N``, L2: ``Σm² / N``."""

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        super().reshape(bottom, top)
        num = bottom[0].shape[0]
        if bottom[1].count != num:
            raise self.shape_error(f"needs one label per item ({num}); got {bottom[1].shape}")
        norm = self.layer_param.hinge_loss_param.norm
        if norm not in (pb.HingeLossParameter.L1, pb.HingeLossParameter.L2):
            raise self.config_error(f"unknown hinge_loss_param.norm {norm}; use L1 or L2")

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        xp = self.xp
        num = bottom[0].shape[0]
        scores, labels = self.per_item_labels(bottom)
        # -1 at the label's column, +1 elsewhere.
        self._sign = 1 - 2 * (xp.arange(scores.shape[1])[None, :] == labels[:, None])
        self._margin = xp.maximum(0, 1 + self._sign * scores)
        if self.layer_param.hinge_loss_param.norm == pb.HingeLossParameter.L1:
            loss = self._margin.sum()
        else:
            loss = (self._margin * self._margin).sum()
        self.set_loss(top[0], loss / num)

    def prediction_gradient(self, loss_weight: Any, bottom: Sequence[Blob]) -> Any:
        if self.layer_param.hinge_loss_param.norm == pb.HingeLossParameter.L1:
            grad = self._sign * (self._margin > 0)
        else:
            grad = 2 * self._sign * self._margin
        return grad * (loss_weight / bottom[0].shape[0])


@register("ContrastiveLoss")
class ContrastiveLossLayer(LossLayer):
    """Contrastive loss of a pair (a, b) with similarity y (Caffe's ContrastiveLoss):
    ``d² = ||a − b||²``; a similar pair (``int(y) != 0``) adds d², a dissimilar one adds
    ``max(margin − d, 0)²`` (``legacy_version``: ``max(margin − d², 0)``); the sum is divided
    by 2N. The gradient of the non-legacy term uses ``d + 1e-4`` in its denominator, as
    Caffe does. a and b both get gradients; y never does.
    """

    bottoms = (3, 3)

    def allow_force_backward(self, bottom_index: int) -> bool:
        return bottom_index != 2

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        super().reshape(bottom, top)
        a, b, y = bottom
        ca, cb, cy = _legacy_dims(a), _legacy_dims(b), _legacy_dims(y)
        if ca[1:] != (1, 1) or cb[1:] != (1, 1) or ca[0] != cb[0] or a.shape != b.shape:
            raise self.shape_error(
                f"bottoms 0 and 1 must both be (N, C) or (N, C, 1, 1) of one shape; got "
                f"{a.shape} and {b.shape}"
            )
        if cy != (1, 1, 1) or y.shape[:1] != a.shape[:1]:
            raise self.shape_error(
                f"bottom 2 (similarity) must hold one value per pair; got {y.shape}"
            )

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        xp = self.xp
        param = self.layer_param.contrastive_loss_param
        num = bottom[0].shape[0]
        self._diff = (bottom[0].data - bottom[1].data).reshape(num, -1)
        self._dist_sq = (self._diff * self._diff).sum(axis=1)
        self._similar = _int_labels(xp, bottom[2].data.reshape(num)) != 0
        if param.legacy_version:
            apart = xp.maximum(param.margin - self._dist_sq, 0)
        else:
            apart = xp.maximum(param.margin - xp.sqrt(self._dist_sq), 0) ** 2
        loss = xp.where(self._similar, self._dist_sq, apart).sum()
        self.set_loss(top[0], loss / num / 2)

    def backward(
        self, top: Sequence[Blob], propagate_down: Sequence[bool], bottom: Sequence[Blob]
    ) -> None:
        self.refuse_label_gradient(propagate_down, 2)
        xp = self.xp
        param = self.layer_param.contrastive_loss_param
        if param.legacy_version:
            mdist = param.margin - self._dist_sq
            apart = xp.full_like(mdist, -1.0)
        else:
            dist = xp.sqrt(self._dist_sq)
            mdist = param.margin - dist
            apart = -mdist / (dist + 1e-4)
        coeff = xp.where(self._similar, 1.0, xp.where(mdist > 0, apart, 0.0))
        self.write_pair_diffs(top, propagate_down, bottom, coeff[:, None] * self._diff)


@register("MultinomialLogisticLoss")
class MultinomialLogisticLossLayer(LossLayer):
    """``loss = −Σ log(max(p[label], 1e-20)) / N`` over probabilities p (N, C...) (Caffe's
    MultinomialLogisticLoss: p should already be a distribution, e.g. a Softmax top)."""

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        super().reshape(bottom, top)
        if _legacy_dims(bottom[1]) != (1, 1, 1):
            raise self.shape_error(f"labels must be (N) or (N, 1, 1, 1); got {bottom[1].shape}")

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        xp = self.xp
        num = bottom[0].shape[0]
        prob, labels = self.per_item_labels(bottom)
        self._labels = labels
        self._picked = xp.maximum(xp.take_along_axis(prob, labels[:, None], axis=1), LOG_THRESHOLD)
        self.set_loss(top[0], -xp.log(self._picked).sum() / num)

    def prediction_gradient(self, loss_weight: Any, bottom: Sequence[Blob]) -> Any:
        num = bottom[0].shape[0]
        onehot = self.xp.arange(bottom[0].count // num)[None, :] == self._labels[:, None]
        return onehot * (-loss_weight / num / self._picked)


@register("Accuracy")
class AccuracyLayer(Layer):
    """Top-k classification accuracy (Caffe's Accuracy); not a loss and not differentiable.

    A position counts as correct when fewer than ``top_k`` classes score ``>=`` the true
    class's score (so ties count against it, as in Caffe); positions whose label is
    ``accuracy_param.ignore_label`` are skipped; top 0 is correct/counted (0 when nothing
    is counted). The optional top 1 holds the accuracy of each class (0 for a class that
    does not occur). force_backward never reaches this layer's bottoms.
    """

    bottoms = (2, 2)
    tops = (1, 2)

    def allow_force_backward(self, bottom_index: int) -> bool:
        return False

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        param = self.layer_param.accuracy_param
        self.top_k = param.top_k
        self.ignore_label = param.ignore_label if param.HasField("ignore_label") else None

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        if bottom[1].count == 0 or self.top_k > bottom[0].count // bottom[1].count:
            raise self.config_error(
                f"top_k ({self.top_k}) must be at most the number of classes "
                f"({bottom[0].count // max(bottom[1].count, 1)})"
            )
        axis = self.layer_param.accuracy_param.axis
        self.outer, self.channels, self.inner = _class_axis_dims(self, bottom, axis)
        top[0].reshape(())
        if len(top) > 1:
            top[1].reshape((self.channels,))

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        xp = self.xp
        scores = bottom[0].data.reshape(self.outer, self.channels, self.inner)
        labels = _int_labels(xp, bottom[1].data.reshape(self.outer, self.inner))
        valid = xp.ones(labels.shape, dtype=bool)
        if self.ignore_label is not None:
            valid = labels != self.ignore_label
        _check_label_range(self, labels, valid, self.channels)
        safe = xp.where(valid, labels, 0)
        true_score = xp.take_along_axis(scores, safe[:, None, :], axis=1)
        # The true class itself is among the ">=" scores, hence the -1 (as Caffe counts).
        better = (scores >= true_score).sum(axis=1) - 1
        correct = valid & (better < self.top_k)
        count = valid.sum()
        accuracy = xp.where(count > 0, correct.sum() / xp.maximum(count, 1), 0)
        top[0].data = accuracy.astype(self.dtype).reshape(())
        if len(top) > 1:
            flat = safe.ravel()
            seen = xp.bincount(
                flat, weights=valid.ravel().astype(np.float64), minlength=self.channels
            )
            hits = xp.bincount(
                flat, weights=correct.ravel().astype(np.float64), minlength=self.channels
            )
            per_class = xp.where(seen > 0, hits / xp.maximum(seen, 1), 0)
            top[1].data = per_class.astype(self.dtype)
