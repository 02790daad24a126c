"""Scripted Scipion workflows that drive the protocols (top layer: above protocols)."""
