"""Loss layers and Accuracy: forward against float64 references written here, gradients with
Caffe's checker thresholds (inventory §8.3), normalization modes, ignore_label, label refusal."""

from __future__ import annotations

import numpy as np
import pytest

from netforge.backend import to_numpy
from netforge.errors import ConfigError, DataError, ShapeError
from netforge.proto import pb
from tests.harness import build, check_gradient, run

FLT_MIN = np.finfo(np.float32).tiny


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def log_softmax_ref(x: np.ndarray, axis: int) -> np.ndarray:
    m = x.max(axis=axis, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=axis, keepdims=True))


def softmax_loss_ref(x, labels, axis=1, ignore=None, mode="VALID"):
    """Loop reference over every (outer, inner) position."""
    logp = log_softmax_ref(x.astype(np.float64), axis)
    moved = np.moveaxis(logp, axis, -1).reshape(-1, x.shape[axis])
    flat = labels.reshape(-1).astype(int)
    total, count = 0.0, 0
    for pos, lab in enumerate(flat):
        if ignore is not None and lab == ignore:
            continue
        total -= max(moved[pos, lab], np.log(FLT_MIN))
        count += 1
    outer = int(np.prod(x.shape[:axis]))
    norm = {"FULL": flat.size, "VALID": count, "BATCH_SIZE": outer, "NONE": 1}[mode]
    return total / max(norm, 1)


# -- SoftmaxWithLoss -----------------------------------------------------------------------
SPATIAL_X = rng(1).normal(size=(2, 4, 3, 2))
SPATIAL_LABELS = rng(2).integers(0, 4, size=(2, 1, 3, 2)).astype(np.float64)
SPATIAL_LABELS[0, 0, 1, 1] = 255
SPATIAL_LABELS[1, 0, 0, 0] = 255


@pytest.mark.parametrize("mode", ["FULL", "VALID", "BATCH_SIZE", "NONE"])
def test_softmax_loss_normalization_modes_with_ignore(backend, mode):
    text = f"""type: "SoftmaxWithLoss"
        loss_param {{ ignore_label: 255 normalization: {mode} }}"""
    (loss,) = run(text, [SPATIAL_X, SPATIAL_LABELS], backend=backend)
    assert loss.shape == ()
    expected = softmax_loss_ref(SPATIAL_X, SPATIAL_LABELS, ignore=255, mode=mode)
    np.testing.assert_allclose(loss, expected, rtol=1e-10)


@pytest.mark.parametrize(("normalize", "mode"), [("true", "VALID"), ("false", "BATCH_SIZE")])
def test_softmax_loss_legacy_normalize(backend, normalize, mode):
    text = f"""type: "SoftmaxWithLoss"
        loss_param {{ ignore_label: 255 normalize: {normalize} }}"""
    (loss,) = run(text, [SPATIAL_X, SPATIAL_LABELS], backend=backend)
    expected = softmax_loss_ref(SPATIAL_X, SPATIAL_LABELS, ignore=255, mode=mode)
    np.testing.assert_allclose(loss, expected, rtol=1e-10)


def test_softmax_loss_normalization_wins_over_normalize(backend):
    text = """type: "SoftmaxWithLoss"
        loss_param { normalize: false normalization: FULL }"""
    labels = np.where(SPATIAL_LABELS == 255, 0, SPATIAL_LABELS)
    (loss,) = run(text, [SPATIAL_X, labels], backend=backend)
    np.testing.assert_allclose(loss, softmax_loss_ref(SPATIAL_X, labels, mode="FULL"))


def test_softmax_loss_axis_and_prob_top(backend):
    x = rng(3).normal(size=(3, 2, 5))
    labels = rng(4).integers(0, 5, size=(3, 2)).astype(np.float64)
    text = 'type: "SoftmaxWithLoss" softmax_param { axis: -1 }'
    loss, prob = run(text, [x, labels], num_tops=2, backend=backend)
    np.testing.assert_allclose(loss, softmax_loss_ref(x, labels, axis=2), rtol=1e-10)
    np.testing.assert_allclose(prob, np.exp(log_softmax_ref(x, 2)), rtol=1e-10)


def test_softmax_loss_all_ignored_is_zero_not_nan(backend):
    labels = np.full((2, 1, 3, 2), 255.0)
    text = 'type: "SoftmaxWithLoss" loss_param { ignore_label: 255 }'
    (loss,) = run(text, [SPATIAL_X, labels], backend=backend)
    assert loss == 0.0


def test_softmax_loss_clamps_log_at_flt_min(backend):
    x = np.array([[0.0, -1000.0]])
    (loss,) = run('type: "SoftmaxWithLoss"', [x, np.array([1.0])], backend=backend)
    np.testing.assert_allclose(loss, -np.log(FLT_MIN))


