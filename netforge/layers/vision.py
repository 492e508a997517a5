"""Layers: vision (being written)."""
