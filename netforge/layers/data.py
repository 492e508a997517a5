"""Layers: data (being written)."""