@pytest.mark.parametrize("mode", ["VALID", "BATCH_SIZE"])
def test_softmax_loss_gradient(backend, mode):
    text = f"""type: "SoftmaxWithLoss"
        loss_param {{ ignore_label: 255 normalization: {mode} }}"""
    checked = check_gradient(
        text, [SPATIAL_X, SPATIAL_LABELS], check_bottoms=[0], threshold=1e-2, backend=backend
    )
    assert checked == SPATIAL_X.size


def test_loss_gradient_is_scaled_by_top_diff(backend):
    # The Net stores the loss weight in top[0].diff; Σ w·loss checks that the layer uses it.
    text = 'type: "SoftmaxWithLoss" loss_param { ignore_label: 255 }'
    check_gradient(
        text,
        [SPATIAL_X, SPATIAL_LABELS],
        check_bottoms=[0],
        threshold=1e-2,
        top_weights=[np.array(3.5)],
        backend=backend,
    )


@pytest.mark.parametrize(
    "text",
    [
        'type: "SoftmaxWithLoss"',
        'type: "SigmoidCrossEntropyLoss"',
        'type: "HingeLoss"',
        'type: "MultinomialLogisticLoss"',
    ],
)
def test_losses_refuse_label_gradients(backend, text):
    x = rng(5).uniform(0.1, 1.0, size=(3, 4))
    labels = np.array([0.0, 3.0, 1.0]) if "Sigmoid" not in text else (x > 0.5) * 1.0
    layer, bottom, top = build(text, [x, labels], backend=backend)
    assert layer.is_loss
    assert layer.allow_force_backward(0) and not layer.allow_force_backward(1)
    layer.forward(bottom, top)
    top[0].diff = backend.xp.ones((), dtype=np.float64)
    with pytest.raises(ConfigError, match="cannot backpropagate to bottom 1"):
        layer.backward(top, [True, True], bottom)


def test_softmax_loss_label_checks(backend):
    with pytest.raises(ShapeError, match="number of labels"):
        run('type: "SoftmaxWithLoss"', [SPATIAL_X, np.zeros((2, 5))], backend=backend)
    with pytest.raises(ShapeError, match="same first dimension"):
        run('type: "SoftmaxWithLoss"', [np.zeros((2, 3)), np.zeros((3,))], backend=backend)
    with pytest.raises(DataError, match="label 7 is outside"):
        run('type: "SoftmaxWithLoss"', [np.zeros((2, 3)), np.array([1.0, 7.0])], backend=backend)


# -- EuclideanLoss -------------------------------------------------------------------------
def test_euclidean_loss_forward_and_gradient(backend):
    a = rng(6).normal(size=(4, 3, 2))
    b = rng(7).normal(size=(4, 6))
    (loss,) = run('type: "EuclideanLoss"', [a, b], backend=backend)
    expected = sum(np.sum((a[i].ravel() - b[i]) ** 2) for i in range(4)) / 4 / 2
    np.testing.assert_allclose(loss, expected, rtol=1e-12)
    layer, _, _ = build('type: "EuclideanLoss"', [a, b], backend=backend)
    assert layer.allow_force_backward(0) and layer.allow_force_backward(1)
    checked = check_gradient('type: "EuclideanLoss"', [a, b], threshold=1e-2, backend=backend)
    assert checked == a.size + b.size


# -- SigmoidCrossEntropyLoss ---------------------------------------------------------------
def sigmoid_ce_ref(x, t, ignore=None, mode="BATCH_SIZE"):
    total, count = 0.0, 0
    for xi, ti in zip(x.ravel(), t.ravel()):
        if ignore is not None and int(ti) == ignore:
            continue
        p = 1 / (1 + np.exp(-xi))
        total -= ti * np.log(p) + (1 - ti) * np.log(1 - p)
        count += 1
    norm = {"FULL": x.size, "VALID": count, "BATCH_SIZE": x.shape[0], "NONE": 1}[mode]
    return total / max(norm, 1)


SIG_X = rng(8).normal(scale=2.0, size=(3, 5))
SIG_T = rng(9).uniform(size=(3, 5))
SIG_T_IGNORE = SIG_T.copy()
SIG_T_IGNORE[0, 2] = SIG_T_IGNORE[2, 4] = -1


def test_sigmoid_cross_entropy_default_is_batch_size(backend):
    (loss,) = run('type: "SigmoidCrossEntropyLoss"', [SIG_X, SIG_T], backend=backend)
    np.testing.assert_allclose(loss, sigmoid_ce_ref(SIG_X, SIG_T), rtol=1e-10)


