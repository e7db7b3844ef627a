"""Helpers to run a real tritonserver process: see `llmmesh.triton.launcher` (not re-exported here,
so that `python -m llmmesh.triton.launcher` runs without a double import)."""
