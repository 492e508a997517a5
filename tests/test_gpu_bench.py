"""tools/bench_gpu.py: the benchmark nets, and the PyTorch translation checked against netforge.

The translation test builds a small net with every layer kind the benchmark nets use (grouped
and padded convolution, in-place ReLU, ceil-mode max pooling with a clipped last window, LRN,
padded average pooling, a Concat of two branches, InnerProduct, two weighted losses), copies
netforge's weights into the PyTorch modules and compares the loss and the input gradient in
float64: PyTorch is the independent reference for Caffe's semantics here.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format

from netforge.graph import DATA_LAYER_PARAMS
from netforge.net import Net
from netforge.proto import pb

TOOLS = Path(__file__).resolve().parent.parent / "tools"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", TOOLS / "bench_gpu.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_gpu"] = module
    spec.loader.exec_module(module)
    return module


bench_gpu = load_bench()

SMALL_NET = """
name: "translation"
force_backward: true
layer { name: "data" type: "Input" top: "data" top: "label"
        input_param { shape { dim: 2 dim: 4 dim: 9 dim: 9 } shape { dim: 2 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        param { lr_mult: 1 decay_mult: 1 } param { lr_mult: 2 decay_mult: 0 }
        convolution_param { num_output: 6 kernel_size: 3 stride: 1 pad: 1 group: 2
          weight_filler { type: "gaussian" std: 0.3 } bias_filler { type: "gaussian" std: 0.1 } } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
        pooling_param { pool: MAX kernel_size: 3 stride: 2 } }
layer { name: "norm1" type: "LRN" bottom: "pool1" top: "norm1"
        lrn_param { local_size: 5 alpha: 0.5 beta: 0.75 } }
layer { name: "a" type: "Convolution" bottom: "norm1" top: "a"
        convolution_param { num_output: 3 kernel_size: 1
          weight_filler { type: "gaussian" std: 0.3 } bias_filler { type: "gaussian" std: 0.1 } } }
layer { name: "b" type: "Pooling" bottom: "norm1" top: "b"
        pooling_param { pool: AVE kernel_size: 3 stride: 2 pad: 1 } }
layer { name: "b_conv" type: "Convolution" bottom: "b" top: "b_conv"
        convolution_param { num_output: 3 kernel_size: 2 stride: 1 pad: 1
          weight_filler { type: "gaussian" std: 0.3 } bias_filler { type: "gaussian" std: 0.1 } } }
layer { name: "cat" type: "Concat" bottom: "a" bottom: "b_conv" top: "cat" }
layer { name: "fc" type: "InnerProduct" bottom: "cat" top: "fc"
        inner_product_param { num_output: 5
          weight_filler { type: "gaussian" std: 0.3 } bias_filler { type: "gaussian" std: 0.1 } } }
layer { name: "aux" type: "InnerProduct" bottom: "norm1" top: "aux"
        inner_product_param { num_output: 5
          weight_filler { type: "gaussian" std: 0.3 } bias_filler { type: "gaussian" std: 0.1 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc" bottom: "label" top: "loss" }
layer { name: "aux_loss" type: "SoftmaxWithLoss" bottom: "aux" bottom: "label" top: "aux_loss"
        loss_weight: 0.3 }
"""


@pytest.mark.parametrize("name", sorted(bench_gpu.BENCHES))
def test_benchmark_net_takes_random_inputs(name: str) -> None:
    bench = bench_gpu.BENCHES[name]
    param = bench_gpu.train_net_param(bench, 3)
    net = Net(param, pb.TRAIN)
    assert net.blobs["data"].shape == (3, *bench.item)
    assert net.blobs["label"].shape == (3,)
    assert not any(layer.type in DATA_LAYER_PARAMS for layer in net.layers)
    # GoogLeNet trains on its two auxiliary classifiers too (weight 0.3), as the prototxt says.
    expected = {"caffenet": {"loss": 1.0}, "googlenet": {"loss1/loss1": 0.3, "loss2/loss2": 0.3}}
    for blob, weight in expected[name].items():
        assert net.loss_weights[blob] == pytest.approx(weight)
    solver = bench_gpu.solver_param(bench, 3)
    assert solver.HasField("net_param") and not solver.HasField("net")
    assert not solver.test_iter and solver.display == 0 and solver.snapshot == 0


def test_batch_overrides() -> None:
    assert bench_gpu.parse_batches("caffenet=8")["caffenet"] == 8
    assert bench_gpu.parse_batches("")["googlenet"] == 32
    with pytest.raises(SystemExit):
        bench_gpu.parse_batches("resnet=4")


def test_pytorch_translation_matches_netforge() -> None:
    torch = pytest.importorskip("torch")
    param = text_format.Parse(SMALL_NET, pb.NetParameter())
    net = Net(param, pb.TRAIN, dtype=np.float64, rng=np.random.default_rng(3))
    rng = np.random.default_rng(4)
    data = rng.standard_normal((2, 4, 9, 9))
    labels = np.array([1.0, 4.0])
    net.blobs["data"].data = data
    net.blobs["label"].data = labels
    loss = net.forward_backward()

    tensors = {
        "data": torch.tensor(data, requires_grad=True),
        "label": torch.tensor(labels).long(),
    }
    for layer, bottoms, tops in zip(net.layers, net.layer_bottoms, net.layer_tops):
        shapes = [net.blobs[b].shape for b in bottoms]
        module = bench_gpu.torch_module(torch, layer, shapes)
        if module is None:
            continue
        if isinstance(module, torch.nn.Module):
            module.double()
            with torch.no_grad():
                for tensor, blob in zip(module.parameters(), layer.blobs):
                    tensor.copy_(torch.from_numpy(blob.data))
        outputs = module(*(tensors[b] for b in bottoms))
        tensors.update(zip(tops, outputs) if len(tops) > 1 else [(tops[0], outputs)])
    # Compared after the whole pass: in-place layers overwrite their bottoms in both.
    for name, tensor in tensors.items():
        got = tensor.detach().numpy()
        np.testing.assert_allclose(got, net.blobs[name].data, rtol=1e-10, atol=1e-12)
    total = sum(weight * tensors[name] for name, weight in net.loss_weights.items())
    total.backward()
    assert total.item() == pytest.approx(loss, rel=1e-12)
    np.testing.assert_allclose(
        tensors["data"].grad.numpy(), net.blobs["data"].diff, rtol=1e-9, atol=1e-12
    )


@pytest.mark.gpu
def test_benchmark_runs_on_the_gpu(tmp_path: Path) -> None:
    """One short round of both nets on the GPU: positive rates and memory figures."""
    args = ["--batch", "caffenet=8,googlenet=4", "--rounds", "1", "--seconds", "0"]
    args += ["--warmup", "1", "--json", str(tmp_path / "bench.json")]
    results = bench_gpu.main(args)
    assert [r.net for r in results] == ["caffenet", "googlenet"]
    for result in results:
        assert result.median("netforge") > 0
        assert result.memory["netforge"]["peak_used"] > 0
        assert result.memory["netforge"]["pool_held"] >= result.memory["netforge"]["peak_used"]
        if "pytorch" in result.rates:
            assert result.memory["pytorch"]["peak_allocated"] > 0
            assert result.ratio > 0
    assert (tmp_path / "bench.json").stat().st_size > 0
