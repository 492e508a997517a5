"""netforge.coord_map (pycaffe's caffe.coord_map): the cases of BVLC
python/caffe/test/test_coord_map.py with fixed values, and a crop built by crop() checked by
running the net."""

from __future__ import annotations

import numpy as np
import pytest

import netforge
from netforge import layers as L
from netforge import params as P
from netforge.coord_map import coord_map_from_to, crop


def coord_net_spec(ks=3, stride=1, pad=0, pool=2, dstride=2, dpad=0, nested=False):
    """Conv, pool, deconv on a 100x100 input (and a 20x20 auxiliary input). As in pycaffe,
    the deconvolution's keywords go into the spec only; ``nested`` puts them in its
    ``convolution_param``, as a net that is built must (Deconvolution has no message of its
    own name)."""
    n = netforge.NetSpec()
    n.data = L.Input(shape=dict(dim=[2, 1, 100, 100]))
    n.aux = L.Input(shape=dict(dim=[2, 1, 20, 20]))
    n.conv = L.Convolution(n.data, num_output=10, kernel_size=ks, stride=stride, pad=pad)
    n.pool = L.Pooling(n.conv, pool=P.Pooling.MAX, kernel_size=pool, stride=pool, pad=0)
    deconv_ks = [s * 2 for s in dstride] if isinstance(dstride, list) else dstride * 2
    deconv = dict(num_output=10, kernel_size=deconv_ks, stride=dstride, pad=dpad)
    if nested:
        n.deconv = L.Deconvolution(n.pool, convolution_param=deconv)
    else:
        n.deconv = L.Deconvolution(n.pool, **deconv)
    return n


def test_conv_pool_deconv():
    n = coord_net_spec()
    assert coord_map_from_to(n.deconv, n.data) == (1, 1, 0)  # 2x pool, 2x deconv: identity
    n = coord_net_spec(pool=4, dstride=4)
    assert coord_map_from_to(n.deconv, n.data) == (1, 1, -1)  # shift by one


def test_pass_through_and_1x1_conv_are_identities():
    n = coord_net_spec()
    expected = coord_map_from_to(n.deconv, n.data)
    n.relu = L.ReLU(n.deconv)
    n.conv1x1 = L.Convolution(n.relu, num_output=10, kernel_size=1, stride=1, pad=0)
    for top in (n.relu, n.conv1x1):
        assert coord_map_from_to(top, n.data) == expected


@pytest.mark.parametrize("pad", [1, 4, 10])
def test_padding_shifts(pad):
    _, a, b = coord_map_from_to(*(lambda n: (n.deconv, n.data))(coord_net_spec()))
    _, a_pad, b_pad = coord_map_from_to(*(lambda n: (n.deconv, n.data))(coord_net_spec(pad=pad)))
    assert (a_pad, b_pad) == (a, b - pad)  # conv padding adds an offset
    n = coord_net_spec(dpad=pad)
    assert coord_map_from_to(n.deconv, n.data)[1:] == (a, b + pad)  # deconv padding removes it
    n = coord_net_spec(pad=pad, dpad=pad)
    assert coord_map_from_to(n.deconv, n.data)[1:] == (a, b)


def test_multiple_bottoms_map_alike():
    n = coord_net_spec()
    n.conv_data, n.conv_aux = L.Convolution(
        n.data, n.aux, ntop=2, num_output=10, kernel_size=5, stride=2, pad=0
    )
    assert coord_map_from_to(n.conv_data, n.data) == coord_map_from_to(n.conv_aux, n.aux)


def test_anisotropic_maps_are_their_isotropic_parts():
    n3 = coord_net_spec(ks=3, stride=1, pad=0)
    n5 = coord_net_spec(ks=5, stride=2, pad=10)
    n35 = coord_net_spec(ks=[3, 5], stride=[1, 2], pad=[0, 10])
    ax3, a3, b3 = coord_map_from_to(n3.deconv, n3.data)
    ax5, a5, b5 = coord_map_from_to(n5.deconv, n5.data)
    ax35, a35, b35 = coord_map_from_to(n35.deconv, n35.data)
    assert ax3 == ax5 == ax35 == 1
    assert (a35[0], b35[0], a35[1], b35[1]) == (a3, b3, a5, b5)
    # deconv (a 2, b 1.5), pool (1/2, -1/4) and conv 5/2/10 (1/2, (10 - 2) / 2) compose to
    # (1/2, 5) from data to deconv; inverted: x -> 2 x - 10.
    assert (a5, b5) == (2, -10)


def test_nd_conv():
    n = netforge.NetSpec()
    n.data = L.Input(shape=dict(dim=[2, 3, 100, 100, 100]))
    n.conv = L.Convolution(
        n.data, num_output=10, kernel_size=[3, 3, 3], stride=[1, 1, 1], pad=[0, 1, 2]
    )
    n.pool = L.Pooling(n.conv, pool=P.Pooling.MAX, kernel_size=2, stride=2, pad=0)
    n.deconv = L.Deconvolution(n.pool, num_output=10, kernel_size=4, stride=2, pad=0)
    ax, a, b = coord_map_from_to(n.deconv, n.data)
    assert ax == 1 and len(a) == len(b) == 3 and np.all(a == 1)
    np.testing.assert_array_equal(b, [0, -1, -2])


@pytest.mark.parametrize("offset", [0, 3, 10])
def test_crop_of_crop(offset):
    n = coord_net_spec()
    ax, a, b = coord_map_from_to(n.deconv, n.data)
    n.crop = L.Crop(n.deconv, n.data, axis=2, offset=offset)
    assert coord_map_from_to(n.crop, n.data) == (ax, a, b + offset)


def test_crop_helper_builds_a_crop_that_runs():
    # conv 3 pad 2: 102, pool: 51, deconv: (51 - 1) * 2 + 4 = 104; the conv's pad 2 is the
    # offset of the data's 100 pixels in the deconv's 104.
    n = coord_net_spec(pad=2, nested=True)
    n.crop = crop(n.deconv, n.data)
    proto = n.to_proto()
    layer = proto.layer[-1]
    assert layer.type == "Crop" and layer.crop_param.axis == 2
    assert list(layer.crop_param.offset) == [2]
    net = netforge.Net(proto, netforge.TEST)
    out = net.forward(data=np.zeros((2, 1, 100, 100)), aux=np.zeros((2, 1, 20, 20)))
    assert net.blobs["deconv"].shape[2:] == (104, 104)
    assert out["crop"].shape == (2, 10, 100, 100)
    np.testing.assert_array_equal(out["crop"], net.blobs["deconv"].data[:, :, 2:102, 2:102])


def test_unconnected_and_impossible_crops_are_refused():
    n = coord_net_spec()
    n.ip = L.InnerProduct(n.deconv, num_output=10)
    with pytest.raises(RuntimeError, match="connected by spatial layers"):
        coord_map_from_to(n.ip, n.data)
    n = coord_net_spec(pool=3, dstride=2)  # pool 3x, deconv 2x
    with pytest.raises(AssertionError, match="scale mismatch"):
        crop(n.deconv, n.data)
    n = coord_net_spec(dpad=10)  # output smaller than the input
    with pytest.raises(AssertionError, match="negative offset"):
        crop(n.deconv, n.data)
