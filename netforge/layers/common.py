"""Layers: common (being written)."""
