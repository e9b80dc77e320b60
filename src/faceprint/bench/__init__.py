"""Reproducible benchmark tables: `python -m faceprint.bench NAME` (not tests)."""
