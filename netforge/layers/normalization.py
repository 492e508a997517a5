"""Layers: normalization (being written)."""
