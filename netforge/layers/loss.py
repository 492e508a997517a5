"""Layers: loss (being written)."""