@pytest.mark.parametrize("mode", ["FULL", "VALID", "BATCH_SIZE", "NONE"])
def test_sigmoid_cross_entropy_modes_with_ignore(backend, mode):
    text = f"""type: "SigmoidCrossEntropyLoss"
        loss_param {{ ignore_label: -1 normalization: {mode} }}"""
    (loss,) = run(text, [SIG_X, SIG_T_IGNORE], backend=backend)
    np.testing.assert_allclose(loss, sigmoid_ce_ref(SIG_X, SIG_T_IGNORE, -1, mode), rtol=1e-10)


def test_sigmoid_cross_entropy_is_stable_for_large_inputs(backend):
    x = np.array([[800.0, -800.0]])
    (loss,) = run('type: "SigmoidCrossEntropyLoss"', [x, np.array([[0.0, 1.0]])], backend=backend)
    np.testing.assert_allclose(loss, 1600.0)


def test_sigmoid_cross_entropy_gradient(backend):
    text = 'type: "SigmoidCrossEntropyLoss" loss_param { ignore_label: -1 normalize: true }'
    checked = check_gradient(
        text, [SIG_X, SIG_T_IGNORE], check_bottoms=[0], threshold=1e-2, backend=backend
    )
    assert checked == SIG_X.size


# -- HingeLoss -----------------------------------------------------------------------------
HINGE_X = rng(10).uniform(-2, 2, size=(4, 5))
HINGE_LABELS = np.array([0.0, 4.0, 2.0, 2.0])


def hinge_ref(x, labels, power):
    total = 0.0
    for i, lab in enumerate(labels.astype(int)):
        for j in range(x.shape[1]):
            y = 1.0 if j == lab else -1.0
            total += max(0.0, 1.0 - y * x[i, j]) ** power
    return total / x.shape[0]


@pytest.mark.parametrize(("norm", "power"), [("L1", 1), ("L2", 2)])
def test_hinge_loss_forward(backend, norm, power):
    text = f'type: "HingeLoss" hinge_loss_param {{ norm: {norm} }}'
    (loss,) = run(text, [HINGE_X, HINGE_LABELS], backend=backend)
    np.testing.assert_allclose(loss, hinge_ref(HINGE_X, HINGE_LABELS, power), rtol=1e-12)


def test_hinge_loss_gradient_l1(backend):
    check_gradient(
        'type: "HingeLoss"',
        [HINGE_X, HINGE_LABELS],
        check_bottoms=[0],
        threshold=1e-2,
        backend=backend,
    )


def test_hinge_loss_gradient_l2(backend):
    check_gradient(
        'type: "HingeLoss" hinge_loss_param { norm: L2 }',
        [HINGE_X, HINGE_LABELS],
        check_bottoms=[0],
        threshold=2e-3,
        kink=1.0,
        kink_range=0.01,
        backend=backend,
    )


# -- InfogainLoss --------------------------------------------------------------------------
INFO_X = rng(11).normal(size=(3, 4, 2))
INFO_LABELS = rng(12).integers(0, 4, size=(3, 2)).astype(np.float64)
INFO_LABELS[1, 1] = -1
INFO_H = rng(13).uniform(size=(4, 4))


def infogain_ref(x, labels, h, ignore=None, mode="VALID"):
    prob = np.exp(log_softmax_ref(x, 1))
    total, count = 0.0, 0
    for i in range(x.shape[0]):
        for j in range(x.shape[2]):
            lab = int(labels[i, j])
            if ignore is not None and lab == ignore:
                continue
            for c in range(x.shape[1]):
                total -= h[lab, c] * np.log(max(prob[i, c, j], 1e-20))
            count += 1
    norm = {"FULL": labels.size, "VALID": count, "BATCH_SIZE": x.shape[0], "NONE": 1}[mode]
    return total / max(norm, 1)


@pytest.mark.parametrize("mode", ["VALID", "FULL", "BATCH_SIZE", "NONE"])
def test_infogain_loss_with_matrix_bottom(backend, mode):
    text = f'type: "InfogainLoss" loss_param {{ ignore_label: -1 normalization: {mode} }}'
    loss, prob = run(text, [INFO_X, INFO_LABELS, INFO_H], num_tops=2, backend=backend)
    expected = infogain_ref(INFO_X, INFO_LABELS, INFO_H, -1, mode)
    np.testing.assert_allclose(loss, expected, rtol=1e-10)
    np.testing.assert_allclose(prob, np.exp(log_softmax_ref(INFO_X, 1)), rtol=1e-10)


