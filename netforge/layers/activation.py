"""Layers: activation (being written)."""
