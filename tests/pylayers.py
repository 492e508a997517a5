"""Python layers used by the tests (loaded through python_param, as users' layers are)."""

from __future__ import annotations

import netforge


class ScaleByParamStr(netforge.Layer):
    """y = k·x with k read from param_str; one learnable-free layer, pycaffe style."""

    def setup(self, bottom, top):
        self.k = float(self.param_str)

    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].shape)

    def forward(self, bottom, top):
        top[0].data = bottom[0].data * self.k

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            bottom[0].diff = top[0].diff * self.k
