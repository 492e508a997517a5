"""Layers: recurrent (being written)."""
