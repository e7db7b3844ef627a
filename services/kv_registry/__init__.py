"""Cluster-wide index of which replica holds which KV-cache blocks."""
