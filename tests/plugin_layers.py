"""A layer plugin module, as a package would expose it through the netforge.layers group."""

from __future__ import annotations

from netforge.layer import Layer, register


@register("PluginTimesTwo")
class TimesTwoLayer(Layer):
    bottoms = (1, 1)
    tops = (1, 1)

    def reshape(self, bottom, top):
        top[0].reshape(bottom[0].shape)

    def forward(self, bottom, top):
        top[0].data = 2 * bottom[0].data