def write_blob_proto(path, array, legacy):
    proto = pb.BlobProto()
    if legacy:
        proto.num, proto.channels = 1, 1
        proto.height, proto.width = array.shape
        proto.data.extend(array.ravel().astype(np.float32))
    else:
        proto.shape.dim.extend(array.shape)
        proto.double_data.extend(array.ravel())
    path.write_bytes(proto.SerializeToString())


@pytest.mark.parametrize("legacy", [True, False])
def test_infogain_loss_reads_source(backend, tmp_path, legacy):
    source = tmp_path / "h.binaryproto"
    write_blob_proto(source, INFO_H, legacy)
    text = f"""type: "InfogainLoss" loss_param {{ ignore_label: -1 }}
        infogain_loss_param {{ source: "{source}" }}"""
    (loss,) = run(text, [INFO_X, INFO_LABELS], backend=backend)
    h = INFO_H.astype(np.float32).astype(np.float64) if legacy else INFO_H
    np.testing.assert_allclose(loss, infogain_ref(INFO_X, INFO_LABELS, h, -1), rtol=1e-10)


def test_infogain_loss_errors(backend, tmp_path):
    with pytest.raises(ConfigError, match="infogain matrix H is missing"):
        run('type: "InfogainLoss"', [INFO_X, INFO_LABELS], backend=backend)
    missing = tmp_path / "absent.binaryproto"
    with pytest.raises(DataError, match="cannot read BlobProto"):
        run(
            f'type: "InfogainLoss" infogain_loss_param {{ source: "{missing}" }}',
            [INFO_X, INFO_LABELS],
            backend=backend,
        )
    corrupt = tmp_path / "corrupt.binaryproto"
    corrupt.write_bytes(b"\x0a\xff\xff")
    with pytest.raises(DataError, match="corrupt"):
        run(
            f'type: "InfogainLoss" infogain_loss_param {{ source: "{corrupt}" }}',
            [INFO_X, INFO_LABELS],
            backend=backend,
        )
    with pytest.raises(ShapeError, match="4x4"):
        run('type: "InfogainLoss"', [INFO_X, INFO_LABELS, np.ones((3, 3))], backend=backend)
    with pytest.raises(ConfigError, match="normalize is deprecated"):
        run(
            'type: "InfogainLoss" loss_param { normalize: true }',
            [INFO_X, INFO_LABELS, INFO_H],
            backend=backend,
        )


def test_infogain_loss_gradient(backend):
    text = 'type: "InfogainLoss" loss_param { ignore_label: -1 } infogain_loss_param { axis: 1 }'
    checked = check_gradient(
        text,
        [INFO_X, INFO_LABELS, INFO_H],
        check_bottoms=[0],
        stepsize=1e-4,
        threshold=2e-2,
        backend=backend,
    )
    assert checked == INFO_X.size
    layer, _, _ = build(text, [INFO_X, INFO_LABELS, INFO_H], backend=backend)
    assert [layer.allow_force_backward(i) for i in range(3)] == [True, False, False]


# -- ContrastiveLoss -----------------------------------------------------------------------
CON_A = rng(14).uniform(-1, 1, size=(5, 3, 1, 1))
CON_B = rng(15).uniform(-1, 1, size=(5, 3, 1, 1))
CON_Y = np.array([1.0, 0.0, 0.0, 1.0, 0.0]).reshape(5, 1, 1, 1)


def contrastive_ref(a, b, y, margin, legacy):
    total = 0.0
    for i in range(a.shape[0]):
        d2 = float(np.sum((a[i] - b[i]) ** 2))
        if int(y.ravel()[i]):
            total += d2
        elif legacy:
            total += max(margin - d2, 0.0)
        else:
            total += max(margin - np.sqrt(d2), 0.0) ** 2
    return total / a.shape[0] / 2


@pytest.mark.parametrize("legacy", ["false", "true"])
def test_contrastive_loss_forward(backend, legacy):
    text = f"""type: "ContrastiveLoss"
        contrastive_loss_param {{ margin: 1.5 legacy_version: {legacy} }}"""
    (loss,) = run(text, [CON_A, CON_B, CON_Y], backend=backend)
    expected = contrastive_ref(CON_A, CON_B, CON_Y, 1.5, legacy == "true")
    np.testing.assert_allclose(loss, expected, rtol=1e-12)


@pytest.mark.parametrize("legacy", ["false", "true"])
def test_contrastive_loss_gradient(backend, legacy):
    text = f'type: "ContrastiveLoss" contrastive_loss_param {{ legacy_version: {legacy} }}'
    checked = check_gradient(
        text, [CON_A, CON_B, CON_Y], check_bottoms=[0, 1], threshold=1e-2, backend=backend
    )
    assert checked == CON_A.size * 2
    layer, _, _ = build(text, [CON_A, CON_B, CON_Y], backend=backend)
    assert [layer.allow_force_backward(i) for i in range(3)] == [True, True, False]


# -- MultinomialLogisticLoss ---------------------------------------------------------------
def test_multinomial_logistic_loss(backend):
    p = rng(16).uniform(0.05, 1.0, size=(4, 5))
    p[2, 3] = 0.0
    labels = np.array([1.0, 4.0, 3.0, 0.0])
    (loss,) = run('type: "MultinomialLogisticLoss"', [p, labels], backend=backend)
    expected = -sum(np.log(max(p[i, int(k)], 1e-20)) for i, k in enumerate(labels)) / 4
    np.testing.assert_allclose(loss, expected, rtol=1e-12)
    p[2, 3] = 0.5
    check_gradient(
        'type: "MultinomialLogisticLoss"',
        [p, labels],
        check_bottoms=[0],
        threshold=2e-2,
        kink=0.0,
        kink_range=0.05,
        backend=backend,
    )


# -- Accuracy ------------------------------------------------------------------------------
def accuracy_ref(x, labels, top_k=1, ignore=None):
    """Loop reference on (N, C) scores: correct if fewer than k classes score >= true."""
    hits, count = 0, 0
    per_hit, per_seen = np.zeros(x.shape[1]), np.zeros(x.shape[1])
    for row, lab in zip(x, labels.astype(int)):
        if ignore is not None and lab == ignore:
            continue
        better = sum(1 for k in range(x.shape[1]) if k != lab and row[k] >= row[lab])
        ok = better < top_k
        hits += ok
        count += 1
        per_seen[lab] += 1
        per_hit[lab] += ok
    per_class = np.divide(per_hit, per_seen, out=np.zeros_like(per_hit), where=per_seen > 0)
    return (hits / count if count else 0.0), per_class


ACC_X = rng(17).normal(size=(12, 5))
ACC_X[3, 1] = ACC_X[3, 2]  # a tie with the true class counts against it
ACC_LABELS = rng(18).integers(0, 4, size=12).astype(np.float64)  # class 4 never occurs
ACC_LABELS[3] = 2
ACC_LABELS[5] = -1


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_accuracy_top_k_ignore_and_per_class(backend, top_k):
    text = f'type: "Accuracy" accuracy_param {{ top_k: {top_k} ignore_label: -1 }}'
    acc, per_class = run(text, [ACC_X, ACC_LABELS], num_tops=2, backend=backend)
    want, want_per_class = accuracy_ref(ACC_X, ACC_LABELS, top_k, -1)
    np.testing.assert_allclose(acc, want, rtol=1e-12)
    np.testing.assert_allclose(per_class, want_per_class, rtol=1e-12)
    assert per_class.shape == (5,) and per_class[4] == 0


def test_accuracy_axis(backend):
    x = np.moveaxis(ACC_X.reshape(3, 4, 5), 2, 1)  # (3, 5 classes, 4 positions)
    labels = ACC_LABELS.reshape(3, 4)
    text = 'type: "Accuracy" accuracy_param { axis: 1 ignore_label: -1 }'
    (acc,) = run(text, [x, labels], backend=backend)
    np.testing.assert_allclose(acc, accuracy_ref(ACC_X, ACC_LABELS, 1, -1)[0], rtol=1e-12)


def test_accuracy_checks_and_no_backward(backend):
    with pytest.raises(ConfigError, match="top_k"):
        run('type: "Accuracy" accuracy_param { top_k: 6 }', [ACC_X, ACC_LABELS], backend=backend)
    layer, bottom, top = build('type: "Accuracy"', [ACC_X, ACC_LABELS], backend=backend)
    assert not layer.is_loss
    assert not layer.allow_force_backward(0) and not layer.allow_force_backward(1)
    with pytest.raises(ConfigError, match="cannot backpropagate"):
        layer.backward(top, [True, False], bottom)


def test_float32_losses_match_float64(backend):
    layer, bottom, top = build(
        'type: "SoftmaxWithLoss" loss_param { ignore_label: 255 }',
        [SPATIAL_X, SPATIAL_LABELS],
        dtype=np.float32,
        backend=backend,
    )
    layer.forward(bottom, top)
    assert top[0].data.dtype == np.float32
    expected = softmax_loss_ref(SPATIAL_X, SPATIAL_LABELS, ignore=255)
    np.testing.assert_allclose(to_numpy(top[0].data), expected, rtol=1e-5)
